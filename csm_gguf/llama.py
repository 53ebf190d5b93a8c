"""A llama.cpp model driven with embeddings as input, through llama-cpp-python's low-level API.

One `EmbeddingModel` owns a model, a context and a preallocated batch whose arrays are exposed as
numpy views, so the generation loop fills inputs in place and never allocates.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import llama_cpp as L
import numpy as np

_VERBOSE = bool(os.environ.get("CSM_GGUF_VERBOSE"))
_GGML_LOG_LEVEL_ERROR = 4  # ggml_log_level: NONE, DEBUG, INFO, WARN, ERROR, CONT


@L.llama_log_callback
def _log(level: int, text: bytes, user_data) -> None:
    # llama.cpp narrates every load on stderr; keep its errors unless CSM_GGUF_VERBOSE is set.
    if _VERBOSE or level == _GGML_LOG_LEVEL_ERROR:
        sys.stderr.write(text.decode("utf-8", "replace"))


L.llama_log_set(_log, None)
L.llama_backend_init()


class _Interrupt:
    """Ctrl-C during a llama.cpp load. Python raises KeyboardInterrupt at the next bytecode it runs, and while
    llama.cpp loads, that is in one of our ctypes callbacks (its log), where ctypes prints the exception and
    drops it: the load went on and the program with it. So during a load (`interruptible`) SIGINT only records
    itself; the load's progress callback then stops the load, and KeyboardInterrupt is raised once it returns."""

    def __init__(self):
        self.pending = False

    def record(self, signum, frame) -> None:
        self.pending = True


_interrupt = _Interrupt()


@L.llama_progress_callback
def _progress(progress: float, user_data) -> bool:
    return not _interrupt.pending  # False stops the load


@contextmanager
def interruptible():
    """Run a llama.cpp load (model or context) so that Ctrl-C stops it: from the main thread, where Python
    handles signals, while SIGINT raises KeyboardInterrupt (its default); elsewhere the call runs as it is."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    _interrupt.pending = False
    signal.signal(signal.SIGINT, _interrupt.record)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if _interrupt.pending:
        raise KeyboardInterrupt


def _load_model(path: Path, params) -> int | None:
    """llama.cpp's model at `path` (None if it could not be read); Ctrl-C stops the load (`interruptible`)."""
    params.progress_callback = _progress
    model = None
    try:
        with interruptible():
            model = L.llama_model_load_from_file(str(path).encode(), params)
    except KeyboardInterrupt:
        if model:  # loaded before the progress callback could stop it
            L.llama_model_free(model)
        raise
    return model


KV_TYPES = {"f32": L.GGML_TYPE_F32, "f16": L.GGML_TYPE_F16, "q8_0": L.GGML_TYPE_Q8_0}


@dataclass(frozen=True)
class ContextOptions:
    n_ctx: int
    n_batch: int
    n_seq_max: int = 1
    n_threads: int = 0  # 0: all cores
    n_gpu_layers: int = 0
    kv_type: str = "f16"
    want_hidden: bool = False  # also return the final-normed hidden state of each output


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def load_vocab_only(path: Path):
    params = L.llama_model_default_params()
    params.vocab_only = True
    model = _load_model(path, params)
    if not model:
        raise ValueError(f"llama.cpp could not read the tokenizer in {path}: the file is damaged or incomplete, "
                         "convert again")
    return model


def free_model(model) -> None:
    """Free a model of load_vocab_only."""
    L.llama_model_free(model)


class EmbeddingModel:
    def __init__(self, path: Path, opts: ContextOptions):
        if opts.kv_type not in KV_TYPES:
            raise ValueError(f"unknown KV cache type {opts.kv_type!r}; choose one of {', '.join(KV_TYPES)}")
        mparams = L.llama_model_default_params()
        mparams.n_gpu_layers = opts.n_gpu_layers
        if not opts.n_gpu_layers:
            # Read, not mapped: on CPU llama.cpp repacks quantized weights into buffers of its own, and the mapped
            # file then stayed resident beside its repacked copy (q4_k's backbone: 1.4 GB instead of 0.93 GB).
            mparams.load_mode = L.LLAMA_LOAD_MODE_NONE
        self.model = _load_model(path, mparams)
        if not self.model:
            raise ValueError(f"llama.cpp could not load {path}; the file is damaged or incomplete: convert again")
        self.n_embd = L.llama_model_n_embd(self.model)
        self._hidden_bytes = 4 * self.n_embd
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))

        cparams = L.llama_context_default_params()
        cparams.n_ctx = opts.n_ctx
        cparams.n_batch = opts.n_batch
        cparams.n_ubatch = opts.n_batch
        cparams.n_seq_max = opts.n_seq_max
        cparams.kv_unified = True
        threads = opts.n_threads or default_threads()
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        cparams.embeddings = opts.want_hidden
        cparams.pooling_type = L.LLAMA_POOLING_TYPE_NONE
        cparams.type_k = KV_TYPES[opts.kv_type]
        cparams.type_v = KV_TYPES[opts.kv_type]
        cparams.no_perf = True
        # A GPU build sends a CPU model's large batches (the prompt) to the GPU unless told not to; there,
        # F32 products of several rows run in TF32. No layers on the GPU means none of the work either.
        cparams.op_offload = opts.n_gpu_layers != 0
        # llama.cpp's CPU flash attention rounds queries to F16: with an F32 cache, exactness is the point.
        cparams.flash_attn_type = (
            L.LLAMA_FLASH_ATTN_TYPE_DISABLED if opts.kv_type == "f32" else L.LLAMA_FLASH_ATTN_TYPE_AUTO
        )
        self.ctx = None
        try:
            with interruptible():
                self.ctx = L.llama_init_from_model(self.model, cparams)
        except KeyboardInterrupt:
            if self.ctx:
                L.llama_free(self.ctx)
                self.ctx = None
            L.llama_model_free(self.model)
            raise
        if not self.ctx:
            L.llama_model_free(self.model)
            raise MemoryError(f"llama.cpp could not create a context for {path} (n_ctx={opts.n_ctx})")
        self.memory = L.llama_get_memory(self.ctx)
        self.n_batch = opts.n_batch

        self.batch = L.llama_batch_init(opts.n_batch, self.n_embd, opts.n_seq_max)
        b = self.batch
        self.embd = np.ctypeslib.as_array(b.embd, shape=(opts.n_batch, self.n_embd))
        self.pos = np.ctypeslib.as_array(b.pos, shape=(opts.n_batch,))
        self.output = np.ctypeslib.as_array(b.logits, shape=(opts.n_batch,))
        np.ctypeslib.as_array(b.n_seq_id, shape=(opts.n_batch,))[:] = 1
        # Each token belongs to exactly one sequence: keep a view of every token's seq_id[0].
        self._seq_id = np.zeros(opts.n_batch, dtype=np.int32)
        self._seq_views = [np.ctypeslib.as_array(b.seq_id[i], shape=(1,)) for i in range(opts.n_batch)]
        for v in self._seq_views:
            v[0] = 0
        self.output[:] = 0

    def set_seq_ids(self, seq_ids: np.ndarray) -> None:
        """Assign tokens 0..len-1 to sequences; only rewrites entries that changed."""
        n = len(seq_ids)
        changed = np.nonzero(self._seq_id[:n] != seq_ids)[0]
        for i in changed:
            self._seq_views[i][0] = seq_ids[i]
        self._seq_id[:n] = seq_ids

    def decode(self, n_tokens: int) -> None:
        """Run the batch's first n_tokens (embd, pos, seq ids and output flags already filled)."""
        self.batch.n_tokens = n_tokens
        rc = L.llama_decode(self.ctx, self.batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with code {rc} (KV cache full or bad positions)")

    def logits(self, n: int) -> np.ndarray:
        """The first n outputs' logits, (n, n_vocab): a view into llama.cpp's buffer, valid until the next
        decode (llama.cpp puts its outputs in batch order before it hands out the buffer)."""
        src = L.llama_get_logits(self.ctx)
        if not src:
            raise RuntimeError("llama.cpp has no logits")
        return np.ctypeslib.as_array(src, shape=(n, self.n_vocab))

    def copy_hidden_rows(self, start: int, n: int, address: int, stride: int = 1) -> None:
        """Copy the final-normed hidden states of outputs start, start + stride, ... (n of them) to n
        consecutive rows at `address`. llama.cpp (from llama-cpp-python 0.3.36, our lowest) puts its outputs
        in batch order before it hands out the buffer, so consecutive outputs are one memmove."""
        src = L.llama_get_embeddings(self.ctx)
        if not src:
            raise RuntimeError("llama.cpp has no hidden states")
        base, row = ctypes.cast(src, ctypes.c_void_p).value + start * self._hidden_bytes, self._hidden_bytes
        if stride == 1:
            ctypes.memmove(address, base, n * row)
            return
        for j in range(n):
            ctypes.memmove(address + j * row, base + j * stride * row, row)

    def clear(self) -> None:
        L.llama_memory_clear(self.memory, False)

    def remove_sequence(self, seq_id: int) -> None:
        # After close this is a no-op rather than a use of freed memory: a stream abandoned mid-way (its
        # generator collected after the model was closed) still releases its sequence on the way out.
        if self.ctx:
            L.llama_memory_seq_rm(self.memory, seq_id, -1, -1)

    def copy_sequence(self, src: int, dst: int, n: int) -> None:
        """Share sequence src's cells at positions 0..n-1 with sequence dst. The cache is unified, so the
        cells gain a sequence id: nothing is copied or computed."""
        L.llama_memory_seq_cp(self.memory, src, dst, 0, n)

    def close(self) -> None:
        if self.ctx:
            L.llama_batch_free(self.batch)
            L.llama_free(self.ctx)
            L.llama_model_free(self.model)
            self.ctx = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def tokenize(vocab_model, text: str) -> list[int]:
    """Token ids of `text` with no special tokens added or parsed (CSM adds BOS/EOS itself)."""
    vocab = L.llama_model_get_vocab(vocab_model)
    data = text.encode("utf-8")
    size = len(data) + 8
    buf = (L.llama_token * size)()
    n = L.llama_tokenize(vocab, data, len(data), buf, size, False, False)
    if n < 0:
        raise RuntimeError(f"tokenizer needed {-n} slots for {len(data)} bytes")
    return list(buf[:n])

