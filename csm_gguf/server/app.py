"""The server's app: settings checked, the model loaded and its codec warmed up, the engine started, then
the error handlers and the endpoints registered."""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any

from flask import Flask

from . import drain, health, metrics, ws_guard
from .errors import register_error_handlers
from .limits import MAX_SPEECH_REQUEST
from .routes import bp
from .services import EXTENSION, Services
from .settings import Settings
from .startup import check_settings, start_engine


def create_app(**overrides: Any) -> Flask:
    """The app, its model loaded; keyword arguments override the environment (see Settings)."""
    settings = replace(Settings.from_env(), **overrides)
    check_settings(settings)
    app = Flask("csm_gguf.web")
    app.extensions[EXTENSION] = start_services(settings)
    app.config["API_KEY"] = settings.api_key
    app.config["MAX_CONTENT_LENGTH"] = MAX_SPEECH_REQUEST
    app.config["SOCK_SERVER_OPTIONS"] = {"max_message_size": MAX_SPEECH_REQUEST}  # closes with 1009 beyond
    register_error_handlers(app)
    app.register_blueprint(bp)
    serve_replicas(app, settings)
    return app


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
