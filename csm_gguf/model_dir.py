"""A converted model directory: its files, and where converted models live by default."""

from __future__ import annotations

import os
import re
from pathlib import Path

BACKBONE_FILE = "backbone.gguf"
DECODER_FILE = "decoder.gguf"
SIDECAR_FILE = "csm.gguf"
# A vocab-only llama model (like llama.cpp's own ggml-vocab-*.gguf): llama.cpp tokenizes with it. Kept out
# of the sidecar because gguf-py takes seconds to parse 400k vocabulary strings at every start.
TOKENIZER_FILE = "tokenizer.gguf"
SIDECAR_VERSION = 3  # 3: the codec in its runtime layout, float32 (2: the kyutai/mimi checkpoint's, F16)
MODEL_FILES = (BACKBONE_FILE, DECODER_FILE, SIDECAR_FILE, TOKENIZER_FILE)


def cache_root() -> Path:
    if "CSM_GGUF_CACHE" in os.environ:
        return Path(os.environ["CSM_GGUF_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "csm-gguf"


def default_model_dir(source: str, qtype: str, decoder_qtype: str | None = None) -> Path:
    name = re.sub(r"[^A-Za-z0-9._-]+", "--", source.strip("/"))
    suffix = qtype if not decoder_qtype or decoder_qtype == qtype else f"{qtype}-decoder-{decoder_qtype}"
    return cache_root() / "models" / f"{name}-{suffix}"


# The hub's CSM-1B conversions, in the order a model is looked for in the cache (see cached_models).
DEFAULT_SOURCES = ("sesame/csm-1b", "unsloth/csm-1b")
DEFAULT_QTYPES = ("q4_k", "q8_0", "f16", "bf16", "f32")


def cached_models() -> list[Path]:
    """The converted models in the cache: the hub's CSM-1B first (q4_k before q8_0..., sesame before
    unsloth), then the others (another --decoder-qtype, a --model-path's), newest first. Never a model of
    random weights (`convert --random-weights`, bench.py's: noise), nor a conversion still being written."""
    folder = cache_root() / "models"
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if not p.name.startswith((".", "random-")) and p.is_dir()
             and all((p / f).exists() for f in MODEL_FILES)]
    preferred = [default_model_dir(source, qtype) for qtype in DEFAULT_QTYPES for source in DEFAULT_SOURCES]
    others = sorted((p for p in found if p not in preferred), key=lambda p: p.lstat().st_mtime, reverse=True)
    return [p for p in preferred if p in found] + others


def check_model_dir(path: str | Path) -> Path:
    path = Path(path).expanduser()
    if not path.is_dir():
        why = "is a file, not a model directory" if path.exists() else "does not exist"
        raise FileNotFoundError(
            f"model directory {path} {why}; give the folder a conversion wrote, or convert a model first: "
            "python -m csm_gguf.convert"
        )
    missing = [f for f in MODEL_FILES if not (path / f).exists()]
    if missing:
        raise FileNotFoundError(
            f"{path} is not a csm-gguf model directory (missing {', '.join(missing)}); convert a checkpoint "
            f"into a new folder: python -m csm_gguf.convert --model-path CHECKPOINT --output-dir NEW_FOLDER"
        )
    return path
