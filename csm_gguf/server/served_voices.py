"""Voices as a server uses them, for the HTTP server and the Wyoming server alike.

A built-in voice's prompt that this model has not made yet is made by the engine, in turn with the
requests it is speaking: the engine thread drives the generator, so nothing else may generate with it
(CSM.voice would). And a voice about to be deleted or replaced has its cached prompt dropped first, so its
KV cells go before the next frame instead of waiting to be evicted.
"""

from __future__ import annotations

from functools import partial

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


def forget_voice(tts: CSM, engine: Engine, name: str) -> None:
    """Drop voice `name`'s cached prompt, as it is now, before it is deleted or replaced."""
    path = builtin_voices.prompt_path(name, tts.model.path) if name in BUILTIN_VOICES else None
    try:
        if name in list_voices():
            voice = load_voice(name)
        elif path is not None and path.exists():
            voice = read_voice(path, name)
        else:
            return
        voice = tts.usable_voice(name, voice)
    except ValueError:  # damaged, or another model's: refused when used, so nothing of it was cached
        return
    engine.forget_voice(voice.segments)
