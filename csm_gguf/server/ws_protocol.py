"""The websocket session's protocol (README: the speech websocket), without I/O: client messages parsed
into typed values, and the summary sent after each flush.

Client messages are JSON objects with a `type`: "speech" (the default: settings, and with `input` a whole
request), "text" (text to speak, in any pieces) or "flush" (end the file being sent once all text so far
is spoken)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Union

from ..audio import SAMPLE_RATE
from ..text import is_unicode
from .engine import usage
from .errors import ApiError, invalid
from .schemas import parse_json

WEBSOCKET_PATH = "/v1/audio/speech/ws"
VOICE_FIELDS = ("voice", "speaker_id", "context")  # what makes a session's voice (not format or sampling)
# Speech request fields that shape an HTTP response: the websocket sends its audio as binary messages while it
# is made, one file per flush or input, whatever they say, so a speech message refuses them.
HTTP_ONLY_FIELDS = ("stream", "stream_format")
MESSAGE_FIELDS = {"text": ("text",), "flush": ()}  # the other messages' fields, besides their type: no others


@dataclass(frozen=True)
class Speech:
    """New settings (fields of a speech request, merged into the session's), and with `input` a whole
    request spoken with them."""

    fields: dict[str, Any]
    input: str | None = None


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class Flush:
    pass


Message = Union[Speech, Text, Flush]


def parse_message(message: str | bytes) -> Message:
    """A client message as a typed value; ApiError (400) for one that is not JSON or not a known message.
    A speech message's fields are checked by the session, against its settings (schemas.parse_speech)."""
    if isinstance(message, bytes):
        raise ApiError(400, "send JSON text messages, not binary", code="invalid_json")
    body = parse_json(message, "the message")
    if not isinstance(body, dict):
        raise ApiError(400, "a message must be a JSON object", code="invalid_json")
    kind = body.pop("type", "speech")
    if isinstance(kind, str) and kind in MESSAGE_FIELDS:  # a type can be any JSON, a list too (unhashable)
        _no_other_fields(kind, body)
    if kind == "text":
        return Text(_text(body.get("text")))
    if kind == "flush":
        return Flush()
    if kind == "speech":
        http_only = [field for field in HTTP_ONLY_FIELDS if field in body]
        if http_only:
            raise ApiError(400, f"'{http_only[0]}' is for HTTP responses: the websocket always sends audio as binary "
                           "messages while it is made, one file per flush or input; leave it out",
                           param=http_only[0], code="unsupported_parameter")
        text = body.pop("input", None)
        return Speech(body, text)
    raise invalid("type", f"unknown message type {kind!r}: use speech, text or flush")


def shape(kind: str) -> str:
    """A message of `kind` as its sender writes it: '{"type": "text", "text": "..."}'."""
    return json.dumps({"type": kind, **{field: "..." for field in MESSAGE_FIELDS[kind]}})


def _no_other_fields(kind: str, body: dict[str, Any]) -> None:
    unknown = sorted(set(body) - set(MESSAGE_FIELDS[kind]))
    if unknown:
        raise invalid(unknown[0], f"unrecognized field {unknown[0]!r}: a {kind} message is {shape(kind)}",
                      code="unknown_parameter")


def _text(text: Any) -> str:
    if text is None:
        raise invalid("text", f"a text message needs its text: {shape('text')}", code="missing_required_parameter")
    if not isinstance(text, str):
        raise invalid("text", f"'text' must be a string: {shape('text')}")
    if not is_unicode(text):
        raise invalid("text", "'text' holds lone surrogates, which are not Unicode text")
    return text


def voice_changed(before: dict[str, Any], after: dict[str, Any]) -> bool:
    """Whether new settings make another voice: its sentences then no longer hear the ones before."""
    return any(after.get(k) != before.get(k) for k in VOICE_FIELDS)


def error_message(e: ApiError) -> str:
    return json.dumps({"type": "error", **e.body()})


@dataclass
class Summary:
    """What a session sends after a flush: the audio file's figures since the last one."""

    response_format: str
    started: float  # when its first sentence was complete (ws_session.Sentence.complete_at): where its times count from
    first_audio: float | None = None
    sentences: int = 0
    frames: int = 0
    samples: int = 0
    input_tokens: int = 0
    bytes: int = 0

    def message(self, now: float) -> str:
        return json.dumps({
            "type": "done",
            "sentences": self.sentences,
            "frames": self.frames,
            "audio_seconds": round(self.samples / SAMPLE_RATE, 3),
            "bytes": self.bytes,
            "response_format": self.response_format,
            "sample_rate": SAMPLE_RATE,
            "first_audio_ms": None if self.first_audio is None else round(1000 * (self.first_audio - self.started)),
            "elapsed_ms": round(1000 * (now - self.started)),
            "usage": usage(self.input_tokens, self.frames),
        })
