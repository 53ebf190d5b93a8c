"""A small mutation pass: plausible bugs put into the code one at a time; does a fast subset of the tests
catch each? Not collected by pytest (no test_ prefix). From the repository root:

    PYTHONPATH=$PWD python tests/mutate.py            # every mutation; a report at the end
    PYTHONPATH=$PWD python tests/mutate.py 3 7        # only these (numbers as --list shows them)
    PYTHONPATH=$PWD python tests/mutate.py --list
    PYTHONPATH=$PWD python tests/mutate.py --every-test 5    # not stopping at the first failing test

Each mutation replaces exact text (each `old` must occur exactly once in its file: a refactor that moves
or rewrites the line makes the script say so, rather than test the unmutated code). The file is restored
after each run, also on Ctrl-C. A mutation counts as caught when its tests fail (or time out).
Files are named in TARGETS: retarget there when modules move (the server engine is moving into
csm_gguf/server/engine.py).
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def first_of(*paths: str) -> str:
    """The first of these files that exists (modules that are moving: their new places first)."""
    return next((p for p in paths if (ROOT / p).exists()), paths[-1])


TARGETS = {
    "generator": "csm_gguf/generator.py",
    "tts": "csm_gguf/tts.py",
    "engine": first_of("csm_gguf/server/engine.py", "csm_gguf/server_engine.py"),
    "tensor_map": "converter/tensor_map.py",
    # beyond the four the pass is about: what pins the defaults and reads RoPE
    "speech_request": first_of("csm_gguf/server/speech_request.py", "csm_gguf/server/request.py",
                               "csm_gguf/speech_request.py"),
    "web": first_of("csm_gguf/server/web.py", "csm_gguf/server/app.py", "csm_gguf/web.py"),
    "voices": "csm_gguf/voices.py",
    "checkpoint": "converter/checkpoint.py",
}
# Fast subsets, the likeliest to fail first (pytest runs with -x).
SHAPE = "tests/test_real_model_shape.py::test_greedy_codes_equal_transformers_with_a_wider_vocabulary"
PROMPT = "tests/test_real_model_shape.py::test_prompt_equals_transformers_embeddings_of_the_llama3_encoding"
ORIGINAL = "tests/test_real_model_shape.py::test_original_format_gives_the_same_codes"
EOS = "tests/test_end_of_speech.py"
LONG = "tests/test_long_text_context.py"
DEFAULTS = "tests/test_defaults.py"
DIALOGUE = "tests/test_say.py::test_dialogue_turns_hear_each_speakers_last_piece"
BUDGET = "tests/test_defaults.py::test_a_piece_s_budget_without_max_audio_ms"
UNTIED = "tests/test_engine.py::test_untied_decoder_embeddings_are_used"
TIMEOUT_S = 900


@dataclass
class Mutation:
    target: str  # a key of TARGETS
    what: str
    edits: list[tuple[str, str]]  # (old, new): each old occurs exactly once
    tests: list[str]


M = Mutation
GREEDY_EOS = f"{EOS}::test_the_step_that_draws_it_ends_the_stream_without_feeding_it_back"
MUTATIONS = [
    # --- generator.py -----------------------------------------------------------------------------------
    M("generator", "audio embedding rows strided by the codec's size, not the vocabulary's",
      [("self._offsets = np.arange(cfg.num_codebooks) * v",
        "self._offsets = np.arange(cfg.num_codebooks) * model.n_codes")],
      [SHAPE]),
    M("generator", "decoder input rows strided by the codec's size",
      [("model.decoder_inputs[(i - 1) * v + codes[j, i - 1]]",
        "model.decoder_inputs[(i - 1) * n_codes + codes[j, i - 1]]")],
      [SHAPE]),
    M("generator", "projection(h) read from the rows after the codec's codes, not the vocabulary's",
      [("self._proj = slice(v, v + d)", "self._proj = slice(model.n_codes, model.n_codes + d)")],
      [SHAPE]),
    M("generator", "codebook 0 sampled over the whole vocabulary (ids the codec cannot decode)",
      [("c0 = st.sampler(out[:n_codes])", "c0 = st.sampler(out[:v])")],
      [SHAPE]),
    M("generator", "codebooks 1..31 sampled over the whole vocabulary",
      [("codes[j, i] = st.sampler(logits[j, :n_codes])", "codes[j, i] = st.sampler(logits[j])")],
      [SHAPE]),
    M("generator", "the end-of-speech frame does not mark the stream done",
      [("                st.done = True\n                continue", "                continue")],
      [GREEDY_EOS, EOS]),
    M("generator", "the end-of-speech frame is fed back as the next input",
      [("                st.done = True\n                continue", "                st.done = True")],
      [GREEDY_EOS]),
    M("generator", "generate passes the end-of-speech frame on",
      [("                if not frame.any():\n                    break\n", "")],
      [EOS]),
    M("generator", "no all-zero frame after a context segment's audio",
      [(" + [self.frame_embedding(zero)]", "")],
      [PROMPT]),
    M("generator", "context segments spoken as the current speaker",
      [("self.model.text_embeddings.rows(self.model.prompt_tokens(seg.speaker, seg.text))",
        "self.model.text_embeddings.rows(self.model.prompt_tokens(speaker, seg.text))")],
      [PROMPT]),
    M("generator", "one frame more than the budget",
      [("if st.frames_left <= 0 or", "if st.frames_left < 0 or")],
      [LONG]),
    M("generator", "the prompt's last row read twice (prefill reads all of it)",
      [("        n = len(prompt) - 1\n", "        n = len(prompt)\n")],
      [SHAPE]),
    M("generator", "depth decoder positions off by one",
      [("            dec.pos[:s] = i\n", "            dec.pos[:s] = i - 1\n")],
      [SHAPE]),
    # --- tts.py -----------------------------------------------------------------------------------------
    M("tts", "the previous piece's context loses its last frame",
      [("Segment(speaker, piece, np.stack(made))", "Segment(speaker, piece, np.stack(made[:-1]))")],
      [LONG]),
    M("tts", "a long text's pieces hear every earlier piece, not the last",
      [("[*(seg for seg in previous if seg.speaker != speaker), Segment(", "[*previous, Segment(")],
      [LONG]),
    M("tts", "every piece samples with the same seed",
      [("piece_seed = seed + index if whole else seed", "piece_seed = seed")],
      [f"{LONG}::test_server_engine", DIALOGUE]),
    M("tts", "the next piece does not hear the previous one",
      [("            previous = spoken_context(previous, speaker, piece, made)\n", "")],
      [LONG]),
    M("tts", "frames' default temperature 0.7 (csm.rs's) instead of the reference's 0.9",
      [("        temperature: float = 0.9,\n        top_k: int = 50,\n        seed: int | None = None,\n"
        "        max_audio_ms: float | None = None,\n        progress: bool = False,\n    ) -> Iterator[np.ndarray]:\n"
        "        \"\"\"Codes (32,)",
        "        temperature: float = 0.7,\n        top_k: int = 50,\n        seed: int | None = None,\n"
        "        max_audio_ms: float | None = None,\n        progress: bool = False,\n    ) -> Iterator[np.ndarray]:\n"
        "        \"\"\"Codes (32,)")],
      [DEFAULTS]),
    M("tts", "a piece's budget is the smaller of the floor and the text's share",
      [("return max(MIN_FRAMES, FRAMES_PER_TOKEN * tokens) * FRAME_MS",
        "return min(MIN_FRAMES, FRAMES_PER_TOKEN * tokens) * FRAME_MS")],
      [BUDGET]),
    M("tts", "chunks of chunk_frames + 1 frames",
      [("            if len(pending) >= chunk_frames:", "            if len(pending) > chunk_frames:")],
      [f"{EOS}::test_csm_generate_and_stream_end_there"]),
    M("tts", "the caller's context after what was just said",
      [("segments = [*context, *previous]", "segments = [*previous, *context]")],
      [DIALOGUE]),
    # --- the server engine ------------------------------------------------------------------------------
    M("engine", "the end-of-speech frame is sent as audio",
      [("            if frame.any():  # an all-zero frame", "            if True:  # an all-zero frame")],
      [EOS]),
    M("engine", "a piece ends only at its frame budget",
      [("            if job.stream.done:\n", "            if job.stream.frames_left <= 0:\n")],
      [EOS]),
    M("engine", "a piece's frames are not cleared for the next piece",
      [("        job.made = []\n", "")],
      [f"{LONG}::test_server_engine"]),
    M("engine", "the next piece does not hear the previous one",
      [("        job.previous = spoken_context(job.previous, job.spec.speaker, job.pieces[job.piece], job.made)\n",
        "")],
      [f"{LONG}::test_server_engine"]),
    M("engine", "every piece samples with piece 0's seed",
      [("piece_sampling(piece, job.piece, spec.temperature", "piece_sampling(piece, 0, spec.temperature")],
      [f"{LONG}::test_server_engine"]),
    M("engine", "the request's top_k is ignored",
      [("spec.temperature, spec.top_k, spec.seed", "spec.temperature, 50, spec.seed")],
      [DEFAULTS]),
    M("engine", "frames are not counted (usage, the websocket's report)",
      [("                job.frames += 1\n", "")],
      [EOS]),
    M("engine", "SpeechJob's default temperature 1.0",
      [("    temperature: float = 0.9\n", "    temperature: float = 1.0\n")],
      [DEFAULTS]),
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
    M("tensor_map", "original format: the decoder's output norm read as the backbone's name",
      [('OUTPUT_NORM: tuple[str, str] = ("norm.scale", "norm.weight")',
        'OUTPUT_NORM: tuple[str, str] = ("norm.weight", "norm.weight")')],
      [ORIGINAL]),
    # --- beyond the four: defaults and RoPE ---------------------------------------------------------------
    M("speech_request", "a request without response_format gets wav",
      [('fmt = body.get("response_format", "mp3")', 'fmt = body.get("response_format", "wav")')],
      [DEFAULTS]),
    M("speech_request", "a request without temperature gets 1.0",
      [('_number(body, "temperature", 0.9,', '_number(body, "temperature", 1.0,')],
      [DEFAULTS]),
    M("voices", "marin and cedar swapped",
      [('"marin",\n         "cedar")', '"cedar",\n         "marin")')],
      [DEFAULTS]),
    M("web", "eight streams by default",
      [("    max_streams: int = 4\n", "    max_streams: int = 8\n")],
      [DEFAULTS]),
    M("checkpoint", "transformers' RoPE read with torchtune's original context (8192), not the config's",
      [('original_context=rope["original_max_position_embeddings"],\n', "")],
      [SHAPE]),
]


def mutated(text: str, edits: list[tuple[str, str]]) -> str:
    for old, new in edits:
        count = text.count(old)
        if count != 1:
            raise ValueError(f"expected exactly one {old!r}, found {count}: retarget this mutation")
        text = text.replace(old, new)
    return text


def run_tests(tests: list[str], stop_at_first: bool = True) -> tuple[list[str], float]:
    """(the tests that failed, as pytest names them, or ["timeout"]; seconds)."""
    start = time.monotonic()
    cmd = [sys.executable, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider", "-p", "no:warnings", *tests]
    if stop_at_first:
        cmd.insert(3, "-x")
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return ["timeout"], time.monotonic() - start
    failed = [line.split()[1] for line in done.stdout.splitlines() if line.startswith(("FAILED ", "ERROR "))]
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
            text = mutated(original, m.edits)
            compile(text, str(path), "exec")
        except (ValueError, SyntaxError) as e:
            print(f"[{n:2}] INVALID {m.target}: {m.what}: {e}", flush=True)
            results.append((n, "invalid"))
            continue
        try:
            path.write_text(text)
            failed, seconds = run_tests(m.tests, stop_at_first)
        finally:
            path.write_text(original)
        verdict = "caught" if failed else "SURVIVED"
        print(f"[{n:2}] {verdict:8} {seconds:5.0f}s  {m.target}: {m.what}", flush=True)
        for name in failed:
            print(f"       by {name}", flush=True)
        results.append((n, verdict))
    caught = sum(v == "caught" for _, v in results)
    valid = sum(v != "invalid" for _, v in results)
    print(f"\n{caught}/{valid} caught ({100 * caught / max(valid, 1):.0f}%)")
    for n, v in results:
        if v != "caught":
            print(f"  {v}: [{n}] {MUTATIONS[n].target}: {MUTATIONS[n].what}")
    return 0 if caught == valid else 1


def main(argv: list[str]) -> int:
    if argv == ["--list"]:
        for n, m in enumerate(MUTATIONS):
            print(f"[{n:2}] {m.target}: {m.what}")
        return 0
    every = "--every-test" in argv  # run each subset whole: every test that catches the mutation
    numbers = [int(a) for a in argv if a != "--every-test"]
    return run(numbers or list(range(len(MUTATIONS))), stop_at_first=not every)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
