"""Many streams decoded together: `DecoderPool` keeps each stream in a row of one decoder state and decodes the
frames of all streams that have some in one batched step (`decode_many`).

A server decodes every request's frames as they are made. Decoded one stream at a time, each step reads all of
Mimi's weights for a row or two of work (on CPU a 1-frame step of 4 streams took 29 ms, against 4 x 10 ms one
by one), and on a GPU 64 streams' steps of 1.5 ms each do not fit in a frame's 80 ms. Streams start, pause (a
request reading its next piece's prompt) and end at different times, so a step advances only the rows that have
frames (`DecoderState.live`); the others keep their state. The rows in use are kept first (`_compact`), so that
a step covers as many rows as there are streams.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from .codec import Mimi
from .streaming import DecoderState


@dataclass(eq=False)
class _Row:
    """A stream's place in the pool: its row, which `_compact` may change between steps."""

    index: int
    fresh: bool = True  # not reset yet: reset before its next step


class AudioStream:
    """One stream of audio, decoded from its frames as they come (`decode`, or the pool's `decode_many`). It takes
    a row of its pool at its first frames, or a state of its own where every row is taken; `close` it at its end
    (or use `with`) to give the row back. Frames are (frames, K) arrays of codes, or lists of (K,) frames."""

    def __init__(self, pool: DecoderPool):
        self.pool = pool
        self.own: DecoderState | None = None  # where the pool was full at its first frames
        self.closed = False
        self._holder: list[_Row | None] = [None]  # its row, once it has one
        # Its row is given back when it is closed, or when it is dropped unclosed (a consumer that failed).
        self._release = weakref.finalize(self, pool._release, self._holder)

    @property
    def row(self) -> _Row | None:
        return self._holder[0]

    def decode(self, frames: list[np.ndarray] | np.ndarray) -> np.ndarray:
        """The next audio: float32 samples, frame_size per frame."""
        return self.pool.decode_many({self: frames})[self]

    def close(self) -> None:
        self.closed = True
        self._release()

    def __enter__(self) -> AudioStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class DecoderPool:
    """Up to `rows` streams decoded in batched steps (see the module's doc); further streams decode one at a time
    on states of their own. Thread-safe: one `decode_many` runs at a time."""

    def __init__(self, codec: Mimi, rows: int, codebooks: int | None = None):
        self.codec, self.capacity = codec, rows
        self.codebooks = codebooks or codec.cfg.num_quantizers
        self.state = codec.decoder_state(rows) if rows else None
        self.rows: list[_Row | None] = [None] * rows  # by index: the stream in each row
        self.views: dict[int, DecoderState] = {}  # the state's first n rows, by n: each keeps its CUDA graph
        self.steps = self.stream_steps = 0  # batched steps taken, and streams advanced in them (their sum)
        self._lock = threading.RLock()
        self._released: list[list[_Row | None]] = []  # holders of rows let go, freed under the lock

    def open(self) -> AudioStream:
        return AudioStream(self)

    def streams(self) -> int:
        """Streams holding a row now."""
        with self._lock:
            self._free_released()
            return sum(r is not None for r in self.rows)

    def _release(self, holder: list[_Row | None]) -> None:
        """A stream's row let go: freed now, or by the next step if one is running. Never waits for the lock: as
        a finalizer this can run on any thread in the midst of anything, such as the engine's frame step, which
        holds the generator's lock that a step of this pool may wait for (to record a CUDA graph)."""
        self._released.append(holder)
        if self._lock.acquire(blocking=False):
            try:
                self._free_released()
            finally:
                self._lock.release()

    def _free_released(self) -> None:
        while self._released:
            holder = self._released.pop()
            row, holder[0] = holder[0], None
            if row is not None and self.rows[row.index] is row:
                self.rows[row.index] = None

    @torch.inference_mode()
    def decode_many(self, frames: Mapping[AudioStream, list[np.ndarray] | np.ndarray]) -> dict[AudioStream, np.ndarray]:
        """Each stream's next audio from its next frames, the pooled streams' in shared steps: a step at a time
        over the rows in use, each advancing the streams that still have frames by as many frames as the
        shortest of them has left. A closed stream's frames are dropped (its consumer has gone): no audio."""
        audio: dict[AudioStream, list[np.ndarray]] = {s: [] for s in frames}
        with self._lock:
            self._free_released()
            codes = {s: np.asarray(f, dtype=np.int64).reshape(-1, self.codebooks) for s, f in frames.items()
                     if not s.closed}
            codes = {s: c for s, c in codes.items() if len(c)}
            for stream in codes:
                self._place(stream)
            self._compact()
            for stream in codes:
                if stream.own is not None:
                    audio[stream].append(self.codec.decode_frames(codes[stream], stream.own))
            self._decode_pooled({s: c for s, c in codes.items() if s.row is not None}, audio)
        return {s: np.concatenate([np.zeros(0, np.float32), *chunks]) for s, chunks in audio.items()}

    def _decode_pooled(self, codes: dict[AudioStream, np.ndarray], audio: dict[AudioStream, list[np.ndarray]]) -> None:
        """The pooled streams' frames, in steps over the rows in use (see `decode_many`)."""
        if not codes:
            return
        view = self._view(self._step_rows(sum(r is not None for r in self.rows)))
        done, left = dict.fromkeys(codes, 0), list(codes)
        while left:
            t = min(len(codes[s]) - done[s] for s in left)
            step = torch.zeros(len(view.live), self.codebooks, t, dtype=torch.long)
            live = torch.zeros(len(view.live), dtype=torch.bool)
            for s in left:
                step[s.row.index] = torch.from_numpy(codes[s][done[s] : done[s] + t].T)
                live[s.row.index] = True
            view.live.copy_(live)
            out = self.codec.decode_step(step, view).cpu()
            self.steps, self.stream_steps = self.steps + 1, self.stream_steps + len(left)
            for s in left:
                audio[s].append(out[s.row.index, 0].numpy())
                done[s] += t
            left = [s for s in left if done[s] < len(codes[s])]

    def _place(self, stream: AudioStream) -> None:
        """A row for a stream's first frames: the first free one, else a state of its own."""
        if stream.row is not None or stream.own is not None:
            return
        free = next((i for i, r in enumerate(self.rows) if r is None), None)
        if free is None:
            stream.own = self.codec.decoder_state(1)
            return
        self.rows[free] = stream._holder[0] = _Row(free)

    def _compact(self) -> None:
        """Move the last streams into the rows freed before them, so that the rows in use come first; reset the
        rows of streams that start (over)."""
        while True:
            free = next((i for i, r in enumerate(self.rows) if r is None), None)
            last = max((i for i, r in enumerate(self.rows) if r is not None), default=-1)
            if free is None or free > last:
                break
            row = self.rows[last]
            if not row.fresh:
                self.state.move_row(last, free)
            self.rows[free], self.rows[last], row.index = row, None, free
        for row in self.rows:
            if row is not None and row.fresh:
                self.state.reset_row(row.index)
                row.fresh = False

    def _step_rows(self, used: int) -> int:
        """The rows a step covers: those in use; on CUDA rounded up to a power of two, so that a few graphs
        (each recorded once, on its own rows) serve every number of streams."""
        if self.codec.device.type != "cuda":
            return used
        return min(1 << max(used - 1, 0).bit_length(), self.capacity)

    def _view(self, n: int) -> DecoderState:
        if n not in self.views:
            self.views[n] = self.state.first_rows(n)
            self.views[n].cuda_graph = self.codec.device.type == "cuda"
        return self.views[n]
