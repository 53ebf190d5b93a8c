"""CSM checkpoint -> model directory: backbone.gguf, decoder.gguf (stock llama.cpp models) + csm.gguf."""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import gguf
import numpy as np

from csm_gguf.model_dir import (
    BACKBONE_FILE,
    DECODER_FILE,
    MODEL_FILES,
    SIDECAR_FILE,
    SIDECAR_VERSION,
    TOKENIZER_FILE,
)

from .checkpoint import Checkpoint, CheckpointError, check_repo_id, download, open_checkpoint, read_json
from .gguf_files import (
    FILE_TYPE,
    QTYPES,
    ConversionError,
    TensorSpec,
    chain,
    llama_metadata,
    llama_tensors,
    quantize,
    tokenizer_metadata,
    write_gguf,
)

Q = gguf.GGMLQuantizationType
CHECKPOINT_PATTERNS = ["*.json", "*.safetensors", "*.model"]
DEFAULT_TOKENIZER_ID = "unsloth/Llama-3.2-1B"
DEFAULT_MIMI_ID = "kyutai/mimi"


def tokenizer_at(tokenizer_path: str) -> Path:
    """The tokenizer.json that --tokenizer-path names: the file, or the one in that folder."""
    tok = Path(tokenizer_path)
    tok = tok / "tokenizer.json" if tok.is_dir() else tok
    if not tok.exists():
        raise CheckpointError(f"no tokenizer.json at {tokenizer_path}")
    return tok


def _tokenizer_file(folder: Path, model_path: str | None, tokenizer_id: str | None,
                    tokenizer_path: str | None, token: str | None) -> Path:
    if tokenizer_path:
        return tokenizer_at(tokenizer_path)
    if tokenizer_id:
        return download(tokenizer_id, ["tokenizer.json"], token, "--tokenizer-path") / "tokenizer.json"
    if (folder / "tokenizer.json").exists():
        return folder / "tokenizer.json"
    if model_path:
        raise CheckpointError(
            f"{folder} has no tokenizer.json: pass --tokenizer-path FILE_OR_DIR or "
            f"--tokenizer-id (e.g. {DEFAULT_TOKENIZER_ID})"
        )
    return download(DEFAULT_TOKENIZER_ID, ["tokenizer.json"], token, "--tokenizer-path") / "tokenizer.json"


def _codec_weights(ckpt: Checkpoint, codec: Path | None, token: str | None) -> tuple[dict, dict[str, np.ndarray]]:
    """Mimi's config and weights in transformers MimiModel keys, from wherever the user has them."""
    from .mimi_keys import MOSHI_MIMI_CONFIG, mimi_tensors_to_transformers

    if codec is None:
        tensors = ckpt.codec_tensors()
        if tensors:
            return runtime_codec(ckpt.codec_config or MOSHI_MIMI_CONFIG, mimi_tensors_to_transformers(tensors),
                                  str(ckpt.folder))
        # Original-format checkpoints carry no codec; said, as a transformers one without it may be a mistake.
        warnings.warn(f"{ckpt.folder} holds no Mimi codec weights: using {DEFAULT_MIMI_ID}'s (--mimi-path: a copy "
                      f"on disk)")
        codec = download(DEFAULT_MIMI_ID, ["*.json", "*.safetensors"], token, "--mimi-path")
    files = [codec] if codec.is_file() else sorted(codec.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no .safetensors Mimi weights in {codec}")
    raw: dict[str, np.ndarray] = {}
    for f in files:
        try:
            raw.update(_load_safetensors_f32(f))
        except Exception as e:
            raise CheckpointError(f"cannot read Mimi weights {f}: {e}") from e
    config_path = (codec if codec.is_dir() else codec.parent) / "config.json"
    config = read_json(config_path) if config_path.exists() else MOSHI_MIMI_CONFIG
    if config.get("model_type") not in (None, "mimi"):
        config = MOSHI_MIMI_CONFIG
    return runtime_codec(config, mimi_tensors_to_transformers(raw), str(codec))


def runtime_codec(config: dict, tensors: dict[str, np.ndarray], source: str) -> tuple[dict, dict[str, np.ndarray]]:
    """The codec's weights as run time uses them: the Mimi built from the checkpoint's tensors (so weights
    that are no Mimi, or not the config's, fail now, not at the first `say` after a conversion that reported
    success), its own state dict in float32. The sidecar stores that, which run time maps as it is."""
    from csm_gguf.mimi import Mimi, MimiConfig

    try:
        mimi = Mimi.from_state_dict(MimiConfig.from_transformers(config), tensors)
    # TypeError and ZeroDivisionError: a Mimi config with values of the wrong type (a string size, 0 heads).
    except (KeyError, ValueError, RuntimeError, TypeError, ZeroDivisionError) as e:
        raise CheckpointError(f"the Mimi codec from {source} does not load: {e}") from None
    return config, {key: np.ascontiguousarray(t.numpy()) for key, t in mimi.state_dict().items()}


def _load_safetensors_f32(path: Path) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k).float().numpy() for k in f.keys()}


def _backbone_output(ckpt: Checkpoint) -> np.ndarray:
    # [codebook0_head; projection]: one decode yields codebook-0 logits and the decoder's first input.
    return np.concatenate([ckpt.tensor("codebook0_head"), ckpt.tensor("projection")], axis=0)


def _decoder_inputs(ckpt: Checkpoint) -> np.ndarray:
    # projection(audio embedding) for every (codebook, code) the decoder is fed: codebooks 0..K-2.
    cfg = ckpt.config
    rows = (cfg.num_codebooks - 1) * cfg.audio_vocab_size
    embeddings = ckpt.tensor("decoder_audio_embeddings")[:rows]
    return embeddings @ ckpt.tensor("projection").T


def _audio_head(ckpt: Checkpoint) -> np.ndarray:
    # (K-1, D, V) -> (K-1, V, D): each codebook's logits are then a row-major matrix-vector product.
    return np.ascontiguousarray(ckpt.tensor("audio_head").transpose(0, 2, 1))


def write_model_dir(
    ckpt: Checkpoint,
    tokenizer_json: Path,
    out_dir: Path,
    qtype: str,
    decoder_qtype: str | None,
    codec: tuple[dict, dict[str, np.ndarray]] | None,
    source_name: str,
) -> None:
    if qtype not in QTYPES or (decoder_qtype or qtype) not in QTYPES:
        bad = qtype if qtype not in QTYPES else decoder_qtype
        raise ConversionError(f"unknown qtype {bad!r}; choose one of {', '.join(QTYPES)}")
    decoder_qtype = decoder_qtype or qtype
    try:
        tok = json.loads(tokenizer_json.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read tokenizer {tokenizer_json}: {e}") from e

    out_dir = out_dir.expanduser().resolve()
    check_output_dir(out_dir)  # the callers checked before their slow work; the folder may have changed since
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    except OSError as e:
        raise ConversionError(writing_failed(out_dir, e)) from e
    work.chmod(0o755)  # mkdtemp makes it private; a model directory is an ordinary folder
    try:
        _write_transformers(ckpt, work, qtype, decoder_qtype, source_name)
        _write_sidecar(ckpt, work / SIDECAR_FILE, qtype, decoder_qtype, codec, source_name)
        cfg = ckpt.config
        tokenizer = chain(llama_metadata(cfg.backbone, cfg.text_vocab_size, f"{source_name} tokenizer", 0, True),
                          tokenizer_metadata(tok))
        write_gguf(work / TOKENIZER_FILE, "llama", tokenizer, [], "tokenizer")
        _replace_dir(work, out_dir)
    except BaseException as e:
        shutil.rmtree(work, ignore_errors=True)
        if isinstance(e, OSError):
            raise ConversionError(writing_failed(out_dir, e)) from e
        raise


def writing_failed(out_dir: Path, e: OSError) -> str:
    """What went wrong writing the model, named by the folder the user gave (not the hidden one it is built
    in beside it, nor numpy's byte offsets)."""
    full = e.errno == errno.ENOSPC or "free space" in str(e)  # numpy's tofile says "Not enough free space"
    if full:
        return (f"cannot write the model to {out_dir}: the disk is full (a q4_k model takes about 1.8 GB, other "
                f"qtypes more); nothing was written: free some space, or give an --output-dir on another disk")
    ours = f".{out_dir.name}."  # the hidden folder the model is built in (or the old model kept in while replaced)
    if e.filename and not any(part.startswith(ours) for part in Path(e.filename).parts):  # another file's error
        return f"converting to {out_dir} failed: {e}; nothing was written"
    return f"cannot write the model to {out_dir}: {e.strerror or e}; nothing was written"


def _write_transformers(ckpt: Checkpoint, work: Path, qtype: str, decoder_qtype: str, source_name: str) -> None:
    """backbone.gguf and decoder.gguf: plain llama models, quantized by llama.cpp's own quantizer."""
    cfg = ckpt.config
    models = [
        ("backbone", BACKBONE_FILE, qtype, cfg.backbone, cfg.audio_vocab_size + cfg.decoder.n_embd,
         lambda: _backbone_output(ckpt)),
        # The decoder's logits come from per-codebook heads in the sidecar; its own output is unused.
        ("decoder", DECODER_FILE, decoder_qtype, cfg.decoder, 1,
         lambda: np.zeros((1, cfg.decoder.n_embd), np.float32)),
    ]
    for model, filename, qt, tcfg, n_vocab, token_embd in models:
        base, ftype, _ = QTYPES[qt]
        tensors = llama_tensors(
            tcfg,
            n_vocab,
            token_embd,
            lambda i, name, model=model: ckpt.block_tensor(model, i, name),
            lambda model=model: ckpt.output_norm(model),
            base,
        )
        meta = llama_metadata(tcfg, n_vocab, f"{source_name} {model}", FILE_TYPE[base])
        target = work / filename
        if ftype is None:
            write_gguf(target, "llama", meta, tensors, f"{model} ({qt})")
        else:
            unquantized = work / f"{filename}.f32"
            write_gguf(unquantized, "llama", meta, tensors, f"{model} (f32)")
            quantize(unquantized, target, ftype)
            unquantized.unlink()


def _write_sidecar(ckpt: Checkpoint, target: Path, qtype: str, decoder_qtype: str,
                   codec: tuple[dict, dict[str, np.ndarray]] | None, source_name: str) -> None:
    """csm.gguf: the embedding tables, the decoder's input table, the codebook heads, the config and the codec."""
    cfg = ckpt.config
    table = QTYPES[qtype][2]
    # Text embeddings are the largest table and are read only for prompt tokens: q8_0 halves them.
    text_type = Q.Q8_0 if QTYPES[qtype][1] is not None else table
    # The heads belong to the depth decoder, the quantization-sensitive part: they follow its precision,
    # with Q8_0 (ggml's fastest matrix-vector type here) for quantized decoders.
    head_type = Q.Q8_0 if QTYPES[decoder_qtype][1] is not None else QTYPES[decoder_qtype][2]
    k1 = cfg.num_codebooks - 1
    sidecar = [
        TensorSpec("text_embd.weight", (cfg.text_vocab_size, cfg.backbone.n_embd), text_type,
                   lambda: ckpt.tensor("text_embeddings")),
        TensorSpec("audio_embd.weight", (cfg.num_codebooks * cfg.audio_vocab_size, cfg.backbone.n_embd), table,
                   lambda: ckpt.tensor("audio_embeddings")),
        TensorSpec("decoder_input.weight", (k1 * cfg.audio_vocab_size, cfg.decoder.n_embd), table,
                   lambda: _decoder_inputs(ckpt)),
        TensorSpec("audio_head.weight", (k1, cfg.audio_vocab_size, cfg.decoder.n_embd), head_type,
                   lambda: _audio_head(ckpt)),
    ]
    codec_config: dict | None = None
    codec_keys: list[str] = []
    if codec is not None:
        codec_config, codec_tensors = codec
        codec_keys = list(codec_tensors)
        for i, key in enumerate(codec_keys):
            value = codec_tensors[key]
            # F32, as the codec computes: run time uses the mapped file as the weights, copying nothing.
            # GGUF tensor names stop at 63 characters: number them and list the real keys.
            sidecar.append(TensorSpec(f"codec.{i}", tuple(value.shape), Q.F32, lambda v=value: v))

    def sidecar_meta(w: gguf.GGUFWriter) -> None:
        w.add_uint32("csm.version", SIDECAR_VERSION)
        w.add_string("csm.config", cfg.to_json())
        w.add_string("csm.qtype", qtype)
        w.add_string("csm.decoder_qtype", decoder_qtype)
        w.add_string("csm.source", source_name)
        if codec_config is not None:
            w.add_string("csm.codec_config", json.dumps(codec_config))
            w.add_array("csm.codec_keys", codec_keys)

    write_gguf(target, "csm", sidecar_meta, sidecar, "sidecar")


def check_output_dir(out_dir: Path) -> None:
    """The model goes to a new folder, an empty one, or replaces a csm-gguf model: never over anything else
    (replacing a folder deletes what it held). It is built beside the folder and renamed into place, so
    what cannot be renamed, or written beside, is refused now rather than after the work."""
    if out_dir.is_mount():
        raise ConversionError(f"--output-dir {out_dir} is a mount point, which cannot be replaced by a finished "
                              f"model: give a folder inside it, such as {out_dir / 'csm-1b'}")
    if out_dir.exists():
        if not out_dir.is_dir():
            raise ConversionError(f"--output-dir {out_dir} is a file: give a new folder (or a model to replace)")
        others = sorted(set(os.listdir(out_dir)) - set(MODEL_FILES))
        if others:
            raise ConversionError(
                f"--output-dir {out_dir} is not a csm-gguf model folder (it holds {', '.join(others[:3])}"
                f"{', ...' if len(others) > 3 else ''}); converting would delete that: give a new or empty folder"
            )
    for parent in out_dir.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConversionError(f"--output-dir {out_dir}: {parent} is a file, not a folder")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise ConversionError(f"--output-dir {out_dir}: cannot write in {parent}, where the model is built "
                                      "before it moves into place: give a folder in a place you can write")
            break


def _replace_dir(new: Path, target: Path) -> None:
    """Move a finished model into place; an existing model at `target` is replaced only now."""
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        try:
            os.replace(new, target)
        except BaseException:  # failed or interrupted: the old model goes back where it was
            os.replace(old, target)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, target)


def convert(
    *,
    model_id: str | None = "sesame/csm-1b",
    model_path: str | None = None,
    output_dir: str | Path | None = None,
    qtype: str = "q4_k",
    decoder_qtype: str | None = None,
    tokenizer_id: str | None = None,
    tokenizer_path: str | None = None,
    mimi_id: str | None = None,
    mimi_path: str | None = None,
    token: str | None = None,
) -> Path:
    """Convert a checkpoint; returns the model directory."""
    from csm_gguf.model_dir import default_model_dir

    if qtype not in QTYPES or (decoder_qtype is not None and decoder_qtype not in QTYPES):
        bad = qtype if qtype not in QTYPES else decoder_qtype
        raise ConversionError(f"unknown qtype {bad!r}; choose one of {', '.join(QTYPES)}")
    # A mistyped repo name is refused before anything is downloaded or named after it.
    hub_ids = {"--model-path": None if model_path else model_id, "--tokenizer-path": tokenizer_id,
               "--mimi-path": mimi_id}
    for local_option, repo_id in hub_ids.items():
        if repo_id:
            check_repo_id(repo_id, local_option)
    source_name = model_path and Path(model_path).resolve().name or model_id
    out = Path(output_dir) if output_dir else default_model_dir(source_name, qtype, decoder_qtype)
    check_output_dir(out.expanduser().resolve())  # before any download
    token = token or os.environ.get("HF_TOKEN")
    folder = Path(model_path) if model_path else download(model_id, CHECKPOINT_PATTERNS, token)
    ckpt = open_checkpoint(folder)
    unused = ckpt.unused_tensors()
    if unused:
        warnings.warn(f"tensors of the checkpoint that are not part of CSM are left out ({len(unused)}): "
                      f"{', '.join(unused[:5])}{', ...' if len(unused) > 5 else ''}", stacklevel=2)
    tokenizer_json = _tokenizer_file(folder, model_path, tokenizer_id, tokenizer_path, token)
    codec_source = None
    if mimi_path:
        codec_source = Path(mimi_path)
        if not codec_source.exists():
            raise CheckpointError(f"Mimi weights not found at {mimi_path}")
    elif mimi_id:
        codec_source = download(mimi_id, ["*.json", "*.safetensors"], token, "--mimi-path")
    codec = _codec_weights(ckpt, codec_source, token)
    write_model_dir(ckpt, tokenizer_json, out, qtype, decoder_qtype, codec, source_name)
    return out
