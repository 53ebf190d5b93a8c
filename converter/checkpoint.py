"""Reading a CSM checkpoint: local folder or hub repo, either format, single or sharded safetensors."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from csm_gguf.config import FLAVORS, CSMConfig, RopeScaling, TransformerConfig

from . import tensor_map as tm

UNGATED_COPY = "unsloth/csm-1b"
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl")
ADAPTER_FILE = "adapter_model.safetensors"
# RoPE tables that some savers keep with the weights; the GGUF models compute their own.
ROPE_BUFFERS = (".inv_freq", "pos_embeddings.cache")


class CheckpointError(ValueError):
    """A checkpoint that cannot be converted; the message says what is wrong and what to do."""


# Each local option beside the hub option it stands in for.
HUB_OPTION = {"--model-path": "--model-id", "--tokenizer-path": "--tokenizer-id", "--mimi-path": "--mimi-id"}


def check_repo_id(repo_id: str, local_option: str = "--model-path") -> None:
    """A hub repo name, or the user's mistake named: most often a local folder given to --model-id."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
        return
    except HFValidationError:
        pass
    option = HUB_OPTION.get(local_option, "the hub option")
    if Path(repo_id).expanduser().exists() or repo_id.startswith((".", "/", "~")):
        raise CheckpointError(f"{option} {repo_id} is a path, not a hub repo: pass a local copy "
                              f"with {local_option} {repo_id}")
    raise CheckpointError(f"{option} {repo_id!r} is not a hub repo name: that is namespace/name (such as "
                          f"{UNGATED_COPY}), of letters, digits, '-', '_' and '.'")


def download(repo_id: str, patterns: list[str], token: str | None = None,
             local_option: str = "--model-path") -> Path:
    """Fetch the files of a hub repo that conversion needs, with huggingface_hub's progress bars."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    check_repo_id(repo_id, local_option)
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, token=token))
    except GatedRepoError as e:
        raise CheckpointError(
            f"{repo_id} is gated: accept its terms at https://huggingface.co/{repo_id}, then log in "
            f"(`hf auth login` or HF_TOKEN=...). Or convert the ungated copy: --model-id {UNGATED_COPY}"
        ) from e
    except RepositoryNotFoundError as e:
        raise CheckpointError(
            f"no hub repo {repo_id!r} (or it is private and you are not logged in): check the name, "
            f"log in with `hf auth login`, or pass a local folder with {local_option}"
        ) from e
    except LocalEntryNotFoundError as e:
        raise CheckpointError(
            f"cannot download {repo_id}: the hub is unreachable and it is not in the local cache. "
            f"Connect to the internet, or pass a downloaded copy with {local_option}"
        ) from e
    except HfHubHTTPError as e:
        raise CheckpointError(f"downloading {repo_id} failed: {e}") from e


class SafetensorsFiles:
    """All tensors of a folder's safetensors file(s), opened lazily, read as float32 numpy."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        files = self._weight_files(folder)
        self._where: dict[str, object] = {}
        self._handles = []
        for path in files:
            try:
                handle = safe_open(str(path), framework="pt")
            except Exception as e:
                raise CheckpointError(f"cannot read {path}: {e}") from e
            self._handles.append(handle)
            for key in handle.keys():
                self._where[key] = handle

    @staticmethod
    def _weight_files(folder: Path) -> list[Path]:
        # The index file's name varies (sesame/csm-1b: transformers.safetensors.index.json).
        indexes = sorted(folder.glob("*.safetensors.index.json"))
        if indexes:
            weight_map = read_json(indexes[0]).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{indexes[0]} has no weight_map: is it a safetensors index?")
            files = [folder / name for name in sorted(set(weight_map.values()))]
            missing = [f.name for f in files if not f.exists()]
            if missing:
                raise CheckpointError(f"{indexes[0].name} lists shards that are missing in {folder}: {missing}")
            return files
        # PEFT's adapter file: beside a merged model (save_pretrained of the merge into the adapter's folder)
        # it is not part of the model; alone, open_checkpoint says what to do with it.
        files = sorted(f for f in folder.glob("*.safetensors") if f.name != ADAPTER_FILE)
        if files:
            return files
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise CheckpointError(
                f"{folder} holds only pickled checkpoints ({', '.join(pickles)}); they can run arbitrary code "
                f"when loaded and are refused. Use the model's safetensors release"
            )
        raise CheckpointError(f"no *.safetensors files in {folder}")

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def get(self, key: str) -> np.ndarray:
        handle = self._where.get(key)
        if handle is None:
            raise CheckpointError(f"tensor {key!r} is missing from the checkpoint")
        return handle.get_tensor(key).float().numpy()


def _unpermute_rotate_half(w: np.ndarray, n_head: int) -> np.ndarray:
    """transformers permutes q/k rows for half-split RoPE; llama.cpp wants the original interleaved pairs."""
    rows, dim = w.shape
    head_dim = rows // n_head
    return w.reshape(n_head, 2, head_dim // 2, dim).swapaxes(1, 2).reshape(rows, dim)


class ConfigSection:
    """One JSON object of config.json, read with the types CSM needs. A wrong value is refused here, named with
    its fix: past this point a string layer count or a zero head count is a traceback deep in the conversion."""

    def __init__(self, values: object, name: str, path: Path):
        self.name, self.path = name, path
        if not isinstance(values, dict):
            raise self._wrong(values, "a JSON object {...}")
        self.values = values

    def _wrong(self, value: object, kind: str, key: str | None = None) -> CheckpointError:
        field = ".".join(part for part in (self.name, key) if part) or "the top level"
        return CheckpointError(f"{self.path} gives {field} = {json.dumps(value)[:60]}: it must be {kind}; "
                               "correct the config")

    def _given(self, key: str, default: object) -> object:
        """The value at key; an optional key that is absent or null (transformers writes unset ones so) is its
        default."""
        if key not in self.values and default is None:
            raise KeyError(".".join(part for part in (self.name, key) if part))
        value = self.values.get(key)
        return default if value is None and default is not None else value

    def count(self, key: str, default: int | None = None) -> int:
        """A whole number above 0: layers, heads, sizes."""
        value = self._given(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise self._wrong(value, "a whole number above 0", key)
        return value

    def number(self, key: str, default: float | None = None) -> float:
        """A finite number above 0: epsilons, RoPE's base and factors."""
        value = self._given(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            raise self._wrong(value, "a number above 0", key)
        return float(value)

    def section(self, key: str, optional: bool = False) -> ConfigSection:
        """A nested object; an optional one that is absent or null reads as empty."""
        value = self._given(key, {} if optional else None)
        return ConfigSection(value, ".".join(part for part in (self.name, key) if part), self.path)


def _transformer_from_hf(c: ConfigSection) -> TransformerConfig:
    rope = c.section("rope_parameters" if c.values.get("rope_parameters") else "rope_scaling", optional=True)
    theta = rope.number("rope_theta", c.number("rope_theta", 500000.0))
    scaling = None
    if rope.values.get("rope_type", rope.values.get("type")) == "llama3":
        scaling = RopeScaling(
            factor=rope.number("factor"),
            low_freq_factor=rope.number("low_freq_factor"),
            high_freq_factor=rope.number("high_freq_factor"),
            original_context=rope.count("original_max_position_embeddings"),
        )
    n_head = c.count("num_attention_heads")
    return TransformerConfig(
        n_layer=c.count("num_hidden_layers"),
        n_embd=c.count("hidden_size"),
        n_head=n_head,
        n_head_kv=c.count("num_key_value_heads", n_head),
        n_ff=c.count("intermediate_size"),
        head_dim=c.count("head_dim", c.count("hidden_size") // n_head or 1),
        norm_eps=c.number("rms_norm_eps", 1e-5),
        rope_theta=theta,
        rope_scaling=scaling,
        max_seq_len=c.count("max_position_embeddings", 2048),
    )


def _transformer_from_flavor(config: ConfigSection, key: str) -> TransformerConfig:
    flavor = config.values.get(key)
    if isinstance(flavor, str):
        if flavor not in FLAVORS:
            raise CheckpointError(f"unknown flavor {flavor!r}; known: {sorted(FLAVORS)}")
        return FLAVORS[flavor]
    # Dimensions spelled out with torchtune's llama3_2 builder arguments.
    f = config.section(key)
    scaling = RopeScaling(factor=f.number("scale_factor", 32.0))
    return TransformerConfig(
        n_layer=f.count("num_layers"),
        n_embd=f.count("embed_dim"),
        n_head=f.count("num_heads"),
        n_head_kv=f.count("num_kv_heads"),
        n_ff=f.count("intermediate_dim"),
        head_dim=f.count("embed_dim") // f.count("num_heads") or 1,
        norm_eps=f.number("norm_eps", 1e-5),
        rope_theta=f.number("rope_base", 500000.0),
        rope_scaling=scaling,
        max_seq_len=f.count("max_seq_len", 2048),
    )


@dataclass
class Checkpoint:
    """A CSM checkpoint read through one naming table; tensors come out in llama.cpp's layout."""

    folder: Path
    fmt: int
    config: CSMConfig
    files: SafetensorsFiles
    codec_config: dict | None = None

    def tensor(self, name: str) -> np.ndarray:
        source = tm.CSM_TENSORS[name][self.fmt]
        if source not in self.files and name in tm.TIED_FALLBACK:
            tied = tm.CSM_TENSORS[tm.TIED_FALLBACK[name]][self.fmt]
            source = tied if tied in self.files else source
        data = self.files.get(source)
        expected = tm.csm_shapes(self.config)[name]
        if data.shape != expected:
            raise CheckpointError(f"{source}: expected shape {expected} from config.json, "
                                  f"the checkpoint has {data.shape}")
        return data

    def block_tensor(self, model: str, layer: int, gguf_name: str) -> np.ndarray:
        w = self.files.get(tm.block_source_name(model, layer, gguf_name, self.fmt))
        if self.fmt == tm.TRANSFORMERS and gguf_name in ("attn_q", "attn_k"):
            t = self.config.backbone if model == "backbone" else self.config.decoder
            w = _unpermute_rotate_half(w, t.n_head if gguf_name == "attn_q" else t.n_head_kv)
        return w

    def output_norm(self, model: str) -> np.ndarray:
        return self.files.get(tm.output_norm_source_name(model, self.fmt))

    def unused_tensors(self) -> list[str]:
        """Tensors that no part of the conversion reads: weights a fine-tune added that CSM has no place for."""
        used = {names[self.fmt] for names in tm.CSM_TENSORS.values()}
        for model, t in (("backbone", self.config.backbone), ("decoder", self.config.decoder)):
            used.add(tm.output_norm_source_name(model, self.fmt))
            used.update(tm.block_source_name(model, layer, name, self.fmt)
                        for layer in range(t.n_layer) for name in tm.BLOCK_TENSORS)
        return sorted(k for k in self.files.keys()
                      if k not in used and not k.startswith(tm.CODEC_PREFIX) and not k.endswith(ROPE_BUFFERS))

    def codec_tensors(self) -> dict[str, np.ndarray]:
        """The Mimi weights stored inside a transformers-format checkpoint (prefixed keys)."""
        return {k: self.files.get(k) for k in self.files.keys() if k.startswith(tm.CODEC_PREFIX)}


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds no JSON object")
    return data


def open_checkpoint(folder: str | Path) -> Checkpoint:
    folder = Path(folder)
    if folder.is_file():
        raise CheckpointError(f"{folder} is a file: give the checkpoint's folder (the one with config.json)")
    if not folder.is_dir():
        raise CheckpointError(f"model folder {folder} does not exist")
    config_path = folder / "config.json"
    only_adapter = (folder / ADAPTER_FILE).exists() and not any(
        f.name != ADAPTER_FILE for f in [*folder.glob("*.safetensors"), *folder.glob("*.safetensors.index.json")])
    if only_adapter or (not config_path.exists() and (folder / "adapter_config.json").exists()):
        raise CheckpointError(f"{folder} is a LoRA/PEFT adapter, not a whole model: merge it into its base model "
                              "(peft's merge_and_unload), save that with save_pretrained, and convert it")
    if not config_path.exists():
        raise CheckpointError(f"{folder} has no config.json; is it a CSM checkpoint?")
    raw = read_json(config_path)
    files = SafetensorsFiles(folder)
    keys = set(files.keys())
    adapters = sorted(k for k in keys if ".lora_" in k or ".base_layer." in k)  # any PEFT tuner wraps a base_layer
    if adapters:
        raise CheckpointError(f"{folder} holds adapter (LoRA/PEFT) weights that are not merged ({adapters[0]}, ...): "
                              "merge them into the base weights (peft's merge_and_unload), save with save_pretrained, "
                              "and convert that")
    config_json = ConfigSection(raw, "", config_path)
    if tm.FORMAT_MARKERS[tm.TRANSFORMERS] in keys:
        fmt = tm.TRANSFORMERS
        try:
            config = CSMConfig(
                backbone=_transformer_from_hf(config_json),
                decoder=_transformer_from_hf(config_json.section("depth_decoder_config")),
                text_vocab_size=config_json.count("text_vocab_size", 128256),
                audio_vocab_size=config_json.count("vocab_size", 2051),
                num_codebooks=config_json.count("num_codebooks", 32),
            )
        except KeyError as e:
            raise CheckpointError(f"{config_path} lacks {e.args[0]!r} for a transformers-format CSM") from e
        # A Mimi config of its own, else run time's default (moshi's Mimi).
        codec_config = config_json.section("codec_config", optional=True).values or None
    elif tm.FORMAT_MARKERS[tm.ORIGINAL] in keys:
        fmt = tm.ORIGINAL
        try:
            config = CSMConfig(
                backbone=_transformer_from_flavor(config_json, "backbone_flavor"),
                decoder=_transformer_from_flavor(config_json, "decoder_flavor"),
                text_vocab_size=config_json.count("text_vocab_size"),
                audio_vocab_size=config_json.count("audio_vocab_size"),
                num_codebooks=config_json.count("audio_num_codebooks"),
            )
        except KeyError as e:
            raise CheckpointError(f"{config_path} lacks {e.args[0]!r} for an original-format CSM") from e
        codec_config = None
    else:
        raise CheckpointError(
            f"{folder} is not a CSM checkpoint: expected {tm.FORMAT_MARKERS[tm.ORIGINAL]!r} (original format) "
            f"or {tm.FORMAT_MARKERS[tm.TRANSFORMERS]!r} (transformers format) among its tensors"
        )
    for model, t in (("backbone", config.backbone), ("decoder", config.decoder)):
        if tm.block_source_name(model, t.n_layer, "attn_q", fmt) in keys:  # a missing layer fails on its own
            raise CheckpointError(f"{config_path} gives the {model} {t.n_layer} layers but the weights have more: "
                                  f"converting would drop them; correct the config")
    return Checkpoint(folder=folder, fmt=fmt, config=config, files=files, codec_config=codec_config)
