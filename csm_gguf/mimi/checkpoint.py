"""The kyutai/mimi checkpoint layout, and how each of Mimi's tensors is made from it (`checkpoint_table`).

In the checkpoint the SEANet stacks are flat lists whose indices also count the parameterless ELUs, attention
keeps q, k and v apart (q's and k's RoPE pairs as halves, transformers' order), the layer scales are separate,
and the codebooks are k-means statistics; the modules here fuse or fold all of that.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .config import MimiConfig
from .transformer import _k_blocks


def _same(w: Tensor) -> Tensor:
    return w


def _qkv_rows(q: Tensor, k: Tensor, v: Tensor, head_dim: int) -> Tensor:
    # transformers' checkpoints hold each head's RoPE pairs as halves (first elements, then second
    # elements): put each pair side by side again, and scale q as attention would (TransformerLayer).
    def pairs(w: Tensor) -> Tensor:
        return w.unflatten(0, (-1, 2, head_dim // 2)).transpose(1, 2).flatten(0, 2)

    return torch.cat([pairs(q) / math.sqrt(head_dim), pairs(k), v])


def _scaled_rows(w: Tensor, scale: Tensor) -> Tensor:
    return w * scale[:, None]  # LayerScale(W x) == (diag(scale) W) x


def _conv1x1_as_linear(w: Tensor) -> Tensor:
    return w[..., 0]


def _conv1x1_columns(*ws: Tensor) -> Tensor:
    return torch.cat([w[..., 0] for w in ws], dim=1)  # [W1 W2] [x1; x2] == W1 x1 + W2 x2


def _conv_taps(w: Tensor) -> Tensor:
    return w.permute(2, 0, 1).contiguous()  # [C_out, C_in, k] -> [k, C_out, C_in]


def _convtr_taps(w: Tensor) -> Tensor:
    return w.permute(2, 1, 0).contiguous()  # [C_in, C_out / groups, k] -> [k, C_out / groups, C_in]


def _codebooks(*sums_and_usages: Tensor) -> Tensor:
    # The checkpoint keeps k-means statistics: vector = embed_sum / cluster_usage, clamped as in training.
    pairs = zip(sums_and_usages[::2], sums_and_usages[1::2])
    return torch.stack([embed_sum / usage.clamp(min=1e-5)[:, None] for embed_sum, usage in pairs])


def checkpoint_table(cfg: MimiConfig) -> list[tuple[str, Callable[..., Tensor], list[str]]]:
    """(our tensor, how to make it, the kyutai/mimi checkpoint tensors it is made from).

    In the checkpoint the SEANet stacks are flat lists whose indices also count the parameterless ELUs:
    the decoder is [conv, (ELU, convtr, res * n) per ratio, ELU, conv], the encoder
    [conv, (res * n, ELU, conv) per ratio, ELU, conv], and a residual unit is [ELU, conv, ELU, conv].
    """
    table: list[tuple[str, Callable[..., Tensor], list[str]]] = []

    def conv(ours: str, theirs: str, bias: bool = True, taps: Callable[[Tensor], Tensor] = _conv_taps) -> None:
        table.append((f"{ours}.weight", taps, [f"{theirs}.weight"]))
        if bias:
            table.append((f"{ours}.bias", _same, [f"{theirs}.bias"]))

    def res_units(ours: str, theirs: str, first: int) -> None:
        for j in range(cfg.num_residual_layers):
            conv(f"{ours}.res.{j}.conv1", f"{theirs}.layers.{first + j}.block.1.conv")
            conv(f"{ours}.res.{j}.conv2", f"{theirs}.layers.{first + j}.block.3.conv")

    n_res, n_blocks = cfg.num_residual_layers, len(cfg.upsampling_ratios)
    last = 2 + n_blocks * (n_res + 2)
    for side in ("encoder", "decoder"):
        conv(f"{side}.conv_in", f"{side}.layers.0.conv")
        conv(f"{side}.conv_out", f"{side}.layers.{last}.conv")
        for b in range(n_blocks):
            first = 1 + b * (n_res + 2)  # the block's first entry
            if side == "encoder":
                res_units(f"encoder.blocks.{b}", "encoder", first)
                conv(f"encoder.blocks.{b}.down", f"encoder.layers.{first + n_res + 1}.conv")
            else:
                conv(f"decoder.blocks.{b}.up", f"decoder.layers.{first + 1}.conv", taps=_convtr_taps)
                res_units(f"decoder.blocks.{b}", "decoder", first + 2)
    conv("downsample", "downsample.conv", bias=False)
    conv("upsample", "upsample.conv", bias=False, taps=_convtr_taps)

    def qkv_rows(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return _qkv_rows(q, k, v, cfg.head_dim)

    def fc2_blocks(w: Tensor, scale: Tensor) -> Tensor:
        return _scaled_rows(w, scale).unflatten(1, (_k_blocks(cfg), -1)).transpose(0, 1).contiguous()

    for side in ("encoder_transformer", "decoder_transformer"):
        for i in range(cfg.num_hidden_layers):
            p = f"{side}.layers.{i}"  # the same prefix on both sides
            table += [
                (f"{p}.norm1.weight", _same, [f"{p}.input_layernorm.weight"]),
                (f"{p}.norm1.bias", _same, [f"{p}.input_layernorm.bias"]),
                (f"{p}.qkv.weight", qkv_rows, [f"{p}.self_attn.{x}_proj.weight" for x in "qkv"]),
                (f"{p}.out.weight", _scaled_rows, [f"{p}.self_attn.o_proj.weight", f"{p}.self_attn_layer_scale.scale"]),
                (f"{p}.norm2.weight", _same, [f"{p}.post_attention_layernorm.weight"]),
                (f"{p}.norm2.bias", _same, [f"{p}.post_attention_layernorm.bias"]),
                (f"{p}.fc1.weight", _same, [f"{p}.mlp.fc1.weight"]),
                (f"{p}.fc2", fc2_blocks, [f"{p}.mlp.fc2.weight", f"{p}.mlp_layer_scale.scale"]),
            ]

    rvqs = {
        "semantic": ("quantizer.semantic_residual_vector_quantizer", cfg.num_semantic_quantizers),
        "acoustic": ("quantizer.acoustic_residual_vector_quantizer", cfg.num_quantizers - cfg.num_semantic_quantizers),
    }
    stats = []
    for ours, (theirs, n) in rvqs.items():
        table.append((f"quantizer.{ours}_in.weight", _conv1x1_as_linear, [f"{theirs}.input_proj.weight"]))
        stats += [f"{theirs}.layers.{j}.codebook.{s}" for j in range(n) for s in ("embed_sum", "cluster_usage")]
    out_projs = [f"{theirs}.output_proj.weight" for theirs, _ in rvqs.values()]
    table.append(("quantizer.out.weight", _conv1x1_columns, out_projs))
    table.append(("quantizer.codebooks", _codebooks, stats))
    return table
