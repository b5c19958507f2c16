"""Step phase timings: every step says where its host time went and whether a graph ran it."""

from __future__ import annotations

import time

import pytest

from minivllm import LLM, SamplingParams
from minivllm.observe import format_stats
from minivllm.observe.records import STEP_PHASES


@pytest.fixture(params=[True, False], ids=["overlap", "no-overlap"])
def llm(tiny_llama, request):
    return LLM(tiny_llama, device="cpu", attention_backend="torch", block_size=4, num_kv_blocks=64,
               max_num_seqs=4, max_model_len=128, async_scheduling=request.param)


def _run_timed(llm) -> tuple[float, float]:
    """Three requests to the end, one step at a time; (first call start, last call end)."""
    engine = llm.engine
    engine.add_requests([list(range(5, 5 + n)) for n in (3, 9, 14)],
                        SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    return start, time.perf_counter()


def test_phases_are_non_negative_and_ordered_in_time(llm):
    start, end = _run_timed(llm)
    records = list(llm.engine.stats.history)
    assert [r.step for r in records] == list(range(1, len(records) + 1))
    for record in records:
        t = record.timings
        phases = t.phases()
        assert set(phases) == set(STEP_PHASES)
        assert all(seconds >= 0 for seconds in phases.values())
        assert t.forward > 0 and t.schedule > 0 and t.update > 0
        # Planned, then folded in: inside the calls that ran it, and no shorter than its phases.
        assert start <= record.time < record.finish_time <= end
        assert sum(phases.values()) <= record.finish_time - record.time
        # A CPU runner has no graphs: every forward is eager and no graph was missed.
        assert not t.cuda_graph and t.graph_batch_size is None and t.graph_miss is None
    assert records[0].to_dict()["timings"]["forward"] == records[0].timings.forward


def test_get_stats_counts_graph_and_eager_steps_and_averages_the_phases(llm):
    _run_timed(llm)
    sched = llm.engine.get_stats()["scheduler"]
    records = list(llm.engine.stats.history)
    assert sched["num_graph_steps"] == 0
    assert sched["num_eager_steps"] == sched["num_steps"] == len(records)
    means = sched["step_phases_ms"]
    assert list(means) == list(STEP_PHASES)
    for phase in STEP_PHASES:
        expected = 1e3 * sum(getattr(r.timings, phase) for r in records) / len(records)
        assert means[phase] == pytest.approx(expected)
    kinds = sched["step_kind_steps"]
    assert sum(kinds.values()) == len(records) and kinds["decode"] > 0
    # The kinds split the run without double counting (the host's time between calls is left out).
    assert 0 < sum(sched["step_kind_time_s"].values()) <= records[-1].finish_time - records[0].time + 1e-9
    text = format_stats(llm.engine.get_stats())
    assert "step_phases_ms" in text and any(line.split()[0] == "forward" and line.endswith(" ms")
                                            for line in text.splitlines() if line.strip())


def test_stats_before_any_step_have_zero_phases(llm):
    sched = llm.engine.get_stats()["scheduler"]
    assert sched["num_graph_steps"] == sched["num_eager_steps"] == 0
    assert sched["step_phases_ms"] == dict.fromkeys(STEP_PHASES, 0.0)


def test_trace_events_carry_the_final_timings(llm):
    trace = llm.engine.enable_trace()
    _run_timed(llm)
    for event, record in zip(trace.events, llm.engine.stats.history):
        assert event["timings"] == record.to_dict()["timings"]
        assert event["step"] == record.step and event["kind"] == record.kind
        assert event["step_time"] == pytest.approx(record.finish_time - record.time)
