"""CUDA graphs: the bucketing logic on CPU; graphs on == graphs off on a GPU."""

import pytest
import torch

from minivllm.worker.cuda_graph import bucket_for, graph_batch_sizes, is_decode_only

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")


def test_buckets_are_fine_when_small_and_every_16_after():
    assert graph_batch_sizes(1) == [1]
    assert graph_batch_sizes(6) == [1, 2, 4, 6]
    assert graph_batch_sizes(16) == [1, 2, 4, 8, 16]
    assert graph_batch_sizes(40) == [1, 2, 4, 8, 16, 32, 40]
    sizes = graph_batch_sizes(256)
    assert sizes[:5] == [1, 2, 4, 8, 16] and sizes[-1] == 256 and len(sizes) == 4 + 16
    with pytest.raises(ValueError):
        graph_batch_sizes(0)


def test_a_batch_goes_to_the_smallest_bucket_that_holds_it():
    sizes = graph_batch_sizes(64)
    assert [bucket_for(n, sizes) for n in (1, 2, 3, 5, 8, 9, 16, 17, 64)] == [1, 2, 4, 8, 8, 16, 16, 32, 64]
    assert bucket_for(65, sizes) is None and bucket_for(0, sizes) is None


def test_only_one_token_per_sequence_is_graphable():
    assert is_decode_only([1, 1, 1])
    assert not is_decode_only([1, 5, 1])


def test_cpu_runner_never_captures(tmp_path):
    from minivllm import LLM
    from minivllm.models import make_random_model

    model = make_random_model(tmp_path / "m", arch="qwen3", size="tiny")
    llm = LLM(str(model), device="cpu", num_kv_blocks=32, max_model_len=128)
    assert not llm.engine.model_runner.uses_cuda_graphs


def _greedy(model_dir, enforce_eager, prompts, max_tokens, **config):
    from minivllm import LLM

    llm = LLM(str(model_dir), device="cuda", dtype="float32", enforce_eager=enforce_eager,
              enable_prefix_caching=False, **config)
    assert llm.engine.model_runner.uses_cuda_graphs == (not enforce_eager)
    outs = llm.generate(prompts, temperature=0.0, max_tokens=max_tokens, ignore_eos=True, use_tqdm=False)
    del llm
    torch.cuda.empty_cache()
    return [o.token_ids for o in outs]


@needs_cuda
@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_greedy_outputs_with_graphs_equal_without(tmp_path, arch):
    """Batches shrink as requests finish, so decode steps replay many buckets, with padding."""
    import random

    from minivllm.models import make_random_model

    model = make_random_model(tmp_path / arch, arch=arch, size="tiny", seed=1)
    rng = random.Random(0)
    prompts = [[rng.randrange(4, 512) for _ in range(rng.randint(3, 40))] for _ in range(13)]
    config = {"max_num_seqs": 16, "max_model_len": 256, "num_kv_blocks": 256, "block_size": 16}
    eager = _greedy(model, True, prompts, 24, **config)
    graphs = _greedy(model, False, prompts, 24, **config)
    assert graphs == eager


@needs_cuda
def test_graphs_replay_every_bucket_with_padding(tmp_path):
    """Steps of 1..max_num_seqs sequences, each compared with an eager run of the same step.

    max_model_len 512 makes the graphs plan split-KV for small batches (the bound baked in at
    capture) while the eager steps, knowing their short contexts, do not: both must agree."""
    from minivllm.models import make_random_model

    model = make_random_model(tmp_path / "m", arch="qwen3", size="tiny", seed=2)
    for n in (1, 3, 5, 12):
        prompts = [[5 + i] * (4 + 3 * i) for i in range(n)]
        config = {"max_num_seqs": 12, "max_model_len": 512, "num_kv_blocks": 128, "block_size": 8}
        assert _greedy(model, False, prompts, 6, **config) == _greedy(model, True, prompts, 6, **config)
