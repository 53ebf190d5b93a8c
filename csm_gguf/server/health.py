"""Probes for orchestrators and load balancers: `/health/live` (the process answers, its engine has not died)
and `/health/ready` (model loaded, engine running, not draining: else 503, and a load balancer sends no new
work here).
`/health` (in routes) stays, with the engine's numbers."""

from __future__ import annotations

from flask import Blueprint, current_app

from .drain import EXTENSION as DRAIN
from .routes import EXTENSION as SERVICES

bp = Blueprint("csm_gguf_health", __name__)


@bp.get("/health/live")
def live():
    # An engine that died of an error of ours never serves again: an orchestrator restarts the process.
    if current_app.extensions[SERVICES].engine.failed:
        return {"status": "engine failed"}, 503
    return {"status": "alive"}


@bp.get("/health/ready")
def ready():
    # The model is loaded once the app exists: create_app loads it before the server takes requests.
    if current_app.extensions[DRAIN].draining:
        return {"status": "draining"}, 503
    if not current_app.extensions[SERVICES].engine.running:
        return {"status": "engine stopped"}, 503
    return {"status": "ready"}
