"""Model configuration: the dimensions of CSM's two transformers and its vocabularies.

The converter fills these from either published checkpoint format and stores them as JSON in the
sidecar GGUF; the runtime reads them back from there.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3 frequency scaling of RoPE (the same curve in every format, however it is spelled)."""

    factor: float = 32.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_context: int = 8192


@dataclass(frozen=True)
class TransformerConfig:
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_ff: int
    head_dim: int
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = RopeScaling()
    max_seq_len: int = 2048

    def rope_factors(self) -> list[float]:
        """The per-frequency divisors llama.cpp takes as `rope_freqs.weight` (llama3 scaling)."""
        s = self.rope_scaling
        factors = []
        for i in range(0, self.head_dim, 2):
            if s is None:
                factors.append(1.0)
                continue
            wavelen = 2 * math.pi / self.rope_theta ** (-i / self.head_dim)
            low_wavelen = s.original_context / s.low_freq_factor
            high_wavelen = s.original_context / s.high_freq_factor
            if wavelen < high_wavelen:
                factors.append(1.0)
            elif wavelen > low_wavelen:
                factors.append(s.factor)
            else:
                smooth = (s.original_context / wavelen - s.low_freq_factor) / (
                    s.high_freq_factor - s.low_freq_factor
                )
                factors.append(1.0 / ((1 - smooth) / s.factor + smooth))
        return factors


# The two torchtune flavors the original checkpoint names instead of spelling dimensions out.
FLAVORS: dict[str, TransformerConfig] = {
    "llama-1B": TransformerConfig(n_layer=16, n_embd=2048, n_head=32, n_head_kv=8, n_ff=8192, head_dim=64),
    "llama-100M": TransformerConfig(n_layer=4, n_embd=1024, n_head=8, n_head_kv=2, n_ff=8192, head_dim=128),
}


@dataclass(frozen=True)
class CSMConfig:
    backbone: TransformerConfig
    decoder: TransformerConfig
    text_vocab_size: int = 128256
    audio_vocab_size: int = 2051
    num_codebooks: int = 32
    bos_id: int = 128000
    eos_id: int = 128001

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> CSMConfig:
        d = json.loads(text)

        def transformer(t: dict) -> TransformerConfig:
            scaling = t.pop("rope_scaling")
            return TransformerConfig(**t, rope_scaling=RopeScaling(**scaling) if scaling else None)

        return cls(backbone=transformer(d.pop("backbone")), decoder=transformer(d.pop("decoder")), **d)


CSM_1B = CSMConfig(backbone=FLAVORS["llama-1B"], decoder=FLAVORS["llama-100M"])
