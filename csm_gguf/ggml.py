"""The ggml calls the codebook heads and the depth decoder's graph make, bound with ctypes from
llama-cpp-python's own ggml (the very library llama.cpp runs on), and `Placer`, which puts each new tensor
at the next free place of a buffer.

The heads' graphs are small and fixed: every tensor gets its memory as it is made (views share their
source's), so many graphs share one scratch buffer, since they run one at a time. The depth decoder's
graph has thousands of intermediate tensors, whose memory ggml's graph allocator reuses (depth.py).
"""

from __future__ import annotations

import ctypes as C

import numpy as np
from llama_cpp._ggml import libggml

p = C.c_void_p
DEVICE_TYPE_CPU, DEVICE_TYPE_GPU = 0, 1  # enum ggml_backend_dev_type
TYPE_F32, TYPE_F16, TYPE_I32 = 0, 1, 26  # enum ggml_type
SORT_DESC = 1  # enum ggml_sort_order
TENSOR_ALIGNMENT = 32  # ggml's: a CPU buffer made on memory of ours must start at a multiple of it (else abort)


class InitParams(C.Structure):
    _fields_ = [("mem_size", C.c_size_t), ("mem_buffer", p), ("no_alloc", C.c_bool)]


def _bind(name: str, restype, *argtypes):
    f = getattr(libggml, name)
    f.restype, f.argtypes = restype, list(argtypes)
    return f


_i64, _sz = C.c_int64, C.c_size_t
init = _bind("ggml_init", p, InitParams)
free = _bind("ggml_free", None, p)
tensor_overhead = _bind("ggml_tensor_overhead", _sz)
graph_overhead = _bind("ggml_graph_overhead_custom", _sz, _sz, C.c_bool)
row_size = _bind("ggml_row_size", _sz, C.c_int, _i64)
nbytes = _bind("ggml_nbytes", _sz, p)
get_data = _bind("ggml_get_data", p, p)
new_tensor_2d = _bind("ggml_new_tensor_2d", p, p, C.c_int, _i64, _i64)
view_2d = _bind("ggml_view_2d", p, p, p, _i64, _i64, _sz, _sz)
reshape_2d = _bind("ggml_reshape_2d", p, p, p, _i64, _i64)
reshape_3d = _bind("ggml_reshape_3d", p, p, p, _i64, _i64, _i64)
mul_mat = _bind("ggml_mul_mat", p, p, p, p)
top_k = _bind("ggml_top_k", p, p, p, C.c_int)
argsort = _bind("ggml_argsort", p, p, p, C.c_int)
get_rows = _bind("ggml_get_rows", p, p, p, p)
mul = _bind("ggml_mul", p, p, p, p)
add = _bind("ggml_add", p, p, p, p)
argmax = _bind("ggml_argmax", p, p, p)
new_tensor_1d = _bind("ggml_new_tensor_1d", p, p, C.c_int, _i64)
view_1d = _bind("ggml_view_1d", p, p, p, _i64, _sz)
reshape_1d = _bind("ggml_reshape_1d", p, p, p, _i64)
view_3d = _bind("ggml_view_3d", p, p, p, _i64, _i64, _i64, _sz, _sz, _sz)
view_4d = _bind("ggml_view_4d", p, p, p, _i64, _i64, _i64, _i64, _sz, _sz, _sz, _sz)
repeat_4d = _bind("ggml_repeat_4d", p, p, p, _i64, _i64, _i64, _i64)
concat = _bind("ggml_concat", p, p, p, p, C.c_int)
rms_norm = _bind("ggml_rms_norm", p, p, p, C.c_float)
soft_max_ext = _bind("ggml_soft_max_ext", p, p, p, p, C.c_float, C.c_float)
swiglu_split = _bind("ggml_swiglu_split", p, p, p, p)
_f = C.c_float
rope_ext = _bind("ggml_rope_ext", p, p, p, p, p, C.c_int, C.c_int, C.c_int, _f, _f, _f, _f, _f, _f)
new_graph = _bind("ggml_new_graph_custom", p, p, _sz, C.c_bool)
expand = _bind("ggml_build_forward_expand", None, p, p)
dev_by_type = _bind("ggml_backend_dev_by_type", p, C.c_int)
dev_init = _bind("ggml_backend_dev_init", p, p, C.c_char_p)
dev_reg = _bind("ggml_backend_dev_backend_reg", p, p)
proc_address = _bind("ggml_backend_reg_get_proc_address", p, p, C.c_char_p)
backend_free = _bind("ggml_backend_free", None, p)
backend_alignment = _bind("ggml_backend_get_alignment", _sz, p)
alloc_ctx_tensors = _bind("ggml_backend_alloc_ctx_tensors", p, p, p)
alloc_ctx_tensors_from_buft = _bind("ggml_backend_alloc_ctx_tensors_from_buft", p, p, p)
alloc_buffer = _bind("ggml_backend_alloc_buffer", p, p, _sz)
buffer_from_ptr = _bind("ggml_backend_cpu_buffer_from_ptr", p, p, _sz)
buffer_base = _bind("ggml_backend_buffer_get_base", p, p)
buffer_free = _bind("ggml_backend_buffer_free", None, p)
tensor_alloc = _bind("ggml_backend_tensor_alloc", C.c_int, p, p, p)
view_init = _bind("ggml_backend_view_init", C.c_int, p)
tensor_set = _bind("ggml_backend_tensor_set", None, p, p, _sz, _sz)
tensor_get = _bind("ggml_backend_tensor_get", None, p, p, _sz, _sz)
supports_op = _bind("ggml_backend_supports_op", C.c_bool, p, p)
graph_n_nodes = _bind("ggml_graph_n_nodes", C.c_int, p)
graph_node = _bind("ggml_graph_node", p, p, C.c_int)
default_buffer_type = _bind("ggml_backend_get_default_buffer_type", p, p)
gallocr_new = _bind("ggml_gallocr_new", p, p)
gallocr_alloc_graph = _bind("ggml_gallocr_alloc_graph", C.c_bool, p, p)
gallocr_buffer_size = _bind("ggml_gallocr_get_buffer_size", _sz, p, C.c_int)
gallocr_free = _bind("ggml_gallocr_free", None, p)
compute = _bind("ggml_backend_graph_compute", C.c_int, p, p)
SetThreads = C.CFUNCTYPE(None, p, C.c_int)
_ExtraBufts = C.CFUNCTYPE(C.POINTER(p), p)


def cpu_extra_buffer_types() -> list[int]:
    """The CPU backend's extra weight buffer types, in llama.cpp's order of preference: CPU_REPACK (weights
    interleaved for this CPU's SIMD as they are set: Q4_0, Q4_K and IQ4_NL on AVX2, Q8_0 too on NEON), ..."""
    dev = dev_by_type(DEVICE_TYPE_CPU)
    get = proc_address(dev_reg(dev), b"ggml_backend_dev_get_extra_bufts")
    if not get:
        return []
    array, found = _ExtraBufts(get)(dev), []
    while array and array[len(found)]:
        found.append(array[len(found)])
    return found

# Ops whose result is a view of their source: it gets no memory of its own.
_VIEWS = (view_2d, reshape_2d, reshape_3d)


class Placer:
    """Makes tensors in a ggml context and gives each the next free bytes of a backend buffer from
    `start` up to `limit`, at multiples of `align` (views: their source's bytes). `end` is where the next
    tensor would go."""

    def __init__(self, ctx: int, buffer: int, start: int, limit: int, align: int = TENSOR_ALIGNMENT):
        self.ctx, self.buffer, self.end, self.limit, self.align = ctx, buffer, start, limit, align

    def __call__(self, op, *args) -> int:
        t = op(self.ctx, *args)
        if not t:
            raise RuntimeError(f"ggml could not make a tensor ({op.__name__})")
        if any(op is v for v in _VIEWS):
            view_init(t)
        else:
            self.place(t)
        return t

    def place(self, t: int) -> int:
        size = -(-nbytes(t) // self.align) * self.align
        if self.end + size > self.limit or tensor_alloc(self.buffer, t, self.end) != 0:
            raise MemoryError("a ggml tensor did not fit the space kept for it")  # ggml would abort instead
        self.end += size
        return t


class Families:
    """Graphs kept by key (stream count and top-k bucket), each family with its ggml context `ctx`: built by
    `build(*key)` at first use; beyond `limit`, the least recently used is freed."""

    def __init__(self, build, limit: int):
        self._build, self._limit, self._kept = build, limit, {}

    def get(self, *key):
        family = self._kept.pop(key, None)  # re-inserted last: the dict's order is the use order
        if family is None:
            if len(self._kept) >= self._limit:
                free(self._kept.pop(next(iter(self._kept))).ctx)
            family = self._build(*key)
        self._kept[key] = family
        return family

    def free_all(self) -> None:
        for family in self._kept.values():
            free(family.ctx)
        self._kept.clear()

    def __len__(self) -> int:
        return len(self._kept)

    def __contains__(self, key: tuple) -> bool:
        return key in self._kept


class IOBuffer:
    """Named parts of one backend buffer (`parts`: name -> number of 4-byte values), each at the backend's
    alignment (CUDA's is 128 bytes; at least what a CPU buffer of our memory needs), with their host side:
    on the CPU the buffer itself (`on_host`), else a host copy that `send` and `fetch` move through tensors
    placed in the parts. `at[name]` is a part's address in the buffer, `host[name]` on the host, `end` the
    buffer's end."""

    def __init__(self, backend: int, parts: dict[str, int], on_host: bool, what: str):
        self.align = max(TENSOR_ALIGNMENT, backend_alignment(backend))
        rounded = {name: -(-4 * count // self.align) * self.align for name, count in parts.items()}
        size = sum(rounded.values())
        self.buffer = alloc_buffer(backend, size)
        if not self.buffer:
            raise MemoryError(f"could not allocate {what}")
        base = buffer_base(self.buffer)
        if on_host:
            host = base
        else:
            self._mirror = np.zeros(size + self.align, np.uint8)
            host = self._mirror.ctypes.data + (-self._mirror.ctypes.data) % self.align
        self.on_host, self.at, self.host, at = on_host, {}, {}, 0
        for name, count in rounded.items():
            self.at[name], self.host[name] = base + at, host + at
            at += count
        self.end = base + at

    def view(self, name: str, dtype, shape: tuple[int, ...]) -> np.ndarray:
        """Part `name`'s host side as a float32 or int32 array."""
        return host_array(self.host[name], dtype, shape)

    def place(self, t: int, name: str, offset: int = 0) -> int:
        """Tensor t in part `name`, `offset` bytes in."""
        if tensor_alloc(self.buffer, t, self.at[name] + offset) != 0:
            raise MemoryError("a ggml tensor did not fit the part of the buffer kept for it")  # ggml would abort
        return t

    def send(self, t: int, name: str, size: int | None = None) -> None:
        """The host side of part `name` (its first `size` bytes; default: all of t) to tensor t placed in it."""
        if not self.on_host:
            tensor_set(t, self.host[name], 0, nbytes(t) if size is None else size)

    def fetch(self, t: int, name: str, size: int | None = None) -> None:
        """Tensor t, placed in part `name`, to its host side (the first `size` bytes; default: all of t)."""
        if not self.on_host:
            tensor_get(t, self.host[name], 0, nbytes(t) if size is None else size)

    def free(self) -> None:
        if self.buffer:
            buffer_free(self.buffer)
        self.buffer = None


def host_array(address: int, dtype, shape: tuple[int, ...]) -> np.ndarray:
    """A float32 or int32 numpy array over memory at `address` (the caller keeps that memory alive)."""
    count = int(np.prod(shape))
    ctype = C.c_float if dtype == np.float32 else C.c_int32
    return np.ctypeslib.as_array((ctype * count).from_address(address)).reshape(shape)
