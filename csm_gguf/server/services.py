"""What the endpoints call: the model, its codec, the engine that batches requests and the settings, held
by the app (`app.extensions[EXTENSION]`), with the steps a speech request goes through."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..generator import Segment
from ..tts import CSM
from .engine import Engine, Job, QueueFull
from .errors import ApiError, generation_error
from .schemas import ContextAudio, SpeechRequest, encode_context, parse_speech
from .settings import Settings

EXTENSION = "csm_gguf"


@dataclass
class Services:
    tts: CSM
    codec: Any  # tts.codec, loaded
    engine: Engine
    settings: Settings
    created: int  # the model's time, for /v1/models

    def check(self, body: Any, need_input: bool = True) -> SpeechRequest:
        """The request checked (ApiError), its context audio not yet encoded."""
        return parse_speech(body, self.tts, self.settings.voice, need_input)

    def encode(self, req: SpeechRequest, encoded: dict[ContextAudio, Segment] | None = None) -> SpeechRequest:
        """The request with its context audio encoded (see encode_context)."""
        return encode_context(req, self.tts, encoded)

    def parse(self, body: Any, need_input: bool = True) -> SpeechRequest:
        return self.encode(self.check(body, need_input))

    def submit(self, req: SpeechRequest, after: Job | None = None, continues: bool = False) -> Job:
        try:
            return self.engine.submit(req.job, after, continues)
        except QueueFull as e:
            raise ApiError(429, str(e), code="queue_full", type="rate_limit_error") from None
        except ValueError as e:  # the request's own fault, in case the schema let it through
            raise generation_error(e) from None
