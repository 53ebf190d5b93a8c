"""A tiny random Mimi codec (transformers MimiModel) for tests, and our runtime codec built from it."""

from __future__ import annotations

import pytest
import torch

# Small enough to run in milliseconds; frame_size = 8 * 4 * 2 = 64 samples, so frames are cheap.
TINY_MIMI_CONFIG = dict(
    hidden_size=32,
    num_filters=8,
    upsampling_ratios=[8, 4],
    codebook_size=64,
    codebook_dim=16,
    vector_quantization_hidden_dimension=16,
    num_quantizers=32,
    upsample_groups=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
    intermediate_size=64,
)


def make_tiny_mimi(seed: int = 0):
    """A tiny transformers MimiModel with every weight random (fixed seed), in eval mode.

    The defaults would hide bugs: zero codebooks make the output ignore the codes, and 0.01 layer scales
    make the transformers nearly the identity. So codebooks, layer scales, norms and linears are redrawn.
    """
    from transformers import MimiConfig, MimiModel

    torch.manual_seed(seed)  # the convolutions keep transformers' (seeded) Kaiming init
    model = MimiModel(MimiConfig(**TINY_MIMI_CONFIG)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("layernorm.bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("layer_scale.scale"):
                p.copy_(0.2 + 0.4 * torch.rand(p.shape, generator=g))
            elif p.ndim == 2:  # attention and MLP matrices
                p.copy_(0.15 * torch.randn(p.shape, generator=g))
        for name, buf in model.named_buffers():
            if name.endswith("embed_sum"):
                buf.copy_(torch.randn(buf.shape, generator=g))
            elif name.endswith("cluster_usage"):
                buf.copy_(0.5 + torch.rand(buf.shape, generator=g))
    return model


def runtime_mimi(model):
    """Our csm_gguf.mimi.Mimi carrying the weights of a transformers MimiModel."""
    from converter.mimi_keys import mimi_tensors_to_transformers
    from csm_gguf.mimi import Mimi, MimiConfig

    config = MimiConfig.from_transformers(model.config.to_dict())
    return Mimi.from_state_dict(config, mimi_tensors_to_transformers(model.state_dict()))


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """(autouse where imported) These tensors are tiny: with two threads OpenMP's hand-offs dominate, and when
    another process holds a core every op waits for it (100x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
