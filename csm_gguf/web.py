"""The OpenAI-compatible speech server's entry point (the server itself is the csm_gguf.server package).

    flask --app csm_gguf.web run                                       # development
    gunicorn -w 1 --threads 32 --graceful-timeout 40 --timeout 120 --access-logfile - -b 0.0.0.0:8000 \
        'csm_gguf.web:create_app()'                                    # production, behind nginx (deploy/)

One worker process: it holds the model and batches every request it serves; threads carry the
concurrent HTTP streams and websockets. Settings come from the environment (see
csm_gguf.server.settings.SETTINGS).
"""

from .server.app import create_app

__all__ = ["create_app"]
