import gc
import io
import os
import signal
import stat
import struct
import subprocess
import sys
import threading
import time
import wave

import numpy as np
import pytest
import soundfile as sf

from audio_fixtures import EVERY_FORMAT, needs_ffmpeg
from csm_gguf import audio, ffmpeg
from csm_gguf.audio import (
    FORMATS,
    MEDIA_TYPES,
    SAMPLE_RATE,
    AudioError,
    StreamEncoder,
    check_format,
    encode_audio,
    format_from_path,
    load_audio,
    resample,
    to_int16,
    write_audio,
)

# An MPEG-2 layer III frame at 24 kHz holds 576 samples. A streamed MP3 cannot carry the
# gapless info frame, so it decodes longer than its input by the placeholder frame (576),
# the encoder delay (about 1100) and the last frame's padding (< 576): under 4 frames.
MP3_FRAME = 576
MP3_STREAM_SLACK = 4 * MP3_FRAME


def tone(freq: float, rate: int = SAMPLE_RATE, seconds: float = 1.0, amp: float = 0.5):
    return (amp * np.sin(2 * np.pi * freq * np.arange(int(rate * seconds)) / rate)).astype(
        np.float32
    )


def amplitude(x: np.ndarray, freq: float, rate: int = SAMPLE_RATE) -> float:
    """Amplitude of a sinusoid at freq (Hann-windowed DFT bin); insensitive to codec delay."""
    w = np.hanning(len(x))
    phasor = np.exp(-2j * np.pi * freq * np.arange(len(x)) / rate)
    return float(2 * np.abs(np.sum(x * w * phasor)) / np.sum(w))


def decode(data: bytes, dtype: str = "float32"):
    if data[:2] == b"\xff\xf1":  # ADTS AAC (MPEG-4, no CRC): libsndfile cannot read it
        data = ffmpeg.decode_to_wav(io.BytesIO(data), "aac")
    with sf.SoundFile(io.BytesIO(data)) as f:
        return f.read(dtype=dtype), f.samplerate, f.channels


# ADTS AAC carries no gapless info: it decodes with the encoder's 1024 priming samples first and the
# last frame (1024 samples) padded out.
AAC_FRAME = 1024


# A 2.003 s signal: not a whole number of codec frames, with a tone and a clipped burst.
SIGNAL = tone(440, seconds=2.003)
SIGNAL[1000:1100] *= 3


# --- formats ---------------------------------------------------------------------------


def test_formats_and_media_types():
    assert FORMATS == ("wav", "flac", "mp3", "opus", "aac", "pcm")
    assert MEDIA_TYPES == {
        "wav": "audio/wav",
        "flac": "audio/flac",
        "mp3": "audio/mpeg",
        "opus": "audio/ogg",
        "aac": "audio/aac",
        "pcm": "audio/pcm",
    }


@pytest.mark.parametrize(
    "path, fmt",
    [
        ("a.wav", "wav"),
        ("dir.x/A.WAV", "wav"),
        ("a.flac", "flac"),
        ("a.mp3", "mp3"),
        ("a.opus", "opus"),
        ("a.ogg", "opus"),
        ("a.aac", "aac"),
        ("a.pcm", "pcm"),
        ("a.raw", "pcm"),
    ],
)
def test_format_from_path(path, fmt):
    assert format_from_path(path) == fmt


@pytest.mark.parametrize("path", ["speech.m4a", "speech", "speech.wav.txt"])
def test_format_from_path_unknown(path):
    with pytest.raises(AudioError, match=r"(?s)" + path.replace(".", r"\.") + ".*\\.wav.*\\.mp3"):
        format_from_path(path)


def test_aac_without_ffmpeg_is_refused_naming_it(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no ffmpeg on it
    for call in (
        lambda: check_format("aac"),
        lambda: encode_audio(SIGNAL, "aac"),
        lambda: StreamEncoder("aac"),
    ):
        with pytest.raises(AudioError, match="AAC output needs ffmpeg, which is not on PATH: .*apt-get install ffmpeg"):
            call()
    with pytest.raises(ValueError, match="'ogg'.*wav, flac, mp3, opus, aac, pcm"):
        check_format("ogg")


# --- float -> int16 --------------------------------------------------------------------


def test_to_int16_clips_and_rounds():
    x = np.array([-3.0, -1.0, -0.5, 0.0, 0.49 / 32767, 0.51 / 32767, -0.51 / 32767, 1.0, 1.5])
    assert to_int16(x).tolist() == [-32767, -32767, -16384, 0, 0, 1, -1, 32767, 32767]
    assert to_int16(x).dtype == np.int16
    assert to_int16(np.array([np.nan, np.inf, -np.inf])).tolist() == [0, 32767, -32767]


@pytest.mark.parametrize("fmt", EVERY_FORMAT)
def test_nan_samples_are_written_as_silence(fmt):
    """LAME aborted the whole process (a server with it) on one NaN sample."""
    x = tone(440)
    x[3000:3010] = np.nan
    silenced = np.nan_to_num(x, nan=0.0)
    same = (lambda a, b: np.array_equal(decode(a)[0], decode(b)[0])) if fmt == "opus" else bytes.__eq__  # Ogg serials
    assert same(encode_audio(x, fmt), encode_audio(silenced, fmt))
    assert same(b"".join(stream(fmt, x)), b"".join(stream(fmt, silenced)))


def test_integer_pcm_is_scaled_not_clipped():
    x = tone(440)
    pcm16 = np.round(x * 32767).astype(np.int16)
    assert encode_audio(pcm16, "wav") == encode_audio(pcm16 / 32768, "wav")
    u8 = np.round(x * 127 + 128).astype(np.uint8)  # 8-bit WAV's unsigned samples
    np.testing.assert_allclose(audio.as_float(u8), x, atol=1 / 128)
    with pytest.raises(AudioError, match="int64"):
        audio.as_float(np.array([1000, -2000]))  # a list of Python ints: 16- or 32-bit PCM?


# --- whole-file encoding ---------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["wav", "flac"])
def test_encode_lossless_round_trip(fmt):
    data = encode_audio(SIGNAL, fmt)
    y, rate, channels = decode(data, "int16")
    assert (rate, channels) == (SAMPLE_RATE, 1)
    np.testing.assert_array_equal(y, to_int16(SIGNAL))
    assert y.max() == 32767  # the clipped burst saturates instead of wrapping around


def test_encode_pcm_is_raw_little_endian_int16():
    data = encode_audio(SIGNAL, "pcm")
    assert len(data) == 2 * len(SIGNAL)
    np.testing.assert_array_equal(np.frombuffer(data, "<i2"), to_int16(SIGNAL))


@pytest.mark.parametrize("fmt", ["mp3", "opus"])
def test_encode_lossy_round_trip(fmt):
    data = encode_audio(SIGNAL, fmt)
    y, rate, channels = decode(data)
    assert (rate, channels) == (SAMPLE_RATE, 1)
    # Whole files carry their exact length: the MP3 info frame (gapless playback), the
    # Ogg granule positions for Opus.
    assert len(y) == len(SIGNAL)
    assert amplitude(y[2000:], 440) == pytest.approx(0.5, rel=0.05)
    assert amplitude(y[2000:], 880) < 0.01


@needs_ffmpeg
def test_encode_aac_round_trip():
    data = encode_audio(SIGNAL, "aac")
    assert data[:2] == b"\xff\xf1"  # ADTS, what the OpenAI API's aac is
    y, rate, channels = decode(data)
    assert (rate, channels) == (SAMPLE_RATE, 1)
    assert len(SIGNAL) + AAC_FRAME <= len(y) <= len(SIGNAL) + 2 * AAC_FRAME
    assert np.abs(y[: AAC_FRAME // 2]).max() < 0.01  # the priming samples
    assert amplitude(y[3000:], 440) == pytest.approx(0.5, rel=0.05)
    assert amplitude(y[3000:], 880) < 0.01


def test_encode_mp3_is_constant_bitrate():
    # libsndfile estimates a stream's length from the first frame's bitrate: VBR would cut
    # streamed MP3s short. Every frame header of a CBR stream names the same bitrate.
    data = encode_audio(tone(300, seconds=3), "mp3")
    headers = {
        data[i + 2] >> 4 for i in range(len(data) - 3) if data[i] == 0xFF and data[i + 1] == 0xF3
    }
    assert len(headers) == 1


@pytest.mark.parametrize("fmt", ["wav", "flac", "mp3", "opus", pytest.param("aac", marks=needs_ffmpeg)])
def test_encode_empty_gives_a_decodable_file(fmt):
    y, rate, _ = decode(encode_audio(np.zeros(0, np.float32), fmt))
    assert rate == SAMPLE_RATE and len(y) <= (2 * AAC_FRAME if fmt == "aac" else 1)
    assert np.abs(y).max(initial=0) < 1e-6
    assert encode_audio(np.zeros(0, np.float32), "pcm") == b""


def test_encode_rejects_multichannel():
    with pytest.raises(AudioError, match="1-D"):
        encode_audio(np.zeros((2, 100), np.float32), "wav")


# --- streaming -------------------------------------------------------------------------


# Uneven pieces, an empty one among them, as a generator hands them out.
def pieces(x: np.ndarray):
    sizes = [1, 0, 1919, 1920, 7, 4000, 1920]
    i = 0
    while i < len(x):
        for n in sizes:
            yield x[i : i + n]
            i += n


def stream(fmt: str, x: np.ndarray = SIGNAL) -> list[bytes]:
    encoder = StreamEncoder(fmt)
    assert encoder.media_type == MEDIA_TYPES[fmt]
    return [encoder.feed(p) for p in pieces(x)] + [encoder.finish()]


@pytest.mark.parametrize("fmt", ["wav", "pcm", "flac"])
def test_stream_lossless_is_exact(fmt):
    data = b"".join(stream(fmt))
    if fmt == "pcm":
        assert data == encode_audio(SIGNAL, "pcm")
        return
    y, rate, channels = decode(data, "int16")
    assert (rate, channels) == (SAMPLE_RATE, 1)
    np.testing.assert_array_equal(y, to_int16(SIGNAL))


@pytest.mark.parametrize("fmt", ["wav", "pcm"])
def test_stream_raw_formats_send_every_sample_at_once(fmt):
    encoder = StreamEncoder(fmt)
    header = 44 if fmt == "wav" else 0
    assert len(encoder.feed(SIGNAL[:100])) == header + 200
    assert len(encoder.feed(SIGNAL[100:130])) == 60
    assert encoder.finish() == b""


def test_stream_wav_header_and_python_wave():
    data = b"".join(stream("wav"))
    riff, riff_size, wave_id = struct.unpack("<4sI4s", data[:12])
    assert (riff, riff_size, wave_id) == (b"RIFF", 0xFFFFFFFF, b"WAVE")
    assert data[36:40] == b"data" and struct.unpack("<I", data[40:44])[0] == 0xFFFFFFFF
    with wave.open(io.BytesIO(data)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, SAMPLE_RATE)
        frames = w.readframes(10**9)
    np.testing.assert_array_equal(np.frombuffer(frames, "<i2"), to_int16(SIGNAL))


def test_stream_mp3_is_incremental_and_decodes_whole():
    x = tone(440, seconds=3.0)
    chunks = stream("mp3", x)
    # Frames come out as the encoder fills them: the first second is long sent before finish().
    sent = np.cumsum([len(c) for c in chunks])
    fed = np.cumsum([len(p) for p in pieces(x)])
    assert sent[np.searchsorted(fed, SAMPLE_RATE)] > 5000
    assert len(chunks[-1]) < 0.2 * sent[-1]
    y, rate, channels = decode(b"".join(chunks))
    assert (rate, channels) == (SAMPLE_RATE, 1)
    assert len(x) <= len(y) <= len(x) + MP3_STREAM_SLACK
    assert not np.any(y[:MP3_FRAME])  # the unpatched info frame plays as silence
    assert amplitude(y[3000:], 440) == pytest.approx(0.5, rel=0.05)
    # Same samples as the whole-file encoding, offset by the placeholder frame at most.
    whole, _, _ = decode(encode_audio(x, "mp3"))
    lag = int(np.argmax(np.correlate(y[:8000], whole[2000:2400])))
    assert np.abs(y[lag : lag + 20000] - whole[2000:22000]).max() < 0.05


def test_stream_opus_pages_and_exact_length():
    x = tone(440, seconds=3.0)
    chunks = stream("opus", x)
    # Opus comes out in Ogg pages of about a second: besides the header page, data pages
    # appear before finish().
    before_finish = [c for c in chunks[1:-1] if c]
    assert len(before_finish) >= 2
    y, rate, channels = decode(b"".join(chunks))
    assert (rate, channels, len(y)) == (SAMPLE_RATE, 1, len(x))
    assert amplitude(y[3000:], 440) == pytest.approx(0.5, rel=0.05)


@needs_ffmpeg
def test_stream_aac_is_the_whole_file_and_comes_before_finish():
    assert b"".join(stream("aac")) == encode_audio(SIGNAL, "aac")
    encoder = StreamEncoder("aac")
    sent = encoder.feed(tone(440, seconds=1.0))
    deadline = time.monotonic() + 10
    while len(sent) <= 2000 and time.monotonic() < deadline:  # ffmpeg answers a moment after it is fed,
        time.sleep(0.01)  # and on a busy machine in more than one piece
        sent += encoder.feed(np.zeros(0, np.float32))
    assert len(sent) > 2000  # most of a second at 64 kbit/s, before finish()
    rest = encoder.finish()
    assert sent + rest == encode_audio(tone(440, seconds=1.0), "aac")


@needs_ffmpeg
def test_given_up_aac_streams_end_ffmpeg():
    closed = StreamEncoder("aac")
    closed.feed(SIGNAL)
    process = closed._aac._process
    closed.close()
    assert process.poll() is not None
    closed.close()  # twice is harmless, as after finish()
    # One dropped without close() (a client gone mid-stream): once collected, its ffmpeg is stopped.
    dropped = StreamEncoder("aac")
    dropped.feed(SIGNAL)
    process = dropped._aac._process
    del dropped
    gc.collect()
    assert process.wait(timeout=10) == -signal.SIGKILL  # stopped, not left waiting for more input


def test_stream_flac_is_buffered_until_finish():
    chunks = stream("flac")
    assert not any(chunks[:-1])
    assert chunks[-1] == encode_audio(SIGNAL, "flac")


@pytest.mark.parametrize("fmt", EVERY_FORMAT)
def test_stream_of_nothing_is_a_valid_file(fmt):
    encoder = StreamEncoder(fmt)
    data = encoder.feed(np.zeros(0, np.float32)) + encoder.finish()
    if fmt == "pcm":
        assert data == b""
        return
    y, rate, _ = decode(data)
    assert rate == SAMPLE_RATE and len(y) <= (2 * AAC_FRAME if fmt == "aac" else 1)
    assert np.abs(y).max(initial=0) < 1e-6


def test_stream_refuses_use_after_finish():
    encoder = StreamEncoder("mp3")
    encoder.feed(SIGNAL[:1000])
    encoder.finish()
    with pytest.raises(RuntimeError):
        encoder.feed(SIGNAL[:1000])
    with pytest.raises(RuntimeError):
        encoder.finish()


# --- resampling ------------------------------------------------------------------------


def test_resample_keeps_a_clean_tone():
    y = resample(tone(1000, 44100), 44100, SAMPLE_RATE)
    assert y.dtype == np.float32 and len(y) == SAMPLE_RATE
    inner = slice(200, -200)  # the edges see the zero padding
    np.testing.assert_allclose(y[inner], tone(1000)[inner], atol=1e-4)
    assert amplitude(y, 1000) == pytest.approx(0.5, rel=1e-3)


def test_resample_is_band_limited():
    # Above the new Nyquist frequency (12 kHz) nothing may fold back; below it, pass.
    for freq in (12600, 15000, 21000):
        assert np.abs(resample(tone(freq, 44100), 44100, SAMPLE_RATE)[200:-200]).max() < 1e-3
    assert amplitude(resample(tone(10000, 44100), 44100, SAMPLE_RATE), 10000) > 0.49


@pytest.mark.parametrize("rate", [8000, 11025, 16000, 22050, 32000, 44100, 48000, 96000, 22051])
def test_resample_rates(rate):
    x = tone(440, rate, seconds=0.5003)
    y = resample(x, rate, SAMPLE_RATE)
    assert len(y) == -(-len(x) * SAMPLE_RATE // rate)
    expected = tone(440, seconds=len(y) / SAMPLE_RATE)
    np.testing.assert_allclose(y[200:-200], expected[200 : len(y) - 200], atol=2e-4)


def test_resample_same_rate_is_identity():
    np.testing.assert_array_equal(resample(SIGNAL, SAMPLE_RATE, SAMPLE_RATE), SIGNAL)


# --- loading ---------------------------------------------------------------------------


def test_load_wav_at_24k_is_exact(tmp_path):
    path = tmp_path / "a.wav"
    sf.write(path, to_int16(SIGNAL), SAMPLE_RATE)
    x = load_audio(path)
    assert x.dtype == np.float32 and x.ndim == 1
    np.testing.assert_array_equal(x, to_int16(SIGNAL) / np.float32(32768))
    np.testing.assert_array_equal(load_audio(str(path)), x)
    with open(path, "rb") as f:
        np.testing.assert_array_equal(load_audio(f), x)
    np.testing.assert_array_equal(load_audio(io.BytesIO(path.read_bytes())), x)


def test_load_stereo_averages_channels(tmp_path):
    left, right = tone(440, 48000, amp=0.6), tone(440, 48000, amp=0.2)
    path = tmp_path / "stereo.flac"
    sf.write(path, np.stack([left, right], axis=1), 48000)
    x = load_audio(path)
    assert x.ndim == 1 and len(x) == SAMPLE_RATE
    assert amplitude(x, 440) == pytest.approx(0.4, rel=1e-3)


@pytest.mark.parametrize(
    "name, rate, options",
    [
        ("v.ogg", 44100, {"format": "OGG", "subtype": "VORBIS"}),
        ("o.opus", 48000, {"format": "OGG", "subtype": "OPUS"}),
        ("m.mp3", 16000, {"format": "MP3"}),
        ("f.flac", 22050, {}),
    ],
)
def test_load_other_formats_and_rates(tmp_path, name, rate, options):
    path = tmp_path / name
    sf.write(path, tone(440, rate, seconds=2.0), rate, **options)
    x = load_audio(path)
    assert abs(len(x) - 2 * SAMPLE_RATE) <= 2 * MP3_FRAME  # MP3 without gapless info pads
    assert amplitude(x[2000:46000], 440) == pytest.approx(0.5, rel=0.05)


def ffmpeg_convert(source, target, *options):
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-i", str(source), *options, str(target)], check=True)


class Unseekable(io.BytesIO):
    def seekable(self) -> bool:
        return False


@needs_ffmpeg
@pytest.mark.parametrize("name, options", [("voice.m4a", ["-c:a", "aac"]), ("voice.webm", ["-c:a", "libopus"]),
                                           ("voice.aac", [])])
def test_load_what_libsndfile_cannot_read_through_ffmpeg(tmp_path, name, options):
    wav, path = tmp_path / "voice.wav", tmp_path / name
    sf.write(wav, np.stack([tone(440, 48000, 2.0), tone(440, 48000, 2.0, amp=0.1)], axis=1), 48000)  # stereo
    ffmpeg_convert(wav, path, *options)
    with pytest.raises(sf.LibsndfileError):
        sf.read(path)
    x = load_audio(path)
    assert 2 * SAMPLE_RATE <= len(x) <= 2 * SAMPLE_RATE + 2 * AAC_FRAME  # codecs pad to whole frames
    assert amplitude(x[3000:45000], 440) == pytest.approx(0.3, rel=0.05)  # the channels' mean
    data = path.read_bytes()
    np.testing.assert_array_equal(load_audio(io.BytesIO(data)), x)
    np.testing.assert_array_equal(load_audio(Unseekable(data)), x)
    shifted = io.BytesIO(b"junk" + data)
    shifted.seek(4)  # read from where the file object stands
    np.testing.assert_array_equal(load_audio(shifted), x)


@needs_ffmpeg
def test_ffmpeg_reads_no_playlists(tmp_path):
    """A playlist sent as a voice prompt would have ffmpeg open other files (or URLs) for the sender."""
    secret = tmp_path / "secret.aac"
    ffmpeg_convert(_write_wav(tmp_path / "s.wav"), secret)
    playlist = tmp_path / "voice.m3u8"
    playlist.write_text(f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:2,\nfile:{secret}\n#EXT-X-ENDLIST\n")
    with pytest.raises(AudioError, match="voice.m3u8: Format not recognised \\(ffmpeg: "):
        load_audio(playlist)


def test_load_without_ffmpeg_names_it(tmp_path, monkeypatch):
    path = tmp_path / "voice.m4a"
    path.write_bytes(b"\x00\x00\x00\x20ftypM4A " + bytes(100))
    monkeypatch.setenv("PATH", str(tmp_path))
    message = "voice.m4a: Format not recognised \\(other formats need ffmpeg, which is not installed here\\)"
    with pytest.raises(AudioError, match=message):
        load_audio(path)


def _write_wav(path):
    sf.write(path, tone(440, seconds=2.0), SAMPLE_RATE)
    return path


def test_load_stops_a_second_past_max_seconds(tmp_path):
    """An hour of compressed silence is a small file: a caller that refuses long audio must not decode it all."""
    flac = tmp_path / "ten-minutes.flac"
    sf.write(flac, np.zeros(600 * 8000, np.int16), 8000)
    assert len(load_audio(flac, max_seconds=10)) == 11 * SAMPLE_RATE
    assert len(load_audio(io.BytesIO(flac.read_bytes()), max_seconds=2.5)) == 3.5 * SAMPLE_RATE
    assert len(load_audio(flac)) == 600 * SAMPLE_RATE


@needs_ffmpeg
def test_load_through_ffmpeg_stops_a_second_past_max_seconds(tmp_path):
    webm = tmp_path / "hour.webm"
    subprocess.run(["ffmpeg", "-loglevel", "error", "-f", "lavfi", "-i", "anullsrc=r=48000:cl=stereo", "-t", "3600",
                    "-c:a", "libopus", "-b:a", "6k", str(webm)], check=True)
    assert webm.stat().st_size < 3_000_000
    started = time.monotonic()
    assert abs(len(load_audio(webm, max_seconds=10)) - 11 * SAMPLE_RATE) < SAMPLE_RATE / 50  # opus skips a little
    assert time.monotonic() - started < 10  # all of it took over 15 s and 4 GB


def test_load_keeps_one_channel_of_many(tmp_path):
    flac = tmp_path / "eight.flac"
    sf.write(flac, np.stack([tone(440, 48000, 2.0, amp=0.1 * (i % 4)) for i in range(8)], axis=1), 48000)
    x = load_audio(flac)
    assert len(x) == 2 * SAMPLE_RATE and amplitude(x[2000:46000], 440) == pytest.approx(0.15, rel=0.02)


@needs_ffmpeg
def test_ffmpeg_averages_many_channels_into_one(tmp_path):
    """Opus allows 255 channels: ffmpeg mixes them to one (their mean, as for files libsndfile reads)."""
    wav, webm = tmp_path / "six.wav", tmp_path / "six.webm"
    sf.write(wav, np.stack([tone(440, 48000, 2.0, amp=0.1 * (i % 3)) for i in range(6)], axis=1), 48000)
    ffmpeg_convert(wav, webm, "-c:a", "libopus", "-mapping_family", "255")
    x = load_audio(webm)
    assert amplitude(x[3000:45000], 440) == pytest.approx(0.1, rel=0.05)
    assert len(ffmpeg.decode_to_wav(webm, "six.webm", max_seconds=1.0)) < 4 * SAMPLE_RATE + 100  # mono, 24 kHz


@needs_ffmpeg
def test_load_a_video_without_sound_says_so(tmp_path):
    video = tmp_path / "video.mp4"
    subprocess.run(["ffmpeg", "-loglevel", "error", "-f", "lavfi", "-i", "color=size=32x32:duration=1", str(video)],
                   check=True)
    with pytest.raises(AudioError, match="video.mp4: Format not recognised \\(ffmpeg: it has no audio stream\\)"):
        load_audio(video)


def test_load_missing_file(tmp_path):
    path = tmp_path / "nope.wav"
    with pytest.raises(AudioError, match=f"{path}: no such file.*wav, flac, ogg.*mp3"):
        load_audio(path)


def test_load_empty_file(tmp_path):
    path = tmp_path / "empty.wav"
    path.write_bytes(b"")
    with pytest.raises(AudioError, match=f"{path}: the file is empty.*Accepted formats"):
        load_audio(path)


def test_load_garbage(tmp_path):
    path = tmp_path / "notes.wav"
    path.write_text("not audio at all\n" * 20)
    with pytest.raises(AudioError, match=f"{path}: .*Accepted formats: wav"):
        load_audio(path)
    with pytest.raises(ValueError, match="<file object>"):
        load_audio(io.BytesIO(b""))
    with pytest.raises(AudioError, match="directory"):
        load_audio(tmp_path)


@pytest.mark.parametrize("rate", [7, 384_000, 10_000_019, 2**31 - 1])
def test_load_refuses_rates_no_recording_has(tmp_path, rate):
    """libsndfile takes any rate from a header; at 2**31 - 1 Hz the resampler's filters needed 817 GiB, and
    a small FLAC at 655 kHz holds minutes of samples."""
    path = tmp_path / "odd.wav"
    sf.write(path, np.zeros(10, np.int16), 8000)
    data = bytearray(path.read_bytes())
    data[24:28] = struct.pack("<I", rate)  # the header's sample rate
    path.write_bytes(bytes(data))
    with pytest.raises(AudioError, match=f"sample rate of {rate} Hz, outside 1000..192000"):
        load_audio(path)


def test_resample_builds_only_the_filters_it_uses():
    """A rate prime to 24 kHz has 24000 filter phases; ten samples need ten of them."""
    resample(np.zeros(10, np.float32), 767_999, SAMPLE_RATE)  # 24000 phases of 1640 taps: 300 MB at once
    with pytest.MonkeyPatch.context() as m:
        m.setattr(audio, "_PHASE_BLOCK", 7)  # blocks of phases give the same filters
        x = np.random.default_rng(0).standard_normal(3000).astype(np.float32)
        blocked = resample(x, 22_051, SAMPLE_RATE)
    np.testing.assert_array_equal(blocked, resample(x, 22_051, SAMPLE_RATE))


@pytest.mark.parametrize("ext", ["flac", "mp3"])
def test_load_from_a_pipe(tmp_path, ext):
    """`--context 0 words /dev/stdin` fed by a pipe: libsndfile lost sync in a FLAC it could not seek."""
    path = tmp_path / f"tone.{ext}"
    sf.write(path, tone(440), SAMPLE_RATE)
    code = "from csm_gguf.audio import load_audio; print(len(load_audio('/dev/stdin')))"
    done = subprocess.run([sys.executable, "-c", code], input=path.read_bytes(), capture_output=True, timeout=60)
    assert done.stdout.decode().strip() == str(len(load_audio(path))), done.stderr.decode()[-500:]


def test_load_file_without_samples(tmp_path):
    path = tmp_path / "silent.wav"
    sf.write(path, np.zeros(0, np.int16), SAMPLE_RATE)
    with pytest.raises(AudioError, match="no audio"):
        load_audio(path)


# --- writing ---------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", EVERY_FORMAT)
def test_write_audio_by_extension(tmp_path, fmt):
    path = tmp_path / f"out.{fmt}"
    write_audio(path, SIGNAL)
    if fmt == "opus":  # Ogg picks a random stream serial number: compare what it decodes to
        np.testing.assert_array_equal(
            decode(path.read_bytes())[0], decode(encode_audio(SIGNAL, fmt))[0]
        )
    else:
        assert path.read_bytes() == encode_audio(SIGNAL, fmt)
    assert os.listdir(tmp_path) == [path.name]


def test_write_audio_explicit_format_and_mode(tmp_path):
    path = tmp_path / "speech.bin"
    write_audio(path, SIGNAL, "flac")
    assert path.read_bytes()[:4] == b"fLaC"
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_write_audio_to_stdout(monkeypatch):
    out = io.TextIOWrapper(io.BytesIO())
    monkeypatch.setattr(sys, "stdout", out)
    write_audio("-", SIGNAL, "wav")
    assert out.buffer.getvalue() == encode_audio(SIGNAL, "wav")
    with pytest.raises(AudioError, match="explicit format"):
        write_audio("-", SIGNAL)


def test_write_audio_failure_leaves_nothing(tmp_path):
    target = tmp_path / "keep.wav"
    target.write_bytes(b"old")
    with pytest.raises(AudioError):
        write_audio(tmp_path / "x.m4a", SIGNAL)
    with pytest.raises(AudioError):
        write_audio(target, np.zeros((2, 10)))
    assert os.listdir(tmp_path) == ["keep.wav"] and target.read_bytes() == b"old"


def test_write_audio_failure_while_replacing_leaves_nothing(tmp_path, monkeypatch):
    target = tmp_path / "keep.wav"
    target.write_bytes(b"old")

    def fail(src, dst):
        assert os.path.getsize(src) == len(encode_audio(SIGNAL, "wav"))
        raise OSError("disk gone")

    monkeypatch.setattr(audio.os, "replace", fail)
    with pytest.raises(OSError, match="disk gone"):
        write_audio(target, SIGNAL)
    assert os.listdir(tmp_path) == ["keep.wav"] and target.read_bytes() == b"old"


def test_write_audio_through_a_link_and_into_a_pipe(tmp_path):
    """A symlink keeps pointing at its target, which gets the audio; a pipe (like a device such as
    /dev/null) is written in place, not replaced by a regular file."""
    wav = encode_audio(SIGNAL, "wav")
    target, link, fifo = tmp_path / "target.wav", tmp_path / "link.wav", tmp_path / "fifo.wav"
    target.write_bytes(b"old")
    link.symlink_to(target)
    write_audio(link, SIGNAL)
    assert link.is_symlink() and target.read_bytes() == wav
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
    reader.start()
    write_audio(fifo, SIGNAL)
    reader.join(10)
    assert got == [wav] and stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert sorted(os.listdir(tmp_path)) == ["fifo.wav", "link.wav", "target.wav"]
