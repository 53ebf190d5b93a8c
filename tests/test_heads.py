"""The codebook heads on ggml: the same logits as a plain matrix product, for every stored type; and the draw
in their graphs, an exponential race over each stream's top-k: argmax when greedy, the top-k temperature
softmax's odds otherwise, each stream's codes its own whatever else shares the step."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from csm_gguf.heads import CodebookHeads, gpu_present, race_noise, top_k_bucket
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


# The draw runs where the heads are: ggml's CPU backend, or its GPU one (a GPU build: CUDA, Metal).
DEVICES = ["cpu", pytest.param("gpu", marks=pytest.mark.skipif(not gpu_present(), reason="ggml has no GPU device"))]


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


# ggml rounds the input vector to the weights' type too (8 bits of mantissa for bf16, 8-bit blocks for
# Q8_0), hence the tolerances. Weights at an address ggml can take are used in place, others copied.
@pytest.mark.parametrize("offset", [0, 8], ids=["in-place", "copied"])
@pytest.mark.parametrize("qtype, rtol", [(Q.F32, 1e-6), (Q.F16, 2e-3), (Q.BF16, 1e-2), (Q.Q8_0, 2e-2)])
def test_logits_equal_a_matrix_product(qtype, rtol, offset, device):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((K, V, D), dtype=np.float32)
    raw, dense = stored(w, qtype)
    heads = CodebookHeads(at_offset(raw, offset), int(qtype), D, max_streams=4, n_threads=2, device=device)
    assert heads.in_place == (offset == 0 and device == "cpu")  # a GPU holds its own copy
    try:
        for s in (1, 3, 4):
            x = rng.standard_normal((s, D), dtype=np.float32)
            for i in range(K):
                heads.x[:s] = x
                got = heads.logits(i, s)
                assert got.shape == (s, V)
                want = x @ dense[i].T
                scale = np.abs(want).max()
                tolerance = rtol if device == "cpu" else max(rtol, 5e-3)  # CUDA: F32 by several rows in TF32
                np.testing.assert_allclose(got, want, atol=tolerance * scale, rtol=0)
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


N = 64  # codes: the heads' rows past these are ids the codec has no code for
def draw_heads(device: str, max_streams: int = 4) -> tuple[CodebookHeads, np.ndarray]:
    w = np.random.default_rng(1).standard_normal((K, V, D), dtype=np.float32)
    w[:, N:] *= 100
    return CodebookHeads(w, int(Q.F32), D, max_streams=max_streams, n_threads=2, n_codes=N, device=device), w


def noise(rng, settings: list[tuple[int, float]], k: int) -> np.ndarray:
    """(s, k) noise of one draw for streams of these (top-k, temperature), as a stream's Sampler makes it."""
    own = [np.zeros((1, 1), np.float32) if t == 0 else -t * np.log(rng.standard_exponential((1, top_k)))
           for top_k, t in settings]
    return race_noise(own, k)[:, 0]


def test_a_greedy_draw_is_the_argmax_over_the_codes(device):
    heads, w = draw_heads(device)
    rng = np.random.default_rng(2)
    try:
        for s in (1, 3, 4):
            x = rng.standard_normal((s, D), dtype=np.float32)
            draws = heads.rows(s, 1)
            for i in range(K):
                heads.x[:s] = x
                got = draws.head(i, noise(rng, [(1, 0)] * s, 1)).copy()
                want = np.argmax(heads.logits(i, s)[:, :N], axis=1)
                np.testing.assert_array_equal(got, want)
                if s == 4:  # the rows past the codes (weights 100x) would often win: the test can tell
                    assert (np.argmax(heads.logits(i, s), axis=1) >= N).any()
    finally:
        heads.close()


def softmax_odds(logits: np.ndarray, k: int, temperature: float) -> tuple[np.ndarray, np.ndarray]:
    top = np.argsort(logits)[::-1][:k]
    p = np.exp((logits[top] - logits[top].max()) / temperature)
    return top, p / p.sum()


def test_draws_follow_each_stream_s_top_k_temperature_softmax(device):
    """Four streams in one step, each with its own top-k and temperature (one greedy), drawn 20000 times:
    every code is in its stream's top-k, and each code's frequency is its softmax probability."""
    heads, _ = draw_heads(device)
    rng = np.random.default_rng(3)
    logits = (2 * rng.standard_normal((4, N))).astype(np.float32)
    settings = [(5, 0.7), (1, 0), (N, 1.5), (12, 0.3)]  # (top-k, temperature); (1, 0): greedy
    n = 20_000
    try:
        heads.first[:4] = logits
        draws = heads.rows(4, N)
        got = np.stack([draws.first(noise(rng, settings, N)).copy() for _ in range(n)])
    finally:
        heads.close()
    for j, (k, t) in enumerate(settings):
        top, p = softmax_odds(logits[j], k, t or 1.0)
        assert set(got[:, j].tolist()) <= set(top.tolist())
        freq = np.array([(got[:, j] == c).mean() for c in top])
        np.testing.assert_allclose(freq, p, rtol=0, atol=4 * np.sqrt(p * (1 - p) / n).max() + 1e-12)


def test_a_stream_draws_the_same_alone_or_beside_others(device):
    """A stream's codes depend on its logits and noise alone: drawn alone (top-k 5: a family of 8) or beside
    streams with a larger top-k (a family of 64) and a greedy one, the same codes, to the last draw."""
    heads, _ = draw_heads(device)
    rng = np.random.default_rng(4)
    logits = rng.standard_normal((3, N)).astype(np.float32)
    settings = [(5, 0.8), (40, 1.0), (1, 0)]
    races = [[-t * np.log(rng.standard_exponential((1, k), np.float32)) for k, t in settings] for _ in range(2000)]
    try:
        heads.first[:1] = logits[:1]
        alone = heads.rows(1, 8)
        solo = np.array([alone.first(race_noise(own[:1], 8)[:, 0])[0] for own in races])
        heads.first[:3] = logits
        shared = heads.rows(3, 64)
        together = np.array([shared.first(race_noise(own, 64)[:, 0])[0] for own in races])
    finally:
        heads.close()
    np.testing.assert_array_equal(solo, together)
    assert len(set(solo.tolist())) == 5


def test_infinite_noise_wins_and_codes_past_the_top_k_never_do(device):
    """An Exp(1) number of 0 gives its code infinite noise: that code wins. A code past the stream's top-k (here
    the 4th, in a family of 4) never wins, whatever the noise of the others: its score is -inf."""
    heads, _ = draw_heads(device)
    logits = np.zeros((1, N), np.float32)
    logits[0, :4] = (3.0, 2.0, 1.0, 0.5)
    try:
        heads.first[:1] = logits
        draws = heads.rows(1, 4)
        assert draws.first(race_noise([np.array([[0, np.inf, 0]], np.float32)], 4)[:, 0])[0] == 1
        assert draws.first(race_noise([np.full((1, 3), -1e6, np.float32)], 4)[:, 0])[0] == 0
        with pytest.raises(ValueError, match=r"noise of shape \(1, 8\) for 1 streams of top-k bucket 4"):
            draws.first(np.zeros((1, 8), np.float32))
        with pytest.raises(ValueError, match="bucket 3 is not one"):
            heads.rows(1, 3)
    finally:
        heads.close()


def test_the_largest_family_fits_its_buffer(device):
    """Every stream at once, each with every code in its top-k: the most scratch a draw takes."""
    heads, _ = draw_heads(device)
    try:
        heads.first[:4] = np.random.default_rng(5).standard_normal((4, N)).astype(np.float32)
        draws = heads.rows(4, top_k_bucket(10**6, N))
        codes = draws.first(np.zeros((4, N), np.float32))
        assert ((0 <= codes) & (codes < N)).all()
    finally:
        heads.close()


def test_families_beyond_the_limit_are_freed_and_made_again(monkeypatch):
    """Graphs are kept for a few stream counts and top-k buckets; the least recently used go, and one
    needed again is made again and draws as before."""
    from csm_gguf import heads as heads_module

    monkeypatch.setattr(heads_module, "_MAX_FAMILIES", 2)
    heads, _ = draw_heads("cpu")
    logits = np.random.default_rng(6).standard_normal((4, N)).astype(np.float32)
    rng = np.random.default_rng(7)
    drawn = race_noise([-np.log(rng.standard_exponential((1, 5), np.float32)) for _ in range(2)], 8)[:, 0]
    try:
        heads.first[:4] = logits
        first = heads.rows(2, 8).first(drawn).copy()
        for s, k in ((3, 8), (4, 8), (4, 64)):
            heads.rows(s, k).first(np.zeros((s, k), np.float32))
        assert len(heads._families) == 2 and (2, 8) not in heads._families
        np.testing.assert_array_equal(heads.rows(2, 8).first(drawn), first)
    finally:
        heads.close()


def test_more_streams_than_the_heads_were_made_for_are_refused():
    heads, _ = draw_heads("cpu", max_streams=2)
    try:
        with pytest.raises(ValueError, match="1 to 2"):
            heads.rows(3, 1)
    finally:
        heads.close()


@pytest.mark.skipif(gpu_present(), reason="this ggml has a GPU device")
def test_heads_on_a_gpu_this_build_lacks_are_refused():
    with pytest.raises(RuntimeError, match="no GPU device"):
        draw_heads("gpu")
