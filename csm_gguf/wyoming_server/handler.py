"""One client connection: its events handled in order, its speech spoken by a Speaker meanwhile.

    describe                                     -> info
    synthesize {text, voice: {name, speaker}}    -> audio-start, audio-chunk..., audio-stop
    synthesize-start {voice}, synthesize-chunk {text}..., synthesize-stop
                                                 -> for each sentence once complete: audio-start,
                                                    audio-chunk..., audio-stop; then synthesize-stopped

A synthesize sent during a stream is ignored: Home Assistant (2025.7 and later) sends the whole text
that way too, for servers that do not stream. Bad events are answered with `error` and the connection
goes on, but for a synthesize that cannot be spoken: its `error` (in its turn, after the audio asked for
before it) ends the connection, as wyoming-piper's does, since its client waits for audio-stop or the end
(Home Assistant's takes no error event). Events of other kinds are ignored, as the protocol asks. The
client closing its side ends its requests before their next frame, and so does a client that takes none of
its audio for limits.STALLED_CLIENT_S (its connection is closed)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from wyoming.event import Event
from wyoming.info import Describe
from wyoming.ping import Ping, Pong
from wyoming.server import AsyncEventHandler
from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop

from ..server import limits
from ..server.errors import ApiError
from ..text import take_sentences, take_sentences_within
from ..tts import UNFINISHED_CHARS
from .events import BadEvent, read_event
from .info import tts_info
from .service import WyomingService
from .speaker import Speaker, Speech, TextStream, error_event

log = logging.getLogger(__name__)


def bad(message: str) -> ApiError:
    return ApiError(400, message, code="bad_event")


class WyomingHandler(AsyncEventHandler):
    def __init__(self, service: WyomingService, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        super().__init__(reader, writer)
        self.service = service
        self.speaker = Speaker(service, self.write_event, writer.transport.abort, writer.close)
        self.stream: TextStream | None = None  # between synthesize-start and synthesize-stop

    async def run(self) -> None:
        """AsyncEventHandler.run, with a line that is not an event answered rather than taken for the end."""
        try:
            while True:
                try:
                    event = await read_event(self.reader)
                except BadEvent as e:
                    await self.write_event(error_event(bad(str(e))))
                    continue
                if event is None:
                    break
                await self.handle_event(event)
        except (ConnectionError, OSError):  # the client left while it was answered
            pass
        finally:
            await self.disconnect()
            self.writer.close()

    async def disconnect(self) -> None:
        self.speaker.close()

    async def write_event(self, event: Event) -> None:
        """AsyncEventHandler.write_event, bounded: a client that takes nothing sent to it for
        limits.STALLED_CLIENT_S would hold its codec stream and this connection for ever. It is dropped (its
        requests end as when it leaves)."""
        try:
            await asyncio.wait_for(super().write_event(event), limits.STALLED_CLIENT_S)
        except asyncio.TimeoutError:
            log.info("a client took nothing sent to it for %.0f s: its connection is closed", limits.STALLED_CLIENT_S)
            self.writer.transport.abort()
            raise ConnectionError("the client stopped reading") from None

    async def handle_event(self, event: Event) -> bool:
        log.debug("%s %s", event.type, event.data)
        try:
            await self._handle(event)
        except ApiError as e:
            await self.write_event(error_event(e))
        except (ConnectionError, OSError):
            raise
        except Exception as e:  # a bug of ours: said, and the connection goes on
            log.exception("unexpected error handling a %s event", event.type)
            await self.write_event(error_event(ApiError(500, f"internal error: {e}", type="server_error")))
        return True

    async def _handle(self, event: Event) -> None:
        kind = event.type
        if Describe.is_type(kind):
            await self.write_event(tts_info(self.service.tts.model.path).event())
        elif Ping.is_type(kind):
            await self.write_event(Pong(text=Ping.from_event(event).text).event())
        elif Synthesize.is_type(kind):
            if self.stream is None:  # else the stream's chunks are spoken, not this copy of their text
                await self.speaker.say(await self._synthesize(event))
        elif SynthesizeStart.is_type(kind):
            await self._start(_parsed(event, SynthesizeStart))
        elif SynthesizeChunk.is_type(kind):
            self._open_stream(kind)
            await self._add_text(_text(_parsed(event, SynthesizeChunk).text, kind))
        elif SynthesizeStop.is_type(kind):
            stream = self._open_stream(kind)
            await self._speak(take_sentences(stream.buffer, final=True)[0])
            self.stream = None
            self.speaker.stopped()
        else:
            log.debug("ignoring a %s event", kind)

    async def _synthesize(self, event: Event) -> Speech:
        """A synthesize's speech; one it cannot be is refused in its turn, which ends the connection (see
        Speaker._refuse)."""
        try:
            synthesize = _parsed(event, Synthesize)
            voice = synthesize.voice
            text = _text(synthesize.text, event.type)
            request = await self.service.request_soon(voice and voice.name, voice and voice.speaker, text)
        except ApiError as e:
            return Speech(None, error=e)
        return Speech(request.job)

    async def _start(self, start: SynthesizeStart) -> None:
        if self.stream is not None:
            raise bad("synthesize-start during a stream: end it with synthesize-stop first")
        voice = start.voice
        self.stream = TextStream(settings=None)  # open even if refused: its stop still gets synthesize-stopped
        self.stream.settings = await self.service.request_soon(voice and voice.name, voice and voice.speaker)

    def _open_stream(self, kind: str) -> TextStream:
        if self.stream is None:
            raise bad(f"{kind} outside a stream: send synthesize-start first")
        return self.stream

    async def _add_text(self, text: str) -> None:
        stream = self.stream
        sentences, stream.buffer = take_sentences_within(stream.buffer + text, UNFINISHED_CHARS)
        await self._speak(sentences)

    async def _speak(self, sentences: list[str]) -> None:
        stream = self.stream
        if stream.settings is None:  # its synthesize-start was refused (the error said why)
            return
        for sentence in sentences:
            await self.speaker.say(Speech(self.service.with_text(stream.settings, sentence), stream))


def _parsed(event: Event, kind: type) -> Any:
    voice = event.data.get("voice")
    if isinstance(voice, str):  # a bare name, where the protocol has {"name": ...}: wyoming would drop it unseen
        event = Event(event.type, {**event.data, "voice": {"name": voice}}, event.payload)
    try:
        return kind.from_event(event)
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise bad(f"{event.type}: its data is not what the protocol says ({type(e).__name__}: {e})") from None


def _text(text: Any, kind: str) -> str:
    if not isinstance(text, str):
        raise bad(f"{kind}: 'text' must be a string")
    return text
