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


import numpy as np

MIN_SPEED, MAX_SPEED = 0.25, 4.0
WINDOW = 720  # 30 ms at 24 kHz: a few pitch periods
HOP = WINDOW // 2  # windows laid down every HOP output samples; periodic Hann windows at half overlap sum to 1
TOLERANCE = 240  # +-10 ms: a 20 ms search span holds a whole period of the lowest voices (50 Hz)

_HANN = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(WINDOW) / WINDOW)).astype(np.float32)


def check_speed(speed: float) -> float:
    """`speed` as a float, or a ValueError naming the allowed range."""
    if isinstance(speed, bool) or not isinstance(speed, (int, float)) or not MIN_SPEED <= speed <= MAX_SPEED:
        raise ValueError(f"speed must be a number from {MIN_SPEED} to {MAX_SPEED} (1 = as spoken), got {speed!r}")
    return float(speed)


class TimeStretch:
    """Streaming WSOLA: `feed` chunks of float audio, then `finish`; each returns the audio ready so far.

    Positions below are in the input's own count of samples, with HOP zeros before the first one: the
    first window fades in over those zeros, and the output they make (HOP samples) is dropped, so the
    output starts at full level. `speed` may be changed between chunks; it applies to the windows taken
    from then on."""

    def __init__(self, speed: float) -> None:
        self.speed = check_speed(speed)
        self._input = np.zeros(HOP, np.float32)  # the input still needed; its first sample is at _start
        self._start = 0
        self._ended = False
        self._next = 0.0  # where the next window would be taken without searching
        self._previous: int | None = None  # where the last window was taken
        self._sum = np.zeros(WINDOW, np.float32)  # overlap-add; its first HOP samples are complete after a window
        self._to_drop = HOP
        self._length = 0.0  # output the input so far stands for: sum of len(chunk) / speed at its speed
        self._made = 0  # output samples returned

    def feed(self, samples: np.ndarray) -> np.ndarray:
        if self._ended:
            raise RuntimeError("this TimeStretch has finished: start a new one")
        samples = np.asarray(samples, dtype=np.float32).reshape(-1)
        self._input = np.concatenate([self._input, samples])
        self._length += len(samples) / self.speed
        return self._run()

    def finish(self) -> np.ndarray:
        """The rest of the output: the input ends here (followed by silence as far as windows reach)."""
        if self._ended:
            return np.zeros(0, np.float32)
        self._ended = True
        return self._run()

    def _run(self) -> np.ndarray:
        out = []
        # While the input goes on, the output lags it by more than a window, so it never runs past its
        # length; at the end, windows reach into the silence after the input until the length is made.
        while not self._ended or self._made < round(self._length):
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
                ready = ready[: max(round(self._length) - self._made, 0)]
            self._made += len(ready)
            out.append(ready)
        return np.concatenate([np.zeros(0, np.float32), *out])

    def _take(self) -> np.ndarray | None:
        """The next window of input, at its best place; None until enough input has come."""
        nominal = round(self._next)
        lo, hi = max(nominal - TOLERANCE, 0), nominal + TOLERANCE
        if self._previous is None:
            lo = hi = nominal
        natural = None if self._previous is None else self._previous + HOP
        end = max(hi, natural or 0) + WINDOW  # the input this window needs, up to here
        if end > self._start + len(self._input):
            if not self._ended:
                return None
            self._input = np.concatenate([self._input, np.zeros(end - self._start - len(self._input), np.float32)])
        best = lo if natural is None else self._best(lo, hi, natural)
        window = self._slice(best, WINDOW)
        self._previous, self._next = best, self._next + self.speed * HOP
        keep = min(best + HOP, max(round(self._next) - TOLERANCE, 0))  # what the next window may need
        self._input, self._start = self._input[keep - self._start :], keep
        return window

    def _best(self, lo: int, hi: int, natural: int) -> int:
        """The start in [lo, hi] whose window is most like the natural continuation of the last window
        (normalised cross-correlation); where nothing is alike (silence), the nominal place."""
        target = self._slice(natural, WINDOW)
        span = self._slice(lo, hi - lo + WINDOW)
        correlation = np.correlate(span, target, mode="valid")
        energy = np.cumsum(np.concatenate([[0.0], span.astype(np.float64) ** 2]))
        energy = energy[WINDOW:] - energy[: len(energy) - WINDOW]
        score = correlation / np.sqrt(np.maximum(energy, 1e-12))
        i = int(np.argmax(score))
        return lo + i if score[i] > 0 else min(max(round(self._next), lo), hi)

    def _slice(self, at: int, n: int) -> np.ndarray:
        return self._input[at - self._start : at - self._start + n]


def change_speed(audio: np.ndarray, speed: float) -> np.ndarray:
    """A whole signal at `speed` (0.25 to 4.0): round(len(audio) / speed) samples, same pitch."""
    if check_speed(speed) == 1.0:
        return np.asarray(audio, dtype=np.float32)
    stretch = TimeStretch(speed)
    return np.concatenate([stretch.feed(audio), stretch.finish()])
