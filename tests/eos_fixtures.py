"""End of speech on demand: a sampler that draws CSM's all-zero frame at a chosen frame.

A tiny random model almost never draws 32 zeros in one frame, and weights that force it at frame n are
not something a random model can be built to do. So the sampler, the one place where the model's
choice becomes codes, is wrapped: at frame `at` of each stream (each piece of a long text has its own)
every codebook's draw is 0, exactly the frame CSM-1B ends an utterance with; every other draw is the real
sampler's. After that frame it draws normally again, as a model asked to go on would: a path that misses
the end then makes more frames, which the tests see. Everything downstream (Generator.step, generate,
CSM, the server's engine, HTTP and websocket) runs unchanged.

The patch point is `csm_gguf.generator.Sampler`, made per stream by `Generator.start` (retarget
SAMPLER_MODULE and the class name here if sampling moves).
"""

from __future__ import annotations

import importlib

import pytest

SAMPLER_MODULE = "csm_gguf.generator"
CODEBOOKS = 32


def ending_sampler(real: type, at: int) -> type:
    class EndingSampler:
        def __init__(self, sampling, n: int):
            self.inner = real(sampling, n)
            self.draws = 0
            self.greedy = getattr(self.inner, "greedy", None)

        def __call__(self, logits):
            frame = self.draws // CODEBOOKS
            self.draws += 1
            code = self.inner(logits)  # drawn anyway: the stream's random state advances as usual
            return 0 if frame == at else code

        def close(self) -> None:
            self.inner.close()

    return EndingSampler


@pytest.fixture
def end_at(monkeypatch):
    """end_at(n): from now on, every stream's frame n (0-based) is the all-zero end-of-speech frame."""
    module = importlib.import_module(SAMPLER_MODULE)
    real = module.Sampler

    def set_frame(at: int) -> None:
        monkeypatch.setattr(module, "Sampler", ending_sampler(real, at))

    return set_frame
