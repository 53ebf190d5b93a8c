"""Errors answered in OpenAI's shape: ApiError, what a failed generation answers (`generation_error`),
and the Flask error handlers (`register_error_handlers`)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ..generator import PromptTooLong
from ..voices import PromptCacheError, VoicesFolderError, VoicesFull
from .limits import MAX_SPEECH_REQUEST, MAX_VOICE_UPLOAD

if TYPE_CHECKING:
    from flask import Flask
    from werkzeug.exceptions import HTTPException
    from werkzeug.routing import WebsocketMismatch

log = logging.getLogger(__name__)
VOICES_PATH = "/v1/audio/voices"


# Statuses that OpenAI's clients retry (408, 409, 429 and 5xx) but that the same request cannot fix: a name in
# use, a full voices folder, a missing feature. Answered with `x-should-retry: false`, which those clients obey.
NOT_RETRIED = frozenset({409, 501, 507})


class ApiError(Exception):
    """An error answered in OpenAI's shape. `retry`: whether a client may send the same request again (default:
    by status, see NOT_RETRIED)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", retry: bool | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.retry = status not in NOT_RETRIED if retry is None else retry

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(param: str, message: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


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


def api_error(e: ApiError):
    from flask import jsonify

    from .connection import drain_unread_body

    drain_unread_body()  # a request refused before its body was read (429, 503, 401...): its connection lives on
    response = jsonify(e.body())
    response.status_code = e.status
    if e.status == 429:
        response.headers["Retry-After"] = "1"
    if e.status == 401:  # the scheme a key goes in (RFC 9110 15.5.2)
        response.headers["WWW-Authenticate"] = "Bearer"
    if not e.retry:
        response.headers["x-should-retry"] = "false"
    return response


def http_error(e: HTTPException):
    from flask import request

    message = e.description or e.name
    if e.code == 413:
        message = (f"a voice upload is at most {MAX_VOICE_UPLOAD >> 20} MiB: send a shorter or compressed "
                   "recording (5 to 30 s is plenty)" if request.path == VOICES_PATH else
                   f"a request is at most {MAX_SPEECH_REQUEST >> 20} MiB: send shorter context audio")
    response = api_error(ApiError(e.code or 500, message, code=e.name.lower().replace(" ", "_")))
    for name, value in e.get_headers():  # such as a 405's Allow (RFC 9110 15.5.6); the body is ours
        if name.lower() not in ("content-type", "content-length"):
            response.headers[name] = value
    return response


def websocket_mismatch(e: WebsocketMismatch):
    """An HTTP request to the websocket, or a websocket upgrade to an HTTP endpoint: where to go instead.
    The websocket answers plain HTTP with 426 Upgrade Required, which names the protocol to switch to (RFC
    9110 15.5.22, its Upgrade header; the Connection option that goes with it is the WSGI server's to add)."""
    from flask import request

    from .ws_protocol import WEBSOCKET_PATH  # here: ws_protocol imports this module

    if request.path == WEBSOCKET_PATH:
        response = api_error(ApiError(426, f"{WEBSOCKET_PATH} is a websocket endpoint: connect with a websocket "
                                      f"client (ws://HOST{WEBSOCKET_PATH}, a GET with 'Upgrade: websocket'); "
                                      "POST /v1/audio/speech speaks a whole request over plain HTTP",
                                      code="upgrade_required"))
        response.headers["Upgrade"] = "websocket"
        return response
    return api_error(ApiError(400, f"{request.path} is no websocket endpoint: the speech websocket is "
                              f"{WEBSOCKET_PATH}; send this one a plain HTTP request", code="not_a_websocket"))


def voices_full(e: VoicesFull):
    return api_error(ApiError(507, f"{e} (DELETE /v1/audio/voices/NAME deletes one)", param="name",
                              code="voices_full"))


def folder_error(e: VoicesFolderError) -> ApiError:
    """The voices folder (or the cache that keeps the built-in voices' prompts) cannot be used: said in the
    log, with its path; the client learns no path."""
    log.error("voices folder: %s", e)
    folder = ("cache folder (CSM_GGUF_CACHE), where built-in voices' prompts are kept"
              if isinstance(e, PromptCacheError) else "voices folder (CSM_GGUF_VOICES)")
    return ApiError(500, f"the server cannot use its {folder}: its log says why", type="server_error",
                    code="voices_folder", retry=False)  # the operator's to fix


def voices_folder_error(e: VoicesFolderError):
    return api_error(folder_error(e))


def server_error(e: Exception):
    log.exception("unexpected error")
    return api_error(ApiError(500, f"internal error: {e}", type="server_error"))


def register_error_handlers(app: Flask) -> None:
    from werkzeug.exceptions import HTTPException
    from werkzeug.routing import WebsocketMismatch

    app.register_error_handler(ApiError, api_error)
    app.register_error_handler(WebsocketMismatch, websocket_mismatch)
    app.register_error_handler(HTTPException, http_error)
    app.register_error_handler(VoicesFull, voices_full)
    app.register_error_handler(VoicesFolderError, voices_folder_error)
    app.register_error_handler(Exception, server_error)
