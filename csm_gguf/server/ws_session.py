"""A websocket speech session (protocol in the README): settings, text in pieces, flushes; audio for
each complete sentence as soon as it is spoken, a JSON summary after each flush."""

from __future__ import annotations

import json
import logging
import queue
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import numpy as np
from simple_websocket import ConnectionClosed

from ..audio import SAMPLE_RATE, StreamEncoder
from ..tempo import TimeStretch
from ..text import cut_between_words, is_blank, take_sentences
from ..tts import decode_frames
from .engine import Job
from .errors import ApiError, generation_error
from .limits import MAX_INPUT_CHARS
from .schemas import MODELS, SpeechRequest

log = logging.getLogger(__name__)


@dataclass
class Utterance:
    """Websocket audio from the first sentence to a flush: one decoder state and one encoder, so the
    sentences join without seams into one file."""

    encoder: StreamEncoder
    state: Any
    stretch: TimeStretch | None = None  # from the first sentence at a speed other than 1, to the end
    started: float = field(default_factory=time.monotonic)
    first_audio: float | None = None
    sentences: int = 0
    frames: int = 0
    samples: int = 0
    input_tokens: int = 0
    bytes: int = 0

    def summary(self) -> dict:
        return {
            "type": "done",
            "sentences": self.sentences,
            "frames": self.frames,
            "audio_seconds": round(self.samples / SAMPLE_RATE, 3),
            "bytes": self.bytes,
            "response_format": self.encoder.format,
            "sample_rate": SAMPLE_RATE,
            "first_audio_ms": None if self.first_audio is None else round(1000 * (self.first_audio - self.started)),
            "elapsed_ms": round(1000 * (time.monotonic() - self.started)),
            "usage": {"input_tokens": self.input_tokens, "output_tokens": self.frames,
                      "total_tokens": self.input_tokens + self.frames},
        }


@dataclass
class Sentence:
    """A sentence waiting in a websocket session, with the settings it was sent under (a later change of
    voice or format does not reach back) and the voice it belongs to."""

    text: str
    settings: SpeechRequest
    voice: int  # sentences of one voice prompt each other; another voice starts afresh
    job: Job | None = None  # once submitted (the next sentence is, while the one before is spoken)


FLUSH = None  # in a session's queue: the end of the file being sent
VOICE_FIELDS = ("voice", "speaker_id", "context")  # what makes a session's voice (not format or sampling)
RETRY_S = 0.25  # a full server: a session keeps its sentence and tries again after this long


class WebsocketSession:
    """One websocket connection (protocol in the README): settings, text in pieces, flushes; audio
    for each complete sentence as soon as it is spoken, a JSON summary after each flush."""

    def __init__(self, ws, codec, parse: Callable[..., SpeechRequest], submit: Callable[[SpeechRequest], Job]):
        self.ws, self.codec, self.parse, self.submit = ws, codec, parse, submit
        self.fields: dict[str, Any] = {"model": MODELS[0]}  # settings persist until changed
        self.settings = parse(self.fields, need_input=False)
        self.voice = 0  # counts changes of VOICE_FIELDS
        self.buffer = ""  # text not yet known to end a sentence
        self.queue: deque[Sentence | None] = deque()  # sentences and FLUSHes, in order
        self.retry_at = 0.0
        self.job: Job | None = None  # the sentence being spoken
        self.last: Sentence | None = None  # the last one submitted: the next follows it (its context, same voice)
        self.utterance: Utterance | None = None

    def run(self) -> None:
        try:
            while True:
                wait = max(0.0, self.retry_at - time.monotonic()) if self.queue else None
                message = self.ws.receive(timeout=0 if self.job else wait)
                if message is not None:
                    self.handle(message)
                if self.job is None and self.queue and time.monotonic() >= self.retry_at:
                    if self.queue[0] is FLUSH:
                        self.queue.popleft()
                        self.finish()
                    else:
                        self.start(self.queue[0])
                if self.job is not None:
                    self.follow()
                    self.pump()
        except (ConnectionClosed, OSError):  # the client left; a reset can surface as OSError mid-send
            pass
        finally:
            for job in [self.job, *(s.job for s in self.queue if s is not FLUSH)]:
                if job is not None:
                    job.cancel()
            if self.utterance is not None:
                self.utterance.encoder.close()

    def error(self, e: ApiError) -> None:
        self.ws.send(json.dumps({"type": "error", **e.body()}))

    def handle(self, message: str | bytes) -> None:
        try:
            if isinstance(message, bytes):
                raise ApiError(400, "send JSON text messages, not binary", code="invalid_json")
            try:
                body = json.loads(message)
            except ValueError as e:
                raise ApiError(400, f"the message is not valid JSON: {e}", code="invalid_json") from None
            if not isinstance(body, dict):
                raise ApiError(400, "a message must be a JSON object", code="invalid_json")
            kind = body.pop("type", "speech")
            if kind == "text":
                if set(body) != {"text"} or not isinstance(body["text"], str):
                    raise ApiError(400, 'a text message is {"type": "text", "text": "..."}', param="text")
                self.add_text(body["text"])
            elif kind == "flush":
                self.add_text("\n")
                self.queue.append(FLUSH)
            elif kind == "speech":
                text = body.pop("input", None)
                fields = {**self.fields, **body}
                request = self.parse({**fields, "input": text} if text is not None else fields,
                                     need_input=text is not None)
                if text is not None:
                    self.add_text("\n")  # text still pending is spoken first, as it was sent
                if any(fields.get(k) != self.fields.get(k) for k in VOICE_FIELDS):
                    self.voice += 1
                self.fields, self.settings = fields, request
                if text is not None:
                    # a whole request: spoken as over HTTP (in CSM's pieces), and the file ends with it
                    self.queue.extend([Sentence(text, request, self.voice), FLUSH])
            else:
                raise ApiError(400, f"unknown message type {kind!r}: use speech, text or flush", param="type")
        except ApiError as e:
            self.error(e)
        except Exception as e:  # a bug of ours: said, as over HTTP, and the session goes on
            log.exception("unexpected error in a websocket message")
            self.error(ApiError(500, f"internal error: {e}", type="server_error"))

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

    def submit_sentence(self, sentence: Sentence) -> None:
        """Submit `sentence` to follow the last one submitted (see Engine.submit), with it as context if in
        the same voice."""
        last = self.last
        settings = replace(sentence.settings, job=replace(sentence.settings.job, text=sentence.text))
        if last is None:
            sentence.job = self.submit(settings)
        else:
            sentence.job = self.submit(settings, after=last.job, continues=last.voice == sentence.voice)
        self.last = sentence

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
                self.queue.popleft()
                self.error(e)
                return
        self.queue.popleft()
        self.job = sentence.job
        if self.utterance is None:
            self.utterance = Utterance(StreamEncoder(fmt), self.codec.decoder_state(1))
        u, speed = self.utterance, sentence.settings.speed
        if u.stretch is not None:
            u.stretch.speed = speed
        elif speed != 1.0:  # from here on, through the end of the file: stopping it would leave a gap
            u.stretch = TimeStretch(speed)

    def pump(self) -> None:
        """Send the audio of the frames made so far, waiting briefly for some."""
        try:
            frames = self.job.next_frames(timeout=0.05)
        except queue.Empty:
            return
        except Exception as e:
            self.job = None
            self.error(generation_error(e))
            return
        u = self.utterance
        if frames is None:
            u.sentences += 1
            u.frames += self.job.frames
            u.input_tokens += self.job.input_tokens
            self.job = None
            return
        audio = decode_frames(self.codec, u.state, frames)
        self.send_samples(audio if u.stretch is None else u.stretch.feed(audio))

    def send_samples(self, audio: np.ndarray) -> None:
        self.utterance.samples += len(audio)
        self.send_audio(self.utterance.encoder.feed(audio))

    def send_audio(self, data: bytes) -> None:
        if data:
            u = self.utterance
            u.first_audio = u.first_audio or time.monotonic()
            u.bytes += len(data)
            self.ws.send(data)

    def finish(self) -> None:
        """Everything flushed is spoken: end the audio file and report."""
        u = self.utterance
        if u is None:  # nothing was spoken: no audio, and the usual report with zeros
            u = Utterance(StreamEncoder(self.settings.response_format), state=None)
        elif u.frames:  # else its sentences failed or said nothing: no empty file (a bare wav header)
            if u.stretch is not None:
                self.send_samples(u.stretch.finish())
            self.send_audio(u.encoder.finish())
        u.encoder.close()
        self.ws.send(json.dumps(u.summary()))
        self.utterance = None
