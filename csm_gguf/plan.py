"""How a text is spoken, shared by CSM and the server's engine: its pieces, tokenized once, each with its
own sampling (the seed advanced by its index), and the context each piece hears: the caller's segments,
then what was said before it, which give way, oldest first, when they do not all fit.

CSM speaks the pieces one after another in a loop; the engine starts each one between other requests'
frames. Both build a piece's prompt with `Context.prompt` (which also marks its voice prompt for the
generator's prompt cache) and record what it said with `Context.said`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Iterator, Sequence

import numpy as np

from .formats import FRAME_MS
from .generator import PromptTooLong, Segment, check_codes, check_speaker
from .sampling import Sampling
from .text import chunk_text, is_blank, is_unicode

if TYPE_CHECKING:
    from .generator import Generator
    from .model import CSMModel

# Pieces of a long text: short enough that a piece, the previous piece as context and the audio
# budget all fit the 2048-position context; long enough to keep the prosody of whole sentences.
PIECE_TOKENS = 60
# Frames allowed per text token before generation that never ends is cut off (speech runs at about
# 3 frames per token; this leaves room for slow speakers and pauses).
FRAMES_PER_TOKEN = 8
MIN_FRAMES = 25
# A piece's prompt beyond its text tokens: BOS, the speaker's tag ("[12]"), EOS, with room to spare.
PIECE_PROMPT_EXTRA = 8


def context_room(max_seq_len: int) -> int:
    """Positions a context (a voice's prompt) may take so that any piece still fits beside it: the model's
    context less a whole piece's prompt and the frames it may speak. About 1,500 of CSM's 2,048 (120 s)."""
    return max_seq_len - (PIECE_TOKENS + PIECE_PROMPT_EXTRA) - FRAMES_PER_TOKEN * PIECE_TOKENS


class TokenCounts:
    """Text -> its number of tokens, each distinct text tokenized once (chunking counts the same
    sentences again and again; the pieces' budgets count them once more)."""

    def __init__(self, model: CSMModel):
        self.model = model
        self.counts: dict[str, int] = {}

    def __call__(self, text: str) -> int:
        n = self.counts.get(text)
        if n is None:
            n = self.counts[text] = len(self.model.tokenize(text))
        return n


def split_text(text: str, count: TokenCounts) -> list[str]:
    """A text to speak, checked, in pieces of at most PIECE_TOKENS tokens (see text.chunk_text)."""
    if not isinstance(text, str):
        raise ValueError(f"the text to speak must be a string, got {type(text).__name__}")
    text = text.strip()
    if is_blank(text):
        raise ValueError("text is empty: give some words to speak")
    if not is_unicode(text):
        raise ValueError("the text holds characters that are not Unicode (lone surrogates, from bytes that "
                         "were not UTF-8): give UTF-8 text")
    return chunk_text(text, PIECE_TOKENS, count)


def frame_budget(tokens: int) -> float:
    """max_audio_ms for a piece of `tokens` text tokens when the caller sets none."""
    return max(MIN_FRAMES, FRAMES_PER_TOKEN * tokens) * FRAME_MS


@dataclass(frozen=True)
class Piece:
    """One piece of text to speak: who says it, its prompt tokens and its own sampling."""

    speaker: int
    text: str
    prompt: list[int]  # BOS [speaker]text EOS
    sampling: Sampling  # the seed advanced by the piece's index; max_audio_ms its budget
    room: int  # frames it keeps free in the model's context: its usual budget, or the caller's limit if less


def plan_pieces(lines: Iterable[tuple[int, str]], sampling: Sampling, count: TokenCounts) -> Iterator[Piece]:
    """(speaker, piece text) in the order spoken -> Pieces; piece i samples with seed + i."""
    model = count.model
    for i, (speaker, text) in enumerate(lines):
        budget = frame_budget(count(text))
        own = sampling.for_piece(i, budget)
        yield Piece(speaker, text, model.prompt_tokens(speaker, text), own,
                    room=int(min(own.max_audio_ms, budget) // FRAME_MS))


@dataclass(frozen=True)
class Heard:
    """A context segment with its prompt tokens, tokenized once."""

    segment: Segment
    prompt: list[int]

    @property
    def rows(self) -> int:
        codes = self.segment.codes
        return len(self.prompt) + (0 if codes is None else len(codes) + 1)  # its frames and the EOS frame


class Context:
    """What the next piece hears: the caller's segments (checked and tokenized once, here), then the last
    piece each speaker said (`said`), in the order said, so every voice carries over."""

    def __init__(self, generator: Generator, segments: Sequence[Segment], previous: Sequence[Heard] = ()):
        model = generator.model
        for seg in segments:
            check_speaker(seg.speaker)
            if seg.codes is not None:
                check_codes(seg.codes, model.config.num_codebooks, model.n_codes, "context codes")
        self.generator = generator
        self.given = [Heard(seg, model.prompt_tokens(seg.speaker, seg.text)) for seg in segments]
        self.previous = list(previous)

    def prompt(self, piece: Piece) -> tuple[np.ndarray, int]:
        """The piece's prompt embeddings, after the context that fits (`fitting`), and how many of its first
        rows the generator keeps in its prompt cache once read (`Generator.start`'s `shared`): those of the
        caller's segments (a voice prompt, and any context given with it) while the piece hears them all;
        none once they give way to what was said since. Every later piece, request or turn that begins with
        the same segments then reads only the rest."""
        heard = self.fitting(piece)
        prompt = self.generator.embed([(h.prompt, h.segment.codes) for h in heard], piece.prompt)
        whole = len(heard) >= len(self.given) and all(a is b for a, b in zip(self.given, heard))
        return prompt, sum(h.rows for h in self.given) if whole else 0

    def fitting(self, piece: Piece) -> list[Heard]:
        """The context must leave the piece its room in the model's context. After a previous piece,
        segments give way, oldest first, until it does: a context that fit the first piece must not stop a
        long text half-way. Without one, a context that leaves too little room is the caller's error
        (PromptTooLong): the speech would stop short."""
        heard = [*self.given, *self.previous]
        if not self.previous:
            self.check_room(piece)
            return heard
        limit = self.generator.cfg.backbone.max_seq_len
        rows = len(piece.prompt) + sum(h.rows for h in heard)
        while heard and rows + piece.room > limit:
            rows -= heard.pop(0).rows
        return heard

    def check_room(self, piece: Piece) -> None:
        """PromptTooLong unless the caller's segments leave `piece` its room (as `fitting` asks while nothing
        was said before it): what CSM's lazy calls check when called, not at their first frame."""
        limit = self.generator.cfg.backbone.max_seq_len
        rows = len(piece.prompt) + sum(h.rows for h in self.given)
        if rows + piece.room > limit:
            raise PromptTooLong(
                f"the prompt takes {rows} positions and this text may need up to {piece.room} frames more "
                f"({piece.room * FRAME_MS / 1000:g} s of speech), but the model's context holds {limit}: "
                "shorten the context segments or the text")

    def said(self, piece: Piece, made: list[np.ndarray]) -> None:
        """The piece was spoken as `made`: the next piece hears it, in place of what its speaker said
        before. A piece that made no frames changes nothing."""
        if made:
            spoken = Heard(Segment(piece.speaker, piece.text, np.stack(made)), piece.prompt)
            self.previous = [*(h for h in self.previous if h.segment.speaker != piece.speaker), spoken]
