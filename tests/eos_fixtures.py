"""End of speech on demand: the all-zero frame CSM ends an utterance with, drawn at a chosen frame.

A tiny random model almost never draws 32 zeros in one frame, and weights that force it at frame n are
not something a random model can be built to do. So the draw, the one place where the model's choice
becomes codes, is wrapped: at frame `at` of each stream (each piece of a long text has its own) the
frame's codes are all 0, exactly the frame CSM-1B ends an utterance with; every other frame is the real
draw's. The frame is drawn anyway (the stream's random numbers advance as usual), and after it frames are
drawn normally again, as a model asked to go on would: a path that misses the end then makes more frames,
which the tests see. Everything downstream (Generator.step, generate, CSM, the server's engine, HTTP and
websocket) runs unchanged.

The patch point is `Generator._draw_frame` in `csm_gguf.generator` (retarget DRAW here if it moves).
"""

from __future__ import annotations

import importlib

import pytest

DRAW_MODULE, DRAW_CLASS, DRAW = "csm_gguf.generator", "Generator", "_draw_frame"


def ending_draw(real, at: int):
    def draw(self, streams):
        codes = real(self, streams)
        for j, st in enumerate(streams):
            frame = st.__dict__.get("frames_drawn", 0)  # counted on the stream itself: a new piece starts at 0
            st.frames_drawn = frame + 1
            if frame == at:
                codes[j] = 0
        return codes

    return draw


@pytest.fixture
def end_at(monkeypatch):
    """end_at(n): from now on, every stream's frame n (0-based) is the all-zero end-of-speech frame."""
    cls = getattr(importlib.import_module(DRAW_MODULE), DRAW_CLASS)
    real = getattr(cls, DRAW)

    def set_frame(at: int) -> None:
        monkeypatch.setattr(cls, DRAW, ending_draw(real, at))

    return set_frame
