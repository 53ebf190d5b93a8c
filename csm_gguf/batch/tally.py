"""What a run has made so far: each row written once (file, then manifest line), counted, shown on a progress
bar (rows and seconds of audio), and summed up at the end."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .manifest import Manifest


@dataclass
class Summary:
    rows: int  # in the input
    done: int  # made by this run
    failed: int
    skipped: int  # done by an earlier run
    audio_seconds: float  # made by this run
    wall_seconds: float
    manifest: Path
    errors: list[str] = field(default_factory=list)  # "id: error" of the rows that failed

    @property
    def audio_per_wall_second(self) -> float:
        return self.audio_seconds / self.wall_seconds if self.wall_seconds else 0.0

    @property
    def every_row_failed(self) -> bool:
        return self.failed == self.rows

    def __str__(self) -> str:
        return (f"{self.rows} rows: {self.done} done, {self.failed} failed, {self.skipped} done before; "
                f"{self.audio_seconds / 3600:.3f} hours of audio in {self.wall_seconds:.1f} s "
                f"({self.audio_per_wall_second:.2f} audio seconds per wall second); manifest: {self.manifest}")


class Tally:
    def __init__(self, rows: int, skipped: int, manifest: Manifest, todo: int, progress: bool):
        from tqdm import tqdm

        self.rows, self.skipped, self.manifest = rows, skipped, manifest
        self.written: set[str] = set()
        self.done = self.failed = 0
        self.audio_seconds = 0.0
        self.errors: list[str] = []
        self.bar = tqdm(total=todo, desc="speaking", unit="row", disable=not progress)

    def add(self, entry: dict, audio: bytes | None) -> None:
        if entry["id"] in self.written:  # a batch made twice (its worker died after sending it): once is enough
            return
        self.manifest.add(entry, audio)
        self.written.add(entry["id"])
        if entry["error"] is None:
            self.done += 1
            self.audio_seconds += entry["audio_seconds"]
        else:
            self.failed += 1
            self.errors.append(f"{entry['id']}: {entry['error']}")
        self.bar.set_postfix_str(f"{self.audio_seconds:.0f} s of audio, {self.failed} failed", refresh=False)
        self.bar.update()

    def close(self) -> None:
        self.bar.close()
        self.manifest.close()

    def summary(self, wall_seconds: float) -> Summary:
        return Summary(self.rows, self.done, self.failed, self.skipped, self.audio_seconds, wall_seconds,
                       self.manifest.path, self.errors)
