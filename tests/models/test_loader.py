"""The safetensors loader: sharded checkpoints, names it must map, and every way a directory can be wrong."""

from __future__ import annotations

import json
import re
import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from minivllm.models import SUPPORTED_ARCHITECTURES, load_model, make_random_model


def copy_with_tensors(src, dst, tensors: dict[str, torch.Tensor]):
    """A model directory with `src`'s config and exactly `tensors` as its weights."""
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    save_file({name: t.contiguous() for name, t in tensors.items()}, str(dst / "model.safetensors"))
    return dst


def assert_same_parameters(a, b):
    params_b = dict(b.named_parameters())
    for name, param in a.named_parameters():
        assert torch.equal(param, params_b[name]), name


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nowhere")


def test_directory_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(tmp_path)


# ---------------------------------------------------------------------------------------------
# Broken copies of a good model: each error is a plain ValueError / OSError naming the file.
# ---------------------------------------------------------------------------------------------
def _truncate(path, keep):
    data = path.read_bytes()
    path.write_bytes(data[:keep(len(data))])


BROKEN_FILES = {
    # name: (file, how to break it, what the message says)
    "config not JSON": ("config.json", lambda p: p.write_text('{"model_type": "llama",'),
                        "is not valid JSON: .* at line 1, column 24"),
    "config a list": ("config.json", lambda p: p.write_text("[]"), "must hold a JSON object"),
    "config without model_type": ("config.json", lambda p: p.write_text("{}"),
                                  "is not a usable model config: .*model_type"),
    "config of an unknown model_type": (
        "config.json", lambda p: p.write_text(json.dumps({"model_type": "not-a-model"})),
        "is not a usable model config"),
    "weights cut in half": ("model.safetensors", lambda p: _truncate(p, lambda n: n // 2),
                            "is not a valid safetensors file .*incomplete metadata"),
    "weights cut inside the header": ("model.safetensors", lambda p: _truncate(p, lambda n: 5),
                                      "is not a valid safetensors file"),
    "weights one byte short": ("model.safetensors", lambda p: _truncate(p, lambda n: n - 1),
                               "is not a valid safetensors file"),
    "weights overwritten": ("model.safetensors", lambda p: p.write_bytes(b"\x00" * 64),
                            "is not a valid safetensors file"),
}


@pytest.mark.parametrize("case", BROKEN_FILES)
def test_broken_file_is_named(model_dir, tmp_path, case):
    name, breaks, problem = BROKEN_FILES[case]
    directory = shutil.copytree(model_dir("llama"), tmp_path / "broken")
    breaks(directory / name)
    with pytest.raises((ValueError, OSError)) as err:
        load_model(directory)
    # Exactly ours: not a JSONDecodeError (a ValueError subclass), SafetensorError or AttributeError.
    assert type(err.value) in (ValueError, FileNotFoundError), repr(err.value)
    assert str(directory / name) in str(err.value)
    assert re.search(problem, str(err.value)), err.value


def test_broken_shard_index_is_named(model_dir, hf_model, tmp_path):
    sharded = tmp_path / "sharded"
    hf_model("opt").save_pretrained(str(sharded), max_shard_size="100KB")
    index = sharded / "model.safetensors.index.json"
    for content in ("{", json.dumps({"weight_map": ["a"]}), json.dumps({"weight_map": {"x": 1}})):
        index.write_text(content)
        with pytest.raises(ValueError, match=re.escape(str(index))) as err:
            load_model(sharded)
        assert type(err.value) is ValueError


def test_unknown_architecture_lists_the_supported_ones(model_dir, tmp_path):
    config = json.loads((model_dir("llama") / "config.json").read_text())
    config["architectures"] = ["LlamaForSequenceClassification"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="LlamaForSequenceClassification") as err:
        load_model(tmp_path)
    assert all(name in str(err.value) for name in SUPPORTED_ARCHITECTURES)
    del config["architectures"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="no 'architectures'"):
        load_model(tmp_path)


def test_directory_without_weights(model_dir, tmp_path):
    shutil.copy(model_dir("llama") / "config.json", tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        load_model(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="re-save them"):
        load_model(tmp_path)


@pytest.mark.parametrize("dropped", [
    "model.layers.1.self_attn.k_proj.weight",  # one shard of a fused q|k|v matrix
    "model.layers.0.mlp.up_proj.weight",  # one shard of a fused gate|up matrix
    "model.norm.weight",
    "lm_head.weight",  # "llama" has untied embeddings, so it needs its own lm_head
])
def test_missing_tensor_is_named(model_dir, tmp_path, dropped):
    src = model_dir("llama")
    tensors = load_file(str(src / "model.safetensors"))
    del tensors[dropped]
    broken = copy_with_tensors(src, tmp_path / "broken", tensors)
    with pytest.raises(ValueError, match=f"weights in model.safetensors in {re.escape(str(broken))} "
                                         f"lack 1 tensor.*'{dropped}'"):
        load_model(broken)


def test_shape_mismatch_is_named(model_dir, tmp_path):
    src = model_dir("qwen2")
    tensors = load_file(str(src / "model.safetensors"))
    name = "model.layers.0.self_attn.v_proj.bias"
    tensors[name] = torch.zeros(tensors[name].shape[0] + 1)
    broken = copy_with_tensors(src, tmp_path / "broken", tensors)
    with pytest.raises(ValueError, match=f"'{name}'.*shape \\(33,\\).*expects \\(32,\\)"):
        load_model(broken)


def test_tensors_the_model_does_not_use_are_skipped(model_dir, tmp_path):
    src = model_dir("qwen3")  # tied embeddings
    tensors = load_file(str(src / "model.safetensors"))
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(16)  # older HF saves
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()  # a tied copy
    extra = copy_with_tensors(src, tmp_path / "extra", tensors)
    assert_same_parameters(load_model(extra), load_model(src))


def test_sharded_checkpoint(model_dir, hf_model, tmp_path):
    sharded = tmp_path / "sharded"
    hf_model("opt").save_pretrained(str(sharded), max_shard_size="100KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not (sharded / "model.safetensors").exists()
    assert_same_parameters(load_model(sharded), load_model(model_dir("opt")))

    (sharded / shards[-1]).unlink()
    with pytest.raises(FileNotFoundError, match=shards[-1]):
        load_model(sharded)


def test_opt_checkpoint_without_model_prefix(model_dir, tmp_path):
    """The original OPT releases name tensors "decoder.layers.0..." (no "model." in front)."""
    src = model_dir("opt")
    tensors = {name.removeprefix("model."): t
               for name, t in load_file(str(src / "model.safetensors")).items()}
    assert "decoder.layers.0.self_attn.q_proj.weight" in tensors
    bare = copy_with_tensors(src, tmp_path / "bare", tensors)
    assert_same_parameters(load_model(bare), load_model(src))


def test_dtype_argument(model_dir):
    model = load_model(model_dir("llama"), dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert torch.get_default_dtype() == torch.float32  # restored after building
    for bad in (torch.int64, "float99", 3):
        with pytest.raises(TypeError, match="floating-point"):
            load_model(model_dir("llama"), dtype=bad)


def test_sliding_window_warns(tmp_path):
    directory = make_random_model(tmp_path / "mistral", arch="mistral",
                                  overrides={"sliding_window": 64})
    with pytest.warns(UserWarning, match="sliding-window attention \\(window 64\\)"):
        load_model(directory)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no sliding window: no warning
        load_model(make_random_model(tmp_path / "full", arch="mistral"))
