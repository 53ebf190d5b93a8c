"""The engine's second stage: a thread that decodes the frames the engine makes into audio, the frames of all
requests made in the same frame step in one batched step of the codec (DecoderPool), and hands each request
its audio. It runs beside the engine thread: while the codec decodes one frame step, llama.cpp makes the next.

Requests' audio streams come from their consumers (Engine.submit's `audio`): a stream may carry several
requests (a websocket file of several sentences, a Wyoming text stream), one after the other."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from ..mimi import AudioStream, DecoderPool
    from .engine import Job

log = logging.getLogger(__name__)

_CLOSE = object()


class DecodeStage:
    """The codec's thread (see the module's doc); the engine `put`s each frame step's output, `close` at its end."""

    def __init__(self, decoders: DecoderPool):
        self.decoders = decoders
        self.failed_jobs = 0  # requests that got a codec failure instead of their audio
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="csm-codec", daemon=True)
        self._thread.start()

    def put(self, items: Sequence[tuple[Job, Any]]) -> None:
        """A frame step's output, in order: (job, frame) for a frame to decode, else (job, what ends it),
        which the job gets after its audio."""
        if items:
            self._inbox.put(items)

    def close(self) -> None:
        """Decode what was put, then stop."""
        self._inbox.put(_CLOSE)
        self._thread.join()

    def _run(self) -> None:
        while True:
            steps = [self._inbox.get()]
            while True:  # the codec fell behind: everything waiting goes in one call (longer, cheaper steps)
                try:
                    steps.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
            closing = steps[-1] is _CLOSE
            items = [item for step in steps if step is not _CLOSE for item in step]
            try:
                self._decode(items)
            except Exception as e:  # a bug of ours: these requests fail, the thread goes on serving
                log.exception("the codec's thread failed")
                for job in dict.fromkeys(job for job, _ in items):
                    self._fail(job, e)
            if closing:
                return
            del steps, items  # while idle, hold no job or codec stream (its row is freed as its owner lets go)

    def _decode(self, items: list[tuple[Job, Any]]) -> None:
        """The items' frames decoded, every stream's in one call, then each job's audio and end handed over."""
        frames: dict[AudioStream, list[np.ndarray]] = {}
        for job, item in items:
            if isinstance(item, np.ndarray):
                frames.setdefault(job.audio, []).append(item)
        self._hand_over(items, frames)

    def _hand_over(self, items: list[tuple[Job, Any]], frames: dict[AudioStream, list[np.ndarray]]) -> None:
        try:
            audio: dict[AudioStream, np.ndarray] | Exception = self.decoders.decode_many(frames) if frames else {}
        except Exception as e:  # a codec failure: these requests fail, the server goes on
            log.exception("decoding audio failed")
            audio = e
        size, used = self.decoders.codec.cfg.frame_size, dict.fromkeys(frames, 0)
        samples: dict[Job, list[np.ndarray] | Exception] = {}
        ends: dict[Job, Any] = {}
        for job, item in items:  # a stream's audio is its frames' in order, frame_size samples each
            if not isinstance(item, np.ndarray):
                ends[job] = item
            elif isinstance(audio, Exception):
                samples[job] = audio
            else:
                start, used[job.audio] = used[job.audio], used[job.audio] + size
                samples.setdefault(job, []).append(audio[job.audio][start : start + size])
        for job in dict.fromkeys(job for job, _ in items):
            if job in samples:
                got = samples[job]
                if isinstance(got, Exception):
                    self._fail(job, got)
                else:
                    job.out.put(np.concatenate(got))
            if job in ends:
                job.out.put(ends[job])

    def _fail(self, job: Job, error: Exception) -> None:
        job.out.put(error)
        if not job.decode_failed:  # its later frames, decoded before it was let go, fail too: counted once
            job.decode_failed = True
            self.failed_jobs += 1
