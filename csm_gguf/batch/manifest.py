"""The output folder: one audio file per row, `manifest.jsonl` (a line per row, written only after its file)
and, on request, `metadata.csv` in the LJSpeech layout.

A row counts as done when its manifest line has no error, says what this run would make (same text, voice,
speaker, seed and file) and its file exists: a run on the same folder makes only the others. Their old lines
are dropped first, so every id keeps exactly one line.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterable

from ..atomic import write_atomic
from ..text import is_unicode

MANIFEST = "manifest.jsonl"
METADATA = "metadata.csv"
LJSPEECH_AUDIO = "wavs"  # LJSpeech's layout: metadata.csv beside wavs/<id>.wav, which training tools look for
# What makes two runs' rows the same row: a line that differs in any of them is made again.
IDENTITY = ("id", "text", "voice", "speaker", "seed", "path")
TEMPORARY = re.compile(r"\..+\.[0-9a-f]{8}\.tmp")  # write_atomic's, left by a killed run


def audio_path(row_id: str, fmt: str, metadata: str | None) -> str:
    """The row's audio file, relative to the output folder."""
    return f"{LJSPEECH_AUDIO}/{row_id}.wav" if metadata == "ljspeech" else f"{row_id}.{fmt}"


# Characters that JSON leaves as they are within a string and Python's str.splitlines (and so many a reader of
# JSON lines) takes for line ends: escaped, so that a line is a line to every reader.
_SPLITTING = str.maketrans({c: f"\\u{ord(c):04x}" for c in "\x85\u2028\u2029"})


def line_json(entry: dict) -> str:
    text = json.dumps(entry, ensure_ascii=False)
    # Text with lone surrogates (JSON escapes can make them) has no UTF-8: then the line is escaped.
    return text.translate(_SPLITTING) if is_unicode(text) else json.dumps(entry)


class Manifest:
    def __init__(self, folder: Path):
        self.folder = folder
        self.path = folder / MANIFEST
        self._file = None

    def read(self) -> list[dict]:
        """The complete lines (a line cut short by a killed run is no line)."""
        if not self.path.exists():
            return []
        lines = []
        # Lines end at \n only (as they are written); the last piece is empty, or a line a killed run cut short.
        for text in self.path.read_text(encoding="utf-8").split("\n")[:-1]:
            try:
                entry = json.loads(text)
            except ValueError:
                continue
            if isinstance(entry, dict) and "id" in entry:
                lines.append(entry)
        return lines

    def resume(self, expected: dict[str, dict]) -> set[str]:
        """The ids of `expected` (id -> its manifest fields) already done. Every other line of those ids goes,
        and so do the temporary files of a run that was killed."""
        old = self.read()
        kept, done = [], set()
        for entry in old:
            row_id = entry["id"]
            want = expected.get(row_id)
            if want is None:  # a row of another input: not ours to judge
                kept.append(entry)
            elif row_id not in done and self._complete(entry, want):
                kept.append(entry)
                done.add(row_id)
        raw = self.path.read_bytes() if self.path.exists() else b""
        if len(kept) != len(old) or (raw and not raw.endswith(b"\n")):
            write_atomic(self.path, "".join(line_json(e) + "\n" for e in kept).encode("utf-8"))
        for folder in (self.folder, self.folder / LJSPEECH_AUDIO):  # where write_atomic puts them
            for tmp in folder.glob(".*.tmp"):
                if TEMPORARY.fullmatch(tmp.name):
                    tmp.unlink(missing_ok=True)
        return done

    def _complete(self, entry: dict, want: dict) -> bool:
        if entry.get("error") is not None or any(entry.get(k) != want[k] for k in IDENTITY):
            return False
        return (self.folder / entry["path"]).is_file()

    def add(self, entry: dict, audio: bytes | None) -> None:
        """The row's file (whole or not at all), then its line: a killed run leaves no line without its file.
        A row that failed (no audio) has no file: its line's `path` is null, and a file an earlier run made for
        its id (from other text or settings, or it would have been done) is removed, so that no file is taken
        for this row's speech."""
        target = self.folder / entry["path"]
        if audio is not None:
            target.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(target, audio)
        else:
            target.unlink(missing_ok=True)
            entry = {**entry, "path": None}
        if self._file is None:
            self._file = open(self.path, "a", encoding="utf-8")
        self._file.write(line_json(entry) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def write_ljspeech(folder: Path, entries: Iterable[dict]) -> Path:
    """metadata.csv as LJSpeech has it: `id|transcription|normalized transcription`, no header, one line per
    file in wavs/. The text is given as both transcriptions; a '|' or line break in it becomes a space."""
    lines = []
    for entry in entries:
        if entry.get("error") is None:
            text = " ".join(entry["text"].replace("|", " ").split())
            lines.append(f"{entry['id']}|{text}|{text}\n")
    path = folder / METADATA
    write_atomic(path, "".join(lines).encode("utf-8", "replace"))
    return path
