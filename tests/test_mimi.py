"""Our Mimi codec (csm_gguf.mimi) and key conversion (converter.mimi_keys) against transformers' MimiModel."""

from __future__ import annotations

import copy
import pickle
import re
from dataclasses import replace

import numpy as np
import pytest
import torch

from converter.mimi_keys import MOSHI_MIMI_CONFIG, mimi_tensors_to_transformers
from csm_gguf.mimi import Mimi, MimiConfig, _can_pack
from mimi_fixtures import TINY_MIMI_CONFIG, make_tiny_mimi, one_torch_thread, runtime_mimi  # noqa: F401 (autouse)

FRAMES = 300  # > 125 frames = 250 transformer steps: the sliding window is crossed
HEAD_DIM = TINY_MIMI_CONFIG["hidden_size"] // TINY_MIMI_CONFIG["num_attention_heads"]
LAYOUTS = ["transformers_state_dict", "kyutai_file", "csm_nested", "csm_flat", "moshi", "moshi_module"]


@pytest.fixture(scope="module")
def tiny():
    return make_tiny_mimi(seed=0)


@pytest.fixture(scope="module")
def config(tiny) -> MimiConfig:
    return MimiConfig.from_transformers(tiny.config.to_dict())


def random_codes(frames: int, batch: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, TINY_MIMI_CONFIG["codebook_size"], (batch, 32, frames), generator=g)


@pytest.fixture(scope="module")
def reference(tiny) -> tuple[torch.Tensor, torch.Tensor]:
    codes = random_codes(FRAMES, batch=2, seed=1)
    with torch.no_grad():
        return codes, tiny.decode(codes).audio_values


# --- Key layouts ------------------------------------------------------------------------------------------


def to_moshi_layout(flat: dict[str, torch.Tensor], convtr_layers: set[int]) -> dict[str, np.ndarray]:
    """kyutai/mimi keys -> moshi checkpoint keys, written from the published key map (independently of
    converter/mimi_keys.py): q, k, v re-merged into in_proj_weight with RoPE pairs interleaved again."""
    renames = [  # (kyutai regex, moshi replacement), applied in order to the whole name
        (r"^(en|de)coder_transformer\.layers\.", r"\1coder_transformer.transformer.layers."),
        (r"\.input_layernorm\.", ".norm1."),
        (r"\.post_attention_layernorm\.", ".norm2."),
        (r"\.mlp\.fc1\.", ".linear1."),
        (r"\.mlp\.fc2\.", ".linear2."),
        (r"\.self_attn\.o_proj\.", ".self_attn.out_proj."),
        (r"\.self_attn_layer_scale\.", ".layer_scale_1."),
        (r"\.mlp_layer_scale\.", ".layer_scale_2."),
        (r"^(en|de)coder\.layers\.(\d+)\.block\.(\d+)\.conv\.", r"\1coder.model.\2.block.\3.conv.conv."),
        (r"^encoder\.layers\.(\d+)\.conv\.", r"encoder.model.\1.conv.conv."),
        (r"^downsample\.conv\.", "downsample.conv.conv.conv."),
        (r"^upsample\.conv\.", "upsample.convtr.convtr.convtr."),
        (r"^quantizer\.semantic_residual_vector_quantizer\.", "quantizer.rvq_first."),
        (r"^quantizer\.acoustic_residual_vector_quantizer\.", "quantizer.rvq_rest."),
        (r"\.layers\.(\d+)\.codebook\.embed_sum$", r".vq.layers.\1._codebook.embedding_sum"),
        (r"\.layers\.(\d+)\.codebook\.cluster_usage$", r".vq.layers.\1._codebook.cluster_usage"),
    ]
    out: dict[str, np.ndarray] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for name, w in flat.items():
        if m := re.fullmatch(r"(.*)\.self_attn\.([qkv])_proj\.weight", name):
            if m[2] in "qk":  # rotate-half rows (per head: pair firsts, pair seconds) -> interleaved pairs
                w = w.reshape(-1, 2, HEAD_DIM // 2, w.shape[1]).transpose(1, 2).reshape(w.shape)
            qkv.setdefault(m[1].replace("_transformer.", "_transformer.transformer."), {})[m[2]] = w
            continue
        if m := re.fullmatch(r"decoder\.layers\.(\d+)\.conv\.(weight|bias)", name):
            kind = "convtr.convtr" if int(m[1]) in convtr_layers else "conv.conv"
            name = f"decoder.model.{m[1]}.{kind}.{m[2]}"
        for pattern, replacement in renames:
            name = re.sub(pattern, replacement, name)
        out[name] = w.numpy()
    for layer, parts in qkv.items():
        out[f"{layer}.self_attn.in_proj_weight"] = torch.cat([parts["q"], parts["k"], parts["v"]]).numpy()
    # moshi also stores the codebooks' training-only "initialized" flags.
    out["quantizer.rvq_first.vq.layers.0._codebook._initialized"] = np.ones(1, np.float32)
    return out


@pytest.fixture(scope="module")
def layouts(tiny, tmp_path_factory) -> dict[str, dict]:
    from safetensors.torch import load_file
    from transformers.models.mimi.modeling_mimi import MimiConvTranspose1d

    folder = tmp_path_factory.mktemp("kyutai_mimi")
    tiny.save_pretrained(folder)  # on disk transformers writes kyutai/mimi's flat keys
    flat = load_file(folder / "model.safetensors")
    assert "decoder.layers.0.conv.weight" in flat
    nested = {k: v.clone() for k, v in tiny.state_dict().items()}
    assert "decoder.decoder_seanet.layers.0.conv.weight" in nested
    others = {"backbone_model.norm.weight": torch.ones(4), "lm_head.weight": torch.ones(4, 4)}
    convtr = {i for i, m in enumerate(tiny.decoder.decoder_seanet.layers) if isinstance(m, MimiConvTranspose1d)}
    return {
        "transformers_state_dict": nested,
        "kyutai_file": flat,
        "csm_nested": {**others, **{f"codec_model.{k}": v for k, v in nested.items()}},
        "csm_flat": {**others, **{f"codec_model.{k}": v for k, v in flat.items()}},
        "moshi": to_moshi_layout(flat, convtr),
        # moshi's MimiModel.state_dict() today: the attention projections are lists of one.
        "moshi_module": {
            k.replace("self_attn.in_proj_weight", "self_attn.in_projs.0.weight").replace(
                "self_attn.out_proj.", "self_attn.out_projs.0."): v
            for k, v in to_moshi_layout(flat, convtr).items()
        },
    }


@pytest.fixture(scope="module")
def loaded(layouts, config) -> dict[str, Mimi]:
    converted = {name: mimi_tensors_to_transformers(t, head_dim=HEAD_DIM) for name, t in layouts.items()}
    assert converted["moshi"].keys() == converted["kyutai_file"].keys()
    return {name: Mimi.from_state_dict(config, tensors) for name, tensors in converted.items()}


@pytest.fixture(scope="module")
def mimi(tiny) -> Mimi:
    return runtime_mimi(tiny)


def assert_audio_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("layout", LAYOUTS)
def test_decode_matches_transformers(loaded, reference, layout):
    codes, audio = reference
    frames = 40 if layout != "transformers_state_dict" else FRAMES
    assert_audio_close(loaded[layout].decode(codes[..., :frames]), audio[..., : frames * 64])


def test_sliding_window_matters(layouts, config, reference):
    """Without the 250-step window the audio differs after 125 frames: the long comparisons with
    transformers (5.24 honours the window; releases before early 2026 did not) do check it."""
    codes, audio = reference
    tensors = mimi_tensors_to_transformers(layouts["kyutai_file"])
    unwindowed = Mimi.from_state_dict(replace(config, sliding_window=10**6), tensors).decode(codes)
    assert_audio_close(unwindowed[..., : 125 * 64], audio[..., : 125 * 64])
    assert (unwindowed[..., 126 * 64 :] - audio[..., 126 * 64 :]).abs().max() > 1e-2 * audio.std()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_encode_matches_transformers(tiny, loaded, layout):
    n = 6 * 64 + 17  # not a whole number of frames: transformers pads inside each strided conv
    t = torch.arange(n) / 24_000
    g = torch.Generator().manual_seed(2)
    audio = torch.stack([torch.sin(2 * torch.pi * 220 * t), torch.sin(2 * torch.pi * 330 * t)])[:, None]
    audio = 0.5 * audio + 0.1 * torch.randn(audio.shape, generator=g)
    with torch.no_grad():
        expected = tiny.encode(audio).audio_codes
    for chunk_frames in (25, 2, 1):  # the SEANet encoder streams chunks of whole frames, the last one partial
        codes = loaded[layout].encode(audio, chunk_frames=chunk_frames)
        assert codes.shape == expected.shape == (2, 32, 7)
        assert torch.equal(codes, expected)


# --- Streaming --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_step(mimi, reference) -> torch.Tensor:
    codes, _ = reference
    return mimi.decode(codes, chunk=FRAMES)  # the whole sequence as a single streaming step


def stream(mimi: Mimi, codes: torch.Tensor, chunks: list[int], cuda_graph: bool = False) -> torch.Tensor:
    state = mimi.decoder_state(codes.shape[0], cuda_graph=cuda_graph)
    out = [mimi.decode_step(c, state) for c in codes.split(chunks, dim=-1)]
    for c, audio in zip(codes.split(chunks, dim=-1), out):
        assert audio.shape[-1] == c.shape[-1] * mimi.cfg.frame_size
    assert state.frames == codes.shape[-1]
    return torch.cat(out, dim=-1)


@pytest.mark.parametrize("chunk", [1, 2, 5])
def test_streaming_matches_batch(mimi, reference, one_step, chunk):
    codes, _ = reference
    assert_audio_close(stream(mimi, codes, [chunk] * (FRAMES // chunk)), one_step)


def test_streaming_irregular_chunks(mimi, reference, one_step):
    codes, _ = reference
    # The 140- and 130-frame chunks are 280 and 260 transformer steps, more than the 250-step window and
    # the ring of keys: the transformer takes them in pieces.
    chunks = [3, 1, 140, 7, 1, 2, 130, 1, 15]
    assert sum(chunks) == FRAMES
    assert_audio_close(stream(mimi, codes, chunks), one_step)


def test_reset(mimi, reference, one_step):
    codes, _ = reference
    state = mimi.decoder_state(2)
    mimi.decode_step(random_codes(30, batch=2, seed=3), state)
    with torch.inference_mode():  # a slot the next steps do not fill: masked, but it enters the products
        state.transformer.caches[0].keys[:, :, -1] = float("nan")
    mimi.reset(state)
    assert state.frames == 0
    out = torch.cat([mimi.decode_step(c, state) for c in codes[..., :20].split(4, dim=-1)], dim=-1)
    assert_audio_close(out, one_step[..., : 20 * 64])


def test_batch_items_are_independent(mimi, reference, one_step):
    codes, _ = reference
    assert_audio_close(mimi.decode(codes[1:, :, :50]), one_step[1:, :, : 50 * 64])


def test_state_lists_every_buffer(mimi):
    """A CUDA graph's capture saves and restores `buffers()` around its warm-up steps, and a CPU trace takes
    them as its inputs: a buffer missing from the list would be left advanced (the stream would skip
    ahead), or baked into the trace (every stream of that shape would share it)."""

    def tensors(obj) -> list[torch.Tensor]:
        if isinstance(obj, torch.Tensor):
            return [obj]
        if isinstance(obj, list):
            return [t for item in obj for t in tensors(item)]
        if hasattr(obj, "__dataclass_fields__"):
            return [t for name in obj.__dataclass_fields__ for t in tensors(getattr(obj, name))]
        return []

    state = mimi.decoder_state(2)
    listed = state.buffers()
    assert len(listed) == len({id(t) for t in listed})
    assert {id(t) for t in listed} == {id(t) for t in tensors(state)}


def test_cpu_steps_replay_a_trace(mimi, reference, one_step, monkeypatch):
    """On CPU a shape's first step runs as it is and its second is traced; from then on every stream of
    that shape replays the trace, never `_step`: two streams interleaved, across a reset and more than a
    window of steps, each equal to the batch decode."""
    codes, _ = reference
    fresh = copy.deepcopy(mimi)  # a copy starts without the original's traces
    assert len(fresh._traces) == 0
    key = (1, 32, 1, torch.int64)
    first, second = fresh.decoder_state(1), fresh.decoder_state(1)
    fresh.decode_step(codes[:1, :, :1], first)
    assert fresh._traces == {key: None}  # a one-off chunk costs no trace
    fresh.decode_step(codes[:1, :, 1:2], first)
    assert isinstance(fresh._traces[key], torch.jit.ScriptFunction)

    def eager(*args):
        raise AssertionError("a 1-frame step ran eagerly after its trace")

    monkeypatch.setattr(fresh, "_step", eager)
    fresh.reset(first)
    streams = [first, second]
    audio = [[fresh.decode_step(codes[b : b + 1, :, i : i + 1], streams[b]) for b in (0, 1)] for i in range(FRAMES)]
    for b in (0, 1):
        assert_audio_close(torch.cat([frame[b] for frame in audio], dim=-1), one_step[b : b + 1])
    fresh.float()  # converted (or moved): the traces and packed weights hold the old weights
    assert len(fresh._traces) == 0 and fresh._packed_weights() == []


def test_warm_up_traces_the_steps_before_any_stream(mimi):
    fresh = copy.deepcopy(mimi)
    fresh.warm_up(2)
    assert all(isinstance(fresh._traces[(2, 32, t, torch.int64)], torch.jit.ScriptFunction) for t in (1, 2))
    fresh.load_state_dict(fresh.state_dict(), assign=True)  # new parameters: the traces hold the old ones
    assert len(fresh._traces) == 0 and fresh._packed_weights() == []


def test_a_trace_does_not_hold_the_stream_it_was_made_on(mimi):
    import gc
    import weakref

    fresh = copy.deepcopy(mimi)
    state = fresh.decoder_state(1)
    for i in range(2):
        fresh.decode_step(random_codes(1, batch=1, seed=i), state)
    assert isinstance(fresh._traces[(1, 32, 1, torch.int64)], torch.jit.ScriptFunction)
    keys = weakref.ref(state.transformer.caches[0].keys)
    del state
    gc.collect()
    assert keys() is None


def test_streams_run_as_they_are_where_tracing_is_off(mimi, reference, one_step, monkeypatch):
    """PYTORCH_JIT=0 makes torch.jit.trace hand back the function untraced and uncalled."""
    codes, _ = reference
    fresh = copy.deepcopy(mimi)
    monkeypatch.setattr(torch.jit, "trace", lambda fn, *args, **kwargs: fn)
    assert_audio_close(stream(fresh, codes, [1] * FRAMES), one_step)
    assert fresh._traces[(2, 32, 1, torch.int64)] is not None


@pytest.mark.skipif(not _can_pack(), reason="oneDNN's packed products are used on x86-64 only")
def test_cpu_products_on_packed_weights(mimi, reference, one_step, monkeypatch):
    """On CPU the decoder's compute-bound products run on oneDNN's packed copies of their weights, made at
    a codec's first step (the other tests decode with them). A pickled or copied codec starts without them
    (they are opaque tensors) and makes them again; with oneDNN off the plain weights decode alike."""
    codes, _ = reference
    assert len(mimi._packed_weights()) == len(mimi._packable) > 0
    unpickled = pickle.loads(pickle.dumps(mimi))
    assert unpickled._packed_weights() == []
    assert_audio_close(stream(unpickled, codes[..., :40], [1] * 40), one_step[..., : 40 * 64])
    assert len(unpickled._packed_weights()) == len(mimi._packable)

    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
    plain = copy.deepcopy(mimi)
    assert_audio_close(stream(plain, codes[..., :40], [1] * 40), one_step[..., : 40 * 64])
    assert_audio_close(plain.decode(codes[..., :40], chunk=5), one_step[..., : 40 * 64])
    assert plain._packed_weights() == []


def test_half_precision_codecs_still_decode(mimi, reference, one_step):
    codes, _ = reference
    for dtype, tolerance in ((torch.float16, 1e-2), (torch.bfloat16, 5e-2)):
        audio = stream(copy.deepcopy(mimi).to(dtype), codes[..., :20], [1] * 20).float()
        expected = one_step[..., : 20 * 64]
        assert (audio - expected).abs().max() <= tolerance * expected.abs().max()


def test_cpu_traces_of_streams_in_several_threads(mimi, reference, one_step):
    """Streams decoded in several threads: each shape is traced once, replays run side by side."""
    from concurrent.futures import ThreadPoolExecutor

    codes, _ = reference
    fresh = copy.deepcopy(mimi)

    def one_stream(i: int) -> torch.Tensor:
        return stream(fresh, codes[i % 2 : i % 2 + 1, :, :40], [1] * 40)

    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(one_stream, range(8)))
    for i, audio in enumerate(outs):
        assert_audio_close(audio, one_step[i % 2 : i % 2 + 1, :, : 40 * 64])
    assert list(fresh._traces) == [(1, 32, 1, torch.int64)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch has no CUDA device")
def test_cuda_graph_replays_the_one_frame_step(mimi, reference, one_step):
    """On CUDA a 1-frame step is captured once per state and replayed: across a reset, 2-frame steps run
    eagerly in between, and more than a window of steps (the ring of keys wraps)."""
    codes, _ = reference
    gpu = copy.deepcopy(mimi).to("cuda")
    assert gpu.decoder_state(2).cuda_graph is False  # only when asked for
    state = gpu.decoder_state(2, cuda_graph=True)
    gpu.decode_step(random_codes(1, batch=2, seed=3), state)
    assert state.graph is None  # a stream's first frame is decoded as it is
    gpu.decode_step(random_codes(1, batch=2, seed=4), state)
    graph = state.graph
    assert graph is not None
    gpu.reset(state)
    chunks = [1] * 140 + [2] + [1] * (FRAMES - 142)
    audio = torch.cat([gpu.decode_step(c, state) for c in codes.split(chunks, dim=-1)], dim=-1)
    assert state.graph is graph
    assert_audio_close(audio.cpu(), one_step)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch has no CUDA device")
def test_cuda_graphs_of_streams_in_several_threads(mimi, reference, one_step):
    """Streams decoded in several threads: recordings take turns, replays run side by side."""
    from concurrent.futures import ThreadPoolExecutor

    codes, _ = reference
    gpu = copy.deepcopy(mimi).to("cuda")

    def one_stream(i: int) -> torch.Tensor:
        with torch.inference_mode():
            return stream(gpu, codes[i % 2 : i % 2 + 1, :, :40], [1] * 40, cuda_graph=True).cpu()

    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(one_stream, range(8)))
    for i, audio in enumerate(outs):
        assert_audio_close(audio, one_step[i % 2 : i % 2 + 1, :, : 40 * 64])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch has no CUDA device")
def test_on_cuda_streams_and_encodes_like_on_cpu(mimi, reference, one_step):
    codes, _ = reference
    gpu = copy.deepcopy(mimi).to("cuda")
    audio = stream(gpu, codes, [1] * FRAMES)  # codes on the CPU: decode_step moves them
    assert audio.device.type == "cuda"
    assert_audio_close(audio.cpu(), one_step)
    cpu_audio = one_step[:, :, : 20 * 64]
    assert torch.equal(gpu.encode(cpu_audio).cpu(), mimi.encode(cpu_audio))


# --- Configs, full size -------------------------------------------------------------------------------------


def test_config_from_transformers(tiny, config):
    from transformers import MimiConfig as TransformersMimiConfig

    assert config.frame_size == tiny.config.frame_size == 64
    assert (config.hidden_size, config.head_dim, config.codebook_dim, config.upsampling_ratios) == (32, 16, 16, (8, 4))
    assert MimiConfig.from_transformers(TransformersMimiConfig().to_dict()) == MimiConfig()
    assert MimiConfig.from_transformers(MOSHI_MIMI_CONFIG) == MimiConfig()
    assert MimiConfig().frame_size == 1920 and MimiConfig().frame_rate == 12.5
    assert TransformersMimiConfig(**MOSHI_MIMI_CONFIG).frame_rate == 12.5
    with pytest.raises(ValueError, match="use_conv_shortcut"):
        MimiConfig.from_transformers({**MOSHI_MIMI_CONFIG, "use_conv_shortcut": True})


def test_full_size_matches_transformers():
    """kyutai/mimi's dimensions, random weights: our key table covers them and a couple of frames agree."""
    from transformers import MimiConfig as TransformersMimiConfig
    from transformers import MimiModel

    torch.manual_seed(0)
    reference = MimiModel(TransformersMimiConfig()).eval()
    with torch.no_grad():
        for name, buf in reference.named_buffers():
            if name.endswith("embed_sum"):
                buf.normal_()
    mimi = Mimi.from_state_dict(MimiConfig(), mimi_tensors_to_transformers(reference.state_dict()))
    codes = torch.randint(0, 2048, (1, 32, 3))
    with torch.no_grad():
        expected = reference.decode(codes).audio_values
    assert_audio_close(mimi.decode(codes), expected)
    assert_audio_close(stream(mimi, codes, [1, 2]), expected)
    audio = torch.randn(1, 1, 2 * 1920 + 100)
    with torch.no_grad():
        assert torch.equal(mimi.encode(audio), reference.encode(audio).audio_codes)


# --- Key conversion errors ----------------------------------------------------------------------------------


def test_unknown_layout_is_rejected():
    with pytest.raises(ValueError, match="unrecognised Mimi weights"):
        mimi_tensors_to_transformers({"model.layers.0.weight": np.zeros(2)})


def test_unexpected_moshi_tensor_is_rejected(layouts):
    with pytest.raises(ValueError, match="encoder.model.0.conv.conv.extra"):
        extra = {"encoder.model.0.conv.conv.extra": np.zeros(1)}
        mimi_tensors_to_transformers({**layouts["moshi"], **extra}, head_dim=HEAD_DIM)


def test_missing_tensor_is_reported(layouts, config):
    tensors = mimi_tensors_to_transformers(layouts["kyutai_file"])
    del tensors["upsample.conv.weight"]
    with pytest.raises(KeyError, match=r"lacks 1 tensors.*upsample\.conv\.weight"):
        Mimi.from_state_dict(config, tensors)
