"""Mimi's causal transformer with a sliding window, its keys and values in a ring of slots (`TransformerState`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import MimiConfig
from .conv import _linear
from .streaming import KVCache, TransformerState, kept


class TransformerLayer(nn.Module):
    """Pre-norm layer: LayerNorm, attention, LayerNorm, GELU MLP. The checkpoint's layer scales are folded
    into `out` and `fc2`, q, k, v are one matmul, and fc2 is kept as K-blocks (see `_linear`)."""

    def __init__(self, cfg: MimiConfig):
        super().__init__()
        d, inner = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim
        self.heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.norm1 = nn.LayerNorm(d, eps=cfg.norm_eps)
        # q's rows are scaled by 1 / sqrt(head_dim) (exact for 64: a power of two), and q's and k's rows
        # hold RoPE's pairs side by side, as Mimi was trained (the checkpoint's order is transformers').
        self.qkv = nn.Linear(d, 3 * inner, bias=False)
        self.out = nn.Linear(inner, d, bias=False)
        self.norm2 = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.fc1 = nn.Linear(d, cfg.intermediate_size, bias=False)
        blocks = _k_blocks(cfg)
        self.fc2 = nn.Parameter(torch.empty(blocks, d, cfg.intermediate_size // blocks))

    def forward(self, x: Tensor, rotation: Tensor, mask: Tensor, cache: KVCache, slots: Tensor) -> Tensor:
        """slots: [B, heads, t, head_dim], each row's slot of each step (see `Transformer._chunk`)."""
        b, t, _ = x.shape
        qkv = _linear(self.norm1(x), self.qkv.weight).view(b, t, 3, self.heads, self.head_dim)
        # RoPE rotates each (even, odd) pair of q and k: a complex product with e^(i * angle), in float32
        qk = torch.view_as_complex(qkv[:, :, :2].float().unflatten(-1, (-1, 2))) * rotation
        q, k = torch.view_as_real(qk).flatten(-2).to(x.dtype).transpose(1, 3).unbind(2)  # [B, heads, t, head_dim]
        cache.keys.scatter_(2, slots, k)
        cache.values.scatter_(2, slots, qkv[:, :, 2].transpose(1, 2))
        weights = torch.matmul(q, cache.keys.mT).add_(mask).softmax(-1)
        a = torch.matmul(weights, cache.values).transpose(1, 2).reshape(b, t, -1)
        x = _linear(a, self.out.weight).add_(x)  # in place: into the product's fresh buffer
        h = F.gelu(_linear(self.norm2(x), self.fc1.weight))
        return _linear(h.unflatten(-1, (len(self.fc2), -1)), self.fc2).add_(x)


def _k_blocks(cfg: MimiConfig) -> int:
    """fc2's K-blocks: of hidden_size each (4 for Mimi), where that divides."""
    return cfg.intermediate_size // cfg.hidden_size if cfg.intermediate_size % cfg.hidden_size == 0 else 1


# Steps the transformer takes at once; longer inputs go in pieces. Every step attends over all of the
# ring's window + CHUNK_STEPS - 1 slots (masked): a larger value costs every streaming step, a smaller one
# re-reads the weights more often for long inputs. 64 holds a 25-frame batch-decode chunk (50 steps).
CHUNK_STEPS = 64


class Transformer(nn.Module):
    """Causal transformer over [B, T, hidden] with a sliding window of `sliding_window` steps."""

    def __init__(self, cfg: MimiConfig):
        super().__init__()
        self.layers = nn.ModuleList(TransformerLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.heads, self.head_dim, self.window = cfg.num_attention_heads, cfg.head_dim, cfg.sliding_window
        # Computed, not loaded: made on the CPU even where the weights are made on the meta device.
        exponents = torch.arange(0, cfg.head_dim, 2, dtype=torch.float32, device="cpu") / cfg.head_dim
        inv_freq = 1.0 / (cfg.rope_theta**exponents)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def init_state(self, batch: int, live: Tensor | None = None) -> TransformerState:
        # A piece of up to CHUNK_STEPS steps then finds every key its queries may see (window - 1 back).
        slots = self.window + CHUNK_STEPS - 1
        shape = (batch, self.heads, slots, self.head_dim)
        w = self.layers[0].qkv.weight
        state = TransformerState(
            caches=[KVCache(w.new_zeros(shape), w.new_zeros(shape)) for _ in self.layers],
            slot_steps=torch.empty(batch, slots, dtype=torch.int64, device=w.device),
            position=torch.zeros(batch, dtype=torch.int64, device=w.device),
            live=live,
        )
        state.reset()
        return state

    def forward(self, x: Tensor, state: TransformerState) -> Tensor:
        chunks = [self._chunk(c, state) for c in x.split(CHUNK_STEPS, dim=1)]
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=1)

    def _chunk(self, x: Tensor, state: TransformerState) -> Tensor:
        b, t, _ = x.shape
        steps = state.position[:, None] + torch.arange(t, device=x.device)  # [B, t]
        slots = steps % state.slot_steps.shape[1]
        # A row the step does not advance keeps its marks and its position (and its convs their context); its
        # keys and values are written, harmlessly, in the slots of its next t steps: those hold steps at least
        # slots - t + 1 >= window back, out of every window, and are written again when the row goes on.
        marks = kept(state.slot_steps.gather(1, slots), steps, state.live)
        state.slot_steps.scatter_(1, slots, marks)
        # Query i (step steps[i]) sees the slot holding step s when 0 <= steps[i] - s < window.
        lag = steps[:, :, None] - state.slot_steps[:, None]  # [B, t, slots]
        hidden = (lag < 0) | (lag >= self.window)
        if state.live is not None:  # a row left alone sees every slot: a query that saw none would write NaN
            hidden &= state.live[:, None, None]
        mask = torch.zeros(lag.shape, dtype=x.dtype, device=x.device).masked_fill_(hidden, float("-inf"))
        angles = steps[..., None].float() * self.inv_freq.float()
        rotation = torch.polar(torch.ones_like(angles), angles)[:, :, None, None]  # [B, t, 1, 1, head_dim / 2]
        slots = slots[:, None, :, None].expand(b, self.heads, t, self.head_dim)
        for layer, cache in zip(self.layers, state.caches):
            x = layer(x, rotation, mask[:, None], cache, slots)
        state.position.add_(t if state.live is None else state.live * t)
        return x

