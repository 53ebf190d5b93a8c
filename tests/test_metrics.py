"""What a replica behind a load balancer needs, on one server in this process: metrics, health probes,
bounded and idle-closing websockets, and the drain (begun by hand here; SIGTERM is tested on real server
processes in test_replicas.py)."""

from __future__ import annotations

import json
import socket
import struct
import sys
import threading
import time

import httpx
import numpy as np
import pytest
from flask import Flask, Response
from simple_websocket import Client as WsClient
from werkzeug.serving import make_server

from csm_gguf.server import metrics
from csm_gguf.server.drain import Drain
from csm_gguf.server.errors import register_error_handlers
from replica_fixtures import UPGRADE, close_quietly, closed_with, scrape, upgrade_status
from server_fixtures import pcm, serving

GREEDY = {"temperature": 0, "max_audio_ms": 800}  # 10 frames
MAX_WEBSOCKETS, IDLE_S = 2, 2


@pytest.fixture(scope="module")
def server(f32_model, tmp_path_factory):
    with serving(f32_model, tmp_path_factory.mktemp("voices"), max_streams=2, max_queue=2,
                 max_websockets=MAX_WEBSOCKETS, ws_idle_s=IDLE_S, drain_s=20) as served:
        yield served


@pytest.fixture
def base(server):
    return server[1]


def delta(after: dict, before: dict, name: str, **labels) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def sse_usage(base: str, text: str) -> dict:
    body = {"model": "csm-1b", "input": text, "voice": "alloy", "response_format": "pcm", "stream_format": "sse",
            **GREEDY}
    response = httpx.post(f"{base}/v1/audio/speech", json=body, timeout=60)
    assert response.status_code == 200
    events = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: ")]
    assert events[-1]["type"] == "speech.audio.done"
    return events[-1]["usage"]


def test_health_probes(base):
    assert httpx.get(f"{base}/health/live").json() == {"status": "alive"}
    ready = httpx.get(f"{base}/health/ready")
    assert ready.status_code == 200 and ready.json() == {"status": "ready"}
    assert httpx.get(f"{base}/health").json()["model_loaded"]


def test_metrics_count_what_was_served(base):
    before = scrape(base)
    frames = sum(sse_usage(base, f"Sentence number {i}.")["output_tokens"] for i in range(3))
    assert httpx.post(f"{base}/v1/audio/speech", json={"input": ""}).status_code == 400
    for _ in range(2):
        assert httpx.get(f"{base}/v1/models").status_code == 200
    assert httpx.get(f"{base}/nowhere").status_code == 404
    assert httpx.get(ws_url(base).replace("ws", "http", 1)).status_code == 426  # plain HTTP to the websocket
    ws = WsClient.connect(ws_url(base))
    close_quietly(ws)
    deadline = time.monotonic() + 10  # the session is counted as its handler ends
    while delta(scrape(base), before, "csm_gguf_requests_total", endpoint=WS_PATH, status="101") < 1:
        assert time.monotonic() < deadline, "the websocket session was not counted"
        time.sleep(0.1)
    after = scrape(base)
    assert delta(after, before, "csm_gguf_requests_total", endpoint="/v1/audio/speech", status="200") == 3
    assert delta(after, before, "csm_gguf_requests_total", endpoint="/v1/audio/speech", status="400") == 1
    assert delta(after, before, "csm_gguf_requests_total", endpoint="/v1/models", status="200") == 2
    assert delta(after, before, "csm_gguf_requests_total", endpoint="unmatched", status="404") == 1
    # `before`, and those of the wait for the websocket's count
    assert delta(after, before, "csm_gguf_requests_total", endpoint="/metrics", status="200") >= 1
    # A websocket session is its handshake's 101 (flask-sock answers 200 once it ends), plain HTTP to it a 426.
    assert delta(after, before, "csm_gguf_requests_total", endpoint=WS_PATH, status="101") == 1
    assert delta(after, before, "csm_gguf_requests_total", endpoint=WS_PATH, status="426") == 1
    assert delta(after, before, "csm_gguf_requests_total", endpoint=WS_PATH, status="200") == 0
    assert frames == 30 and delta(after, before, "csm_gguf_frames_total") == frames
    assert delta(after, before, "csm_gguf_speech_total", outcome="completed") == 3
    assert delta(after, before, "csm_gguf_speech_total", outcome="cancelled") == 0
    # one request at a time: a codec step decodes one stream (a step of one frame, or of several if it lagged)
    steps = delta(after, before, "csm_gguf_codec_steps_total")
    assert 3 <= steps == delta(after, before, "csm_gguf_codec_stream_steps_total") <= frames
    assert delta(after, before, "csm_gguf_audio_seconds_total") == pytest.approx(frames * 0.08)
    for histogram in ("csm_gguf_time_to_first_audio_seconds", "csm_gguf_request_real_time_factor"):
        assert delta(after, before, f"{histogram}_count") == 3
        assert delta(after, before, f"{histogram}_sum") > 0
    assert after[("csm_gguf_active_streams", ())] == 0 and after[("csm_gguf_queued_requests", ())] == 0
    assert after[("csm_gguf_draining", ())] == 0


def test_a_stream_whose_client_left_counts_as_cancelled(base):
    """Its response was counted 200 when its first audio went out: the outcome tells what came of it."""
    before = scrape(base)
    body = {"model": "csm-1b", "input": "A long text that takes a while to say. " * 20, "voice": "alloy",
            "response_format": "pcm", "temperature": 0}
    with httpx.stream("POST", f"{base}/v1/audio/speech", json=body, timeout=60) as response:
        assert response.status_code == 200
        next(response.iter_bytes())  # the first audio, then the client goes
    deadline = time.monotonic() + 20
    while delta(scrape(base), before, "csm_gguf_speech_total", outcome="cancelled") < 1:
        assert time.monotonic() < deadline, "the stream left was not counted as cancelled"
        time.sleep(0.1)
    after = scrape(base)
    assert delta(after, before, "csm_gguf_speech_total", outcome="completed") == 0
    assert delta(after, before, "csm_gguf_requests_total", endpoint="/v1/audio/speech", status="200") == 1


def test_metrics_without_prometheus_client_is_a_clear_501(monkeypatch):
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # import fails, as when not installed
    app = Flask("bare")
    register_error_handlers(app)
    assert metrics.install(app, engine=None, drain=Drain(1), slots=None) is None
    response = app.test_client().get("/metrics")
    assert response.status_code == 501
    assert "pip install 'csm-gguf[server]'" in response.json["error"]["message"]


WS_PATH = "/v1/audio/speech/ws"


def ws_url(base: str) -> str:
    return base.replace("http", "ws") + WS_PATH


def test_websockets_have_a_limit_and_idle_ones_are_closed(server):
    app, base = server
    opened = [WsClient.connect(ws_url(base)) for _ in range(MAX_WEBSOCKETS)]
    try:
        status, headers = upgrade_status(base)
        assert status == 429 and headers["Retry-After"] == "1"
        # A busy session is not idle: it speaks past the idle time and is answered whole.
        opened[0].send(json.dumps({"input": "Hello there.", "response_format": "pcm", "temperature": 0,
                                   "max_audio_ms": 4000}))
        start = time.monotonic()
        code, message = closed_with(opened[1], IDLE_S + 3)
        assert code == 1000 and "CSM_GGUF_WS_IDLE_S" in message and time.monotonic() - start >= IDLE_S - 0.5
        while True:
            reply = opened[0].receive(timeout=30)
            if isinstance(reply, str):
                assert json.loads(reply)["type"] == "done"
                break
        assert closed_with(opened[0], IDLE_S + 3)[0] == 1000
        assert upgrade_status(base)[0] == 101  # the closed ones' slots are free again
    finally:
        for ws in opened:
            close_quietly(ws)
    # Every session ends on the server too, the one whose client left without a word included.
    slots, deadline = app.extensions["csm_gguf.websockets"], time.monotonic() + IDLE_S + 10
    while slots.open and time.monotonic() < deadline:
        time.sleep(0.1)
    assert slots.open == 0 and app.extensions["csm_gguf.drain"].in_flight == 0


def masked_text_frame(text: str) -> bytes:
    """A websocket text message as a client sends it (masked, RFC 6455 5.2)."""
    payload, mask = text.encode(), b"\x01\x02\x03\x04"
    size = bytes([0x80 | len(payload)]) if len(payload) < 126 else b"\xfe" + struct.pack(">H", len(payload))
    return b"\x81" + size + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def server_side(client: socket.socket) -> socket.socket:
    """The in-process server's end of `client`'s connection (a handle on the same socket)."""
    import os

    for fd in map(int, os.listdir("/proc/self/fd")):
        try:
            other = socket.socket(fileno=os.dup(fd))
        except OSError:
            continue
        try:
            if other.family == socket.AF_INET and other.getpeername() == client.getsockname():
                return other
        except OSError:
            pass
        other.close()  # the duplicate: the socket itself stays open
    raise AssertionError("no server socket for this client")


def raw_websocket(base: str, receive_buffer: int | None = None) -> socket.socket:
    """A websocket client's socket, upgraded (the head read alone: what follows stays unread), that then answers
    nothing, not even pings."""
    sock = socket.socket()
    if receive_buffer is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.connect(("127.0.0.1", int(base.rsplit(":", 1)[1])))
    sock.sendall(UPGRADE)
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert head.startswith(b"HTTP/1.1 101")
    return sock


def wait_for_no_session(base: str, why: str, within: float) -> None:
    deadline = time.monotonic() + within
    while scrape(base)[("csm_gguf_websocket_sessions", ())] > 0:
        assert time.monotonic() < deadline, f"the session of a client that {why} is still open"
        time.sleep(0.1)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the server's socket in /proc/self/fd")
def test_a_websocket_client_that_stops_reading_loses_its_session(base, monkeypatch):
    """Its session's sends block once the buffers are full: without a send timeout the session, its thread and
    its slot stayed for ever (the idle timeout counts only time with nothing to send)."""
    from csm_gguf.server import limits

    monkeypatch.setattr(limits, "STALLED_CLIENT_S", 1.0)  # read as each connection arrives
    sock = raw_websocket(base, receive_buffer=4096)
    try:
        with server_side(sock) as server:  # small buffers on both sides: the server's sends block soon
            server.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        speech = {"type": "speech", "input": "A sentence that goes on for a while, and then some more. " * 20,
                  "response_format": "pcm", "speed": 0.25, "temperature": 0}
        sock.sendall(masked_text_frame(json.dumps(speech)))
        wait_for_no_session(base, "reads nothing", within=30)
    finally:
        sock.close()


def test_a_websocket_client_that_answers_no_ping_loses_its_session(server, monkeypatch):
    """A client gone without closing (its network lost) held its session until the idle timeout, and a
    speaking one until its sends stalled: the server's pings find it."""
    app, base = server
    assert app.config["SOCK_SERVER_OPTIONS"]["ping_interval"] == 20  # CSM_GGUF_WS_PING_S's default
    monkeypatch.setitem(app.config["SOCK_SERVER_OPTIONS"], "ping_interval", 0.3)
    monkeypatch.setattr(app.extensions["csm_gguf.websockets"], "idle_s", 60)  # not the idle timeout's closing
    sock = raw_websocket(base)
    try:
        wait_for_no_session(base, "answers no ping", within=10)
    finally:
        sock.close()


def test_a_websocket_client_that_answers_pings_keeps_its_session(server, monkeypatch):
    app, base = server
    monkeypatch.setitem(app.config["SOCK_SERVER_OPTIONS"], "ping_interval", 0.2)
    ws = WsClient.connect(ws_url(base))  # simple_websocket answers pings, as browsers do
    try:
        time.sleep(1.0)  # five pings, each answered
        ws.send(json.dumps({"input": "Still here.", "response_format": "pcm", **GREEDY}))
        message = ws.receive(timeout=30)
        assert isinstance(message, bytes) and message
    finally:
        close_quietly(ws)


def test_drain_refuses_new_work_and_lets_streams_finish(server):
    """(Last on the module's server: a drain does not end.) While a stream is spoken, draining turns readiness
    503 and refuses new requests with Retry-After; the stream finishes whole, and idle websockets close."""
    app, base = server
    drain = app.extensions["csm_gguf.drain"]
    body = {"model": "csm-1b", "input": "A long enough sentence to be speaking while the drain begins.",
            "response_format": "pcm", "temperature": 0, "max_audio_ms": 3200}
    spoken = httpx.post(f"{base}/v1/audio/speech", json=body, timeout=60)
    assert spoken.status_code == 200, spoken.text
    whole = spoken.content
    received = []
    with httpx.stream("POST", f"{base}/v1/audio/speech", json=body, timeout=60) as response:
        assert response.status_code == 200
        chunks = response.iter_bytes()
        received.append(next(chunks))
        assert drain.paths["/v1/audio/speech"] == 1  # the stream is in flight as the drain begins
        idle = WsClient.connect(ws_url(base))  # just before the drain: its closing is the drain's, not idleness's
        assert drain.begin()
        assert httpx.get(f"{base}/health/ready").status_code == 503
        refused = httpx.get(f"{base}/v1/models")
        assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
        assert refused.json()["error"]["code"] == "draining"
        assert httpx.get(f"{base}/health/live").status_code == 200
        assert scrape(base)[("csm_gguf_draining", ())] == 1
        received.extend(chunks)
    # Greedy: the same speech as before the drain, all of it; within a step of int16, as the codec decodes the
    # frames waiting for it in one step, which rounds a little differently on a busy machine (CI: a 1-step diff).
    assert len(b"".join(received)) == len(whole)
    np.testing.assert_allclose(pcm(b"".join(received)), pcm(whole), atol=1 / 32768)
    assert closed_with(idle, 3)[0] == 1001
    assert drain.wait(), f"{drain.describe()} after the drain's time"
    assert drain.in_flight == 0


def test_a_websocket_is_out_of_flight_when_its_session_ends():
    """flask-sock runs a session inside the app's call; werkzeug may then fail to close the response it gets
    (the client gone, its clean-up read raises), which left a drain waiting on a session long over."""
    drain = Drain(1)
    ended = []
    app = drain.middleware(lambda environ, start_response: ended.append(drain.in_flight) or [b""])
    result = app({"PATH_INFO": "/v1/audio/speech/ws", "HTTP_UPGRADE": "websocket"}, None)
    assert ended == [1] and drain.in_flight == 0 and not drain.paths  # result never closed
    for environ in ({"PATH_INFO": "/v1/audio/speech"}, {"PATH_INFO": "/v1/audio/speech", "HTTP_UPGRADE": "websocket"}):
        result = app(environ, None)  # a response (an upgrade header elsewhere too): in flight until closed
        assert drain.describe() == "1 requests in flight (/v1/audio/speech x1)"
        result.close()
        assert drain.in_flight == 0 and not drain.paths


def test_a_response_is_out_of_flight_once_whether_exhausted_closed_or_dropped():
    drain = Drain(1)
    closed = []

    class Body:
        def __init__(self):
            self.chunks = iter([b"a", b"b"])

        def __iter__(self):
            return self.chunks

        def close(self):
            closed.append(self)

    app = drain.middleware(lambda environ, start_response: Body())
    environ = {"PATH_INFO": "/v1/audio/speech"}
    exhausted = app(environ, None)
    assert list(exhausted) == [b"a", b"b"] and drain.in_flight == 0  # out at its end: its close may never come
    exhausted.close()
    exhausted.close()
    assert drain.in_flight == 0 and len(closed) == 1  # closed once, counted once
    cut = app(environ, None)
    assert next(cut) == b"a" and drain.in_flight == 1
    cut.close()
    assert drain.in_flight == 0 and len(closed) == 2
    dropped = app(environ, None)
    next(dropped)
    del dropped  # neither exhausted nor closed: the WSGI server gave up on it
    assert drain.in_flight == 0 and not drain.paths and len(closed) == 3  # and its clean-up still ran


def test_a_response_whose_client_reset_the_connection_is_out_of_flight():
    """werkzeug's server (`flask run`) reads what a client left unread before it closes the response; after a
    reset that read raises, and the response is never closed: it must not stay in flight (a drain on SIGTERM
    waited CSM_GGUF_DRAIN_S for it)."""
    drain, sent, reset = Drain(1), threading.Event(), threading.Event()
    app = Flask("bare")

    @app.get("/v1/audio/voices")
    def answer():
        def body():
            yield b"x" * 100  # all of it at once, as a flac file or a JSON answer goes out
            sent.set()  # (werkzeug asks for more once it has written it)
            reset.wait(10)  # the response ends after the client has gone

        return Response(body(), headers={"Content-Length": "100"})

    app.wsgi_app = drain.middleware(app.wsgi_app)
    served = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=served.serve_forever, daemon=True).start()
    try:
        client = socket.create_connection(("127.0.0.1", served.server_port), timeout=10)
        client.sendall(b"GET /v1/audio/voices HTTP/1.1\r\nHost: x\r\n\r\n")
        assert client.recv(12) == b"HTTP/1.1 200" and sent.wait(10)  # the body is sent, and left unread
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()  # a reset, not a FIN
        reset.set()
        deadline = time.monotonic() + 5
        while drain.in_flight and time.monotonic() < deadline:
            time.sleep(0.01)
        assert drain.in_flight == 0, drain.describe()
    finally:
        served.shutdown()


def test_readiness_says_when_the_engine_stopped():
    from types import SimpleNamespace

    from csm_gguf.server import health

    app = Flask("bare")
    app.extensions["csm_gguf.drain"] = Drain(1)
    app.extensions["csm_gguf"] = SimpleNamespace(engine=SimpleNamespace(running=False, failed=False))  # closed
    app.register_blueprint(health.bp)
    response = app.test_client().get("/health/ready")
    assert response.status_code == 503 and response.json == {"status": "engine stopped"}
    assert app.test_client().get("/health/live").status_code == 200


def test_gunicorn_settings_that_would_undo_the_drain_or_stall_health_are_warned(caplog):
    from types import SimpleNamespace

    from csm_gguf.server.drain import check_gunicorn
    from csm_gguf.server.settings import Settings

    check_gunicorn(SimpleNamespace(graceful_timeout=40, threads=32), Settings())  # deploy/'s command
    assert not caplog.records
    check_gunicorn(SimpleNamespace(graceful_timeout=30, threads=28), Settings())  # gunicorn's default timeout
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2 and "--graceful-timeout (30 s)" in messages[0] and "--threads (28)" in messages[1]
