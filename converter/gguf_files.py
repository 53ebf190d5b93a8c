"""Writing GGUF files: the two transformers as stock llama.cpp `llama` models, and the sidecar.

Tensors are written one at a time as they are produced, so converting the full model never holds
more than one tensor in memory.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import gguf
import numpy as np
from tqdm import tqdm

from csm_gguf.config import TransformerConfig

from .tensor_map import block_shapes

Q = gguf.GGMLQuantizationType

# What each --qtype means for the files: (transformer file base type, llama.cpp ftype or None,
# sidecar table type). K-quants and q8_0 are made by llama.cpp's own quantizer from an F32 file.
QTYPES: dict[str, tuple[Q, int | None, Q]] = {
    "f32": (Q.F32, None, Q.F32),
    "f16": (Q.F16, None, Q.F16),
    "bf16": (Q.BF16, None, Q.BF16),
    "q8_0": (Q.F32, 7, Q.F16),  # LLAMA_FTYPE_MOSTLY_Q8_0
    "q4_k": (Q.F32, 15, Q.F16),  # LLAMA_FTYPE_MOSTLY_Q4_K_M
}


class ConversionError(ValueError):
    pass


@dataclass
class TensorSpec:
    name: str
    shape: tuple[int, ...]  # numpy (row-major) shape
    qtype: Q
    produce: Callable[[], np.ndarray]  # float32 data of `shape`


def _encode(data: np.ndarray, qtype: Q) -> np.ndarray:
    if qtype == Q.F32:
        return np.ascontiguousarray(data, dtype=np.float32)
    if qtype == Q.F16:
        return np.ascontiguousarray(data, dtype=np.float16)
    return gguf.quants.quantize(np.ascontiguousarray(data, dtype=np.float32), qtype)


def _nbytes(shape: tuple[int, ...], qtype: Q) -> int:
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape[:-1], dtype=np.int64)) * shape[-1] // block * type_size


def write_gguf(
    path: Path, arch: str, metadata: Callable[[gguf.GGUFWriter], None], tensors: list[TensorSpec], desc: str
) -> None:
    writer = gguf.GGUFWriter(str(path), arch)
    metadata(writer)
    for t in tensors:
        block = gguf.GGML_QUANT_SIZES[t.qtype][0]
        if t.shape[-1] % block:
            raise ConversionError(f"{t.name}: row length {t.shape[-1]} is not a multiple of {block} for {t.qtype.name}")
        writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), _nbytes(t.shape, t.qtype), raw_dtype=t.qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in tqdm(tensors, desc=desc, unit="tensor", leave=False):
        data = t.produce()
        if tuple(data.shape) != t.shape:
            raise ConversionError(f"{t.name}: expected shape {t.shape}, the checkpoint has {tuple(data.shape)}")
        writer.write_tensor_data(_encode(data, t.qtype))
    writer.close()


def llama_tensors(
    cfg: TransformerConfig,
    n_vocab: int,
    token_embd: Callable[[], np.ndarray],
    block: Callable[[int, str], np.ndarray],
    output_norm: Callable[[], np.ndarray],
    qtype: Q,
) -> list[TensorSpec]:
    """The tensors of a llama.cpp `llama` model, in the order llama.cpp's own converter writes them."""
    d, hd = cfg.n_embd, cfg.head_dim
    shapes = block_shapes(cfg)
    specs = [
        TensorSpec("token_embd.weight", (n_vocab, d), qtype, token_embd),
        TensorSpec(
            "rope_freqs.weight", (hd // 2,), Q.F32, lambda: np.asarray(cfg.rope_factors(), dtype=np.float32)
        ),
    ]
    for i in range(cfg.n_layer):
        for name, shape in shapes.items():
            specs.append(
                TensorSpec(
                    f"blk.{i}.{name}.weight",
                    shape,
                    Q.F32 if len(shape) == 1 else qtype,
                    lambda i=i, name=name: block(i, name),
                )
            )
    specs.append(TensorSpec("output_norm.weight", (d,), Q.F32, output_norm))
    return specs


def llama_metadata(
    cfg: TransformerConfig, n_vocab: int, name: str, file_type: int, with_tokenizer: bool = False
) -> Callable[[gguf.GGUFWriter], None]:
    """llama.cpp's hyper-parameter keys (a vocab-only model needs them too)."""
    def add(w: gguf.GGUFWriter) -> None:
        w.add_name(name)
        w.add_file_type(file_type)
        w.add_context_length(cfg.max_seq_len)
        w.add_embedding_length(cfg.n_embd)
        w.add_block_count(cfg.n_layer)
        w.add_feed_forward_length(cfg.n_ff)
        w.add_head_count(cfg.n_head)
        w.add_head_count_kv(cfg.n_head_kv)
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
        w.add_rope_dimension_count(cfg.head_dim)
        w.add_rope_freq_base(cfg.rope_theta)
        w.add_layer_norm_rms_eps(cfg.norm_eps)
        w.add_vocab_size(n_vocab)
        if not with_tokenizer:
            # Inputs are embeddings we compute ourselves: the model carries no tokenizer.
            w.add_tokenizer_model("none")

    return add


FILE_TYPE = {Q.F32: 0, Q.F16: 1, Q.BF16: 32}


def quantize(src: Path, dst: Path, ftype: int, n_threads: int = 0) -> None:
    """llama.cpp's own quantizer, so quantized bytes are the real ggml layout."""
    import llama_cpp

    import csm_gguf.llama  # noqa: F401  (its log filter: the quantizer's line per tensor only for CSM_GGUF_VERBOSE)

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = n_threads
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise ConversionError(f"llama.cpp failed to quantize {src.name} (code {rc})")


def tokenizer_metadata(tokenizer_json: dict) -> Callable[[gguf.GGUFWriter], None]:
    """The Llama 3 byte-level BPE tokenizer as llama.cpp's `gpt2` / `llama-bpe` vocabulary."""
    model = tokenizer_json["model"]
    if model.get("type") != "BPE":
        raise ConversionError(f"expected a BPE tokenizer.json (Llama 3), got {model.get('type')!r}")
    vocab: dict[str, int] = dict(model["vocab"])
    special = set()
    for t in tokenizer_json.get("added_tokens", []):
        vocab[t["content"]] = t["id"]
        if t.get("special"):
            special.add(t["id"])
    size = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [gguf.TokenType.UNUSED] * size
    for text, i in vocab.items():
        tokens[i] = text
        types[i] = gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]

    def add(w: gguf.GGUFWriter) -> None:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("llama-bpe")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        w.add_bos_token_id(vocab["<|begin_of_text|>"])
        w.add_eos_token_id(vocab["<|end_of_text|>"])
        w.add_add_bos_token(False)

    return add


def chain(*parts: Callable[[gguf.GGUFWriter], None]) -> Callable[[gguf.GGUFWriter], None]:
    def add(w: gguf.GGUFWriter) -> None:
        for part in parts:
            part(w)

    return add


def tensors_of(items: Iterable[tuple[str, tuple[int, ...], Q, Callable[[], np.ndarray]]]) -> list[TensorSpec]:
    return [TensorSpec(*item) for item in items]
