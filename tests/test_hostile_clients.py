"""The speech server against hostile and careless clients (issue 21): no 500, no dead websocket session,
and memory bounded by the server's limits. A real server on loopback serving the tiny model, with 2
streams and a queue of 2."""

from __future__ import annotations

import base64
import io
import json
import socket
import struct
import threading
import time

import httpx
import numpy as np
import psutil
import pytest
import soundfile as sf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from simple_websocket import Client as WsClient

from csm_gguf.audio import FORMATS
from csm_gguf.server import engine as server_engine
from csm_gguf.server import schemas
from csm_gguf.server.limits import MAX_JSON_DEPTH, MAX_SPEECH_REQUEST
from server_fixtures import serving, voice_wav

MAX_STREAMS, MAX_QUEUE = 2, 2
QUICK = {"temperature": 0, "max_audio_ms": 80}  # one frame a sentence


@pytest.fixture(scope="module")
def server(f32_model, tmp_path_factory):
    with serving(f32_model, tmp_path_factory.mktemp("voices"), max_streams=MAX_STREAMS, max_queue=MAX_QUEUE) as s:
        yield s


@pytest.fixture
def base(server):
    return server[1]


@pytest.fixture
def engine(server):
    return server[0].extensions["csm_gguf"].engine


@pytest.fixture
def tts(server):
    return server[0].extensions["csm_gguf"].tts


def post(base: str, content: bytes | str, **kw) -> httpx.Response:
    return httpx.post(f"{base}/v1/audio/speech", content=content, timeout=120, **kw)


def connect(base: str) -> WsClient:
    return WsClient.connect(base.replace("http", "ws") + "/v1/audio/speech/ws")


def replies(ws, until_done: int = 1) -> tuple[bytes, list[dict]]:
    """Audio and JSON messages received until the `until_done`th done."""
    audio, events = b"", []
    while sum(e["type"] == "done" for e in events) < until_done:
        message = ws.receive(timeout=60)
        assert message is not None, events
        if isinstance(message, bytes):
            audio += message
        else:
            events.append(json.loads(message))
    return audio, events


def wait_idle(engine, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while engine.active or engine.joining or engine.waiting or engine.reserved:
        assert time.monotonic() < deadline, engine.stats()
        time.sleep(0.01)


# --- 1: every error in a websocket session is an error message, and the session goes on -------------------


def test_websocket_text_with_a_lone_surrogate_is_an_error_and_the_session_goes_on(base, engine):
    ws = connect(base)
    try:
        ws.send(json.dumps({"voice": "alloy", "response_format": "pcm", **QUICK}))
        for text in ["Hello there. ", "\ud800 lone. ", "And more."]:
            ws.send(json.dumps({"type": "text", "text": text}))  # json.dumps writes the surrogate as \ud800
        ws.send(json.dumps({"type": "flush"}))
        audio, events = replies(ws)
        errors = [e["error"] for e in events if e["type"] == "error"]
        assert [(e["param"], e["code"]) for e in errors] == [("text", "invalid_value")], events
        assert "lone surrogates" in errors[0]["message"]
        done = events[-1]
        assert done["sentences"] == 2 and done["frames"] == 2 and done["bytes"] == len(audio) > 0  # nothing lost
    finally:
        ws.close()
    wait_idle(engine)


def test_websocket_session_goes_on_after_a_bug_of_ours_while_speaking(base, engine, monkeypatch):
    from csm_gguf.audio import StreamEncoder

    feed, failed = StreamEncoder.feed, []

    def fails_once(*args):
        if not failed:
            failed.append(1)
            raise KeyError("a bug")
        return feed(*args)

    monkeypatch.setattr(StreamEncoder, "feed", fails_once)
    ws = connect(base)
    try:
        ws.send(json.dumps({"voice": "alloy", "response_format": "pcm", **QUICK}))
        ws.send(json.dumps({"type": "text", "text": "One. Two. Three."}))
        ws.send(json.dumps({"type": "flush"}))
        audio, events = replies(ws)
        assert [e["error"]["type"] for e in events if e["type"] == "error"] == ["server_error"], events
        assert events[-1]["sentences"] == 2 and events[-1]["bytes"] == len(audio) > 0  # the others were spoken
        ws.send(json.dumps({"input": "Still here."}))
        audio, events = replies(ws)
        assert events == [events[-1]] and events[-1]["frames"] == 1 and audio
    finally:
        ws.close()
    wait_idle(engine)


def test_http_text_the_engine_refuses_is_a_400(base, engine, monkeypatch):
    """What the engine refuses (here a ValueError from splitting the text) is the request's fault: a 400 in
    OpenAI's shape, over HTTP and in a websocket session alike."""
    def refuses(text, count):
        raise ValueError("the engine refuses this text")

    monkeypatch.setattr(server_engine, "split_text", refuses)
    response = post(base, json.dumps({"model": "csm-1b", "input": "Hi.", **QUICK}))
    assert response.status_code == 400 and response.json()["error"]["message"] == "the engine refuses this text"
    ws = connect(base)
    try:
        ws.send(json.dumps({"input": "Hi.", **QUICK}))
        _, events = replies(ws)
        assert [e["error"]["message"] for e in events[:-1]] == ["the engine refuses this text"], events
    finally:
        ws.close()
    wait_idle(engine)


# --- 3: deeply nested JSON ----------------------------------------------------------------------------------


def nested_input(depth: int) -> str:
    return '{"model": "csm-1b", "input": ' + '{"a": ' * depth + "1" + "}" * depth + "}"


DEEP = ["[" * 100_000 + "]" * 100_000, nested_input(10_000), nested_input(MAX_JSON_DEPTH)]


@pytest.mark.parametrize("body", DEEP, ids=["list-100000", "input-10000", "input-just-too-deep"])
def test_deeply_nested_json_is_a_400_over_http_and_websocket(base, body):
    response = post(base, body)
    error = response.json()["error"]
    assert (response.status_code, error["code"]) == (400, "invalid_json"), response.text
    assert f"more than {MAX_JSON_DEPTH} levels deep" in error["message"]
    ws = connect(base)
    try:
        ws.send(body)
        error = json.loads(ws.receive(timeout=30))["error"]
        assert error["code"] == "invalid_json" and "levels deep" in error["message"]
        ws.send(json.dumps({"input": "Still here.", "response_format": "pcm", **QUICK}))
        audio, events = replies(ws)
        assert events[-1]["frames"] == 1 and audio
    finally:
        ws.close()


def test_json_as_deep_as_the_limit_is_read(base):
    response = post(base, nested_input(MAX_JSON_DEPTH - 1))  # the body, then 'input' nested: at the limit
    assert response.status_code == 400 and response.json()["error"]["param"] == "input"


# --- 5: a chunked body over the limit -----------------------------------------------------------------------


def test_a_chunked_body_over_the_limit_is_a_413_naming_it(base):
    head = b'{"model": "csm-1b", "input": "Hi.", "pad": "'

    def chunks(size):
        yield head
        for _ in range(size // 2**20):
            yield b"x" * 2**20
        yield b"x" * (size % 2**20) + b'"}'

    response = post(base, chunks(MAX_SPEECH_REQUEST))  # an iterator: sent chunked, without a Content-Length
    assert response.status_code == 413, response.text
    assert "a request is at most 64 MiB" in response.json()["error"]["message"]
    small = post(base, chunks(100), params={})  # chunked and within the limit: read whole, as any body
    assert small.status_code == 400 and small.json()["error"]["param"] == "pad"


# --- 4: admission before the body is read and its context audio decoded --------------------------------------


def context_body() -> bytes:
    """A speech request with a 40 MB context: 160 s of 48 kHz stereo WAV, in base64."""
    wav = io.BytesIO()
    sf.write(wav, np.zeros((48_000 * 160, 2), np.int16), 48_000, format="WAV")
    audio = base64.b64encode(wav.getvalue()).decode()
    body = {"model": "csm-1b", "input": "Hi.", "context": [{"speaker": 0, "text": "Words.", "audio": audio}]}
    return json.dumps(body).encode()


class PeakRss:
    """The process's peak resident memory while it runs, sampled every 20 ms."""

    def __init__(self):
        self.process, self.peak, self.running = psutil.Process(), 0, True
        self.start = self.process.memory_info().rss
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()

    def sample(self):
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.02)

    def stop(self) -> int:
        self.running = False
        self.thread.join()
        return self.peak - self.start


def test_contexts_beyond_the_queue_are_refused_before_they_are_decoded(base, engine, monkeypatch, tts):
    """N clients send 40 MB contexts at once: the server takes as many as it has slots and queue for
    (their contexts are decoded), and answers the rest 429 before decoding anything of theirs."""
    body, clients, places = context_body(), 8, MAX_STREAMS + MAX_QUEUE
    assert len(body) > 40e6
    decoded, encoded, gate = [], [], threading.Event()
    real_base64 = schemas._base64

    def counted_base64(data, param):
        decoded.append(param)
        return real_base64(data, param)

    def held_segment(speaker, text, audio=None, codes=None):  # the encoding, held until every client is answered
        encoded.append(audio.getbuffer().nbytes)
        gate.wait(60)
        raise ValueError("not encoded in this test")

    monkeypatch.setattr(schemas, "_base64", counted_base64)
    monkeypatch.setattr(tts, "segment", held_segment)
    statuses: list[int] = []
    rss = PeakRss()
    threads = [threading.Thread(target=lambda: statuses.append(post(base, body).status_code)) for _ in range(clients)]
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while statuses.count(429) < clients - places or len(encoded) < places:
            assert time.monotonic() < deadline, (statuses, len(decoded), len(encoded))
            time.sleep(0.05)
        assert len(decoded) == len(encoded) == places  # the refused ones were not decoded
    finally:
        gate.set()
        for t in threads:
            t.join(120)
    growth = rss.stop()
    assert sorted(statuses) == [400] * places + [429] * (clients - places)
    # Reported, not asserted: the RSS of a process that holds the clients too, after hundreds of other tests,
    # does not separate the two cases reliably (alone: about 800 MB with the fix, 1120 MB without). The
    # counts above are the proof: nothing of a refused request is decoded.
    print(f"peak RSS growth with {clients} clients of {len(body) / 1e6:.0f} MB: {growth / 1e6:.0f} MB")
    wait_idle(engine)


def test_a_place_taken_while_reading_is_given_back_on_any_failure(base, engine, tts):
    for content in [b"{not json", b"[1]", json.dumps({"model": "csm-1b", "input": ""})]:
        assert post(base, content).status_code == 400
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:  # announces a body too large
        sock.sendall(b"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n{"
                     % (MAX_SPEECH_REQUEST + 2))
        assert sock.recv(100).startswith(b"HTTP/1.1 413")
    assert engine.reserved == 0
    response = post(base, json.dumps({"model": "csm-1b", "input": "Hi.", "response_format": "pcm", **QUICK}))
    assert response.status_code == 200 and response.content
    wait_idle(engine)


# --- a websocket's sends: whole, one at a time (the session's and the reader's pings and pongs) ------------


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """Two ends of a loopback TCP connection, the server's with a small send buffer: its sends block soon."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    return server, client


def test_a_websocket_send_that_stalls_part_way_fails_rather_than_cutting_its_frame():
    from csm_gguf.server.connection import SerialSends

    server, client = tcp_pair()
    with server, client:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", 0, 200_000))
        with pytest.raises(BlockingIOError):  # a plain send returned the part sent, and the frame's rest was lost
            SerialSends(server).send(b"x" * 2**22)


def test_a_websockets_sends_from_two_threads_do_not_interleave():
    from csm_gguf.server.connection import SerialSends

    server, client = tcp_pair()
    size = 2**20
    with server, client:
        sends = SerialSends(server)
        threads = [threading.Thread(target=sends.send, args=(byte * size,)) for byte in (b"a", b"b")]
        for t in threads:
            t.start()
        received = bytearray()
        while len(received) < 2 * size:
            received += client.recv(65536)
        for t in threads:
            t.join()
    assert bytes(received) in (b"a" * size + b"b" * size, b"b" * size + b"a" * size)


def test_a_websocket_session_sends_through_serial_sends(base, monkeypatch):
    from csm_gguf.server.connection import SerialSends

    sent = []
    send = SerialSends.send
    monkeypatch.setattr(SerialSends, "send", lambda self, data: sent.append(len(data)) or send(self, data))
    ws = connect(base)
    try:
        ws.send(json.dumps({"input": "Hello.", "response_format": "pcm", **QUICK}))
        audio, _ = replies(ws)
        assert audio and sum(sent) > len(audio)  # the handshake, the audio's frames, the done message
    finally:
        ws.close()


# --- the property behind 1 and 3: fuzzed websocket messages and JSON ----------------------------------------

# Any Unicode, lone surrogates (which st.text leaves out) and NUL included, and characters that end sentences.
ODD = st.sampled_from(["\ud800", "\udfff", "\x00", ".", "!", " ", "\n"])
UNICODE = st.text(st.characters(exclude_categories=()) | ODD, max_size=60) | st.builds(
    lambda a, odd, b: a + odd + b, st.text(max_size=20), ODD, st.text(max_size=20))
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | UNICODE,
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=12)
FIELDS = {
    "model": st.sampled_from(["csm-1b", "tts-1", "x"]) | JSON,
    "input": UNICODE | JSON,
    "voice": st.sampled_from(["alloy", "nobody"]) | JSON,
    "response_format": st.sampled_from([f for f in FORMATS if f != "flac"]) | JSON,  # flac: the probe's
    "speed": st.sampled_from([1, 0.5, 2]) | JSON,
    "speaker_id": JSON, "temperature": JSON, "top_k": JSON, "seed": JSON, "stream": JSON, "instructions": JSON,
    "context": st.lists(st.dictionaries(st.sampled_from(["speaker", "text", "codes", "audio"]), JSON, max_size=4),
                        max_size=2) | JSON,
    "type": st.sampled_from(["speech", "text", "flush", "other"]) | JSON,
    "text": UNICODE | JSON,
}
# Sentences spoken at most one frame each, so that the test does not wait for speech.
MESSAGE = st.one_of(
    st.builds(lambda text: {"type": "text", "text": text}, UNICODE),
    st.just({"type": "flush"}),
    st.fixed_dictionaries({}, optional=FIELDS).map(lambda m: {**m, "max_audio_ms": 80}),
    JSON.map(lambda value: value if not isinstance(value, dict) else {**value, "max_audio_ms": 80}),
).map(json.dumps) | st.text(max_size=40) | st.binary(max_size=20)  # websocket text is UTF-8
def deep(depth: int, kind: str) -> str:
    opening, closing = {"list": ("[", "]"), "object": ('{"a": ', "}"), "input": ('{"a": ', "}")}[kind]
    inner = opening * depth + "1" + closing * depth
    return '{"model": "csm-1b", "input": ' + inner + "}" if kind == "input" else inner


HOSTILE_JSON = st.one_of(
    st.builds(deep, st.integers(1, 200_000), st.sampled_from(["list", "object", "input"])),
    st.builds(lambda n, s: json.dumps({"model": "csm-1b", "input": s * n, **QUICK}), st.integers(0, 2_000_000),
              st.sampled_from(["a", "\u00e9", "\ud800", " ", "."])),
    st.builds(lambda n: json.dumps([0] * n), st.integers(0, 1_000_000)),
    st.builds(lambda n: "[" * n, st.integers(1, 100_000)),  # never closed
)
PROBE = {"type": "speech", "model": "csm-1b", "voice": "alloy", "response_format": "flac", "speed": 1,
         "speaker_id": None, "context": None, **QUICK, "input": "Probe."}


def probe_answers(ws) -> list[dict]:
    """Sends the probe, whose file is the only flac one; the JSON messages up to its done. The session is
    alive if the probe is spoken."""
    ws.send(json.dumps(PROBE))
    events = []
    while True:
        message = ws.receive(timeout=60)
        assert message is not None, events
        if isinstance(message, str):
            events.append(json.loads(message))
            assert events[-1]["type"] in ("error", "done"), events[-1]
            if events[-1]["type"] == "done" and events[-1]["response_format"] == "flac":
                assert events[-1]["frames"] <= 1, events[-1]  # the tiny random model may end at once
                return events


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(messages=st.lists(MESSAGE, min_size=1, max_size=6))
def test_fuzzed_websocket_messages_never_get_a_500_or_end_the_session(base, messages):
    ws = connect(base)
    try:
        for message in messages:
            ws.send(message)
        events = probe_answers(ws)
    finally:
        ws.close()
    assert not [e for e in events if e["type"] == "error" and e["error"]["type"] == "server_error"], events


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=HOSTILE_JSON)
def test_deep_or_huge_json_never_gets_a_500_nor_ends_a_session(base, body, tts):
    response = post(base, body)
    assert response.status_code in (200, 400), response.text
    if response.status_code == 400:
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    ws = connect(base)
    try:
        ws.send(body)
        events = probe_answers(ws)
    finally:
        ws.close()
    assert not [e for e in events if e["type"] == "error" and e["error"]["type"] == "server_error"], events


# --- 7 and 8: the voices folder: a limit, and messages without the server's paths ----------------------------


def voice_upload(base: str, tts, name: str) -> httpx.Response:
    return httpx.post(f"{base}/v1/audio/voices", data={"name": name, "transcript": "Some words."},
                      files={"audio_sample": ("v.wav", voice_wav(tts))}, timeout=60)


def test_the_voices_folder_has_a_limit_and_a_full_one_saves_nothing(base, engine, monkeypatch, tts):
    from csm_gguf.voices import delete_voice, list_voices, voices_dir

    monkeypatch.setenv("CSM_GGUF_MAX_VOICES", "2")
    assert [voice_upload(base, tts, name).status_code for name in ("v1", "v2")] == [200, 200]
    try:
        full = voice_upload(base, tts, "v3")
        error = full.json()["error"]
        assert (full.status_code, error["code"], error["param"]) == (507, "voices_full", "name"), error
        assert "2 voices are saved, the most CSM_GGUF_MAX_VOICES=2 allows: delete one first" in error["message"]
        assert sorted(p.name for p in voices_dir().iterdir()) == ["v1.npz", "v2.npz"]  # no half-saved file
        assert httpx.delete(f"{base}/v1/audio/voices/v1").status_code == 200
        assert voice_upload(base, tts, "v3").status_code == 200
        monkeypatch.setenv("CSM_GGUF_MAX_VOICES", "many")
        error = voice_upload(base, tts, "v4").json()["error"]
        assert error["code"] == "voices_folder" and "many" not in error["message"]  # the log says why
    finally:
        for name in list_voices():
            delete_voice(name)


def test_voice_errors_name_the_voice_not_the_servers_paths(base, engine, monkeypatch, tmp_path, tts):
    from csm_gguf.generator import Segment
    from csm_gguf.tts import Voice
    from csm_gguf.voices import delete_voice, save_voice, voices_dir

    (voices_dir() / "broken.npz").write_bytes(b"PK\x03\x04 not a voice")  # a zip archive as np.load sees it
    n_codes = tts.model.n_codes
    save_voice("other-model", Voice([Segment(0, "Words.", np.full((4, 32), n_codes + 5))], speaker=0))
    try:
        for name, message in [("broken", "voice 'broken' is damaged (File is not a zip file)"),
                              ("other-model", f"the codes of voice 'other-model' must lie in 0..{n_codes - 1}")]:
            response = post(base, json.dumps({"model": "csm-1b", "input": "Hi.", "voice": name, **QUICK}))
            error = response.json()["error"]
            assert (response.status_code, error["param"], error["code"]) == (400, "voice", "voice_unusable"), error
            assert message in error["message"] and str(voices_dir()) not in response.text
    finally:
        delete_voice("broken")
        delete_voice("other-model")
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("CSM_GGUF_VOICES", str(tmp_path / "a-file"))  # a setup the server cannot use
    for response in [voice_upload(base, tts, "v1"),
                     post(base, json.dumps({"model": "csm-1b", "input": "Hi.", "voice": "someone", **QUICK}))]:
        assert (response.status_code, response.json()["error"]["code"]) == (500, "voices_folder"), response.text
        assert str(tmp_path) not in response.text
    ws = connect(base)
    try:
        ws.send(json.dumps({"voice": "someone"}))
        error = json.loads(ws.receive(timeout=30))["error"]
        assert error["code"] == "voices_folder" and str(tmp_path) not in error["message"]
    finally:
        ws.close()


# --- 6: say reads its input in bounded pieces ------------------------------------------------------------------


class EndlessStdin:
    """Standard input that never ends (`yes |`): a read must name how much it wants."""

    class buffer:
        @staticmethod
        def read(size: int = -1) -> bytes:
            assert size >= 0, "read all of an endless input"
            return b"a" * size


def test_say_refuses_endless_text_input_at_once(tmp_path, monkeypatch, capsys):
    from csm_gguf import bounded
    from csm_gguf.say import main

    out = ["-o", str(tmp_path / "x.wav"), "--model", str(tmp_path / "no-model")]
    assert main(["--input", "/dev/zero", *out]) == 2
    assert "--input /dev/zero holds NUL bytes, so it is not UTF-8 text" in capsys.readouterr().err
    monkeypatch.setattr(bounded, "MAX_TEXT_BYTES", 3 * 2**20)
    monkeypatch.setattr("sys.stdin", EndlessStdin)
    assert main(["-", *out]) == 2
    assert "standard input is larger than 3 MiB, the most read: split it" in capsys.readouterr().err
    assert not (tmp_path / "x.wav").exists()


def test_say_checks_utf8_across_the_pieces_it_reads(tmp_path, monkeypatch, capsys):
    from csm_gguf import bounded
    from csm_gguf.say import main

    monkeypatch.setattr(bounded, "PIECE", 4)
    (tmp_path / "t.txt").write_bytes("\ufeffabc\u00e9d\u00e9\u00e9f".encode() + b"\xff")  # é across pieces
    assert main(["--input", str(tmp_path / "t.txt"), "--model", str(tmp_path / "no-model")]) == 2
    assert "is not UTF-8 text (invalid start byte at byte 14)" in capsys.readouterr().err  # its place in the file


def test_say_refuses_endless_context_audio(f32_model, tmp_path, monkeypatch, capsys):
    from csm_gguf import bounded
    from csm_gguf.say import main

    monkeypatch.setattr(bounded, "MAX_PIPED_AUDIO_BYTES", 4 * 2**20)
    assert main(["Hi.", "--context", "0", "Words.", "/dev/zero", "-o", str(tmp_path / "x.wav"),
                 "--model", str(f32_model)]) == 2
    err = capsys.readouterr().err
    assert "cannot read audio from /dev/zero: the audio read from it is larger than 4 MiB" in err
    assert not (tmp_path / "x.wav").exists()


def test_a_chunked_voice_upload_over_the_limit_is_a_413(base):
    from csm_gguf.server.limits import MAX_VOICE_UPLOAD
    from csm_gguf.voices import list_voices

    head = (b'--b\r\nContent-Disposition: form-data; name="name"\r\n\r\nbig\r\n--b\r\nContent-Disposition: form-data; '
            b'name="transcript"\r\n\r\nWords.\r\n--b\r\nContent-Disposition: form-data; name="audio_sample"; '
            b'filename="v.wav"\r\n\r\n')

    def chunks():
        yield head
        for _ in range(MAX_VOICE_UPLOAD // 2**20 + 1):
            yield bytes(2**20)
        yield b"\r\n--b--\r\n"

    response = httpx.post(f"{base}/v1/audio/voices", content=chunks(), timeout=60,
                          headers={"Content-Type": "multipart/form-data; boundary=b"})
    assert response.status_code == 413 and "a voice upload is at most 32 MiB" in response.text
    assert "big" not in list_voices()


def test_voice_uploads_are_refused_before_they_are_read_when_the_server_is_full(base, engine, monkeypatch, tts):
    from csm_gguf.voices import delete_voice, list_voices

    encoded = []
    monkeypatch.setattr(tts, "segment", lambda *a, **kw: encoded.append(1))
    places = [engine.place() for _ in range(MAX_STREAMS + MAX_QUEUE)]  # requests being read fill the server
    try:
        response = voice_upload(base, tts, "v1")
        assert (response.status_code, response.json()["error"]["code"]) == (429, "queue_full"), response.text
        assert not encoded and "v1" not in list_voices()
    finally:
        for place in places:
            place.release()
    monkeypatch.undo()
    assert voice_upload(base, tts, "v1").status_code == 200
    delete_voice("v1")
    assert engine.reserved == 0
