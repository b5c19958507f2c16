"""Step phase timings: every step says where its host time went and whether a graph ran it."""

from __future__ import annotations

import time

import pytest

from minivllm import LLM, SamplingParams
from minivllm.engine.scheduler import STEP_PHASES
from minivllm.observe import format_stats


@pytest.fixture
def llm(tiny_llama):
    return LLM(tiny_llama, device="cpu", attention_backend="torch", block_size=4, num_kv_blocks=64,
               max_num_seqs=4, max_model_len=128)


def _run_timed(llm) -> list[float]:
    """Three requests to the end, one step at a time; the wall time of each step seen from outside."""
    engine = llm.engine
    engine.add_requests([list(range(5, 5 + n)) for n in (3, 9, 14)],
                        SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    walls = []
    while engine.has_unfinished_requests():
        start = time.perf_counter()
        engine.step()
        walls.append(time.perf_counter() - start)
    return walls


def test_phases_are_non_negative_and_fit_inside_the_step(llm):
    walls = _run_timed(llm)
    records = list(llm.engine.scheduler.history)
    assert len(records) == len(walls)
    for record, wall in zip(records, walls):
        t = record.timings
        phases = t.phases()
        assert set(phases) == set(STEP_PHASES)
        assert all(seconds >= 0 for seconds in phases.values())
        # The phases are disjoint intervals inside the step, the step inside the outside clock.
        assert 0 < sum(phases.values()) <= t.step <= wall
        assert t.forward > 0 and t.schedule > 0 and t.update > 0
        assert t.prepare + t.forward + t.sample <= record.execute_time
        # A CPU runner has no graphs: every forward is eager and no graph was missed.
        assert not t.cuda_graph and t.graph_batch_size is None and t.graph_miss is None
    assert records[0].to_dict()["timings"]["forward"] == records[0].timings.forward


def test_get_stats_counts_graph_and_eager_steps_and_averages_the_phases(llm):
    _run_timed(llm)
    engine = llm.get_stats()["engine"]
    records = list(llm.engine.scheduler.history)
    assert engine["num_graph_steps"] == 0
    assert engine["num_eager_steps"] == engine["num_steps"] == len(records)
    means = engine["step_phases_ms"]
    assert list(means) == list(STEP_PHASES)
    for phase in STEP_PHASES:
        expected = 1e3 * sum(getattr(r.timings, phase) for r in records) / len(records)
        assert means[phase] == pytest.approx(expected)
    assert engine["busy_time_s"] == pytest.approx(sum(r.timings.step for r in records))
    text = format_stats(llm.get_stats())
    assert "step_phases_ms" in text and any(line.split()[0] == "forward" and line.endswith(" ms")
                                            for line in text.splitlines() if line.strip())


def test_stats_before_any_step_have_zero_phases(llm):
    engine = llm.get_stats()["engine"]
    assert engine["num_graph_steps"] == engine["num_eager_steps"] == 0
    assert engine["step_phases_ms"] == dict.fromkeys(STEP_PHASES, 0.0)


def test_trace_events_carry_the_final_timings(llm):
    trace = llm.enable_trace()
    _run_timed(llm)
    for event, record in zip(trace.events, llm.engine.scheduler.history):
        assert event["timings"] == record.to_dict()["timings"]
        assert event["execute_time"] == record.execute_time > 0
        assert event["step_time"] == record.timings.step
