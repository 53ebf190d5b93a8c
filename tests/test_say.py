"""The say command end to end on the tiny model (with its tiny codec)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

from api_fixtures import TEXT, reference_audio
from audio_fixtures import needs_ffmpeg
from csm_gguf.audio import load_audio, to_int16
from csm_gguf.generator import Segment
from csm_gguf.plan import context_room
from csm_gguf.say import main
from csm_gguf.tts import CSM

pytestmark = pytest.mark.usefixtures("voices_home")  # a voices folder of its own


def test_codes_that_cannot_be_written_are_named_and_the_audio_kept(f32_model, tmp_path, monkeypatch, capsys):
    import errno

    from csm_gguf import atomic

    def full(path, data, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic, "write_atomic", full)  # save_codes's: the audio is written by its own writer
    out, codes = tmp_path / "a.wav", tmp_path / "a.npy"
    assert main(["Hi.", "--model", str(f32_model), "--voice", "none", "--max-audio-ms", "400", "-o", str(out),
                 "--save-codes", str(codes)]) == 2
    err = capsys.readouterr().err
    assert f"cannot write --save-codes {codes} (No space left on device); the audio is whole in {out}" in err
    assert sf.info(out).frames > 0 and not codes.exists()


def test_say_speed(f32_model, tts, tmp_path):
    common = [TEXT, "--model", str(f32_model), "--seed", "2", "--max-audio-ms", "800", "--format", "wav"]
    assert main([*common, "--speed", "2", "-o", str(tmp_path / "a.wav"), "--save-codes", str(tmp_path / "a.npy")]) == 0
    audio, rate = sf.read(tmp_path / "a.wav", dtype="int16")
    codes = np.load(tmp_path / "a.npy")
    # say decodes five frames at a time; the same chunks give the same audio to stretch
    expected = np.concatenate(list(tts.decode_stream(codes, chunk_frames=5, speed=2)))
    assert len(expected) == len(codes) * tts.codec.cfg.frame_size // 2
    np.testing.assert_array_equal(audio, to_int16(expected))


def test_real_time_factor_leaves_out_loading_the_codec(f32_model, tmp_path, monkeypatch, capsys):
    """The codec loads on first use, which took 2-4 s with the full-size one: the summary line counted it."""
    import re
    import time

    from csm_gguf.mimi import Mimi

    load = Mimi.from_runtime_tensors
    monkeypatch.setattr(Mimi, "from_runtime_tensors", classmethod(lambda cls, *a: (time.sleep(5), load(*a))[1]))
    assert main([TEXT, "--model", str(f32_model), "--max-audio-ms", "160", "-o", str(tmp_path / "a.wav")]) == 0
    wall = float(re.search(r"audio in ([\d.]+) s", capsys.readouterr().err)[1])
    assert wall < 5  # a loaded machine's margin: with the loading counted it is over 5


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
    monkeypatch.setenv("CSM_GGUF_PLAYER", "my-player 'unclosed")
    assert main(common) == 2
    assert "CSM_GGUF_PLAYER=\"my-player 'unclosed\" is not a command: No closing quotation" in capsys.readouterr().err
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


def test_play_says_when_ffplay_has_no_sound_device(f32_model, tmp_path, monkeypatch, capsys):
    """ffplay with no sound device prints that, stops reading and exits 0: the speech is still written,
    ffplay's message passed on, and the command fails saying nothing was heard."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "ffplay").write_text(f"""#!{sys.executable}
import sys
print("SDL_OpenAudio (1 channels, 24000 Hz): ALSA: Couldn't open audio device", file=sys.stderr)
print("No more combinations to try, audio open failed", file=sys.stderr)
""")
    (bin_ / "ffplay").chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_))
    common = [TEXT, "--model", str(f32_model), "--seed", "1", "--max-audio-ms", "800", "--play"]
    assert main([*common, "-o", str(tmp_path / "x.wav")]) == 2 and sf.info(tmp_path / "x.wav").frames > 0
    err = capsys.readouterr().err
    assert "ALSA: Couldn't open audio device" in err
    assert "the audio player ffplay could not open a sound device, so nothing was heard" in err


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


def test_a_voice_is_saved_only_if_it_can_be_spoken_in(f32_model, tts, tmp_path, capsys):
    """A voice whose prompt leaves a piece of text no room in the model's context failed at every use, and one
    of a single sample was saved as a voice."""
    too_long = context_room(tts.model.config.backbone.max_seq_len) - len(tts.model.prompt_tokens(0, "words"))
    np.save(tmp_path / "long.npy", np.ones((too_long, 32), np.int64))
    np.save(tmp_path / "fits.npy", np.ones((too_long - 1, 32), np.int64))
    sf.write(tmp_path / "blip.wav", np.zeros(1, np.float32), 24_000)
    save = ["--model", str(f32_model), "--save-voice", "v", "--context", "0", "words"]
    assert main([*save, str(tmp_path / "long.npy")]) == 2
    assert f"--context {tmp_path / 'long.npy'}: the context takes" in capsys.readouterr().err
    assert main([*save, str(tmp_path / "blip.wav")]) == 2
    assert "a voice needs at least 1 s of speech" in capsys.readouterr().err
    assert not (tmp_path / "voices" / "v.npz").exists()
    assert main([*save, str(tmp_path / "fits.npy")]) == 0
    assert main(["Hi.", "--model", str(f32_model), "--voice", "v", "--max-audio-ms", "160", "-o",
                 str(tmp_path / "x.wav")]) == 0


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
    ("0: Hi.\nnone: Hey.", "dialogue line 2: 'none' is no speaker: a turn without a voice prompt names its"),
    ("Dr Who: Hi.", "dialogue line 1: bad voice name 'Dr Who'"),
    ("0: Hi.\n-1: Yo.", "dialogue line 2: a speaker id is a whole number >= 0, got -1"),
    ("0: Hi.\r\u200b: Yo.", "dialogue line 2 names no speaker"),
    ("0: Hi,\u2028there.\fOK.\nAlloy: Yo.",
     r"dialogue line 2: unknown voice 'Alloy' \(saved: none yet; built-in: alloy,"),
    ("\n  \n", "has no turns"),
])
def test_dialogue_script_errors_name_the_line(script, match):
    from csm_gguf.script import read_script

    with pytest.raises(ValueError, match=match):
        read_script(script)


def test_a_voice_is_saved_with_its_codes_or_not_at_all():
    from csm_gguf import voices

    with pytest.raises(ValueError, match="from 0 to 32767"):  # int16 storage would wrap 70000 to 4464
        voices.save_voice("wide", voices.Voice([Segment(0, "Words.", np.full((2, 32), 70_000))]))
    assert voices.list_voices() == []


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
    (["hi", "--threads", "-3", "-o", "{tmp}/x.wav"], "--threads must be from 0 (all cores) to"),
    (["hi", "--seed", "-1", "-o", "{tmp}/x.wav"], "--seed must be >= 0"),
    (["hi", "--speaker", "-5", "-o", "{tmp}/x.wav"], "--speaker must be >= 0"),
    (["hi", "--context", "-1", "words", "{tmp}/tone.wav", "-o", "{tmp}/x.wav"], "speaker must be a whole number"),
    (["hi", "--context", "0", "words", "{tmp}/float.npy", "-o", "{tmp}/x.wav"], "codes are whole numbers"),
    (["hi", "--max-audio-ms", "inf", "-o", "{tmp}/x.wav"], "--max-audio-ms must be"),
    (["hi", "--speed", "4.5", "-o", "{tmp}/x.wav"], "--speed must be from 0.25 to 4.0"),
    (["--input", "{tmp}/latin1.txt", "-o", "{tmp}/x.wav"], "latin1.txt is not UTF-8"),
    (["hi", "--voice", "broken", "-o", "{tmp}/x.wav"],  # not numpy's advice to load it unsafely
     "voice 'broken' is damaged (not a numpy file (.npy or .npz)): delete it and save it again"),
    (["hi", "--context", "0", "words", "{tmp}/latin1.npy", "-o", "{tmp}/x.wav"],
     "cannot read codes {tmp}/latin1.npy: not a numpy file (.npy or .npz); give a .npy file written by"),
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
    (["--save-voice", "ALLOY", "--context", "0", "words", "{tmp}/tone.wav"],
     "voice name 'ALLOY' differs from voice 'alloy' only in case, and on macOS and Windows their files are one"),
    (["--save-voice", "Broken", "--context", "0", "words", "{tmp}/tone.wav"], "differs from voice 'broken' only in"),
    (["--save-voice", "con.2", "--context", "0", "words", "{tmp}/tone.wav"], "'con.2' is a device's name on Windows"),
    (["--save-voice", "alloy\n", "--context", "0", "words", "{tmp}/tone.wav"], "bad voice name 'alloy\\n'"),
    (["--save-voice", "broken", "--context", "0", "words", "{tmp}/tone.wav"],
     "voice 'broken' exists: delete it first (--delete-voice broken)"),
    (["hi", "--delete-voice", "broken", "-o", "{tmp}/x.wav"], "--delete-voice runs on its own"),
    (["--list-voices", "--delete-voice", "broken"], "--list-voices runs on its own"),
    (["--list-voices", "--speaker", "3"], "--list-voices runs on its own"),  # they were ignored
    (["--list-voices", "--dialogue"], "--list-voices runs on its own"),
    (["--delete-voice", "broken", "--seed", "3"], "--delete-voice runs on its own"),
    (["--delete-voice", "alloy"], "'alloy' is a built-in voice; only saved voices can be deleted"),
])
def test_bad_input_is_a_clear_error_with_no_output(f32_model, tmp_path, capsys, args, message):
    (tmp_path / "garbage.wav").write_bytes(b"RIFF nonsense")
    (tmp_path / "latin1.txt").write_bytes("Café au lait.".encode("latin-1"))
    (tmp_path / "latin1.npy").write_bytes("Café au lait.".encode("latin-1"))
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
    assert message.replace("{tmp}", str(tmp_path)) in capsys.readouterr().err
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


@pytest.mark.parametrize("args, message", [
    (["hi", "-o", "{tmp}/x.npy", "--save-codes", "{tmp}/./x.npy", "-f", "wav"],
     "--output and --save-codes both name {tmp}/x.npy: the codes would replace the audio"),
    (["hi", "-o", "{tmp}/x.mp3", "-f", "wav"], "--format wav, but {tmp}/x.mp3 is named for mp3"),
    (["hi", "-o", "{tmp}/x.wav", "-f", "pcm"], "--format pcm, but {tmp}/x.wav is named for wav"),
    (["hi", "-o", ""], "--output is empty: give a file name"),
    (["hi", "-o", "{tmp}/x.wav", "--save-codes", ""], "--save-codes is empty"),
    (["-i", ""], "--input is empty"),
    (["--save-voice", "v", "--context", "0", "words", "{tmp}/tone.wav", "-o", "{tmp}/x.wav", "--seed", "3"],
     "--output, --seed: for speaking, and there is no text to speak"),
    (["--save-voice", "v", "--voice", "nova", "--context", "0", "words", "{tmp}/tone.wav"], "--voice: for speaking"),
    (["hi", "--context", "0", "words", "{tmp}/missing.wav", "-o", "{tmp}/x.wav"],
     "--context {tmp}/missing.wav: no such file"),
    (["hi", "--context", "0", "words", "{tmp}", "-o", "{tmp}/x.wav"], "is a folder: give an audio file"),
    (["hi", "--context", "0", "words", "-", "-o", "{tmp}/x.wav"], "--context reads a file, not standard input"),
    (["hi", "--threads", "100000", "-o", "{tmp}/x.wav"], "--threads must be from 0 (all cores) to"),
    (["hi", "--gpu-layers", "-5", "-o", "{tmp}/x.wav"], "--gpu-layers must be -1 or 99 (all layers)"),
    (["hi", "--gpu-layers", str(2**31), "-o", "{tmp}/x.wav"], "--gpu-layers must be -1 or 99 (all layers)"),  # int32
    (["hi", "--context", "0", "caf\udce9", "{tmp}/tone.wav", "-o", "{tmp}/x.wav"],  # Latin-1 bytes in a UTF-8 terminal
     "--context {tmp}/tone.wav: its TEXT is not valid UTF-8"),
])
def test_outputs_and_files_are_checked_before_the_model_loads(tmp_path, capsys, args, message):
    sf.write(tmp_path / "tone.wav", np.zeros(2400, np.float32), 24_000)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in args] + ["--model", str(tmp_path / "no-model")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message.replace("{tmp}", str(tmp_path)) in err and "no-model" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tone.wav"]


def test_a_model_that_is_a_file_is_named_as_such(tmp_path, capsys):
    (tmp_path / "speech.wav").write_bytes(b"")
    assert main(["hi", "-o", str(tmp_path / "x.wav"), "--model", str(tmp_path / "speech.wav")]) == 2
    assert "speech.wav is a file, not a model directory" in capsys.readouterr().err


def test_audio_to_a_closed_stdout_is_refused_before_the_model_loads(tmp_path):
    say = [sys.executable, "-m", "csm_gguf.say", "hi", "-o", "-", "--model", str(tmp_path / "no-model")]
    done = subprocess.run(say, preexec_fn=lambda: os.close(1), stderr=subprocess.PIPE)
    assert done.returncode == 2
    assert done.stderr == b"error: cannot write to standard output: it is closed; give -o FILE\n"


@pytest.mark.skipif(sys.platform == "win32", reason="a pseudo-terminal")
def test_audio_to_a_terminal_is_refused_before_the_model_loads(tmp_path):
    import pty

    leader, follower = pty.openpty()
    try:
        say = [sys.executable, "-m", "csm_gguf.say", "hi", "-o", "-", "--model", str(tmp_path / "no-model")]
        done = subprocess.run(say, stdout=follower, stderr=subprocess.PIPE, timeout=60)
    finally:
        os.close(follower)
        os.close(leader)
    assert done.returncode == 2 and b"which is a terminal here: pipe it" in done.stderr


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

    def meta(speaker):
        return np.array(json.dumps({"speaker": speaker, "segments": [{"speaker": 0, "text": "x"}]}))

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
