"""python -m csm_gguf.say "TEXT": speech to a file, stdout or the speakers; voices, sampling, long texts."""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from .formats import FORMATS
from .sampling import MAX_AUDIO_MS, SEED, TEMPERATURE, TOP_K


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m csm_gguf.say",
        description="Speak TEXT with CSM-1B on llama.cpp. The first run converts the default model "
        "into the cache if no model is given or found.",
    )
    p.add_argument("text", nargs="?", help="what to say; '-' reads standard input")
    p.add_argument("--input", "-i", metavar="FILE", help="read the text from FILE (UTF-8, up to 16 MiB; '-': stdin)")
    p.add_argument("--dialogue", action="store_true",
                   help="the text is a conversation: one turn per line, SPEAKER: TEXT, where SPEAKER is a speaker id "
                   "or a voice name; each turn is spoken after the ones before it")
    p.add_argument("--output", "-o", help="output file, or '-' for stdout (a pipe or a file, not a terminal; default: "
                   "named after the text; with --play, none)")
    p.add_argument("--play", "-p", action="store_true", help="play the speech while it is made (through "
                   "$CSM_GGUF_PLAYER if set, else paplay, aplay, ffplay or sox's play)")
    p.add_argument("--format", "-f", choices=FORMATS, help="audio format (default: from --output's extension, "
                   "else wav); pcm is raw 16-bit little-endian 24 kHz mono; aac needs ffmpeg")
    p.add_argument("--model", "-m", help="converted model directory (default: $CSM_GGUF_MODEL, else the cache)")
    p.add_argument("--model-id", default="sesame/csm-1b",
                   help="hub model to convert on first run when no model is found (default: %(default)s)")
    p.add_argument("--speaker", type=int, default=None, help="CSM speaker id (default: the voice's); alone, "
                   "without --voice or --context, the raw model: another voice every time")
    p.add_argument("--context", nargs=3, action="append", default=[], metavar=("SPEAKER", "TEXT", "AUDIO"),
                   help="a voice prompt / earlier turn: speaker id, its transcript, and its audio "
                   "(wav/flac/ogg/mp3; m4a and others with ffmpeg installed) or codes (.npy of shape (frames, 32)); "
                   "repeatable")
    p.add_argument("--voice", help="a built-in voice (OpenAI's names: a fixed prompt made once per model; "
                   "default alloy, unless --speaker or --context is given), a saved voice (see --save-voice; "
                   "saving a built-in name replaces it), or 'none' for no prompt")
    p.add_argument("--save-voice", metavar="NAME", help="encode the --context segments and save them as voice NAME")
    p.add_argument("--list-voices", action="store_true", help="list built-in and saved voices (speaker, prompt "
                   "length, transcript) and exit")
    p.add_argument("--delete-voice", metavar="NAME", help="delete the saved voice NAME and exit")
    add_sampling_arguments(p)
    p.add_argument("--speed", type=float, default=1.0, help="faster (up to 4) or slower (down to 0.25) speech at "
                   "the same pitch, by time-stretching the audio (default: %(default)s)")
    p.add_argument("--save-codes", metavar="OUT.npy", help="also write the generated codes, shape (frames, 32), to "
                   "a file other than the audio's")
    p.add_argument("--threads", type=int, default=0, help="CPU threads, at most the cores this process may "
                   "use (default: all of them)")
    p.add_argument("--gpu-layers", type=int, default=0,
                   help="layers to offload on CUDA/Metal builds (99 or -1: all; 0: nothing runs on the GPU)")
    p.add_argument("--codec-device", default="cpu", help="torch device of the Mimi codec: cpu (default), cuda")
    return p


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    """--temperature, --top-k, --seed, --max-audio-ms: say's, and the Wyoming server's for every request."""
    p.add_argument("--temperature", "-t", type=float, default=TEMPERATURE.default, help="sampling temperature; "
                   "0 = greedy (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=TOP_K.default, help="sample among the K likeliest codes "
                   "(default: %(default)s)")
    p.add_argument("--seed", type=int, help="random seed: the same seed gives the same speech")
    p.add_argument("--max-audio-ms", type=float, help="cut each piece of speech at this length, in whole 80 ms "
                   "frames, at least one (default: proportional to the text)")


class UsageError(ValueError):
    pass


def read_text(args) -> str | None:
    """The text to speak, from the argument, --input or stdin ('-'); files and stdin are UTF-8 (a
    byte-order mark is dropped), at most MAX_TEXT_BYTES."""
    from .text import is_unicode

    if args.input and args.text is not None:
        raise UsageError("give the text either as TEXT or with --input, not both")
    source = args.input or args.text
    if source is None:
        return None
    if source == "-":
        if sys.stdin is None:
            raise UsageError("cannot read standard input: it is closed")
        return read_utf8(sys.stdin.buffer, "standard input")
    if args.input:
        where = f"--input {source}"
        try:
            with open(source, "rb") as f:
                return read_utf8(f, where)
        except OSError as e:
            raise UsageError(f"cannot read {where}: {e.strerror}") from e
    if not is_unicode(source):
        raise UsageError("TEXT is not valid UTF-8 in this terminal's encoding: pass it in a UTF-8 file with --input")
    return source


def read_utf8(f, where: str) -> str:
    """UTF-8 text from `f`, checked piece by piece as it is read: NUL bytes (UTF-16, or a device such as
    /dev/zero) and bytes that are not UTF-8 stop it at once, and so does a text past MAX_TEXT_BYTES."""
    import codecs

    from .bounded import MAX_TEXT_BYTES, TooLarge, pieces

    decoder, text, read, start = codecs.getincrementaldecoder("utf-8-sig")(), [], 0, 0
    try:
        for piece in pieces(f, MAX_TEXT_BYTES, where, "split it into several files"):
            if b"\x00" in piece:
                raise UsageError(f"{where} holds NUL bytes, so it is not UTF-8 text (UTF-16?): save it as UTF-8")
            start = read - len(decoder.getstate()[0])  # decoding resumes at the bytes held back last time
            read += len(piece)
            text.append(decoder.decode(piece))
        start = read - len(decoder.getstate()[0])
        text.append(decoder.decode(b"", final=True))
    except UnicodeDecodeError as e:
        at = start + e.start
        raise UsageError(f"{where} is not UTF-8 text ({e.reason} at byte {at}): save it as UTF-8") from None
    except TooLarge as e:
        raise UsageError(str(e)) from None
    return "".join(text)


def output_format(args) -> str:
    from .audio import format_from_path

    if args.format:
        return args.format
    if args.output and args.output != "-" and os.path.splitext(args.output)[1]:
        return format_from_path(args.output)
    return "wav"


def check_writable(path: str, what: str) -> None:
    """Fail now, not after generating, where `path` cannot be written."""
    if path.endswith(("/", os.sep)) or os.path.isdir(path):
        raise UsageError(f"{what} {path} is a folder: give a file name")
    if os.path.exists(path) and not os.path.isfile(path):  # a pipe or a device (/dev/null): written in place
        if not os.access(path, os.W_OK):
            raise UsageError(f"cannot write {what} {path}: no permission")
        return
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise UsageError(f"cannot write {what} {path}: the file is read-only")
    folder = os.path.dirname(os.path.realpath(path))  # a link's target is replaced, in its own folder
    if not os.path.isdir(folder):
        why = "is not a folder" if os.path.exists(folder) else "does not exist"
        raise UsageError(f"cannot write {what} {path}: {folder} {why}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write {what} {path}: no permission to write in {folder}")


def check_outputs(args, has_text: bool) -> None:
    """Where the audio and the codes go: checked now, not after generating."""
    if not has_text:  # --save-voice alone
        speaking = [option for option, given in (
            ("--output", args.output), ("--save-codes", args.save_codes), ("--play", args.play),
            ("--format", args.format), ("--voice", args.voice), ("--seed", args.seed is not None),
            ("--speed", args.speed != 1), ("--max-audio-ms", args.max_audio_ms is not None)) if given]
        if speaking:
            raise UsageError(f"{', '.join(speaking)}: for speaking, and there is no text to speak: give TEXT too "
                             "(it is spoken after the voice is saved), or leave them out")
    if args.save_codes == "-":
        raise UsageError("--save-codes needs a file name (.npy): standard output is for the audio (-o -)")
    if args.output == "-" and sys.stdout is None:
        raise UsageError("cannot write to standard output: it is closed; give -o FILE")
    if args.output == "-" and sys.stdout.isatty():  # audio bytes would garble the terminal
        raise UsageError("-o - writes the audio to standard output, which is a terminal here: pipe it to a player "
                         "(| ffplay -nodisp -autoexit -) or a file (> speech.wav), or give -o FILE")
    files = [(what, path) for what, path in (("--output", args.output), ("--save-codes", args.save_codes))
             if path and path != "-"]
    for what, path in files:
        check_writable(path, what)
    if len(files) == 2 and os.path.realpath(args.output) == os.path.realpath(args.save_codes):
        raise UsageError(f"--output and --save-codes both name {args.output}: the codes would replace the audio; "
                         "give the codes a file of their own (.npy)")
    if args.format and args.output and args.output != "-":
        check_extension(args.output, args.format)


def check_extension(path: str, fmt: str) -> None:
    """A --format that its file's known extension contradicts (-o speech.mp3 -f wav) is a mistake, not a wish: a
    player goes by the extension. An unknown extension is what --format is for."""
    from .audio import AudioError, format_from_path

    try:
        named = format_from_path(path)
    except AudioError:
        return
    if named != fmt:
        raise UsageError(f"--format {fmt}, but {path} is named for {named}: make them agree, or leave out --format")


def check_context_files(items: list[list[str]]) -> None:
    """--context's transcripts are text and its audio and codes files exist: now, not after loading (or first
    converting) the model."""
    from .text import is_unicode

    for _, text, source in items:
        if not is_unicode(text):
            raise UsageError(f"--context {source}: its TEXT is not valid UTF-8 in this terminal's encoding")
        if source == "-":
            raise UsageError("--context reads a file, not standard input: give the audio's path (or /dev/stdin)")
        if not os.path.exists(source):
            raise UsageError(f"--context {source}: no such file")
        if os.path.isdir(source):
            raise UsageError(f"--context {source} is a folder: give an audio file or a .npy of codes")


def default_output(text: str, fmt: str) -> str:
    words = re.findall(r"\w+", text.lower())[:6]
    stem = "-".join(words)[:60] or "speech"
    name, n = f"{stem}.{fmt}", 2
    while os.path.exists(name):
        name, n = f"{stem}-{n}.{fmt}", n + 1
    return name


def load_model(args):
    from .tts import CSM, find_model

    try:
        path = find_model(args.model)
    except FileNotFoundError:
        path = first_run_convert(args.model_id)
    return CSM(path, n_threads=args.threads, n_gpu_layers=args.gpu_layers, codec_device=args.codec_device)


def first_run_convert(model_id: str) -> Path:
    from converter.checkpoint import CheckpointError
    from converter.convert import convert

    from .model_dir import MODEL_FILES, default_model_dir

    done = default_model_dir(model_id, "q4_k")  # where an earlier first run put it
    if all((done / f).exists() for f in MODEL_FILES):
        return done
    print(f"No converted model found: downloading and converting {model_id} (once).", file=sys.stderr)
    try:
        return convert(model_id=model_id, qtype="q4_k")
    except CheckpointError as e:
        raise UsageError(
            f"the first run could not convert {model_id}: {e}\nThe options named are those of "
            "python -m csm_gguf.convert: run it yourself (--model-path DIR for a local checkpoint), then pass "
            "its output to say with --model DIR"
        ) from e


def context_speaker(speaker: str) -> int:
    if not (speaker.isascii() and speaker.isdigit()):
        raise UsageError(f"--context speaker must be a whole number >= 0, got {speaker!r}")
    return int(speaker)


def context_segments(tts, items: list[list[str]]):
    segments = []
    for speaker, text, source in items:
        spk = context_speaker(speaker)
        try:
            if source.lower().endswith(".npy"):
                segments.append(tts.segment(spk, text, codes=read_codes(source)))
            else:
                segments.append(tts.segment(spk, text, audio=source))
        except ValueError as e:
            raise UsageError(str(e) if source in str(e) else f"--context {source}: {e}") from e
    return segments


def read_codes(path: str):
    import numpy as np

    from .voices import numpy_failure

    try:
        codes = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise UsageError(f"cannot read codes {path}: {numpy_failure(e) or 'the file is empty'}; give a .npy file "
                         "written by --save-codes") from e
    if not isinstance(codes, np.ndarray):  # np.load gives an archive for .npz content
        codes.close()
        raise UsageError(f"{path} is an archive of arrays (a saved voice?), not one array of codes: "
                         "give codes saved with --save-codes, or a saved voice with --voice NAME")
    if codes.dtype.kind not in "iu":
        raise UsageError(f"codes {path} hold {codes.dtype} values: codes are whole numbers")
    if codes.size == 0:
        raise UsageError(f"codes {path} hold no frames: give at least one")
    return codes


def listed_model(args) -> Path | None:
    """The model whose built-in voices --list-voices describes, if there is one (none is converted for it)."""
    from .tts import find_model

    try:
        path = find_model(args.model)
    except FileNotFoundError:
        return None
    return path if path.is_dir() else None


def check_sampling(args) -> None:
    """The sampling options against csm_gguf.sampling's limits: now, not after loading the model."""
    for option, setting in (("--top-k", TOP_K), ("--temperature", TEMPERATURE), ("--max-audio-ms", MAX_AUDIO_MS),
                            ("--seed", SEED)):
        value = getattr(args, setting.name)
        if value is not None and not setting.allows(value):
            rule = setting.bounds() if setting.whole else setting.rule()  # argparse took only whole numbers
            raise UsageError(f"{option} must be {rule}, got {value}")


def run(args) -> int:
    from . import voices
    from .script import read_script

    if args.list_voices or args.delete_voice is not None:
        return manage_voices(args)
    text = checked_text(args)
    has_text = text is not None

    from .audio import check_format
    from .player import find_player

    written = bool(args.output) or not args.play  # --play alone: heard, not kept
    fmt = check_format(output_format(args)) if written else None
    check_outputs(args, has_text)
    check_context_files(args.context)
    if args.voice and args.voice != voices.NO_VOICE:
        voices.voice_speaker(args.voice)  # known and readable: now, not after the model loads
    context_ids = [context_speaker(speaker) for speaker, _, _ in args.context]  # now, not after the model loads
    dialogue = args.dialogue and has_text
    if dialogue:  # checked now; its built-in voices' prompts are read once the model is loaded
        read_script(text, reserved=context_ids, load=lambda name: voices.Voice([], voices.voice_speaker(name)))
    if args.save_voice is not None:
        with taken_name_explained():
            voices.check_saveable(args.save_voice)  # now, not after loading the model and encoding the audio

    if args.play and args.output == "-":
        raise UsageError("--play and -o - cannot share standard output's audio: give -o a file, or pipe to a player")
    player_command = find_player() if args.play else None  # now, not after loading the model

    tts = load_model(args)
    context = context_segments(tts, args.context)
    if args.save_voice is not None:
        speaker = args.speaker if args.speaker is not None else context[0].speaker
        voice = voices.Voice(context, speaker)
        tts.check_voice(voice)
        with taken_name_explained():  # saved meanwhile, by another program
            path = voices.save_voice(args.save_voice, voice)
        print(f"voice {args.save_voice!r} saved to {path}", file=sys.stderr)
        if not has_text:
            return 0
    turns: list = []
    if dialogue:
        turns, voice_prompts = read_script(text, reserved=context_ids, load=tts.voice)
        context, speaker = [*voice_prompts, *context], None
    else:
        speaker, context = tts.with_voice(args.voice, args.speaker, context)
    sampling = dict(context=context, temperature=args.temperature, top_k=args.top_k, seed=args.seed,
                    max_audio_ms=args.max_audio_ms, progress=True)
    frames = tts.dialogue_frames(turns, **sampling) if turns else tts.frames(text, speaker=speaker, **sampling)
    output = (args.output or default_output(" ".join(t for _, t in turns) if turns else text, fmt)) if written else None
    return speak_out(tts, frames, args, output, fmt, player_command)


def manage_voices(args) -> int:
    """--list-voices or --delete-voice, alone."""
    from . import voices

    alone = "--list-voices" if args.list_voices else "--delete-voice"
    others = [args.text, args.input, args.output, args.save_voice, args.voice, args.context or None, args.speaker,
              args.seed, args.save_codes, args.format, args.max_audio_ms, args.dialogue or None, args.play or None]
    if any(x is not None for x in others) or (args.list_voices and args.delete_voice is not None):
        raise UsageError(f"{alone} runs on its own: give it without text, --input, --output, other voice options "
                         "or options for speaking")
    if args.list_voices:
        print("\n".join(voices.describe(name, listed_model(args)) for name in voices.all_voices()))
        return 0
    if not voices.delete_voice(args.delete_voice):
        saved = ", ".join(voices.list_voices()) or "none"
        raise UsageError(f"no saved voice {args.delete_voice!r} in {voices.voices_dir()} (saved: {saved})")
    print(f"voice {args.delete_voice!r} deleted", file=sys.stderr)
    return 0


def check_threads(threads: int) -> None:
    """--threads: 0 (all cores) up to the cores this process may use. More only wait for each other: llama.cpp's
    threads meet at every operation, and 1,000 threads on 2 cores made a second of speech take minutes."""
    from .llama import default_threads

    cores = default_threads()
    if not 0 <= threads <= cores:
        raise UsageError(f"--threads must be from 0 (all cores) to {cores} (the cores this process may use), "
                         f"got {threads}")


def check_gpu_layers(layers: int) -> None:
    """--gpu-layers, in the range CSM takes (generator.check_options), said as say's option."""
    from .generator import check_options

    try:
        check_options(0, layers, 1)
    except ValueError:
        raise UsageError(f"--gpu-layers must be -1 or 99 (all layers), 0 (none) or a number of layers, got "
                         f"{layers}") from None


def checked_text(args) -> str | None:
    """The options checked, then the text to speak read (None: none, for --save-voice alone)."""
    from .tempo import MAX_SPEED, MIN_SPEED
    from .text import is_blank

    for option, value in (("--output", args.output), ("--save-codes", args.save_codes), ("--input", args.input)):
        if value == "":
            raise UsageError(f"{option} is empty: give a file name")
    check_sampling(args)
    check_threads(args.threads)
    check_gpu_layers(args.gpu_layers)
    if not MIN_SPEED <= args.speed <= MAX_SPEED:
        raise UsageError(f"--speed must be from {MIN_SPEED} to {MAX_SPEED} (1 = as spoken), got {args.speed}")
    if args.speaker is not None and args.speaker < 0:
        raise UsageError(f"--speaker must be >= 0, got {args.speaker}")
    text = read_text(args)
    has_text = text is not None and not is_blank(text)
    if args.save_voice is None and not has_text:
        raise UsageError("no text to speak: give TEXT, '-' for stdin, or --input FILE")
    if args.dialogue and (args.voice or args.speaker is not None):
        raise UsageError("--voice and --speaker do not apply to --dialogue: each line names its speaker")
    if args.dialogue and args.save_voice is not None:
        raise UsageError("--save-voice and --dialogue go in separate runs: save the voice, then name it in the script")
    if args.save_voice is not None and not args.context:
        raise UsageError("--save-voice needs the voice's audio: --context SPEAKER TRANSCRIPT AUDIO")
    return text if has_text else None


def speak_out(tts, frames, args, output: str | None, fmt: str | None, player_command) -> int:
    """Speak `frames` into the output and the player, save the codes if asked, report the speed."""
    from .player import Player

    codes = []

    def kept():
        for frame in frames:
            codes.append(frame)
            yield frame

    tts.codec  # loaded now (seconds, the first time), so the real-time factor below counts only speaking
    player = Player(player_command) if player_command else None
    try:
        n_samples, wall = speak(tts.decode_stream(kept(), chunk_frames=5, speed=args.speed), output, fmt, player)
        if args.save_codes:
            try:
                save_codes(args.save_codes, codes)
            except OSError as e:  # (its folder and name were checked at the start: a full disk, say)
                kept_audio = f"; the audio is whole in {output}" if output and output != "-" else ""
                raise UsageError(f"cannot write --save-codes {args.save_codes} ({e.strerror or e}){kept_audio}"
                                 ) from None
        seconds = n_samples / tts.sample_rate
        rtf = wall / seconds if seconds else float("inf")
        where = f" -> {output}" if output and output != "-" else ""
        print(f"{seconds:.2f} s of audio in {wall:.2f} s (real-time factor {rtf:.2f}){where}", file=sys.stderr)
        if player:
            player.finish()  # the rest is heard before the command ends
    finally:
        if player:
            player.close()
    return 0


def speak(audio_chunks, output: str | None, fmt: str, player) -> tuple[int, float]:
    """Consumes the speech into `output` (a file, "-" for stdout, or None) and the player; returns the
    samples and the seconds they took to make."""
    import numpy as np

    from .audio import StreamEncoder, write_audio

    start = time.perf_counter()
    if player:
        audio_chunks = _heard(audio_chunks, player)
    if output is None:
        n_samples = sum(len(chunk) for chunk in audio_chunks)
    elif output == "-":
        encoder = StreamEncoder(fmt)
        out = sys.stdout.buffer
        n_samples = 0
        try:
            for chunk in audio_chunks:
                out.write(encoder.feed(chunk))
                out.flush()
                n_samples += len(chunk)
            out.write(encoder.finish())
            out.flush()
        finally:
            encoder.close()
    else:
        audio = np.concatenate([np.zeros(0, np.float32), *audio_chunks])
        write_audio(output, audio, fmt)
        n_samples = len(audio)
    return n_samples, time.perf_counter() - start


def _heard(chunks, player):
    for chunk in chunks:
        player.feed(chunk)
        yield chunk


@contextmanager
def taken_name_explained():
    from .voices import VoiceExists

    try:
        yield
    except VoiceExists as e:
        raise UsageError(f"{e}: delete it first (--delete-voice {e.name}), or save under another name") from None


def save_codes(path: str, codes) -> None:
    import io

    import numpy as np

    from .atomic import write_atomic

    buffer = io.BytesIO()
    np.save(buffer, np.stack(codes) if codes else np.zeros((0, 32), np.int64))
    write_atomic(path, buffer.getvalue())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except BrokenPipeError:  # the reader of stdout left (`| head`): stop quietly, as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 141
    except (UsageError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
