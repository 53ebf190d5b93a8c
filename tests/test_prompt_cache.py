"""Voice prompts read once per process (csm_gguf/prompt_cache.py): exact, read once, bounded, dropped."""

from __future__ import annotations

import numpy as np
import pytest

from csm_fixtures import random_codes
from csm_gguf import prompt_cache
from csm_gguf.generator import Generator, Segment
from csm_gguf.model import CSMModel
from csm_gguf.plan import TokenCounts, split_text
from csm_gguf.sampling import Sampling
from csm_gguf.server.engine import Engine, SpeechJob
from csm_gguf.tts import CSM

GREEDY = Sampling(temperature=0, max_audio_ms=12 * 80)
TEXTS = ["Hello there, how are you?", "A second sentence, somewhat longer than the first one.", "Third!",
         "And a fourth to end with."]


def voice(seed: int = 1, frames: int = 120) -> list[Segment]:
    return [Segment(speaker=1, text="What the voice's recording says.", codes=random_codes(frames, 64, seed=seed))]


@pytest.fixture(scope="module")
def model(f32_model):
    return CSMModel(f32_model)


def speak(gen: Generator, text: str, context: list[Segment], shared_voice: list[Segment] | None = None,
          speaker: int = 0) -> np.ndarray:
    shared = gen.context_rows(context if shared_voice is None else shared_voice)  # as plan.Context marks it
    return np.stack(list(gen.generate(text, speaker, context, GREEDY, shared)))


@pytest.fixture(scope="module")
def uncached(model):
    gen = Generator(model, kv_type="f32", n_threads=1, cached_prompts=0)
    yield gen
    gen.close()


def test_requests_in_a_voice_read_its_prompt_once_and_get_the_same_codes(model, uncached):
    gen = Generator(model, kv_type="f32", n_threads=1)
    context = voice()
    shared = gen.context_rows(context)
    assert shared > 100
    for i, text in enumerate(TEXTS):
        before = gen.prompt_positions_read
        codes = speak(gen, text, voice())  # the voice loaded again: equal content, other objects
        np.testing.assert_array_equal(codes, speak(uncached, text, context))
        rest = gen.prompt_rows(text, 0) - 1  # the text's rows, less the first step's input
        assert gen.prompt_positions_read - before == (shared + rest if i == 0 else rest)
    assert len(gen.prompt_cache.entries) == 1
    gen.close()


def test_a_prompt_not_marked_shared_is_not_cached(model):
    gen = Generator(model, kv_type="f32", n_threads=1)
    speak(gen, TEXTS[0], voice(), shared_voice=[])
    assert not gen.prompt_cache.entries
    gen.close()


def test_least_recently_used_prompts_are_evicted_past_the_limit(model, uncached, monkeypatch):
    monkeypatch.setattr(prompt_cache, "ENTRIES", 2)
    gen = Generator(model, kv_type="f32", n_threads=1)
    voices = [voice(seed) for seed in (1, 2, 3)]
    rows = [gen.context_embeddings(v) for v in voices]
    speak(gen, TEXTS[0], voices[0])
    speak(gen, TEXTS[0], voices[1])
    speak(gen, TEXTS[1], voices[0])  # voice 0 used last: voice 1 goes next
    speak(gen, TEXTS[0], voices[2])
    kept = [e.rows for e in gen.prompt_cache.entries]
    assert len(kept) == 2
    assert any(np.array_equal(k, rows[0]) for k in kept) and any(np.array_equal(k, rows[2]) for k in kept)
    # Evicted and reused sequences hold nothing stale: every voice still speaks exactly.
    for v in voices:
        np.testing.assert_array_equal(speak(gen, TEXTS[2], v), speak(uncached, TEXTS[2], v))
    gen.close()


def test_a_prompt_cached_in_a_reused_sequence_is_shared_exactly(model, uncached, monkeypatch):
    """The evicted voice's cells leave its sequence: the voice cached there next, shared from it, hears
    only itself (the test above reads every voice afresh, or shares from a sequence never reused)."""
    monkeypatch.setattr(prompt_cache, "ENTRIES", 1)  # one sequence: each new voice is cached where the last was
    gen = Generator(model, kv_type="f32", n_threads=1)
    try:
        speak(gen, TEXTS[0], voice(1))
        speak(gen, TEXTS[0], voice(2))  # evicts voice 1, cached in the same sequence
        before = gen.prompt_positions_read
        got = speak(gen, TEXTS[1], voice(2))
        assert gen.prompt_positions_read - before < gen.context_rows(voice(2))  # shared, not read again
        np.testing.assert_array_equal(got, speak(uncached, TEXTS[1], voice(2)))
    finally:
        gen.close()


def test_positions_are_bounded_too(model, monkeypatch):
    monkeypatch.setattr(prompt_cache, "POSITIONS", 200)
    gen = Generator(model, kv_type="f32", n_threads=1)
    speak(gen, TEXTS[0], voice(1))
    speak(gen, TEXTS[0], voice(2))  # two of 133 positions do not fit 200: the first goes
    assert len(gen.prompt_cache.entries) == 1 and gen.prompt_cache.held() <= 200
    speak(gen, TEXTS[0], voice(3, frames=400))  # longer than the whole cache: read, not kept
    assert len(gen.prompt_cache.entries) == 1
    gen.close()


def test_a_deleted_voice_is_dropped(model, uncached):
    gen = Generator(model, kv_type="f32", n_threads=1)
    speak(gen, TEXTS[0], voice(1))
    speak(gen, TEXTS[0], voice(2))
    assert gen.forget_voice(voice(1)) == 1
    assert len(gen.prompt_cache.entries) == 1
    before = gen.prompt_positions_read
    np.testing.assert_array_equal(speak(gen, TEXTS[1], voice(1)), speak(uncached, TEXTS[1], voice(1)))
    assert gen.prompt_positions_read - before > gen.context_rows(voice(1))  # read again
    gen.close()


@pytest.fixture
def csm_pair(f32_model, monkeypatch):
    with_cache = CSM(f32_model, kv_type="f32", n_threads=1)
    monkeypatch.setattr(prompt_cache, "ENTRIES", 0)
    without = CSM(f32_model, kv_type="f32", n_threads=1)
    yield with_cache, without
    with_cache.close()
    without.close()


def test_a_long_text_in_pieces_and_a_dialogue_read_the_voice_once(csm_pair):
    cached, plain = csm_pair
    long_text = " ".join(["This sentence is one of many in a long text that is spoken in pieces."] * 8)
    kw = {"context": voice(), "temperature": 0, "max_audio_ms": 8 * 80}
    pieces = len(split_text(long_text, TokenCounts(cached.model)))
    assert pieces >= 3
    read = [tts.generator.prompt_positions_read for tts in csm_pair]
    np.testing.assert_array_equal(np.stack(list(cached.frames(long_text, **kw))),
                                  np.stack(list(plain.frames(long_text, **kw))))
    shared = cached.generator.context_rows(voice())
    read = [tts.generator.prompt_positions_read - before for tts, before in zip(csm_pair, read)]
    assert read[1] - read[0] == (pieces - 1) * shared  # once, not once a piece
    turns = [(0, "Hello, who is there?"), (1, "Only me."), (0, "Then come in, and sit down by the fire.")]
    read = [tts.generator.prompt_positions_read for tts in csm_pair]
    np.testing.assert_array_equal(np.stack(list(cached.dialogue_frames(turns, **kw))),
                                  np.stack(list(plain.dialogue_frames(turns, **kw))))
    read = [tts.generator.prompt_positions_read - before for tts, before in zip(csm_pair, read)]
    assert read[1] - read[0] == len(turns) * shared  # cached already: no turn reads it


def collect(job) -> np.ndarray:
    frames = []
    while (got := job.next_frames(timeout=60)) is not None:
        frames += got
    return np.stack(frames)


def test_concurrent_server_streams_in_one_voice_share_its_prompt(f32_model, uncached):
    tts = CSM(f32_model, kv_type="f32", max_streams=4, n_threads=1)
    engine = Engine(tts.generator)
    try:
        gen = tts.generator
        with engine._wake:  # the engine takes all four at once: their prompts are read together
            jobs = [engine.submit(SpeechJob(text, speaker=0, context=voice(), sampling=GREEDY)) for text in TEXTS]
        results = [collect(job) for job in jobs]
        for text, codes in zip(TEXTS, results):
            np.testing.assert_array_equal(codes, speak(uncached, text, voice()))
        rest = sum(gen.prompt_rows(text, 0) - 1 for text in TEXTS)
        assert gen.prompt_positions_read == gen.context_rows(voice()) + rest  # the voice read by one of four
    finally:
        engine.close()
        tts.close()
