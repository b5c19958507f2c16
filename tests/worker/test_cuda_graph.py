"""CUDA graphs: the bucketing logic on CPU; graphs on == graphs off on a GPU."""

import pytest
import torch

from minivllm.worker.cuda_graph import bucket_for, graph_batch_sizes, is_decode_only

needs_cuda = pytest.mark.gpu  # CUDA graphs need a CUDA GPU (tests/conftest.py skips it elsewhere)


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
    assert llm.engine.executor.runner.graphs is None
    assert "CUDA device" in llm.engine.executor.runner.graphs_off_reason


def _greedy(model_dir, enforce_eager, prompts, max_tokens, **config):
    from minivllm import LLM

    llm = LLM(str(model_dir), device="cuda", dtype="float32", enforce_eager=enforce_eager,
              enable_prefix_caching=False, **config)
    assert (llm.engine.executor.runner.graphs is not None) == (not enforce_eager)
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
def test_decode_steps_are_recorded_as_graph_replays(tmp_path):
    """The step records say which forwards replayed a graph: every decode-only step here."""
    from minivllm import LLM
    from minivllm.models import make_random_model

    model = make_random_model(tmp_path / "m", arch="qwen3", size="tiny", seed=3)
    llm = LLM(str(model), device="cuda", max_num_seqs=8, max_model_len=128, num_kv_blocks=64,
              enable_prefix_caching=False)
    llm.generate([[5 + i] * (3 + i) for i in range(5)], temperature=0.0, max_tokens=6, ignore_eos=True,
                 use_tqdm=False)
    records = list(llm.engine.stats.history)
    decodes = [r for r in records if r.num_prefill_seqs == 0 and r.num_decode_seqs > 0]
    assert decodes and all(r.timings.cuda_graph and r.timings.graph_miss is None for r in decodes)
    assert all(r.timings.graph_batch_size >= r.num_decode_seqs for r in decodes)
    prefills = [r for r in records if r.num_prefill_tokens > r.num_prefill_seqs]
    assert all(r.timings.graph_miss.startswith("not decode-only") for r in prefills)
    stats = llm.engine.get_stats()["scheduler"]
    assert stats["num_graph_steps"] == len(decodes) and stats["num_eager_steps"] == len(records) - len(decodes)
    del llm
    torch.cuda.empty_cache()


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


# ---------------------------------------------------------------------------------------------
# Why a step did not replay a graph (pure logic, no GPU)
# ---------------------------------------------------------------------------------------------
def _decode(n: int) -> list:
    from minivllm.step import ScheduledSeq

    return [ScheduledSeq(i, 5, [7], False, [0, 1], 1) for i in range(n)]


def _layout(max_seqs: int = 8, max_sampled: int = 8):
    from minivllm.worker.input_batch import StepLayout

    return StepLayout(max_tokens=max_seqs, max_sampled=max_sampled, max_seqs=max_seqs)


def test_graph_miss_reason_names_each_failing_condition():
    from minivllm.step import ScheduledSeq
    from minivllm.worker.cuda_graph import graph_miss_reason

    sizes, layout = graph_batch_sizes(8), _layout()
    assert graph_miss_reason(_decode(3), 3, sizes, layout) is None
    pending = [ScheduledSeq(0, 5, [], True, [0, 1], 1)]  # a pending decode is one token too
    assert graph_miss_reason(pending, 1, sizes, layout) is None
    prefill = [*_decode(2), ScheduledSeq(9, 0, [1, 2, 3], False, [0], 1)]
    assert graph_miss_reason(prefill, 3, sizes, layout).startswith("not decode-only: 1 of 3")
    assert graph_miss_reason(_decode(9), 9, sizes, layout).startswith("no bucket for 9 sequences")
    assert graph_miss_reason([], 0, sizes, layout).startswith("no bucket for 0 sequences")
    assert graph_miss_reason(_decode(2), 9, sizes, layout).startswith("9 sampled rows exceed")
    # The order of the checks: a prefill step is reported as such even if it is also too big.
    too_much = [ScheduledSeq(i, 0, [1, 2], False, [0], 1) for i in range(9)]
    assert graph_miss_reason(too_much, 20, sizes, layout).startswith("not decode-only")


def test_decode_graphs_why_not_reads_only_buckets_and_layout():
    """DecodeGraphs without its CUDA set-up: why_not needs no GPU."""
    from minivllm.worker.cuda_graph import DecodeGraphs

    graphs = object.__new__(DecodeGraphs)
    graphs.batch_sizes, graphs.layout = graph_batch_sizes(8), _layout()
    assert graphs.why_not(_decode(5), 5) is None
    assert "no bucket" in graphs.why_not(_decode(9), 9)
    assert "sampled rows" in graphs.why_not(_decode(1), 12)


@needs_cuda
def test_a_differently_shaped_batch_compiles_nothing(tmp_path):
    """After start-up (kernels.warm_up, graph capture) serving compiles no Triton kernel: a batch
    of other sizes, prompt lengths, chunking and context lengths than the first one, too."""
    from minivllm import LLM
    from minivllm.kernels import JitCounter
    from minivllm.models import make_random_model

    model = make_random_model(tmp_path / "m", arch="qwen3", size="tiny", seed=4)
    llm = LLM(str(model), device="cuda", max_num_seqs=16, max_model_len=512, num_kv_blocks=256,
              max_num_batched_tokens=96, enable_prefix_caching=False)
    llm.generate([[5 + i] * (3 + i) for i in range(3)], temperature=0.0, max_tokens=5, ignore_eos=True,
                 use_tqdm=False)
    with JitCounter() as jit:
        llm.generate([[7 + i] * (17 + 23 * i) for i in range(11)], temperature=0.8, seed=1,
                     max_tokens=40, ignore_eos=True, use_tqdm=False)
    assert jit.count == 0, jit.summary()
    del llm
    torch.cuda.empty_cache()
