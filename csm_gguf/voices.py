"""Saved voices: an encoded voice prompt (segments of speaker, transcript and codes) kept by name."""

from __future__ import annotations

import io
import json
import os
import re
import threading
from pathlib import Path

import numpy as np

from .atomic import write_atomic
from .formats import FRAME_MS
from .generator import Segment, check_speaker
from .model_dir import cache_root
from .tts import Voice

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # fullmatch: "$" would let a final newline in
# The server's voices without a prompt: OpenAI's names, each a CSM speaker id. Saved voices cannot take them.
BUILTIN_VOICES = {
    name: speaker
    for speaker, name in enumerate(
        ("alloy", "ash", "ballad", "coral", "echo", "fable", "onyx", "nova", "sage", "shimmer", "verse", "marin",
         "cedar")
    )
}


class VoiceExists(ValueError):
    """A voice of that name is saved already: voices are not replaced, only deleted."""

    def __init__(self, name: str) -> None:
        super().__init__(f"voice {name!r} exists")
        self.name = name


class VoicesFolderError(ValueError):
    """The voices folder cannot be used: the setup's problem, not the request's."""


class VoicesFull(ValueError):
    """The voices folder holds as many voices as its limit (CSM_GGUF_MAX_VOICES) allows."""


# How many voices the folder may hold, declared once: the server's users can add voices, and each file
# is at most ~140 kB from the server (its codes fill at most the model's context), so 100 voices is
# at most 14 MB.
MAX_VOICES = ("CSM_GGUF_MAX_VOICES", 100)
_saving = threading.Lock()  # the count checked and the file written as one step (within a process)


def max_voices() -> int:
    var, default = MAX_VOICES
    raw = os.environ.get(var) or str(default)
    if not (raw.isascii() and raw.isdigit()):
        raise VoicesFolderError(f"{var} must be a whole number >= 0 (the most saved voices), got {raw!r}")
    return int(raw)


def voices_dir() -> Path:
    return Path(os.environ.get("CSM_GGUF_VOICES") or cache_root() / "voices").expanduser()


def _path(name: str) -> Path:
    if not NAME.fullmatch(name):
        raise ValueError(f"bad voice name {name!r}: use letters, digits, '-', '_' or '.' (at most 64)")
    return voices_dir() / f"{name}.npz"


def _folder() -> Path:
    folder = voices_dir()
    if folder.exists() and not folder.is_dir():
        raise VoicesFolderError(f"the voices folder {folder} is a file: set CSM_GGUF_VOICES to a folder")
    return folder


def list_voices() -> list[str]:
    """The saved voices' names (files whose names could not be saved as voices are not voices)."""
    folder = _folder()
    if not folder.is_dir():
        return []
    names = (p.stem for p in folder.glob("*.npz") if p.is_file())
    return sorted(name for name in names if NAME.fullmatch(name) and name not in BUILTIN_VOICES)


def check_saveable(name: str) -> Path:
    """The file a voice named `name` is saved to, or a ValueError if that name cannot be saved (VoiceExists
    if it is taken)."""
    path = _path(name)
    if name in BUILTIN_VOICES:
        raise ValueError(f"{name!r} is one of the server's built-in voices (speaker {BUILTIN_VOICES[name]}): "
                         "save the voice under another name")
    if name.isdigit():
        raise ValueError(f"voice name {name!r} is all digits, which a dialogue script reads as a speaker id: "
                         "save the voice under a name with a letter in it")
    _folder()
    if path.exists():
        raise VoiceExists(name)
    saved, limit = len(list_voices()), max_voices()
    if saved >= limit:
        var = MAX_VOICES[0]
        raise VoicesFull(f"{saved} voices are saved, the most {var}={limit} allows: delete one first, or raise {var}")
    return path


def save_voice(name: str, voice: Voice) -> Path:
    """Saves `voice` as `name`: whole or not at all, and not past the folder's limit (VoicesFull)."""
    with _saving:
        return _save(name, voice)


def _save(name: str, voice: Voice) -> Path:
    path = check_saveable(name)
    if not voice.segments or any(seg.codes is None for seg in voice.segments):
        raise ValueError("a voice needs at least one context segment with audio")
    meta = {"speaker": voice.speaker, "segments": [{"speaker": s.speaker, "text": s.text} for s in voice.segments]}
    codes = [np.asarray(s.codes) for s in voice.segments]
    if any(c.dtype.kind not in "iu" or c.size and not 0 <= c.min() <= c.max() <= np.iinfo(np.int16).max for c in codes):
        raise ValueError("voice codes must be whole numbers from 0 to 32767 (check them with tts.segment)")
    arrays = {f"codes_{i}": c.astype(np.int16) for i, c in enumerate(codes)}
    buffer = io.BytesIO()
    np.savez(buffer, meta=np.array(json.dumps(meta)), **arrays)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, buffer.getvalue(), replace=False)  # of two saving the same name, one wins
    except FileExistsError:
        raise VoiceExists(name) from None
    except OSError as e:
        raise VoicesFolderError(f"cannot save voice {name!r} in {path.parent} ({e.strerror}): set CSM_GGUF_VOICES "
                                "to a folder you can write") from None
    return path


def delete_voice(name: str) -> bool:
    """Removes a saved voice; False if there is none of that name."""
    if name in BUILTIN_VOICES:
        raise ValueError(f"{name!r} is a built-in voice; only saved voices can be deleted")
    if name not in list_voices():
        return False
    path = _path(name)
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    except OSError as e:
        raise VoicesFolderError(f"cannot delete voice {name!r} ({path}: {e.strerror})") from None
    return True


def describe(name: str) -> str:
    """One line on a saved voice: its speaker, how long its prompt is, and how its transcript begins."""
    try:
        voice = load_voice(name)
    except ValueError as e:
        return f"{name}: {e}"
    seconds = sum(len(s.codes) for s in voice.segments) * FRAME_MS / 1000
    text = " ".join(s.text for s in voice.segments)
    text = text if len(text) <= 60 else text[:57] + "..."
    return f"{name}: speaker {voice.speaker}, {len(voice.segments)} prompt segment(s), {seconds:.1f} s, {text!r}"


def _segment(meta: dict, codes: np.ndarray) -> Segment:
    if codes.ndim != 2 or codes.dtype.kind not in "iu":
        raise ValueError(f"codes of shape {codes.shape} and type {codes.dtype}, not frames of whole numbers")
    segment = Segment(int(meta["speaker"]), str(meta["text"]), codes.astype(np.int64))
    check_speaker(segment.speaker)
    return segment


def load_voice(name: str) -> Voice:
    if name in BUILTIN_VOICES:  # as on the server: the speaker, no prompt
        return Voice(segments=[], speaker=BUILTIN_VOICES[name])
    path = _path(name)
    if not path.exists():
        raise _unknown(name)
    try:
        archive = np.load(path, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise ValueError("an array, not a voice archive")
        with archive as data:
            meta = json.loads(str(data["meta"]))
            segments = [_segment(s, data[f"codes_{i}"]) for i, s in enumerate(meta["segments"])]
            voice = Voice(segments=segments, speaker=int(meta["speaker"]))
            check_speaker(voice.speaker)
            return voice
    except FileNotFoundError:  # deleted meanwhile (by another replica sharing the folder, say)
        raise _unknown(name) from None
    except Exception as e:  # a damaged file fails in any of zipfile's, zlib's, json's or numpy's ways
        reason = str(e).replace(str(path), path.name)  # named by the voice: a server shows this to its clients
        raise ValueError(f"voice {name!r} is damaged ({reason}): delete it and save it again") from None


def _unknown(name: str) -> ValueError:
    saved = ", ".join(list_voices()) or "none yet"
    return ValueError(f"unknown voice {name!r} (saved: {saved}; built-in: {', '.join(BUILTIN_VOICES)}); "
                      "save one with --save-voice")
