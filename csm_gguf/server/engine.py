"""The server's engine: one thread owns the llama.cpp contexts and generates every active request's
next frame in the same llama_decode calls (continuous batching). Requests join and leave between
frames; beyond `max_streams` they wait in a bounded queue. A request may follow another (a websocket
session's next sentence): when that one ends, it takes over its slot unless requests submitted before it
are waiting.

Request threads submit jobs and read back what they make: frames of codes, or, for a job submitted
with an audio stream, its audio, which a second thread decodes from the frames (decoding.py: the frames of
one frame step, of every request, in one batched step of the codec), so that the engine thread does
nothing but generate.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ..generator import Generator, Segment, Stream, check_speaker
from ..plan import Context, Piece, TokenCounts, plan_pieces, split_text
from ..sampling import Sampling
from .decoding import DecodeStage
from .limits import PREFILL_ROWS_CPU, PREFILL_ROWS_GPU

if TYPE_CHECKING:
    from ..mimi import AudioStream, DecoderPool

log = logging.getLogger(__name__)

SHUTTING_DOWN = "the server is shutting down"
ENGINE_FAILED = "the server's engine stopped on an internal error (its log says which): the server must be restarted"


class QueueFull(RuntimeError):
    """Every generation slot is busy and the waiting queue is full."""


class Place:
    """A place in line taken before a request is read (`Engine.place`): a request the server would refuse
    is refused before its body is read and its context audio decoded, so that the memory of requests being
    read is bounded by the slots and the queue, not by the number of clients. `Engine.submit_in` turns it
    into the request's job; `release` gives it back (once)."""

    def __init__(self, engine: Engine):
        self.engine, self.held = engine, True

    def release(self) -> None:
        with self.engine._wake:
            if self.held:
                self.held = False
                self.engine.reserved -= 1

    def __enter__(self) -> Place:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


@dataclass(frozen=True)
class SpeechJob:
    """What to say and how: the engine's view of one request."""

    text: str
    speaker: int = 0
    context: Sequence[Segment] = ()
    sampling: Sampling = Sampling()  # frozen: one default serves every job


_END = object()


def usage(input_tokens: int, frames: int) -> dict:
    """OpenAI's usage record. Output tokens: generated 80 ms frames (each one row of 32 codebook tokens)."""
    return {"input_tokens": input_tokens, "output_tokens": frames, "total_tokens": input_tokens + frames}


@dataclass(eq=False)  # jobs are found in the engine's lists by identity: two requests may be alike
class Job:
    """One request inside the engine. The engine thread pushes frames into `out` (or, for a job with
    `audio`, the codec's thread pushes their audio); the request thread reads them with `next_frames`
    (`next_audio`) and calls `cancel` when its client goes away."""

    spec: SpeechJob
    pieces: list[Piece]
    context: Context  # what the next piece hears: the request's context, then what this request said
    input_tokens: int
    audio: AudioStream | None = None  # where its frames are decoded (several jobs may follow on in one)
    out: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    cancelled: bool = False
    frames: int = 0
    submitted: float = field(default_factory=time.monotonic)
    first_frame: float | None = None
    # Engine-thread state: the piece being spoken, its stream and frames.
    piece: int = 0
    stream: Stream | None = None
    made: list[np.ndarray] = field(default_factory=list)
    # Following requests (`Engine.submit(after=...)`): the one that waits for this job to end, whether
    # this job waited for another (then it does not count against the queue's size: it is a request
    # already being served, going on) and takes its last piece as context. `ended` is set under the lock.
    successor: Job | None = None
    follower: bool = False
    own_work: bool = False  # the server's (`codes`: a built-in voice's prompt), for a request that holds a place
    continues: bool = False
    ended: bool = False
    outcome: str | None = None  # once ended: "completed", "cancelled" (its client left) or "failed"
    decode_failed: bool = False  # the codec failed on its frames (set by the codec's thread)

    def usage(self) -> dict:
        return usage(self.input_tokens, self.frames)

    def cancel(self) -> None:
        # A plain flag: the engine drops the job (and frees its slot) before the next frame.
        self.cancelled = True

    def next_audio(self, timeout: float | None = None) -> list[np.ndarray] | None:
        """For a job with `audio`: the audio of the frames made since the last call (float32 samples, in
        pieces), as `next_frames` gives frames."""
        return self.next_frames(timeout)

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
    def __init__(self, generator: Generator, max_queue: int = 16, decoders: DecoderPool | None = None,
                 prefill_rows: int = 0):
        """`decoders`: the codec's pool, which jobs submitted with an audio stream of it are decoded in.
        `prefill_rows`: prompt rows read between two frames while others speak (0: by device, limits.py)."""
        self.generator = generator
        self.max_streams = generator.max_streams
        self.max_queue = max_queue
        self.prefill_rows = prefill_rows or (PREFILL_ROWS_GPU if generator.layers_on_gpu else PREFILL_ROWS_CPU)
        self.waiting: deque[Job] = deque()
        self.joining: list[Job] = []  # taken from the queue, their prompts being read
        self.active: list[Job] = []
        self.reserved = 0  # places taken by requests still being read (Place)
        self.completed = 0
        self.forgotten: list[list[Segment]] = []  # voice prompts whose cached cells go before the next frame
        # Called on the engine thread as each job ends, with the error that ended it (or None): metrics.
        self.on_end: Callable[[Job, BaseException | None], None] | None = None
        self._wake = threading.Condition()
        self._closing = False  # closed, or failed: no new work
        self._stopped = SHUTTING_DOWN  # why, for what is refused or ended from then on
        self.decoders = decoders
        self.decoding = DecodeStage(decoders) if decoders is not None else None
        self._decode: list[tuple[Job, Any]] = []  # this frame step's output for `decoding`, put at its end
        self._thread = threading.Thread(target=self._run, name="csm-engine", daemon=True)
        self._thread.start()

    # --- request threads ----------------------------------------------------------------------------
    def place(self) -> Place:
        """A place in line for a request about to be read; QueueFull now if there is none (see Place)."""
        with self._wake:
            if self._closing:
                raise RuntimeError(self._stopped)
            self._check_room()
            self.reserved += 1
        return Place(self)

    def _check_room(self) -> None:
        """QueueFull unless a new request fits: requests spoken, waiting or being read, against the slots
        and the queue (followers are not counted, see submit, nor the server's own work, see codes)."""
        queued = sum(not (w.follower or w.own_work) for w in self.waiting)
        if len(self.active) + len(self.joining) + queued + self.reserved >= self.max_streams + self.max_queue:
            raise QueueFull(
                f"the server is busy: {len(self.active) + len(self.joining)} requests are being spoken and "
                f"{queued + self.reserved} wait (CSM_GGUF_MAX_STREAMS={self.max_streams}, "
                f"CSM_GGUF_QUEUE={self.max_queue}); try again shortly"
            )

    def submit_in(self, place: Place, spec: SpeechJob, audio: AudioStream | None = None) -> Job:
        """`submit`, in the place taken for the request: the place is given back and taken by the job under
        one hold of the lock (which submit takes again), so no other request can take it in between."""
        with self._wake:
            place.release()
            return self.submit(spec, audio=audio)

    def submit(self, spec: SpeechJob, after: Job | None = None, continues: bool = False,
               audio: AudioStream | None = None) -> Job:
        """Queue a request; raises QueueFull when all slots and the queue are taken, ValueError for empty
        text or bad settings.

        `audio`: a stream of the engine's `decoders` that the job's frames are decoded in (the job then gives
        audio, `Job.next_audio`); jobs that follow on in one stream join without a seam (a websocket file).

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
        job = self._job(spec, continues and after is not None)
        if audio is not None and self.decoding is None:
            raise ValueError("this engine decodes no audio: it was made without decoders")
        job.audio = audio
        with self._wake:
            if self._closing:
                raise RuntimeError(self._stopped)
            if after is not None and not after.ended:
                if after.successor is not None:
                    raise ValueError("that request already has a successor")
                after.successor, job.follower = job, True
                return job
            if job.continues:
                job.context.previous = list(after.context.previous)
            self._check_room()
            self.waiting.append(job)
            self._wake.notify()
        return job

    def _job(self, spec: SpeechJob, continues: bool) -> Job:
        """The request's plan: its pieces (tokenized once) with their samplings, and its context."""
        check_speaker(spec.speaker)
        count = TokenCounts(self.generator.model)
        texts = split_text(spec.text, count)
        pieces = list(plan_pieces(((spec.speaker, text) for text in texts), spec.sampling, count))
        context = Context(self.generator, spec.context)
        return Job(spec, pieces, context, input_tokens=count(spec.text), continues=continues)

    def codes(self, spec: SpeechJob) -> np.ndarray:
        """Speak `spec` to its end, in turn with the requests: its codes, (frames, 32). For the server's own
        work (a built-in voice's prompt, made once per model, while a request waits for it), so it is never
        refused for a full queue: the requests already in line are the ones it serves. Nor does it count against
        the queue: the request it is made for holds its place already."""
        job = self._job(spec, continues=False)
        job.own_work = True
        with self._wake:
            if self._closing:
                raise RuntimeError(self._stopped)
            self.waiting.append(job)
            self._wake.notify()
        frames = []
        while (got := job.next_frames()) is not None:
            frames += got
        return np.stack(frames) if frames else np.zeros((0, self.generator.cfg.num_codebooks), np.int64)

    def forget_voice(self, segments: list[Segment]) -> None:
        """Drop a deleted or replaced voice's cached prompt (on the engine thread, between frames)."""
        with self._wake:
            self.forgotten.append(segments)
            self._wake.notify()

    def stats(self) -> dict:
        decoders = self.decoders
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
            "codec_steps": decoders.steps if decoders else 0,  # the codec's thread's batched steps
            "codec_stream_steps": decoders.stream_steps if decoders else 0,  # the streams they decoded, summed
            "codec_failed_requests": self.decoding.failed_jobs if self.decoding else 0,
        }

    @property
    def running(self) -> bool:
        """Whether the engine thread is serving (not closed, not died)."""
        return self._thread.is_alive() and not self._closing

    @property
    def failed(self) -> bool:
        """Whether the engine thread died of an error of ours rather than being closed: only a restart helps."""
        return self._stopped == ENGINE_FAILED  # _run sets it on any exception that ends the thread

    def close(self) -> None:
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._thread.join()

    # --- the engine thread --------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._serve()
        except BaseException:  # a bug of ours (a step's own failures end its requests): nothing more is served
            log.critical("the engine stopped on an internal error: every request fails from now on; restart "
                         "the server", exc_info=True)
            with self._wake:
                self._closing, self._stopped = True, ENGINE_FAILED
            self.active += [job for job in self.joining if job not in self.active]
            self.joining.clear()
        for job in [*self.active, *self.waiting]:
            try:
                self._end(job, RuntimeError(self._stopped))
            except Exception:  # after a failure the generator may be in any state: the others still end
                log.exception("ending a request failed")
        self._to_decoding()
        if self.decoding is not None:
            self.decoding.close()

    def _serve(self) -> None:
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
            # The generator's lock, held around llama.cpp's calls, is the codec's `cuda_lock`: the codec's
            # thread records no CUDA graph while llama.cpp may be recording its own.
            with self.generator.lock:
                self._frame_step(gone, forgotten)
            self._to_decoding()

    def _frame_step(self, gone: list[Job], forgotten: list[list[Segment]]) -> None:
        """End the jobs whose clients left while queued, start the joining ones, read prompts, make a frame."""
        for job in gone:
            self._end(job)
        for segments in forgotten:
            try:
                self.generator.forget_voice(segments)
            except Exception:  # a prompt it cannot read was never cached: the engine goes on
                log.exception("forgetting a voice's cached prompt failed")
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

    def _put(self, job: Job, item: Any) -> None:
        """Hand `job` a frame or its end: directly, or through the codec's thread for a job with audio."""
        if job.audio is None:
            job.out.put(item)
        else:
            self._decode.append((job, item))

    def _to_decoding(self) -> None:
        """This frame step's frames and ends to the codec's thread: one call, so it decodes them together."""
        if self._decode:
            self.decoding.put(self._decode)
            self._decode = []

    def _prefill(self) -> None:
        """Read unread prompts, oldest first, several in one decode: all of them when no one is speaking
        (requests that arrive together start together), else `prefill_rows` rows in all."""
        reading = [job for job in self.active if job.stream.prompt is not None and not job.cancelled]
        if not reading:
            return
        budget = self.prefill_rows if len(reading) < len(self.active) else None
        try:
            self.generator.prefill([job.stream for job in reading], budget)
        except Exception as e:  # a llama.cpp failure: fail the requests still reading, keep serving
            log.exception("reading a prompt failed")
            for job in reading:
                if job.stream is not None and job.stream.prompt is not None:
                    self._end(job, e)

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
                self._put(job, frame)
            if job.stream.done:
                self._next_piece(job)

    def _start_piece(self, job: Job) -> bool:
        """Claim a slot and read the piece's prompt; on failure the job ends with the error."""
        piece = job.pieces[job.piece]
        try:
            prompt, shared = job.context.prompt(piece)  # shared: the voice prompt, read once, then cached
            job.stream = self.generator.start(prompt, piece.sampling, read_prompt=False, shared=shared)
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
        job.context.said(job.pieces[job.piece], job.made)
        job.made = []
        job.piece += 1
        if job.piece < len(job.pieces) and not job.cancelled:
            if not self._start_piece(job):
                return
        else:
            self._end(job)

    def _end(self, job: Job, error: BaseException | None = None) -> None:
        # Decided before its end is handed on: after it, its consumer's own clean-up cancels the job.
        job.outcome = "failed" if error is not None else "cancelled" if job.cancelled else "completed"
        if job.stream is not None:
            self.generator.finish(job.stream)
            job.stream = None
        with self._wake:
            if job in self.active:
                self.active.remove(job)
            job.ended = True
            successor, queued = job.successor, False
            if successor is not None:
                if successor.continues:
                    successor.context.previous = list(job.context.previous)
                queued = not self._closing  # decided once: a close from here on ends it once, below
                if queued:  # its place in line: after the requests submitted before it
                    place = next((i for i, w in enumerate(self.waiting) if w.submitted > successor.submitted),
                                 len(self.waiting))
                    self.waiting.insert(place, successor)
        self.completed += 1
        self._put(job, _END if error is None else error)
        if self.on_end is not None:
            try:
                self.on_end(job, error)
            except Exception:  # an observer's bug must not stop generation
                log.exception("the engine's on_end hook failed")
        if successor is not None and not queued:
            self._end(successor, RuntimeError(self._stopped))
