"""Mimi, the codec: its modules assembled, decoding streams of codes and encoding whole signals."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from . import fast
from .checkpoint import checkpoint_table
from .config import MimiConfig
from .conv import Conv, ConvTr
from .fast import TRACED_FRAMES, StepTraces
from .quantizer import SplitRVQ
from .seanet import SEANetDecoder, SEANetEncoder
from .streaming import DecoderState
from .transformer import Transformer


def _drop_weight_copies(mimi: Mimi, incompatible_keys: Any = None) -> None:
    fast.drop_weight_copies(mimi._traces, mimi._packable)


class Mimi(nn.Module):
    # Held while a CUDA graph is recorded. Recording starts with a device-wide sync, which fails while any
    # other stream is being captured: another recording (one at a time in every codec: fast.graphed_step),
    # or llama.cpp's own graphs, which it records inside its calls. A caller that drives llama.cpp sets
    # the lock it holds around those calls here (`CSM` does).
    cuda_lock: AbstractContextManager = nullcontext()

    def __init__(self, cfg: MimiConfig):
        super().__init__()
        self.cfg = cfg
        d, s = cfg.hidden_size, cfg.latent_stride
        self.encoder = SEANetEncoder(cfg)
        self.encoder_transformer = Transformer(cfg)
        self.downsample = Conv(d, d, 2 * s, stride=s, bias=False, pad_mode="replicate")
        self.quantizer = SplitRVQ(cfg)
        self.upsample = ConvTr(d, d, 2 * s, s, groups=cfg.upsample_groups, bias=False)
        self.decoder_transformer = Transformer(cfg)
        self.decoder = SEANetDecoder(cfg)
        # The decoder's convs after its first up-sampling: 16+ rows a frame, compute-bound (see fast.py).
        convs = [m for b in self.decoder.blocks for m in (b.up, *(c for res in b.res for c in (res.conv1, res.conv2)))]
        self._packable: tuple[Conv | ConvTr, ...] = (*convs[1:], self.decoder.conv_out)
        self.requires_grad_(False)  # inference only (a trace takes the weights as constants)
        self._traces = StepTraces()
        self.register_load_state_dict_post_hook(_drop_weight_copies)  # load_state_dict(assign=True) swaps them

    @classmethod
    def from_state_dict(cls, cfg: MimiConfig, tensors: Mapping[str, Any]) -> Mimi:
        """Build from tensors (or numpy arrays) in the kyutai/mimi checkpoint layout, which
        `converter.mimi_keys.mimi_tensors_to_transformers` produces; `checkpoint_table` maps them."""
        table = checkpoint_table(cfg)
        missing = sorted({src for _, _, sources in table for src in sources} - tensors.keys())
        if missing:
            raise KeyError(f"Mimi checkpoint lacks {len(missing)} tensors, e.g. {missing[:5]}")
        with torch.no_grad():
            own = {name: make(*(torch.as_tensor(tensors[s]).float() for s in sources)).clone(
                memory_format=torch.contiguous_format) for name, make, sources in table}  # its own, whatever `make`
        return cls.from_runtime_tensors(cfg, own)

    @classmethod
    def from_runtime_tensors(cls, cfg: MimiConfig, tensors: Mapping[str, Tensor | np.ndarray]) -> Mimi:
        """Build around tensors (or numpy arrays: read-only memory maps are fine) already in this codec's own
        layout and dtype, `state_dict()`'s, as the converter stores them: the modules are made without storage
        and take the tensors themselves as their weights, so nothing is initialized, copied or reordered. The
        weights are only ever read. Keys or shapes other than the config's raise RuntimeError."""
        with torch.device("meta"):
            model = cls(cfg)
        with warnings.catch_warnings():  # the codec never writes its weights: a read-only map serves
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            own = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in tensors.items()}
        model.load_state_dict(own, strict=True, assign=True)
        return model.eval()

    @property
    def device(self) -> torch.device:
        """Where the weights live (after `.to(device)`); inputs are moved there, outputs stay there."""
        return self.quantizer.codebooks.device

    @torch.inference_mode()
    def decoder_state(self, batch_size: int = 1, cuda_graph: bool = False) -> DecoderState:
        """A fresh stream. With `cuda_graph`, on CUDA, its 1-frame steps after the first are replayed from a
        CUDA graph recorded at the second (about three steps' time, once): a stream decoded one frame at a
        time, in the thread that drives llama.cpp or under `cuda_lock`, so the recording meets no other."""
        live = torch.ones(batch_size, dtype=torch.bool, device=self.device)  # see DecoderState.live
        return DecoderState(
            upsample=self.upsample.init_state(batch_size, live),
            transformer=self.decoder_transformer.init_state(batch_size, live),
            seanet=self.decoder.init_state(batch_size, live),
            cuda_graph=cuda_graph,
            live=live,
        )

    @torch.inference_mode()
    def warm_up(self, batch_size: int = 1, codebooks: int | None = None) -> None:
        """Make the CPU traces of steps of 1 to `TRACED_FRAMES` frames for `batch_size` streams now, on a
        scratch stream, rather than at a stream's second step of each (0.1-0.3 s each). No-op off the CPU."""
        if self.device.type != "cpu":
            return
        for frames in range(1, TRACED_FRAMES + 1):
            state = self.decoder_state(batch_size)
            codes = torch.zeros(batch_size, codebooks or self.cfg.num_quantizers, frames, dtype=torch.long)
            for _ in range(2):
                self.decode_step(codes, state)

    @torch.inference_mode()
    def reset(self, state: DecoderState) -> None:
        """Make `state` start a new stream (keeping its buffers)."""
        state.reset()

    @torch.inference_mode()
    def decode_step(self, codes: Tensor, state: DecoderState) -> Tensor:
        """Decode the next chunk of a stream: codes [B, K, t] -> audio [B, 1, t * frame_size]."""
        codes = codes.to(self.device)
        if codes.shape[-1] == 0:
            return self.quantizer.codebooks.new_zeros(codes.shape[0], 1, 0)
        graphed = state.cuda_graph and codes.is_cuda and codes.shape[-1] == 1
        graphed = graphed and (state.graph is not None or state.frames > 0)
        if graphed:
            audio = fast.graphed_step(self._step, codes, state, self.cuda_lock)
        elif codes.device.type == "cpu":
            self._pack()
            if codes.shape[-1] <= TRACED_FRAMES:
                audio = fast.traced_step(self._traces, self._step, codes, state, self._packed_weights())
            else:
                audio = self._step(codes, state)
        else:
            audio = self._step(codes, state)
        state.frames += codes.shape[-1]
        return audio

    def decode_frames(self, frames: np.ndarray | list[np.ndarray], state: DecoderState) -> np.ndarray:
        """`decode_step` for one stream, in numpy: frames of K codes (an array (frames, K), or a list of (K,)
        frames) -> float32 samples."""
        return self.decode_step(torch.from_numpy(np.asarray(frames, dtype=np.int64).T[None]), state)[0, 0].cpu().numpy()

    def _step(self, codes: Tensor, state: DecoderState) -> Tensor:
        x = self.upsample(self.quantizer.decode(codes), state.upsample)
        x = self.decoder_transformer(x, state.transformer)
        return self.decoder(x, state.seanet).mT

    def _pack(self) -> None:
        fast.pack_weights(self._packable, self._traces)

    def _packed_weights(self) -> list[Tensor]:
        return fast.packed_weights(self._packable)

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> Mimi:
        _drop_weight_copies(self)  # moved or converted: they hold the old weights
        return super()._apply(fn, recurse)

    @torch.inference_mode()
    def decode(self, codes: Tensor, chunk: int = 25) -> Tensor:
        """Decode whole sequences: codes [B, K, T] -> audio [B, 1, T * frame_size]. Streams `chunk` frames
        at a time, which bounds memory and gives the same samples as one big step."""
        state = self.decoder_state(codes.shape[0])
        return torch.cat([self.decode_step(c, state) for c in codes.split(chunk, dim=-1)], dim=-1)

    @torch.inference_mode()
    def encode(self, audio: Tensor, chunk_frames: int = 25) -> Tensor:
        """Audio [B, 1, N] -> codes [B, num_quantizers, ceil(N / frame_size)]. Like transformers, every
        strided conv pads its input on the right to a whole number of strides (there is no up-front
        padding of the audio to whole frames). The SEANet encoder streams `chunk_frames` frames of audio
        at a time: at the audio's rate its activations take 256 bytes a sample, 1.1 GB a minute at once."""
        audio = audio.to(self.device).mT
        state = self.encoder.init_state(audio.shape[0])
        chunks = audio.split(chunk_frames * self.cfg.frame_size, dim=1)
        x = torch.cat([self.encoder(c, state) for c in chunks], dim=1)
        x = self.encoder_transformer(x, self.encoder_transformer.init_state(x.shape[0]))
        return self.quantizer.encode(self.downsample(x))

