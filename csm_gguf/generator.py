"""Frame generation: the backbone and the depth decoder on llama.cpp, any number of streams at once.

Each 80 ms frame is one backbone step (all active streams in one llama_decode) and 31 depth-decoder
steps (likewise batched). A single `generate` call is simply a batch of one stream.
"""

from __future__ import annotations

import ctypes
import numbers
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Iterator, Sequence

import llama_cpp as L
import numpy as np

from . import prompt_cache
from .formats import FRAME_MS
from .heads import CodebookHeads
from .llama import ContextOptions, EmbeddingModel, default_threads
from .model import CSMModel
from .prompt_cache import PromptCache
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
    """Top-k, then a draw from the temperature softmax (the reference's order), by llama.cpp's sampler
    chain with its own seeded generator; temperature 0 is argmax. One per stream, over `n` logits.

    C rather than numpy because every draw comes right after a decoder step has emptied the caches,
    where each numpy call costs several times its usual time: 37 us a draw here against 90."""

    def __init__(self, sampling: Sampling, n: int):
        self.greedy = sampling.temperature <= 0
        self._chain = None
        if self.greedy:
            return
        self._chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
        # llama.cpp seeds are 32-bit and LLAMA_DEFAULT_SEED (0xFFFFFFFF) means "draw a random seed": fold
        # every seed into 0..0xFFFFFFFE, so each one is reproducible (seeds below 2**32 - 1 stay as they are).
        seed = L.LLAMA_DEFAULT_SEED if sampling.seed is None else sampling.seed % L.LLAMA_DEFAULT_SEED
        for stage in (L.llama_sampler_init_top_k(sampling.top_k), L.llama_sampler_init_temp(sampling.temperature),
                      L.llama_sampler_init_dist(seed)):
            L.llama_sampler_chain_add(self._chain, stage)  # the chain owns its stages
        self._data = (L.llama_token_data * n)()
        self._rows = np.ctypeslib.as_array(self._data)  # fields id, logit, p
        self._ids = np.arange(n, dtype=np.int32)
        self._candidates = L.llama_token_data_array(data=self._data, size=n, selected=-1, sorted=False)
        self._candidates_ref = ctypes.byref(self._candidates)

    def __call__(self, logits: np.ndarray) -> int:
        if self.greedy:
            return int(np.argmax(logits))
        rows, candidates = self._rows, self._candidates
        rows["id"] = self._ids  # the chain reorders the candidates in place
        rows["logit"] = logits
        candidates.size, candidates.selected, candidates.sorted = len(self._ids), -1, False
        L.llama_sampler_apply(self._chain, self._candidates_ref)
        return int(rows["id"][candidates.selected])

    def close(self) -> None:
        if self._chain:
            L.llama_sampler_free(self._chain)
            self._chain = None

    def __del__(self) -> None:
        self.close()


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


class Generator:
    """Owns the two llama.cpp contexts. `generate` may be called from several threads (they take turns
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
        self.decoder = EmbeddingModel(
            model.decoder_path,
            ContextOptions(
                n_ctx=max_streams * cfg.num_codebooks,
                n_batch=2 * max_streams,
                n_seq_max=max_streams,
                n_threads=n_threads,
                n_gpu_layers=n_gpu_layers,
                kv_type=kv_type,
                want_hidden=True,
            ),
        )
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
        self._rows = np.empty(cfg.num_codebooks, dtype=np.int64)
        self.heads = CodebookHeads(model.audio_head, model.audio_head_type, d, max_streams,
                                   n_threads or default_threads())
        self.decode_calls = 0
        self.prompt_positions_read = 0
        self.prompt_cache = PromptCache(max_streams, cached, cache_positions, self.backbone.copy_sequence,
                                        self.backbone.remove_sequence)

    # --- prompt -------------------------------------------------------------------------------------
    def frame_embedding(self, codes: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Backbone input of an audio frame: the sum of its 32 codebook embeddings."""
        np.add(self._offsets, codes, out=self._rows)
        return np.sum(self.model.audio_embeddings[self._rows], axis=0, dtype=np.float32, out=out)

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
                parts.append(np.stack([self.frame_embedding(c) for c in codes] + [self.frame_embedding(zero)]))
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
                self.prefill(stream)
        except BaseException:  # a failed read (or Ctrl-C during a long prompt) must not keep the slot
            self.finish(stream)
            raise
        return stream

    def prefill(self, stream: Stream, max_rows: int | None = None) -> bool:
        """Run up to `max_rows` more prompt rows (all but the last, which is the first step's input)
        through the backbone. True once the whole prompt is read and the stream can step."""
        prompt = stream.prompt
        if prompt is None:
            return True
        self._check_open()
        if stream.pos < stream.shared:  # another stream in this voice may have cached it meanwhile
            self._reuse(stream)
        n = len(prompt) - 1
        end = n if max_rows is None else min(n, stream.pos + max_rows)
        bb = self.backbone
        while stream.pos < end:
            start = stream.pos
            stop = min(end, start + bb.n_batch)
            if start < stream.shared < stop:  # the voice prompt's cells are complete at its end: keep them
                stop = stream.shared
            m = stop - start
            bb.embd[:m] = prompt[start:stop]
            bb.pos[:m] = np.arange(start, stop)
            bb.output[:m] = 0
            bb.set_seq_ids(np.full(m, stream.slot, dtype=np.int32))
            bb.decode(m)
            self.decode_calls += 1
            self.prompt_positions_read += m
            stream.pos = stop
            if stop == stream.shared:
                self.prompt_cache.add(stream.slot, prompt[:stop])
        if end < n:
            return False
        stream.pending = np.array(prompt[-1], dtype=np.float32)
        stream.prompt = None
        return True

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
        stream.sampler.close()
        stream.done = True

    def step(self, streams: Sequence[Stream]) -> np.ndarray:
        """One frame for every stream: codes of shape (len(streams), 32). Finished streams are marked done."""
        self._check_open()
        s = len(streams)
        cfg, model = self.cfg, self.model
        v, n_codes, k = cfg.audio_vocab_size, model.n_codes, cfg.num_codebooks
        codes = np.zeros((s, k), dtype=np.int64)

        slots = np.fromiter((st.slot for st in streams), dtype=np.int32, count=s)
        bb = self.backbone
        for j, st in enumerate(streams):
            bb.embd[j] = st.pending
            bb.pos[j] = st.pos
        bb.output[:s] = 1
        bb.set_seq_ids(slots)
        bb.decode(s)

        dec = self.decoder
        dec.clear()
        for j, st in enumerate(streams):
            out = bb.logits(j)
            c0 = st.sampler(out[:n_codes])
            codes[j, 0] = c0
            dec.embd[2 * j] = out[self._proj]
            dec.embd[2 * j + 1] = model.decoder_inputs[c0]
            dec.pos[2 * j : 2 * j + 2] = (0, 1)
        dec.output[: 2 * s] = 1  # the later one-token-per-stream steps reuse these flags
        dec.set_seq_ids(np.repeat(slots, 2))
        dec.decode(2 * s)
        self._sample_codebook(streams, codes, 1, stride=2)  # each stream's second row

        dec.set_seq_ids(slots)
        for i in range(2, k):
            dec.embd[:s] = model.decoder_inputs[(i - 1) * v + codes[:s, i - 1]]  # all streams' rows at once
            dec.pos[:s] = i
            dec.decode(s)
            self._sample_codebook(streams, codes, i)
        self.decode_calls += k

        for j, st in enumerate(streams):
            st.frames_left -= 1
            if not codes[j].any():  # the all-zero frame ends speech; it is neither decoded nor fed back
                st.done = True
                continue
            st.pos += 1
            self.frame_embedding(codes[j], out=st.pending)
            if st.frames_left <= 0 or st.pos >= cfg.backbone.max_seq_len:
                st.done = True
        return codes

    def _sample_codebook(self, streams: Sequence[Stream], codes: np.ndarray, i: int, stride: int = 1) -> None:
        """Codebook i for every stream, from the decoder output of stream j at row stride * j + stride - 1."""
        s = len(streams)
        heads = self.heads
        for j in range(s):
            self.decoder.copy_hidden(stride * j + stride - 1, heads.x_address + j * heads.x_row_bytes)
        logits = heads.logits(i - 1, s)
        n_codes = self.model.n_codes
        for j, st in enumerate(streams):
            codes[j, i] = st.sampler(logits[j, :n_codes])

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
        me = threading.get_ident()
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
            self.decoder.close()
            self.heads.close()
            self._slot_freed.notify_all()  # waiting calls find the model closed
