"""The server's app: settings checked, the model loaded and its codec warmed up, the engine started, then
the error handlers and the endpoints registered."""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from typing import Any

from flask import Flask

from . import connection, drain, health, metrics, ws_guard
from .errors import register_error_handlers
from .limits import MAX_SPEECH_REQUEST
from .routes import bp
from .services import EXTENSION, Services
from .settings import Settings
from .startup import check_settings, start_engine

log = logging.getLogger("csm_gguf.server")
# gunicorn's own line format, so that the server's lines read as its do.
LOG_FORMAT = "[%(asctime)s] [%(process)d] [%(levelname)s] %(name)s: %(message)s"


def create_app(**overrides: Any) -> Flask:
    """The app, its model loaded; keyword arguments override the environment (see Settings)."""
    settings = replace(Settings.from_env(), **overrides)
    configure_logging()
    check_settings(settings)
    app = Flask("csm_gguf.web")
    app.extensions[EXTENSION] = start_services(settings)
    log.info("serving %s: %d streams, a queue of %d, %s threads, voice %s, %s",
             app.extensions[EXTENSION].tts.model.path, settings.max_streams, settings.max_queue,
             settings.threads or "all", settings.voice, "an API key" if settings.api_key else "no API key")
    app.config["API_KEY"] = settings.api_key
    app.config["MAX_CONTENT_LENGTH"] = MAX_SPEECH_REQUEST
    # Messages beyond the limit close the session with 1009. Pings find clients gone without a word (a network
    # lost, a laptop shut): the slot was held until the idle timeout, or a speaking one's sends stalled.
    app.config["SOCK_SERVER_OPTIONS"] = {"max_message_size": MAX_SPEECH_REQUEST,
                                         "ping_interval": settings.ws_ping_s or None}
    register_error_handlers(app)
    connection.install(app)
    app.register_blueprint(bp)
    serve_replicas(app, settings)
    return app


def configure_logging() -> None:
    """The server's lines (its start, the drain, warnings) at INFO, with a time, the process and a level, unless
    the program hosting it set up logging: Python's default dropped the INFO ones and printed the rest bare."""
    ours = logging.getLogger("csm_gguf")
    if ours.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(LOG_FORMAT, "%Y-%m-%d %H:%M:%S %z"))
    ours.addHandler(handler)
    ours.setLevel(logging.INFO)


def serve_replicas(app: Flask, settings: Settings) -> None:
    """What running as one of several replicas needs: health probes, a graceful drain on SIGTERM, bounded
    websockets and metrics."""
    engine = app.extensions[EXTENSION].engine
    draining = drain.install(app, engine, settings)
    slots = ws_guard.install(app, settings, draining)
    app.register_blueprint(health.bp)
    metrics.install(app, engine, draining, slots)


def start_services(settings: Settings) -> Services:
    """The model and codec loaded, and the engine running."""
    tts, engine = start_engine(settings)
    return Services(tts, engine, settings, created=int(os.path.getmtime(tts.model.backbone_path)))
