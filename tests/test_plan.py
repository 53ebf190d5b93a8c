"""The piece plan (csm_gguf.plan) against the Generator's own prompt builder and the independent encoding.

CSM, the server's engine, the dialogue and stream_text all build a piece's prompt through the plan
(`Piece.prompt`, `Context.prompt`), so comparing one of those paths with another cannot see a plan that
speaks a piece or a context segment as the wrong speaker: both would. Here the plan's prompt is compared
with `Generator.prompt_embeddings` (which builds it from the segments directly) and its tokens with
tiktoken's encoding; and the rows the plan counts to fit a prompt are the rows it makes.
"""

from __future__ import annotations

import numpy as np

from csm_fixtures import random_codes
from csm_gguf.generator import Segment
from csm_gguf.plan import Context, TokenCounts, plan_pieces
from csm_gguf.sampling import Sampling
from reference import llama3_prompt_tokens

LINES = [(3, "Hello there, how are you doing today?"), (4, "Fine, thanks. And you?"), (3, "Never better.")]


def caller_context() -> list[Segment]:
    return [Segment(1, "Earlier, somebody said this.", random_codes(7, 64, seed=2)),
            Segment(2, "A line without audio."),
            Segment(5, "And a last one.", random_codes(4, 64, seed=3))]


def test_piece_prompts_are_bos_speaker_text_eos_by_tiktoken(tts):
    pieces = list(plan_pieces(LINES, Sampling(seed=7), TokenCounts(tts.model)))
    assert [(p.speaker, p.text) for p in pieces] == LINES
    assert [p.prompt for p in pieces] == [llama3_prompt_tokens(s, t) for s, t in LINES]
    assert [p.sampling.seed for p in pieces] == [7, 8, 9]


def test_each_piece_s_prompt_is_the_generator_s_after_what_was_said(tts):
    """Piece by piece, as CSM speaks a dialogue: the caller's segments, then each speaker's last piece (with
    the frames it made), then the piece; every row equal to `prompt_embeddings` of those segments."""
    gen = tts.generator
    context = Context(gen, caller_context())
    said: list[Segment] = []  # each speaker's last piece, in the order said
    for i, piece in enumerate(plan_pieces(LINES, Sampling(), TokenCounts(tts.model))):
        heard = [*caller_context(), *said]
        ours, shared = context.prompt(piece)
        assert shared == sum(h.rows for h in context.given)  # the caller's segments, read once then cached
        expected = gen.prompt_embeddings(piece.text, piece.speaker, heard)
        np.testing.assert_array_equal(ours, expected)
        # the rows the plan counts to fit the prompt in the model's context are the rows it makes
        assert len(piece.prompt) + sum(h.rows for h in context.fitting(piece)) == len(ours)
        made = list(random_codes(3 + i, 64, seed=10 + i))
        context.said(piece, made)
        said = [seg for seg in said if seg.speaker != piece.speaker] + [Segment(piece.speaker, piece.text,
                                                                                np.stack(made))]


def test_context_gives_way_only_when_the_piece_would_not_fit_and_is_then_not_cached(tts):
    """Exactly full is full enough: the context gives way at one position more, oldest first; and a prompt
    whose caller's segments gave way is no voice prompt to keep in the prompt cache."""
    from dataclasses import replace

    gen = tts.generator
    first, second = plan_pieces(LINES[:2], Sampling(), TokenCounts(tts.model))
    context = Context(gen, caller_context())
    context.said(first, list(random_codes(5, 64, seed=1)))
    heard = [*context.given, *context.previous]
    free = gen.cfg.backbone.max_seq_len - len(second.prompt) - sum(h.rows for h in heard)
    assert context.fitting(replace(second, room=free)) == heard
    assert context.prompt(replace(second, room=free))[1] == sum(h.rows for h in context.given)
    assert context.fitting(replace(second, room=free + 1)) == heard[1:]
    assert context.prompt(replace(second, room=free + 1))[1] == 0
