"""python -m csm_gguf.convert: a CSM checkpoint -> a csm-gguf model directory."""

from __future__ import annotations

import argparse
import signal
import sys
import warnings

QTYPE_CHOICES = ("f32", "f16", "bf16", "q8_0", "q4_k")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m csm_gguf.convert",
        description="Convert Sesame CSM weights (original or transformers format) into a model directory: "
        "backbone.gguf and decoder.gguf (llama models stock llama.cpp loads), csm.gguf (embeddings, heads, "
        "config, Mimi codec) and tokenizer.gguf (the Llama 3 tokenizer as a vocab-only llama model). "
        "CSM_GGUF_VERBOSE=1 shows llama.cpp's quantizer log.",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model-id", default="sesame/csm-1b", help="hub repo to download (default: %(default)s; "
                     "uses HF_TOKEN or your hub login; unsloth/csm-1b is an ungated copy)")
    src.add_argument("--model-path", help="local checkpoint folder (config.json + safetensors, single or sharded)")
    src.add_argument("--random-weights", action="store_true",
                     help="full-size CSM-1B with random weights, for benchmarks (needs transformers; the tokenizer "
                     "comes from the llama-models package, --tokenizer-path, or the hub)")
    p.add_argument("--output-dir", help="where to write the model (default: a per-user cache directory)")
    p.add_argument("--qtype", default="q4_k", choices=QTYPE_CHOICES,
                   help="precision of the transformers (q4_k = llama.cpp Q4_K_M; default: %(default)s)")
    p.add_argument("--decoder-qtype", choices=QTYPE_CHOICES,
                   help="precision of the depth decoder, the quantization-sensitive part (default: as --qtype)")
    p.add_argument("--tokenizer-id", help="hub repo with tokenizer.json, for checkpoints without one "
                   "(default for those: unsloth/Llama-3.2-1B)")
    p.add_argument("--tokenizer-path", help="local tokenizer.json (or its folder)")
    p.add_argument("--mimi-id", help="hub repo with Mimi weights, for original-format checkpoints that carry "
                   "no codec (default for those: kyutai/mimi)")
    p.add_argument("--mimi-path", help="local Mimi weights: a kyutai/mimi folder or moshi's "
                   "tokenizer-e351c8d8-checkpoint125.safetensors")
    return p


def check_arguments(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Arguments that would be ignored or taken for another: an empty path was the default (the cache's model
    replaced, the hub's checkpoint downloaded), and random weights draw their own codec from no source."""
    for option in ("model_path", "output_dir", "tokenizer_path", "mimi_path"):
        if getattr(args, option) == "":
            p.error(f"--{option.replace('_', '-')} is empty: give a folder (or leave the option out)")
    if args.random_weights:
        ignored = [f"--{o.replace('_', '-')}" for o in ("mimi_path", "mimi_id", "tokenizer_id") if getattr(args, o)]
        if ignored:
            p.error(f"--random-weights draws its own codec and reads the Llama 3 tokenizer from --tokenizer-path "
                    f"(or llama-models): {', '.join(ignored)} would be ignored")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_arguments(parser, args)
    from converter.checkpoint import CheckpointError
    from converter.convert import convert
    from converter.gguf_files import ConversionError

    # `kill` and `timeout` stop a conversion like Ctrl-C does: through its clean-up, leaving no partial model.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    warnings.showwarning = lambda message, *_: print(f"warning: {message}", file=sys.stderr)
    try:
        if args.random_weights:
            try:
                import transformers  # noqa: F401  (its MimiModel draws the random codec: fail before any work)
            except ImportError as e:
                raise ConversionError("--random-weights needs transformers: pip install -e '.[convert]'") from e
            from converter.random_weights import convert_random

            out = convert_random(args.output_dir, args.qtype, args.decoder_qtype, tokenizer_path=args.tokenizer_path)
        else:
            out = convert(
                model_id=None if args.model_path else args.model_id,
                model_path=args.model_path,
                output_dir=args.output_dir,
                qtype=args.qtype,
                decoder_qtype=args.decoder_qtype,
                tokenizer_id=args.tokenizer_id,
                tokenizer_path=args.tokenizer_path,
                mimi_id=args.mimi_id,
                mimi_path=args.mimi_path,
            )
    except (CheckpointError, ConversionError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # cleaned up already (nothing half-written is left): no traceback
        print("interrupted: nothing was written", file=sys.stderr)
        return 130
    except SystemExit as e:
        if e.code == 128 + signal.SIGTERM:  # `kill`, `timeout`: cleaned up as for Ctrl-C
            print("terminated: nothing was written", file=sys.stderr)
        raise
    print(f"model written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
