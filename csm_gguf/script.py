"""Dialogue scripts: one turn per line, `SPEAKER: text`, where SPEAKER is a CSM speaker id or a voice name
(a saved voice, or one of the server's built-in names). Blank lines are skipped.

    0: Did you hear that?
    narrator: Hear what?
"""

from __future__ import annotations

import re

from .generator import Segment
from .text import is_blank
from .voices import load_voice

_TURN = re.compile(r"(?P<who>[^:\s][^:]*?)\s*:\s*(?P<text>.*)")


def read_script(script: str) -> tuple[list[tuple[int, str]], list[Segment]]:
    """The script's turns as (speaker id, text), and the prompt segments of the voices it names (in the
    order they first speak), to go before any other context.

    Each voice speaks with its saved speaker id unless another speaker of the script already has that id
    (two voices saved with speaker 0): then it takes the smallest free id, and so do its prompt segments,
    since CSM tells speakers apart only by their ids."""
    lines = []
    for number, line in enumerate(script.splitlines(), 1):
        if is_blank(line):
            continue
        match = _TURN.fullmatch(line.strip())
        if not match:
            raise ValueError(f"dialogue line {number} names no speaker: write each turn as SPEAKER: TEXT, "
                             "where SPEAKER is a speaker id or a voice name")
        if is_blank(match["text"]):
            raise ValueError(f"dialogue line {number}: {match['who']!r} says nothing")
        lines.append((number, match["who"], match["text"]))
    if not lines:
        raise ValueError("the dialogue has no turns: write one per line, as SPEAKER: TEXT")

    ids = {who: int(who) for _, who, _ in lines if who.isascii() and who.isdigit()}
    taken = set(ids.values())
    prompts: list[Segment] = []
    for number, who, _ in lines:
        if who in ids:
            continue
        try:
            voice = load_voice(who)
        except ValueError as e:
            raise ValueError(f"dialogue line {number}: {e}") from None
        speaker = voice.speaker
        if speaker in taken:
            speaker = min(set(range(len(taken) + 1)) - taken)
        taken.add(speaker)
        ids[who] = speaker
        prompts += [Segment(speaker, seg.text, seg.codes) if seg.speaker == voice.speaker else seg
                    for seg in voice.segments]
    return [(ids[who], text) for _, who, text in lines], prompts
