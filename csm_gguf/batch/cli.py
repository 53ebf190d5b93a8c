"""python -m csm_gguf.batch INPUT --output-dir DIR: a corpus to audio files and a manifest, on Ray."""

from __future__ import annotations

import argparse
import signal
import sys

from ..formats import FORMATS
from ..sampling import TEMPERATURE, TOP_K

SHOWN_ERRORS = 10  # failed rows listed after the summary (all of them are in the manifest)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m csm_gguf.batch",
        description="Speak every row of INPUT into DIR: one audio file per row (DIR/<id>.<format>) and a line "
        "per row in DIR/manifest.jsonl, on Ray Data: an actor pool of --workers, each loading the model once and "
        "making --streams rows at once. Running again on the same DIR makes only the rows not done yet.",
    )
    p.add_argument("input", metavar="INPUT", help=".txt (one utterance per line; its line number is its id), or "
                   ".jsonl / .csv with 'text' and optionally 'id', 'voice', 'speaker', 'seed'")
    p.add_argument("--output-dir", "-o", required=True, metavar="DIR", help="where the audio files and manifest go")
    p.add_argument("--format", "-f", default="wav", choices=FORMATS, help="audio format (default: %(default)s); "
                   "pcm is raw 16-bit little-endian 24 kHz mono; aac needs ffmpeg")
    p.add_argument("--metadata", choices=("ljspeech",), help="also write DIR/metadata.csv in this layout "
                   "(ljspeech: id|text|text, the audio in DIR/wavs/<id>.wav)")
    p.add_argument("--model", "-m", help="converted model directory, at the same path on every node (default: "
                   "$CSM_GGUF_MODEL, else the cache)")
    p.add_argument("--voice", help="voice of the rows that name none: a built-in voice (OpenAI's names, each a fixed "
                   "prompt made once per model; default alloy for rows without a speaker id), a saved voice, or "
                   "'none' for no prompt")
    p.add_argument("--speaker", type=int, help="speaker id of the rows that give none (default: the voice's, else 0; "
                   "alone, without a voice: no prompt, the raw model)")
    p.add_argument("--temperature", "-t", type=float, default=TEMPERATURE.default,
                   help="sampling temperature; 0 = greedy, with --streams 1 the same speech as `say` (more streams "
                   "share steps, which round differently) (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=TOP_K.default,
                   help="sample among the K likeliest codes (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="a row without its own seed samples with one derived from "
                   "this and its id, so it sounds the same wherever and whenever it is made (default: %(default)s)")
    p.add_argument("--max-audio-ms", type=float, help="cut each piece of speech at this length (default: "
                   "proportional to the text)")
    p.add_argument("--workers", type=int, default=1, help="model copies (Ray actors), each in its own process "
                   "(default: %(default)s)")
    p.add_argument("--streams", type=int, default=4, help="rows each worker makes at once, in the same llama.cpp "
                   "calls (default: %(default)s)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads per worker, and the CPUs Ray reserves for "
                   "it (default: 0, all cores of its node, reserving 1)")
    p.add_argument("--gpu-layers", type=int, default=0, help="layers each worker offloads on CUDA/Metal builds "
                   "(99 or -1: all)")
    p.add_argument("--gpus", type=float, default=0, help="GPUs Ray reserves per worker (e.g. 1 with --gpu-layers 99 "
                   "on a GPU cluster; default: none)")
    p.add_argument("--kv-type", default="f16", choices=("f16", "f32", "q8_0"), help="KV cache type (default: "
                   "%(default)s)")
    p.add_argument("--address", help="join a running Ray cluster: 'auto', HOST:6379 or ray://HOST:10001 (default: "
                   "start Ray inside this process)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .rows import InputError
    from .run import synthesize

    # `kill` and a scheduler's SIGTERM stop the run as Ctrl-C does: Ray is shut down, no file is left half made.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        summary = synthesize(
            args.input, args.output_dir, model=args.model, format=args.format, voice=args.voice,
            speaker=args.speaker, temperature=args.temperature, top_k=args.top_k, seed=args.seed,
            max_audio_ms=args.max_audio_ms, workers=args.workers, streams=args.streams, threads=args.threads,
            gpu_layers=args.gpu_layers, gpus=args.gpus, kv_type=args.kv_type, address=args.address,
            metadata=args.metadata, progress=not args.no_progress)
    except (InputError, ValueError, OSError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print("interrupted: the rows written so far are kept; run the same command again to make the rest",
              file=sys.stderr)
        return 128 + signal.SIGTERM if isinstance(e, Terminated) else 130  # as other commands killed so exit
    finally:
        signal.signal(signal.SIGTERM, previous)
    for line in summary.errors[:SHOWN_ERRORS]:
        print(f"failed: {line}", file=sys.stderr)
    if len(summary.errors) > SHOWN_ERRORS:
        print(f"... and {len(summary.errors) - SHOWN_ERRORS} more (see the manifest)", file=sys.stderr)
    print(summary, file=sys.stderr)
    return 1 if summary.every_row_failed else 0


class Terminated(KeyboardInterrupt):
    """SIGTERM, stopping the run as Ctrl-C does."""


def _interrupt(signum, frame) -> None:
    raise Terminated
