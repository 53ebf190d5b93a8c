"""Batch synthesis (python -m csm_gguf.batch) on the tiny model, with Ray embedded in this process: one Ray
session for the module, two workers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from csm_fixtures import random_codes
from csm_gguf.batch import InputError, read_rows, row_seed, synthesize
from csm_gguf.batch.cli import main
from csm_gguf.generator import Segment
from csm_gguf.sampling import Sampling
from csm_gguf.tts import Voice

ray = pytest.importorskip("ray")

ROOT = Path(__file__).resolve().parents[1]
FRAMES = 10
SETTINGS = dict(workers=2, streams=2, max_audio_ms=FRAMES * 80, kv_type="f32", progress=False)
CORPUS = [
    {"id": "plain", "text": "Hello there, how are you doing today?"},
    {"id": "voiced", "text": "A saved voice says this.", "voice": "narrator"},
    {"id": "builtin", "text": "An OpenAI voice name says this.", "voice": "ash"},
    {"id": "speaker", "text": "Speaker four speaks.", "speaker": 4},
    {"id": "seeded", "text": "My own seed.", "seed": 7},
    {"id": "b1", "text": "Batch row one."},
    {"id": "b2", "text": "Batch row two, a little longer than the others."},
    {"id": "b3", "text": "Batch row three."},
]


@pytest.fixture(scope="module", autouse=True)
def ray_session(tmp_path_factory):
    from csm_gguf import voices

    os.environ["CSM_GGUF_VOICES"] = str(tmp_path_factory.mktemp("voices"))
    voices.save_voice("narrator", Voice([Segment(3, "A saved voice prompt.", random_codes(12, 64, seed=7))], 3))
    # Logical CPUs: two workers of one CPU each, and room for a second run's workers joining from a subprocess.
    ray.init(num_cpus=4, include_dashboard=False, object_store_memory=200 * 2**20, logging_level="WARNING")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()
    del os.environ["CSM_GGUF_VOICES"]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def manifest(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.name != "manifest.jsonl"}


@pytest.fixture(scope="module")
def reference(f32_model, tmp_path_factory):
    """An uninterrupted run of the corpus: what every other run must write."""
    out = tmp_path_factory.mktemp("reference")
    summary = synthesize(CORPUS, out, model=f32_model, **SETTINGS)
    assert (summary.done, summary.failed, summary.skipped) == (len(CORPUS), 0, 0)
    return out


def test_every_row_gets_its_file_and_one_manifest_line(reference):
    lines = manifest(reference)
    assert sorted(e["id"] for e in lines) == sorted(r["id"] for r in CORPUS)
    by_id = {e["id"]: e for e in lines}
    for e in lines:
        assert set(e) == {"id", "text", "voice", "speaker", "seed", "path", "audio_seconds", "frames", "error"}
        assert e["error"] is None and e["frames"] == FRAMES and e["path"] == f"{e['id']}.wav"
        import soundfile as sf

        audio, rate = sf.read(reference / e["path"])
        assert rate == 24_000 and len(audio) / rate == pytest.approx(e["audio_seconds"]) and len(audio) > 0
    assert by_id["voiced"]["speaker"] == 3 and by_id["voiced"]["voice"] == "narrator"  # the voice's speaker
    assert by_id["builtin"]["speaker"] == 1 and by_id["speaker"]["speaker"] == 4 and by_id["plain"]["speaker"] == 0
    # As in say and the server: no voice and no speaker is the default voice; a speaker id alone, no prompt.
    assert (by_id["plain"]["voice"], by_id["speaker"]["voice"], by_id["builtin"]["voice"]) == ("alloy", "none", "ash")
    assert by_id["seeded"]["seed"] == 7 and by_id["b1"]["seed"] == row_seed(0, "b1")
    assert not list(reference.glob(".*.tmp"))


def test_same_speech_whatever_worker_order_or_batch_makes_a_row(reference, f32_model, tmp_path):
    """Seeds come from the run's seed and each id: one worker, three streams, the rows reversed: the same files."""
    out = tmp_path / "again"
    synthesize(CORPUS[::-1], out, model=f32_model, **{**SETTINGS, "workers": 1, "streams": 3})
    assert files(out) == files(reference)
    other = synthesize(CORPUS[:2], tmp_path / "seed", model=f32_model, seed=1, **SETTINGS)
    assert other.done == 2 and files(tmp_path / "seed")["plain.wav"] != files(reference)["plain.wav"]


def test_greedy_rows_are_what_csm_generate_says(f32_model, tmp_path):
    from csm_gguf.audio import to_int16
    from csm_gguf.tts import CSM

    rows = CORPUS[:4]
    synthesize(rows, tmp_path, model=f32_model, temperature=0, format="pcm", **SETTINGS)
    tts = CSM(f32_model, kv_type="f32")
    try:
        made = {e["id"]: e for e in manifest(tmp_path)}
        for row in rows:  # built-in voices: the prompts the run made (or found) for this model
            e = made[row["id"]]
            audio = tts.generate(row["text"], voice=e["voice"], speaker=e["speaker"], temperature=0,
                                 max_audio_ms=FRAMES * 80)
            pcm = np.frombuffer((tmp_path / e["path"]).read_bytes(), "<i2")
            np.testing.assert_array_equal(pcm, to_int16(audio))
    finally:
        tts.close()


def test_end_of_speech_ends_the_rows_audio(f32_model, monkeypatch):
    """An all-zero frame ends a row: it is not audio, and nothing after it is made."""
    from csm_gguf.batch.worker import RowMaker

    maker = RowMaker(str(f32_model), 2, 0, 0, "f32", "pcm", Sampling(max_audio_ms=2000), {})
    step, made = maker.engine.generator.step, {}

    def ends_after_four(streams):
        codes = step(streams)
        for j, st in enumerate(streams):
            made[st.slot] = made.get(st.slot, 0) + 1
            if made[st.slot] == 5:
                codes[j] = 0
                st.done = True
        return codes

    monkeypatch.setattr(maker.engine.generator, "step", ends_after_four)
    try:
        rows = [dict(id=f"r{i}", text="Hello there.", voice=None, speaker=0, seed=i, path=f"r{i}.pcm")
                for i in range(2)]
        for entry, audio in maker.make(rows):
            assert entry["frames"] == 4 and entry["error"] is None
            assert len(audio) == 2 * 4 * maker.tts.codec.cfg.frame_size
    finally:
        maker.engine.close()
        maker.tts.close()


def test_bad_rows_get_their_error_and_the_run_goes_on(f32_model, tmp_path, capsys):
    rows = [{"id": "empty", "text": "  "}, {"id": "nobody", "text": "Who speaks?", "voice": "nobody"},
            {"id": "surrogate", "text": "bad \ud800 text"}, {"id": "fine", "text": "This one is fine."}]
    summary = synthesize(rows, tmp_path, model=f32_model, **SETTINGS)
    assert (summary.done, summary.failed) == (1, 3) and not summary.every_row_failed
    errors = {e["id"]: e["error"] for e in manifest(tmp_path)}
    assert "text is empty" in errors["empty"] and "unknown voice 'nobody'" in errors["nobody"]
    assert "not Unicode" in errors["surrogate"] and errors["fine"] is None
    assert {e["id"]: e["path"] for e in manifest(tmp_path)} == {"empty": None, "nobody": None, "surrogate": None,
                                                               "fine": "fine.wav"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fine.wav", "manifest.jsonl"]

    # The row changed and now fails: the file made for its old text is no longer its speech.
    summary = synthesize([{**rows[3], "voice": "nobody"}], tmp_path, model=f32_model, **SETTINGS)
    assert summary.failed == 1 and not (tmp_path / "fine.wav").exists()
    assert next(e for e in manifest(tmp_path) if e["id"] == "fine")["path"] is None

    source = write_jsonl(tmp_path / "bad.jsonl", rows[:3])
    assert main([str(source), "-o", str(tmp_path / "all-bad"), "--model", str(f32_model), "--no-progress"]) == 1
    assert "3 rows: 0 done, 3 failed" in capsys.readouterr().err


def test_a_run_again_skips_what_is_done_and_redoes_what_is_not(reference, f32_model, tmp_path):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(reference, out)
    (out / "b2.wav").unlink()  # lost
    lines = manifest(out)
    # failed before: made again (a row other than b2: the manifest is in the order rows were finished)
    next(e for e in lines if e["id"] != "b2")["error"] = "it failed"
    (out / "manifest.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines) + '{"id": "b3", "te')
    (out / ".b2.wav.0123abcd.tmp").write_bytes(b"half a file")  # a killed run's
    summary = synthesize(CORPUS, out, model=f32_model, **SETTINGS)
    assert (summary.done, summary.skipped) == (2, len(CORPUS) - 2)
    assert sorted(e["id"] for e in manifest(out)) == sorted(r["id"] for r in CORPUS)
    assert files(out) == files(reference)


def worker_pids() -> set[int]:
    import psutil

    return {p.pid for p in psutil.process_iter(["cmdline"]) if "MapWorker" in " ".join(p.info["cmdline"] or [])}


def wait_for_lines(folder: Path, n: int, alive, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive():
        path = folder / "manifest.jsonl"
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"the run ended or stalled before {n} rows were written")


def test_a_worker_killed_mid_run_is_replaced_and_its_rows_made_again(reference, f32_model, tmp_path):
    out, result = tmp_path / "out", {}
    run = threading.Thread(target=lambda: result.update(s=synthesize(CORPUS, out, model=f32_model,
                                                                     **{**SETTINGS, "streams": 1})))
    run.start()
    wait_for_lines(out, 1, run.is_alive)
    before = worker_pids()
    os.kill(sorted(before)[0], signal.SIGKILL)
    run.join(timeout=300)
    assert result["s"].done == len(CORPUS)
    assert sorted(e["id"] for e in manifest(out)) == sorted(r["id"] for r in CORPUS)
    assert files(out) == files(reference)


def test_a_run_killed_and_run_again_ends_like_an_uninterrupted_one(reference, f32_model, ray_session, tmp_path):
    """The run in a process of its own, joining this module's Ray cluster (--address), stopped by SIGTERM (as
    `kill` or a scheduler stops it) after two rows: as Ctrl-C stops it (Ray's own handler, installed by
    ray.init over the command's, ended it with a stack dump and exit status 134)."""
    source, out = write_jsonl(tmp_path / "corpus.jsonl", CORPUS), tmp_path / "out"
    cmd = [sys.executable, "-m", "csm_gguf.batch", str(source), "-o", str(out), "--model", str(f32_model),
           "--workers", "2", "--streams", "1", "--max-audio-ms", str(FRAMES * 80), "--kv-type", "f32",
           "--address", ray_session, "--no-progress"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE)
    try:
        wait_for_lines(out, 2, lambda: proc.poll() is None)
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 143 and b"interrupted: the rows written so far are kept" in err, err[-2000:]
    assert len(manifest(out)) < len(CORPUS), "the run ended before it was killed"
    summary = synthesize(source, out, model=f32_model, **SETTINGS)
    assert summary.skipped >= 2 and summary.done + summary.skipped == len(CORPUS)
    assert sorted(e["id"] for e in manifest(out)) == sorted(r["id"] for r in CORPUS)
    assert files(out) == files(reference)


# --- input, output layouts, the command -------------------------------------------------------------------


def test_input_formats_and_line_numbers_as_ids(tmp_path):
    txt = tmp_path / "lines.txt"
    txt.write_text("\ufeffFirst line.\n\n  \nFourth line.\n")
    assert [(r.id, r.text) for r in read_rows(txt)] == [("1", "First line."), ("4", "Fourth line.")]
    csv = tmp_path / "rows.csv"
    csv.write_text('text,id,voice,speaker,seed\n"Two\nlines",a,ash,,\nPlain,,,2,9\n')
    rows = read_rows(csv)
    assert [(r.id, r.text, r.voice, r.speaker, r.seed) for r in rows] == [
        ("a", "Two\nlines", "ash", None, None), ("4", "Plain", None, 2, 9)]
    jsonl = write_jsonl(tmp_path / "rows.jsonl", [{"text": "One.", "id": 5}, {"text": "Two.", "seed": 3}])
    assert [(r.id, r.seed) for r in read_rows(jsonl)] == [("5", None), ("2", 3)]


def test_lines_end_where_editors_end_them_not_at_unicode_separators(tmp_path):
    """str.splitlines also breaks at form feeds, U+0085, U+2028 and U+2029: a .txt line holding one became two
    rows (and every later id another line's number), and a valid JSON line holding one unescaped was refused."""
    inside = "a\x0cb\x85c\u2028d\u2029e"
    txt = tmp_path / "lines.txt"
    txt.write_text(f"One {inside}.\r\nTwo.\rThree.\n")
    assert [(r.id, r.text) for r in read_rows(txt)] == [("1", f"One {inside}."), ("2", "Two."), ("3", "Three.")]
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text(json.dumps({"text": inside}, ensure_ascii=False) + "\n" + json.dumps({"text": "Two."}) + "\n")
    assert [(r.id, r.text) for r in read_rows(jsonl)] == [("1", inside), ("2", "Two.")]


def test_a_row_whose_text_holds_a_unicode_separator_is_done_once(tmp_path):
    """Its manifest line was read back as two broken lines: every run made the row again and added a line."""
    from csm_gguf.batch.manifest import Manifest

    entry = {"id": "a", "text": "First\u2028line.", "voice": None, "speaker": 0, "seed": 1, "path": "a.wav",
             "error": None}
    folder = tmp_path / "out"
    folder.mkdir()
    manifest = Manifest(folder)
    manifest.add(entry, b"audio")
    manifest.close()
    assert "\u2028" not in (folder / "manifest.jsonl").read_text()  # escaped: a line to every reader
    (folder / "manifest.jsonl").write_text(json.dumps(entry, ensure_ascii=False) + "\n")  # an older run's
    assert manifest.read() == [entry]
    assert manifest.resume({"a": entry}) == {"a"}


@pytest.mark.parametrize("name, content, message", [
    ("a.jsonl", '{"text": "fine"}\n{"text": "oops"\n', "line 2: not a JSON object"),
    ("a.jsonl", '{"text": "fine"}\n\n["a list"]\n', "line 3: expected an object"),
    ("a.jsonl", '{"txt": "typo"}\n', "line 1: unknown field(s) 'txt'"),
    ("a.jsonl", '{"id": "x"}\n', "line 1: 'text' is required"),
    ("a.jsonl", '{"text": "a", "id": "x"}\n{"text": "b", "id": "x"}\n', "line 2: id 'x' is also the id of line 1"),
    ("a.jsonl", '{"text": "a", "id": "../up"}\n', "line 1: id '../up' cannot name a file"),
    ("a.jsonl", '{"text": "a", "seed": -1}\n', "line 1: 'seed' must be a whole number >= 0"),
    ("a.jsonl", '{"text": "a", "speaker": "two"}\n', "line 1: 'speaker' must be a whole number"),
    ("a.csv", "words,id\nhello,1\n", "line 1: the header must name a 'text' column"),
    ("a.csv", "text,id\nhello,1\nhi,2,extra\n", "line 3: 3 fields where the header has 2"),
    # an unclosed quote: the rest of the file was one row's text
    ("a.csv", 'text,id\n"unclosed,1\nmore,2\n', "line 3: unexpected end of data (a quote opened"),
    ("a.txt", b"fine\n\xff\xfe bad\n", "line 2: not UTF-8 text"),
    ("a.txt", "\n\n", "holds no rows"),
    ("a.tsv", "text\n", "unknown input type '.tsv'"),
])
def test_malformed_input_is_an_error_naming_its_line(f32_model, tmp_path, capsys, name, content, message):
    source = tmp_path / name
    source.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_rows(source)
    out = tmp_path / "out"
    assert main([str(source), "-o", str(out), "--model", str(f32_model), "--no-progress"]) == 2
    assert message in capsys.readouterr().err and not out.exists()


def test_bad_settings_are_refused_before_anything_runs(f32_model, tmp_path, capsys):
    import socket

    source = write_jsonl(tmp_path / "a.jsonl", CORPUS[:1])
    with socket.socket() as s:  # a port nothing listens on (Ray waited for a head there without end)
        s.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{s.getsockname()[1]}"
    for args, message in ((["--streams", "0"], "streams (--streams) must be a whole number from 1 to 248"),
                          (["--streams", "300"], "streams (--streams) must be a whole number from 1 to 248, got 300"),
                          (["--threads", str(os.cpu_count() + 1)], "threads (--threads) must be a whole number from 0"),
                          (["--gpu-layers", "-7"], "gpu_layers (--gpu-layers) must be a whole number from -1"),
                          (["--gpus", "-1"], "gpus (--gpus) must be a number >= 0"),
                          (["--voice", "nosuch"], "unknown voice 'nosuch'"),
                          (["-o", ""], "the output folder is empty"),
                          (["--address", closed], f"cannot reach the Ray cluster at {closed} (Connection refused)"),
                          (["--address", "ray://head"], "--address 'ray://head' is not a Ray address"),
                          (["--temperature", "-1"], "temperature must be a number >= 0"),
                          (["--metadata", "ljspeech", "--format", "mp3"], "the LJSpeech layout holds wav files"),
                          (["--model", str(tmp_path / "none")], "none"),
                          (["-o", str(source)], f"the output folder {source} is a file: give a folder")):
        assert main([str(source), "-o", str(tmp_path / "out"), "--model", str(f32_model), *args]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_more_gpus_than_this_machine_has_is_refused_and_leaves_no_folder(f32_model, tmp_path):
    """Ray waited for ever for the GPU a worker asked for. A command of its own: this module's Ray is running."""
    source = write_jsonl(tmp_path / "a.jsonl", CORPUS[:1])
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, "-m", "csm_gguf.batch", str(source), "-o", str(tmp_path / "out"),
                           "--model", str(f32_model), "--no-progress", "--gpus", "1000"], env=env,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "--gpus 1000: a worker asks for more GPUs than Ray finds on this machine (0" in done.stderr
    assert not (tmp_path / "out").exists()  # made, nothing written, and taken away


def test_no_cluster_for_address_auto_is_said_in_our_words(monkeypatch):
    """(Ray finds any cluster running on this machine for 'auto', this module's too: its refusal stood in for.)"""
    import ray

    from csm_gguf.batch.pipeline import ClusterUnreachable, Pool, ray_session

    def no_cluster(**kwargs):
        raise ConnectionError("Could not find any running Ray instance.")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", no_cluster)
    with pytest.raises(ClusterUnreachable, match=r"no Ray cluster at --address auto .*ray start --head"):
        with ray_session(Pool("model", address="auto")):
            pass


def test_command_ljspeech_layout_formats_and_summary(f32_model, tmp_path, capsys):
    import soundfile as sf

    source = write_jsonl(tmp_path / "a.jsonl", [{"id": "LJ001-0001", "text": "Pipes | and\nbreaks."},
                                                {"id": "LJ001-0002", "text": ""}, *CORPUS[:2]])
    out = tmp_path / "lj"
    args = [str(source), "-o", str(out), "--model", str(f32_model), "--workers", "2", "--streams", "2",
            "--max-audio-ms", str(FRAMES * 80), "--metadata", "ljspeech"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "4 rows: 3 done, 1 failed, 0 done before" in err and "audio seconds per wall second" in err
    assert "failed: LJ001-0002: text is empty" in err and "speaking: 100%" in err  # the progress bar
    assert (out / "metadata.csv").read_text() == ("LJ001-0001|Pipes and breaks.|Pipes and breaks.\n"
                                                  "plain|Hello there, how are you doing today?|"
                                                  "Hello there, how are you doing today?\n"
                                                  "voiced|A saved voice says this.|A saved voice says this.\n")
    assert sorted(p.name for p in (out / "wavs").iterdir()) == ["LJ001-0001.wav", "plain.wav", "voiced.wav"]
    assert main([*args[:-2], "-o", str(tmp_path / "flac"), "--format", "flac", "--no-progress"]) == 0
    audio, rate = sf.read(tmp_path / "flac" / "plain.flac")
    assert rate == 24_000 and len(audio) > 0


def test_without_ray_the_command_says_how_to_install_it(f32_model, tmp_path, monkeypatch, capsys):
    source = write_jsonl(tmp_path / "a.jsonl", CORPUS[:1])
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails
    assert main([str(source), "-o", str(tmp_path / "out"), "--model", str(f32_model)]) == 2
    assert "pip install 'csm-gguf[batch]'" in capsys.readouterr().err and not (tmp_path / "out").exists()
