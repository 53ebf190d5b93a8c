"""Voices as a server uses them, for the HTTP server and the Wyoming server alike.

A built-in voice's prompt that this model has not made yet is made by the engine, in turn with the
requests it is speaking: the engine thread drives the generator, so nothing else may generate with it
(CSM.voice would). And a voice deleted or replaced has its cached prompt dropped, so its KV cells go before the
next frame instead of waiting to be evicted.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial
from typing import Iterator

import numpy as np

from .. import builtin_voices
from ..tts import CSM, Voice
from ..voices import BUILTIN_VOICES, list_voices, load_voice, read_voice
from .engine import Engine, SpeechJob


def served_voice(tts: CSM, engine: Engine, name: str) -> Voice:
    """Voice `name` (a saved one, else a built-in one, its prompt made now if need be): see load_voice."""
    return tts.usable_voice(name, load_voice(name, tts.model.path, partial(_prompt_codes, engine)))


def _prompt_codes(engine: Engine, speaker: int, text: str) -> np.ndarray:
    return engine.codes(SpeechJob(text, speaker, (), builtin_voices.SAMPLING))


@contextmanager
def forgetting(tts: CSM, engine: Engine, name: str) -> Iterator[None]:
    """Around the deletion or replacement of voice `name`: its prompt as it is now is read first and dropped from
    the prompt cache after, once no new request can take it (dropped before, a request in the voice meanwhile
    put it back, to stay until evicted)."""
    voice = _as_cached(tts, name)
    yield  # a deletion or save that failed (raised) changed nothing: then nothing is dropped
    if voice is not None:
        engine.forget_voice(voice.segments)


def _as_cached(tts: CSM, name: str) -> Voice | None:
    """Voice `name` as the prompt cache may hold it now, if any."""
    path = builtin_voices.prompt_path(name, tts.model.path) if name in BUILTIN_VOICES else None
    try:
        if name in list_voices():
            voice = load_voice(name)
        elif path is not None and path.exists():
            voice = read_voice(path, name)
        else:
            return None
        return tts.usable_voice(name, voice)
    except ValueError:  # damaged, or another model's: refused when used, so nothing of it was cached
        return None
