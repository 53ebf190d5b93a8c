"""Graceful drain, for replicas behind a load balancer: on SIGTERM the server turns unready, refuses new
requests (503 with Retry-After, which nginx passes on to another replica), lets the requests in flight
finish for up to CSM_GGUF_DRAIN_S seconds, then stops its engine and exits 0.

SIGTERM is taken over only where the server's own process life is known: in a gunicorn worker (its
graceful-exit handler is called once the drain is over, and gunicorn then closes the worker as usual) and
under `flask run` (the process exits 0 itself). Elsewhere (tests, embedding) nothing is installed;
`Drain.begin` drains by hand.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections import Counter
from typing import Callable, Iterable, Iterator

from flask import Flask, current_app, request

from .engine import Engine
from .errors import ApiError, api_error
from .settings import Settings
from .ws_protocol import WEBSOCKET_PATH

log = logging.getLogger(__name__)
EXTENSION = "csm_gguf.drain"
# Answered while draining, and not counted as work in flight: probes and scrapes.
ALWAYS_ANSWERED = frozenset({"/health", "/health/live", "/health/ready", "/metrics"})
RETRY_AFTER_S = 1  # another replica can take the request at once


class Drain:
    """Whether the server drains, since when, and how many requests are in flight (counted by
    `middleware` from the call of the app to the end of its response, streams and websockets included)."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.since: float | None = None
        self.in_flight = 0
        self.paths: Counter[str] = Counter()  # the same requests by path, for the log: what a drain waits for
        self._changed = threading.Condition()

    @property
    def draining(self) -> bool:
        return self.since is not None

    def overdue(self) -> bool:
        return self.since is not None and time.monotonic() > self.since + self.seconds

    def begin(self) -> bool:
        """Start draining; False if it had started already."""
        with self._changed:
            if self.since is not None:
                return False
            self.since = time.monotonic()
            return True

    def wait(self) -> bool:
        """Wait for the requests in flight to finish, until the drain's time is up; whether they did."""
        with self._changed:
            left = self.since + self.seconds - time.monotonic()
            return self._changed.wait_for(lambda: self.in_flight == 0, timeout=max(0.0, left))

    def middleware(self, app: Callable) -> Callable:
        def counted(environ, start_response):
            path = environ.get("PATH_INFO", "")
            if path in ALWAYS_ANSWERED:
                return app(environ, start_response)
            self._add(path, 1)
            try:
                result = app(environ, start_response)
            except BaseException:  # flask-sock under gunicorn ends a websocket with StopIteration
                self._add(path, -1)
                raise
            if path == WEBSOCKET_PATH and environ.get("HTTP_UPGRADE", "").lower() == "websocket":
                # flask-sock runs the whole session inside the call; werkzeug may never close what it
                # returns (its socket is closed by then, and the clean-up after the response raises).
                self._add(path, -1)
                return result
            return InFlight(result, lambda: self._add(path, -1))

        return counted

    def describe(self) -> str:
        """The requests in flight, for a log line: '2 requests in flight (/v1/audio/speech x2)'."""
        with self._changed:
            paths = ", ".join(f"{path} x{n}" for path, n in sorted(self.paths.items()))
            return f"{self.in_flight} requests in flight" + (f" ({paths})" if paths else "")

    def _add(self, path: str, n: int) -> None:
        with self._changed:
            self.in_flight += n
            self.paths[path] += n
            if not self.paths[path]:
                del self.paths[path]  # paths are the clients' own: keep only those in flight
            self._changed.notify_all()


class InFlight:
    """A response in flight: `done` is called once, at its end, whichever comes first of its last chunk
    taken, its close, or its being dropped unclosed. A WSGI server need not get to the close: werkzeug's
    (`flask run`) reads what the client left unread before it closes the response, and that read raises
    when the client reset the connection; a drain would then wait for a request long over."""

    def __init__(self, response: Iterable[bytes], done: Callable[[], None]):
        self._lock = threading.Lock()  # __del__ may run on whichever thread collects it
        self._done: Callable[[], None] | None = done
        self._closed = False
        self.response = response
        self.chunks = iter(response)

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        try:
            return next(self.chunks)
        except BaseException:  # the last chunk taken, or the response failed: nothing more is sent
            self._end()
            raise

    def close(self) -> None:
        with self._lock:
            closing, self._closed = not self._closed, True
        try:
            if closing and hasattr(self.response, "close"):
                self.response.close()
        finally:
            self._end()

    def __del__(self) -> None:
        self.close()  # its clean-up, as the WSGI server would have had it, and its count

    def _end(self) -> None:
        with self._lock:
            done, self._done = self._done, None
        if done is not None:
            done()


def refuse_while_draining():
    """A before_request hook: new work goes to another replica."""
    drain: Drain = current_app.extensions[EXTENSION]
    if drain.draining and request.path not in ALWAYS_ANSWERED:
        response = api_error(ApiError(503, "this server is shutting down: send the request again (a load "
                                      "balancer sends it to another replica)", code="draining", type="server_error"))
        response.headers["Retry-After"] = str(RETRY_AFTER_S)
        return response
    return None


def install(app: Flask, engine: Engine, settings: Settings) -> Drain:
    """Count requests in flight, refuse new ones while draining, and drain on SIGTERM where the process's
    WSGI server is known (see the module's doc)."""
    drain = Drain(settings.drain_s)
    app.extensions[EXTENSION] = drain
    app.wsgi_app = drain.middleware(app.wsgi_app)
    app.before_request(refuse_while_draining)
    exit_process = process_exit(settings)
    if exit_process is not None:
        signal.signal(signal.SIGTERM, lambda signum, frame: on_sigterm(drain, engine, exit_process))
    return drain


def on_sigterm(drain: Drain, engine: Engine, exit_process: Callable[[], None]) -> None:
    # A signal handler runs on the main thread, which serves (gunicorn's poller, werkzeug's accept
    # loop): the waiting happens on a thread of its own.
    if drain.begin():
        log.info("SIGTERM: draining (up to %s s for %s)", drain.seconds, drain.describe())
        threading.Thread(target=finish, args=(drain, engine, exit_process), name="csm-drain", daemon=True).start()


def finish(drain: Drain, engine: Engine, exit_process: Callable[[], None]) -> None:
    if drain.wait():
        log.info("drained: every request in flight finished")
    else:
        log.warning("CSM_GGUF_DRAIN_S=%s s passed with %s: ending them", drain.seconds, drain.describe())
    engine.close()  # what still runs ends with "the server is shutting down"
    exit_process()


def process_exit(settings: Settings) -> Callable[[], None] | None:
    """How this process ends once drained, or None where SIGTERM is not ours to take."""
    if threading.current_thread() is not threading.main_thread():
        return None  # signal handlers are set on the main thread only
    previous = signal.getsignal(signal.SIGTERM)
    worker = getattr(previous, "__self__", None)
    if type(worker).__module__.startswith("gunicorn.workers"):
        check_gunicorn(worker.cfg, settings)
        return lambda: previous(signal.SIGTERM, None)  # the worker's graceful exit (it only sets flags)
    if os.environ.get("FLASK_RUN_FROM_CLI") == "true":
        return exit_now
    return None


def exit_now() -> None:
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # werkzeug's serving loop on the main thread has no stop of its own to call from here


def check_gunicorn(cfg, settings: Settings) -> None:
    """Warn about gunicorn settings that would undo the drain or let slow clients take every thread."""
    if cfg.graceful_timeout <= settings.drain_s:
        log.warning("gunicorn's --graceful-timeout (%s s) is not longer than CSM_GGUF_DRAIN_S (%s s): gunicorn "
                    "kills the worker before its streams finish; give it a few seconds more",
                    cfg.graceful_timeout, settings.drain_s)
    held = settings.max_streams + settings.max_queue + settings.max_websockets
    if cfg.threads <= held:
        log.warning("gunicorn's --threads (%s) is not more than CSM_GGUF_MAX_STREAMS + CSM_GGUF_QUEUE + "
                    "CSM_GGUF_MAX_WEBSOCKETS (%s): busy streams and websockets can take every thread, and "
                    "/health stops answering", cfg.threads, held)
