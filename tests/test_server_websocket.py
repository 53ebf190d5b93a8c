"""The speech websocket, as clients see it: sessions of settings, text and flushes."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import soundfile as sf
from simple_websocket import Client as WsClient
from simple_websocket import ConnectionClosed

from audio_fixtures import needs_ffmpeg
from csm_fixtures import random_codes
from csm_gguf.audio import load_audio
from csm_gguf.sampling import Sampling
from csm_gguf.server.limits import MAX_SPEECH_REQUEST
from csm_gguf.server.ws_session import RETRY_S, WebsocketSession
from server_fixtures import (
    GREEDY,
    MAX_QUEUE,
    MAX_STREAMS,
    TEXT,
    assert_same_audio,
    ffmpeg_children_end,
    pcm,
    record_starts,
    record_submits,
    reference,
    running_ffmpeg_children,
    wait_idle,
    ws_collect,
    ws_session,
)


def test_websocket_messages_have_the_size_limit_too(server, base, monkeypatch):
    app = server[0]
    assert app.config["SOCK_SERVER_OPTIONS"]["max_message_size"] == MAX_SPEECH_REQUEST
    monkeypatch.setitem(app.config["SOCK_SERVER_OPTIONS"], "max_message_size", 1000)
    ws = WsClient.connect(base.replace("http", "ws") + "/v1/audio/speech/ws")
    ws.send(json.dumps({"type": "text", "text": "x" * 2000}))
    with pytest.raises(ConnectionClosed) as closed:
        ws.receive(timeout=10)
    assert closed.value.reason == 1009  # message too big


def test_websocket_request_response(base, engine, services):
    ws = WsClient.connect(base.replace("http", "ws") + "/v1/audio/speech/ws")
    try:
        ws.send(json.dumps({"input": TEXT, "voice": "sage", "response_format": "pcm", **GREEDY}))
        audio, done = ws_collect(ws)
        assert done["frames"] == 10 and done["sentences"] == 1 and done["bytes"] == len(audio)
        expected = reference(services, voice="sage", **GREEDY)
        assert_same_audio(pcm(audio), expected)
        ws.send("{not json")
        assert json.loads(ws.receive(timeout=10))["error"]["code"] == "invalid_json"
        ws.send(json.dumps({"input": "", "voice": "sage"}))
        assert json.loads(ws.receive(timeout=10))["error"]["param"] == "input"
        ws.send(json.dumps({"input": "Once more."}))  # the session's settings still hold: pcm, greedy
        audio, done = ws_collect(ws)
        assert done["response_format"] == "pcm" and done["frames"] == 10
    finally:
        ws.close()


def test_websocket_text_in_pieces(base, engine, services):
    ws = WsClient.connect(base.replace("http", "ws") + "/v1/audio/speech/ws")
    try:
        ws.send(json.dumps({"voice": "onyx", "response_format": "wav", **GREEDY}))
        for piece in ["Hello the", "re. How are", " you to", "day? I am"]:
            ws.send(json.dumps({"type": "text", "text": piece}))
        first = ws.receive(timeout=30)  # the first sentence is spoken before the flush
        assert isinstance(first, bytes) and first.startswith(b"RIFF")
        ws.send(json.dumps({"type": "flush"}))
        audio, done = ws_collect(ws)
        assert done["sentences"] == 3 and done["frames"] == 30
        samples, _ = sf.read(io.BytesIO(first + audio), dtype="float32")
        assert len(samples) == 30 * services.tts.codec.cfg.frame_size
    finally:
        ws.close()


def test_websocket_text_past_the_sessions_waiting_limit_is_refused(base, monkeypatch):
    """A session's text not yet spoken is bounded (the client cannot be slowed: its messages are all read)."""
    from csm_gguf.server import ws_session

    monkeypatch.setattr(ws_session, "MAX_WS_WAITING_CHARS", 100)
    quick = {"temperature": 0, "max_audio_ms": 160}
    ws = WsClient.connect(base.replace("http", "ws") + "/v1/audio/speech/ws")
    try:
        ws.send(json.dumps({"response_format": "pcm", **quick}))
        ws.send(json.dumps({"type": "text", "text": "word " * 12}))  # 60 characters waiting for a sentence end
        ws.send(json.dumps({"type": "text", "text": "more " * 10}))  # 50 more: 110
        error = json.loads(ws.receive(timeout=30))["error"]
        assert (error["code"], error["param"], error["type"]) == ("too_much_text_waiting", "text", "rate_limit_error")
        assert "60 characters" in error["message"] and "100" in error["message"]
        ws.send(json.dumps({"input": "x " * 25, **quick}))  # a speech message's input counts too
        error = json.loads(ws.receive(timeout=30))["error"]
        assert (error["code"], error["param"]) == ("too_much_text_waiting", "input")
        ws.send(json.dumps({"type": "flush"}))
        _, done = ws_collect(ws)
        assert done["sentences"] == 1  # the first message's text, the refused ones not
        ws.send(json.dumps({"type": "text", "text": "again " * 15 + "."}))  # 91: room again, once spoken
        ws.send(json.dumps({"type": "flush"}))
        _, done = ws_collect(ws)
        assert done["sentences"] == 1
    finally:
        ws.close()


def test_websocket_file_whose_sentence_failed_is_no_file(base):
    """The error, then a done with zeros, as for a flush of nothing: it used to send a bare wav header."""
    too_long = [{"speaker": 0, "text": "x", "codes": random_codes(2100, 64, 1).tolist()}]
    ws = WsClient.connect(base.replace("http", "ws") + "/v1/audio/speech/ws")
    try:
        ws.send(json.dumps({"response_format": "wav", "context": too_long, **GREEDY}))
        ws.send(json.dumps({"type": "text", "text": "This will not fit."}))
        ws.send(json.dumps({"type": "flush"}))
        assert json.loads(ws.receive(timeout=30))["error"]["code"] == "context_length_exceeded"
        audio, done = ws_collect(ws)
        assert audio == b"" and (done["sentences"], done["frames"], done["bytes"]) == (0, 0, 0)
    finally:
        ws.close()


def test_websocket_flush_of_nothing_reports_like_any_flush(base):
    ws = WsClient.connect(base.replace("http", "ws") + "/v1/audio/speech/ws")
    try:
        ws.send(json.dumps({"type": "flush"}))
        audio, done = ws_collect(ws)
        assert audio == b"" and (done["sentences"], done["frames"], done["bytes"]) == (0, 0, 0)
        assert done["usage"] == {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0}
        assert {"response_format", "sample_rate", "first_audio_ms", "elapsed_ms"} <= set(done)
    finally:
        ws.close()


@needs_ffmpeg
def test_websocket_aac_is_one_file_and_a_client_gone_stops_its_ffmpeg(base, engine, services):
    files = ws_session(base, [{"voice": "alloy", "response_format": "aac", **GREEDY},
                              {"type": "text", "text": "One two three. Four five."}, {"type": "flush"}], dones=1)
    (audio, done), frame = files[0], services.tts.codec.cfg.frame_size
    assert done["frames"] == 20 and done["bytes"] == len(audio) and audio[:2] == b"\xff\xf1"
    assert 20 * frame <= len(load_audio(io.BytesIO(audio))) <= 20 * frame + 2048  # ADTS: priming, padding
    assert running_ffmpeg_children() == 0  # finished with the file
    ws = WsClient.connect(base.replace("http", "ws") + "/v1/audio/speech/ws")
    ws.send(json.dumps({"input": TEXT, "response_format": "aac", "max_audio_ms": 60_000}))
    while not isinstance(ws.receive(timeout=30), bytes):
        pass
    ws.close()
    wait_idle(engine)
    ffmpeg_children_end()


def test_websocket_flushes_sent_at_once_each_get_their_done(base, engine, monkeypatch, services):
    seen = record_submits(engine, monkeypatch)
    files = ws_session(base, [{"voice": "alloy", "response_format": "pcm", **GREEDY},
                              {"type": "text", "text": "One two three."}, {"type": "flush"}, {"type": "flush"},
                              {"type": "text", "text": "Four five."}, {"type": "flush"}], dones=3)
    assert [(done["sentences"], done["frames"]) for _, done in files] == [(1, 10), (0, 0), (1, 10)]
    frame_bytes = 2 * services.tts.codec.cfg.frame_size  # pcm: 16-bit samples
    assert [len(audio) for audio, _ in files] == [10 * frame_bytes, 0, 10 * frame_bytes]
    assert [text for _, text in seen] == ["One two three.", "Four five."]


def test_websocket_speed_applies_to_the_text_sent_after_it(base, engine, services):
    files = ws_session(base, [{"voice": "alloy", "response_format": "pcm", **GREEDY},
                              {"type": "text", "text": "One two three. "},  # not known complete: pending
                              {"type": "speech", "speed": 2},
                              {"type": "text", "text": "Four five."}, {"type": "flush"}], dones=1)
    (audio, done), frame = files[0], services.tts.codec.cfg.frame_size
    assert done["frames"] == 20 and done["bytes"] == len(audio)
    # 10 frames as spoken, then 10 at double speed, through one stretch from the change to the end
    assert len(audio) == 2 * round(10 * frame + 10 * frame / 2)
    assert done["audio_seconds"] == round(len(audio) / 2 / 24_000, 3)


def test_websocket_bad_messages_are_answered_and_the_session_goes_on(base, engine, monkeypatch):
    ws = WsClient.connect(base.replace("http", "ws") + "/v1/audio/speech/ws")
    try:
        ws.send(json.dumps({"type": "speech", "speed": 10**400}))  # an OverflowError closed the connection
        assert json.loads(ws.receive(timeout=10))["error"]["param"] == "speed"
        with monkeypatch.context() as m:
            m.setattr(WebsocketSession, "add_text", lambda *a: 1 / 0)  # any bug of ours in a message
            ws.send(json.dumps({"type": "text", "text": "Hi."}))
            error = json.loads(ws.receive(timeout=10))["error"]
        assert error["type"] == "server_error" and "division by zero" in error["message"]
        ws.send(json.dumps({"input": TEXT, "response_format": "pcm", **GREEDY}))
        audio, done = ws_collect(ws)
        assert done["frames"] == 10 and len(audio) == done["bytes"] > 0
    finally:
        ws.close()


def test_websocket_text_without_sentence_ends_is_cut_between_words(base, engine, monkeypatch):
    seen = record_submits(engine, monkeypatch)
    ws = WsClient.connect(base.replace("http", "ws") + "/v1/audio/speech/ws")
    try:
        ws.send(json.dumps({"voice": "alloy", "response_format": "pcm", **GREEDY}))
        ws.send(json.dumps({"type": "text", "text": " " * 5000}))  # blank: waits for words, no error
        ws.send(json.dumps({"type": "text", "text": "word " * 1000}))
        ws.send(json.dumps({"type": "flush"}))
        error = json.loads(ws.receive(timeout=30))["error"]
        assert error["code"] == "string_above_max_length"
        audio, done = ws_collect(ws)
    finally:
        ws.close()
    texts = [text for _, text in seen]
    assert done["sentences"] == 2 and len(texts) == 2
    assert " ".join(" ".join(texts).split()) == " ".join(["word"] * 1000)  # every word, once, in order


def test_websocket_text_keeps_the_settings_it_was_sent_under(base, engine, services, monkeypatch):
    """A change of settings ends the text pending there, which is spoken with the settings it was sent under
    (mid-sentence too, as `input` does): a dialogue's next speaker never says the last sentence of the one
    before. The previous sentence prompts the next only in the same voice (a format change keeps the voice,
    and ends the file being sent)."""
    services.voice("echo")  # its prompt made now, if need be: not among the pieces recorded
    seen = record_starts(engine, monkeypatch)
    files = ws_session(base, [{"voice": "alloy", "response_format": "pcm", **GREEDY},
                              {"type": "text", "text": "Turn A ends here. "},
                              {"voice": "echo"}, {"type": "text", "text": "Turn B is cut"},
                              {"response_format": "wav"}, {"type": "text", "text": " in two."},
                              {"type": "flush"}], dones=2)
    assert seen == [(0, "Turn A ends here.", []), (4, "Turn B is cut", []), (4, "in two.", ["Turn B is cut"])]
    (pcm_audio, first), (wav_audio, second) = files
    assert (first["response_format"], first["sentences"]) == ("pcm", 2) and not pcm_audio.startswith(b"RIFF")
    assert (second["response_format"], second["sentences"]) == ("wav", 1) and wav_audio.startswith(b"RIFF")


def test_websocket_a_format_change_after_pending_text_gives_two_files(base, engine):
    files = ws_session(base, [{"response_format": "wav", **GREEDY}, {"type": "text", "text": "One sentence. "},
                              {"response_format": "pcm"}, {"type": "text", "text": "Two sentence. "},
                              {"type": "flush"}], dones=2)
    assert [(done["response_format"], done["sentences"]) for _, done in files] == [("wav", 1), ("pcm", 1)]
    assert files[0][0].startswith(b"RIFF") and not files[1][0].startswith(b"RIFF")


def test_websocket_a_format_change_ends_the_file_being_sent_with_its_done(base, engine):
    """At once: the done came only with the next file's first sentence, so a client waiting for it waited for
    ever. A change before anything is spoken, or after a flush, ends no file (no extra done)."""
    ws = WsClient.connect(base.replace("http", "ws") + "/v1/audio/speech/ws")
    try:
        ws.send(json.dumps({"response_format": "pcm", **GREEDY}))
        ws.send(json.dumps({"response_format": "wav"}))  # nothing begun: no file to end
        ws.send(json.dumps({"type": "text", "text": "Pending when the format changes"}))
        ws.send(json.dumps({"response_format": "pcm"}))
        audio, done = ws_collect(ws)
        assert (done["response_format"], done["sentences"]) == ("wav", 1) and audio.startswith(b"RIFF")
        ws.send(json.dumps({"type": "text", "text": "Then this."}))
        ws.send(json.dumps({"type": "flush"}))
        ws.send(json.dumps({"response_format": "wav"}))  # after a flush: that file is ended already
        ws.send(json.dumps({"type": "text", "text": "And this."}))
        ws.send(json.dumps({"type": "flush"}))
        files = [ws_collect(ws), ws_collect(ws)]
        assert [(d["response_format"], d["sentences"]) for _, d in files] == [("pcm", 1), ("wav", 1)]
    finally:
        ws.close()


def test_websocket_settings_unchanged_do_not_end_the_pending_sentence(base, engine, monkeypatch):
    seen = record_submits(engine, monkeypatch)
    ws_session(base, [{"voice": "alloy", "response_format": "pcm", **GREEDY}, {"type": "text", "text": "One"},
                      {"voice": "alloy"}, {"type": "text", "text": " sentence."}, {"type": "flush"}], dones=1)
    assert seen == [(0, "One sentence.")]


def test_websocket_each_file_is_decoded_from_its_start(base, engine, services):
    """A flush ends a file: the next one's audio is decoded afresh (in the same voice it would still hear the
    sentence before it; in another voice it is a request of its own, equal to `generate`)."""
    services.voice("echo")  # its prompt made now, before the session
    files = ws_session(base, [{"voice": "alloy", "response_format": "pcm", **GREEDY},
                              {"type": "text", "text": "One two three."}, {"type": "flush"},
                              {"voice": "echo"}, {"type": "text", "text": "Four five."}, {"type": "flush"}], dones=2)
    wait_idle(engine)
    assert_same_audio(pcm(files[0][0]), reference(services, "One two three.", voice="alloy", **GREEDY))
    assert_same_audio(pcm(files[1][0]), reference(services, "Four five.", voice="echo", **GREEDY))


def test_websocket_input_after_pending_text_keeps_each_ones_settings(base, engine, monkeypatch):
    seen = record_submits(engine, monkeypatch)
    files = ws_session(base, [{"voice": "alloy", "response_format": "pcm", **GREEDY},
                              {"type": "text", "text": "Hello there. How are"},
                              {"input": "Brand new request.", "voice": "echo", "response_format": "wav"}], dones=2)
    assert seen == [(0, "Hello there."), (0, "How are"), (4, "Brand new request.")]
    assert [done["response_format"] for _, done in files] == ["pcm", "wav"]
    assert files[1][0].startswith(b"RIFF")


def test_websocket_waits_for_a_full_server_instead_of_dropping_sentences(base, engine, monkeypatch, services):
    seen = record_submits(engine, monkeypatch, refuse=3)
    ws = WsClient.connect(base.replace("http", "ws") + "/v1/audio/speech/ws")
    try:
        ws.send(json.dumps({"voice": "alloy", "response_format": "pcm", **GREEDY}))
        ws.send(json.dumps({"type": "text", "text": "One. Two"}))
        first = ws.receive(timeout=30)
        wait_idle(engine)  # "Two." comes after "One." ended: it queues like any request (and is refused)
        for m in [{"type": "text", "text": ". Three."}, {"type": "flush"}]:
            ws.send(json.dumps(m))
        audio, done = ws_collect(ws)  # an error message here would fail ws_collect
    finally:
        ws.close()
    assert [text for _, text in seen] == ["One.", "Two.", "Three."]
    assert done["sentences"] == 3 and len(first + audio) == 2 * done["frames"] * services.tts.codec.cfg.frame_size


def test_websocket_times_count_from_when_the_sentence_was_complete(base, engine, monkeypatch):
    """done.first_audio_ms and elapsed_ms count from when the file's first sentence was complete (here: at
    the flush), as its client waits from then: the time it waits for a slot on a full server included."""
    from csm_gguf.server.engine import QueueFull

    submit, refused = engine.submit, []

    def full_twice(*args, **kwargs):
        if len(refused) < 2:
            refused.append(args[0].text)
            raise QueueFull("the server is busy (test)")
        return submit(*args, **kwargs)

    monkeypatch.setattr(engine, "submit", full_twice)
    [(audio, done)] = ws_session(base, [{"response_format": "pcm", **GREEDY}, {"type": "text", "text": "Hello there."},
                                        {"type": "flush"}], dones=1)
    assert refused == ["Hello there."] * 2 and done["frames"] == 10 and len(audio) == done["bytes"]
    assert done["first_audio_ms"] >= 2 * RETRY_S * 1000  # two retries before it had a slot
    assert done["elapsed_ms"] >= done["first_audio_ms"]


def session_on_a_full_server(base, engine, monkeypatch, first: str, later: str) -> tuple[list[str], dict]:
    """A session sends `first` while every other slot is busy with a long request, so its first sentence
    takes the last slot; then another client's request arrives and waits; then the session sends `later`
    and a flush. Returns the pieces in the order the engine started them, and the session's done."""
    from csm_gguf.server.engine import SpeechJob

    others = [engine.submit(SpeechJob(f"Filler number {i}.", sampling=Sampling(temperature=0, max_audio_ms=60_000)))
              for i in range(MAX_STREAMS - 1)]
    starts = record_starts(engine, monkeypatch)
    ws = WsClient.connect(base.replace("http", "ws") + "/v1/audio/speech/ws")
    try:
        ws.send(json.dumps({"voice": "alloy", "response_format": "pcm", "temperature": 0, "max_audio_ms": 2400}))
        ws.send(json.dumps({"type": "text", "text": first}))
        assert isinstance(ws.receive(timeout=30), bytes)  # the first sentence has the last free slot
        short = Sampling(temperature=0, max_audio_ms=800)
        others.append(engine.submit(SpeechJob("Another client.", sampling=short)))  # waits
        ws.send(json.dumps({"type": "text", "text": later}))
        ws.send(json.dumps({"type": "flush"}))
        _, done = ws_collect(ws)
    finally:
        ws.close()
        for job in others:
            job.cancel()
    wait_idle(engine)
    return starts, done


def test_websocket_next_sentence_takes_over_its_slot_on_a_full_server(base, engine, monkeypatch):
    """A sentence complete while the one before it is spoken takes over its slot when it ends: queued
    behind requests that came meanwhile, it would leave a gap in the session's audio."""
    starts, done = session_on_a_full_server(base, engine, monkeypatch, "One is first. Two is next. And", "")
    order = [text for _, text, _ in starts]
    assert order.index("Two is next.") < order.index("Another client.")
    assert starts[order.index("Two is next.")] == (0, "Two is next.", ["One is first."])
    assert done["sentences"] == 3 and done["frames"] == 90


def test_websocket_next_sentence_does_not_overtake_requests_that_came_before_it(base, engine, monkeypatch):
    """A request that waits since before the session's next sentence was complete goes first: following
    sentences must not keep a slot from the queue as long as a session sends text."""
    starts, done = session_on_a_full_server(base, engine, monkeypatch, "One is first. Two is", " next. And")
    order = [text for _, text, _ in starts]
    assert order.index("Another client.") < order.index("Two is next.")
    assert done["sentences"] == 3


def test_websocket_reset_while_sending_ends_the_session_quietly(engine, services):
    """A connection reset surfaces as OSError from send(), not ConnectionClosed: it used to escape the
    session and be logged as an unexpected server error."""
    from csm_gguf.server.ws_session import WebsocketSession

    class ResetSocket:
        messages = [json.dumps({"response_format": "pcm", "max_audio_ms": 60_000}),
                    json.dumps({"type": "text", "text": "A first sentence. A second one. And"})]

        def receive(self, timeout=None):
            return self.messages.pop(0) if self.messages else None

        def send(self, data):
            raise BrokenPipeError(32, "Broken pipe")

    WebsocketSession(ResetSocket(), services).run()  # returns: the client is gone
    wait_idle(engine)  # and both sentences were cancelled


def test_websocket_disconnect_mid_stream(base, engine):
    ws = WsClient.connect(base.replace("http", "ws") + "/v1/audio/speech/ws")
    ws.send(json.dumps({"input": TEXT, "response_format": "pcm", "max_audio_ms": 60_000}))
    assert isinstance(ws.receive(timeout=30), bytes)
    assert engine.stats()["active_streams"] == 1
    ws.close()
    wait_idle(engine)


def test_websocket_disconnect_cancels_the_sentence_waiting_to_follow(base, engine):
    ws = WsClient.connect(base.replace("http", "ws") + "/v1/audio/speech/ws")
    ws.send(json.dumps({"response_format": "pcm", "max_audio_ms": 60_000}))
    ws.send(json.dumps({"type": "text", "text": "A first sentence. A second one. And"}))
    assert isinstance(ws.receive(timeout=30), bytes)
    assert engine.stats()["active_streams"] == 1 and engine.active[0].successor is not None
    ws.close()
    wait_idle(engine)  # the second sentence did not start in the first one's slot


def test_websocket_context_audio_takes_a_place_in_line_like_a_request(base, engine, services, monkeypatch):
    """Encoding context audio is a request's work: on a full server a speech message carrying new audio is
    refused (queue_full) with nothing decoded and its settings not applied, as HTTP answers 429 before it
    reads the body; with room again, the same message is taken. (Sessions used to encode without a place.)"""
    from csm_gguf.server.engine import SpeechJob

    calls, context = spy_encodes(services, monkeypatch)
    long = Sampling(temperature=0, max_audio_ms=60_000)
    busy = [engine.submit(SpeechJob(f"Filler number {i}.", sampling=long)) for i in range(MAX_STREAMS + MAX_QUEUE)]
    ws = WsClient.connect(base.replace("http", "ws") + "/v1/audio/speech/ws")
    try:
        ws.send(json.dumps({"voice": "none", "context": context, "response_format": "pcm", **GREEDY}))
        answer = ws.receive(timeout=10)  # settings without input are answered only when refused
        assert isinstance(answer, str), f"taken without a place in line ({len(calls)} encodes)"
        refused = json.loads(answer)
        assert (refused["type"], refused["error"]["code"], calls) == ("error", "queue_full", [])
        for job in busy:
            job.cancel()
        wait_idle(engine)
        ws.send(json.dumps({"input": "One."}))  # the refused settings did not apply: no context
        ws.send(json.dumps({"voice": "none", "context": context, "input": "Two.", "response_format": "pcm",
                            **GREEDY}))
        dones = [ws_collect(ws)[1] for _ in range(2)]
    finally:
        ws.close()
        for job in busy:
            job.cancel()
    assert [done["sentences"] for done in dones] == [1, 1] and len(calls) == 1


def spy_encodes(services, monkeypatch) -> tuple[list, list[dict]]:
    """(the encoder's calls, recorded from now on; a context of half a second of audio, as sent)."""
    import base64

    calls = []
    segment = services.tts.segment
    monkeypatch.setattr(services.tts, "segment", lambda *a, **kw: (calls.append(a), segment(*a, **kw))[1])
    data = io.BytesIO()
    sf.write(data, 0.1 * np.sin(np.arange(12_000) / 10), 24_000, format="WAV")
    return calls, [{"speaker": 1, "text": "Some earlier words.", "audio": base64.b64encode(data.getvalue()).decode()}]


def test_websocket_context_audio_is_encoded_once_per_session(base, services, monkeypatch):
    """Each speech message is checked whole, but context audio that the session's settings already hold is
    not encoded again (it used to be, by every speech message)."""
    calls, context = spy_encodes(services, monkeypatch)
    files = ws_session(base, [{"voice": "alloy", "context": context, "response_format": "pcm", **GREEDY},
                              {"input": "One."}, {"input": "Two.", "speed": 1.0}, {"context": context},
                              {"input": "Three."}], dones=3)
    assert [done["sentences"] for _, done in files] == [1, 1, 1]
    assert len(calls) == 1
