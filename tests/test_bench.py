"""bench.py end to end on the tiny model: every figure of the JSON is produced (timings never asserted)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_bench_writes_every_figure(converted, f32_model, tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "bench.py", "--model", str(converted("q4_k")), "--model", str(f32_model),
           "--reference", str(f32_model), "--quality", "--quality-frames", "3", "--frames", "4", "--runs", "2",
           "--concurrency", "1,2", "--server", "1,2", "--compare", "transformers", "--peer-frames", "2",
           "--json", str(out),
           # One thread: llama.cpp's spinning workers crawl when other tests hold the cores.
           "--threads", "1"]
    if importlib.util.find_spec("matplotlib"):
        cmd += ["--plot", str(tmp_path / "bench.png")]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert "| variant |" in done.stdout

    assert report["timestamp"] and report["csm_gguf_version"] and "CSM_GGUF_CACHE" in report["env"]
    assert report["git_commit"] is None or len(report["git_commit"]) == 40
    m = report["machine"]
    assert m["cpu"] and m["threads"] == 1 and m["llama_system_info"]
    assert [v["qtype"] for v in report["variants"]] == ["q4_k", "f32"]
    for v in report["variants"]:
        assert v["frames"] == 4
        for key in ("rtf", "xrt", "ttfa_s", "fps"):
            assert len(v[key]["values"]) == 2 and v[key]["min"] <= v[key]["median"] <= v[key]["max"]
        assert set(v["stages_ms"]) == {"frame", "backbone", "decoder", "heads_sampling", "mimi", "rest", "prompt"}
        # The default depth decoder draws in its own graph: no heads stage beside it.
        assert v["decoder_path"] == "graph" and v["stages_ms"]["heads_sampling"] == 0
        assert all(x > 0 for k, x in v["stages_ms"].items() if k not in ("rest", "heads_sampling"))
        assert v["floor"]["frame_ms"] > 0 and v["frame_over_floor"] > 0 and v["peak_rss_mib"] > 0
        assert 0 < v["rss_added_mib"] <= v["peak_rss_mib"]
        assert v["floor"]["path"] == "graph" and len(v["floor"]["frame_ms_spread"]["values"]) == 2
        assert v["heads_device"] == "cpu"
        assert [c["streams"] for c in v["concurrency"]] == [1, 2]
        assert all(len(c["xrt_spread"]["values"]) == 2 for c in v["concurrency"])  # --runs 2
        assert all(len(x["xrt_spread"]["values"]) == 2 for x in v["served"])
        assert all(c["aggregate_xrt"] > 0 and 0 < c["host_ms"] < 1000 * c["seconds"] / c["steps"]
                   and c["frames_made"] == c["streams"] * c["frames"] == c["streams"] * c["steps"]
                   for c in v["concurrency"])
        assert [x["streams"] for x in v["served"]] == [1, 2]  # through HTTP, from a server process
        assert all(x["aggregate_xrt"] > 0 and x["errors"] == [] and x["short"] == 0 for x in v["served"])
        assert all(0 < t < x["seconds"] for x in v["served"] for t in x["first_audio_s"]["values"])
        q = v["quality"]
        assert q["frames"] == 3 and 0 <= q["codebook0_top1"] <= 1 and 0 <= q["decoder_top1"] <= 1
    # The f32 model against itself: identical distributions.
    f32 = report["variants"][1]["quality"]
    assert f32["codebook0_top1"] == f32["decoder_top1"] == 1.0
    assert f32["codebook0_kl"] == pytest.approx(0, abs=1e-6) and f32["decoder_kl"] == pytest.approx(0, abs=1e-6)

    mimi = report["peers"]["mimi"]
    assert mimi["ours_stream_ms"] > 0 and mimi["transformers_batch_ms"] > 0
    assert set(mimi["ours_stream_chunk_ms"]) == {"2", "5"} and min(mimi["ours_stream_chunk_ms"].values()) > 0
    t = report["peers"]["transformers"]
    assert t["frames"] == 2 and t["rtf"] > 0 and len(t["speedup"]) == 2
    assert t["rtf"] == pytest.approx(t["seconds"] / t["audio_s"]) and t["audio_s"] == pytest.approx(2 * 64 / 24000)
    if "--plot" in cmd:
        assert (tmp_path / "bench.png").stat().st_size > 0


def test_a_variants_own_memory_leaves_out_what_the_process_held_before():
    """Each variant's peak RSS held the earlier variants' leftovers (the same model measured 1476, then 1977 MiB)."""
    bench = _bench()
    # 64 MiB each: above glibc's largest mmap threshold (32 MiB), so each is memory of its own, not reused pages.
    before = np.ones(64 * 2**20 // 8)  # held before the block
    with bench.PeakRSS() as rss:
        inside = np.ones(64 * 2**20 // 8)  # the block's own, still held at its end (sampled there)
    assert rss.mib > 128 and 56 < rss.added_mib < 80
    del before, inside


def test_the_transformers_peers_frame_leaves_out_its_prompt_as_ours_does():
    """Ours is a frame of the stage runs, no prompt; theirs was the whole run (prompt included) over its frames."""
    bench = _bench()
    # 8 frames in 2.6 s, of which the prompt and the first frame took 2.0 s: 0.6 s for the 7 after; Mimi 0.08 s.
    assert bench.steady_frame_ms(2.0, 2.6, 0.08, 8) == pytest.approx(600 / 7 + 10)
    assert bench.steady_frame_ms(2.0, 2.0, 0.01, 1) == pytest.approx(2010)


def test_random_weights_are_deterministic_and_shaped():
    from converter.random_weights import RandomCheckpoint
    from csm_gguf.config import CSM_1B

    a, b = RandomCheckpoint(), RandomCheckpoint()
    w = a.block_tensor("decoder", 1, "attn_k")
    assert w.shape == (CSM_1B.decoder.n_head_kv * CSM_1B.decoder.head_dim, CSM_1B.decoder.n_embd)
    np.testing.assert_array_equal(w, b.block_tensor("decoder", 1, "attn_k"))
    assert not np.array_equal(w, a.block_tensor("decoder", 2, "attn_k"))
    assert abs(float(w.std()) - 0.02) < 1e-3
    assert a.tensor("audio_head").shape == (31, 1024, 2051)
    np.testing.assert_array_equal(a.tensor("audio_embeddings")[:3], a.tensor("decoder_audio_embeddings")[:3])


def test_compare_moshi_without_moshi_says_how_to_install(monkeypatch, capsys):
    sys.path.insert(0, str(ROOT))
    import bench

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "moshi" else real(name, *a))
    with pytest.raises(SystemExit) as e:
        bench.parse_args(["--compare", "moshi"])
    assert e.value.code == 2 and "pip install --no-deps moshi" in capsys.readouterr().err


def test_moshi_streaming_mimi_equals_ours():
    """Only where moshi is installed (it pins an older torch, so the test extra cannot carry it):
    `PYTHONPATH=<pip install --no-deps --target DIR moshi==0.2.13 einops sentencepiece sphn> pytest ...`."""
    pytest.importorskip("moshi")
    sys.path.insert(0, str(ROOT))
    import bench

    figures = bench.moshi_peer(frames=20, seed=0, runs=1)
    assert figures["stream_max_abs_diff"] < 1e-5


@pytest.mark.parametrize("args, message", [
    (["--qtype", "q9"], "unknown qtype 'q9'"),
    (["--model", "{tmp}", "--qtype", "q8_0"], "--qtype and --decoder-qtype choose random-weight models"),
    (["--frames", "0"], "--frames must be >= 1"),
    (["--runs", "0"], "--runs must be >= 1"),
    (["--stage-runs", "0"], "--stage-runs must be >= 1"),
    (["--voice-prompt", "-3"], "--voice-prompt must be >= 0"),
    (["--concurrency", "1,0"], "--concurrency must be >= 1"),
    (["--concurrency", "a"], "invalid comma-separated int value: 'a'"),
    (["--threads", "-1"], "--threads must be >= 0"),
    (["--threads", "100000"], "the cores this process may use, got 100000"),
    (["--gpu-layers", "-3"], "--gpu-layers must be a whole number from -1 (all layers)"),
    (["--seed", "-1"], "--seed must be a whole number >= 0"),
    (["--codec-device", "foo"], "--codec-device 'foo' is not usable with this torch"),
    (["--startup-only", "--quality"], "--startup-only measures start-up alone: --quality would not run"),
    (["--model", "{tmp}"], "is not a csm-gguf model directory"),
    (["--json", "{tmp}/nowhere/bench.json"], "its folder does not exist"),
])
def test_bad_arguments_fail_before_any_work(tmp_path, args, message):
    cmd = [sys.executable, "bench.py", *(a.replace("{tmp}", str(tmp_path)) for a in args)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=Path(__file__).parent.parent)
    assert done.returncode == 2 and message in done.stderr, done.stderr[-2000:]


def test_batch_rows_runs_the_corpus_path_beside_the_in_process_engine(f32_model, tmp_path):
    pytest.importorskip("ray")
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "bench.py", "--model", str(f32_model), "--frames", "3", "--runs", "1", "--warmup", "0",
           "--concurrency", "2", "--batch-rows", "8", "--threads", "1", "--json", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (b,) = json.loads(out.read_text())["variants"][0]["batched"]
    assert (b["streams"], b["rows"], b["frames"]) == (2, 8, 3)
    assert 0 < b["first_rows_s"] <= b["seconds"] and b["aggregate_xrt"] > 0 and b["in_process_xrt"] > 0
    # The steady rate needs rows written after the first ones; a run this small may write them all at once
    # (then it is NaN, null in the JSON, and so is Ray's cost). When there is one, the cost is measured against it.
    if b["steady_xrt"] is not None:
        assert b["steady_xrt"] > 0
        assert b["ray_cost"] == pytest.approx(1 - b["steady_xrt"] / b["in_process_xrt"])
    assert "Ray's cost" in done.stdout
    assert "Token authentication is enabled" not in done.stderr  # Ray's warning at every run of a local Ray


def _bench():
    sys.path.insert(0, str(ROOT))
    import bench

    return bench


def test_concurrency_stops_streams_that_end_and_counts_what_they_made(tts, f32_model, monkeypatch):
    """A stream that ends (here: stream 0's third frame is the end-of-speech frame) is stepped no more (stepping
    it crashed llama.cpp), and only the frames and samples actually made count."""
    from csm_gguf.generator import Generator

    bench = _bench()
    real = Generator._draw_frame

    def draw(self, streams):
        codes = real(self, streams)
        for j, st in enumerate(streams):
            st.drawn = st.__dict__.get("drawn", 0) + 1
            if st.sampling.seed == 1234 and st.drawn == 3:  # stream 0 (seed + 0)
                codes[j] = 0
        return codes

    monkeypatch.setattr(Generator, "_draw_frame", draw)
    real_step, waited = Generator.step, []

    def step(self, streams):  # whether this step's decodes are waited for (bench's timers patch the instance)
        waited.append("decode" in vars(self.backbone))
        return real_step(self, streams)

    monkeypatch.setattr(Generator, "step", step)
    monkeypatch.setattr(bench, "HOST_FRAMES", 4)
    args = bench.parse_args(["--model", str(f32_model), "--threads", "1", "--runs", "2"])
    c = bench.concurrency(tts, 2, 8, 1234, args)
    # The warm-up's 3 steps and the timed runs' 8 each, plain (on a GPU a wait after every decode undoes the
    # overlap the server has); then HOST_FRAMES steps with the waits, for host_ms.
    assert waited == [False] * (3 + 2 * 8) + [True] * 4 and c.host_ms > 0
    assert len(c.xrt_spread.values) == 2 and c.aggregate_xrt == pytest.approx(c.xrt_spread.median)
    frame_size = tts.codec.cfg.frame_size
    assert (c.streams, c.frames, c.steps, c.frames_made) == (2, 8, 8, 2 + 8)
    assert c.audio_s == pytest.approx(c.frames_made * frame_size / bench.SAMPLE_RATE)
    assert any(x == pytest.approx(c.audio_s / c.seconds) for x in c.xrt_spread.values)  # the median run


def test_server_requests_that_fail_or_are_cut_are_errors_not_samples(f32_model, monkeypatch):
    """Of 3 requests at once, one fails (HTTP 503) and one is cut after its first chunk: both are errors, and the
    figures are the third's alone (they were counted as 0.0 s first audio and 0 s of audio)."""
    import urllib.error
    import urllib.request

    bench = _bench()
    real = urllib.request.urlopen

    class Cut:
        def __init__(self, response):
            self.response, self.reads = response, 0

        def read1(self, n):
            self.reads += 1
            return self.response.read1(min(n, 64)) if self.reads == 1 else b""

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.response.close()

    def urlopen(req, *a, **k):
        body = getattr(req, "data", None) or b""
        if b'"seed": 1235' in body:
            raise urllib.error.HTTPError(req.full_url, 503, "stand-in for a failed request", {}, None)
        response = real(req, *a, **k)
        return Cut(response) if b'"seed": 1236' in body else response

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    args = bench.parse_args(["--model", str(f32_model), "--threads", "1", "--runs", "2"])
    frame_size = 64  # the tiny codec's
    (x,) = bench.served(f32_model, [3], 3, args, frame_size, can_end=False)
    assert len(x.errors) == 4 and x.short == 2  # each run's
    assert "run 1" in x.errors[0] and "503" in x.errors[0] and "cut" in x.errors[1] and "run 2" in x.errors[2]
    assert len(x.first_audio_s.values) == 2 and min(x.first_audio_s.values) > 0
    assert x.audio_s == pytest.approx(3 * frame_size / bench.SAMPLE_RATE)  # the median run's
    assert len(x.xrt_spread.values) == 2 and x.aggregate_xrt == pytest.approx(x.xrt_spread.median)


def test_a_server_error_fails_the_run(f32_model, tmp_path, monkeypatch):
    bench = _bench()

    def served(model_dir, counts, frames, args, frame_samples, can_end):
        return [bench.Served(1, frames, 1.0, 0.5, None, ["1 at once, request 0 (seed 1234): HTTPError 503"])]

    monkeypatch.setattr(bench, "served", served)
    out = tmp_path / "bench.json"
    code = bench.main(["--model", str(f32_model), "--threads", "1", "--frames", "2", "--runs", "1", "--warmup", "0",
                       "--server", "1", "--json", str(out)])
    assert code == 1
    (x,) = json.loads(out.read_text())["variants"][0]["served"]
    assert x["errors"] and x["first_audio_s"] is None


@pytest.mark.parametrize("decoder", ["graph", "llama"])
def test_headline_runs_are_plain_and_the_floor_times_the_path_in_use(f32_model, monkeypatch, decoder):
    """The headline runs (RTF, TTFA, fps) run without the stage split's timers and waits (on a GPU a wait after
    every llama_decode takes away the overlap generation relies on), the split has runs of its own, and the floor
    times the decoder path the runs take: with the one-graph decoder its frame, not llama.cpp's 31 steps."""
    monkeypatch.setenv("CSM_GGUF_DECODER", decoder)
    bench = _bench()
    real_run, seen = bench.run_once, []

    def run_once(tts, frames, seed):
        gen = tts.generator
        seen.append((frames, "decode" in vars(gen.backbone), gen._decoder is not None))
        return real_run(tts, frames, seed)

    monkeypatch.setattr(bench, "run_once", run_once)
    args = bench.parse_args(["--model", str(f32_model), "--threads", "1", "--frames", "3", "--runs", "2",
                             "--stage-runs", "1", "--warmup", "1"])
    v, tts = bench.bench_variant("f32", f32_model, "given", args, None)
    timed = [s[1] for s in seen]
    assert timed == [False, False, True, False]  # warm-up, then headline runs, the stage split's run between
    assert (v.decoder_path, v.floor.path, v.stage_runs) == (decoder, decoder, 1)
    assert ("31 llama_decode" in v.floor.what) == (decoder == "llama")
    assert (v.floor.decoder_step_ms is None) == (decoder == "graph")
    assert len(v.floor.frame_ms_spread.values) == len(v.rtf.values) == 2
    assert v.floor.frame_ms == pytest.approx(v.floor.frame_ms_spread.median)
    assert v.floor.backbone_ms > 0 and v.floor.decoder_ms > 0
    # Audio seconds are the samples made / SAMPLE_RATE (the tiny codec makes 64 a frame, not 80 ms' 1920).
    audio = 3 * tts.codec.cfg.frame_size / bench.SAMPLE_RATE
    assert v.audio_s == pytest.approx(audio)
    assert v.rtf.values == pytest.approx([3 / (fps * audio) for fps in v.fps.values])
    assert v.floor.rtf == pytest.approx(v.floor.frame_ms / 1000 / (audio / 3))
    if decoder == "graph":  # nothing loaded llama.cpp's depth decoder (the floor did, to time its 31 steps)
        assert tts.generator._decoder is None
    assert "decode" not in vars(tts.generator.backbone)  # the waits are undone


def test_sigterm_ends_the_server_and_keeps_the_variants_measured(f32_model, tmp_path):
    """SIGTERM (timeout, CI, kill) during the second variant's server: the server's process ends with bench (it
    was left running, holding the model), and the JSON holds the first variant (written after each)."""
    import signal
    import time

    import psutil

    out = tmp_path / "bench.json"
    cmd = [sys.executable, "bench.py", "--model", str(f32_model), "--model", str(f32_model), "--frames", "3",
           "--runs", "1", "--warmup", "0", "--server", "1", "--threads", "1", "--json", str(out)]
    bench = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    servers: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 300
        while len(servers) < 2 and bench.poll() is None and time.monotonic() < deadline:
            for child in psutil.Process(bench.pid).children():
                try:
                    if "flask" in child.cmdline() and child.pid not in [s.pid for s in servers]:
                        servers.append(child)
                except psutil.Error:  # one that has just ended (a zombie until bench reaps it)
                    pass
            time.sleep(0.05)
        assert len(servers) == 2, bench.stderr.read().decode()[-3000:] if bench.poll() is not None else "no server"
        bench.send_signal(signal.SIGTERM)
        assert bench.wait(timeout=60) != 0
        gone, alive = psutil.wait_procs(servers, timeout=30)
        assert not alive
    finally:
        if bench.poll() is None:
            bench.kill()
        for s in servers:
            if s.is_running():
                s.kill()
    assert [v["qtype"] for v in json.loads(out.read_text())["variants"]] == ["f32"]


def test_json_that_is_a_directory_fails_before_any_work(tmp_path):
    done = subprocess.run([sys.executable, "bench.py", "--json", str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and "is a directory" in done.stderr, done.stderr[-2000:]


def test_startup_reads_a_long_stderr_while_say_runs(monkeypatch):
    """say's stderr is read as it comes: with CSM_GGUF_VERBOSE llama.cpp's log (160 KB) filled the pipe before the
    first audio, and bench waited for that audio forever."""
    import threading

    bench = _bench()
    chatty = "import sys; sys.stderr.write('log line\\n' * 100000); sys.stderr.flush(); sys.stdout.write('pcm')"
    monkeypatch.setattr(bench, "say_command", lambda model_dir, args: [sys.executable, "-c", chatty])
    result = []
    worker = threading.Thread(target=lambda: result.append(bench.say_startup(Path("."), None)), daemon=True)
    worker.start()
    worker.join(60)
    assert result, "say_startup hung"
    first, total, rss, cpu = result[0]
    assert 0 < first <= total and rss > 0


def test_json_has_null_for_nan(tmp_path):
    """Batched.steady_xrt is NaN when every row lands in one poll: a bare NaN is not JSON."""
    bench = _bench()
    out = tmp_path / "bench.json"
    bench.write_report({"steady_xrt": float("nan"), "rows": [1.0, float("inf")]}, str(out))
    assert json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in the JSON")) == {
        "steady_xrt": None, "rows": [1.0, None]}
