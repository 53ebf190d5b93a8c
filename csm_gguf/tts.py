"""The public API: text (of any length) in, 24 kHz speech out, streaming as it is generated.

    from csm_gguf import CSM
    tts = CSM()                               # the converted model in the cache, or CSM("path/to/model")
    audio = tts.generate("Hello there.")      # float32 numpy array at tts.sample_rate
    for chunk in tts.stream("Hello there."):  # audio as it is made, one 80 ms frame at a time
        ...
    audio = tts.generate("Hello there.", speed=1.2)  # faster, at the same pitch
    audio = tts.dialogue([(0, "Hi."), (1, "Hello.")])  # a conversation: each turn after those before it
    audio = tts.generate("Hello there.", voice="nova")  # a built-in voice (default "alloy"), or a saved one
    for chunk in tts.stream_text(llm_tokens):  # text as it arrives: each sentence spoken once complete
        ...
"""

from __future__ import annotations

import numbers
import os
import threading
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Iterable, Iterator, Sequence, TypedDict

import numpy as np

from .formats import FRAME_MS, SAMPLE_RATE
from .generator import Generator, Segment, check_codes, check_options, check_speaker
from .model import CSMModel
from .plan import Context, Heard, Piece, TokenCounts, context_room, plan_pieces, split_text
from .read_ahead import read_ahead
from .sampling import MAX_AUDIO_MS, SEED, TEMPERATURE, TOP_K, Sampling
from .tempo import check_speed, stretched
from .text import take_sentences, take_sentences_within

if TYPE_CHECKING:
    from typing_extensions import Unpack

# Text arriving without a sentence end is spoken once this long (`stream_text`): more than a piece, so the
# wait costs no prosody, and short enough that nothing waits for ever (nor re-splits ever longer text).
UNFINISHED_CHARS = 1000
DEFAULT_VOICE = "alloy"  # a built-in voice (csm_gguf.builtin_voices): the voice when none is named
NO_VOICE = "none"  # the voice name for no prompt at all
MIN_VOICE_MS = 1000  # the shortest recording saved as a voice: shorter ones hardly hold a voice


@dataclass
class Voice:
    """A reusable voice prompt: context segments with their audio already encoded."""

    segments: list[Segment]
    speaker: int = 0


class DialogueOptions(TypedDict, total=False):
    """How a conversation is spoken: `dialogue_frames`' settings, which `dialogue` passes on."""

    context: Sequence[Segment]
    temperature: float
    top_k: int
    seed: int | None
    max_audio_ms: float | None
    progress: bool


class SpeechOptions(DialogueOptions, total=False):
    """How a text is spoken: `frames`' settings, which `generate` and `stream` pass on."""

    speaker: int | None
    voice: str | Voice | None


def find_model(model: str | Path | None) -> Path:
    """An explicit path, else $CSM_GGUF_MODEL, else a model converted into the cache (model_dir.cached_models:
    CSM-1B's q4_k first)."""
    from .model_dir import cached_models

    if model:
        return Path(model)
    if os.environ.get("CSM_GGUF_MODEL"):
        return Path(os.environ["CSM_GGUF_MODEL"])
    cached = cached_models()
    if cached:
        return cached[0]
    raise FileNotFoundError(
        "no converted CSM model found: convert one with `python -m csm_gguf.convert` "
        "(or `--model-id unsloth/csm-1b`, which needs no hub login), or pass a model directory "
        "(--model DIR or CSM_GGUF_MODEL)"
    )


def _sentences(chunks: Iterable[str]) -> Iterator[str]:
    """The sentences of text arriving in chunks, each as soon as it is known to be complete, or once it is
    UNFINISHED_CHARS long (its words so far)."""
    rest = ""
    for chunk in chunks:
        if not isinstance(chunk, str):
            raise ValueError(f"the text to speak must come as strings, got {type(chunk).__name__}")
        sentences, rest = take_sentences_within(rest + chunk, UNFINISHED_CHARS)
        yield from sentences
    yield from take_sentences(rest, final=True)[0]


def _segments(context: Sequence[Segment]) -> list[Segment]:
    """The caller's context as a list, checked to be Segments."""
    context = list(context) if isinstance(context, Iterable) and not isinstance(context, (str, bytes)) else None
    if context is None or not all(isinstance(seg, Segment) for seg in context):
        raise ValueError("context must be a list of Segments (tts.segment(speaker, text, audio=...))")
    for seg in context:
        check_transcript(seg.text)
    return context


def check_transcript(text: object) -> None:
    """A context segment's text: a string (it was read as str(text): None spoken as "None")."""
    if not isinstance(text, str):
        raise ValueError(f"a context segment's text is what its audio says, a string; got {type(text).__name__}")


def frames_read_ahead() -> bool:
    """Whether `stream` and `generate` make their frames in a thread of their own, ahead of their decoding
    (read_ahead.py): CSM_GGUF_READ_AHEAD=1. Off by default: on the CPU the two take each other's cores (2 cores,
    llama.cpp on both: 193 ms a frame against 120; llama.cpp on one: no gain), and on a GPU, where Mimi's step
    could overlap the next frame's instead of adding to it, it has not been measured yet (issue 26)."""
    chosen = os.environ.get("CSM_GGUF_READ_AHEAD") or "0"
    if chosen not in ("0", "1"):
        raise ValueError(f"CSM_GGUF_READ_AHEAD is 0 or 1, got {chosen!r}")
    return chosen == "1"


def _progress(work: list) -> Iterator:
    from tqdm import tqdm

    yield from tqdm(work, desc="speaking", unit="piece")


def check_torch_device(name: str) -> None:
    """Fail now, with the fix, if torch cannot put tensors on `name` (e.g. "cuda" on a CPU-only torch)."""
    import torch

    try:
        torch.zeros(1, device=name).cpu()  # a round trip: the "meta" device makes tensors but holds no data
    except (RuntimeError, AssertionError, NotImplementedError) as e:
        raise ValueError(f"codec device {name!r} is not usable with this torch ({torch.__version__}): {e}. "
                         "Use a torch build for that device, or the codec device 'cpu'") from None


class CSM:
    """CSM-1B text to speech from a converted model directory.

    model: the directory (default: $CSM_GGUF_MODEL, else the converted model in the cache).
    n_threads: CPU threads for llama.cpp, and for torch in this whole process (0: all usable cores for
        llama.cpp, and torch keeps its own setting).
    n_gpu_layers: layers offloaded on CUDA/Metal builds of llama.cpp (0: nothing runs on the GPU; 99 or -1: all).
    kv_type: the KV cache's type, "f16", "f32" or "q8_0".
    max_streams: calls that may generate at once, from several threads (see the README).
    codec_device: the torch device of the Mimi codec, "cpu" or "cuda".

    Audio in and out is 24 kHz mono float32 (`sample_rate`); arrays given to `encode` or `segment` must be
    at that rate (files are resampled).
    """

    sample_rate = SAMPLE_RATE

    def __init__(
        self,
        model: str | Path | None = None,
        n_threads: int = 0,
        n_gpu_layers: int = 0,
        kv_type: str = "f16",
        max_streams: int = 1,
        codec_device: str = "cpu",
    ):
        check_options(n_threads, n_gpu_layers, max_streams)
        n_threads, n_gpu_layers, max_streams = int(n_threads), int(n_gpu_layers), int(max_streams)  # numpy's too
        if codec_device != "cpu":
            check_torch_device(codec_device)
        self.model = CSMModel(find_model(model))
        self.codec_device = codec_device
        self.read_ahead = frames_read_ahead()
        self._codec = None
        self._codec_lock = threading.Lock()
        self._closed = False
        if codec_device == "cpu":  # torch's import and the codec, meanwhile: llama.cpp loads without the GIL
            # Not a daemon: a process that ends early (an error, Ctrl-C) waits for the load instead of tearing
            # the interpreter down under a thread that is importing torch (seen once as SIGABRT at exit).
            threading.Thread(target=self._load_codec_quietly, name="codec-load").start()
        try:
            self.generator = Generator(self.model, max_streams, n_threads, n_gpu_layers, kv_type)
        except BaseException:  # what was loaded goes now, not with the last reference to this half-made CSM
            with self._codec_lock:
                self._closed = True
            self.model.close()
            raise
        # The depth decoder's graphs for 1..max_streams streams now (while the codec loads), not at a first frame.
        self.generator.prepare(TOP_K.default)
        if n_threads:
            import torch

            torch.set_num_threads(n_threads)

    # --- codec --------------------------------------------------------------------------------------
    @property
    def codec(self):
        """The Mimi codec, its weights the model directory's mapped file (on CPU loaded at construction, in a
        thread: this waits for it)."""
        codec = self._loaded_codec()
        codec.cuda_lock = self.generator.lock  # no graph is recorded while llama.cpp runs in another thread
        return codec

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the model is closed: create a new CSM to speak again")

    def _loaded_codec(self):
        with self._codec_lock:
            self._check_open()
            if self._codec is None:
                if not self.model.has_codec:
                    raise ValueError(f"{self.model.path} carries no Mimi codec: convert the model again")
                from .mimi import Mimi, MimiConfig

                config = MimiConfig.from_transformers(self.model.codec_config)
                self._codec = Mimi.from_runtime_tensors(config, self.model.codec_tensors()).to(self.codec_device)
            return self._codec

    def _load_codec_quietly(self) -> None:
        try:
            self._loaded_codec()
        except Exception:  # said where the codec is used, in the caller's thread
            pass

    def encode(self, audio: np.ndarray | str | os.PathLike | BinaryIO) -> np.ndarray:
        """24 kHz audio -> codes of shape (frames, 32). An audio file (a path or a binary file object; any
        rate), or samples: floats in [-1, 1] or integer PCM, mono or (samples, channels) as soundfile reads
        them (mixed down)."""
        import torch

        samples = self._samples(audio)
        codes = self.codec.encode(torch.from_numpy(samples).reshape(1, 1, -1))
        return codes[0, : self.model.config.num_codebooks].T.cpu().numpy().astype(np.int64)

    def _samples(self, audio: np.ndarray | str | os.PathLike | BinaryIO, max_seconds: float | None = None
                 ) -> np.ndarray:
        from .audio import as_float, load_audio

        if isinstance(audio, (str, os.PathLike)) or hasattr(audio, "read"):
            samples = load_audio(audio, max_seconds)  # files: read no further than needed to refuse them
        else:
            samples = np.asarray(audio)
            if samples.ndim == 2 and samples.shape[1] > samples.shape[0] > 0:
                raise ValueError(f"audio of shape {samples.shape} looks like (channels, samples): give "
                                 "(samples, channels), e.g. audio.T")
            if samples.ndim not in (1, 2) or not samples.size:
                raise ValueError(f"audio to encode must be samples, mono or (samples, channels), got "
                                 f"{samples.dtype} of shape {samples.shape}")
            samples = as_float(samples)
            if samples.ndim == 2:
                samples = samples.mean(axis=1)
        if not np.isfinite(samples).all():
            raise ValueError("audio to encode has NaN or infinite samples")
        return samples

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """Codes (frames, 32) -> audio."""
        import torch

        self._check_open()  # also for no frames: whatever is decoded after close is a mistake
        codes = check_codes(codes, self.model.config.num_codebooks, self.model.n_codes)
        if not len(codes):
            return np.zeros(0, dtype=np.float32)
        return self.codec.decode(torch.from_numpy(codes.T[None]))[0, 0].cpu().numpy()

    def segment(self, speaker: int, text: str, audio: np.ndarray | str | os.PathLike | BinaryIO | None = None,
                codes: np.ndarray | None = None) -> Segment:
        """A context segment from audio (encoded here, as for `encode`) or from codes, checked now."""
        check_speaker(speaker)
        check_transcript(text)
        if (audio is None) == (codes is None):
            raise ValueError("a context segment needs its audio or its codes (one of them)")
        if audio is not None:
            # Checked before encoding, which for minutes of audio takes minutes.
            limit = context_room(self.model.config.backbone.max_seq_len) * FRAME_MS / 1000
            samples = self._samples(audio, max_seconds=limit)
            if len(samples) > limit * SAMPLE_RATE:
                raise ValueError(f"the context audio lasts more than {limit:.0f} s, and beside it the model's "
                                 "context would leave no room for a piece of text and its speech: cut it (a voice "
                                 "prompt needs 5 to 30 s)")
            codes = self.encode(samples)
        codes = check_codes(codes, self.model.config.num_codebooks, self.model.n_codes, "context codes")
        segment = Segment(speaker, text, codes)
        self.check_context([segment])
        return segment

    def check_context(self, segments: Sequence[Segment], what: str = "the context") -> None:
        """ValueError unless `segments` leave room in the model's context for any piece of text and its speech
        (`plan.context_room`): a longer context could never be spoken after."""
        heard = [Heard(s, self.model.prompt_tokens(s.speaker, s.text)) for s in segments]
        rows = sum(h.rows for h in heard)
        room = context_room(self.model.config.backbone.max_seq_len)
        if rows > room:
            words = sum(len(h.prompt) for h in heard)  # the rest are the audio's frames
            raise ValueError(f"{what} takes {rows} positions of the model's context ({words} of them its words), "
                             f"and beside a piece of text and its speech there is room for {room} (about "
                             f"{room * FRAME_MS / 1000:.0f} s of audio with its words): use less audio or fewer "
                             "words (a voice prompt needs 5 to 30 s and what it says)")

    def check_voice(self, voice: Voice) -> None:
        """ValueError unless `voice` can be saved: a prompt of at least MIN_VOICE_MS of audio, which leaves room
        for speaking (check_context)."""
        frames = sum(len(s.codes) for s in voice.segments if s.codes is not None)
        if frames * FRAME_MS < MIN_VOICE_MS:
            raise ValueError(f"the voice's recording lasts {frames * FRAME_MS / 1000:g} s: a voice needs at least "
                             f"{MIN_VOICE_MS / 1000:g} s of speech (5 to 30 s is best)")
        self.check_context(voice.segments, "the voice's prompt")

    # --- generation ---------------------------------------------------------------------------------
    def frames(
        self,
        text: str,
        *,
        speaker: int | None = None,
        context: Sequence[Segment] = (),
        temperature: float = TEMPERATURE.default,
        top_k: int = TOP_K.default,
        seed: int | None = SEED.default,
        max_audio_ms: float | None = MAX_AUDIO_MS.default,
        progress: bool = False,
        voice: str | Voice | None = None,
    ) -> Iterator[np.ndarray]:
        """Codes (32,) per 80 ms frame as they are made. Long texts are spoken piece by piece, each piece
        with the previous one as context so the voice carries over.

        voice: a voice's name (built-in or saved, see `voice`), a Voice, or "none" (no prompt: another voice
            every time). Default: alloy, unless `speaker` or `context` is given (see `with_voice`).
        speaker: the CSM speaker id (default: the voice's).
        context: Segments heard before the text (after the voice's prompt), from `segment`.
        temperature, top_k: how the codes are drawn (0: always the likeliest). seed: the same seed, text and
            settings give the same speech (None: another every time; piece i of a long text draws with
            seed + i). max_audio_ms: the most audio of each piece (~60 tokens of text), not of the whole text.
        progress: a progress bar over a long text's pieces (tqdm)."""
        sampling = Sampling(temperature, top_k, seed, max_audio_ms)
        count = TokenCounts(self.model)
        texts = split_text(text, count)  # checked before a built-in voice's prompt is made for it
        speaker, context = self.with_voice(voice, speaker, context)
        return self._speak([(speaker, piece) for piece in texts], context, sampling, count, progress)

    def dialogue_frames(
        self,
        turns: Iterable[tuple[int | str, str]],
        *,
        context: Sequence[Segment] = (),
        temperature: float = TEMPERATURE.default,
        top_k: int = TOP_K.default,
        seed: int | None = SEED.default,
        max_audio_ms: float | None = MAX_AUDIO_MS.default,
        progress: bool = False,
    ) -> Iterator[np.ndarray]:
        """A conversation's codes, frame by frame: turns of (speaker, text), each spoken after `context`
        and the last piece each speaker said, which is how CSM keeps a conversation's voices and flow.
        A turn's speaker is a speaker id (no prompt: the raw model, other voices every time unless seeded)
        or a voice's name: its prompt goes before `context`, its ids moved where the turns' ids or the
        context's take them (as in `say --dialogue`). Every turn is checked before anything is generated.
        Pieces count on from the first turn for the seed (piece i samples with seed + i); the other settings
        as for `frames`."""
        from .script import voice_turns

        if isinstance(turns, (str, bytes)) or not isinstance(turns, Iterable):
            raise ValueError("turns must be a list of (speaker, text) pairs")
        context = _segments(context)
        count = TokenCounts(self.model)
        checked = []  # (where, speaker id or voice name, its pieces)
        for i, turn in enumerate(turns):
            if not isinstance(turn, Sequence) or isinstance(turn, str) or len(turn) != 2:
                raise ValueError(f"turn {i} must be a (speaker, text) pair, got {turn!r}")
            who, text = turn
            try:
                if who == NO_VOICE:
                    raise ValueError(f"{NO_VOICE!r} is no speaker: a turn without a voice prompt gives a speaker id")
                if not isinstance(who, str):
                    check_speaker(who)
                checked.append((f"turn {i}", who, split_text(text, count)))
            except ValueError as e:
                raise ValueError(f"turn {i}: {e}") from None
        if not checked:
            raise ValueError("no turns to speak: give at least one (speaker, text) pair")
        ids, prompts = voice_turns(checked, {seg.speaker for seg in context}, self.voice)
        lines = [(speaker, piece) for speaker, pieces in ids for piece in pieces]  # (speaker, piece) in order
        return self._speak(lines, [*prompts, *context], Sampling(temperature, top_k, seed, max_audio_ms), count,
                           progress)

    def voice(self, name: str) -> Voice:
        """A voice by name: a saved one (csm_gguf.voices), or a built-in one, whose fixed prompt this model
        makes on first use (seconds) and keeps (csm_gguf.builtin_voices)."""
        from .voices import load_voice

        self._check_open()
        if name == NO_VOICE:  # (a name that speaking takes, for no voice: there is no Voice of it)
            raise ValueError(f"{NO_VOICE!r} is no voice but the raw model: speak with voice={NO_VOICE!r} (and a "
                             "speaker id), there is nothing to load")
        return self.usable_voice(name, load_voice(name, self.model.path, self.prompt_codes))

    def usable_voice(self, name: str, voice: Voice) -> Voice:
        """`voice` (`name`'s) with its codes checked against this model, now: a ValueError naming the voice and
        the fix rather than a generation's failure over "context codes"."""
        k, n_codes = self.model.config.num_codebooks, self.model.n_codes
        try:
            segments = [replace(s, codes=check_codes(s.codes, k, n_codes, f"the codes of voice {name!r}"))
                        for s in voice.segments]
        except ValueError as e:
            raise ValueError(f"{e}: it was saved for another model, or damaged; delete it and save it again"
                             ) from None
        return replace(voice, segments=segments)

    def prompt_codes(self, speaker: int, text: str) -> np.ndarray:
        """The codes of a built-in voice's prompt (builtin_voices.MakeCodes): `text` said as `speaker`, with no
        prompt, sampled as builtin_voices.SAMPLING says."""
        from .builtin_voices import SAMPLING

        frames = list(self.frames(text, speaker=speaker, voice=NO_VOICE, **asdict(SAMPLING)))
        if not frames:  # the model ended the speech at once: no prompt (a fine-tune gone wrong, or a broken model)
            raise ValueError(f"this model said nothing for a built-in voice's prompt ({text!r} as speaker "
                             f"{speaker}): is it a CSM model? Use a saved voice, or voice 'none'")
        return np.stack(frames)

    def with_voice(self, voice: str | Voice | None, speaker: int | None, context: Sequence[Segment]
                   ) -> tuple[int, list[Segment]]:
        """The speaker and context segments to speak with: `voice`'s prompt (a name, see `voice`, or a
        Voice), then `context`; the speaker is `speaker`, else the voice's. With no voice, DEFAULT_VOICE
        when neither a speaker nor a context is given; else no prompt but `context`. Without any prompt (a
        bare speaker id, or voice "none") CSM gives another voice on every call."""
        context = _segments(context)
        if voice is None and speaker is None and not context:
            voice = DEFAULT_VOICE
        if isinstance(voice, str):
            voice = None if voice == NO_VOICE else self.voice(voice)
        if voice is not None and not isinstance(voice, Voice):
            raise ValueError(f"voice must be a voice name, a Voice or None, got {type(voice).__name__}")
        if speaker is None:
            speaker = 0 if voice is None else voice.speaker
        check_speaker(speaker)
        return speaker, context if voice is None else [*voice.segments, *context]

    def _speak(self, lines: list[tuple[int, str]], context: Sequence[Segment], sampling: Sampling,
               count: TokenCounts, progress: bool) -> Iterator[np.ndarray]:
        """Checks the context now (a generator would only at its first frame), then speaks the lines."""
        heard = self._context(context)
        pieces = list(plan_pieces(lines, sampling, count))
        if pieces:
            heard.check_room(pieces[0])  # PromptTooLong now; later pieces let the context give way (Context.fitting)
        return self._generate(_progress(pieces) if progress and len(pieces) > 1 else pieces, heard)

    def _context(self, context: Sequence[Segment]) -> Context:
        return Context(self.generator, _segments(context))

    def _generate(self, pieces: Iterable[Piece], context: Context, piece_ends: bool = False
                  ) -> Iterator[np.ndarray | None]:
        """Frames of each piece in turn, each after what was said before it (`context`); with piece_ends, a
        None after each piece."""
        for piece in pieces:
            self._check_open()  # (a generator made before close, first read after it: an AttributeError inside)
            made = []
            prompt, shared = context.prompt(piece)  # shared: the voice prompt, read once, then from the cache
            for frame in self.generator.speak(prompt, piece.sampling, shared):
                made.append(frame)
                yield frame
            context.said(piece, made)
            if piece_ends:
                yield None

    def stream_text(
        self,
        text: Iterable[str],
        *,
        speaker: int | None = None,
        context: Sequence[Segment] = (),
        temperature: float = TEMPERATURE.default,
        top_k: int = TOP_K.default,
        seed: int | None = SEED.default,
        max_audio_ms: float | None = MAX_AUDIO_MS.default,
        chunk_frames: int = 1,
        speed: float = 1.0,
        voice: str | Voice | None = None,
    ) -> Iterator[np.ndarray]:
        """Speech for text that arrives in pieces, such as an LLM's tokens: audio chunks as for `stream`.
        Each sentence is spoken as soon as it is complete (once the next one begins, at a line break, or
        at the end of the text), with the sentence before it as context, so speech can start long before
        the text ends. `text` is only read on between sentences. Piece i samples with seed + i. The other
        settings as for `frames` and `stream`."""
        if isinstance(text, (str, bytes)) or not isinstance(text, Iterable):
            raise ValueError("text must be an iterable of strings (an LLM's tokens, lines...); for one string "
                             "use stream()")
        sampling = Sampling(temperature, top_k, seed, max_audio_ms)  # its checks, now
        speaker, context = self.with_voice(voice, speaker, context)
        heard = self._context(context)
        count = TokenCounts(self.model)
        lines = ((speaker, piece) for sentence in _sentences(text) for piece in split_text(sentence, count))
        pieces = plan_pieces(lines, sampling, count)
        # Each piece's last frames are decoded when it ends, not with the next: the text may stall there.
        return self.decode_stream(self._generate(pieces, heard, piece_ends=True), chunk_frames, speed)

    def stream(self, text: str, *, chunk_frames: int = 1, speed: float = 1.0, **options: Unpack[SpeechOptions]
               ) -> Iterator[np.ndarray]:
        """Audio chunks (float32, 24 kHz) as frames are generated, `chunk_frames` frames (80 ms each) a chunk;
        equal to decoding all frames at once. `speed` (0.25 to 4) makes the speech faster or slower at the same
        pitch (see csm_gguf.tempo). `options`: how it is spoken, as for `frames` (voice, speaker, context,
        temperature, top_k, seed, max_audio_ms, progress)."""
        return self.decode_stream(self._ahead(self.frames(text, **options)), chunk_frames, speed)

    def decode_stream(self, frames: Iterable[np.ndarray | None], chunk_frames: int = 1,
                      speed: float = 1.0) -> Iterator[np.ndarray]:
        """Frames of codes -> audio chunks through one streaming codec state (no seams between chunks),
        time-stretched to `speed` unless it is 1. A None among the frames decodes those pending at once."""
        if isinstance(chunk_frames, bool) or not isinstance(chunk_frames, numbers.Integral) or chunk_frames < 1:
            raise ValueError(f"chunk_frames must be a whole number >= 1, got {chunk_frames!r}")
        chunk_frames = int(chunk_frames)
        audio = self._decode_stream(frames, chunk_frames)
        return audio if check_speed(speed) == 1.0 else stretched(audio, speed)

    def _decode_stream(self, frames: Iterable[np.ndarray | None], chunk_frames: int) -> Iterator[np.ndarray]:
        codec = self.codec
        # One frame at a time on CUDA: replayed from a graph. Every llama.cpp call of this CSM holds the lock
        # the recording takes, so none of its own graphs is being recorded meanwhile.
        state = codec.decoder_state(1, cuda_graph=chunk_frames == 1)
        pending: list[np.ndarray] = []

        def flush() -> np.ndarray:
            self._check_open()  # frames made before a close may have been read ahead: none is decoded after it
            codes = check_codes(np.stack(pending), self.model.config.num_codebooks, self.model.n_codes, "frames")
            audio = codec.decode_frames(codes, state)
            pending.clear()
            return audio

        k = self.model.config.num_codebooks
        for i, frame in enumerate(frames):
            if frame is None:  # decode what is pending now (see stream_text)
                if pending:
                    yield flush()
                continue
            frame = np.asarray(frame)
            if frame.shape != (k,):  # said of this frame: a stacked chunk's shape would not tell which was wrong
                raise ValueError(f"frame {i} must be one frame of {k} codes, shape ({k},), got shape {frame.shape}")
            pending.append(frame)
            if len(pending) >= chunk_frames:
                yield flush()
        if pending:
            yield flush()

    def generate(self, text: str, *, speed: float = 1.0, **options: Unpack[SpeechOptions]) -> np.ndarray:
        """The whole speech (float32, 24 kHz); `speed` as for `stream`; `options`: how it is spoken, as for
        `frames` (voice, speaker, context, temperature, top_k, seed, max_audio_ms, progress)."""
        return self._audio(self.frames(text, **options), speed)

    def dialogue(self, turns: Iterable[tuple[int | str, str]], *, speed: float = 1.0,
                 **options: Unpack[DialogueOptions]) -> np.ndarray:
        """A whole conversation's audio (see `dialogue_frames`, and its options), its turns joined in one codec
        stream; `speed` as for `stream`."""
        return self._audio(self.dialogue_frames(turns, **options), speed)

    def _ahead(self, frames: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
        """Our own frames (never a caller's iterator: it would run in another thread), made in a thread of their
        own ahead of their decoding where `read_ahead` is set (CSM_GGUF_READ_AHEAD=1)."""
        return read_ahead(frames, name="csm-frames") if self.read_ahead else frames

    def _audio(self, frames: Iterable[np.ndarray], speed: float) -> np.ndarray:
        chunks = self.decode_stream(self._ahead(frames), chunk_frames=25, speed=speed)
        return np.concatenate([np.zeros(0, dtype=np.float32), *chunks])

    def close(self) -> None:
        """Free llama.cpp's models and contexts and let go of the codec and the mapped files; speaking,
        encoding or decoding afterwards is a RuntimeError. `with CSM(...) as tts:` closes it at the end."""
        with self._codec_lock:  # the codec's load, in its thread, ends first
            self._closed = True
            self._codec = None
        self.generator.close()
        self.model.close()

    def __enter__(self) -> CSM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
