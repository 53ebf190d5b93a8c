"""What the endpoints call: the model, the engine that batches requests, the codec's pool of streams that
decodes their audio and the settings, held
by the app (`app.extensions[EXTENSION]`), with the steps a speech request goes through."""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..generator import Segment
from ..tts import CSM, Voice
from .engine import Engine, Job, Place, QueueFull
from .errors import ApiError, generation_error
from .schemas import ContextAudio, SpeechRequest, encode_context, parse_speech, parse_voice
from .served_voices import forgetting, served_voice
from .settings import Settings

if TYPE_CHECKING:
    from ..mimi import AudioStream, DecoderPool

EXTENSION = "csm_gguf"


@dataclass
class Services:
    tts: CSM
    engine: Engine
    settings: Settings
    created: int  # the model's time, for /v1/models

    @property
    def decoders(self) -> DecoderPool:
        """The engine's pool of tts.codec's streams: a request's audio is one of them."""
        return self.engine.decoders

    def check(self, body: Any, need_input: bool = True) -> SpeechRequest:
        """The request checked (ApiError), its context audio not yet encoded."""
        return parse_speech(body, self.tts, self.settings.voice, need_input, self.voice)

    def voice(self, name: str) -> Voice:
        """A voice by name; a built-in voice's prompt, on its first use, is made by the engine (served_voices)."""
        return served_voice(self.tts, self.engine, name)

    def forgetting(self, name: str) -> AbstractContextManager[None]:
        """Around the deletion or replacement of voice `name`: its cached prompt dropped (served_voices)."""
        return forgetting(self.tts, self.engine, name)

    def encode(self, req: SpeechRequest, encoded: dict[ContextAudio, Segment] | None = None) -> SpeechRequest:
        """The request with its context audio encoded (see encode_context)."""
        one_torch_thread()
        return encode_context(req, self.tts, encoded)

    def uploaded_voice(self, form, files) -> tuple[str, Voice]:
        """A voice upload's name and voice, its recording encoded (see parse_voice)."""
        one_torch_thread()
        return parse_voice(form, files, self.tts)

    def parse(self, body: Any, need_input: bool = True) -> SpeechRequest:
        return self.encode(self.check(body, need_input))

    def place(self) -> Place:
        """A place in line, taken before the request is read (see Engine.place); 429 if there is none."""
        try:
            return self.engine.place()
        except Exception as e:
            raise engine_error(e) from None

    def submit(self, req: SpeechRequest, after: Job | None = None, continues: bool = False,
               place: Place | None = None, audio: AudioStream | None = None) -> Job:
        """Engine.submit (or submit_in `place`): with `audio`, a stream of `decoders`, the job gives audio."""
        try:
            if place is not None:
                return self.engine.submit_in(place, req.job, audio)
            return self.engine.submit(req.job, after, continues, audio)
        except Exception as e:  # text the engine refuses is the request's fault: a 400, as any other
            raise engine_error(e) from None


def engine_error(e: Exception) -> ApiError:
    if isinstance(e, QueueFull):
        return ApiError(429, str(e), code="queue_full", type="rate_limit_error")
    return generation_error(e)


def one_torch_thread() -> None:
    """The codec's encoding in a request's thread on one torch thread, as all the server's torch work
    (startup.py). torch's thread count is OpenMP's, kept per thread: without this each request thread that
    encodes audio started a team of every core for itself, beside llama.cpp's threads, and kept it for life."""
    import torch

    torch.set_num_threads(1)
