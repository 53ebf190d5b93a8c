"""Mimi's split residual vector quantizer: latents <-> codes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import MimiConfig
from .conv import _linear


class SplitRVQ(nn.Module):
    """Split residual vector quantizer: the first `num_semantic_quantizers` codebooks form one RVQ, the
    rest another; each has its own projections in and out of the codebook space."""

    def __init__(self, cfg: MimiConfig):
        super().__init__()
        self.n_semantic = cfg.num_semantic_quantizers
        self.register_buffer("codebooks", torch.zeros(cfg.num_quantizers, cfg.codebook_size, cfg.codebook_dim))
        self.semantic_in = nn.Linear(cfg.hidden_size, cfg.codebook_dim, bias=False)
        self.acoustic_in = nn.Linear(cfg.hidden_size, cfg.codebook_dim, bias=False)
        # Both RVQs' output projections side by side: their sum is one product.
        self.out = nn.Linear(2 * cfg.codebook_dim, cfg.hidden_size, bias=False)

    def decode(self, codes: Tensor) -> Tensor:
        """[B, K, T] codes -> [B, T, hidden] latents (K may be fewer than the codebooks)."""
        k, n, dim = codes.shape[1], self.codebooks.shape[1], self.codebooks.shape[2]
        offsets = torch.arange(k, device=codes.device)[:, None] * n
        vectors = F.embedding(codes + offsets, self.codebooks.view(-1, dim))  # [B, K, T, dim]
        sums = [vectors[:, : self.n_semantic].sum(1), vectors[:, self.n_semantic :].sum(1)]  # no acoustic: 0
        return _linear(torch.cat(sums, dim=-1), self.out.weight)

    def encode(self, x: Tensor) -> Tensor:
        """[B, T, hidden] latents -> [B, K, T] codes. Both RVQs quantize the same latent."""
        semantic = _quantize_residual(self.semantic_in(x), self.codebooks[: self.n_semantic])
        acoustic = _quantize_residual(self.acoustic_in(x), self.codebooks[self.n_semantic :])
        return torch.cat([semantic, acoustic], dim=1)


def _quantize_residual(x: Tensor, codebooks: Tensor) -> Tensor:
    codes = []
    for codebook in codebooks:
        idx = torch.cdist(x, codebook[None]).argmin(-1)  # nearest codebook vector, Euclidean
        x = x - codebook[idx]
        codes.append(idx)
    return torch.stack(codes, dim=1)

