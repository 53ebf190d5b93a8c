"""Mimi's speed machinery, kept apart from what it computes: oneDNN's packed weights, CPU steps replayed from
TorchScript traces, 1-frame CUDA steps replayed from CUDA graphs, and the locks they need.

The traces and graphs wrap a step function `step(codes, state) -> audio` (the codec's `_step`): they record it
on a stream's state buffers, which every step updates in place (streaming.py), and replay it without Python.
- On CPU a 1-frame step reads all ~160 MB of decoder weights for 2 transformer steps, about 2.5x a frame of
  batch decoding (chunks of 2+ frames amortise that), and its ~2000 small ops spent 13% of the step in Python.
  Steps of up to `TRACED_FRAMES` frames are therefore replayed from a trace, recorded at a shape's second step.
  On a machine whose cores are busy with other work, run with torch.set_num_threads(1) (more threads then
  stall on each other).
- On x86-64 the SEANet decoder's compute-bound products run on oneDNN's packed copies of their weights, made
  at the first CPU step (`PackedWeight`; not with torch.backends.mkldnn.enabled = False).
- On CUDA a step is launch-bound (a few thousand small kernels). A stream decoded one frame at a time can have
  its step recorded as a CUDA graph and replayed (`Mimi.decoder_state(cuda_graph=True)`).
"""

from __future__ import annotations

import contextlib
import functools
import platform
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, List, Optional, Protocol, Union

import torch
from torch import Tensor

from .streaming import DecoderState

Step = Callable[[Tensor, DecoderState], Tensor]

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
    with _jit_quietly():
        return torch.jit.script(_onednn_product)


@contextlib.contextmanager
def _jit_quietly() -> Iterator[None]:
    """Around a torch.jit call: without its deprecation warning (torch 2.13), which a program run with -W error
    or pytest's filterwarnings = error raised at its first codec step. The traces stay while they pay (a
    step's Python share, 13% of it for one frame)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"`torch\.jit\.\w+` is deprecated", DeprecationWarning)
        yield


class Packable(Protocol):
    """A conv whose weight oneDNN can pack (`Conv`, `ConvTr`)."""

    weight: Tensor
    packed: PackedWeight

    def pack(self) -> None: ...


_RECORDING = threading.Lock()  # held while a CUDA graph is recorded: one at a time, in every codec

# CPU steps of up to this many frames are replayed from a trace (see `traced_step`): Python's share of
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


def pack_weights(convs: Sequence[Packable], traces: StepTraces) -> None:
    """Pack the weights oneDNN multiplies faster, on CPU in float32, before the first trace (the traces take
    them as inputs: see `packed_weights`)."""
    if not convs or convs[0].packed.tensor is not None or traces:
        return
    w = convs[0].weight
    if w.device.type == "cpu" and w.dtype == torch.float32 and torch.backends.mkldnn.enabled and _can_pack():
        with _TRACING:
            if convs[0].packed.tensor is None and not traces:
                for conv in reversed(convs):  # the first last: who sees it packed sees all packed
                    conv.pack()


def packed_weights(convs: Sequence[Packable]) -> list[Tensor]:
    return [conv.packed.tensor for conv in convs if conv.packed.tensor is not None]


def drop_weight_copies(traces: StepTraces, convs: Sequence[Packable]) -> None:
    """Forget the traces and packed weights: they hold the weights as they were."""
    traces.clear()
    for conv in convs:
        conv.packed.tensor = None


def traced_step(traces: StepTraces, step: Step, codes: Tensor, state: DecoderState, packed: list[Tensor]) -> Tensor:
    """`step` on CPU, from the second step of its shape on replayed from a TorchScript trace, which takes the
    state's buffers (and the `packed` weights) as inputs and so serves every stream of that shape. A shape's
    first step runs as it is, so a one-off chunk (a stream's last) costs no trace (0.1-0.3 s)."""
    key = (*codes.shape, codes.dtype)
    traced = traces.get(key)
    if traced is None:
        with _TRACING:
            seen, traced = key in traces, traces.get(key)
            if seen and traced is None:
                traces[key], audio = _trace(step, codes, state, packed)
                return audio
            traces[key] = traced
    if traced is None or traced is _UNTRACED:
        return step(codes, state)
    return traced(codes, *state.buffers(), *packed)


def _trace(step: Step, codes: Tensor, state: DecoderState, packed: list[Tensor]) -> tuple[Any, Tensor]:
    """Record `step` on `state`; recording runs the step, whose audio comes back too. The trace is then
    replayed twice on copies of the buffers: TorchScript optimizes a function in its first two calls,
    which took 5-7x a step, and they should not fall in a stream."""
    held, audio = [state], []

    def recorded_step(codes: Tensor, *inputs: Tensor) -> Tensor:  # inputs: `state`'s buffers and `packed`
        audio.append(step(codes, held[0]))
        return audio[-1]

    with _jit_quietly():
        traced = torch.jit.trace(recorded_step, (codes, *state.buffers(), *packed), check_trace=False)
    recorded = audio.pop() if audio else None
    held.clear()  # the trace keeps its Python function, but not the stream
    if not isinstance(traced, torch.jit.ScriptFunction):  # tracing is off: trace gave the function back uncalled
        return _UNTRACED, step(codes, state) if recorded is None else recorded
    scratch = [buffer.clone() for buffer in state.buffers()]
    for _ in range(2):
        traced(codes, *scratch, *packed)
    return traced, recorded


@dataclass
class StepGraph:
    """A 1-frame decode step recorded as a CUDA graph: one launch instead of a few thousand small kernels,
    which is what a streaming step costs on a GPU. It reads `codes` and writes `audio`, both fixed."""

    graph: torch.cuda.CUDAGraph
    codes: Tensor  # [B, K, 1]
    audio: Tensor  # [B, 1, frame_size]


def graphed_step(step: Step, codes: Tensor, state: DecoderState, lock: AbstractContextManager) -> Tensor:
    """`step` replayed from `state`'s CUDA graph, recorded at the first call (of a shape) under `lock`."""
    if state.graph is None or state.graph.codes.shape != codes.shape:
        with lock, _RECORDING:
            state.graph = _record(step, codes, state)
    state.graph.codes.copy_(codes)
    state.graph.graph.replay()
    return state.graph.audio.clone()  # the next replay overwrites it


def _record(step: Step, codes: Tensor, state: DecoderState) -> StepGraph:
    """Record `step` on `state`'s buffers. Recording runs nothing, but it must follow warm-up runs on a side
    stream, which would advance the stream: they run on the buffers' contents, then these go back."""
    saved = [b.clone() for b in state.buffers()]
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                step(codes, state)
        torch.cuda.current_stream().wait_stream(side)
    finally:
        for buffer, value in zip(state.buffers(), saved):
            buffer.copy_(value)
    graph, static_codes = torch.cuda.CUDAGraph(), codes.clone()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        audio = step(static_codes, state)
    return StepGraph(graph, static_codes, audio)
