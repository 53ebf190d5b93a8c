"""Weight names: where each CSM tensor lives in the two published formats, and its GGUF name.

Rows read left to right: our name -> (original sesame/csm-1b name, transformers name).
"""

from __future__ import annotations

from csm_gguf.config import CSMConfig, TransformerConfig

ORIGINAL, TRANSFORMERS = 0, 1

# One transformer block, relative to the block's prefix. Keys are llama.cpp's GGUF block names.
BLOCK_TENSORS: dict[str, tuple[str, str]] = {
    "attn_norm": ("sa_norm.scale", "input_layernorm.weight"),
    "attn_q": ("attn.q_proj.weight", "self_attn.q_proj.weight"),
    "attn_k": ("attn.k_proj.weight", "self_attn.k_proj.weight"),
    "attn_v": ("attn.v_proj.weight", "self_attn.v_proj.weight"),
    "attn_output": ("attn.output_proj.weight", "self_attn.o_proj.weight"),
    "ffn_norm": ("mlp_norm.scale", "post_attention_layernorm.weight"),
    "ffn_gate": ("mlp.w1.weight", "mlp.gate_proj.weight"),
    "ffn_down": ("mlp.w2.weight", "mlp.down_proj.weight"),
    "ffn_up": ("mlp.w3.weight", "mlp.up_proj.weight"),
}

# Where each transformer's blocks and final norm live.
TRANSFORMER_PREFIX: dict[str, tuple[str, str]] = {
    "backbone": ("backbone.", "backbone_model."),
    "decoder": ("decoder.", "depth_decoder.model."),
}
OUTPUT_NORM: tuple[str, str] = ("norm.scale", "norm.weight")

# Tensors outside the two transformers.
CSM_TENSORS: dict[str, tuple[str, str]] = {
    "text_embeddings": ("text_embeddings.weight", "embed_text_tokens.weight"),
    "audio_embeddings": ("audio_embeddings.weight", "backbone_model.embed_tokens.embed_audio_tokens.weight"),
    # The original format shares one audio table; transformers keeps a (normally tied) decoder copy
    # that fine-tunes may untie, and then the decoder must use its own.
    "decoder_audio_embeddings": ("audio_embeddings.weight", "depth_decoder.model.embed_tokens.weight"),
    "projection": ("projection.weight", "depth_decoder.model.inputs_embeds_projector.weight"),
    "codebook0_head": ("codebook0_head.weight", "lm_head.weight"),
    "audio_head": ("audio_head", "depth_decoder.codebooks_head.weight"),
}

# transformers saves only one of two tied copies (either one): read the other name instead.
TIED_FALLBACK = {"decoder_audio_embeddings": "audio_embeddings", "audio_embeddings": "decoder_audio_embeddings"}

# Keys that identify each format.
FORMAT_MARKERS: dict[int, str] = {
    ORIGINAL: "backbone.layers.0.attn.q_proj.weight",
    TRANSFORMERS: "backbone_model.layers.0.self_attn.q_proj.weight",
}
CODEC_PREFIX = "codec_model."


def block_source_name(model: str, layer: int, gguf_name: str, fmt: int) -> str:
    return f"{TRANSFORMER_PREFIX[model][fmt]}layers.{layer}.{BLOCK_TENSORS[gguf_name][fmt]}"


def output_norm_source_name(model: str, fmt: int) -> str:
    return TRANSFORMER_PREFIX[model][fmt] + OUTPUT_NORM[fmt]


def block_shapes(t: TransformerConfig) -> dict[str, tuple[int, ...]]:
    """numpy (row-major) shapes of one block's tensors, by GGUF name."""
    d, q, kv = t.n_embd, t.n_head * t.head_dim, t.n_head_kv * t.head_dim
    return {
        "attn_norm": (d,), "attn_q": (q, d), "attn_k": (kv, d), "attn_v": (kv, d), "attn_output": (d, q),
        "ffn_norm": (d,), "ffn_gate": (t.n_ff, d), "ffn_down": (d, t.n_ff), "ffn_up": (t.n_ff, d),
    }  # fmt: skip


def csm_shapes(c: CSMConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of the tensors outside the transformers, by our name (as CSM_TENSORS)."""
    d, dd, v, k = c.backbone.n_embd, c.decoder.n_embd, c.audio_vocab_size, c.num_codebooks
    return {
        "text_embeddings": (c.text_vocab_size, d),
        "audio_embeddings": (k * v, d),
        "decoder_audio_embeddings": (k * v, d),
        "projection": (dd, d),
        "codebook0_head": (v, d),
        "audio_head": (k - 1, dd, v),
    }
