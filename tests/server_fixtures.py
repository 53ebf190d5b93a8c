"""What the server tests share: a real server on loopback serving the tiny model (fixtures, registered
in conftest.py), and the helpers its clients use."""

from __future__ import annotations

import base64
import io
import json
import os
import select
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx
import numpy as np
import pytest
import soundfile as sf
from flask import Flask
from simple_websocket import Client as WsClient
from werkzeug.serving import make_server

from csm_fixtures import random_codes
from csm_gguf.audio import to_int16
from csm_gguf.generator import Segment
from csm_gguf.plan import Context
from csm_gguf.server.services import EXTENSION, Services
from csm_gguf.tts import Voice

TEXT = "Hello there, how are you doing today?"
GREEDY = {"temperature": 0, "max_audio_ms": 800}  # 10 frames
MAX_STREAMS, MAX_QUEUE = 8, 2


def _wav(samples: np.ndarray) -> str:
    data = io.BytesIO()
    sf.write(data, samples, 24_000, format="WAV")
    return base64.b64encode(data.getvalue()).decode()


LONG_WAV = _wav(np.zeros(24_000 * 200, np.int16))  # 200 s: more than the whole context holds
_flac = io.BytesIO()
sf.write(_flac, np.zeros(8000 * 600, np.int16), 8000, format="FLAC")
LONG_FLAC = _flac.getvalue()  # ten minutes of silence in 30 kB: refused without decoding it all


@pytest.fixture(scope="module")
def server(f32_model, tmp_path_factory):
    from csm_gguf import voices

    with serving(f32_model, tmp_path_factory.mktemp("voices"), max_streams=MAX_STREAMS, max_queue=MAX_QUEUE) as served:
        voices.save_voice("narrator", Voice([Segment(3, "A saved voice prompt.", random_codes(12, 64, seed=7))],
                                            speaker=3))
        yield served


@pytest.fixture
def base(server):
    return server[1]


@pytest.fixture
def services(server):
    return server[0].extensions["csm_gguf"]


@pytest.fixture
def engine(services):
    return services.engine


@pytest.fixture
def client(base):
    import openai  # here, not at the top: conftest loads this module, and the GPU machine's image has no openai

    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)


def reference(services, text=TEXT, **kwargs) -> np.ndarray:
    """CSM.generate for the same request. The engine thread is idle between requests, so the test
    borrows its CSM (the same model, no second 10 s load)."""
    assert not services.engine.active and not services.engine.waiting
    return services.tts.generate(text, **kwargs)


def pcm(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768


def assert_same_audio(actual: np.ndarray, expected: np.ndarray) -> None:
    """Audio read back from 16-bit PCM equals float audio after the same clipping, within a step (the
    server decodes frames in the chunks they arrive in, which rounds a little differently)."""
    assert len(actual) == len(expected) > 0
    ints = np.rint(np.asarray(actual) * 32768).astype(np.int32)
    np.testing.assert_allclose(ints, to_int16(expected).astype(np.int32), atol=1)


def post(base: str, body, **kw) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(f"{base}/v1/audio/speech", content=content, timeout=60, **kw)


def open_stream(base: str, body: dict) -> socket.socket:
    """A raw streaming request, so the test can hang up whenever it likes."""
    host, port = base.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    data = json.dumps(body).encode()
    sock.sendall(b"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
    return sock


def refused(socks: list[socket.socket]) -> list[bytes]:
    """The answers so far of the raw streams in `socks` that did not begin with 200 (peeked: left unread)."""
    answers = []
    for sock in select.select(socks, [], [], 0)[0]:  # those with an answer (a timed socket's recv would wait)
        head = sock.recv(4096, socket.MSG_PEEK)
        if not head.startswith(b"HTTP/1.1 200"):
            answers.append(head)
    return answers


def hang_up(sock: socket.socket) -> None:
    sock.shutdown(socket.SHUT_RDWR)
    sock.close()


def wait_idle(engine, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while engine.active or engine.joining or engine.waiting:
        assert time.monotonic() < deadline, engine.stats()
        time.sleep(0.01)
    assert len(engine.generator.free_slots) == engine.max_streams


def voice_wav(tts) -> bytes:
    """A voice's recording, made by `tts`'s codec."""
    wav = io.BytesIO()
    # 16 frames: at least the 1 s a voice needs, in CSM's 80 ms frames (the tiny codec's are shorter)
    sf.write(wav, tts.decode(random_codes(16, 64, seed=5)), 24_000, format="WAV")
    return wav.getvalue()


def running_ffmpeg_children() -> int:
    """This process's ffmpeg children that have not exited (Linux's /proc)."""
    count = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            head, _, rest = stat.read_text().rpartition(")")
        except OSError:  # gone meanwhile
            continue
        state, ppid = rest.split()[:2]
        count += head.endswith("(ffmpeg") and int(ppid) == os.getpid() and state != "Z"
    return count


def ffmpeg_children_end() -> None:
    deadline = time.monotonic() + 10
    while running_ffmpeg_children():
        assert time.monotonic() < deadline, "ffmpeg still runs for a client that left"
        time.sleep(0.05)


def ws_collect(ws) -> tuple[bytes, dict]:
    audio = b""
    while True:
        message = ws.receive(timeout=30)
        assert message is not None
        if isinstance(message, bytes):
            audio += message
        else:
            event = json.loads(message)
            assert event["type"] == "done", event
            return audio, event


def record_submits(engine, monkeypatch, refuse: int = 0) -> list[tuple[int, str]]:
    """(speaker, text) of each job submitted, from now on; the first `refuse` submits after the first one
    find the server full."""
    from csm_gguf.server.engine import QueueFull

    seen, submit, refused = [], engine.submit, []

    def spy(spec, after=None, continues=False, *args, **kwargs):
        if seen and len(refused) < refuse and (after is None or after.ended):  # a follower is never refused
            refused.append(spec.text)
            raise QueueFull("the server is busy (test)")
        seen.append((spec.speaker, spec.text))
        return submit(spec, after, continues, *args, **kwargs)

    monkeypatch.setattr(engine, "submit", spy)
    return seen


def record_starts(engine, monkeypatch) -> list[tuple[int, str, list[str]]]:
    """(speaker, text, its previous piece's text) of each piece the engine starts, in order, from now on."""
    seen, prompt = [], Context.prompt

    def spy(self, piece):
        seen.append((piece.speaker, piece.text, [h.segment.text for h in self.previous]))
        return prompt(self, piece)

    monkeypatch.setattr(Context, "prompt", spy)
    return seen


def ws_session(base, messages: list[dict], dones: int) -> list[tuple[bytes, dict]]:
    """Send every message at once, then collect `dones` files with their done messages."""
    ws = WsClient.connect(base.replace("http", "ws") + "/v1/audio/speech/ws")
    try:
        for m in messages:
            ws.send(json.dumps(m))
        return [ws_collect(ws) for _ in range(dones)]
    finally:
        ws.close()


@contextmanager
def serving(model_dir, voices_dir, **settings) -> Iterator[tuple[Flask, str]]:
    """(the app, its base URL) while a server of its own runs on loopback (f32 KV cache unless `settings`
    say otherwise); voices are saved in `voices_dir`."""
    from csm_gguf.web import create_app

    old = os.environ.get("CSM_GGUF_VOICES")
    os.environ["CSM_GGUF_VOICES"] = str(voices_dir)
    app = create_app(model=str(model_dir), **{"kv_type": "f32", **settings})
    srv = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield app, f"http://127.0.0.1:{srv.server_port}"
    finally:
        srv.shutdown()
        app.extensions[EXTENSION].engine.close()
        if old is None:
            del os.environ["CSM_GGUF_VOICES"]
        else:
            os.environ["CSM_GGUF_VOICES"] = old


@contextmanager
def loopback_server(model_dir, voices_dir, **settings) -> Iterator[tuple[Services, str]]:
    """(the app's Services, its base URL) while a server of its own runs (for tests that need settings of
    their own); voices are saved in `voices_dir`."""
    with serving(model_dir, voices_dir, **settings) as (app, base):
        yield app.extensions[EXTENSION], base
