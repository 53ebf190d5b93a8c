"""DecoderPool: streams that start, pause and end at different times, decoded in shared batched steps, each
exactly as it would be alone."""

from __future__ import annotations

import gc
import threading

import numpy as np
import pytest
import torch

from csm_gguf.mimi import DecoderPool
from mimi_fixtures import TINY_MIMI_CONFIG, make_tiny_mimi, one_torch_thread, runtime_mimi  # noqa: F401 (autouse)

FRAMES = 140  # 280 transformer steps: past the 250-step window and around the ring of keys


@pytest.fixture(scope="module")
def mimi():
    return runtime_mimi(make_tiny_mimi(seed=0))


def stream_codes(i: int, frames: int = FRAMES) -> np.ndarray:
    """Stream i's frames, (frames, 32)."""
    return np.random.default_rng(i).integers(0, TINY_MIMI_CONFIG["codebook_size"], (frames, 32))


@pytest.fixture(scope="module")
def alone(mimi) -> dict[int, np.ndarray]:
    """Each stream's audio decoded alone, in one step."""
    return {i: mimi.decode(torch.from_numpy(stream_codes(i).T[None]), chunk=FRAMES)[0, 0].numpy() for i in range(6)}


def assert_same_audio(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


class StepSpy:
    """The rows each of the codec's steps covered, and how many of them it advanced."""

    def __init__(self, mimi, monkeypatch):
        self.steps: list[tuple[int, int]] = []
        decode_step = mimi.decode_step

        def spied(codes, state):
            self.steps.append((codes.shape[0], int(state.live.sum())))
            return decode_step(codes, state)

        monkeypatch.setattr(mimi, "decode_step", spied)


def test_streams_paused_and_resumed_decode_as_alone(mimi, alone, monkeypatch):
    """Each step advances one stream while the others wait in their rows: a row a step leaves alone keeps its
    state (its keys, its convs' context, its position) exactly."""
    pool, spy = DecoderPool(mimi, rows=3), StepSpy(mimi, monkeypatch)
    streams = [pool.open() for _ in range(3)]
    codes = [stream_codes(i) for i in range(3)]
    audio: list[list[np.ndarray]] = [[], [], []]
    rng = np.random.default_rng(7)
    done = [0, 0, 0]
    while min(done) < FRAMES:
        i = int(rng.integers(3))
        n = min(int(rng.integers(1, 4)), FRAMES - done[i])
        audio[i].append(streams[i].decode(codes[i][done[i] : done[i] + n]))
        done[i] += n
    for i in range(3):
        assert_same_audio(np.concatenate(audio[i]), alone[i])
    assert all(s.row is not None for s in streams)
    assert spy.steps[-1] == (3, 1) and {live for _, live in spy.steps} == {1}


def test_streams_decoded_together_share_each_step(mimi, alone, monkeypatch):
    pool, spy = DecoderPool(mimi, rows=4), StepSpy(mimi, monkeypatch)
    streams = [pool.open() for _ in range(3)]
    codes = [stream_codes(i) for i in range(3)]
    # Per call, each stream's frames: equal, unequal (steps of the shortest's size), and with a stream paused.
    rounds = [(1, 1, 1)] * 60 + [(2, 1, 3), (0, 2, 1), (3, 0, 0)] + [(1, 1, 1)] * 60
    rounds.append(tuple(FRAMES - sum(r[i] for r in rounds) for i in range(3)))
    done, audio = [0, 0, 0], [[], [], []]
    for sizes in rounds:
        out = pool.decode_many({streams[i]: codes[i][done[i] : done[i] + n] for i, n in enumerate(sizes) if n})
        for i, n in enumerate(sizes):
            if n:
                audio[i].append(out[streams[i]])
                done[i] += n
    for i in range(3):
        assert_same_audio(np.concatenate(audio[i]), alone[i])
    assert spy.steps[0] == (3, 3)  # 3 rows in use, all advanced in one step
    assert (3, 2) in spy.steps and pool.steps == len(spy.steps) < sum(map(sum, rounds))
    assert pool.stream_steps == sum(live for _, live in spy.steps)


def test_a_closed_streams_row_goes_to_the_last_stream(mimi, alone, monkeypatch):
    """Closing a stream frees its row; the last row's stream moves into it before the next step, which then
    covers one row less; a new stream takes the first free row and starts fresh there."""
    pool, spy = DecoderPool(mimi, rows=3), StepSpy(mimi, monkeypatch)
    a, b, c = (pool.open() for _ in range(3))
    codes = [stream_codes(i) for i in range(4)]
    first = pool.decode_many({s: codes[i][:50] for i, s in enumerate((a, b, c))})
    a.close()
    assert len(a.decode(codes[0][50:51])) == 0 and a.row is None  # a closed stream's frames are dropped
    rest_c = c.decode(codes[2][50:])
    assert spy.steps[-1] == (2, 1) and pool.streams() == 2 and c.row.index == 0
    d = pool.open()
    audio_d = d.decode(codes[3])
    assert d.row.index == 2
    rest_b = b.decode(codes[1][50:])
    assert_same_audio(np.concatenate([first[c], rest_c]), alone[2])
    assert_same_audio(np.concatenate([first[b], rest_b]), alone[1])
    assert_same_audio(audio_d, alone[3])


def test_streams_beyond_the_rows_decode_on_states_of_their_own(mimi, alone):
    """Two streams beyond the one row: each on a state of its own, not one shared between them."""
    pool = DecoderPool(mimi, rows=1)
    with pool.open() as first, pool.open() as second, pool.open() as third:
        streams = (first, second, third)
        out = pool.decode_many({s: stream_codes(i)[:70] for i, s in enumerate(streams)})
        assert first.row is not None and second.row is None and second.own is not None and third.own is not None
        out2 = pool.decode_many({s: stream_codes(i)[70:] for i, s in enumerate(streams)})
        for i, s in enumerate(streams):
            assert_same_audio(np.concatenate([out[s], out2[s]]), alone[i])
    assert pool.streams() == 0


def test_a_stream_dropped_unclosed_gives_its_row_back(mimi):
    pool = DecoderPool(mimi, rows=1)
    stream = pool.open()
    stream.decode(stream_codes(0, 3))
    assert pool.streams() == 1
    del stream
    gc.collect()
    assert pool.streams() == 0
    again = pool.open()
    again.decode(stream_codes(0, 1))
    assert again.row is not None


def test_letting_a_stream_go_never_waits_for_a_step(mimi):
    """A dropped stream's finalizer can run on any thread mid-work: on the engine's, holding the generator's lock
    that a step of the pool waits for when it records a CUDA graph. Had it waited for the pool's lock, the
    two threads would wait for each other for ever."""
    pool = DecoderPool(mimi, rows=2)
    stream = pool.open()
    stream.decode(stream_codes(0, 2))
    stepping, done = threading.Event(), threading.Event()

    def step():  # a step in the codec's thread: the pool's lock held
        with pool._lock:
            stepping.set()
            done.wait(10)

    codec_thread = threading.Thread(target=step)
    codec_thread.start()
    stepping.wait(10)
    closer = threading.Thread(target=stream.close)
    closer.start()
    closer.join(2)
    alive = closer.is_alive()
    done.set()
    codec_thread.join(10)
    closer.join(10)
    assert not alive  # it did not wait for the step
    assert pool.streams() == 0  # its row freed once the step was over


def test_a_failed_step_fails_its_call_and_the_pool_goes_on(mimi, alone, monkeypatch):
    pool = DecoderPool(mimi, rows=2)
    a, b = pool.open(), pool.open()
    decode_step = mimi.decode_step

    def failing(codes, state):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(mimi, "decode_step", failing)
    with pytest.raises(RuntimeError, match="out of memory"):
        pool.decode_many({a: stream_codes(0, 2), b: stream_codes(1, 2)})
    monkeypatch.setattr(mimi, "decode_step", decode_step)
    b.close()
    with pool.open() as c:
        assert_same_audio(c.decode(stream_codes(1)), alone[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch has no CUDA device")
def test_on_cuda_steps_replay_a_graph_per_power_of_two_of_streams(mimi, alone):
    import copy

    gpu = copy.deepcopy(mimi).to("cuda")
    pool = DecoderPool(gpu, rows=8)
    streams = [pool.open() for _ in range(3)]
    codes = [stream_codes(i) for i in range(3)]
    audio, done = [[], [], []], [0, 0, 0]
    for f in range(FRAMES):  # stream 2 pauses for 20 steps: steps of 4 rows (a graph) advance 2 of them
        live = [i for i in range(3) if not (i == 2 and 40 <= f < 60)]
        out = pool.decode_many({streams[i]: codes[i][done[i] : done[i] + 1] for i in live})
        for i in live:
            audio[i].append(out[streams[i]])
            done[i] += 1
    audio[2].append(streams[2].decode(codes[2][done[2] :]))  # 20 frames at once: a step run as it is
    for i in range(3):
        assert_same_audio(np.concatenate(audio[i]), alone[i])
    assert set(pool.views) == {4} and pool.views[4].graph is not None
