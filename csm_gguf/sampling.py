"""The sampling settings: one `Sampling` object travels whole from the caller (CSM's keyword arguments,
say's options, a server request) to each stream's sampler. Every default and limit is declared once
here, in SETTINGS; Sampling checks them, and say and the server check their input against the same.

The limits are what the machinery takes, not taste: top_k is an int32 (2048 or more: every code); any
finite temperature >= 0 works (a large one only flattens the draw, a tiny one is argmax); any whole seed
>= 0 is reproducible (it seeds the stream's own numpy generator, whatever its size); max_audio_ms stops
at 10 minutes, beyond the 164 s the model's whole context holds, so a larger value can only be a mistake.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass


@dataclass(frozen=True)
class Setting:
    """One sampling setting: its default and the range it must lie in."""

    name: str
    default: float | int | None
    low: float
    high: float | None = None  # None: no upper limit
    whole: bool = False  # a whole number, else any (finite) number
    low_open: bool = False  # low itself is out of range

    def allows(self, value: object) -> bool:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral if self.whole else numbers.Real):
            return False
        if not self.whole:
            try:
                value = float(value)  # a finite float: an int too large for one is out of range
            except OverflowError:
                return False
            if not math.isfinite(value):
                return False
        above = value > self.low if self.low_open else value >= self.low
        return above and (self.high is None or value <= self.high)

    def bounds(self) -> str:
        """The range in words: 'from 1 to 2147483647', '>= 0', '> 0 and <= 600000'."""
        low, high = _shown(self.low), None if self.high is None else _shown(self.high)
        if high is None:
            return f"{'>' if self.low_open else '>='} {low}"
        if self.low_open:
            return f"> {low} and <= {high}"
        return f"from {low} to {high}"

    def rule(self) -> str:
        """What a value must be: 'a whole number >= 0'."""
        return f"{'a whole number' if self.whole else 'a number'} {self.bounds()}"


def _shown(x: float) -> str:
    return str(int(x)) if x == int(x) else f"{x:g}"


TEMPERATURE = Setting("temperature", 0.9, 0.0)  # 0: greedy
TOP_K = Setting("top_k", 50, 1, 2**31 - 1, whole=True)
SEED = Setting("seed", None, 0, whole=True)  # None: a random seed
# None: the caller sets no limit (CSM: one proportional to each piece's text; the Generator: the context's end)
MAX_AUDIO_MS = Setting("max_audio_ms", None, 0.0, 600_000.0, low_open=True)
SETTINGS = (TEMPERATURE, TOP_K, SEED, MAX_AUDIO_MS)


@dataclass(frozen=True)
class Sampling:
    """How frames are drawn: top-k, then temperature (0: greedy), from a seeded generator, for at most
    max_audio_ms of audio. Checked when made: a bad value is a ValueError that names it."""

    temperature: float = TEMPERATURE.default
    top_k: int = TOP_K.default
    seed: int | None = SEED.default
    max_audio_ms: float | None = MAX_AUDIO_MS.default

    def __post_init__(self) -> None:
        for setting in SETTINGS:
            value = getattr(self, setting.name)
            if value is None and setting.default is None:
                continue
            if not setting.allows(value):
                greedy = " (0 = greedy)" if setting is TEMPERATURE else ""
                raise ValueError(f"{setting.name} must be {setting.rule()}{greedy}, got {value!r}")
            # numpy numbers too, as Python numbers (ctypes takes only those)
            object.__setattr__(self, setting.name, int(value) if setting.whole else float(value))

    def for_piece(self, index: int, budget_ms: float) -> Sampling:
        """Piece `index` of a text: the seed advances by piece, so every piece is reproducible; without a
        limit of the caller's, at most `budget_ms` of audio."""
        seed = None if self.seed is None else self.seed + index
        return Sampling(self.temperature, self.top_k, seed, budget_ms if self.max_audio_ms is None else
                        self.max_audio_ms)
