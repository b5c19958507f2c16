"""Config validation: every bad value fails at construction with a message naming the field."""

import importlib.util
import json
import os
import re
import shutil

import pytest
import torch

from minivllm import kernels
from minivllm.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig

NO_CUDA = not torch.cuda.is_available()


@pytest.fixture
def config_dir(tmp_path):
    """A directory with only a config.json: enough for the config, which reads no weights."""
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 512}))
    return str(tmp_path)


def test_max_model_len_comes_from_the_model(config_dir):
    config = EngineConfig.from_dict({"model": config_dir})
    assert config.scheduler_config.max_model_len == 512


def test_default_token_budget_fits_the_scheduling_mode(config_dir):
    chunked = EngineConfig.from_dict({"model": config_dir, "max_num_seqs": 4096}).scheduler_config
    assert chunked.max_num_batched_tokens == 4096  # one decode per sequence, at least
    whole = SchedulerConfig(enable_chunked_prefill=False, max_model_len=8192)
    assert whole.max_num_batched_tokens == 8192  # the longest prompt in one step
    assert SchedulerConfig(max_model_len=8192).max_num_batched_tokens == 2048


def test_flat_and_nested_dicts_agree(config_dir):
    flat = EngineConfig.from_dict(
        {"model": config_dir, "block_size": 8, "max_num_seqs": 4, "dtype": "float32", "max_model_len": 128}
    )
    nested = EngineConfig.from_dict(
        {"model": {"model": config_dir, "dtype": "float32"}, "cache": {"block_size": 8},
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
def test_bad_values_name_the_field(config_dir, key, value, field):
    with pytest.raises((ValueError, TypeError), match=field):
        EngineConfig.from_dict({"model": config_dir, key: value})


def test_unknown_keys_are_refused(config_dir):
    with pytest.raises(ValueError, match="block_sise"):
        EngineConfig.from_dict({"model": config_dir, "block_sise": 16})
    with pytest.raises(ValueError, match="max_num_seqs"):
        EngineConfig.from_dict({"model": config_dir, "cache": {"max_num_seqs": 3}})
    with pytest.raises(ValueError, match="model"):
        EngineConfig.from_dict({"block_size": 16})


def test_budget_must_cover_max_model_len_without_chunking(config_dir):
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        EngineConfig.from_dict({"model": config_dir, "enable_chunked_prefill": False,
                                "max_num_batched_tokens": 256, "max_model_len": 512})
    # With chunking a small budget is fine.
    config = EngineConfig.from_dict({"model": config_dir, "max_num_batched_tokens": 256, "max_num_seqs": 8})
    assert config.scheduler_config.max_num_batched_tokens == 256


def test_budget_must_cover_one_decode_per_sequence():
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=8, max_model_len=64)


def test_max_model_len_beyond_the_model_is_refused(config_dir):
    with pytest.raises(ValueError, match="max_model_len"):
        EngineConfig.from_dict({"model": config_dir, "max_model_len": 1024})


def test_max_model_len_needed_when_config_json_states_no_length(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="max_model_len is not set .*config.json states no context length"):
        EngineConfig.from_dict({"model": str(tmp_path)})
    config = EngineConfig.from_dict({"model": str(tmp_path), "max_model_len": 64})
    assert config.scheduler_config.max_model_len == 64


def test_chunk_size_needs_chunking():
    with pytest.raises(ValueError, match="prefill_chunk_size"):
        SchedulerConfig(enable_chunked_prefill=False, prefill_chunk_size=32)


def test_auto_dtype_and_device_on_cpu(config_dir):
    import torch

    config = ModelConfig(model=config_dir)
    if not torch.cuda.is_available():
        assert config.torch_device.type == "cpu"
        assert config.torch_dtype == torch.float32
    assert ModelConfig(model=config_dir, dtype="bfloat16").torch_dtype == torch.bfloat16


def test_defaults():
    cache = CacheConfig()
    assert cache.block_size == 16 and cache.num_kv_blocks is None and cache.enable_prefix_caching
    assert 0 < cache.gpu_memory_utilization <= 1


def test_missing_model_directory_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        EngineConfig.from_dict({"model": str(tmp_path / "nope"), "max_model_len": 64})
    (tmp_path / "file").write_text("")
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        EngineConfig.from_dict({"model": str(tmp_path / "file"), "max_model_len": 64})


# ---------------------------------------------------------------------------------------------
# A model directory first, then its context length (a folder of anything is not a model).
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("max_model_len", [None, 64])
def test_a_directory_without_config_json_is_not_a_model(tmp_path, max_model_len):
    """Not "set max_model_len": the real problem comes first, whatever else is given."""
    with pytest.raises(FileNotFoundError, match="has no config.json, so it is not a Hugging Face model directory"):
        EngineConfig.from_dict({"model": str(tmp_path), "max_model_len": max_model_len})


@pytest.fixture
def broken_copy(model_dir, tmp_path):
    """broken_copy(write) -> a copy of a real tiny model whose config.json holds `write`'s bytes."""
    def make(content: bytes):
        directory = shutil.copytree(model_dir("llama"), tmp_path / "broken")
        (directory / "config.json").write_bytes(content)
        return directory

    return make


@pytest.mark.parametrize("content, problem", [
    (b'{"max_position_embeddings": 512,', "is not valid JSON: .* at line 1, column 33"),
    (b"", "is not valid JSON"),
    (b'{"name": "\xff"}', "is not valid JSON: it is not UTF-8"),  # e.g. a Latin-1 file
    (b"[1, 2]", "must hold a JSON object .*got a JSON list"),
    (b'"llama"', "must hold a JSON object .*got a JSON str"),
    (b'{"max_position_embeddings": "512"}', "config.json: max_position_embeddings must be an integer .* got '512'"),
    (b'{"max_position_embeddings": true}', "max_position_embeddings must be an integer"),
    (b'{"max_position_embeddings": 0}', "max_position_embeddings must be an integer .* got 0"),
    (b'{"text_config": {"max_position_embeddings": 1.5}}', "text_config.max_position_embeddings must be an integer"),
])
@pytest.mark.parametrize("max_model_len", [None, 64])
def test_a_broken_config_json_is_named(broken_copy, content, problem, max_model_len):
    directory = broken_copy(content)
    with pytest.raises(ValueError) as err:
        EngineConfig.from_dict({"model": str(directory), "max_model_len": max_model_len})
    assert type(err.value) is ValueError  # not a raw JSONDecodeError / UnicodeDecodeError
    assert str(directory / "config.json") in str(err.value)
    assert re.search(problem, str(err.value)), err.value


def test_context_length_of_a_nested_text_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"max_position_embeddings": 256},
                                                      "vision_config": {"image_size": 224}}))
    assert EngineConfig.from_dict({"model": str(tmp_path)}).scheduler_config.max_model_len == 256
    (tmp_path / "config.json").write_text(json.dumps({"text_config": [], "n_positions": 128}))
    assert EngineConfig.from_dict({"model": str(tmp_path)}).scheduler_config.max_model_len == 128


# ---------------------------------------------------------------------------------------------
# Device and attention backend: checked when the config (hence the LLM) is built.
# ---------------------------------------------------------------------------------------------
def test_backend_names_come_from_the_kernels():
    from minivllm import config

    assert config.ATTENTION_BACKENDS is kernels.BACKENDS


@pytest.mark.skipif(not NO_CUDA, reason="needs a machine without CUDA")
def test_cuda_device_without_a_gpu_fails_at_once(config_dir):
    with pytest.raises(ValueError, match="device='cuda' cannot be used"):
        ModelConfig(model=config_dir, device="cuda")


@pytest.mark.skipif(not NO_CUDA, reason="needs a machine without CUDA")
@pytest.mark.parametrize("device", ["auto", "cpu"])
def test_cuda_backend_without_a_gpu_fails_at_once(config_dir, device):
    with pytest.raises(ValueError, match="attention_backend='cuda' cannot run on cpu: .*needs CUDA"):
        ModelConfig(model=config_dir, device=device, attention_backend="cuda")


def test_triton_backend_on_cpu_needs_the_interpreter(config_dir, monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert ModelConfig(model=config_dir, device="cpu", attention_backend="triton").attention_backend == "triton"
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="attention_backend='triton' cannot run on cpu: .*TRITON_INTERPRET=1"):
        ModelConfig(model=config_dir, device="cpu", attention_backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="attention_backend='triton'"):
        EngineConfig.from_dict({"model": config_dir, "device": "cpu", "attention_backend": "triton"})


# Where each backend can run, written out rather than asked of minivllm.kernels: the reference
# and "auto" everywhere; Triton on a GPU, and on the CPU in its interpreter (which
# tests/conftest.py turns on there); the CUDA extension only on a GPU, once it is built (ahead of
# time, or just in time: tests/conftest.py asks for that on a GPU machine).
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
EXTENSION_BUILT = (importlib.util.find_spec("minivllm._C") is not None
                   or os.environ.get("MINIVLLM_CUDA_JIT") == "1")
RUNS_HERE = {"auto": True, "torch": True, "sdpa": True, "triton": TRITON_INSTALLED, "cuda": not NO_CUDA and EXTENSION_BUILT}


@pytest.mark.parametrize("backend", kernels.BACKENDS)
def test_every_backend_is_accepted_exactly_where_it_can_run(config_dir, backend):
    if RUNS_HERE[backend]:
        assert ModelConfig(model=config_dir, attention_backend=backend).attention_backend == backend
    else:
        with pytest.raises(ValueError, match=f"attention_backend='{backend}'"):
            ModelConfig(model=config_dir, attention_backend=backend)


@pytest.mark.skipif(not NO_CUDA, reason="needs a machine without CUDA")
def test_llm_refuses_an_unrunnable_backend_when_built(model_dir):
    """The LLM fails in its constructor, not at the first step."""
    from minivllm import LLM

    with pytest.raises(ValueError, match="attention_backend='cuda'"):
        LLM(str(model_dir("llama")), attention_backend="cuda")
    with pytest.raises(ValueError, match="device='cuda'"):
        LLM(str(model_dir("llama")), device="cuda")


def test_model_seed_fits_torch(config_dir):
    assert ModelConfig(model=config_dir, seed=2**64 - 1).seed == 2**64 - 1
    with pytest.raises(ValueError, match="seed must be < 2\\*\\*64"):
        ModelConfig(model=config_dir, seed=2**64)


def test_speculative_config_round_trips_and_checks_the_draft(config_dir, tmp_path):
    config = EngineConfig.from_dict({"model": config_dir, "max_model_len": 256,
                                     "speculative_config": {"method": "ngram", "num_speculative_tokens": 3}})
    spec = config.speculative_config
    assert (spec.prompt_lookup_min, spec.prompt_lookup_max) == (2, 4)
    assert EngineConfig.from_dict(config.to_dict()).to_dict() == config.to_dict()
    assert EngineConfig.from_dict({"model": config_dir}).to_dict()["speculative_config"] is None
    draft = tmp_path / "draft"
    draft.mkdir()
    (draft / "config.json").write_text(json.dumps({"max_position_embeddings": 128}))
    with pytest.raises(ValueError, match="draft's context length .128. is shorter than max_model_len .256."):
        EngineConfig.from_dict({"model": config_dir, "max_model_len": 256, "speculative_config": {
            "method": "draft", "model": str(draft), "num_speculative_tokens": 3}})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        EngineConfig.from_dict({"model": config_dir, "speculative_config": {
            "method": "draft", "model": str(tmp_path / "nowhere"), "num_speculative_tokens": 3}})
