"""The server's engine (continuous batching), driven directly: its codes, its scheduling, its end."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from csm_fixtures import random_codes
from csm_gguf.generator import Segment
from csm_gguf.sampling import Sampling
from server_fixtures import (
    MAX_QUEUE,
    MAX_STREAMS,
    TEXT,
    wait_idle,
)

GREEDY_800 = Sampling(temperature=0, max_audio_ms=800)  # 10 frames


def _all(job, next_items) -> list[np.ndarray]:
    items = []
    while (got := next_items(job)) is not None:
        items += got
    return items


def frames_of(job) -> np.ndarray:
    return np.stack(_all(job, lambda j: j.next_frames(timeout=30)))


def audio_of(job) -> np.ndarray:
    return np.concatenate(_all(job, lambda j: j.next_audio(timeout=30)))


def test_engine_batched_greedy_codes_equal_solo_codes(engine):
    from csm_gguf.server.engine import SpeechJob

    specs = [SpeechJob(f"Sentence {i} for the engine{'!' * i}", speaker=i, sampling=GREEDY_800)
             for i in range(8)]
    solo = [frames_of(engine.submit(s)) for s in specs]
    jobs = [engine.submit(s) for s in specs]
    for job, expected in zip(jobs, solo):
        np.testing.assert_array_equal(frames_of(job), expected)
    wait_idle(engine)


def test_a_voice_prompt_the_engine_cannot_forget_stops_nothing(engine, caplog):
    """Dropping a voice's cached prompt happens on the engine thread: a failure there ended the thread, and
    every request after it failed until a restart."""
    from csm_gguf.server.engine import SpeechJob

    bad = Segment(0, "Codes of another model.", np.full((5, 32), engine.generator.model.n_codes + 10))
    engine.forget_voice([bad])
    assert len(frames_of(engine.submit(SpeechJob(TEXT, sampling=GREEDY_800)))) == 10
    assert "forgetting a voice's cached prompt failed" in caplog.text


def test_a_long_prompt_is_read_between_the_frames_of_others(engine, monkeypatch):
    from csm_gguf.server.engine import SpeechJob

    rows = 16
    monkeypatch.setattr(engine, "prefill_rows", rows)
    backbone = engine.generator.backbone
    decode, sizes = backbone.decode, []
    monkeypatch.setattr(backbone, "decode", lambda n: (sizes.append(n), decode(n))[1])

    long_prompt = SpeechJob(TEXT, context=[Segment(1, "Some context.", random_codes(150, 64, seed=3))],
                            sampling=GREEDY_800)
    solo = frames_of(engine.submit(long_prompt))
    speaking = engine.submit(SpeechJob(TEXT, sampling=Sampling(temperature=0, max_audio_ms=60 * 80)))
    speaking.next_frames(timeout=30)
    engine.forget_voice(list(long_prompt.context))  # read again, not from the prompt cache
    sizes.clear()
    joining = engine.submit(long_prompt)
    np.testing.assert_array_equal(frames_of(joining), solo)
    assert len(frames_of(speaking)) > 20  # still speaking when the other finished
    assert sum(n for n in sizes if n > 2) >= 150  # the prompt was read in this window (steps decode 1-2 rows)...
    assert max(sizes) <= rows  # ...in parts, between frames of the speaking stream
    wait_idle(engine)


def test_the_prompt_rows_read_between_frames_follow_where_the_layers_are(engine, monkeypatch):
    from csm_gguf.server.engine import Engine
    from csm_gguf.server.limits import PREFILL_ROWS_CPU, PREFILL_ROWS_GPU

    assert engine.prefill_rows == PREFILL_ROWS_CPU == 32
    monkeypatch.setattr(engine.generator, "layers_on_gpu", True)
    for asked, rows in ((0, PREFILL_ROWS_GPU), (7, 7)):
        other = Engine(engine.generator, prefill_rows=asked)
        try:
            assert other.prefill_rows == rows
        finally:
            other.close()


def test_requests_that_arrive_together_start_together(engine):
    from csm_gguf.server.engine import SpeechJob

    with engine._wake:  # the engine thread sees all four at once
        jobs = [engine.submit(SpeechJob(f"Request {i} arrives.", sampling=GREEDY_800)) for i in range(4)]
    for job in jobs:
        while job.next_frames(timeout=30) is not None:
            pass
    assert len({job.first_frame for job in jobs}) == 1  # their first frames came from one step
    wait_idle(engine)


def test_prompts_read_together_share_one_decode_and_say_what_they_say_alone(engine, monkeypatch):
    """One llama_decode for every prompt that arrived together (a decode's fixed costs, its launches on a GPU,
    paid once), each row in its own stream's sequence: the same codes as each alone."""
    from csm_gguf.server.engine import SpeechJob

    backbone = engine.generator.backbone
    decode, sizes = backbone.decode, []
    monkeypatch.setattr(backbone, "decode", lambda n: (sizes.append(n), decode(n))[1])
    specs = [SpeechJob(f"Request {i} arrives{'!' * i}", speaker=i, sampling=GREEDY_800) for i in range(4)]
    solo, alone = [], []
    for spec in specs:
        sizes.clear()
        solo.append(frames_of(engine.submit(spec)))
        alone.append(sizes[0])  # its prompt, read in one decode
    sizes.clear()
    with engine._wake:  # the engine thread sees all four at once
        jobs = [engine.submit(spec) for spec in specs]
    for job, expected in zip(jobs, solo):
        np.testing.assert_array_equal(frames_of(job), expected)
    assert sizes[0] == sum(alone) and min(alone) > 2  # all four prompts in the first decode
    wait_idle(engine)


def test_many_short_jobs_leave_nothing_behind(engine):
    """Jobs that finish, jobs cancelled while queued and jobs cancelled mid-speech: afterwards every slot
    is free and the engine holds no job."""
    from csm_gguf.server.engine import SpeechJob

    jobs = []
    for i in range(1000):
        while len(engine.active) + len(engine.joining) + len(engine.waiting) >= MAX_STREAMS + MAX_QUEUE:
            time.sleep(0.001)
        sampling = Sampling(seed=i, max_audio_ms=80 if i % 3 else 800)
        job = engine.submit(SpeechJob("Hi.", speaker=i % 5, sampling=sampling))
        if i % 3 == 0:
            job.cancel()
        jobs.append(job)
    for job in jobs:
        while job.next_frames(timeout=30) is not None:
            pass
    wait_idle(engine)
    assert engine.stats()["free_slots"] == MAX_STREAMS


def test_engine_closing_ends_a_following_request_with_the_shutdown_error(f32_model, monkeypatch):
    """close() landing while the request before it makes its last frame: the follower used to end as a
    success with no audio, and a request submitted after close() waited forever."""
    from csm_gguf.server.engine import Engine, SpeechJob
    from csm_gguf.tts import CSM

    tts = CSM(f32_model, kv_type="f32", max_streams=1)
    engine = Engine(tts.generator)
    attached, step = threading.Event(), engine.generator.step

    def closing_step(streams):
        attached.wait(10)
        with engine._wake:  # what close() does first, here in the middle of the frame
            engine._closing = True
        return step(streams)

    monkeypatch.setattr(engine.generator, "step", closing_step)
    try:
        first = engine.submit(SpeechJob("One.", sampling=Sampling(temperature=0, max_audio_ms=80)))
        second = engine.submit(SpeechJob("Two.", sampling=Sampling(temperature=0)), after=first)
        attached.set()
        assert len(first.next_frames(timeout=10)) == 1 and first.next_frames(timeout=10) is None
        with pytest.raises(RuntimeError, match="shutting down"):
            second.next_frames(timeout=10)
        with pytest.raises(RuntimeError, match="shutting down"):
            engine.submit(SpeechJob("Three."))
    finally:
        engine.close()
        tts.close()


def test_an_engine_thread_that_dies_fails_its_requests_and_the_liveness_probe(f32_model, monkeypatch):
    """An error the engine's steps do not catch ended its thread: requests then waited for ever, new ones were
    taken, and /health/live stayed 200, so an orchestrator never restarted the server."""
    from types import SimpleNamespace

    from flask import Flask

    from csm_gguf.server import health, routes
    from csm_gguf.server.engine import Engine, SpeechJob
    from csm_gguf.server.routes import EXTENSION as SERVICES
    from csm_gguf.tts import CSM

    tts = CSM(f32_model, kv_type="f32", max_streams=1)
    engine = Engine(tts.generator)

    def broken_step(streams):
        raise SystemExit("a bug of ours")

    monkeypatch.setattr(engine.generator, "step", broken_step)
    app = Flask(__name__)
    app.register_blueprint(health.bp)
    app.register_blueprint(routes.bp)
    app.config["API_KEY"] = None
    app.extensions[SERVICES] = SimpleNamespace(engine=engine, tts=tts)
    try:
        assert app.test_client().get("/health/live").status_code == 200
        job = engine.submit(SpeechJob("One.", sampling=Sampling(temperature=0, max_audio_ms=800)))
        with pytest.raises(RuntimeError, match="engine stopped on an internal error"):
            job.next_frames(timeout=10)
        assert engine.failed and not engine.running
        with pytest.raises(RuntimeError, match="engine stopped on an internal error"):
            engine.submit(SpeechJob("Two."))
        live = app.test_client().get("/health/live")
        assert live.status_code == 503 and live.json == {"status": "engine failed"}
        about = app.test_client().get("/health")
        assert about.status_code == 503 and about.json["status"] == "engine failed"
    finally:
        engine.close()
        tts.close()


def test_waiting_followers_do_not_fill_the_queue_against_new_requests(f32_model):
    """Sessions that keep talking keep their next sentences in the queue: if those counted against its size,
    every new request would be refused for as long as the sessions talk."""
    from csm_gguf.server.engine import Engine, SpeechJob
    from csm_gguf.tts import CSM

    tts = CSM(f32_model, kv_type="f32", max_streams=1)
    engine = Engine(tts.generator, max_queue=1)
    long = Sampling(temperature=0, max_audio_ms=60_000)
    jobs = []
    try:
        jobs.append(first := engine.submit(SpeechJob("One.", sampling=long)))
        jobs.append(other := engine.submit(SpeechJob("Another client.", sampling=long)))  # the queue is full
        jobs.append(follower := engine.submit(SpeechJob("Two.", sampling=long), after=first))
        first.cancel()  # "Two." joins the queue behind "Another client.", which takes the slot
        deadline = time.monotonic() + 10
        while not ([j is other for j in engine.active] == [True] and [*engine.waiting] == [follower]):
            assert time.monotonic() < deadline, engine.stats()
            time.sleep(0.01)
        jobs.append(late := engine.submit(SpeechJob("Three.", sampling=long)))  # it was refused: the server is busy
        assert [*engine.waiting] == [follower, late]
    finally:
        for job in jobs:
            job.cancel()
        engine.close()
        tts.close()


def test_a_built_in_voice_made_for_a_request_takes_no_other_requests_place(f32_model):
    """A request that holds the last place and then needs a built-in voice's prompt (`codes`, made once) had that
    job counted as one more request: the next request that had taken its place before was refused its 429
    after its body was read and its context encoded."""
    from csm_gguf.server.engine import Engine, SpeechJob
    from csm_gguf.tts import CSM

    tts = CSM(f32_model, kv_type="f32", max_streams=1)
    engine = Engine(tts.generator, max_queue=1)
    speaking = engine.submit(SpeechJob("Someone is being spoken to.", sampling=Sampling(temperature=0,
                                                                                           max_audio_ms=60_000)))
    maker = threading.Thread(target=engine.codes, args=(SpeechJob("A voice's prompt.", sampling=GREEDY_800),))
    try:
        place = engine.place()  # the last one: the server is full
        maker.start()  # another request, its place taken, makes a built-in voice's prompt meanwhile
        deadline = time.monotonic() + 10
        while not engine.waiting:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        engine.submit_in(place, SpeechJob("My request, read and encoded.", sampling=GREEDY_800)).cancel()
    finally:
        speaking.cancel()
        maker.join(30)
        engine.close()
        tts.close()


def test_a_close_as_a_request_ends_ends_its_follower_once(f32_model):
    """close() between the end's decision to queue the follower (under the lock) and its later look at
    `_closing`: the follower was both queued and ended, then ended again at shutdown (counted twice)."""
    from collections import Counter

    from csm_gguf.server.engine import Engine, SpeechJob
    from csm_gguf.tts import CSM

    tts = CSM(f32_model, kv_type="f32", max_streams=1)
    engine = Engine(tts.generator)
    ends: Counter = Counter()
    first = engine.submit(SpeechJob("One.", sampling=Sampling(temperature=0, max_audio_ms=80)))
    second = engine.submit(SpeechJob("Two.", sampling=GREEDY_800), after=first)
    closer = threading.Thread(target=engine.close)

    def on_end(job, error):  # runs after the lock is let go, before the look at _closing
        ends[job] += 1
        if job is first:
            closer.start()
            deadline = time.monotonic() + 10
            while not engine._closing:
                assert time.monotonic() < deadline
                time.sleep(0.001)

    engine.on_end = on_end
    try:
        while first.next_frames(timeout=10) is not None:
            pass
        with pytest.raises(RuntimeError, match="shutting down"):
            second.next_frames(timeout=10)
        closer.join(10)
        assert ends[second] == 1
    finally:
        engine.close()
        tts.close()


def decoded(services, codes: np.ndarray) -> np.ndarray:
    """`codes` (frames, K) decoded from a fresh state, in one go."""
    import torch

    return services.tts.codec.decode(torch.from_numpy(codes.T[None]))[0, 0].numpy()


def assert_same_samples(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


def test_jobs_with_audio_are_decoded_together_each_as_alone(engine, services):
    """The codec's thread decodes the frames of every job of a frame step in one batched step; each job's
    audio equals its codes decoded alone."""
    from csm_gguf.server.engine import SpeechJob

    specs = [SpeechJob(f"Stream {i} of the codec{'!' * i}", speaker=i, sampling=GREEDY_800) for i in range(4)]
    codes = [frames_of(engine.submit(s)) for s in specs]
    pool = services.decoders
    steps, stream_steps = pool.steps, pool.stream_steps
    streams = [pool.open() for _ in specs]
    with engine._wake:  # the engine thread sees all four at once: they speak in the same frame steps
        jobs = [engine.submit(s, audio=a) for s, a in zip(specs, streams)]
    for job, expected in zip(jobs, codes):
        assert_same_samples(audio_of(job), decoded(services, expected))
    assert pool.stream_steps - stream_steps >= 3 * (pool.steps - steps)  # mostly 4 streams a step
    for stream in streams:
        stream.close()
    wait_idle(engine)
    assert pool.streams() == 0


def test_jobs_following_on_in_one_audio_stream(engine, services):
    """Jobs decoded one after the other in one audio stream join without a seam (a websocket file)."""
    from csm_gguf.server.engine import SpeechJob

    specs = [SpeechJob(text, sampling=GREEDY_800) for text in ("The first sentence.", "And the one after it.")]
    codes = [frames_of(engine.submit(s)) for s in specs]
    with services.decoders.open() as stream:
        first = audio_of(engine.submit(specs[0], audio=stream))
        after = engine.submit(specs[1], audio=stream)
        on = audio_of(after)
    assert_same_samples(np.concatenate([first, on]), decoded(services, np.concatenate(codes)))
    wait_idle(engine)


def test_a_request_cancelled_as_it_joins_ends_and_its_follower_runs(engine, monkeypatch):
    """A client that leaves in the moment its request moves from the queue to a stream: the request ends
    (as one cancelled), and a request submitted to follow it (a websocket's next sentence) still runs."""
    from csm_gguf.server.engine import SpeechJob

    frame_step = engine._frame_step

    def clients_leave_as_they_join(gone, forgotten):
        for job in engine.joining:
            job.cancel()
        monkeypatch.setattr(engine, "_frame_step", frame_step)  # only the first request's
        frame_step(gone, forgotten)

    completed = engine.completed
    monkeypatch.setattr(engine, "_frame_step", clients_leave_as_they_join)
    job = engine.submit(SpeechJob(TEXT, sampling=GREEDY_800))
    follower = engine.submit(SpeechJob("And then this.", sampling=GREEDY_800), after=job)
    assert job.next_frames(timeout=30) is None and job.outcome == "cancelled"
    assert len(frames_of(follower)) == 10 and engine.completed == completed + 2
    wait_idle(engine)


def test_an_engine_without_decoders_refuses_audio(f32_model):
    from csm_gguf.server.engine import Engine, SpeechJob
    from csm_gguf.tts import CSM

    tts = CSM(f32_model, kv_type="f32", max_streams=1)
    engine = Engine(tts.generator)
    try:
        with pytest.raises(ValueError, match="without decoders"):
            engine.submit(SpeechJob("Hello."), audio=object())
    finally:
        engine.close()
        tts.close()


def test_a_codec_failure_fails_its_requests_and_the_codec_goes_on(engine, services, monkeypatch):
    from csm_gguf.server.engine import SpeechJob

    pool = services.decoders
    decode_many, calls = pool.decode_many, []

    def fails_once(frames):
        calls.append(len(frames))
        if len(calls) == 1:
            raise RuntimeError("CUDA out of memory (test)")
        return decode_many(frames)

    monkeypatch.setattr(pool, "decode_many", fails_once)
    spec = SpeechJob("The codec fails.", sampling=GREEDY_800)
    counted = engine.stats()["codec_failed_requests"]
    with pool.open() as stream:
        failed = engine.submit(spec, audio=stream)
        with pytest.raises(RuntimeError, match="out of memory"):
            audio_of(failed)
    assert engine.stats()["codec_failed_requests"] == counted + 1
    codes = frames_of(engine.submit(spec))
    with pool.open() as stream:
        assert_same_samples(audio_of(engine.submit(spec, audio=stream)), decoded(services, codes))
    wait_idle(engine)
