"""A corpus to speak: the rows of a .txt, .jsonl or .csv file, each checked, with an id that names its file.

.txt: one utterance per line (blank lines are no rows). .jsonl: one object per line; .csv: a header, then one
row per record. Both with `text` and optionally `id`, `voice`, `speaker`, `seed`. A row without an id gets its
line number, so ids stay the same when the file grows. Anything malformed is an InputError naming its line.
"""

from __future__ import annotations

import csv
import io
import json
import numbers
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from ..text import LINE_BREAK

FIELDS = ("id", "text", "voice", "speaker", "seed")
# Ids name files: letters, digits, '-', '_' and '.', not starting with '.', so no id reaches outside the folder.
ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}")
SUFFIXES = (".txt", ".jsonl", ".csv")


class InputError(ValueError):
    """The input file cannot be read as rows; the message names the line and the fix."""


@dataclass(frozen=True)
class Row:
    id: str
    text: str
    line: int
    voice: str | None = None
    speaker: int | None = None
    seed: int | None = None


def read_rows(source: str | Path | Iterable[Any]) -> list[Row]:
    """The rows of a file (by its suffix), or of a list of strings or dicts as a .jsonl file's lines would
    hold (line numbers counted from 1)."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        records = _records(path, _read_text(path))
        where = str(path)
    else:
        records = ((i, item if isinstance(item, dict) else {"text": item}) for i, item in enumerate(source, 1))
        where = "the rows"
    rows, seen = [], {}
    for line, record in records:
        row = _row(record, line, where)
        if row.id in seen:
            raise InputError(f"{where} line {line}: id {row.id!r} is also the id of line {seen[row.id]}: "
                             "ids name the audio files, so each must be unique")
        seen[row.id] = line
        rows.append(row)
    if not rows:
        raise InputError(f"{where} holds no rows: give one utterance per line (.txt) or records with 'text'")
    return rows


def _read_text(path: Path) -> str:
    if path.suffix.lower() not in SUFFIXES:
        raise InputError(f"{path}: unknown input type {path.suffix or '(no suffix)'!r}; give a .txt (one utterance "
                         "per line), .jsonl or .csv file")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise InputError(f"{path} line {line}: not UTF-8 text ({e.reason}): save the file as UTF-8") from None


def _records(path: Path, text: str) -> Iterator[tuple[int, dict]]:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        yield from _csv_records(path, text)
        return
    for line, content in enumerate(LINE_BREAK.split(text), 1):
        if not content.strip():
            continue
        if suffix == ".txt":
            yield line, {"text": content}
            continue
        try:
            record = json.loads(content)
        except ValueError as e:
            raise InputError(f"{path} line {line}: not a JSON object ({e}): one object per line, such as "
                             '{"id": "a1", "text": "Hello."}') from None
        yield line, record


def _csv_records(path: Path, text: str) -> Iterator[tuple[int, dict]]:
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)  # strict: an unclosed quote is an error
    try:
        header = next(reader, None)
        if header is None or "text" not in header:
            raise InputError(f"{path} line 1: the header must name a 'text' column (and optionally "
                             f"{', '.join(f for f in FIELDS if f != 'text')}), got {header}")
        start = reader.line_num + 1
        for values in reader:
            line, start = start, reader.line_num + 1  # a quoted field may span lines: a row's id is its first
            if not any(v.strip() for v in values):
                continue
            if len(values) != len(header):
                raise InputError(f"{path} line {line}: {len(values)} fields where the header has {len(header)}")
            yield line, {k: v for k, v in zip(header, values) if v != "" or k == "text"}
    except csv.Error as e:
        hint = " (a quote opened and never closed runs to the end)" if "end of data" in str(e) else ""
        raise InputError(f"{path} line {reader.line_num}: {e}{hint}") from None


def _row(record: Any, line: int, where: str) -> Row:
    def bad(problem: str) -> InputError:
        return InputError(f"{where} line {line}: {problem}")

    if not isinstance(record, dict):
        raise bad(f"expected an object with 'text', got {type(record).__name__}")
    unknown = [k for k in record if k not in FIELDS]
    if unknown:
        raise bad(f"unknown field(s) {', '.join(map(repr, unknown))}: the fields read are {', '.join(FIELDS)}")
    text = record.get("text")
    if not isinstance(text, str):
        raise bad("'text' is required and must be a string")
    row_id = _id(record.get("id", line), bad)
    voice = record.get("voice")
    if voice is not None and (not isinstance(voice, str) or not voice):
        raise bad(f"'voice' must be a voice name, got {voice!r}")
    return Row(row_id, text, line, voice, _whole(record, "speaker", bad), _whole(record, "seed", bad))


def _id(value: Any, bad) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, numbers.Integral)):
        raise bad(f"'id' must be a string or a whole number, got {value!r}")
    text = str(value)
    if not ID.fullmatch(text):
        raise bad(f"id {text!r} cannot name a file: use letters, digits, '-', '_' or '.' (at most 128, not "
                  "starting with '.')")
    return text


def _whole(record: dict, key: str, bad) -> int | None:
    value = record.get(key)
    if value is None:
        return None
    if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():  # csv cells are text
        return int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise bad(f"'{key}' must be a whole number >= 0, got {value!r}")
    return int(value)
