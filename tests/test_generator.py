"""The core claim: converted GGUF models generate exactly the reference's codes."""

from __future__ import annotations

import llama_cpp
import numpy as np
import pytest

from csm_fixtures import make_tiny_csm, random_codes, save_transformers_format
from csm_gguf.generator import Generator, PromptTooLong, Sampling, Segment
from csm_gguf.model import CSMModel
from reference import reference_greedy_codes, reference_prompt_embeddings

TEXT = "Hello there, how are you doing today?"
CONTEXT_TEXT = "Earlier, somebody said this. And then more words were spoken!"
FRAMES = 40
GREEDY = Sampling(temperature=0, max_audio_ms=FRAMES * 80)


def context(vocab: int = 64) -> list[Segment]:
    # 260 context frames + text: the prompt and generation span > 300 positions, so RoPE is exercised.
    return [Segment(speaker=1, text=CONTEXT_TEXT, codes=random_codes(260, vocab, seed=1))]


def ours(model_dir, text=TEXT, ctx=None, sampling=GREEDY, **kw) -> np.ndarray:
    gen = Generator(CSMModel(model_dir), kv_type="f32", **kw)
    try:
        return np.stack(list(gen.generate(text, 0, ctx if ctx is not None else context(), sampling)))
    finally:
        gen.close()


@pytest.fixture(scope="module")
def reference_codes(tiny_csm, f32_model):
    model = CSMModel(f32_model)
    emb = reference_prompt_embeddings(tiny_csm, model.prompt_tokens, TEXT, 0, context())
    assert emb.shape[1] + FRAMES > 300
    return reference_greedy_codes(tiny_csm, emb, FRAMES)


@pytest.mark.parametrize("decoder", ["graph", "llama"])
def test_greedy_codes_equal_transformers(f32_model, reference_codes, decoder, monkeypatch):
    """Either depth decoder: the frame as one ggml graph (the default, depth.py), or 31 llama.cpp steps."""
    monkeypatch.setenv("CSM_GGUF_DECODER", decoder)
    codes = ours(f32_model)
    assert codes.shape == (FRAMES, 32)
    np.testing.assert_array_equal(codes, reference_codes)


# GPU builds of llama.cpp (CUDA, Metal): every layer offloaded. CI's CPU build skips these.
needs_gpu = pytest.mark.skipif(not llama_cpp.llama_supports_gpu_offload(), reason="llama.cpp built without GPU offload")
ALL_LAYERS = 999


def test_original_format_gives_identical_codes(original_checkpoint, tokenizer_json, codec_folder, workdir,
                                               reference_codes):
    from converter.convert import convert

    out = convert(model_path=str(original_checkpoint), tokenizer_path=str(tokenizer_json),
                  mimi_path=str(codec_folder), output_dir=workdir / "from-original", qtype="f32")
    np.testing.assert_array_equal(ours(out), reference_codes)


def test_sharded_checkpoint_with_sesame_index_name(tiny_csm, tokenizer_json, workdir, reference_codes):
    from converter.convert import convert

    folder = save_transformers_format(tiny_csm, workdir / "sharded", tokenizer_json, shard=True)
    assert (folder / "transformers.safetensors.index.json").exists()
    out = convert(model_path=str(folder), output_dir=workdir / "from-sharded", qtype="f32")
    np.testing.assert_array_equal(ours(out), reference_codes)


@pytest.mark.parametrize("decoder", ["graph", "llama"])
def test_untied_decoder_embeddings_are_used(tokenizer_json, workdir, decoder, monkeypatch):
    """A fine-tune whose depth decoder has its own audio embeddings."""
    from converter.convert import convert

    monkeypatch.setenv("CSM_GGUF_DECODER", decoder)

    model = make_tiny_csm(seed=3, untie_decoder_embeddings=True)
    folder = save_transformers_format(model, workdir / f"untied-{decoder}", tokenizer_json)
    out = convert(model_path=str(folder), output_dir=workdir / f"untied-f32-{decoder}", qtype="f32")
    ctx = context()
    emb = reference_prompt_embeddings(model, CSMModel(out).prompt_tokens, TEXT, 0, ctx)
    np.testing.assert_array_equal(ours(out, ctx=ctx)[:12], reference_greedy_codes(model, emb, 12))


def c0_logits(model_dir, n_gpu_layers: int = 0) -> np.ndarray:
    """Codebook-0 logits of the first frame of TEXT with context()."""
    gen = Generator(CSMModel(model_dir), kv_type="f32", n_gpu_layers=n_gpu_layers)
    stream = gen.start(gen.prompt_embeddings(TEXT, 0, context()), GREEDY)
    bb = gen.backbone
    bb.embd[0], bb.pos[0], bb.output[0] = stream.pending, stream.pos, 1
    bb.set_seq_ids(np.array([stream.slot], np.int32))
    bb.decode(1)
    out = bb.logits(1)[0, : gen.model.n_codes].copy()
    gen.close()
    return out


# Loose floors: a tiny random model has none of the redundancy that makes real weights quantize well.
@pytest.mark.parametrize("qtype, min_corr", [("f16", 0.999), ("bf16", 0.99), ("q8_0", 0.99), ("q4_k", 0.85)])
def test_quantized_variants_generate_and_agree_with_f32(converted, f32_model, qtype, min_corr, capsys):
    model_dir = converted(qtype)
    codes = ours(model_dir, sampling=Sampling(temperature=0, max_audio_ms=8 * 80))
    assert codes.shape[1] == 32 and len(codes) > 0

    ref, q = c0_logits(f32_model), c0_logits(model_dir)
    corr = float(np.corrcoef(ref, q)[0, 1])
    top1 = int(np.argmax(ref) == np.argmax(q))
    with capsys.disabled():
        print(f"\n{qtype}: codebook-0 logits vs f32: max |diff| {np.abs(ref - q).max():.4f}, "
              f"correlation {corr:.5f}, same top-1: {bool(top1)}")
    assert corr > min_corr


@needs_gpu
@pytest.mark.parametrize("qtype, min_corr",
                         [("f32", 0.999), ("f16", 0.999), ("bf16", 0.999), ("q8_0", 0.999), ("q4_k", 0.99)])
def test_weight_types_on_gpu_agree_with_cpu(converted, qtype, min_corr):
    """The GPU's kernels for each weight type compute what the CPU's do, up to rounding. Not bit for bit:
    llama.cpp's CUDA backend multiplies F32 matrices by several rows (a prompt, batched streams) in TF32,
    so greedy codes part from the CPU's and the reference's after a few frames (frame 12 on an H200). On the
    CPU of the same build, test_greedy_codes_equal_transformers holds: no offloaded layers, no GPU work.
    q4_k's floor is lower: its products take different quantized paths on the two backends (0.9945 on an
    H200, where the other types exceeded 0.999; q4_k against f32 is 0.92 on this tiny model)."""
    model_dir = converted(qtype)
    cpu, gpu = c0_logits(model_dir), c0_logits(model_dir, ALL_LAYERS)
    assert np.corrcoef(cpu, gpu)[0, 1] > min_corr
    codes = ours(model_dir, sampling=Sampling(temperature=0, max_audio_ms=8 * 80), n_gpu_layers=ALL_LAYERS)
    assert codes.shape[1] == 32 and len(codes) > 0


@needs_gpu
def test_heads_on_the_gpu_draw_what_heads_on_the_cpu_draw(f32_model, monkeypatch):
    """With the layers on the GPU the heads and the draw go there too (one int32 a stream comes back, not
    the logits); CSM_GGUF_HEADS_DEVICE=cpu keeps them on the CPU. One stream, greedy: the same codes (one
    stream's products are not TF32; a near tie could still part them, which would show here first)."""
    sampling = Sampling(temperature=0, max_audio_ms=8 * 80)
    gen = Generator(CSMModel(f32_model), kv_type="f32", n_gpu_layers=ALL_LAYERS)
    try:
        assert gen.heads.on_gpu
        on_gpu = np.stack(list(gen.generate(TEXT, 0, context(), sampling)))
    finally:
        gen.close()
    monkeypatch.setenv("CSM_GGUF_HEADS_DEVICE", "cpu")
    np.testing.assert_array_equal(on_gpu, ours(f32_model, sampling=sampling, n_gpu_layers=ALL_LAYERS))


def test_heads_fall_back_to_the_cpu_when_the_gpu_backend_lacks_an_op(f32_model, monkeypatch, capsys):
    """A GPU build whose backend cannot run the draw (CUDA's top-k over 2048 codes needs CUB) keeps the
    heads on the CPU and says so, instead of failing to load."""
    import csm_gguf.generator as generator_module

    real = generator_module.CodebookHeads

    def heads(*args, device="cpu", **kwargs):
        if device == "gpu":
            raise NotImplementedError("this ggml build's GPU backend lacks an op of the codebook draw")
        return real(*args, device=device, **kwargs)

    monkeypatch.setattr(generator_module, "gpu_present", lambda: True)
    monkeypatch.setattr(generator_module, "CodebookHeads", heads)
    gen = Generator(CSMModel(f32_model), n_gpu_layers=ALL_LAYERS)
    try:
        assert not gen.heads.on_gpu
    finally:
        gen.close()
    assert "codebook heads on the CPU: this ggml build's GPU backend lacks an op" in capsys.readouterr().err


def test_an_unknown_heads_device_is_refused(f32_model, monkeypatch):
    monkeypatch.setenv("CSM_GGUF_HEADS_DEVICE", "tpu")
    with pytest.raises(ValueError, match="CSM_GGUF_HEADS_DEVICE is cpu or gpu, got 'tpu'"):
        Generator(CSMModel(f32_model))


def test_same_seed_same_codes_and_codes_stay_in_codec_range(tokenizer_json, workdir):
    """Audio vocabulary 67 over a 64-code codec (like CSM's 2051 over Mimi's 2048): never emit 64..66."""
    from converter.convert import convert
    from csm_fixtures import TINY_CSM, TINY_DECODER

    model = make_tiny_csm(seed=5, vocab_size=67)
    assert TINY_CSM["vocab_size"] == TINY_DECODER["vocab_size"] == 64
    folder = save_transformers_format(model, workdir / "wide-vocab", tokenizer_json)
    out = convert(model_path=str(folder), output_dir=workdir / "wide-vocab-f32", qtype="f32")
    hot = Sampling(temperature=5.0, top_k=67, seed=1234, max_audio_ms=20 * 80)
    a = ours(out, ctx=[], sampling=hot)
    b = ours(out, ctx=[], sampling=hot)
    np.testing.assert_array_equal(a, b)
    assert a.max() < 64
    c = ours(out, ctx=[], sampling=Sampling(temperature=5.0, top_k=67, seed=99, max_audio_ms=20 * 80))
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("seed", [0, 2**32 - 1, 2**63 - 1, 2**100])
def test_every_seed_is_reproducible(seed):
    """Any whole seed >= 0 gives the same numbers each time (llama.cpp's sampler, used before, took 32 bits
    and read 0xFFFFFFFF as "draw a random one"), and another seed other numbers."""
    from csm_gguf.generator import Sampler

    runs = [Sampler(Sampling(temperature=1.0, seed=seed), 100).noise(32) for _ in range(2)]
    np.testing.assert_array_equal(*runs)
    assert not np.array_equal(runs[0], Sampler(Sampling(temperature=1.0, seed=seed + 1), 100).noise(32))


def test_a_stream_s_noise_is_its_temperature_times_gumbel_numbers_over_its_top_k():
    """The noise that runs the draw's exponential race: greedy draws none (top-1, noise 0); otherwise one number
    per code of the stream's top-k (at most every code) and codebook, temperature x Gumbel(0, 1), finite even for
    the largest temperature."""
    from csm_gguf.generator import Sampler

    greedy = Sampler(Sampling(temperature=0), 100)
    assert greedy.top_k == 1 and np.array_equal(greedy.noise(32), np.zeros((32, 1), np.float32))
    assert Sampler(Sampling(top_k=500), 100).noise(32).shape == (32, 100)
    warm = Sampler(Sampling(temperature=2.0, top_k=50, seed=1), 100)
    noise = np.concatenate([warm.noise(32) for _ in range(50)])  # 50 frames
    assert noise.shape == (1600, 50) and noise.dtype == np.float32
    euler_gamma, sd = 0.5772, np.pi / np.sqrt(6)  # Gumbel(0, 1)'s mean and standard deviation
    assert abs(noise.mean() / 2 - euler_gamma) < 0.01 and abs(noise.std() / 2 - sd) < 0.01
    hot = Sampler(Sampling(temperature=1e300, top_k=7), 100)
    assert hot.temperature == Sampler.MAX_TEMPERATURE and np.isfinite(hot.noise(32)).all()


def test_prompt_that_does_not_fit_is_refused(f32_model):
    gen = Generator(CSMModel(f32_model))
    too_long = [Segment(1, "x", random_codes(2100, 64, seed=2))]
    with pytest.raises(PromptTooLong, match="context holds 2048"):
        list(gen.generate(TEXT, 0, too_long))
    gen.close()


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=-1.0), "temperature"),
    (dict(top_k=0), "top_k"),
    (dict(max_audio_ms=0), "max_audio_ms"),
    (dict(top_k=True), "top_k"),
    (dict(top_k=2**40), "top_k"),
    (dict(seed=1.5), "seed"),
    (dict(temperature=float("inf")), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
])
def test_bad_sampling_values(kwargs, match):
    """(Non-finite temperatures too: the server and say refuse them on their own, the API here.)"""
    with pytest.raises(ValueError, match=match):
        Sampling(**kwargs)


def test_a_budget_between_frames_rounds_down(f32_model):
    """max_audio_ms is "at most": a budget between two frames' lengths gets the frames that fit in it."""
    gen = Generator(CSMModel(f32_model), kv_type="f32")
    try:
        for ms, frames in ((80, 1), (159.9, 1), (160, 2), (160.5, 2), (239.99, 2)):
            stream = gen.start(gen.prompt_embeddings("Hi.", 0), Sampling(temperature=0, max_audio_ms=ms))
            assert stream.frames_left == frames, ms
            gen.finish(stream)
    finally:
        gen.close()


SOLO_OR_BATCHED = {
    "greedy": [Sampling(temperature=0, max_audio_ms=10 * 80)] * 3,
    # each its own top-k (three top-k buckets, the first stream's not the largest) and temperature, one greedy: a
    # stream draws as it would alone
    "sampled": [Sampling(temperature=1.3, top_k=5, seed=2, max_audio_ms=10 * 80),
                Sampling(temperature=0.9, top_k=50, seed=1, max_audio_ms=10 * 80),
                Sampling(temperature=0, max_audio_ms=10 * 80)],
}


@pytest.mark.parametrize("samplings", SOLO_OR_BATCHED.values(), ids=SOLO_OR_BATCHED.keys())
def test_batched_streams_equal_solo_streams(f32_model, samplings):
    """Several sequences in one llama_decode give the codes each gives alone (the server's path)."""
    model = CSMModel(f32_model)
    texts = ["First voice.", "A second, somewhat longer sentence to say.", "Third!"]
    solo = [ours(f32_model, text=t, ctx=[], sampling=sp) for t, sp in zip(texts, samplings)]
    gen = Generator(model, max_streams=4, kv_type="f32")
    streams = [gen.start(gen.prompt_embeddings(t, 0), sp) for t, sp in zip(texts, samplings)]
    frames: list[list[np.ndarray]] = [[] for _ in texts]
    active = list(range(len(texts)))
    calls_before = gen.decode_calls
    while active:
        codes = gen.step([streams[i] for i in active])
        for row, i in enumerate(active):
            if codes[row].any():
                frames[i].append(codes[row])
        active = [i for i in active if not streams[i].done]
    batched_calls = gen.decode_calls - calls_before
    for i in range(len(texts)):
        np.testing.assert_array_equal(np.stack(frames[i]), solo[i])
    assert batched_calls == 10 * gen.calls_per_frame  # one set of calls per frame, not one per stream
    gen.close()
