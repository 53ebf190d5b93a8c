"""HTTP streaming: a job's frames decoded into audio as they arrive, encoded into a file's bytes or
server-sent events, and sent chunked; and noticing a client that went away meanwhile."""

from __future__ import annotations

import base64
import json
import queue
import select
import socket
from typing import Iterator

import numpy as np
from flask import Response, stream_with_context

from ..audio import StreamEncoder
from ..tts import decode_frames
from .engine import Job


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


def decoded_audio(codec, job: Job, first: list[np.ndarray] | None, environ: dict) -> Iterator[np.ndarray]:
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
    yield sse({"type": "speech.audio.done", "usage": job.usage()})


def streamed(chunks: Iterator[bytes], mimetype: str) -> Response:
    # No Content-Length: the server sends the body chunked, each piece as soon as it is made.
    response = Response(stream_with_context(chunks), mimetype=mimetype)
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Accel-Buffering"] = "no"  # nginx: pass chunks on at once
    return response


def sse(event: dict) -> bytes:
    return f"data: {json.dumps(event)}\n\n".encode()
