"""CUDA graphs: the bucketing logic on CPU; graphs on == graphs off on a GPU."""

import pytest
import torch

from minivllm.worker.cuda_graph import bucket_for, graph_batch_sizes

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


@needs_cuda
def test_graph_block_tables_equal_a_fresh_gather_at_every_step(tmp_path):
    """The graphs' static block tables are copied only when the step's rows or the tables
    changed; at every replayed step they equal the step's rows gathered afresh. Requests of
    different lengths make the batch shrink (new buckets, rows freed) while blocks are appended."""
    from minivllm import LLM, SamplingParams
    from minivllm.models import make_random_model
    from minivllm.worker.cuda_graph import GraphStep

    model = make_random_model(tmp_path / "m", arch="qwen3", size="tiny", seed=4)
    llm = LLM(str(model), device="cuda", max_num_seqs=4, max_model_len=128, num_kv_blocks=64, block_size=4,
              enable_prefix_caching=False)
    runner = llm.engine.executor.runner
    forward, replayed = runner._forward, []

    def checked_forward(prepared, batch):
        if isinstance(prepared, GraphStep):
            fresh = runner.block_tables.device.index_select(0, batch.rows)
            assert torch.equal(batch.attn_metadata.block_tables, fresh)
            replayed.append(prepared.batch_size)
        return forward(prepared, batch)

    runner._forward = checked_forward
    params = [SamplingParams(temperature=0.0, max_tokens=6 + 5 * i, ignore_eos=True) for i in range(4)]
    llm.generate([[5 + i] * (3 + 2 * i) for i in range(4)], params, use_tqdm=False)
    assert len(replayed) > 15 and len(set(replayed)) > 1
    del llm
    torch.cuda.empty_cache()


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
    graphs.batch_sizes, graphs.layout, graphs.query_len = graph_batch_sizes(8), _layout(), 1
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


# ---------------------------------------------------------------------------------------------
# Speculative decoding: which set replays which step (pure logic, no GPU)
# ---------------------------------------------------------------------------------------------
def _graph_set(max_batch: int, query_len: int):
    """A DecodeGraphs without its CUDA set-up: enough for why_not and choose_graphs."""
    from minivllm.worker.cuda_graph import DecodeGraphs
    from minivllm.worker.input_batch import StepLayout

    graphs = object.__new__(DecodeGraphs)
    graphs.batch_sizes, graphs.query_len = graph_batch_sizes(max_batch), query_len
    largest = graphs.batch_sizes[-1]
    graphs.layout = StepLayout(max_tokens=largest * query_len, max_sampled=max(8, largest * query_len),
                               max_seqs=largest)
    return graphs


def test_a_verification_step_replays_the_graphs_of_1_plus_k_tokens():
    from minivllm.step import ScheduledSeq
    from minivllm.worker.cuda_graph import choose_graphs

    decode, verify = _graph_set(8, 1), _graph_set(4, 4)  # k = 3, speculation up to 4 sequences
    sets = [decode, verify]

    def spec(i, drafts):
        return ScheduledSeq(i, 5, [7], False, [0, 1], 1, is_decode=True, draft_token_ids=[9] * drafts,
                            num_draft_tokens=drafts)

    plain = [spec(i, 0) for i in range(6)]
    assert choose_graphs(sets, plain, 6) == (decode, None)
    verifying = [spec(0, 3), spec(1, 1), spec(2, 0)]  # fewer drafts are padded to 1 + k rows
    assert choose_graphs(sets, verifying, 4 + 2 + 1) == (verify, None)
    too_many = [spec(i, 1) for i in range(5)]  # above the batch where speculation turns off
    assert choose_graphs(sets, too_many, 10)[1].startswith("no bucket for 5 sequences")
    prefill = [spec(0, 3), ScheduledSeq(9, 0, [1] * 5, False, [0, 1], 1)]
    graphs, miss = choose_graphs(sets, prefill, 5)
    assert graphs is None and miss == "not decode-only: 1 of 2 sequences compute more than 4 tokens"
    assert choose_graphs([], plain, 6) == (None, None)


def test_speculative_steps_of_a_real_schedule_go_to_the_right_graphs():
    """Replay counts on the CPU: a scheduler speculating with the shadow model of sim.py; every
    step is sent where `load_step` would send it. Verification steps replay the 1 + k set,
    plain decodes the decode set, prompt chunks run eagerly; no step is lost between them."""
    from minivllm.config import SchedulerConfig
    from minivllm.engine.block_manager import BlockManager
    from minivllm.engine.scheduler import Scheduler
    from minivllm.engine.sequence import Sequence
    from minivllm.engine.speculation import Speculation
    from minivllm.sampling_params import SamplingParams
    from minivllm.worker.cuda_graph import choose_graphs
    from tests.engine.sim import ShadowRunner, run_to_completion, speculative_config

    k = 3
    config = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=64)
    spec = speculative_config("draft", k, disable_by_batch_size=4)
    scheduler = Scheduler(config, BlockManager(64, 4), speculation=Speculation(spec, 64))
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (6, 9, 14, 20, 30, 30)]
    arrivals = {0: [Sequence(f"r{i}", [1 + i] * (5 + i), p) for i, p in enumerate(params)]}
    _, steps = run_to_completion(scheduler, ShadowRunner(64, 4), arrivals)
    sets = [_graph_set(8, 1), _graph_set(4, 1 + k)]
    replays = {"decode": 0, "verify": 0, "eager": 0}
    for step in steps:
        graphs, miss = choose_graphs(sets, step.output.seqs, step.output.num_logits_rows)
        kind = "eager" if graphs is None else "decode" if graphs is sets[0] else "verify"
        replays[kind] += 1
        assert (kind == "verify") == (step.num_draft_tokens > 0), (kind, step.output.seqs)
        assert kind != "eager" or miss.startswith("not decode-only")
    assert replays["verify"] > 0 and replays["decode"] > 0 and replays["eager"] >= 1, replays


@needs_cuda
@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_speculative_steps_replay_graphs_and_give_the_eager_outputs(tmp_path, method):
    """On a GPU, verification steps (and the draft model's forwards) replay graphs; greedy
    outputs equal those of eager speculation and of no speculation at all."""
    from minivllm import LLM
    from minivllm.models import make_random_model

    model = make_random_model(tmp_path / "m", arch="qwen3", size="tiny", seed=1)
    spec = {"method": method, "num_speculative_tokens": 3}
    if method == "draft":
        spec["model"] = str(make_random_model(tmp_path / "d", arch="qwen3", size="tiny", seed=1,
                                              overrides={"num_hidden_layers": 1}))
    prompts = [[5 + i, 6, 7, 8] * (3 + i) for i in range(6)]
    config = {"max_num_seqs": 8, "max_model_len": 128, "num_kv_blocks": 128, "block_size": 16}
    plain = _greedy(model, True, prompts, 24, **config)
    outputs = {}
    for eager in (True, False):
        llm = LLM(str(model), device="cuda", dtype="float32", enforce_eager=eager, speculative_config=spec,
                  enable_prefix_caching=False, **config)
        outs = llm.generate(prompts, temperature=0.0, max_tokens=24, ignore_eos=True, use_tqdm=False)
        outputs[eager] = [o.token_ids for o in outs]
        verifying = [r for r in llm.engine.stats.history if r.num_draft_tokens and not r.num_prefill_tokens]
        assert verifying, "nothing was verified"
        if not eager:
            assert all(r.timings.cuda_graph for r in verifying), [r.timings.graph_miss for r in verifying]
        del llm
        torch.cuda.empty_cache()
    assert outputs[False] == outputs[True] == plain


@needs_cuda
def test_a_short_prompt_chunk_scored_inside_a_verification_graph(tmp_path):
    """A 3-token prompt that asks for prompt_logprobs arrives while others verify 3 drafts: the
    step fits a verification graph (4 rows per sequence, padded), and the prompt's positions are
    found at their padded rows: the same log-probabilities as eagerly."""
    from minivllm import LLM, SamplingParams
    from minivllm.models import make_random_model

    model = make_random_model(tmp_path / "m", arch="qwen3", size="tiny", seed=1)
    spec = {"method": "ngram", "num_speculative_tokens": 3}
    repeating = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    scored = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True, prompt_logprobs=2)
    results = {}
    for eager in (True, False):
        llm = LLM(str(model), device="cuda", dtype="float32", enforce_eager=eager, speculative_config=spec,
                  enable_prefix_caching=False, async_scheduling=False, max_num_seqs=8, max_model_len=128,
                  num_kv_blocks=128, block_size=16)
        for i in range(2):
            llm.engine.add_request([5 + i, 6, 7, 8] * 4, repeating)
        while not any(r.num_draft_tokens for r in llm.engine.stats.history):
            llm.engine.step()
        request = llm.engine.add_request([40, 41, 42], scored)
        while llm.engine.has_unfinished_requests():
            llm.engine.step()
        [step] = [r for r in llm.engine.stats.history if r.num_draft_tokens and r.num_prefill_tokens]
        assert step.timings.cuda_graph is not eager, step.timings.graph_miss
        out = llm.engine.get_output(request)
        results[eager] = [entry[t].logprob for entry, t in zip(out.prompt_logprobs[1:], [41, 42], strict=True)]
        del llm
        torch.cuda.empty_cache()
    assert results[False] == pytest.approx(results[True], abs=1e-4)
