"""HTTP streaming: a job's audio as it is decoded, encoded into a file's bytes or server-sent events, and
sent chunked; and noticing a client that went away meanwhile."""

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
from .connection import client_socket
from .engine import Job
from .errors import generation_error


class ClientGone(Exception):
    pass


def next_audio(job: Job, environ: dict, poll_s: float = 0.25) -> np.ndarray | None:
    """`job.next_audio()`, in one piece, looking every `poll_s` while it waits for whether the client is
    still there."""
    while True:
        if client_gone(environ):
            raise ClientGone
        try:
            audio = job.next_audio(timeout=poll_s)
        except queue.Empty:
            continue
        return None if audio is None else np.concatenate(audio)


def client_gone(environ: dict) -> bool:
    """Whether the client closed its connection: readable with nothing to read. Needs the socket, which
    werkzeug and gunicorn put in the WSGI environ; other servers only notice when a write fails."""
    sock = client_socket(environ)
    if sock is None:
        return False
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except ValueError:  # a TLS socket takes no recv flags: no answer here
        return False
    except OSError:
        return True


def decoded_audio(job: Job, first: np.ndarray | None, environ: dict) -> Iterator[np.ndarray]:
    """The job's audio as it is decoded (`first`, then `next_audio`'s). Cancels the job and closes its audio
    stream when the consumer stops early or the client goes away (also when nothing is being sent to it
    yet: a request that waits in the queue, or one answered in a single body)."""
    audio = first
    try:
        while audio is not None:
            yield audio
            audio = next_audio(job, environ)
    except ClientGone:
        return
    finally:
        let_go(job)


def let_go(job: Job) -> None:
    """A request's end on the HTTP side: its job stops (if it still runs) and its audio stream closes."""
    job.cancel()
    job.audio.close()


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
    try:
        for data in encoded(audio, StreamEncoder(fmt)):
            if data:
                yield sse({"type": "speech.audio.delta", "audio": base64.b64encode(data).decode()})
    except Exception as e:  # a later piece, or its decoding, failed: said as the websocket says it, in place of
        yield sse({"type": "error", **generation_error(e).body()})  # done (a cut stream looks like a network's)
        return
    yield sse({"type": "speech.audio.done", "usage": job.usage()})


def streamed(chunks: Iterator[bytes], mimetype: str) -> Response:
    # No Content-Length: the server sends the body chunked, each piece as soon as it is made.
    response = Response(stream_with_context(chunks), mimetype=mimetype)
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Accel-Buffering"] = "no"  # nginx: pass chunks on at once
    return response


def sse(event: dict) -> bytes:
    return f"data: {json.dumps(event)}\n\n".encode()
