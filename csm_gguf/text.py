"""Splitting long text into sentences and into pieces short enough to speak in one go."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable

# Sentence ends: runs of . ! ? … (Latin, needing whitespace after) or of the CJK forms
# (CJK text has no spaces), then any closing quotes or brackets.
_CJK_ENDS = "。！？｡"
_CJK_CLOSERS = "」』）】》〉"
_CLOSERS = "\"'”’»)]}" + _CJK_CLOSERS
_OPENERS = "\"'“‘«([{¿¡「『（【《〈"
_END = re.compile(rf"(?P<end>[.!?…{_CJK_ENDS}]+)[{re.escape(_CLOSERS)}]*")
_NEXT_LETTER = re.compile(rf" *[{re.escape(_OPENERS)}]*(.?)")
_INITIALS = re.compile(r"(?:[^\W\d_]\.)*[^\W\d_]")  # J, U.S, e.g, p.m

# Words that a period follows without ending the sentence, even before a capital: titles
# come before names, and these Latin abbreviations never end one in practice.
_TITLES = frozenset(
    "mr mrs ms mx dr prof st mt sr sra srta rev fr gen col capt lt sgt gov sen rep pres hon "
    "messrs mme mlle vs cf viz approx ca".split()
)
# Abbreviations that come before numbers ("No. 5", "pp. 12"), but may end a sentence too.
_BEFORE_NUMBERS = frozenset("no nos nr fig figs vol vols p pp ch sec art eq op".split())

# Where an over-long sentence may be cut, best first: after clause punctuation (kept with the
# clause before it), between words, and as a last resort between characters. A comma, semicolon or
# colon ends a clause only before a space (or the end): "1,234" and "example.com:8080" stay whole.
_CUTS = (
    re.compile(r"(?:[^,;:—、，；：]|[,;:](?=\S))*(?:[,;:]+(?:\s+|$)|[—、，；：]+\s*)|.+"),
    re.compile(r"\S+\s*"),
    re.compile(r"."),
)


def is_blank(text: str) -> bool:
    """Whether text has nothing to speak: only whitespace and invisible characters (zero-width spaces and
    joiners, byte-order marks, control characters)."""
    return all(c.isspace() or unicodedata.category(c) in ("Cf", "Cc") for c in text)


def is_unicode(text: str) -> bool:
    """False for text holding lone surrogates (how Python keeps bytes that were not UTF-8, e.g. in a
    command line's arguments), which no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def split_sentences(text: str) -> list[str]:
    """Sentences of text, whitespace normalised; line breaks always end a sentence."""
    sentences = []
    for line in text.splitlines():
        line = " ".join(line.split())
        start = 0
        for match in _END.finditer(line):
            if _is_sentence_end(line, match):
                sentences.append(line[start : match.end()].strip())
                start = match.end()
        sentences.append(line[start:].strip())
    return [s for s in sentences if not is_blank(s)]


def take_sentences(text: str, final: bool = False) -> tuple[list[str], str]:
    """For text still arriving: the sentences known to be complete (followed by the start of another, or
    a line break; with final, all of them), and the rest, to be continued by the text to come."""
    sentences = split_sentences(text)
    last = text.splitlines(keepends=True)[-1:]
    # Nothing is unfinished where the text ends in a line break (any: "\n", "\r", "\u2028"...) or after one.
    if final or not sentences or last[0].splitlines() != last or last[0] != text and is_blank(last[0]):
        return sentences, ""
    # The unfinished sentence, with its trailing space (the next text may start a new word). While it is
    # only opening quotes or brackets, the one before is not known to be complete either: "Hi. (and so)".
    keep = 2 if len(sentences) > 1 and not sentences[-1].strip(_OPENERS) else 1
    return sentences[:-keep], " ".join(sentences[-keep:]) + (" " if text[-1].isspace() else "")


def _is_sentence_end(line: str, match: re.Match[str]) -> bool:
    end, stop = match["end"], match.end()
    following = line[stop : stop + 1]
    if any(c in _CJK_ENDS for c in end):
        # A quote that runs on into its sentence, 「行こう。」と言った, does not end it.
        return following in ("", " ") or stop == match.end("end")
    if following not in ("", " "):  # 3.14, e.g., Dr.Who
        return False
    next_letter = _NEXT_LETTER.match(line, stop)[1]
    if next_letter.islower():  # "etc. and", "… then", '"Stop!" she said'
        return False
    if end != ".":
        return True
    word = line[line.rfind(" ", 0, match.start()) + 1 : match.start()]
    word = word.lstrip(_OPENERS).lower()
    if word in _TITLES or _INITIALS.fullmatch(word):
        return False
    return not (next_letter.isdigit() and word in _BEFORE_NUMBERS)


def chunk_text(text: str, max_units: int, count: Callable[[str], int] = len) -> list[str]:
    """Text as consecutive pieces with count(piece) <= max_units, made of whole sentences
    where they fit; a longer sentence is cut at clause punctuation, then between words, and
    only a word longer than the limit is cut inside.

    count is any measure of a string, typically the caller's token counter.
    """
    if max_units < 1:
        raise ValueError(f"max_units must be at least 1, got {max_units}")
    parts: list[str] = []
    for sentence in split_sentences(text):
        # CJK sentences follow one another without a space.
        space = "" if sentence[-1] in _CJK_ENDS + _CJK_CLOSERS else " "
        parts += _cut(sentence + space, max_units, count)
    return [piece.strip() for piece in _pack(parts, max_units, count)]


def _cut(piece: str, max_units: int, count: Callable[[str], int], level: int = 0) -> list[str]:
    """piece split into parts that each fit, packed back together as far as they fit."""
    if count(piece.strip()) <= max_units:
        return [piece]
    if level == len(_CUTS):
        raise ValueError(
            f"{piece!r} counts {count(piece.strip())} > max_units={max_units} on its own"
        )
    parts = []
    for part in _CUTS[level].findall(piece):
        parts += _cut(part, max_units, count, level + 1)
    return _pack(parts, max_units, count)


def _pack(parts: list[str], max_units: int, count: Callable[[str], int]) -> list[str]:
    """Greedily joins consecutive parts (each of which fits) while the join fits."""
    packed: list[str] = []
    for part in parts:
        if packed and count((packed[-1] + part).strip()) <= max_units:
            packed[-1] += part
        else:
            packed.append(part)
    return packed
