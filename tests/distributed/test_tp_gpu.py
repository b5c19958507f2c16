"""Two GPUs (NCCL, CUDA graphs on): tensor_parallel_size=2 still equals Hugging Face greedy in
float32, and the decode steps really replayed graphs, all-reduces included.

Run on a machine with two GPUs (skipped elsewhere):

    python -m pytest -q tests/distributed/test_tp_gpu.py
"""

from __future__ import annotations

import pytest
import torch

from minivllm import LLM

from .test_tp_engine import MAX_TOKENS, SHARED, assert_matches_hf

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")]


@pytest.mark.filterwarnings("ignore:the KV pool")
@pytest.mark.parametrize("variant", ["llama", "qwen2", "qwen3", "opt", "llama-mqa"])
def test_two_gpus_match_hf_in_float32_with_cuda_graphs(variant, model_dir, hf_greedy):
    # The CPU test's stress (preemption, chunked prefill, prefix caching), on two GPUs; decode-only
    # steps between them replay the graphs of buckets 1, 2 and 4.
    with LLM(str(model_dir(variant)), tensor_parallel_size=2, dtype="float32", device="cuda", block_size=4,
             num_kv_blocks=14, max_num_batched_tokens=8, max_num_seqs=4, enable_prefix_caching=True) as llm:
        runner = llm.engine.executor.runner
        assert runner.graphs is not None, runner.graphs_off_reason
        assert runner.device == torch.device("cuda", 0)
        prompts = SHARED if variant != "llama-mqa" else [[t % 509 for t in p] for p in SHARED]
        outputs = llm.generate(prompts, max_tokens=MAX_TOKENS, temperature=0, use_tqdm=False)
        stats = llm.engine.get_stats()["scheduler"]
    assert_matches_hf(outputs, prompts, variant, hf_greedy)
    assert stats["num_graph_steps"] > 0, "no decode step replayed a CUDA graph"
    assert stats["num_preemptions"] > 0 and stats["num_partial_prefills"] > 0


@pytest.mark.filterwarnings("ignore:the KV pool")
@pytest.mark.parametrize(("all_reduce", "fused_norm"), [("dist", "1"), ("peer", "1"), ("peer", "0")])
def test_both_all_reduce_paths_match_hf_in_float32_with_cuda_graphs(all_reduce, fused_norm, model_dir, hf_greedy,
                                                                      monkeypatch):
    """NCCL's all-reduce and the one-shot sum through peer memory (decode-sized tensors; the
    prefill's large ones still go through NCCL), the latter with the residual add and RMSNorm
    after it in the same kernel or not, give Hugging Face's greedy tokens."""
    monkeypatch.setenv("MINIVLLM_PEER_ADD_NORM", fused_norm)  # the ranks' processes inherit it
    with LLM(str(model_dir("llama")), tensor_parallel_size=2, dtype="float32", device="cuda", block_size=4,
             num_kv_blocks=14, max_num_batched_tokens=8, max_num_seqs=4, all_reduce=all_reduce) as llm:
        runner = llm.engine.executor.runner
        assert (runner.tp.peer is not None) == (all_reduce == "peer")
        assert runner.graphs is not None, runner.graphs_off_reason
        outputs = llm.generate(SHARED, max_tokens=MAX_TOKENS, temperature=0, use_tqdm=False)
        assert llm.engine.get_stats()["scheduler"]["num_graph_steps"] > 0
    assert_matches_hf(outputs, SHARED, "llama", hf_greedy)
