"""A client's connection, kept usable and bounded.

- A client that stops reading would hold its server thread for ever (and a websocket its slot: CSM_GGUF_WS_IDLE_S
  only counts time with nothing to send): a send that makes no progress for STALLED_CLIENT_S seconds fails
  instead (the socket's own send timeout), which ends the response or the session.
- A websocket is written from two threads (see `SerialSends`), each with a plain `send`.
- A request refused before its body was read (a full queue's 429, the drain's 503) leaves that body on the
  connection, and gunicorn, which drains at most 64 KiB, then closes a connection it had announced as kept
  alive: the client's next request on it failed. The refusal reads and drops the body first, up to
  DRAIN_REFUSED_BODY.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading

from flask import Flask, request

from . import limits

log = logging.getLogger("csm_gguf.server")


def client_socket(environ: dict) -> socket.socket | None:
    """The connection's socket, which werkzeug and gunicorn put in the WSGI environ (other servers: None)."""
    return environ.get("werkzeug.socket") or environ.get("gunicorn.socket")


def limit_stalls(environ: dict) -> None:
    """Sends on this connection fail once one makes no progress for limits.STALLED_CLIENT_S seconds."""
    sock = client_socket(environ)
    if sock is None or not hasattr(socket, "SO_SNDTIMEO"):
        return
    seconds = limits.STALLED_CLIENT_S
    timeval = struct.pack("ll", int(seconds), int(seconds % 1 * 1_000_000))  # struct timeval (Linux, macOS)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
    except OSError as e:  # a platform whose timeval differs: connections are then unbounded, as before
        log.debug("no send timeout on this connection: %s", e)


class SerialSends:
    """A websocket's socket as simple_websocket writes to it, from the session's thread (audio, messages) and
    from its reader thread (pings, pongs, the closing handshake), each time with `send`, whose count it drops.
    Here each send goes whole (`sendall`: a send that timed out part-way, a stalled client's, cut its frame
    short, and every frame after it was then misread), and one at a time (two threads' frames would interleave).
    The rest (recv, fileno, close...) is the socket's own."""

    def __init__(self, sock: socket.socket):
        self._sock = sock
        self._lock = threading.Lock()

    def send(self, data: bytes) -> int:
        with self._lock:
            self._sock.sendall(data)
        return len(data)

    def __getattr__(self, name: str):
        return getattr(self._sock, name)


def serialize_sends(environ: dict) -> None:
    """Before a websocket upgrade: its library (simple_websocket, reading the environ's socket) writes through
    a `SerialSends`."""
    for key in ("werkzeug.socket", "gunicorn.socket"):
        if isinstance(environ.get(key), socket.socket):
            environ[key] = SerialSends(environ[key])


def limit_this_connection() -> None:
    """A before_request hook (every request: a connection serves several)."""
    limit_stalls(request.environ)


def install(app: Flask) -> None:
    app.before_request(limit_this_connection)


def drain_unread_body() -> None:
    """Read and drop what is left of the request's body, up to limits.DRAIN_REFUSED_BODY bytes (beyond it the
    connection is not worth keeping: the server closes it)."""
    left = limits.DRAIN_REFUSED_BODY
    try:
        stream = request.stream  # itself a 413 where the body is known to be too large
        while left > 0 and (chunk := stream.read(min(left, 64 * 1024))):
            left -= len(chunk)
    except Exception as e:  # the client went, or sent more than the route allows: the connection closes
        log.debug("left a refused request's body unread: %s", e)
