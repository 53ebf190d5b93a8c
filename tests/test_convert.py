"""Conversion: tokenizer fidelity, what stock llama.cpp sees, and bad input that loses nothing."""

from __future__ import annotations

import http.server
import json
import os
import shutil
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from converter.checkpoint import CheckpointError, download
from converter.convert import convert
from converter.gguf_files import ConversionError
from csm_fixtures import tiktoken_encoding
from csm_gguf.model import CSMModel

TRICKY = [
    "Hello, world!",
    "  leading spaces and trailing  ",
    "Numbers: 1234567, 3.14159, -42, 1e10, $19.99",
    "Punctuation... --- !!! ??? «quotes» „low“ 'single' (brackets) [0]",
    "Non-Latin: 你好，世界。こんにちは。Привет мир. مرحبا بالعالم. 안녕하세요",
    "Newlines\nand\n\nparagraphs\r\nwith\ttabs",
    "Emoji 🎉🚀 and combining é vs é",
    "don't I'll we've they're it's",
]


def test_token_ids_equal_tiktoken(f32_model):
    model = CSMModel(f32_model)
    enc = tiktoken_encoding()
    for text in TRICKY:
        assert model.tokenize(text) == enc.encode(text), text


def test_prompt_has_exactly_one_bos(f32_model):
    model = CSMModel(f32_model)
    ids = model.prompt_tokens(3, "Hi")
    assert ids[0] == 128000 and ids[-1] == 128001
    assert ids.count(128000) == 1
    assert ids[1:-1] == tiktoken_encoding().encode("[3]Hi")


def test_model_files_are_stock_llama_models(f32_model):
    import gguf

    for name in ("backbone.gguf", "decoder.gguf"):
        reader = gguf.GGUFReader(f32_model / name)
        assert reader.fields["general.architecture"].contents() == "llama"
        names = {t.name for t in reader.tensors}
        assert "token_embd.weight" in names and "rope_freqs.weight" in names
        assert all(n.startswith(("blk.", "token_embd", "rope_freqs", "output_norm")) for n in names)


def test_rope_factors_match_transformers_llama3_curve():
    import torch
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from csm_gguf.config import CSM_1B

    for cfg in (CSM_1B.backbone, CSM_1B.decoder):
        hf = LlamaConfig(hidden_size=cfg.n_embd, num_attention_heads=cfg.n_head, head_dim=cfg.head_dim,
                         rope_parameters=dict(rope_type="llama3", rope_theta=cfg.rope_theta, factor=32.0,
                                              low_freq_factor=1.0, high_freq_factor=4.0,
                                              original_max_position_embeddings=8192),
                         max_position_embeddings=131072)
        inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, torch.device("cpu"))
        base = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2).float() / cfg.head_dim))
        np.testing.assert_allclose(np.asarray(cfg.rope_factors()), (base / inv_freq).numpy(), rtol=1e-5)


def _no_leftovers(parent: Path, name: str) -> None:
    assert not (parent / name).exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(f".{name}.")], "temporary files left behind"


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        convert(model_path=str(tmp_path / "nope"), output_dir=tmp_path / "out", qtype="f32")
    _no_leftovers(tmp_path, "out")


def test_file_instead_of_folder(hf_checkpoint, tmp_path):
    with pytest.raises(CheckpointError, match="is a file: give the checkpoint's folder"):
        convert(model_path=str(hf_checkpoint / "config.json"), output_dir=tmp_path / "out", qtype="f32")
    _no_leftovers(tmp_path, "out")


def test_missing_tensor_loses_nothing(hf_checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(hf_checkpoint, broken)
    state = load_file(str(broken / "model.safetensors"))
    del state["backbone_model.layers.1.mlp.up_proj.weight"]
    save_file(state, str(broken / "model.safetensors"))
    with pytest.raises(CheckpointError, match="backbone_model.layers.1.mlp.up_proj.weight"):
        convert(model_path=str(broken), output_dir=tmp_path / "out", qtype="f32")
    _no_leftovers(tmp_path, "out")


def test_wrong_shape(hf_checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(hf_checkpoint, broken)
    state = load_file(str(broken / "model.safetensors"))
    state["lm_head.weight"] = state["lm_head.weight"][:, :128].contiguous()
    save_file(state, str(broken / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"lm_head.weight: expected shape \(64, 256\)"):
        convert(model_path=str(broken), output_dir=tmp_path / "out", qtype="f32")
    _no_leftovers(tmp_path, "out")


def test_both_formats_use_every_tensor(hf_checkpoint, original_checkpoint):
    from converter.checkpoint import open_checkpoint

    assert open_checkpoint(hf_checkpoint).unused_tensors() == []
    assert open_checkpoint(original_checkpoint).unused_tensors() == []


def test_tensors_left_out_are_named(hf_checkpoint, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from csm_gguf.convert import main

    extra = tmp_path / "extra"
    shutil.copytree(hf_checkpoint, extra)
    state = load_file(str(extra / "model.safetensors"))
    state["backbone_model.layers.0.self_attn.q_norm.weight"] = torch.ones(8)  # a fine-tune's addition
    state["backbone_model.rotary_emb.inv_freq"] = torch.ones(4)  # a RoPE table: computed by llama.cpp, no warning
    save_file(state, str(extra / "model.safetensors"))
    assert main(["--model-path", str(extra), "--qtype", "f16", "--output-dir", str(tmp_path / "out")]) == 0
    assert ("warning: tensors of the checkpoint that are not part of CSM are left out (1): "
            "backbone_model.layers.0.self_attn.q_norm.weight\n") in capsys.readouterr().err


def test_lora_adapters_are_refused_with_the_fix(hf_checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    save_file({"base_model.model.backbone_model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 64)},
              str(adapter / "adapter_model.safetensors"))
    with pytest.raises(CheckpointError, match="is a LoRA/PEFT adapter, not a whole model: merge it"):
        convert(model_path=str(adapter), output_dir=tmp_path / "out", qtype="f32")
    unmerged = tmp_path / "unmerged"
    shutil.copytree(hf_checkpoint, unmerged)
    state = load_file(str(unmerged / "model.safetensors"))
    q = state.pop("backbone_model.layers.0.self_attn.q_proj.weight")
    state["backbone_model.layers.0.self_attn.q_proj.base_layer.weight"] = q
    state["backbone_model.layers.0.self_attn.q_proj.lora_A.default.weight"] = torch.zeros(4, q.shape[1])
    save_file(state, str(unmerged / "model.safetensors"))
    with pytest.raises(CheckpointError, match="holds adapter .LoRA/PEFT. weights that are not merged"):
        convert(model_path=str(unmerged), output_dir=tmp_path / "out", qtype="f32")
    ia3 = state.pop("backbone_model.layers.0.self_attn.q_proj.lora_A.default.weight")  # another tuner, same wrapping
    state["backbone_model.layers.0.self_attn.q_proj.ia3_l.default"] = torch.ones(ia3.shape[1])
    save_file(state, str(unmerged / "model.safetensors"))
    with pytest.raises(CheckpointError, match="q_proj.base_layer.weight, ...\\): merge them"):
        convert(model_path=str(unmerged), output_dir=tmp_path / "out", qtype="f32")
    shutil.copy(hf_checkpoint / "config.json", adapter)  # an adapter with its base model's config beside it
    with pytest.raises(CheckpointError, match="is a LoRA/PEFT adapter, not a whole model"):
        convert(model_path=str(adapter), output_dir=tmp_path / "out", qtype="f32")
    _no_leftovers(tmp_path, "out")


def test_adapter_file_beside_a_merged_model_is_not_read(hf_checkpoint, tmp_path):
    """merge_and_unload().save_pretrained(adapter_folder) leaves the adapter's files beside the merged model."""
    from safetensors.torch import save_file

    merged = tmp_path / "merged"
    shutil.copytree(hf_checkpoint, merged)
    (merged / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    save_file({"base_model.model.backbone_model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 64)},
              str(merged / "adapter_model.safetensors"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and no tensor is left out
        convert(model_path=str(merged), output_dir=tmp_path / "out", qtype="f16")
    assert (tmp_path / "out" / "csm.gguf").exists()


@pytest.mark.parametrize("args, message", [
    (["--model-path", ""], "--model-path is empty"),  # was: download sesame/csm-1b
    (["--random-weights", "--output-dir", ""], "--output-dir is empty"),  # was: replace the cache's model
    (["--random-weights", "--mimi-path", "/nonexistent"], "--mimi-path would be ignored"),
    (["--random-weights", "--mimi-id", "kyutai/mimi", "--tokenizer-id", "x/y"], "--mimi-id, --tokenizer-id would be"),
])
def test_arguments_that_would_be_ignored_or_taken_for_the_default_are_refused(args, message, capsys, monkeypatch):
    from converter import convert as cc
    from converter import random_weights
    from csm_gguf.convert import main

    monkeypatch.setattr(cc, "convert", lambda **kw: pytest.fail("converted"))
    monkeypatch.setattr(random_weights, "convert_random", lambda *a, **kw: pytest.fail("converted"))
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_unknown_qtype_via_cli(hf_checkpoint, tmp_path, capsys):
    from csm_gguf.convert import main

    with pytest.raises(SystemExit) as e:
        main(["--model-path", str(hf_checkpoint), "--qtype", "q3_x", "--output-dir", str(tmp_path / "o")])
    assert e.value.code == 2
    assert "invalid choice: 'q3_x'" in capsys.readouterr().err
    with pytest.raises(ConversionError, match="unknown qtype 'q3_x'"):
        convert(model_path=str(hf_checkpoint), output_dir=tmp_path / "o", qtype="q3_x")
    _no_leftovers(tmp_path, "o")


def test_pickled_checkpoint_is_refused(tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "ckpt.pt").write_bytes(b"\x80\x04not really")
    with pytest.raises(CheckpointError, match="pickled"):
        convert(model_path=str(folder), output_dir=tmp_path / "out", qtype="f32")


def test_not_a_csm_checkpoint(tmp_path):
    from safetensors.numpy import save_file

    folder = tmp_path / "other"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    save_file({"model.layers.0.weight": np.zeros((2, 2), np.float32)}, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match="not a CSM checkpoint"):
        convert(model_path=str(folder), output_dir=tmp_path / "out", qtype="f32")


@pytest.mark.parametrize("victim", ["csm.gguf", "backbone.gguf", "decoder.gguf", "tokenizer.gguf"])
def test_truncated_gguf_gets_a_clear_error(f32_model, tmp_path, victim):
    from csm_gguf.generator import Generator

    damaged = tmp_path / "damaged"
    shutil.copytree(f32_model, damaged)
    path = damaged / victim
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match="convert"):
        Generator(CSMModel(damaged))


def with_sidecar_version(model: Path, folder: Path, version: int) -> Path:
    """A copy of `model` whose sidecar says it is of another format version."""
    import gguf

    shutil.copytree(model, folder)
    reader = gguf.GGUFReader(folder / "csm.gguf", "r+")
    reader.fields["csm.version"].parts[-1][0] = version
    reader.data.flush()
    del reader
    return folder


@pytest.mark.parametrize("version, match", [
    (2, r"format version 2, made by an older csm-gguf: convert the model again \(python -m csm_gguf.convert "
        r"--output-dir .*old.*\); this csm-gguf reads version 3"),
    (4, r"format version 4, made by a newer csm-gguf: upgrade csm-gguf, or convert the model again"),
])
def test_sidecar_of_another_version_is_refused_naming_the_fix(f32_model, tmp_path, version, match):
    """Version 2 sidecars hold the codec in the kyutai/mimi checkpoint's layout, in F16: this csm-gguf maps
    version 3's runtime layout as it is, and refuses the others rather than reshuffle at every start."""
    with pytest.raises(ValueError, match=match):
        CSMModel(with_sidecar_version(f32_model, tmp_path / "old", version))


def test_codec_weights_are_the_mapped_sidecar(f32_model, tiny_csm):
    """The converter stores the codec as it runs (float32, Mimi's own layout): its weights are the sidecar's
    mapped bytes, nothing copied or reordered, and they are the converter's Mimi, built from the checkpoint."""
    from converter.mimi_keys import mimi_tensors_to_transformers
    from csm_gguf.mimi import Mimi, MimiConfig

    model = CSMModel(f32_model)
    mapped = model.codec_tensors()
    config = MimiConfig.from_transformers(model.codec_config)
    codec = Mimi.from_runtime_tensors(config, mapped)
    built = Mimi.from_state_dict(config, mimi_tensors_to_transformers(tiny_csm.codec_model.state_dict()))
    assert codec.state_dict().keys() == mapped.keys() == built.state_dict().keys()
    for name, tensor in codec.state_dict().items():
        assert isinstance(mapped[name], np.memmap) and tensor.dtype == torch.float32, name
        assert tensor.data_ptr() == mapped[name].ctypes.data, name
        assert torch.equal(tensor, built.state_dict()[name]), name


def test_missing_model_file(f32_model, tmp_path):
    damaged = tmp_path / "partial"
    shutil.copytree(f32_model, damaged)
    (damaged / "decoder.gguf").unlink()
    with pytest.raises(FileNotFoundError, match="missing decoder.gguf"):
        CSMModel(damaged)


def test_existing_model_is_replaced_only_when_complete(hf_checkpoint, tmp_path):
    out = tmp_path / "model"
    convert(model_path=str(hf_checkpoint), output_dir=out, qtype="f16")
    before = (out / "backbone.gguf").read_bytes()
    broken = tmp_path / "broken"
    shutil.copytree(hf_checkpoint, broken)
    (broken / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="tokenizer"):
        convert(model_path=str(broken), output_dir=out, qtype="f32")
    assert (out / "backbone.gguf").read_bytes() == before


class _GatedHub(http.server.BaseHTTPRequestHandler):
    """Answers every request as the hub answers for a gated repo without accepted terms."""

    def do_GET(self):
        body = json.dumps({"error": "Access to model sesame/csm-1b is restricted."}).encode()
        self.send_response(403)
        self.send_header("X-Error-Code", "GatedRepo")
        self.send_header("X-Error-Message", "Access to model sesame/csm-1b is restricted.")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_HEAD = do_GET

    def log_message(self, *args):
        pass


def test_gated_repo_names_the_fix(monkeypatch, tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _GatedHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    import huggingface_hub.constants as c

    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setattr(c, "ENDPOINT", endpoint)
    monkeypatch.setattr(c, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    try:
        with pytest.raises(CheckpointError) as e:
            download("sesame/csm-1b", ["*.json"])
    finally:
        server.shutdown()
    message = str(e.value)
    assert "gated" in message and "unsloth/csm-1b" in message and "log in" in message


def test_offline_without_cache_says_what_to_do(monkeypatch, tmp_path):
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(CheckpointError, match="unreachable.*--model-path"):
        download("sesame/csm-1b", ["*.json"])


def test_codec_download_offline_names_its_own_option(monkeypatch, tmp_path, original_checkpoint, tokenizer_json):
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with (pytest.raises(CheckpointError, match="unreachable.*--mimi-path"),
          pytest.warns(UserWarning, match=f"{original_checkpoint} holds no Mimi codec weights: using kyutai/mimi")):
        convert(model_path=str(original_checkpoint), tokenizer_path=str(tokenizer_json),
                output_dir=tmp_path / "out", qtype="f32")
    _no_leftovers(tmp_path, "out")


@pytest.mark.parametrize("kind", ["folder", "file", "under a file"])
def test_output_dir_that_is_not_a_model_is_left_alone(hf_checkpoint, tmp_path, kind):
    """Replacing a folder deletes it: only a csm-gguf model (or an empty folder) may be replaced."""
    precious = tmp_path / "precious"
    if kind == "file":
        precious.write_text("my thesis")
        out, match = precious, "is a file"
    else:
        precious.mkdir()
        (precious / "thesis.txt").write_text("my thesis")
        out = precious if kind == "folder" else precious / "thesis.txt" / "model"
        match = "not a csm-gguf model folder" if kind == "folder" else "thesis.txt is a file"
    with pytest.raises(ConversionError, match=match):
        convert(model_path=str(hf_checkpoint), output_dir=out, qtype="f16")
    assert (precious.read_text() if kind == "file" else (precious / "thesis.txt").read_text()) == "my thesis"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious"]


@pytest.mark.parametrize("kind", ["mount point", "unwritable parent"])
def test_output_dir_that_cannot_be_replaced_is_refused_before_the_work(hf_checkpoint, tmp_path, monkeypatch, kind):
    """A Docker volume as --output-dir: the finished model could not be renamed onto it, so converting
    used to fail only at the end. (Faked: tests cannot mount, and root may write anywhere.)"""
    out = tmp_path / "volume"
    out.mkdir()
    if kind == "mount point":
        monkeypatch.setattr(Path, "is_mount", lambda self: self == out)
        match = "is a mount point, which cannot be replaced by a finished model: give a folder inside it"
    else:
        monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path)
        match = f"cannot write in {tmp_path}, where the model is built"
    monkeypatch.setattr("converter.convert.open_checkpoint", lambda *a: pytest.fail("read the checkpoint anyway"))
    with pytest.raises(ConversionError, match=match):
        convert(model_path=str(hf_checkpoint), output_dir=out, qtype="f16")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["volume"]


def test_quantizing_is_quiet_unless_verbose(hf_checkpoint, tmp_path):
    """llama.cpp's quantizer narrates every tensor (about 60 lines a conversion) on stderr, as its loader
    does at run time: kept for CSM_GGUF_VERBOSE only."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "CSM_GGUF_VERBOSE"}  # a fresh process: no filter yet
    command = [sys.executable, "-m", "csm_gguf.convert", "--model-path", str(hf_checkpoint), "--qtype", "q8_0",
               "--output-dir", str(tmp_path / "out")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "llama_model_loader" not in done.stderr, done.stderr[-2000:]


def test_empty_output_dir_is_used(hf_checkpoint, tmp_path):
    (tmp_path / "empty").mkdir()
    convert(model_path=str(hf_checkpoint), output_dir=tmp_path / "empty", qtype="f16")
    assert (tmp_path / "empty" / "csm.gguf").exists()


@pytest.mark.parametrize("file, content, match", [
    ("config.json", "{not json", "cannot read .*config.json"),
    ("config.json", "[1, 2]", "config.json holds no JSON object"),
    ("model.safetensors.index.json", "{}", "has no weight_map"),
])
def test_unreadable_json_is_a_clear_error(hf_checkpoint, tmp_path, file, content, match):
    broken = tmp_path / "broken"
    shutil.copytree(hf_checkpoint, broken)
    (broken / file).write_text(content)
    with pytest.raises(CheckpointError, match=match):
        convert(model_path=str(broken), output_dir=tmp_path / "out", qtype="f32")
    _no_leftovers(tmp_path, "out")


def test_config_without_a_field_names_it(hf_checkpoint, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(hf_checkpoint, broken)
    config = json.loads((broken / "config.json").read_text())
    del config["hidden_size"]
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="lacks 'hidden_size'"):
        convert(model_path=str(broken), output_dir=tmp_path / "out", qtype="f32")


@pytest.mark.parametrize("fmt, change, match", [
    ("hf", {"num_hidden_layers": "two"}, 'num_hidden_layers = "two": it must be a whole number above 0'),
    ("hf", {"num_attention_heads": 0}, "num_attention_heads = 0: it must be a whole number above 0"),
    ("hf", {"depth_decoder_config": None}, "depth_decoder_config = null: it must be a JSON object"),
    ("hf", {"codec_config": "x"}, 'codec_config = "x": it must be a JSON object'),
    ("hf", {"rms_norm_eps": "tiny"}, 'rms_norm_eps = "tiny": it must be a number above 0'),
    ("original", {"text_vocab_size": True}, "text_vocab_size = true: it must be a whole number above 0"),
    ("original", {"decoder_flavor": 3}, "decoder_flavor = 3: it must be a JSON object"),
])
def test_config_value_of_the_wrong_type_is_an_error_naming_it(hf_checkpoint, original_checkpoint, tmp_path, capsys,
                                                              fmt, change, match):
    """Not a traceback from deep in the conversion (a string as a layer count, a division by 0 heads)."""
    from csm_gguf.convert import main

    broken = tmp_path / "broken"
    shutil.copytree(hf_checkpoint if fmt == "hf" else original_checkpoint, broken)
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, **change}))
    assert main(["--model-path", str(broken), "--qtype", "f32", "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and match in err and "correct the config" in err
    _no_leftovers(tmp_path, "out")


def test_config_of_the_decoder_names_its_field(hf_checkpoint, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(hf_checkpoint, broken)
    config = json.loads((broken / "config.json").read_text())
    config["depth_decoder_config"]["intermediate_size"] = 1.5
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="depth_decoder_config.intermediate_size = 1.5"):
        convert(model_path=str(broken), output_dir=tmp_path / "out", qtype="f32")


@pytest.mark.parametrize("argv, match", [
    (["--model-id", "./tiny/hf"], "--model-id ./tiny/hf is a path, not a hub repo: pass a local copy with "
                                  "--model-path ./tiny/hf"),
    (["--model-id", "bad id with spaces"], "--model-id 'bad id with spaces' is not a hub repo name"),
    (["--model-path", "x", "--mimi-id", "/abs/mimi"], "--mimi-id /abs/mimi is a path, not a hub repo: pass a "
                                                      "local copy with --mimi-path"),
])
def test_hub_option_given_a_path_or_a_bad_name_says_so(tmp_path, monkeypatch, capsys, argv, match):
    from csm_gguf.convert import main

    monkeypatch.setattr("converter.convert.download", lambda *a: pytest.fail("downloaded anyway"))
    monkeypatch.setattr("converter.convert.open_checkpoint", lambda *a: pytest.fail("read a checkpoint anyway"))
    assert main([*argv, "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and match in err
    assert not (tmp_path / "out").exists()


def test_config_with_fewer_layers_than_the_weights_is_refused(hf_checkpoint, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(hf_checkpoint, broken)
    config = json.loads((broken / "config.json").read_text())
    config["depth_decoder_config"]["num_hidden_layers"] -= 1
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="gives the decoder 1 layers but the weights have more"):
        convert(model_path=str(broken), output_dir=tmp_path / "out", qtype="f32")


def test_weights_that_are_no_mimi_are_refused(original_checkpoint, tokenizer_json, tmp_path):
    """The CSM's own weights given as the codec used to convert 'successfully' into a model that
    could not load its codec."""
    with pytest.raises(CheckpointError, match="Mimi codec from .* does not load"):
        convert(model_path=str(original_checkpoint), tokenizer_path=str(tokenizer_json),
                mimi_path=str(original_checkpoint / "model.safetensors"), output_dir=tmp_path / "out", qtype="f32")
    _no_leftovers(tmp_path, "out")


def test_sigterm_mid_conversion_leaves_nothing(hf_checkpoint, tmp_path, monkeypatch, capsys):
    """`kill` / `timeout` stop the CLI through its clean-up, like Ctrl-C (they left a hidden half-written
    folder). The signal arrives while the first model file is being written."""
    import signal

    import converter.convert as cc
    from csm_gguf.convert import main

    real_write = cc.write_gguf

    def write_then_die(*args, **kwargs):
        real_write(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)

    def unhandled(*_):
        raise AssertionError("the CLI installed no SIGTERM handler")

    monkeypatch.setattr(cc, "write_gguf", write_then_die)
    previous = signal.signal(signal.SIGTERM, unhandled)  # a regression fails here instead of killing pytest
    try:
        with pytest.raises(SystemExit) as e:
            main(["--model-path", str(hf_checkpoint), "--qtype", "f16", "--output-dir", str(tmp_path / "out")])
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert e.value.code == 128 + signal.SIGTERM
    assert "terminated: nothing was written" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_random_model_is_reused_only_when_it_is_the_same(f32_model, tokenizer_json, tmp_path):
    """--random-weights writes once and reuses its own model; another qtype (or anything else) there is
    not taken for it (it used to reuse any folder holding the four model files)."""
    from transformers import MimiConfig

    from converter.random_weights import convert_random
    from mimi_fixtures import TINY_MIMI_CONFIG

    out = tmp_path / "random"
    kw = dict(config=CSMModel(f32_model).config, codec_config=MimiConfig(**TINY_MIMI_CONFIG).to_dict(),
              tokenizer_path=str(tokenizer_json))
    convert_random(out, "f16", **kw)
    written = (out / "csm.gguf").stat().st_mtime_ns
    convert_random(out, "f16", **kw)
    assert (out / "csm.gguf").stat().st_mtime_ns == written
    convert_random(out, "f32", **kw)
    assert CSMModel(out).qtype == "f32"
    (tmp_path / "mine").mkdir()
    for name in ("backbone.gguf", "decoder.gguf", "csm.gguf", "tokenizer.gguf"):
        (tmp_path / "mine" / name).write_bytes(b"")
    convert_random(tmp_path / "mine", "f16", **kw)  # four empty model files: no model, so written over
    assert CSMModel(tmp_path / "mine").qtype == "f16"


def test_random_model_output_dir_is_checked_before_drawing_weights(tmp_path, monkeypatch):
    from converter.random_weights import convert_random

    monkeypatch.setattr("converter.random_weights.random_mimi", lambda *a: pytest.fail("drew the weights first"))
    (tmp_path / "a-file").write_text("mine")
    with pytest.raises(ConversionError, match="is a file"):
        convert_random(tmp_path / "a-file", "f16")


def test_ctrl_c_mid_conversion_is_quiet_and_leaves_nothing(hf_checkpoint, tmp_path, monkeypatch, capsys):
    import converter.convert as cc
    from csm_gguf.convert import main

    real_write = cc.write_gguf

    def write_then_interrupt(*args, **kwargs):
        real_write(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(cc, "write_gguf", write_then_interrupt)
    assert main(["--model-path", str(hf_checkpoint), "--qtype", "f16", "--output-dir", str(tmp_path / "out")]) == 130
    assert "interrupted: nothing was written" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_interrupted_replacement_keeps_the_old_model(tmp_path, monkeypatch):
    """Between its two renames, an interruption left neither model in place (the old one hidden as .old)."""
    from converter import convert as conversion

    old, new = tmp_path / "model", tmp_path / ".model.new"
    old.mkdir()
    (old / "which").write_text("old")
    new.mkdir()
    (new / "which").write_text("new")
    replace, calls = os.replace, []

    def interrupted(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # the new model's move into place
            raise KeyboardInterrupt
        replace(src, dst)

    monkeypatch.setattr(conversion.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        conversion._replace_dir(new, old)
    assert (old / "which").read_text() == "old" and not (tmp_path / ".model.old").exists()


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device", "/x/.out.abc/csm.gguf"),
                                     OSError("Not enough free space to write 34885632 bytes after offset 8352")])
def test_a_full_disk_is_named_with_the_output_folder(hf_checkpoint, tmp_path, monkeypatch, capsys, failure):
    """A full disk said only numpy's "Not enough free space to write N bytes after offset M", or named the hidden
    folder the model is built in; now the folder given, what is wrong, and what to do."""
    import converter.convert as cc
    from csm_gguf.convert import main

    def full(*args, **kwargs):
        raise failure

    monkeypatch.setattr(cc, "write_gguf", full)
    assert main(["--model-path", str(hf_checkpoint), "--qtype", "f16", "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"cannot write the model to {tmp_path / 'out'}: the disk is full" in err and "another disk" in err
    assert ".out." not in err and "offset" not in err
    assert list(tmp_path.iterdir()) == []


def test_an_output_folder_that_cannot_be_made_is_named(hf_checkpoint, tmp_path, monkeypatch):
    import converter.convert as cc

    def refused(*args, **kwargs):
        raise FileNotFoundError(2, "No such file or directory", str(tmp_path / ".out.n5aea_ti"))

    monkeypatch.setattr(cc.tempfile, "mkdtemp", refused)
    with pytest.raises(ConversionError, match=f"cannot write the model to {tmp_path / 'out'}: No such file") as e:
        convert(model_path=str(hf_checkpoint), output_dir=tmp_path / "out", qtype="f16")
    assert ".out." not in str(e.value)


def test_another_files_error_while_converting_names_that_file(hf_checkpoint, tmp_path, monkeypatch):
    import converter.convert as cc

    def unreadable(*args, **kwargs):
        raise OSError(5, "Input/output error", str(hf_checkpoint / "model.safetensors"))

    monkeypatch.setattr(cc, "write_gguf", unreadable)
    with pytest.raises(ConversionError, match=f"converting to {tmp_path / 'out'} failed: .*model.safetensors"):
        convert(model_path=str(hf_checkpoint), output_dir=tmp_path / "out", qtype="f16")


def test_random_model_tokenizer_is_checked_before_drawing_weights(tmp_path, monkeypatch):
    from converter.random_weights import convert_random

    monkeypatch.setattr("converter.random_weights.random_mimi", lambda *a: pytest.fail("drew the weights first"))
    with pytest.raises(CheckpointError, match="no tokenizer.json at"):
        convert_random(tmp_path / "out", "f16", tokenizer_path=str(tmp_path / "nothing"))
