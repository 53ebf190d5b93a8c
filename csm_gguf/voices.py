"""Saved voices: an encoded voice prompt (segments of speaker, transcript and codes) kept by name."""

from __future__ import annotations

import io
import json
import os
import re
import zipfile
from pathlib import Path

import numpy as np

from .atomic import write_atomic
from .generator import Segment
from .model_dir import cache_root
from .tts import Voice

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# The server's voices without a prompt: OpenAI's names, each a CSM speaker id. Saved voices cannot take them.
BUILTIN_VOICES = {
    name: speaker
    for speaker, name in enumerate(
        ("alloy", "ash", "ballad", "coral", "echo", "fable", "onyx", "nova", "sage", "shimmer", "verse", "marin",
         "cedar")
    )
}


def voices_dir() -> Path:
    return Path(os.environ.get("CSM_GGUF_VOICES") or cache_root() / "voices").expanduser()


def _path(name: str) -> Path:
    if not NAME.match(name):
        raise ValueError(f"bad voice name {name!r}: use letters, digits, '-', '_' or '.' (at most 64)")
    return voices_dir() / f"{name}.npz"


def list_voices() -> list[str]:
    folder = voices_dir()
    return sorted(p.stem for p in folder.glob("*.npz")) if folder.is_dir() else []


def save_voice(name: str, voice: Voice) -> Path:
    path = _path(name)
    if name in BUILTIN_VOICES:
        raise ValueError(f"{name!r} is one of the server's built-in voices (speaker {BUILTIN_VOICES[name]}): "
                         "save the voice under another name")
    if not voice.segments or any(seg.codes is None for seg in voice.segments):
        raise ValueError("a voice needs at least one context segment with audio")
    meta = {"speaker": voice.speaker, "segments": [{"speaker": s.speaker, "text": s.text} for s in voice.segments]}
    arrays = {f"codes_{i}": np.asarray(s.codes, dtype=np.int16) for i, s in enumerate(voice.segments)}
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.savez(buffer, meta=np.array(json.dumps(meta)), **arrays)
    write_atomic(path, buffer.getvalue())
    return path


def load_voice(name: str) -> Voice:
    if name in BUILTIN_VOICES:  # as on the server: the speaker, no prompt
        return Voice(segments=[], speaker=BUILTIN_VOICES[name])
    path = _path(name)
    if not path.exists():
        known = ", ".join(list_voices()) or "none saved yet"
        raise ValueError(f"unknown voice {name!r} (known: {known}); save one with --save-voice")
    try:
        archive = np.load(path, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise ValueError("an array, not an archive")
    except (OSError, EOFError, ValueError, zipfile.BadZipFile):
        raise ValueError(f"voice {name!r} is damaged: {path} is not a voice archive; save it again with "
                         "--save-voice") from None
    try:
        with archive as data:
            meta = json.loads(str(data["meta"]))
            segments = [
                Segment(int(s["speaker"]), str(s["text"]), data[f"codes_{i}"].astype(np.int64))
                for i, s in enumerate(meta["segments"])
            ]
            return Voice(segments=segments, speaker=int(meta["speaker"]))
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as e:
        raise ValueError(f"voice {name!r} is damaged ({path}: {e}); save it again with --save-voice") from None
