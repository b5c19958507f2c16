"""Scheduler unit tests: chunking, budgets, preemption order, aborts, stops, forks, admission errors."""

import pytest

from minivllm.config import SchedulerConfig, SpeculativeConfig
from minivllm.engine.block_manager import BlockManager
from minivllm.engine.scheduler import Scheduler
from minivllm.engine.sequence import Sequence, SequenceStatus
from minivllm.engine.speculation import Speculation
from minivllm.sampling_params import SamplingParams

from .sim import ShadowRunner, abort, check_block_invariants


def make_scheduler(num_blocks=64, block_size=4, prefix_caching=False, **config):
    config.setdefault("max_model_len", 256)
    return Scheduler(SchedulerConfig(**config), BlockManager(num_blocks, block_size, prefix_caching))


def make_seq(num_tokens, request_id="r", eos=frozenset(), **params):
    params.setdefault("max_tokens", 8)
    params.setdefault("ignore_eos", True)
    return Sequence(request_id, list(range(1, num_tokens + 1)), SamplingParams(**params), eos_token_ids=eos)


def step(scheduler, runner, sequences=None):
    out = scheduler.schedule()
    tokens = runner.execute(out)
    finished = scheduler.update(out, tokens)
    if sequences is not None:
        check_block_invariants(scheduler, sequences)
    return out, finished


def plan(out):
    """(sequence, new tokens, samples?, decode?) per scheduled sequence."""
    return [(seq, s.num_new_tokens, s.num_samples > 0, s.is_decode)
            for seq, s in zip(out.seqs, out.output.seqs)]


def test_long_prompt_is_chunked_and_samples_only_at_the_end():
    sched = make_scheduler(max_num_batched_tokens=32, max_num_seqs=4)
    runner = ShadowRunner(64, 4)
    seq = make_seq(100)
    sched.add_sequence(seq)
    chunks = []
    for _ in range(4):
        out, _ = step(sched, runner, [seq])
        ((_, num_new, samples, decode),) = plan(out)
        chunks.append((num_new, samples, not decode))
    assert chunks == [(32, False, True), (32, False, True), (32, False, True), (4, True, True)]
    assert seq.num_output_tokens == 1
    out, _ = step(sched, runner)
    assert [(n, decode) for _, n, _, decode in plan(out)] == [(1, True)]


def test_prefill_chunk_size_caps_each_chunk():
    sched = make_scheduler(max_num_batched_tokens=64, prefill_chunk_size=10)
    seq = make_seq(25)
    sched.add_sequence(seq)
    runner = ShadowRunner(64, 4)
    sizes = [step(sched, runner)[0].output.seqs[0].num_new_tokens for _ in range(3)]
    assert sizes == [10, 10, 5]


def test_without_chunking_a_prompt_waits_for_a_step_with_room():
    sched = make_scheduler(max_num_batched_tokens=20, max_num_seqs=4, enable_chunked_prefill=False,
                           max_model_len=20)
    runner = ShadowRunner(64, 4)
    a, b = make_seq(12, "a", max_tokens=3), make_seq(12, "b", max_tokens=3)
    sched.add_sequence(a)
    sched.add_sequence(b)
    out, _ = step(sched, runner)
    assert out.seqs == [a]  # 12 + 12 > 20: b waits, whole
    out, _ = step(sched, runner)
    # a decodes (1 token); b's 12 prompt tokens now fit next to it.
    assert [(seq, n) for seq, n, _, _ in plan(out)] == [(a, 1), (b, 12)]


def test_running_decodes_come_before_waiting_prefills_and_max_num_seqs_holds():
    sched = make_scheduler(max_num_batched_tokens=64, max_num_seqs=2)
    runner = ShadowRunner(64, 4)
    seqs = [make_seq(5, f"r{i}") for i in range(3)]
    for s in seqs:
        sched.add_sequence(s)
    out, _ = step(sched, runner)
    assert out.seqs == seqs[:2]
    out, _ = step(sched, runner)
    assert out.seqs == seqs[:2] and sched.waiting[0] is seqs[2]
    assert all(decode for *_, decode in plan(out))


def test_out_of_blocks_preempts_the_newest_and_recomputes_it_later():
    # 6 blocks of 2 slots. Three 4-token prompts take 2 blocks each: the pool is full.
    sched = make_scheduler(num_blocks=6, block_size=2, max_num_batched_tokens=64, max_num_seqs=4)
    runner = ShadowRunner(6, 2)
    seqs = [make_seq(4, f"r{i}", max_tokens=4) for i in range(3)]
    for s in seqs:
        sched.add_sequence(s)
    step(sched, runner, seqs)
    assert sched.block_manager.num_free_blocks == 0
    # Now each needs a 3rd block for its 5th token: the oldest gets one by preempting the newest.
    out, _ = step(sched, runner, seqs)
    assert out.output.preempted_seq_ids == [seqs[2].seq_id]
    assert [p.request_id for p in out.preemptions] == ["r2"]
    assert "no free KV block" in out.preemptions[0].reason
    assert seqs[2].status is SequenceStatus.WAITING and seqs[2].num_preemptions == 1
    assert seqs[2].block_table == [] and seqs[2].num_computed_tokens == 0
    assert sched.waiting[0] is seqs[2]
    assert out.seqs == seqs[:2]
    # Nothing is ever dropped: everyone finishes, the preempted one after recomputing its
    # prompt *and* its first output token.
    all_seqs = list(seqs)
    recomputed = []
    while sched.has_unfinished_sequences():
        out, _ = step(sched, runner, all_seqs)
        recomputed += [n for seq, n, _, decode in plan(out) if seq is seqs[2] and not decode]
    assert recomputed and recomputed[0] == 5  # 4 prompt tokens + 1 output token
    assert all(s.status is SequenceStatus.FINISHED_LENGTH and s.num_output_tokens == 4 for s in seqs)


def test_newest_sequence_preempts_itself_rather_than_an_older_one():
    sched = make_scheduler(num_blocks=4, block_size=2, max_num_batched_tokens=64, max_num_seqs=4)
    runner = ShadowRunner(4, 2)
    a, b = make_seq(4, "a", max_tokens=4), make_seq(4, "b", max_tokens=4)
    sched.add_sequence(a)
    sched.add_sequence(b)
    step(sched, runner)
    out, _ = step(sched, runner)
    assert [p.seq_id for p in out.preemptions] == [b.seq_id] and out.seqs == [a]


def test_abort_waiting_and_running_requests():
    sched = make_scheduler(max_num_seqs=1, max_num_batched_tokens=64)
    runner = ShadowRunner(64, 4)
    a, b = make_seq(5, "a"), make_seq(5, "b")
    sched.add_sequence(a)
    sched.add_sequence(b)
    step(sched, runner)
    assert abort(sched, [a, b], "b") == [b] and b.finish_reason == "abort"
    assert abort(sched, [a, b], "a") == [a] and a.status is SequenceStatus.FINISHED_ABORTED
    assert abort(sched, [a, b], "a") == []
    assert not sched.has_unfinished_sequences()
    assert sched.block_manager.num_free_blocks == 64
    # The runner is told, with the next step, to drop their state.
    assert sorted(sched.schedule().output.finished_seq_ids) == sorted([a.seq_id, b.seq_id])


def test_abort_between_schedule_and_update_is_harmless():
    sched = make_scheduler()
    runner = ShadowRunner(64, 4)
    seq = make_seq(5)
    sched.add_sequence(seq)
    out = sched.schedule()
    tokens = runner.execute(out)
    abort(sched, [seq], "r")
    assert sched.update(out, tokens) == []
    assert seq.num_output_tokens == 0 and sched.block_manager.num_free_blocks == 64


@pytest.mark.parametrize(
    "params, sampled, status, num_outputs, stop_reason",
    [
        ({"max_tokens": 3}, [5, 5, 5, 5], SequenceStatus.FINISHED_LENGTH, 3, None),
        ({"ignore_eos": False}, [5, 0, 5], SequenceStatus.FINISHED_STOPPED, 2, None),
        ({"ignore_eos": True}, [5, 0, 5, 5], SequenceStatus.FINISHED_LENGTH, 4, None),
        ({"ignore_eos": False, "min_tokens": 2}, [0, 0, 5], SequenceStatus.FINISHED_STOPPED, 2, None),
        ({"stop_token_ids": [7]}, [5, 7, 5], SequenceStatus.FINISHED_STOPPED, 2, 7),
    ],
)
def test_token_level_stop_conditions(params, sampled, status, num_outputs, stop_reason):
    params = {"max_tokens": 4, **params}
    sched = make_scheduler()
    seq = make_seq(3, eos=frozenset({0}), **params)
    sched.add_sequence(seq)
    for token in sampled:
        out = sched.schedule()
        if out.is_empty:
            break
        sched.update(out, [token])
    assert seq.status is status and seq.num_output_tokens == num_outputs
    assert seq.stop_reason == stop_reason


def test_max_model_len_ends_a_sequence():
    sched = make_scheduler(max_model_len=6, max_num_batched_tokens=64)
    seq = make_seq(4, max_tokens=None)
    sched.add_sequence(seq)
    while sched.has_unfinished_sequences():
        sched.update(sched.schedule(), [9])
    assert seq.num_tokens == 6 and seq.finish_reason == "length"


def test_parallel_sampling_forks_after_the_prompt_and_shares_its_blocks():
    sched = make_scheduler(num_blocks=16, block_size=4, max_num_seqs=4, max_num_batched_tokens=64)
    runner = ShadowRunner(16, 4)
    parent = make_seq(6, n=3, max_tokens=3)
    sched.add_sequence(parent)
    assert sched.running_width == 0 and parent.width == 3
    out = sched.schedule()
    assert len(out.forks) == 2 and [c.index for c in out.forks] == [1, 2]
    assert out.sampled == [parent, *out.forks] and out.output.seqs[0].num_samples == 3
    assert [r.seed_offset for r in out.output.sample_rows] == [0, 1, 2]
    for block in parent.block_table:
        assert sched.block_manager.ref_count(block) == 3
    sched.update(out, runner.execute(out))
    everyone = [parent, *out.forks]
    check_block_invariants(sched, everyone)
    assert all(s.num_output_tokens == 1 for s in everyone)
    # Next step each writes its own token into the shared, partly filled block 2: two copies
    # (the last writer is then its only holder and writes in place).
    out, _ = step(sched, runner, everyone)
    assert len(out.output.block_copies) == 2
    while sched.has_unfinished_sequences():
        step(sched, runner, everyone)
    assert all(s.finish_reason == "length" and s.num_output_tokens == 3 for s in everyone)
    assert sched.block_manager.num_free_blocks == 16


def test_a_waiting_parent_reserves_room_for_all_its_samples():
    sched = make_scheduler(max_num_seqs=3, max_num_batched_tokens=64)
    first = make_seq(4, "a")
    parent = make_seq(4, "b", n=3)
    sched.add_sequence(first)
    sched.add_sequence(parent)
    out = sched.schedule()
    assert out.seqs == [first]  # 1 + 3 samples > max_num_seqs


def test_requests_that_can_never_fit_are_refused_up_front():
    sched = make_scheduler(num_blocks=4, block_size=4, max_model_len=64, max_num_seqs=2)
    with pytest.raises(ValueError, match="max_model_len"):
        sched.add_sequence(make_seq(64))
    with pytest.raises(ValueError, match="KV blocks"):
        sched.add_sequence(make_seq(10, max_tokens=20))  # needs 29 slots = 8 blocks > 4
    with pytest.raises(ValueError, match="max_num_seqs"):
        sched.add_sequence(make_seq(4, n=3))
    sched.add_sequence(make_seq(10, max_tokens=7))  # 16 tokens -> 15 slots -> 4 blocks: fits
    assert len(sched.waiting) == 1


def test_a_step_reports_its_token_counts_and_prefix_hits():
    sched = make_scheduler(max_num_batched_tokens=16, max_num_seqs=4, prefix_caching=True)
    runner = ShadowRunner(64, 4)
    a = make_seq(10, "a", max_tokens=2)
    sched.add_sequence(a)
    out, _ = step(sched, runner)
    assert (out.num_prefill_tokens, out.num_decode_tokens, out.num_prefill_seqs) == (10, 0, 1)
    b = make_seq(10, "b", max_tokens=2)
    sched.add_sequence(b)
    out, _ = step(sched, runner)
    assert (out.num_prefill_tokens, out.num_decode_tokens) == (2, 1)
    assert out.num_prefix_hit_tokens == 8 and b.num_cached_tokens == 8
    assert out.output.num_batched_tokens == 3


def test_a_decode_planned_before_its_token_is_known_is_pending():
    """Overlap: step n+1 is planned before step n's token is folded in."""
    sched = make_scheduler()
    runner = ShadowRunner(64, 4)
    seq = make_seq(5, max_tokens=3)
    sched.add_sequence(seq)
    first = sched.schedule()
    first_tokens = runner.execute(first)
    assert seq.num_pending_tokens == 1 and seq.num_computed_tokens == 5 and seq.num_tokens == 5
    second = sched.schedule()  # before update(first)
    (s,) = second.output.seqs
    assert s.pending and s.token_ids == [] and s.start == 5 and s.num_new_tokens == 1
    sched.update(first, first_tokens)
    assert seq.num_tokens == 6 and seq.num_pending_tokens == 1  # second's token is in flight
    second_tokens = runner.execute(second)
    third = sched.schedule()  # computes output 2 (pending), samples output 3
    sched.update(second, second_tokens)
    third_tokens = runner.execute(third)
    # Output 3 is the last one (max_tokens=3): nothing after it is needed, so the sequence is
    # left out of the next plan while that token is in flight, and the update ends it.
    assert sched.schedule().is_empty
    assert sched.update(third, third_tokens) == [seq]
    assert seq.num_output_tokens == 3 and seq.finish_reason == "length"


def test_update_checks_the_number_of_sampled_tokens():
    sched = make_scheduler()
    sched.add_sequence(make_seq(3))
    out = sched.schedule()
    with pytest.raises(ValueError, match="sampled tokens"):
        sched.update(out, [])


def test_scheduler_needs_a_resolved_config():
    with pytest.raises(ValueError, match="max_model_len"):
        Scheduler(SchedulerConfig(), BlockManager(4, 4))


@pytest.mark.parametrize("num_seqs, waited_for", [(2, True), (3, False)])
def test_only_a_step_whose_batch_may_speculate_next_is_waited_for(num_seqs, waited_for):
    """The first step of a batch (nothing ran before it) is waited for only if the batch it
    admits is small enough to speculate next: above disable_by_batch_size it keeps the overlap,
    as it would without speculation."""
    spec = SpeculativeConfig("ngram", 2, disable_by_batch_size=2)
    sched = Scheduler(SchedulerConfig(max_model_len=256), BlockManager(64, 4), speculation=Speculation(spec, 256))
    for i in range(num_seqs):
        sched.add_sequence(make_seq(6, f"r{i}"))
    step = sched.schedule()
    assert len(step.sampled) == num_seqs and step.speculative is waited_for
