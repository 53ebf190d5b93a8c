"""The server's app: settings checked, the model loaded and its codec warmed up, the engine started, then
the error handlers and the endpoints registered."""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any

from flask import Flask

from ..tts import CSM, NO_VOICE
from ..voices import voice_speaker
from .engine import Engine
from .errors import register_error_handlers
from .limits import MAX_SPEECH_REQUEST
from .routes import EXTENSION, Services, bp
from .schemas import voice_names
from .settings import Settings


def create_app(**overrides: Any) -> Flask:
    """The app, its model loaded; keyword arguments override the environment (see Settings)."""
    settings = replace(Settings.from_env(), **overrides)
    if settings.max_streams < 1 or settings.max_queue < 0:
        raise ValueError("CSM_GGUF_MAX_STREAMS must be >= 1 and CSM_GGUF_QUEUE >= 0")
    if settings.voice not in voice_names():
        raise ValueError(f"CSM_GGUF_VOICE={settings.voice!r} is not a voice; known: {', '.join(voice_names())}")
    if settings.voice != NO_VOICE:
        voice_speaker(settings.voice)  # a damaged saved one fails now, before the model loads
    app = Flask("csm_gguf.web")
    services = start_services(settings)
    if settings.voice != NO_VOICE:
        try:  # made now if it is a built-in one, not in the first request; and a damaged one fails now
            services.voice(settings.voice)
        except BaseException:
            services.engine.close()
            services.tts.close()
            raise
    app.extensions[EXTENSION] = services
    app.config["API_KEY"] = settings.api_key
    app.config["MAX_CONTENT_LENGTH"] = MAX_SPEECH_REQUEST
    app.config["SOCK_SERVER_OPTIONS"] = {"max_message_size": MAX_SPEECH_REQUEST}  # closes with 1009 beyond
    register_error_handlers(app)
    app.register_blueprint(bp)
    return app


def start_services(settings: Settings) -> Services:
    """The model and codec loaded, and the engine running."""
    tts = CSM(settings.model, settings.threads, settings.gpu_layers, settings.kv_type, settings.max_streams,
              settings.codec_device)
    # Each request thread decodes its own audio while llama.cpp's threads run the engine: one torch
    # thread per decode keeps them from oversubscribing the cores (which slows small ops ~100x). And
    # set before any torch work: torch and ggml share one OpenMP runtime, and once this thread has run
    # parallel work with it (building the codec with two threads did), the engine thread's frames took
    # 45% longer.
    import torch

    torch.set_num_threads(1)
    codec = tts.codec  # loaded now, not racing in the first requests' threads
    codec.warm_up(codebooks=tts.model.config.num_codebooks)  # the CPU traces are made now, not in requests
    engine = Engine(tts, settings.max_queue)
    return Services(tts, codec, engine, settings, created=int(os.path.getmtime(tts.model.backbone_path)))
