"""The explicit streaming state of Mimi's modules: one dataclass per module, holding only tensors.

Every buffer is updated in place and keeps its address, and nothing about the stream (its position
included) lives in Python: a step is the same sequence of kernels every time, which a TorchScript trace or
a CUDA graph can replay (fast.py; `DecoderState.cuda_graph`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import Tensor

if TYPE_CHECKING:
    from .fast import StepGraph


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
