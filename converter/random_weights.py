"""A CSM with random weights and the real shapes, for benchmarks: no download of the gated checkpoint.

Every tensor is drawn from a generator seeded by its name, so the same tensor comes out of every call
(bench.py rebuilds transformers' model from the same numbers). Scales follow trained Llama weights
(matrices ~0.02, norms 1) so activations, and hence the work llama.cpp does, stay realistic.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from csm_gguf.config import CSM_1B, CSMConfig

from . import tensor_map as tm
from .mimi_keys import MOSHI_MIMI_CONFIG

SOURCE_NAME = "random"
MATRIX_STD = 0.02
# Llama 3.2's special tokens, in id order from 128000 (the text model's names).
LLAMA3_SPECIALS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
    "<|eot_id|>", "<|python_tag|>", *(f"<|reserved_special_token_{i}|>" for i in range(2, 247)),
]  # fmt: skip


@dataclass
class RandomCheckpoint:
    """The `converter.checkpoint.Checkpoint` interface over seeded random tensors (llama.cpp layout)."""

    config: CSMConfig = CSM_1B
    seed: int = 0

    def _draw(self, key: str, shape: tuple[int, ...], std: float, mean: float = 0.0) -> np.ndarray:
        rng = np.random.default_rng([self.seed, zlib.crc32(key.encode())])
        x = rng.standard_normal(shape, dtype=np.float32)
        x *= std
        x += mean
        return x

    def tensor(self, name: str) -> np.ndarray:
        # The two audio tables are one tied table, as in the published checkpoints.
        key = "audio_embeddings" if name == "decoder_audio_embeddings" else name
        return self._draw(key, tm.csm_shapes(self.config)[name], MATRIX_STD)

    def block_tensor(self, model: str, layer: int, gguf_name: str) -> np.ndarray:
        t = self.config.backbone if model == "backbone" else self.config.decoder
        shape = tm.block_shapes(t)[gguf_name]
        key = f"{model}.{layer}.{gguf_name}"
        return self._draw(key, shape, 0.0, 1.0) if len(shape) == 1 else self._draw(key, shape, MATRIX_STD)

    def output_norm(self, model: str) -> np.ndarray:
        t = self.config.backbone if model == "backbone" else self.config.decoder
        return np.ones(t.n_embd, dtype=np.float32)


def random_mimi(codec_config: dict = MOSHI_MIMI_CONFIG, seed: int = 0):
    """transformers' MimiModel, randomly initialised with a fixed seed, codebooks made usable."""
    import torch
    from transformers import MimiConfig, MimiModel

    torch.manual_seed(seed)
    model = MimiModel(MimiConfig(**{k: v for k, v in codec_config.items() if k != "model_type"})).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        # Fresh codebooks are all zero with zero usage: give them distinct entries and usage counts.
        for name, buf in model.named_buffers():
            if name.endswith("embed_sum"):
                buf.copy_(torch.randn(buf.shape, generator=g))
            elif name.endswith("cluster_usage"):
                buf.copy_(torch.rand(buf.shape, generator=g) + 0.5)
    return model


def llama3_tokenizer_json(path: Path) -> Path:
    """The Llama 3 tokenizer: from the llama-models package when installed, else from the hub."""
    try:
        import llama_models
    except ImportError:
        from .checkpoint import download
        from .convert import DEFAULT_TOKENIZER_ID

        return download(DEFAULT_TOKENIZER_ID, ["tokenizer.json"], local_option="--tokenizer-path") / "tokenizer.json"
    from transformers.convert_slow_tokenizer import TikTokenConverter

    model_file = Path(llama_models.__file__).parent / "llama3" / "tokenizer.model"
    TikTokenConverter(vocab_file=str(model_file), extra_special_tokens=LLAMA3_SPECIALS).converted().save(str(path))
    return path


def convert_random(
    output_dir: str | Path | None,
    qtype: str,
    decoder_qtype: str | None = None,
    config: CSMConfig = CSM_1B,
    codec_config: dict = MOSHI_MIMI_CONFIG,
    seed: int = 0,
    tokenizer_path: str | None = None,
) -> Path:
    """Write a random-weight model directory, once: the same random model already there is reused."""
    import tempfile

    from csm_gguf.model_dir import default_model_dir

    from .convert import check_output_dir, runtime_codec, tokenizer_at, write_model_dir
    from .mimi_keys import mimi_tensors_to_transformers

    out = Path(output_dir) if output_dir else default_model_dir(SOURCE_NAME, qtype, decoder_qtype)
    if _holds_random_model(out, qtype, decoder_qtype or qtype):
        return out
    check_output_dir(out.expanduser().resolve())  # before drawing any weights, as the tokenizer given
    given = tokenizer_at(tokenizer_path) if tokenizer_path else None
    codec = runtime_codec(codec_config, mimi_tensors_to_transformers(random_mimi(codec_config, seed).state_dict()),
                           "random weights")
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = given or llama3_tokenizer_json(Path(tmp) / "tokenizer.json")
        write_model_dir(RandomCheckpoint(config, seed), tokenizer, out, qtype, decoder_qtype, codec, SOURCE_NAME)
    return out


def _holds_random_model(folder: Path, qtype: str, decoder_qtype: str) -> bool:
    import gguf

    from csm_gguf.model_dir import MODEL_FILES, SIDECAR_FILE, SIDECAR_VERSION

    if not all((folder / f).exists() for f in MODEL_FILES):
        return False
    try:
        fields = gguf.GGUFReader(folder / SIDECAR_FILE).fields
        found = tuple(fields[k].contents() for k in ("csm.version", "csm.source", "csm.qtype", "csm.decoder_qtype"))
    except (OSError, ValueError, KeyError):  # damaged: write it again
        return False
    return found == (SIDECAR_VERSION, SOURCE_NAME, qtype, decoder_qtype)  # an older format: written again
