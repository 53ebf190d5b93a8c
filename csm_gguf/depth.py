"""The depth decoder's whole frame as one ggml graph: its 32 positions, the 31 codebook heads, all 32 draws and
the backbone's next inputs, for every stream at once, in one compute call.

Through llama.cpp a frame is 31 `llama_decode` calls, each building, scheduling and launching a graph of
some 150 nodes, then returning to Python for the head and the draw before the next position can start.
On a GPU those round trips, not the arithmetic, are most of a frame (about 10 ms of 31 steps where the
decoder's weights take well under 1 ms to read). Here the host sends the backbone's codebook-0 logits and
projected hidden state and each stream's noise for its 32 draws, and gets back 32 codes a stream and the sum
of their audio embeddings (the backbone's next input, which the host would otherwise gather and sum).

Each position runs the decoder's llama layers exactly as llama.cpp's graph does (RMS norm, RoPE with the
llama-3 frequency factors, grouped-query attention, SwiGLU), with one difference: keys and values stay in
float32 within the graph (llama.cpp's cache holds them in its cache type). No mask is needed: a position's
query meets the keys of its own stream's earlier positions only, gathered by concatenation, and streams are
the fourth axis, so one matrix product serves them all and grouped-query heads broadcast as in llama.cpp.
Positions 0 and 1 (the backbone's state and codebook 0's code) go through the layers in one pass, as in
llama.cpp's first step: one read of the weights for both, and position 0's attention is its own values (a
softmax over one key is exactly 1). A layer's query, key and value matrices are joined into one at load
where their types match, so one product and one RoPE serve them, and a draw is a race of 3 operations after
its top-k. Fewer, larger operations: about 2,750 kernels a frame instead of 3,400, which is what a GPU's frame
time goes by; on the CPU it is the same speed.
The draw is the heads' own (heads.draw), so a stream's codes do not depend on which streams share a frame.

Graphs are built per stream count and top-k bucket (a "family") at first use; on a GPU per power of two of
streams, the rest of its columns idle (`columns`), so that a server's comings and goings reuse a few graphs.
Their intermediate tensors get memory from one ggml graph allocator, planned once per family; the allocator's
buffer is first sized for the largest family (all streams, every code), so a plan stays valid when other
families are planned.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass

import gguf
import numpy as np

from . import ggml as G
from .heads import CodebookHeads, draw, top_k_bucket
from .model import CSMModel

# Tensors one position makes in its family's context, with room: up to 32 a layer (the first pass, matrices not
# joined), the final norm, head, draw and next inputs.
_LAYER_TENSORS, _POSITION_TENSORS = 40, 48
_MAX_FAMILIES = 32  # kept built (about 2.5 MB of ggml's bookkeeping each for a 4-layer decoder)
_LAYER_WEIGHTS = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up",
                  "ffn_down")
_FUSED = ("attn_qk", "attn_qkv")  # made at load from attn_q, attn_k (and attn_v): _fuse_rows


def _new_tensor(ctx: int, qtype: int, ne: list[int]) -> int:
    return G.new_tensor_1d(ctx, qtype, ne[0]) if len(ne) == 1 else G.new_tensor_2d(ctx, qtype, ne[0], ne[1])


def _fuse_rows(arrays: dict, prefix: str) -> None:
    """A layer's query and key matrices (and value matrix) as one where they share a type (`attn_qk`,
    `attn_qkv`): one product a position instead of three, and one RoPE for queries and keys. Their rows stay
    as they are, so each output is what its own matrix makes. (Q4_K_M gives some layers' values Q6_K.) The
    file's pages of the parts are given back: the joined copy is what is read."""
    names = [f"{prefix}{part}.weight" for part in ("attn_q", "attn_k", "attn_v")]
    qtype, (n_in, _), _ = arrays[names[0]]
    same = [arrays[name][0] == qtype and arrays[name][1][0] == n_in for name in names]
    joined = names[:3] if all(same) else names[:2] if same[1] else []
    if not joined:
        return
    parts = [arrays.pop(name)[2] for name in joined]
    arrays[f"{prefix}{_FUSED[len(joined) - 2]}.weight"] = (
        qtype, [n_in, sum(len(part) for part in parts)], np.concatenate(parts))
    for part in parts:
        _release(part)


def _release(part: np.ndarray) -> None:
    """Give back the pages of a mapped file under `part` (a numpy view of a file mapping), copied elsewhere:
    they would stay in the process's resident memory for as long as the file is mapped. The file stays in the
    page cache, and a later read maps them again."""
    root = part
    while isinstance(root, np.ndarray) and not isinstance(root.base, mmap.mmap):
        root = root.base
    if not isinstance(root, np.ndarray) or not hasattr(root.base, "madvise"):
        return  # not a mapped file's memory
    mm = root.base
    start = part.ctypes.data - (root.ctypes.data - getattr(root, "offset", 0) % mmap.ALLOCATIONGRANULARITY)
    first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE  # whole pages only: a neighbour may still be read
    end = (start + part.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
    if 0 <= first < end <= len(mm):
        mm.madvise(mmap.MADV_DONTNEED, first, end - first)


def _padded(rows: np.ndarray, more: int, fill: float = 0) -> np.ndarray:
    """`rows`, then `more` rows of `fill`."""
    rows = np.asarray(rows)
    return np.concatenate([rows, np.full((more, *rows.shape[1:]), fill, rows.dtype)]) if more else rows


@dataclass
class _Family:
    ctx: int
    graph: int
    inputs: dict[str, int]  # tensor of each per-frame input: first, h0, noise


class DepthFrames:
    """The depth decoder of a model (its decoder.gguf, fed from the sidecar's input table: each codebook's code
    as the decoder reads it), its heads and draws those of `heads` (whose backend, CPU or GPU, it runs on).

    `frame(first, h0, noise)` gives (s, 32) codes for s streams; then `next_inputs(s)` their
    sums of the backbone's 32 audio embeddings, the backbone's next inputs (`Generator.frame_embeddings`),
    made in the same graph."""

    def __init__(self, model: CSMModel, heads: CodebookHeads, max_streams: int):
        self._io = self._io_ctx = self._galloc = None
        self._ctxs, self._buffers = [], []
        self._data = None  # decoder.gguf's map and the arrays ggml reads in place (_load), until close
        self._families = G.Families(self._build, _MAX_FAMILIES)
        self.cfg, self.vocab, self.max_streams = model.config.decoder, model.config.audio_vocab_size, max_streams
        self.n_embd_backbone = model.config.backbone.n_embd
        self._heads = heads
        self.n_codes, self.codebooks = heads.n_codes, heads.n_heads + 1
        self._backend, self.on_gpu = heads.backend, heads.on_gpu
        try:
            self._load(model.decoder_path, {"table": model.decoder_inputs, "audio": model.audio_embeddings})
            self._layout()
            self._galloc = G.gallocr_new(G.default_buffer_type(self._backend))
            self._families.get(max_streams, self.n_codes)  # the largest plan first: later ones fit its buffer
            self._planned_size = G.gallocr_buffer_size(self._galloc, 0)
        except BaseException:
            self.close()
            raise

    # --- weights ------------------------------------------------------------------------------------
    def _load(self, decoder_path, tables: dict[str, np.ndarray]) -> None:
        """The decoder's weights and `tables` (float16 or float32 rows to gather) on the heads' backend. On the
        CPU, the matrices that one of its extra buffer types multiplies faster (CPU_REPACK: interleaved for this
        CPU's SIMD, as llama.cpp loads them) are copied there; the rest are read in place from the mapped
        files."""
        try:
            reader = gguf.GGUFReader(decoder_path)
        except Exception as e:
            raise ValueError(f"{decoder_path} is damaged or incomplete ({e}); convert the model again") from e
        wanted = {"rope_freqs.weight", "output_norm.weight"} | {
            f"blk.{i}.{name}.weight" for i in range(self.cfg.n_layer) for name in _LAYER_WEIGHTS}
        found = {t.name: t for t in reader.tensors if t.name in wanted}
        if len(found) != len(wanted):
            raise ValueError(f"{decoder_path} lacks {sorted(wanted - set(found))[:3]}: convert the model again")
        arrays = {name: (int(t.tensor_type), [int(n) for n in t.shape], t.data) for name, t in found.items()}
        for i in range(self.cfg.n_layer):
            _fuse_rows(arrays, f"blk.{i}.")
        for name, table in tables.items():
            table = np.ascontiguousarray(table)
            ttype = {np.dtype(np.float32): G.TYPE_F32, np.dtype(np.float16): G.TYPE_F16}[table.dtype]
            arrays[name] = (ttype, [table.shape[1], table.shape[0]], table)
        # Buffer type (None: the backend's own) and whether read in place -> names.
        groups: dict[tuple[int | None, bool], list[str]] = {}
        for name, (qtype, ne, data) in arrays.items():
            multiplied = name not in tables and len(ne) == 2
            buft = self._faster_buffer_type(qtype, ne) if multiplied and not self.on_gpu else None
            in_place = buft is None and not self.on_gpu and data.ctypes.data % G.TENSOR_ALIGNMENT == 0
            groups.setdefault((buft, in_place), []).append(name)
        self._ctxs, self._buffers, tensors, kept = [], [], {}, []
        for (buft, in_place), names in groups.items():
            ctx = G.init(G.InitParams((len(names) + 1) * G.tensor_overhead(), None, True))
            self._ctxs.append(ctx)
            for name in names:
                qtype, ne, _ = arrays[name]
                tensors[name] = _new_tensor(ctx, qtype, ne)
            data = {tensors[name]: arrays[name][2] for name in names}
            if in_place:
                for t, a in data.items():  # read where they lie: kept alive (self._data) as long as ggml reads them
                    buffer = G.buffer_from_ptr(a.ctypes.data, a.nbytes)
                    self._buffers.append(buffer)
                    G.tensor_alloc(buffer, t, a.ctypes.data)
                    kept.append(a)
                continue
            buffer = (G.alloc_ctx_tensors(ctx, self._backend) if buft is None
                      else G.alloc_ctx_tensors_from_buft(ctx, buft))
            if not buffer:
                raise MemoryError("could not allocate the depth decoder's weights")
            self._buffers.append(buffer)
            for t, a in data.items():
                G.tensor_set(t, np.ascontiguousarray(a).ctypes.data, 0, a.nbytes)
                _release(a)
        self._data = (reader, kept)
        self._table, self._audio = tensors["table"], tensors["audio"]
        # Bytes a row of each table (float16 or float32).
        self._row_bytes = {name: G.row_size(arrays[name][0], arrays[name][1][0]) for name in tables}
        self._rope_freqs = tensors["rope_freqs.weight"]
        self._output_norm = tensors["output_norm.weight"]
        self._layers = [{name: tensors[f"blk.{i}.{name}.weight"] for name in (*_LAYER_WEIGHTS, *_FUSED)
                         if f"blk.{i}.{name}.weight" in tensors} for i in range(self.cfg.n_layer)]

    def _faster_buffer_type(self, qtype: int, ne: list[int]) -> int | None:
        """The first of the CPU's extra buffer types whose matrix product takes a (ne) matrix of qtype, if any:
        asked of the backend with a probe allocated there (its memory never touched) and freed."""
        for buft in G.cpu_extra_buffer_types():
            ctx = G.init(G.InitParams(3 * G.tensor_overhead(), None, True))
            try:
                w = _new_tensor(ctx, qtype, ne)
                buffer = G.alloc_ctx_tensors_from_buft(ctx, buft)
                if not buffer:
                    continue
                try:
                    x = G.new_tensor_2d(ctx, G.TYPE_F32, ne[0], 1)
                    if G.supports_op(self._backend, G.mul_mat(ctx, w, x)):
                        return buft
                finally:
                    G.buffer_free(buffer)
            finally:
                G.free(ctx)
        return None

    # --- inputs and outputs -------------------------------------------------------------------------
    def _layout(self) -> None:
        """One device buffer for the inputs, the positions, the codes and the next inputs; on a GPU with a host
        copy."""
        s, n, d, k, e = self.max_streams, self.n_codes, self.cfg.n_embd, self.codebooks, self.n_embd_backbone
        parts = dict(first=s * n, h0=s * d, noise=s * n * k, pos=s * k, codes=s * k, embd=s * e)
        self._io = io = G.IOBuffer(self._backend, parts, not self.on_gpu, "the depth decoder's input buffer")
        self._io_ctx = G.init(G.InitParams(3 * G.tensor_overhead(), None, True))
        # Row p: position p for each of the streams (the same for all: they run in step).
        io.view("pos", np.int32, (k, s))[:] = np.arange(k, dtype=np.int32)[:, None]
        io.send(io.place(G.new_tensor_1d(self._io_ctx, G.TYPE_I32, s * k), "pos"), "pos")
        # A frame of any s streams leaves its codes and next inputs at the start of their parts: fetched from there.
        self._codes = io.place(G.new_tensor_1d(self._io_ctx, G.TYPE_I32, s * k), "codes")
        self._embd = io.place(G.new_tensor_1d(self._io_ctx, G.TYPE_F32, s * e), "embd")

    # --- graphs -------------------------------------------------------------------------------------
    def _build(self, s: int, k: int) -> _Family:
        cfg = self.cfg
        n_tensors = self.codebooks * (cfg.n_layer * _LAYER_TENSORS + _POSITION_TENSORS) + 16
        ctx = G.init(G.InitParams(n_tensors * G.tensor_overhead() + G.graph_overhead(n_tensors, False), None, True))
        if not ctx:
            raise MemoryError("ggml could not make a context for the depth decoder's graph")
        try:
            return self._build_in(ctx, s, k, n_tensors)
        except BaseException:
            G.free(ctx)
            raise

    def _build_in(self, ctx: int, s: int, k: int, n_tensors: int) -> _Family:
        def put(op, *args) -> int:
            t = op(ctx, *args)
            if not t:
                raise RuntimeError(f"ggml could not make a tensor ({op.__name__})")
            return t

        n, d, v = self.n_codes, self.cfg.n_embd, self.vocab
        io = self._io
        inputs = {name: io.place(G.new_tensor_2d(ctx, G.TYPE_F32, ne0, ne1), name) for name, ne0, ne1 in
                  (("first", n, s), ("h0", d, s), ("noise", k, s * self.codebooks))}
        pos = io.place(G.new_tensor_1d(ctx, G.TYPE_I32, self.max_streams * self.codebooks), "pos")
        row_bytes = self._row_bytes["table"]
        caches: list[tuple[int, int] | None] = [None] * self.cfg.n_layer

        numbers = self._heads.numbers_view(ctx, s) if self._heads.sort_halves else None  # draws as the heads'

        def draw_at(logits: int, p: int) -> int:
            noise = put(G.view_2d, inputs["noise"], k, s, 4 * k, 4 * k * s * p)  # codebook p's (k, s)
            code = draw(put, logits, n, k, s, noise, numbers)
            return io.place(code, "codes", 4 * s * p)

        def audio_embedding(code: int, p: int) -> int:  # codebook p's row of the backbone's audio table
            e, row = self.n_embd_backbone, self._row_bytes["audio"]
            return put(G.get_rows, put(G.view_2d, self._audio, e, v, row, p * v * row), put(G.reshape_1d, code, s))

        code = draw_at(inputs["first"], 0)
        embd = audio_embedding(code, 0)
        for p in range(1, self.codebooks):
            # The previous codebook's code as the decoder reads it: row (p - 1) * v + code of the table.
            table = put(G.view_2d, self._table, d, v, row_bytes, (p - 1) * v * row_bytes)
            x = put(G.get_rows, table, put(G.reshape_1d, code, s))
            if p == 1:  # positions 0 (the backbone's state) and 1 in one pass: columns of position 0, then 1
                zeros_then_ones = put(G.view_1d, pos, 2 * s, 4 * (self.max_streams - s))  # the end of row 0
                x = self._layers_pass(put, put(G.concat, inputs["h0"], x, 1), 2, zeros_then_ones, caches, s)
            else:
                x = self._layers_pass(put, x, 1, put(G.view_1d, pos, s, 4 * self.max_streams * p), caches, s)
            # Codebook p, from head p - 1.
            norm = put(G.mul, put(G.rms_norm, x, self.cfg.norm_eps), self._output_norm)
            code = draw_at(put(G.mul_mat, self._heads.code_weights[p - 1], norm), p)
            embd = put(G.add, embd, audio_embedding(code, p))  # summed in codebook order, as frame_embeddings
        io.place(embd, "embd")
        graph = G.new_graph(ctx, n_tensors, False)
        G.expand(graph, code)
        G.expand(graph, embd)
        self._heads.check_ops(graph, "the depth decoder's frame")
        if not G.gallocr_alloc_graph(self._galloc, graph):
            raise MemoryError("could not allocate the depth decoder's working memory")
        if len(self._families) and G.gallocr_buffer_size(self._galloc, 0) != self._planned_size:
            # The allocator's buffer grew (this family needs more than the largest did): the other plans
            # point into the old one.
            self._families.free_all()
            self._planned_size = G.gallocr_buffer_size(self._galloc, 0)
        return _Family(ctx, graph, inputs)

    def _layers_pass(self, put, x: int, t: int, pos: int, caches: list, s: int) -> int:
        """Positions through the decoder's layers: t (1, or 2 for positions 0 and 1) of every stream, x (n_embd,
        s * t) in, its columns position by position, their positions in `pos`; out the last position's (n_embd,
        s). `caches[i]` holds layer i's keys (head_dim, positions, kv heads, s) and values (positions, head_dim,
        kv heads, s) so far."""
        cfg = self.cfg
        hd, nh, nkv, eps = cfg.head_dim, cfg.n_head, cfg.n_head_kv, cfg.norm_eps
        column = (nh + nkv) * hd * 4  # bytes of a column's roped queries and keys
        for i, w in enumerate(self._layers):
            h = put(G.mul, put(G.rms_norm, x, eps), w["attn_norm"])
            qk, (values, v_offset, v_column) = self._qkv(put, w, h, s * t)
            qk = put(G.rope_ext, qk, pos, self._rope_freqs, hd, 0, cfg.max_seq_len, cfg.rope_theta, 1.0, 0.0, 1.0,
                     32.0, 1.0)  # (hd, nh + nkv, s * t): each column's query heads, then its key heads

            def key(p: int) -> int:  # position p's keys (hd, 1, nkv, s)
                return put(G.view_4d, qk, hd, 1, nkv, s, hd * 4, hd * 4, column, (p * s * column) + nh * hd * 4)

            def value(p: int) -> int:  # position p's values (1, hd, nkv, s): a position is a row of the cache
                return put(G.view_4d, values, 1, hd, nkv, s, 4, hd * 4, v_column, v_offset + p * s * v_column)

            first = caches[i] is None
            caches[i] = ((put(G.concat, key(0), key(1), 1), put(G.concat, value(0), value(1), 0)) if first else
                         (put(G.concat, caches[i][0], key(0), 1), put(G.concat, caches[i][1], value(0), 0)))
            # The last position's attention: its query meets its own stream's keys so far, no mask needed.
            q = put(G.view_4d, qk, hd, 1, nh, s, hd * 4, hd * 4, column, (t - 1) * s * column)
            weights = put(G.soft_max_ext, put(G.mul_mat, caches[i][0], q), None, 1.0 / hd**0.5, 0.0)
            out = put(G.reshape_2d, put(G.mul_mat, caches[i][1], weights), hd * nh, s)  # (hd, 1, nh, s)
            if t == 2:  # position 0 meets only its own key: its weight is exactly 1, its output its own values
                own = put(G.view_4d, values, hd, 1, nkv, s, hd * 4, hd * 4, v_column, v_offset)
                own = put(G.repeat_4d, own, hd, nh // nkv, nkv, s)  # query head j reads kv head j // (nh / nkv)
                out = put(G.concat, put(G.reshape_2d, own, hd * nh, s), out, 1)
            x = put(G.add, put(G.mul_mat, w["attn_output"], out), x)
            h = put(G.mul, put(G.rms_norm, x, eps), w["ffn_norm"])
            ffn = put(G.swiglu_split, put(G.mul_mat, w["ffn_gate"], h), put(G.mul_mat, w["ffn_up"], h))
            x = put(G.add, put(G.mul_mat, w["ffn_down"], ffn), x)
        n = cfg.n_embd
        return x if t == 1 else put(G.view_2d, x, n, s, n * 4, (t - 1) * s * n * 4)

    def _qkv(self, put, w: dict, h: int, columns: int) -> tuple[int, tuple[int, int, int]]:
        """The products of a layer's queries, keys and values with h (n_embd, columns): queries and keys as
        (hd, nh + nkv, columns) for one RoPE, and where the values lie: (tensor, byte offset, bytes a column)."""
        hd, nh, nkv = self.cfg.head_dim, self.cfg.n_head, self.cfg.n_head_kv
        if "attn_qkv" in w:
            both = put(G.mul_mat, w["attn_qkv"], h)
            column = (nh + 2 * nkv) * hd * 4
            qk = put(G.view_3d, both, hd, nh + nkv, columns, hd * 4, column, 0)
            return qk, (both, (nh + nkv) * hd * 4, column)
        qk = (put(G.mul_mat, w["attn_qk"], h) if "attn_qk" in w else
              put(G.concat, put(G.mul_mat, w["attn_q"], h), put(G.mul_mat, w["attn_k"], h), 0))
        return put(G.reshape_3d, qk, hd, nh + nkv, columns), (put(G.mul_mat, w["attn_v"], h), 0, nkv * hd * 4)

    def prepare(self, stream_counts, top_k: int) -> None:
        """Build the graphs of these stream counts (on a GPU: of their `columns`) for top-k `top_k` now, not at
        their first frame (10-20 ms each), as many as are kept beside the largest; on a GPU also run each twice,
        which ggml's CUDA backend takes before it captures a graph."""
        k = top_k_bucket(top_k, self.n_codes)
        counts = sorted({self.columns(s) for s in stream_counts}) if self.on_gpu else list(stream_counts)
        for s in counts[: _MAX_FAMILIES - 1]:
            if not self.on_gpu:
                self._families.get(s, k)
                continue
            for _ in range(2):  # on inputs that draw codes in range (the buffer's own content might not)
                self.frame(np.zeros((s, self.n_codes), np.float32), np.zeros((s, self.cfg.n_embd), np.float32),
                           np.zeros((s, self.codebooks, k), np.float32))

    def columns(self, s: int) -> int:
        """The streams a frame of s computes. On the CPU s: its time grows with each. On a GPU s rounded up to a
        power of two (at most max_streams), the rest idle columns, so that a few graphs serve every number of
        streams, each built once and recorded as a CUDA graph once (as the codec's pool does): in a server
        requests come and go, and a graph per count would be built (10-20 ms) and captured again and again."""
        if not self.on_gpu:
            return s
        return min(1 << (s - 1).bit_length(), self.max_streams)

    def _compute(self, family: _Family) -> None:
        status = G.compute(self._backend, family.graph)
        if status != 0:
            raise RuntimeError(f"ggml failed to compute the depth decoder's frame (status {status})")

    # --- a frame ------------------------------------------------------------------------------------
    def frame(self, first: np.ndarray, h0: np.ndarray, noise: np.ndarray) -> np.ndarray:
        """Codes (s, 32) int32 for s streams: `first` their codebook-0 logits (s, n_codes), `h0` the backbone's
        projected hidden state (s, n_embd), `noise` (s, 32, k) each draw's noise as `heads.draw` takes it (k:
        the top-k bucket of the streams' largest top-k). A view, valid until the next frame."""
        s, k = len(first), noise.shape[2]
        if not 1 <= s <= self.max_streams:
            raise ValueError(f"{s} streams: the depth decoder was made for 1 to {self.max_streams}")
        if noise.shape != (s, self.codebooks, k) or top_k_bucket(k, self.n_codes) != k:
            raise ValueError(f"noise of shape {noise.shape} for {s} streams: (s, {self.codebooks}, a top-k bucket)")
        c = self.columns(s)
        family = self._families.get(c, k)
        idle = c - s  # columns beyond the streams: zeros in; what they draw is never read
        sent = dict(first=_padded(first, idle), h0=_padded(h0, idle),
                    noise=_padded(noise, idle).transpose(1, 0, 2))  # codebook by codebook
        for name, values in sent.items():
            self._io.view(name, np.float32, values.shape)[:] = values  # the noise transposed as it is copied
            self._io.send(family.inputs[name], name)
        self._compute(family)
        self._io.fetch(self._codes, "codes", 4 * c * self.codebooks)
        return self._io.view("codes", np.int32, (self.codebooks, c)).T[:s]

    def next_inputs(self, s: int) -> np.ndarray:
        """The last frame's (s, backbone n_embd) sums of each stream's 32 audio embeddings: a view, valid until
        the next frame."""
        self._io.fetch(self._embd, "embd", 4 * s * self.n_embd_backbone)
        return self._io.view("embd", np.float32, (s, self.n_embd_backbone))

    def close(self) -> None:
        if self._galloc:
            G.gallocr_free(self._galloc)
        if self._io:
            self._io.free()
        for buffer in self._buffers:
            G.buffer_free(buffer)
        self._families.free_all()
        for ctx in (self._io_ctx, *self._ctxs):
            if ctx:
                G.free(ctx)
        self._io = self._io_ctx = self._galloc = None
        self._ctxs, self._buffers = [], []
        self._data = None  # decoder.gguf's map, read in place until now

    def __del__(self) -> None:
        self.close()
