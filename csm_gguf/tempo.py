"""Faster or slower speech at the same pitch: WSOLA time-stretching, streaming.

CSM speaks at its own pace, so a `speed` (OpenAI's 0.25 to 4.0) is applied to the audio afterwards.
WSOLA (waveform-similarity overlap-add) lays down Hann windows of the input every HOP samples of
output while it takes them every `speed * HOP` samples of input, each moved by up to TOLERANCE samples
to where it best continues the waveform laid down before it. The pitch periods then line up across
the overlaps, so the voice keeps its pitch (resampling would shift it) and the joins do not beat.

`TimeStretch` works on a stream, chunk by chunk, with the same result for any chunking; a stream of
n samples comes out as round(n / speed) samples. `change_speed` does a whole signal.
"""

from __future__ import annotations

import numbers
from collections.abc import Generator, Iterator

import numpy as np

MIN_SPEED, MAX_SPEED = 0.25, 4.0
WINDOW = 720  # 30 ms at 24 kHz: a few pitch periods
HOP = WINDOW // 2  # windows laid down every HOP output samples; periodic Hann windows at half overlap sum to 1
TOLERANCE = 240  # +-10 ms: a 20 ms search span holds a whole period of the lowest voices (50 Hz)

_HANN = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(WINDOW) / WINDOW)).astype(np.float32)


def check_speed(speed: float) -> float:
    """`speed` as a float, or a ValueError naming the allowed range."""
    if isinstance(speed, bool) or not isinstance(speed, numbers.Real) or not MIN_SPEED <= speed <= MAX_SPEED:
        raise ValueError(f"speed must be a number from {MIN_SPEED} to {MAX_SPEED} (1 = as spoken), got {speed!r}")
    return float(speed)


class TimeStretch:
    """Streaming WSOLA: `feed` chunks of float audio, then `finish`; each returns the audio ready so far.

    Window k is laid down centred on output sample k * HOP, from around input sample k * speed * HOP
    (its nominal centre). Positions in the input count HOP zeros before its first sample: a window's
    start there is its centre in the input itself. The first window fades in over those zeros, and the
    output they make (HOP samples) is dropped, so the output starts at full level.

    `speed` may be changed between chunks. It applies to the windows taken from then on, which still
    include about 40 ms of the input fed before; the output's length follows the windows, so nothing is
    cut or padded at the end."""

    def __init__(self, speed: float) -> None:
        self._speed = check_speed(speed)
        self._input = np.zeros(HOP, np.float32)  # the input still needed; its first sample is at _start
        self._start = 0
        self._fed = 0  # input samples fed
        self._ended = False
        self._windows = 0  # windows laid down
        self._since = (0, 0.0)  # the window the current speed began with, and its nominal centre
        self._previous: int | None = None  # where the last window was taken
        self._sum = np.zeros(WINDOW, np.float32)  # overlap-add; its first HOP samples are complete after a window
        self._to_drop = HOP
        self._made = 0  # output samples returned

    @property
    def speed(self) -> float:
        return self._speed

    @speed.setter
    def speed(self, speed: float) -> None:
        speed = check_speed(speed)
        self._since = (self._windows, self._nominal())
        self._speed = speed

    def feed(self, samples: np.ndarray) -> np.ndarray:
        if self._ended:
            raise RuntimeError("this TimeStretch has finished: start a new one")
        samples = np.asarray(samples, dtype=np.float32)
        if samples.ndim != 1:
            raise ValueError(f"TimeStretch takes mono audio, a 1-D array; got shape {samples.shape}")
        self._input = np.concatenate([self._input, samples])
        self._fed += len(samples)
        return self._run()

    def finish(self) -> np.ndarray:
        """The rest of the output: the input ends here (followed by silence as far as windows reach)."""
        if self._ended:
            return np.zeros(0, np.float32)
        self._ended = True
        return self._run()

    def _nominal(self) -> float:
        """The next window's nominal centre in the input."""
        first, centre = self._since
        return centre + (self._windows - first) * self._speed * HOP

    def _length(self) -> int:
        # The output centre of the current speed's first window, and the input from its centre on at
        # that speed: n / speed exactly (whole signals and any chunking alike) while the speed holds.
        first, centre = self._since
        return round(first * HOP + (self._fed - centre) / self._speed)

    def _run(self) -> np.ndarray:
        out = []
        # While the input goes on, the output lags it by more than a window, so it never runs past its
        # length; at the end, windows reach into the silence after the input until the length is made.
        while not self._ended or self._made < self._length():
            window = self._take()
            if window is None:
                break
            self._sum += window * _HANN
            ready = self._sum[:HOP].copy()
            self._sum = np.concatenate([self._sum[HOP:], np.zeros(HOP, np.float32)])
            drop = min(self._to_drop, HOP)
            self._to_drop -= drop
            ready = ready[drop:]
            if self._ended:
                ready = ready[: max(self._length() - self._made, 0)]
            self._made += len(ready)
            out.append(ready)
        return np.concatenate([np.zeros(0, np.float32), *out])

    def _take(self) -> np.ndarray | None:
        """The next window of input, at its best place; None until enough input has come."""
        nominal = round(self._nominal())
        lo, hi = max(nominal - TOLERANCE, 0), nominal + TOLERANCE
        if self._previous is None:
            lo = hi = nominal
        natural = None if self._previous is None else self._previous + HOP
        end = max(hi, natural or 0) + WINDOW  # the input this window needs, up to here
        if end > self._start + len(self._input):
            if not self._ended:
                return None
            self._input = np.concatenate([self._input, np.zeros(end - self._start - len(self._input), np.float32)])
        best = nominal if natural is None else self._best(lo, hi, natural, nominal)
        window = self._slice(best, WINDOW)
        self._previous = best
        self._windows += 1
        keep = min(best + HOP, max(round(self._nominal()) - TOLERANCE, 0))  # what the next window may need
        self._input, self._start = self._input[keep - self._start :], keep
        return window

    def _best(self, lo: int, hi: int, natural: int, nominal: int) -> int:
        """The start in [lo, hi] whose window is most like the natural continuation of the last window
        (normalised cross-correlation); where nothing is alike (silence), the nominal place."""
        target = self._slice(natural, WINDOW)
        span = self._slice(lo, hi - lo + WINDOW)
        correlation = np.correlate(span, target, mode="valid")
        energy = np.cumsum(np.concatenate([[0.0], span.astype(np.float64) ** 2]))
        energy = energy[WINDOW:] - energy[: len(energy) - WINDOW]
        score = correlation / np.sqrt(np.maximum(energy, 1e-12))
        i = int(np.argmax(score))
        return lo + i if score[i] > 0 else nominal

    def _slice(self, at: int, n: int) -> np.ndarray:
        return self._input[at - self._start : at - self._start + n]


def stretched(chunks: Generator[np.ndarray, None, None], speed: float) -> Iterator[np.ndarray]:
    """A stream of audio chunks at `speed`, as they come (a chunk that brings no output yet is left out);
    closing this closes `chunks`."""
    stretch = TimeStretch(speed)
    try:
        for chunk in chunks:
            if len(out := stretch.feed(chunk)):
                yield out
        if len(out := stretch.finish()):
            yield out
    finally:
        chunks.close()


def change_speed(audio: np.ndarray, speed: float) -> np.ndarray:
    """A whole signal at `speed` (0.25 to 4.0): round(len(audio) / speed) samples, same pitch."""
    if check_speed(speed) == 1.0 and np.ndim(audio) == 1:
        return np.asarray(audio, dtype=np.float32)
    stretch = TimeStretch(speed)
    return np.concatenate([stretch.feed(audio), stretch.finish()])
