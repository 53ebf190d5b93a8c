"""The Wyoming server, tested with the wyoming package's own client against the tiny model. Its engine is
the HTTP server's (one model load for both), so its audio can be compared with the HTTP server's."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from functools import partial

import numpy as np
import pytest
from wyoming.audio import AudioChunk, AudioStart
from wyoming.client import AsyncTcpClient
from wyoming.error import Error
from wyoming.event import Event, write_event
from wyoming.info import Describe, Info
from wyoming.server import AsyncTcpServer
from wyoming.tts import (
    Synthesize,
    SynthesizeChunk,
    SynthesizeStart,
    SynthesizeStop,
    SynthesizeVoice,
)

from csm_fixtures import random_codes
from csm_gguf import builtin_voices
from csm_gguf.generator import Segment
from csm_gguf.plan import TokenCounts, split_text
from csm_gguf.sampling import Sampling
from csm_gguf.server import limits
from csm_gguf.server.errors import ApiError
from csm_gguf.server.limits import MAX_INPUT_CHARS
from csm_gguf.tts import Voice
from csm_gguf.voices import BUILTIN_VOICES
from csm_gguf.wyoming_server.handler import WyomingHandler
from csm_gguf.wyoming_server.service import MAX_TEXT_CHARS, WyomingService
from server_fixtures import wait_idle

TEXT = "Hello there, how are you doing today?"
GREEDY = {"temperature": 0, "max_audio_ms": 800}  # 10 frames a piece
MAX_STREAMS = 4


@pytest.fixture(scope="module")
def app(f32_model, tmp_path_factory):
    from csm_gguf import voices
    from csm_gguf.web import create_app

    os.environ["CSM_GGUF_VOICES"] = str(tmp_path_factory.mktemp("voices"))
    voices.save_voice("narrator", Voice([Segment(3, "A saved voice prompt.", random_codes(12, 64, seed=7))], speaker=3))
    app = create_app(model=str(f32_model), max_streams=MAX_STREAMS, max_queue=2, kv_type="f32")
    yield app
    app.extensions["csm_gguf"].engine.close()
    del os.environ["CSM_GGUF_VOICES"]


@pytest.fixture(scope="module")
def engine(app):
    return app.extensions["csm_gguf"].engine


class Server:
    """A Wyoming server on loopback, in its own thread and event loop, on the HTTP app's engine."""

    def __init__(self, app, sampling: Sampling):
        s = app.extensions["csm_gguf"]
        self.service = WyomingService(s.tts, s.engine, s.settings, sampling)
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.server = AsyncTcpServer("127.0.0.1", self.port)
        self._call(self.server.start(partial(WyomingHandler, self.service)))

    def _call(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=30)

    def close(self) -> None:
        self._call(self.server.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.service.executor.shutdown()

    def client(self) -> AsyncTcpClient:
        return AsyncTcpClient("127.0.0.1", self.port, connect_timeout=10, read_timeout=60)


@pytest.fixture(scope="module")
def greedy(app):
    server = Server(app, Sampling(**GREEDY))
    yield server
    server.close()


@pytest.fixture(scope="module")
def unlimited(app):
    """Greedy, each piece as long as its text allows: hundreds of frames for a long text."""
    server = Server(app, Sampling(temperature=0))
    yield server
    server.close()


def frame_bytes(app) -> int:
    # 1920 samples for Mimi, fewer for the tiny codec
    return 2 * app.extensions["csm_gguf"].decoders.codec.cfg.frame_size


async def read_until(client: AsyncTcpClient, *kinds: str) -> list[Event]:
    events = []
    while True:
        event = await client.read_event()
        assert event is not None, f"the connection closed after {[e.type for e in events]}"
        events.append(event)
        if event.type in kinds:
            return events


def pcm_of(events: list[Event]) -> bytes:
    return b"".join(AudioChunk.from_event(e).audio for e in events if AudioChunk.is_type(e.type))


async def synthesize(server: Server, text: str, voice: str | None = None) -> list[Event]:
    async with server.client() as client:
        await client.write_event(Synthesize(text, voice=voice and SynthesizeVoice(name=voice)).event())
        return await read_until(client, "audio-stop", "error")


def http_pcm(app, text: str, voice: str, **fields) -> bytes:
    response = app.test_client().post("/v1/audio/speech", json={"model": "csm-1b", "input": text, "voice": voice,
                                                                "response_format": "pcm", **GREEDY, **fields})
    assert response.status_code == 200
    return response.data


def assert_same_pcm(actual: bytes, expected: bytes) -> None:
    """Equal within one step: frames are decoded in the batches they arrive in, which rounds a little
    differently."""
    a, b = np.frombuffer(actual, "<i2").astype(np.int32), np.frombuffer(expected, "<i2").astype(np.int32)
    assert len(a) == len(b) > 0
    np.testing.assert_allclose(a, b, atol=1)


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, timeout=120))


# --- describe, synthesize ---------------------------------------------------------------------------------


def test_describe_answers_one_tts_program_with_every_voice(greedy):
    async def ask():
        async with greedy.client() as client:
            await client.write_event(Describe().event())
            return await read_until(client, "info")

    (event,) = run(ask())
    (program,) = Info.from_event(event).tts
    assert program.name == "csm-gguf" and program.installed and program.version
    assert "Sesame" in program.attribution.name and "Kyutai" in program.attribution.name
    assert program.supports_synthesize_streaming
    voices = {v.name: v for v in program.voices}
    assert set(voices) == {*BUILTIN_VOICES, "narrator"}
    assert all(v.languages == ["en"] and v.installed and v.description for v in voices.values())
    assert "speaker 4" in voices["echo"].description
    assert "speaker 3" in voices["narrator"].description and "A saved voice prompt." in voices["narrator"].description


def test_synthesize_equals_the_http_servers_pcm(app, greedy, engine):
    events = run(synthesize(greedy, TEXT, voice="echo"))
    kinds = [e.type for e in events]
    assert kinds[0] == "audio-start" and kinds[-1] == "audio-stop" and set(kinds[1:-1]) == {"audio-chunk"}
    start = AudioStart.from_event(events[0])
    assert (start.rate, start.width, start.channels) == (24_000, 2, 1)
    chunks = [AudioChunk.from_event(e) for e in events[1:-1]]
    assert all((c.rate, c.width, c.channels) == (24_000, 2, 1) for c in chunks)
    audio = pcm_of(events)
    assert len(audio) == 10 * frame_bytes(app)
    assert_same_pcm(audio, http_pcm(app, TEXT, "echo"))
    wait_idle(engine)


def test_default_voice_and_speaker_and_saved_voice(app, greedy):
    assert_same_pcm(pcm_of(run(synthesize(greedy, TEXT))), http_pcm(app, TEXT, "alloy"))  # the server's default
    assert_same_pcm(pcm_of(run(synthesize(greedy, TEXT, voice="narrator"))), http_pcm(app, TEXT, "narrator"))

    async def with_speaker():
        async with greedy.client() as client:
            voice = SynthesizeVoice(name="alloy", speaker="4")  # a speaker id overrides the voice's
            await client.write_event(Synthesize(TEXT, voice=voice).event())
            return await read_until(client, "audio-stop", "error")

    assert_same_pcm(pcm_of(run(with_speaker())), http_pcm(app, TEXT, "alloy", speaker_id=4))


def test_a_voice_given_by_its_bare_name_is_that_voice(app, greedy):
    """{"voice": "ash"} (not the protocol's {"name": "ash"}) was dropped unseen by wyoming's parser: the default
    voice spoke, and no error said why."""
    async def ask(voice):
        async with greedy.client() as client:
            await client.write_event(Event("synthesize", {"text": TEXT, "voice": voice}))
            return pcm_of(await read_until(client, "audio-stop", "error"))

    assert_same_pcm(run(ask("ash")), run(ask({"name": "ash"})))
    assert_same_pcm(run(ask("ash")), http_pcm(app, TEXT, "ash"))


def test_built_in_voices_are_their_fixed_prompts(app, greedy):
    """As over HTTP: a built-in voice is its fixed prompt, made once per model (alloy, the default, at
    start; echo now, by the engine); "none" with a speaker id is the raw model."""
    tts = app.extensions["csm_gguf"].tts
    for name in ("alloy", "echo", None):
        job = greedy.service.request(name).job
        voice = tts.voice(name or "alloy")  # the prompt file the server made: read, not made again
        assert job.speaker == voice.speaker == BUILTIN_VOICES[name or "alloy"]
        assert [(seg.speaker, seg.text) for seg in job.context] == [(voice.speaker, builtin_voices.SENTENCE)]
        np.testing.assert_array_equal(job.context[0].codes, voice.segments[0].codes)
    raw = greedy.service.request("none", speaker="3").job
    assert raw.speaker == 3 and not raw.context


# --- streaming synthesis -------------------------------------------------------------------------------------


def test_streamed_text_is_spoken_sentence_by_sentence_before_the_stop(app, greedy, engine):
    async def converse():
        async with greedy.client() as client:
            await client.write_event(SynthesizeStart(voice=SynthesizeVoice(name="onyx")).event())
            pieces = ["Hello the", "re. How are", " you to", "day? I am"]
            for piece in pieces:
                await client.write_event(SynthesizeChunk(text=piece).event())
            before_stop = await read_until(client, "audio-stop")  # "Hello there."
            before_stop += await read_until(client, "audio-stop")  # "How are you today?"
            # Home Assistant sends the whole text once more, for servers that do not stream: not spoken again.
            await client.write_event(Synthesize(text="".join(pieces), voice=SynthesizeVoice(name="onyx")).event())
            await client.write_event(SynthesizeStop().event())
            return before_stop, await read_until(client, "synthesize-stopped")

    before_stop, after_stop = run(converse())
    kinds = [e.type for e in before_stop + after_stop]
    assert kinds.count("audio-start") == kinds.count("audio-stop") == 3 and kinds[-1] == "synthesize-stopped"
    first = pcm_of(before_stop[: [e.type for e in before_stop].index("audio-stop")])
    assert_same_pcm(first, http_pcm(app, "Hello there.", "onyx"))  # the first sentence, alone as over HTTP
    assert len(pcm_of(before_stop)) == 20 * frame_bytes(app)
    assert len(pcm_of(after_stop)) == 10 * frame_bytes(app)  # "I am", at the stop; the copy is ignored
    wait_idle(engine)


def test_the_next_sentence_follows_the_one_being_spoken(greedy, engine, monkeypatch):
    """Each sentence is submitted as soon as it is complete, to follow the one before it (its voice and
    slot) rather than queue behind requests that came later."""
    submitted = []
    submit = engine.submit
    monkeypatch.setattr(engine, "submit", lambda *a, **kw: (submitted.append(kw), submit(*a, **kw))[1])

    async def converse():
        async with greedy.client() as client:
            await client.write_event(SynthesizeStart().event())
            await client.write_event(SynthesizeChunk(text="One sentence. Another one. And a third one. The").event())
            await client.write_event(SynthesizeStop().event())
            return await read_until(client, "synthesize-stopped")

    events = run(converse())
    assert [e.type for e in events].count("audio-stop") == 4
    assert submitted[0]["after"] is None
    assert all(kw["after"] is not None and kw["continues"] for kw in submitted[1:]) and len(submitted) == 4
    wait_idle(engine)


# --- several clients ---------------------------------------------------------------------------------------


def test_two_clients_at_once_share_the_engine(unlimited, engine):
    requests = [("The first client says something here.", "ash"), ("The second client says something else.", "nova")]
    calls = engine.generator.decode_calls
    solo = [pcm_of(run(synthesize(unlimited, text, voice))) for text, voice in requests]
    serial_calls = engine.generator.decode_calls - calls

    async def together():
        clients = [unlimited.client() for _ in requests]
        for client in clients:
            await client.connect()
        try:
            for client, (text, voice) in zip(clients, requests):  # both asked before either is answered
                await client.write_event(Synthesize(text, voice=SynthesizeVoice(name=voice)).event())
            return await asyncio.gather(*(read_until(client, "audio-stop", "error") for client in clients))
        finally:
            for client in clients:
                await client.disconnect()

    calls = engine.generator.decode_calls
    both = run(together())
    together_calls = engine.generator.decode_calls - calls
    for events, alone in zip(both, solo):
        assert_same_pcm(pcm_of(events), alone)
    print(f"decode calls: {serial_calls} one after the other, {together_calls} together")
    assert together_calls < 0.75 * serial_calls  # their frames were generated in the same decode calls
    wait_idle(engine)


def test_a_full_server_makes_a_request_wait_for_a_slot_rather_than_fail(greedy, unlimited, engine, app):
    """Wyoming has no "busy" answer that clients retry: the request waits, as a websocket's sentence does."""
    long_text = " ".join(f"This is sentence number {i}, which goes on for a while." for i in range(8))
    hogs = [engine.submit(unlimited.service.request(None, text=long_text).job)
            for _ in range(engine.max_streams + engine.max_queue)]  # every slot and the whole queue

    async def wait_then_free():
        waiting = asyncio.ensure_future(synthesize(greedy, TEXT))
        await asyncio.sleep(1.0)
        assert not waiting.done() and engine.stats()["queue_depth"] == engine.max_queue
        for job in hogs:
            job.cancel()
        return await waiting

    events = run(wait_then_free())
    assert [e.type for e in events][-1] == "audio-stop" and len(pcm_of(events)) == 10 * frame_bytes(app)
    wait_idle(engine)


# --- errors ----------------------------------------------------------------------------------------------------


def test_bad_events_are_answered_with_errors_and_the_connection_goes_on(greedy, engine, app):
    async def misbehave():
        answers = []
        async with greedy.client() as client:
            async def expect_error(*events: Event | bytes) -> None:
                for event in events:
                    if isinstance(event, bytes):
                        client._writer.write(event)
                    else:
                        await client.write_event(event)
                answers.append(Error.from_event((await read_until(client, "error", "audio-start"))[-1]))

            await expect_error(b"this is not json\n")
            await expect_error(b'["a list"]\n')
            await expect_error(b'{"type": "synthesize", "data_length": 5}\n', b"12345")
            await expect_error(b'{"no": "type"}\n')
            await expect_error(SynthesizeChunk(text="No stream was started.").event())
            await expect_error(SynthesizeStop().event())
            await client.write_event(Event("not-a-tts-event", {}))  # other kinds are ignored, as the protocol asks
            await client.write_event(Describe().event())
            assert Info.is_type((await client.read_event()).type)
            await client.write_event(Synthesize(TEXT).event())  # and the connection still speaks
            answers.append(pcm_of(await read_until(client, "audio-stop")))
        return answers

    *errors, audio = run(misbehave())
    assert [e.code for e in errors] == ["bad_event"] * 6
    assert "synthesize-start first" in errors[4].text
    assert len(audio) == 10 * frame_bytes(app)
    wait_idle(engine)


@pytest.mark.parametrize("length", [70_000, 200_000, 1_000_000])
def test_a_header_line_past_the_limit_is_one_error_and_the_next_event_is_read(length):
    """What readline left of a long line was read as lines of their own: two or more errors for one event."""
    from csm_gguf.wyoming_server.events import BadEvent, read_event

    async def feed(reader: asyncio.StreamReader) -> None:
        line = b'{"type": "synthesize", "data": {"text": "' + b"w" * length + b'"}}\n'
        for i in range(0, len(line), 4096):  # as it comes from a socket: a piece at a time, read meanwhile
            reader.feed_data(line[i : i + 4096])
            await asyncio.sleep(0)
        reader.feed_data(b'{"type": "describe"}\n')
        reader.feed_eof()

    async def read_all() -> list:
        reader = asyncio.StreamReader()  # asyncio's default limit, 64 KiB, as the server's
        feeding = asyncio.create_task(feed(reader))
        got = []
        for _ in range(10):  # bounded: a line read again and again would never let the feeding run
            try:
                event = await read_event(reader)
            except BadEvent as e:
                got.append(str(e))
                continue
            if event is None:
                break
            got.append(event.type)
        feeding.cancel()
        return got

    assert run(read_all()) == ["an event's header line is too long (at most 64 KiB)", "describe"]


@pytest.mark.parametrize("refused, code, says", [
    (Synthesize(TEXT, voice=SynthesizeVoice(name="nobody")).event(), "voice_not_found", "unknown voice 'nobody'"),
    (Synthesize("  ").event(), "invalid_value", "empty"),
    (Synthesize(TEXT, voice=SynthesizeVoice(name="alloy", speaker="loud")).event(), "invalid_value", "speaker"),
    (Event("synthesize", {"voice": {"name": "alloy"}}), "bad_event", "KeyError: 'text'"),  # no text
])
def test_a_synthesize_that_cannot_be_spoken_is_an_error_after_the_audio_before_it_then_the_end(
        greedy, engine, app, refused, code, says):
    """Home Assistant's synthesize reads until audio-stop or the connection's end and takes no error event: a
    refused one (a voice deleted since it was chosen) left it waiting for ever. As wyoming-piper, the error ends
    the connection; and it comes in its turn, after the audio of the synthesize sent before it."""
    async def pipelined():
        async with greedy.client() as client:
            await client.write_event(Synthesize(TEXT).event())
            await client.write_event(refused)
            events = []
            while (event := await client.read_event()) is not None:
                events.append(event)
            return events

    events = run(pipelined())
    kinds = [e.type for e in events]
    assert kinds == ["audio-start", *["audio-chunk"] * (len(kinds) - 3), "audio-stop", "error"], kinds
    assert len(pcm_of(events)) == 10 * frame_bytes(app)
    error = Error.from_event(events[-1])
    assert error.code == code and says in error.text, error
    wait_idle(engine)


def test_a_synthesize_that_fails_before_its_first_audio_ends_the_connection(greedy, engine, monkeypatch):
    async def failing(job):
        raise ValueError("the prompt does not fit (test)")

    monkeypatch.setattr(greedy.service, "next_audio", failing)

    async def ask():
        async with greedy.client() as client:
            await client.write_event(Synthesize(TEXT).event())
            events = []
            while (event := await client.read_event()) is not None:
                events.append(event)
            return events

    events = run(ask())
    assert [e.type for e in events] == ["error"] and "does not fit" in Error.from_event(events[0]).text
    wait_idle(engine)


def test_a_text_longer_than_the_http_limit_is_spoken_in_pieces_as_one_audio(app, greedy, engine):
    """Home Assistant sends a whole answer in one synthesize to a server that does not stream (and to all before
    2025.7): the HTTP API's 4096 characters refused long answers. Spoken piece by piece, as a long HTTP input."""
    text = " ".join(f"This is sentence number {i}, which goes on for a while." for i in range(76))
    assert MAX_INPUT_CHARS < len(text) < MAX_TEXT_CHARS
    pieces = split_text(text, TokenCounts(engine.generator.model))
    events = run(synthesize(greedy, text))
    kinds = [e.type for e in events]
    assert kinds[0] == "audio-start" and kinds[-1] == "audio-stop" and set(kinds[1:-1]) == {"audio-chunk"}
    assert len(pcm_of(events)) == 10 * len(pieces) * frame_bytes(app)
    wait_idle(engine)


@pytest.mark.parametrize("text, message", [
    ("  ", "'text' is empty: give some words to speak"),
    ("a" * (MAX_TEXT_CHARS + 1), f"'text' has {MAX_TEXT_CHARS + 1} characters; at most {MAX_TEXT_CHARS}"),
])
def test_errors_name_the_synthesize_field_not_the_http_one(greedy, text, message):
    """A synthesize has `text`; the HTTP request it is read as has `input`, which the client never sent."""
    with pytest.raises(ApiError) as e:
        greedy.service.request(None, text=text)
    assert e.value.message.startswith(message) and e.value.param == "text"


def test_a_stream_with_an_unknown_voice_is_an_error_and_still_stops(greedy, engine):
    async def converse():
        async with greedy.client() as client:
            await client.write_event(SynthesizeStart(voice=SynthesizeVoice(name="nobody")).event())
            await client.write_event(SynthesizeChunk(text="Not spoken. Nor this.").event())
            await client.write_event(SynthesizeStop().event())
            return await read_until(client, "synthesize-stopped")

    assert [e.type for e in run(converse())] == ["error", "synthesize-stopped"]  # the client is not left waiting


# --- disconnects and the end of speech ------------------------------------------------------------------------


def test_audio_streams_out_and_a_client_that_leaves_frees_its_stream(unlimited, engine, monkeypatch):
    jobs = []
    submit = engine.submit
    monkeypatch.setattr(engine, "submit", lambda *a, **kw: jobs.append(submit(*a, **kw)) or jobs[-1])
    text = " ".join(f"This is sentence number {i}, which goes on for a while." for i in range(8))

    async def leave_early():
        async with unlimited.client() as client:
            await client.write_event(Synthesize(text).event())
            assert (await client.read_event()).type == "audio-start"
            assert (await client.read_event()).type == "audio-chunk"
            assert engine.stats()["active_streams"] == 1  # audio arrives while the text is still being spoken

    run(leave_early())
    wait_idle(engine)
    (job,) = jobs
    assert job.cancelled and job.frames < 100  # its budget was hundreds of frames a piece


def test_a_streaming_client_that_leaves_cancels_its_following_sentences(unlimited, engine, monkeypatch):
    jobs = []
    submit = engine.submit
    monkeypatch.setattr(engine, "submit", lambda *a, **kw: jobs.append(submit(*a, **kw)) or jobs[-1])

    async def leave_early():
        async with unlimited.client() as client:
            await client.write_event(SynthesizeStart().event())
            await client.write_event(SynthesizeChunk(text="A first sentence. A second one. And a third").event())
            assert (await client.read_event()).type == "audio-start"
            assert engine.stats()["active_streams"] == 1 and engine.active[0].successor is not None

    run(leave_early())
    wait_idle(engine)
    assert len(jobs) == 2 and all(job.cancelled for job in jobs)
    assert jobs[1].frames == 0  # the second sentence did not start in the first one's slot


def test_a_client_that_stops_reading_is_dropped_and_its_stream_freed(unlimited, engine, app, monkeypatch, caplog):
    """A client that takes none of its audio would hold its codec stream and connection for ever: once the
    buffers between are full, a send waits limits.STALLED_CLIENT_S (shortened here), then the connection closes."""
    monkeypatch.setattr(limits, "STALLED_CLIENT_S", 0.5)
    init = WyomingHandler.__init__

    def with_small_buffers(self, service, reader, writer):  # full after a few frames, not megabytes
        init(self, service, reader, writer)
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        writer.transport.set_write_buffer_limits(high=4096)

    monkeypatch.setattr(WyomingHandler, "__init__", with_small_buffers)
    caplog.set_level(logging.INFO, logger="csm_gguf.wyoming_server")
    decoders = app.extensions["csm_gguf"].decoders
    text = " ".join(f"This is sentence number {i}, which goes on for a while." for i in range(8))
    with socket.socket() as client:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.connect(("127.0.0.1", unlimited.port))
        with client.makefile("wb") as out:
            write_event(Synthesize(text).event(), out)
            out.flush()
        deadline = time.monotonic() + 60
        while not any("took nothing sent to it" in r.message for r in caplog.records) or decoders.streams():
            assert time.monotonic() < deadline, f"{decoders.streams()} codec streams still open"
            time.sleep(0.05)
        wait_idle(engine, timeout=30)
        client.settimeout(10)  # the server closed the connection: what it had sent, then its end (or a reset)
        with contextlib.suppress(ConnectionResetError):
            while client.recv(65536):
                pass


class StubService:
    """The speaker's service, for its own tests: codec streams that record being closed, jobs never spoken."""

    def __init__(self):
        self.opened, self.submitted = [], 0

    def open_audio(self):
        self.opened.append(audio := type("Audio", (), {"closed": False})())
        audio.close = lambda: setattr(audio, "closed", True)
        return audio

    def submit(self, spec, audio, after=None):
        self.submitted += 1
        return type("Job", (), {"cancel": lambda self: None})()

    async def next_audio(self, job):
        await asyncio.Event().wait()  # no audio yet: the first request is being spoken for as long as a test needs


async def write_nothing(event: Event) -> None:
    pass


def test_a_client_that_leaves_frees_the_codec_stream_of_a_text_stream_queued_behind():
    """A text stream's sentences share its codec stream (on the stream, not on the sentence): one queued behind
    the request being sent is decoding already, and its stream was left open when the client left."""
    from csm_gguf.server.engine import SpeechJob
    from csm_gguf.wyoming_server.speaker import Speaker, Speech, TextStream

    async def leave():
        service = StubService()
        speaker = Speaker(service, write_nothing)
        await speaker.say(Speech(SpeechJob("A synthesize, being sent.")))
        await speaker.say(Speech(SpeechJob("A stream's sentence, queued."), TextStream(settings=None)))
        await asyncio.sleep(0.01)
        speaker.close()
        return service.opened

    opened = run(leave())
    assert len(opened) == 2 and all(audio.closed for audio in opened)


def test_a_connection_queues_a_bounded_number_of_requests(monkeypatch):
    """A stream's sentences are submitted at once, as followers no queue limit refuses: a client sending text
    without end queued jobs without end. Past MAX_QUEUED, its next events wait to be read."""
    from csm_gguf.server.engine import SpeechJob
    from csm_gguf.wyoming_server import speaker as speaking

    monkeypatch.setattr(speaking, "MAX_QUEUED", 3)

    async def flood():
        service = StubService()
        speaker = speaking.Speaker(service, write_nothing)
        stream = speaking.TextStream(settings=None)
        for i in range(3):
            await speaker.say(speaking.Speech(SpeechJob(f"Sentence {i}."), stream))
        fourth = asyncio.ensure_future(speaker.say(speaking.Speech(SpeechJob("Sentence 3."), stream)))
        await asyncio.sleep(0.05)
        held = not fourth.done() and service.submitted == 3
        speaker.close()
        await fourth
        return held

    assert run(flood())


def test_a_speaker_that_fails_on_a_bug_of_ours_hangs_up(greedy, engine, monkeypatch):
    """Its connection stayed open: the client waited for ever, and its next requests were generated for no one."""
    from csm_gguf.wyoming_server.speaker import Speaker

    async def broken(self, speech):
        raise KeyError("a bug of ours (test)")

    monkeypatch.setattr(Speaker, "_speak", broken)

    async def ask():
        async with greedy.client() as client:
            await client.write_event(Synthesize(TEXT).event())
            return await client.read_event()

    assert run(ask()) is None  # the connection closed
    wait_idle(engine)


def test_an_all_zero_frame_ends_the_audio(greedy, engine, monkeypatch, app):
    """The end of speech: after its second frame, each stream makes the all-zero frame."""
    step = engine.generator.step
    made: dict[int, int] = {}

    def ending_step(streams):
        codes = step(streams)
        for j, stream in enumerate(streams):
            made[id(stream)] = made.get(id(stream), 0) + 1
            if made[id(stream)] == 3:
                codes[j] = 0
                stream.done = True
        return codes

    monkeypatch.setattr(engine.generator, "step", ending_step)
    events = run(synthesize(greedy, TEXT))
    assert events[-1].type == "audio-stop" and len(pcm_of(events)) == 2 * frame_bytes(app)


# --- the command ---------------------------------------------------------------------------------------------


def test_the_command_serves_the_model(f32_model, tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "CSM_GGUF_VOICES": str(tmp_path), "PYTHONPATH": os.getcwd()}
    command = [sys.executable, "-m", "csm_gguf.wyoming", "--uri", f"tcp://127.0.0.1:{port}", "--model",
               str(f32_model), "--kv-type", "f32", "--max-streams", "2", "--voice", "sage", "--temperature", "0",
               "--max-audio-ms", "160"]
    server = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    try:
        async def ask():
            deadline = time.monotonic() + 60
            while True:
                try:
                    client = AsyncTcpClient("127.0.0.1", port, read_timeout=60)
                    await client.connect()
                    break
                except OSError:
                    assert server.poll() is None and time.monotonic() < deadline, server.stderr.read()
                    await asyncio.sleep(0.2)
            try:
                await client.write_event(Describe().event())
                info = Info.from_event(await client.read_event())
                await client.write_event(Synthesize("Hello there.").event())
                return info, await read_until(client, "audio-stop", "error")
            finally:
                await client.disconnect()

        info, events = run(ask())
        assert info.tts[0].name == "csm-gguf"
        assert [e.type for e in events][-1] == "audio-stop" and len(pcm_of(events)) > 0  # 2 frames (160 ms)
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_the_command_refuses_bad_options(tmp_path):
    env = {**os.environ, "CSM_GGUF_VOICES": str(tmp_path), "PYTHONPATH": os.getcwd()}
    bad = subprocess.run([sys.executable, "-m", "csm_gguf.wyoming", "--uri", "stdio://"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "tcp://HOST:PORT" in bad.stderr
    bad = subprocess.run([sys.executable, "-m", "csm_gguf.wyoming", "--voice", "nobody"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "error: --voice 'nobody' is not a voice" in bad.stderr  # not the variable
    bad = subprocess.run([sys.executable, "-m", "csm_gguf.wyoming", "--temperature", "-1"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "error: --temperature must be a number >= 0" in bad.stderr  # not the field


def test_ctrl_c_while_starting_is_no_traceback(monkeypatch, capsys):
    from csm_gguf import wyoming

    def interrupted(*args):
        raise KeyboardInterrupt  # as Ctrl-C lands while torch and the model load

    monkeypatch.setattr(WyomingService, "start", interrupted)
    assert wyoming.main(["--uri", "tcp://127.0.0.1:0"]) == 130
    assert capsys.readouterr().err == "interrupted while starting\n"


def test_the_options_are_those_the_guide_names():
    """The server's settings that mean something over Wyoming, as docs/home-assistant.md lists them (a setting
    added to the HTTP server, such as its websocket pings, is not an option here that does nothing)."""
    import re
    from pathlib import Path

    from csm_gguf.wyoming import build_parser

    options = {o for a in build_parser()._actions for o in a.option_strings if o.startswith("--")} - {"--help"}
    guide = (Path(__file__).resolve().parent.parent / "docs" / "home-assistant.md").read_text()
    start = guide.index("settings are the HTTP server's:")
    listed = guide[start:guide.index("logs every event", start)]  # the server's settings, say's sampling ones, --debug
    assert options == {"--uri", *re.findall(r"`(--[a-z-]+)`", listed)}


def test_the_help_says_what_wyoming_does_with_a_full_server():
    from csm_gguf.wyoming import build_parser

    help_text = " ".join(build_parser().format_help().split())
    assert "429" not in help_text and "none is refused" in help_text


@pytest.mark.parametrize("uri, match", [
    (None, "is in use (another server?)"),  # None: the port another server listens on
    ("tcp://127.0.0.1", "lacks a host or a port"),
    ("tcp://127.0.0.1:99999", "Port out of range"),
    ("unix:///no/such/folder/csm.sock", "in an existing folder"),
])
def test_the_command_refuses_an_address_it_cannot_serve_before_loading_the_model(monkeypatch, capsys, uri, match):
    from csm_gguf import wyoming

    monkeypatch.setattr(WyomingService, "start", lambda *a: pytest.fail("loaded the model first"))
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        uri = uri or f"tcp://127.0.0.1:{other.getsockname()[1]}"
        assert wyoming.main(["--uri", uri]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --uri") and match in err
