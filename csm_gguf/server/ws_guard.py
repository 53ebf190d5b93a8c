"""Websockets within bounds: each session holds a server thread for as long as it is open, so their
number has a limit of its own (CSM_GGUF_MAX_WEBSOCKETS; beyond it the upgrade is answered 429), and a
session that sits idle (nothing to speak, nothing received) for CSM_GGUF_WS_IDLE_S seconds is closed.
While the server drains, a session is closed as soon as it has nothing left to speak."""

from __future__ import annotations

import threading
import time

from flask import Flask, current_app, g, request
from simple_websocket import ConnectionClosed

from .connection import serialize_sends
from .drain import Drain
from .errors import ApiError
from .settings import Settings
from .ws_protocol import WEBSOCKET_PATH

EXTENSION = "csm_gguf.websockets"
POLL_S = 1.0  # how often an idle session looks at its idle time and the drain
IDLE_CLOSE = 1000  # a normal closure, with the reason in its message
DRAIN_CLOSE = 1001  # "going away": the server stops; connect again (to another replica)


class WebsocketSlots:
    """Websocket sessions open, at most `limit`."""

    def __init__(self, limit: int, idle_s: float, drain: Drain):
        self.limit, self.idle_s, self.drain = limit, idle_s, drain
        self.open = 0
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            if self.open >= self.limit:
                return False
            self.open += 1
            return True

    def give_back(self) -> None:
        with self._lock:
            self.open -= 1


class GuardedWebsocket:
    """A websocket that closes itself when its session has been idle too long, or while the server drains.

    The session's `receive(timeout=None)` is its idle wait (it has nothing queued and nothing being
    spoken: see WebsocketSession.run); a receive with a timeout is a busy session polling between frames."""

    def __init__(self, ws, slots: WebsocketSlots):
        self.ws, self.slots = ws, slots
        self.active_at = time.monotonic()

    def __getattr__(self, name: str):  # send, close, connected, ...
        return getattr(self.ws, name)

    def receive(self, timeout: float | None = None):
        if timeout is not None:
            if self.slots.drain.overdue():
                self._close(DRAIN_CLOSE, "the server is shutting down: connect again")
            message = self.ws.receive(timeout=timeout)
            self.active_at = time.monotonic()
            return message
        while True:
            if self.slots.drain.draining:
                self._close(DRAIN_CLOSE, "the server is shutting down: connect again")
            idle_left = self.active_at + self.slots.idle_s - time.monotonic()
            if idle_left <= 0:
                self._close(IDLE_CLOSE, f"idle for {self.slots.idle_s:g} s (CSM_GGUF_WS_IDLE_S): closed")
            message = self.ws.receive(timeout=min(POLL_S, idle_left))
            if message is not None:
                self.active_at = time.monotonic()
                return message

    def _close(self, code: int, reason: str):
        try:
            self.ws.close(code, reason)
        except ConnectionClosed:
            pass
        raise ConnectionClosed(code, reason)


def guard(ws) -> GuardedWebsocket:
    return GuardedWebsocket(ws, current_app.extensions[EXTENSION])


def admit():
    """A before_request hook: a websocket upgrade takes a slot, or is answered 429 before upgrading."""
    if request.path != WEBSOCKET_PATH:
        return
    slots: WebsocketSlots = current_app.extensions[EXTENSION]
    if not slots.take():
        raise ApiError(429, f"{slots.open} websocket sessions are open, this server's limit "
                       f"(CSM_GGUF_MAX_WEBSOCKETS={slots.limit}): try again shortly", code="too_many_websockets",
                       type="rate_limit_error")
    g.websocket_slot = True
    serialize_sends(request.environ)


def release(_error: BaseException | None) -> None:
    if g.pop("websocket_slot", False):
        current_app.extensions[EXTENSION].give_back()


def install(app: Flask, settings: Settings, drain: Drain) -> WebsocketSlots:
    slots = WebsocketSlots(settings.max_websockets, settings.ws_idle_s, drain)
    app.extensions[EXTENSION] = slots
    app.before_request(admit)
    app.teardown_request(release)
    return slots
