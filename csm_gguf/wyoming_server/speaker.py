"""A connection's speech, spoken in the order asked: for each synthesize, or each sentence of a stream,
audio-start, audio-chunks as frames are decoded, audio-stop; synthesize-stopped where a stream ends.

Each request is submitted to the engine as soon as it is known (a stream's sentence follows the one before
it: it takes over its slot and continues its voice, see Engine.submit), and its audio is sent once the
requests before it are. A full server makes a request wait for a slot (Wyoming has no "busy" answer that
clients retry, and a stream must not lose a sentence from its middle)."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.error import Error
from wyoming.event import Event
from wyoming.tts import SynthesizeStopped

from ..audio import SAMPLE_RATE
from ..server.engine import Job, QueueFull, SpeechJob
from ..server.errors import ApiError, generation_error
from ..server.schemas import SpeechRequest
from .service import WyomingService

if TYPE_CHECKING:
    from ..mimi import AudioStream

log = logging.getLogger(__name__)
RETRY_S = 0.25  # a full server: a request tries again after this long
# Requests a connection may have waiting (a stream's each sentence is one): its next events are read once one is
# spoken. A stream's sentences are all submitted at once, as followers that no queue limit refuses: without
# this, one client's text could queue jobs without end.
MAX_QUEUED = 64
WIDTH, CHANNELS = 2, 1  # 16-bit mono


@dataclass(eq=False)
class TextStream:
    """A synthesize-start .. synthesize-stop: its settings, the text not yet known to end a sentence, the
    stream of the codec its sentences share (their audio joins without seams) and its last sentence submitted."""

    settings: SpeechRequest | None  # None: synthesize-start was refused; its text is not spoken
    buffer: str = ""
    audio: AudioStream | None = None
    last: Job | None = None


@dataclass(eq=False)
class Speech:
    """A synthesize, or a sentence of a stream; or one refused (`error`), answered in its turn."""

    spec: SpeechJob | None
    stream: TextStream | None = None
    job: Job | None = None
    error: ApiError | None = None  # why it cannot be spoken: said in its turn (Speaker._refuse)
    audio: AudioStream | None = None  # a synthesize's own stream of the codec (a stream's sentences share one)


class Refused(Exception):
    """A synthesize was answered with an error in place of its audio: its connection ends (Speaker._refuse)."""


STOPPED = "synthesize-stopped"  # in a Speaker's queue: a stream's end


def error_event(e: ApiError) -> Event:
    return Error(text=e.message, code=e.code or e.type).event()


@dataclass(eq=False)
class Speaker:
    service: WyomingService
    write: Callable[[Event], Awaitable[None]]
    hang_up: Callable[[], None] = lambda: None  # ends the connection: where this can speak no more (a bug)
    end: Callable[[], None] = lambda: None  # closes the connection once what was written has gone (Refused)
    queue: deque = field(default_factory=deque)  # Speech and STOPPED, in the order asked
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    freed: asyncio.Event = field(default_factory=asyncio.Event)  # set as the queue shortens
    task: asyncio.Task | None = None
    spoken: TextStream | None = None  # the text stream spoken last, until its synthesize-stopped

    def __post_init__(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run(), name="wyoming speaker")

    async def say(self, speech: Speech) -> None:
        """Queue `speech`, once fewer than MAX_QUEUED wait (the caller, reading the client's events, waits)."""
        while len(self.queue) >= MAX_QUEUED and not self.task.done():
            self.freed.clear()
            await self.freed.wait()
        if self.task.done():  # it failed (and hung up): nothing more is spoken on this connection
            return
        self.queue.append(speech)
        await self.submit_waiting()
        self.wake.set()

    def stopped(self) -> None:
        self.queue.append(STOPPED)
        self.wake.set()

    def close(self) -> None:
        """The client left: its requests end before their next frame, queued or not."""
        self.task.cancel()
        for item in self.queue:
            if item is not STOPPED and item.job is not None:
                item.job.cancel()
        for audio in self.audio_streams():
            audio.close()
        self.queue.clear()
        self.freed.set()

    def audio_streams(self) -> list[AudioStream]:
        """The codec streams of the requests queued, of their text streams and of the one being spoken."""
        held = [self.spoken, *self.queue, *(item.stream for item in self.queue if item is not STOPPED)]
        return [a for item in held if item not in (None, STOPPED) and (a := item.audio) is not None]

    def end_stream(self) -> None:
        """The text stream spoken is over: its codec stream is closed (its row goes to the next stream)."""
        if self.spoken is not None and self.spoken.audio is not None:
            self.spoken.audio.close()
        self.spoken = None

    def audio_for(self, speech: Speech) -> AudioStream:
        """Where `speech`'s audio is decoded: its own stream, or its text stream's (from its first sentence)."""
        owner = speech.stream or speech
        if owner.audio is None:
            owner.audio = self.service.open_audio()
        return owner.audio

    async def submit_waiting(self) -> None:
        """Submit the queued requests not yet submitted, in order, until the server is full."""
        for speech in list(self.queue):
            if speech is STOPPED or speech.job is not None or speech.error is not None:
                continue
            stream = speech.stream
            try:
                speech.job = self.service.submit(speech.spec, self.audio_for(speech),
                                                 after=stream.last if stream else None)
            except QueueFull:
                return
            except (ValueError, RuntimeError) as e:  # text the engine cannot speak; shutting down
                speech.error = generation_error(e)
                continue
            if stream is not None:
                stream.last = speech.job

    async def _run(self) -> None:
        try:
            while True:
                while not self.queue:
                    self.wake.clear()
                    await self.wake.wait()
                item = self.queue[0]
                if item is STOPPED:
                    self.end_stream()
                    await self.write(SynthesizeStopped().event())
                else:
                    await self._speak(item)
                self.queue.popleft()
                self.freed.set()
        except (ConnectionError, OSError):  # the client left while audio was sent to it
            self.close()
        except Refused:  # said: nothing more is spoken, and the connection ends once the error has gone
            self.close()
            self.end()
        except Exception:  # a bug of ours: nothing more is spoken on this connection, nothing left generating
            log.exception("speaking a Wyoming request failed")
            self.close()
            self.hang_up()  # else its next requests would be generated for no one, and its client wait

    async def _speak(self, speech: Speech) -> None:
        while speech.job is None and speech.error is None:
            await asyncio.sleep(RETRY_S)
            await self.submit_waiting()
        if speech.error is not None:
            await self._refuse(speech, speech.error)
            return
        if speech.stream is None:
            try:
                await self._send(speech)
            finally:
                speech.audio.close()
        else:  # its stream's codec stream is closed at the stream's synthesize-stopped
            self.spoken = speech.stream
            await self._send(speech)

    async def _refuse(self, speech: Speech, error: ApiError) -> None:
        """`speech` cannot be spoken: its error, in its turn (after the audio asked for before it). A stream's
        sentence: the stream goes on (its synthesize-stopped ends it for the client). A synthesize: the
        connection ends too (Refused), as wyoming-piper's does: a client of the protocol's flow waits for
        audio-stop or the end of the connection, and Home Assistant's takes no error event."""
        await self.write(error_event(error))
        if speech.stream is None:
            raise Refused

    async def _send(self, speech: Speech) -> None:
        started = False
        try:
            while (audio := await self.service.next_audio(speech.job)) is not None:
                if audio:  # b"": none yet
                    if not started:
                        await self.write(AudioStart(SAMPLE_RATE, WIDTH, CHANNELS).event())
                        started = True
                    await self.write(AudioChunk(SAMPLE_RATE, WIDTH, CHANNELS, audio).event())
                await self.submit_waiting()  # those the server refused so far, as it frees up
        except (ConnectionError, OSError):
            raise
        except Exception as e:  # generation failed (a prompt too long for the context, a shutdown...)
            if not started:
                await self._refuse(speech, generation_error(e))
                return
            await self.write(error_event(generation_error(e)))  # then the end of the audio it had
        if not started:  # no frame at all: an empty audio
            await self.write(AudioStart(SAMPLE_RATE, WIDTH, CHANNELS).event())
        await self.write(AudioStop().event())
