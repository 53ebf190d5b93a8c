"""transformers' CsmForConditionalGeneration as the numerical reference, fed the same prompt."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from csm_fixtures import tiktoken_encoding
from csm_gguf.generator import Segment

BOS, EOS = 128000, 128001  # Llama 3's <|begin_of_text|> and <|end_of_text|>


@lru_cache(maxsize=1)
def _encoding():
    return tiktoken_encoding()


def llama3_prompt_tokens(speaker: int, text: str) -> list[int]:
    """CSM's text prompt of one utterance, `<|begin_of_text|>[speaker]text<|end_of_text|>`, encoded by
    tiktoken: independent of the project's tokenizer and prompt builder."""
    return [BOS, *_encoding().encode(f"[{speaker}]{text}"), EOS]


def reference_prompt_embeddings(model, tokens_of, text: str, speaker: int, context: list[Segment]) -> torch.Tensor:
    """The prompt built from transformers' own embedding modules (text table; summed audio codebooks) and
    the independent encoding (`llama3_prompt_tokens`). `tokens_of` is the project's prompt builder: it must
    give the same ids (checked here, so a wrong prompt is named as such, not seen as other codes); None
    skips that check."""
    parts = []

    def tokens(who: int, words: str) -> torch.Tensor:
        ids = llama3_prompt_tokens(who, words)
        if tokens_of is not None:
            assert list(tokens_of(who, words)) == ids, f"the project's prompt for [{who}]{words!r} is not Llama 3's"
        return torch.tensor(ids)

    with torch.no_grad():
        for seg in context:
            parts.append(model.embed_text_tokens(tokens(seg.speaker, seg.text)))
            if seg.codes is not None:
                codes = np.concatenate([seg.codes, np.zeros((1, seg.codes.shape[1]), np.int64)])
                parts.append(model.backbone_model.embed_tokens(torch.tensor(codes)[None])[0])
        parts.append(model.embed_text_tokens(tokens(speaker, text)))
    return torch.cat(parts)[None]


def reference_greedy_codes(model, embeddings: torch.Tensor, frames: int, n_codes: int | None = None) -> np.ndarray:
    """Greedy frames from transformers. `n_codes`: the codec's codes; the audio vocabulary's ids from there
    on (CSM-1B's 2048..2050) are suppressed in the backbone's and the depth decoder's logits, as the runtime
    only ever samples the first n_codes."""
    vocab = model.config.vocab_size
    extra = list(range(n_codes, vocab)) if n_codes is not None and n_codes < vocab else None
    # Both given every time: transformers keeps the depth decoder's settings from one call to the next.
    suppress = dict(suppress_tokens=extra, depth_decoder_suppress_tokens=extra)
    with torch.no_grad():
        out = model.generate(
            inputs_embeds=embeddings,
            do_sample=False,
            depth_decoder_do_sample=False,
            max_new_tokens=frames,
            **suppress,
        )
    return out[0].numpy()
