"""CSM-1B text-to-speech on llama.cpp from GGUF files.

Imports are lazy so that `python -m csm_gguf.say --help` does not pay for llama.cpp and torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["CSM", "Segment", "Sampling", "SAMPLE_RATE"]

if TYPE_CHECKING:
    from .generator import Sampling, Segment
    from .tts import CSM, SAMPLE_RATE


def __getattr__(name: str):
    if name in ("CSM", "SAMPLE_RATE"):
        from . import tts

        return getattr(tts, name)
    if name in ("Segment", "Sampling"):
        from . import generator

        return getattr(generator, name)
    raise AttributeError(name)
