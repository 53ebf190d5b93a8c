"""The server's engine: one thread owns the llama.cpp contexts and generates every active request's
next frame in the same llama_decode calls (continuous batching). Requests join and leave between
frames; beyond `max_streams` they wait in a bounded queue. A request may follow another (a websocket
session's next sentence): when that one ends, it takes over its slot unless requests submitted before it
are waiting.

Request threads only submit jobs and read frames back; they decode audio themselves (each with its
own streaming Mimi state), so the engine thread does nothing but generate.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..generator import Segment, Stream
from ..tts import CSM, spoken_context

log = logging.getLogger(__name__)

# Prompt rows read per frame while other requests are speaking: they pause for one decode of this
# many rows (0.24 s on 2 CPU cores at q4_k, milliseconds on a GPU) instead of a whole prompt.
PREFILL_ROWS = 32
SHUTTING_DOWN = "the server is shutting down"


class QueueFull(RuntimeError):
    """Every generation slot is busy and the waiting queue is full."""


@dataclass(frozen=True)
class SpeechJob:
    """What to say and how: the engine's view of one request."""

    text: str
    speaker: int = 0
    context: Sequence[Segment] = ()
    temperature: float = 0.9
    top_k: int = 50
    seed: int | None = None
    max_audio_ms: float | None = None


_END = object()


@dataclass(eq=False)  # jobs are found in the engine's lists by identity: two requests may be alike
class Job:
    """One request inside the engine. The engine thread pushes frames into `out`; the request thread
    reads them with `next_frames` and calls `cancel` when its client goes away."""

    spec: SpeechJob
    pieces: list[str]
    input_tokens: int
    out: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    cancelled: bool = False
    frames: int = 0
    submitted: float = field(default_factory=time.monotonic)
    first_frame: float | None = None
    # Engine-thread state: the piece being spoken, its stream and frames, the previous piece as context.
    piece: int = 0
    stream: Stream | None = None
    made: list[np.ndarray] = field(default_factory=list)
    previous: list[Segment] = field(default_factory=list)
    # Following requests (`Engine.submit(after=...)`): the one that waits for this job to end, whether
    # this job waited for another (then it does not count against the queue's size: it is a request
    # already being served, going on) and takes its last piece as context. `ended` is set under the lock.
    successor: Job | None = None
    follower: bool = False
    continues: bool = False
    ended: bool = False

    def cancel(self) -> None:
        # A plain flag: the engine drops the job (and frees its slot) before the next frame.
        self.cancelled = True

    def next_frames(self, timeout: float | None = None) -> list[np.ndarray] | None:
        """The frames made since the last call (waiting for at least one), or None at the end.
        Raises the error that stopped generation (for instance a prompt that does not fit)."""
        items = [self.out.get(timeout=timeout)]
        while True:
            try:
                items.append(self.out.get_nowait())
            except queue.Empty:
                break
        frames = []
        for item in items:
            if item is _END:
                if frames:
                    self.out.put(_END)  # hand back the frames now, the end on the next call
                return frames or None
            if isinstance(item, BaseException):
                if frames:
                    self.out.put(item)
                    return frames
                raise item
            frames.append(item)
        return frames


class Engine:
    def __init__(self, tts: CSM, max_queue: int = 16):
        self.tts = tts
        self.generator = tts.generator
        self.max_streams = tts.generator.max_streams
        self.max_queue = max_queue
        self.waiting: deque[Job] = deque()
        self.joining: list[Job] = []  # taken from the queue, their prompts being read
        self.active: list[Job] = []
        self.completed = 0
        self.forgotten: list[list[Segment]] = []  # voice prompts whose cached cells go before the next frame
        self._wake = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="csm-engine", daemon=True)
        self._thread.start()

    # --- request threads ----------------------------------------------------------------------------
    def submit(self, spec: SpeechJob, after: Job | None = None, continues: bool = False) -> Job:
        """Queue a request; raises QueueFull when all slots and the queue are taken, ValueError for empty
        text.

        `after`: a request of the same client (a websocket session's sentence). If it has not ended, this
        one waits for it, keeping its place in line from now: when `after` ends, this one takes over its
        slot unless requests submitted before this one are waiting (they go first, in order). A session
        that sends its next sentence while one is spoken thus goes on without queueing behind requests
        that came later, and cannot keep a slot from those that came earlier. Such a follower is never
        refused and does not count against `max_queue` (followers filling the queue would refuse every
        new request while sessions talk, however long they waited to retry). With `continues`,
        what `after` said last (its last piece, or the context it had if it said nothing) is this one's
        previous piece, as between the pieces of a long text: the context gives way to it if both do not
        fit.
        """
        pieces = self.tts.pieces(spec.text)
        job = Job(spec, pieces, input_tokens=len(self.tts.model.tokenize(spec.text)),
                  continues=continues and after is not None)
        with self._wake:
            if self._closing:
                raise RuntimeError(SHUTTING_DOWN)
            if after is not None and not after.ended:
                if after.successor is not None:
                    raise ValueError("that request already has a successor")
                after.successor, job.follower = job, True
                return job
            if job.continues:
                job.previous = list(after.previous)
            queued = sum(not w.follower for w in self.waiting)
            if len(self.active) + len(self.joining) + queued >= self.max_streams + self.max_queue:
                raise QueueFull(
                    f"the server is busy: {len(self.active) + len(self.joining)} requests are being spoken and "
                    f"{queued} wait (CSM_GGUF_MAX_STREAMS={self.max_streams}, "
                    f"CSM_GGUF_QUEUE={self.max_queue}); try again shortly"
                )
            self.waiting.append(job)
            self._wake.notify()
        return job

    def codes(self, spec: SpeechJob) -> np.ndarray:
        """Speak `spec` to its end (in turn with other requests): its codes, (frames, 32)."""
        job = self.submit(spec)
        frames = []
        while (got := job.next_frames()) is not None:
            frames += got
        return np.stack(frames) if frames else np.zeros((0, self.tts.model.config.num_codebooks), np.int64)

    def forget_voice(self, segments: list[Segment]) -> None:
        """Drop a deleted or replaced voice's cached prompt (on the engine thread, between frames)."""
        with self._wake:
            self.forgotten.append(segments)
            self._wake.notify()

    def stats(self) -> dict:
        return {
            "active_streams": len(self.active) + len(self.joining),
            "queue_depth": len(self.waiting),
            "max_streams": self.max_streams,
            "max_queue": self.max_queue,
            "free_slots": len(self.generator.free_slots),
            "decode_calls": self.generator.decode_calls,
            "prompt_positions_read": self.generator.prompt_positions_read,
            "cached_prompts": len(self.generator.prompt_cache.entries),
            "requests_completed": self.completed,
        }

    def close(self) -> None:
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._thread.join()

    # --- the engine thread --------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._wake:
                while not (self.active or self.waiting or self.forgotten or self._closing):
                    self._wake.wait()
                if self._closing:
                    break
                forgotten, self.forgotten = self.forgotten, []
                gone = [job for job in self.waiting if job.cancelled]  # their clients left: free the queue
                for job in gone:
                    self.waiting.remove(job)
                while self.waiting and len(self.active) + len(self.joining) < self.max_streams:
                    self.joining.append(self.waiting.popleft())
            for job in gone:
                self._end(job)
            for segments in forgotten:
                self.generator.forget_voice(segments)
            while self.joining:
                job = self.joining[0]
                cancelled = job.cancelled
                started = not cancelled and self._start_piece(job)  # a failed start ends the job
                with self._wake:  # from joining to active at once: stats() never counts a job twice
                    self.joining.pop(0)
                    if started:
                        self.active.append(job)
                if cancelled:
                    self._end(job)
            self._prefill()
            self._step()
        for job in [*self.active, *self.waiting]:
            self._end(job, RuntimeError(SHUTTING_DOWN))

    def _prefill(self) -> None:
        """Read unread prompts, oldest first: all of them when no one is speaking (requests that arrive
        together start together), else PREFILL_ROWS rows in all."""
        reading = [job for job in self.active if job.stream.prompt is not None and not job.cancelled]
        budget = PREFILL_ROWS if len(reading) < len(self.active) else None
        for job in reading:
            before = job.stream.pos
            try:
                self.generator.prefill(job.stream, budget)
            except Exception as e:  # a llama.cpp failure: fail this request, keep serving
                log.exception("reading a prompt failed")
                self._end(job, e)
                continue
            if budget is not None:
                budget -= job.stream.pos - before
                if budget <= 0:
                    break

    def _step(self) -> None:
        for job in [j for j in self.active if j.cancelled]:
            self._end(job)
        ready = [job for job in self.active if job.stream.prompt is None]
        if not ready:
            return
        try:
            codes = self.generator.step([job.stream for job in ready])
        except Exception as e:  # a llama.cpp failure: fail these requests, keep serving
            log.exception("generation step failed")
            for job in ready:
                self._end(job, e)
            return
        now = time.monotonic()
        for job, frame in zip(ready, codes):
            if frame.any():  # an all-zero frame is the end of speech, not audio
                job.made.append(frame)
                job.frames += 1
                job.first_frame = job.first_frame or now
                job.out.put(frame)
            if job.stream.done:
                self._next_piece(job)

    def _start_piece(self, job: Job) -> bool:
        """Claim a slot and read the piece's prompt; on failure the job ends with the error."""
        spec, piece = job.spec, job.pieces[job.piece]
        try:
            sampling = self.tts.piece_sampling(piece, job.piece, spec.temperature, spec.top_k, spec.seed,
                                               spec.max_audio_ms)
            context = self.tts.piece_context(piece, spec.speaker, spec.context, job.previous, sampling)
            prompt = self.generator.prompt_embeddings(piece, spec.speaker, context)
            shared = self.generator.voice_rows(spec.context, context)  # the voice prompt is read once
            job.stream = self.generator.start(prompt, sampling, read_prompt=False, shared=shared)
        except Exception as e:
            job.stream = None
            self._end(job, e)
            return False
        return True

    def _next_piece(self, job: Job) -> None:
        """The piece is spoken: free its slot, then go on with the next piece (in the slot just freed)
        with this one as context, so the voice carries over as in CSM.frames."""
        self.generator.finish(job.stream)
        job.stream = None
        job.previous = spoken_context(job.previous, job.spec.speaker, job.pieces[job.piece], job.made)
        job.made = []
        job.piece += 1
        if job.piece < len(job.pieces) and not job.cancelled:
            if not self._start_piece(job):
                return
        else:
            self._end(job)

    def _end(self, job: Job, error: BaseException | None = None) -> None:
        if job.stream is not None:
            self.generator.finish(job.stream)
            job.stream = None
        with self._wake:
            if job in self.active:
                self.active.remove(job)
            job.ended = True
            successor = job.successor
            if successor is not None:
                if successor.continues:
                    successor.previous = list(job.previous)
                if not self._closing:  # its place in line: after the requests submitted before it
                    place = next((i for i, w in enumerate(self.waiting) if w.submitted > successor.submitted),
                                 len(self.waiting))
                    self.waiting.insert(place, successor)
        self.completed += 1
        job.out.put(_END if error is None else error)
        if successor is not None and self._closing:
            self._end(successor, RuntimeError(SHUTTING_DOWN))
