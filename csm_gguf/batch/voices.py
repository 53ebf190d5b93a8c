"""The voices of a batch run, resolved once in the driver: workers get each voice's prompt with the rows,
so every row in a voice is given the same prompt whichever worker (or node) makes it.

As in `say` and the server, a row that names no voice (nor the run a default one) and gives no speaker id
speaks in the default voice (a built-in voice: a fixed prompt, csm_gguf.builtin_voices); voice "none" is
no prompt at all. A built-in voice's prompt that this model has not made yet is made here, once, by a
model loaded for it (then kept in the cache for every later run).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ..tts import DEFAULT_VOICE, NO_VOICE

if TYPE_CHECKING:
    from .pipeline import Pool
    from .rows import Row


def row_voice(row: Row, default_voice: str | None, default_speaker: int | None) -> str:
    """The voice a row speaks in: its own, else the run's; with neither and no speaker id, DEFAULT_VOICE;
    else no prompt (NO_VOICE)."""
    voice = row.voice or default_voice
    if voice is None:
        voice = DEFAULT_VOICE if row.speaker is None and default_speaker is None else NO_VOICE
    return voice


class PromptMaker:
    """Makes a built-in voice's prompt codes (builtin_voices.MakeCodes) with a model loaded on first use."""

    def __init__(self, pool: Pool):
        self.pool, self.tts = pool, None

    def __call__(self, speaker: int, text: str) -> np.ndarray:
        if self.tts is None:
            from ..tts import CSM

            pool = self.pool
            self.tts = CSM(pool.model, pool.threads, pool.gpu_layers, pool.kv_type)
        return self.tts.prompt_codes(speaker, text)

    def close(self) -> None:
        if self.tts is not None:
            self.tts.close()


def load_voices(names: set[str], pool: Pool) -> tuple[dict[str, Any], dict[str, str]]:
    """The voices the rows name, loaded once here (workers get them with the model): {name: Voice}, and
    {name: error} for those that cannot be used, whose rows fail. NO_VOICE is no voice: not among them."""
    from ..voices import load_voice

    voices, errors = {}, {}
    maker = PromptMaker(pool)
    try:
        for name in sorted(names - {NO_VOICE}):
            try:
                voices[name] = load_voice(name, pool.model, maker)
            except ValueError as e:
                errors[name] = str(e)
    finally:
        maker.close()
    return voices, errors
