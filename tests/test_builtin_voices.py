"""Built-in voices are fixed prompts, made once per model, stable across requests and processes."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from csm_gguf import builtin_voices, voices
from csm_gguf.generator import Segment
from csm_gguf.plan import Context
from csm_gguf.tts import CSM, Voice

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def own_folders(tmp_path, monkeypatch):
    monkeypatch.setenv("CSM_GGUF_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CSM_GGUF_VOICES", str(tmp_path / "voices"))


@pytest.fixture
def tts(f32_model):
    tts = CSM(f32_model, kv_type="f32", n_threads=1)
    yield tts
    tts.close()


def given(monkeypatch) -> list[tuple[int, list[Segment]]]:
    """Records the speaker and the context segments of each piece the generator is given, from now on."""
    seen = []
    fitting = Context.fitting

    def spy(self, piece):
        heard = fitting(self, piece)
        seen.append((piece.speaker, [h.segment for h in heard]))
        return heard

    monkeypatch.setattr(Context, "fitting", spy)
    return seen


def same_segments(a: list[Segment], b: list[Segment]) -> bool:
    return len(a) == len(b) and all(
        x.speaker == y.speaker and x.text == y.text and np.array_equal(x.codes, y.codes) for x, y in zip(a, b))


def prompt_codes(voice: Voice) -> list:
    return [(s.speaker, s.text, s.codes.tolist()) for s in voice.segments]


def test_every_request_in_a_built_in_voice_is_given_the_same_prompt(tts, monkeypatch):
    seen = given(monkeypatch)
    list(tts.frames("The first sentence.", voice="alloy", temperature=0, max_audio_ms=400))
    list(tts.frames("Something else entirely, and longer.", voice="alloy", temperature=0, max_audio_ms=400))
    list(tts.frames("No voice named: the default one.", temperature=0, max_audio_ms=400))
    made = seen.pop(0)  # the prompt being made: the sentence as speaker 0, with no prompt
    assert made == (0, [])
    assert len(seen) == 3
    prompt = seen[0][1]
    assert len(prompt) == 1 and prompt[0].text == builtin_voices.SENTENCE and len(prompt[0].codes) > 10
    for speaker, context in seen:
        assert speaker == 0 and same_segments(context, prompt)
    assert prompt_codes(tts.voice("alloy")) == prompt_codes(Voice(prompt, 0))
    # Read once: the next request in the voice reads only its own text.
    before = tts.generator.prompt_positions_read
    list(tts.frames("Again.", voice="alloy", temperature=0, max_audio_ms=160))
    assert tts.generator.prompt_positions_read - before == tts.generator.prompt_rows("Again.", 0) - 1


def test_the_prompt_is_the_same_after_a_restart(tts, f32_model):
    here = prompt_codes(tts.voice("nova"))
    code = ("import json, sys; from csm_gguf.tts import CSM; v = CSM(sys.argv[1], n_threads=1).voice('nova'); "
            "print(json.dumps([(s.speaker, s.text, s.codes.tolist()) for s in v.segments]))")
    out = subprocess.run([sys.executable, "-c", code, str(f32_model)], capture_output=True, text=True, check=True,
                         cwd=ROOT, env=_env(ROOT)).stdout
    import json

    assert json.loads(out) == json.loads(json.dumps(here))
    assert here[0][0] == voices.BUILTIN_VOICES["nova"]


def _env(root: Path) -> dict:
    import os

    return {**os.environ, "PYTHONPATH": str(root)}


def test_two_threads_make_a_prompt_once(tts, monkeypatch):
    calls = []
    make = tts.prompt_codes

    def slow(speaker, text):
        calls.append(speaker)
        time.sleep(0.5)  # the other thread asks meanwhile
        return make(speaker, text)

    monkeypatch.setattr(tts, "prompt_codes", slow)
    got = []
    threads = [threading.Thread(target=lambda: got.append(prompt_codes(tts.voice("echo")))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == [voices.BUILTIN_VOICES["echo"]] and got[0] == got[1]


MAKER = """
import sys, time, numpy as np
from pathlib import Path
from csm_gguf import builtin_voices
def make(speaker, text):
    with open(sys.argv[2], "a") as f:
        f.write("made\\n")
    time.sleep(1)
    return np.full((5, 32), speaker, dtype=np.int64)
print(builtin_voices.ensure_prompt("fable", sys.argv[1], make))
"""


def test_two_processes_make_a_prompt_once(f32_model, tmp_path):
    log = tmp_path / "made.txt"
    runs = [subprocess.Popen([sys.executable, "-c", MAKER, str(f32_model), str(log)], cwd=ROOT, env=_env(ROOT))
            for _ in range(2)]
    assert [p.wait(timeout=120) for p in runs] == [0, 0]
    assert log.read_text() == "made\n"
    assert builtin_voices.prompt_path("fable", f32_model).exists()


def test_another_model_has_its_own_prompts(f32_model, converted):
    assert builtin_voices.prompt_path("alloy", f32_model) != builtin_voices.prompt_path("alloy", converted("q8_0"))


def test_a_prompt_made_by_another_draw_is_made_again(f32_model, monkeypatch):
    """The same seed makes other codes under another draw (heads.draw): a prompt made before the draw changed is
    not this version's voice."""
    now = builtin_voices.prompt_path("alloy", f32_model)
    monkeypatch.setattr(builtin_voices, "DRAW", builtin_voices.DRAW - 1)
    assert builtin_voices.prompt_path("alloy", f32_model) != now


def test_a_damaged_prompt_names_the_voice_and_the_fix_and_others_still_work(tts):
    path = builtin_voices.prompt_path("coral", tts.model.path)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a voice")
    with pytest.raises(ValueError, match=r"voice 'coral' is damaged .*delete .*coral\.npz .*and it is made again"):
        list(tts.frames("Hello.", voice="coral", max_audio_ms=160))
    assert list(tts.frames("Hello.", voice="sage", max_audio_ms=160))
    assert "damaged" in voices.describe("coral", tts.model.path)
    path.unlink()  # the fix
    assert list(tts.frames("Hello.", voice="coral", max_audio_ms=160))


def test_a_saved_voice_of_a_built_in_name_replaces_it_until_deleted(tts):
    mine = Voice([Segment(2, "My own recording.", np.full((20, 32), 7, dtype=np.int64))], 2)
    voices.save_voice("ash", mine)
    assert prompt_codes(tts.voice("ash")) == prompt_codes(mine)
    assert "ash" in voices.list_voices()
    assert voices.delete_voice("ash")
    assert tts.voice("ash").segments[0].text == builtin_voices.SENTENCE
    with pytest.raises(ValueError, match="built-in voice"):
        voices.delete_voice("ash")


def test_no_voice_is_the_raw_model(tts, monkeypatch):
    seen = given(monkeypatch)
    list(tts.frames("Raw.", voice="none", speaker=3, max_audio_ms=160))
    list(tts.frames("Raw too.", speaker=5, max_audio_ms=160))  # a bare speaker id
    assert seen == [(3, []), (5, [])]
    assert not (Path(builtin_voices.prompt_path("alloy", tts.model.path)).exists())
