"""The say command and the CSM API end to end on the tiny model (with its tiny codec)."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest
import soundfile as sf
import torch

from csm_gguf.audio import load_audio, to_int16
from csm_gguf.generator import Segment
from csm_gguf.say import main
from csm_gguf.tempo import change_speed
from csm_gguf.tts import CSM, PIECE_TOKENS, UNFINISHED_CHARS
from audio_fixtures import needs_ffmpeg
from reference import reference_greedy_codes, reference_prompt_embeddings

TEXT = "Hello there, how are you doing today?"


@pytest.fixture(scope="module")
def tts(f32_model):
    engine = CSM(f32_model, kv_type="f32")
    yield engine
    engine.close()


@pytest.fixture(autouse=True)
def voices_home(tmp_path, monkeypatch):
    monkeypatch.setenv("CSM_GGUF_VOICES", str(tmp_path / "voices"))


def reference_audio(tiny_csm, tts, frames: int) -> tuple[np.ndarray, np.ndarray]:
    emb = reference_prompt_embeddings(tiny_csm, tts.model.prompt_tokens, TEXT, 0, [])
    codes = reference_greedy_codes(tiny_csm, emb, frames)
    with torch.no_grad():
        audio = tiny_csm.codec_model.decode(torch.tensor(codes.T[None])).audio_values[0, 0].numpy()
    return codes, audio


def test_api_audio_equals_reference_decode_of_reference_codes(tiny_csm, tts):
    codes, ref_audio = reference_audio(tiny_csm, tts, 12)
    raw = {"speaker": 0, "temperature": 0, "max_audio_ms": 12 * 80}  # a bare speaker id: no voice prompt
    ours = np.stack(list(tts.frames(TEXT, **raw)))
    np.testing.assert_array_equal(ours, codes)
    audio = tts.generate(TEXT, **raw)
    np.testing.assert_allclose(audio, ref_audio, atol=1e-3 * np.abs(ref_audio).max())
    # One frame at a time through the streaming codec gives the same samples.
    streamed = np.concatenate(list(tts.stream(TEXT, chunk_frames=1, **raw)))
    np.testing.assert_allclose(streamed, audio, atol=1e-5 * np.abs(audio).max())


def test_speed_stretches_the_same_speech(tts):
    kw = dict(temperature=0, max_audio_ms=12 * 80)
    audio = tts.generate(TEXT, **kw)
    fast = tts.generate(TEXT, speed=1.5, **kw)
    assert len(fast) == round(len(audio) / 1.5)
    np.testing.assert_array_equal(fast, change_speed(audio, 1.5))  # chunking does not change a stretch
    slow = np.concatenate(list(tts.stream(TEXT, chunk_frames=3, speed=0.5, **kw)))
    assert len(slow) == 2 * len(audio)


def test_say_speed(f32_model, tts, tmp_path):
    common = [TEXT, "--model", str(f32_model), "--seed", "2", "--max-audio-ms", "800", "--format", "wav"]
    assert main([*common, "--speed", "2", "-o", str(tmp_path / "a.wav"), "--save-codes", str(tmp_path / "a.npy")]) == 0
    audio, rate = sf.read(tmp_path / "a.wav", dtype="int16")
    codes = np.load(tmp_path / "a.npy")
    # say decodes five frames at a time; the same chunks give the same audio to stretch
    expected = np.concatenate(list(tts.decode_stream(codes, chunk_frames=5, speed=2)))
    assert len(expected) == len(codes) * tts.codec.cfg.frame_size // 2
    np.testing.assert_array_equal(audio, to_int16(expected))


def test_text_in_pieces_is_spoken_sentence_by_sentence_as_it_comes(tts):
    sentences = ["Hello there.", "How are you doing today?", "Fine, thanks."]
    pulled = []

    def tokens():  # an LLM's output, a few characters at a time
        text = " ".join(sentences)
        for i in range(0, len(text), 3):
            pulled.append(i)
            yield text[i : i + 3]

    kw = dict(temperature=0.9, seed=5, max_audio_ms=4 * 80)
    chunks = tts.stream_text(tokens(), speaker=1, chunk_frames=2, **kw)
    first = next(chunks)
    assert len(pulled) < len(" ".join(sentences)) // 3  # speaking before the text has all come
    audio = np.concatenate([first, *chunks])
    # as a dialogue of one speaker: each sentence after the one before it, piece i with seed + i (decoded in
    # other chunks: each sentence's last frames are decoded when it ends)
    expected = np.concatenate(list(tts.decode_stream(tts.dialogue_frames([(1, s) for s in sentences], **kw))))
    assert len(audio) == len(expected)
    np.testing.assert_allclose(audio, expected, atol=1e-5 * np.abs(expected).max())


def test_stream_text_speaks_a_finished_sentence_whole_before_reading_on(tts):
    """A stalled LLM must not hold back the end of a sentence it has finished."""
    made, heard = [], []

    def text():
        yield "One two three. Four"  # the first sentence is complete: the next has begun
        heard.append(sum(len(chunk) for chunk in made))
        yield " five."

    kw = dict(temperature=0, max_audio_ms=6 * 80)
    made += tts.stream_text(text(), chunk_frames=25, **kw)
    assert heard == [len(tts.generate("One two three.", **kw))]


def test_stream_text_does_not_wait_for_ever_for_a_sentence_end(tts):
    pulled = []

    def words():  # 10,000 characters and no sentence end
        for i in range(2000):
            pulled.append(i)
            yield "word "

    chunks = tts.stream_text(words(), max_audio_ms=160)
    next(chunks)
    assert len(pulled) * len("word ") <= UNFINISHED_CHARS + len("word ")
    chunks.close()


def test_stream_text_checks_its_settings_at_the_call(tts):
    with pytest.raises(ValueError, match="iterable of strings"):
        tts.stream_text("Hello.")
    with pytest.raises(ValueError, match="temperature must be"):
        tts.stream_text(iter(["Hello."]), temperature=-1)
    with pytest.raises(ValueError, match="speed must be"):
        tts.stream_text(iter(["Hello."]), speed=9)
    with pytest.raises(ValueError, match="must come as strings, got int"):
        list(tts.stream_text(iter(["Hello. ", 5]), max_audio_ms=160))


def test_only_streams_of_single_frames_ask_for_a_cuda_graph(tts, monkeypatch):
    """A graph replays 1-frame steps, and recording one costs about three steps: `say` (5-frame chunks) and
    `generate` (25) would record one only for a last chunk of one frame."""
    asked = []
    make = tts.codec.decoder_state
    monkeypatch.setattr(tts.codec, "decoder_state", lambda *a, **k: asked.append(k.get("cuda_graph")) or make(*a, **k))
    list(tts.stream(TEXT, chunk_frames=1, max_audio_ms=160))
    list(tts.stream(TEXT, chunk_frames=5, max_audio_ms=160))
    tts.generate(TEXT, max_audio_ms=160)
    assert asked == [True, False, False]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch has no CUDA device")
def test_codec_on_cuda_gives_the_cpu_audio(f32_model, tts):
    gpu = CSM(f32_model, kv_type="f32", codec_device="cuda")
    try:
        kw = dict(temperature=0, max_audio_ms=12 * 80)
        audio = tts.generate(TEXT, **kw)
        tol = 1e-5 * np.abs(audio).max()
        np.testing.assert_allclose(gpu.generate(TEXT, **kw), audio, atol=tol)
        np.testing.assert_allclose(np.concatenate(list(gpu.stream(TEXT, chunk_frames=1, **kw))), audio, atol=tol)
        np.testing.assert_array_equal(gpu.encode(audio), tts.encode(audio))
    finally:
        gpu.close()


def test_real_time_factor_leaves_out_loading_the_codec(f32_model, tmp_path, monkeypatch, capsys):
    """The codec loads on first use, which took 2-4 s with the full-size one: the summary line counted it."""
    import re
    import time

    from csm_gguf.mimi import Mimi

    load = Mimi.from_state_dict
    monkeypatch.setattr(Mimi, "from_state_dict", classmethod(lambda cls, *a: (time.sleep(3), load(*a))[1]))
    assert main([TEXT, "--model", str(f32_model), "--max-audio-ms", "160", "-o", str(tmp_path / "a.wav")]) == 0
    wall = float(re.search(r"audio in ([\d.]+) s", capsys.readouterr().err)[1])
    assert wall < 3


def test_say_writes_the_reference_audio(tiny_csm, tts, f32_model, tmp_path, capsys):
    _, ref_audio = reference_audio(tiny_csm, tts, 12)
    out = tmp_path / "out.wav"
    assert main([TEXT, "--model", str(f32_model), "--temperature", "0", "--max-audio-ms", str(12 * 80), "--voice",
                 "none", "--speaker", "0", "--output", str(out), "--save-codes", str(tmp_path / "codes.npy")]) == 0
    data, rate = sf.read(out, dtype="int16")
    assert rate == 24000 and data.ndim == 1
    assert np.abs(data.astype(np.int32) - to_int16(ref_audio)).max() <= 1
    assert np.load(tmp_path / "codes.npy").shape == (12, 32)
    assert "real-time factor" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", ["wav", "flac", "mp3", "opus", pytest.param("aac", marks=needs_ffmpeg), "pcm"])
def test_every_format(f32_model, tmp_path, fmt):
    out = tmp_path / f"speech.{fmt}"
    assert main([TEXT, "--model", str(f32_model), "--seed", "1", "--max-audio-ms", "2000", "-o", str(out)]) == 0
    frames = 2000 // 80
    if fmt == "pcm":
        samples = len(out.read_bytes()) // 2
    elif fmt == "aac":
        assert out.read_bytes()[:2] == b"\xff\xf1"  # ADTS
        samples = len(load_audio(out))
    else:
        info = sf.info(out)
        assert info.samplerate == 24000 and info.channels == 1
        samples = info.frames
    expected = frames * CSM(f32_model).codec.cfg.frame_size
    assert abs(samples - expected) <= 2304  # mp3/opus/aac frames pad a little


def fake_player(folder, name: str = "aplay") -> None:
    """A player on PATH (alone there) that keeps what it is given: its arguments, the PCM, then a mark once
    its input ended (a second later, as if still playing)."""
    folder.mkdir(exist_ok=True)
    script = folder / name
    script.write_text(f"""#!{sys.executable}
import sys, time
open("{folder}/args", "w").write(" ".join(sys.argv[1:]))
open("{folder}/pcm", "wb").write(sys.stdin.buffer.read())
time.sleep(1)
open("{folder}/done", "w").write("")
""")
    script.chmod(0o755)


def test_play_plays_what_would_be_written(f32_model, tmp_path, monkeypatch, capsys):
    common = [TEXT, "--model", str(f32_model), "--seed", "1", "--max-audio-ms", "800"]
    assert main([*common, "-o", str(tmp_path / "x.wav")]) == 0
    written, _ = sf.read(tmp_path / "x.wav", dtype="int16")
    bin_ = tmp_path / "bin"
    fake_player(bin_)
    monkeypatch.setenv("PATH", str(bin_))
    monkeypatch.chdir(tmp_path)
    assert main([*common, "--play"]) == 0
    assert (bin_ / "done").exists()  # the command ended after the playing
    assert (bin_ / "args").read_text() == "-q -t raw -f S16_LE -r 24000 -c 1"
    np.testing.assert_array_equal(np.frombuffer((bin_ / "pcm").read_bytes(), "<i2"), written)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bin", "x.wav"]  # heard, not kept
    assert main([*common, "--play", "-o", str(tmp_path / "y.wav")]) == 0  # heard and kept
    np.testing.assert_array_equal(sf.read(tmp_path / "y.wav", dtype="int16")[0], written)
    capsys.readouterr()


def test_play_with_a_chosen_player_or_none(f32_model, tmp_path, monkeypatch, capsys):
    common = [TEXT, "--model", str(f32_model), "--max-audio-ms", "400", "--play"]
    fake_player(tmp_path / "bin", "my-player")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    monkeypatch.setenv("CSM_GGUF_PLAYER", "my-player --fast")
    assert main(common) == 0
    assert (tmp_path / "bin" / "args").read_text() == "--fast" and (tmp_path / "bin" / "pcm").stat().st_size > 0
    monkeypatch.setenv("CSM_GGUF_PLAYER", "nonesuch")
    assert main(common) == 2
    assert "CSM_GGUF_PLAYER='nonesuch': 'nonesuch' is not a program on PATH" in capsys.readouterr().err
    monkeypatch.delenv("CSM_GGUF_PLAYER")
    assert main(common) == 2 and "no audio player found: install one of paplay" in capsys.readouterr().err
    assert main([*common, "-o", "-"]) == 2 and "--play and -o -" in capsys.readouterr().err
    (tmp_path / "bin" / "true").symlink_to(shutil.which("true", path="/usr/bin:/bin"))
    monkeypatch.setenv("CSM_GGUF_PLAYER", "true")  # a player that leaves at once: speaking goes on, unheard
    assert main([*common, "-o", str(tmp_path / "x.wav")]) == 0 and sf.info(tmp_path / "x.wav").frames > 0
    (tmp_path / "bin" / "false").symlink_to(shutil.which("false", path="/usr/bin:/bin"))
    monkeypatch.setenv("CSM_GGUF_PLAYER", "false")  # a player that fails (no sound device, say): said, not hidden
    assert main([*common, "-o", str(tmp_path / "y.wav")]) == 2 and sf.info(tmp_path / "y.wav").frames > 0
    assert "the audio player false failed (exit status 1)" in capsys.readouterr().err
    monkeypatch.delenv("CSM_GGUF_PLAYER")
    fake_player(tmp_path / "bin")  # an aplay, and no ffmpeg: -f aac needs none when nothing is written
    assert main([*common, "-f", "aac"]) == 0


@pytest.mark.parametrize("rtf, most_dry", [(0.3, 0), (1.2, 4), (2.0, 5)])
def test_playout_holds_speech_made_slower_than_real_time_in_growing_stretches(rtf, most_dry):
    """say --play's 0.4 s chunks (5 frames), made at `rtf` seconds per second of audio, for 60 s of speech:
    the player runs dry a few times, not after each of the 150 chunks, and everything is handed over."""
    from csm_gguf.player import Playout

    playout, now, released, held = Playout(), 0.0, 0.0, 0.0
    for _ in range(150):
        now += 0.4 * rtf
        held += 0.4
        if playout.add(0.4, now):
            released, held = released + held, 0.0
    assert playout.dry <= most_dry and released + held == pytest.approx(60.0)


def test_aac_without_ffmpeg_is_refused_before_the_model_loads(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert main(["hi", "--model", str(tmp_path / "no-model"), "-o", str(tmp_path / "x.aac")]) == 2
    assert "AAC output needs ffmpeg, which is not on PATH" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_stdout_streams_pcm(f32_model, capfdbinary):
    assert main([TEXT, "--model", str(f32_model), "--seed", "1", "--max-audio-ms", "800", "-o", "-",
                 "--format", "pcm"]) == 0
    out = capfdbinary.readouterr().out
    assert len(out) > 0 and len(out) % 2 == 0


def test_openai_voice_name_is_its_fixed_prompt_and_none_the_raw_model(tts, f32_model, tmp_path):
    common = [TEXT, "--model", str(f32_model), "--seed", "3", "--max-audio-ms", "400"]

    def codes(*options: str) -> np.ndarray:
        out = tmp_path / "codes.npy"
        assert main([*common, *options, "-o", str(tmp_path / "a.wav"), "--save-codes", str(out)]) == 0
        return np.load(out)

    prompt = tts.voice("echo").segments[0]  # made now (or by an earlier test), as say reads it
    np.save(tmp_path / "prompt.npy", prompt.codes)
    np.testing.assert_array_equal(codes("--voice", "echo"),
                                  codes("--speaker", "4", "--context", "4", prompt.text, str(tmp_path / "prompt.npy")))
    np.testing.assert_array_equal(codes("--voice", "none", "--speaker", "4"), codes("--speaker", "4"))
    assert not np.array_equal(codes("--voice", "echo"), codes("--speaker", "4"))


def test_output_without_extension_is_wav(f32_model, tmp_path):
    out = tmp_path / "speech"
    assert main([TEXT, "--model", str(f32_model), "--seed", "1", "--max-audio-ms", "160", "-o", str(out)]) == 0
    assert sf.info(out).format == "WAV"


def test_reader_leaving_stdout_ends_quietly(f32_model):
    """`say ... -o - | head -c 10`: the pipe closes early; no traceback."""
    cmd = [sys.executable, "-m", "csm_gguf.say", TEXT, "--model", str(f32_model), "--seed", "1",
           "--max-audio-ms", "4000", "-o", "-", "-f", "pcm"]  # 190 kB: more than a pipe holds
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert len(proc.stdout.read(10)) == 10
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert "Traceback" not in err and "Error" not in err


def in_child_process(f32_model, script: str) -> None:
    """Run `script` (with `tts`, a CSM of the tiny model) in a fresh interpreter; it must print ok. A crash
    there fails this test alone, not the whole run."""
    code = f"import gc, threading\nfrom csm_gguf.tts import CSM\ntts = CSM({str(f32_model)!r})\n{script}"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout.strip()) == (0, "ok"), done.stderr[-2000:]


def test_closed_model_is_an_error_not_a_crash(f32_model):
    """Speaking after close, or a stream left mid-way and collected after close, used llama.cpp's freed
    memory: segfaults."""
    in_child_process(f32_model, (
        "chunks = tts.stream('Hello.', seed=1, max_audio_ms=800)\n"
        "next(chunks); tts.close()\n"
        "for speak in (lambda: next(chunks), lambda: tts.generate('Hi.')):\n"
        "    try: speak()\n"
        "    except RuntimeError as e: assert 'closed' in str(e), e\n"
        "    else: raise AssertionError('spoke after close')\n"
        "del chunks; gc.collect(); print('ok')"))


def test_close_during_another_threads_generation_is_an_error_not_a_crash(f32_model):
    """close() freed llama.cpp's contexts under a step running in another thread: a segfault."""
    in_child_process(f32_model, (
        "started, errors = threading.Event(), []\n"
        "def speak():\n"
        "    try:\n"
        "        for _ in tts.frames('Hello.', seed=1, max_audio_ms=60_000): started.set()\n"
        "    except RuntimeError as e: errors.append(str(e))\n"
        "t = threading.Thread(target=speak); t.start(); started.wait(30); tts.close(); t.join(30)\n"
        "assert errors and 'closed' in errors[0], errors; print('ok')"))


def test_unfinished_stream_in_this_thread_is_an_error_in_another_a_wait(tts):
    """A generator left mid-way held the model's lock between frames: the next call in its thread hung for
    good. Now it raises there, while another thread's call waits for the slot."""
    expected = tts.generate(TEXT, temperature=0, max_audio_ms=800)
    frames = tts.frames(TEXT, temperature=0, max_audio_ms=800)
    first = next(frames)
    with pytest.raises(RuntimeError, match="held by unfinished streams of this thread"):
        tts.generate(TEXT, temperature=0, max_audio_ms=800)
    result = []
    other = threading.Thread(target=lambda: result.append(tts.generate(TEXT, temperature=0, max_audio_ms=800)))
    other.start()
    other.join(0.5)
    assert other.is_alive() and not result  # waiting for the slot
    assert len([first, *frames]) == 10
    other.join(30)
    np.testing.assert_array_equal(result[0], expected)


def test_a_failed_prompt_read_gives_its_slot_back(tts, monkeypatch):
    """Ctrl-C while a long voice prompt was read kept the only slot: the CSM never spoke again."""
    def interrupted(stream, max_rows=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(tts.generator, "prefill", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tts.generate(TEXT, temperature=0, max_audio_ms=160)
    monkeypatch.undo()
    assert len(tts.generate(TEXT, temperature=0, max_audio_ms=160)) == 2 * tts.codec.cfg.frame_size


def test_saved_voice_gives_the_same_codes_as_its_context(f32_model, tts, tmp_path, capsys):
    prompt_audio = tmp_path / "prompt.wav"
    sf.write(prompt_audio, 0.3 * np.sin(np.linspace(0, 400, 24000)), 24000)
    direct, via_voice = tmp_path / "direct.npy", tmp_path / "voice.npy"
    common = ["--model", str(f32_model), "--seed", "7", "--max-audio-ms", "800"]
    assert main(["Say this.", *common, "--context", "2", "A prompt.", str(prompt_audio),
                 "--speaker", "2", "-o", str(tmp_path / "a.wav"), "--save-codes", str(direct)]) == 0
    assert main(["--save-voice", "narrator", "--model", str(f32_model), "--speaker", "2",
                 "--context", "2", "A prompt.", str(prompt_audio)]) == 0
    capsys.readouterr()
    assert main(["--list-voices"]) == 0
    # 1 s of audio is 375 of the tiny codec's 64-sample frames, 80 ms each to CSM
    assert saved_lines(capsys.readouterr().out) == ["narrator: speaker 2, 1 prompt segment(s), 30.0 s, 'A prompt.'"]
    assert main(["Say this.", *common, "--voice", "narrator", "-o", str(tmp_path / "b.wav"),
                 "--save-codes", str(via_voice)]) == 0
    np.testing.assert_array_equal(np.load(direct), np.load(via_voice))
    assert main(["--delete-voice", "narrator"]) == 0
    assert main(["--list-voices"]) == 0
    assert saved_lines(capsys.readouterr().out) == []
    assert main(["--delete-voice", "narrator"]) == 2
    assert "no saved voice 'narrator'" in capsys.readouterr().err


def record_contexts(tts, monkeypatch) -> list[list[str]]:
    """The transcripts of the context each piece is generated with, from now on."""
    seen: list[list[str]] = []
    generate = tts.generator.generate

    def spy(piece, speaker, context, sampling, shared=0):
        seen.append([seg.text for seg in context])
        return generate(piece, speaker, context, sampling, shared)

    monkeypatch.setattr(tts.generator, "generate", spy)
    return seen


def test_long_text_pieces_fit_carry_context_and_join_seamlessly(tts, monkeypatch):
    sentences = [f"This is sentence number {i}, which says a little more." for i in range(42)]
    text = " ".join(sentences)
    pieces = tts.pieces(text)
    assert len(pieces) > 3
    assert all(len(tts.model.tokenize(p)) <= PIECE_TOKENS for p in pieces)
    assert " ".join(pieces) == text

    seen_contexts = record_contexts(tts, monkeypatch)
    frames = []
    audio = np.concatenate(list(tts.decode_stream(
        (frames.append(f) or f for f in tts.frames(text, speaker=0, seed=3, max_audio_ms=4 * 80)), chunk_frames=3)))
    assert len(seen_contexts) == len(pieces)
    assert seen_contexts[0] == []
    for i in range(1, len(pieces)):
        assert seen_contexts[i] == [pieces[i - 1]]  # each piece hears the previous one
    # One continuous stream: identical to decoding every frame at once, so no seam at the joins.
    np.testing.assert_allclose(audio, tts.decode(np.stack(frames)), atol=1e-5 * np.abs(audio).max())


def test_context_gives_way_to_the_previous_piece_when_both_do_not_fit(tts, monkeypatch):
    """A context that fits the first piece of a long text, but not with the first piece as context of
    the second: the second piece drops it and goes on (it used to stop the text with PromptTooLong)."""
    from csm_gguf.generator import Segment

    text = " ".join(f"This is sentence number {i}, which goes on for a while." for i in range(12))
    pieces = tts.pieces(text)
    assert len(pieces) > 1
    limit = tts.model.config.backbone.max_seq_len
    empty = Segment(1, "What came before.", np.zeros((0, 32), dtype=np.int64))
    frames = limit - 8 - tts.generator.prompt_rows(pieces[0], 0, [empty])  # room for 8 frames of piece 1
    context = [Segment(1, empty.text, np.ones((frames, 32), dtype=np.int64))]
    assert tts.generator.prompt_rows(pieces[1], 0, [*context, Segment(0, pieces[0])]) > limit

    seen_contexts = record_contexts(tts, monkeypatch)
    made = list(tts.frames(text, context=context, seed=1, max_audio_ms=4 * 80))
    assert seen_contexts[0] == [empty.text]
    assert seen_contexts[1:] == [[p] for p in pieces[:-1]]
    assert len(made) > len(pieces)


def test_context_that_leaves_the_text_too_little_room_is_refused(tts):
    """It used to fit the prompt and stop the speech, silently, when the model's context was full."""
    from csm_gguf.generator import PromptTooLong, Segment

    limit = tts.model.config.backbone.max_seq_len
    empty = Segment(1, "What came before.", np.zeros((0, 32), dtype=np.int64))
    frames = limit - 2 - tts.generator.prompt_rows(TEXT, 0, [empty])  # room for 2 frames
    context = [Segment(1, empty.text, np.ones((frames, 32), dtype=np.int64))]
    with pytest.raises(PromptTooLong, match=r"may need up to 25 frames more \(2 s of speech\)"):
        tts.generate(TEXT, context=context, max_audio_ms=2000)
    assert len(tts.generate(TEXT, context=context, max_audio_ms=160)) == 2 * tts.codec.cfg.frame_size


def test_dialogue_turns_hear_each_speakers_last_piece(tts, monkeypatch):
    """Each turn is spoken after the last thing each speaker said, in the order said; its codes are those of
    speaking the turn alone with that context, and piece i samples with seed + i."""
    from csm_gguf.generator import Segment

    turns = [(0, "Did you hear that?"), (1, "Hear what?"), (0, "That noise, just now."), (1, "No.")]
    kw = dict(max_audio_ms=4 * 80)
    prompt = Segment(2, "A voice prompt.", np.ones((3, 32), dtype=np.int64))
    seen = []
    generate = tts.generator.generate

    def spy(piece, speaker, context, sampling, shared=0):
        seen.append([(seg.speaker, seg.text) for seg in context])
        return generate(piece, speaker, context, sampling, shared)

    monkeypatch.setattr(tts.generator, "generate", spy)
    made = list(tts.dialogue_frames(turns, context=[prompt], seed=5, **kw))
    monkeypatch.undo()
    prompt_seen = (2, prompt.text)
    texts = [t for _, t in turns]
    assert seen == [
        [prompt_seen],
        [prompt_seen, (0, texts[0])],
        [prompt_seen, (0, texts[0]), (1, texts[1])],
        [prompt_seen, (1, texts[1]), (0, texts[2])],
    ]
    said: list[Segment] = []  # each speaker's last turn, in the order said
    total = 0
    for i, (speaker, text) in enumerate(turns):
        alone = np.stack(list(tts.frames(text, speaker=speaker, context=[prompt, *said], seed=5 + i, **kw)))
        np.testing.assert_array_equal(np.stack(made[total : total + len(alone)]), alone)
        total += len(alone)
        said = [seg for seg in said if seg.speaker != speaker] + [Segment(speaker, text, alone)]
    assert total == len(made)
    audio = tts.dialogue(turns, context=[prompt], seed=5, **kw)
    assert len(audio) == total * tts.codec.cfg.frame_size


@pytest.mark.parametrize("turns, kwargs, match", [
    ([(0, "Hello."), (-1, "Hi.")], {}, "turn 1: a speaker id is a whole number >= 0, got -1"),
    ([(0, "Hello."), (1, "  ")], {}, "turn 1: text is empty"),
    ([(0, "Hello."), (1, None)], {}, "turn 1: the text to speak must be a string"),
    ([(0, "Hello."), "Hi."], {}, "turn 1 must be a .speaker, text. pair"),
    ([], {}, "no turns to speak"),
    ("0: Hello.", {}, "turns must be a list"),
    ([(0, "Hello.")], {"context": [(0, "Hi.")]}, "context must be a list of Segments"),
    ([(0, "Hello.")], {"context": "Hi."}, "context must be a list of Segments"),
    ([(0, "Hello.")], {"temperature": -1}, "temperature must be a number >= 0"),
    ([(0, "Hello.")], {"temperature": float("inf")}, "temperature must be a number >= 0"),
    ([(0, "Hello.")], {"top_k": 0}, "top_k must be a whole number"),
    ([(0, "Hello.")], {"max_audio_ms": float("nan")}, "max_audio_ms must be a number > 0"),
    ([(0, "Hello.")], {"context": [Segment(-1, "Hi.")]}, "speaker id is a whole number >= 0"),
    ([(0, "Hello.")], {"context": [Segment(1, "Hi.", np.zeros((2, 31), dtype=np.int64))]}, "context codes"),
])
def test_dialogue_checks_every_turn_and_setting_before_speaking(tts, monkeypatch, turns, kwargs, match):
    monkeypatch.setattr(tts.generator, "generate", lambda *a: pytest.fail("generated before checking"))
    with pytest.raises(ValueError, match=match):
        tts.dialogue_frames(turns, **kwargs)  # at the call, not at the first frame


def test_dialogue_takes_turns_from_any_iterable(tts):
    turns = [(0, "Hello."), (1, "Hi.")]
    kw = dict(seed=3, max_audio_ms=160)
    assert np.array_equal(tts.dialogue(iter(turns), context=iter([]), **kw), tts.dialogue(turns, **kw))


def test_say_dialogue_speaks_the_script_with_its_voices(f32_model, tmp_path, monkeypatch):
    prompt_audio, other_audio = tmp_path / "prompt.wav", tmp_path / "other.wav"
    sf.write(prompt_audio, 0.3 * np.sin(np.linspace(0, 400, 24000)), 24000)
    sf.write(other_audio, 0.3 * np.sin(np.linspace(0, 900, 24000)), 24000)
    assert main(["--save-voice", "narrator", "--model", str(f32_model), "--context", "0", "A prompt.",
                 str(prompt_audio)]) == 0
    script = tmp_path / "talk.txt"
    script.write_text("0: Hello there.\n\nnarrator: Who is there?\n0: Just me.\n")
    codes = tmp_path / "codes.npy"
    monkeypatch.chdir(tmp_path)  # the audio file is named after what is said
    assert main(["--dialogue", "-i", str(script), "--model", str(f32_model), "--seed", "7", "--max-audio-ms", "320",
                 "--context", "1", "Another voice.", str(other_audio), "--save-codes", str(codes)]) == 0
    # The narrator was saved as speaker 0, which the script's "0" holds, and 1 is the --context segment's:
    # it speaks, prompt and all, as 2. Voice prompts come before --context segments.
    tts = CSM(f32_model)  # as the command makes it
    try:
        context = [tts.segment(2, "A prompt.", audio=prompt_audio), tts.segment(1, "Another voice.", audio=other_audio)]
        turns = [(0, "Hello there."), (2, "Who is there?"), (0, "Just me.")]
        expected = np.stack(list(tts.dialogue_frames(turns, context=context, seed=7, max_audio_ms=320)))
        frame_size = tts.codec.cfg.frame_size
    finally:
        tts.close()
    np.testing.assert_array_equal(np.load(codes), expected)
    assert sf.info(tmp_path / "hello-there-who-is-there-just.wav").frames == len(expected) * frame_size


def test_dialogue_script_names_speakers_by_id_or_voice():
    from csm_gguf import voices
    from csm_gguf.generator import Segment
    from csm_gguf.script import read_script
    from csm_gguf.tts import Voice

    def prompt(speaker: int, text: str) -> Segment:
        return Segment(speaker, text, np.ones((2, 32), dtype=np.int64))

    voices.save_voice("ann", Voice([prompt(0, "Ann.")], 0))
    voices.save_voice("bob", Voice([prompt(3, "Bob."), prompt(5, "Someone Bob talks to.")], 3))
    voices.save_voice("duo", Voice([prompt(1, "Duo."), prompt(2, "Duo's partner.")], 1))
    # Pasted text: invisible marks around names, and old Mac line ends.
    script = "ann: Hi.\n\n  0 : Hello: there.\rbob\u200b: Yo.\nduo: Hey.\n\u200balloy: Ho.\r\n\u200eann: Bye.\n"
    def load(name: str) -> Voice:  # as CSM.voice, whose built-in voices' prompts need the model
        return Voice([prompt(0, "Alloy's prompt.")], 0) if name == "alloy" else voices.load_voice(name)

    turns, prompts = read_script(script, reserved=[5], load=load)
    # 0 is the script's and 5 another context segment's. Each voice keeps its ids where they are free,
    # else takes the smallest free ones, its other speakers too: ann 0 -> 1; bob keeps 3, his partner
    # 5 -> 2; duo 1 -> 4 and its partner 2 -> 6; alloy (built in as 0) -> 7.
    assert turns == [(1, "Hi."), (0, "Hello: there."), (3, "Yo."), (4, "Hey."), (7, "Ho."), (1, "Bye.")]
    assert [(seg.speaker, seg.text) for seg in prompts] == [
        (1, "Ann."), (3, "Bob."), (2, "Someone Bob talks to."), (4, "Duo."), (6, "Duo's partner."),
        (7, "Alloy's prompt.")]


@pytest.mark.parametrize("script, match", [
    ("Hello there.", "dialogue line 1 names no speaker"),
    ("0: Hi.\n\n1:  ", "dialogue line 3: '1' says nothing"),
    ("0: Hi.\nnobody: Hey.", "dialogue line 2: unknown voice 'nobody'"),
    ("Dr Who: Hi.", "dialogue line 1: bad voice name 'Dr Who'"),
    ("0: Hi.\n-1: Yo.", "dialogue line 2: a speaker id is a whole number >= 0, got -1"),
    ("0: Hi.\r\u200b: Yo.", "dialogue line 2 names no speaker"),
    ("0: Hi,\u2028there.\fOK.\nAlloy: Yo.", r"dialogue line 2: unknown voice 'Alloy' \(saved: none yet; built-in: alloy,"),
    ("\n  \n", "has no turns"),
])
def test_dialogue_script_errors_name_the_line(script, match):
    from csm_gguf.script import read_script

    with pytest.raises(ValueError, match=match):
        read_script(script)


@pytest.mark.parametrize("call, match", [
    (lambda tts: tts.generate(TEXT, speaker=-1), "speaker id is a whole number >= 0"),
    (lambda tts: tts.generate(TEXT, speaker="a"), "speaker id is a whole number >= 0"),
    (lambda tts: tts.generate(TEXT, max_audio_ms=float("inf")), "max_audio_ms must be a number > 0"),
    (lambda tts: tts.generate(None), "must be a string"),
    (lambda tts: tts.generate("\u200b\u200b "), "text is empty"),
    (lambda tts: tts.generate("caf\udce9"), "characters that are not Unicode"),
    (lambda tts: tts.generate(TEXT, seed=-1), "seed must be a whole number >= 0"),
    (lambda tts: tts.generate(TEXT, seed="1"), "seed must be a whole number >= 0"),
    (lambda tts: tts.stream(TEXT, chunk_frames=0), "chunk_frames must be a whole number >= 1"),
    (lambda tts: tts.stream(TEXT, speed=0), "speed must be a number from 0.25 to 4.0"),
    (lambda tts: tts.generate(TEXT, speed="fast"), "speed must be a number from 0.25 to 4.0"),
    (lambda tts: tts.decode(np.zeros(32, dtype=np.int64)), r"shape \(frames, 32\)"),
    (lambda tts: tts.decode(np.zeros((5, 32)) + 0.5), "whole numbers"),
    (lambda tts: tts.decode(np.full((5, 32), 64)), r"lie in 0..63"),
    (lambda tts: list(tts.decode_stream([np.zeros(31, dtype=np.int64)])), r"shape \(frames, 32\)"),
    (lambda tts: list(tts.decode_stream([np.full(32, 64)])), r"lie in 0..63"),
    (lambda tts: tts.encode(np.zeros(0, dtype=np.float32)), "audio to encode must be samples"),
    (lambda tts: tts.encode(np.full(4800, np.nan, dtype=np.float32)), "NaN or infinite samples"),
    (lambda tts: tts.encode(np.zeros((2, 4800), dtype=np.float32)), r"looks like \(channels, samples\)"),
    (lambda tts: tts.encode(np.zeros((0, 2), dtype=np.float32)), r"got float32 of shape \(0, 2\)"),
    (lambda tts: tts.encode([1000, -2000, 3000]), "int64: convert them"),
    (lambda tts: tts.decode(np.int64(3)), r"shape \(frames, 32\), got \(\)"),
    (lambda tts: tts.decode(np.zeros((0, 5), dtype=np.int64)), r"shape \(frames, 32\), got \(0, 5\)"),
])
def test_api_refuses_bad_arguments_clearly(tts, call, match):
    with pytest.raises(ValueError, match=match):
        call(tts)


def test_context_audio_longer_than_the_context_is_refused_before_encoding(tts, monkeypatch):
    """Five minutes of reference audio took 3 minutes and 10 GB to encode, then did not fit."""
    monkeypatch.setattr(tts, "encode", lambda *a: pytest.fail("encoded"))
    seconds = tts.model.config.backbone.max_seq_len * 0.08
    with pytest.raises(ValueError, match=f"more than the {seconds:g} s of audio the model's whole context holds"):
        tts.segment(0, "Words.", audio=np.zeros(round((seconds + 0.1) * 24_000), np.float32))


def test_a_voice_is_saved_with_its_codes_or_not_at_all():
    from csm_gguf import voices

    with pytest.raises(ValueError, match="from 0 to 32767"):  # int16 storage would wrap 70000 to 4464
        voices.save_voice("wide", voices.Voice([Segment(0, "Words.", np.full((2, 32), 70_000))]))
    assert voices.list_voices() == []


def test_segment_checks_its_codes(tts):
    with pytest.raises(ValueError, match="context codes must lie in 0..63"):
        tts.segment(0, "Words.", codes=np.full((5, 32), 64))
    with pytest.raises(ValueError, match="audio or its codes"):
        tts.segment(0, "Words.")


def test_encode_takes_pcm_and_stereo_arrays_like_float_mono(tts):
    mono = (0.5 * np.sin(np.arange(4800) / 7)).astype(np.float32)
    expected = tts.encode(mono)
    np.testing.assert_array_equal(tts.encode(np.stack([mono, mono], axis=1)), expected)
    pcm = np.round(mono * 32768).astype(np.int16)
    np.testing.assert_array_equal(tts.encode(pcm), tts.encode(pcm / 32768))
    u8 = np.round(mono * 127 + 128).astype(np.uint8)  # 8-bit WAV's unsigned samples
    np.testing.assert_array_equal(tts.encode(u8), tts.encode((u8 - 128.0) / 128))
    wav = io.BytesIO()
    sf.write(wav, mono, 24_000, format="WAV", subtype="FLOAT")
    wav.seek(0)
    np.testing.assert_array_equal(tts.encode(wav), expected)  # a file object, like a path
    assert np.abs(pcm / 32768 - mono).max() < 1e-4


def test_budget_is_proportional_to_text(tts):
    short, long = tts.frame_budget("Hi.", None), tts.frame_budget("A much longer sentence " * 5, None)
    assert short < long
    assert tts.frame_budget("Hi.", 1234.0) == 1234.0


@pytest.mark.parametrize("args, message", [
    (["", "-o", "{tmp}/x.wav"], "no text"),
    (["\u200b\ufeff", "-o", "{tmp}/x.wav"], "no text"),
    (["caf\udce9", "-o", "{tmp}/x.wav"], "TEXT is not valid UTF-8"),  # what Python makes of latin-1 argv bytes
    (["hi", "--input", "{tmp}/latin1.txt", "-o", "{tmp}/x.wav"], "either as TEXT or with --input, not both"),
    (["--input", "{tmp}/utf16.txt", "-o", "{tmp}/x.wav"], "holds NUL bytes, so it is not UTF-8 text (UTF-16?)"),
    (["hi", "--voice", "nobody", "-o", "{tmp}/x.wav"], "unknown voice 'nobody'"),
    (["hi", "--temperature", "-1", "-o", "{tmp}/x.wav"], "--temperature must be a number >= 0"),
    (["hi", "--temperature", "inf", "-o", "{tmp}/x.wav"], "--temperature must be a number >= 0"),
    (["hi", "--top-k", "0", "-o", "{tmp}/x.wav"], "--top-k must be from 1 to 2147483647"),
    (["hi", "--top-k", "99999999999", "-o", "{tmp}/x.wav"], "--top-k must be from 1"),  # not top_k, after loading
    (["hi", "--context", "0", "words", "{tmp}/missing.wav", "-o", "{tmp}/x.wav"], "missing.wav"),
    (["hi", "--context", "0", "words", "{tmp}/garbage.wav", "-o", "{tmp}/x.wav"], "garbage.wav"),
    (["hi", "-o", "{tmp}/x.m4a"], "unknown audio extension '.m4a'"),
    (["hi", "--codec-device", "nonsense", "-o", "{tmp}/x.wav"], "codec device 'nonsense' is not usable"),
    *([(["hi", "--codec-device", "cuda", "-o", "{tmp}/x.wav"], "codec device 'cuda' is not usable")]
      if not torch.cuda.is_available() else []),
    (["hi", "--codec-device", "meta", "-o", "{tmp}/x.wav"], "codec device 'meta' is not usable"),
    (["hi", "-o", "{tmp}/nowhere/x.wav"], "nowhere does not exist"),
    (["hi", "-o", "{tmp}/garbage.wav/x.wav"], "garbage.wav is not a folder"),
    (["hi", "-o", "{tmp}/voices", "-f", "wav"], "is a folder: give a file name"),
    (["hi", "-o", "{tmp}/x.wav", "--save-codes", "{tmp}/nowhere/c.npy"], "cannot write --save-codes"),
    (["hi", "--threads", "-3", "-o", "{tmp}/x.wav"], "--threads must be >= 0"),
    (["hi", "--seed", "-1", "-o", "{tmp}/x.wav"], "--seed must be >= 0"),
    (["hi", "--speaker", "-5", "-o", "{tmp}/x.wav"], "--speaker must be >= 0"),
    (["hi", "--context", "-1", "words", "{tmp}/tone.wav", "-o", "{tmp}/x.wav"], "speaker must be a whole number"),
    (["hi", "--context", "0", "words", "{tmp}/float.npy", "-o", "{tmp}/x.wav"], "codes are whole numbers"),
    (["hi", "--max-audio-ms", "inf", "-o", "{tmp}/x.wav"], "--max-audio-ms must be"),
    (["hi", "--speed", "4.5", "-o", "{tmp}/x.wav"], "--speed must be from 0.25 to 4.0"),
    (["--input", "{tmp}/latin1.txt", "-o", "{tmp}/x.wav"], "latin1.txt is not UTF-8"),
    (["hi", "--voice", "broken", "-o", "{tmp}/x.wav"], "voice 'broken' is damaged"),
    (["hi", "--voice", "empty", "-o", "{tmp}/x.wav"], "voice 'empty' is damaged"),
    (["--save-voice", "none", "--context", "0", "words", "{tmp}/tone.wav"], "'none' means no voice prompt"),
    (["hi", "--context", "0", "words", "{tmp}/archive.NPY", "-o", "{tmp}/x.wav"], "is an archive of arrays"),
    (["hi", "--context", "0", "words", "{tmp}/no-frames.npy", "-o", "{tmp}/x.wav"], "hold no frames"),
    (["hi", "--context", "0", "words", "{tmp}/zero-bytes.npy", "-o", "{tmp}/x.wav"], "zero-bytes.npy: No data left"),
    (["hi", "--context", "0", "words", "{tmp}/scalar.npy", "-o", "{tmp}/x.wav"],
     "scalar.npy: context codes must have shape (frames, 32), got ()"),
    (["--save-voice", "v", "--context", "0", "words", "{tmp}/wrapping.npy"], "wrapping.npy: context codes must lie in"),
    (["hi", "--context", "0", "words", "{tmp}/nan.wav", "-o", "{tmp}/x.wav"], "nan.wav: audio to encode has NaN"),
    (["hi", "-o", "{tmp}/x.wav", "--save-codes", "-"], "--save-codes needs a file name"),
    (["0: hi", "--dialogue", "--voice", "alloy", "-o", "{tmp}/x.wav"], "do not apply to --dialogue"),
    (["0: hi\nnobody: hey", "--dialogue", "-o", "{tmp}/x.wav"], "dialogue line 2: unknown voice 'nobody'"),
    (["0: hi", "--dialogue", "--save-voice", "v", "--context", "0", "words", "{tmp}/tone.wav", "-o", "{tmp}/x.wav"],
     "--save-voice and --dialogue go in separate runs"),
    (["--save-voice", "42", "--context", "0", "words", "{tmp}/tone.wav"], "is all digits"),
    (["--save-voice", "alloy\n", "--context", "0", "words", "{tmp}/tone.wav"], "bad voice name 'alloy\\n'"),
    (["--save-voice", "broken", "--context", "0", "words", "{tmp}/tone.wav"],
     "voice 'broken' exists: delete it first (--delete-voice broken)"),
    (["hi", "--delete-voice", "broken", "-o", "{tmp}/x.wav"], "--delete-voice runs on its own"),
    (["--list-voices", "--delete-voice", "broken"], "--list-voices runs on its own"),
    (["--delete-voice", "alloy"], "'alloy' is a built-in voice; only saved voices can be deleted"),
])
def test_bad_input_is_a_clear_error_with_no_output(f32_model, tmp_path, capsys, args, message):
    (tmp_path / "garbage.wav").write_bytes(b"RIFF nonsense")
    (tmp_path / "latin1.txt").write_bytes("Café au lait.".encode("latin-1"))
    (tmp_path / "utf16.txt").write_bytes("Hi.".encode("utf-16-le"))
    np.save(tmp_path / "float.npy", np.full((3, 32), 1.5))
    np.save(tmp_path / "no-frames.npy", np.zeros((0, 32), dtype=np.int64))
    (tmp_path / "zero-bytes.npy").write_bytes(b"")
    np.save(tmp_path / "scalar.npy", np.int64(5))
    np.save(tmp_path / "wrapping.npy", np.full((5, 32), 65541))  # int16 storage made it 5, silently
    sf.write(tmp_path / "nan.wav", np.full(2400, np.nan, np.float32), 24_000, subtype="FLOAT")
    with open(tmp_path / "archive.NPY", "wb") as f:  # what a saved voice holds, under a codes file's name
        np.savez(f, codes_0=np.zeros((3, 32), dtype=np.int16))
    sf.write(tmp_path / "tone.wav", np.sin(np.arange(24_000) / 10).astype(np.float32), 24_000)
    (tmp_path / "voices").mkdir()
    (tmp_path / "voices" / "broken.npz").write_bytes(b"not a voice")
    (tmp_path / "voices" / "empty.npz").write_bytes(b"")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in args] + ["--model", str(f32_model)]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.wav").exists() and not (tmp_path / "x.aac").exists()
    assert not (tmp_path / "voices" / "v.npz").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_stdin_and_files_are_utf8_with_or_without_a_byte_order_mark(tmp_path):
    script = tmp_path / "talk.txt"
    script.write_bytes("\ufeff0: Café.\r\n1: Oui.\r\n".encode())
    no_model = ["--model", str(tmp_path / "no-model")]  # reaching the model would fail on this instead
    for args, stdin in ((["--dialogue", "-i", str(script)], b""), (["--dialogue", "-"], script.read_bytes()),
                        (["--dialogue", "-i", "-"], script.read_bytes())):
        done = subprocess.run([sys.executable, "-m", "csm_gguf.say", *args, "-o", str(tmp_path / "x.wav"), *no_model],
                              input=stdin, capture_output=True)
        assert b"dialogue line" not in done.stderr and b"no-model" in done.stderr  # the script was read
    done = subprocess.run([sys.executable, "-m", "csm_gguf.say", "-", *no_model], input="Café.".encode("latin-1"),
                          capture_output=True)
    assert done.returncode == 2
    assert done.stderr.decode().strip() == ("error: standard input is not UTF-8 text (invalid continuation byte at "
                                            "byte 3): save it as UTF-8")
    done = subprocess.run([sys.executable, "-m", "csm_gguf.say", "-", *no_model], preexec_fn=lambda: os.close(0),
                          capture_output=False, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert (done.returncode, done.stderr) == (2, b"error: cannot read standard input: it is closed\n")


def test_voice_names_and_folder_are_checked_before_the_model_loads(tmp_path, monkeypatch, capsys):
    sf.write(tmp_path / "tone.wav", np.zeros(2400, np.float32), 24_000)
    no_model = ["--model", str(tmp_path / "no-model")]  # reaching the model would fail on this instead
    save = ["--context", "0", "words", str(tmp_path / "tone.wav")]
    assert main(["--save-voice", "my voice", *save, *no_model]) == 2
    assert "bad voice name 'my voice'" in capsys.readouterr().err
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("CSM_GGUF_VOICES", str(tmp_path / "a-file"))
    assert main(["--save-voice", "mine", *save, *no_model]) == 2
    assert "a-file is a file: set CSM_GGUF_VOICES to a folder" in capsys.readouterr().err
    assert main(["--list-voices"]) == 2
    assert "is a file" in capsys.readouterr().err


def saved_lines(listing: str) -> list[str]:
    """--list-voices' lines on saved voices (the built-in ones come first)."""
    return [line for line in listing.splitlines() if ": built-in, " not in line]


def test_only_usable_names_are_listed_as_voices(tmp_path, monkeypatch):
    from csm_gguf import voices
    from csm_gguf.generator import Segment
    from csm_gguf.tts import Voice

    voices.save_voice("kept", Voice([Segment(0, "Words.", np.zeros((2, 32), dtype=np.int64))], speaker=0))
    folder = voices.voices_dir()
    for name in ("with space.npz", ".hidden.npz", "none.npz"):
        (folder / name).write_bytes((folder / "kept.npz").read_bytes())
    (folder / "folder.npz").mkdir()
    assert voices.list_voices() == ["kept"]


def test_damaged_voices_are_listed_as_damaged(tmp_path, capsys):
    """A damaged voice fails in numpy's, zipfile's, zlib's or json's ways: each was a traceback that
    listed nothing."""
    import json
    import zipfile

    from csm_gguf import voices
    from csm_gguf.tts import Voice

    voices.save_voice("good", Voice([Segment(0, "Words.", np.zeros((2, 32), dtype=np.int64))], speaker=0))
    folder = voices.voices_dir()
    meta = lambda speaker: np.array(json.dumps({"speaker": speaker, "segments": [{"speaker": 0, "text": "x"}]}))
    np.savez(folder / "scalar.npz", meta=meta(0), codes_0=np.int16(3))
    with open(folder / "infinite.npz", "wb") as f:  # json reads Infinity; int() of it overflows
        np.savez(f, meta=np.array('{"speaker": Infinity, "segments": []}'))
    np.savez_compressed(folder / "inflate.npz", meta=meta(0), codes_0=np.zeros((50, 32), np.int16))
    data = bytearray((folder / "inflate.npz").read_bytes())
    data[60:70] = b"\xff" * 10  # inside the first member's deflate stream
    (folder / "inflate.npz").write_bytes(bytes(data))
    with zipfile.ZipFile(folder / "method.npz", "w") as z:  # a compression method numpy cannot read
        z.writestr("meta.npy", b"x", compress_type=zipfile.ZIP_LZMA)
    assert main(["--list-voices"]) == 0
    lines = saved_lines(capsys.readouterr().out)
    assert [line.split(":")[0] for line in lines] == ["good", "infinite", "inflate", "method", "scalar"]
    assert lines[0].startswith("good: speaker 0") and all("is damaged" in line for line in lines[1:])


def test_no_model_offline_says_what_to_do(tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants as c

    monkeypatch.setenv("CSM_GGUF_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("CSM_GGUF_MODEL", raising=False)
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    assert main(["Hello"]) == 2
    err = capsys.readouterr().err
    assert "unreachable" in err and "python -m csm_gguf.convert" in err and "--model DIR" in err
    assert list(tmp_path.glob("*.wav")) == []


def test_first_run_of_another_model_id_is_converted_once(f32_model, tmp_path, monkeypatch, capsys):
    """The first run converts --model-id into the cache; later runs find it there (offline here: a second
    conversion would fail) instead of converting again."""
    import huggingface_hub.constants as c

    from csm_gguf.model_dir import default_model_dir

    monkeypatch.setenv("CSM_GGUF_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("CSM_GGUF_MODEL", raising=False)
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    earlier = default_model_dir("someone/csm-finetune", "q4_k")
    earlier.parent.mkdir(parents=True)
    earlier.symlink_to(f32_model, target_is_directory=True)
    assert main(["Hello", "--model-id", "someone/csm-finetune", "--max-audio-ms", "160",
                 "-o", str(tmp_path / "a.wav")]) == 0
    assert "converting" not in capsys.readouterr().err
