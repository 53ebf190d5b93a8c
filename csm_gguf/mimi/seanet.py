"""SEANet, Mimi's convolutional encoder (audio -> 25 Hz latents) and decoder (latents -> audio), streaming."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .config import MimiConfig
from .conv import Conv, ConvTr
from .streaming import ConvState, SEANetDecoderState, SEANetEncoderState


class ResBlock(nn.Module):
    """SEANet residual unit: x + Conv1x1(ELU(Conv_k(ELU(x)))). Only the k-wide conv needs state."""

    def __init__(self, dim: int, hidden: int, kernel: int, dilation: int):
        super().__init__()
        self.conv1 = Conv(dim, hidden, kernel, dilation=dilation)
        self.conv2 = Conv(hidden, dim, 1)

    def init_state(self, batch: int, live: Tensor | None = None) -> ConvState:
        return self.conv1.init_state(batch, live)

    def forward(self, x: Tensor, state: ConvState | None = None) -> Tensor:
        return self.conv2(F.elu(self.conv1(F.elu(x), state), inplace=True)).add_(x)


def _res_blocks(cfg: MimiConfig, dim: int) -> nn.ModuleList:
    hidden, k = dim // cfg.compress, cfg.residual_kernel_size
    return nn.ModuleList(ResBlock(dim, hidden, k, cfg.dilation_growth_rate**j) for j in range(cfg.num_residual_layers))


class EncoderBlock(nn.Module):
    def __init__(self, cfg: MimiConfig, dim: int, ratio: int):
        super().__init__()
        self.res = _res_blocks(cfg, dim)
        self.down = Conv(dim, 2 * dim, 2 * ratio, stride=ratio)


class SEANetEncoder(nn.Module):
    """Audio [B, N, 1] -> [B, ceil(N / hop), hidden], streaming (chunks of whole hops but the last)."""

    def __init__(self, cfg: MimiConfig):
        super().__init__()
        ratios = cfg.upsampling_ratios[::-1]
        self.conv_in = Conv(1, cfg.num_filters, cfg.kernel_size)
        self.blocks = nn.ModuleList(EncoderBlock(cfg, cfg.num_filters * 2**i, r) for i, r in enumerate(ratios))
        self.conv_out = Conv(cfg.num_filters * 2 ** len(ratios), cfg.hidden_size, cfg.last_kernel_size)

    def init_state(self, batch: int) -> SEANetEncoderState:
        return SEANetEncoderState(
            conv_in=self.conv_in.init_state(batch),
            res=[[res.init_state(batch) for res in block.res] for block in self.blocks],
            downs=[block.down.init_state(batch) for block in self.blocks],
            conv_out=self.conv_out.init_state(batch),
        )

    def forward(self, x: Tensor, state: SEANetEncoderState) -> Tensor:
        x = self.conv_in(x, state.conv_in)
        for block, res_states, down_state in zip(self.blocks, state.res, state.downs):
            for res, res_state in zip(block.res, res_states):
                x = res(x, res_state)
            x = block.down(F.elu(x, inplace=True), down_state)
        return self.conv_out(F.elu(x, inplace=True), state.conv_out)


class DecoderBlock(nn.Module):
    def __init__(self, cfg: MimiConfig, dim: int, ratio: int):
        super().__init__()
        self.up = ConvTr(dim, dim // 2, 2 * ratio, ratio)
        self.res = _res_blocks(cfg, dim // 2)


class SEANetDecoder(nn.Module):
    """[B, T, hidden] -> audio [B, T * hop, 1], streaming."""

    def __init__(self, cfg: MimiConfig):
        super().__init__()
        ratios = cfg.upsampling_ratios
        top = cfg.num_filters * 2 ** len(ratios)
        self.conv_in = Conv(cfg.hidden_size, top, cfg.kernel_size)
        self.blocks = nn.ModuleList(DecoderBlock(cfg, top // 2**i, r) for i, r in enumerate(ratios))
        self.conv_out = Conv(cfg.num_filters, 1, cfg.last_kernel_size)

    def init_state(self, batch: int, live: Tensor | None = None) -> SEANetDecoderState:
        return SEANetDecoderState(
            conv_in=self.conv_in.init_state(batch, live),
            ups=[block.up.init_state(batch, live) for block in self.blocks],
            res=[[res.init_state(batch, live) for res in block.res] for block in self.blocks],
            conv_out=self.conv_out.init_state(batch, live),
        )

    def forward(self, x: Tensor, state: SEANetDecoderState) -> Tensor:
        x = self.conv_in(x, state.conv_in)
        for block, up_state, res_states in zip(self.blocks, state.ups, state.res):
            x = block.up(F.elu(x, inplace=True), up_state)
            for res, res_state in zip(block.res, res_states):
                x = res(x, res_state)
        return self.conv_out(F.elu(x, inplace=True), state.conv_out)

