"""Mimi's hyper-parameters, and how a transformers MimiConfig maps onto them."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass
class MimiConfig:
    """Mimi hyper-parameters; the defaults are kyutai/mimi's (with the 32 codebooks CSM uses)."""

    sample_rate: int = 24_000
    hidden_size: int = 512  # latent and transformer width
    num_filters: int = 64  # SEANet channels at audio rate; doubled at each down-sampling
    upsampling_ratios: tuple[int, ...] = (8, 6, 5, 4)  # decoder order; the encoder runs them reversed
    kernel_size: int = 7  # first SEANet conv
    last_kernel_size: int = 3
    residual_kernel_size: int = 3
    num_residual_layers: int = 1
    dilation_growth_rate: int = 2  # residual unit j uses dilation growth**j
    compress: int = 2  # residual units squeeze channels by this factor
    latent_stride: int = 2  # SEANet rate (25 Hz) / frame rate (12.5 Hz)
    upsample_groups: int = 512
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    head_dim: int = 64
    intermediate_size: int = 2048
    norm_eps: float = 1e-5
    rope_theta: float = 10_000.0
    sliding_window: int = 250  # a query sees the keys 0..249 steps back
    codebook_size: int = 2048
    codebook_dim: int = 256
    num_quantizers: int = 32
    num_semantic_quantizers: int = 1

    @property
    def frame_size(self) -> int:
        """Audio samples per frame of codes (1920)."""
        return math.prod(self.upsampling_ratios) * self.latent_stride

    @property
    def frame_rate(self) -> float:
        return self.sample_rate / self.frame_size

    @classmethod
    def from_transformers(cls, d: dict[str, Any]) -> MimiConfig:
        """Read a transformers MimiConfig dict (`config.to_dict()`, or `codec_config` in a CSM config.json)."""
        required = {
            "audio_channels": 1, "use_causal_conv": True, "pad_mode": "constant", "trim_right_ratio": 1.0,
            "use_conv_shortcut": False, "attention_bias": False, "hidden_act": "gelu",
        }  # fmt: skip
        for key, value in required.items():
            if d.get(key, value) != value:
                raise ValueError(f"Mimi config {key}={d[key]!r} is not supported (only {value!r})")
        if d.get("num_key_value_heads", d["num_attention_heads"]) != d["num_attention_heads"]:
            raise ValueError("Mimi with grouped-query attention is not supported")
        if d.get("vector_quantization_hidden_dimension", d["codebook_dim"]) != d["codebook_dim"]:
            raise ValueError("Mimi needs vector_quantization_hidden_dimension == codebook_dim")
        if d["codebook_dim"] == d["hidden_size"]:
            raise ValueError("Mimi without quantizer projections (codebook_dim == hidden_size) is not supported")

        ratios = tuple(d["upsampling_ratios"])
        hop = math.prod(ratios)
        # transformers: frame_rate is given (kyutai/mimi says 12.5) or derived as sample_rate / (2 * hop).
        frame_rate = d.get("frame_rate") or d.get("_frame_rate") or d["sampling_rate"] / (2 * hop)
        latent_stride = round(math.ceil(d["sampling_rate"] / hop) / frame_rate)
        if latent_stride < 2:
            raise ValueError("Mimi without latent down/up-sampling is not supported")
        rope = d.get("rope_parameters") or {}
        names = ["hidden_size", "num_filters", "kernel_size", "last_kernel_size", "residual_kernel_size",
                 "num_residual_layers", "dilation_growth_rate", "compress", "upsample_groups",
                 "num_hidden_layers", "num_attention_heads", "intermediate_size", "norm_eps", "sliding_window",
                 "codebook_size", "codebook_dim", "num_quantizers", "num_semantic_quantizers"]  # fmt: skip
        return cls(
            sample_rate=d["sampling_rate"],
            upsampling_ratios=ratios,
            latent_stride=latent_stride,
            head_dim=d.get("head_dim") or d["hidden_size"] // d["num_attention_heads"],
            rope_theta=rope.get("rope_theta", d.get("rope_theta", 10_000.0)),
            **{name: d[name] for name in names if name in d},
        )
