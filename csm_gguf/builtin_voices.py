"""Built-in voices: each of the 13 OpenAI voice names is a fixed voice prompt, made once per model.

CSM-1B is a base model: a speaker id alone gives a different voice on every call. So each built-in name
stands for a prompt: the model saying SENTENCE as that name's speaker id, sampled with a fixed seed. It is
made on first use and kept like a saved voice (codes and transcript) in the cache, under a key of the
model's files, so another model (or the same one converted again) never uses it. Two threads or
processes that need it at once make it once (a file lock, then an atomic write).

A saved voice of the same name replaces a built-in one (voices.py); the prompt of a built-in voice is made
again if its file is deleted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from .model_dir import MODEL_FILES, cache_root
from .sampling import Sampling

NAMES = ("alloy", "ash", "ballad", "coral", "echo", "fable", "onyx", "nova", "sage", "shimmer", "verse", "marin",
         "cedar")
SPEAKERS = {name: speaker for speaker, name in enumerate(NAMES)}  # each name's CSM speaker id
# What every built-in voice says in its prompt: plain, even, about eight seconds.
SENTENCE = ("Hello, and thank you for listening. I will read your text aloud in a calm and steady voice, "
            "at an easy pace.")
# How it is sampled: CSM's usual settings, written out (a voice must not move with a default), a fixed seed,
# and a bound on its length.
SAMPLING = Sampling(temperature=0.9, top_k=50, seed=20_241_206, max_audio_ms=12_000)
# The draw that samples it (heads.draw): 2, the exponential race (1 drew by a uniform number and the running
# sum of the odds). Another draw makes other codes from the same seed, so a prompt an earlier draw made is made
# again rather than kept, and every machine of a version speaks a built-in voice alike.
DRAW = 2

MakeCodes = Callable[[int, str], np.ndarray]  # (speaker, text) -> codes (frames, 32), sampled with SAMPLING


def model_key(model_dir: str | os.PathLike) -> str:
    """A name for a converted model's files, their sizes and modification times (reading a gigabyte to hash it
    would cost seconds at every start), and the draw that makes the prompts."""
    stats: list[list] = [["draw", DRAW]]
    for name in MODEL_FILES:
        st = os.stat(Path(model_dir) / name)
        stats.append([name, st.st_size, st.st_mtime_ns])
    return hashlib.sha256(json.dumps(stats).encode()).hexdigest()[:16]


def prompt_path(name: str, model_dir: str | os.PathLike) -> Path:
    """Where built-in voice `name`'s prompt for this model is kept."""
    return cache_root() / "builtin-voices" / model_key(model_dir) / f"{name}.npz"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `path`.lock: between processes, and between threads (each opens it)."""
    try:
        import fcntl
    except ImportError:  # Windows: both may make it; the atomic write keeps one, and both are equal
        yield
        return
    with open(path.with_name(path.name + ".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_prompt(name: str, model_dir: str | os.PathLike, make: MakeCodes) -> Path:
    """The file of built-in voice `name`'s prompt for this model, made now (by `make`) if it is not yet."""
    from .atomic import write_atomic
    from .generator import Segment
    from .tts import Voice
    from .voices import PromptCacheError, voice_bytes

    path = prompt_path(name, model_dir)
    if path.exists():
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _locked(path):
            if not path.exists():  # made meanwhile by the thread or process that held the lock
                speaker = SPEAKERS[name]
                codes = make(speaker, SENTENCE)
                write_atomic(path, voice_bytes(Voice([Segment(speaker, SENTENCE, codes)], speaker)))
    except OSError as e:
        raise PromptCacheError(f"cannot keep built-in voice {name!r}'s prompt in {path.parent} ({e.strerror}): "
                                "set CSM_GGUF_CACHE to a folder you can write") from None
    return path
