"""python bench.py: how fast csm-gguf speaks, where the time goes, and against what.

For each model variant: real-time factor (generation seconds per audio second), time to first audio
(streaming, prompt included), frames per second and peak memory over several runs after a warm-up;
the per-frame stage breakdown (runs of its own); the floor (the compute of the frame path in use, its llama.cpp
decodes and depth-decoder frame, with no pipeline around them);
optionally batched streams (--concurrency), the corpus path on Ray beside them (--batch-rows), the
OpenAI server under concurrent streaming requests (--server), fidelity against the f32 model (--quality)
and peers: transformers' CSM and Mimi (--compare transformers), moshi's own streaming Mimi (--compare
moshi). Without --model it benchmarks a full-size CSM-1B with random weights, converted once into the
cache (random weights never end speech: --frames fixes the length). Stages are timed by wrapping the
generator's calls from outside:
about 70 timer pairs per 80 ms frame, microseconds against the ~100+ ms a frame takes on a CPU.

    python bench.py --qtype q4_k,q8_0 --compare transformers --quality --json bench.json --plot bench.png
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import shlex
import signal
import statistics
import sys
import threading
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

import csm_gguf  # noqa: F401  (first: it limits numpy's BLAS threads before numpy loads)
from csm_gguf.formats import FRAME_MS, SAMPLE_RATE

TEXT = "The quick brown fox jumps over the lazy dog, and then it runs far away into the forest."
FRAME_S = FRAME_MS / 1000
WEIGHTS_SEED = 0  # convert_random's: the transformers peer rebuilds exactly those weights


# --- measuring ----------------------------------------------------------------------------------------


@dataclass
class Spread:
    median: float
    min: float
    max: float
    values: list[float]

    @classmethod
    def of(cls, values: list[float]) -> Spread:
        return cls(statistics.median(values), min(values), max(values), values)

    def nearest_median(self) -> int:
        """The index of the value nearest the median (a run whose other figures go with it)."""
        return min(range(len(self.values)), key=lambda i: abs(self.values[i] - self.median))


class Profile:
    """Exclusive wall time per call path ("step/backbone", ...) of the callables it wraps."""

    def __init__(self) -> None:
        self.stack: list[str] = []
        self.totals: dict[str, float] = defaultdict(float)
        self._undo: list[tuple[Any, str, Any]] = []

    def patch(self, owner: Any, attr: str, new: Any) -> None:
        """Replace owner.attr with `new` until `restore`."""
        own = attr in getattr(owner, "__dict__", {})
        self._undo.append((owner, attr, getattr(owner, attr) if own else None))
        setattr(owner, attr, new)

    def wrap(self, owner: Any, attr: str, label: str) -> None:
        fn = getattr(owner, attr)

        def timed(*args, **kwargs):
            self.stack.append(label)
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t
                self.totals["/".join(self.stack)] += dt
                self.stack.pop()
                if self.stack:  # the caller's own time excludes its callees'
                    self.totals["/".join(self.stack)] -= dt

        self.patch(owner, attr, timed)

    def restore(self) -> None:
        for owner, attr, fn in reversed(self._undo):
            if fn is None:
                delattr(owner, attr)
            else:
                setattr(owner, attr, fn)
        self._undo.clear()

    def get(self, *paths: str) -> float:
        return sum(self.totals.get(p, 0.0) for p in paths)


class PeakRSS:
    """Peak resident memory of this process while the block runs (sampled every 20 ms)."""

    def __enter__(self) -> PeakRSS:
        import psutil

        self._proc = psutil.Process()
        self.peak = self.start = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)

    @property
    def mib(self) -> float:
        return self.peak / 2**20

    @property
    def added_mib(self) -> float:
        """The peak over what the process held as the block began: a variant's own, whatever ran before it in
        this process (torch, earlier variants' leftovers)."""
        return (self.peak - self.start) / 2**20


# --- figures ------------------------------------------------------------------------------------------


@dataclass
class Stages:
    """Milliseconds per frame (prompt: per run)."""

    frame: float
    backbone: float
    decoder: float  # the depth decoder's frame: one ggml graph with every head and draw, or 31 llama.cpp steps
    heads_sampling: float
    mimi: float
    rest: float
    prompt: float


@dataclass
class Floor:
    """The compute of the frame path in use alone, with fixed inputs and nothing around it: the backbone's
    llama_decode and the depth decoder's frame (path "graph": csm_gguf/depth.py's one ggml graph, its draws and the
    next inputs included; path "llama": llama.cpp's 31 llama_decode calls, no heads or draws), each waited for as a
    frame must. Warmed up, then one run of --frames frames after each headline run: medians of --runs."""

    frame_ms: float  # median over the runs
    backbone_ms: float
    decoder_step_ms: float | None  # path llama: one of the 31 llama_decode calls; graph: None (one call a frame)
    rtf: float  # the floor's seconds per second of audio (samples / SAMPLE_RATE)
    path: str = ""  # graph or llama: the decoder path timed (that of the runs)
    what: str = ""  # in words
    decoder_ms: float = 0.0
    frame_ms_spread: Spread | None = None  # frame_ms of each run


@dataclass
class Concurrency:
    streams: int
    frames: int  # asked per stream (--frames)
    seconds: float  # of the run whose aggregate_xrt is the median
    aggregate_xrt: float  # audio made by all streams (samples / SAMPLE_RATE) per second: the median of --runs
    per_stream_rtf: float | None  # streams / aggregate_xrt (None: no audio)
    host_ms: float  # a frame step's time outside llama_decode and the depth graph's call (Generator.step), from a
    # run of its own (HOST_FRAMES, each decode waited for: step_host_ms); with CSM_GGUF_DECODER=llama it includes
    # the heads' and draws' ggml calls. The timed run has no timers or waits.
    frames_made: int = 0  # all streams together: fewer than streams x frames where a stream ended early
    # (end of speech, the context's end): a stream that is done is no longer stepped, as Generator.speak
    steps: int = 0  # frame steps run (the longest stream's frames)
    audio_s: float = 0.0  # samples decoded by all streams / SAMPLE_RATE
    xrt_spread: Spread | None = None  # aggregate_xrt of each timed run


@dataclass
class Batched:
    """--batch-rows: the corpus path (csm_gguf.batch on Ray, started for the run) beside the in-process engine."""

    streams: int  # one worker making this many rows at once
    rows: int
    frames: int  # per row
    seconds: float  # the whole run: Ray's start, the worker's model load, every row
    first_rows_s: float  # until the first batch of rows was written
    aggregate_xrt: float  # the whole run
    steady_xrt: float  # after the first batch: what a long corpus runs at
    in_process_xrt: float | None  # --concurrency of the same streams in this process, when measured
    ray_cost: float | None  # 1 - steady / in-process


@dataclass
class Served:
    streams: int  # requests sent at once
    frames: int  # asked per request
    seconds: float  # of the run whose aggregate_xrt is the median
    aggregate_xrt: float  # the audio of the requests that succeeded (samples / SAMPLE_RATE) per second: the
    # median of --runs runs of `streams` requests at once
    first_audio_s: Spread | None  # per request that succeeded, of every run: to the first audio bytes over HTTP
    # (None: none did)
    errors: list[str] = field(default_factory=list)  # requests that failed (an HTTP error, a reset, no audio), and
    # those short of the audio asked where speech cannot end early (random weights): none of them is a sample
    short: int = 0  # requests that ended with less audio than asked (real weights end speech early), every run
    audio_s: float = 0.0  # of the requests counted, in the median run
    xrt_spread: Spread | None = None  # aggregate_xrt of each run


@dataclass
class Quality:
    frames: int
    codebook0_top1: float
    codebook0_kl: float
    decoder_top1: float
    decoder_kl: float


@dataclass
class Variant:
    name: str
    model_dir: str
    qtype: str
    decoder_qtype: str
    weights: str
    load_s: float
    frames: int  # made by a run
    audio_s: float  # made by a run: samples / SAMPLE_RATE (what RTF and xRealTime divide by, as every figure here)
    rtf: Spread
    xrt: Spread
    ttfa_s: Spread
    fps: Spread
    stages_ms: Stages  # from --stage-runs runs of their own (timed, each llama_decode waited for): means
    floor: Floor
    frame_over_floor: float  # our whole frame (Mimi included, from the stage runs) / the floor's median
    generation_over_floor: float  # our frame without Mimi / the floor's: what the pipeline adds to the same compute
    peak_rss_mib: float  # the process's peak while the variant loaded and ran (earlier variants' leftovers included)
    rss_added_mib: float  # that peak less the process's memory as the variant began: the variant's own
    heads_device: str  # where the codebook heads and the draw ran: cpu, gpu (CSM_GGUF_HEADS_DEVICE to choose)
    decoder_path: str  # graph: the depth decoder's frame as one ggml graph; llama: 31 steps (CSM_GGUF_DECODER)
    stage_runs: int = 0
    concurrency: list[Concurrency] = field(default_factory=list)
    served: list[Served] = field(default_factory=list)
    batched: list[Batched] = field(default_factory=list)
    quality: Quality | None = None


# --- one variant --------------------------------------------------------------------------------------


def sampling(frames: int, seed: int):
    from csm_gguf.sampling import Sampling

    return Sampling(seed=seed, max_audio_ms=frames * FRAME_MS)


def run_once(tts, frames: int, seed: int) -> tuple[float, float, int, int]:
    """(seconds, seconds to the first audio, frames, samples) of one streamed utterance via the public API
    (chunk_frames=1: a chunk a frame)."""
    t0 = time.perf_counter()
    first, n, samples = None, 0, 0
    for chunk in tts.stream(TEXT, seed=seed, max_audio_ms=frames * FRAME_MS, voice="none"):  # no prompt: the text
        if first is None:
            first = time.perf_counter() - t0
        n += 1
        samples += len(chunk)
    return time.perf_counter() - t0, first or 0.0, n, samples


def llama_models(gen) -> tuple:
    """The generator's llama.cpp contexts that its frames use: the backbone, and the depth decoder's when it
    runs through llama.cpp (CSM_GGUF_DECODER=llama)."""
    return (gen.backbone,) if gen.depth is not None else (gen.backbone, gen.decoder)


def wait_for_decodes(prof: Profile, *models) -> None:
    """On a GPU llama_decode returns before the work is done, and the wait lands in whatever reads the
    output next. Waiting inside decode (until prof.restore) puts each step's time in its own stage. It also
    takes away the overlap of the host's work with the GPU's that generation relies on, so only the stage-split
    runs wait so, never the headline ones. On the CPU a decode is already finished when it returns. (The depth
    decoder's ggml graph returns its codes, so it has waited.)"""
    import llama_cpp

    for model in models:
        def decode(n_tokens: int, model=model, run=model.decode) -> None:
            run(n_tokens)
            llama_cpp.llama_synchronize(model.ctx)

        prof.patch(model, "decode", decode)


def instrument(tts, prof: Profile | None = None) -> Profile:
    """The stage split's timers and waits around tts's generator, until the Profile's `restore` (its totals
    stay: instrumenting again adds to them)."""
    from csm_gguf.heads import Draws

    gen, prof = tts.generator, prof or Profile()
    wait_for_decodes(prof, *llama_models(gen))
    prof.wrap(gen, "prompt_embeddings", "prompt")
    prof.wrap(gen, "start", "prompt")
    prof.wrap(gen, "step", "step")
    prof.wrap(gen.backbone, "decode", "backbone")
    if gen.depth is not None:  # the heads and draws are in its graph
        prof.wrap(gen.depth, "frame", "decoder")
    else:
        prof.wrap(gen.decoder, "decode", "decoder")
    prof.wrap(gen, "_draw_codebook", "heads")
    prof.wrap(gen.heads, "rows", "heads")
    prof.wrap(Draws, "first", "heads")  # codebook 0's draw (the others are in _draw_codebook)
    prof.wrap(tts.codec, "decode_step", "mimi")
    return prof


def stages(prof: Profile, seconds: float, frames: int, runs: int) -> Stages:
    ms = 1000.0 / frames
    prompt = prof.get("prompt", "prompt/backbone")
    frame = (seconds - prompt) * ms
    parts = dict(
        backbone=prof.get("step/backbone") * ms,
        decoder=prof.get("step/decoder") * ms,
        heads_sampling=prof.get("step/heads") * ms,
        mimi=prof.get("mimi") * ms,
    )
    return Stages(frame=frame, rest=frame - sum(parts.values()), prompt=prompt * 1000 / runs, **parts)


FLOOR_WHAT = {
    "graph": "the backbone's llama_decode + the depth decoder's one-graph frame (csm_gguf/depth.py: heads, draws and "
             "next inputs included), fixed inputs, nothing else",
    "llama": "llama.cpp's own path: the backbone's llama_decode + the depth decoder's 31 llama_decode calls "
             "(no heads, no draws), fixed inputs, nothing else",
}


def floor(gen, frames: int, prompt_len: int, streams: int = 1) -> tuple[float, float]:
    """(backbone seconds, depth decoder seconds) of `frames` frames of the frame path in use (Generator._draw_frame:
    same models, contexts and batch shapes), inputs filled once, nothing else: what a frame costs with no pipeline
    around it. Each call waits for its work, as a frame must (each step's input depends on the last's output):
    the graph path reads the backbone's logits (as the frame does), the llama.cpp steps synchronize."""
    import llama_cpp

    from csm_gguf.generator import Sampler
    from csm_gguf.heads import race_noise, top_k_bucket

    bb, k, s, n = gen.backbone, gen.cfg.num_codebooks, streams, gen.model.n_codes
    rng = np.random.default_rng(0)
    bb.embd[: max(prompt_len, s)] = 0.02 * rng.standard_normal((max(prompt_len, s), bb.n_embd), dtype=np.float32)
    slots = np.arange(s, dtype=np.int32)
    # A prompt's worth of cache first, so attention spans the positions it spans in the real run.
    for slot in slots:
        bb.remove_sequence(int(slot))
        bb.pos[:prompt_len] = np.arange(prompt_len)
        bb.output[:prompt_len] = 0
        bb.set_seq_ids(np.full(prompt_len, slot, dtype=np.int32))
        bb.decode(prompt_len)
    llama_cpp.llama_synchronize(bb.ctx)
    if gen.depth is not None:
        samplers = [Sampler(sampling(frames, j), n) for j in range(s)]
        noise = race_noise([x.noise(k) for x in samplers], top_k_bucket(max(x.top_k for x in samplers), n))
    else:
        dec = gen.decoder
        dec.embd[: 2 * s] = 0.02 * rng.standard_normal((2 * s, dec.n_embd), dtype=np.float32)
    backbone = decoder = 0.0
    for f in range(frames):
        t0 = time.perf_counter()
        bb.pos[:s] = prompt_len + f
        bb.output[:s] = 1
        bb.set_seq_ids(slots)
        bb.decode(s)
        if gen.depth is not None:
            out = bb.logits(s)  # waits for the step, as the frame's read of its outputs does
        else:
            llama_cpp.llama_synchronize(bb.ctx)
        t1 = time.perf_counter()
        if gen.depth is not None:
            gen.depth.frame(out[:, :n], out[:, gen._proj], noise)
            gen.depth.next_inputs(s)
        else:
            dec.clear()
            dec.pos[: 2 * s] = np.tile([0, 1], s)
            dec.output[: 2 * s] = 1
            dec.set_seq_ids(np.repeat(slots, 2))
            dec.decode(2 * s)
            llama_cpp.llama_synchronize(dec.ctx)
            dec.output[:s] = 1
            dec.set_seq_ids(slots)
            for i in range(2, k):
                dec.pos[:s] = i
                dec.decode(s)
                llama_cpp.llama_synchronize(dec.ctx)
        backbone += t1 - t0
        decoder += time.perf_counter() - t1
    for slot in slots:
        bb.remove_sequence(int(slot))
    return backbone, decoder


def concurrency(tts, n_streams: int, frames: int, seed: int, args) -> Concurrency:
    """`n_streams` utterances decoded together (Generator.step batching, the codec's DecoderPool): the server's
    path. A stream that is done (end of speech, its frames, the context's end) is stepped no more, as
    Generator.speak and the server's engine do; the audio counted is the samples the codec made."""
    from csm_gguf.generator import Generator
    from csm_gguf.mimi import DecoderPool

    gen = Generator(tts.model, n_streams, args.threads, args.gpu_layers, args.kv_type)
    pool = DecoderPool(tts.codec, n_streams, tts.model.config.num_codebooks)
    try:
        prompt = gen.prompt_embeddings(TEXT, 0)

        def utterances(n_frames: int) -> tuple[float, int, int, int]:
            """(seconds, frames made, frame steps, samples made)"""
            t0 = time.perf_counter()
            streams = [gen.start(prompt, sampling(n_frames, seed + j)) for j in range(n_streams)]
            audio = {id(st): pool.open() for st in streams}
            made = steps = samples = 0
            try:
                live = [st for st in streams if not st.done]
                while live:
                    codes = gen.step(live)
                    steps += 1
                    # The all-zero frame ends speech: neither decoded nor counted (as Generator.speak).
                    speaking = {audio[id(st)]: codes[j : j + 1] for j, st in enumerate(live) if codes[j].any()}
                    made += len(speaking)
                    samples += sum(len(pcm) for pcm in pool.decode_many(speaking).values())
                    live = [st for st in live if not st.done]
                seconds = time.perf_counter() - t0
            finally:
                for st in streams:
                    gen.finish(st)
                    audio[id(st)].close()
            return seconds, made, steps, samples

        utterances(min(frames, 3))  # warm-up
        # Timed plain: on a GPU the host's work overlaps the device's, as in the server (waits would undo that).
        runs = [utterances(frames) for _ in range(args.runs)]
        host_ms = step_host_ms(gen, lambda: utterances(min(frames, HOST_FRAMES))[2])
    finally:
        gen.close()
    spread = Spread.of([samples / SAMPLE_RATE / seconds for seconds, _, _, samples in runs])
    seconds, made, steps, samples = runs[spread.nearest_median()]
    xrt = spread.median
    return Concurrency(n_streams, frames, seconds, xrt, n_streams / xrt if xrt else None, host_ms, made, steps,
                       samples / SAMPLE_RATE, spread)


HOST_FRAMES = 10  # frames of the run that times a frame step's host work (--concurrency): a mean, not a total


def step_host_ms(gen, run: Callable[[], int]) -> float:
    """A frame step's time outside llama_decode and the depth graph's call (`Generator.step`'s own), from `run`
    (which returns its frame steps) with every decode waited for, so that a GPU's work is not counted as the
    host's; the timers and waits are undone after."""
    prof = Profile()
    wait_for_decodes(prof, *llama_models(gen))
    prof.wrap(gen, "step", "step")
    for model in llama_models(gen):
        prof.wrap(model, "decode", "calls")
    if gen.depth is not None:
        prof.wrap(gen.depth, "frame", "calls")
    try:
        steps = run()
    finally:
        prof.restore()
    return prof.get("step") * 1000 / max(steps, 1)  # step's own time: the wrapped calls are their own path


# A voice prompt's transcript, about what a speaker says in 10 s.
VOICE_TRANSCRIPT = ("Thanks for calling. I can help with your order, your account or anything else today; "
                    "just tell me what you need and we will sort it out together.")


def voice_prompt_ttfa(tts, seconds: float, args) -> dict:
    """Time to the first audio of a request in a voice whose prompt holds `seconds` of audio: read once and
    cached (the 2nd request on) against a request with no voice prompt at all, and the uncached read
    beside them (the cache emptied before each run). Medians of --runs."""
    from csm_gguf.generator import Generator

    tts.generator = Generator(tts.model, 1, args.threads, args.gpu_layers, args.kv_type)  # bench_variant closed its own
    try:
        return _voice_prompt_ttfa(tts, seconds, args)
    finally:
        tts.generator.close()


def _voice_prompt_ttfa(tts, seconds: float, args) -> dict:
    from csm_gguf.generator import Segment

    rng = np.random.default_rng(args.seed)
    codes = rng.integers(0, tts.model.n_codes, size=(round(seconds / FRAME_S), tts.model.config.num_codebooks))
    voice = [Segment(0, VOICE_TRANSCRIPT, codes)]
    cache = tts.generator.prompt_cache

    def first_audio(context, empty_cache: bool) -> float:
        if empty_cache:
            cache.clear()
        t0 = time.perf_counter()
        chunks = tts.stream(TEXT, seed=args.seed, max_audio_ms=5 * FRAME_MS, speaker=0, context=context)
        next(iter(chunks))
        took = time.perf_counter() - t0
        chunks.close()
        return took

    runs = {"no_voice": lambda: first_audio((), False), "voice_uncached": lambda: first_audio(voice, True),
            "voice_cached": lambda: first_audio(voice, False)}
    times: dict[str, list[float]] = defaultdict(list)
    for _ in range(args.runs):  # interleaved, so a busier moment of the machine falls on all three alike
        for name, run in runs.items():
            times[name].append(run())
    figures = {name: Spread.of(values).median for name, values in times.items()}
    return {"prompt_seconds": seconds, "prompt_positions": tts.generator.context_rows(voice), **figures,
            "cached_over_no_voice": figures["voice_cached"] / figures["no_voice"],
            "uncached_over_no_voice": figures["voice_uncached"] / figures["no_voice"]}


def batched(model_dir: Path, streams: int, rows: int, args, in_process: float | None) -> Batched:
    """`rows` rows of TEXT, `--frames` each, through csm_gguf.batch.synthesize with one worker of `streams`
    streams (pcm files into a temporary folder). The manifest is watched for when rows are written: the steady
    rate counts the rows after the first batch, over the time after it."""
    import tempfile

    from csm_gguf.batch import synthesize
    from csm_gguf.llama import default_threads

    written: list[tuple[float, int]] = []  # (time, rows in the manifest)
    with tempfile.TemporaryDirectory() as out:
        manifest, stop = Path(out) / "manifest.jsonl", threading.Event()

        def watch() -> None:
            while not stop.wait(0.02):
                n = len(manifest.read_bytes().splitlines()) if manifest.exists() else 0
                if n and (not written or n > written[-1][1]):
                    written.append((time.perf_counter(), n))

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        t0 = time.perf_counter()
        summary = synthesize([{"id": f"row{i}", "text": TEXT} for i in range(rows)], out, model=model_dir,
                             format="pcm", voice="none",  # as run_once: no prompt
                             max_audio_ms=args.frames * FRAME_MS, seed=args.seed, workers=1,
                             streams=streams, threads=args.threads or default_threads(), gpu_layers=args.gpu_layers,
                             kv_type=args.kv_type, progress=False)
        seconds = time.perf_counter() - t0
        stop.set()
        watcher.join()
    if summary.done != rows:
        raise RuntimeError(f"the batch run made {summary.done} of {rows} rows: {summary.errors[:3]}")
    per_row = summary.audio_seconds / rows
    (t1, first), end = written[0], written[-1][0]
    steady = (rows - first) * per_row / (end - t1) if rows > first and end > t1 else float("nan")
    cost = 1 - steady / in_process if in_process else None
    return Batched(streams, rows, args.frames, seconds, t1 - t0, summary.audio_seconds / seconds, steady,
                   in_process, cost)


def teacher_forced(model, codes: np.ndarray, args) -> tuple[np.ndarray, np.ndarray]:
    """Codebook-0 logits (N, V) and depth-decoder logits (N, K-1, V) with the given codes fed back."""
    from csm_gguf.generator import Generator

    gen = Generator(model, 1, args.threads, args.gpu_layers, args.kv_type)
    cfg, n = model.config, model.n_codes
    v, k = cfg.audio_vocab_size, cfg.num_codebooks
    bb, dec = gen.backbone, gen.decoder
    c0 = np.empty((len(codes), n), np.float32)
    rest = np.empty((len(codes), k - 1, n), np.float32)
    try:
        st = gen.start(gen.prompt_embeddings(TEXT, 0), sampling(len(codes), args.seed))
        slot = np.array([st.slot], np.int32)
        pending, pos = st.pending.copy(), st.pos
        for f, frame in enumerate(codes):
            bb.embd[0], bb.pos[0], bb.output[0] = pending, pos, 1
            bb.set_seq_ids(slot)
            bb.decode(1)
            out = bb.logits(1)[0]
            c0[f] = out[:n]
            dec.clear()
            for i in range(1, k):
                # Step 1 feeds projection(h) and codebook 0 together; later steps one code each.
                rows = [out[gen._proj], model.decoder_inputs[frame[0]]] if i == 1 else [
                    model.decoder_inputs[(i - 1) * v + frame[i - 1]]]
                m = len(rows)
                dec.embd[:m] = rows
                dec.pos[:m] = np.arange(i + 1 - m, i + 1)
                dec.output[:m] = 1
                dec.set_seq_ids(np.repeat(slot, m))
                dec.decode(m)
                dec.copy_hidden_rows(m - 1, 1, gen.heads.x_address)
                rest[f, i - 1] = gen.heads.logits(i - 1, 1)[0, :n]
            pending, pos = gen.frame_embeddings(frame[None])[0], pos + 1
    finally:
        gen.close()
    return c0, rest


def agreement(ref: np.ndarray, q: np.ndarray) -> tuple[float, float]:
    """(top-1 agreement, mean KL(ref || q)) of softmax distributions over the last axis."""

    def log_softmax(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float64)
        x = x - x.max(axis=-1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))

    lr, lq = log_softmax(ref), log_softmax(q)
    kl = (np.exp(lr) * (lr - lq)).sum(axis=-1)
    return float((ref.argmax(-1) == q.argmax(-1)).mean()), float(kl.mean())


def served(model_dir: Path, counts: list[int], frames: int, args, frame_samples: int, can_end: bool) -> list[Served]:
    """The OpenAI server as a client sees it: `flask --app csm_gguf.web run` in its own process, then for
    each n, n streaming requests at once (HTTP, request threads and the engine all included). A request
    that fails, or (unless `can_end`: weights that may end speech early) brings fewer than `frames` x
    `frame_samples` samples, is an error, not a sample."""
    import socket
    import subprocess
    import tempfile
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "CSM_GGUF_MODEL": str(model_dir), "CSM_GGUF_MAX_STREAMS": str(max(counts)),
           "CSM_GGUF_THREADS": str(args.threads), "CSM_GGUF_GPU_LAYERS": str(args.gpu_layers),
           "CSM_GGUF_KV_TYPE": args.kv_type, "CSM_GGUF_CODEC_DEVICE": args.codec_device,
           "CSM_GGUF_VOICE": "none"}  # requests without a voice prompt, as run_once
    env.pop("CSM_GGUF_API_KEY", None)
    log = tempfile.TemporaryFile()
    server = subprocess.Popen([sys.executable, "-m", "flask", "--app", "csm_gguf.web", "run", "--port", str(port)],
                              env=env, stdout=log, stderr=log)

    def request(seed: int, n_frames: int) -> tuple[float | None, int]:
        """(seconds to the first audio or None, samples) of one streamed pcm request."""
        body = json.dumps({"model": "csm-1b", "input": TEXT, "response_format": "pcm", "seed": seed,
                           "max_audio_ms": n_frames * FRAME_MS}).encode()
        req = urllib.request.Request(f"{base}/v1/audio/speech", body, {"Content-Type": "application/json"})
        t0, first, size = time.perf_counter(), None, 0
        with urllib.request.urlopen(req, timeout=600) as response:
            while chunk := response.read1(1 << 16):
                first = first or time.perf_counter() - t0
                size += len(chunk)
        return first, size // 2  # pcm: 16-bit samples

    out = []
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                urllib.request.urlopen(f"{base}/health", timeout=5).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise RuntimeError(f"the server did not start:\n{log.read().decode()[-3000:]}") from None
                time.sleep(0.5)
        def at_once(n: int, n_frames: int) -> tuple[float, list[tuple[float | None, int] | str]]:
            """(seconds, each request's (first audio, samples), or what went wrong)"""
            results: list[tuple[float | None, int] | str] = ["not run"] * n

            def one(i: int) -> None:
                try:
                    results[i] = request(args.seed + i, n_frames)
                except Exception as e:  # noqa: BLE001 (an HTTP error, a reset, a timeout: reported, not a sample)
                    results[i] = f"{type(e).__name__}: {e}"

            threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(n)]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            return time.perf_counter() - t0, results

        for n in counts:  # warm-up: the codec traces its step of n streams once, at its second step (0.2 s)
            at_once(n, min(frames, 3))
        asked = frames * frame_samples
        for n in counts:
            runs = []  # (seconds, audio seconds) of each run
            good, errors, short = [], [], 0
            for run in range(args.runs):
                seconds, results = at_once(n, frames)
                good_here = []
                for i, r in enumerate(results):
                    what = f"{n} at once, run {run + 1}, request {i} (seed {args.seed + i})"
                    if isinstance(r, str):
                        errors.append(f"{what}: {r}")
                    elif r[0] is None or not r[1]:
                        errors.append(f"{what}: no audio")
                    elif r[1] < asked:
                        short += 1
                        if can_end:
                            good_here.append(r)
                        else:
                            errors.append(f"{what}: {r[1]} of the {asked} samples asked (these weights never end "
                                          "speech early: the stream was cut)")
                    else:
                        good_here.append(r)
                runs.append((seconds, sum(a for _, a in good_here) / SAMPLE_RATE))
                good += good_here
            xrts = Spread.of([audio / seconds for seconds, audio in runs])
            seconds, audio = runs[xrts.nearest_median()]
            out.append(Served(n, frames, seconds, xrts.median, Spread.of([f for f, _ in good]) if good else None,
                              errors, short, audio, xrts))
            for e in errors:
                print(f"[bench] server error: {e}", file=sys.stderr)
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
    return out


# --- start-up ------------------------------------------------------------------------------------------
STARTUP_TEXT = "Hello."


@dataclass
class Startup:
    """A fresh process, as a user starts one (page cache warm: each figure is the median of `runs`)."""

    runs: int
    say_first_audio_s: Spread  # `say STARTUP_TEXT -o - -f pcm`: process start to its first byte of audio
    say_total_s: Spread  # ... to its exit
    say_peak_rss_mib: Spread  # its peak resident memory (the kernel's count: mapped model files included)
    say_cpu_s: Spread  # its CPU time, user and system (less moved than wall time by other work on the machine)
    server_ready_s: Spread  # `flask --app csm_gguf.web run`: process start to /health answering


def say_command(model_dir: Path, args) -> list[str]:
    command = [sys.executable, "-m", "csm_gguf.say", STARTUP_TEXT, "-o", "-", "-f", "pcm", "--model", str(model_dir),
               "--seed", str(args.seed), "--max-audio-ms", "2000", "--voice", "none"]  # as run_once: no prompt
    if args.threads:
        command += ["--threads", str(args.threads)]
    return command


def say_startup(model_dir: Path, args, timeout: float = 600) -> tuple[float, float, float, float]:
    """(seconds to the first audio byte, seconds to exit, peak RSS in MiB, CPU seconds) of one `say` of a
    sentence. Its stderr is read as it comes (CSM_GGUF_VERBOSE's llama.cpp log fills a pipe and blocked say)."""
    import subprocess

    t0 = time.perf_counter()
    say = subprocess.Popen(say_command(model_dir, args), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stderr = bytearray()
    drain = threading.Thread(target=lambda: stderr.extend(say.stderr.read()), daemon=True)
    drain.start()
    timer = threading.Timer(timeout, say.kill)
    timer.start()
    status = None
    try:
        first_byte = say.stdout.read(1)
        first = time.perf_counter() - t0
        say.stdout.read()
        drain.join()
        _, status, usage = os.wait4(say.pid, 0)
        total = time.perf_counter() - t0
    finally:
        timer.cancel()
        if status is None:  # interrupted: not left running
            say.kill()
            say.wait()
    say.returncode = os.waitstatus_to_exitcode(status)
    if say.returncode or not first_byte:
        raise RuntimeError(f"say failed ({say.returncode}):\n{stderr.decode(errors='replace')[-3000:]}")
    return first, total, usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime  # ru_maxrss: KiB on Linux


def server_startup(model_dir: Path, args) -> float:
    """Seconds from starting the OpenAI server's process to its /health answering."""
    import socket
    import subprocess
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "CSM_GGUF_MODEL": str(model_dir), "CSM_GGUF_THREADS": str(args.threads),
           "CSM_GGUF_VOICE": "none"}  # no default voice's prompt made at start (see --voice-prompt for its cost)
    t0 = time.perf_counter()
    server = subprocess.Popen([sys.executable, "-m", "flask", "--app", "csm_gguf.web", "run", "--port", str(port)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while server.poll() is None and time.perf_counter() - t0 < 300:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).close()
                return time.perf_counter() - t0
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"the server did not start (exit status {server.poll()})")
    finally:
        server.terminate()
        server.wait(timeout=30)


def startup(model_dir: Path, args) -> Startup:
    """Start-up figures of `say` and the server, each process started `args.startup` times, one at a time."""
    says = [say_startup(model_dir, args) for _ in range(args.startup)]
    ready = [server_startup(model_dir, args) for _ in range(args.startup)]
    return Startup(args.startup, Spread.of([s[0] for s in says]), Spread.of([s[1] for s in says]),
                   Spread.of([s[2] for s in says]), Spread.of([s[3] for s in says]), Spread.of(ready))


def startup_table(figures: dict[str, Startup]) -> str:
    lines = [f"start-up (median of {next(iter(figures.values())).runs} fresh processes each):",
             "variant               say: first audio   say: peak RSS   say: CPU time   server: ready"]
    for name, f in figures.items():
        lines.append(f"{name:<20}  {f.say_first_audio_s.median:>14.2f} s  {f.say_peak_rss_mib.median:>9.0f} MiB  "
                     f"{f.say_cpu_s.median:>11.2f} s  {f.server_ready_s.median:>11.2f} s")
    return "\n".join(lines)


def bench_variant(name: str, model_dir: Path, weights: str, args, reference: dict | None):
    """The variant's figures, and its CSM (generator closed; model and codec kept for the peers)."""
    from csm_gguf.tts import CSM

    with PeakRSS() as rss:
        t0 = time.perf_counter()
        tts = CSM(model_dir, n_threads=args.threads, n_gpu_layers=args.gpu_layers, kv_type=args.kv_type,
                  codec_device=args.codec_device)
        tts.codec  # built lazily: load it now, outside the timed runs
        load_s = time.perf_counter() - t0
        for _ in range(args.warmup):
            run_once(tts, min(args.frames, 10), args.seed)
        gen = tts.generator
        prompt_len = len(gen.prompt_embeddings(TEXT, 0))
        floor(gen, min(args.frames, 3), prompt_len)  # warm-up
        # The headline runs, plain (no timers, no waits: on a GPU the host's work overlaps the backbone's step as in
        # any user's process), each followed by one of the floor and one for the stage split (every call timed,
        # every llama_decode waited for), so a busier moment of the machine falls on all three alike.
        runs, floors, split, prof = [], [], [], Profile()
        for i in range(max(args.runs, args.stage_runs)):
            if i < args.runs:
                runs.append(run_once(tts, args.frames, args.seed))
                floors.append(floor(gen, args.frames, prompt_len))
            if i < args.stage_runs:
                instrument(tts, prof)
                try:
                    split.append(run_once(tts, args.frames, args.seed))
                finally:
                    prof.restore()
        seconds, frames = sum(r[0] for r in split), sum(r[2] for r in split)
        st = stages(prof, seconds, frames, len(split))
        heads_device = "gpu" if gen.heads.on_gpu else "cpu"
        decoder_path = "llama" if gen.depth is None else "graph"
    tts.generator.close()
    floor_ms = [(b + d) * 1000 / args.frames for b, d in floors]
    fl = Floor(frame_ms=statistics.median(floor_ms),
               backbone_ms=statistics.median(b * 1000 / args.frames for b, _ in floors),
               decoder_step_ms=(statistics.median(d for _, d in floors) * 1000 / args.frames
                                / (gen.cfg.num_codebooks - 1)) if decoder_path == "llama" else None,
               rtf=statistics.median(floor_ms) / (1000 * tts.codec.cfg.frame_size / SAMPLE_RATE),
               path=decoder_path, what=FLOOR_WHAT[decoder_path],
               decoder_ms=statistics.median(d * 1000 / args.frames for _, d in floors),
               frame_ms_spread=Spread.of(floor_ms))
    rtf = [r[0] / (r[3] / SAMPLE_RATE) for r in runs]  # audio seconds: samples made / SAMPLE_RATE, everywhere
    v = Variant(
        name=name, model_dir=str(model_dir), qtype=tts.model.qtype, decoder_qtype=tts.model.decoder_qtype,
        weights=weights, load_s=load_s, frames=runs[0][2], audio_s=runs[0][3] / SAMPLE_RATE,
        rtf=Spread.of(rtf), xrt=Spread.of([1 / r for r in rtf]), ttfa_s=Spread.of([r[1] for r in runs]),
        fps=Spread.of([r[2] / r[0] for r in runs]), stages_ms=st, floor=fl,
        frame_over_floor=st.frame / fl.frame_ms, generation_over_floor=(st.frame - st.mimi) / fl.frame_ms,
        peak_rss_mib=rss.mib, rss_added_mib=rss.added_mib, heads_device=heads_device, decoder_path=decoder_path,
        stage_runs=len(split),
    )
    for s in args.concurrency:
        v.concurrency.append(concurrency(tts, s, args.frames, args.seed, args))
    if args.batch_rows:
        in_process = {c.streams: c.aggregate_xrt for c in v.concurrency}
        for s in args.concurrency or [4]:
            v.batched.append(batched(model_dir, s, args.batch_rows, args, in_process.get(s)))
    if args.server:
        v.served = served(model_dir, args.server, args.frames, args, tts.codec.cfg.frame_size,
                          can_end=weights != "random")
    if reference is not None:
        c0, rest = teacher_forced(tts.model, reference["codes"], args)
        top1_0, kl_0 = agreement(reference["c0"], c0)
        top1_d, kl_d = agreement(reference["rest"], rest)
        v.quality = Quality(len(c0), top1_0, kl_0, top1_d, kl_d)
    return v, tts


def quality_reference(ref_dir: Path, args) -> dict:
    """Codes the f32 model samples itself, and its logits along them."""
    from csm_gguf.generator import Generator
    from csm_gguf.model import CSMModel

    model = CSMModel(ref_dir)
    gen = Generator(model, 1, args.threads, args.gpu_layers, args.kv_type)
    try:
        codes = np.stack(list(gen.generate(TEXT, 0, (), sampling(args.quality_frames, args.seed))))
    finally:
        gen.close()
    c0, rest = teacher_forced(model, codes, args)
    return dict(codes=codes, c0=c0, rest=rest)


# --- peers --------------------------------------------------------------------------------------------


def transformers_csm(config, codec_config: dict, seed: int):
    """transformers' CsmForConditionalGeneration holding RandomCheckpoint(config, seed)'s weights."""
    import torch
    from transformers import CsmConfig, CsmForConditionalGeneration
    from transformers.initialization import no_init_weights

    from converter import tensor_map as tm
    from converter.random_weights import RandomCheckpoint, random_mimi

    def hf(t) -> dict:
        s = t.rope_scaling
        rope = {"rope_type": "default", "rope_theta": t.rope_theta} if s is None else {
            "rope_type": "llama3", "rope_theta": t.rope_theta, "factor": s.factor, "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor, "original_max_position_embeddings": s.original_context}
        return dict(hidden_size=t.n_embd, intermediate_size=t.n_ff, num_hidden_layers=t.n_layer,
                    num_attention_heads=t.n_head, num_key_value_heads=t.n_head_kv, head_dim=t.head_dim,
                    rms_norm_eps=t.norm_eps, max_position_embeddings=t.max_seq_len, rope_parameters=rope)

    c = config
    common = dict(num_codebooks=c.num_codebooks, vocab_size=c.audio_vocab_size)
    hf_config = CsmConfig(
        **hf(c.backbone), **common, text_vocab_size=c.text_vocab_size,
        depth_decoder_config={**hf(c.decoder), **common, "backbone_hidden_size": c.backbone.n_embd},
        codec_config={**codec_config, "model_type": "mimi"},
    )
    ckpt, T = RandomCheckpoint(c, seed), tm.TRANSFORMERS
    state = {names[T]: ckpt.tensor(ours) for ours, names in tm.CSM_TENSORS.items()}
    for model, t in (("backbone", c.backbone), ("decoder", c.decoder)):
        for layer in range(t.n_layer):
            for name in tm.BLOCK_TENSORS:
                w = ckpt.block_tensor(model, layer, name)
                if name in ("attn_q", "attn_k"):  # llama.cpp's interleaved RoPE pairs -> rotate_half halves
                    heads = t.n_head if name == "attn_q" else t.n_head_kv
                    w = w.reshape(heads, t.head_dim // 2, 2, -1).transpose(0, 2, 1, 3).reshape(w.shape)
                state[tm.block_source_name(model, layer, name, T)] = w
        state[tm.output_norm_source_name(model, T)] = ckpt.output_norm(model)
    with no_init_weights():
        csm = CsmForConditionalGeneration(hf_config)
    # assign: the model takes the arrays themselves, so full size holds one copy of the weights, not two.
    missing, unexpected = csm.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(w)) for k, w in state.items()},
                                              strict=False, assign=True)
    missing = [m for m in missing if not m.startswith("codec_model.")]
    if missing or unexpected:
        raise RuntimeError(f"transformers CSM weights do not line up: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")
    csm.codec_model = random_mimi(codec_config, seed)
    return csm.eval()


def ms_per_frame(fn: Callable[[], Any], frames: int, runs: int) -> tuple[float, Any]:
    """The median ms per frame of `runs` calls of fn (a decode of `frames` frames) after one to warm up
    (which also records a CUDA graph or traces a CPU step), and the last call's result."""
    fn().cpu()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        out = fn().cpu()  # .cpu(): on a GPU, wait until every queued step has run
        times.append((time.perf_counter() - t0) * 1000 / frames)
    return statistics.median(times), out


def mimi_figures(tts, frames: int, seed: int, peer: bool, runs: int) -> dict:
    """Mimi decode, ms per frame (median of `runs`): ours streaming (1 frame a step, and in chunks of 2 and
    5: fewer reads of the weights for a chunk's worth of latency) and batch, transformers' batch decode."""
    import torch

    from converter.mimi_keys import MOSHI_MIMI_CONFIG

    codec, n = tts.codec, tts.model.n_codes
    codes = torch.from_numpy(np.random.default_rng(seed).integers(0, n, (1, tts.model.config.num_codebooks, frames)))

    def per_frame(fn: Callable[[], Any]) -> float:
        return ms_per_frame(fn, frames, runs)[0]

    state = codec.decoder_state(1, cuda_graph=True)  # as tts.stream decodes (on CUDA: a replayed graph)

    def streaming() -> Any:
        codec.reset(state)  # on CUDA the warm-up run records the graph, the timed ones replay it
        return [codec.decode_step(codes[..., i : i + 1], state) for i in range(frames)][-1]

    def chunks_of(size: int) -> Callable[[], Any]:
        state = codec.decoder_state(1)
        return lambda: [codec.reset(state), *(codec.decode_step(c, state) for c in codes.split(size, dim=-1))][-1]

    out = dict(frames=frames, runs=runs, ours_stream_ms=per_frame(streaming),
               ours_batch_ms=per_frame(lambda: codec.decode(codes)),
               ours_stream_chunk_ms={str(size): per_frame(chunks_of(size)) for size in (2, 5)})
    if peer:
        from converter.random_weights import random_mimi

        hf = random_mimi(tts.model.codec_config or MOSHI_MIMI_CONFIG, WEIGHTS_SEED)
        with torch.inference_mode():
            out["transformers_batch_ms"] = per_frame(lambda: hf.decode(codes).audio_values)
        out["transformers_over_ours_stream"] = out["transformers_batch_ms"] / out["ours_stream_ms"]
    return out


MOSHI_INSTALL = "pip install --no-deps moshi==0.2.13 einops sentencepiece sphn"


def moshi_peer(frames: int, seed: int, runs: int) -> dict:
    """Kyutai's moshi Mimi, the reference streaming implementation, against ours on the same random
    weights: ms per frame (median of `runs`) decoding one frame per step and in one batch, and the
    largest difference between the two streams."""
    import torch
    from moshi.models import loaders

    from converter.mimi_keys import MOSHI_MIMI_CONFIG, mimi_tensors_to_transformers
    from csm_gguf.mimi import Mimi, MimiConfig

    torch.manual_seed(seed)
    theirs = loaders.get_mimi(None, device="cpu", num_codebooks=32).eval()
    with torch.no_grad():  # moshi starts with empty codebooks: give them random vectors
        for name, t in theirs.state_dict().items():
            if name.endswith("embedding_sum"):
                t.copy_(torch.randn_like(t))
            elif name.endswith("cluster_usage"):
                t.copy_(torch.rand_like(t) + 0.5)
    ours = Mimi.from_state_dict(MimiConfig.from_transformers(MOSHI_MIMI_CONFIG),
                                mimi_tensors_to_transformers(theirs.state_dict()))
    codes = torch.from_numpy(np.random.default_rng(seed).integers(0, 2048, (1, 32, frames)))

    def moshi_stream() -> torch.Tensor:
        with torch.no_grad(), theirs.streaming(1):
            return torch.cat([theirs.decode(codes[..., i : i + 1]) for i in range(frames)], dim=-1)

    def ours_stream() -> torch.Tensor:
        state = ours.decoder_state(1)
        return torch.cat([ours.decode_step(codes[..., i : i + 1], state) for i in range(frames)], dim=-1)

    def moshi_batch() -> torch.Tensor:
        with torch.no_grad():
            return theirs.decode(codes)

    out: dict[str, Any] = dict(frames=frames, runs=runs)
    audio = {}
    runs_of = [("moshi_stream_ms", moshi_stream), ("moshi_batch_ms", moshi_batch), ("ours_stream_ms", ours_stream)]
    for key, fn in runs_of:
        out[key], audio[key] = ms_per_frame(fn, frames, runs)
    out["stream_max_abs_diff"] = float((audio["moshi_stream_ms"] - audio["ours_stream_ms"]).abs().max())
    out["moshi_over_ours_stream"] = out["moshi_stream_ms"] / out["ours_stream_ms"]
    return out


def steady_frame_ms(first_s: float, gen_s: float, mimi_s: float, n: int) -> float:
    """A peer's frame in steady state, like for like with ours (the stage runs', which hold no prompt): `gen_s`
    generated n frames, `first_s` the prompt and one frame, so the n - 1 frames after the first took the
    difference; and Mimi's decode of all n, a frame's share. (It was the whole run over n, prompt included: 3-7%
    to our favour at 8 frames.)"""
    if n < 2:
        return (gen_s + mimi_s) * 1000 / n
    return ((gen_s - first_s) / (n - 1) + mimi_s / n) * 1000


def transformers_peer(model, frames: int, seed: int) -> dict:
    """End to end with transformers (fp32 on CPU, bf16 on a GPU): generate `frames` frames, decode them."""
    import torch
    import transformers

    from converter.mimi_keys import MOSHI_MIMI_CONFIG

    transformers.logging.set_verbosity_error()  # config warnings about CSM's token ids beyond the audio vocabulary
    csm = transformers_csm(model.config, model.codec_config or MOSHI_MIMI_CONFIG, WEIGHTS_SEED)
    device, dtype = ("cuda", torch.bfloat16) if torch.cuda.is_available() else ("cpu", torch.float32)
    csm = csm.to(device, dtype)
    tokens = torch.tensor(model.prompt_tokens(0, TEXT), device=device)
    torch.manual_seed(seed)

    def generate(n: int) -> tuple[float, float, int]:
        with torch.inference_mode():
            t0 = time.perf_counter()
            embeds = csm.embed_text_tokens(tokens)[None]
            codes = csm.generate(inputs_embeds=embeds, do_sample=True, temperature=0.9, top_k=50,
                                 depth_decoder_do_sample=True, depth_decoder_temperature=0.9, depth_decoder_top_k=50,
                                 max_new_tokens=n, min_new_tokens=n)
            t1 = time.perf_counter()
            audio = csm.codec_model.decode(codes[0].T[None]).audio_values
            return t1 - t0, time.perf_counter() - t1, codes.shape[1], audio.shape[-1]

    generate(2)  # warm-up
    first_s = generate(1)[0]  # its prompt and first frame: taken off, as our frame (the stage runs') has no prompt
    gen_s, mimi_s, n, samples = generate(frames)
    total = gen_s + mimi_s
    return dict(device=device, dtype=str(dtype).removeprefix("torch."), frames=n, seconds=total,
                frame_ms=steady_frame_ms(first_s, gen_s, mimi_s, n), frame_ms_with_prompt=total * 1000 / n,
                rtf=total / (samples / SAMPLE_RATE), audio_s=samples / SAMPLE_RATE, mimi_ms=mimi_s * 1000 / n)


# --- report -------------------------------------------------------------------------------------------


def machine(args) -> dict:
    import llama_cpp
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import psutil

    from csm_gguf.llama import default_threads

    return dict(
        cpu=cpu, logical_cores=os.cpu_count(), usable_cores=default_threads(),
        threads=args.threads or default_threads(),
        ram_gib=round(psutil.virtual_memory().total / 2**30, 1), platform=platform.platform(),
        python=platform.python_version(), llama_cpp_python=llama_cpp.__version__,
        llama_gpu_offload=bool(llama_cpp.llama_supports_gpu_offload()),
        llama_system_info=llama_cpp.llama_print_system_info().decode().strip(),
        torch=torch.__version__, gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        load_average_start=os.getloadavg(),
        # Thread settings that change the figures (numpy's BLAS threads fight llama.cpp's for the cores).
        thread_env={k: v for k, v in os.environ.items() if k.startswith(("OMP_", "GOMP_", "OPENBLAS_", "MKL_"))},
    )


def _num(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _with_spread(median: float, spread: dict | None) -> str:
    """A median, with its runs' range where there were several."""
    if spread is None or len(spread["values"]) < 2:
        return f"{median:.2f}"
    return f"{median:.2f} ({spread['min']:.2f}-{spread['max']:.2f})"


def table(report: dict) -> str:
    rows = ["| variant | RTF (median, min-max) | xRealTime | TTFA | frame | floor | frame / floor | backbone | "
            "depth decoder | heads+sampling | Mimi | rest | peak RSS (its own) |", "|" + "---|" * 13]
    for v in report["variants"]:
        s, r = v["stages_ms"], v["rtf"]
        rows.append(
            f"| {v['name']} | {r['median']:.2f} ({r['min']:.2f}-{r['max']:.2f}) | {v['xrt']['median']:.2f} | "
            f"{v['ttfa_s']['median'] * 1000:.0f} ms | {s['frame']:.0f} ms | {v['floor']['frame_ms']:.0f} ms | "
            f"{v['frame_over_floor']:.2f} | {s['backbone']:.1f} | {s['decoder']:.1f} | {s['heads_sampling']:.1f} | "
            f"{s['mimi']:.1f} | {s['rest']:.1f} | {v['peak_rss_mib']:.0f} MiB ({v['rss_added_mib']:.0f}) |")
    lines = ["\n".join(rows)]
    conc = [(v["name"], c) for v in report["variants"] for c in v["concurrency"]]
    if conc:
        lines.append("| variant | streams | frames made (of asked) | aggregate xRealTime (median, min-max) | "
                     "per-stream RTF | step outside llama_decode and the depth graph |\n"
                     "|---|---|---|---|---|---|\n" + "\n".join(
                         f"| {name} | {c['streams']} | {c['frames_made']} ({c['streams'] * c['frames']}) | "
                         f"{_with_spread(c['aggregate_xrt'], c['xrt_spread'])} | "
                         f"{_num(c['per_stream_rtf'])} | {c['host_ms']:.1f} ms |" for name, c in conc))
    batch_rows = [(v["name"], b) for v in report["variants"] for b in v["batched"]]
    if batch_rows:
        lines.append("| variant | batch: streams, rows | whole run | first rows | xRealTime (whole) | "
                     "xRealTime (steady) | in-process | Ray's cost |\n|---|---|---|---|---|---|---|---|\n" + "\n".join(
                         f"| {name} | {b['streams']}, {b['rows']} | {b['seconds']:.1f} s | {b['first_rows_s']:.1f} s | "
                         f"{b['aggregate_xrt']:.2f} | {b['steady_xrt']:.2f} | "
                         + (f"{b['in_process_xrt']:.2f} | {b['ray_cost']:.1%} |" if b["in_process_xrt"] else "- | - |")
                         for name, b in batch_rows))
    served_rows = [(v["name"], x) for v in report["variants"] for x in v["served"]]
    if served_rows:
        lines.append("| variant | server requests at once | aggregate xRealTime (median, min-max) | first audio "
                     "(median) | errors | short |\n|---|---|---|---|---|---|\n"
                     + "\n".join(f"| {name} | {x['streams']} | {_with_spread(x['aggregate_xrt'], x['xrt_spread'])} | "
                                 + (f"{x['first_audio_s']['median'] * 1000:.0f} ms" if x["first_audio_s"] else "-")
                                 + f" | {len(x['errors'])} | {x['short']} |" for name, x in served_rows))
    qual = [v for v in report["variants"] if v["quality"]]
    if qual:
        lines.append("| variant | codebook-0 top-1 | codebook-0 KL | decoder top-1 | decoder KL |\n"
                     "|---|---|---|---|---|\n"
                     + "\n".join(f"| {v['name']} | {q['codebook0_top1']:.3f} | {q['codebook0_kl']:.4f} | "
                                 f"{q['decoder_top1']:.3f} | {q['decoder_kl']:.4f} |"
                                 for v in qual for q in [v["quality"]]))
    peers = report["peers"]
    if "transformers" in peers:
        t = peers["transformers"]
        lines.append(f"transformers CsmForConditionalGeneration ({t['device']}, {t['dtype']}): RTF {t['rtf']:.2f} "
                     f"over {t['frames']} frames, prompt included; {t['frame_ms']:.0f} ms a frame past its first; "
                     "ours / theirs per frame: "
                     + ", ".join(f"{v['name']} {x:.1f}x" for v, x in zip(report["variants"], t["speedup"])))
    m = peers.get("mimi")
    if m:
        chunked = ", ".join(f"{ms:.1f} in chunks of {size}" for size, ms in m["ours_stream_chunk_ms"].items())
        lines.append(f"Mimi decode ms/frame (median of {m['runs']} runs): ours streaming {m['ours_stream_ms']:.1f} "
                     f"(a frame at a time; {chunked}), ours batch {m['ours_batch_ms']:.1f}"
                     + (f", transformers batch {m['transformers_batch_ms']:.1f}"
                        if "transformers_batch_ms" in m else ""))
    if "moshi" in peers:
        k = peers["moshi"]
        lines.append(f"moshi's Mimi (the reference streaming decoder), same weights, ms/frame: streaming "
                     f"{k['moshi_stream_ms']:.1f}, batch {k['moshi_batch_ms']:.1f}; ours streaming "
                     f"{k['ours_stream_ms']:.1f} ({k['moshi_over_ours_stream']:.1f}x faster), streams differ by at "
                     f"most {k['stream_max_abs_diff']:.1e}")
    return "\n\n".join(lines)


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = report["variants"]
    names = [v["name"] for v in variants]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    bars = [(n, v["rtf"]["median"]) for n, v in zip(names, variants)]
    bars += [(f"{n} floor", v["floor"]["rtf"]) for n, v in zip(names, variants)]
    if "transformers" in report["peers"]:
        t = report["peers"]["transformers"]
        bars.append((f"transformers {t['dtype']}", t["rtf"]))
    ax1.bar([b[0] for b in bars], [b[1] for b in bars], color=["C0"] * len(names) + ["C7"] * len(names) + ["C3"])
    ax1.axhline(1.0, color="k", lw=0.8, ls="--")
    ax1.set_yscale("log")
    ax1.set_ylabel("real-time factor (log; < 1: faster than real time)")
    ax1.tick_params(axis="x", rotation=30)
    for i, (_, y) in enumerate(bars):
        ax1.annotate(f"{y:.2f}", (i, y), ha="center", va="bottom", fontsize=8)
    keys = ["backbone", "decoder", "heads_sampling", "mimi", "rest"]
    bottom = np.zeros(len(variants))
    for key in keys:
        vals = np.array([max(v["stages_ms"][key], 0.0) for v in variants])
        ax2.bar(names, vals, bottom=bottom, label=key.replace("_", " + "))
        bottom += vals
    ax2.set_ylabel("ms per 80 ms frame")
    ax2.legend()
    fig.suptitle(f"csm-gguf on {report['machine']['cpu']} ({report['machine']['threads']} threads)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# --- main ---------------------------------------------------------------------------------------------


def variants(args) -> list[tuple[str, Path, str]]:
    """(name, model dir, weights) for each variant: the given directories, else random-weight conversions."""
    if args.model:
        return [(Path(m).name, Path(m), "given") for m in args.model]
    from converter.random_weights import convert_random

    out = []
    for q in args.qtype:
        for d in args.decoder_qtype or [q]:
            name = q if d == q else f"{q}/decoder {d}"
            print(f"[bench] random-weight model {name} (converted once, then cached)", file=sys.stderr)
            out.append((name, convert_random(None, q, d), "random"))
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    def csv(kind: Callable[[str], Any]):
        def parse(s: str) -> list:
            return [kind(x) for x in s.split(",") if x]

        parse.__name__ = f"comma-separated {kind.__name__}"  # argparse's "invalid ... value" names it
        return parse

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", help="model directory to benchmark (repeatable); default: "
                   "full-size CSM-1B with random weights, converted once per --qtype")
    p.add_argument("--qtype", type=csv(str), help="random-weight variants, comma-separated "
                   "(f32, f16, bf16, q8_0, q4_k; default: q4_k); not with --model, whose files say theirs")
    p.add_argument("--decoder-qtype", type=csv(str), help="depth-decoder qtypes to sweep with each --qtype")
    p.add_argument("--frames", type=int, default=50, help="frames (80 ms each) per run (default: %(default)s)")
    p.add_argument("--runs", type=int, default=3,
                   help="timed runs per variant, of each --concurrency and --server count, and of each Mimi "
                   "figure (default: %(default)s)")
    p.add_argument("--stage-runs", type=int, help="runs of their own for the per-frame stage split (every call "
                   "timed, every llama_decode waited for), interleaved with the headline runs, which are timed plain "
                   "(default: --runs)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up runs (up to 10 frames) first (default: %(default)s)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: all usable cores)")
    p.add_argument("--gpu-layers", type=int, default=0, help="layers offloaded to a GPU build of llama.cpp")
    p.add_argument("--codec-device", default="cpu", help="torch device of our Mimi codec: cpu (default), cuda")
    p.add_argument("--kv-type", default="f16", choices=("f32", "f16", "q8_0"))
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--concurrency", type=csv(int), default=[], help="stream counts to batch, e.g. 1,2,4,8")
    p.add_argument("--batch-rows", type=int, default=0, help="also run N rows through the corpus path (python -m "
                   "csm_gguf.batch: Ray, one worker) with each --concurrency as its --streams (default 4), beside the "
                   "in-process figure: needs the batch extra")
    p.add_argument("--server", type=csv(int), default=[], help="streaming requests to send at once to the "
                   "OpenAI server, started in its own process, e.g. 1,4")
    p.add_argument("--quality", action="store_true", help="top-1 agreement and KL of each variant vs the f32 model "
                   "on teacher-forced frames (random weights: the f32 random model is converted too)")
    p.add_argument("--reference", help="the f32 model directory for --quality with --model")
    p.add_argument("--quality-frames", type=int, default=20)
    p.add_argument("--compare", action="append", default=[], choices=("transformers", "moshi"),
                   help="peers (repeatable): transformers' CSM and Mimi on the same random weights; moshi's Mimi "
                   f"streaming decoder ({MOSHI_INSTALL})")
    p.add_argument("--peer-frames", type=int, default=8,
                   help="frames for the (slow) transformers run (default: %(default)s)")
    p.add_argument("--voice-prompt", type=float, metavar="SECONDS", help="also time the first audio of a request "
                   "in a voice with a prompt this long, cached and not, against one without a voice (first variant)")
    p.add_argument("--startup", type=int, default=0, metavar="N", help=f"start-up figures from N fresh processes "
                   f"each: `say {STARTUP_TEXT!r} -o - -f pcm` to its first audio and its peak memory, the server to "
                   "ready (default: 0, none)")
    p.add_argument("--startup-only", action="store_true", help="only the start-up figures (--startup, default 3)")
    p.add_argument("--json", help="write every figure here")
    p.add_argument("--plot", help="draw RTF per variant and the stage breakdown into this PNG (needs matplotlib)")
    args = p.parse_args(argv)
    from converter.gguf_files import QTYPES
    from csm_gguf.generator import check_options
    from csm_gguf.model_dir import check_model_dir
    from csm_gguf.sampling import Sampling
    from csm_gguf.tts import check_torch_device

    if args.model and (args.qtype or args.decoder_qtype):  # else ignored, and recorded as if used
        p.error("--qtype and --decoder-qtype choose random-weight models: a --model's files have their own qtypes")
    args.qtype = args.qtype or ["q4_k"]
    for option, values in (("--qtype", args.qtype), ("--decoder-qtype", args.decoder_qtype or [])):
        for q in values:
            if q not in QTYPES:
                p.error(f"{option}: unknown qtype {q!r}; choose from {', '.join(QTYPES)}")
    for option, value, least in (("--frames", args.frames, 1), ("--runs", args.runs, 1),
                                 ("--stage-runs", 1 if args.stage_runs is None else args.stage_runs, 1),
                                 ("--warmup", args.warmup, 0),
                                 ("--threads", args.threads, 0), ("--quality-frames", args.quality_frames, 1),
                                 ("--peer-frames", args.peer_frames, 1), ("--batch-rows", args.batch_rows, 0),
                                 *(("--concurrency", n, 1) for n in args.concurrency),
                                 *(("--server", n, 1) for n in args.server)):
        if value < least:
            p.error(f"{option} must be >= {least}, got {value}")
    for path in [*(args.model or []), *([args.reference] if args.reference else [])]:
        try:
            check_model_dir(path)
        except FileNotFoundError as e:
            p.error(str(e))
    for option, path in (("--json", args.json), ("--plot", args.plot)):
        if not path:
            continue
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            p.error(f"{option} {path}: its folder does not exist (checked now, not after the benchmark)")
        if os.path.isdir(path):
            p.error(f"{option} {path}: is a directory (checked now, not after the benchmark)")
        if not os.access(folder, os.W_OK | os.X_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
            p.error(f"{option} {path}: not writable (checked now, not after the benchmark)")
    try:  # with the runtime's own checks, before anything loads (they were tracebacks mid-run)
        check_options(args.threads, args.gpu_layers, 1, {"n_threads": "--threads", "n_gpu_layers": "--gpu-layers"})
    except ValueError as e:
        p.error(str(e))
    try:
        Sampling(seed=args.seed)
    except ValueError as e:
        p.error(f"--{e}")  # "seed must be ..."
    try:
        check_torch_device(args.codec_device)
    except ValueError as e:
        p.error(str(e).replace("codec device", "--codec-device", 1))  # "codec device 'cuda' is not usable..."
    if args.voice_prompt is not None and not args.voice_prompt >= 0:
        p.error(f"--voice-prompt must be >= 0 seconds, got {args.voice_prompt}")
    if args.stage_runs is None:
        args.stage_runs = args.runs
    if args.startup_only:
        args.startup = args.startup or 3
        unrun = [option for option, given in (
            ("--quality", args.quality), ("--compare", args.compare), ("--concurrency", args.concurrency),
            ("--server", args.server), ("--batch-rows", args.batch_rows), ("--voice-prompt", args.voice_prompt),
            ("--plot", args.plot)) if given not in (None, False, 0, [])]
        if unrun:  # else some were run anyway (--quality built its f32 model) and the rest silently not
            p.error(f"--startup-only measures start-up alone: {', '.join(unrun)} would not run; drop "
                    f"{'it' if len(unrun) == 1 else 'them'}, or --startup-only")
    if args.startup < 0:
        p.error(f"--startup must be >= 0, got {args.startup}")
    if args.quality and args.model and not args.reference:
        p.error("--quality with --model needs --reference F32_MODEL_DIR")
    if "moshi" in args.compare and importlib.util.find_spec("moshi") is None:
        p.error(f"--compare moshi needs moshi: {MOSHI_INSTALL} (moshi pins an older torch; --no-deps keeps this one)")
    return args


def write_report(report: dict, path: str) -> None:
    """The JSON, whole or not at all (written beside it, then renamed over it)."""
    from csm_gguf.atomic import write_atomic

    write_atomic(path, json.dumps(finite(report), indent=2, allow_nan=False).encode())


def finite(x: Any) -> Any:
    """NaN and infinities as None (JSON's null: a bare NaN is not JSON, and jq and JavaScript reject it)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite(v) for v in x]
    return x


def provenance() -> dict:
    """When, and which code: csm-gguf's version, the git commit of this checkout and whether it had changes
    (None where git or the checkout is not there), and the CSM_GGUF_* settings that change the figures."""
    import datetime
    import subprocess

    from csm_gguf import __version__

    def git(*a: str) -> str | None:
        try:
            done = subprocess.run(["git", *a], cwd=Path(__file__).resolve().parent, capture_output=True, text=True,
                                  timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no")
    return dict(timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                csm_gguf_version=__version__, git_commit=git("rev-parse", "HEAD"),
                git_dirty=None if status is None else bool(status),
                env={k: v for k, v in sorted(os.environ.items()) if k.startswith("CSM_GGUF_")})


def _terminated(signum, frame) -> None:
    """SIGTERM (timeout, CI, kill) unwinds like Ctrl-C: the server's process is ended by its `finally`."""
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _terminated) if threading.current_thread() is threading.main_thread() \
        else None
    try:
        return _main(args, argv)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main(args: argparse.Namespace, argv: list[str] | None) -> int:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    command = shlex.join(["python", "bench.py", *(argv if argv is not None else sys.argv[1:])])
    report: dict[str, Any] = dict(command=command, **provenance(),
                                  machine=machine(args), text=TEXT, settings={}, variants=[], peers={})
    report["settings"] = {k: v for k, v in vars(args).items() if k not in ("json", "plot")}
    busy, m = os.getloadavg()[0], report["machine"]
    if busy + m["threads"] > m["usable_cores"] + 0.5:
        # llama.cpp's workers meet at a barrier after every op: when another process holds a core, each
        # barrier waits out a scheduler slice and a frame can take 50x longer. Such figures are noise.
        print(f"[bench] warning: load average {busy:.1f} with {m['threads']} threads on {m['usable_cores']} cores: "
              f"timings will be inflated; measure on an idle machine or with fewer --threads", file=sys.stderr)
    todo = variants(args)
    if args.startup:  # first, each process alone on the machine
        figures = {name: startup(model_dir, args) for name, model_dir, _ in todo}
        report["startup"] = {name: asdict(f) for name, f in figures.items()}
        print(startup_table(figures))
        if args.json:
            write_report(report, args.json)
        if args.startup_only:
            todo = []
    reference = None
    if args.quality:
        from converter.random_weights import convert_random

        ref_dir = Path(args.reference) if args.reference else convert_random(None, "f32")
        print(f"[bench] quality reference: {ref_dir}", file=sys.stderr)
        reference = quality_reference(ref_dir, args)
    for i, (name, model_dir, weights) in enumerate(todo):
        print(f"[bench] {name}: {model_dir}", file=sys.stderr)
        v, tts = bench_variant(name, model_dir, weights, args, reference)
        report["variants"].append(asdict(v))
        if args.json:  # after each variant: an interrupted sweep keeps what it measured
            write_report(report, args.json)
        print(f"[bench] {name}: RTF {v.rtf.median:.2f}, frame {v.stages_ms.frame:.0f} ms, "
              f"floor ({v.floor.path} path's compute alone) {v.floor.frame_ms:.0f} ms, "
              f"depth decoder: {v.decoder_path}, "
              f"heads on the {v.heads_device}", file=sys.stderr)
        if i == 0:  # the peers against the first variant's model and codec, then freed before the next
            peer = "transformers" in args.compare
            report["peers"]["mimi"] = mimi_figures(tts, args.frames, args.seed, peer, args.runs)
            if args.voice_prompt is not None:
                report["voice_prompt"] = v = voice_prompt_ttfa(tts, args.voice_prompt, args)
                print(f"[bench] first audio: no voice {v['no_voice']:.3f} s; {args.voice_prompt:g} s voice "
                      f"({v['prompt_positions']} positions) cached {v['voice_cached']:.3f} s "
                      f"({v['cached_over_no_voice']:.2f}x), uncached {v['voice_uncached']:.3f} s "
                      f"({v['uncached_over_no_voice']:.2f}x)", file=sys.stderr)
            if "moshi" in args.compare:
                report["peers"]["moshi"] = moshi_peer(args.frames, args.seed, args.runs)
            if "transformers" in args.compare:
                t = transformers_peer(tts.model, args.peer_frames, args.seed)
                t["weights"] = "the same random weights" if weights == "random" else "random, same shapes"
                report["peers"]["transformers"] = t
        del tts
    if "transformers" in report["peers"]:
        t = report["peers"]["transformers"]
        t["speedup"] = [t["frame_ms"] / v["stages_ms"]["frame"] for v in report["variants"]]
    report["machine"]["load_average_end"] = os.getloadavg()
    if report["variants"]:
        print(table(report))
    if args.json:
        write_report(report, args.json)
    if args.plot:
        plot(report, args.plot)
    errors = [e for v in report["variants"] for x in v["served"] for e in x["errors"]]
    if errors:
        print(f"[bench] {len(errors)} server requests failed (not counted in the figures):\n  "
              + "\n  ".join(errors), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
