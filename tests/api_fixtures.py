"""What the say and CSM API tests share: a CSM of the tiny model, a voices folder of their own, the
reference's audio."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from csm_gguf.tts import CSM
from reference import reference_greedy_codes, reference_prompt_embeddings

TEXT = "Hello there, how are you doing today?"


@pytest.fixture(scope="module")
def tts(f32_model):
    engine = CSM(f32_model, kv_type="f32")
    yield engine
    engine.close()


@pytest.fixture
def voices_home(tmp_path, monkeypatch):
    monkeypatch.setenv("CSM_GGUF_VOICES", str(tmp_path / "voices"))


def reference_audio(tiny_csm, tts, frames: int) -> tuple[np.ndarray, np.ndarray]:
    emb = reference_prompt_embeddings(tiny_csm, tts.model.prompt_tokens, TEXT, 0, [])
    codes = reference_greedy_codes(tiny_csm, emb, frames)
    with torch.no_grad():
        audio = tiny_csm.codec_model.decode(torch.tensor(codes.T[None])).audio_values[0, 0].numpy()
    return codes, audio
