"""Mimi, Kyutai's neural audio codec, in plain PyTorch: codes <-> 24 kHz mono audio.

Decode path: codes -> split RVQ -> upsample (12.5 -> 25 Hz) -> decoder transformer -> SEANet decoder.
Encode path: audio -> SEANet encoder -> encoder transformer -> downsample (25 -> 12.5 Hz) -> split RVQ.

Everything is causal, so decoding streams: `decode_step` takes a few frames of codes and an explicit
`DecoderState`, and returns exactly `frames * frame_size` samples; the concatenated stream equals `decode`
of all the codes at once (which is itself a stream from a fresh state). Encoding is batch only and pads
like transformers' MimiModel.

Weights come in the kyutai/mimi checkpoint layout (`converter/mimi_keys.py` turns the other layouts into
it); `Mimi.from_state_dict` maps them onto the modules here, fusing what the checkpoint keeps apart.

The streaming state lives entirely in tensors updated in place (the keys and values in a ring of slots),
so every step of a given shape is the same ops on the same buffers, which can be recorded once and
replayed without Python:
- On CPU a 1-frame `decode_step` reads all ~160 MB of decoder weights for 2 transformer steps, about 2.5x
  a frame of batch decoding (chunks of 2+ frames amortise that), and its ~2000 small ops spent 13% of the
  step in Python. Steps of up to `TRACED_FRAMES` frames are therefore replayed from a TorchScript trace,
  recorded at a shape's second step. On a machine whose cores are busy with other work, run with
  torch.set_num_threads(1) (more threads then stall on each other). On x86-64 the SEANet decoder's
  compute-bound products run on oneDNN's packed copies of their weights, made at the first CPU step
  (`PackedWeight`; not with torch.backends.mkldnn.enabled = False).
- On CUDA a step is launch-bound (a few thousand small kernels). A stream decoded one frame at a time can
  have its step recorded as a CUDA graph and replayed (`decoder_state(cuda_graph=True)`).
"""

from __future__ import annotations

import functools
import math
import platform
import threading
import warnings
from dataclasses import dataclass
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any, List, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class MimiConfig:
    """Mimi hyper-parameters; the defaults are kyutai/mimi's (with the 32 codebooks CSM uses)."""

    sample_rate: int = 24_000
    hidden_size: int = 512  # latent and transformer width
    num_filters: int = 64  # SEANet channels at audio rate; doubled at each down-sampling
    upsampling_ratios: tuple[int, ...] = (8, 6, 5, 4)  # decoder order; the encoder runs them reversed
    kernel_size: int = 7  # first SEANet conv
    last_kernel_size: int = 3
    residual_kernel_size: int = 3
    num_residual_layers: int = 1
    dilation_growth_rate: int = 2  # residual unit j uses dilation growth**j
    compress: int = 2  # residual units squeeze channels by this factor
    latent_stride: int = 2  # SEANet rate (25 Hz) / frame rate (12.5 Hz)
    upsample_groups: int = 512
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    head_dim: int = 64
    intermediate_size: int = 2048
    norm_eps: float = 1e-5
    rope_theta: float = 10_000.0
    sliding_window: int = 250  # a query sees the keys 0..249 steps back
    codebook_size: int = 2048
    codebook_dim: int = 256
    num_quantizers: int = 32
    num_semantic_quantizers: int = 1

    @property
    def frame_size(self) -> int:
        """Audio samples per frame of codes (1920)."""
        return math.prod(self.upsampling_ratios) * self.latent_stride

    @property
    def frame_rate(self) -> float:
        return self.sample_rate / self.frame_size

    @classmethod
    def from_transformers(cls, d: dict[str, Any]) -> MimiConfig:
        """Read a transformers MimiConfig dict (`config.to_dict()`, or `codec_config` in a CSM config.json)."""
        required = {
            "audio_channels": 1, "use_causal_conv": True, "pad_mode": "constant", "trim_right_ratio": 1.0,
            "use_conv_shortcut": False, "attention_bias": False, "hidden_act": "gelu",
        }  # fmt: skip
        for key, value in required.items():
            if d.get(key, value) != value:
                raise ValueError(f"Mimi config {key}={d[key]!r} is not supported (only {value!r})")
        if d.get("num_key_value_heads", d["num_attention_heads"]) != d["num_attention_heads"]:
            raise ValueError("Mimi with grouped-query attention is not supported")
        if d.get("vector_quantization_hidden_dimension", d["codebook_dim"]) != d["codebook_dim"]:
            raise ValueError("Mimi needs vector_quantization_hidden_dimension == codebook_dim")
        if d["codebook_dim"] == d["hidden_size"]:
            raise ValueError("Mimi without quantizer projections (codebook_dim == hidden_size) is not supported")

        ratios = tuple(d["upsampling_ratios"])
        hop = math.prod(ratios)
        # transformers: frame_rate is given (kyutai/mimi says 12.5) or derived as sample_rate / (2 * hop).
        frame_rate = d.get("frame_rate") or d.get("_frame_rate") or d["sampling_rate"] / (2 * hop)
        latent_stride = round(math.ceil(d["sampling_rate"] / hop) / frame_rate)
        if latent_stride < 2:
            raise ValueError("Mimi without latent down/up-sampling is not supported")
        rope = d.get("rope_parameters") or {}
        names = ["hidden_size", "num_filters", "kernel_size", "last_kernel_size", "residual_kernel_size",
                 "num_residual_layers", "dilation_growth_rate", "compress", "upsample_groups",
                 "num_hidden_layers", "num_attention_heads", "intermediate_size", "norm_eps", "sliding_window",
                 "codebook_size", "codebook_dim", "num_quantizers", "num_semantic_quantizers"]  # fmt: skip
        return cls(
            sample_rate=d["sampling_rate"],
            upsampling_ratios=ratios,
            latent_stride=latent_stride,
            head_dim=d.get("head_dim") or d["hidden_size"] // d["num_attention_heads"],
            rope_theta=rope.get("rope_theta", d.get("rope_theta", 10_000.0)),
            **{name: d[name] for name in names if name in d},
        )


# --- Streaming state ------------------------------------------------------------------------------------
# Every buffer is updated in place and keeps its address, and nothing about the stream (its position
# included) lives in Python: a step is the same sequence of kernels every time, which a CUDA graph can
# replay (`DecoderState.cuda_graph`).


@dataclass
class ConvState:
    """A causal conv's last inputs: the left context of the next chunk (zeros = the causal left pad)."""

    context: Tensor  # [B, k_eff - stride, C_in]

    def reset(self) -> None:
        self.context.zero_()


@dataclass
class ConvTrState:
    """A transposed conv's overlap: outputs still waiting for the next input's contribution (no bias)."""

    tail: Tensor  # [B, 1, stride * C_out]: the last input's second half of outputs

    def reset(self) -> None:
        self.tail.zero_()


@dataclass
class KVCache:
    """One layer's keys and values in a ring of slots: step p sits in slot p % slots."""

    keys: Tensor  # [B, heads, slots, head_dim]
    values: Tensor


@dataclass
class TransformerState:
    caches: list[KVCache]  # one per layer
    slot_steps: Tensor  # [slots]: the step each slot holds (while empty, -slots: out of every window)
    position: Tensor  # []: the next input's step (its RoPE position)

    def reset(self) -> None:
        self.slot_steps.fill_(-len(self.slot_steps))
        self.position.zero_()
        for cache in self.caches:  # masked slots still enter the products: no stale inf or NaN
            cache.keys.zero_()
            cache.values.zero_()


@dataclass
class SEANetEncoderState:
    conv_in: ConvState
    res: list[list[ConvState]]  # per block, one per residual unit
    downs: list[ConvState]  # one per down-sampling block
    conv_out: ConvState


@dataclass
class SEANetDecoderState:
    conv_in: ConvState
    ups: list[ConvTrState]  # one per up-sampling block
    res: list[list[ConvState]]  # per block, one per residual unit
    conv_out: ConvState

    def reset(self) -> None:
        for state in [self.conv_in, *self.ups, *(s for block in self.res for s in block), self.conv_out]:
            state.reset()


@dataclass
class StepGraph:
    """A 1-frame decode step recorded as a CUDA graph: one launch instead of a few thousand small kernels,
    which is what a streaming step costs on a GPU. It reads `codes` and writes `audio`, both fixed."""

    graph: torch.cuda.CUDAGraph
    codes: Tensor  # [B, K, 1]
    audio: Tensor  # [B, 1, frame_size]


@dataclass
class DecoderState:
    """Everything `Mimi.decode_step` carries from one chunk of frames to the next."""

    upsample: ConvTrState
    transformer: TransformerState
    seanet: SEANetDecoderState
    frames: int = 0  # frames decoded so far
    cuda_graph: bool = False  # on CUDA, replay 1-frame steps from a graph (see `Mimi.decoder_state`)
    graph: StepGraph | None = None  # that graph, recorded once (it survives `reset`)

    def reset(self) -> None:
        self.upsample.reset()
        self.transformer.reset()
        self.seanet.reset()
        self.frames = 0

    def buffers(self) -> list[Tensor]:
        t, s = self.transformer, self.seanet
        convs = [s.conv_in, *(c for block in s.res for c in block), s.conv_out]
        return [self.upsample.tail, *(c.tail for c in s.ups), *(c.context for c in convs), t.slot_steps,
                t.position, *(kv for cache in t.caches for kv in (cache.keys, cache.values))]


# --- Convolutions -----------------------------------------------------------------------------------------
# Signals are time-major, [B, T, C], from the quantizer to the audio: the transformers want it, a
# transposed conv's overlap-add is then a plain add of [T, stride * C] blocks, and the matrix products
# below run fast on short streaming chunks, where torch's conv kernels take slow paths (a 1-frame
# ConvTranspose1d(1024, 512, 16, 8) took 77 ms).


def _linear(x: Tensor, w: Tensor, bias: Tensor | None = None) -> Tensor:
    """x @ w.T (+ bias): x [..., K] with w [N, K], or x [..., blocks, K_b] with w kept as K-blocks
    [blocks, N, K_b] (a conv's taps; a long K split, which streams faster).

    A streaming step has up to 32 rows (short chunks, a few streams at once) and reads each weight once,
    from memory rather than cache, so what counts is how near memory bandwidth MKL streams the weight:
    (w @ x.T).T does (F.linear's kernel took up to twice as long, measured with cold caches; it wins again
    from ~200 rows), and for K-blocks one batched product does (separate products, or one over a long K,
    were up to a fifth slower)."""
    lead = x.shape[: x.dim() - w.dim() + 1]
    rows = x.reshape(-1, *x.shape[len(lead) :])  # [R, K] or [R, blocks, K_b]
    if len(rows) > 32:
        if w.dim() == 2:
            y = F.linear(rows, w, bias)
        else:
            y = F.linear(rows[:, 0], w[0], bias)
            for j in range(1, len(w)):
                y += F.linear(rows[:, j], w[j])
        return y.view(*lead, -1)
    if w.dim() == 2:
        y = w @ rows.T if bias is None else torch.addmm(bias[:, None], w, rows.T)
    else:
        y = torch.bmm(w, rows.permute(1, 2, 0)).sum(0)
        y = y if bias is None else y.add_(bias[:, None])
    return y.T.contiguous().view(*lead, -1)


# oneDNN's packed weights. After the SEANet decoder's first up-sampling every product has 16+ rows a frame (1920
# at the end) and a weight of at most 6 MB: bound by compute, not memory. There MKL reached 55-100 GFLOP/s of this
# machine's 185, and oneDNN, with each weight laid out once in its own blocked format, 130-170: a 1-frame step
# ran 7-8% faster. The products before stay MKL's, which streams big weights faster at a step's 1-2 rows.


@functools.cache
def _can_pack() -> bool:
    """The packed products are torch's own (private) mkldnn ops, measured on x86-64 only."""
    ops = ("_reorder_linear_weight", "_linear_pointwise")
    return (platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available()
            and all(hasattr(torch.ops.mkldnn, op) for op in ops))


class PackedWeight:
    """oneDNN's copy of a CPU float32 weight [N, K], blocked for its kernels: an opaque tensor, which a trace
    takes as an input (it cannot hold one as a constant) and which cannot be pickled. A copy of its module
    starts without one."""

    def __init__(self) -> None:
        self.tensor: Tensor | None = None

    def pack(self, w: Tensor) -> None:
        self.tensor = torch.ops.mkldnn._reorder_linear_weight(w, 16)  # laid out for ~16 rows; any number works

    def __deepcopy__(self, memo: dict) -> PackedWeight:
        return PackedWeight()

    def __reduce__(self) -> tuple:
        return PackedWeight, ()


def _onednn_product(x: Tensor, w: Tensor, bias: Optional[Tensor]) -> Tensor:
    no_scalars = torch.jit.annotate(List[Optional[Union[int, float, complex]]], [])  # of a post-op: none
    return torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", no_scalars, "")


# A conv's taps are copied side by side for a packed product (im2col): from ~2000 rows on that cost what the
# product saved, or more.
IM2COL_ROWS = 1024


@functools.cache
def _packed_product() -> Callable[[Tensor, Tensor, Tensor | None], Tensor]:
    """x [..., K] @ w.T (+ bias) for a `PackedWeight` w, scripted: a trace records the call to it, where it cannot
    record the op's (empty) list of scalars."""
    return torch.jit.script(_onednn_product)


class Conv(nn.Module):
    """Causal Conv1d on [B, T, C], as a sum over kernel taps of matrix products with shifted inputs.

    Without a state it pads a whole signal like transformers' MimiConv1d: on the left by k_eff - stride
    (zeros, or copies of the first step), on the right to complete the last stride. With a state it
    streams: the stored context replaces the left (zero) pad, and every chunk but the signal's last must
    be a whole number of strides.
    """

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int = 1, dilation: int = 1,
                 bias: bool = True, pad_mode: str = "constant"):  # fmt: skip
        super().__init__()
        self.weight = nn.Parameter(torch.empty(kernel, c_out, c_in))  # one [C_out, C_in] matrix per tap
        self.bias = nn.Parameter(torch.empty(c_out)) if bias else None
        self.stride, self.dilation, self.pad_mode = stride, dilation, pad_mode
        self.pad = (kernel - 1) * dilation + 1 - stride
        self.packed = PackedWeight()  # see `Mimi._pack`

    def pack(self) -> None:
        self.packed.pack(self.weight.permute(1, 0, 2).flatten(1))  # [C_out, taps * C_in]

    def init_state(self, batch: int) -> ConvState:
        return ConvState(self.weight.new_zeros(batch, self.pad, self.weight.shape[2]))

    def forward(self, x: Tensor, state: ConvState | None = None) -> Tensor:
        if state is None:
            x = F.pad(x.mT, (self.pad, -x.shape[1] % self.stride), mode=self.pad_mode).mT
        else:
            if x.shape[1] % self.stride:  # the signal's last chunk: its last stride completed as above
                x = F.pad(x.mT, (0, -x.shape[1] % self.stride)).mT
            if self.pad:
                x = torch.cat([state.context, x], dim=1)
                state.context.copy_(x[:, x.shape[1] - self.pad :])
        x = x.contiguous()
        b, _, c = x.shape
        t = (x.shape[1] - self.pad - 1) // self.stride + 1
        # taps[:, i, j] = x[:, i * stride + j * dilation]: output i's inputs, one per tap (a view)
        taps = x.as_strided((b, t, len(self.weight), c), (x.stride(0), self.stride * c, self.dilation * c, 1))
        if self.packed.tensor is not None and (len(self.weight) == 1 or b * t <= IM2COL_ROWS):
            # im2col: the taps side by side, copied (oneDNN took 15x as long to read them from the view)
            return _packed_product()(taps.flatten(2).contiguous(), self.packed.tensor, self.bias)
        return _linear(taps, self.weight, self.bias)


class ConvTr(nn.Module):
    """Causal ConvTranspose1d on [B, T, C] with kernel = 2 * stride: each input step emits 2 * stride
    outputs; the first half completes output block t, the second half overlaps block t + 1. The last
    step's second half waits in the state for the next chunk (a batch decode from a fresh state drops
    the final one, as transformers trims it). Dense (groups=1) or depthwise (groups=channels)."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, groups: int = 1, bias: bool = True):
        super().__init__()
        if kernel != 2 * stride or groups not in (1, c_in) or (groups > 1 and c_out != c_in):
            raise ValueError("ConvTr supports kernel == 2 * stride, dense or depthwise")
        self.depthwise = groups > 1
        # Per tap j, the [C_out, C_in] matrix of outputs j steps after the input (depthwise: a [1, C] row).
        self.weight = nn.Parameter(torch.empty(kernel, 1 if self.depthwise else c_out, c_in))
        self.bias = nn.Parameter(torch.empty(c_out)) if bias else None
        self.stride, self.c_out = stride, c_out
        self.packed = PackedWeight()  # see `Mimi._pack`

    def pack(self) -> None:
        self.packed.pack(self.weight.flatten(0, 1))

    def init_state(self, batch: int) -> ConvTrState:
        return ConvTrState(self.weight.new_zeros(batch, 1, self.stride * self.c_out))

    def forward(self, x: Tensor, state: ConvTrState) -> Tensor:
        b, t, _ = x.shape
        if self.depthwise:
            y = x[:, :, None, :] * self.weight[:, 0]
        elif self.packed.tensor is not None:
            y = _packed_product()(x, self.packed.tensor, None)
        else:
            y = _linear(x, self.weight.flatten(0, 1))
        y = y.reshape(b, t, 2, self.stride * self.c_out)  # [..., (first half, second half), (tap, channel)]
        out = y[:, :, 0] + torch.cat([state.tail, y[:, :-1, 1]], dim=1)
        state.tail.copy_(y[:, -1:, 1])
        out = out.view(b, t * self.stride, self.c_out)
        return out if self.bias is None else out + self.bias


class ResBlock(nn.Module):
    """SEANet residual unit: x + Conv1x1(ELU(Conv_k(ELU(x)))). Only the k-wide conv needs state."""

    def __init__(self, dim: int, hidden: int, kernel: int, dilation: int):
        super().__init__()
        self.conv1 = Conv(dim, hidden, kernel, dilation=dilation)
        self.conv2 = Conv(hidden, dim, 1)

    def init_state(self, batch: int) -> ConvState:
        return self.conv1.init_state(batch)

    def forward(self, x: Tensor, state: ConvState | None = None) -> Tensor:
        return self.conv2(F.elu(self.conv1(F.elu(x), state), inplace=True)).add_(x)


def _res_blocks(cfg: MimiConfig, dim: int) -> nn.ModuleList:
    hidden, k = dim // cfg.compress, cfg.residual_kernel_size
    return nn.ModuleList(ResBlock(dim, hidden, k, cfg.dilation_growth_rate**j) for j in range(cfg.num_residual_layers))


class EncoderBlock(nn.Module):
    def __init__(self, cfg: MimiConfig, dim: int, ratio: int):
        super().__init__()
        self.res = _res_blocks(cfg, dim)
        self.down = Conv(dim, 2 * dim, 2 * ratio, stride=ratio)


class SEANetEncoder(nn.Module):
    """Audio [B, N, 1] -> [B, ceil(N / hop), hidden], streaming (chunks of whole hops but the last)."""

    def __init__(self, cfg: MimiConfig):
        super().__init__()
        ratios = cfg.upsampling_ratios[::-1]
        self.conv_in = Conv(1, cfg.num_filters, cfg.kernel_size)
        self.blocks = nn.ModuleList(EncoderBlock(cfg, cfg.num_filters * 2**i, r) for i, r in enumerate(ratios))
        self.conv_out = Conv(cfg.num_filters * 2 ** len(ratios), cfg.hidden_size, cfg.last_kernel_size)

    def init_state(self, batch: int) -> SEANetEncoderState:
        return SEANetEncoderState(
            conv_in=self.conv_in.init_state(batch),
            res=[[res.init_state(batch) for res in block.res] for block in self.blocks],
            downs=[block.down.init_state(batch) for block in self.blocks],
            conv_out=self.conv_out.init_state(batch),
        )

    def forward(self, x: Tensor, state: SEANetEncoderState) -> Tensor:
        x = self.conv_in(x, state.conv_in)
        for block, res_states, down_state in zip(self.blocks, state.res, state.downs):
            for res, res_state in zip(block.res, res_states):
                x = res(x, res_state)
            x = block.down(F.elu(x, inplace=True), down_state)
        return self.conv_out(F.elu(x, inplace=True), state.conv_out)


class DecoderBlock(nn.Module):
    def __init__(self, cfg: MimiConfig, dim: int, ratio: int):
        super().__init__()
        self.up = ConvTr(dim, dim // 2, 2 * ratio, ratio)
        self.res = _res_blocks(cfg, dim // 2)


class SEANetDecoder(nn.Module):
    """[B, T, hidden] -> audio [B, T * hop, 1], streaming."""

    def __init__(self, cfg: MimiConfig):
        super().__init__()
        ratios = cfg.upsampling_ratios
        top = cfg.num_filters * 2 ** len(ratios)
        self.conv_in = Conv(cfg.hidden_size, top, cfg.kernel_size)
        self.blocks = nn.ModuleList(DecoderBlock(cfg, top // 2**i, r) for i, r in enumerate(ratios))
        self.conv_out = Conv(cfg.num_filters, 1, cfg.last_kernel_size)

    def init_state(self, batch: int) -> SEANetDecoderState:
        return SEANetDecoderState(
            conv_in=self.conv_in.init_state(batch),
            ups=[block.up.init_state(batch) for block in self.blocks],
            res=[[res.init_state(batch) for res in block.res] for block in self.blocks],
            conv_out=self.conv_out.init_state(batch),
        )

    def forward(self, x: Tensor, state: SEANetDecoderState) -> Tensor:
        x = self.conv_in(x, state.conv_in)
        for block, up_state, res_states in zip(self.blocks, state.ups, state.res):
            x = block.up(F.elu(x, inplace=True), up_state)
            for res, res_state in zip(block.res, res_states):
                x = res(x, res_state)
        return self.conv_out(F.elu(x, inplace=True), state.conv_out)


# --- Transformer ------------------------------------------------------------------------------------------


class TransformerLayer(nn.Module):
    """Pre-norm layer: LayerNorm, attention, LayerNorm, GELU MLP. The checkpoint's layer scales are folded
    into `out` and `fc2`, q, k, v are one matmul, and fc2 is kept as K-blocks (see `_linear`)."""

    def __init__(self, cfg: MimiConfig):
        super().__init__()
        d, inner = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim
        self.heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.norm1 = nn.LayerNorm(d, eps=cfg.norm_eps)
        # q's rows are scaled by 1 / sqrt(head_dim) (exact for 64: a power of two), and q's and k's rows
        # hold RoPE's pairs side by side, as Mimi was trained (the checkpoint's order is transformers').
        self.qkv = nn.Linear(d, 3 * inner, bias=False)
        self.out = nn.Linear(inner, d, bias=False)
        self.norm2 = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.fc1 = nn.Linear(d, cfg.intermediate_size, bias=False)
        blocks = _k_blocks(cfg)
        self.fc2 = nn.Parameter(torch.empty(blocks, d, cfg.intermediate_size // blocks))

    def forward(self, x: Tensor, rotation: Tensor, mask: Tensor, cache: KVCache, slots: Tensor) -> Tensor:
        b, t, _ = x.shape
        qkv = _linear(self.norm1(x), self.qkv.weight).view(b, t, 3, self.heads, self.head_dim)
        # RoPE rotates each (even, odd) pair of q and k: a complex product with e^(i * angle), in float32
        qk = torch.view_as_complex(qkv[:, :, :2].float().unflatten(-1, (-1, 2))) * rotation
        q, k = torch.view_as_real(qk).flatten(-2).to(x.dtype).transpose(1, 3).unbind(2)  # [B, heads, t, head_dim]
        cache.keys.index_copy_(2, slots, k)
        cache.values.index_copy_(2, slots, qkv[:, :, 2].transpose(1, 2))
        weights = torch.matmul(q, cache.keys.mT).add_(mask).softmax(-1)
        a = torch.matmul(weights, cache.values).transpose(1, 2).reshape(b, t, -1)
        x = _linear(a, self.out.weight).add_(x)  # in place: into the product's fresh buffer
        h = F.gelu(_linear(self.norm2(x), self.fc1.weight))
        return _linear(h.unflatten(-1, (len(self.fc2), -1)), self.fc2).add_(x)


def _k_blocks(cfg: MimiConfig) -> int:
    """fc2's K-blocks: of hidden_size each (4 for Mimi), where that divides."""
    return cfg.intermediate_size // cfg.hidden_size if cfg.intermediate_size % cfg.hidden_size == 0 else 1


# Steps the transformer takes at once; longer inputs go in pieces. Every step attends over all of the
# ring's window + CHUNK_STEPS - 1 slots (masked): a larger value costs every streaming step, a smaller one
# re-reads the weights more often for long inputs. 64 holds a 25-frame batch-decode chunk (50 steps).
CHUNK_STEPS = 64


class Transformer(nn.Module):
    """Causal transformer over [B, T, hidden] with a sliding window of `sliding_window` steps."""

    def __init__(self, cfg: MimiConfig):
        super().__init__()
        self.layers = nn.ModuleList(TransformerLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.heads, self.head_dim, self.window = cfg.num_attention_heads, cfg.head_dim, cfg.sliding_window
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def init_state(self, batch: int) -> TransformerState:
        # A piece of up to CHUNK_STEPS steps then finds every key its queries may see (window - 1 back).
        slots = self.window + CHUNK_STEPS - 1
        shape = (batch, self.heads, slots, self.head_dim)
        w = self.layers[0].qkv.weight
        state = TransformerState(
            caches=[KVCache(w.new_zeros(shape), w.new_zeros(shape)) for _ in self.layers],
            slot_steps=torch.empty(slots, dtype=torch.int64, device=w.device),
            position=torch.zeros((), dtype=torch.int64, device=w.device),
        )
        state.reset()
        return state

    def forward(self, x: Tensor, state: TransformerState) -> Tensor:
        chunks = [self._chunk(c, state) for c in x.split(CHUNK_STEPS, dim=1)]
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=1)

    def _chunk(self, x: Tensor, state: TransformerState) -> Tensor:
        t = x.shape[1]
        steps = state.position + torch.arange(t, device=x.device)
        slots = steps % len(state.slot_steps)
        state.slot_steps.index_copy_(0, slots, steps)
        # Query i (step steps[i]) sees the slot holding step s when 0 <= steps[i] - s < window.
        lag = steps[:, None] - state.slot_steps
        mask = torch.zeros(lag.shape, dtype=x.dtype, device=x.device)
        mask.masked_fill_((lag < 0) | (lag >= self.window), float("-inf"))
        angles = steps[:, None].float() * self.inv_freq.float()
        rotation = torch.polar(torch.ones_like(angles), angles)[:, None, None]  # [t, 1, 1, head_dim / 2]
        for layer, cache in zip(self.layers, state.caches):
            x = layer(x, rotation, mask, cache, slots)
        state.position.add_(t)
        return x


# --- Quantizer --------------------------------------------------------------------------------------------


class SplitRVQ(nn.Module):
    """Split residual vector quantizer: the first `num_semantic_quantizers` codebooks form one RVQ, the
    rest another; each has its own projections in and out of the codebook space."""

    def __init__(self, cfg: MimiConfig):
        super().__init__()
        self.n_semantic = cfg.num_semantic_quantizers
        self.register_buffer("codebooks", torch.zeros(cfg.num_quantizers, cfg.codebook_size, cfg.codebook_dim))
        self.semantic_in = nn.Linear(cfg.hidden_size, cfg.codebook_dim, bias=False)
        self.acoustic_in = nn.Linear(cfg.hidden_size, cfg.codebook_dim, bias=False)
        # Both RVQs' output projections side by side: their sum is one product.
        self.out = nn.Linear(2 * cfg.codebook_dim, cfg.hidden_size, bias=False)

    def decode(self, codes: Tensor) -> Tensor:
        """[B, K, T] codes -> [B, T, hidden] latents (K may be fewer than the codebooks)."""
        k, n, dim = codes.shape[1], self.codebooks.shape[1], self.codebooks.shape[2]
        offsets = torch.arange(k, device=codes.device)[:, None] * n
        vectors = F.embedding(codes + offsets, self.codebooks.view(-1, dim))  # [B, K, T, dim]
        sums = [vectors[:, : self.n_semantic].sum(1), vectors[:, self.n_semantic :].sum(1)]  # no acoustic: 0
        return _linear(torch.cat(sums, dim=-1), self.out.weight)

    def encode(self, x: Tensor) -> Tensor:
        """[B, T, hidden] latents -> [B, K, T] codes. Both RVQs quantize the same latent."""
        semantic = _quantize_residual(self.semantic_in(x), self.codebooks[: self.n_semantic])
        acoustic = _quantize_residual(self.acoustic_in(x), self.codebooks[self.n_semantic :])
        return torch.cat([semantic, acoustic], dim=1)


def _quantize_residual(x: Tensor, codebooks: Tensor) -> Tensor:
    codes = []
    for codebook in codebooks:
        idx = torch.cdist(x, codebook[None]).argmin(-1)  # nearest codebook vector, Euclidean
        x = x - codebook[idx]
        codes.append(idx)
    return torch.stack(codes, dim=1)


# --- The codec --------------------------------------------------------------------------------------------


_RECORDING = threading.Lock()

# CPU steps of up to this many frames are replayed from a trace (see `Mimi._traced_step`): Python's share of
# a step is 13% for one frame, 9% for two, 3% for five; a larger chunk runs as it is.
TRACED_FRAMES = 2
_TRACING = threading.Lock()  # held while a step is traced: one at a time, so each shape is traced once
_UNTRACED = object()  # a shape's entry when tracing is off (PYTORCH_JIT=0): its steps run as they are
# The tracer's notes on this module are all about shapes, which are fixed per trace here.
warnings.filterwarnings("ignore", category=torch.jit.TracerWarning, module=r"csm_gguf\.mimi")


class StepTraces(dict):
    """A Mimi's traced CPU steps by the codes' shape [B, K, t] and dtype; None: seen once, not traced yet.
    A copy of the Mimi starts without them: they hold the original's weights (and cannot be pickled).
    Moving or converting the Mimi, or loading weights into it, drops them and the packed weights; so must
    swapping parameters by hand."""

    def __deepcopy__(self, memo: dict) -> StepTraces:
        return StepTraces()

    def __reduce__(self) -> tuple:
        return StepTraces, ()


def _drop_weight_copies(mimi: Mimi, incompatible_keys: Any = None) -> None:
    mimi._traces.clear()
    for conv in mimi._packable:
        conv.packed.tensor = None


class Mimi(nn.Module):
    # Held while a CUDA graph is recorded. Recording starts with a device-wide sync, which fails while any
    # other stream is being captured: another recording (one at a time, all instances share _RECORDING),
    # or llama.cpp's own graphs, which it records inside its calls. A caller that drives llama.cpp sets
    # the lock it holds around those calls here (`CSM` does).
    cuda_lock: AbstractContextManager = nullcontext()

    def __init__(self, cfg: MimiConfig):
        super().__init__()
        self.cfg = cfg
        d, s = cfg.hidden_size, cfg.latent_stride
        self.encoder = SEANetEncoder(cfg)
        self.encoder_transformer = Transformer(cfg)
        self.downsample = Conv(d, d, 2 * s, stride=s, bias=False, pad_mode="replicate")
        self.quantizer = SplitRVQ(cfg)
        self.upsample = ConvTr(d, d, 2 * s, s, groups=cfg.upsample_groups, bias=False)
        self.decoder_transformer = Transformer(cfg)
        self.decoder = SEANetDecoder(cfg)
        # The decoder's convs after its first up-sampling: 16+ rows a frame, compute-bound (see `_pack`).
        convs = [m for b in self.decoder.blocks for m in (b.up, *(c for res in b.res for c in (res.conv1, res.conv2)))]
        self._packable: tuple[Conv | ConvTr, ...] = (*convs[1:], self.decoder.conv_out)
        self.requires_grad_(False)  # inference only (a trace takes the weights as constants)
        self._traces = StepTraces()
        self.register_load_state_dict_post_hook(_drop_weight_copies)  # load_state_dict(assign=True) swaps them

    @classmethod
    def from_state_dict(cls, cfg: MimiConfig, tensors: Mapping[str, Any]) -> Mimi:
        """Build from tensors (or numpy arrays) in the kyutai/mimi checkpoint layout, which
        `converter.mimi_keys.mimi_tensors_to_transformers` produces; `checkpoint_table` maps them."""
        table = checkpoint_table(cfg)
        missing = sorted({src for _, _, sources in table for src in sources} - tensors.keys())
        if missing:
            raise KeyError(f"Mimi checkpoint lacks {len(missing)} tensors, e.g. {missing[:5]}")
        with torch.no_grad():
            own = {name: make(*(torch.as_tensor(tensors[s]).float() for s in sources)) for name, make, sources in table}
        model = cls(cfg)
        model.load_state_dict(own, strict=True)
        return model.eval()

    @property
    def device(self) -> torch.device:
        """Where the weights live (after `.to(device)`); inputs are moved there, outputs stay there."""
        return self.quantizer.codebooks.device

    @torch.inference_mode()
    def decoder_state(self, batch_size: int = 1, cuda_graph: bool = False) -> DecoderState:
        """A fresh stream. With `cuda_graph`, on CUDA, its 1-frame steps after the first are replayed from a
        CUDA graph recorded at the second (about three steps' time, once): a stream decoded one frame at a
        time, in the thread that drives llama.cpp or under `cuda_lock`, so the recording meets no other."""
        return DecoderState(
            upsample=self.upsample.init_state(batch_size),
            transformer=self.decoder_transformer.init_state(batch_size),
            seanet=self.decoder.init_state(batch_size),
            cuda_graph=cuda_graph,
        )

    @torch.inference_mode()
    def warm_up(self, batch_size: int = 1, codebooks: int | None = None) -> None:
        """Make the CPU traces of steps of 1 to `TRACED_FRAMES` frames for `batch_size` streams now, on a
        scratch stream, rather than at a stream's second step of each (0.1-0.3 s each). No-op off the CPU."""
        if self.device.type != "cpu":
            return
        for frames in range(1, TRACED_FRAMES + 1):
            state = self.decoder_state(batch_size)
            codes = torch.zeros(batch_size, codebooks or self.cfg.num_quantizers, frames, dtype=torch.long)
            for _ in range(2):
                self.decode_step(codes, state)

    @torch.inference_mode()
    def reset(self, state: DecoderState) -> None:
        """Make `state` start a new stream (keeping its buffers)."""
        state.reset()

    @torch.inference_mode()
    def decode_step(self, codes: Tensor, state: DecoderState) -> Tensor:
        """Decode the next chunk of a stream: codes [B, K, t] -> audio [B, 1, t * frame_size]."""
        codes = codes.to(self.device)
        if codes.shape[-1] == 0:
            return self.quantizer.codebooks.new_zeros(codes.shape[0], 1, 0)
        graphed = state.cuda_graph and codes.is_cuda and codes.shape[-1] == 1
        graphed = graphed and (state.graph is not None or state.frames > 0)
        if graphed:
            audio = self._replay(codes, state)
        elif codes.device.type == "cpu":
            self._pack()
            audio = self._traced_step(codes, state) if codes.shape[-1] <= TRACED_FRAMES else self._step(codes, state)
        else:
            audio = self._step(codes, state)
        state.frames += codes.shape[-1]
        return audio

    def _step(self, codes: Tensor, state: DecoderState) -> Tensor:
        x = self.upsample(self.quantizer.decode(codes), state.upsample)
        x = self.decoder_transformer(x, state.transformer)
        return self.decoder(x, state.seanet).mT

    def _pack(self) -> None:
        """Pack the weights oneDNN multiplies faster, on CPU in float32, before the first trace (the traces
        take them as inputs: see `_packed_weights`)."""
        convs = self._packable
        if not convs or convs[0].packed.tensor is not None or self._traces:
            return
        w = convs[0].weight
        if w.device.type == "cpu" and w.dtype == torch.float32 and torch.backends.mkldnn.enabled and _can_pack():
            with _TRACING:
                if convs[0].packed.tensor is None and not self._traces:
                    for conv in reversed(convs):  # the first last: who sees it packed sees all packed
                        conv.pack()

    def _packed_weights(self) -> list[Tensor]:
        return [conv.packed.tensor for conv in self._packable if conv.packed.tensor is not None]

    def _traced_step(self, codes: Tensor, state: DecoderState) -> Tensor:
        """`_step` on CPU, from the second step of its shape on replayed from a TorchScript trace, which
        takes the state's buffers as inputs and so serves every stream of that shape. A shape's first step
        runs as it is, so a one-off chunk (a stream's last) costs no trace (0.1-0.3 s)."""
        key = (*codes.shape, codes.dtype)
        traced = self._traces.get(key)
        if traced is None:
            with _TRACING:
                seen, traced = key in self._traces, self._traces.get(key)
                if seen and traced is None:
                    self._traces[key], audio = self._trace(codes, state)
                    return audio
                self._traces[key] = traced
        if traced is None or traced is _UNTRACED:
            return self._step(codes, state)
        return traced(codes, *state.buffers(), *self._packed_weights())

    def _trace(self, codes: Tensor, state: DecoderState) -> tuple[Any, Tensor]:
        """Record `_step` on `state`; recording runs the step, whose audio comes back too. The trace is then
        replayed twice on copies of the buffers: TorchScript optimizes a function in its first two calls,
        which took 5-7x a step, and they should not fall in a stream."""
        held, audio, packed = [state], [], self._packed_weights()

        def step(codes: Tensor, *inputs: Tensor) -> Tensor:  # inputs: `state`'s buffers and `packed`, which it uses
            audio.append(self._step(codes, held[0]))
            return audio[-1]

        traced = torch.jit.trace(step, (codes, *state.buffers(), *packed), check_trace=False)
        recorded = audio.pop() if audio else None
        held.clear()  # the trace keeps its Python function, but not the stream
        if not isinstance(traced, torch.jit.ScriptFunction):  # tracing is off: trace gave `step` back uncalled
            return _UNTRACED, self._step(codes, state) if recorded is None else recorded
        scratch = [buffer.clone() for buffer in state.buffers()]
        for _ in range(2):
            traced(codes, *scratch, *packed)
        return traced, recorded

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> Mimi:
        _drop_weight_copies(self)  # moved or converted: they hold the old weights
        return super()._apply(fn, recurse)

    def _replay(self, codes: Tensor, state: DecoderState) -> Tensor:
        if state.graph is None or state.graph.codes.shape != codes.shape:
            with self.cuda_lock, _RECORDING:
                state.graph = self._record(codes, state)
        state.graph.codes.copy_(codes)
        state.graph.graph.replay()
        return state.graph.audio.clone()  # the next replay overwrites it

    def _record(self, codes: Tensor, state: DecoderState) -> StepGraph:
        """Record `_step` on `state`'s buffers. Recording runs nothing, but it must follow warm-up runs on a
        side stream, which would advance the stream: they run on the buffers' contents, then these go back."""
        saved = [b.clone() for b in state.buffers()]
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._step(codes, state)
            torch.cuda.current_stream().wait_stream(side)
        finally:
            for buffer, value in zip(state.buffers(), saved):
                buffer.copy_(value)
        graph, static_codes = torch.cuda.CUDAGraph(), codes.clone()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            audio = self._step(static_codes, state)
        return StepGraph(graph, static_codes, audio)

    @torch.inference_mode()
    def decode(self, codes: Tensor, chunk: int = 25) -> Tensor:
        """Decode whole sequences: codes [B, K, T] -> audio [B, 1, T * frame_size]. Streams `chunk` frames
        at a time, which bounds memory and gives the same samples as one big step."""
        state = self.decoder_state(codes.shape[0])
        return torch.cat([self.decode_step(c, state) for c in codes.split(chunk, dim=-1)], dim=-1)

    @torch.inference_mode()
    def encode(self, audio: Tensor, chunk_frames: int = 25) -> Tensor:
        """Audio [B, 1, N] -> codes [B, num_quantizers, ceil(N / frame_size)]. Like transformers, every
        strided conv pads its input on the right to a whole number of strides (there is no up-front
        padding of the audio to whole frames). The SEANet encoder streams `chunk_frames` frames of audio
        at a time: at the audio's rate its activations take 256 bytes a sample, 1.1 GB a minute at once."""
        audio = audio.to(self.device).mT
        state = self.encoder.init_state(audio.shape[0])
        chunks = audio.split(chunk_frames * self.cfg.frame_size, dim=1)
        x = torch.cat([self.encoder(c, state) for c in chunks], dim=1)
        x = self.encoder_transformer(x, self.encoder_transformer.init_state(x.shape[0]))
        return self.quantizer.encode(self.downsample(x))


# --- Checkpoint layout ------------------------------------------------------------------------------------


def _same(w: Tensor) -> Tensor:
    return w


def _qkv_rows(q: Tensor, k: Tensor, v: Tensor, head_dim: int) -> Tensor:
    # transformers' checkpoints hold each head's RoPE pairs as halves (first elements, then second
    # elements): put each pair side by side again, and scale q as attention would (TransformerLayer).
    def pairs(w: Tensor) -> Tensor:
        return w.unflatten(0, (-1, 2, head_dim // 2)).transpose(1, 2).flatten(0, 2)

    return torch.cat([pairs(q) / math.sqrt(head_dim), pairs(k), v])


def _scaled_rows(w: Tensor, scale: Tensor) -> Tensor:
    return w * scale[:, None]  # LayerScale(W x) == (diag(scale) W) x


def _conv1x1_as_linear(w: Tensor) -> Tensor:
    return w[..., 0]


def _conv1x1_columns(*ws: Tensor) -> Tensor:
    return torch.cat([w[..., 0] for w in ws], dim=1)  # [W1 W2] [x1; x2] == W1 x1 + W2 x2


def _conv_taps(w: Tensor) -> Tensor:
    return w.permute(2, 0, 1).contiguous()  # [C_out, C_in, k] -> [k, C_out, C_in]


def _convtr_taps(w: Tensor) -> Tensor:
    return w.permute(2, 1, 0).contiguous()  # [C_in, C_out / groups, k] -> [k, C_out / groups, C_in]


def _codebooks(*sums_and_usages: Tensor) -> Tensor:
    # The checkpoint keeps k-means statistics: vector = embed_sum / cluster_usage, clamped as in training.
    pairs = zip(sums_and_usages[::2], sums_and_usages[1::2])
    return torch.stack([embed_sum / usage.clamp(min=1e-5)[:, None] for embed_sum, usage in pairs])


def checkpoint_table(cfg: MimiConfig) -> list[tuple[str, Callable[..., Tensor], list[str]]]:
    """(our tensor, how to make it, the kyutai/mimi checkpoint tensors it is made from).

    In the checkpoint the SEANet stacks are flat lists whose indices also count the parameterless ELUs:
    the decoder is [conv, (ELU, convtr, res * n) per ratio, ELU, conv], the encoder
    [conv, (res * n, ELU, conv) per ratio, ELU, conv], and a residual unit is [ELU, conv, ELU, conv].
    """
    table: list[tuple[str, Callable[..., Tensor], list[str]]] = []

    def conv(ours: str, theirs: str, bias: bool = True, taps: Callable[[Tensor], Tensor] = _conv_taps) -> None:
        table.append((f"{ours}.weight", taps, [f"{theirs}.weight"]))
        if bias:
            table.append((f"{ours}.bias", _same, [f"{theirs}.bias"]))

    def res_units(ours: str, theirs: str, first: int) -> None:
        for j in range(cfg.num_residual_layers):
            conv(f"{ours}.res.{j}.conv1", f"{theirs}.layers.{first + j}.block.1.conv")
            conv(f"{ours}.res.{j}.conv2", f"{theirs}.layers.{first + j}.block.3.conv")

    n_res, n_blocks = cfg.num_residual_layers, len(cfg.upsampling_ratios)
    last = 2 + n_blocks * (n_res + 2)
    for side in ("encoder", "decoder"):
        conv(f"{side}.conv_in", f"{side}.layers.0.conv")
        conv(f"{side}.conv_out", f"{side}.layers.{last}.conv")
        for b in range(n_blocks):
            first = 1 + b * (n_res + 2)  # the block's first entry
            if side == "encoder":
                res_units(f"encoder.blocks.{b}", "encoder", first)
                conv(f"encoder.blocks.{b}.down", f"encoder.layers.{first + n_res + 1}.conv")
            else:
                conv(f"decoder.blocks.{b}.up", f"decoder.layers.{first + 1}.conv", taps=_convtr_taps)
                res_units(f"decoder.blocks.{b}", "decoder", first + 2)
    conv("downsample", "downsample.conv", bias=False)
    conv("upsample", "upsample.conv", bias=False, taps=_convtr_taps)

    def qkv_rows(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return _qkv_rows(q, k, v, cfg.head_dim)

    def fc2_blocks(w: Tensor, scale: Tensor) -> Tensor:
        return _scaled_rows(w, scale).unflatten(1, (_k_blocks(cfg), -1)).transpose(0, 1).contiguous()

    for side in ("encoder_transformer", "decoder_transformer"):
        for i in range(cfg.num_hidden_layers):
            p = f"{side}.layers.{i}"  # the same prefix on both sides
            table += [
                (f"{p}.norm1.weight", _same, [f"{p}.input_layernorm.weight"]),
                (f"{p}.norm1.bias", _same, [f"{p}.input_layernorm.bias"]),
                (f"{p}.qkv.weight", qkv_rows, [f"{p}.self_attn.{x}_proj.weight" for x in "qkv"]),
                (f"{p}.out.weight", _scaled_rows, [f"{p}.self_attn.o_proj.weight", f"{p}.self_attn_layer_scale.scale"]),
                (f"{p}.norm2.weight", _same, [f"{p}.post_attention_layernorm.weight"]),
                (f"{p}.norm2.bias", _same, [f"{p}.post_attention_layernorm.bias"]),
                (f"{p}.fc1.weight", _same, [f"{p}.mlp.fc1.weight"]),
                (f"{p}.fc2", fc2_blocks, [f"{p}.mlp.fc2.weight", f"{p}.mlp_layer_scale.scale"]),
            ]

    rvqs = {
        "semantic": ("quantizer.semantic_residual_vector_quantizer", cfg.num_semantic_quantizers),
        "acoustic": ("quantizer.acoustic_residual_vector_quantizer", cfg.num_quantizers - cfg.num_semantic_quantizers),
    }
    stats = []
    for ours, (theirs, n) in rvqs.items():
        table.append((f"quantizer.{ours}_in.weight", _conv1x1_as_linear, [f"{theirs}.input_proj.weight"]))
        stats += [f"{theirs}.layers.{j}.codebook.{s}" for j in range(n) for s in ("embed_sum", "cluster_usage")]
    table.append(("quantizer.out.weight", _conv1x1_columns, [f"{theirs}.output_proj.weight" for theirs, _ in rvqs.values()]))
    table.append(("quantizer.codebooks", _codebooks, stats))
    return table
