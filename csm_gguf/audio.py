"""Audio in and out: reading voice prompts, encoding speech whole or while it is generated.

Speech is 24 kHz mono float32 in [-1, 1]. Everything goes through soundfile (libsndfile), but for
what libsndfile lacks: AAC output and reading other formats (m4a, webm, ...) take ffmpeg when it is
installed (`ffmpeg.py`).
"""

from __future__ import annotations

import io
import math
import os
import struct
import sys
from typing import BinaryIO

import numpy as np
import soundfile as sf
from numpy.lib.stride_tricks import sliding_window_view

from . import ffmpeg
from .atomic import write_atomic
from .ffmpeg import AacStream
from .formats import FORMATS, MEDIA_TYPES, SAMPLE_RATE, AudioError  # noqa: F401 (audio's vocabulary, used here)

_EXTENSIONS = {
    ".wav": "wav",
    ".flac": "flac",
    ".mp3": "mp3",
    ".opus": "opus",
    ".ogg": "opus",
    ".aac": "aac",
    ".pcm": "pcm",
    ".raw": "pcm",
}
_READABLE = "wav, flac, ogg (vorbis or opus), mp3; with ffmpeg installed, also m4a, aac, webm and others"

# soundfile container, subtype and options per encoded format. MP3 is constant bitrate
# (about 64 kbit/s): a streamed MP3 cannot get its VBR info frame patched in at the end, and
# libsndfile's reader estimates a length without it from the first frame's bitrate, which for
# VBR cuts the audio short. Whole files use the same settings so both paths sound the same.
_SOUNDFILE = {
    "wav": ("WAV", "PCM_16", {}),
    "flac": ("FLAC", "PCM_16", {}),
    "opus": ("OGG", "OPUS", {}),
    "mp3": ("MP3", "MPEG_LAYER_III", {"bitrate_mode": "CONSTANT", "compression_level": 0.6}),
}

# Resampler: windowed sinc with this many zero crossings on each side, a Kaiser window and a
# cutoff a little below the lower Nyquist frequency so the transition band does not alias.
# Measured 44.1 -> 24 kHz: tones above 12.6 kHz come out below -95 dB, 10 kHz passes at 0.9999.
_ZERO_CROSSINGS = 24
_KAISER_BETA = 8.6
_ROLLOFF = 0.94
# Filters are built this many phases at a time: a rate prime to 24 kHz has one phase per output sample
# of a second, each up to 1640 taps long.
_PHASE_BLOCK = 256
# Sample rates read: a file claiming a rate outside these (libsndfile takes any header) is no recording.
MIN_RATE, MAX_RATE = 1000, 192_000

AudioSource = str | os.PathLike[str] | BinaryIO


def check_format(fmt: str) -> str:
    """Returns fmt if it is one of FORMATS (and, for aac, ffmpeg is installed), else raises an AudioError."""
    if fmt not in FORMATS:
        raise AudioError(f"unsupported audio format {fmt!r}; supported formats: {', '.join(FORMATS)}")
    if fmt == "aac":
        ffmpeg.require("AAC output")
    return fmt


def format_from_path(path: str | os.PathLike[str]) -> str:
    """The output format a file name asks for, by its extension."""
    ext = os.path.splitext(os.fspath(path))[1].lower()
    if ext not in _EXTENSIONS:
        raise AudioError(
            f"{os.fspath(path)}: unknown audio extension {ext or '(none)'!r}; "
            f"use one of {', '.join(_EXTENSIONS)}"
        )
    return _EXTENSIONS[ext]


def _read_piped(f: BinaryIO, name: str) -> bytes:
    """All of a pipe or device, held to be decoded: at most MAX_PIPED_AUDIO_BYTES (/dev/zero never ends)."""
    from .bounded import MAX_PIPED_AUDIO_BYTES, TooLarge, read_at_most

    try:
        return read_at_most(f, MAX_PIPED_AUDIO_BYTES, "the audio read from it", "give a shorter recording, in a file")
    except TooLarge as e:
        raise _read_error(name, str(e)) from None


def load_audio(source: AudioSource, max_seconds: float | None = None) -> np.ndarray:
    """Reads wav/flac/ogg/mp3 (with ffmpeg installed: also m4a, aac, webm, ...) from a path or binary
    file object as 24 kHz mono float32.

    With `max_seconds`, reading stops a second past it: a caller that refuses longer audio learns that it
    is longer without decoding all of it (a small file of compressed silence can hold hours).
    """
    if isinstance(source, (str, os.PathLike)):
        name = os.fspath(source)
        if not os.path.exists(name):
            raise _read_error(name, "no such file")
        if os.path.isdir(name):
            raise _read_error(name, "it is a directory")
        if os.path.isfile(name) and os.path.getsize(name) == 0:
            raise _read_error(name, "the file is empty")
        try:
            with open(name, "rb") as f:
                if not os.path.isfile(name):  # a pipe (/dev/stdin, <(...)): libsndfile seeks in FLAC and MP3
                    source = io.BytesIO(_read_piped(f, name))
        except PermissionError:
            raise _read_error(name, "no permission to read it") from None
    else:
        name = getattr(source, "name", None) or "<file object>"
        if not source.seekable():  # libsndfile seeks, and ffmpeg may need to read it again
            source = io.BytesIO(_read_piped(source, name))
    start = None if isinstance(source, (str, os.PathLike)) else source.tell()
    if start is not None and source.seek(0, io.SEEK_END) == start:
        raise _read_error(name, "it is empty")
    if start is not None:
        source.seek(start)
    read_seconds = None if max_seconds is None else max_seconds + 1
    try:
        data, rate = _read_soundfile(source, name, read_seconds)
    except sf.LibsndfileError as e:
        if ffmpeg.find() is None:
            problem = e.error_string.rstrip(".")
            raise _read_error(name, f"{problem} (other formats need ffmpeg, which is not installed here)") from e
        if start is not None:
            source.seek(start)
        try:
            wav = ffmpeg.decode_to_wav(source, name, read_seconds)
        except ffmpeg.ReadError as ffmpeg_error:
            raise _read_error(name, f"{e.error_string.rstrip('.')} (ffmpeg: {ffmpeg_error})") from e
        data, rate = _read_soundfile(io.BytesIO(wav), name, read_seconds)
    if not len(data):
        raise _read_error(name, "it contains no audio")
    return resample(data, rate, SAMPLE_RATE)


def _read_soundfile(source: str | BinaryIO, name: str, read_seconds: float | None) -> tuple[np.ndarray, int]:
    """Mono float32 at the file's own rate. Channels are averaged a block at a time: a small FLAC can hold
    minutes of 8 channels, and only their mean is kept."""
    with sf.SoundFile(source) as f:
        if not MIN_RATE <= f.samplerate <= MAX_RATE:
            raise _read_error(name, f"its header gives a sample rate of {f.samplerate} Hz, outside "
                                    f"{MIN_RATE}..{MAX_RATE}")
        frames = -1 if read_seconds is None else math.ceil(read_seconds * f.samplerate)
        blocks = f.blocks(1 << 16, dtype="float32", always_2d=True, frames=frames)
        return np.concatenate([np.zeros(0, np.float32), *(b.mean(axis=1) for b in blocks)]), f.samplerate


def _read_error(name: str, problem: str) -> AudioError:
    return AudioError(f"cannot read audio from {name}: {problem}. Accepted formats: {_READABLE}")


def resample(samples: np.ndarray, orig_rate: int, new_rate: int) -> np.ndarray:
    """Band-limited resampling of a 1-D signal (polyphase windowed sinc), float32 out.

    The output has one sample per output period that starts inside the input's span.
    """
    x = np.asarray(samples, dtype=np.float32)
    if orig_rate == new_rate:
        return x
    g = math.gcd(orig_rate, new_rate)
    up, down = new_rate // g, orig_rate // g
    n_out = -(-len(x) * up // down)
    cutoff = _ROLLOFF * 0.5 * min(1.0, up / down)  # cycles per input sample
    half = _ZERO_CROSSINGS / (2 * cutoff)  # kernel half-width in input samples
    reach = int(np.ceil(half))
    # Output m = a*up + b sits at input time a*down + start[b] + frac[b]: one filter per phase b.
    windows = sliding_window_view(np.pad(x, (reach, reach + 1)), 2 * reach + 2)
    y = np.empty(n_out, dtype=np.float32)
    phases = min(up, n_out)  # a short signal needs only its first phases
    for first in range(0, phases, _PHASE_BLOCK):
        b = np.arange(first, min(first + _PHASE_BLOCK, phases))
        start, frac = b * down // up, (b * down % up) / up
        u = frac[:, None] + reach - np.arange(2 * reach + 2)  # distance to each input tap
        window = np.i0(_KAISER_BETA * np.sqrt(np.clip(1 - (u / half) ** 2, 0, None)))
        taps = np.where(np.abs(u) <= half, np.sinc(2 * cutoff * u) * window, 0.0)
        # Unit sum per phase: exact DC gain, so no phase-dependent ripple on slow signals.
        taps = (taps / taps.sum(axis=1, keepdims=True)).astype(np.float32)
        for phase, phase_start, phase_taps in zip(b, start, taps):
            out = y[phase::up]
            out[:] = windows[phase_start::down][: len(out)] @ phase_taps
    return y


def as_float(samples) -> np.ndarray:
    """Samples as float32: floats as they are (full scale 1), integer PCM scaled to [-1, 1) (int16: by
    32768; unsigned: centred first, as 8-bit WAV is). int64 is refused: a list of Python ints becomes
    int64, and whether it meant 16- or 32-bit PCM cannot be told."""
    x = np.asarray(samples)
    if x.dtype.kind == "f":
        return x.astype(np.float32, copy=False)
    if x.dtype.kind not in "iu" or x.dtype.itemsize > 4:
        raise AudioError(f"audio samples must be floats in [-1, 1] or 8- to 32-bit integer PCM, got {x.dtype}: "
                         "convert them, e.g. np.asarray(samples, dtype=np.int16)")
    scale = 2.0 ** (8 * x.dtype.itemsize - 1)
    return ((x - scale if x.dtype.kind == "u" else x) / scale).astype(np.float32)


def _clipped(x: np.ndarray) -> np.ndarray:
    # NaN becomes silence: LAME aborts the whole process on a NaN sample.
    return np.clip(np.nan_to_num(x, nan=0.0), -1.0, 1.0)


def to_int16(samples: np.ndarray) -> np.ndarray:
    """Float samples to int16, clipped to [-1, 1] and rounded to nearest (1.0 -> 32767); NaN -> 0."""
    return np.rint(_clipped(np.asarray(samples, dtype=np.float32)) * 32767).astype(np.int16)


def _mono(samples: np.ndarray) -> np.ndarray:
    x = as_float(samples)
    if x.ndim != 1:
        raise AudioError(f"expected mono samples as a 1-D array, got shape {x.shape}")
    return x


def pcm_bytes(x: np.ndarray) -> bytes:
    """Float samples as raw 16-bit little-endian PCM (the `pcm` format; Wyoming's audio chunks)."""
    return to_int16(x).astype("<i2").tobytes()


def _open_encoder(file: object, fmt: str) -> sf.SoundFile:
    container, subtype, options = _SOUNDFILE[fmt]
    return sf.SoundFile(file, "w", SAMPLE_RATE, 1, subtype, format=container, **options)


def _write_samples(f: sf.SoundFile, x: np.ndarray) -> None:
    # PCM containers get our own int16 rounding (libsndfile does not clip floats by default);
    # the lossy codecs take floats, clipped the same way.
    f.write(to_int16(x) if f.subtype == "PCM_16" else _clipped(x))


# libsndfile writes no decodable FLAC/MP3/Opus file for zero samples: one silent sample keeps
# every response a valid file.
_NOT_EMPTY = np.zeros(1, dtype=np.float32)


def encode_audio(samples: np.ndarray, fmt: str) -> bytes:
    """The whole of a 24 kHz mono signal as a file in fmt (one of FORMATS)."""
    fmt = check_format(fmt)
    x = _mono(samples)
    if fmt == "pcm":
        return pcm_bytes(x)
    if not len(x) and fmt != "wav":
        x = _NOT_EMPTY
    if fmt == "aac":
        return ffmpeg.encode_aac(_clipped(x))
    buffer = io.BytesIO()
    with _open_encoder(buffer, fmt) as f:
        _write_samples(f, x)
    return buffer.getvalue()


def write_audio(path: str | os.PathLike[str], samples: np.ndarray, fmt: str | None = None) -> None:
    """Writes samples to path ("-" for stdout) in fmt, by default the one its extension names.

    The file appears whole or not at all: the audio is encoded first, written to a temporary
    file in the same directory, then renamed over path.
    """
    path = os.fspath(path)
    if fmt is None:
        if path == "-":
            raise AudioError("writing to stdout (-) needs an explicit format")
        fmt = format_from_path(path)
    data = encode_audio(samples, fmt)
    if path == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return
    write_atomic(path, data)


# Sizes 0xFFFFFFFF: the length is unknown while streaming; soundfile and wave read to the end.
_STREAM_WAV_HEADER = (
    struct.pack("<4sI4s", b"RIFF", 0xFFFFFFFF, b"WAVE")
    # PCM, mono, sample rate, byte rate, block align, bits per sample
    + struct.pack("<4sIHHIIHH", b"fmt ", 16, 1, 1, SAMPLE_RATE, 2 * SAMPLE_RATE, 2, 16)
    + struct.pack("<4sI", b"data", 0xFFFFFFFF)
)


class _DrainSink:
    """A file object for soundfile that hands out the encoder's bytes as they are written.

    The encoders only append, except that at close libsndfile patches the MP3 info frame at
    the start, which is long sent: that write is dropped, leaving the placeholder frame the
    encoder wrote first. Without the info frame's gapless data, decoders play that frame and the
    encoder's delay as silence before the audio (1681 samples, 70 ms), and the last frame's padding
    after it (up to 576 samples).
    """

    def __init__(self) -> None:
        self._buffer = bytearray()  # bytes from offset _sent on, not yet drained
        self._sent = 0
        self._position = 0

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_CUR:
            offset += self._position
        elif whence == io.SEEK_END:
            offset += self._sent + len(self._buffer)
        self._position = offset
        return offset

    def write(self, data: bytes) -> int:
        start = self._position - self._sent
        skip = max(0, -start)
        if skip < len(data):
            start += skip
            self._buffer[start : start + len(data) - skip] = data[skip:]
        self._position += len(data)
        return len(data)

    def read(self, size: int = -1) -> bytes:
        return b""  # encoders never read back what they wrote

    def drain(self) -> bytes:
        data = bytes(self._buffer)
        self._sent += len(data)
        self._buffer.clear()
        return data


class StreamEncoder:
    """Encodes speech while it is generated: feed() returns the bytes ready so far, finish()
    the rest; their concatenation is one valid file.

    wav, pcm, mp3, aac and opus stream (opus in pages of about a second; aac through ffmpeg, its
    bytes a chunk behind). flac is buffered until finish(): a FLAC stream's header cannot be patched
    after it is sent, and libsndfile cannot read a FLAC file whose header leaves the length unknown.
    An encoder given up before finish() should be closed (aac: it stops ffmpeg).
    """

    def __init__(self, fmt: str) -> None:
        self.format = check_format(fmt)
        self.media_type = MEDIA_TYPES[fmt]
        self._prefix = _STREAM_WAV_HEADER if fmt == "wav" else b""
        self._pending: list[np.ndarray] = []
        self._sink = _DrainSink() if fmt in ("mp3", "opus") else None
        self._encoder = _open_encoder(self._sink, fmt) if self._sink else None
        self._aac: AacStream | None = None  # ffmpeg, started by the first samples
        self._written = 0
        self._finished = False

    def feed(self, samples: np.ndarray) -> bytes:
        """Adds 24 kHz mono samples; returns the encoded bytes that are ready now."""
        if self._finished:
            raise RuntimeError("StreamEncoder.feed() after finish()")
        x = _mono(samples)
        self._written += len(x)
        if self.format == "aac":
            aac = self._aac_stream()
            aac.write(_clipped(x))
            return aac.take()
        if self._encoder is not None:
            _write_samples(self._encoder, x)
            return self._sink.drain()
        if self.format == "flac":
            self._pending.append(x.copy())
            return b""
        return self._take_prefix() + pcm_bytes(x)

    def finish(self) -> bytes:
        """Ends the stream; returns the remaining bytes."""
        if self._finished:
            raise RuntimeError("StreamEncoder.finish() called twice")
        self._finished = True
        if self.format == "aac":
            if not self._written:
                self._aac_stream().write(_NOT_EMPTY)
            return self._aac.finish()
        if self._encoder is not None:
            if not self._written:
                _write_samples(self._encoder, _NOT_EMPTY)
            self._encoder.close()
            return self._sink.drain()
        if self.format == "flac":
            return encode_audio(np.concatenate([np.zeros(0, np.float32), *self._pending]), "flac")
        return self._take_prefix()

    def close(self) -> None:
        """Gives up an unfinished stream (a client gone): stops ffmpeg for aac; the rest need nothing."""
        self._finished = True
        if self._aac is not None:
            self._aac.close()

    def _aac_stream(self) -> AacStream:
        if self._aac is None:
            self._aac = AacStream()
        return self._aac

    def _take_prefix(self) -> bytes:
        prefix, self._prefix = self._prefix, b""
        return prefix
