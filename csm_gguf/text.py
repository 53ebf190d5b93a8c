"""Splitting long text into sentences and into pieces short enough to speak in one go."""

from __future__ import annotations

import re
import unicodedata
from bisect import bisect_right
from collections.abc import Callable
from itertools import accumulate

# Sentence ends: runs of . ! ? … and the full stops and question marks of other scripts that put a space
# after them (Devanagari । ॥, Arabic and Urdu ؟ ۔, Armenian ։, Ethiopic ።, Burmese ။), or of the CJK forms
# (CJK text has no spaces), then any closing quotes or brackets.
# Where a file's lines end, as editors number them: at \n, \r\n or \r, not where str.splitlines also breaks (form
# feeds, U+0085, U+2028 and U+2029 are characters within a line, and valid within a JSON string).
LINE_BREAK = re.compile(r"\r\n|\r|\n")
_SPACED_ENDS = ".!?…।॥؟۔։።။"
_CJK_ENDS = "。！？｡"
_CJK_CLOSERS = "」』）】》〉"
_CLOSERS = "\"'”’»)]}" + _CJK_CLOSERS
_OPENERS = "\"'“‘«([{¿¡「『（【《〈"
_END = re.compile(rf"(?P<end>[{_SPACED_ENDS}{_CJK_ENDS}]+)[{re.escape(_CLOSERS)}]*")
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
    return [s for line in text.splitlines() for s, _ in _split_line(line) if not is_blank(s)]


def _split_line(line: str) -> list[tuple[str, int]]:
    """A line's sentences, whitespace normalised (blank ones too), each with where it ends in the line."""
    words = list(re.finditer(r"\S+", line))
    text = " ".join(w[0] for w in words)
    starts = list(accumulate((len(w[0]) + 1 for w in words[:-1]), initial=0))  # of each word in text

    def in_line(position: int) -> int:  # a position inside or at the end of a word of text
        i = bisect_right(starts, position) - 1
        return words[i].start() + position - starts[i]

    sentences, start = [], 0
    for match in _END.finditer(text):
        if _is_sentence_end(text, match, start):
            sentences.append((text[start : match.end()].strip(), in_line(match.end())))
            start = match.end()
    sentences.append((text[start:].strip(), len(line)))
    return sentences


def take_sentences(text: str, final: bool = False) -> tuple[list[str], str]:
    """For text still arriving: the sentences known to be complete (followed by the start of another, or
    a line break; with final, all of them), and the rest of the text, which the text to come continues."""
    lines = text.splitlines(keepends=True)
    last = lines[-1] if lines else ""
    if final or last.splitlines() != [last]:  # the text ends in a line break (any: \n, \r, \u2028...)
        return split_sentences(text), ""
    # The unfinished sentence is the last line's last. While it is only opening quotes or brackets, the one
    # before it on that line is not known to be complete either: "Hi. (" may go on "and so)".
    on_line = [(s, end) for s, end in _split_line(last) if not is_blank(s)]
    keep = 2 if len(on_line) > 1 and not on_line[-1][0].strip(_OPENERS) else min(len(on_line), 1)
    done_on_line = len(on_line) - keep
    rest = last[on_line[done_on_line - 1][1] :] if done_on_line else last
    return split_sentences("".join(lines[:-1])) + [s for s, _ in on_line[:done_on_line]], rest


def take_sentences_within(text: str, limit: int) -> tuple[list[str], str]:
    """take_sentences for text still arriving, and text that runs past `limit` characters without a sentence
    end cut between words (`cut_between_words`) and given as sentences too: nothing waits for ever."""
    sentences, rest = take_sentences(text)
    while len(rest) > limit:
        head, rest = cut_between_words(rest, limit)
        sentences += split_sentences(head)
    return sentences, rest


def cut_between_words(text: str, limit: int) -> tuple[str, str]:
    """The first at most `limit` characters of text that has no sentence end, cut at a space where it has
    one, and the rest: how text too long to wait for its sentence's end is spoken."""
    cut = text.rfind(" ", 0, limit)
    cut = cut if cut > 0 else limit
    return text[:cut], text[cut:].lstrip()


def _is_sentence_end(line: str, match: re.Match[str], start: int) -> bool:
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
    if line[start : match.start()].strip().isdecimal():  # "1. Open the door": a list's number, not a sentence
        return False
    word = line[max(line.rfind(" ", 0, match.start()) + 1, start) : match.start()]  # "ペンです。Dr. Smith"
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
