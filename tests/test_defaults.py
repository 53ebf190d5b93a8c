"""Every default a client or caller relies on, pinned: the OpenAI request's, the voices', the sampling's.

A changed default changes what every request that leaves the field out gets, silently; so each is
written out here, and the server is checked to apply them (not only to declare them).
"""

from __future__ import annotations

import inspect
import io

import httpx
import numpy as np
import pytest
import soundfile as sf

from csm_gguf.builtin_voices import SENTENCE
from csm_gguf.generator import Sampling
from csm_gguf.server.engine import SpeechJob
from csm_gguf.server.schemas import parse_speech
from csm_gguf.tts import CSM
from csm_gguf.voices import BUILTIN_VOICES
from server_fixtures import loopback_server

# OpenAI's voices in its documented order, each a CSM speaker id (its index): the mapping clients see. Each
# is a fixed prompt (csm_gguf.builtin_voices): that speaker saying SENTENCE, made once per model.
VOICES = {"alloy": 0, "ash": 1, "ballad": 2, "coral": 3, "echo": 4, "fable": 5, "onyx": 6, "nova": 7, "sage": 8,
          "shimmer": 9, "verse": 10, "marin": 11, "cedar": 12}
TEXT = "Hello there, how are you doing today?"
MINIMAL = {"model": "tts-1", "input": TEXT}


def test_the_thirteen_voices_and_their_speakers():
    assert BUILTIN_VOICES == VOICES


def prompt_of(request) -> list[tuple[int, str]]:
    return [(seg.speaker, seg.text) for seg in request.job.context]


@pytest.mark.parametrize("voice, speaker", VOICES.items())
def test_each_voice_name_is_its_speaker_and_its_fixed_prompt(tts, voice, speaker):
    request = parse_speech({**MINIMAL, "voice": voice}, tts)
    assert (request.job.speaker, prompt_of(request)) == (speaker, [(speaker, SENTENCE)])
    assert parse_speech({**MINIMAL, "voice": {"id": voice}}, tts).job.speaker == speaker
    with_id = parse_speech({**MINIMAL, "voice": voice, "speaker_id": 40}, tts)
    assert (with_id.job.speaker, prompt_of(with_id)) == (40, [(speaker, SENTENCE)])  # the speaker, not the prompt


def test_voice_none_is_the_raw_model(tts):
    request = parse_speech({**MINIMAL, "voice": "none", "speaker_id": 5}, tts)
    assert (request.job.speaker, list(request.job.context)) == (5, [])


def test_a_request_that_names_nothing_else_gets_openai_s_defaults(tts):
    request = parse_speech(MINIMAL, tts)
    assert request.response_format == "mp3"  # OpenAI's default: clients save speech.mp3
    assert (request.stream_format, request.stream, request.speed) == ("audio", True, 1.0)
    assert request.job == SpeechJob(TEXT, speaker=0, context=request.job.context,
                                    sampling=Sampling(temperature=0.9, top_k=50, seed=None, max_audio_ms=None))
    assert prompt_of(request) == [(0, SENTENCE)]  # alloy's prompt
    assert parse_speech(MINIMAL, tts, default_voice="nova").job.speaker == 7  # CSM_GGUF_VOICE


def test_sampling_defaults_are_the_reference_generator_s():
    """SesameAILabs/csm's generator: temperature 0.9, top_k 50; no audio limit of the caller's (each piece
    then gets one proportional to its text, and the Generator stops at the model's context)."""
    assert Sampling() == Sampling(temperature=0.9, top_k=50, seed=None, max_audio_ms=None)
    assert SpeechJob("x") == SpeechJob("x", 0, (), Sampling(0.9, 50, None, None))
    for method in (CSM.frames, CSM.dialogue_frames, CSM.stream_text):
        params = inspect.signature(method).parameters
        assert (params["temperature"].default, params["top_k"].default, params["seed"].default,
                params["max_audio_ms"].default) == (0.9, 50, None, None), method.__name__


def test_server_settings_defaults(monkeypatch):
    from csm_gguf.server.settings import SETTINGS, Settings

    for var, _, _ in SETTINGS:
        monkeypatch.delenv(var, raising=False)
    assert Settings.from_env() == Settings(model=None, threads=0, gpu_layers=0, kv_type="f16", codec_device="cpu",
                                           api_key=None, max_streams=4, max_queue=16, prefill_rows=0,
                                           voice="alloy", drain_s=30, max_websockets=8, ws_idle_s=60,
                                           ws_ping_s=20)


# --- applied, not only declared --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(f32_model, tmp_path_factory):
    with loopback_server(f32_model, tmp_path_factory.mktemp("default-voices"), max_streams=2, prefill_rows=8) as srv:
        yield srv


def test_the_prefill_rows_setting_reaches_the_engine(server):
    services, _ = server
    assert services.engine.prefill_rows == 8


def speak(base: str, body: dict) -> httpx.Response:
    response = httpx.post(f"{base}/v1/audio/speech", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response


def pcm(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768


def test_a_request_without_response_format_is_mp3(server):
    _, base = server
    response = speak(base, {**MINIMAL, "voice": "alloy", "max_audio_ms": 400, "seed": 1})
    assert response.headers["content-type"] == "audio/mpeg"
    data = response.content
    assert data[:3] == b"ID3" or (data[0] == 0xFF and data[1] & 0xE0 == 0xE0)  # an MP3 frame's sync
    audio, rate = sf.read(io.BytesIO(data), dtype="float32")
    assert rate == 24_000 and len(audio) > 0


def test_the_default_voice_is_alloy(server):
    voices = httpx.get(f"{server[1]}/v1/audio/voices").json()
    assert voices["default"] == "alloy"
    listed = {v["id"]: v["speaker_id"] for v in voices["voices"] if v["type"] == "builtin"}
    assert listed == VOICES


@pytest.mark.parametrize("sampling", [{}, {"temperature": 1.3, "top_k": 7}])
def test_the_server_samples_as_csm_does_with_the_same_settings(server, sampling):
    """Without sampling fields, the defaults; with them, exactly those (seeded draws: the same codes)."""
    services, base = server
    engine = services.engine
    body = {**MINIMAL, "voice": "coral", "response_format": "pcm", "max_audio_ms": 6 * 80, "seed": 11, **sampling}
    served = pcm(speak(base, body).content)
    assert not (engine.active or engine.waiting)  # the engine is idle: borrow its CSM for the expectation
    expected = services.tts.generate(TEXT, voice="coral", max_audio_ms=6 * 80, seed=11, **sampling)
    assert len(served) == len(expected) > 0
    np.testing.assert_allclose(served, np.clip(expected, -1, 32767 / 32768), atol=1.5 / 32768)
    other = services.tts.generate(TEXT, voice="coral", max_audio_ms=6 * 80, seed=11, temperature=1.3, top_k=2)
    assert not np.allclose(expected[: len(other)], other[: len(expected)])  # the settings matter


def test_a_piece_s_budget_without_max_audio_ms(tts):
    """8 frames per token of text, at least 25 frames (2 s): generation that never ends is cut off there;
    a limit of the caller's replaces it."""
    from csm_gguf.plan import FRAMES_PER_TOKEN, MIN_FRAMES, TokenCounts, frame_budget, plan_pieces

    assert (FRAMES_PER_TOKEN, MIN_FRAMES) == (8, 25)
    assert frame_budget(1) == 25 * 80
    assert frame_budget(40) == 8 * 40 * 80 > 25 * 80
    long = "A much longer sentence " * 5
    (piece,) = plan_pieces([(0, long)], Sampling(), TokenCounts(tts.model))
    assert piece.sampling.max_audio_ms == 8 * len(tts.model.tokenize(long)) * 80
    (piece,) = plan_pieces([(0, long)], Sampling(max_audio_ms=1234.0), TokenCounts(tts.model))
    assert piece.sampling.max_audio_ms == 1234.0
