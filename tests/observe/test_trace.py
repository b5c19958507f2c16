"""The step trace: off by default, bounded, shows a forced preemption, survives JSON lines."""

from __future__ import annotations

import json

import pytest

from minivllm import LLM, SamplingParams
from minivllm.cli import main as cli_main
from minivllm.observe import read_trace


@pytest.fixture
def small_pool_llm(tiny_llama):
    # 10 blocks x 4 slots for 3 sequences growing to 36 tokens each: preemption is certain.
    return LLM(tiny_llama, device="cpu", attention_backend="torch", block_size=4, num_kv_blocks=10,
               max_num_seqs=3, max_model_len=40, enable_prefix_caching=False)


def _run(llm):
    prompts = [list(range(5 + i, 17 + i)) for i in range(3)]
    llm.generate(prompts, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True), use_tqdm=False)


def test_trace_is_off_by_default(small_pool_llm):
    assert small_pool_llm.engine.trace is None
    with pytest.raises(ValueError, match="enable_trace"):
        small_pool_llm.save_trace("x.jsonl")


def test_trace_shows_the_forced_preemption(small_pool_llm, tmp_path):
    trace = small_pool_llm.engine.enable_trace()
    _run(small_pool_llm)
    events = list(trace)
    assert len(events) == small_pool_llm.engine.get_stats()["engine"]["num_steps"]
    preempting = [e for e in events if e["preemptions"]]
    assert preempting, "a 10-block pool for three 36-token sequences must preempt"
    event = preempting[0]
    victim = event["preemptions"][0]
    assert "no free KV block" in victim["reason"] and victim["num_computed_tokens_lost"] > 0
    assert event["blocks_freed"], "the victim's blocks went back to the pool"
    assert victim["seq_id"] not in {s["seq_id"] for s in event["seqs"]}
    assert victim["seq_id"] not in event["blocks"]["tables"]
    # Later, the victim is prefilled again from position 0 (recompute).
    redo = [s for e in events if e["step"] > event["step"] for s in e["seqs"] if s["seq_id"] == victim["seq_id"]]
    assert redo and redo[0]["start"] == 0 and redo[0]["prefill"] > 0
    # Token accounting of every step.
    for e in events:
        assert sum(s["prefill"] for s in e["seqs"]) == e["num_prefill_tokens"]
        assert sum(s["decode"] for s in e["seqs"]) == e["num_decode_tokens"]
        assert e["step_time"] > 0

    path = small_pool_llm.save_trace(tmp_path / "trace.jsonl")
    header, loaded = read_trace(path)
    assert header["num_blocks"] == 10 and len(loaded) == len(events)
    assert loaded[event["step"] - 1]["preemptions"][0]["reason"] == victim["reason"]
    assert cli_main(["visualize", str(path), "--out", str(tmp_path / "figs")]) == 0
    for name in ("timeline.png", "throughput.png", "block_map.png"):
        assert (tmp_path / "figs" / name).stat().st_size > 5_000
    assert "seq" in (tmp_path / "figs" / "block_map.txt").read_text()


def test_trace_buffer_is_bounded(small_pool_llm):
    trace = small_pool_llm.engine.enable_trace(max_steps=5, block_snapshots=False)
    _run(small_pool_llm)
    assert len(trace) == 5
    assert trace.events[-1]["step"] == small_pool_llm.engine.get_stats()["engine"]["num_steps"]
    assert "blocks" not in trace.events[-1]
    assert small_pool_llm.engine.disable_trace() is trace and small_pool_llm.engine.trace is None
    with pytest.raises(ValueError, match="max_steps"):
        small_pool_llm.engine.enable_trace(max_steps=0)


def test_visualize_without_a_trace_uses_the_step_records(small_pool_llm, tmp_path):
    _run(small_pool_llm)
    paths = small_pool_llm.visualize(tmp_path)
    assert {"timeline", "throughput", "block_map", "block_map_text"} <= set(paths)
    assert all((tmp_path / f"{n}.png").stat().st_size > 5_000 for n in ("timeline", "throughput", "block_map"))


def test_read_trace_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_trace(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    with pytest.raises(ValueError, match="JSON"):
        read_trace(bad)
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"type": "header"}) + "\n")
    with pytest.raises(ValueError, match="no step"):
        read_trace(empty)
