"""The speech server, tested as clients see it: a real server on loopback serving the tiny model."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import soundfile as sf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from simple_websocket import Client as WsClient
from simple_websocket import ConnectionClosed
from werkzeug.serving import make_server

from audio_fixtures import EVERY_FORMAT, needs_ffmpeg
from csm_fixtures import random_codes
from csm_gguf import builtin_voices
from csm_gguf.audio import FORMATS, MEDIA_TYPES, SAMPLE_RATE, load_audio, to_int16
from csm_gguf.generator import Segment
from csm_gguf.tempo import change_speed
from csm_gguf.server.limits import MAX_SPEECH_REQUEST, MAX_VOICE_UPLOAD
from csm_gguf.tts import Voice
from csm_gguf.voices import voices_dir
from csm_gguf.server.ws_session import WebsocketSession

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
    import os

    from csm_gguf import voices
    from csm_gguf.web import create_app

    os.environ["CSM_GGUF_VOICES"] = str(tmp_path_factory.mktemp("voices"))
    voices.save_voice("narrator", Voice([Segment(3, "A saved voice prompt.", random_codes(12, 64, seed=7))], speaker=3))
    app = create_app(model=str(f32_model), max_streams=MAX_STREAMS, max_queue=MAX_QUEUE, kv_type="f32")
    srv = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield app, f"http://127.0.0.1:{srv.server_port}"
    srv.shutdown()
    app.extensions["csm_gguf"].engine.close()
    del os.environ["CSM_GGUF_VOICES"]


@pytest.fixture
def base(server):
    return server[1]


@pytest.fixture
def engine(server):
    return server[0].extensions["csm_gguf"].engine


@pytest.fixture
def client(base):
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)


def reference(engine, text=TEXT, **kwargs) -> np.ndarray:
    """CSM.generate for the same request. The engine thread is idle between requests, so the test
    borrows its CSM (the same model, no second 10 s load)."""
    assert not engine.active and not engine.waiting
    return engine.tts.generate(text, **kwargs)


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


def hang_up(sock: socket.socket) -> None:
    sock.shutdown(socket.SHUT_RDWR)
    sock.close()


def wait_idle(engine, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while engine.active or engine.joining or engine.waiting:
        assert time.monotonic() < deadline, engine.stats()
        time.sleep(0.01)
    assert len(engine.generator.free_slots) == MAX_STREAMS


# --- the OpenAI client ---------------------------------------------------------------------------------


def test_codec_steps_are_traced_at_start(engine):
    """(First in this module, before any request decodes.) A stream's second step of each size would
    otherwise wait for the CPU trace of the codec's step, 0.1-0.3 s."""
    import torch

    traces = engine.tts.codec._traces
    assert all(isinstance(traces[(1, 32, t, torch.int64)], torch.jit.ScriptFunction) for t in (1, 2))


def test_create_equals_generate(client, engine):
    response = client.audio.speech.create(model="csm-1b", voice="echo", input=TEXT, response_format="wav",
                                          extra_body=GREEDY)
    audio, rate = sf.read(io.BytesIO(response.content), dtype="float32")
    assert rate == 24_000
    expected = reference(engine, voice="echo", **GREEDY)  # echo's fixed prompt, made by the server
    assert_same_audio(audio, expected)


def test_long_text_is_spoken_in_pieces_like_generate(client, engine):
    text = " ".join(f"This is sentence number {i}, which goes on for a while." for i in range(12))
    assert len(engine.tts.pieces(text)) > 1
    body = {"temperature": 0, "max_audio_ms": 240, "seed": 3, "speaker_id": 2}
    response = client.audio.speech.create(model="tts-1", voice="alloy", input=text, response_format="pcm",
                                          extra_body=body)
    expected = reference(engine, text, voice="alloy", speaker=2, temperature=0, max_audio_ms=240, seed=3)
    assert_same_audio(pcm(response.content), expected)


def test_long_text_goes_on_when_context_and_previous_piece_do_not_fit(base, engine):
    """A context that fits the first piece but not beside it: later pieces drop the context (this was a
    500 after the first piece). Not streamed, so a failure would still show as the status."""
    text = " ".join(f"This is sentence number {i}, which goes on for a while." for i in range(12))
    pieces = engine.tts.pieces(text)
    empty = Segment(0, "What came before.", np.zeros((0, 32), dtype=np.int64))
    frames = engine.tts.model.config.backbone.max_seq_len - 8 - engine.tts.generator.prompt_rows(pieces[0], 0, [empty])
    body = {"model": "csm-1b", "voice": "none", "input": text, "response_format": "pcm", "stream": False,
            "temperature": 0, "max_audio_ms": 320,
            "context": [{"speaker": 0, "text": empty.text, "codes": np.ones((frames, 32), int).tolist()}]}
    response = post(base, body)
    assert response.status_code == 200, response.text
    assert len(pcm(response.content)) == 4 * len(pieces) * engine.tts.codec.cfg.frame_size


def test_damaged_saved_voice_is_a_400(base):
    import os

    broken = os.path.join(os.environ["CSM_GGUF_VOICES"], "broken.npz")
    with open(broken, "wb") as f:
        f.write(b"not a voice")
    try:
        response = post(base, {"model": "csm-1b", "voice": "broken", "input": TEXT})
        assert response.status_code == 400, response.text
        assert (response.json()["error"]["param"], response.json()["error"]["code"]) == ("voice", "voice_unusable")
    finally:
        os.remove(broken)


def test_server_refuses_to_start_with_an_unusable_default_voice(tmp_path, monkeypatch):
    from csm_gguf.web import create_app

    monkeypatch.setenv("CSM_GGUF_VOICES", str(tmp_path))
    (tmp_path / "broken.npz").write_bytes(b"not a voice")
    with pytest.raises(ValueError, match="voice 'broken' is damaged"):
        create_app(model=str(tmp_path / "no-model"), voice="broken")  # before the model: it is not reached
    with pytest.raises(ValueError, match="'with space' is not a voice"):
        create_app(model=str(tmp_path / "no-model"), voice="with space")


def listed(voices: list[dict], name: str) -> dict:
    return next(v for v in voices if v["id"] == name)


def test_saved_voice_uses_its_prompt(client, engine):
    voices = httpx.get(f"{client.base_url}audio/voices").json()
    assert listed(voices["voices"], "narrator") == {"id": "narrator", "name": "narrator", "type": "saved",
                                                    "speaker_id": 3, "prompt": {"segments": 1, "frames": 12,
                                                    "seconds": 0.96, "transcript": "A saved voice prompt."}}
    response = client.audio.speech.create(model="csm-1b", voice="narrator", input=TEXT, response_format="pcm",
                                          extra_body=GREEDY)
    from csm_gguf.voices import load_voice

    voice = load_voice("narrator")
    expected = reference(engine, speaker=voice.speaker, context=voice.segments, **GREEDY)
    assert_same_audio(pcm(response.content), expected)
    plain = reference(engine, speaker=3, **GREEDY)
    assert not np.allclose(expected, plain)  # the prompt made a difference


def voice_wav(engine) -> bytes:
    wav = io.BytesIO()
    sf.write(wav, engine.tts.decode(random_codes(8, 64, seed=5)), 24_000, format="WAV")
    return wav.getvalue()


def test_voices_are_made_from_a_sample_used_and_deleted(client, base, engine):
    sample = voice_wav(engine)
    made = client.audio.voices.create(name="lena", audio_sample=("lena.wav", sample, "audio/wav"), consent="cons_1",
                                      extra_body={"transcript": "A sample of my voice.", "speaker_id": 5})
    assert (made.id, made.name, made.object, made.type) == ("lena", "lena", "audio.voice", "audio_sample")
    assert abs(made.created_at - time.time()) < 60
    lena = listed(httpx.get(f"{base}/v1/audio/voices").json()["voices"], "lena")
    assert (lena["type"], lena["speaker_id"], lena["prompt"]["transcript"]) == ("saved", 5, "A sample of my voice.")
    response = client.audio.speech.create(model="csm-1b", voice="lena", input=TEXT, response_format="pcm",
                                          extra_body=GREEDY)
    segment = engine.tts.segment(5, "A sample of my voice.", audio=io.BytesIO(sample))
    assert_same_audio(pcm(response.content), reference(engine, speaker=5, context=[segment], **GREEDY))
    with pytest.raises(openai.ConflictError, match="voice 'lena' exists: delete it first"):
        client.audio.voices.create(name="lena", audio_sample=("lena.wav", sample), consent="cons_1",
                                   extra_body={"transcript": "Again."})
    deleted = client.audio.voices.delete("lena")
    assert (deleted.id, deleted.deleted) == ("lena", True)
    assert "lena" not in [v["id"] for v in httpx.get(f"{base}/v1/audio/voices").json()["voices"]]
    with pytest.raises(openai.NotFoundError, match="no saved voice 'lena'"):
        client.audio.voices.delete("lena")


def test_one_of_several_saving_the_same_name_wins(base, engine):
    from concurrent.futures import ThreadPoolExecutor

    sample = voice_wav(engine)

    def save(i: int) -> int:
        return httpx.post(f"{base}/v1/audio/voices", data={"name": "same", "transcript": f"Take {i}."},
                          files={"audio_sample": ("v.wav", sample)}, timeout=60).status_code

    with ThreadPoolExecutor(4) as pool:
        assert sorted(pool.map(save, range(4))) == [200, 409, 409, 409]
    assert httpx.delete(f"{base}/v1/audio/voices/same").status_code == 200


@needs_ffmpeg
def test_a_voice_from_a_phone_recording(client, engine, tmp_path):
    wav, m4a = tmp_path / "v.wav", tmp_path / "v.m4a"
    wav.write_bytes(voice_wav(engine))
    subprocess.run(["ffmpeg", "-loglevel", "error", "-i", str(wav), "-c:a", "aac", str(m4a)], check=True)
    with m4a.open("rb") as f:
        made = client.audio.voices.create(name="memo", audio_sample=f, consent="cons_1",
                                          extra_body={"transcript": "A sample of my voice."})
    assert made.id == "memo"
    client.audio.voices.delete("memo")


@pytest.mark.parametrize("form, files, param, status, message", [
    ({"name": "v1", "transcript": "Words."}, {}, "audio_sample", 400, "'audio_sample' is required"),
    ({"name": "v1"}, {"audio_sample": True}, "transcript", 400, "'transcript' is required: the words spoken"),
    ({"name": "v1", "transcript": "  "}, {"audio_sample": True}, "transcript", 400, "'transcript' is required"),
    ({"transcript": "Words."}, {"audio_sample": True}, "name", 400, "'name' is required"),
    ({"name": "a b", "transcript": "Words."}, {"audio_sample": True}, "name", 400, "bad voice name 'a b'"),
    ({"name": "none", "transcript": "Words."}, {"audio_sample": True}, "name", 400, "'none' means no voice prompt"),
    ({"name": "narrator", "transcript": "Words."}, {"audio_sample": True}, "name", 409, "voice 'narrator' exists"),
    ({"name": "v1", "transcript": "Words.", "speaker_id": "-1"}, {"audio_sample": True}, "speaker_id", 400,
     "'speaker_id' must be a whole number"),
    ({"name": "v1", "transcript": "Words.", "type": "prompt"}, {"audio_sample": True}, "type", 400,
     "cannot be made from a text prompt"),
    ({"name": "v1", "transcript": "Words.", "prompt": "warm"}, {"audio_sample": True}, "prompt", 400,
     "unrecognized request argument: 'prompt'"),
    ({"name": "v1", "transcript": "Words."}, {"audio_sample": b"not audio"}, "audio_sample", 400,
     "audio_sample: cannot read audio from v.wav: Format not recognised"),
    ({"name": "v1", "transcript": "Words."}, {"audio_sample": b""}, "audio_sample", 400, "v.wav: it is empty"),
    ({"name": "alloy\n", "transcript": "Words."}, {"audio_sample": True}, "name", 400, "bad voice name 'alloy\\n'"),
    ({"name": "v1", "transcript": "Words.", "speaker_id": "1" * 5000}, {"audio_sample": True}, "speaker_id", 400,
     "'speaker_id' must be a whole number"),
    ({"name": "v1", "transcript": b"hi \xff there"}, {"audio_sample": True}, "transcript", 400,
     "'transcript' must be UTF-8 text"),
    ({"name": "v1"}, {"audio_sample": True, "transcript": b"Words."}, "transcript", 400,
     "send 'transcript' as a text field, not a file"),
    ({"name": "v1", "transcript": "Words.", "audio_sample": "text"}, {}, "audio_sample", 400,
     "send 'audio_sample' as a file, not a text field"),
    ({"name": ["v1", "v2"], "transcript": "Words."}, {"audio_sample": True}, "name", 400, "'name' was sent more than"),
    ({"name": "v1", "transcript": "Words."}, {"audio_sample": "long"}, "audio_sample", 400,
     "audio_sample: the context audio lasts more than the"),
])
def test_bad_voice_uploads_are_refused_and_save_nothing(base, engine, form, files, param, status, message):
    sample = {True: voice_wav(engine), "long": LONG_FLAC}
    parts = [(k, (None, v)) for k, vs in form.items() for v in (vs if isinstance(vs, list) else [vs])]
    parts += [(k, ("v.wav", sample.get(v, v))) for k, v in files.items()]
    response = httpx.post(f"{base}/v1/audio/voices", files=parts)  # multipart, with or without a file
    error = response.json()["error"]
    assert (response.status_code, error["param"]) == (status, param) and message in error["message"], error
    assert sorted(p.name for p in voices_dir().iterdir()) == ["narrator.npz"]


def test_websocket_messages_have_the_size_limit_too(server, base, monkeypatch):
    app = server[0]
    assert app.config["SOCK_SERVER_OPTIONS"]["max_message_size"] == MAX_SPEECH_REQUEST
    monkeypatch.setitem(app.config["SOCK_SERVER_OPTIONS"], "max_message_size", 1000)
    ws = WsClient.connect(base.replace("http", "ws") + "/v1/audio/speech/ws")
    ws.send(json.dumps({"type": "text", "text": "x" * 2000}))
    with pytest.raises(ConnectionClosed) as closed:
        ws.receive(timeout=10)
    assert closed.value.reason == 1009  # message too big


def test_built_in_voices_need_no_voices_folder(base, tmp_path, monkeypatch):
    (tmp_path / "a-file").write_text("not a folder")
    monkeypatch.setenv("CSM_GGUF_VOICES", str(tmp_path / "a-file"))  # broken while the server runs
    response = post(base, {"model": "csm-1b", "input": TEXT, "voice": "alloy", "response_format": "pcm", **GREEDY})
    assert response.status_code == 200 and response.content


def test_voice_uploads_need_multipart_and_a_size_limit(base):
    response = httpx.post(f"{base}/v1/audio/voices", json={"name": "v1", "transcript": "Words."})
    assert response.status_code == 400 and "multipart/form-data" in response.json()["error"]["message"]
    too_big = httpx.post(f"{base}/v1/audio/voices", data={"name": "v1", "transcript": "Words."},
                         files={"audio_sample": ("v.wav", bytes(MAX_VOICE_UPLOAD + 1))})
    assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "request_entity_too_large"
    assert "a voice upload is at most 32 MiB: send a shorter or compressed recording" in too_big.text
    speech = post(base, {"model": "csm-1b", "input": TEXT, "voice": "alloy", "pad": "x" * MAX_SPEECH_REQUEST})
    assert speech.status_code == 413 and "a request is at most 64 MiB: send shorter context audio" in speech.text
    assert sorted(p.name for p in voices_dir().iterdir()) == ["narrator.npz"]


def test_built_in_and_default_voices_cannot_be_deleted(base, f32_model):
    response = httpx.delete(f"{base}/v1/audio/voices/alloy")
    assert response.status_code == 400 and "built-in voice" in response.json()["error"]["message"]
    assert httpx.delete(f"{base}/v1/audio/voices/no%20such").status_code == 404
    from csm_gguf.web import create_app

    app = create_app(model=str(f32_model), voice="narrator", kv_type="f32")
    try:
        response = app.test_client().delete("/v1/audio/voices/narrator")
    finally:
        app.extensions["csm_gguf"].engine.close()
    assert response.status_code == 409 and "this server's default voice" in response.json["error"]["message"]
    assert (voices_dir() / "narrator.npz").exists()


def test_context_segments_as_codes_and_audio(client, engine):
    codes = random_codes(8, 64, seed=3)
    wav = io.BytesIO()
    sf.write(wav, engine.tts.decode(codes), 24_000, format="WAV")
    b64 = base64.b64encode(wav.getvalue()).decode()
    segments = {
        "codes": {"speaker": 1, "text": "Earlier words.", "codes": codes.tolist()},
        "audio": {"speaker": 1, "text": "Earlier words.", "audio": b64},
        # as the `base64` command prints it, and as a data: URI
        "lines": {"speaker": 1, "text": "Earlier words.", "audio": base64.encodebytes(wav.getvalue()).decode()},
        "uri": {"speaker": 1, "text": "Earlier words.", "audio": "data:audio/wav;base64," + b64},
    }
    for kind, segment in segments.items():
        response = client.audio.speech.create(model="csm-1b", voice="alloy", input=TEXT, response_format="pcm",
                                              extra_body={**GREEDY, "context": [segment]})
        ctx_codes = codes if kind == "codes" else engine.tts.encode(sf.read(io.BytesIO(wav.getvalue()),
                                                                             dtype="float32")[0])
        expected = reference(engine, voice="alloy", context=[Segment(1, "Earlier words.", ctx_codes)], **GREEDY)
        assert_same_audio(pcm(response.content), expected)


@pytest.mark.parametrize("fmt", EVERY_FORMAT)
def test_streaming_response_every_format(client, engine, fmt):
    expected = reference(engine, voice="nova", **GREEDY)
    with client.audio.speech.with_streaming_response.create(
        model="csm-1b", voice="nova", input=TEXT, response_format=fmt, extra_body=GREEDY
    ) as response:
        assert response.headers["content-type"].startswith(MEDIA_TYPES[fmt])
        assert "content-length" not in response.headers
        data = b"".join(response.iter_bytes())
    audio = pcm(data) if fmt == "pcm" else load_audio(io.BytesIO(data))
    if fmt in ("wav", "pcm", "flac"):
        assert_same_audio(audio, expected)
    else:  # lossy: a file that decodes to sound
        assert len(audio) > 0 and np.abs(audio).max() > 0


def test_streamed_equals_whole_file(base, engine):
    body = {"model": "csm-1b", "input": TEXT, "voice": "ash", "response_format": "wav", **GREEDY}
    streamed = post(base, body)
    whole = post(base, {**body, "stream": False})
    assert whole.headers["content-length"] == str(len(whole.content))
    a, _ = sf.read(io.BytesIO(streamed.content), dtype="float32")
    b, _ = sf.read(io.BytesIO(whole.content), dtype="float32")
    np.testing.assert_allclose(a, b, atol=1 / 32768)


def test_speed_stretches_the_speech(client, engine):
    """OpenAI's `speed`: the same speech, time-stretched (csm_gguf.tempo) as it streams."""
    expected = change_speed(reference(engine, voice="fable", **GREEDY), 1.6)
    with client.audio.speech.with_streaming_response.create(
        model="tts-1", voice="fable", input=TEXT, response_format="pcm", speed=1.6, extra_body=GREEDY
    ) as response:
        audio = pcm(response.read())
    assert len(audio) == round(10 * engine.tts.codec.cfg.frame_size / 1.6)
    # The server decodes frames in the chunks they arrive in, which rounds a little differently; that
    # may move a window of the stretch, which then differs where it lies.
    close = np.abs(np.rint(audio * 32768) - to_int16(expected)) <= 1
    assert close.mean() > 0.9


def test_sse_events(client, base):
    with client.audio.speech.with_streaming_response.create(
        model="gpt-4o-mini-tts", voice="coral", input=TEXT, response_format="pcm", stream_format="sse",
        extra_body=GREEDY, instructions="Speak cheerfully.",  # accepted and ignored
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]
    assert [e["type"] for e in events[:-1]] == ["speech.audio.delta"] * (len(events) - 1)
    assert events[-1]["type"] == "speech.audio.done"
    audio = b"".join(base64.b64decode(e["audio"]) for e in events[:-1])
    plain = post(base, {"model": "csm-1b", "input": TEXT, "voice": "coral", "response_format": "pcm", **GREEDY})
    np.testing.assert_allclose(pcm(audio), pcm(plain.content), atol=1 / 32768)
    usage = events[-1]["usage"]
    assert usage["output_tokens"] == 10 and usage["total_tokens"] == usage["input_tokens"] + 10


def test_first_bytes_leave_early_and_disconnect_frees_the_slot(base, engine):
    sock = open_stream(base, {"model": "csm-1b", "input": TEXT, "response_format": "pcm", "max_audio_ms": 60_000})
    received = b""
    while b"\r\n\r\n" not in received or received.endswith(b"\r\n\r\n"):
        received += sock.recv(65536)
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"Transfer-Encoding: chunked" in head and body
    assert engine.stats()["active_streams"] == 1  # audio arrived while the request is still being generated
    hang_up(sock)  # the client goes away mid-stream
    wait_idle(engine)


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


@needs_ffmpeg
def test_an_aac_stream_whose_client_hangs_up_stops_its_ffmpeg(base, engine):
    sock = open_stream(base, {"model": "csm-1b", "input": TEXT, "response_format": "aac", "max_audio_ms": 60_000})
    received = b""
    while b"\r\n\r\n" not in received or received.endswith(b"\r\n\r\n"):
        received += sock.recv(65536)
    assert b"Content-Type: audio/aac" in received and running_ffmpeg_children() >= 1
    hang_up(sock)
    wait_idle(engine)
    ffmpeg_children_end()


def test_aac_without_ffmpeg_is_a_400_naming_it(base, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    response = post(base, {"model": "csm-1b", "input": TEXT, "response_format": "aac"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "response_format" and "AAC output needs ffmpeg, which is not on PATH" in error["message"]


def test_a_queued_client_that_hangs_up_is_dropped_before_its_turn(base, engine):
    from csm_gguf.server.engine import SpeechJob

    busy = [engine.submit(SpeechJob(TEXT, temperature=0, max_audio_ms=60_000)) for _ in range(MAX_STREAMS)]
    deadline = time.monotonic() + 10
    while engine.waiting or engine.joining:  # every slot taken by the busy jobs
        assert time.monotonic() < deadline
        time.sleep(0.01)
    sock = open_stream(base, {"model": "csm-1b", "input": TEXT, "response_format": "pcm"})
    while not engine.waiting:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    queued = engine.waiting[0]
    hang_up(sock)
    while queued in engine.waiting:  # noticed while it waits (not after its first frame) and dropped
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert queued.cancelled and queued.frames == 0 and len(engine.active) == MAX_STREAMS
    for job in busy:
        job.cancel()
    wait_idle(engine)
    assert queued.frames == 0


def test_a_whole_body_request_stops_when_its_client_hangs_up(base, engine):
    sock = open_stream(base, {"model": "csm-1b", "input": TEXT, "response_format": "wav", "stream": False,
                              "max_audio_ms": 60_000})
    deadline = time.monotonic() + 10
    while not engine.active or not engine.active[0].frames:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    job = engine.active[0]
    hang_up(sock)
    wait_idle(engine)
    assert job.cancelled and job.frames < 100  # 750 frames were allowed


# --- many clients ----------------------------------------------------------------------------------------


def test_concurrent_streams_are_batched_and_equal_solo(base, engine):
    texts = [f"Client number {i} says something {'rather ' * i}different." for i in range(8)]
    voices = ["alloy", "ash", "ballad", "coral", "echo", "fable", "onyx", "nova"]
    bodies = [{"model": "csm-1b", "input": t, "voice": v, "response_format": "pcm", **GREEDY}
              for t, v in zip(texts, voices)]

    calls = engine.generator.decode_calls
    solo = [post(base, b).content for b in bodies]
    serial_calls = engine.generator.decode_calls - calls

    results: list[bytes | None] = [None] * 8
    barrier = threading.Barrier(8)

    def run(i: int) -> None:
        barrier.wait()
        with httpx.stream("POST", f"{base}/v1/audio/speech", content=json.dumps(bodies[i]), timeout=60) as r:
            assert r.status_code == 200
            results[i] = b"".join(r.iter_bytes())

    calls = engine.generator.decode_calls
    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    batched_calls = engine.generator.decode_calls - calls
    for i in range(8):
        assert results[i] is not None and len(results[i]) == len(solo[i]) == 10 * 2 * engine.tts.codec.cfg.frame_size
        np.testing.assert_allclose(pcm(results[i]), pcm(solo[i]), atol=1 / 32768)
    print(f"decode calls: {serial_calls} one by one, {batched_calls} for 8 at once")
    assert batched_calls < serial_calls / 2
    wait_idle(engine)


def test_engine_batched_greedy_codes_equal_solo_codes(engine):
    from csm_gguf.server.engine import SpeechJob

    def codes(job) -> np.ndarray:
        frames = []
        while (got := job.next_frames(timeout=30)) is not None:
            frames += got
        return np.stack(frames)

    specs = [SpeechJob(f"Sentence {i} for the engine{'!' * i}", speaker=i, temperature=0, max_audio_ms=800)
             for i in range(8)]
    solo = [codes(engine.submit(s)) for s in specs]
    jobs = [engine.submit(s) for s in specs]
    for job, expected in zip(jobs, solo):
        np.testing.assert_array_equal(codes(job), expected)
    wait_idle(engine)


def test_a_long_prompt_is_read_between_the_frames_of_others(engine, monkeypatch):
    from csm_gguf.server import engine as server_engine
    from csm_gguf.server.engine import SpeechJob

    def codes(job) -> np.ndarray:
        frames = []
        while (got := job.next_frames(timeout=30)) is not None:
            frames += got
        return np.stack(frames)

    rows = 16
    monkeypatch.setattr(server_engine, "PREFILL_ROWS", rows)
    backbone = engine.generator.backbone
    decode, sizes = backbone.decode, []
    monkeypatch.setattr(backbone, "decode", lambda n: (sizes.append(n), decode(n))[1])

    long_prompt = SpeechJob(TEXT, context=[Segment(1, "Some context.", random_codes(150, 64, seed=3))],
                            temperature=0, max_audio_ms=800)
    solo = codes(engine.submit(long_prompt))
    speaking = engine.submit(SpeechJob(TEXT, temperature=0, max_audio_ms=60 * 80))
    speaking.next_frames(timeout=30)
    engine.forget_voice(list(long_prompt.context))  # read again, not from the prompt cache
    sizes.clear()
    joining = engine.submit(long_prompt)
    np.testing.assert_array_equal(codes(joining), solo)
    assert len(codes(speaking)) > 20  # still speaking when the other finished
    assert sum(n for n in sizes if n > 2) >= 150  # the prompt was read in this window (steps decode 1-2 rows)...
    assert max(sizes) <= rows  # ...in parts, between frames of the speaking stream
    wait_idle(engine)


def test_requests_that_arrive_together_start_together(engine):
    from csm_gguf.server.engine import SpeechJob

    with engine._wake:  # the engine thread sees all four at once
        jobs = [engine.submit(SpeechJob(f"Request {i} arrives.", temperature=0, max_audio_ms=800)) for i in range(4)]
    for job in jobs:
        while job.next_frames(timeout=30) is not None:
            pass
    assert len({job.first_frame for job in jobs}) == 1  # their first frames came from one step
    wait_idle(engine)


def test_full_queue_answers_429_and_nothing_leaks(base, engine):
    body = {"model": "csm-1b", "input": TEXT, "response_format": "pcm", "max_audio_ms": 60_000}
    socks = [open_stream(base, body) for _ in range(MAX_STREAMS + MAX_QUEUE)]
    try:
        deadline = time.monotonic() + 20
        while (len(engine.active), len(engine.waiting)) != (MAX_STREAMS, MAX_QUEUE):  # settled between frames
            assert time.monotonic() < deadline, engine.stats()
            time.sleep(0.01)
        health = httpx.get(f"{base}/health").json()
        assert (health["active_streams"], health["queue_depth"]) == (MAX_STREAMS, MAX_QUEUE)
        full = post(base, body)
        assert full.status_code == 429 and full.json()["error"]["code"] == "queue_full", full.text
        assert full.headers["retry-after"] == "1"
    finally:
        for sock in socks:
            hang_up(sock)
    wait_idle(engine, timeout=20)


def test_many_short_jobs_leave_nothing_behind(engine):
    """Jobs that finish, jobs cancelled while queued and jobs cancelled mid-speech: afterwards every slot
    is free and the engine holds no job."""
    from csm_gguf.server.engine import SpeechJob

    jobs = []
    for i in range(1000):
        while len(engine.active) + len(engine.joining) + len(engine.waiting) >= MAX_STREAMS + MAX_QUEUE:
            time.sleep(0.001)
        job = engine.submit(SpeechJob("Hi.", speaker=i % 5, max_audio_ms=80 if i % 3 else 800, seed=i))
        if i % 3 == 0:
            job.cancel()
        jobs.append(job)
    for job in jobs:
        while job.next_frames(timeout=30) is not None:
            pass
    wait_idle(engine)
    assert engine.stats()["free_slots"] == MAX_STREAMS


# --- websocket ----------------------------------------------------------------------------------------------


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


def test_websocket_request_response(base, engine):
    ws = WsClient.connect(base.replace("http", "ws") + "/v1/audio/speech/ws")
    try:
        ws.send(json.dumps({"input": TEXT, "voice": "sage", "response_format": "pcm", **GREEDY}))
        audio, done = ws_collect(ws)
        assert done["frames"] == 10 and done["sentences"] == 1 and done["bytes"] == len(audio)
        expected = reference(engine, voice="sage", **GREEDY)
        assert_same_audio(pcm(audio), expected)
        ws.send("{not json")
        assert json.loads(ws.receive(timeout=10))["error"]["code"] == "invalid_json"
        ws.send(json.dumps({"input": "", "voice": "sage"}))
        assert json.loads(ws.receive(timeout=10))["error"]["param"] == "input"
        ws.send(json.dumps({"input": "Once more."}))  # the session's settings still hold: pcm, greedy
        audio, done = ws_collect(ws)
        assert done["response_format"] == "pcm" and done["frames"] == 10
    finally:
        ws.close()


def test_websocket_text_in_pieces(base, engine):
    ws = WsClient.connect(base.replace("http", "ws") + "/v1/audio/speech/ws")
    try:
        ws.send(json.dumps({"voice": "onyx", "response_format": "wav", **GREEDY}))
        for piece in ["Hello the", "re. How are", " you to", "day? I am"]:
            ws.send(json.dumps({"type": "text", "text": piece}))
        first = ws.receive(timeout=30)  # the first sentence is spoken before the flush
        assert isinstance(first, bytes) and first.startswith(b"RIFF")
        ws.send(json.dumps({"type": "flush"}))
        audio, done = ws_collect(ws)
        assert done["sentences"] == 3 and done["frames"] == 30
        samples, _ = sf.read(io.BytesIO(first + audio), dtype="float32")
        assert len(samples) == 30 * engine.tts.codec.cfg.frame_size
    finally:
        ws.close()


def test_websocket_file_whose_sentence_failed_is_no_file(base):
    """The error, then a done with zeros, as for a flush of nothing: it used to send a bare wav header."""
    too_long = [{"speaker": 0, "text": "x", "codes": random_codes(2100, 64, 1).tolist()}]
    ws = WsClient.connect(base.replace("http", "ws") + "/v1/audio/speech/ws")
    try:
        ws.send(json.dumps({"response_format": "wav", "context": too_long, **GREEDY}))
        ws.send(json.dumps({"type": "text", "text": "This will not fit."}))
        ws.send(json.dumps({"type": "flush"}))
        assert json.loads(ws.receive(timeout=30))["error"]["code"] == "context_length_exceeded"
        audio, done = ws_collect(ws)
        assert audio == b"" and (done["sentences"], done["frames"], done["bytes"]) == (0, 0, 0)
    finally:
        ws.close()


def test_websocket_flush_of_nothing_reports_like_any_flush(base):
    ws = WsClient.connect(base.replace("http", "ws") + "/v1/audio/speech/ws")
    try:
        ws.send(json.dumps({"type": "flush"}))
        audio, done = ws_collect(ws)
        assert audio == b"" and (done["sentences"], done["frames"], done["bytes"]) == (0, 0, 0)
        assert done["usage"] == {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0}
        assert {"response_format", "sample_rate", "first_audio_ms", "elapsed_ms"} <= set(done)
    finally:
        ws.close()


def record_submits(engine, monkeypatch, refuse: int = 0) -> list[tuple[int, str]]:
    """(speaker, text) of each job submitted, from now on; the first `refuse` submits after the first one
    find the server full."""
    from csm_gguf.server.engine import QueueFull

    seen, submit, refused = [], engine.submit, []

    def spy(spec, after=None, continues=False):
        if seen and len(refused) < refuse and (after is None or after.ended):  # a follower is never refused
            refused.append(spec.text)
            raise QueueFull("the server is busy (test)")
        seen.append((spec.speaker, spec.text))
        return submit(spec, after, continues)

    monkeypatch.setattr(engine, "submit", spy)
    return seen


def record_starts(engine, monkeypatch) -> list[tuple[int, str, list[str]]]:
    """(speaker, text, its previous piece's text) of each piece the engine starts, in order, from now on."""
    seen, piece_context = [], engine.tts.piece_context

    def spy(piece, speaker, context, previous, sampling):
        seen.append((speaker, piece, [seg.text for seg in previous]))
        return piece_context(piece, speaker, context, previous, sampling)

    monkeypatch.setattr(engine.tts, "piece_context", spy)
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


@needs_ffmpeg
def test_websocket_aac_is_one_file_and_a_client_gone_stops_its_ffmpeg(base, engine):
    files = ws_session(base, [{"voice": "alloy", "response_format": "aac", **GREEDY},
                              {"type": "text", "text": "One two three. Four five."}, {"type": "flush"}], dones=1)
    (audio, done), frame = files[0], engine.tts.codec.cfg.frame_size
    assert done["frames"] == 20 and done["bytes"] == len(audio) and audio[:2] == b"\xff\xf1"
    assert 20 * frame <= len(load_audio(io.BytesIO(audio))) <= 20 * frame + 2048  # ADTS: priming, padding
    assert running_ffmpeg_children() == 0  # finished with the file
    ws = WsClient.connect(base.replace("http", "ws") + "/v1/audio/speech/ws")
    ws.send(json.dumps({"input": TEXT, "response_format": "aac", "max_audio_ms": 60_000}))
    while not isinstance(ws.receive(timeout=30), bytes):
        pass
    ws.close()
    wait_idle(engine)
    ffmpeg_children_end()


def test_websocket_flushes_sent_at_once_each_get_their_done(base, engine, monkeypatch):
    seen = record_submits(engine, monkeypatch)
    files = ws_session(base, [{"voice": "alloy", "response_format": "pcm", **GREEDY},
                              {"type": "text", "text": "One two three."}, {"type": "flush"}, {"type": "flush"},
                              {"type": "text", "text": "Four five."}, {"type": "flush"}], dones=3)
    assert [(done["sentences"], done["frames"]) for _, done in files] == [(1, 10), (0, 0), (1, 10)]
    frame_bytes = 2 * engine.tts.codec.cfg.frame_size  # pcm: 16-bit samples
    assert [len(audio) for audio, _ in files] == [10 * frame_bytes, 0, 10 * frame_bytes]
    assert [text for _, text in seen] == ["One two three.", "Four five."]


def test_websocket_speed_applies_from_its_sentence_on(base, engine):
    files = ws_session(base, [{"voice": "alloy", "response_format": "pcm", **GREEDY},
                              {"type": "text", "text": "One two three. Four"},  # the first is complete
                              {"type": "speech", "speed": 2},
                              {"type": "text", "text": " five."}, {"type": "flush"}], dones=1)
    (audio, done), frame = files[0], engine.tts.codec.cfg.frame_size
    assert done["frames"] == 20 and done["bytes"] == len(audio)
    # 10 frames as spoken, then 10 at double speed, through one stretch from the change to the end
    assert len(audio) == 2 * round(10 * frame + 10 * frame / 2)
    assert done["audio_seconds"] == round(len(audio) / 2 / 24_000, 3)


def test_websocket_bad_messages_are_answered_and_the_session_goes_on(base, engine, monkeypatch):
    ws = WsClient.connect(base.replace("http", "ws") + "/v1/audio/speech/ws")
    try:
        ws.send(json.dumps({"type": "speech", "speed": 10**400}))  # an OverflowError closed the connection
        assert json.loads(ws.receive(timeout=10))["error"]["param"] == "speed"
        with monkeypatch.context() as m:
            m.setattr(WebsocketSession, "add_text", lambda *a: 1 / 0)  # any bug of ours in a message
            ws.send(json.dumps({"type": "text", "text": "Hi."}))
            error = json.loads(ws.receive(timeout=10))["error"]
        assert error["type"] == "server_error" and "division by zero" in error["message"]
        ws.send(json.dumps({"input": TEXT, "response_format": "pcm", **GREEDY}))
        audio, done = ws_collect(ws)
        assert done["frames"] == 10 and len(audio) == done["bytes"] > 0
    finally:
        ws.close()


def test_websocket_text_without_sentence_ends_is_cut_between_words(base, engine, monkeypatch):
    seen = record_submits(engine, monkeypatch)
    ws = WsClient.connect(base.replace("http", "ws") + "/v1/audio/speech/ws")
    try:
        ws.send(json.dumps({"voice": "alloy", "response_format": "pcm", **GREEDY}))
        ws.send(json.dumps({"type": "text", "text": " " * 5000}))  # blank: waits for words, no error
        ws.send(json.dumps({"type": "text", "text": "word " * 1000}))
        ws.send(json.dumps({"type": "flush"}))
        error = json.loads(ws.receive(timeout=30))["error"]
        assert error["code"] == "string_above_max_length"
        audio, done = ws_collect(ws)
    finally:
        ws.close()
    texts = [text for _, text in seen]
    assert done["sentences"] == 2 and len(texts) == 2
    assert " ".join(" ".join(texts).split()) == " ".join(["word"] * 1000)  # every word, once, in order


def test_websocket_voice_change_mid_sentence_starts_afresh(base, engine, monkeypatch):
    """A sentence takes the settings in force when it is complete (when the next one starts); the previous
    sentence prompts the next only in the same voice (a format change keeps the voice, and ends the file
    being sent)."""
    seen = record_starts(engine, monkeypatch)
    files = ws_session(base, [{"voice": "alloy", "response_format": "pcm", **GREEDY},
                              {"type": "text", "text": "First sentence is spoken now. Sec"},
                              {"voice": "echo"}, {"type": "text", "text": "ond one is here. "},
                              {"response_format": "wav"}, {"type": "text", "text": "Third in wav."},
                              {"type": "flush"}], dones=2)
    assert seen == [(0, "First sentence is spoken now.", []), (4, "Second one is here.", []),
                    (4, "Third in wav.", ["Second one is here."])]
    (pcm_audio, first), (wav_audio, second) = files
    assert (first["response_format"], first["sentences"]) == ("pcm", 1) and not pcm_audio.startswith(b"RIFF")
    assert (second["response_format"], second["sentences"]) == ("wav", 2) and wav_audio.startswith(b"RIFF")


def test_websocket_input_after_pending_text_keeps_each_ones_settings(base, engine, monkeypatch):
    seen = record_submits(engine, monkeypatch)
    files = ws_session(base, [{"voice": "alloy", "response_format": "pcm", **GREEDY},
                              {"type": "text", "text": "Hello there. How are"},
                              {"input": "Brand new request.", "voice": "echo", "response_format": "wav"}], dones=2)
    assert seen == [(0, "Hello there."), (0, "How are"), (4, "Brand new request.")]
    assert [done["response_format"] for _, done in files] == ["pcm", "wav"]
    assert files[1][0].startswith(b"RIFF")


def test_websocket_waits_for_a_full_server_instead_of_dropping_sentences(base, engine, monkeypatch):
    seen = record_submits(engine, monkeypatch, refuse=3)
    ws = WsClient.connect(base.replace("http", "ws") + "/v1/audio/speech/ws")
    try:
        ws.send(json.dumps({"voice": "alloy", "response_format": "pcm", **GREEDY}))
        ws.send(json.dumps({"type": "text", "text": "One. Two"}))
        first = ws.receive(timeout=30)
        wait_idle(engine)  # "Two." comes after "One." ended: it queues like any request (and is refused)
        for m in [{"type": "text", "text": ". Three."}, {"type": "flush"}]:
            ws.send(json.dumps(m))
        audio, done = ws_collect(ws)  # an error message here would fail ws_collect
    finally:
        ws.close()
    assert [text for _, text in seen] == ["One.", "Two.", "Three."]
    assert done["sentences"] == 3 and len(first + audio) == 2 * done["frames"] * engine.tts.codec.cfg.frame_size


def session_on_a_full_server(base, engine, monkeypatch, first: str, later: str) -> tuple[list[str], dict]:
    """A session sends `first` while every other slot is busy with a long request, so its first sentence
    takes the last slot; then another client's request arrives and waits; then the session sends `later`
    and a flush. Returns the pieces in the order the engine started them, and the session's done."""
    from csm_gguf.server.engine import SpeechJob

    others = [engine.submit(SpeechJob(f"Filler number {i}.", temperature=0, max_audio_ms=60_000))
              for i in range(MAX_STREAMS - 1)]
    starts = record_starts(engine, monkeypatch)
    ws = WsClient.connect(base.replace("http", "ws") + "/v1/audio/speech/ws")
    try:
        ws.send(json.dumps({"voice": "alloy", "response_format": "pcm", "temperature": 0, "max_audio_ms": 2400}))
        ws.send(json.dumps({"type": "text", "text": first}))
        assert isinstance(ws.receive(timeout=30), bytes)  # the first sentence has the last free slot
        others.append(engine.submit(SpeechJob("Another client.", temperature=0, max_audio_ms=800)))  # waits
        ws.send(json.dumps({"type": "text", "text": later}))
        ws.send(json.dumps({"type": "flush"}))
        _, done = ws_collect(ws)
    finally:
        ws.close()
        for job in others:
            job.cancel()
    wait_idle(engine)
    return starts, done


def test_websocket_next_sentence_takes_over_its_slot_on_a_full_server(base, engine, monkeypatch):
    """A sentence complete while the one before it is spoken takes over its slot when it ends: queued
    behind requests that came meanwhile, it would leave a gap in the session's audio."""
    starts, done = session_on_a_full_server(base, engine, monkeypatch, "One is first. Two is next. And", "")
    order = [text for _, text, _ in starts]
    assert order.index("Two is next.") < order.index("Another client.")
    assert starts[order.index("Two is next.")] == (0, "Two is next.", ["One is first."])
    assert done["sentences"] == 3 and done["frames"] == 90


def test_websocket_next_sentence_does_not_overtake_requests_that_came_before_it(base, engine, monkeypatch):
    """A request that waits since before the session's next sentence was complete goes first: following
    sentences must not keep a slot from the queue as long as a session sends text."""
    starts, done = session_on_a_full_server(base, engine, monkeypatch, "One is first. Two is", " next. And")
    order = [text for _, text, _ in starts]
    assert order.index("Another client.") < order.index("Two is next.")
    assert done["sentences"] == 3


def test_engine_closing_ends_a_following_request_with_the_shutdown_error(f32_model, monkeypatch):
    """close() landing while the request before it makes its last frame: the follower used to end as a
    success with no audio, and a request submitted after close() waited forever."""
    from csm_gguf.server.engine import Engine, SpeechJob
    from csm_gguf.tts import CSM

    tts = CSM(f32_model, kv_type="f32", max_streams=1)
    engine = Engine(tts)
    attached, step = threading.Event(), engine.generator.step

    def closing_step(streams):
        attached.wait(10)
        with engine._wake:  # what close() does first, here in the middle of the frame
            engine._closing = True
        return step(streams)

    monkeypatch.setattr(engine.generator, "step", closing_step)
    try:
        first = engine.submit(SpeechJob("One.", temperature=0, max_audio_ms=80))
        second = engine.submit(SpeechJob("Two.", temperature=0), after=first)
        attached.set()
        assert len(first.next_frames(timeout=10)) == 1 and first.next_frames(timeout=10) is None
        with pytest.raises(RuntimeError, match="shutting down"):
            second.next_frames(timeout=10)
        with pytest.raises(RuntimeError, match="shutting down"):
            engine.submit(SpeechJob("Three."))
    finally:
        engine.close()
        tts.close()


def test_websocket_reset_while_sending_ends_the_session_quietly(engine):
    """A connection reset surfaces as OSError from send(), not ConnectionClosed: it used to escape the
    session and be logged as an unexpected server error."""
    from csm_gguf.server.schemas import parse_speech
    from csm_gguf.server.ws_session import WebsocketSession

    class ResetSocket:
        messages = [json.dumps({"response_format": "pcm", "max_audio_ms": 60_000}),
                    json.dumps({"type": "text", "text": "A first sentence. A second one. And"})]

        def receive(self, timeout=None):
            return self.messages.pop(0) if self.messages else None

        def send(self, data):
            raise BrokenPipeError(32, "Broken pipe")

    def parse(body, need_input=True):
        return parse_speech(body, engine.tts, "alloy", need_input)

    def submit(req, after=None, continues=False):
        return engine.submit(req.job, after, continues)

    WebsocketSession(ResetSocket(), engine.tts.codec, parse, submit).run()  # returns: the client is gone
    wait_idle(engine)  # and both sentences were cancelled


def test_waiting_followers_do_not_fill_the_queue_against_new_requests(f32_model):
    """Sessions that keep talking keep their next sentences in the queue: if those counted against its size,
    every new request would be refused for as long as the sessions talk."""
    from csm_gguf.server.engine import Engine, SpeechJob
    from csm_gguf.tts import CSM

    tts = CSM(f32_model, kv_type="f32", max_streams=1)
    engine = Engine(tts, max_queue=1)
    long = dict(temperature=0, max_audio_ms=60_000)
    jobs = []
    try:
        jobs.append(first := engine.submit(SpeechJob("One.", **long)))
        jobs.append(other := engine.submit(SpeechJob("Another client.", **long)))  # the queue is full
        jobs.append(follower := engine.submit(SpeechJob("Two.", **long), after=first))
        first.cancel()  # "Two." joins the queue behind "Another client.", which takes the slot
        deadline = time.monotonic() + 10
        while not ([j is other for j in engine.active] == [True] and [*engine.waiting] == [follower]):
            assert time.monotonic() < deadline, engine.stats()
            time.sleep(0.01)
        jobs.append(late := engine.submit(SpeechJob("Three.", **long)))  # it was refused: the server is busy
        assert [*engine.waiting] == [follower, late]
    finally:
        for job in jobs:
            job.cancel()
        engine.close()
        tts.close()


def test_websocket_disconnect_mid_stream(base, engine):
    ws = WsClient.connect(base.replace("http", "ws") + "/v1/audio/speech/ws")
    ws.send(json.dumps({"input": TEXT, "response_format": "pcm", "max_audio_ms": 60_000}))
    assert isinstance(ws.receive(timeout=30), bytes)
    assert engine.stats()["active_streams"] == 1
    ws.close()
    wait_idle(engine)


def test_websocket_disconnect_cancels_the_sentence_waiting_to_follow(base, engine):
    ws = WsClient.connect(base.replace("http", "ws") + "/v1/audio/speech/ws")
    ws.send(json.dumps({"response_format": "pcm", "max_audio_ms": 60_000}))
    ws.send(json.dumps({"type": "text", "text": "A first sentence. A second one. And"}))
    assert isinstance(ws.receive(timeout=30), bytes)
    assert engine.stats()["active_streams"] == 1 and engine.active[0].successor is not None
    ws.close()
    wait_idle(engine)  # the second sentence did not start in the first one's slot


# --- the other endpoints and errors --------------------------------------------------------------------------


def test_models_voices_health(client, base):
    assert "csm-1b" in [m.id for m in client.models.list()]
    voices = httpx.get(f"{base}/v1/audio/voices").json()
    assert voices["default"] == "alloy"
    assert {v["id"]: v["speaker_id"] for v in voices["voices"]}["cedar"] == 12
    alloy = {v["id"]: v for v in voices["voices"]}["alloy"]  # the default voice: its prompt made at start
    assert alloy["type"] == "builtin" and alloy["prompt"]["transcript"] == builtin_voices.SENTENCE
    assert alloy["prompt"]["frames"] > 0 and alloy["prompt"]["seconds"] == pytest.approx(alloy["prompt"]["frames"] * 0.08)
    health = httpx.get(f"{base}/health").json()
    assert health["model_loaded"] and health["queue_depth"] == 0 and health["max_streams"] == MAX_STREAMS
    page = httpx.get(f"{base}/").text
    assert "CSM_GGUF_MAX_STREAMS" in page and "<td>8</td>" in page and "/v1/audio/speech" in page


def test_settings_from_environment(monkeypatch):
    from csm_gguf.server.settings import Settings

    monkeypatch.setenv("CSM_GGUF_MAX_STREAMS", "6")
    monkeypatch.setenv("CSM_GGUF_GPU_LAYERS", "-1")
    monkeypatch.setenv("CSM_GGUF_VOICE", "cedar")
    monkeypatch.setenv("CSM_GGUF_API_KEY", "k")
    assert Settings.from_env() == Settings(max_streams=6, gpu_layers=-1, voice="cedar", api_key="k")
    monkeypatch.setenv("CSM_GGUF_QUEUE", "many")
    with pytest.raises(ValueError, match="CSM_GGUF_QUEUE must be a whole number"):
        Settings.from_env()


OK = {"model": "csm-1b", "input": TEXT, "voice": "alloy"}


@pytest.mark.parametrize("body, param, code", [
    (b"{not json", None, "invalid_json"),
    ([1, 2], None, "invalid_json"),
    ({"model": "csm-1b", "voice": "alloy"}, "input", "missing_required_parameter"),
    ({**OK, "input": "   "}, "input", "invalid_value"),
    ({**OK, "input": "\u200b\ufeff \u200d"}, "input", "invalid_value"),  # only invisible characters
    ({**OK, "input": "caf\ud800"}, "input", "invalid_value"),  # a lone surrogate: not Unicode text
    ({**OK, "input": "a" * 4097}, "input", "string_above_max_length"),
    ({**OK, "input": 5}, "input", "invalid_value"),
    ({**OK, "model": "whisper-1"}, "model", "model_not_found"),
    ({"input": TEXT, "voice": "alloy"}, "model", "missing_required_parameter"),
    ({**OK, "voice": "nobody"}, "voice", "voice_not_found"),
    ({**OK, "voice": {"id": "nobody"}}, "voice", "voice_not_found"),
    ({**OK, "response_format": "ogg"}, "response_format", "unsupported_value"),
    ({**OK, "stream_format": "json"}, "stream_format", "invalid_value"),
    ({**OK, "speed": 0.2}, "speed", "out_of_range"),
    ({**OK, "speed": 10**400}, "speed", "out_of_range"),  # JSON numbers have any number of digits
    ({**OK, "temperature": -(10**400)}, "temperature", "out_of_range"),
    ({**OK, "speed": "fast"}, "speed", "invalid_value"),
    ({**OK, "speed": 9}, "speed", "out_of_range"),
    ({**OK, "temperature": -1}, "temperature", "out_of_range"),
    ({**OK, "temperature": "hot"}, "temperature", "invalid_value"),
    ({**OK, "top_k": 0}, "top_k", "out_of_range"),
    ({**OK, "top_k": 2.5}, "top_k", "invalid_value"),
    ({**OK, "seed": -3}, "seed", "out_of_range"),
    ({**OK, "max_audio_ms": 0}, "max_audio_ms", "out_of_range"),
    ({**OK, "speaker_id": True}, "speaker_id", "invalid_value"),
    ({**OK, "instructions": "x" * 4097}, "instructions", "invalid_value"),
    ({**OK, "context": {"a": 1}}, "context", "invalid_value"),
    ({**OK, "context": [{"speaker": 0, "text": "hi"}]}, "context[0]", "invalid_value"),
    ({**OK, "context": [{"speaker": 0, "text": "hi", "codes": [[1] * 31]}]}, "context[0].codes", "invalid_value"),
    ({**OK, "context": [{"speaker": 0, "text": "hi", "codes": [[99] * 32]}]}, "context[0].codes", "invalid_value"),
    ({**OK, "context": [{"speaker": 0, "text": "hi", "audio": "!!"}]}, "context[0].audio", "invalid_value"),
    ({**OK, "context": [{"speaker": 0, "text": "hi", "audio": "aGVsbG8="}]}, "context[0].audio", "invalid_value"),
    ({**OK, "context": [{"speaker": 0, "text": "hi", "audio": LONG_WAV}]}, "context[0].audio", "invalid_value"),
    ({**OK, "context": [{"speaker": 0, "text": "x", "codes": random_codes(2100, 64, 1).tolist()}]}, "context",
     "context_length_exceeded"),
    ({**OK, "colour": "blue"}, "colour", "unknown_parameter"),
])
def test_bad_requests_get_400_in_openai_shape(base, body, param, code):
    response = post(base, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert (error["param"], error["code"], error["type"]) == (param, code, "invalid_request_error")


def test_api_key(server, client, base):
    app = server[0]
    app.config["API_KEY"] = "secret"
    try:
        with pytest.raises(openai.AuthenticationError) as e:
            client.audio.speech.create(model="csm-1b", voice="alloy", input=TEXT)
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
        ok = openai.OpenAI(base_url=f"{base}/v1", api_key="secret", max_retries=0)
        assert len(ok.audio.speech.create(model="csm-1b", voice="alloy", input="Hi.", response_format="pcm",
                                          extra_body=GREEDY).content) > 0
        assert httpx.get(f"{base}/health").status_code == 200  # health checks need no key
        lower = post(base, {"model": "csm-1b", "input": "Hi.", **GREEDY}, headers={"Authorization": "bearer secret"})
        assert lower.status_code == 200  # the scheme's case does not matter (RFC 9110)
        assert httpx.get(f"{base}/v1/models?api_key=secret").status_code == 401  # a key in a URL: websockets only
        ws = WsClient.connect(base.replace("http", "ws") + "/v1/audio/speech/ws?api_key=secret")
        try:
            ws.send(json.dumps({"input": "Hi.", "response_format": "pcm", **GREEDY}))
            audio, done = ws_collect(ws)
            assert done["frames"] == 10 and len(audio) > 0
        finally:
            ws.close()
    finally:
        app.config["API_KEY"] = None


def test_unknown_routes_and_methods_answer_in_openai_shape(base):
    for response in (httpx.get(f"{base}/v1/nothing"), httpx.get(f"{base}/v1/audio/speech")):
        assert response.status_code in (404, 405) and set(response.json()["error"]) == {"message", "type", "param",
                                                                                         "code"}


VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-10, 10**7), st.floats(allow_nan=True), st.text(max_size=8),
    st.lists(st.integers(-2, 70), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
BODIES = st.one_of(
    # always a max_audio_ms, never a valid one above two frames: accepted requests must not keep the test waiting
    st.fixed_dictionaries({"max_audio_ms": st.sampled_from([80, 160.5]) | st.integers(-10, 0)
                           | st.integers(600_001, 10**8) | st.text()}, optional={
        "model": st.sampled_from(["csm-1b", "tts-1", "x"]) | VALUES,
        "input": st.text(max_size=30) | VALUES,
        "voice": st.sampled_from(["alloy", "narrator", "zzz"]) | VALUES,
        "response_format": st.sampled_from([*FORMATS, "aac"]) | VALUES,
        "stream_format": st.sampled_from(["audio", "sse"]) | VALUES,
        "speed": st.sampled_from([1, 1.0, 0.5]) | VALUES,
        "temperature": VALUES, "top_k": VALUES, "seed": VALUES, "speaker_id": VALUES, "stream": VALUES,
        "instructions": VALUES,
        "context": st.lists(st.dictionaries(st.sampled_from(["speaker", "text", "codes", "audio"]), VALUES,
                                            max_size=4), max_size=2) | VALUES,
    }),
    VALUES,
)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=BODIES)
def test_fuzzed_bodies_never_get_500(base, body):
    content = json.dumps(body, allow_nan=True)
    with httpx.stream("POST", f"{base}/v1/audio/speech", content=content, timeout=60) as response:
        assert response.status_code < 500, response.read()
        if response.status_code >= 400:
            response.read()
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}
        # a request that was accepted: hang up after its status (the slot is freed within a frame)


# --- the web page in a real browser ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    import shutil

    webdriver = pytest.importorskip("selenium.webdriver")
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("Chromium is not installed (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
                 "--autoplay-policy=no-user-gesture-required",
                 "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",  # a microphone that beeps
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(flag)
    browser = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))
    yield browser
    browser.quit()


@pytest.mark.parametrize("fmt", ["pcm", "mp3"])
def test_web_page_speaks_in_chromium(browser, base, engine, fmt):
    from selenium.webdriver.support.ui import Select, WebDriverWait

    browser.get(base + "/")
    wait = WebDriverWait(browser, 30)
    wait.until(lambda b: len(Select(b.find_element("id", "voice")).options) >= 13)
    text = browser.find_element("id", "text")
    text.clear()
    text.send_keys("Hi there.")
    Select(browser.find_element("id", "voice")).select_by_value("fable")
    Select(browser.find_element("id", "format")).select_by_value(fmt)
    speed = browser.find_element("id", "speed")
    speed.clear()
    speed.send_keys("2" if fmt == "pcm" else "1")
    browser.find_element("id", "speak").click()
    result = wait.until(lambda b: b.execute_script("return window.lastResult && window.lastResult.done "
                                                   "|| (window.lastResult && window.lastResult.error) ? "
                                                   "window.lastResult : null"))
    assert result["error"] is None and result["bytes"] > 0 and result["firstAudioMs"] is not None
    if fmt == "pcm":  # the tiny model makes 25 frames for so short a text (its minimum budget)
        assert result["bytes"] == 25 * 2 * engine.tts.codec.cfg.frame_size // 2  # at speed 2
    assert "done" in browser.find_element("id", "status").text
    wait_idle(engine)


def save_voice_in_page(browser, name: str, transcript: str) -> str:
    from selenium.webdriver.support.ui import WebDriverWait

    for field, value in (("voice-name", name), ("voice-text", transcript)):
        browser.find_element("id", field).clear()
        browser.find_element("id", field).send_keys(value)
    browser.execute_script("window.lastVoice = null")
    browser.find_element("id", "save-voice").click()
    return WebDriverWait(browser, 60).until(lambda b: b.execute_script("return window.lastVoice"))


def test_web_page_adds_a_voice_from_a_file_and_from_the_microphone(browser, base, engine, tmp_path, monkeypatch):
    from selenium.webdriver.support.ui import Select, WebDriverWait

    from csm_gguf.voices import load_voice

    monkeypatch.setenv("PATH", str(tmp_path))  # no ffmpeg for the server: the page sends WAV (the browser runs)
    frame = engine.tts.codec.cfg.frame_size
    stereo = tmp_path / "stereo48k.wav"  # the page sends 24 kHz mono
    sf.write(stereo, np.stack([np.sin(np.arange(96_000) / 9), np.zeros(96_000)], axis=1).astype(np.float32), 48_000)
    long = tmp_path / "long.wav"
    sf.write(long, np.zeros(70 * 8000, np.int16), 8000)
    browser.get(base + "/")
    wait = WebDriverWait(browser, 30)
    wait.until(lambda b: len(Select(b.find_element("id", "voice")).options) >= 13)
    browser.find_element("id", "voice-file").send_keys(str(long))
    assert save_voice_in_page(browser, "long", "Words.") == "error: long.wav is 70 s long: a voice needs 5 to 30 s " \
                                                             "(at most 60); cut it"
    browser.find_element("id", "voice-file").send_keys(str(stereo))
    assert browser.find_element("id", "voice-sample").text == "sample: stereo48k.wav"
    assert save_voice_in_page(browser, "from-file", "Words from a file.") == "saved voice from-file"
    assert Select(browser.find_element("id", "voice")).first_selected_option.get_attribute("value") == "from-file"
    (segment,) = load_voice("from-file").segments
    assert segment.text == "Words from a file." and abs(len(segment.codes) - 2 * SAMPLE_RATE // frame) <= 1
    assert save_voice_in_page(browser, "from-file", "Again.").startswith("error: there is a voice named from-file")

    browser.find_element("id", "record").click()
    wait.until(lambda b: b.find_element("id", "voice-status").text == "recording…")
    assert not browser.find_element("id", "save-voice").is_enabled()  # until the recording stops
    time.sleep(1.5)
    browser.find_element("id", "record").click()
    wait.until(lambda b: b.find_element("id", "voice-status").text.startswith("recorded"))
    assert browser.find_element("id", "voice-sample").text.startswith("sample: recording-")
    assert save_voice_in_page(browser, "from-mic", "Beep beep.") == "saved voice from-mic"
    assert len(load_voice("from-mic").segments[0].codes) > SAMPLE_RATE // frame  # over a second
    assert save_voice_in_page(browser, "", "No name.").startswith("error: 'name' is required")

    for name in ("from-file", "from-mic"):  # deleted from the page
        Select(browser.find_element("id", "voice")).select_by_value(name)
        browser.find_element("id", "delete-voice").click()
        browser.switch_to.alert.accept()
        wait.until(lambda b: b.find_element("id", "status").text == f"deleted voice {name}")
    assert not {"from-file", "from-mic"} & set(load_voice_names(base))
    Select(browser.find_element("id", "voice")).select_by_value("alloy")
    assert not browser.find_element("id", "delete-voice").is_enabled()  # built-in


def load_voice_names(base: str) -> list[str]:
    return [v["id"] for v in httpx.get(f"{base}/v1/audio/voices").json()["voices"]]
