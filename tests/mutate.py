"""A small mutation pass: plausible bugs put into the code one at a time; does a fast subset of the tests
catch each? Not collected by pytest (no test_ prefix). From the repository root:

    PYTHONPATH=$PWD python tests/mutate.py            # every mutation; a report at the end
    PYTHONPATH=$PWD python tests/mutate.py 3 7        # only these (numbers as --list shows them)
    PYTHONPATH=$PWD python tests/mutate.py --list
    PYTHONPATH=$PWD python tests/mutate.py --check    # only check that every mutation applies
    PYTHONPATH=$PWD python tests/mutate.py --baseline # the subsets pass on the code as it is (else no catch counts)
    PYTHONPATH=$PWD python tests/mutate.py --every-test 5    # not stopping at the first failing test

Each mutation replaces exact text; each `old` must occur exactly once in its file. Before any test runs,
every chosen mutation is checked: one whose text is gone (a refactor moved or rewrote the line) stops the
pass with exit status 2 and names it, rather than test the unmutated code and count a survivor or a catch
that means nothing. The file is restored after each run, also on Ctrl-C. A mutation counts as caught when
its tests fail (or time out). The tests run in this checkout: run the pass in a copy of the tree if you
want to work on the code meanwhile.
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

TARGETS = {
    "generator": "csm_gguf/generator.py",
    "depth": "csm_gguf/depth.py",
    "heads": "csm_gguf/heads.py",
    "tts": "csm_gguf/tts.py",
    "plan": "csm_gguf/plan.py",
    "sampling": "csm_gguf/sampling.py",
    "model": "csm_gguf/model.py",  # the prompt's format
    "engine": "csm_gguf/server/engine.py",
    "schemas": "csm_gguf/server/schemas.py",
    "settings": "csm_gguf/server/settings.py",
    "voices": "csm_gguf/voices.py",
    "builtin_voices": "csm_gguf/builtin_voices.py",  # the OpenAI names, each a fixed prompt of a speaker id
    "tensor_map": "converter/tensor_map.py",
    "prompt_cache": "csm_gguf/prompt_cache.py",
    "pool": "csm_gguf/mimi/pool.py",
    "atomic": "csm_gguf/atomic.py",
    "text": "csm_gguf/text.py",
    "services": "csm_gguf/server/services.py",
    "wyoming": "csm_gguf/wyoming_server/handler.py",
    "speaker": "csm_gguf/wyoming_server/speaker.py",
    "served_voices": "csm_gguf/server/served_voices.py",
    "routes": "csm_gguf/server/routes.py",
    "connection": "csm_gguf/server/connection.py",
    "app": "csm_gguf/server/app.py",
    "ws_session": "csm_gguf/server/ws_session.py",
    "manifest": "csm_gguf/batch/manifest.py",
    "batch_run": "csm_gguf/batch/run.py",
    "convert": "csm_gguf/convert.py",
    "say": "csm_gguf/say.py",
    "read_ahead": "csm_gguf/read_ahead.py",
    "errors": "csm_gguf/server/errors.py",
    "streaming": "csm_gguf/server/streaming.py",
    "events": "csm_gguf/wyoming_server/events.py",
}
# Fast subsets, the likeliest to fail first (pytest runs with -x).
SHAPE = "tests/test_real_model_shape.py::test_greedy_codes_equal_transformers_with_a_wider_vocabulary"
CORE = "tests/test_generator.py::test_greedy_codes_equal_transformers"
DEPTH = "tests/test_depth.py"
POWERS = f"{DEPTH}::test_on_a_gpu_graphs_of_powers_of_two_streams_serve_every_count"
PROMPT = "tests/test_real_model_shape.py::test_prompt_equals_transformers_embeddings_of_the_llama3_encoding"
ORIGINAL = "tests/test_real_model_shape.py::test_original_format_gives_the_same_codes"
EOS = "tests/test_end_of_speech.py"
GREEDY_EOS = f"{EOS}::test_the_step_that_draws_it_ends_the_stream_without_feeding_it_back"
LONG = "tests/test_long_text_context.py"
LONG_SERVER = f"{LONG}::test_server_engine"
DEFAULTS = "tests/test_defaults.py"
BUDGET = f"{DEFAULTS}::test_a_piece_s_budget_without_max_audio_ms"
DIALOGUE = "tests/test_tts.py::test_dialogue_turns_hear_each_speakers_last_piece"
ROOM = "tests/test_tts.py::test_context_that_leaves_the_text_too_little_room_is_refused"
GIVE_WAY = "tests/test_tts.py::test_context_gives_way_to_the_previous_piece_when_both_do_not_fit"
UNTIED = "tests/test_generator.py::test_untied_decoder_embeddings_are_used"
SEEDED = "tests/test_generator.py::test_same_seed_same_codes_and_codes_stay_in_codec_range"
SEEDED_NOISE = "tests/test_generator.py::test_a_stream_s_noise_is_its_temperature_times_gumbel_numbers_over_its_top_k"
LONG_PROMPT = "tests/test_server_engine.py::test_a_long_prompt_is_read_between_the_frames_of_others"
TOGETHER = "tests/test_server_engine.py::test_prompts_read_together_share_one_decode_and_say_what_they_say_alone"
WS_CONTINUES = "tests/test_server_websocket.py::test_websocket_text_keeps_the_settings_it_was_sent_under"
PLAN_TOKENS = "tests/test_plan.py::test_piece_prompts_are_bos_speaker_text_eos_by_tiktoken"
PLAN_PROMPT = "tests/test_plan.py::test_each_piece_s_prompt_is_the_generator_s_after_what_was_said"
ENDS_AT_ONCE = f"{EOS}::test_pieces_that_end_at_once_say_nothing_and_the_text_goes_on"
MID_BATCH_EOS = f"{EOS}::test_a_stream_ending_mid_batch_leaves_the_streams_after_it_as_alone"
REUSED_SEQUENCE = "tests/test_prompt_cache.py::test_a_prompt_cached_in_a_reused_sequence_is_shared_exactly"
OWN_STATES = "tests/test_mimi_pool.py::test_streams_beyond_the_rows_decode_on_states_of_their_own"
ROUNDS_DOWN = "tests/test_generator.py::test_a_budget_between_frames_rounds_down"
NO_LINKS = "tests/test_shared_voices.py::test_without_hard_links_a_voice_is_saved_and_a_taken_name_still_refused"
RUN_ON = "tests/test_text.py::test_take_sentences_within_cuts_text_that_never_ends_a_sentence"
FULL = "tests/test_plan.py::test_context_gives_way_only_when_the_piece_would_not_fit_and_is_then_not_cached"
AS_IT_JOINS = "tests/test_server_engine.py::test_a_request_cancelled_as_it_joins_ends_and_its_follower_runs"
AT_LIMITS = "tests/test_server_schemas.py::test_input_and_context_at_their_limits_are_taken_and_one_more_refused"
ENCODE_THREADS = "tests/test_server_http.py::test_request_threads_that_encode_audio_start_no_threads_of_their_own"
WYOMING_STALL = "tests/test_wyoming.py::test_a_client_that_stops_reading_is_dropped_and_its_stream_freed"
ENGINE_TESTS = "tests/test_server_engine.py"
FORGET_UNUSABLE = "tests/test_server_voices.py::test_deleting_a_voice_saved_for_another_model_as_its_400_says"
BODY_NEVER_BEGAN = "tests/test_server_http.py::test_a_response_that_fails_before_its_body_begins_stops_its_job"
HOSTILE = "tests/test_hostile_clients.py"
WS_WAITING = "tests/test_server_websocket.py::test_websocket_text_past_the_sessions_waiting_limit_is_refused"
BAD_ROWS = "tests/test_batch.py::test_bad_rows_get_their_error_and_the_run_goes_on"
REPLACED_VOICE = "tests/test_server_voices.py::test_a_replaced_or_deleted_voice_leaves_the_prompt_cache"
RELEASE_NEVER_WAITS = "tests/test_mimi_pool.py::test_letting_a_stream_go_never_waits_for_a_step"
WYOMING = "tests/test_wyoming.py"
TIMEOUT_S = 600


@dataclass
class Mutation:
    target: str  # a key of TARGETS
    what: str
    edits: list[tuple[str, str]]  # (old, new): each old occurs exactly once
    tests: list[str]


M = Mutation
MUTATIONS = [
    # --- depth.py: the depth decoder's frame as one ggml graph -------------------------------------------
    M("depth", "RoPE in NEOX order (halves), not llama's adjacent pairs",
      [("pos, self._rope_freqs, hd, 0,", "pos, self._rope_freqs, hd, 2,")], [CORE]),
    M("depth", "RoPE without the llama-3 frequency factors",
      [("pos, self._rope_freqs, hd, 0,", "pos, None, hd, 0,")], [CORE, DEPTH]),
    M("depth", "attention scaled by 1 / head_dim, not its square root",
      [("None, 1.0 / hd**0.5, 0.0)", "None, 1.0 / hd, 0.0)")], [CORE]),
    M("depth", "every position at position 0",
      [("put(G.view_1d, pos, s, 4 * self.max_streams * p)", "put(G.view_1d, pos, s, 0)")], [CORE]),
    M("depth", "decoder input rows strided by the codec's size",
      [("d, v, row_bytes, (p - 1) * v * row_bytes)", "d, v, row_bytes, (p - 1) * self.n_codes * row_bytes)")],
      [SHAPE]),
    M("depth", "the backbone's next input summed from codebook 0's rows of the audio table for every codebook",
      [("put(G.view_2d, self._audio, e, v, row, p * v * row)", "put(G.view_2d, self._audio, e, v, row, 0)")],
      [CORE]),
    M("depth", "every codebook drawn with codebook 0's noise",
      [("noise = put(G.view_2d, inputs[\"noise\"], k, s, 4 * k, 4 * k * s * p)",
        "noise = put(G.view_2d, inputs[\"noise\"], k, s, 4 * k, 0)")], [DEPTH]),
    M("depth", "the streams' noise sent stream by stream, not codebook by codebook",
      [("noise=_padded(noise, idle).transpose(1, 0, 2))", "noise=_padded(noise, idle))")], [DEPTH]),
    M("heads", "each stream's top-k ignored (every code of the bucket may win)",
      [("out = np.full((len(noise), len(noise[0]), k), -np.inf, np.float32)",
        "out = np.zeros((len(noise), len(noise[0]), k), np.float32)")], ["tests/test_heads.py"]),
    M("heads", "the race run without its noise (the largest logit always wins)",
      [("put(G.argmax, put(G.add, vals, noise))", "put(G.argmax, vals)")],
      ["tests/test_heads.py"]),
    M("generator", "the temperature ignored (every stream's noise at temperature 1)",
      [("return np.float32(-self.temperature) * np.log(q)", "return -np.log(q)")], [SEEDED_NOISE]),
    M("depth", "plans into the allocator's old memory kept when it grows",
      [("            self._families.free_all()\n", "")], [DEPTH]),
    M("depth", "positions 0 and 1 read their positions one place too far (a stream's position 0 as 1)",
      [("4 * (self.max_streams - s))  # the end", "4 * (self.max_streams - s) + 4)  # the end")], [DEPTH]),
    M("depth", "position 0's own values given to the query heads of another kv head",
      [("own = put(G.view_4d, values, hd, 1, nkv, s, hd * 4, hd * 4, v_column, v_offset)",
        "own = put(G.view_4d, values, hd, nkv, 1, s, hd * 4, hd * 4 * nkv, v_column, v_offset)"),
       ("own = put(G.repeat_4d, own, hd, nh // nkv, nkv, s)", "own = put(G.repeat_4d, own, hd, nkv, nh // nkv, s)")],
      [DEPTH]),
    M("depth", "the first pass attends from position 0's queries, not position 1's",
      [("column, (t - 1) * s * column)", "column, 0)")], [DEPTH]),
    M("heads", "a GPU draw's top-k from each half's smallest codes (halves sorted the wrong way)",
      [("first = put(G.view_2d, put(G.argsort, halves, G.SORT_DESC)",
        "first = put(G.view_2d, put(G.argsort, halves, 0)")],
      [DEPTH + "::test_the_gpu_paths_run_on_the_cpu_backend_compute_what_the_cpu_paths_compute"]),
    M("depth", "on a GPU a graph for every stream count (none rounded up to a power of two)",
      [("        return min(1 << (s - 1).bit_length(), self.max_streams)", "        return s")], [POWERS]),
    M("depth", "a frame's codes read as if the graph had as many columns as streams",
      [('return self._io.view("codes", np.int32, (self.codebooks, c)).T[:s]',
        'return self._io.view("codes", np.int32, (self.codebooks, s)).T')], [POWERS]),
    M("depth", "joined matrices with the keys' rows before the queries'",
      [('for part in ("attn_q", "attn_k", "attn_v")]', 'for part in ("attn_k", "attn_q", "attn_v")]')], [DEPTH]),
    # --- generator.py -----------------------------------------------------------------------------------
    M("generator", "audio embedding rows strided by the codec's size, not the vocabulary's",
      [("self._offsets = np.arange(cfg.num_codebooks) * v",
        "self._offsets = np.arange(cfg.num_codebooks) * model.n_codes")],
      [SHAPE]),
    M("generator", "decoder input rows strided by the codec's size",
      [("model.decoder_inputs[(i - 1) * v + codes[:, i - 1]]",
        "model.decoder_inputs[(i - 1) * n_codes + codes[:, i - 1]]")],
      [SHAPE]),
    M("generator", "projection(h) read from the rows after the codec's codes, not the vocabulary's",
      [("self._proj = slice(v, v + d)", "self._proj = slice(model.n_codes, model.n_codes + d)")],
      [SHAPE]),
    M("generator", "codes drawn over the whole vocabulary (ids the codec cannot decode)",
      [("n_threads or default_threads(), n_codes=model.n_codes)", "n_threads or default_threads(), n_codes=v)"),
       ("self.heads.first[:s] = out[:, :n_codes]", "self.heads.first[:s] = out[:, :v]")],
      [SHAPE]),
    M("generator", "every stream drawn in the first stream's top-k bucket",
      [("k = top_k_bucket(max(st.sampler.top_k for st in streams), n)",
        "k = top_k_bucket(streams[0].sampler.top_k, n)")],
      ["tests/test_generator.py::test_batched_streams_equal_solo_streams"]),
    M("generator", "the end-of-speech frame does not mark the stream done",
      [("                st.done = True\n                continue", "                continue")],
      [GREEDY_EOS, EOS]),
    M("generator", "the end-of-speech frame is fed back as the next input",
      [("                st.done = True\n                continue", "                st.done = True")],
      [GREEDY_EOS]),
    M("generator", "speak passes the end-of-speech frame on",
      [("                if not frame.any():\n                    break\n", "")],
      [EOS]),
    M("generator", "no all-zero frame after a context segment's audio",
      [("self.frame_embeddings(np.concatenate([codes, zero[None]]))", "self.frame_embeddings(codes)")],
      [PROMPT]),
    M("generator", "context segments spoken as the current speaker",
      [("return [(model.prompt_tokens(seg.speaker, seg.text),", "return [(model.prompt_tokens(0, seg.text),")],
      [PROMPT, PLAN_PROMPT]),
    M("generator", "one frame more than the budget",
      [("if st.frames_left <= 0 or", "if st.frames_left < 0 or")],
      [LONG]),
    M("generator", "the depth decoder's codebook-0 input from the backbone's audio table (untied fine-tunes)",
      [("dec.embd[1 : 2 * s : 2] = model.decoder_inputs[codes[:, 0]]",
        "dec.embd[1 : 2 * s : 2] = model.audio_embeddings[codes[:, 0]]")],
      [UNTIED]),
    M("generator", "a prompt read in parts restarts its positions at 0 in each part",
      [("bb.pos[part] = np.arange(start, stop)", "bb.pos[part] = np.arange(stop - start)")],
      [LONG_PROMPT]),
    M("generator", "prompts read together all in the first one's sequence",
      [("seq_ids[part] = stream.slot", "seq_ids[part] = batch[0][0].slot")], [TOGETHER]),
    M("generator", "prompts that arrive together read one decode each",
      [("if filled == self.backbone.n_batch or stop == stream.shared:", "if True:")], [TOGETHER]),
    M("generator", "a voice prompt cached before its last rows are read",
      [("if filled == self.backbone.n_batch or stop == stream.shared:", "if filled == self.backbone.n_batch:")],
      ["tests/test_prompt_cache.py", "tests/test_server_voices.py"]),
    M("generator", "the seed is not used (every draw random)",
      [("self._rng = np.random.default_rng(sampling.seed)", "self._rng = np.random.default_rng()")],
      [SEEDED]),
    # --- tts.py -----------------------------------------------------------------------------------------
    M("tts", "the next piece does not hear the previous one",
      [("            context.said(piece, made)\n", "")],
      [LONG]),
    M("tts", "the previous piece's context holds every frame so far, not that piece's",
      [("        for piece in pieces:\n            self._check_open()",
        "        made = []\n        for piece in pieces:\n            self._check_open()"),
       ("            made = []\n            prompt, shared = context.prompt(piece)",
        "            prompt, shared = context.prompt(piece)")],
      [LONG]),
    M("tts", "frames() drops the caller's max_audio_ms",
      [(("        sampling = Sampling(temperature, top_k, seed, max_audio_ms)\n"
         "        count = TokenCounts(self.model)\n        texts = split_text(text, count)"),
        ("        sampling = Sampling(temperature, top_k, seed)\n"
         "        count = TokenCounts(self.model)\n        texts = split_text(text, count)"))],
      [LONG]),
    M("tts", "a dialogue's turns all spoken as speaker 0",
      [("lines = [(speaker, piece) for speaker, pieces in ids for piece in pieces]",
        "lines = [(0, piece) for speaker, pieces in ids for piece in pieces]")],
      [DIALOGUE]),
    M("tts", "chunks of chunk_frames + 1 frames",
      [("            if len(pending) >= chunk_frames:", "            if len(pending) > chunk_frames:")],
      [f"{EOS}::test_csm_generate_and_stream_end_there"]),
    # --- plan.py ----------------------------------------------------------------------------------------
    M("plan", "a piece's budget is the smaller of the floor and the text's share",
      [("return max(MIN_FRAMES, FRAMES_PER_TOKEN * tokens) * FRAME_MS",
        "return min(MIN_FRAMES, FRAMES_PER_TOKEN * tokens) * FRAME_MS")],
      [BUDGET]),
    M("plan", "every piece samples with piece 0's seed",
      [("own = sampling.for_piece(i, budget)", "own = sampling.for_piece(0, budget)")],
      [PLAN_TOKENS, DIALOGUE]),
    M("plan", "a piece's prompt spoken as speaker 0",
      [("yield Piece(speaker, text, model.prompt_tokens(speaker, text), own,",
        "yield Piece(speaker, text, model.prompt_tokens(0, text), own,")],
      [PLAN_TOKENS, DIALOGUE, LONG]),
    M("plan", "the caller's context segments read as speaker 0",
      [("self.given = [Heard(seg, model.prompt_tokens(seg.speaker, seg.text)) for seg in segments]",
        "self.given = [Heard(seg, model.prompt_tokens(0, seg.text)) for seg in segments]")],
      [PLAN_PROMPT, DIALOGUE]),
    M("plan", "a piece's room ignores a smaller limit of the caller's",
      [("room=int(min(own.max_audio_ms, budget) // FRAME_MS)", "room=int(budget // FRAME_MS)")],
      [ROOM]),
    M("plan", "a context segment's rows counted without its end-of-speech frame",
      [("(0 if codes is None else len(codes) + 1)", "(0 if codes is None else len(codes))")],
      [ROOM, GIVE_WAY, PLAN_PROMPT]),
    M("plan", "a prompt that leaves exactly the piece's room is refused",
      [("        if rows + piece.room > limit:\n            raise PromptTooLong",
        "        if rows + piece.room >= limit:\n            raise PromptTooLong")],
      [ROOM]),
    M("plan", "the previous piece gives way before the caller's context (newest first)",
      [("rows -= heard.pop(0).rows", "rows -= heard.pop().rows")],
      [GIVE_WAY]),
    M("plan", "every piece said so far is heard, not each speaker's last",
      [("self.previous = [*(h for h in self.previous if h.segment.speaker != piece.speaker), spoken]",
        "self.previous = [*self.previous, spoken]")],
      [LONG]),
    M("plan", "a piece that made no frames is recorded as said (an empty context segment)",
      [("        if made:\n            spoken", "        if True:\n            spoken")],
      [ENDS_AT_ONCE, EOS]),
    # --- sampling.py ------------------------------------------------------------------------------------
    M("sampling", "default temperature 0.7 (csm.rs's) instead of the reference's 0.9",
      [('TEMPERATURE = Setting("temperature", 0.9, 0.0)', 'TEMPERATURE = Setting("temperature", 0.7, 0.0)')],
      [DEFAULTS]),
    M("sampling", "every piece samples with the caller's seed",
      [("seed = None if self.seed is None else self.seed + index", "seed = self.seed")],
      [PLAN_TOKENS, DIALOGUE]),
    M("sampling", "a piece's budget replaces the caller's max_audio_ms",
      [("budget_ms if self.max_audio_ms is None else\n                        self.max_audio_ms",
        "budget_ms")],
      [LONG]),
    # --- the server engine ------------------------------------------------------------------------------
    M("engine", "the end-of-speech frame is sent as audio",
      [("            if frame.any():  # an all-zero frame", "            if True:  # an all-zero frame")],
      [EOS]),
    M("engine", "a piece ends only at its frame budget",
      [("            if job.stream.done:\n", "            if job.stream.frames_left <= 0:\n")],
      [EOS]),
    M("engine", "a piece's frames are not cleared for the next piece",
      [("        job.made = []\n", "")],
      [LONG_SERVER]),
    M("engine", "the next piece does not hear the previous one",
      [("        job.context.said(job.pieces[job.piece], job.made)\n", "")],
      [LONG_SERVER]),
    M("engine", "every piece samples with the request's settings (piece 0's seed, no budget)",
      [("self.generator.start(prompt, piece.sampling, read_prompt=False, shared=shared)",
        "self.generator.start(prompt, job.spec.sampling, read_prompt=False, shared=shared)")],
      [LONG_SERVER]),
    M("engine", "frames are not counted (usage, the websocket's report)",
      [("                job.frames += 1\n", "")],
      [EOS]),
    M("engine", "the request's speaker is ignored",
      [("plan_pieces(((spec.speaker, text) for text in texts)", "plan_pieces(((0, text) for text in texts)")],
      [DEFAULTS]),
    M("engine", "the request's context segments are ignored",
      [("context = Context(self.generator, spec.context)", "context = Context(self.generator, ())")],
      ["tests/test_server_http.py::test_context_segments_as_codes_and_audio"]),
    M("engine", "a following sentence in the same voice does not hear the one before it",
      [(("                if successor.continues:\n"
          "                    successor.context.previous = list(job.context.previous)\n"), "")],
      [WS_CONTINUES]),
    # --- the request's defaults and mappings ---------------------------------------------------------------
    M("schemas", "a request without response_format gets wav",
      [('fmt = body.get("response_format", "mp3")', 'fmt = body.get("response_format", "wav")')],
      [DEFAULTS]),
    M("builtin_voices", "a built-in voice's prompt is speaker 0's whatever its name",
      [("                speaker = SPEAKERS[name]\n", "                speaker = 0\n")],
      [DEFAULTS]),
    M("builtin_voices", "marin and cedar swapped",
      [('"verse", "marin",\n         "cedar")', '"verse", "cedar",\n         "marin")')],
      [DEFAULTS]),
    M("settings", "eight streams by default",
      [("    max_streams: int = 4\n", "    max_streams: int = 8\n")],
      [DEFAULTS]),
    # --- the prompt's format ----------------------------------------------------------------------------
    M("model", "a space between the speaker tag and the text",
      [('self.tokenize(f"[{speaker}]{text}")', 'self.tokenize(f"[{speaker}] {text}")')],
      [PROMPT, PLAN_TOKENS]),
    M("model", "no EOS token after the text",
      [('self.tokenize(f"[{speaker}]{text}"), self.config.eos_id]', 'self.tokenize(f"[{speaker}]{text}")]')],
      [PROMPT, PLAN_TOKENS]),
    # --- converter/tensor_map.py ------------------------------------------------------------------------
    M("tensor_map", "original format: gate and up projections swapped",
      [('"ffn_gate": ("mlp.w1.weight"', '"ffn_gate": ("mlp.w3.weight"'),
       ('"ffn_up": ("mlp.w3.weight"', '"ffn_up": ("mlp.w1.weight"')],
      [ORIGINAL]),
    M("tensor_map", "transformers format: the two norms of a block swapped",
      [('"attn_norm": ("sa_norm.scale", "input_layernorm.weight")',
        '"attn_norm": ("sa_norm.scale", "post_attention_layernorm.weight")'),
       ('"ffn_norm": ("mlp_norm.scale", "post_attention_layernorm.weight")',
        '"ffn_norm": ("mlp_norm.scale", "input_layernorm.weight")')],
      [SHAPE]),
    M("tensor_map", "the depth decoder reads the backbone's audio embeddings (untied fine-tunes)",
      [('("audio_embeddings.weight", "depth_decoder.model.embed_tokens.weight")',
        '("audio_embeddings.weight", "backbone_model.embed_tokens.embed_audio_tokens.weight")')],
      [UNTIED]),
    # --- found untested by a mutation audit (2026-12-07), each now with its test ---------------------------
    M("generator", "llama.cpp's decoder: a stream that ends mid-batch shifts the next streams' inputs",
      [("self.frame_embeddings(codes[~ended])", "self.frame_embeddings(codes)")], [MID_BATCH_EOS]),
    M("generator", "the one-graph decoder: a stream that ends mid-batch shifts the next streams' inputs",
      [("self.depth.next_inputs(len(streams))[~ended])", "self.depth.next_inputs(len(streams)).copy())")],
      [MID_BATCH_EOS]),
    M("generator", "max_audio_ms between two frames' lengths rounded up",
      [("int(sampling.max_audio_ms // FRAME_MS)", "-int(-sampling.max_audio_ms // FRAME_MS)")], [ROUNDS_DOWN]),
    M("prompt_cache", "an evicted prompt's cells left in its sequence, under the next voice cached there",
      [("        self._remove(entry.seq)\n        self.entries.remove(entry)", "        self.entries.remove(entry)")],
      [REUSED_SEQUENCE]),
    M("pool", "streams beyond the rows share one codec state",
      [("            stream.own = self.codec.decoder_state(1)",
        "            stream.own = self.__dict__.setdefault('_spare', self.codec.decoder_state(1))")], [OWN_STATES]),
    M("atomic", "without hard links a name taken meanwhile is replaced",
      [("        if os.path.lexists(target):\n            raise FileExistsError",
        "        if False:\n            raise FileExistsError")], [NO_LINKS]),
    M("text", "text that runs on without a sentence end cut mid-word",
      [("    cut = cut if cut > 0 else limit", "    cut = limit")], [RUN_ON]),
    M("plan", "the context gives way when the piece just fits",
      [("        while heard and rows + piece.room > limit:", "        while heard and rows + piece.room >= limit:")],
      [FULL]),
    M("plan", "the caller's segments kept in the prompt cache after they gave way",
      [("whole = len(heard) >= len(self.given) and all(a is b for a, b in zip(self.given, heard))", "whole = True")],
      [FULL]),
    M("engine", "a request cancelled as it joins is never ended",
      [("            if cancelled:\n                self._end(job)\n", "")], [AS_IT_JOINS]),
    M("schemas", "an input of exactly OpenAI's 4096 characters refused",
      [("if len(text) > max_chars:", "if len(text) >= max_chars:")], [AT_LIMITS]),
    M("schemas", "32 context segments refused",
      [("len(context) > MAX_CONTEXT_SEGMENTS", "len(context) >= MAX_CONTEXT_SEGMENTS")], [AT_LIMITS]),
    M("services", "context audio encoded on every core by each request thread",
      [("        one_torch_thread()\n        return encode_context", "        return encode_context")],
      [ENCODE_THREADS]),
    M("services", "a voice upload encoded on every core by its request thread",
      [("        one_torch_thread()\n        return parse_voice", "        return parse_voice")], [ENCODE_THREADS]),
    M("wyoming", "a send to a Wyoming client that stopped reading waits for ever",
      [("await asyncio.wait_for(super().write_event(event), limits.STALLED_CLIENT_S)",
        "await super().write_event(event)")], [WYOMING_STALL]),
    # --- a concurrency review's findings (2026-12-07) ---------------------------------------------------------
    M("engine", "a voice the engine cannot forget stops the engine thread",
      [("            try:\n                self.generator.forget_voice(segments)\n            except Exception:",
        "            if True:\n                self.generator.forget_voice(segments)\n            if False:")],
      [f"{ENGINE_TESTS}::test_a_voice_prompt_the_engine_cannot_forget_stops_nothing"]),
    M("served_voices", "a voice saved for another model handed to the engine to forget",
      [("        return tts.usable_voice(name, voice)\n", "        return voice\n")], [FORGET_UNUSABLE]),
    M("routes", "a response that fails before its body began leaves its job speaking",
      [("    except BaseException:  # before its body began", "    except GeneratorExit:  # before its body began")],
      [BODY_NEVER_BEGAN]),
    M("engine", "a built-in voice's prompt counts as one more request against the queue",
      [("queued = sum(not (w.follower or w.own_work) for w in self.waiting)",
        "queued = sum(not w.follower for w in self.waiting)")],
      [f"{ENGINE_TESTS}::test_a_built_in_voice_made_for_a_request_takes_no_other_requests_place"]),
    M("engine", "a close as a request ends ends its follower twice",
      [("        if successor is not None and not queued:", "        if successor is not None and self._closing:")],
      [f"{ENGINE_TESTS}::test_a_close_as_a_request_ends_ends_its_follower_once"]),
    M("pool", "letting a stream go waits for a step's lock",
      [("        if self._lock.acquire(blocking=False):", "        if self._lock.acquire():")], [RELEASE_NEVER_WAITS]),
    M("speaker", "a Wyoming connection queues requests without end",
      [("        while len(self.queue) >= MAX_QUEUED and not self.task.done():", "        while False:")],
      [f"{WYOMING}::test_a_connection_queues_a_bounded_number_of_requests"]),
    M("speaker", "a Wyoming speaker that failed on a bug keeps its connection open",
      [("            self.hang_up()  # else", "            pass  # else")],
      [f"{WYOMING}::test_a_speaker_that_fails_on_a_bug_of_ours_hangs_up"]),
    M("speaker", "a text stream queued behind a client that leaves keeps its codec stream",
      [("        held = [self.spoken, *self.queue, *(item.stream for item in self.queue if item is not STOPPED)]",
        "        held = [self.spoken, *self.queue]")],
      [f"{WYOMING}::test_a_client_that_leaves_frees_the_codec_stream_of_a_text_stream_queued_behind"]),
    # --- the twenty-third session (2026-12-07) -------------------------------------------------------------------
    M("connection", "a websocket's sends from two threads interleave",
      [("        with self._lock:\n            self._sock.sendall(data)",
        "        if True:\n            self._sock.sendall(data)")],
      [f"{HOSTILE}::test_a_websockets_sends_from_two_threads_do_not_interleave"]),
    M("connection", "a websocket send that stalls part-way cuts its frame short",
      [("            self._sock.sendall(data)", "            self._sock.send(data)")],
      [f"{HOSTILE}::test_a_websocket_send_that_stalls_part_way_fails_rather_than_cutting_its_frame"]),
    M("app", "the server sends no pings",
      [('"ping_interval": settings.ws_ping_s or None}', '"ping_interval": None}')],
      ["tests/test_metrics.py::test_a_websocket_client_that_answers_no_ping_loses_its_session"]),
    M("ws_session", "a session's waiting text stops counting what was spoken",
      [("            self.queued_chars -= len(taken.text)", "            pass")], [WS_WAITING]),
    M("ws_session", "a speech message's input is not counted against the session's limit",
      [('        self.check_room(len(text or ""), "input")\n', "")], [WS_WAITING]),
    M("manifest", "a failed row's line names a file",
      [('            entry = {**entry, "path": None}\n', "")], [BAD_ROWS]),
    M("manifest", "a failed row keeps the file an earlier run made for its id",
      [("            target.unlink(missing_ok=True)\n", "            pass\n")], [BAD_ROWS]),
    M("served_voices", "a voice's cached prompt is dropped before it is deleted",
      [("    voice = _as_cached(tts, name)\n    yield", "    voice = _as_cached(tts, name)\n    if voice is not None:\n"
        "        engine.forget_voice(voice.segments)\n        voice = None\n    yield")], [REPLACED_VOICE]),
    M("ws_session", "a format change leaves the file being sent open (no done)",
      [("            self.queue.append(FLUSH)  # another format", "            pass  # another format")],
      ["tests/test_server_websocket.py::test_websocket_a_format_change_ends_the_file_being_sent_with_its_done"]),
    M("batch_run", "batch's worker settings are left to the workers (a traceback inside Ray)",
      [("    check_worker(threads, gpu_layers, streams, gpus, address)\n", "")],
      ["tests/test_batch.py::test_bad_settings_are_refused_before_anything_runs"]),
    M("convert", "an empty --output-dir is the default (the cache's model replaced)",
      [('        if getattr(args, option) == "":', '        if getattr(args, option) == "" and False:')],
      ["tests/test_convert.py::test_arguments_that_would_be_ignored_or_taken_for_the_default_are_refused"]),
    M("say", "audio written into a terminal",
      [('    if args.output == "-" and sys.stdout.isatty():', '    if False:')],
      ["tests/test_say.py::test_audio_to_a_terminal_is_refused_before_the_model_loads"]),
    M("read_ahead", "a stream made ahead counts as its producer's (its consumer's next call hangs)",
      [("    _producing.for_thread = for_thread\n", "")],
      ["tests/test_tts.py::test_with_read_ahead_an_unfinished_stream_of_this_thread_is_an_error_too"]),
    M("voices", "a voice is saved with a speaker it cannot be loaded with",
      [("        check_speaker(who)  # (what loading checks", "        pass  # (what loading checks")],
      ["tests/test_shared_voices.py::test_a_voice_is_saved_only_as_it_can_be_used"]),
    M("tts", "a lazy stream refuses a context too long only at its first frame",
      [("            heard.check_room(pieces[0])  # PromptTooLong now", "            pass  # PromptTooLong now")],
      [ROOM]),
    M("tts", "decode_stream checks its frames only once stacked",
      [("            if frame.shape != (k,):", "            if False:")],
      ["tests/test_tts.py::test_api_refuses_bad_arguments_clearly"]),
    M("errors", "OpenAI's clients retry what a retry cannot mend",
      [('        response.headers["x-should-retry"] = "false"\n', "        pass\n")],
      ["tests/test_server_voices.py::test_errors_a_retry_cannot_mend_tell_openai_clients_not_to_retry"]),
    M("errors", "a 405 without Allow",
      [("            response.headers[name] = value\n", "            pass\n")],
      ["tests/test_server_http.py::test_unknown_routes_and_methods_answer_in_openai_shape"]),
    M("streaming", "an SSE stream that fails part-way stops without a word",
      [('        yield sse({"type": "error", **generation_error(e).body()})', "        raise")],
      ["tests/test_server_http.py::test_an_sse_stream_that_fails_part_way_ends_with_an_error_event"]),
    M("speaker", "a refused synthesize leaves its connection open (Home Assistant waits for ever)",
      [("            raise Refused\n", "            pass\n")],
      ["tests/test_wyoming.py::test_a_synthesize_that_fails_before_its_first_audio_ends_the_connection"]),
    M("events", "what readline leaves of a long line is read as lines of its own",
      [("        dropped = e.consumed\n        while True:", "        dropped = e.consumed\n        while False:")],
      ["tests/test_wyoming.py::test_a_header_line_past_the_limit_is_one_error_and_the_next_event_is_read"]),
    M("text", "a numbered list's numbers are sentences of their own",
      [("    if line[start : match.start()].strip().isdecimal():", "    if False:")],
      ["tests/test_text.py::test_split_sentences"]),
    M("wyoming", "a voice's bare name is dropped unseen",
      [("    if isinstance(voice, str):  # a bare name", "    if False:  # a bare name")],
      ["tests/test_wyoming.py::test_a_voice_given_by_its_bare_name_is_that_voice"]),
]


def mutated(text: str, edits: list[tuple[str, str]]) -> str:
    for old, new in edits:
        count = text.count(old)
        if count != 1:
            raise ValueError(f"expected exactly one {old!r}, found {count}: retarget this mutation")
        text = text.replace(old, new)
    return text


def check(numbers: list[int]) -> list[str]:
    """What is wrong with these mutations (text not found, or not Python once applied); [] if nothing."""
    problems = []
    for n in numbers:
        m = MUTATIONS[n]
        path = ROOT / TARGETS[m.target]
        try:
            text = mutated(path.read_text(), m.edits)
            compile(text, str(path), "exec")
        except (OSError, ValueError, SyntaxError) as e:
            problems.append(f"[{n:2}] {m.target} ({TARGETS[m.target]}): {m.what}: {e}")
    return problems


class Broken(Exception):
    """pytest did not run the tests (a test named that does not exist, a usage or internal error): a run that
    says nothing of the mutation, where counting its exit status as a catch would count a catch."""


def run_tests(tests: list[str], stop_at_first: bool = True) -> tuple[list[str], float]:
    """(the tests that failed, as pytest names them, or ["timeout"]; seconds). Broken if pytest ran none."""
    start = time.monotonic()
    cmd = [sys.executable, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider", "-p", "no:warnings", *tests]
    if stop_at_first:
        cmd.insert(3, "-x")
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S,
                              check=False)
    except subprocess.TimeoutExpired:
        return ["timeout"], time.monotonic() - start
    if done.returncode not in (0, 1):  # 1: tests failed; 2-5: interrupted, internal, usage error, none collected
        raise Broken(f"pytest exit {done.returncode}: {(done.stdout + done.stderr).strip()[-600:]}")
    failed = [line.split()[1] for line in done.stdout.splitlines()  # not captured log lines ("ERROR    module:...")
              if line.startswith(("FAILED tests/", "ERROR tests/"))]
    if done.returncode != 0 and not failed:
        failed = [f"pytest exit {done.returncode}"]
    return failed, time.monotonic() - start


def run(numbers: list[int], stop_at_first: bool = True) -> int:
    results = []
    for n in numbers:
        m = MUTATIONS[n]
        path = ROOT / TARGETS[m.target]
        original = path.read_text()
        try:
            path.write_text(mutated(original, m.edits))
            failed, seconds = run_tests(m.tests, stop_at_first)
        except Broken as e:
            failed, seconds = [str(e)], 0.0
            verdict = "BROKEN"
        else:
            verdict = "caught" if failed else "SURVIVED"
        finally:
            path.write_text(original)
        print(f"[{n:2}] {verdict:8} {seconds:5.0f}s  {m.target}: {m.what}", flush=True)
        for name in failed:
            print(f"       {'' if verdict == 'BROKEN' else 'by '}{name}", flush=True)
        results.append((n, verdict))
    caught = sum(v == "caught" for _, v in results)
    print(f"\n{caught}/{len(results)} caught ({100 * caught / max(len(results), 1):.0f}%)")
    for n, v in results:
        if v != "caught":
            print(f"  {v}: [{n}] {MUTATIONS[n].target}: {MUTATIONS[n].what}")
    return 0 if caught == len(results) else 1


def baseline(numbers: list[int]) -> int:
    """Every test these mutations run, on the unmutated code: all must pass."""
    tests = list(dict.fromkeys(t for n in numbers for t in MUTATIONS[n].tests))
    try:
        failed, seconds = run_tests(tests, stop_at_first=False)
    except Broken as e:
        print(f"baseline: {e}")
        return 1
    print(f"baseline: {len(tests)} test selections, {seconds:.0f}s: " + ("all pass" if not failed else
                                                                          f"FAILED: {', '.join(failed)}"))
    return 1 if failed else 0


def main(argv: list[str]) -> int:
    if argv in (["--help"], ["-h"]):
        print(__doc__)
        return 0
    if argv == ["--list"]:
        for n, m in enumerate(MUTATIONS):
            print(f"[{n:2}] {m.target}: {m.what}  ({' '.join(m.tests)})")
        return 0
    every = "--every-test" in argv  # run each subset whole: every test that catches the mutation
    numbers = [a for a in argv if a not in ("--every-test", "--check", "--baseline")]
    if not all(a.isdigit() and int(a) < len(MUTATIONS) for a in numbers):
        print(f"usage: mutate.py [--check | --baseline | --every-test] [N ...], N from 0 to {len(MUTATIONS) - 1} "
              "(see --list, --help)", file=sys.stderr)
        return 2
    numbers = [int(a) for a in numbers]
    numbers = numbers or list(range(len(MUTATIONS)))
    problems = check(numbers)
    if problems:
        print("these mutations do not apply to the code (retarget them):", *problems, sep="\n  ", file=sys.stderr)
        return 2
    if "--check" in argv:
        print(f"all {len(numbers)} mutations apply")
        return 0
    if "--baseline" in argv:
        return baseline(numbers)
    return run(numbers, stop_at_first=not every)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
