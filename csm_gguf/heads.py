"""The depth decoder's codebook heads as ggml matrix products, on llama.cpp's own CPU backend.

Each frame applies 31 different (2051 x 1024) heads, one per decoder step, so they cannot be the
decoder's single llama.cpp output layer. numpy would have to hold them in float32 and read 260 MB per
frame; ggml multiplies them in their stored type (Q8_0 for quantized models) with its SIMD kernels
and all threads: about 6x faster for one stream and 8x for four.

All graphs (one per head and stream count) are built once. Inputs and outputs live in one host
buffer exposed as numpy arrays, so a step is: write the hidden states, run a graph, read the logits.
"""

from __future__ import annotations

import ctypes as C

import numpy as np
from llama_cpp._ggml import libggml  # llama-cpp-python's ggml: the very library llama.cpp runs on

_p = C.c_void_p
_DEVICE_TYPE_CPU = 0  # enum ggml_backend_dev_type
_TYPE_F32 = 0  # enum ggml_type
_GRAPH_SIZE = 4  # nodes per graph: one matrix product, its two inputs
_TENSOR_ALIGNMENT = 32  # ggml's: a CPU buffer made on memory of ours must start at a multiple of it (else abort)


class _InitParams(C.Structure):
    _fields_ = [("mem_size", C.c_size_t), ("mem_buffer", _p), ("no_alloc", C.c_bool)]


def _bind(name: str, restype, *argtypes):
    f = getattr(libggml, name)
    f.restype, f.argtypes = restype, list(argtypes)
    return f


_init = _bind("ggml_init", _p, _InitParams)
_free = _bind("ggml_free", None, _p)
_tensor_overhead = _bind("ggml_tensor_overhead", C.c_size_t)
_graph_overhead = _bind("ggml_graph_overhead_custom", C.c_size_t, C.c_size_t, C.c_bool)
_row_size = _bind("ggml_row_size", C.c_size_t, C.c_int, C.c_int64)
_new_tensor_2d = _bind("ggml_new_tensor_2d", _p, _p, C.c_int, C.c_int64, C.c_int64)
_mul_mat = _bind("ggml_mul_mat", _p, _p, _p, _p)
_new_graph = _bind("ggml_new_graph_custom", _p, _p, C.c_size_t, C.c_bool)
_expand = _bind("ggml_build_forward_expand", None, _p, _p)
_dev_by_type = _bind("ggml_backend_dev_by_type", _p, C.c_int)
_dev_init = _bind("ggml_backend_dev_init", _p, _p, C.c_char_p)
_dev_reg = _bind("ggml_backend_dev_backend_reg", _p, _p)
_proc_address = _bind("ggml_backend_reg_get_proc_address", _p, _p, C.c_char_p)
_backend_free = _bind("ggml_backend_free", None, _p)
_alloc_ctx_tensors = _bind("ggml_backend_alloc_ctx_tensors", _p, _p, _p)
_alloc_buffer = _bind("ggml_backend_alloc_buffer", _p, _p, C.c_size_t)
_buffer_from_ptr = _bind("ggml_backend_cpu_buffer_from_ptr", _p, _p, C.c_size_t)
_buffer_base = _bind("ggml_backend_buffer_get_base", _p, _p)
_buffer_free = _bind("ggml_backend_buffer_free", None, _p)
_tensor_alloc = _bind("ggml_backend_tensor_alloc", C.c_int, _p, _p, _p)
_tensor_set = _bind("ggml_backend_tensor_set", None, _p, _p, C.c_size_t, C.c_size_t)
_compute = _bind("ggml_backend_graph_compute", C.c_int, _p, _p)
_SetThreads = C.CFUNCTYPE(None, _p, C.c_int)


class CodebookHeads:
    """`heads`: raw GGUF data of a (n_heads, n_rows, n_embd) matrix of ggml type `qtype`.

    Write hidden states into `x[:s]` (row j starts at `x_address + j * x_row_bytes`), call
    `logits(i, s)`, read `(s, n_rows)` logits of head i."""

    def __init__(self, heads: np.ndarray, qtype: int, n_embd: int, max_streams: int, n_threads: int):
        self._ctx = self._weights_ctx = self._backend = self._weights = self._io = None
        n_heads = heads.shape[0]
        raw = np.ascontiguousarray(heads).view(np.uint8).reshape(n_heads, -1)
        n_rows = raw.shape[1] // _row_size(qtype, n_embd)
        if n_rows * _row_size(qtype, n_embd) != raw.shape[1]:
            raise ValueError(f"codebook heads of {raw.shape[1]} bytes each are not whole rows of {n_embd}")
        dev = _dev_by_type(_DEVICE_TYPE_CPU)
        self._backend = _dev_init(dev, None) if dev else None
        if not self._backend:
            raise RuntimeError("ggml's CPU backend did not start")
        set_threads = _proc_address(_dev_reg(dev), b"ggml_backend_set_n_threads")
        _SetThreads(set_threads)(self._backend, n_threads)

        self._weights_ctx = _init(_InitParams(n_heads * _tensor_overhead(), None, True))
        weights = [_new_tensor_2d(self._weights_ctx, qtype, n_embd, n_rows) for _ in range(n_heads)]
        self.in_place = raw.ctypes.data % _TENSOR_ALIGNMENT == 0
        if self.in_place:  # the caller's memory (the model's mapped sidecar) as it is: nothing held twice
            self._data = raw  # kept alive as long as ggml reads it
            self._weights = _buffer_from_ptr(raw.ctypes.data, raw.nbytes)
            for i, w in enumerate(weights):
                _tensor_alloc(self._weights, w, raw.ctypes.data + i * raw.shape[1])
        else:  # copied once into a CPU buffer of ggml's
            self._weights = _alloc_ctx_tensors(self._weights_ctx, self._backend)
            if not self._weights:
                raise MemoryError(f"could not allocate {raw.nbytes / 2**20:.0f} MiB for the codebook heads")
            for w, data in zip(weights, raw):
                _tensor_set(w, data.ctypes.data, 0, data.nbytes)

        # Inputs and outputs: every graph of s streams reads x[:s] and writes y[:s] of one shared buffer.
        x_bytes, y_bytes = 4 * max_streams * n_embd, 4 * max_streams * n_rows
        self._io = _alloc_buffer(self._backend, x_bytes + y_bytes)
        base = _buffer_base(self._io)
        self.x = np.ctypeslib.as_array((C.c_float * (max_streams * n_embd)).from_address(base))
        self.x = self.x.reshape(max_streams, n_embd)
        self.x_address, self.x_row_bytes = base, 4 * n_embd
        self._y = np.ctypeslib.as_array((C.c_float * (max_streams * n_rows)).from_address(base + x_bytes))
        self._y = self._y.reshape(max_streams, n_rows)

        n_graphs = n_heads * max_streams
        self._ctx = _init(_InitParams(
            (max_streams + n_graphs) * _tensor_overhead() + n_graphs * _graph_overhead(_GRAPH_SIZE, False),
            None, True,
        ))
        self._graphs = {}
        for s in range(1, max_streams + 1):
            x = _new_tensor_2d(self._ctx, _TYPE_F32, n_embd, s)
            _tensor_alloc(self._io, x, base)
            for i, w in enumerate(weights):
                y = _mul_mat(self._ctx, w, x)
                _tensor_alloc(self._io, y, base + x_bytes)
                graph = _new_graph(self._ctx, _GRAPH_SIZE, False)
                _expand(graph, y)
                self._graphs[i, s] = graph

    def logits(self, i: int, s: int) -> np.ndarray:
        """Head i applied to x[:s]: a view valid until the next call."""
        status = _compute(self._backend, self._graphs[i, s])
        if status != 0:
            raise RuntimeError(f"ggml failed to compute codebook head {i} (status {status})")
        return self._y[:s]

    def close(self) -> None:
        for buffer in (self._io, self._weights):
            if buffer:
                _buffer_free(buffer)
        for ctx in (self._ctx, self._weights_ctx):
            if ctx:
                _free(ctx)
        if self._backend:
            _backend_free(self._backend)
        self._ctx = self._weights_ctx = self._backend = self._weights = self._io = None

    def __del__(self) -> None:
        self.close()
