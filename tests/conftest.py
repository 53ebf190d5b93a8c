"""Session fixtures: one tiny random CSM, saved in both formats and converted once per qtype."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import pytest

from csm_fixtures import (
    make_tiny_csm,
    save_codec,
    save_original_format,
    save_transformers_format,
    write_tokenizer_json,
)
from eos_fixtures import end_at  # noqa: F401 (a fixture: end of speech on demand)

warnings.filterwarnings("ignore", message=".*rope_parameters.*")
# Built-in voices' prompts are made on first use and kept in the cache: the tests' own, never the user's
# (subprocesses inherit it). Removed when the session's process exits, else every run left one in /tmp.
os.environ["CSM_GGUF_CACHE"] = tempfile.mkdtemp(prefix="csm-gguf-test-cache-")
atexit.register(shutil.rmtree, os.environ["CSM_GGUF_CACHE"], ignore_errors=True)


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("csm")


@pytest.fixture(scope="session")
def tokenizer_json(workdir) -> Path:
    return write_tokenizer_json(workdir / "tokenizer.json")


@pytest.fixture(scope="session")
def tiny_csm():
    return make_tiny_csm(seed=0)


@pytest.fixture(scope="session")
def hf_checkpoint(workdir, tiny_csm, tokenizer_json) -> Path:
    return save_transformers_format(tiny_csm, workdir / "hf", tokenizer_json)


@pytest.fixture(scope="session")
def original_checkpoint(workdir, tiny_csm) -> Path:
    return save_original_format(tiny_csm, workdir / "original")


@pytest.fixture(scope="session")
def codec_folder(workdir, tiny_csm) -> Path:
    return save_codec(tiny_csm, workdir / "mimi")


_converted: dict[str, Path] = {}


@pytest.fixture(scope="session")
def converted(workdir, hf_checkpoint):
    """converted(qtype, decoder_qtype=None) -> model directory of the tiny transformers-format CSM."""
    from converter.convert import convert

    def get(qtype: str, decoder_qtype: str | None = None) -> Path:
        key = f"{qtype}-{decoder_qtype}"
        if key not in _converted:
            _converted[key] = convert(
                model_path=str(hf_checkpoint),
                output_dir=workdir / f"model-{key}",
                qtype=qtype,
                decoder_qtype=decoder_qtype,
            )
        return _converted[key]

    return get


@pytest.fixture(scope="session")
def f32_model(converted) -> Path:
    return converted("f32")


# Fixtures of their own modules: the say and API tests' (a CSM of the tiny model, a voices folder of their own),
# the server tests' (a real server on loopback)
from api_fixtures import tts, voices_home  # noqa: E402, F401
from server_fixtures import base, client, engine, server, services  # noqa: E402, F401
