"""The Python API (csm_gguf.CSM) end to end on the tiny model (with its tiny codec)."""

from __future__ import annotations

import io
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from api_fixtures import TEXT, reference_audio
from csm_fixtures import random_codes
from csm_gguf.generator import Segment
from csm_gguf.llama import free_model
from csm_gguf.plan import PIECE_TOKENS, Context, TokenCounts, context_room, frame_budget, split_text
from csm_gguf.sampling import Sampling
from csm_gguf.tempo import change_speed
from csm_gguf.tts import CSM, UNFINISHED_CHARS, Voice, frames_read_ahead

pytestmark = pytest.mark.usefixtures("voices_home")  # a voices folder of its own


def test_api_audio_equals_reference_decode_of_reference_codes(tiny_csm, tts):
    codes, ref_audio = reference_audio(tiny_csm, tts, 12)
    raw = {"speaker": 0, "temperature": 0, "max_audio_ms": 12 * 80}  # a bare speaker id: no voice prompt
    ours = np.stack(list(tts.frames(TEXT, **raw)))
    np.testing.assert_array_equal(ours, codes)
    audio = tts.generate(TEXT, **raw)
    np.testing.assert_allclose(audio, ref_audio, atol=1e-3 * np.abs(ref_audio).max())
    # One frame at a time through the streaming codec gives the same samples.
    streamed = np.concatenate(list(tts.stream(TEXT, chunk_frames=1, **raw)))
    np.testing.assert_allclose(streamed, audio, atol=1e-5 * np.abs(audio).max())


def test_speed_stretches_the_same_speech(tts):
    kw = dict(temperature=0, max_audio_ms=12 * 80)
    audio = tts.generate(TEXT, **kw)
    fast = tts.generate(TEXT, speed=1.5, **kw)
    assert len(fast) == round(len(audio) / 1.5)
    np.testing.assert_array_equal(fast, change_speed(audio, 1.5))  # chunking does not change a stretch
    slow = np.concatenate(list(tts.stream(TEXT, chunk_frames=3, speed=0.5, **kw)))
    assert len(slow) == 2 * len(audio)


def test_text_in_pieces_is_spoken_sentence_by_sentence_as_it_comes(tts):
    sentences = ["Hello there.", "How are you doing today?", "Fine, thanks."]
    pulled = []

    def tokens():  # an LLM's output, a few characters at a time
        text = " ".join(sentences)
        for i in range(0, len(text), 3):
            pulled.append(i)
            yield text[i : i + 3]

    kw = dict(temperature=0.9, seed=5, max_audio_ms=4 * 80)
    chunks = tts.stream_text(tokens(), speaker=1, chunk_frames=2, **kw)
    first = next(chunks)
    assert len(pulled) < len(" ".join(sentences)) // 3  # speaking before the text has all come
    audio = np.concatenate([first, *chunks])
    # as a dialogue of one speaker: each sentence after the one before it, piece i with seed + i (decoded in
    # other chunks: each sentence's last frames are decoded when it ends)
    expected = np.concatenate(list(tts.decode_stream(tts.dialogue_frames([(1, s) for s in sentences], **kw))))
    assert len(audio) == len(expected)
    np.testing.assert_allclose(audio, expected, atol=1e-5 * np.abs(expected).max())


def test_stream_text_speaks_a_finished_sentence_whole_before_reading_on(tts):
    """A stalled LLM must not hold back the end of a sentence it has finished."""
    made, heard = [], []

    def text():
        yield "One two three. Four"  # the first sentence is complete: the next has begun
        heard.append(sum(len(chunk) for chunk in made))
        yield " five."

    kw = dict(temperature=0, max_audio_ms=6 * 80)
    made += tts.stream_text(text(), chunk_frames=25, **kw)
    assert heard == [len(tts.generate("One two three.", **kw))]


def test_stream_text_does_not_wait_for_ever_for_a_sentence_end(tts):
    pulled = []

    def words():  # 10,000 characters and no sentence end
        for i in range(2000):
            pulled.append(i)
            yield "word "

    chunks = tts.stream_text(words(), max_audio_ms=160)
    next(chunks)
    assert len(pulled) * len("word ") <= UNFINISHED_CHARS + len("word ")
    chunks.close()


def test_stream_text_checks_its_settings_at_the_call(tts):
    with pytest.raises(ValueError, match="iterable of strings"):
        tts.stream_text("Hello.")
    with pytest.raises(ValueError, match="temperature must be"):
        tts.stream_text(iter(["Hello."]), temperature=-1)
    with pytest.raises(ValueError, match="speed must be"):
        tts.stream_text(iter(["Hello."]), speed=9)
    with pytest.raises(ValueError, match="must come as strings, got int"):
        list(tts.stream_text(iter(["Hello. ", 5]), max_audio_ms=160))


def test_only_streams_of_single_frames_ask_for_a_cuda_graph(tts, monkeypatch):
    """A graph replays 1-frame steps, and recording one costs about three steps: `say` (5-frame chunks) and
    `generate` (25) would record one only for a last chunk of one frame."""
    asked = []
    make = tts.codec.decoder_state
    monkeypatch.setattr(tts.codec, "decoder_state", lambda *a, **k: asked.append(k.get("cuda_graph")) or make(*a, **k))
    list(tts.stream(TEXT, chunk_frames=1, max_audio_ms=160))
    list(tts.stream(TEXT, chunk_frames=5, max_audio_ms=160))
    tts.generate(TEXT, max_audio_ms=160)
    assert asked == [True, False, False]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch has no CUDA device")
def test_codec_on_cuda_gives_the_cpu_audio(f32_model, tts):
    gpu = CSM(f32_model, kv_type="f32", codec_device="cuda")
    try:
        kw = dict(temperature=0, max_audio_ms=12 * 80)
        audio = tts.generate(TEXT, **kw)
        tol = 1e-5 * np.abs(audio).max()
        np.testing.assert_allclose(gpu.generate(TEXT, **kw), audio, atol=tol)
        np.testing.assert_allclose(np.concatenate(list(gpu.stream(TEXT, chunk_frames=1, **kw))), audio, atol=tol)
        np.testing.assert_array_equal(gpu.encode(audio), tts.encode(audio))
    finally:
        gpu.close()


def in_child_process(f32_model, script: str) -> None:
    """Run `script` (with `tts`, a CSM of the tiny model) in a fresh interpreter; it must print ok. A crash
    there fails this test alone, not the whole run."""
    code = f"import gc, threading\nfrom csm_gguf.tts import CSM\ntts = CSM({str(f32_model)!r})\n{script}"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout.strip()) == (0, "ok"), done.stderr[-2000:]


def test_closed_model_is_an_error_not_a_crash(f32_model):
    """Speaking after close, or a stream left mid-way and collected after close, used llama.cpp's freed
    memory: segfaults."""
    in_child_process(f32_model, (
        "chunks = tts.stream('Hello.', seed=1, max_audio_ms=800)\n"
        "next(chunks); tts.close()\n"
        "for speak in (lambda: next(chunks), lambda: tts.generate('Hi.')):\n"
        "    try: speak()\n"
        "    except RuntimeError as e: assert 'closed' in str(e), e\n"
        "    else: raise AssertionError('spoke after close')\n"
        "del chunks; gc.collect(); print('ok')"))


def test_streaming_works_with_deprecation_warnings_as_errors(f32_model):
    """torch 2.13 deprecates torch.jit, which the codec's traces use: a program run with -W error (or pytest's
    filterwarnings = error) failed at its first codec step."""
    code = (f"from csm_gguf import CSM\ntts = CSM({str(f32_model)!r}, n_threads=1)\n"
            "assert sum(map(len, tts.stream('Hi.', voice='none', seed=1, max_audio_ms=240))); print('ok')")
    done = subprocess.run([sys.executable, "-W", "error::DeprecationWarning", "-c", code], capture_output=True,
                          text=True, timeout=120)
    assert (done.returncode, done.stdout.strip()) == (0, "ok"), done.stderr[-2000:]


def test_close_during_another_threads_generation_is_an_error_not_a_crash(f32_model):
    """close() freed llama.cpp's contexts under a step running in another thread: a segfault."""
    in_child_process(f32_model, (
        "started, errors = threading.Event(), []\n"
        "def speak():\n"
        "    try:\n"
        "        for _ in tts.frames('Hello.', seed=1, max_audio_ms=60_000): started.set()\n"
        "    except RuntimeError as e: errors.append(str(e))\n"
        "t = threading.Thread(target=speak); t.start(); started.wait(30); tts.close(); t.join(30)\n"
        "assert errors and 'closed' in errors[0], errors; print('ok')"))


def test_close_frees_the_tokenizer_and_the_codec_and_with_closes(f32_model, monkeypatch):
    """Each CSM kept its tokenizer, a llama.cpp model of its own (48 MB for Llama 3's), for good: ten loads in a
    notebook or a server swapping models took half a GB. After close, the codec went on encoding."""
    import csm_gguf.model

    freed = []
    monkeypatch.setattr(csm_gguf.model, "free_model", lambda model: freed.append(model) or free_model(model))
    with CSM(f32_model, n_threads=1) as tts:
        vocab = tts.model._vocab
        assert len(tts.generate("Hi.", voice="none", seed=1, max_audio_ms=160))
    assert freed == [vocab]
    for call in (lambda: tts.encode(np.zeros(4800, np.float32)), lambda: tts.decode(np.zeros((1, 32), int)),
                 lambda: tts.decode(np.zeros((0, 32), int)),
                 lambda: tts.generate("Hi.", voice="none"), lambda: tts.model.tokenize("Hi."),
                 lambda: tts.voice("alloy")):
        with pytest.raises(RuntimeError, match="the model is closed"):
            call()
    tts.close()  # twice: nothing more to free
    assert freed == [vocab]


def test_a_generator_made_before_close_and_first_read_after_it_says_so(f32_model):
    with CSM(f32_model, n_threads=1) as tts:
        frames = tts.frames("Hello.", voice="none", max_audio_ms=400)
    with pytest.raises(RuntimeError, match="the model is closed"):  # was: AttributeError, deep in the embedding
        next(frames)


def test_numpy_whole_numbers_are_taken_where_ints_are(f32_model):
    """max_streams=np.int64(2) passed the check, then failed in ctypes (TypeError, OverflowError)."""
    with CSM(f32_model, n_threads=np.int64(1), max_streams=np.int64(2)) as tts:
        chunks = list(tts.stream("Hi.", voice="none", seed=1, max_audio_ms=240, chunk_frames=np.int64(2)))
        assert tts.generator.max_streams == 2 and [len(c) for c in chunks] == [2 * tts.codec.cfg.frame_size,
                                                                                tts.codec.cfg.frame_size]


@pytest.mark.parametrize("option, value, match", [
    ("max_streams", 0, "max_streams must be a whole number from 1 to 248, got 0"),
    ("max_streams", -1, "max_streams must be a whole number from 1 to 248"),
    ("max_streams", 249, "max_streams must be a whole number from 1 to 248"),
    ("max_streams", "2", "max_streams must be a whole number from 1 to 248, got '2'"),
    ("max_streams", 2.5, "max_streams must be a whole number"),
    ("n_threads", -1, "n_threads must be a whole number from 0 .all cores. to"),
    ("n_threads", 10_000, "n_threads must be a whole number from 0 .all cores. to"),
    ("n_threads", True, "n_threads must be a whole number"),
    ("n_gpu_layers", "0", "n_gpu_layers must be a whole number from -1 .all layers."),
    ("n_gpu_layers", -2, "n_gpu_layers must be a whole number from -1"),
])
def test_constructor_options_are_checked_before_anything_loads(f32_model, monkeypatch, option, value, match):
    """ggml was asked for 16 EiB (max_streams=-1), None + 1 failed inside it (0), and torch refused n_threads=-1
    after llama.cpp had loaded everything."""
    monkeypatch.setattr("csm_gguf.tts.CSMModel", lambda *a: pytest.fail("loaded the model first"))
    with pytest.raises(ValueError, match=match):
        CSM(f32_model, **{option: value})


def test_settings_after_the_text_are_keywords(tts):
    """generate("Hi.", 2) was speed 2, frames("Hi.", 2) speaker 2 and stream("Hi.", 2) chunks of 2 frames."""
    for call in (tts.generate, tts.frames, tts.stream, tts.stream_text, tts.dialogue, tts.dialogue_frames):
        with pytest.raises(TypeError, match="positional argument"):
            call("Hi." if call not in (tts.dialogue, tts.dialogue_frames) else [(0, "Hi.")], 2)


def test_dialogue_turns_name_voices_as_a_script_does(tts):
    """A turn's speaker may be a voice's name, as a `say --dialogue` line's: its prompt goes first, its ids
    moved off those the turns and the context take (csm_gguf.script)."""
    from csm_gguf import voices
    from csm_gguf.script import read_script

    voices.save_voice("ann", Voice([Segment(0, "Ann here.", random_codes(8, 64, seed=1))], 0))
    heard = Segment(1, "Before.", random_codes(4, 64, seed=2))
    turns, prompts = read_script("ann: Hi there.\n0: Hello.\nalloy: Bye now.", reserved=[1], load=tts.voice)
    kw = dict(temperature=0, max_audio_ms=160)
    expected = np.stack(list(tts.dialogue_frames(turns, context=[*prompts, heard], **kw)))
    named = [("ann", "Hi there."), (0, "Hello."), ("alloy", "Bye now.")]
    np.testing.assert_array_equal(np.stack(list(tts.dialogue_frames(named, context=[heard], **kw))), expected)
    for who, match in (("nobody", "turn 0: unknown voice 'nobody'"), ("none", "turn 0: 'none' is no speaker")):
        with pytest.raises(ValueError, match=match):
            tts.dialogue_frames([(who, "Hi.")])


def test_a_voice_made_for_another_model_is_named_with_the_fix(tts):
    from csm_gguf import voices

    voices.save_voice("big", Voice([Segment(0, "Made by CSM-1B.", np.full((20, 32), 2000))], 0))
    for call in (lambda: tts.generate("Hi.", voice="big"), lambda: tts.dialogue([("big", "Hi.")])):
        with pytest.raises(ValueError, match="the codes of voice 'big' must lie in 0..63: it was saved for another"):
            call()


@pytest.mark.parametrize("text", [None, 5, b"bytes"])
def test_a_segments_text_is_a_string(tts, text):
    """Spoken as its str(): "None", "5", "b'bytes'"."""
    with pytest.raises(ValueError, match="a context segment's text is what its audio says, a string"):
        tts.segment(0, text, codes=random_codes(4, 64, seed=0))
    with pytest.raises(ValueError, match="a context segment's text is what its audio says, a string"):
        tts.generate("Hi.", context=[Segment(0, text, random_codes(4, 64, seed=0))])


def test_a_built_in_voice_the_model_says_nothing_for_is_an_error(tts, monkeypatch):
    monkeypatch.setattr(tts, "frames", lambda *a, **k: iter(()))
    with pytest.raises(ValueError, match="this model said nothing for a built-in voice's prompt"):
        tts.prompt_codes(0, "Hello.")


def test_unfinished_stream_in_this_thread_is_an_error_in_another_a_wait(tts):
    """A generator left mid-way held the model's lock between frames: the next call in its thread hung for
    good. Now it raises there, while another thread's call waits for the slot."""
    expected = tts.generate(TEXT, temperature=0, max_audio_ms=800)
    frames = tts.frames(TEXT, temperature=0, max_audio_ms=800)
    first = next(frames)
    with pytest.raises(RuntimeError, match="held by unfinished streams of this thread"):
        tts.generate(TEXT, temperature=0, max_audio_ms=800)
    result = []
    other = threading.Thread(target=lambda: result.append(tts.generate(TEXT, temperature=0, max_audio_ms=800)))
    other.start()
    other.join(0.5)
    assert other.is_alive() and not result  # waiting for the slot
    assert len([first, *frames]) == 10
    other.join(30)
    np.testing.assert_array_equal(result[0], expected)


def test_frames_read_ahead_give_the_same_speech(tts, monkeypatch):
    """CSM_GGUF_READ_AHEAD=1: frames made in a thread of their own, ahead of their decoding."""
    plain = tts.generate(TEXT, temperature=0, max_audio_ms=800)
    chunks = [*tts.stream(TEXT, temperature=0, max_audio_ms=800)]
    monkeypatch.setattr(tts, "read_ahead", True)
    np.testing.assert_array_equal(tts.generate(TEXT, temperature=0, max_audio_ms=800), plain)
    ahead = [*tts.stream(TEXT, temperature=0, max_audio_ms=800)]
    assert len(ahead) == len(chunks) and all(np.array_equal(a, b) for a, b in zip(ahead, chunks))
    monkeypatch.setenv("CSM_GGUF_READ_AHEAD", "yes")
    with pytest.raises(ValueError, match="CSM_GGUF_READ_AHEAD is 0 or 1, got 'yes'"):
        frames_read_ahead()


def test_with_read_ahead_an_unfinished_stream_of_this_thread_is_an_error_too(tts, monkeypatch):
    """Its slot is held by its producer's thread: the next call's producer waited for it, and this thread for that
    producer, for ever. A stream made ahead counts as its consumer's."""
    monkeypatch.setattr(tts, "read_ahead", True)
    raised = []

    def in_a_thread_of_its_own() -> None:  # so that a hang fails the test instead of stopping the suite
        chunks = tts.stream(TEXT, temperature=0, max_audio_ms=2000)
        next(chunks)  # its frames are made by a producer thread, which holds the only slot
        try:
            tts.generate(TEXT, temperature=0, max_audio_ms=160)
        except RuntimeError as e:
            raised.append(e)
        chunks.close()

    caller = threading.Thread(target=in_a_thread_of_its_own, daemon=True)
    caller.start()
    caller.join(30)
    assert not caller.is_alive(), "the call waited for the slot its own thread's stream holds"
    assert raised and "held by unfinished streams of this thread" in str(raised[0])
    assert len(tts.generator.free_slots) == tts.generator.max_streams


def test_a_stream_left_mid_way_gives_its_slot_back_at_once(tts, monkeypatch):
    """With frames made in a thread of their own, ahead of the decoding (read_ahead), a consumer that stops
    must find the stream's slot free when close() returns, not once that thread notices."""
    monkeypatch.setattr(tts, "read_ahead", True)
    for _ in range(3):
        chunks = tts.stream(TEXT, temperature=0, max_audio_ms=2000)
        next(chunks)
        chunks.close()
        assert len(tts.generator.free_slots) == tts.generator.max_streams


def test_a_failed_prompt_read_gives_its_slot_back(tts, monkeypatch):
    """Ctrl-C while a long voice prompt was read kept the only slot: the CSM never spoke again."""
    def interrupted(stream, max_rows=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(tts.generator, "prefill", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tts.generate(TEXT, temperature=0, max_audio_ms=160)
    monkeypatch.undo()
    assert len(tts.generator.free_slots) == tts.generator.max_streams  # else the next call waits for ever
    assert len(tts.generate(TEXT, temperature=0, max_audio_ms=160)) == 2 * tts.codec.cfg.frame_size


def record_contexts(tts, monkeypatch) -> list[list[str]]:
    """The transcripts of the context each piece is generated with, from now on."""
    seen: list[list[str]] = []
    fitting = Context.fitting

    def spy(self, piece):
        heard = fitting(self, piece)
        seen.append([h.segment.text for h in heard])
        return heard

    monkeypatch.setattr(Context, "fitting", spy)
    return seen


def test_long_text_pieces_fit_carry_context_and_join_seamlessly(tts, monkeypatch):
    sentences = [f"This is sentence number {i}, which says a little more." for i in range(42)]
    text = " ".join(sentences)
    pieces = split_text(text, TokenCounts(tts.model))
    assert len(pieces) > 3
    assert all(len(tts.model.tokenize(p)) <= PIECE_TOKENS for p in pieces)
    assert " ".join(pieces) == text

    seen_contexts = record_contexts(tts, monkeypatch)
    frames = []
    audio = np.concatenate(list(tts.decode_stream(
        (frames.append(f) or f for f in tts.frames(text, speaker=0, seed=3, max_audio_ms=4 * 80)), chunk_frames=3)))
    assert len(seen_contexts) == len(pieces)
    assert seen_contexts[0] == []
    for i in range(1, len(pieces)):
        assert seen_contexts[i] == [pieces[i - 1]]  # each piece hears the previous one
    # One continuous stream: identical to decoding every frame at once, so no seam at the joins.
    np.testing.assert_allclose(audio, tts.decode(np.stack(frames)), atol=1e-5 * np.abs(audio).max())


def test_context_gives_way_to_the_previous_piece_when_both_do_not_fit(tts, monkeypatch):
    """A context that fits the first piece of a long text, but not with the first piece as context of
    the second: the second piece drops it and goes on (it used to stop the text with PromptTooLong)."""
    from csm_gguf.generator import Segment

    text = " ".join(f"This is sentence number {i}, which goes on for a while." for i in range(12))
    pieces = split_text(text, TokenCounts(tts.model))
    assert len(pieces) > 1
    limit = tts.model.config.backbone.max_seq_len
    empty = Segment(1, "What came before.", np.zeros((0, 32), dtype=np.int64))
    frames = limit - 8 - tts.generator.prompt_rows(pieces[0], 0, [empty])  # room for 8 frames of piece 1
    context = [Segment(1, empty.text, np.ones((frames, 32), dtype=np.int64))]
    assert tts.generator.prompt_rows(pieces[1], 0, [*context, Segment(0, pieces[0])]) > limit

    seen_contexts = record_contexts(tts, monkeypatch)
    made = list(tts.frames(text, context=context, seed=1, max_audio_ms=4 * 80))
    assert seen_contexts[0] == [empty.text]
    assert seen_contexts[1:] == [[p] for p in pieces[:-1]]
    assert len(made) > len(pieces)


def test_context_that_leaves_the_text_too_little_room_is_refused(tts):
    """It used to fit the prompt and stop the speech, silently, when the model's context was full."""
    from csm_gguf.generator import PromptTooLong, Segment

    limit = tts.model.config.backbone.max_seq_len
    empty = Segment(1, "What came before.", np.zeros((0, 32), dtype=np.int64))
    frames = limit - 2 - tts.generator.prompt_rows(TEXT, 0, [empty])  # room for 2 frames
    context = [Segment(1, empty.text, np.ones((frames, 32), dtype=np.int64))]
    with pytest.raises(PromptTooLong, match=r"may need up to 25 frames more \(2 s of speech\)"):
        tts.generate(TEXT, context=context, max_audio_ms=2000)
    for lazy in (tts.frames, tts.stream):  # at the call, not at the first frame (the caller may be far away by then)
        with pytest.raises(PromptTooLong):
            lazy(TEXT, context=context, max_audio_ms=2000)
    assert len(tts.generate(TEXT, context=context, max_audio_ms=160)) == 2 * tts.codec.cfg.frame_size


def test_the_voice_none_is_nothing_to_load(tts):
    """It said "unknown voice 'none' (... 'none' for none ...)"."""
    with pytest.raises(ValueError, match="'none' is no voice but the raw model"):
        tts.voice("none")


def test_a_context_too_long_in_words_says_so(tts):
    """It said only 'use less audio', for a segment of ten frames and three thousand words."""
    with pytest.raises(ValueError, match=r"\(30\d\d of them its words\).*use less audio or fewer words"):
        tts.segment(0, "word " * 3000, codes=np.zeros((10, 32), dtype=np.int64))


def test_dialogue_turns_hear_each_speakers_last_piece(tts, monkeypatch):
    """Each turn is spoken after the last thing each speaker said, in the order said; its codes are those of
    speaking the turn alone with that context, and piece i samples with seed + i."""
    from csm_gguf.generator import Segment

    turns = [(0, "Did you hear that?"), (1, "Hear what?"), (0, "That noise, just now."), (1, "No.")]
    kw = dict(max_audio_ms=4 * 80)
    prompt = Segment(2, "A voice prompt.", np.ones((3, 32), dtype=np.int64))
    seen = []
    fitting = Context.fitting

    def spy(self, piece):
        heard = fitting(self, piece)
        seen.append([(h.segment.speaker, h.segment.text) for h in heard])
        return heard

    monkeypatch.setattr(Context, "fitting", spy)
    made = list(tts.dialogue_frames(turns, context=[prompt], seed=5, **kw))
    monkeypatch.undo()
    prompt_seen = (2, prompt.text)
    texts = [t for _, t in turns]
    assert seen == [
        [prompt_seen],
        [prompt_seen, (0, texts[0])],
        [prompt_seen, (0, texts[0]), (1, texts[1])],
        [prompt_seen, (1, texts[1]), (0, texts[2])],
    ]
    said: list[Segment] = []  # each speaker's last turn, in the order said
    total = 0
    for i, (speaker, text) in enumerate(turns):
        alone = np.stack(list(tts.frames(text, speaker=speaker, context=[prompt, *said], seed=5 + i, **kw)))
        np.testing.assert_array_equal(np.stack(made[total : total + len(alone)]), alone)
        total += len(alone)
        said = [seg for seg in said if seg.speaker != speaker] + [Segment(speaker, text, alone)]
    assert total == len(made)
    audio = tts.dialogue(turns, context=[prompt], seed=5, **kw)
    assert len(audio) == total * tts.codec.cfg.frame_size


@pytest.mark.parametrize("turns, kwargs, match", [
    ([(0, "Hello."), (-1, "Hi.")], {}, "turn 1: a speaker id is a whole number >= 0, got -1"),
    ([(0, "Hello."), (1, "  ")], {}, "turn 1: text is empty"),
    ([(0, "Hello."), (1, None)], {}, "turn 1: the text to speak must be a string"),
    ([(0, "Hello."), "Hi."], {}, "turn 1 must be a .speaker, text. pair"),
    ([], {}, "no turns to speak"),
    ("0: Hello.", {}, "turns must be a list"),
    ([(0, "Hello.")], {"context": [(0, "Hi.")]}, "context must be a list of Segments"),
    ([(0, "Hello.")], {"context": "Hi."}, "context must be a list of Segments"),
    ([(0, "Hello.")], {"temperature": -1}, "temperature must be a number >= 0"),
    ([(0, "Hello.")], {"temperature": float("inf")}, "temperature must be a number >= 0"),
    ([(0, "Hello.")], {"top_k": 0}, "top_k must be a whole number"),
    ([(0, "Hello.")], {"max_audio_ms": float("nan")}, "max_audio_ms must be a number > 0"),
    ([(0, "Hello.")], {"context": [Segment(-1, "Hi.")]}, "speaker id is a whole number >= 0"),
    ([(0, "Hello.")], {"context": [Segment(1, "Hi.", np.zeros((2, 31), dtype=np.int64))]}, "context codes"),
])
def test_dialogue_checks_every_turn_and_setting_before_speaking(tts, monkeypatch, turns, kwargs, match):
    monkeypatch.setattr(tts.generator, "speak", lambda *a: pytest.fail("generated before checking"))
    with pytest.raises(ValueError, match=match):
        tts.dialogue_frames(turns, **kwargs)  # at the call, not at the first frame


def test_dialogue_takes_turns_from_any_iterable(tts):
    turns = [(0, "Hello."), (1, "Hi.")]
    kw = dict(seed=3, max_audio_ms=160)
    assert np.array_equal(tts.dialogue(iter(turns), context=iter([]), **kw), tts.dialogue(turns, **kw))


@pytest.mark.parametrize("call, match", [
    (lambda tts: tts.generate(TEXT, speaker=-1), "speaker id is a whole number >= 0"),
    (lambda tts: tts.generate(TEXT, speaker="a"), "speaker id is a whole number >= 0"),
    (lambda tts: tts.generate(TEXT, max_audio_ms=float("inf")), "max_audio_ms must be a number > 0"),
    (lambda tts: tts.generate(None), "must be a string"),
    (lambda tts: tts.generate("\u200b\u200b "), "text is empty"),
    (lambda tts: tts.generate("caf\udce9"), "characters that are not Unicode"),
    (lambda tts: tts.generate(TEXT, seed=-1), "seed must be a whole number >= 0"),
    (lambda tts: tts.generate(TEXT, seed="1"), "seed must be a whole number >= 0"),
    (lambda tts: tts.stream(TEXT, chunk_frames=0), "chunk_frames must be a whole number >= 1"),
    (lambda tts: tts.stream(TEXT, speed=0), "speed must be a number from 0.25 to 4.0"),
    (lambda tts: tts.generate(TEXT, speed="fast"), "speed must be a number from 0.25 to 4.0"),
    (lambda tts: tts.decode(np.zeros(32, dtype=np.int64)), r"shape \(frames, 32\)"),
    (lambda tts: tts.decode(np.zeros((5, 32)) + 0.5), "whole numbers"),
    (lambda tts: tts.decode(np.full((5, 32), 64)), r"lie in 0..63"),
    (lambda tts: list(tts.decode_stream([np.zeros(31, dtype=np.int64)])), r"frame 0 must be one frame of 32 codes"),
    (lambda tts: list(tts.decode_stream([np.ones(32, np.int64), None, np.zeros((2, 32), np.int64)], chunk_frames=4)),
     r"frame 2 must be one frame of 32 codes, shape \(32,\), got shape \(2, 32\)"),
    (lambda tts: list(tts.decode_stream([np.full(32, 64)])), r"lie in 0..63"),
    (lambda tts: tts.encode(np.zeros(0, dtype=np.float32)), "audio to encode must be samples"),
    (lambda tts: tts.encode(np.full(4800, np.nan, dtype=np.float32)), "NaN or infinite samples"),
    (lambda tts: tts.encode(np.zeros((2, 4800), dtype=np.float32)), r"looks like \(channels, samples\)"),
    (lambda tts: tts.encode(np.zeros((0, 2), dtype=np.float32)), r"got float32 of shape \(0, 2\)"),
    (lambda tts: tts.encode([1000, -2000, 3000]), "int64: convert them"),
    (lambda tts: tts.decode(np.int64(3)), r"shape \(frames, 32\), got \(\)"),
    (lambda tts: tts.decode(np.zeros((0, 5), dtype=np.int64)), r"shape \(frames, 32\), got \(0, 5\)"),
])
def test_api_refuses_bad_arguments_clearly(tts, call, match):
    with pytest.raises(ValueError, match=match):
        call(tts)


def test_context_audio_longer_than_the_context_is_refused_before_encoding(tts, monkeypatch):
    """Five minutes of reference audio took 3 minutes and 10 GB to encode, then did not fit."""
    monkeypatch.setattr(tts, "encode", lambda *a: pytest.fail("encoded"))
    seconds = context_room(tts.model.config.backbone.max_seq_len) * 0.08
    with pytest.raises(ValueError, match=f"lasts more than {seconds:.0f} s, and beside it the model's context would"):
        tts.segment(0, "Words.", audio=np.zeros(round((seconds + 0.1) * 24_000), np.float32))


def test_segment_checks_its_codes(tts):
    with pytest.raises(ValueError, match="context codes must lie in 0..63"):
        tts.segment(0, "Words.", codes=np.full((5, 32), 64))
    with pytest.raises(ValueError, match="audio or its codes"):
        tts.segment(0, "Words.")


def test_encode_takes_pcm_and_stereo_arrays_like_float_mono(tts):
    mono = (0.5 * np.sin(np.arange(4800) / 7)).astype(np.float32)
    expected = tts.encode(mono)
    np.testing.assert_array_equal(tts.encode(np.stack([mono, mono], axis=1)), expected)
    pcm = np.round(mono * 32768).astype(np.int16)
    np.testing.assert_array_equal(tts.encode(pcm), tts.encode(pcm / 32768))
    u8 = np.round(mono * 127 + 128).astype(np.uint8)  # 8-bit WAV's unsigned samples
    np.testing.assert_array_equal(tts.encode(u8), tts.encode((u8 - 128.0) / 128))
    wav = io.BytesIO()
    sf.write(wav, mono, 24_000, format="WAV", subtype="FLOAT")
    wav.seek(0)
    np.testing.assert_array_equal(tts.encode(wav), expected)  # a file object, like a path
    assert np.abs(pcm / 32768 - mono).max() < 1e-4


def test_budget_is_proportional_to_text(tts):
    count = TokenCounts(tts.model)
    short, long = frame_budget(count("Hi.")), frame_budget(count("A much longer sentence " * 5))
    assert short < long
    assert Sampling(max_audio_ms=1234.0).for_piece(0, short).max_audio_ms == 1234.0


def test_models_converted_into_the_cache_under_any_name_are_found(f32_model, tmp_path, monkeypatch):
    """A conversion with --decoder-qtype (the README's advice) or of a --model-path went into the cache under a
    name CSM() did not look for ("no converted CSM model found"; say then converted sesame/csm-1b again)."""
    import os

    from csm_gguf.model_dir import default_model_dir
    from csm_gguf.tts import find_model

    monkeypatch.setenv("CSM_GGUF_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("CSM_GGUF_MODEL", raising=False)
    models = tmp_path / "cache" / "models"
    models.mkdir(parents=True)

    def converted(name: str, age: int = 0) -> Path:
        (models / name).symlink_to(f32_model, target_is_directory=True)
        os.utime(models / name, (1e9 + age, 1e9 + age), follow_symlinks=False)
        return models / name

    (models / "random-q4_k").symlink_to(f32_model, target_is_directory=True)  # bench.py's noise: never the model
    (models / ".sesame--csm-1b-q4_k.x1y2").mkdir()  # a conversion still being written
    with pytest.raises(FileNotFoundError, match="no converted CSM model found"):
        find_model(None)
    older, newer = converted("hf-q8_0", 1), converted("sesame--csm-1b-q4_k-decoder-q8_0", 2)
    assert find_model(None) == newer and older != newer  # the newest conversion
    plain = converted(default_model_dir("sesame/csm-1b", "q8_0").name)
    assert find_model(None) == plain  # the hub's CSM-1B, whatever else is there
