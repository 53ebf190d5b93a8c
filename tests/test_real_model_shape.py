"""The comparison with transformers on a tiny CSM shaped like CSM-1B where a bug would hide on a simpler one.

CSM-1B's audio vocabulary (2051 ids) is wider than Mimi's codebooks (2048 codes); here 67 over the tiny
codec's 64. Code that strides the embedding tables, the decoder inputs or the backbone's output rows by the
codec's size instead of the vocabulary's is exact when the two are equal and garbles every frame here. The
ids beyond the codec are never sampled by the runtime (it reads the first n_codes logits); transformers is
given a logits processor that suppresses them, so both decode the same distribution. RoPE is spelled as
sesame/csm-1b's config.json spells it (other numbers than torchtune's, the same curve), and the prompt is
built from tiktoken's encoding, not the project's prompt builder.
"""

from __future__ import annotations

import numpy as np
import pytest

from csm_fixtures import (
    REAL_BACKBONE_ROPE,
    REAL_DECODER_ROPE,
    make_tiny_csm,
    random_codes,
    save_codec,
    save_original_format,
    save_transformers_format,
)
from csm_gguf.generator import Generator, Sampling, Segment
from csm_gguf.model import CSMModel
from reference import llama3_prompt_tokens, reference_greedy_codes, reference_prompt_embeddings

VOCAB, CODEC = 67, 64
TEXT = "Hello there, how are you doing today? Ça va — 你好!"
FRAMES = 40


def context() -> list[Segment]:
    # Codes up to 63 (the codec's last): 260 frames, so prompt and generation span > 300 positions (RoPE).
    return [Segment(speaker=1, text="Earlier, somebody said this.", codes=random_codes(260, CODEC, seed=4)),
            Segment(speaker=0, text="A line without audio.")]


def ours(model_dir, frames: int = FRAMES, ctx=None) -> np.ndarray:
    gen = Generator(CSMModel(model_dir), kv_type="f32")
    try:
        sampling = Sampling(temperature=0, max_audio_ms=frames * 80)
        return np.stack(list(gen.generate(TEXT, 0, context() if ctx is None else ctx, sampling)))
    finally:
        gen.close()


@pytest.fixture(scope="module")
def wide():
    """The extra ids' head rows made three times as large: unsuppressed, greedy decoding would pick them in
    about half the frames (codebook 0 and the others alike), so sampling them anywhere shows."""
    import torch

    model = make_tiny_csm(seed=11, vocab_size=VOCAB, backbone_rope=REAL_BACKBONE_ROPE, decoder_rope=REAL_DECODER_ROPE)
    with torch.no_grad():
        model.lm_head.weight[CODEC:] *= 3
        model.depth_decoder.codebooks_head.weight[..., CODEC:] *= 3
    return model


@pytest.fixture(scope="module")
def wide_transformers(wide, tokenizer_json, workdir):
    from converter.convert import convert

    folder = save_transformers_format(wide, workdir / "wide-hf", tokenizer_json, published_config=True)
    return convert(model_path=str(folder), output_dir=workdir / "wide-hf-f32", qtype="f32")


@pytest.fixture(scope="module")
def wide_original(wide, tokenizer_json, workdir):
    from converter.convert import convert

    folder = save_original_format(wide, workdir / "wide-original")
    codec = save_codec(wide, workdir / "wide-mimi")
    return convert(model_path=str(folder), tokenizer_path=str(tokenizer_json), mimi_path=str(codec),
                   output_dir=workdir / "wide-original-f32", qtype="f32")


@pytest.fixture(scope="module")
def reference_codes(wide):
    emb = reference_prompt_embeddings(wide, None, TEXT, 0, context())
    assert emb.shape[1] + FRAMES > 300
    return reference_greedy_codes(wide, emb, FRAMES, n_codes=CODEC)


def test_the_fixture_is_shaped_like_csm_1b(wide, wide_transformers, reference_codes):
    """Guards the fixture: a wider vocabulary than the codec, ids that the suppression actually changes."""
    model = CSMModel(wide_transformers)
    assert (model.config.audio_vocab_size, model.n_codes) == (VOCAB, CODEC)
    assert wide.config.codec_config.codebook_size == CODEC
    scaling = model.config.backbone.rope_scaling
    assert (scaling.original_context, scaling.low_freq_factor, scaling.high_freq_factor) == (1024, 0.125, 0.5)
    assert model.config.decoder.rope_scaling.original_context == 16
    free = reference_greedy_codes(wide, reference_prompt_embeddings(wide, None, TEXT, 0, context()), 8)
    # unsuppressed, transformers would emit ids the codec cannot decode, in codebook 0 and in the others
    assert (free[:, 0] >= CODEC).any() and (free[:, 1:] >= CODEC).any()
    assert reference_codes.max() < CODEC


@pytest.mark.parametrize("decoder", ["graph", "llama"])
def test_greedy_codes_equal_transformers_with_a_wider_vocabulary(wide_transformers, reference_codes, decoder,
                                                                 monkeypatch):
    monkeypatch.setenv("CSM_GGUF_DECODER", decoder)  # the depth decoder as one ggml graph, or through llama.cpp
    codes = ours(wide_transformers)
    assert codes.shape == (FRAMES, 32)
    np.testing.assert_array_equal(codes, reference_codes)


def test_original_format_gives_the_same_codes(wide_original, reference_codes):
    np.testing.assert_array_equal(ours(wide_original), reference_codes)


def test_prompt_equals_transformers_embeddings_of_the_llama3_encoding(wide, wide_transformers):
    """Every row of the prompt: text rows from tiktoken's ids, audio rows as transformers sums them, the EOS
    frame after each segment's audio, segments in order, the text to speak last."""
    gen = Generator(CSMModel(wide_transformers), kv_type="f32")
    try:
        ctx = [*context(), Segment(speaker=7, text="Numbers: 3.14, don't\nstop!", codes=random_codes(5, CODEC, 9))]
        ours_ = gen.prompt_embeddings(TEXT, 12, ctx)
        rows = gen.prompt_rows(TEXT, 12, ctx)
    finally:
        gen.close()
    expected = reference_prompt_embeddings(wide, None, TEXT, 12, ctx)[0].numpy()
    assert len(ours_) == rows == len(expected)
    assert len(expected) == sum(len(llama3_prompt_tokens(s.speaker, s.text)) + (len(s.codes) + 1 if s.codes is not None
                                                                                else 0) for s in ctx) + len(
        llama3_prompt_tokens(12, TEXT))
    np.testing.assert_allclose(ours_, expected, rtol=0, atol=1e-5)


def test_llama3_prompt_tokens_are_bos_speaker_text_eos():
    """The independent encoding itself, by hand: [3]Hi is '[', '3', ']', 'Hi' in Llama 3's vocabulary."""
    ids = llama3_prompt_tokens(3, "Hi")
    assert ids[0] == 128000 and ids[-1] == 128001 and len(ids) == 6
    from csm_fixtures import tiktoken_encoding

    assert tiktoken_encoding().decode(ids[1:-1]) == "[3]Hi"
