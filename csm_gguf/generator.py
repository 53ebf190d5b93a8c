"""Frame generation: the backbone on llama.cpp, the depth decoder on ggml, any number of streams at once.

Each 80 ms frame is one backbone step (all active streams in one llama_decode) and the depth decoder's
frame: one ggml graph of its 32 positions with every codebook's head and draw (depth.py), or, with
CSM_GGUF_DECODER=llama, 31 llama.cpp steps (likewise batched) with the heads' draws between them. A single
`generate` call is simply a batch of one stream.
"""

from __future__ import annotations

import math
import numbers
import os
import sys
import threading
from collections import Counter
from dataclasses import dataclass
from functools import partial
from typing import Iterator, Sequence

import numpy as np

from . import prompt_cache
from .depth import DepthFrames
from .formats import FRAME_MS
from .heads import CodebookHeads, Draws, gpu_present, race_noise, top_k_bucket
from .llama import ContextOptions, EmbeddingModel, default_threads
from .model import CSMModel
from .prompt_cache import PromptCache
from .read_ahead import calling_thread
from .sampling import Sampling


class PromptTooLong(ValueError):
    pass


@dataclass
class Segment:
    """One utterance of context: what `speaker` said (`text`), with its audio codes (frames, 32)."""

    speaker: int
    text: str
    codes: np.ndarray | None = None


def check_speaker(who: object) -> None:
    if isinstance(who, bool) or not isinstance(who, numbers.Integral) or who < 0:
        raise ValueError(f"a speaker id is a whole number >= 0, got {who!r}")


# llama.cpp's limit of a context's sequences (LLAMA_MAX_SEQ), less those the prompt cache keeps its prompts in.
MAX_STREAMS = 256 - prompt_cache.ENTRIES


def check_options(n_threads: object, n_gpu_layers: object, max_streams: object,
                  names: dict[str, str] | None = None) -> None:
    """A generator's numbers, before anything loads: a ValueError naming the option and its range (llama.cpp
    and ggml took 0 streams for None, -1 for 16 EiB to allocate, and a bad thread count after the whole load).
    More threads than this process's cores only wait for each other. `names`: what the caller calls each
    argument (a command's flags, a server's variables)."""
    cores = default_threads()
    for name, value, least, most, meaning in (
            ("n_threads", n_threads, 0, cores, f"0 (all cores) to {cores}, the cores this process may use"),
            ("n_gpu_layers", n_gpu_layers, -1, 2**31 - 1, "-1 (all layers), 0 (none) or a number of layers"),
            ("max_streams", max_streams, 1, MAX_STREAMS, f"1 to {MAX_STREAMS}")):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not (
                least <= value and (most is None or value <= most)):
            raise ValueError(f"{(names or {}).get(name, name)} must be a whole number from {meaning}, got {value!r}")


def check_codes(codes, codebooks: int, n_codes: int, what: str = "codes") -> np.ndarray:
    """`codes` as int64 (frames, codebooks), or a ValueError that says which rule they break."""
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.shape[1] != codebooks:
        raise ValueError(f"{what} must have shape (frames, {codebooks}), got {codes.shape}")
    if codes.size and codes.dtype.kind not in "iu":
        raise ValueError(f"{what} must be whole numbers, got {codes.dtype}")
    if codes.size and (codes.min() < 0 or codes.max() >= n_codes):
        raise ValueError(f"{what} must lie in 0..{n_codes - 1}")
    return codes.astype(np.int64, copy=False)


class Sampler:
    """A stream's draw settings and its own random generator: top-k and temperature (0 is greedy: top-1), and
    the noise of each frame's draws, from the stream's seed.

    The draws themselves are made for all streams at once, in ggml graphs (heads.draw, in the depth
    decoder's frame graph or the heads' own between llama.cpp's steps): top-k, then an exponential race as in
    CSM's reference (the argmax of the temperature softmax's probabilities over Exp(1) numbers), which this
    noise runs. A stream's codes so depend on its seed and its logits alone, never on which streams share its
    steps."""

    # Beyond it the noise (temperature times Gumbel numbers, which reach about 100) could overflow float32;
    # the draw there is as flat as can be anyway.
    MAX_TEMPERATURE = 1e30

    def __init__(self, sampling: Sampling, n: int):
        greedy = sampling.temperature <= 0
        self.top_k = 1 if greedy else min(sampling.top_k, n)
        self.temperature = 0.0 if greedy else min(sampling.temperature, self.MAX_TEMPERATURE)
        self._rng = np.random.default_rng(sampling.seed)  # None: a fresh seed from the OS

    def noise(self, codebooks: int) -> np.ndarray:
        """(codebooks, top_k) float32: for one frame's draws, temperature times Gumbel numbers (-log of Exp(1)
        numbers) for the stream's top-k codes from the largest logit down; greedy: 0, no number drawn."""
        if self.temperature == 0:
            return np.zeros((codebooks, 1), np.float32)
        q = self._rng.standard_exponential((codebooks, self.top_k), dtype=np.float32)
        with np.errstate(divide="ignore"):  # q = 0 (never seen): -log 0 = inf, that code wins
            return np.float32(-self.temperature) * np.log(q)


@dataclass
class Stream:
    """One utterance being generated: its KV sequence, position, sampler and frame budget."""

    slot: int
    sampling: Sampling
    sampler: Sampler
    frames_left: int
    pos: int = 0  # position of the next backbone input (while the prompt is read: rows read so far)
    prompt: np.ndarray | None = None  # until `Generator.prefill` has read it all
    shared: int = 0  # its first rows are a voice prompt, kept in the prompt cache once read
    pending: np.ndarray | None = None  # the backbone's next input row
    done: bool = False

    def prompt_read(self) -> None:
        """The prompt is read but for its last row: that is the first step's input."""
        self.pending = np.array(self.prompt[-1], dtype=np.float32)
        self.prompt = None


class Generator:
    """Owns the backbone's llama.cpp context and the depth decoder (depth.py's graph, or a llama.cpp context).
    `generate` may be called from several threads (they take turns
    at each llama.cpp call); the lower-level calls (start, prefill, step, finish) are for one thread
    that drives every stream, like the server's engine thread.

    Voice prompts are read once (prompt_cache.py): `cached_prompts` of them (default prompt_cache.ENTRIES;
    0: none) stay in spare KV sequences of the backbone. `prompt_positions_read` counts the prompt
    positions the backbone has read."""

    def __init__(
        self,
        model: CSMModel,
        max_streams: int = 1,
        n_threads: int = 0,
        n_gpu_layers: int = 0,
        kv_type: str = "f16",
        cached_prompts: int | None = None,
    ):
        cfg = model.config
        self.model = model
        self.cfg = cfg
        self.max_streams = max_streams
        cached = prompt_cache.ENTRIES if cached_prompts is None else cached_prompts
        cache_positions = prompt_cache.POSITIONS if cached else 0
        self.backbone = EmbeddingModel(
            model.backbone_path,
            ContextOptions(
                # Cells for every stream's whole context, and for the cached prompts (a stream sharing a
                # cached prompt's cells uses that many fewer of its own).
                n_ctx=max_streams * cfg.backbone.max_seq_len + cache_positions,
                n_batch=max(512, max_streams),
                n_seq_max=max_streams + cached,  # sequences 0..max_streams-1 are the streams'
                n_threads=n_threads,
                n_gpu_layers=n_gpu_layers,
                kv_type=kv_type,
            ),
        )
        self._decoder_options = ContextOptions(
            n_ctx=max_streams * cfg.num_codebooks,
            n_batch=2 * max_streams,
            n_seq_max=max_streams,
            n_threads=n_threads,
            n_gpu_layers=n_gpu_layers,
            kv_type=kv_type,
            want_hidden=True,
        )
        self._decoder: EmbeddingModel | None = None
        self.free_slots = list(range(max_streams))
        # Held for each call into llama.cpp by `generate`, never across a yield. Reentrant: an abandoned
        # generator in a reference cycle may be finalized (and give its slot back) by a collection that
        # runs inside this thread's own step.
        self.lock = threading.RLock()
        self._slot_freed = threading.Condition(self.lock)
        self._generating: Counter[int] = Counter()  # unfinished `generate` streams per thread
        v, d = cfg.audio_vocab_size, cfg.decoder.n_embd
        self._proj = slice(v, v + d)  # backbone "logits" rows holding projection(h)
        self._offsets = np.arange(cfg.num_codebooks) * v
        self.layers_on_gpu = bool(n_gpu_layers) and gpu_present()  # the heads, the depth decoder and a server follow
        self.heads = self._heads(n_threads)
        self.depth = self._depth()
        if self.depth is None:
            self.decoder  # loaded now, not at the first frame
        self.decode_calls = 0
        self.prompt_positions_read = 0
        self.prompt_cache = PromptCache(max_streams, cached, cache_positions, self.backbone.copy_sequence,
                                        self.backbone.remove_sequence)

    @property
    def decoder(self) -> EmbeddingModel:
        """The depth decoder in llama.cpp: the frame's path with CSM_GGUF_DECODER=llama; otherwise loaded only if
        asked for (bench.py's llama.cpp floor and teacher-forced logits)."""
        if self._decoder is None:
            self._check_open()
            self._decoder = EmbeddingModel(self.model.decoder_path, self._decoder_options)
        return self._decoder

    def _heads(self, n_threads: int) -> CodebookHeads:
        """The codebook heads on the GPU when the model's layers are there (unless CSM_GGUF_HEADS_DEVICE=cpu),
        else on the CPU; on the CPU too when the GPU backend lacks an op of the draw."""
        model, d = self.model, self.cfg.decoder.n_embd
        # Set but empty (a compose or k8s template's blank) is unset, as for every other setting.
        chosen = os.environ.get("CSM_GGUF_HEADS_DEVICE") or ("gpu" if self.layers_on_gpu else "cpu")
        if chosen not in ("cpu", "gpu"):
            raise ValueError(f"CSM_GGUF_HEADS_DEVICE is cpu or gpu, got {chosen!r}")
        make = partial(CodebookHeads, model.audio_head, model.audio_head_type, d, self.max_streams,
                       n_threads or default_threads(), n_codes=model.n_codes)
        if chosen == "gpu":
            try:
                return make(device="gpu")
            except NotImplementedError as e:
                print(f"csm-gguf: codebook heads on the CPU: {e}", file=sys.stderr)
        return make(device="cpu")

    def _depth(self) -> DepthFrames | None:
        """The depth decoder's frame as one ggml graph where the heads run (depth.py), or None: 31 llama.cpp
        steps a frame. CSM_GGUF_DECODER=graph or llama chooses; by default the graph on the CPU, and llama.cpp
        where the layers are on a GPU (the graph has not yet been run on one: issue 26). Through llama.cpp
        also when the heads' backend lacks an op of the graph, or when the heads stay on the CPU while the
        layers are on a GPU (the graph would take the decoder's layers off the GPU)."""
        chosen = os.environ.get("CSM_GGUF_DECODER") or None  # set but empty: unset
        if chosen not in (None, "graph", "llama"):
            raise ValueError(f"CSM_GGUF_DECODER is graph or llama, got {chosen!r}")
        if (chosen or ("llama" if self.layers_on_gpu else "graph")) == "llama":
            return None
        if self.layers_on_gpu and not self.heads.on_gpu:
            print("csm-gguf: the depth decoder through llama.cpp, on the GPU: the codebook heads are on the CPU",
                  file=sys.stderr)
            return None
        try:
            return DepthFrames(self.model, self.heads, self.max_streams)
        except NotImplementedError as e:
            print(f"csm-gguf: the depth decoder through llama.cpp: {e}", file=sys.stderr)
            return None

    def prepare(self, top_k: int) -> None:
        """Build the depth decoder's graphs for 1 to max_streams streams at top-k `top_k` (as many as it keeps),
        so that a new number of streams does not wait for its graph at its first frame (CSM does at load)."""
        if self.depth is not None:
            self.depth.prepare(range(1, self.max_streams + 1), top_k)

    # --- prompt -------------------------------------------------------------------------------------
    def frame_embeddings(self, codes: np.ndarray) -> np.ndarray:
        """Backbone inputs of audio frames (n, 32): each the sum of its 32 codebook embeddings, (n, n_embd).
        All frames in one gather; the table is float16, and widening the rows first, then summing, takes
        half the time of a sum that widens as it goes (the same sums, in the same order)."""
        table = self.model.audio_embeddings
        rows = table[(self._offsets + codes).ravel()].astype(np.float32)
        return rows.reshape(len(codes), self.cfg.num_codebooks, table.shape[1]).sum(axis=1)

    def prompt_embeddings(self, text: str, speaker: int, context: Sequence[Segment] = ()) -> np.ndarray:
        """Context segments (text frames, audio frames, an all-zero EOS frame), then the text to speak."""
        check_speaker(speaker)
        return self.embed(self._heard(context), self.model.prompt_tokens(speaker, text))

    def context_embeddings(self, context: Sequence[Segment]) -> np.ndarray:
        """The rows of context segments alone, as they begin a prompt: a voice prompt as the prompt cache
        keeps it."""
        return self.embed(self._heard(context), [])

    def _heard(self, context: Sequence[Segment]) -> list[tuple[list[int], np.ndarray | None]]:
        """Each context segment's prompt tokens and codes, checked."""
        model, k = self.model, self.cfg.num_codebooks
        for seg in context:
            check_speaker(seg.speaker)
        return [(model.prompt_tokens(seg.speaker, seg.text),
                 None if seg.codes is None else check_codes(seg.codes, k, model.n_codes, "context codes"))
                for seg in context]

    def embed(self, heard: Sequence[tuple[list[int], np.ndarray | None]], prompt: list[int]) -> np.ndarray:
        """`prompt_embeddings` from tokens: each context segment's prompt tokens and codes (checked), then
        the prompt tokens of the text to speak (none: the context alone)."""
        parts = [np.zeros((0, self.cfg.backbone.n_embd), dtype=np.float32)]
        zero = np.zeros(self.cfg.num_codebooks, dtype=np.int64)
        for tokens, codes in heard:
            parts.append(self.model.text_embeddings.rows(tokens))
            if codes is not None:
                parts.append(self.frame_embeddings(np.concatenate([codes, zero[None]])))
        if prompt:
            parts.append(self.model.text_embeddings.rows(prompt))
        return np.concatenate(parts, axis=0)

    def prompt_rows(self, text: str, speaker: int, context: Sequence[Segment] = ()) -> int:
        """The length of `prompt_embeddings(text, speaker, context)` (the plan counts it from tokens)."""
        return len(self.prompt_embeddings(text, speaker, context))

    def context_rows(self, context: Sequence[Segment]) -> int:
        """The length of `context_embeddings(context)`."""
        return len(self.context_embeddings(context))

    def forget_voice(self, voice: Sequence[Segment]) -> int:
        """Drop the cached prompts that begin with `voice`'s segments (a voice deleted or replaced); returns
        how many."""
        if not voice:
            return 0
        rows = self.context_embeddings(voice)
        with self.lock:
            return self.prompt_cache.drop(rows)

    # --- streams ------------------------------------------------------------------------------------
    def start(self, prompt: np.ndarray, sampling: Sampling, read_prompt: bool = True, shared: int = 0) -> Stream:
        """Claim a sequence slot for a prompt and (unless `read_prompt` is False) run it through the
        backbone; `prefill` reads it in parts instead, so a server keeps other streams going meanwhile.

        The longest cached prompt that `prompt` begins with is not read again (prompt_cache.py); its first
        `shared` rows (a voice prompt: see plan.Context.prompt) are cached once read."""
        self._check_open()
        n = len(prompt)
        limit = self.cfg.backbone.max_seq_len
        if n >= limit:
            raise PromptTooLong(
                f"the prompt takes {n} positions but the model's context holds {limit}: "
                f"shorten the text or the context segments"
            )
        if not self.free_slots:
            raise RuntimeError("no free generation slot")
        frames = limit - n if sampling.max_audio_ms is None else min(int(sampling.max_audio_ms // FRAME_MS), limit - n)
        sampler = Sampler(sampling, self.model.n_codes)
        stream = Stream(slot=self.free_slots.pop(), sampling=sampling, sampler=sampler, frames_left=max(frames, 1),
                        prompt=prompt, shared=min(max(shared, 0), n - 1))
        try:
            self.backbone.remove_sequence(stream.slot)
            self._reuse(stream)
            if read_prompt:
                self.prefill([stream])
        except BaseException:  # a failed read (or Ctrl-C during a long prompt) must not keep the slot
            self.finish(stream)
            raise
        return stream

    def prefill(self, streams: Sequence[Stream], max_rows: int | None = None) -> None:
        """Run up to `max_rows` more prompt rows in all (default: all of them) of `streams`, in their order,
        through the backbone: all of a prompt but its last row, which is its stream's first step's input. A
        stream whose prompt is read (its `prompt` None) can step. Rows of several streams share a llama_decode,
        up to the backbone's batch: prompts that arrive together take a few decodes, not one each."""
        self._check_open()
        left = math.inf if max_rows is None else max_rows
        batch: list[tuple[Stream, int, int]] = []  # each stream's rows (start, stop) in the decode being filled
        filled = 0  # rows in it
        for stream in streams:
            if stream.prompt is None:
                continue
            if stream.pos < stream.shared:  # another stream in this voice may have cached it meanwhile
                self._reuse(stream)
            n = len(stream.prompt) - 1
            if stream.pos == n:  # nothing left to read (a one-row prompt)
                stream.prompt_read()
                continue
            while stream.pos < n and left > 0:
                start = stream.pos
                stop = min(n, start + self.backbone.n_batch - filled, start + left)
                if start < stream.shared < stop:  # the voice prompt's cells are complete at its end: keep them
                    stop = stream.shared
                batch.append((stream, start, stop))
                stream.pos, left, filled = stop, left - (stop - start), filled + stop - start
                if filled == self.backbone.n_batch or stop == stream.shared:
                    self._read(batch, filled)
                    batch, filled = [], 0
        self._read(batch, filled)

    def _read(self, batch: list[tuple[Stream, int, int]], rows: int) -> None:
        """One llama_decode of the `rows` prompt rows in `batch`; then each voice prompt read to its end is cached,
        and each stream whose prompt is read can step."""
        if not batch:
            return
        bb, m = self.backbone, 0
        seq_ids = np.empty(rows, np.int32)
        for stream, start, stop in batch:
            part = slice(m, m + stop - start)
            bb.embd[part] = stream.prompt[start:stop]
            bb.pos[part] = np.arange(start, stop)
            seq_ids[part] = stream.slot
            m = part.stop
        bb.output[:m] = 0
        bb.set_seq_ids(seq_ids)
        bb.decode(m)
        self.decode_calls += 1
        self.prompt_positions_read += m
        for stream, _, stop in batch:
            if stop == stream.shared:
                self.prompt_cache.add(stream.slot, stream.prompt[:stop])
            if stop == len(stream.prompt) - 1:
                stream.prompt_read()

    def _reuse(self, stream: Stream) -> None:
        """Share the longest cached prompt that the stream's prompt begins with, if it holds more than the
        stream has read (never the last row: it is the first step's input)."""
        hit = self.prompt_cache.longest(stream.prompt, len(stream.prompt) - 1)
        if hit is not None and len(hit.rows) > stream.pos:
            self.backbone.remove_sequence(stream.slot)
            stream.pos = self.prompt_cache.share(hit, stream.slot)

    def finish(self, stream: Stream) -> None:
        """Release a stream's slot (finished or abandoned) for the next request."""
        if stream.slot not in self.free_slots:
            self.backbone.remove_sequence(stream.slot)
            self.free_slots.append(stream.slot)
        stream.done = True

    def step(self, streams: Sequence[Stream]) -> np.ndarray:
        """One frame for every stream: codes of shape (len(streams), 32). Finished streams are marked done."""
        self._check_open()
        codes = self._draw_frame(streams)
        ended = ~codes.any(axis=1)  # the all-zero frame ends speech; it is neither decoded nor fed back
        # The next inputs: made in the depth decoder's graph, or here.
        inputs = iter(self.frame_embeddings(codes[~ended]) if self.depth is None
                      else self.depth.next_inputs(len(streams))[~ended])
        for j, st in enumerate(streams):
            st.frames_left -= 1
            if ended[j]:
                st.done = True
                continue
            st.pos += 1
            st.pending = next(inputs)
            if st.frames_left <= 0 or st.pos >= self.cfg.backbone.max_seq_len:
                st.done = True
        return codes

    def _draw_frame(self, streams: Sequence[Stream]) -> np.ndarray:
        """The backbone's step and the depth decoder's frame, with every codebook's draw: codes (s, 32)."""
        s, n = len(streams), self.model.n_codes
        slots = np.fromiter((st.slot for st in streams), dtype=np.int32, count=s)
        bb = self.backbone
        bb.embd[:s] = [st.pending for st in streams]
        bb.pos[:s] = [st.pos for st in streams]
        bb.output[:s] = 1
        bb.set_seq_ids(slots)
        bb.decode(s)
        # Drawn while a GPU runs the backbone's step (llama_decode returns before it ends; the logits wait for
        # it): about 11 us a stream.
        k = top_k_bucket(max(st.sampler.top_k for st in streams), n)
        noise = race_noise([st.sampler.noise(self.cfg.num_codebooks) for st in streams], k)  # (s, 32, k)
        out = bb.logits(s)
        self.decode_calls += self.calls_per_frame
        if self.depth is not None:
            return self.depth.frame(out[:, :n], out[:, self._proj], noise).astype(np.int64)
        return self._decoder_steps(out, slots, noise, self.heads.rows(s, k))

    @property
    def calls_per_frame(self) -> int:
        """Calls into llama.cpp or ggml a frame step makes (for any number of streams): the backbone's, then the
        depth decoder's graph or its 31 llama.cpp steps."""
        return 2 if self.depth is not None else self.cfg.num_codebooks

    def _decoder_steps(self, out: np.ndarray, slots: np.ndarray, noise: np.ndarray, draws: Draws) -> np.ndarray:
        """The depth decoder through llama.cpp, one position of every stream at a time, drawing each codebook with
        the heads: codes (s, 32) from the backbone's outputs `out`."""
        cfg, model = self.cfg, self.model
        s, v, n_codes, k = len(slots), cfg.audio_vocab_size, model.n_codes, cfg.num_codebooks
        codes = np.zeros((s, k), dtype=np.int64)
        dec = self.decoder
        dec.clear()
        self.heads.first[:s] = out[:, :n_codes]
        dec.embd[0 : 2 * s : 2] = out[:, self._proj]
        codes[:, 0] = draws.first(noise[:, 0])
        dec.embd[1 : 2 * s : 2] = model.decoder_inputs[codes[:, 0]]
        dec.pos[: 2 * s] = np.tile((0, 1), s)
        dec.output[: 2 * s] = 1  # the later one-token-per-stream steps reuse these flags
        dec.set_seq_ids(np.repeat(slots, 2))
        dec.decode(2 * s)
        self._draw_codebook(draws, noise, codes, 1, stride=2)  # each stream's second row

        dec.set_seq_ids(slots)
        for i in range(2, k):
            dec.embd[:s] = model.decoder_inputs[(i - 1) * v + codes[:, i - 1]]  # all streams' rows at once
            dec.pos[:s] = i
            dec.decode(s)
            self._draw_codebook(draws, noise, codes, i)
        return codes

    def _draw_codebook(self, draws: Draws, noise: np.ndarray, codes: np.ndarray, i: int, stride: int = 1) -> None:
        """Codebook i for every stream, from the decoder output of stream j at row stride * j + stride - 1."""
        self.decoder.copy_hidden_rows(stride - 1, len(codes), self.heads.x_address, stride)
        codes[:, i] = draws.head(i - 1, noise[:, i])

    # --- one utterance ------------------------------------------------------------------------------
    def generate(
        self, text: str, speaker: int = 0, context: Sequence[Segment] = (), sampling: Sampling = Sampling(),
        shared: int = 0,
    ) -> Iterator[np.ndarray]:
        """Yield frames of 32 codes as they are made, until the end-of-speech frame or the budget. The
        prompt's first `shared` rows are a voice prompt, cached once read (see `start`).

        Each call holds one of the `max_streams` slots until it ends (or its generator is closed): calls
        from other threads wait for a free one; in the thread that holds them all, a new call raises."""
        yield from self.speak(self.prompt_embeddings(text, speaker, context), sampling, shared)

    def speak(self, prompt: np.ndarray, sampling: Sampling, shared: int = 0) -> Iterator[np.ndarray]:
        """`generate` from prompt embeddings (`prompt_embeddings`, `embed`)."""
        me = calling_thread()  # a read-ahead's producer calls for its consumer
        with self.lock:
            while not self.free_slots and self.backbone.ctx:
                if self._generating[me]:  # waiting for our own unfinished generator would never end
                    raise RuntimeError(
                        f"all {self.max_streams} generation slots are held by unfinished streams of this thread "
                        "(a stream() or frames() not read to its end): close them first, or make the CSM with "
                        "more max_streams")
                self._slot_freed.wait()
            stream = self.start(prompt, sampling, shared=shared)
            self._generating[me] += 1
        try:
            while True:
                with self.lock:
                    if stream.done:
                        break
                    frame = self.step([stream])[0]
                if not frame.any():
                    break
                yield frame
        finally:
            with self.lock:
                self.finish(stream)
                self._generating[me] -= 1
                self._slot_freed.notify()

    def _check_open(self) -> None:
        if not self.backbone.ctx:  # llama.cpp would read freed memory: a segfault, not an error
            raise RuntimeError("the model is closed: create a new CSM to speak again")

    def close(self) -> None:
        with self.lock:  # not during another thread's step: it would run on freed memory
            self.backbone.close()
            if self._decoder is not None:
                self._decoder.close()
            if self.depth is not None:
                self.depth.close()
            self.heads.close()
            self._slot_freed.notify_all()  # waiting calls find the model closed
