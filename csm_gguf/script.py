"""Dialogue scripts: one turn per line, `SPEAKER: text`, where SPEAKER is a CSM speaker id (digits) or a
voice name (a saved voice, or one of the server's built-in names). Blank lines are skipped.

    0: Did you hear that?
    narrator: Hear what?
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Iterable

from .generator import Segment
from .text import LINE_BREAK, is_blank
from .tts import NO_VOICE, Voice
from .voices import load_voice

_TURN = re.compile(r"(?P<who>[^:]*?)\s*:\s*(?P<text>.*)")


def _visible(text: str) -> str:
    """text without invisible format characters (zero-width spaces, BOMs, direction marks), which pasted
    text carries around speaker names."""
    return "".join(c for c in text if unicodedata.category(c) != "Cf").strip()


def read_script(script: str, reserved: Iterable[int] = (), load: Callable[[str], Voice] = load_voice
                ) -> tuple[list[tuple[int, str]], list[Segment]]:
    """The script's turns as (speaker id, text), and the prompt segments of the voices it names (see
    `voice_turns`)."""
    lines = []
    for number, line in enumerate(LINE_BREAK.split(script), 1):
        if is_blank(line):
            continue
        match = _TURN.fullmatch(line.strip())
        who = _visible(match["who"]) if match else ""
        if not who:
            raise ValueError(f"dialogue line {number} names no speaker: write each turn as SPEAKER: TEXT, "
                             "where SPEAKER is a speaker id or a voice name")
        if is_blank(match["text"]):
            raise ValueError(f"dialogue line {number}: {who!r} says nothing")
        if re.fullmatch(r"[-+]\d+", who):
            raise ValueError(f"dialogue line {number}: a speaker id is a whole number >= 0, got {who}")
        if who == NO_VOICE:
            raise ValueError(f"dialogue line {number}: {NO_VOICE!r} is no speaker: a turn without a voice prompt "
                             "names its speaker id (0: ...)")
        lines.append((f"dialogue line {number}", int(who) if who.isascii() and who.isdigit() else who,
                      match["text"]))
    if not lines:
        raise ValueError("the dialogue has no turns: write one per line, as SPEAKER: TEXT")
    return voice_turns(lines, reserved, load)


def voice_turns(lines: list[tuple[str, int | str, str]], reserved: Iterable[int] = (),
                load: Callable[[str], Voice] = load_voice) -> tuple[list[tuple[int, str]], list[Segment]]:
    """Turns (where, speaker id or voice name, text) as (speaker id, text), and the prompt segments of the
    voices they name (in the order they first speak, each read by `load`: a built-in voice's prompt needs the
    model, CSM.voice), to go before any other context. `where` names the turn in errors.

    Speaker ids are used as they are. A voice keeps the ids it was saved with (its own and those of any other
    speakers in its prompt) unless one is taken, by the turns' ids, by `reserved` (the ids of the caller's
    other context segments) or by a voice that speaks before it: then that id moves to the smallest free one,
    prompt segments and all, since CSM tells speakers apart only by their ids."""
    ids: dict[int | str, int] = {who: int(who) for _, who, _ in lines if not isinstance(who, str)}
    taken = {*reserved, *ids.values()}
    prompts: list[Segment] = []
    for where, who, _ in lines:
        if who in ids:
            continue
        try:
            voice = load(who)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        moved: dict[int, int] = {}
        for speaker in dict.fromkeys([voice.speaker, *(seg.speaker for seg in voice.segments)]):
            moved[speaker] = speaker if speaker not in taken else min(set(range(len(taken) + 1)) - taken)
            taken.add(moved[speaker])
        ids[who] = moved[voice.speaker]
        prompts += [Segment(moved[seg.speaker], seg.text, seg.codes) for seg in voice.segments]
    return [(ids[who], text) for _, who, text in lines], prompts
