"""ModelRunner: KV pool sizing and binding, the profiling pass, block copies."""

import json

import pytest
import torch

from minivllm.config import EngineConfig
from minivllm.worker.model_runner import ModelRunner

pytestmark = pytest.mark.filterwarnings("ignore:the KV pool")  # small pools on purpose


def runner_for(model_dir, **config):
    return ModelRunner(EngineConfig.from_dict({"model": str(model_dir("qwen3")), "attention_backend": "torch",
                                               **config}))


def test_cpu_pool_is_sized_from_the_byte_budget(model_dir):
    hf = json.loads((model_dir("qwen3") / "config.json").read_text())
    # K and V, per layer, per slot: kv_heads x head_dim float32 values.
    per_block = 2 * hf["num_hidden_layers"] * 8 * hf["num_key_value_heads"] * hf["head_dim"] * 4
    runner = runner_for(model_dir, block_size=8, kv_cache_memory_bytes=100 * per_block + 7)
    assert runner.kv_bytes_per_block == per_block and runner.num_kv_blocks == 100
    layers = runner.model.attention_layers()
    assert len(runner.kv_caches) == len(layers) == hf["num_hidden_layers"]
    for layer, (k, v) in zip(layers, runner.kv_caches):
        assert layer.k_cache is k and layer.v_cache is v
        assert k.shape == (100, 8, hf["num_key_value_heads"], hf["head_dim"]) and k.dtype == torch.float32


def test_a_budget_too_small_for_one_block_names_the_setting(model_dir):
    with pytest.raises(ValueError, match="kv_cache_memory_bytes"):
        runner_for(model_dir, kv_cache_memory_bytes=1)


def test_profiling_pass_runs_and_leaves_the_layers_unbound(model_dir):
    # The GPU sizing path: on the CPU its memory numbers mean nothing, but it must run.
    from minivllm.worker.kv_cache import _profile_forward

    runner = runner_for(model_dir, num_kv_blocks=64, max_num_batched_tokens=600, max_model_len=256)
    scratch = _profile_forward(runner.config, runner.model, runner.device, 600, 8)
    assert scratch > 0
    assert all(layer.k_cache is None for layer in runner.model.attention_layers())


def test_block_copies_duplicate_every_layer(model_dir):
    runner = runner_for(model_dir, num_kv_blocks=8)
    for k, v in runner.kv_caches:
        k.normal_()
        v.normal_()
    runner._copy_blocks([(2, 5), (5, 6)])  # in order: block 6 gets block 2's content via 5
    for k, v in runner.kv_caches:
        assert torch.equal(k[5], k[2]) and torch.equal(v[6], v[2]) and not torch.equal(k[2], k[3])
