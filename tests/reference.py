"""transformers' CsmForConditionalGeneration as the numerical reference, fed the same prompt."""

from __future__ import annotations

import numpy as np
import torch

from csm_gguf.generator import Segment


def reference_prompt_embeddings(model, tokens_of, text: str, speaker: int, context: list[Segment]) -> torch.Tensor:
    """The prompt built from transformers' own embedding modules (text table; summed audio codebooks)."""
    parts = []
    with torch.no_grad():
        for seg in context:
            parts.append(model.embed_text_tokens(torch.tensor(tokens_of(seg.speaker, seg.text))))
            if seg.codes is not None:
                codes = np.concatenate([seg.codes, np.zeros((1, seg.codes.shape[1]), np.int64)])
                parts.append(model.backbone_model.embed_tokens(torch.tensor(codes)[None])[0])
        parts.append(model.embed_text_tokens(torch.tensor(tokens_of(speaker, text))))
    return torch.cat(parts)[None]


def reference_greedy_codes(model, embeddings: torch.Tensor, frames: int) -> np.ndarray:
    with torch.no_grad():
        out = model.generate(
            inputs_embeds=embeddings,
            do_sample=False,
            depth_decoder_do_sample=False,
            max_new_tokens=frames,
        )
    return out[0].numpy()
