"""A long text's pieces: each is spoken with the previous piece as context, and that context's codes are
exactly the frames the previous piece produced (not its budget's worth, not all frames so far, not an
end-of-speech frame), in CSM.frames and in the server's engine alike."""

from __future__ import annotations

import numpy as np
import pytest

from context_spy import spy_on_contexts
from csm_gguf.plan import TokenCounts, split_text
from csm_gguf.sampling import Sampling
from csm_gguf.server.engine import SpeechJob
from csm_gguf.tts import CSM
from server_fixtures import loopback_server

TEXT = " ".join(f"This is sentence number {i}, which goes on for a while." for i in range(12))
PER_PIECE = 3  # frames: every piece's budget (a sampled all-zero frame among 32 codes is never seen here)


def assert_each_piece_heard_the_one_before(contexts: list[list], pieces: list[str], frames: list[np.ndarray]):
    assert len(frames) == PER_PIECE * len(pieces)
    assert len(contexts) == len(pieces) and list(contexts[0]) == []
    for i in range(1, len(pieces)):
        (previous,) = contexts[i]
        assert (previous.speaker, previous.text) == (5, pieces[i - 1])
        np.testing.assert_array_equal(previous.codes, np.stack(frames[PER_PIECE * (i - 1): PER_PIECE * i]))


def test_csm_frames(f32_model, monkeypatch):
    tts = CSM(f32_model, kv_type="f32")
    try:
        pieces = split_text(TEXT, TokenCounts(tts.model))
        assert len(pieces) > 2
        contexts = spy_on_contexts(monkeypatch)
        frames = list(tts.frames(TEXT, speaker=5, seed=2, max_audio_ms=PER_PIECE * 80))
        assert_each_piece_heard_the_one_before(contexts, pieces, frames)
    finally:
        tts.close()


@pytest.fixture(scope="module")
def server(f32_model, tmp_path_factory):
    with loopback_server(f32_model, tmp_path_factory.mktemp("long-voices"), max_streams=2) as srv:
        yield srv


def test_server_engine(server, monkeypatch):
    services = server[0]
    engine, tts = services.engine, services.tts
    contexts = spy_on_contexts(monkeypatch)
    job = engine.submit(SpeechJob(TEXT, speaker=5, sampling=Sampling(seed=2, max_audio_ms=PER_PIECE * 80)))
    frames = []
    while (got := job.next_frames(timeout=60)) is not None:
        frames += got
    assert_each_piece_heard_the_one_before(contexts, split_text(TEXT, TokenCounts(tts.model)), frames)
    # The same frames as CSM.frames: piece i sampled with seed + i, after the same context.
    assert not (engine.active or engine.waiting)  # idle: its CSM may be borrowed
    monkeypatch.undo()
    np.testing.assert_array_equal(frames, list(tts.frames(TEXT, speaker=5, seed=2, max_audio_ms=PER_PIECE * 80)))
