"""The depth decoder's frame as one ggml graph (depth.py) against the same decoder through llama.cpp.

test_generator.py's core test holds both against transformers' codes (greedy, f32). Here: the two paths draw
the same codes when sampling too, many streams at once, with each layer's query, key and value matrices
joined at load or not (and joined ones make what their parts make); a graph evicted and rebuilt, or planned after its
allocator's memory grew, draws what it drew before; graphs built at load are not built again; the
graph loads no llama.cpp decoder; a backend without one of its ops, or heads kept off the GPU that holds the
layers, leave the frame to llama.cpp, which is also the default with the layers on a GPU until the graph has
been measured there; and the GPU code paths, run with ggml's CPU device standing in for the GPU (the draws'
top-k from sorted halves included), compute what the CPU paths compute, there with a graph per power of two
of streams serving every count."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

import csm_gguf.depth as depth_module
from csm_gguf.generator import Generator, Sampling
from csm_gguf.heads import CodebookHeads, gpu_present, top_k_bucket
from csm_gguf.model import CSMModel

TEXTS = ["First voice.", "A second, somewhat longer sentence to say.", "Third!"]
# Greedy, the default top-k and temperature, and a small top-k with a hot temperature: three top-k buckets
# in one frame.
SAMPLINGS = [Sampling(temperature=0, max_audio_ms=12 * 80), Sampling(seed=7, max_audio_ms=12 * 80),
             Sampling(temperature=1.5, top_k=3, seed=11, max_audio_ms=12 * 80)]
# A step's top-k bucket is its streams' largest: these share one of 8, less than half the tiny codec's 64 codes.
SMALL_TOP_K = [Sampling(temperature=0, top_k=1, max_audio_ms=12 * 80),
               Sampling(temperature=1.5, top_k=3, seed=11, max_audio_ms=12 * 80),
               Sampling(top_k=8, seed=5, max_audio_ms=12 * 80)]


def frames_of(gen: Generator, texts=TEXTS, samplings=SAMPLINGS) -> list[np.ndarray]:
    """Every stream's frames, the streams stepped together (the server's path) until all have ended."""
    streams = [gen.start(gen.prompt_embeddings(t, 0), sp) for t, sp in zip(texts, samplings)]
    frames: list[list[np.ndarray]] = [[] for _ in texts]
    active = list(range(len(texts)))
    while active:
        codes = gen.step([streams[i] for i in active])
        for row, i in enumerate(active):
            if codes[row].any():
                frames[i].append(codes[row].copy())
        active = [i for i in active if not streams[i].done]
    for stream in streams:
        gen.finish(stream)  # the slots free for the next streams
    return [np.stack(f) for f in frames]


def generated(model_dir, decoder: str, monkeypatch, samplings=SAMPLINGS, **kw) -> list[np.ndarray]:
    monkeypatch.setenv("CSM_GGUF_DECODER", decoder)
    gen = Generator(CSMModel(model_dir), max_streams=4, kv_type="f32", **kw)
    try:
        assert (gen.depth is None) == (decoder == "llama")
        return frames_of(gen, samplings=samplings)
    finally:
        gen.close()


def unjoined(monkeypatch) -> None:
    """Each layer's query, key and value matrices multiplied on their own, as llama.cpp does."""
    monkeypatch.setattr(depth_module, "_fuse_rows", lambda arrays, prefix: None)


@pytest.mark.parametrize("joined", [True, False])
def test_the_graph_draws_what_llama_cpp_steps_draw(f32_model, joined, monkeypatch):
    """Sampled as well as greedy, three streams a frame: the same codes, frame after frame (a draw parts only
    where two codes' scores in the race tie within rounding; these seeds have no such draw). With each layer's
    query, key and value matrices joined into one at load, and not."""
    if not joined:
        unjoined(monkeypatch)
    graph = generated(f32_model, "graph", monkeypatch)
    llama = generated(f32_model, "llama", monkeypatch)
    for a, b in zip(graph, llama):
        np.testing.assert_array_equal(a, b)
    assert all(len(f) > 3 for f in graph)


def test_joined_matrices_make_what_their_parts_make(converted, monkeypatch):
    """q4_k: one layer's queries, keys and values share Q4_K and are joined; the other's values are Q6_K, so
    its queries and keys alone. Bit for bit what each matrix makes on its own (each output row is its own
    matrix row's product). Not held against llama.cpp's steps here: with q4_k the two part after some frames,
    as they did before matrices were joined (activations are rounded to 8 bits for each Q4_K product, which
    turns the slightest difference in rounding elsewhere into another code sooner or later)."""
    model_dir = converted("q4_k")
    joined = generated(model_dir, "graph", monkeypatch)
    with monkeypatch.context() as m:
        unjoined(m)
        apart = generated(model_dir, "graph", m)
    for a, b in zip(joined, apart):
        np.testing.assert_array_equal(a, b)
    assert all(len(f) > 3 for f in joined)


@pytest.mark.parametrize("qtype", ["f32", "q4_k"])  # float32 and float16 audio tables
def test_the_backbone_s_next_inputs_from_the_graph_are_the_frame_s_embeddings(converted, qtype, monkeypatch):
    """The graph sums each stream's 32 audio embeddings as it draws them: exactly what `frame_embeddings`
    sums on the host from the codes (rows widened to float32, added in codebook order)."""
    monkeypatch.setenv("CSM_GGUF_DECODER", "graph")
    gen = Generator(CSMModel(converted(qtype)), max_streams=4, kv_type="f32")
    try:
        streams = [gen.start(gen.prompt_embeddings(t, 0), sp) for t, sp in zip(TEXTS, SAMPLINGS)]
        for _ in range(3):
            codes = gen.step(streams)
            np.testing.assert_array_equal(gen.depth.next_inputs(len(streams)), gen.frame_embeddings(codes))
            for st, row in zip(streams, gen.frame_embeddings(codes)):
                np.testing.assert_array_equal(st.pending, row)
    finally:
        gen.close()


def test_a_graph_evicted_or_replanned_draws_what_it_drew(f32_model, monkeypatch):
    """Families (a graph per stream count and top-k bucket) beyond the limit are freed and built again; a
    plan made after the allocator's memory grew drops the plans that point into the old memory."""
    expected = generated(f32_model, "graph", monkeypatch)
    monkeypatch.setattr(depth_module, "_MAX_FAMILIES", 1)
    np.testing.assert_equal(generated(f32_model, "graph", monkeypatch), expected)
    monkeypatch.undo()

    monkeypatch.setenv("CSM_GGUF_DECODER", "graph")
    gen = Generator(CSMModel(f32_model), max_streams=4, kv_type="f32")
    try:
        sizes = iter(range(10**6, 10**9))  # every plan seems to grow the buffer
        monkeypatch.setattr(depth_module.G, "gallocr_buffer_size", lambda galloc, i: next(sizes))
        got = frames_of(gen)
        assert len(gen.depth._families) == 1  # each new plan dropped the others
    finally:
        gen.close()
    np.testing.assert_equal(got, expected)


def test_prepared_graphs_are_not_built_again_at_a_frame(f32_model, monkeypatch):
    """CSM builds the graphs of 1 to max_streams streams when it loads (a server's start), so that no request's
    first frame waits for one."""
    monkeypatch.setenv("CSM_GGUF_DECODER", "graph")
    gen = Generator(CSMModel(f32_model), max_streams=4, kv_type="f32")
    try:
        gen.prepare(SAMPLINGS[1].top_k)
        monkeypatch.setattr(depth_module.DepthFrames, "_build", lambda *a: pytest.fail("a graph built at a frame"))
        streams = []
        for text in TEXTS:  # 1, 2, then 3 streams a frame
            streams.append(gen.start(gen.prompt_embeddings(text, 0), SAMPLINGS[1]))
            gen.step(streams)
    finally:
        gen.close()


def test_csm_prepares_the_graphs_of_its_streams_when_it_loads(f32_model, monkeypatch):
    from csm_gguf.heads import top_k_bucket
    from csm_gguf.sampling import TOP_K
    from csm_gguf.tts import CSM

    monkeypatch.setenv("CSM_GGUF_DECODER", "graph")
    tts = CSM(f32_model, max_streams=3)
    try:
        depth = tts.generator.depth
        assert all((s, top_k_bucket(TOP_K.default, depth.n_codes)) in depth._families for s in (1, 2, 3))
    finally:
        tts.close()


def test_the_graph_loads_no_llama_cpp_decoder(f32_model, monkeypatch):
    monkeypatch.setenv("CSM_GGUF_DECODER", "graph")
    gen = Generator(CSMModel(f32_model), kv_type="f32")
    try:
        list(gen.generate("Hi.", 0, (), SAMPLINGS[0]))
        assert gen._decoder is None and gen.calls_per_frame == 2
    finally:
        gen.close()
    monkeypatch.setenv("CSM_GGUF_DECODER", "llama")
    gen = Generator(CSMModel(f32_model), kv_type="f32")
    try:
        assert gen._decoder is not None and gen.calls_per_frame == 32  # loaded with the model, not at a frame
    finally:
        gen.close()


def test_settings_set_but_empty_are_the_defaults(f32_model, monkeypatch):
    """A compose or k8s template's blank (`CSM_GGUF_DECODER: ""`) was "got ''", where every other setting
    takes it for unset."""
    monkeypatch.setenv("CSM_GGUF_DECODER", "")
    monkeypatch.setenv("CSM_GGUF_HEADS_DEVICE", "")
    gen = Generator(CSMModel(f32_model), kv_type="f32")
    try:
        assert gen.depth is not None and not gen.heads.on_gpu  # the CPU's defaults: the graph, heads on the CPU
    finally:
        gen.close()


def test_a_backend_lacking_an_op_of_the_graph_leaves_the_frame_to_llama_cpp(f32_model, monkeypatch, capsys):
    real = CodebookHeads.check_ops

    def check_ops(self, graph, what):
        if what == "the depth decoder's frame":
            raise NotImplementedError(f"this ggml build's GPU backend lacks an op of {what}")
        return real(self, graph, what)

    monkeypatch.setattr(CodebookHeads, "check_ops", check_ops)
    expected = generated(f32_model, "llama", monkeypatch)
    monkeypatch.setenv("CSM_GGUF_DECODER", "graph")
    gen = Generator(CSMModel(f32_model), max_streams=4, kv_type="f32")
    try:
        assert gen.depth is None
        np.testing.assert_equal(frames_of(gen), expected)
    finally:
        gen.close()
    assert "the depth decoder through llama.cpp: this ggml build's GPU backend lacks an op" in capsys.readouterr().err


def test_heads_kept_on_the_cpu_leave_a_gpu_s_decoder_to_llama_cpp(f32_model, monkeypatch, capsys):
    """The graph runs where the heads do: with the layers on a GPU and the heads on the CPU (asked for, or for
    want of an op), the graph would take the decoder's layers off the GPU; its 31 steps stay in llama.cpp."""
    import csm_gguf.generator as generator_module

    monkeypatch.setattr(generator_module, "gpu_present", lambda: True)
    monkeypatch.setenv("CSM_GGUF_HEADS_DEVICE", "cpu")
    monkeypatch.setenv("CSM_GGUF_DECODER", "graph")
    gen = Generator(CSMModel(f32_model), n_gpu_layers=999)
    try:
        assert gen.depth is None and not gen.heads.on_gpu
    finally:
        gen.close()
    said = capsys.readouterr().err
    assert "the depth decoder through llama.cpp, on the GPU: the codebook heads are on the CPU" in said


def test_the_default_is_the_graph_on_the_cpu_and_llama_cpp_with_layers_on_a_gpu(f32_model, monkeypatch):
    """Until the graph has been measured on a GPU (issue 26), llama.cpp's steps stay the default there."""
    import csm_gguf.generator as generator_module

    monkeypatch.delenv("CSM_GGUF_DECODER", raising=False)
    gen = Generator(CSMModel(f32_model))
    try:
        assert gen.depth is not None
    finally:
        gen.close()
    real = Generator._heads

    def heads_said_on_the_gpu(self, *args):  # this build has no GPU backend to put them on
        heads = real(self, *args)
        heads.on_gpu = True
        return heads

    monkeypatch.setattr(generator_module, "gpu_present", lambda: True)
    monkeypatch.setenv("CSM_GGUF_HEADS_DEVICE", "cpu")
    monkeypatch.setattr(Generator, "_heads", heads_said_on_the_gpu)
    gen = Generator(CSMModel(f32_model), n_gpu_layers=999)
    try:
        assert gen.heads.on_gpu and gen.depth is None
    finally:
        gen.close()


def test_an_unknown_decoder_is_refused(f32_model, monkeypatch):
    monkeypatch.setenv("CSM_GGUF_DECODER", "onnx")
    with pytest.raises(ValueError, match="CSM_GGUF_DECODER is graph or llama, got 'onnx'"):
        Generator(CSMModel(f32_model))


def test_too_many_streams_for_the_graph_are_refused(f32_model, monkeypatch):
    monkeypatch.setenv("CSM_GGUF_DECODER", "graph")
    gen = Generator(CSMModel(f32_model), max_streams=2, kv_type="f32")
    try:
        n, d = gen.model.n_codes, gen.cfg.decoder.n_embd

        def frame(s: int, k: int):
            zeros = np.zeros((s, n), np.float32), np.zeros((s, d), np.float32), np.zeros((s, 32, k), np.float32)
            gen.depth.frame(*zeros)

        with pytest.raises(ValueError, match="3 streams: the depth decoder was made for 1 to 2"):
            frame(3, 1)
        with pytest.raises(ValueError, match=r"noise of shape \(2, 32, 3\) for 2 streams"):  # 3: no top-k bucket
            frame(2, 3)
    finally:
        gen.close()


def test_the_gpu_paths_run_on_the_cpu_backend_compute_what_the_cpu_paths_compute(f32_model, monkeypatch):
    """The GPU's code paths, with ggml's CPU device standing in for the GPU device: the heads' weights, the
    decoder's and its tables copied into the backend's buffers (their mapped pages given back), inputs sent and
    codes and next inputs fetched through host copies, for the graph and for the heads' draws between
    llama.cpp's steps. The same codes as the CPU's own paths, which read mapped files in place and their
    buffers directly. On a GPU the draws (the graph's and the heads') take their top-k from sorted halves of
    the codes (whole halves for the default top-k's bucket on the tiny codec, the first 8 of each for
    SMALL_TOP_K's). (What only a GPU can show, its kernels, is test_the_graph_on_the_gpu_... below.)"""
    runs = {"default": SAMPLINGS, "small": SMALL_TOP_K}
    expected = {(decoder, run): generated(f32_model, decoder, monkeypatch, samplings)
                for decoder in ("graph", "llama") for run, samplings in runs.items()}
    cpu = depth_module.G.dev_by_type(depth_module.G.DEVICE_TYPE_CPU)
    monkeypatch.setattr(depth_module.G, "dev_by_type", lambda kind: cpu)
    for decoder in ("graph", "llama"):
        monkeypatch.setenv("CSM_GGUF_DECODER", decoder)
        gen = Generator(CSMModel(f32_model), max_streams=4, kv_type="f32", n_gpu_layers=999)
        try:
            assert gen.heads.on_gpu and (gen.depth is None or gen.depth.on_gpu)
            gen.prepare(SAMPLINGS[1].top_k)  # on a GPU the graphs run twice, on whatever their inputs hold
            for run, samplings in runs.items():
                np.testing.assert_equal(frames_of(gen, samplings=samplings), expected[decoder, run])
            if gen.depth is not None:
                codes = gen.step([gen.start(gen.prompt_embeddings(TEXTS[0], 0), SAMPLINGS[1])])
                np.testing.assert_array_equal(gen.depth.next_inputs(1), gen.frame_embeddings(codes))
        finally:
            gen.close()


def test_on_a_gpu_graphs_of_powers_of_two_streams_serve_every_count(f32_model, monkeypatch):
    """On a GPU (ggml's CPU device standing in) a frame of s streams runs the graph of the next power of two,
    its other columns idle: the graphs of 1, 2, 4 and 8 streams, made when the generator is prepared (a server's
    start), serve 6 streams down to 1 without another being built, and draw what the CPU's graphs of s streams
    draw."""
    six = [replace(SAMPLINGS[1], seed=i, temperature=t, max_audio_ms=(4 + i) * 80)  # 6 streams, then 5, ... 1
           for i, t in enumerate((0.9, 1.5, 0.5, 0.9, 1.2, 1))]
    texts = [*TEXTS, *TEXTS]
    monkeypatch.setenv("CSM_GGUF_DECODER", "graph")
    gen = Generator(CSMModel(f32_model), max_streams=8, kv_type="f32")
    try:
        expected = frames_of(gen, texts, six)
    finally:
        gen.close()
    assert len({len(f) for f in expected}) == 6
    cpu = depth_module.G.dev_by_type(depth_module.G.DEVICE_TYPE_CPU)
    monkeypatch.setattr(depth_module.G, "dev_by_type", lambda kind: cpu)
    gen = Generator(CSMModel(f32_model), max_streams=8, kv_type="f32", n_gpu_layers=999)
    try:
        gen.prepare(six[0].top_k)
        k = top_k_bucket(six[0].top_k, gen.depth.n_codes)
        assert sorted(gen.depth._families._kept) == [(1, k), (2, k), (4, k), (8, k)]
        monkeypatch.setattr(depth_module.DepthFrames, "_build", lambda *a: pytest.fail("a graph built at a frame"))
        np.testing.assert_equal(frames_of(gen, texts, six), expected)
    finally:
        gen.close()


@pytest.mark.skipif(not gpu_present(), reason="llama.cpp's ggml has no GPU device in this build")
def test_the_graph_on_the_gpu_draws_what_llama_cpp_steps_draw_there(f32_model, monkeypatch):
    """With every layer on the GPU the graph runs there (where its one call a frame replaces 31 decodes and
    their round trips). Greedy, one stream: the same codes as llama.cpp's steps on the same GPU."""
    kw = dict(n_gpu_layers=999)
    one = dict(texts=TEXTS[:1], samplings=SAMPLINGS[:1])
    monkeypatch.setenv("CSM_GGUF_DECODER", "graph")
    gen = Generator(CSMModel(f32_model), kv_type="f32", **kw)
    try:
        assert gen.depth is not None and gen.depth.on_gpu
        graph = frames_of(gen, **one)
    finally:
        gen.close()
    monkeypatch.setenv("CSM_GGUF_DECODER", "llama")
    gen = Generator(CSMModel(f32_model), kv_type="f32", **kw)
    try:
        np.testing.assert_array_equal(graph[0], frames_of(gen, **one)[0])
    finally:
        gen.close()


def test_weights_copied_elsewhere_give_their_mapped_pages_back(tmp_path):
    """Weights copied into another buffer (CPU_REPACK, a GPU's) leave the process's resident memory: mapped
    pages once read would count there for as long as the file stays mapped."""
    import psutil

    path = tmp_path / "weights.bin"
    path.write_bytes(np.random.default_rng(0).integers(0, 255, 64 * 2**20, np.uint8).tobytes())
    mapped = np.memmap(path, np.uint8, "r")
    part = mapped[4096 + 123 : 60 * 2**20 + 7]  # not page-aligned at either end
    proc = psutil.Process()
    int(part.sum())  # read: now resident
    before = proc.memory_info().rss
    depth_module._release(part)
    assert before - proc.memory_info().rss > 50 * 2**20
    assert int(part[:10].sum()) == int(np.fromfile(path, np.uint8, 10, offset=4096 + 123).sum())  # still readable
    depth_module._release(np.zeros(2**20, np.uint8))  # not a mapping's memory: nothing to give back
    at_an_offset = np.memmap(path, np.uint8, "r", offset=3 * 4096 + 5)  # a mapping that starts inside the file
    int(at_an_offset.sum())
    before = proc.memory_info().rss
    depth_module._release(at_an_offset[: 50 * 2**20])
    assert before - proc.memory_info().rss > 40 * 2**20
