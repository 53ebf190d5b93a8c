"""What audio this project speaks and writes: the codec's rate and frame, the output formats and their media
types, and the error for audio it cannot read or write. Its own module so that audio.py and
ffmpeg.py (which audio.py uses) both take these from one place."""

from __future__ import annotations

SAMPLE_RATE = 24_000  # Mimi's: every sample in and out of the model is at this rate
FRAME_MS = 80  # one frame of codes (32 codebooks, one backbone step) is this much audio: Mimi's 12.5 Hz

FORMATS = ("wav", "flac", "mp3", "opus", "aac", "pcm")
MEDIA_TYPES = {
    "wav": "audio/wav",
    "flac": "audio/flac",
    "mp3": "audio/mpeg",
    "opus": "audio/ogg",
    "aac": "audio/aac",
    "pcm": "audio/pcm",
}


class AudioError(ValueError):
    """An audio file that cannot be read or written, or an unsupported format."""
