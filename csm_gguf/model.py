"""A converted model directory loaded for generation: tables, tokenizer, config and codec weights."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np

from .config import CSMConfig
from .llama import free_model, load_vocab_only, tokenize
from .model_dir import BACKBONE_FILE, DECODER_FILE, SIDECAR_FILE, SIDECAR_VERSION, TOKENIZER_FILE, check_model_dir

Q = gguf.GGMLQuantizationType


class RowTable:
    """A memory-mapped GGUF matrix read a few rows at a time, in whatever type it is stored."""

    def __init__(self, tensor: gguf.ReaderTensor):
        self.qtype = Q(tensor.tensor_type)
        self.data = tensor.data  # numpy memmap: (rows, cols) typed, or (rows, bytes) for quantized types
        self.shape = tuple(int(n) for n in reversed(tensor.shape))

    def rows(self, ids) -> np.ndarray:
        picked = self.data[np.asarray(ids)]
        if self.qtype in (Q.F32, Q.F16):
            return picked.astype(np.float32)
        return gguf.quants.dequantize(picked, self.qtype).reshape(len(ids), self.shape[-1])

    def dense(self) -> np.ndarray:
        if self.qtype in (Q.F32, Q.F16):
            return np.asarray(self.data)
        return gguf.quants.dequantize(self.data, self.qtype).reshape(self.shape)


def check_version(sidecar_path: Path, version: int | None) -> None:
    """Refuse a sidecar of another format version, naming the fix: each version's layout is made once, by
    the converter, and read only as it is."""
    if version == SIDECAR_VERSION:
        return
    made_by = "a newer csm-gguf: upgrade csm-gguf, or" if (version or 0) > SIDECAR_VERSION else "an older csm-gguf:"
    raise ValueError(
        f"{sidecar_path} is format version {version}, made by {made_by} convert the model again "
        f"(python -m csm_gguf.convert --output-dir {sidecar_path.parent} with the --model-id or --model-path it "
        f"came from); this csm-gguf reads version {SIDECAR_VERSION}"
    )


class CSMModel:
    """Everything of a model directory except the llama.cpp contexts (which generators own)."""

    def __init__(self, path: str | Path):
        self.path = check_model_dir(path)
        self.backbone_path = self.path / BACKBONE_FILE
        self.decoder_path = self.path / DECODER_FILE
        sidecar_path = self.path / SIDECAR_FILE
        try:
            reader = gguf.GGUFReader(sidecar_path)
        except Exception as e:
            raise ValueError(f"{sidecar_path} is damaged or incomplete ({e}); convert the model again") from e
        fields = reader.fields
        check_version(sidecar_path, int(fields["csm.version"].contents()) if "csm.version" in fields else None)
        self.config = CSMConfig.from_json(fields["csm.config"].contents())
        self.qtype = fields["csm.qtype"].contents()
        self.decoder_qtype = fields["csm.decoder_qtype"].contents()
        self.codec_config = (
            json.loads(fields["csm.codec_config"].contents()) if "csm.codec_config" in fields else None
        )
        tensors = {t.name: t for t in reader.tensors}
        self.text_embeddings = RowTable(tensors["text_embd.weight"])
        # Read every frame: keep typed (F16/F32) memory maps, summed in float32 on use.
        self.audio_embeddings = RowTable(tensors["audio_embd.weight"]).dense()
        self.decoder_inputs = RowTable(tensors["decoder_input.weight"]).dense()
        # Kept raw in their stored type: generators multiply them with ggml (heads.py).
        head = tensors["audio_head.weight"]
        self.audio_head, self.audio_head_type = head.data, int(head.tensor_type)
        codec_keys = fields["csm.codec_keys"].contents() if "csm.codec_keys" in fields else []
        self._codec_tensors = {key: tensors[f"codec.{i}"].data for i, key in enumerate(codec_keys)}
        self._vocab = load_vocab_only(self.path / TOKENIZER_FILE)

    @property
    def has_codec(self) -> bool:
        return bool(self._codec_tensors)

    @property
    def n_codes(self) -> int:
        """Codes the codec can decode: the audio vocabulary's extra ids (2048..2050) are never emitted."""
        codec_size = (self.codec_config or {}).get("codebook_size", 2048)
        return min(self.config.audio_vocab_size, codec_size)

    def codec_tensors(self) -> dict[str, np.ndarray]:
        """Mimi's weights as its modules hold them (`Mimi.state_dict()`), float32 arrays mapped from the file:
        the converter laid them out, so nothing is copied or reordered (`Mimi.from_runtime_tensors`)."""
        return dict(self._codec_tensors)

    def tokenize(self, text: str) -> list[int]:
        if not self._vocab:  # llama.cpp would read freed memory
            raise RuntimeError("the model is closed: create a new CSM to speak again")
        return tokenize(self._vocab, text)

    def close(self) -> None:
        """Free the tokenizer (a llama.cpp model of its own: 48 MB each CSM kept for good) and let go of the
        sidecar's mapped tables (unmapped once nothing else holds them)."""
        if self._vocab:
            free_model(self._vocab)
            self._vocab = None
        self.text_embeddings = self.audio_embeddings = self.decoder_inputs = self.audio_head = None
        self._codec_tensors = {}

    def __del__(self) -> None:
        try:
            if getattr(self, "_vocab", None):  # not if __init__ failed before it
                self.close()
        except Exception:  # at interpreter exit llama.cpp's binding may be gone already
            pass

    def prompt_tokens(self, speaker: int, text: str) -> list[int]:
        """BOS + `[speaker]text` + EOS, built here so the tokenizer never adds a second BOS."""
        return [self.config.bos_id, *self.tokenize(f"[{speaker}]{text}"), self.config.eos_id]
