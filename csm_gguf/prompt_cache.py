"""Voice prompts read once per process: the backbone's KV cells of a prompt prefix, kept for later prompts.

A prompt that begins with a voice prompt (its segments' text and audio frames) is read through the
backbone once; its cells are then shared, with `llama_memory_seq_cp`, into a spare KV sequence that this
cache owns. Every later prompt that begins with the same rows (the next request in that voice, the next
piece of a long text, a dialogue's next turn, a concurrent stream) gets those cells shared into its own
sequence and reads only the rest. In llama.cpp's unified KV cache sharing copies no data: a cell simply
belongs to several sequences. The cells hold exactly what reading the rows again would compute (the same
inputs at the same positions after the same cells), so the codes do not change.

Entries are keyed by the rows themselves (compared bit for bit), so a replaced voice can never be served
its predecessor's cells; `drop` frees a deleted voice's at once. Bounded: at most ENTRIES prompts and
POSITIONS positions in all, the least recently used evicted first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

# Cached prompts at once: each is one spare KV sequence of the backbone.
ENTRIES = 8
# Their positions in all: KV cells the backbone's context holds for them beside the streams' own
# (64 MiB at f16 for CSM-1B's backbone). A 10 s voice prompt takes about 140.
POSITIONS = 2048


@dataclass(eq=False)
class CachedPrompt:
    seq: int  # the KV sequence holding its cells
    rows: np.ndarray  # the backbone inputs it was read from, float32 (positions, n_embd)
    used: int = 0  # when it was last shared (a tick), for eviction


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit for bit: -0.0 and 0.0 are different inputs to llama.cpp."""
    return a.shape == b.shape and a.tobytes() == b.tobytes()


class PromptCache:
    """Prompt prefixes kept in KV sequences first_seq .. first_seq + entries - 1 of a context.

    `copy(src, dst, n)` shares sequence src's cells at positions 0..n-1 with sequence dst; `remove(seq)`
    takes every cell from sequence seq (llama.cpp's seq_cp and seq_rm, given by the caller)."""

    def __init__(self, first_seq: int, entries: int, positions: int, copy: Callable[[int, int, int], None],
                 remove: Callable[[int], None]):
        self.free_seqs = list(range(first_seq + entries - 1, first_seq - 1, -1))
        self.positions = positions
        self.entries: list[CachedPrompt] = []
        self._copy, self._remove = copy, remove
        self._tick = 0

    def longest(self, prompt: np.ndarray, limit: int) -> CachedPrompt | None:
        """The longest cached prompt of at most `limit` rows that `prompt` begins with."""
        for entry in sorted(self.entries, key=lambda e: -len(e.rows)):
            n = len(entry.rows)
            if n <= limit and _same(prompt[:n], entry.rows):
                return entry
        return None

    def share(self, entry: CachedPrompt, seq: int) -> int:
        """Give sequence `seq` (empty) the entry's cells; returns the positions it now holds."""
        self._copy(entry.seq, seq, len(entry.rows))
        self._tick += 1
        entry.used = self._tick
        return len(entry.rows)

    def add(self, seq: int, rows: np.ndarray) -> bool:
        """Keep sequence `seq`'s first len(rows) cells, read from `rows`, for later prompts. False if they
        cannot be kept (too long for the cache, or no cache) or are kept already."""
        n = len(rows)
        if not n or n > self.positions or not (self.free_seqs or self.entries):
            return False
        if any(_same(rows, entry.rows) for entry in self.entries):
            return False
        while not self.free_seqs or self.held() + n > self.positions:
            self._evict(min(self.entries, key=lambda e: e.used))
        entry = CachedPrompt(self.free_seqs.pop(), np.array(rows, dtype=np.float32))
        self._copy(seq, entry.seq, n)
        self._tick += 1
        entry.used = self._tick
        self.entries.append(entry)
        return True

    def drop(self, prefix: np.ndarray) -> int:
        """Forget every cached prompt that begins with `prefix` (a voice deleted or replaced); returns how
        many."""
        gone = [e for e in self.entries if len(e.rows) >= len(prefix) and _same(e.rows[: len(prefix)], prefix)]
        for entry in gone:
            self._evict(entry)
        return len(gone)

    def clear(self) -> None:
        for entry in list(self.entries):
            self._evict(entry)

    def held(self) -> int:
        """Positions held by cached prompts."""
        return sum(len(e.rows) for e in self.entries)

    def _evict(self, entry: CachedPrompt) -> None:
        # Cells that a stream shares stay until that stream ends: they count against its own positions.
        self._remove(entry.seq)
        self.entries.remove(entry)
        self.free_seqs.append(entry.seq)
