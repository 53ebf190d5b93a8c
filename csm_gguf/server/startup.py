"""What every way of serving speech does first: check the settings, load the model and its codec, warm
the codec up, start the engine and make the pool that decodes the requests' audio. Shared by the HTTP
server (app.py) and the Wyoming server; imports no web framework."""

from __future__ import annotations

from ..generator import check_options
from ..llama import KV_TYPES
from ..tts import CSM, NO_VOICE
from ..voices import max_voices, voice_speaker
from .engine import Engine
from .schemas import voice_names
from .served_voices import served_voice
from .settings import Settings


def check_settings(settings: Settings) -> None:
    """ValueError naming the setting, before the (slow) model load."""
    check_options(settings.threads, settings.gpu_layers, settings.max_streams,  # named as the server's variables
                  {"n_threads": "CSM_GGUF_THREADS", "n_gpu_layers": "CSM_GGUF_GPU_LAYERS",
                   "max_streams": "CSM_GGUF_MAX_STREAMS"})
    for var, value, least in (("CSM_GGUF_QUEUE", settings.max_queue, 0),
                              ("CSM_GGUF_PREFILL_ROWS", settings.prefill_rows, 0),
                              ("CSM_GGUF_DRAIN_S", settings.drain_s, 0),
                              ("CSM_GGUF_MAX_WEBSOCKETS", settings.max_websockets, 0),
                              ("CSM_GGUF_WS_PING_S", settings.ws_ping_s, 0),
                              ("CSM_GGUF_WS_IDLE_S", settings.ws_idle_s, 1)):
        if value < least:
            raise ValueError(f"{var} must be >= {least}, got {value}")
    if settings.kv_type not in KV_TYPES:
        raise ValueError(f"CSM_GGUF_KV_TYPE={settings.kv_type!r} is not a KV cache type; choose one of "
                         f"{', '.join(KV_TYPES)}")
    if settings.voice not in voice_names():
        raise ValueError(f"CSM_GGUF_VOICE={settings.voice!r} is not a voice; known: {', '.join(voice_names())}")
    if settings.voice != NO_VOICE:
        voice_speaker(settings.voice)  # a damaged saved one fails now, before the model loads
    max_voices()  # a bad CSM_GGUF_MAX_VOICES fails now, not at the first upload


def start_engine(settings: Settings) -> tuple[CSM, Engine]:
    """The model, its codec loaded and warmed up, and the engine running, with its pool of the codec's streams."""
    tts = CSM(settings.model, settings.threads, settings.gpu_layers, settings.kv_type, settings.max_streams,
              settings.codec_device)
    # The codec's thread decodes the audio while llama.cpp's threads run the engine: one torch thread
    # keeps them from oversubscribing the cores (which slows small ops ~100x). And
    # set before any torch work: torch and ggml share one OpenMP runtime, and once this thread has run
    # parallel work with it (building the codec with two threads did), the engine thread's frames took
    # 45% longer.
    import torch

    from ..mimi import DecoderPool

    torch.set_num_threads(1)
    codec = tts.codec  # loaded now, not racing in the first requests' threads
    codec.warm_up(codebooks=tts.model.config.num_codebooks)  # the CPU traces are made now, not in requests
    # The requests' audio: decoded beside the engine, the frames of each frame step in one batched step of the
    # codec, a row (10 MB) for each request spoken; a websocket file or Wyoming text stream waiting for its
    # next sentence keeps its row, so a request beyond the rows decodes on a state of its own.
    decoders = DecoderPool(codec, settings.max_streams, tts.model.config.num_codebooks)
    engine = Engine(tts.generator, settings.max_queue, decoders, settings.prefill_rows)
    if settings.voice != NO_VOICE:
        try:  # a built-in default voice's prompt is made now, not in the first request; a damaged one fails now
            served_voice(tts, engine, settings.voice)
        except BaseException:
            engine.close()
            tts.close()
            raise
    return tts, engine
