"""CSM-1B text-to-speech on llama.cpp from GGUF files.

Imports are lazy so that `python -m csm_gguf.say --help` does not pay for llama.cpp and torch.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

# numpy's OpenBLAS threads keep spinning after each call and fight llama.cpp's threads for the cores
# (4x slower generation on 2 cores). Our matrix-vector products are small: one BLAS thread is fastest.
# This works when csm_gguf is imported before numpy; otherwise set OPENBLAS_NUM_THREADS=1 yourself.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

__version__ = "0.1.0"
__all__ = ["CSM", "Segment", "Voice", "Sampling", "SAMPLE_RATE"]

if TYPE_CHECKING:
    from .generator import Segment
    from .sampling import Sampling
    from .tts import CSM, SAMPLE_RATE, Voice


def __getattr__(name: str):
    if name in ("CSM", "SAMPLE_RATE", "Voice"):
        from . import tts

        return getattr(tts, name)
    if name == "Segment":
        from . import generator

        return generator.Segment
    if name == "Sampling":
        from . import sampling

        return sampling.Sampling
    raise AttributeError(name)
