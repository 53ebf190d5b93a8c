"""The voices endpoints and saved voices in requests, over HTTP."""

from __future__ import annotations

import io
import subprocess
import time

import httpx
import numpy as np
import openai
import pytest
import soundfile as sf

from audio_fixtures import needs_ffmpeg
from csm_gguf.server.limits import MAX_SPEECH_REQUEST, MAX_VOICE_UPLOAD
from csm_gguf.voices import voices_dir
from server_fixtures import (
    GREEDY,
    LONG_FLAC,
    TEXT,
    assert_same_audio,
    pcm,
    post,
    reference,
    voice_wav,
)

_blip = io.BytesIO()
sf.write(_blip, np.zeros(1, np.int16), 24_000, format="WAV")
BLIP_WAV = _blip.getvalue()  # one sample: encoded, one frame


def test_damaged_saved_voice_is_a_400(base):
    import os

    broken = os.path.join(os.environ["CSM_GGUF_VOICES"], "broken.npz")
    with open(broken, "wb") as f:
        f.write(b"not a voice")
    try:
        response = post(base, {"model": "csm-1b", "voice": "broken", "input": TEXT})
        assert response.status_code == 400, response.text
        assert (response.json()["error"]["param"], response.json()["error"]["code"]) == ("voice", "voice_unusable")
    finally:
        os.remove(broken)


def test_deleting_a_voice_saved_for_another_model_as_its_400_says(base, services, caplog):
    """Such a voice is a 400 that says to delete it; the DELETE had the engine thread read its codes to drop its
    prompt from the cache, and their check's ValueError stopped the engine: every request failed until a
    restart."""
    from csm_gguf import voices
    from csm_gguf.generator import Segment
    from csm_gguf.tts import Voice

    codes = np.full((13, 32), services.tts.model.n_codes + 1)  # a bigger codec's codes: saveable, not usable here
    voices.save_voice("elsewhere", Voice([Segment(0, "Made for another model.", codes)], speaker=0))
    used = post(base, {"model": "csm-1b", "voice": "elsewhere", "input": TEXT})
    assert used.status_code == 400 and "delete it" in used.text, used.text
    assert httpx.delete(f"{base}/v1/audio/voices/elsewhere", timeout=60).status_code == 200
    assert httpx.get(f"{base}/health/live", timeout=60).status_code == 200
    assert post(base, {"model": "csm-1b", "voice": "none", "input": TEXT, **GREEDY}).status_code == 200
    assert "forgetting a voice" not in caplog.text  # nothing of it was cached: the engine is not asked


def test_server_refuses_to_start_with_an_unusable_default_voice(tmp_path, monkeypatch):
    from csm_gguf.web import create_app

    monkeypatch.setenv("CSM_GGUF_VOICES", str(tmp_path))
    (tmp_path / "broken.npz").write_bytes(b"not a voice")
    with pytest.raises(ValueError, match="voice 'broken' is damaged"):
        create_app(model=str(tmp_path / "no-model"), voice="broken")  # before the model: it is not reached
    with pytest.raises(ValueError, match="'with space' is not a voice"):
        create_app(model=str(tmp_path / "no-model"), voice="with space")


def listed(voices: list[dict], name: str) -> dict:
    return next(v for v in voices if v["id"] == name)


def test_saved_voice_uses_its_prompt(client, engine, services):
    voices = httpx.get(f"{client.base_url}audio/voices").json()
    assert listed(voices["voices"], "narrator") == {"id": "narrator", "name": "narrator", "type": "saved",
                                                    "speaker_id": 3, "prompt": {"segments": 1, "frames": 12,
                                                    "seconds": 0.96, "transcript": "A saved voice prompt."}}
    response = client.audio.speech.create(model="csm-1b", voice="narrator", input=TEXT, response_format="pcm",
                                          extra_body=GREEDY)
    from csm_gguf.voices import load_voice

    voice = load_voice("narrator")
    expected = reference(services, speaker=voice.speaker, context=voice.segments, **GREEDY)
    assert_same_audio(pcm(response.content), expected)
    plain = reference(services, speaker=3, **GREEDY)
    assert not np.allclose(expected, plain)  # the prompt made a difference


def test_voices_are_made_from_a_sample_used_and_deleted(client, base, engine, services):
    sample = voice_wav(services.tts)
    made = client.audio.voices.create(name="lena", audio_sample=("lena.wav", sample, "audio/wav"), consent="cons_1",
                                      extra_body={"transcript": "A sample of my voice.", "speaker_id": 5})
    assert (made.id, made.name, made.object, made.type) == ("lena", "lena", "audio.voice", "audio_sample")
    assert abs(made.created_at - time.time()) < 60
    lena = listed(httpx.get(f"{base}/v1/audio/voices").json()["voices"], "lena")
    assert (lena["type"], lena["speaker_id"], lena["prompt"]["transcript"]) == ("saved", 5, "A sample of my voice.")
    response = client.audio.speech.create(model="csm-1b", voice="lena", input=TEXT, response_format="pcm",
                                          extra_body=GREEDY)
    segment = services.tts.segment(5, "A sample of my voice.", audio=io.BytesIO(sample))
    assert_same_audio(pcm(response.content), reference(services, speaker=5, context=[segment], **GREEDY))
    with pytest.raises(openai.ConflictError, match="voice 'lena' exists: delete it first"):
        client.audio.voices.create(name="lena", audio_sample=("lena.wav", sample), consent="cons_1",
                                   extra_body={"transcript": "Again."})
    deleted = client.audio.voices.delete("lena")
    assert (deleted.id, deleted.object, deleted.deleted) == ("lena", "audio.voice.deleted", True)  # OpenAI's object
    assert "lena" not in [v["id"] for v in httpx.get(f"{base}/v1/audio/voices").json()["voices"]]
    with pytest.raises(openai.NotFoundError, match="no saved voice 'lena'"):
        client.audio.voices.delete("lena")


def in_prompt_cache(engine, segments) -> bool:
    """Whether a cached prompt begins with these segments' rows."""
    rows = engine.generator.context_embeddings(segments)
    return any(len(e.rows) >= len(rows) and np.array_equal(e.rows[: len(rows)], rows)
               for e in list(engine.generator.prompt_cache.entries))


def wait_until(done, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():  # the engine thread drops a voice's cells between frames
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_a_replaced_or_deleted_voice_leaves_the_prompt_cache(client, base, engine, services, monkeypatch):
    """Its cached prompt is dropped once the change is made: dropped before, a request in the voice meanwhile put
    it back (to stay until evicted)."""
    from csm_gguf.voices import list_voices

    saved_when_forgotten = []
    forget = engine.forget_voice
    monkeypatch.setattr(engine, "forget_voice",
                        lambda segments: saved_when_forgotten.append("ash" in list_voices()) or forget(segments))
    speak = {"model": "csm-1b", "voice": "ash", "input": TEXT, "response_format": "pcm", **GREEDY}
    assert post(base, speak).status_code == 200
    builtin = services.voice("ash")  # its prompt, made by the engine for that request
    assert in_prompt_cache(engine, builtin.segments)
    assert httpx.delete(f"{base}/v1/audio/voices/ash").status_code == 400  # built in: not deleted, so kept
    assert saved_when_forgotten == []
    client.audio.voices.create(name="ash", audio_sample=("ash.wav", voice_wav(services.tts), "audio/wav"),
                               consent="cons_1", extra_body={"transcript": "My own ash.", "speaker_id": 1})
    wait_until(lambda: not in_prompt_cache(engine, builtin.segments))
    assert post(base, speak).status_code == 200
    mine = services.voice("ash")
    assert mine.segments[0].text == "My own ash." and in_prompt_cache(engine, mine.segments)
    assert client.audio.voices.delete("ash").deleted
    wait_until(lambda: not in_prompt_cache(engine, mine.segments))
    ash = next(v for v in httpx.get(f"{base}/v1/audio/voices").json()["voices"] if v["id"] == "ash")
    assert ash["type"] == "builtin"  # the built-in voice is back
    assert saved_when_forgotten == [True, False]  # after the saved voice replaced it, after it was deleted


def test_one_of_several_saving_the_same_name_wins(base, engine, services):
    from concurrent.futures import ThreadPoolExecutor

    sample = voice_wav(services.tts)

    def save(i: int) -> int:
        return httpx.post(f"{base}/v1/audio/voices", data={"name": "same", "transcript": f"Take {i}."},
                          files={"audio_sample": ("v.wav", sample)}, timeout=60).status_code

    with ThreadPoolExecutor(4) as pool:
        assert sorted(pool.map(save, range(4))) == [200, 409, 409, 409]
    assert httpx.delete(f"{base}/v1/audio/voices/same").status_code == 200


@needs_ffmpeg
def test_a_voice_from_a_phone_recording(client, engine, tmp_path, services):
    wav, m4a = tmp_path / "v.wav", tmp_path / "v.m4a"
    wav.write_bytes(voice_wav(services.tts))
    subprocess.run(["ffmpeg", "-loglevel", "error", "-i", str(wav), "-c:a", "aac", str(m4a)], check=True)
    with m4a.open("rb") as f:
        made = client.audio.voices.create(name="memo", audio_sample=f, consent="cons_1",
                                          extra_body={"transcript": "A sample of my voice."})
    assert made.id == "memo"
    client.audio.voices.delete("memo")


@pytest.mark.parametrize("form, files, param, status, message", [
    ({"name": "v1", "transcript": "Words."}, {}, "audio_sample", 400, "'audio_sample' is required"),
    ({"name": "v1"}, {"audio_sample": True}, "transcript", 400, "'transcript' is required: the words spoken"),
    ({"name": "v1", "transcript": "  "}, {"audio_sample": True}, "transcript", 400, "'transcript' is required"),
    ({"transcript": "Words."}, {"audio_sample": True}, "name", 400, "'name' is required"),
    ({"name": "a b", "transcript": "Words."}, {"audio_sample": True}, "name", 400, "bad voice name 'a b'"),
    ({"name": "none", "transcript": "Words."}, {"audio_sample": True}, "name", 400, "'none' means no voice prompt"),
    ({"name": "narrator", "transcript": "Words."}, {"audio_sample": True}, "name", 409, "voice 'narrator' exists"),
    ({"name": "v1", "transcript": "Words.", "speaker_id": "-1"}, {"audio_sample": True}, "speaker_id", 400,
     "'speaker_id' must be a whole number"),
    ({"name": "v1", "transcript": "Words.", "type": "prompt"}, {"audio_sample": True}, "type", 400,
     "cannot be made from a text prompt"),
    ({"name": "v1", "transcript": "Words.", "prompt": "warm"}, {"audio_sample": True}, "prompt", 400,
     "cannot be made from a text prompt"),  # OpenAI's field of the prompt type: refused as that type is
    ({"name": "v1", "transcript": "Words.", "colour": "red"}, {"audio_sample": True}, "colour", 400,
     "unrecognized request argument: 'colour'"),
    ({"name": "v1", "transcript": "Words."}, {"audio_sample": b"not audio"}, "audio_sample", 400,
     "audio_sample: cannot read audio from v.wav: Format not recognised"),
    ({"name": "v1", "transcript": "Words."}, {"audio_sample": b""}, "audio_sample", 400, "v.wav: it is empty"),
    ({"name": "alloy\n", "transcript": "Words."}, {"audio_sample": True}, "name", 400, "bad voice name 'alloy\\n'"),
    ({"name": "v1", "transcript": "Words.", "speaker_id": "1" * 5000}, {"audio_sample": True}, "speaker_id", 400,
     "'speaker_id' must be a whole number"),
    ({"name": "v1", "transcript": b"hi \xff there"}, {"audio_sample": True}, "transcript", 400,
     "'transcript' must be UTF-8 text"),
    ({"name": "v1"}, {"audio_sample": True, "transcript": b"Words."}, "transcript", 400,
     "send 'transcript' as a text field, not a file"),
    ({"name": "v1", "transcript": "Words.", "audio_sample": "text"}, {}, "audio_sample", 400,
     "send 'audio_sample' as a file, not a text field"),
    ({"name": ["v1", "v2"], "transcript": "Words."}, {"audio_sample": True}, "name", 400, "'name' was sent more than"),
    ({"name": "v1", "transcript": "Words."}, {"audio_sample": "long"}, "audio_sample", 400,
     "audio_sample: the context audio lasts more than"),
    ({"name": "v1", "transcript": "Words."}, {"audio_sample": "blip"}, "audio_sample", 400,
     "audio_sample: the voice's recording lasts 0.08 s: a voice needs at least 1 s of speech"),
])
def test_bad_voice_uploads_are_refused_and_save_nothing(base, engine, form, files, param, status, message, services):
    sample = {True: voice_wav(services.tts), "long": LONG_FLAC, "blip": BLIP_WAV}
    parts = [(k, (None, v)) for k, vs in form.items() for v in (vs if isinstance(vs, list) else [vs])]
    parts += [(k, ("v.wav", sample.get(v, v))) for k, v in files.items()]
    response = httpx.post(f"{base}/v1/audio/voices", files=parts)  # multipart, with or without a file
    error = response.json()["error"]
    assert (response.status_code, error["param"]) == (status, param) and message in error["message"], error
    assert sorted(p.name for p in voices_dir().iterdir()) == ["narrator.npz"]


def test_openai_clients_voice_fields_are_taken(client, services):
    """The client's voices.create sends `model` and `script_hint` where asked: they were unknown fields (400)."""
    made = client.audio.voices.create(name="hinted", audio_sample=("v.wav", voice_wav(services.tts)), consent="c",
                                      extra_body={"transcript": "Words.", "model": "auto", "script_hint": "Words."})
    assert made.id == "hinted"
    client.audio.voices.delete("hinted")


def test_built_in_voices_need_no_voices_folder(base, tmp_path, monkeypatch):
    (tmp_path / "a-file").write_text("not a folder")
    monkeypatch.setenv("CSM_GGUF_VOICES", str(tmp_path / "a-file"))  # broken while the server runs
    response = post(base, {"model": "csm-1b", "input": TEXT, "voice": "alloy", "response_format": "pcm", **GREEDY})
    assert response.status_code == 200 and response.content


def test_voice_uploads_need_multipart_and_a_size_limit(base):
    response = httpx.post(f"{base}/v1/audio/voices", json={"name": "v1", "transcript": "Words."})
    assert response.status_code == 400 and "multipart/form-data" in response.json()["error"]["message"]
    too_big = httpx.post(f"{base}/v1/audio/voices", data={"name": "v1", "transcript": "Words."},
                         files={"audio_sample": ("v.wav", bytes(MAX_VOICE_UPLOAD + 1))})
    assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "request_entity_too_large"
    assert "a voice upload is at most 32 MiB: send a shorter or compressed recording" in too_big.text
    speech = post(base, {"model": "csm-1b", "input": TEXT, "voice": "alloy", "pad": "x" * MAX_SPEECH_REQUEST})
    assert speech.status_code == 413 and "a request is at most 64 MiB: send shorter context audio" in speech.text
    assert sorted(p.name for p in voices_dir().iterdir()) == ["narrator.npz"]


def test_built_in_and_default_voices_cannot_be_deleted(base, f32_model):
    response = httpx.delete(f"{base}/v1/audio/voices/alloy")
    error = response.json()["error"]
    assert response.status_code == 400 and "built-in voice" in error["message"]
    assert (error["param"], error["code"]) == ("name", "voice_builtin")  # the name, as when voices are made
    response = httpx.delete(f"{base}/v1/audio/voices/no%20such")
    assert response.status_code == 404 and response.json()["error"]["param"] == "name"
    from csm_gguf.web import create_app

    app = create_app(model=str(f32_model), voice="narrator", kv_type="f32")
    try:
        response = app.test_client().delete("/v1/audio/voices/narrator")
    finally:
        app.extensions["csm_gguf"].engine.close()
    assert response.status_code == 409 and "this server's default voice" in response.json["error"]["message"]
    assert response.json["error"]["param"] == "name"
    assert (voices_dir() / "narrator.npz").exists()


def test_errors_a_retry_cannot_mend_tell_openai_clients_not_to_retry(base, services):
    """OpenAI's client retries 409s and 5xx twice by default: a name in use was uploaded and encoded three times."""
    sent = []
    http = httpx.Client(event_hooks={"request": [sent.append]})
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", http_client=http)  # its default retries
    sample = voice_wav(services.tts)
    made = dict(name="twice", audio_sample=("v.wav", sample), consent="c", extra_body={"transcript": "Words."})
    client.audio.voices.create(**made)
    try:
        sent.clear()
        with pytest.raises(openai.ConflictError) as e:
            client.audio.voices.create(**made)
        assert len(sent) == 1 and e.value.response.headers["x-should-retry"] == "false"
    finally:
        client.audio.voices.delete("twice")
    bad = httpx.post(f"{base}/v1/audio/speech", json={"model": "csm-1b", "input": ""})
    assert bad.status_code == 400 and "x-should-retry" not in bad.headers  # OpenAI's clients never retry a 400
