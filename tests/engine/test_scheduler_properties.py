"""Property tests: random workloads on tiny pools, checked by the shadow KV cache of sim.py.

Each example draws a configuration (block size, pool size, budgets, chunking, prefix caching) and
a workload (arrival steps, prompts built from a few shared prefixes, output lengths, n, aborts),
then runs it to the end. Checked at every step: token budget, max_num_seqs, ref counts equal the
block tables, free list = unreferenced blocks, every sequence reads its own context back. At the
end: every request that was not aborted finished, and its outputs equal those of a run with an
unlimited pool and budget (so preemption, chunking and prefix hits never change a result). Half
the runs overlap (step n+1 planned before step n's tokens are folded in, as the engine does by
default): the outputs must still be the same. And a third speculate (n-gram drafts, or drafts
a draft model would make), rolling rejected drafts back: the outputs must still be the same.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minivllm.config import SchedulerConfig
from minivllm.engine.block_manager import BlockManager
from minivllm.engine.scheduler import Scheduler
from minivllm.engine.sequence import Sequence, SequenceStatus
from minivllm.sampling_params import SamplingParams

from minivllm.engine.speculation import Speculation

from .sim import ShadowRunner, run_to_completion, speculative_config

VOCAB = 5
EOS = 4


@st.composite
def workloads(draw):
    block_size = draw(st.sampled_from([1, 2, 4]))
    max_model_len = draw(st.integers(8, 40))
    chunked = draw(st.booleans())
    max_num_seqs = draw(st.integers(1, 6))
    min_budget = max(max_num_seqs, 1 if chunked else max_model_len)
    config = SchedulerConfig(
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=draw(st.integers(min_budget, min_budget + 24)),
        enable_chunked_prefill=chunked,
        prefill_chunk_size=draw(st.none() | st.integers(1, 8)) if chunked else None,
        max_model_len=max_model_len,
    )
    prefixes = draw(st.lists(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=12), min_size=1, max_size=3))
    requests = []
    for i in range(draw(st.integers(1, 10))):
        prefix = draw(st.sampled_from(prefixes))
        tail = draw(st.lists(st.integers(0, VOCAB - 1), max_size=10))
        prompt = (prefix + tail)[: max_model_len - 1]
        params = SamplingParams(
            max_tokens=draw(st.integers(1, 12)),
            n=draw(st.sampled_from([1, 1, 1, 2, 3])) if max_num_seqs >= 3 else 1,
            ignore_eos=draw(st.booleans()),
            min_tokens=draw(st.sampled_from([0, 0, 1])),
        )
        arrival = draw(st.integers(0, 8))
        abort_at = draw(st.none() | st.integers(0, 15)) if draw(st.integers(0, 4)) == 0 else None
        requests.append((f"r{i}", prompt, params, arrival, abort_at))
    longest = max(min(max_model_len, len(p) + sp.max_tokens) for _, p, sp, _, _ in requests)
    min_blocks = -(-(longest - 1) // block_size)
    num_blocks = draw(st.integers(min_blocks, min_blocks + 6))
    prefix_caching = draw(st.booleans())
    speculative = draw(st.sampled_from([None, None, "ngram", "draft"]))
    if speculative is not None:
        speculative = speculative_config(speculative, draw(st.integers(1, 4)),
                                         disable_by_batch_size=draw(st.sampled_from([None, 2])),
                                         **({"prompt_lookup_min": 1} if speculative == "ngram" else {}))
    return config, block_size, num_blocks, prefix_caching, requests, draw(st.booleans()), speculative


def run(config, block_size, num_blocks, prefix_caching, requests, with_aborts=True, overlap=False,
        speculative=None):
    speculation = Speculation(speculative, config.max_model_len) if speculative is not None else None
    scheduler = Scheduler(config, BlockManager(num_blocks, block_size, prefix_caching), speculation=speculation)
    runner = ShadowRunner(num_blocks, block_size, VOCAB)
    arrivals, aborts = {}, {}
    for request_id, prompt, params, arrival, abort_at in requests:
        seq = Sequence(request_id, prompt, params, eos_token_ids=frozenset({EOS}))
        arrivals.setdefault(arrival, []).append(seq)
        if with_aborts and abort_at is not None:
            aborts.setdefault(abort_at, []).append(request_id)
    sequences, outputs = run_to_completion(scheduler, runner, arrivals, aborts, overlap=overlap)
    return scheduler, sequences, outputs


def outputs_by_sample(sequences):
    return {(s.request_id, s.index): (s.output_token_ids, s.status) for s in sequences}


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads())
def test_random_workloads_keep_every_invariant(workload):
    config, block_size, num_blocks, prefix_caching, requests, overlap, speculative = workload
    scheduler, sequences, _ = run(config, block_size, num_blocks, prefix_caching, requests, overlap=overlap,
                                  speculative=speculative)
    bm = scheduler.block_manager
    assert bm.num_free_blocks == num_blocks, "blocks leaked after every request finished"
    assert not scheduler.running and not scheduler.waiting

    # The oracle: same requests, no aborts, a pool and budget that never constrain anything.
    roomy = SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=4096, enable_chunked_prefill=False,
                            max_model_len=config.max_model_len)
    _, reference, _ = run(roomy, block_size, 4096, False, requests, with_aborts=False)
    expected = outputs_by_sample(reference)
    aborted = {r for r, *_, abort_at in requests if abort_at is not None}
    params_of = {r: p for r, _, p, _, _ in requests}
    got = outputs_by_sample(sequences)
    for (request_id, index), (tokens, status) in got.items():
        assert status.is_finished
        if request_id in aborted and status is SequenceStatus.FINISHED_ABORTED:
            # An aborted sample stopped early; what it produced is a prefix of the full answer.
            assert tokens == expected[(request_id, index)][0][: len(tokens)]
            continue
        assert (tokens, status) == expected[(request_id, index)], (request_id, index)
        assert len(tokens) <= params_of[request_id].max_tokens
    for request_id, _, params, _, _ in requests:
        samples = [k for k in got if k[0] == request_id]
        if request_id not in aborted:
            assert len(samples) == params.n, f"{request_id} has {len(samples)} samples, wants {params.n}"
