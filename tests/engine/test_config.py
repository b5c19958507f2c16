"""Config validation: every bad value fails at construction with a message naming the field."""

import json

import pytest

from minivllm.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig


@pytest.fixture
def model_dir(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 512}))
    return str(tmp_path)


def test_max_model_len_comes_from_the_model(model_dir):
    config = EngineConfig.from_dict({"model": model_dir})
    assert config.scheduler_config.max_model_len == 512


def test_default_token_budget_fits_the_scheduling_mode(model_dir):
    chunked = EngineConfig.from_dict({"model": model_dir, "max_num_seqs": 4096}).scheduler_config
    assert chunked.max_num_batched_tokens == 4096  # one decode per sequence, at least
    whole = SchedulerConfig(enable_chunked_prefill=False, max_model_len=8192)
    assert whole.max_num_batched_tokens == 8192  # the longest prompt in one step
    assert SchedulerConfig(max_model_len=8192).max_num_batched_tokens == 2048


def test_flat_and_nested_dicts_agree(model_dir):
    flat = EngineConfig.from_dict(
        {"model": model_dir, "block_size": 8, "max_num_seqs": 4, "dtype": "float32", "max_model_len": 128}
    )
    nested = EngineConfig.from_dict(
        {"model": {"model": model_dir, "dtype": "float32"}, "cache": {"block_size": 8},
         "scheduler_config": {"max_num_seqs": 4, "max_model_len": 128}}
    )
    assert flat.to_dict() == nested.to_dict()
    assert flat.cache_config.block_size == 8
    assert EngineConfig.from_dict(flat.to_dict()).to_dict() == flat.to_dict()


@pytest.mark.parametrize(
    "key, value, field",
    [
        ("block_size", 0, "block_size"),
        ("block_size", 2.5, "block_size"),
        ("num_kv_blocks", 0, "num_kv_blocks"),
        ("kv_cache_memory_bytes", -1, "kv_cache_memory_bytes"),
        ("gpu_memory_utilization", 1.5, "gpu_memory_utilization"),
        ("gpu_memory_utilization", 0, "gpu_memory_utilization"),
        ("enable_prefix_caching", "yes", "enable_prefix_caching"),
        ("max_num_seqs", 0, "max_num_seqs"),
        ("max_num_batched_tokens", 0, "max_num_batched_tokens"),
        ("max_model_len", 1, "max_model_len"),
        ("dtype", "float64", "dtype"),
        ("device", "tpu", "device"),
        ("attention_backend", "flash", "attention_backend"),
        ("seed", -3, "seed"),
        ("prefill_chunk_size", 0, "prefill_chunk_size"),
    ],
)
def test_bad_values_name_the_field(model_dir, key, value, field):
    with pytest.raises((ValueError, TypeError), match=field):
        EngineConfig.from_dict({"model": model_dir, key: value})


def test_unknown_keys_are_refused(model_dir):
    with pytest.raises(ValueError, match="block_sise"):
        EngineConfig.from_dict({"model": model_dir, "block_sise": 16})
    with pytest.raises(ValueError, match="max_num_seqs"):
        EngineConfig.from_dict({"model": model_dir, "cache": {"max_num_seqs": 3}})
    with pytest.raises(ValueError, match="model"):
        EngineConfig.from_dict({"block_size": 16})


def test_budget_must_cover_max_model_len_without_chunking(model_dir):
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        EngineConfig.from_dict({"model": model_dir, "enable_chunked_prefill": False,
                                "max_num_batched_tokens": 256, "max_model_len": 512})
    # With chunking a small budget is fine.
    config = EngineConfig.from_dict({"model": model_dir, "max_num_batched_tokens": 256, "max_num_seqs": 8})
    assert config.scheduler_config.max_num_batched_tokens == 256


def test_budget_must_cover_one_decode_per_sequence():
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=8, max_model_len=64)


def test_max_model_len_beyond_the_model_is_refused(model_dir):
    with pytest.raises(ValueError, match="max_model_len"):
        EngineConfig.from_dict({"model": model_dir, "max_model_len": 1024})


def test_max_model_len_needed_without_config_json(tmp_path):
    with pytest.raises(ValueError, match="max_model_len"):
        EngineConfig.from_dict({"model": str(tmp_path)})
    config = EngineConfig.from_dict({"model": str(tmp_path), "max_model_len": 64})
    assert config.scheduler_config.max_model_len == 64


def test_chunk_size_needs_chunking():
    with pytest.raises(ValueError, match="prefill_chunk_size"):
        SchedulerConfig(enable_chunked_prefill=False, prefill_chunk_size=32)


def test_auto_dtype_and_device_on_cpu(model_dir):
    import torch

    config = ModelConfig(model=model_dir)
    if not torch.cuda.is_available():
        assert config.torch_device.type == "cpu"
        assert config.torch_dtype == torch.float32
    assert ModelConfig(model=model_dir, dtype="bfloat16").torch_dtype == torch.bfloat16


def test_defaults():
    cache = CacheConfig()
    assert cache.block_size == 16 and cache.num_kv_blocks is None and cache.enable_prefix_caching
    assert 0 < cache.gpu_memory_utilization <= 1


def test_missing_model_directory_is_named(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        EngineConfig.from_dict({"model": str(tmp_path / "nope"), "max_model_len": 64})
