"""A websocket speech session's scheduling (its messages: ws_protocol): settings, text in sentences,
flushes; each complete sentence spoken as soon as it can be, its audio sent as it is made, a summary after
each flush. The sentences of one voice follow one another in the engine (Engine.submit's `after`)."""

from __future__ import annotations

import itertools
import logging
import queue
import time
from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
from simple_websocket import ConnectionClosed

from ..audio import StreamEncoder
from ..generator import Segment
from ..tempo import TimeStretch
from ..text import cut_between_words, is_blank, take_sentences
from ..voices import VoicesFolderError
from . import limits
from .engine import Job
from .errors import ApiError, folder_error, generation_error
from .limits import MAX_INPUT_CHARS, MAX_WS_WAITING_CHARS
from .schemas import MODELS, ContextAudio, SpeechRequest
from .services import Services
from .ws_protocol import Flush, Speech, Summary, Text, error_message, parse_message, voice_changed

if TYPE_CHECKING:
    from ..mimi import AudioStream

log = logging.getLogger(__name__)

FLUSH = None  # in a session's queue: the end of the file being sent
RETRY_S = 0.25  # a full server: a session keeps its sentence and tries again after this long


@dataclass
class Utterance:
    """Websocket audio from the first sentence to a flush: one stream of the codec and one encoder, so the
    sentences join without seams into one file."""

    encoder: StreamEncoder
    summary: Summary
    audio: AudioStream | None = None  # its first sentence's, which its others share (see `audio_for`)
    stretch: TimeStretch | None = None  # from the first sentence at a speed other than 1, to the end

    def close(self) -> None:
        self.encoder.close()
        if self.audio is not None:
            self.audio.close()  # its row of the codec's pool goes to the next stream


@dataclass
class Sentence:
    """A sentence waiting in a websocket session, with the settings it was sent under (a later change of
    voice or format does not reach back) and the voice it belongs to."""

    text: str
    settings: SpeechRequest
    voice: int  # sentences of one voice prompt each other; another voice starts afresh
    job: Job | None = None  # once submitted (the next sentence is, while the one before is spoken)
    audio: AudioStream | None = None  # the codec stream of its file, from its submission
    # When the client had sent all of it (the message that completed it was read): where a file's figures
    # count from, as a client waits from then, also while the sentence waits for a slot or for the one before
    complete_at: float = field(default_factory=time.monotonic)


class WebsocketSession:
    """One websocket connection: its settings, the sentences waiting, the one being spoken."""

    def __init__(self, ws, services: Services):
        self.ws, self.services = ws, services
        self.fields: dict[str, Any] = {"model": MODELS[0]}  # settings persist until changed
        self.settings = services.parse(self.fields, need_input=False)
        self.encoded: dict[ContextAudio, Segment] = {}  # the settings' context audio, encoded once
        self.voice = 0  # counts changes of ws_protocol.VOICE_FIELDS
        self.buffer = ""  # text not yet known to end a sentence
        self.queue: deque[Sentence | None] = deque()  # sentences and FLUSHes, in order
        self.queued_chars = 0  # the text of the sentences in `queue`
        self.retry_at = 0.0
        self.job: Job | None = None  # the sentence being spoken
        self.last: Sentence | None = None  # the last one submitted: the next follows it (its context, same voice)
        self.utterance: Utterance | None = None

    def run(self) -> None:
        try:
            while True:
                try:
                    self.step()
                except (ConnectionClosed, OSError):
                    raise
                except Exception as e:  # a bug of ours: said, as over HTTP, and the session goes on without it
                    log.exception("unexpected error in a websocket session")
                    self.drop_failed()
                    self.error(ApiError(500, f"internal error: {e}", type="server_error"))
        except (ConnectionClosed, OSError) as e:  # the client left; a reset can surface as OSError mid-send
            if isinstance(e, BlockingIOError):  # a send's timeout (connection.py): the client stopped reading
                log.info("a websocket client read nothing for %g s: its session is closed", limits.STALLED_CLIENT_S)
        finally:
            for job in [self.job, *(s.job for s in self.queue if s is not FLUSH)]:
                if job is not None:
                    job.cancel()
            if self.utterance is not None:
                self.utterance.close()
            for sentence in self.queue:  # a next file's, submitted already: its codec stream holds a row
                if sentence is not FLUSH and sentence.audio is not None:
                    sentence.audio.close()

    def step(self) -> None:
        """Take a message if there is one, start what is next in line, and send what is spoken."""
        wait = max(0.0, self.retry_at - time.monotonic()) if self.queue else None
        message = self.ws.receive(timeout=0 if self.job else wait)
        if message is not None:
            self.handle(message)
        if self.job is None and self.queue and time.monotonic() >= self.retry_at:
            if self.queue[0] is FLUSH:
                self.take_next()
                self.finish()
            else:
                self.start(self.queue[0])
        if self.job is not None:
            self.follow()
            self.pump()

    def drop_failed(self) -> None:
        """After an unexpected error in `step`: drop what failed (the sentence being spoken or started, else
        the file being finished), so that the session goes on with the rest of its queue."""
        if self.job is not None:
            self.job.cancel()
            self.job = None
        elif self.queue and self.queue[0] is not FLUSH:
            failed = self.take_next()
            if failed.job is not None:
                failed.job.cancel()
        elif self.utterance is not None:
            self.utterance.close()
            self.utterance = None

    def error(self, e: ApiError) -> None:
        self.ws.send(error_message(e))

    def handle(self, message: str | bytes) -> None:
        try:
            parsed = parse_message(message)
            if isinstance(parsed, Text):
                self.check_room(len(parsed.text), "text")
                self.add_text(parsed.text)
            elif isinstance(parsed, Flush):
                self.add_text("\n")
                self.queue.append(FLUSH)
            else:
                self.change(parsed)
        except ApiError as e:
            self.error(e)
        except VoicesFolderError as e:  # the server's setup: said without its paths
            self.error(folder_error(e))
        except Exception as e:  # a bug of ours: said, as over HTTP, and the session goes on
            log.exception("unexpected error in a websocket message")
            self.error(ApiError(500, f"internal error: {e}", type="server_error"))

    def change(self, message: Speech) -> None:
        """New settings, checked whole before they apply; with input, a whole request spoken with them (as
        over HTTP, in CSM's pieces), and the file ends with it. Text sent before keeps the settings it was
        sent under: what is still pending ends there, as a sentence of its own (a dialogue's next speaker
        never says the last sentence of the one before)."""
        text, fields = message.input, {**self.fields, **message.fields}
        self.check_room(len(text or ""), "input")
        checked = self.services.check({**fields, "input": text} if text is not None else fields,
                                      need_input=text is not None)
        new_audio = any(isinstance(a, ContextAudio) and a not in self.encoded for a in checked.job.context)
        # Encoding audio is a request's work: it takes a place in line, as over HTTP (429 there, an error
        # message here, the settings unchanged), so that sessions cannot encode past the server's limits.
        with self.services.place() if new_audio else nullcontext():
            request = self.services.encode(checked, self.encoded)
        self.encoded = {a: self.encoded[a] for a in checked.job.context if isinstance(a, ContextAudio)}
        if text is not None or fields != self.fields:
            self.add_text("\n")  # text still pending is spoken first, as it was sent
        if request.response_format != self.settings.response_format and self.unflushed():
            self.queue.append(FLUSH)  # another format: the file being sent ends, with its done, once spoken
        if voice_changed(self.fields, fields):
            self.voice += 1
        self.fields, self.settings = fields, request
        if text is not None:
            self.queue.extend([Sentence(text, request, self.voice), FLUSH])
            self.queued_chars += len(text)

    def unflushed(self) -> bool:
        """Whether a file is begun that no flush in the queue ends yet (sentences waiting, or being spoken)."""
        if self.queue:
            return self.queue[-1] is not FLUSH
        return self.utterance is not None

    def check_room(self, chars: int, param: str) -> None:
        """ApiError unless `chars` more characters fit in what this session has waiting to be spoken."""
        waiting = self.queued_chars + len(self.buffer)
        if waiting + chars > MAX_WS_WAITING_CHARS:
            raise ApiError(429, f"{waiting} characters of this session are waiting to be spoken and {chars} more "
                                f"would pass its limit of {MAX_WS_WAITING_CHARS}: this message was not taken; send "
                                "it again once more of the audio has come", param=param, code="too_much_text_waiting",
                           type="rate_limit_error")

    def take_next(self) -> Sentence | None:
        """The first sentence (or FLUSH) out of the queue."""
        taken = self.queue.popleft()
        if taken is not FLUSH:
            self.queued_chars -= len(taken.text)
        return taken

    def add_text(self, text: str) -> None:
        sentences, self.buffer = take_sentences(self.buffer + text)
        self.enqueue(sentences)
        while len(self.buffer) > MAX_INPUT_CHARS:
            head, self.buffer = cut_between_words(self.buffer, MAX_INPUT_CHARS)
            if not is_blank(head):  # blank text waits (kept as sent) for words to follow, up to here
                self.error(ApiError(400, f"more than {MAX_INPUT_CHARS} characters without a sentence end: "
                                         "speaking them now", param="text", code="string_above_max_length"))
                self.enqueue([head])

    def enqueue(self, sentences: list[str]) -> None:
        self.queue.extend(Sentence(s, self.settings, self.voice) for s in sentences)
        self.queued_chars += sum(map(len, sentences))

    def submit_sentence(self, sentence: Sentence) -> None:
        """Submit `sentence` to follow the last one submitted (see Engine.submit), with it as context if in
        the same voice."""
        last = self.last
        settings = replace(sentence.settings, job=replace(sentence.settings.job, text=sentence.text))
        audio = self.audio_for(sentence)
        if last is None:
            sentence.job = self.services.submit(settings, audio=audio)
        else:
            sentence.job = self.services.submit(settings, after=last.job, continues=last.voice == sentence.voice,
                                                audio=audio)
        sentence.audio, self.last = audio, sentence

    def audio_for(self, sentence: Sentence) -> AudioStream:
        """The codec stream `sentence`'s audio is decoded in: its file's. A new one where it begins a file (see
        `start`): no file is being sent, a flush comes before it, or it asks for another format."""
        before = itertools.takewhile(lambda s: s is not sentence, self.queue)
        u, last = self.utterance, self.last
        if (any(s is FLUSH for s in before) or u is None or u.encoder.format != sentence.settings.response_format
                or last is None or last.audio is None):
            return self.services.decoders.open()
        return last.audio

    def follow(self) -> None:
        """Submit the next sentence already waiting, so that it takes its place in line now and takes over
        this one's slot (see Engine.submit): queued only once this one ends, behind requests that came
        meanwhile, it would leave a gap in the audio."""
        following = next((s for s in self.queue if s is not FLUSH), None)
        if following is not None and following.job is None:
            try:
                self.submit_sentence(following)
            except ApiError:
                pass  # submitted again in its turn, which reports the error then

    def start(self, sentence: Sentence) -> None:
        """Speak the next sentence; it leaves the queue unless the server is full (then it waits)."""
        fmt = sentence.settings.response_format
        if self.utterance is not None and self.utterance.encoder.format != fmt:
            self.finish()  # another format: the file being sent ends here
        if sentence.job is None:
            try:
                self.submit_sentence(sentence)
            except ApiError as e:
                if e.code == "queue_full":  # keep the sentence: a file must not lose its middle
                    self.retry_at = time.monotonic() + RETRY_S
                    return
                self.take_next()
                self.error(e)
                return
        self.take_next()
        self.job = sentence.job
        if self.utterance is None:
            self.utterance = Utterance(StreamEncoder(fmt), Summary(fmt, started=sentence.complete_at), sentence.audio)
        u, speed = self.utterance, sentence.settings.speed
        if u.stretch is not None:
            u.stretch.speed = speed
        elif speed != 1.0:  # from here on, through the end of the file: stopping it would leave a gap
            u.stretch = TimeStretch(speed)

    def pump(self) -> None:
        """Send the audio of the frames made so far, waiting briefly for some."""
        try:
            chunks = self.job.next_audio(timeout=0.05)
        except queue.Empty:
            return
        except Exception as e:
            self.job = None
            self.error(generation_error(e))
            return
        u = self.utterance
        if chunks is None:
            u.summary.sentences += 1
            u.summary.frames += self.job.frames
            u.summary.input_tokens += self.job.input_tokens
            self.job = None
            return
        audio = np.concatenate(chunks)
        self.send_samples(audio if u.stretch is None else u.stretch.feed(audio))

    def send_samples(self, audio: np.ndarray) -> None:
        self.utterance.summary.samples += len(audio)
        self.send_audio(self.utterance.encoder.feed(audio))

    def send_audio(self, data: bytes) -> None:
        if data:
            summary = self.utterance.summary
            summary.first_audio = summary.first_audio or time.monotonic()
            summary.bytes += len(data)
            self.ws.send(data)

    def finish(self) -> None:
        """Everything flushed is spoken: end the audio file and report."""
        u = self.utterance
        if u is None:  # nothing was spoken: no audio, and the usual report with zeros
            fmt = self.settings.response_format
            u = Utterance(StreamEncoder(fmt), Summary(fmt, started=time.monotonic()))
        elif u.summary.frames:  # else its sentences failed or said nothing: no empty file (a bare wav header)
            if u.stretch is not None:
                self.send_samples(u.stretch.finish())
            self.send_audio(u.encoder.finish())
        u.close()
        self.ws.send(u.summary.message(time.monotonic()))
        self.utterance = None
