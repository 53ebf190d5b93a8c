"""The depth decoder's codebook heads, and every codebook's draw, as ggml graphs on llama.cpp's own backends.

Each frame applies 31 different (2051 x 1024) heads, one per decoder step, so they cannot be the
decoder's single llama.cpp output layer. numpy would have to hold them in float32 and read 260 MB per
frame; ggml multiplies them in their stored type (Q8_0 for quantized models) with its SIMD kernels
and all threads: about 6x faster for one stream and 8x for four.

The draw is in the same graph (`draw`): top-k (ggml's on the CPU, from sorted halves of the codes on a GPU), then
an exponential race, as CSM's reference samples, run by the noise each stream draws from its own generator, for
all streams at once in C. A step so gives back one int32 per stream instead of a row of logits for a per-stream
sampler in Python: that per-stream work was what grew with the number of streams. Codebook 0, drawn from the
backbone's logits, goes through a graph of the draw alone.

Graphs are built per stream count and top-k bucket (a "family": codebook 0's and one per head), the
first time that pair is drawn. Inputs, outputs and every graph's intermediate tensors live in one buffer
(graphs run one at a time, so they share their scratch). On the CPU backend inputs and outputs are numpy
views of it; on a GPU (where the model's layers are) the heads' weights are copied there once, and a
step sends the hidden states and fetches one int32 per stream, where a CPU head and sampler would have
fetched every stream's logits and worked through them on the host at each of the 31 steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import ggml as G

_GRAPH_SIZE = 32  # nodes and leaves of one draw graph: the product, the draw's 14 to 18 tensors, their inputs
_GRAPH_TENSORS = 24  # tensors one draw graph makes in its family's context (at most 19, views included)
_MAX_FAMILIES = 64  # kept built (about 0.3 MB of ggml's bookkeeping each); beyond, the least recently used goes
# The scratch a draw graph takes: its logits (n codes a stream) and `draw`'s tensors, at most 7 of k a stream (k is
# at most n; sorting halves on a GPU, three of them are of up to 2 k and at most n, and one more is of n) and 2 of
# one a stream, each of its at most 10 placed tensors rounded up to ggml's alignment.
_DRAW_TENSORS, _PLACED = 7, 12
_LOGITS_GRAPH_SIZE = 4  # `logits`: one matrix product, its two inputs


def gpu_present() -> bool:
    """Whether this build of llama.cpp's ggml has a GPU device (CUDA, Metal, ...)."""
    return bool(G.dev_by_type(G.DEVICE_TYPE_GPU))


def top_k_bucket(k: int, n_codes: int) -> int:
    """The k a family is built for: the next power of two, at most all codes (few families, few graphs)."""
    return min(n_codes, 1 << (max(k, 1) - 1).bit_length())


def race_noise(noise: list[np.ndarray], k: int) -> np.ndarray:
    """(s, codebooks, k) noise for `draw`, from each stream's (codebooks, its top-k) noise: -inf past a stream's
    own top-k (those codes cannot win)."""
    out = np.full((len(noise), len(noise[0]), k), -np.inf, np.float32)
    for row, own in zip(out, noise):
        row[:, : own.shape[1]] = own
    return out


@dataclass
class _Family:
    """The graphs of one stream count and top-k bucket: `first` (codebook 0) and `heads[i]`, each a graph and
    its output (s,) int32 tensor, and their inputs."""

    ctx: int
    inputs: dict[str, int]  # x, first, noise
    first: tuple[int, int, np.ndarray]  # a graph, its output tensor, and that output on the host
    heads: list[tuple[int, int, np.ndarray]]


class CodebookHeads:
    """`heads`: raw GGUF data of a (n_heads, n_rows, n_embd) matrix of ggml type `qtype`; codes are the first
    `n_codes` rows (default: all). `device`: "cpu", or "gpu" (ggml's first GPU device, in a GPU build).

    To draw: `draw = heads.rows(s, k)` once per frame step (k: the top-k bucket of the streams' largest top-k),
    then write hidden states into `x[:s]` (n_embd float32 rows from `x_address`) and call `draw.head(i, noise)`,
    or write codebook 0's logits into `first[:s]` and call `draw.first(noise)`; noise (s, k) as `draw` takes it.
    `logits(i, s)` gives head i's logits of `x[:s]`.

    On the CPU, `x`, `first` and the outputs are ggml's own buffer; on a GPU they are host copies of it,
    sent before and fetched after each graph (a few KB: the hidden states in, one int32 per stream out)."""

    def __init__(self, heads: np.ndarray, qtype: int, n_embd: int, max_streams: int, n_threads: int,
                 n_codes: int | None = None, device: str = "cpu"):
        self._weights_ctx = self._backend = self._weights = self._io = self._numbers_ctx = self._numbers = None
        self._families = G.Families(self._build_family, _MAX_FAMILIES)
        self._logits: dict[int, list[tuple[int, int, int]]] = {}
        self._logits_ctxs: list[int] = []
        n_heads = heads.shape[0]
        raw = np.ascontiguousarray(heads).view(np.uint8).reshape(n_heads, -1)
        row_bytes = G.row_size(qtype, n_embd)
        n_rows = raw.shape[1] // row_bytes
        if n_rows * row_bytes != raw.shape[1]:
            raise ValueError(f"codebook heads of {raw.shape[1]} bytes each are not whole rows of {n_embd}")
        if device not in ("cpu", "gpu"):
            raise ValueError(f"device is cpu or gpu, got {device!r}")
        self.n_heads, self.n_embd, self.max_streams = n_heads, n_embd, max_streams
        self.n_codes = n_rows if n_codes is None else n_codes
        self.on_gpu = device == "gpu"
        # Draws select the top-k from sorted halves of the codes on a GPU (`_top_k_of_sorted_halves`).
        self.sort_halves = self.on_gpu and self.n_codes % 2 == 0
        dev = G.dev_by_type(G.DEVICE_TYPE_GPU if self.on_gpu else G.DEVICE_TYPE_CPU)
        if not dev:
            raise RuntimeError(f"this build of llama.cpp has no {device.upper()} device")
        self._backend = G.dev_init(dev, None)
        if not self._backend:
            raise RuntimeError(f"ggml's {device.upper()} backend did not start")
        if not self.on_gpu:
            G.SetThreads(G.proc_address(G.dev_reg(dev), b"ggml_backend_set_n_threads"))(self._backend, n_threads)
        try:
            self._load(raw, qtype, n_embd, n_rows)
            self._layout(n_embd, n_rows)
            if self.on_gpu:  # every op the draw needs, at the smallest and the largest top-k, or none of it here
                self._families.get(1, 1), self._families.get(1, self.n_codes)
        except BaseException:
            self.close()
            raise

    def _load(self, raw: np.ndarray, qtype: int, n_embd: int, n_rows: int) -> None:
        n_heads = len(raw)
        self._weights_ctx = G.init(G.InitParams(2 * n_heads * G.tensor_overhead(), None, True))
        weights = [G.new_tensor_2d(self._weights_ctx, qtype, n_embd, n_rows) for _ in range(n_heads)]
        self.in_place = not self.on_gpu and raw.ctypes.data % G.TENSOR_ALIGNMENT == 0
        if self.in_place:  # the caller's memory (the model's mapped sidecar) as it is: nothing held twice
            self._data = raw  # kept alive as long as ggml reads it
            self._weights = G.buffer_from_ptr(raw.ctypes.data, raw.nbytes)
            for i, w in enumerate(weights):
                G.tensor_alloc(self._weights, w, raw.ctypes.data + i * raw.shape[1])
        else:  # copied once into a buffer of the device's
            self._weights = G.alloc_ctx_tensors(self._weights_ctx, self._backend)
            if not self._weights:
                raise MemoryError(f"could not allocate {raw.nbytes / 2**20:.0f} MiB for the codebook heads")
            for w, data in zip(weights, raw):
                G.tensor_set(w, data.ctypes.data, 0, data.nbytes)
        self._w = weights
        # The draw's heads: their first n_codes rows (the rest are ids the codec has no code for).
        self._w_codes = [G.view_2d(self._weights_ctx, w, n_embd, self.n_codes, G.row_size(qtype, n_embd), 0)
                         for w in weights]
        for w in self._w_codes:
            G.view_init(w)

    @property
    def backend(self) -> int:
        """The ggml backend the heads run on (the depth decoder's graph runs there too: depth.py)."""
        return self._backend

    @property
    def code_weights(self) -> list[int]:
        """Each head's first n_codes rows, as ggml tensors."""
        return self._w_codes

    def _layout(self, n_embd: int, n_rows: int) -> None:
        """One device buffer: x | logits | first | noise | out | scratch; and its host side (on the CPU: the buffer
        itself)."""
        s, n = self.max_streams, self.n_codes
        align = max(G.TENSOR_ALIGNMENT, G.backend_alignment(self._backend))
        parts = dict(x=s * n_embd, y=s * n_rows, first=s * n, noise=s * n, out=s,
                     scratch=s * (n + _DRAW_TENSORS * n + 2) + _PLACED * align // 4)
        if self.sort_halves:
            parts["numbers"] = s * n
        self._io = io = G.IOBuffer(self._backend, parts, not self.on_gpu, "the codebook heads' buffer")
        if self.sort_halves:  # each code's number, once a stream: what the draw's selection gathers
            io.view("numbers", np.int32, (s, n))[:] = np.arange(n, dtype=np.int32)
            self._numbers_ctx = G.init(G.InitParams(G.tensor_overhead(), None, True))
            self._numbers = io.place(G.new_tensor_1d(self._numbers_ctx, G.TYPE_I32, s * n), "numbers")
            io.send(self._numbers, "numbers")
        self.x = io.view("x", np.float32, (s, n_embd))
        self.x_address = io.host["x"]
        self._y = io.view("y", np.float32, (s, n_rows))
        self.first = io.view("first", np.float32, (s, n))
        self._out = io.view("out", np.int32, (s,))

    def _input(self, ctx: int, name: str, ne0: int, s: int) -> int:
        return self._io.place(G.new_tensor_2d(ctx, G.TYPE_F32, ne0, s), name)

    def _build_logits(self, s: int) -> list[tuple[int, int, int]]:
        """Every head's logits graph for s streams, each with its input and output tensors."""
        ctx = G.init(G.InitParams((1 + 2 * self.n_heads) * G.tensor_overhead()
                                  + self.n_heads * G.graph_overhead(_LOGITS_GRAPH_SIZE, False), None, True))
        self._logits_ctxs.append(ctx)
        x = self._input(ctx, "x", self.n_embd, s)
        graphs = []
        for w in self._w:
            y = G.mul_mat(ctx, w, x)
            self._io.place(y, "y")
            graph = G.new_graph(ctx, _LOGITS_GRAPH_SIZE, False)
            G.expand(graph, y)
            graphs.append((graph, x, y))
        return graphs

    def logits(self, i: int, s: int) -> np.ndarray:
        """Head i applied to x[:s], all n_rows of it: a view valid until the next call. (Generation draws
        without it; tests and bench.py's quality figures read logits.)"""
        if s not in self._logits:
            self._logits[s] = self._build_logits(s)
        graph, x, y = self._logits[s][i]
        self._io.send(x, "x")
        self._compute(graph)
        self._io.fetch(y, "y")
        return self._y[:s]

    def rows(self, s: int, k: int) -> Draws:
        """Draws for s streams whose top-k bucket is k (`top_k_bucket` of their largest top-k). Valid until the
        next `rows`."""
        if not 1 <= s <= self.max_streams:
            raise ValueError(f"{s} streams: the heads were made for 1 to {self.max_streams}")
        if top_k_bucket(k, self.n_codes) != k:
            raise ValueError(f"top-k bucket {k} is not one of {self.n_codes} codes' (top_k_bucket)")
        return Draws(self, self._families.get(s, k), s, k)

    def _build_family(self, s: int, k: int) -> _Family:
        n_graphs = 1 + self.n_heads
        per_graph = _GRAPH_TENSORS * G.tensor_overhead() + G.graph_overhead(_GRAPH_SIZE, False)
        ctx = G.init(G.InitParams(n_graphs * per_graph + 8 * G.tensor_overhead(), None, True))
        if not ctx:
            raise MemoryError("ggml could not make a context for the draw's graphs")
        inputs = {name: self._input(ctx, name, ne0, s) for name, ne0 in
                  (("x", self.n_embd), ("first", self.n_codes), ("noise", k))}
        numbers = self.numbers_view(ctx, s) if self.sort_halves else None

        def graph(logits: int) -> tuple[int, int, np.ndarray]:
            put = G.Placer(ctx, self._io.buffer, self._io.at["scratch"], self._io.end, self._io.align)
            ids = draw(put, logits(put), self.n_codes, k, s, inputs["noise"], numbers)
            g = G.new_graph(ctx, _GRAPH_SIZE, False)
            G.expand(g, ids)
            self.check_ops(g, "the codebook draw")
            return g, ids, self._out[:s] if self.on_gpu else G.host_array(G.get_data(ids), np.int32, (s,))

        try:
            first = graph(lambda put: inputs["first"])
            heads = [graph(lambda put, w=w: put(G.mul_mat, w, inputs["x"])) for w in self._w_codes]
        except BaseException:
            G.free(ctx)
            raise
        return _Family(ctx, inputs, first, heads)

    def numbers_view(self, ctx: int, s: int) -> int:
        """For a draw of s streams that sorts halves: each code's number as (1, n / 2, 2 s) int32, a view in ctx
        of the buffer's part that holds them."""
        n = self.n_codes
        view = G.view_3d(ctx, self._numbers, 1, n // 2, 2 * s, 4, 4 * (n // 2), 0)
        G.view_init(view)
        return view

    def check_ops(self, graph: int, what: str) -> None:
        """NotImplementedError unless the heads' backend has every op of `graph` (`what` it computes)."""
        for i in range(G.graph_n_nodes(graph)):
            node = G.graph_node(graph, i)
            if not G.supports_op(self._backend, node):
                raise NotImplementedError(f"this ggml build's {'GPU' if self.on_gpu else 'CPU'} backend lacks an "
                                          f"op of {what}")

    def _compute(self, graph: int) -> None:
        status = G.compute(self._backend, graph)
        if status != 0:
            raise RuntimeError(f"ggml failed to compute a codebook head (status {status})")

    def _draw_with(self, graph: tuple[int, int, np.ndarray], inputs: tuple[tuple[int, str], ...],
                   noise: np.ndarray) -> np.ndarray:
        self._io.view("noise", np.float32, noise.shape)[:] = noise
        for t, name in inputs:
            self._io.send(t, name)
        g, ids, out = graph
        self._compute(g)
        if self.on_gpu:
            G.tensor_get(ids, out.ctypes.data, 0, out.nbytes)
        return out

    def close(self) -> None:
        if self._io:
            self._io.free()
        if self._weights:
            G.buffer_free(self._weights)
        self._families.free_all()
        for ctx in (self._weights_ctx, self._numbers_ctx, *self._logits_ctxs):
            if ctx:
                G.free(ctx)
        if self._backend:
            G.backend_free(self._backend)
        self._weights_ctx = self._backend = self._weights = self._io = self._numbers_ctx = self._numbers = None
        self._logits, self._logits_ctxs = {}, []

    def __del__(self) -> None:
        self.close()


class Draws:
    """One frame step's draws for s streams: `first(noise)` (codebook 0) and `head(i, noise)`, noise (s, k) as
    `draw` takes it, a row a stream. Each returns the s codes drawn (a view, valid until the next draw)."""

    def __init__(self, heads: CodebookHeads, family: _Family, s: int, k: int):
        self._heads, self._family, self._s, self._k = heads, family, s, k
        inputs = family.inputs
        self._first_in = ((inputs["first"], "first"), (inputs["noise"], "noise"))
        self._head_in = ((inputs["x"], "x"), (inputs["noise"], "noise"))

    def first(self, noise: np.ndarray) -> np.ndarray:
        return self._heads._draw_with(self._family.first, self._first_in, self._checked(noise))

    def head(self, i: int, noise: np.ndarray) -> np.ndarray:
        return self._heads._draw_with(self._family.heads[i], self._head_in, self._checked(noise))

    def _checked(self, noise: np.ndarray) -> np.ndarray:
        if noise.shape != (self._s, self._k):
            raise ValueError(f"noise of shape {noise.shape} for {self._s} streams of top-k bucket {self._k}")
        return noise


def draw(put, logits: int, n: int, k: int, s: int, noise: int, numbers: int | None = None) -> int:
    """Codes drawn from (n, s) logits by an exponential race over each stream's top k, as CSM's reference draws
    (the argmax of its softmax's probabilities over Exp(1) numbers q): argmax p_i / q_i = argmax logit_i / T -
    log q_i = argmax logit_i + T (-log q_i). `noise` (k, s) holds each stream's T (-log q_i) for its codes from the
    largest logit down, -inf past its own top-k (`race_noise`; greedy: top-k 1, 0). So no softmax, no division by
    the temperature, no sum in the graph: the scores, their argmax, its code. A stream's code depends on its
    logits and its noise alone, whatever k its family was built for (other streams' top-k): past its own top-k
    every score is -inf.
    `numbers`: a (1, n / 2, 2 s) int32 view of each code's number, to select the top k by sorting halves
    (`_top_k_of_sorted_halves`); else by ggml's top-k."""
    vals, ranked = (_top_k(put, logits, n, k, s) if numbers is None else
                    _top_k_of_sorted_halves(put, logits, n, k, s, numbers))
    pick = put(G.reshape_2d, put(G.argmax, put(G.add, vals, noise)), 1, s)  # (1, s): each stream's winner
    return put(G.get_rows, ranked, pick)  # (1, 1, s) int32


def _top_k(put, logits: int, n: int, k: int, s: int) -> tuple[int, int]:
    """Each stream's k largest logits (k, s), largest first, and their codes (1, k, s) int32: ggml's top-k (on
    the CPU a partial sort, cheaper there than sorting halves: docs/performance.md), then those k sorted."""
    idx = put(G.top_k, logits, k)  # (k, s) int32, in no particular order
    vals = put(G.reshape_2d, put(G.get_rows, put(G.reshape_3d, logits, 1, n, s), idx), k, s)
    order = put(G.argsort, vals, G.SORT_DESC)  # largest first, so a stream's top-k is a prefix
    vals = put(G.reshape_2d, put(G.get_rows, put(G.reshape_3d, vals, 1, k, s), order), k, s)
    return vals, put(G.get_rows, put(G.reshape_3d, idx, 1, k, s), order)


def _top_k_of_sorted_halves(put, logits: int, n: int, k: int, s: int, numbers: int) -> tuple[int, int]:
    """What `_top_k` gives, from each half of a stream's n logits sorted on its own: its first k (or all) hold
    the stream's k largest. For a GPU: ggml's CUDA sort is one bitonic kernel for rows of at most 1,024, where
    its top-k of 2,048 runs CUB's segmented radix sort (or one CUB call per row)."""
    m = n // 2
    kk = min(k, m)
    halves = put(G.reshape_2d, logits, m, 2 * s)  # stream j's halves are rows 2j and 2j + 1
    first = put(G.view_2d, put(G.argsort, halves, G.SORT_DESC), kk, 2 * s, 4 * m, 0)  # each half's kk largest
    vals = put(G.reshape_2d, put(G.get_rows, put(G.reshape_3d, halves, 1, m, 2 * s), first), 2 * kk, s)
    candidates = put(G.reshape_3d, put(G.get_rows, numbers, first), 1, 2 * kk, s)  # their codes, (1, 2 kk, s)
    order = put(G.view_2d, put(G.argsort, vals, G.SORT_DESC), k, s, 4 * 2 * kk, 0)
    vals = put(G.reshape_2d, put(G.get_rows, put(G.reshape_3d, vals, 1, 2 * kk, s), order), k, s)
    return vals, put(G.get_rows, candidates, order)
