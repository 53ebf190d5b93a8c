"""Mimi, Kyutai's neural audio codec, in plain PyTorch: codes <-> 24 kHz mono audio.

Decode path: codes -> split RVQ -> upsample (12.5 -> 25 Hz) -> decoder transformer -> SEANet decoder.
Encode path: audio -> SEANet encoder -> encoder transformer -> downsample (25 -> 12.5 Hz) -> split RVQ.

Everything is causal, so decoding streams: `decode_step` takes a few frames of codes and an explicit
`DecoderState`, and returns exactly `frames * frame_size` samples; the concatenated stream equals `decode`
of all the codes at once (which is itself a stream from a fresh state). Encoding is batch only and pads
like transformers' MimiModel.

Weights come in the kyutai/mimi checkpoint layout (`converter/mimi_keys.py` turns the other layouts into
it); `Mimi.from_state_dict` maps them onto the modules here, fusing what the checkpoint keeps apart. The
converter does that once and stores the result (`state_dict()`, float32), which `Mimi.from_runtime_tensors`
takes as it is: a model directory's codec weights are its mapped file.

The package, one idea per module (as moshi splits its own):
- config.py: `MimiConfig`, the hyper-parameters;
- streaming.py: the explicit state each module carries from one chunk to the next (`DecoderState`);
- conv.py, seanet.py, transformer.py, quantizer.py: the modules, computing on that state;
- fast.py: the speed machinery (oneDNN-packed weights, TorchScript traces, CUDA graphs) wrapped around a step;
- checkpoint.py: the kyutai/mimi checkpoint layout and how the modules' tensors are made from it;
- codec.py: `Mimi`, the modules assembled;
- pool.py: `DecoderPool`, many streams decoded in batched steps, each as it would be alone.
"""

from .checkpoint import checkpoint_table
from .codec import Mimi
from .config import MimiConfig
from .fast import TRACED_FRAMES, _can_pack
from .pool import AudioStream, DecoderPool
from .streaming import (
    ConvState,
    ConvTrState,
    DecoderState,
    KVCache,
    SEANetDecoderState,
    SEANetEncoderState,
    TransformerState,
)

__all__ = [
    "AudioStream", "ConvState", "ConvTrState", "DecoderPool", "DecoderState", "KVCache", "Mimi", "MimiConfig",
    "SEANetDecoderState", "SEANetEncoderState", "TRACED_FRAMES", "TransformerState", "_can_pack", "checkpoint_table",
]  # fmt: skip
