"""Prometheus metrics at `GET /metrics` (needs the prometheus-client package: the `server` extra).

Kept in the process: a server is one worker process (gunicorn -w 1), so its counters are whole; each
replica is scraped on its own. Requests are counted by route and status; generated speech, frames and
the histograms by the engine as each job ends (a websocket session's sentences each count as one)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from flask import Blueprint, Flask, Response, current_app, request

from ..formats import FRAME_MS
from .drain import Drain
from .engine import Engine, Job
from .errors import ApiError
from .ws_protocol import WEBSOCKET_PATH

if TYPE_CHECKING:
    from .ws_guard import WebsocketSlots

EXTENSION = "csm_gguf.metrics"
FIRST_AUDIO_BUCKETS = (0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0, 30.0)
REAL_TIME_FACTOR_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 4.0, 8.0)
MISSING = ("metrics need the prometheus-client package, which this installation lacks: "
           "pip install 'csm-gguf[server]' (or prometheus-client)")

bp = Blueprint("csm_gguf_metrics", __name__)


class Metrics:
    def __init__(self, engine: Engine, drain: Drain, slots: WebsocketSlots):
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()  # the app's own: two apps in one process do not mix
        self.requests = Counter("csm_gguf_requests", "HTTP requests answered, by route and status",
                                ["endpoint", "status"], registry=self.registry)
        self.audio_seconds = Counter("csm_gguf_audio_seconds", "speech generated, in seconds (before any speed "
                                     "change)", registry=self.registry)
        self.frames = Counter("csm_gguf_frames", "frames generated (80 ms of speech each)", registry=self.registry)
        # A response's status is sent with its first audio: what happened after shows only here.
        self.speech = Counter("csm_gguf_speech", "speech requests ended (a websocket's sentences each count), by "
                              "outcome: completed, cancelled (the client left first) or failed (an error, or the "
                              "server stopping)", ["outcome"], registry=self.registry)
        self.first_audio = Histogram("csm_gguf_time_to_first_audio_seconds", "from a request's submission to its "
                                     "first frame (queueing included)", buckets=FIRST_AUDIO_BUCKETS,
                                     registry=self.registry)
        self.real_time_factor = Histogram("csm_gguf_request_real_time_factor", "a request's time from submission "
                                          "to end over its speech's length (below 1: faster than real time)",
                                          buckets=REAL_TIME_FACTOR_BUCKETS, registry=self.registry)
        self.registry.register(LiveGauges(engine, drain, slots))

    def job_ended(self, job: Job, error: BaseException | None) -> None:
        seconds = job.frames * FRAME_MS / 1000
        self.frames.inc(job.frames)
        self.speech.labels(job.outcome).inc()
        self.audio_seconds.inc(seconds)
        # A websocket's following sentence waited for the one before it: no request-level timing.
        if error is None and job.frames and not job.follower and job.first_frame is not None:
            self.first_audio.observe(job.first_frame - job.submitted)
            self.real_time_factor.observe((time.monotonic() - job.submitted) / seconds)

    def count_response(self, response: Response) -> Response:
        rule = request.url_rule
        # A plain request to the websocket matches no route (its rule takes upgrades only) and is answered 426.
        endpoint = rule.rule if rule is not None else WEBSOCKET_PATH if request.path == WEBSOCKET_PATH else "unmatched"
        status = response.status_code
        if rule is not None and endpoint == WEBSOCKET_PATH and status == 200:
            status = 101  # the session, counted as it ends: its handshake switched protocols (flask-sock says 200)
        self.requests.labels(endpoint, str(status)).inc()
        return response


class LiveGauges:
    """Gauges (and the codec's counters) read from the engine and the server at scrape time, so they are never
    out of step."""

    def __init__(self, engine: Engine, drain: Drain, slots: WebsocketSlots):
        self.engine, self.drain, self.slots = engine, drain, slots

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        stats = self.engine.stats()
        yield GaugeMetricFamily("csm_gguf_active_streams", "requests being generated", stats["active_streams"])
        yield GaugeMetricFamily("csm_gguf_queued_requests", "requests waiting for a stream", stats["queue_depth"])
        yield GaugeMetricFamily("csm_gguf_max_streams", "CSM_GGUF_MAX_STREAMS", stats["max_streams"])
        yield GaugeMetricFamily("csm_gguf_requests_in_flight", "requests from their arrival to the end of their "
                                "response (streams and websockets included; probes and scrapes not)",
                                self.drain.in_flight)
        yield GaugeMetricFamily("csm_gguf_websocket_sessions", "websocket sessions open", self.slots.open)
        yield GaugeMetricFamily("csm_gguf_draining", "1 while the server drains (SIGTERM)", int(self.drain.draining))
        yield CounterMetricFamily("csm_gguf_codec_steps", "batched steps of the codec's thread", stats["codec_steps"])
        yield CounterMetricFamily("csm_gguf_codec_stream_steps", "streams those steps decoded, summed (divided by "
                                  "csm_gguf_codec_steps: the streams a step decodes)", stats["codec_stream_steps"])
        yield CounterMetricFamily("csm_gguf_codec_failed_requests", "requests whose audio the codec failed to decode "
                                  "(after their generation, which csm_gguf_speech counts; the log says why)",
                                  stats["codec_failed_requests"])


@bp.get("/metrics")
def metrics():
    found: Metrics | None = current_app.extensions.get(EXTENSION)
    if found is None:
        raise ApiError(501, MISSING, code="metrics_unavailable", type="server_error")
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return Response(generate_latest(found.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})


def install(app: Flask, engine: Engine, drain: Drain, slots: WebsocketSlots) -> Metrics | None:
    """Serve /metrics, and count into it if prometheus-client is installed (else /metrics is a 501)."""
    app.register_blueprint(bp)
    try:
        found = Metrics(engine, drain, slots)
    except ImportError:
        return None
    app.extensions[EXTENSION] = found
    app.after_request(found.count_response)
    engine.on_end = found.job_ended
    return found
