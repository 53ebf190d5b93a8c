"""The codebook heads on ggml: the same logits as a plain matrix product, for every stored type."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from csm_gguf.heads import CodebookHeads
from csm_gguf.model import CSMModel

Q = gguf.GGMLQuantizationType
K, V, D = 3, 67, 64  # 67 rows: not a multiple of anything ggml blocks by


def stored(w: np.ndarray, qtype: Q) -> tuple[np.ndarray, np.ndarray]:
    """(bytes as the sidecar holds them, the float32 weights they stand for)."""
    if qtype == Q.F32:
        return w, w
    if qtype == Q.F16:
        return w.astype(np.float16), w.astype(np.float16).astype(np.float32)
    raw = gguf.quants.quantize(w.reshape(-1, D), qtype).reshape(K, V, -1)
    return raw, gguf.quants.dequantize(raw, qtype).reshape(K, V, D)


def at_offset(raw: np.ndarray, offset: int) -> np.ndarray:
    """raw's bytes, (K, bytes a head), copied to an address `offset` bytes past a multiple of 64."""
    flat = np.ascontiguousarray(raw).view(np.uint8).reshape(K, -1)
    memory = np.empty(flat.nbytes + 128, np.uint8)
    start = (-memory.ctypes.data) % 64 + offset
    placed = memory[start:start + flat.nbytes].reshape(flat.shape)
    placed[:] = flat
    return placed


# ggml rounds the input vector to the weights' type too (8 bits of mantissa for bf16, 8-bit blocks for
# Q8_0), hence the tolerances. Weights at an address ggml can take are used in place, others copied.
@pytest.mark.parametrize("offset", [0, 8], ids=["in-place", "copied"])
@pytest.mark.parametrize("qtype, rtol", [(Q.F32, 1e-6), (Q.F16, 2e-3), (Q.BF16, 1e-2), (Q.Q8_0, 2e-2)])
def test_logits_equal_a_matrix_product(qtype, rtol, offset):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((K, V, D), dtype=np.float32)
    raw, dense = stored(w, qtype)
    heads = CodebookHeads(at_offset(raw, offset), int(qtype), D, max_streams=4, n_threads=2)
    assert heads.in_place == (offset == 0)
    try:
        for s in (1, 3, 4):
            x = rng.standard_normal((s, D), dtype=np.float32)
            for i in range(K):
                heads.x[:s] = x
                got = heads.logits(i, s)
                assert got.shape == (s, V)
                want = x @ dense[i].T
                scale = np.abs(want).max()
                np.testing.assert_allclose(got, want, atol=rtol * scale, rtol=0)
    finally:
        heads.close()


def test_ragged_heads_are_refused():
    with pytest.raises(ValueError, match="not whole rows"):
        CodebookHeads(np.zeros((2, 100), np.uint8), int(Q.F32), 64, 1, 1)


@pytest.mark.parametrize("qtype, decoder_qtype, head_type", [
    ("q4_k", None, Q.Q8_0), ("q8_0", None, Q.Q8_0), ("f16", None, Q.F16), ("q4_k", "f32", Q.F32),
])
def test_heads_follow_the_decoder_precision(converted, qtype, decoder_qtype, head_type):
    assert CSMModel(converted(qtype, decoder_qtype)).audio_head_type == head_type


def test_a_model_s_heads_are_read_from_its_mapped_file(converted):
    """The sidecar aligns its tensors: the heads are the mapped file's pages, not a second copy (68 MB at
    full size)."""
    model = CSMModel(converted("q4_k"))
    heads = CodebookHeads(model.audio_head, model.audio_head_type, model.config.decoder.n_embd, 1, 1)
    try:
        assert heads.in_place
    finally:
        heads.close()
