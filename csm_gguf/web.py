"""The OpenAI-compatible speech server.

    flask --app csm_gguf.web run                                       # development
    gunicorn -w 1 --threads 32 -b 0.0.0.0:8000 'csm_gguf.web:create_app()'   # production

One worker process: it holds the model and batches every request it serves; threads carry the
concurrent HTTP streams and websockets. Settings come from the environment (see SETTINGS).
"""

from __future__ import annotations

import base64
import hmac
import json
import logging
import os
import queue
import select
import socket
import time
from collections import deque
from dataclasses import dataclass, field, fields, replace
from importlib import resources
from typing import Any, Callable, Iterator

import numpy as np
from flask import Flask, Response, jsonify, render_template_string, request, stream_with_context
from flask_sock import Sock
from simple_websocket import ConnectionClosed
from werkzeug.exceptions import HTTPException

from . import ffmpeg
from .audio import MEDIA_TYPES, SAMPLE_RATE, StreamEncoder, encode_audio
from .generator import PromptTooLong
from .server_engine import Engine, Job, QueueFull
from .speech_request import (MAX_INPUT_CHARS, MAX_SPEECH_REQUEST, MAX_VOICE_UPLOAD, MODELS, ApiError,
                             SpeechRequest, parse_speech, parse_voice, voice_exists, voice_names)
from .tempo import TimeStretch, stretched
from .text import cut_between_words, is_blank, take_sentences
from .tts import CSM, decode_frames
from .voices import (BUILTIN_VOICES, VoiceExists, VoicesFolderError, delete_voice, list_voices, load_voice,
                     save_voice)

log = logging.getLogger(__name__)
WEBSOCKET_PATH = "/v1/audio/speech/ws"

# (environment variable, Settings field, what it sets)
SETTINGS = (
    ("CSM_GGUF_MODEL", "model", "converted model directory (default: the converted model in the cache, as for say)"),
    ("CSM_GGUF_THREADS", "threads", "CPU threads for llama.cpp (default 0: all cores; the codec decodes each "
                                    "request on one thread, in that request's thread)"),
    ("CSM_GGUF_GPU_LAYERS", "gpu_layers", "layers offloaded to the GPU (default 0; -1: all)"),
    ("CSM_GGUF_KV_TYPE", "kv_type", "KV cache type: f16 (default), f32, q8_0"),
    ("CSM_GGUF_CODEC_DEVICE", "codec_device", "torch device of the Mimi codec: cpu (default), cuda"),
    ("CSM_GGUF_API_KEY", "api_key", "if set, requests need 'Authorization: Bearer <key>'"),
    ("CSM_GGUF_MAX_STREAMS", "max_streams", "requests generated together in one batch (default 4)"),
    ("CSM_GGUF_QUEUE", "max_queue", "requests that may wait for a free stream before 429 (default 16)"),
    ("CSM_GGUF_VOICE", "voice", "voice used when a request names none (default alloy)"),
)


@dataclass(frozen=True)
class Settings:
    model: str | None = None
    threads: int = 0
    gpu_layers: int = 0
    kv_type: str = "f16"
    codec_device: str = "cpu"
    api_key: str | None = None
    max_streams: int = 4
    max_queue: int = 16
    voice: str = "alloy"

    @classmethod
    def from_env(cls) -> Settings:
        values: dict[str, Any] = {}
        types = {f.name: f.type for f in fields(cls)}
        for var, name, _ in SETTINGS:
            raw = os.environ.get(var)
            if raw:
                try:
                    values[name] = int(raw) if types[name] == "int" else raw
                except ValueError:
                    raise ValueError(f"{var} must be a whole number, got {raw!r}") from None
        return cls(**values)


def create_app(**overrides: Any) -> Flask:
    """The app, its model loaded; keyword arguments override the environment (see Settings)."""
    settings = replace(Settings.from_env(), **overrides)
    if settings.max_streams < 1 or settings.max_queue < 0:
        raise ValueError("CSM_GGUF_MAX_STREAMS must be >= 1 and CSM_GGUF_QUEUE >= 0")
    if settings.voice not in voice_names():
        raise ValueError(f"CSM_GGUF_VOICE={settings.voice!r} is not a voice; known: {', '.join(voice_names())}")
    load_voice(settings.voice)  # a damaged one fails now, not in every request that names no voice
    tts = CSM(settings.model, settings.threads, settings.gpu_layers, settings.kv_type, settings.max_streams,
              settings.codec_device)
    # Each request thread decodes its own audio while llama.cpp's threads run the engine: one torch
    # thread per decode keeps them from oversubscribing the cores (which slows small ops ~100x). And
    # set before any torch work: torch and ggml share one OpenMP runtime, and once this thread has run
    # parallel work with it (building the codec with two threads did), the engine thread's frames took
    # 45% longer.
    import torch

    torch.set_num_threads(1)
    codec = tts.codec  # loaded now, not racing in the first requests' threads
    codec.warm_up(codebooks=tts.model.config.num_codebooks)  # the CPU traces are made now, not in requests
    engine = Engine(tts, settings.max_queue)
    created = int(os.path.getmtime(tts.model.backbone_path))

    app = Flask(__name__)
    app.extensions["csm"] = engine
    app.config["API_KEY"] = settings.api_key
    app.config["MAX_CONTENT_LENGTH"] = MAX_SPEECH_REQUEST
    app.config["SOCK_SERVER_OPTIONS"] = {"max_message_size": MAX_SPEECH_REQUEST}  # closes with 1009 beyond
    sock = Sock(app)

    def parse(body: Any, need_input: bool = True) -> SpeechRequest:
        return parse_speech(body, tts, settings.voice, need_input)

    def submit(req: SpeechRequest, after: Job | None = None, continues: bool = False) -> Job:
        try:
            return engine.submit(req.job, after, continues)
        except QueueFull as e:
            raise ApiError(429, str(e), code="queue_full", type="rate_limit_error") from None

    # --- errors ---------------------------------------------------------------------------------------
    @app.errorhandler(ApiError)
    def api_error(e: ApiError):
        response = jsonify(e.body())
        response.status_code = e.status
        if e.status == 429:
            response.headers["Retry-After"] = "1"
        return response

    @app.errorhandler(HTTPException)
    def http_error(e: HTTPException):
        message = e.description or e.name
        if e.code == 413:
            message = (f"a voice upload is at most {MAX_VOICE_UPLOAD >> 20} MiB: send a shorter or compressed "
                       "recording (5 to 30 s is plenty)" if request.path == "/v1/audio/voices" else
                       f"a request is at most {MAX_SPEECH_REQUEST >> 20} MiB: send shorter context audio")
        return api_error(ApiError(e.code or 500, message, code=e.name.lower().replace(" ", "_")))

    @app.errorhandler(Exception)
    def server_error(e: Exception):
        log.exception("unexpected error")
        return api_error(ApiError(500, f"internal error: {e}", type="server_error"))

    @app.before_request
    def check_key():
        key = app.config["API_KEY"]
        if key and request.path.startswith("/v1/"):
            scheme, _, token = request.headers.get("Authorization", "").partition(" ")
            given = token.strip() if scheme.lower() == "bearer" else ""  # auth schemes ignore case
            if request.path == WEBSOCKET_PATH:  # browsers cannot set websocket headers; elsewhere a key in the
                given = given or request.args.get("api_key", "")  # URL would only end up in access logs
            if not hmac.compare_digest(given.encode(), key.encode()):
                raise ApiError(401, "invalid or missing API key: send 'Authorization: Bearer <key>'",
                               code="invalid_api_key")

    # --- endpoints --------------------------------------------------------------------------------------
    @app.get("/")
    def index():
        page = resources.files("csm_gguf").joinpath("static/index.html").read_text()
        key_needed = bool(app.config["API_KEY"])
        shown = {name: getattr(settings, name) for _, name, _ in SETTINGS}
        shown.update(model=str(tts.model.path), api_key="(set)" if key_needed else "(none)")
        env = [(var, shown[name], doc) for var, name, doc in SETTINGS]
        return render_template_string(page, env=env, default_voice=settings.voice, key_needed=key_needed,
                                      aac=ffmpeg.find() is not None)

    @app.get("/health")
    def health():
        return {"status": "ok", "model_loaded": True, "model": str(tts.model.path), **engine.stats()}

    @app.get("/v1/models")
    def models():
        return {"object": "list",
                "data": [{"id": m, "object": "model", "created": created, "owned_by": "sesame"} for m in MODELS]}

    @app.get("/v1/audio/voices")
    def voice_list():
        return {"voices": [
            {"id": name, "name": name, "type": "builtin" if name in BUILTIN_VOICES else "saved",
             "speaker_id": speaker_of(name)} for name in voice_names()
        ], "default": settings.voice}

    @app.post("/v1/audio/voices")
    def add_voice():
        if request.mimetype != "multipart/form-data":
            raise ApiError(400, "send the voice as multipart/form-data: name, audio_sample (the recording, as a "
                           "file) and transcript (its words)", code="invalid_request")
        request.max_content_length = MAX_VOICE_UPLOAD
        name, voice = parse_voice(request.form, request.files, tts)
        try:
            save_voice(name, voice)
        except VoiceExists:  # saved meanwhile, by another request or program
            raise voice_exists(name) from None
        except VoicesFolderError as e:  # the server's setup, not the request
            raise ApiError(500, str(e), type="server_error") from None
        return {"id": name, "object": "audio.voice", "name": name, "created_at": int(time.time()),
                "type": "audio_sample"}

    @app.delete("/v1/audio/voices/<name>")
    def remove_voice(name: str):
        if name == settings.voice and name not in BUILTIN_VOICES:
            raise ApiError(409, f"{name!r} is this server's default voice (CSM_GGUF_VOICE): it cannot be deleted "
                           "while the server runs", param="voice_id", code="voice_in_use")
        try:
            deleted = delete_voice(name)
        except VoicesFolderError as e:  # the file would not go: the server's setup
            raise ApiError(500, str(e), type="server_error") from None
        except ValueError as e:  # a built-in voice
            raise ApiError(400, str(e), param="voice_id") from None
        if not deleted:
            raise ApiError(404, f"no saved voice {name!r}; saved: {', '.join(list_voices()) or 'none'}",
                           param="voice_id", code="voice_not_found")
        return {"id": name, "object": "audio.voice", "deleted": True}

    @app.post("/v1/audio/speech")
    def speech():
        try:
            body = json.loads(request.get_data())
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
        req = parse(body)
        job = submit(req)
        environ = request.environ
        try:
            first = next_frames(job, environ)  # a request that cannot start fails here, with a proper status
        except ClientGone:
            job.cancel()
            return Response(status=499)  # nginx's "client closed request": nobody reads it
        except Exception as e:
            job.cancel()
            raise generation_error(e) from None
        audio = decoded_audio(job, first, environ)
        if req.speed != 1.0:
            audio = stretched(audio, req.speed)
        if req.stream_format == "sse":
            return streamed(sse_events(job, audio, req.response_format), "text/event-stream")
        media_type = MEDIA_TYPES[req.response_format]
        if not req.stream:
            try:
                samples = np.concatenate([np.zeros(0, np.float32), *audio])
            except Exception as e:  # a later piece failed; nothing is sent yet, so its own status still can be
                raise generation_error(e) from None
            return Response(encode_audio(samples, req.response_format), mimetype=media_type)
        return streamed(encoded(audio, StreamEncoder(req.response_format)), media_type)

    @sock.route(WEBSOCKET_PATH)
    def speech_ws(ws):
        WebsocketSession(ws, codec, parse, submit).run()

    # --- streaming ----------------------------------------------------------------------------------------
    def decoded_audio(job: Job, first: list[np.ndarray] | None, environ: dict) -> Iterator[np.ndarray]:
        """The job's audio as frames arrive, through one streaming Mimi state (no seams). Cancels the
        job when the consumer stops early or the client goes away (also when nothing is being sent to
        it yet: a request that waits in the queue, or one answered in a single body)."""
        state = codec.decoder_state(1)
        frames = first
        try:
            while frames is not None:
                yield decode_frames(codec, state, frames)
                frames = next_frames(job, environ)
        except ClientGone:
            return
        finally:
            job.cancel()

    def encoded(audio: Iterator[np.ndarray], encoder: StreamEncoder) -> Iterator[bytes]:
        try:
            for chunk in audio:
                data = encoder.feed(chunk)
                if data:
                    yield data
            yield encoder.finish()
        finally:
            encoder.close()

    def sse_events(job: Job, audio: Iterator[np.ndarray], fmt: str) -> Iterator[bytes]:
        for data in encoded(audio, StreamEncoder(fmt)):
            if data:
                yield sse({"type": "speech.audio.delta", "audio": base64.b64encode(data).decode()})
        yield sse({"type": "speech.audio.done", "usage": usage(job)})

    return app


def speaker_of(name: str) -> int | None:
    try:
        return load_voice(name).speaker
    except ValueError:  # damaged
        return None


class ClientGone(Exception):
    pass


def next_frames(job: Job, environ: dict, poll_s: float = 0.25) -> list[np.ndarray] | None:
    """`job.next_frames()`, looking every `poll_s` while it waits for whether the client is still there."""
    while True:
        if client_gone(environ):
            raise ClientGone
        try:
            return job.next_frames(timeout=poll_s)
        except queue.Empty:
            pass


def client_gone(environ: dict) -> bool:
    """Whether the client closed its connection: readable with nothing to read. Needs the socket, which
    werkzeug and gunicorn put in the WSGI environ; other servers only notice when a write fails."""
    sock = environ.get("werkzeug.socket") or environ.get("gunicorn.socket")
    if sock is None:
        return False
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except ValueError:  # a TLS socket takes no recv flags: no answer here
        return False
    except OSError:
        return True


def streamed(chunks: Iterator[bytes], mimetype: str) -> Response:
    # No Content-Length: the server sends the body chunked, each piece as soon as it is made.
    response = Response(stream_with_context(chunks), mimetype=mimetype)
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Accel-Buffering"] = "no"  # nginx: pass chunks on at once
    return response


def sse(event: dict) -> bytes:
    return f"data: {json.dumps(event)}\n\n".encode()


def usage(job: Job) -> dict:
    # Output tokens: generated 80 ms frames (each one row of 32 codebook tokens).
    return {"input_tokens": job.input_tokens, "output_tokens": job.frames,
            "total_tokens": job.input_tokens + job.frames}


def generation_error(e: BaseException) -> ApiError:
    if isinstance(e, ApiError):
        return e
    if isinstance(e, PromptTooLong):
        return ApiError(400, str(e), param="context", code="context_length_exceeded")
    if isinstance(e, ValueError):
        return ApiError(400, str(e))
    if isinstance(e, RuntimeError):
        return ApiError(503, str(e), type="server_error", code="unavailable")
    log.error("generation failed", exc_info=e)
    return ApiError(500, f"generation failed: {e}", type="server_error")


@dataclass
class Utterance:
    """Websocket audio from the first sentence to a flush: one decoder state and one encoder, so the
    sentences join without seams into one file."""

    encoder: StreamEncoder
    state: Any
    stretch: TimeStretch | None = None  # from the first sentence at a speed other than 1, to the end
    started: float = field(default_factory=time.monotonic)
    first_audio: float | None = None
    sentences: int = 0
    frames: int = 0
    samples: int = 0
    input_tokens: int = 0
    bytes: int = 0

    def summary(self) -> dict:
        return {
            "type": "done",
            "sentences": self.sentences,
            "frames": self.frames,
            "audio_seconds": round(self.samples / SAMPLE_RATE, 3),
            "bytes": self.bytes,
            "response_format": self.encoder.format,
            "sample_rate": SAMPLE_RATE,
            "first_audio_ms": None if self.first_audio is None else round(1000 * (self.first_audio - self.started)),
            "elapsed_ms": round(1000 * (time.monotonic() - self.started)),
            "usage": {"input_tokens": self.input_tokens, "output_tokens": self.frames,
                      "total_tokens": self.input_tokens + self.frames},
        }


@dataclass
class Sentence:
    """A sentence waiting in a websocket session, with the settings it was sent under (a later change of
    voice or format does not reach back) and the voice it belongs to."""

    text: str
    settings: SpeechRequest
    voice: int  # sentences of one voice prompt each other; another voice starts afresh
    job: Job | None = None  # once submitted (the next sentence is, while the one before is spoken)


FLUSH = None  # in a session's queue: the end of the file being sent
VOICE_FIELDS = ("voice", "speaker_id", "context")  # what makes a session's voice (not format or sampling)
RETRY_S = 0.25  # a full server: a session keeps its sentence and tries again after this long


class WebsocketSession:
    """One websocket connection (protocol in the README): settings, text in pieces, flushes; audio
    for each complete sentence as soon as it is spoken, a JSON summary after each flush."""

    def __init__(self, ws, codec, parse: Callable[..., SpeechRequest], submit: Callable[[SpeechRequest], Job]):
        self.ws, self.codec, self.parse, self.submit = ws, codec, parse, submit
        self.fields: dict[str, Any] = {"model": MODELS[0]}  # settings persist until changed
        self.settings = parse(self.fields, need_input=False)
        self.voice = 0  # counts changes of VOICE_FIELDS
        self.buffer = ""  # text not yet known to end a sentence
        self.queue: deque[Sentence | None] = deque()  # sentences and FLUSHes, in order
        self.retry_at = 0.0
        self.job: Job | None = None  # the sentence being spoken
        self.last: Sentence | None = None  # the last one submitted: the next follows it (its context, same voice)
        self.utterance: Utterance | None = None

    def run(self) -> None:
        try:
            while True:
                wait = max(0.0, self.retry_at - time.monotonic()) if self.queue else None
                message = self.ws.receive(timeout=0 if self.job else wait)
                if message is not None:
                    self.handle(message)
                if self.job is None and self.queue and time.monotonic() >= self.retry_at:
                    if self.queue[0] is FLUSH:
                        self.queue.popleft()
                        self.finish()
                    else:
                        self.start(self.queue[0])
                if self.job is not None:
                    self.follow()
                    self.pump()
        except (ConnectionClosed, OSError):  # the client left; a reset can surface as OSError mid-send
            pass
        finally:
            for job in [self.job, *(s.job for s in self.queue if s is not FLUSH)]:
                if job is not None:
                    job.cancel()
            if self.utterance is not None:
                self.utterance.encoder.close()

    def error(self, e: ApiError) -> None:
        self.ws.send(json.dumps({"type": "error", **e.body()}))

    def handle(self, message: str | bytes) -> None:
        try:
            if isinstance(message, bytes):
                raise ApiError(400, "send JSON text messages, not binary", code="invalid_json")
            try:
                body = json.loads(message)
            except ValueError as e:
                raise ApiError(400, f"the message is not valid JSON: {e}", code="invalid_json") from None
            if not isinstance(body, dict):
                raise ApiError(400, "a message must be a JSON object", code="invalid_json")
            kind = body.pop("type", "speech")
            if kind == "text":
                if set(body) != {"text"} or not isinstance(body["text"], str):
                    raise ApiError(400, 'a text message is {"type": "text", "text": "..."}', param="text")
                self.add_text(body["text"])
            elif kind == "flush":
                self.add_text("\n")
                self.queue.append(FLUSH)
            elif kind == "speech":
                text = body.pop("input", None)
                fields = {**self.fields, **body}
                request = self.parse({**fields, "input": text} if text is not None else fields,
                                     need_input=text is not None)
                if text is not None:
                    self.add_text("\n")  # text still pending is spoken first, as it was sent
                if any(fields.get(k) != self.fields.get(k) for k in VOICE_FIELDS):
                    self.voice += 1
                self.fields, self.settings = fields, request
                if text is not None:
                    # a whole request: spoken as over HTTP (in CSM's pieces), and the file ends with it
                    self.queue.extend([Sentence(text, request, self.voice), FLUSH])
            else:
                raise ApiError(400, f"unknown message type {kind!r}: use speech, text or flush", param="type")
        except ApiError as e:
            self.error(e)
        except Exception as e:  # a bug of ours: said, as over HTTP, and the session goes on
            log.exception("unexpected error in a websocket message")
            self.error(ApiError(500, f"internal error: {e}", type="server_error"))

    def add_text(self, text: str) -> None:
        sentences, self.buffer = take_sentences(self.buffer + text)
        self.enqueue(sentences)
        while len(self.buffer) > MAX_INPUT_CHARS:
            head, self.buffer = cut_between_words(self.buffer, MAX_INPUT_CHARS)
            if not is_blank(head):  # blank text waits (kept as sent) for words to follow, up to here
                self.error(ApiError(400, f"more than {MAX_INPUT_CHARS} characters without a sentence end: "
                                         "speaking them now", param="text", code="string_above_max_length"))
                self.enqueue([head])

    def enqueue(self, sentences: list[str]) -> None:
        self.queue.extend(Sentence(s, self.settings, self.voice) for s in sentences)

    def submit_sentence(self, sentence: Sentence) -> None:
        """Submit `sentence` to follow the last one submitted (see Engine.submit), with it as context if in
        the same voice."""
        last = self.last
        settings = replace(sentence.settings, job=replace(sentence.settings.job, text=sentence.text))
        if last is None:
            sentence.job = self.submit(settings)
        else:
            sentence.job = self.submit(settings, after=last.job, continues=last.voice == sentence.voice)
        self.last = sentence

    def follow(self) -> None:
        """Submit the next sentence already waiting, so that it takes its place in line now and takes over
        this one's slot (see Engine.submit): queued only once this one ends, behind requests that came
        meanwhile, it would leave a gap in the audio."""
        following = next((s for s in self.queue if s is not FLUSH), None)
        if following is not None and following.job is None:
            try:
                self.submit_sentence(following)
            except ApiError:
                pass  # submitted again in its turn, which reports the error then

    def start(self, sentence: Sentence) -> None:
        """Speak the next sentence; it leaves the queue unless the server is full (then it waits)."""
        fmt = sentence.settings.response_format
        if self.utterance is not None and self.utterance.encoder.format != fmt:
            self.finish()  # another format: the file being sent ends here
        if sentence.job is None:
            try:
                self.submit_sentence(sentence)
            except ApiError as e:
                if e.code == "queue_full":  # keep the sentence: a file must not lose its middle
                    self.retry_at = time.monotonic() + RETRY_S
                    return
                self.queue.popleft()
                self.error(e)
                return
        self.queue.popleft()
        self.job = sentence.job
        if self.utterance is None:
            self.utterance = Utterance(StreamEncoder(fmt), self.codec.decoder_state(1))
        u, speed = self.utterance, sentence.settings.speed
        if u.stretch is not None:
            u.stretch.speed = speed
        elif speed != 1.0:  # from here on, through the end of the file: stopping it would leave a gap
            u.stretch = TimeStretch(speed)

    def pump(self) -> None:
        """Send the audio of the frames made so far, waiting briefly for some."""
        try:
            frames = self.job.next_frames(timeout=0.05)
        except queue.Empty:
            return
        except Exception as e:
            self.job = None
            self.error(generation_error(e))
            return
        u = self.utterance
        if frames is None:
            u.sentences += 1
            u.frames += self.job.frames
            u.input_tokens += self.job.input_tokens
            self.job = None
            return
        audio = decode_frames(self.codec, u.state, frames)
        self.send_samples(audio if u.stretch is None else u.stretch.feed(audio))

    def send_samples(self, audio: np.ndarray) -> None:
        self.utterance.samples += len(audio)
        self.send_audio(self.utterance.encoder.feed(audio))

    def send_audio(self, data: bytes) -> None:
        if data:
            u = self.utterance
            u.first_audio = u.first_audio or time.monotonic()
            u.bytes += len(data)
            self.ws.send(data)

    def finish(self) -> None:
        """Everything flushed is spoken: end the audio file and report."""
        u = self.utterance
        if u is None:  # nothing was spoken: no audio, and the usual report with zeros
            u = Utterance(StreamEncoder(self.settings.response_format), state=None)
        elif u.frames:  # else its sentences failed or said nothing: no empty file (a bare wav header)
            if u.stretch is not None:
                self.send_samples(u.stretch.finish())
            self.send_audio(u.encoder.finish())
        u.encoder.close()
        self.ws.send(json.dumps(u.summary()))
        self.utterance = None
