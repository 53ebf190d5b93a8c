"""The explicit streaming state of Mimi's modules: one dataclass per module, holding only tensors.

Every buffer is updated in place and keeps its address, and nothing about the stream (its position
included) lives in Python: a step is the same sequence of kernels every time, which a TorchScript trace or
a CUDA graph can replay (fast.py; `DecoderState.cuda_graph`).

A decoder state's rows are streams of their own: each has its own position, and a step advances only the
rows its `live` mask holds (the others keep their state), so that streams that start, pause and end at
different times share one batched step (pool.py).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, is_dataclass, replace
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .fast import StepGraph


def kept(old: Tensor, new: Tensor, live: Tensor | None) -> Tensor:
    """`new` in the rows that `live` [B] holds, `old` in the others: what a step leaves in a buffer [B, ...]."""
    return new if live is None else torch.where(live.view(-1, *[1] * (new.dim() - 1)), new, old)


@dataclass
class ConvState:
    """A causal conv's last inputs: the left context of the next chunk (zeros = the causal left pad)."""

    context: Tensor  # [B, k_eff - stride, C_in]
    live: Tensor | None = None  # the decoder state's rows a step advances (None: all)

    def reset(self) -> None:
        self.context.zero_()

    def update(self, context: Tensor) -> None:
        self.context.copy_(kept(self.context, context, self.live))


@dataclass
class ConvTrState:
    """A transposed conv's overlap: outputs still waiting for the next input's contribution (no bias)."""

    tail: Tensor  # [B, 1, stride * C_out]: the last input's second half of outputs
    live: Tensor | None = None

    def reset(self) -> None:
        self.tail.zero_()

    def update(self, tail: Tensor) -> None:
        self.tail.copy_(kept(self.tail, tail, self.live))


@dataclass
class KVCache:
    """One layer's keys and values in a ring of slots: a row's step p sits in its slot p % slots."""

    keys: Tensor  # [B, heads, slots, head_dim]
    values: Tensor


@dataclass
class TransformerState:
    caches: list[KVCache]  # one per layer
    slot_steps: Tensor  # [B, slots]: the step each slot holds (while empty, -slots: out of every window)
    position: Tensor  # [B]: each row's next input's step (its RoPE position)
    live: Tensor | None = None

    def reset(self) -> None:
        self.slot_steps.fill_(-self.slot_steps.shape[1])
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

    live: Tensor | None = None  # [B] bool: the rows a step advances, shared by every part (all True here)

    def reset(self) -> None:
        self.upsample.reset()
        self.transformer.reset()
        self.seanet.reset()
        self.frames = 0

    def buffers(self) -> list[Tensor]:
        """Every tensor of the state (`live` last), each once: what a trace takes as inputs."""
        return [*self.stream_buffers(), *([self.live] if self.live is not None else [])]

    def stream_buffers(self) -> list[Tensor]:
        """What the streams carry from step to step, one row per stream."""
        t, s = self.transformer, self.seanet
        convs = [s.conv_in, *(c for block in s.res for c in block), s.conv_out]
        return [self.upsample.tail, *(c.tail for c in s.ups), *(c.context for c in convs), t.slot_steps,
                t.position, *(kv for cache in t.caches for kv in (cache.keys, cache.values))]

    def reset_row(self, row: int) -> None:
        """Make row `row` start a new stream, as `reset` does for all of them."""
        for buffer in self.stream_buffers():
            buffer[row].zero_()
        self.transformer.slot_steps[row].fill_(-self.transformer.slot_steps.shape[1])

    def move_row(self, source: int, target: int) -> None:
        """Row `source`'s stream goes on in row `target` (whose own stream is over)."""
        for buffer in self.stream_buffers():
            buffer[target].copy_(buffer[source])

    def first_rows(self, n: int) -> DecoderState:
        """A state made of this one's first `n` rows (views: a step on it advances these rows here), with
        its own `frames` and graph."""
        return replace(_mapped(replace(self, graph=None), lambda t: t[:n], {}), frames=0)


def _mapped(obj: Any, fn: Callable[[Tensor], Tensor], memo: dict[int, Tensor]) -> Any:
    """`obj` (a state: dataclasses, lists, tensors) with `fn` applied to each of its tensors, once per tensor:
    a tensor that several parts share (`live`) stays one tensor, which a trace then sees as one input."""
    if isinstance(obj, Tensor):
        if id(obj) not in memo:
            memo[id(obj)] = fn(obj)
        return memo[id(obj)]
    if isinstance(obj, list):
        return [_mapped(item, fn, memo) for item in obj]
    if is_dataclass(obj) and not isinstance(obj, type):
        return replace(obj, **{f.name: _mapped(getattr(obj, f.name), fn, memo) for f in fields(obj)})
    return obj
