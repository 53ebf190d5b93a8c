"""Mimi weights from any published layout to the kyutai/mimi checkpoint layout (transformers MimiModel keys
as saved on disk), which is what csm_gguf.mimi.Mimi.from_state_dict reads.

Layouts accepted, detected from the keys:
- kyutai/mimi: `encoder.layers.*`, `encoder_transformer.*`, `downsample.*`, `quantizer.*`, ... (flat);
- transformers >= 5 in memory (`MimiModel.state_dict()`), which nests the halves:
  `encoder.encoder_seanet.*`, `encoder.encoder_transformer.*`, `decoder.decoder_seanet.*`, ...;
- either of those under `codec_model.` (the codec inside a transformers-format CSM checkpoint; the
  checkpoint's other tensors are ignored);
- moshi's `tokenizer-e351c8d8-checkpoint125.safetensors` (`encoder.model.*`, `*.transformer.*`, `rvq_first`),
  and what today's moshi `MimiModel.state_dict()` holds (the same, with `in_projs.0` / `out_projs.0`).
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import torch

# kyutai/mimi's config.json (moshi's checkpoint carries none), with the 32 codebooks CSM uses.
MOSHI_MIMI_CONFIG: dict[str, Any] = {
    "model_type": "mimi",
    "sampling_rate": 24000,
    "frame_rate": 12.5,
    "audio_channels": 1,
    "hidden_size": 512,
    "num_filters": 64,
    "num_residual_layers": 1,
    "upsampling_ratios": [8, 6, 5, 4],
    "kernel_size": 7,
    "last_kernel_size": 3,
    "residual_kernel_size": 3,
    "dilation_growth_rate": 2,
    "use_causal_conv": True,
    "pad_mode": "constant",
    "compress": 2,
    "trim_right_ratio": 1.0,
    "codebook_size": 2048,
    "codebook_dim": 256,
    "num_quantizers": 32,
    "use_conv_shortcut": False,
    "vector_quantization_hidden_dimension": 256,
    "num_semantic_quantizers": 1,
    "upsample_groups": 512,
    "num_hidden_layers": 8,
    "intermediate_size": 2048,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "hidden_act": "gelu",
    "max_position_embeddings": 8000,
    "norm_eps": 1e-05,
    "rope_theta": 10000.0,
    "sliding_window": 250,
    "layer_scale_initial_scale": 0.01,
    "attention_bias": False,
}

CODEC_PREFIX = "codec_model."

# transformers >= 5 nests the halves in memory; on disk (save_pretrained, kyutai/mimi) they are flat.
NESTED_TO_FLAT: dict[str, str] = {
    "encoder.encoder_seanet.": "encoder.",
    "encoder.encoder_transformer.": "encoder_transformer.",
    "encoder.downsample.": "downsample.",
    "decoder.upsample.": "upsample.",
    "decoder.decoder_transformer.": "decoder_transformer.",
    "decoder.decoder_seanet.": "decoder.",
    "quantizer.": "quantizer.",
}

# moshi name -> kyutai/mimi name. {i}, {j}, {l}: indices; {p}: weight or bias; {side}: en or de;
# {rvq}/{RVQ}: the split RVQ's halves. The attention's fused in_proj_weight is split separately.
MOSHI_TO_FLAT: list[tuple[str, str]] = [
    ("{side}coder.model.{i}.conv.conv.{p}", "{side}coder.layers.{i}.conv.{p}"),
    ("{side}coder.model.{i}.convtr.convtr.{p}", "{side}coder.layers.{i}.conv.{p}"),
    ("{side}coder.model.{i}.block.{j}.conv.conv.{p}", "{side}coder.layers.{i}.block.{j}.conv.{p}"),
    ("downsample.conv.conv.conv.weight", "downsample.conv.weight"),
    ("upsample.convtr.convtr.convtr.weight", "upsample.conv.weight"),
    ("{side}coder_transformer.transformer.layers.{l}.self_attn.{out_proj}.weight",
     "{side}coder_transformer.layers.{l}.self_attn.o_proj.weight"),
    ("{side}coder_transformer.transformer.layers.{l}.norm1.{p}",
     "{side}coder_transformer.layers.{l}.input_layernorm.{p}"),
    ("{side}coder_transformer.transformer.layers.{l}.norm2.{p}",
     "{side}coder_transformer.layers.{l}.post_attention_layernorm.{p}"),
    ("{side}coder_transformer.transformer.layers.{l}.linear1.weight",
     "{side}coder_transformer.layers.{l}.mlp.fc1.weight"),
    ("{side}coder_transformer.transformer.layers.{l}.linear2.weight",
     "{side}coder_transformer.layers.{l}.mlp.fc2.weight"),
    ("{side}coder_transformer.transformer.layers.{l}.layer_scale_1.scale",
     "{side}coder_transformer.layers.{l}.self_attn_layer_scale.scale"),
    ("{side}coder_transformer.transformer.layers.{l}.layer_scale_2.scale",
     "{side}coder_transformer.layers.{l}.mlp_layer_scale.scale"),
    ("quantizer.{rvq}.input_proj.weight", "quantizer.{RVQ}.input_proj.weight"),
    ("quantizer.{rvq}.output_proj.weight", "quantizer.{RVQ}.output_proj.weight"),
    ("quantizer.{rvq}.vq.layers.{j}._codebook.embedding_sum", "quantizer.{RVQ}.layers.{j}.codebook.embed_sum"),
    ("quantizer.{rvq}.vq.layers.{j}._codebook.cluster_usage", "quantizer.{RVQ}.layers.{j}.codebook.cluster_usage"),
]  # fmt: skip
MOSHI_IN_PROJ = "{side}coder_transformer.transformer.layers.{l}.self_attn.{in_proj}"
FLAT_QKV = "{side}coder_transformer.layers.{l}.self_attn.{x}_proj.weight"
RVQ_NAMES = {"rvq_first": "semantic_residual_vector_quantizer", "rvq_rest": "acoustic_residual_vector_quantizer"}

# Codebook "initialized" flags only steer k-means initialisation in training: nothing reads them at runtime.
UNUSED = re.compile(r".*\.(_codebook\._initialized|codebook\.initialized)")

_FIELDS = {
    "side": "en|de", "i": r"\d+", "j": r"\d+", "l": r"\d+", "p": "weight|bias", "rvq": "rvq_first|rvq_rest",
    # the checkpoint's names, or moshi's modules of today (projections in lists of one)
    "in_proj": r"in_proj_weight|in_projs\.0\.weight", "out_proj": r"out_proj|out_projs\.0",
}  # fmt: skip


def _pattern(template: str) -> re.Pattern[str]:
    parts = re.split(r"\{(\w+)\}", template)  # literal, field, literal, field, ...
    return re.compile(
        "".join(re.escape(part) if n % 2 == 0 else f"(?P<{part}>{_FIELDS[part]})" for n, part in enumerate(parts))
    )


_MOSHI_PATTERNS = [(_pattern(src), dst) for src, dst in MOSHI_TO_FLAT]
_MOSHI_IN_PROJ_PATTERN = _pattern(MOSHI_IN_PROJ)


def _as_torch(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.from_numpy(np.array(x))


def _rope_pairs_to_halves(w: torch.Tensor, head_dim: int) -> torch.Tensor:
    # moshi rotates interleaved pairs of each head's rows (0,1), (2,3), ...; transformers' rotate_half
    # wants each head's pair-firsts then pair-seconds. The same rotation, once the rows are reordered.
    rows, cols = w.shape
    if rows % head_dim:
        raise ValueError(f"attention in_proj rows ({rows}) are not whole heads of head_dim {head_dim}")
    return w.reshape(rows // head_dim, head_dim // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def _from_moshi(tensors: dict[str, torch.Tensor], head_dim: int) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, value in tensors.items():
        if UNUSED.fullmatch(name):
            continue
        if m := _MOSHI_IN_PROJ_PATTERN.fullmatch(name):
            q, k, v = value.chunk(3)  # rows are q, k, v
            parts = {"q": _rope_pairs_to_halves(q, head_dim), "k": _rope_pairs_to_halves(k, head_dim), "v": v}
            for x, w in parts.items():
                out[FLAT_QKV.format(x=x, **m.groupdict())] = w
            continue
        for pattern, dst in _MOSHI_PATTERNS:
            if m := pattern.fullmatch(name):
                fields = m.groupdict()
                if "rvq" in fields:
                    fields["RVQ"] = RVQ_NAMES[fields["rvq"]]
                out[dst.format(**fields)] = value
                break
        else:
            raise ValueError(f"unexpected tensor {name!r} in a moshi Mimi checkpoint")
    return out


def _from_nested(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, value in tensors.items():
        prefix = next((p for p in NESTED_TO_FLAT if name.startswith(p)), None)
        if prefix is None:
            raise ValueError(f"unexpected tensor {name!r} in a transformers MimiModel state dict")
        if not UNUSED.fullmatch(name):
            out[NESTED_TO_FLAT[prefix] + name[len(prefix) :]] = value
    return out


def mimi_tensors_to_transformers(
    tensors: dict[str, np.ndarray | torch.Tensor], head_dim: int = 64
) -> dict[str, torch.Tensor]:
    """Mimi weights in any accepted layout (module docstring) -> kyutai/mimi checkpoint keys.

    `head_dim` (64 in Mimi) is only needed to reorder moshi's q/k rows for rotate-half RoPE.
    """
    if any(k.startswith(CODEC_PREFIX) for k in tensors):
        tensors = {k[len(CODEC_PREFIX) :]: v for k, v in tensors.items() if k.startswith(CODEC_PREFIX)}
    tensors = {k: _as_torch(v) for k, v in tensors.items()}
    keys = set(tensors)

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    if has("encoder.model.") or has("decoder.model.") or has("quantizer.rvq_first."):
        return _from_moshi(tensors, head_dim)
    if has("encoder.encoder_seanet.") or has("decoder.decoder_seanet."):
        return _from_nested(tensors)
    if has("decoder.layers.") or has("encoder.layers.") or has("quantizer.semantic_residual_vector_quantizer."):
        return {k: v for k, v in tensors.items() if not UNUSED.fullmatch(k)}
    sample = sorted(keys)[:3]
    raise ValueError(
        "unrecognised Mimi weights: expected kyutai/mimi keys (decoder.layers.*), transformers MimiModel "
        "state-dict keys (decoder.decoder_seanet.*), either under 'codec_model.', or moshi checkpoint keys "
        f"(decoder.model.*); got {len(keys)} tensors such as {sample}"
    )
