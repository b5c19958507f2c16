"""The fp8 KV cache in the engine: sizing, a full run, copy-on-write of the scales, the door checks."""

from __future__ import annotations

import pytest
import torch

from minivllm import LLM, SamplingParams
from minivllm.config import check_kv_cache_dtype

from .conftest import random_prompts

ENGINE = dict(dtype="float32", attention_backend="torch", block_size=4, max_num_seqs=6, max_model_len=64)
GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


def test_fp8_blocks_cost_their_bytes_and_more_of_them_fit(model_dir):
    path = str(model_dir("qwen3"))
    # kv_cache_memory_bytes is the CPU's KV budget (a GPU measures its free memory instead), so
    # this count runs on the CPU wherever the suite runs.
    engines = {kv: LLM(path, device="cpu", kv_cache_memory_bytes=1 << 20, kv_cache_dtype=kv, **ENGINE)
               for kv in ("auto", "fp8")}
    model = engines["auto"].engine.model_runner.model
    per_token_head = {"auto": 4 * model.head_dim, "fp8": model.head_dim + 4}  # float32 vs e4m3 + scale
    for kv, llm in engines.items():
        runner = llm.engine.model_runner
        expected = 2 * model.num_layers * 4 * model.num_kv_heads * per_token_head[kv]
        assert runner.kv_bytes_per_block == expected
        assert runner.num_kv_blocks == (1 << 20) // expected
        assert llm.get_stats()["engine"]["kv_cache_dtype"] == ("fp8_e4m3" if kv == "fp8" else "float32")
    k, _ = engines["fp8"].engine.model_runner.kv_caches[0]
    assert k.dtype == torch.float8_e4m3fn
    k_scale, v_scale = engines["fp8"].engine.model_runner.kv_scales[0]
    assert k_scale.shape == k.shape[:3] and k_scale.dtype == torch.float32
    assert engines["auto"].engine.model_runner.kv_scales is None
    assert engines["fp8"].render_block_map().startswith("KV cache dtype fp8_e4m3")


def test_an_fp8_run_with_preemption_forks_and_prefix_hits_finishes_and_frees_everything(model_dir):
    # A 10-token prompt leaves a partly filled block: the n=3 samples copy it on write, scales
    # included. Had the scales not been copied, the samples (greedy, so equal) would differ.
    llm = LLM(str(model_dir("llama")), num_kv_blocks=24, kv_cache_dtype="fp8", max_num_batched_tokens=16,
              **ENGINE)
    prompts = random_prompts([10, 13, 10, 7], seed=21)
    prompts[2] = prompts[0][:8] + prompts[2][8:]  # a shared prefix: a prefix-cache hit
    outputs = llm.generate(prompts, SamplingParams(max_tokens=14, n=3, temperature=0.0, ignore_eos=True),
                           use_tqdm=False)
    for out in outputs:
        assert len(out.outputs) == 3 and all(len(c.token_ids) == 14 for c in out.outputs)
        assert out.outputs[0].token_ids == out.outputs[1].token_ids == out.outputs[2].token_ids
    single = llm.generate(prompts[0], GREEDY, use_tqdm=False)[0]
    assert single.token_ids == outputs[0].token_ids[:10]
    stats = llm.get_stats()
    assert stats["scheduler"]["num_block_copies"] > 0 and stats["scheduler"]["num_preemptions"] > 0
    assert stats["kv_cache"]["num_used_blocks"] == 0 and not llm.has_unfinished_requests()


def test_fp8_on_a_backend_that_cannot_read_it_is_refused_naming_kv_cache_dtype(monkeypatch):
    check_kv_cache_dtype("auto", "cuda", torch.device("cpu"))  # nothing to check for 16-bit caches
    check_kv_cache_dtype("fp8", "torch", torch.device("cpu"))  # the reference reads fp8 anywhere
    with pytest.raises(ValueError, match="kv_cache_dtype='fp8'.*attention_backend='cuda'"):
        monkeypatch.setattr("minivllm.kernels.resolve_backend", lambda backend, device, *a, **k: "cuda")
        check_kv_cache_dtype("fp8", "cuda", torch.device("cuda"))
    monkeypatch.setattr("minivllm.kernels.resolve_backend", lambda backend, device, *a, **k: "triton")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(ValueError, match="kv_cache_dtype='fp8' needs a GPU with e4m3 support.*8.0"):
        check_kv_cache_dtype("fp8", "auto", torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    check_kv_cache_dtype("fp8", "auto", torch.device("cuda"))


def test_an_unknown_kv_cache_dtype_is_refused(model_dir):
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        LLM(str(model_dir("llama")), kv_cache_dtype="int8", **ENGINE)
