"""The OpenAI speech request: its fields checked one by one into a SpeechRequest, or an ApiError that
names the field. Shared by the HTTP endpoint and the websocket. Also the request that saves a voice
(`parse_voice`).

Voices: the OpenAI voice names are built-in voices, each a fixed prompt made once per model
(csm_gguf.builtin_voices); saved voices (csm_gguf.voices) bring their own prompt, and one saved under a
built-in name replaces it. Voice "none" is no prompt at all: the raw model's speaker `speaker_id` (CSM-1B
is a base model: without a prompt a speaker id picks no fixed voice). `speaker_id` overrides the voice's
speaker.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from ..audio import FORMATS, AudioError, check_format
from ..generator import Segment
from ..sampling import SETTINGS as SAMPLING_SETTINGS
from ..sampling import Sampling, Setting
from ..tempo import MAX_SPEED, MIN_SPEED
from ..text import is_blank, is_unicode
from ..tts import CSM, NO_VOICE, Voice
from ..voices import BUILTIN_VOICES, VoiceExists, VoicesFolderError, VoicesFull, all_voices, check_saveable
from .engine import SpeechJob
from .errors import ApiError, generation_error, invalid
from .limits import MAX_CONTEXT_SEGMENTS, MAX_INPUT_CHARS, MAX_JSON_DEPTH, MAX_SPEAKER

if TYPE_CHECKING:
    from werkzeug.datastructures import FileStorage, MultiDict

MODELS = ("csm-1b", "tts-1", "tts-1-hd", "gpt-4o-mini-tts", "gpt-4o-mini-tts-2025-12-15")  # OpenAI's SpeechModel
FIELDS = {
    # OpenAI's fields
    "model", "input", "voice", "instructions", "response_format", "speed", "stream_format",
    # ours, through extra_body
    "speaker_id", "temperature", "top_k", "seed", "max_audio_ms", "context", "stream",
}


# POST /v1/audio/voices, multipart/form-data: OpenAI's fields, then ours (CSM reads a voice prompt with
# its words). OpenAI's `consent` (a consent recording's id) is accepted, not checked; `prompt` (a voice
# described in words: type "prompt") is refused as that type is, and the prompt type's `model` and
# `script_hint` are accepted and ignored.
VOICE_FIELDS = {"name", "audio_sample", "consent", "type", "prompt", "model", "script_hint", "transcript",
                "speaker_id"}


@dataclass(frozen=True)
class ContextAudio:
    """A context segment sent as audio, checked but not yet encoded (`encode_context`): encoding runs the
    Mimi encoder, which a websocket session does once for settings it reuses."""

    speaker: int
    text: str
    audio: bytes  # an audio file
    param: str = field(compare=False)  # where it was sent ("context[0].audio"), for errors


@dataclass
class SpeechRequest:
    job: SpeechJob  # its context: Segments, and ContextAudio until `encode_context`
    response_format: str = "mp3"
    stream_format: str = "audio"
    stream: bool = True  # False: the whole file with a Content-Length (and a WAV header with real sizes)
    speed: float = 1.0  # applied to the audio (csm_gguf.tempo): CSM itself speaks at its own pace


SPEED = Setting("speed", 1.0, MIN_SPEED, MAX_SPEED)
SPEAKER_ID = Setting("speaker_id", 0, 0, MAX_SPEAKER, whole=True)
CONTEXT_SPEAKER = replace(SPEAKER_ID, name="speaker")


def voice_names() -> list[str]:
    return [*all_voices(), NO_VOICE]


def parse_json(data: bytes | str, what: str = "the request body") -> Any:
    """A request's JSON (an HTTP body or a websocket message), or an ApiError (400) that says what is wrong
    with it: not JSON, not UTF-8, or nested deeper than MAX_JSON_DEPTH."""
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:  # UnicodeDecodeError is a ValueError, named for the reader
        raise ApiError(400, f"{what} is not valid JSON: {e}", code="invalid_json") from None
    except RecursionError:  # Python's parser gives up near 1000 levels
        too_deep = True
    else:
        too_deep = not _nested_at_most(value, MAX_JSON_DEPTH)
    if too_deep:
        raise ApiError(400, f"{what} nests arrays and objects more than {MAX_JSON_DEPTH} levels deep (a speech "
                       "request needs 5)", code="invalid_json")
    return value


def _nested_at_most(value: Any, depth: int) -> bool:
    """Whether `value` nests lists and dicts at most `depth` levels deep, found level by level (no recursion)."""
    level = [value] if isinstance(value, (dict, list)) else []
    for _ in range(depth):
        level = [child for v in level for child in (v.values() if isinstance(v, dict) else v)
                 if isinstance(child, (dict, list))]
        if not level:
            return True
    return False


def parse_speech(body: Any, tts: CSM, default_voice: str = "alloy", need_input: bool = True,
                 load: Callable[[str], Voice] | None = None, max_chars: int = MAX_INPUT_CHARS) -> SpeechRequest:
    """The request as the engine needs it, but for encoding its context audio (`encode_context`); ApiError
    (400) for the first bad field. need_input=False for a websocket session's settings, whose text comes
    later. `load` reads a voice by name (a server's: a built-in voice's prompt made through its engine, see
    served_voices); default tts.voice. `max_chars`: the longest input (OpenAI's limit, unless a protocol
    without one reads its requests here)."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    unknown = sorted(set(body) - FIELDS)
    if unknown:
        raise invalid(unknown[0], f"unrecognized request argument: {unknown[0]!r}; known: {', '.join(sorted(FIELDS))}",
                      code="unknown_parameter")
    _model(body, need_input)
    text = _input(body, need_input, max_chars)
    instructions = body.get("instructions")  # accepted for compatibility; CSM takes no style instructions
    if instructions is not None and not isinstance(instructions, str):
        raise invalid("instructions", f"'instructions' must be a string of at most {MAX_INPUT_CHARS} characters")
    if instructions is not None and len(instructions) > MAX_INPUT_CHARS:  # as for input
        raise invalid("instructions", f"'instructions' is {len(instructions)} characters long; at most "
                      f"{MAX_INPUT_CHARS}", code="string_above_max_length")
    fmt, stream_format, stream = _output(body)
    speed = _value(body, SPEED)
    voice = body.get("voice")
    # null is the field left out, as for the sampling settings and speaker_id: the server's default voice
    speaker, segments = _voice(default_voice if voice is None else voice, load or tts.voice)
    if "speaker_id" in body and body["speaker_id"] is not None:
        speaker = _value(body, SPEAKER_ID)
    sampling = Sampling(*(_value(body, setting) for setting in SAMPLING_SETTINGS))
    segments = [*segments, *_context(body.get("context"), tts)]
    job = SpeechJob(text, speaker, segments, sampling)
    return SpeechRequest(job, fmt, stream_format, stream, speed)


def encode_context(req: SpeechRequest, tts: CSM, encoded: dict[ContextAudio, Segment] | None = None
                   ) -> SpeechRequest:
    """The request with its context audio encoded; ApiError (400) naming an audio file that cannot be read.
    `encoded`: encodings to reuse, and keep (a websocket session's)."""
    encoded = {} if encoded is None else encoded
    context = []
    for seg in req.job.context:
        if isinstance(seg, ContextAudio):
            if seg not in encoded:
                audio = io.BytesIO(seg.audio)
                audio.name = "the base64 audio"  # for messages
                try:
                    encoded[seg] = tts.segment(seg.speaker, seg.text, audio=audio)
                except (ValueError, RuntimeError) as e:  # libsndfile's and the codec's complaints about the file
                    raise invalid(seg.param, f"{seg.param}: {e}") from None
            seg = encoded[seg]
        context.append(seg)
    return replace(req, job=replace(req.job, context=context))


def _model(body: dict, need_input: bool) -> None:
    model = body.get("model")
    if model is None and not need_input:  # a websocket's settings: the model is this server's one
        return
    if model is None:  # left out, or null (as for voice)
        raise invalid("model", "'model' is required: a string such as 'csm-1b'", code="missing_required_parameter")
    if not isinstance(model, str):
        raise invalid("model", f"'model' must be a string, one of: {', '.join(MODELS)}")
    if model not in MODELS:
        raise invalid("model", f"unknown model {model!r}; this server speaks with: {', '.join(MODELS)}",
                      code="model_not_found")


def _input(body: dict, need_input: bool, max_chars: int) -> str:
    text = body.get("input", "")
    if need_input and "input" not in body:
        raise invalid("input", "'input' is required: the text to speak", code="missing_required_parameter")
    if not isinstance(text, str):
        raise invalid("input", "'input' must be a string")
    if need_input and is_blank(text):
        raise invalid("input", "'input' is empty: give some words to speak")
    if not is_unicode(text):
        raise invalid("input", "'input' holds lone surrogates, which are not Unicode text")
    if len(text) > max_chars:
        raise invalid("input", f"'input' has {len(text)} characters; at most {max_chars} are allowed",
                      code="string_above_max_length")
    return text


def _output(body: dict) -> tuple[str, str, bool]:
    """response_format, stream_format, stream."""
    fmt = body.get("response_format", "mp3")
    if not isinstance(fmt, str):
        raise invalid("response_format", f"'response_format' must be one of {', '.join(FORMATS)}")
    try:
        check_format(fmt)
    except AudioError as e:
        raise invalid("response_format", str(e), code="unsupported_value") from None
    stream_format = body.get("stream_format", "audio")
    if stream_format not in ("audio", "sse"):
        raise invalid("stream_format", "'stream_format' must be 'audio' or 'sse'")
    stream = body.get("stream", True)
    if not isinstance(stream, bool):
        raise invalid("stream", "'stream' must be true or false")
    if stream_format == "sse" and not stream:  # events are sent as the audio is made: there is no whole file
        raise invalid("stream", "'stream': false (the whole file at once) and 'stream_format': 'sse' (events sent "
                      "as the audio is made) contradict each other: leave out one of them")
    return fmt, stream_format, stream


def parse_voice(form: MultiDict[str, str], files: MultiDict[str, FileStorage], tts: CSM) -> tuple[str, Voice]:
    """The name and the voice (its sample encoded) that a voice upload asks to save; ApiError for the first
    bad field, checked before the (slow) encoding."""
    repeated = sorted(k for k in {*form, *files} if len(form.getlist(k)) + len(files.getlist(k)) > 1)
    if repeated:
        raise invalid(repeated[0], f"'{repeated[0]}' was sent more than once: send it once")
    unknown = sorted((set(form) | set(files)) - VOICE_FIELDS)
    if unknown:
        known = ", ".join(sorted(VOICE_FIELDS))
        raise invalid(unknown[0], f"unrecognized request argument: {unknown[0]!r}; known: {known}",
                      code="unknown_parameter")
    misplaced = sorted(set(files) - {"audio_sample"}) or sorted(set(form) & {"audio_sample"})
    if misplaced:
        kind = "a text field, not a file" if misplaced[0] != "audio_sample" else "a file, not a text field"
        raise invalid(misplaced[0], f"send '{misplaced[0]}' as {kind} (multipart/form-data)")
    if form.get("type", "audio_sample") != "audio_sample" or "prompt" in form:
        raise invalid("type" if "type" in form else "prompt", "CSM makes a voice from an audio sample and its "
                      "transcript: 'type' must be 'audio_sample' (a voice cannot be made from a text prompt)",
                      code="unsupported_value")
    name = form.get("name")
    if not name:
        raise invalid("name", "'name' is required: the voice's name, which is also its id",
                      code="missing_required_parameter")
    try:
        check_saveable(name)  # now, not after encoding the sample
    except VoiceExists:
        raise voice_exists(name) from None
    except (VoicesFolderError, VoicesFull):  # the server's: their handlers answer (errors.py)
        raise
    except ValueError as e:
        raise invalid("name", str(e)) from None
    transcript = form.get("transcript")
    if transcript is not None and "\ufffd" in transcript:  # what the form parser makes of bytes that are not UTF-8
        raise invalid("transcript", "'transcript' must be UTF-8 text: it holds bytes that are not")
    if transcript is None or is_blank(transcript) or not is_unicode(transcript):
        raise invalid("transcript", "'transcript' is required: the words spoken in audio_sample (CSM reads a voice "
                      "prompt together with its text)",
                      code="missing_required_parameter" if transcript is None else "invalid_value")
    if len(transcript) > MAX_INPUT_CHARS:
        raise invalid("transcript", f"'transcript' is {len(transcript)} characters long; at most {MAX_INPUT_CHARS}",
                      code="string_above_max_length")
    speaker = form.get("speaker_id", "0")
    if not (speaker.isascii() and speaker.isdigit() and len(speaker) <= 7 and SPEAKER_ID.allows(int(speaker))):
        raise invalid("speaker_id", f"'speaker_id' must be {SPEAKER_ID.rule()}")
    upload = files.get("audio_sample")
    if upload is None:
        raise invalid("audio_sample", "'audio_sample' is required: the voice's recording, sent as a file "
                      "(multipart/form-data)", code="missing_required_parameter")
    sample = io.BytesIO(upload.read())  # at most MAX_VOICE_UPLOAD
    sample.name = upload.filename or "the uploaded file"  # for messages
    try:
        segment = tts.segment(int(speaker), transcript, audio=sample)
        voice = Voice([segment], segment.speaker)
        tts.check_voice(voice)
    except (ValueError, RuntimeError) as e:  # the audio file's and the codec's complaints, or too short
        raise invalid("audio_sample", f"audio_sample: {e}") from None
    return name, voice


def voice_exists(name: str) -> ApiError:
    return ApiError(409, f"voice {name!r} exists: delete it first (DELETE /v1/audio/voices/{name})", param="name",
                    code="voice_exists")


def _voice(voice: Any, load: Callable[[str], Voice]) -> tuple[int, list[Segment]]:
    if isinstance(voice, dict):
        if set(voice) - {"id"}:  # as every other unknown field
            raise invalid("voice", f"unrecognized field in 'voice': {sorted(set(voice) - {'id'})[0]!r}; a voice "
                          "object has only 'id'", code="unknown_parameter")
        voice = voice.get("id")
    if voice == NO_VOICE:  # no prompt: the raw model
        return 0, []
    if voice is None:  # {"id": null}
        raise invalid("voice", "'voice' needs its id: one of " + ", ".join(voice_names()),
                      code="missing_required_parameter")
    if not isinstance(voice, str):
        raise invalid("voice", "'voice' must be a voice name or {\"id\": name}")
    if voice not in BUILTIN_VOICES and voice not in voice_names():
        raise invalid("voice", f"unknown voice {voice!r}; known voices: {', '.join(voice_names())}",
                      code="voice_not_found")
    try:
        saved = load(voice)
    except VoicesFolderError:  # a built-in voice's prompt could not be kept: the server's (its handler says so)
        raise
    except ValueError as e:  # a damaged voice file, or codes of another model (CSM.usable_voice)
        raise invalid("voice", str(e), code="voice_unusable") from None
    except RuntimeError as e:  # the engine, making a built-in voice's prompt, stopped (shutting down: a 503)
        raise generation_error(e) from None
    return saved.speaker, saved.segments


def _value(body: dict, setting: Setting) -> Any:
    """body[setting.name], checked against the setting's range; its default when absent or null."""
    name, value = setting.name, body.get(setting.name)
    if value is None:
        return setting.default
    number = (int,) if setting.whole else (int, float)
    finite = not isinstance(value, float) or math.isfinite(value)
    if isinstance(value, bool) or not isinstance(value, number) or not finite:
        raise invalid(name, f"'{name}' must be {setting.rule()}")
    if not setting.allows(value):  # exact for ints of any size (JSON allows any number of digits)
        shown = "a number that large" if isinstance(value, int) and abs(value) >= 10**15 else (
            str(value) if setting.whole else f"{value:g}")
        where = "lie " if setting.bounds().startswith("from") else "be "
        raise invalid(name, f"'{name}' is {shown}; it must {where}{setting.bounds()}", code="out_of_range")
    return value if setting.whole else float(value)


def _context(context: Any, tts: CSM) -> list[Segment | ContextAudio]:
    """Context segments: {speaker, text, audio (base64 of an audio file)} or {speaker, text, codes}; the
    audio is checked when it is encoded (`encode_context`)."""
    if context is None:
        return []
    if not isinstance(context, list) or len(context) > MAX_CONTEXT_SEGMENTS:
        raise invalid("context", f"'context' must be a list of at most {MAX_CONTEXT_SEGMENTS} segments")
    segments = []
    k, n_codes = tts.model.config.num_codebooks, tts.model.n_codes
    for i, seg in enumerate(context):
        where = f"context[{i}]"
        if not isinstance(seg, dict) or set(seg) - {"speaker", "text", "audio", "codes"}:
            raise invalid(where, f"{where} must be an object with speaker, text and audio or codes")
        speaker = _value(seg, CONTEXT_SPEAKER)
        text = seg.get("text")
        if not isinstance(text, str) or is_blank(text) or not is_unicode(text) or len(text) > MAX_INPUT_CHARS:
            raise invalid(f"{where}.text", f"{where}.text must be the transcript: Unicode text, not empty, at most "
                          f"{MAX_INPUT_CHARS} characters")
        if (seg.get("audio") is None) == (seg.get("codes") is None):
            raise invalid(where, f"{where} needs exactly one of 'audio' (base64 of an audio file) or 'codes'")
        if seg.get("audio") is not None:
            param = f"{where}.audio"
            segments.append(ContextAudio(speaker, text, _base64(seg["audio"], param), param))
        else:
            try:
                codes = np.asarray(seg["codes"])
                ok = codes.dtype.kind in "iu" and codes.ndim == 2 and codes.shape[1] == k
                ok = ok and codes.size > 0 and 0 <= codes.min() and codes.max() < n_codes
            except (ValueError, TypeError, OverflowError):
                ok = False
            if not ok:
                raise invalid(f"{where}.codes", f"{where}.codes must be a list of frames, each {k} whole numbers "
                              f"from 0 to {n_codes - 1}")
            segments.append(Segment(speaker, text, codes.astype(np.int64)))
    return segments


def _base64(data: Any, param: str) -> bytes:
    """Base64, also as `base64` prints it (in lines) or in a data: URI."""
    if not isinstance(data, str):
        raise invalid(param, f"{param} must be a base64 string of an audio file")
    if data.startswith("data:") and ";base64," in data[:100]:
        data = data.split(";base64,", 1)[1]
    try:
        return base64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError):
        raise invalid(param, f"{param} is not valid base64 (of an audio file)") from None
