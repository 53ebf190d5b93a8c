"""The server's settings, from the environment (see SETTINGS) and create_app's keyword arguments."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any

# (environment variable, Settings field, what it sets)
SETTINGS = (
    ("CSM_GGUF_MODEL", "model", "converted model directory (default: the converted model in the cache, as for "
                                "say; the server converts none)"),
    ("CSM_GGUF_THREADS", "threads", "CPU threads for llama.cpp (default 0: all cores; the codec decodes the "
                                    "requests' audio on one thread of its own, all requests in one step)"),
    ("CSM_GGUF_GPU_LAYERS", "gpu_layers", "layers offloaded to the GPU (default 0; -1: all)"),
    ("CSM_GGUF_KV_TYPE", "kv_type", "KV cache type: f16 (default), f32, q8_0"),
    ("CSM_GGUF_CODEC_DEVICE", "codec_device", "torch device of the Mimi codec: cpu (default), cuda"),
    ("CSM_GGUF_API_KEY", "api_key", "if set, /v1/* needs 'Authorization: Bearer <key>'"),
    ("CSM_GGUF_MAX_STREAMS", "max_streams", "requests generated together in one batch (default 4)"),
    ("CSM_GGUF_QUEUE", "max_queue", "requests that may wait for a free stream before 429 (default 16)"),
    ("CSM_GGUF_PREFILL_ROWS", "prefill_rows", "prompt positions of joining requests read between two frames "
                                              "while others speak (default 0: 32 on the CPU, 512 with the "
                                              "layers on a GPU): more start them sooner and pause the "
                                              "others longer"),
    ("CSM_GGUF_VOICE", "voice", "voice used when a request names none (default alloy)"),
    ("CSM_GGUF_DRAIN_S", "drain_s", "on SIGTERM, seconds that requests in flight get to finish (default 30); "
                                    "gunicorn's --graceful-timeout must be longer"),
    ("CSM_GGUF_MAX_WEBSOCKETS", "max_websockets", "websocket sessions open at once before 429 (default 8); each "
                                                  "holds a thread: keep streams + queue + this below the threads"),
    ("CSM_GGUF_WS_IDLE_S", "ws_idle_s", "seconds a websocket session may sit idle (nothing to speak, nothing "
                                        "received) before the server closes it (default 60)"),
    ("CSM_GGUF_WS_PING_S", "ws_ping_s", "seconds between the server's pings on a websocket; a client that has "
                                        "not answered one by the next is closed (default 20; 0: no pings)"),
)


@dataclass(frozen=True)
class Settings:
    model: str | None = None
    threads: int = 0
    gpu_layers: int = 0
    kv_type: str = "f16"
    codec_device: str = "cpu"
    api_key: str | None = None
    max_streams: int = 4
    max_queue: int = 16
    prefill_rows: int = 0
    voice: str = "alloy"
    drain_s: int = 30
    max_websockets: int = 8
    ws_idle_s: int = 60
    ws_ping_s: int = 20

    @classmethod
    def from_env(cls) -> Settings:
        values: dict[str, Any] = {}
        types = {f.name: f.type for f in fields(cls)}
        for var, name, _ in SETTINGS:
            raw = os.environ.get(var)
            if raw:
                try:
                    values[name] = int(raw) if types[name] == "int" else raw
                except ValueError:
                    raise ValueError(f"{var} must be a whole number, got {raw!r}") from None
        return cls(**values)
