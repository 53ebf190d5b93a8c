"""A batch worker (one Ray actor): the model loaded once, and the server's engine making `streams` rows at a time
in the same llama.cpp calls. Each call gets a batch of rows and gives back, per row, its manifest fields and
its encoded audio. Ray runs two calls of an actor at once, so the next batch's rows wait in the engine's
queue while the last ones are decoded and sent: the engine is never idle between batches.

A row that cannot be spoken (empty text, a prompt that does not fit) comes back with its error; only a
broken worker fails its call, which Ray then runs again on a new worker.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any, Sequence

import numpy as np

from ..sampling import Sampling

# Rows submitted ahead of a free slot: every row of the calls running at once waits in the engine's queue.
QUEUE = 4096
# Frames decoded together as they arrive: as CSM.generate does, so the audio is the same to the last bit.
CHUNK_FRAMES = 25


# --- the engine's interface, known here alone ---------------------------------------------------------------
def open_engine(tts):
    from ..server.engine import Engine

    return Engine(tts.generator, max_queue=QUEUE)


def start_speech(engine, row: dict, context: Sequence, sampling: Sampling):
    """A row submitted to the engine, sampled with its own seed: its job, whose `next_frames()` give the
    frames made, then None."""
    from ..server.engine import SpeechJob

    return engine.submit(SpeechJob(row["text"], row["speaker"], tuple(context), replace(sampling, seed=row["seed"])))


class RowMaker:
    """The callable class that Ray Data's actor pool runs (`map_batches`); usable on its own too."""

    def __init__(self, model: str, streams: int, threads: int, gpu_layers: int, kv_type: str, fmt: str,
                 sampling: Sampling, voices: dict[str, Any]):
        from ..llama import default_threads
        from ..tts import CSM

        # Threads given, not 0: CSM then gives torch (Mimi) as many, where Ray would have left it one (OMP_NUM_THREADS).
        self.tts = CSM(model, n_threads=threads or default_threads(), n_gpu_layers=gpu_layers, kv_type=kv_type,
                       max_streams=streams)
        self.tts.codec  # loaded once, now, not inside the first batch
        self.engine = open_engine(self.tts)
        self.fmt, self.sampling, self.voices = fmt, sampling, voices

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        made = self.make([json.loads(text) for text in batch["row"]])
        return {"row": [json.dumps(entry) for entry, _ in made], "audio": [audio for _, audio in made]}

    def make(self, rows: list[dict]) -> list[tuple[dict, bytes | None]]:
        """Each row's manifest entry (audio_seconds, frames and error added) and its encoded audio (None on
        error). All rows are submitted first: the engine speaks them together."""
        jobs = [self._submit(row) for row in rows]
        return [self._finish(row, job) for row, job in zip(rows, jobs)]

    def _submit(self, row: dict):
        voice = self.voices.get(row["voice"]) if row["voice"] else None
        try:
            return start_speech(self.engine, row, voice.segments if voice else (), self.sampling)
        except Exception as e:  # the row's own problem (empty text...): the others go on
            return e

    def _finish(self, row: dict, job) -> tuple[dict, bytes | None]:
        from ..audio import SAMPLE_RATE, encode_audio

        if isinstance(job, Exception):
            return failed(row, job), None
        frames = 0

        def arriving():
            nonlocal frames
            while (got := job.next_frames()) is not None:  # the end-of-speech frame never comes out
                frames += len(got)
                yield from got

        try:
            chunks = self.tts.decode_stream(arriving(), chunk_frames=CHUNK_FRAMES)
            audio = np.concatenate([np.zeros(0, np.float32), *chunks])
            data = encode_audio(audio, self.fmt)
        except Exception as e:  # e.g. a later piece of a long text did not fit
            job.cancel()
            return failed(row, e), None
        return {**row, "audio_seconds": len(audio) / SAMPLE_RATE, "frames": frames, "error": None}, data


def failed(row: dict, error: BaseException | str) -> dict:
    """The manifest entry of a row that could not be made."""
    message = error if isinstance(error, str) else str(error) or type(error).__name__
    return {**row, "audio_seconds": 0.0, "frames": 0, "error": message}
