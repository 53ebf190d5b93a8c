"""What the Wyoming server uses of the model, the engine and the voices, behind a few functions: the
speech settings of a request (`request`, `with_text`), submitting it (`submit`) and its audio as it is
made (`next_audio`)."""

from __future__ import annotations

import asyncio
import queue
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from ..audio import pcm_bytes
from ..sampling import Sampling
from ..server.engine import Engine, Job, SpeechJob
from ..server.errors import ApiError, folder_error
from ..server.schemas import MODELS, SpeechRequest, parse_speech
from ..server.served_voices import served_voice
from ..server.settings import Settings
from ..server.startup import start_engine
from ..tts import CSM, Voice
from ..voices import VoicesFolderError
from .events import MAX_DATA

if TYPE_CHECKING:
    from ..mimi import AudioStream

# A synthesize's text: whatever one event holds, not the HTTP API's 4096 characters (OpenAI's). Home Assistant
# sends a whole answer at once to a server that does not stream, and the engine speaks a long text piece by piece.
MAX_TEXT_CHARS = MAX_DATA
WAIT_S = 1.0  # a thread waiting for a job's frames looks up this often (its job may have been let go)
# A synthesize is read as an HTTP speech request: its errors name the fields by what the Wyoming client sent.
WYOMING_FIELDS = {"input": "text", "speaker_id": "speaker"}


@dataclass
class WyomingService:
    tts: CSM
    engine: Engine
    settings: Settings
    sampling: Sampling = field(default_factory=Sampling)  # the command line's, for every request (Wyoming carries none)
    # Threads that wait for requests' audio (decoded by the engine's codec thread), so the
    # event loop never blocks: one per request the engine may hold, its waiting followers included.
    executor: ThreadPoolExecutor | None = None

    def __post_init__(self) -> None:
        if self.executor is None:
            workers = 2 * self.settings.max_streams + self.settings.max_queue
            self.executor = ThreadPoolExecutor(workers, thread_name_prefix="wyoming-audio")
        self.request(None)  # bad sampling options fail now (ApiError), not in every request

    @classmethod
    def start(cls, settings: Settings, sampling: Sampling) -> WyomingService:
        """The model loaded and the engine started, as for the HTTP server."""
        tts, engine = start_engine(settings)
        return cls(tts, engine, settings, sampling)

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.engine.close()

    def request(self, voice: str | None, speaker: Any = None, text: str | None = None) -> SpeechRequest:
        """A synthesize's settings: its voice (default: the server's), a speaker id that overrides the voice's,
        the server's sampling, and its text when given. ApiError names what is wrong."""
        body: dict[str, Any] = {"model": MODELS[0], **vars(self.sampling)}
        if voice is not None:
            body["voice"] = voice
        if speaker is not None:
            body["speaker_id"] = _speaker_id(speaker)
        if text is not None:
            body["input"] = text
        try:
            return parse_speech(body, self.tts, self.settings.voice, text is not None, self.voice, MAX_TEXT_CHARS)
        except VoicesFolderError as e:  # the server's setup: said in its log, with the path
            raise folder_error(e) from None
        except ApiError as e:
            raise _in_wyoming_terms(e) from None

    def voice(self, name: str) -> Voice:
        """A voice by name; a built-in voice's prompt, on its first use, is made by the engine (served_voices)."""
        return served_voice(self.tts, self.engine, name)

    async def request_soon(self, voice: str | None, speaker: Any = None, text: str | None = None) -> SpeechRequest:
        """`request`, off the event loop: a built-in voice's prompt takes seconds to make on its first use."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, self.request, voice, speaker, text)

    @staticmethod
    def with_text(request: SpeechRequest, text: str) -> SpeechJob:
        return replace(request.job, text=text)

    def submit(self, job: SpeechJob, audio: AudioStream, after: Job | None = None) -> Job:
        """Engine.submit, its audio decoded in `audio`; `after`: the sentence before it in a stream, which it
        follows and continues (in the same `audio`)."""
        return self.engine.submit(job, after=after, continues=after is not None, audio=audio)

    def open_audio(self) -> AudioStream:
        """A new stream of the engine's pool (close it at its end): a request's audio, or a text stream's."""
        return self.engine.decoders.open()

    async def next_audio(self, job: Job) -> bytes | None:
        """The next audio of `job` as 16-bit PCM (b"" when none came within WAIT_S), None at its end."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, self._next_audio, job)

    def _next_audio(self, job: Job) -> bytes | None:
        try:
            audio = job.next_audio(timeout=WAIT_S)
        except queue.Empty:
            return b""
        return None if audio is None else pcm_bytes(np.concatenate(audio))


def _in_wyoming_terms(e: ApiError) -> ApiError:
    field = WYOMING_FIELDS.get(e.param or "")
    if field is None:
        return e
    return ApiError(e.status, e.message.replace(repr(e.param), repr(field)), field, e.code, e.type)


def _speaker_id(speaker: Any) -> int:
    if isinstance(speaker, str) and speaker.isascii() and speaker.isdigit() and len(speaker) <= 7:
        return int(speaker)
    if isinstance(speaker, int) and not isinstance(speaker, bool):
        return speaker
    raise ApiError(400, f"the voice's speaker must be a CSM speaker id (a whole number from 0 to 1000000), got "
                   f"{speaker!r}", param="speaker", code="invalid_value")
