"""ffmpeg, where it is installed: the audio formats libsndfile lacks.

libsndfile reads and writes wav, flac, ogg and mp3. With an `ffmpeg` program on PATH, csm-gguf also
writes AAC (ADTS, the OpenAI API's "aac") and reads whatever audio ffmpeg can (m4a from a phone, aac,
webm, ...). ffmpeg runs as a child process, over pipes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
from typing import BinaryIO

import numpy as np

from .formats import SAMPLE_RATE, AudioError

AAC_BITRATE = "64k"  # mono speech; about what the MP3 output uses
INSTALL_HINT = "install it (apt-get install ffmpeg, brew install ffmpeg, or https://ffmpeg.org/download.html)"

# Demuxers ffmpeg may use on audio it reads: audio containers only. Playlists (hls, concat) would let a
# file sent to the server make ffmpeg open other files or URLs.
_READ_FORMATS = ",".join([
    "mov,mp4,m4a,3gp,3g2,mj2", "aac", "matroska,webm", "ogg", "wav", "w64", "flac", "mp3", "aiff", "caf",
    "amr", "asf", "ac3", "eac3", "wv",
])  # fmt: skip
_QUIET = ["-hide_banner", "-nostats", "-loglevel", "error"]
DECODE_TIMEOUT_S = 300  # reading a voice prompt (at most minutes of audio) takes seconds
# Raw samples in: nothing to probe, and probing would hold back the first 5 s of a stream.
_AAC_ENCODE = [
    "-probesize", "32", "-analyzeduration", "0", "-f", "f32le", "-ar", str(SAMPLE_RATE), "-ac", "1", "-i", "pipe:0",
    "-c:a", "aac", "-b:a", AAC_BITRATE, "-f", "adts", "-flush_packets", "1", "pipe:1",
]  # fmt: skip


def find() -> str | None:
    """The ffmpeg program on PATH, or None."""
    return shutil.which("ffmpeg")


def require(purpose: str) -> str:
    path = find()
    if path is None:
        raise AudioError(f"{purpose} needs ffmpeg, which is not on PATH: {INSTALL_HINT}")
    return path


def _last_line(stderr: bytes, returncode: int) -> str:
    lines = [line for line in stderr.decode(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else f"it exited with status {returncode} without saying why"


def _failure(what: str, stderr: bytes, returncode: int) -> AudioError:
    return AudioError(f"ffmpeg could not {what}: {_last_line(stderr, returncode)}")


def _raw(samples: np.ndarray) -> bytes:
    return np.asarray(samples, dtype="<f4").tobytes()


def encode_aac(samples: np.ndarray) -> bytes:
    """24 kHz mono float samples in [-1, 1] as an ADTS AAC file."""
    run = subprocess.run([require("AAC output"), *_QUIET, *_AAC_ENCODE], input=_raw(samples), capture_output=True)
    if run.returncode:
        raise _failure("encode AAC", run.stderr, run.returncode)
    return run.stdout


class AacStream:
    """ffmpeg encoding AAC while samples arrive: the same bytes as `encode_aac` of all of them.

    A thread collects ffmpeg's output as it comes, so neither pipe can fill up and stall the other;
    `take` returns what has come so far (ffmpeg answers a chunk a moment after it is written, so its
    bytes come with a later `take`). `close` stops ffmpeg; so does dropping an unfinished stream, once
    it is collected (the reader thread holds only ffmpeg's output, not the stream).
    """

    def __init__(self) -> None:
        self._errors = tempfile.TemporaryFile()  # a file, so ffmpeg never blocks on a full stderr pipe
        self._process = subprocess.Popen([require("AAC output"), *_QUIET, *_AAC_ENCODE], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=self._errors)
        self._output = bytearray()
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=_collect, args=(self._process.stdout, self._output, self._lock),
                                        name="ffmpeg-aac", daemon=True)
        self._reader.start()

    def write(self, samples: np.ndarray) -> None:
        try:
            self._process.stdin.write(_raw(samples))
            self._process.stdin.flush()
        except (BrokenPipeError, ValueError):  # ffmpeg exited (ValueError: stdin already closed)
            raise self._error() from None

    def take(self) -> bytes:
        with self._lock:
            data = bytes(self._output)
            self._output.clear()
        return data

    def finish(self) -> bytes:
        """Ends the input; returns the rest once ffmpeg has written it all."""
        try:
            self._process.stdin.close()
        except BrokenPipeError:
            pass
        self._reader.join()
        self._process.stdout.close()
        if self._process.wait():
            raise self._error()
        self._errors.close()
        return self.take()

    def close(self) -> None:
        """Stops ffmpeg now (a stream given up half-way)."""
        if self._process.poll() is None:
            self._process.kill()
        self._process.wait()
        self._reader.join()
        for f in (self._process.stdin, self._process.stdout, self._errors):
            f.close()

    def __del__(self) -> None:
        process = getattr(self, "_process", None)  # None: Popen itself failed
        if process is not None and process.poll() is None:
            process.kill()  # subprocess keeps an unfinished Popen (and its stdin) alive: ffmpeg would wait

    def _error(self) -> AudioError:
        returncode = self._process.wait()
        self._errors.seek(0)
        return _failure("encode AAC", self._errors.read(), returncode)


def _collect(stdout: BinaryIO, output: bytearray, lock: threading.Lock) -> None:
    while chunk := stdout.read1(1 << 16):
        with lock:
            output += chunk


class ReadError(Exception):
    """What ffmpeg said when it could not read a file."""


def decode_to_wav(source: str | os.PathLike[str] | BinaryIO, name: str, max_seconds: float | None = None) -> bytes:
    """An audio file ffmpeg can read, as a 24 kHz mono float WAV file of at most `max_seconds`: its channels
    averaged and resampled by ffmpeg, as a small file can hold minutes of many channels (Opus allows 255).
    File objects go through a temporary file: MP4 files often keep their index at the end, which a pipe
    cannot reach."""
    exe = require(f"reading {name} (a format libsndfile cannot read)")
    with tempfile.NamedTemporaryFile(suffix=".audio") as tmp:
        if isinstance(source, (str, os.PathLike)):
            path = os.path.abspath(source)
        else:
            shutil.copyfileobj(source, tmp)
            tmp.flush()
            path = tmp.name
        safe = ["-protocol_whitelist", "file", "-format_whitelist", _READ_FORMATS]
        channels = _channels(safe, path)
        # The mean of the channels, as for the files libsndfile reads (ffmpeg's own downmix weighs them
        # unevenly: 0.71 each for stereo); without ffprobe, that downmix.
        pan = "pan=mono|c0=" + "+".join(f"{1 / channels:.9g}*c{i}" for i in range(channels or 0))
        mix = ["-af", pan] if channels else []
        try:
            run = subprocess.run(
                [exe, *_QUIET, "-nostdin", *safe, "-i", "file:" + path, "-map", "0:a:0",
                 *([] if max_seconds is None else ["-t", f"{max_seconds:.3f}"]), *mix,
                 "-ac", "1", "-ar", str(SAMPLE_RATE), "-c:a", "pcm_f32le", "-f", "wav", "pipe:1"],
                capture_output=True, stdin=subprocess.DEVNULL, timeout=DECODE_TIMEOUT_S,
            )  # fmt: skip
        except subprocess.TimeoutExpired:  # a file made to stall the decoder holds no thread for ever
            raise ReadError(f"decoding took over {DECODE_TIMEOUT_S} s") from None
    if run.returncode:
        said = _last_line(run.stderr, run.returncode).replace(f"file:{path}: ", "")
        raise ReadError("it has no audio stream" if b"matches no streams" in run.stderr else said)
    return run.stdout


def _channels(safe: list[str], path: str) -> int | None:
    """The first audio stream's channel count, by ffprobe (None where it is missing or cannot tell)."""
    probe = shutil.which("ffprobe")
    if probe is None:
        return None
    try:
        run = subprocess.run([probe, "-v", "error", *safe, "-select_streams", "a:0", "-show_entries",
                              "stream=channels", "-of", "csv=p=0", "file:" + path], capture_output=True,
                             stdin=subprocess.DEVNULL, timeout=DECODE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return None
    text = run.stdout.decode(errors="replace").strip()
    return int(text) if run.returncode == 0 and text.isdigit() and 0 < int(text) <= 255 else None
