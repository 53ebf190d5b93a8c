"""Request checking and the websocket protocol without HTTP: schemas.parse_speech, encode_context and
ws_protocol.parse_message called directly, and the sampling limits shared by Sampling, say and the server."""

from __future__ import annotations

import io
import json
from argparse import Namespace

import numpy as np
import pytest
import soundfile as sf

from csm_gguf.sampling import MAX_AUDIO_MS, SETTINGS, TEMPERATURE, TOP_K, Sampling
from csm_gguf.say import UsageError, check_sampling
from csm_gguf.server.errors import ApiError
from csm_gguf.server.schemas import ContextAudio, encode_context, parse_speech
from csm_gguf.server.ws_protocol import Flush, Speech, Text, parse_message, voice_changed

OK = {"model": "csm-1b", "input": "Hello.", "voice": "alloy"}


def wav_base64(seconds: float = 0.5) -> str:
    import base64

    data = io.BytesIO()
    sf.write(data, 0.1 * np.sin(np.arange(int(24_000 * seconds)) / 10), 24_000, format="WAV")
    return base64.b64encode(data.getvalue()).decode()


def options(**given) -> Namespace:
    """say's parsed sampling options: the defaults, but for `given`."""
    return Namespace(**{**{s.name: s.default for s in SETTINGS}, **given})


def refused(body: dict, tts) -> ApiError:
    with pytest.raises(ApiError) as e:
        parse_speech(body, tts)
    return e.value


def test_a_request_gets_the_sampling_defaults(tts):
    assert parse_speech(OK, tts).job.sampling == Sampling()


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: s.name)
def test_each_sampling_limit_is_the_same_for_the_server_the_api_and_say(tts, setting):
    """One limit, declared once: a value just outside it is refused by all three, one just inside taken."""
    outside = setting.low if setting.low_open else setting.low - 1
    inside = setting.high if setting.high is not None else setting.low + 1
    assert refused({**OK, setting.name: outside}, tts).code == "out_of_range"
    with pytest.raises(ValueError, match=setting.name):
        Sampling(**{setting.name: outside})
    option = "--" + setting.name.replace("_", "-")
    with pytest.raises(UsageError, match=option):
        check_sampling(options(**{setting.name: outside}))
    assert getattr(parse_speech({**OK, setting.name: inside}, tts).job.sampling, setting.name) == inside
    assert getattr(Sampling(**{setting.name: inside}), setting.name) == inside
    check_sampling(options(**{setting.name: inside}))


def test_limits_beyond_what_was_the_servers(tts):
    assert parse_speech({**OK, "top_k": TOP_K.high}, tts).job.sampling.top_k == 2**31 - 1  # was 1,000,000
    assert refused({**OK, "max_audio_ms": MAX_AUDIO_MS.high + 1}, tts).param == "max_audio_ms"
    assert refused({**OK, "temperature": 10**400}, tts).code == "out_of_range"  # no float holds it
    assert TEMPERATURE.allows(50.0)


def test_input_and_context_at_their_limits_are_taken_and_one_more_refused(tts):
    """OpenAI's 4096 characters and 32 context segments are allowed, not the first refused."""
    from csm_gguf.server.limits import MAX_CONTEXT_SEGMENTS, MAX_INPUT_CHARS

    assert len(parse_speech({**OK, "input": "a" * MAX_INPUT_CHARS}, tts).job.text) == MAX_INPUT_CHARS
    assert refused({**OK, "input": "a" * (MAX_INPUT_CHARS + 1)}, tts).param == "input"
    segment = {"speaker": 0, "text": "Hi.", "codes": [[1] * 32]}
    no_voice = {**OK, "voice": "none"}  # a voice's prompt would come first, as a segment of its own
    assert len(parse_speech({**no_voice, "context": [segment] * MAX_CONTEXT_SEGMENTS}, tts).job.context) \
        == MAX_CONTEXT_SEGMENTS
    assert refused({**no_voice, "context": [segment] * (MAX_CONTEXT_SEGMENTS + 1)}, tts).param == "context"


def test_checking_a_request_does_not_encode_its_context_audio(tts, monkeypatch):
    calls = []
    segment = tts.segment
    monkeypatch.setattr(tts, "segment", lambda *a, **kw: (calls.append(a), segment(*a, **kw))[1])
    body = {**OK, "context": [{"speaker": 1, "text": "Some words.", "audio": wav_base64()}]}
    req = parse_speech(body, tts)
    assert calls == [] and isinstance(req.job.context[-1], ContextAudio)  # after alloy's prompt
    encoded: dict = {}
    first = encode_context(req, tts, encoded)
    again = encode_context(parse_speech(body, tts), tts, encoded)  # the same audio, sent again
    assert len(calls) == 1 and len(encoded) == 1
    np.testing.assert_array_equal(first.job.context[-1].codes, again.job.context[-1].codes)
    assert first.job.context[-1].codes.shape[1] == 32


def test_unreadable_context_audio_is_named_when_encoded(tts):
    import base64

    body = {**OK, "context": [{"speaker": 0, "text": "hi", "audio": base64.b64encode(b"hello").decode()}]}
    with pytest.raises(ApiError) as e:
        encode_context(parse_speech(body, tts), tts)
    assert (e.value.status, e.value.param) == (400, "context[0].audio")


@pytest.mark.parametrize("message, parsed", [
    (json.dumps({"type": "text", "text": "Hi. "}), Text("Hi. ")),
    (json.dumps({"type": "flush"}), Flush()),
    (json.dumps({"voice": "echo"}), Speech({"voice": "echo"})),
    (json.dumps({"type": "speech", "input": "Hi.", "speed": 2}), Speech({"speed": 2}, "Hi.")),
])
def test_websocket_messages_parse_into_typed_values(message, parsed):
    assert parse_message(message) == parsed


@pytest.mark.parametrize("message, code, param", [
    (b"\x00binary", "invalid_json", None),
    ("{not json", "invalid_json", None),
    ("[1, 2]", "invalid_json", None),
    (json.dumps({"type": "text", "text": 5}), "invalid_value", "text"),
    (json.dumps({"type": "text"}), "missing_required_parameter", "text"),
    (json.dumps({"type": "text", "text": "caf\ud800"}), "invalid_value", "text"),  # a lone surrogate
    (json.dumps({"type": "text", "text": "a", "more": 1}), "unknown_parameter", "more"),
    (json.dumps({"type": "shout"}), "invalid_value", "type"),
    (json.dumps({"type": [], "": 0}), "invalid_value", "type"),  # not a name at all (hypothesis found it)
    (json.dumps({"type": "flush", "foo": 1}), "unknown_parameter", "foo"),  # as over HTTP
    (json.dumps({"type": "speech", "stream_format": "sse"}), "unsupported_parameter", "stream_format"),
    (json.dumps({"input": "Hi.", "stream": False}), "unsupported_parameter", "stream"),
    (json.dumps({"stream": True}), "unsupported_parameter", "stream"),  # its HTTP default means nothing here too
])
def test_bad_websocket_messages_are_api_errors(message, code, param):
    with pytest.raises(ApiError) as e:
        parse_message(message)
    assert (e.value.status, e.value.code, e.value.param) == (400, code, param)


@pytest.mark.parametrize("field", ["stream", "stream_format"])
def test_websocket_speech_refuses_what_only_shapes_http_responses(field):
    with pytest.raises(ApiError) as e:
        parse_message(json.dumps({"voice": "echo", field: "x"}))
    assert e.value.message.startswith(f"'{field}' is for HTTP responses: the websocket always sends audio")


def test_a_model_of_the_wrong_type_is_named_as_such(tts):
    error = refused({**OK, "model": 1}, tts)
    assert (error.param, error.code) == ("model", "invalid_value")
    assert error.message == ("'model' must be a string, one of: csm-1b, tts-1, tts-1-hd, gpt-4o-mini-tts, "
                             "gpt-4o-mini-tts-2025-12-15")
    for body in ({"input": "Hello."}, {"input": "Hello.", "model": None}):  # null: left out (as for voice)
        assert (refused(body, tts).param, refused(body, tts).code) == ("model", "missing_required_parameter")


def test_a_null_voice_is_the_default_voice_as_when_left_out(tts):
    unnamed = {k: v for k, v in OK.items() if k != "voice"}
    default = parse_speech(unnamed, tts, default_voice="echo").job
    null = parse_speech({**unnamed, "voice": None}, tts, default_voice="echo").job
    assert null.speaker == default.speaker == 4 and len(null.context) == len(default.context) == 1
    np.testing.assert_array_equal(null.context[0].codes, default.context[0].codes)  # echo's prompt


def test_an_sse_stream_cannot_be_a_whole_file(tts):
    error = refused({**OK, "stream_format": "sse", "stream": False}, tts)
    assert (error.param, error.code) == ("stream", "invalid_value")
    assert "'stream': false" in error.message and "'stream_format': 'sse'" in error.message
    assert parse_speech({**OK, "stream_format": "sse", "stream": True}, tts).stream_format == "sse"


def test_only_the_voice_fields_make_another_voice():
    assert not voice_changed({"voice": "echo", "speed": 1}, {"voice": "echo", "speed": 2, "response_format": "pcm"})
    assert voice_changed({"voice": "echo"}, {"voice": "echo", "speaker_id": 3})
    assert voice_changed({}, {"context": []})
