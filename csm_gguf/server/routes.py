"""The HTTP and websocket endpoints: module-level handlers on one Blueprint. Each checks the request
(schemas), calls a service and answers; the services (model, codec, engine, settings) are the app's
`Services`, found through `current_app`."""

from __future__ import annotations

import hmac
import time
from contextlib import nullcontext
from importlib import resources

import numpy as np
from flask import Blueprint, Response, current_app, render_template_string, request
from flask_sock import Sock
from werkzeug.exceptions import RequestEntityTooLarge

from .. import ffmpeg
from ..audio import MEDIA_TYPES, StreamEncoder, encode_audio
from ..tempo import stretched
from ..voices import (
    BUILTIN_VOICES,
    VoiceExists,
    VoicesFolderError,
    all_voices,
    delete_voice,
    list_voices,
    save_voice,
    voice_info,
)
from .engine import Job
from .errors import VOICES_PATH, ApiError, generation_error
from .limits import MAX_SPEECH_REQUEST, MAX_VOICE_UPLOAD
from .schemas import MODELS, SpeechRequest, parse_json, voice_exists
from .services import EXTENSION, Services
from .settings import SETTINGS
from .streaming import ClientGone, decoded_audio, encoded, let_go, next_audio, sse_events, streamed
from .ws_guard import guard
from .ws_protocol import WEBSOCKET_PATH
from .ws_session import WebsocketSession

bp = Blueprint("csm_gguf", __name__)
sock = Sock()


def services() -> Services:
    return current_app.extensions[EXTENSION]


@bp.before_app_request
def check_key():
    key = current_app.config["API_KEY"]
    if key and request.path.startswith("/v1/"):
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        given = token.strip() if scheme.lower() == "bearer" else ""  # auth schemes ignore case
        if request.path == WEBSOCKET_PATH:  # browsers cannot set websocket headers; elsewhere a key in the
            given = given or request.args.get("api_key", "")  # URL would only end up in access logs
        if not hmac.compare_digest(given.encode(), key.encode()):
            raise ApiError(401, "invalid or missing API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")


@bp.get("/")
def index():
    s = services()
    page = resources.files("csm_gguf").joinpath("static/index.html").read_text()
    key_needed = bool(current_app.config["API_KEY"])
    shown = {name: getattr(s.settings, name) for _, name, _ in SETTINGS}
    # Where the files lie is the operator's business: a page anyone may load shows it only on a server open to all.
    model = s.tts.model.path.name if key_needed else str(s.tts.model.path)
    shown.update(model=model, api_key="(set)" if key_needed else "(none)")
    env = [(var, shown[name], doc) for var, name, doc in SETTINGS]
    return render_template_string(page, env=env, default_voice=s.settings.voice, key_needed=key_needed,
                                  aac=ffmpeg.find() is not None)


@bp.get("/health")
def health():
    s = services()
    # Answered without a key (probes): the model's folder by name, not where it lies on the server.
    status = "ok" if s.engine.running else "engine failed" if s.engine.failed else "engine stopped"
    return {"status": status, "model_loaded": True, "model": s.tts.model.path.name, **s.engine.stats()}, \
        200 if status == "ok" else 503


@bp.get("/v1/models")
def models():
    return {"object": "list", "data": [model_object(m) for m in MODELS]}


@bp.get("/v1/models/<model>")
def model(model: str):
    if model not in MODELS:
        raise ApiError(404, f"the model {model!r} does not exist; this server speaks with: {', '.join(MODELS)}",
                       code="model_not_found")
    return model_object(model)


def model_object(model: str) -> dict:
    """A model as OpenAI's API lists and retrieves it."""
    return {"id": model, "object": "model", "created": services().created, "owned_by": "sesame"}


@bp.get(VOICES_PATH)
def voice_list():
    """Built-in and saved voices with their prompts (a built-in one's once made; "error" if unusable)."""
    s = services()
    return {"voices": [voice_info(name, s.tts.model.path) for name in all_voices()], "default": s.settings.voice}


@bp.post(VOICES_PATH)
def add_voice():
    if request.mimetype != "multipart/form-data":
        raise ApiError(400, "send the voice as multipart/form-data: name, audio_sample (the recording, as a "
                       "file) and transcript (its words)", code="invalid_request")
    request.max_content_length = MAX_VOICE_UPLOAD
    with services().place():  # as a speech request: refused (429) before the upload is read and encoded
        name, voice = services().uploaded_voice(request.form, request.files)
    # A built-in name's saved voice replaces the built-in one, whose cached prompt then goes.
    with services().forgetting(name) if name in BUILTIN_VOICES else nullcontext():
        try:
            save_voice(name, voice)  # VoicesFull and VoicesFolderError have their handlers (errors.py)
        except VoiceExists:  # saved meanwhile, by another request or program
            raise voice_exists(name) from None
    return {"id": name, "object": "audio.voice", "name": name, "created_at": int(time.time()),
            "type": "audio_sample"}


@bp.delete(VOICES_PATH + "/<name>")
def remove_voice(name: str):
    if name == services().settings.voice and name not in BUILTIN_VOICES:
        raise ApiError(409, f"{name!r} is this server's default voice (CSM_GGUF_VOICE): it cannot be deleted "
                       "while the server runs", param="name", code="voice_in_use")
    try:
        with services().forgetting(name):
            deleted = delete_voice(name)
    except VoicesFolderError:  # the file would not go: the server's setup (its handler says so)
        raise
    except ValueError as e:  # a built-in voice
        raise ApiError(400, str(e), param="name", code="voice_builtin") from None
    if not deleted:  # (param: the name, which is the id, as when the voice was made)
        raise ApiError(404, f"no saved voice {name!r}; saved: {', '.join(list_voices()) or 'none'}",
                       param="name", code="voice_not_found")
    return {"id": name, "object": "audio.voice.deleted", "deleted": True}


@bp.post("/v1/audio/speech")
def speech():
    s = services()
    with s.place() as place:  # a request the server would refuse is refused before its body is read
        req = s.parse(parse_json(speech_body(), body_named()))
        job = s.submit(req, place=place, audio=s.decoders.open())
    environ = request.environ
    try:
        first = next_audio(job, environ)  # a request that cannot start fails here, with a proper status
    except ClientGone:
        let_go(job)
        return Response(status=499)  # nginx's "client closed request": nobody reads it
    except Exception as e:
        let_go(job)
        raise generation_error(e) from None
    try:
        return speech_response(req, job, first, environ)
    except BaseException:  # before its body began, whose end lets the job go: it would speak on for no one
        let_go(job)
        raise


def speech_response(req: SpeechRequest, job: Job, first: np.ndarray, environ: dict) -> Response:
    """The response to a speech request, from its first audio on: streamed, as SSE, or one body."""
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


def body_named() -> str:
    """The body, as a JSON error names it: with the content type it came as, where that is a form (sent by
    curl -F or a form's post), which is why it is no JSON. Others are read as JSON whatever their type."""
    if request.mimetype in ("multipart/form-data", "application/x-www-form-urlencoded"):
        return f"the request body (sent as {request.mimetype}: send JSON, as application/json)"
    return "the request body"


def speech_body() -> bytes:
    """The body, at most MAX_SPEECH_REQUEST bytes (a 413 beyond), with or without a Content-Length: werkzeug
    cuts a chunked body at the request's limit without a word, so the limit is one byte more and the body
    that reaches it is refused here."""
    request.max_content_length = MAX_SPEECH_REQUEST + 1
    data = request.get_data(cache=False)
    if len(data) > MAX_SPEECH_REQUEST:
        raise RequestEntityTooLarge()
    return data


@sock.route(WEBSOCKET_PATH, bp=bp)
def speech_ws(ws):
    WebsocketSession(guard(ws), services()).run()  # idle timeout and drain: ws_guard
