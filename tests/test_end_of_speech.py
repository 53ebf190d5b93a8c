"""End of speech (the all-zero frame) ends the utterance on every path, and is neither audio nor context.

The frame is made by `eos_fixtures.end_at` (a draw that makes it at a chosen frame; see there why).
Each test checks that exactly the frames before it come out: a path that misses the end would go on to
make more (frames are drawn normally after it), one that passed the frame on would add a frame of samples.
"""

from __future__ import annotations

import base64
import json

import httpx
import numpy as np
import pytest
from simple_websocket import Client as WsClient

from context_spy import spy_on_contexts
from csm_gguf.generator import Generator, Sampling, Segment
from csm_gguf.model import CSMModel
from csm_gguf.plan import Context, TokenCounts, split_text
from csm_gguf.tts import CSM
from server_fixtures import loopback_server

TEXT = "Hello there, how are you doing today?"
LONG_TEXT = " ".join(f"This is sentence number {i}, which goes on for a while." for i in range(12))
END = 3  # the frame that ends speech: frames 0..2 are spoken
BUDGET_MS = 20 * 80  # far beyond END: the budget is not what ends these utterances
FRAME = 64  # samples per frame of the tiny codec (Mimi: 1920); checked in test_frame_size


@pytest.fixture(scope="module")
def tts(f32_model):
    tts = CSM(f32_model, kv_type="f32")
    yield tts
    tts.close()


@pytest.fixture(scope="module")
def unended(tts) -> np.ndarray:
    """The frames greedy decoding makes when nothing ends it early."""
    return np.stack(list(tts.frames(TEXT, speaker=0, temperature=0, max_audio_ms=BUDGET_MS)))  # no voice prompt


def test_frame_size(tts):
    assert tts.codec.cfg.frame_size == FRAME


def test_the_step_that_draws_it_ends_the_stream_without_feeding_it_back(f32_model, end_at):
    end_at(END)
    gen = Generator(CSMModel(f32_model), kv_type="f32")
    try:
        stream = gen.start(gen.prompt_embeddings(TEXT, 0), Sampling(temperature=0, max_audio_ms=BUDGET_MS))
        for _ in range(END):
            assert gen.step([stream])[0].any() and not stream.done
        pos, pending = stream.pos, stream.pending.copy()
        assert not gen.step([stream])[0].any()
        assert stream.done  # what the server's engine relies on to end a request
        assert stream.pos == pos
        np.testing.assert_array_equal(stream.pending, pending)
        gen.finish(stream)
        assert len(gen.free_slots) == gen.max_streams
    finally:
        gen.close()


@pytest.mark.parametrize("decoder", ["graph", "llama"])
def test_a_stream_ending_mid_batch_leaves_the_streams_after_it_as_alone(f32_model, end_at, decoder, monkeypatch):
    """Stream a ends (at its frame END) in a step it shares with b, ahead of b in the batch: b's next input
    must still be its own frame's (the ended stream's row is skipped), on both depth decoders. CSM-1B ends
    almost every utterance so, beside the other requests a server is speaking."""
    monkeypatch.setenv("CSM_GGUF_DECODER", decoder)
    end_at(END + 2)
    gen = Generator(CSMModel(f32_model), max_streams=2, kv_type="f32")
    sampling = Sampling(temperature=0, max_audio_ms=BUDGET_MS)

    def frames_of(stream, steps) -> list[np.ndarray]:
        made = {id(s): [] for batch in steps for s in batch}
        for batch in steps:
            live = [s for s in batch if not s.done]
            for s, row in zip(live, gen.step(live)):
                if row.any():
                    made[id(s)].append(row.copy())
        return made[id(stream)]

    try:
        b = gen.start(gen.prompt_embeddings(TEXT, 0), sampling)
        alone = frames_of(b, [[b]] * (END + 3))
        gen.finish(b)
        a = gen.start(gen.prompt_embeddings("First.", 1), sampling)
        b = gen.start(gen.prompt_embeddings(TEXT, 0), sampling)
        together = frames_of(b, [[a], [a], *[[a, b]] * (END + 3)])  # a ends at b's frame END
        assert a.done and b.done and len(alone) == END + 2
        np.testing.assert_array_equal(np.stack(together), np.stack(alone))
    finally:
        gen.close()


@pytest.mark.parametrize("at", [0, END])
def test_generator_yields_the_frames_before_it(f32_model, unended, end_at, at):
    end_at(at)
    gen = Generator(CSMModel(f32_model), kv_type="f32")
    try:
        frames = list(gen.generate(TEXT, 0, (), Sampling(temperature=0, max_audio_ms=BUDGET_MS)))
        assert len(frames) == at
        np.testing.assert_array_equal(np.reshape(frames, (at, 32)), unended[:at])
        assert len(gen.free_slots) == gen.max_streams
    finally:
        gen.close()


def test_csm_generate_and_stream_end_there(tts, unended, end_at):
    end_at(END)
    expected = tts.decode(unended[:END])
    # speaker 0 alone: the raw model (a built-in voice's prompt made here would end early too)
    audio = tts.generate(TEXT, speaker=0, temperature=0, max_audio_ms=BUDGET_MS)
    assert len(audio) == END * FRAME
    np.testing.assert_allclose(audio, expected, atol=1e-5 * np.abs(expected).max())
    chunks = list(tts.stream(TEXT, speaker=0, temperature=0, max_audio_ms=BUDGET_MS, chunk_frames=2))
    assert [len(c) for c in chunks] == [2 * FRAME, FRAME]
    assert list(tts.frames(TEXT, speaker=0, temperature=0, max_audio_ms=BUDGET_MS, seed=1))[END:] == []


def test_each_piece_of_a_long_text_ends_and_the_next_one_still_runs(tts, end_at, monkeypatch):
    end_at(2)
    pieces = split_text(LONG_TEXT, TokenCounts(tts.model))
    assert len(pieces) > 2
    contexts = spy_on_contexts(monkeypatch)
    frames = list(tts.frames(LONG_TEXT, speaker=0, temperature=0, max_audio_ms=BUDGET_MS))
    assert len(frames) == 2 * len(pieces) and all(f.any() for f in frames)
    assert contexts[0] == []
    for i in range(1, len(pieces)):
        (previous,) = contexts[i]
        assert previous.text == pieces[i - 1]
        np.testing.assert_array_equal(previous.codes, np.stack(frames[2 * (i - 1): 2 * i]))  # not the end frame


def test_pieces_that_end_at_once_say_nothing_and_the_text_goes_on(tts, end_at, monkeypatch):
    """A piece whose first frame ends speech makes no audio and no context (a segment of no frames would be
    heard as an end-of-speech frame alone); every later piece is still spoken, also in a dialogue."""
    end_at(0)
    pieces = split_text(LONG_TEXT, TokenCounts(tts.model))
    assert len(pieces) > 2
    contexts: list[list[Segment]] = []
    fitting = Context.fitting
    monkeypatch.setattr(Context, "fitting", lambda self, piece: contexts.append(fitting(self, piece)) or contexts[-1])
    assert list(tts.frames(LONG_TEXT, speaker=0, temperature=0, max_audio_ms=BUDGET_MS)) == []  # no voice prompt
    assert contexts == [[]] * len(pieces)
    assert len(tts.dialogue([(0, "Hello."), (1, "Hi.")], temperature=0, max_audio_ms=BUDGET_MS)) == 0


# --- the server ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(f32_model, tmp_path_factory):
    with loopback_server(f32_model, tmp_path_factory.mktemp("eos-voices"), max_streams=2, max_queue=2) as srv:
        yield srv


BODY = {"model": "csm-1b", "input": TEXT, "voice": "alloy", "response_format": "pcm", "temperature": 0,
        "max_audio_ms": BUDGET_MS}


def assert_idle(engine) -> None:
    assert not (engine.active or engine.joining or engine.waiting)
    assert len(engine.generator.free_slots) == engine.max_streams


@pytest.mark.parametrize("stream", [True, False])
def test_http_speech_ends_there(server, end_at, stream):
    services, base = server
    engine = services.engine
    end_at(END)
    done = engine.completed
    response = httpx.post(f"{base}/v1/audio/speech", json={**BODY, "stream": stream}, timeout=60)
    assert response.status_code == 200, response.text
    assert len(response.content) == 2 * END * FRAME  # 16-bit samples
    assert engine.completed == done + 1
    assert_idle(engine)


def test_http_long_text_pieces_each_end_there(server, end_at):
    services, base = server
    engine = services.engine
    end_at(2)
    pieces = split_text(LONG_TEXT, TokenCounts(services.tts.model))
    response = httpx.post(f"{base}/v1/audio/speech", json={**BODY, "input": LONG_TEXT, "stream": False}, timeout=120)
    assert response.status_code == 200, response.text
    assert len(response.content) == 2 * 2 * len(pieces) * FRAME
    assert_idle(engine)


def test_sse_usage_counts_the_frames_before_it(server, end_at):
    _, base = server
    end_at(END)
    response = httpx.post(f"{base}/v1/audio/speech", json={**BODY, "stream_format": "sse"}, timeout=60)
    events = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: ")]
    audio = b"".join(base64.b64decode(e["audio"]) for e in events if e["type"] == "speech.audio.delta")
    assert len(audio) == 2 * END * FRAME
    assert events[-1]["type"] == "speech.audio.done" and events[-1]["usage"]["output_tokens"] == END


def test_websocket_speech_ends_there(server, end_at):
    services, base = server
    engine = services.engine
    end_at(END)
    ws = WsClient.connect(base.replace("http", "ws") + "/v1/audio/speech/ws")
    try:
        ws.send(json.dumps(BODY))
        audio = b""
        while isinstance(message := ws.receive(timeout=30), bytes):
            audio += message
        done = json.loads(message)
        assert done["type"] == "done", done
        assert (done["frames"], done["sentences"], len(audio)) == (END, 1, 2 * END * FRAME)
    finally:
        ws.close()
    assert_idle(engine)
