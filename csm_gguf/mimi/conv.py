"""Causal convolutions on time-major signals, as matrix products: `Conv` and `ConvTr`, and `_linear`, the
product every Mimi module uses.

Signals are time-major, [B, T, C], from the quantizer to the audio: the transformers want it, a transposed
conv's overlap-add is then a plain add of [T, stride * C] blocks, and the matrix products below run fast on
short streaming chunks, where torch's conv kernels take slow paths (a 1-frame ConvTranspose1d(1024, 512, 16, 8)
took 77 ms).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .fast import IM2COL_ROWS, PackedWeight, _packed_product
from .streaming import ConvState, ConvTrState


def _linear(x: Tensor, w: Tensor, bias: Tensor | None = None) -> Tensor:
    """x @ w.T (+ bias): x [..., K] with w [N, K], or x [..., blocks, K_b] with w kept as K-blocks
    [blocks, N, K_b] (a conv's taps; a long K split, which streams faster).

    A streaming step has up to 32 rows (short chunks, a few streams at once) and reads each weight once,
    from memory rather than cache, so what counts is how near memory bandwidth MKL streams the weight:
    (w @ x.T).T does (F.linear's kernel took up to twice as long, measured with cold caches; it wins again
    from ~200 rows), and for K-blocks one batched product does (separate products, or one over a long K,
    were up to a fifth slower)."""
    lead = x.shape[: x.dim() - w.dim() + 1]
    rows = x.reshape(-1, *x.shape[len(lead) :])  # [R, K] or [R, blocks, K_b]
    if len(rows) > 32:
        if w.dim() == 2:
            y = F.linear(rows, w, bias)
        else:
            y = F.linear(rows[:, 0], w[0], bias)
            for j in range(1, len(w)):
                y += F.linear(rows[:, j], w[j])
        return y.view(*lead, -1)
    if w.dim() == 2:
        y = w @ rows.T if bias is None else torch.addmm(bias[:, None], w, rows.T)
    else:
        y = torch.bmm(w, rows.permute(1, 2, 0)).sum(0)
        y = y if bias is None else y.add_(bias[:, None])
    return y.T.contiguous().view(*lead, -1)



class Conv(nn.Module):
    """Causal Conv1d on [B, T, C], as a sum over kernel taps of matrix products with shifted inputs.

    Without a state it pads a whole signal like transformers' MimiConv1d: on the left by k_eff - stride
    (zeros, or copies of the first step), on the right to complete the last stride. With a state it
    streams: the stored context replaces the left (zero) pad, and every chunk but the signal's last must
    be a whole number of strides.
    """

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int = 1, dilation: int = 1,
                 bias: bool = True, pad_mode: str = "constant"):  # fmt: skip
        super().__init__()
        self.weight = nn.Parameter(torch.empty(kernel, c_out, c_in))  # one [C_out, C_in] matrix per tap
        self.bias = nn.Parameter(torch.empty(c_out)) if bias else None
        self.stride, self.dilation, self.pad_mode = stride, dilation, pad_mode
        self.pad = (kernel - 1) * dilation + 1 - stride
        self.packed = PackedWeight()  # see `Mimi._pack`

    def pack(self) -> None:
        self.packed.pack(self.weight.permute(1, 0, 2).flatten(1))  # [C_out, taps * C_in]

    def init_state(self, batch: int, live: Tensor | None = None) -> ConvState:
        return ConvState(self.weight.new_zeros(batch, self.pad, self.weight.shape[2]), live)

    def forward(self, x: Tensor, state: ConvState | None = None) -> Tensor:
        if state is None:
            x = F.pad(x.mT, (self.pad, -x.shape[1] % self.stride), mode=self.pad_mode).mT
        else:
            if x.shape[1] % self.stride:  # the signal's last chunk: its last stride completed as above
                x = F.pad(x.mT, (0, -x.shape[1] % self.stride)).mT
            if self.pad:
                x = torch.cat([state.context, x], dim=1)
                state.update(x[:, x.shape[1] - self.pad :])
        x = x.contiguous()
        b, _, c = x.shape
        t = (x.shape[1] - self.pad - 1) // self.stride + 1
        # taps[:, i, j] = x[:, i * stride + j * dilation]: output i's inputs, one per tap (a view)
        taps = x.as_strided((b, t, len(self.weight), c), (x.stride(0), self.stride * c, self.dilation * c, 1))
        if self.packed.tensor is not None and (len(self.weight) == 1 or b * t <= IM2COL_ROWS):
            # im2col: the taps side by side, copied (oneDNN took 15x as long to read them from the view)
            return _packed_product()(taps.flatten(2).contiguous(), self.packed.tensor, self.bias)
        return _linear(taps, self.weight, self.bias)


class ConvTr(nn.Module):
    """Causal ConvTranspose1d on [B, T, C] with kernel = 2 * stride: each input step emits 2 * stride
    outputs; the first half completes output block t, the second half overlaps block t + 1. The last
    step's second half waits in the state for the next chunk (a batch decode from a fresh state drops
    the final one, as transformers trims it). Dense (groups=1) or depthwise (groups=channels)."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, groups: int = 1, bias: bool = True):
        super().__init__()
        if kernel != 2 * stride or groups not in (1, c_in) or (groups > 1 and c_out != c_in):
            raise ValueError("ConvTr supports kernel == 2 * stride, dense or depthwise")
        self.depthwise = groups > 1
        # Per tap j, the [C_out, C_in] matrix of outputs j steps after the input (depthwise: a [1, C] row).
        self.weight = nn.Parameter(torch.empty(kernel, 1 if self.depthwise else c_out, c_in))
        self.bias = nn.Parameter(torch.empty(c_out)) if bias else None
        self.stride, self.c_out = stride, c_out
        self.packed = PackedWeight()  # see `Mimi._pack`

    def pack(self) -> None:
        self.packed.pack(self.weight.flatten(0, 1))

    def init_state(self, batch: int, live: Tensor | None = None) -> ConvTrState:
        return ConvTrState(self.weight.new_zeros(batch, 1, self.stride * self.c_out), live)

    def forward(self, x: Tensor, state: ConvTrState) -> Tensor:
        b, t, _ = x.shape
        if self.depthwise:
            y = x[:, :, None, :] * self.weight[:, 0]
        elif self.packed.tensor is not None:
            y = _packed_product()(x, self.packed.tensor, None)
        else:
            y = _linear(x, self.weight.flatten(0, 1))
        y = y.reshape(b, t, 2, self.stride * self.c_out)  # [..., (first half, second half), (tap, channel)]
        out = y[:, :, 0] + torch.cat([state.tail, y[:, :-1, 1]], dim=1)
        state.update(y[:, -1:, 1])
        out = out.view(b, t * self.stride, self.c_out)
        return out if self.bias is None else out + self.bias

