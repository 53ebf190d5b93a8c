"""Saved voices: an encoded voice prompt (segments of speaker, transcript and codes) kept by name.

The built-in names (builtin_voices.py) are fixed prompts made once per model; a voice saved under one of
those names replaces it, and deleting that saved voice brings the built-in one back.
"""

from __future__ import annotations

import io
import json
import os
import re
import threading
from pathlib import Path

import numpy as np

from . import builtin_voices
from .atomic import write_atomic
from .formats import FRAME_MS
from .generator import Segment, check_speaker
from .model_dir import cache_root
from .tts import NO_VOICE, Voice, check_transcript

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # fullmatch: "$" would let a final newline in
# Device names on Windows, where no file may be called so (also with an extension: "con.voice.npz").
WINDOWS_DEVICES = frozenset({"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)),
                             *(f"LPT{i}" for i in range(1, 10))})
BUILTIN_VOICES = builtin_voices.SPEAKERS  # OpenAI's names, each a fixed prompt of a CSM speaker id


class VoiceExists(ValueError):
    """A voice of that name is saved already: voices are not replaced, only deleted."""

    def __init__(self, name: str) -> None:
        super().__init__(f"voice {name!r} exists")
        self.name = name


class VoicesFolderError(ValueError):
    """The voices folder cannot be used: the setup's problem, not the request's."""


class PromptCacheError(VoicesFolderError):
    """A built-in voice's prompt cannot be kept in the cache folder (CSM_GGUF_CACHE): the setup's problem."""


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
    if not isinstance(name, str):
        raise TypeError(f"a voice name is a string, got {type(name).__name__}")
    if not NAME.fullmatch(name):
        raise ValueError(f"bad voice name {name!r}: use letters, digits, '-', '_' or '.', starting with a letter or "
                         "digit (at most 64)")
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
    return sorted(name for name in names if NAME.fullmatch(name) and name != NO_VOICE)


def _builtin(name: str) -> bool:
    """Whether `name` is a built-in voice that no saved voice replaces (found without listing the voices
    folder, which a built-in voice does not need)."""
    return name in BUILTIN_VOICES and not (voices_dir() / f"{name}.npz").is_file()


def all_voices() -> list[str]:
    """The built-in voices' names, then the saved voices' (a saved one replaces a built-in one)."""
    saved = list_voices()
    return [*BUILTIN_VOICES, *(name for name in saved if name not in BUILTIN_VOICES)]


def check_saveable(name: str) -> Path:
    """The file a voice named `name` is saved to, or a ValueError if that name cannot be saved (VoiceExists
    if it is taken)."""
    path = _path(name)
    if name == NO_VOICE:
        raise ValueError(f"{NO_VOICE!r} means no voice prompt: save the voice under another name")
    if name.isdigit():
        raise ValueError(f"voice name {name!r} is all digits, which a dialogue script reads as a speaker id: "
                         "save the voice under a name with a letter in it")
    if name.split(".")[0].upper() in WINDOWS_DEVICES:
        raise ValueError(f"voice name {name!r} is a device's name on Windows, where no file may have it: save the "
                         "voice under another name")
    _folder()
    saved = list_voices()
    twin = next((other for other in (*BUILTIN_VOICES, *saved) if other.lower() == name.lower() and other != name),
                None)
    if twin is not None:
        raise ValueError(f"voice name {name!r} differs from voice {twin!r} only in case, and on macOS and Windows "
                         f"their files are one: save it under another name, or under {twin!r}")
    if path.exists():
        raise VoiceExists(name)
    limit = max_voices()
    if len(saved) >= limit:
        var = MAX_VOICES[0]
        raise VoicesFull(f"{len(saved)} voices are saved, the most {var}={limit} allows: delete one first, or raise "
                         f"{var}")
    return path


def save_voice(name: str, voice: Voice) -> Path:
    """Saves `voice` as `name`: whole or not at all, and not past the folder's limit (VoicesFull)."""
    with _saving:
        return _save(name, voice)


def _save(name: str, voice: Voice) -> Path:
    path = check_saveable(name)
    data = voice_bytes(voice)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, data, replace=False)  # of two saving the same name, one wins
    except FileExistsError:
        raise VoiceExists(name) from None
    except OSError as e:
        raise VoicesFolderError(f"cannot save voice {name!r} in {path.parent} ({e.strerror}): set CSM_GGUF_VOICES "
                                "to a folder you can write") from None
    return path


def voice_bytes(voice: Voice) -> bytes:
    """A voice as the .npz archive it is kept in."""
    if not isinstance(voice, Voice):
        raise TypeError(f"save a Voice (voices.Voice(segments, speaker)), not a {type(voice).__name__}")
    if not voice.segments or any(seg.codes is None for seg in voice.segments):
        raise ValueError("a voice needs at least one context segment with audio")
    for who in (voice.speaker, *(s.speaker for s in voice.segments)):
        check_speaker(who)  # (what loading checks: saved otherwise, the voice was "damaged" at its first use)
    for s in voice.segments:
        check_transcript(s.text)
    meta = {"speaker": int(voice.speaker),
            "segments": [{"speaker": int(s.speaker), "text": s.text} for s in voice.segments]}
    codes = [np.asarray(s.codes) for s in voice.segments]
    if any(c.ndim != 2 for c in codes):
        raise ValueError("voice codes are (frames, codebooks): make a segment with tts.segment")
    if any(c.dtype.kind not in "iu" or c.size and not 0 <= c.min() <= c.max() <= np.iinfo(np.int16).max for c in codes):
        raise ValueError("voice codes must be whole numbers from 0 to 32767 (check them with tts.segment)")
    arrays = {f"codes_{i}": c.astype(np.int16) for i, c in enumerate(codes)}
    buffer = io.BytesIO()
    np.savez(buffer, meta=np.array(json.dumps(meta)), **arrays)
    return buffer.getvalue()


def delete_voice(name: str) -> bool:
    """Removes a saved voice; False if there is none of that name. A built-in name's saved voice gives way
    to the built-in voice again."""
    if name not in list_voices():
        if name in BUILTIN_VOICES:
            raise ValueError(f"{name!r} is a built-in voice; only saved voices can be deleted")
        return False
    path = _path(name)
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    except OSError as e:
        raise VoicesFolderError(f"cannot delete voice {name!r} ({path}: {e.strerror})") from None
    return True


def describe(name: str, model_dir: str | os.PathLike | None = None) -> str:
    """One line on a voice (see `voice_info`): its speaker, how long its prompt is, and how its transcript
    begins."""
    info = voice_info(name, model_dir)
    kind = "built-in, " if info["type"] == "builtin" else ""
    if "error" in info:
        return f"{name}: {info['error']}"
    if info["prompt"] is None:
        return f"{name}: {kind}speaker {info['speaker_id']}, prompt made on first use"
    prompt = info["prompt"]
    text = prompt["transcript"] if len(prompt["transcript"]) <= 60 else prompt["transcript"][:57] + "..."
    return (f"{name}: {kind}speaker {info['speaker_id']}, {prompt['segments']} prompt segment(s), "
            f"{prompt['seconds']:.1f} s, {text!r}")


def voice_info(name: str, model_dir: str | os.PathLike | None = None) -> dict:
    """A voice's kind ("builtin", or "saved": a saved one replaces a built-in one of its name), speaker and
    prompt (`prompt_info`; None for a built-in voice whose prompt this model, in `model_dir`, has not made
    yet), or the error that makes it unusable."""
    builtin = _builtin(name)
    info: dict = {"id": name, "name": name, "type": "builtin" if builtin else "saved",
                  "speaker_id": BUILTIN_VOICES.get(name), "prompt": None}
    path = _path(name)
    if builtin:
        path = None if model_dir is None else builtin_voices.prompt_path(name, model_dir)
        if path is None or not path.exists():
            return info
    try:
        voice = read_voice(path, name, fix=_remake(path)) if builtin else read_voice(path, name)
    except ValueError as e:
        return {**info, "error": str(e)}
    return {**info, "speaker_id": voice.speaker, "prompt": prompt_info(voice)}


def prompt_info(voice: Voice) -> dict:
    """What a voice's prompt holds: its speaker, seconds of audio, frames and transcript."""
    frames = sum(len(s.codes) for s in voice.segments if s.codes is not None)
    return {"segments": len(voice.segments), "frames": frames, "seconds": frames * FRAME_MS / 1000,
            "transcript": " ".join(s.text for s in voice.segments)}


def _segment(meta: dict, codes: np.ndarray) -> Segment:
    if codes.ndim != 2 or codes.dtype.kind not in "iu":
        raise ValueError(f"codes of shape {codes.shape} and type {codes.dtype}, not frames of whole numbers")
    segment = Segment(int(meta["speaker"]), str(meta["text"]), codes.astype(np.int64))
    check_speaker(segment.speaker)
    return segment


def voice_speaker(name: str) -> int:
    """The speaker id of voice `name`, checking now (before a model is loaded) that it can be used: a
    saved voice is read, a built-in one needs nothing."""
    if _builtin(name):
        return BUILTIN_VOICES[name]
    return load_voice(name).speaker


def load_voice(name: str, model_dir: str | os.PathLike | None = None,
               make: builtin_voices.MakeCodes | None = None) -> Voice:
    """A voice by name: the saved one, else the built-in one (its prompt for the model in `model_dir`,
    made now by `make` if it is not yet: see builtin_voices.ensure_prompt)."""
    if _builtin(name):
        if model_dir is None or make is None:
            raise TypeError("a built-in voice's prompt belongs to a model: give model_dir and make")
        path = builtin_voices.ensure_prompt(name, model_dir, make)
        return read_voice(path, name, fix=_remake(path))
    path = _path(name)
    if not path.exists():
        raise _unknown(name)
    return read_voice(path, name)


def _remake(path: Path) -> str:
    """The fix for a damaged built-in prompt, naming its file under the cache (not the server's own paths,
    which its clients see)."""
    try:
        where = f"{path.relative_to(cache_root())} in the cache (CSM_GGUF_CACHE)"
    except ValueError:
        where = path.name
    return f"delete {where} and it is made again on next use"


def read_voice(path: Path, name: str, fix: str = "delete it and save it again") -> Voice:
    """The voice kept in `path` (`name`'s); a ValueError naming the voice and `fix` if it is damaged."""
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
        reason = numpy_failure(e).replace(str(path), path.name)  # named by the voice: a server shows this to clients
        raise ValueError(f"voice {name!r} is damaged ({reason}): {fix}") from None


def numpy_failure(e: Exception) -> str:
    """Why np.load failed, for a user. Of a file that is no .npy or .npz, numpy says it "contains pickled (object)
    data" and advises loading it unsafely, which no one should do with a file that was not saved as a voice."""
    return "not a numpy file (.npy or .npz)" if str(e).startswith("This file contains pickled") else str(e)


def _unknown(name: str) -> ValueError:
    saved = ", ".join(list_voices()) or "none yet"
    return ValueError(f"unknown voice {name!r} (saved: {saved}; built-in: {', '.join(BUILTIN_VOICES)}; "
                      f"{NO_VOICE!r} for none; names are case-sensitive); save one with say --save-voice (or "
                      "voices.save_voice)")
