"""Tiny random CSM checkpoints built at test time, in both published formats, with the real Llama 3 tokenizer."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from mimi_fixtures import TINY_MIMI_CONFIG, make_tiny_mimi

LLAMA3_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
] + [f"<|reserved_special_token_{i}|>" for i in range(2, 247)]

ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

# Dimensions are multiples of 256 so every qtype (K-quants included) applies to every matrix.
TINY_CSM = dict(
    num_codebooks=32,
    vocab_size=64,  # equal to the tiny codec's codebook size: range masking is a no-op
    text_vocab_size=128256,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    rope_parameters=ROPE,
    codebook_eos_token_id=0,
)
# CSM-1B's own spelling of the same llama3 curve (sesame/csm-1b's config.json, see docs/csm-facts): other
# numbers than ROPE above, identical wavelength thresholds and factors. A converter that read only some of
# them, or assumed torchtune's 8192/1/4, would still pass with ROPE.
REAL_BACKBONE_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 0.125,
                      "high_freq_factor": 0.5, "original_max_position_embeddings": 1024}
REAL_DECODER_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1 / 512,
                     "high_freq_factor": 1 / 128, "original_max_position_embeddings": 16}

TINY_DECODER = dict(
    num_codebooks=32,
    backbone_hidden_size=256,
    vocab_size=64,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=33,
    rope_parameters=ROPE,
)


def tiktoken_encoding():
    """The Llama 3 tokenizer as tiktoken runs it: an encoding independent of the project's (llama.cpp's)."""
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    pattern = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
    return tiktoken.Encoding("llama3", pat_str=pattern,
                             mergeable_ranks=load_tiktoken_bpe(llama3_tokenizer_model()), special_tokens={})


def llama3_tokenizer_model() -> str:
    import llama_models

    return os.path.join(os.path.dirname(llama_models.__file__), "llama3", "tokenizer.model")


def write_tokenizer_json(path: Path) -> Path:
    """The real Llama 3 tokenizer (from the llama-models package) as a tokenizer.json."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    tok = TikTokenConverter(vocab_file=llama3_tokenizer_model(), extra_special_tokens=LLAMA3_SPECIALS).converted()
    tok.save(str(path))
    return path


def make_tiny_csm(seed: int = 0, untie_decoder_embeddings: bool = False, vocab_size: int = 64,
                  backbone_rope: dict = ROPE, decoder_rope: dict = ROPE):
    """A tiny CsmForConditionalGeneration with random weights (std 0.15 keeps logits from being flat).

    `vocab_size` is the audio vocabulary; the tiny codec always has 64 codes."""
    from transformers import CsmConfig, CsmForConditionalGeneration

    config = CsmConfig(
        **{**TINY_CSM, "vocab_size": vocab_size, "rope_parameters": backbone_rope},
        depth_decoder_config={**TINY_DECODER, "vocab_size": vocab_size, "rope_parameters": decoder_rope},
        codec_config=dict(model_type="mimi", **TINY_MIMI_CONFIG),
    )
    torch.manual_seed(seed)
    model = CsmForConditionalGeneration(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("codec_model."):
                continue
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))
        if untie_decoder_embeddings:
            model.depth_decoder.model.embed_tokens.weight = torch.nn.Parameter(
                0.15 * torch.randn(model.depth_decoder.model.embed_tokens.weight.shape, generator=g)
            )
        else:
            model.depth_decoder.model.embed_tokens.weight = model.backbone_model.embed_tokens.embed_audio_tokens.weight
        # The tiny codec with every weight redrawn (its default init hides bugs; see mimi_fixtures).
        model.codec_model.load_state_dict(make_tiny_mimi(seed).state_dict())
    return model


def save_transformers_format(model, folder: Path, tokenizer_json: Path | None, shard: bool = False,
                             published_config: bool = False) -> Path:
    """As transformers publishes it (tied copies dropped); sharded with sesame/csm-1b's index name; with
    `published_config`, RoPE spelled in config.json as sesame/csm-1b's is (rope_theta and rope_scaling)."""
    model.save_pretrained(str(folder), max_shard_size="20MB" if shard else "50GB")
    if published_config:
        _respell_rope(folder / "config.json")
    if shard:
        os.replace(folder / "model.safetensors.index.json", folder / "transformers.safetensors.index.json")
    if tokenizer_json is not None:
        (folder / "tokenizer.json").write_bytes(tokenizer_json.read_bytes())
    return folder


def _respell_rope(path: Path) -> None:
    """transformers 5 writes `rope_parameters`; the published config.json has `rope_theta` + `rope_scaling`."""
    config = json.loads(path.read_text())
    for c in (config, config["depth_decoder_config"]):
        rope = dict(c.pop("rope_parameters"))
        c["rope_theta"] = rope.pop("rope_theta")
        c["rope_scaling"] = rope
    path.write_text(json.dumps(config, indent=2))


# transformers -> original names, written independently of the converter's table.
_BLOCK = {
    "input_layernorm.weight": "sa_norm.scale",
    "self_attn.q_proj.weight": "attn.q_proj.weight",
    "self_attn.k_proj.weight": "attn.k_proj.weight",
    "self_attn.v_proj.weight": "attn.v_proj.weight",
    "self_attn.o_proj.weight": "attn.output_proj.weight",
    "post_attention_layernorm.weight": "mlp_norm.scale",
    "mlp.gate_proj.weight": "mlp.w1.weight",
    "mlp.down_proj.weight": "mlp.w2.weight",
    "mlp.up_proj.weight": "mlp.w3.weight",
}


def _permute_back(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo transformers' rotate_half permutation: half-split rows -> interleaved pairs."""
    rows, dim = w.shape
    hd = rows // n_head
    return w.reshape(n_head, 2, hd // 2, dim).transpose(1, 2).reshape(rows, dim)


def save_original_format(model, folder: Path) -> Path:
    """The same weights as sesame's original checkpoint (model.safetensors + flavor config)."""
    from safetensors.torch import save_file

    cfg = model.config
    dcfg = cfg.depth_decoder_config
    state = model.state_dict()
    out = {}
    for prefix_hf, prefix_orig, c in (
        ("backbone_model.", "backbone.", cfg),
        ("depth_decoder.model.", "decoder.", dcfg),
    ):
        for i in range(c.num_hidden_layers):
            for hf, orig in _BLOCK.items():
                w = state[f"{prefix_hf}layers.{i}.{hf}"]
                if hf.startswith("self_attn.q_proj"):
                    w = _permute_back(w, c.num_attention_heads)
                elif hf.startswith("self_attn.k_proj"):
                    w = _permute_back(w, c.num_key_value_heads)
                out[f"{prefix_orig}layers.{i}.{orig}"] = w
        out[f"{prefix_orig}norm.scale"] = state[f"{prefix_hf}norm.weight"]
    out["text_embeddings.weight"] = state["embed_text_tokens.weight"]
    out["audio_embeddings.weight"] = state["backbone_model.embed_tokens.embed_audio_tokens.weight"]
    out["projection.weight"] = state["depth_decoder.model.inputs_embeds_projector.weight"]
    out["codebook0_head.weight"] = state["lm_head.weight"]
    out["audio_head"] = state["depth_decoder.codebooks_head.weight"]
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous().clone() for k, v in out.items()}, str(folder / "model.safetensors"))

    def flavor(c) -> dict:
        return dict(
            num_layers=c.num_hidden_layers,
            num_heads=c.num_attention_heads,
            num_kv_heads=c.num_key_value_heads,
            embed_dim=c.hidden_size,
            intermediate_dim=c.intermediate_size,
            max_seq_len=c.max_position_embeddings,
            norm_eps=c.rms_norm_eps,
            rope_base=500000.0,
            scale_factor=32.0,
        )

    (folder / "config.json").write_text(
        json.dumps(
            dict(
                backbone_flavor=flavor(cfg),
                decoder_flavor=flavor(dcfg),
                text_vocab_size=cfg.text_vocab_size,
                audio_vocab_size=cfg.vocab_size,
                audio_num_codebooks=cfg.num_codebooks,
            )
        )
    )
    return folder


def save_codec(model, folder: Path) -> Path:
    """The tiny codec alone, as kyutai/mimi publishes it (transformers MimiModel keys + config)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.codec_model.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(model.codec_model.config.to_json_string())
    return folder


def random_codes(frames: int, vocab: int, seed: int, codebooks: int = 32) -> np.ndarray:
    rng = np.random.default_rng(seed)
    codes = rng.integers(1, vocab, size=(frames, codebooks))
    return codes.astype(np.int64)
