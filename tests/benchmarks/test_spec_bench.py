"""benchmarks/spec_bench.py on the CPU: both parts end to end on the tiny model, JSON checked."""

import argparse
import json

import pytest
import torch

from benchmarks import spec_bench
from minivllm import LLM

cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU smoke test; on a GPU run the benchmark")


@cpu_only
def test_e2e_part_compares_speculation_on_and_off_on_the_same_outputs(tmp_path, model_cache, capsys):
    [model] = model_cache.glob("tiny-*")
    out = tmp_path / "e2e.json"
    record = spec_bench.main(["--part", "e2e", "--device", "cpu", "--model", str(model), "--batch-sizes", "1,2",
                              "--max-tokens", "12", "--rounds", "3", "--repeats", "2", "--max-model-len", "512", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(record, default=str)) and "no GPU claim" in saved["note"]
    rows = saved["results"]
    assert [(r["mode"], r["batch_size"], r["num_requests"]) for r in rows] == [
        ("always_on", 1, 3), ("always_on", 2, 6), ("default_threshold", 2, 6)]  # 3 rounds at every batch size
    for r in rows:  # float32: greedy outputs are the same with speculation on
        assert r["variant"] == "base" and r["output_tokens"] == r["off_output_tokens"] > 0
        assert r["identical_outputs"] == 1.0 and r["num_draft_tokens"] >= 0
        assert len(r["speedups"]) == 2 and r["speedup"] == pytest.approx(sum(r["speedups"]) / 2)
        assert r["above_threshold_speedups"] == [] and r["above_threshold_speedup"] is None  # never > 16 running
    assert rows[0]["disable_by_batch_size"] is None and rows[2]["disable_by_batch_size"] >= 1
    assert saved["disable_by_batch_size_measured"] == spec_bench.threshold_from(rows)
    assert "DISABLE_BY_BATCH_SIZE" in capsys.readouterr().out


def test_the_threshold_is_the_last_batch_of_an_unbroken_run_that_paid():
    def rows(*speedups):
        return [{"mode": "always_on", "batch_size": 2 ** i, "speedup": s} for i, s in enumerate(speedups)]

    assert spec_bench.threshold_from(rows(2.0, 1.5, 1.1, 0.9, 1.2)) == 4
    assert spec_bench.threshold_from(rows(0.8, 1.2)) is None
    assert spec_bench.threshold_from(rows(1.9, 1.0)) == 2


@cpu_only
def test_step_part_times_decode_verify_and_draft_steps(tmp_path, model_cache):
    out = tmp_path / "step.json"
    spec_bench.main(["--part", "step", "--device", "cpu", "--model-config", "tiny", "--model-cache", str(model_cache),
                     "--variants", "small_pool:num_kv_blocks=64", "--out", str(out)])
    rows = json.loads(out.read_text())["results"]  # the variant's child process measured them
    assert [(r["variant"], r["model"], r["batch_size"]) for r in rows] == [("small_pool", "tiny", 1)]
    for r in rows:
        assert r["cuda_graphs"] is False and r["num_speculative_tokens"] == 4
        assert min(r["decode_step_s"], r["verify_step_s"], r["draft_step_s"]) > 0
        assert r["verify_over_decode"] == pytest.approx(r["verify_step_s"] / r["decode_step_s"])
        assert r["draft_step_over_decode"] == pytest.approx(r["draft_step_s"] / r["decode_step_s"])


@cpu_only
def test_tokens_per_s_above_the_threshold_come_from_the_steps_with_more_running(model_cache):
    """Batch 18 runs steps with more sequences than DISABLE_BY_BATCH_SIZE (16), batch 1 none; the
    e2e row takes the ratio of those rates turn by turn."""
    [model] = model_cache.glob("tiny-*-seed0")  # (the step part adds a draft model, seed 1)
    llm = LLM(str(model), device="cpu", dtype="float32", max_num_seqs=18, max_model_len=512, num_kv_blocks=640)
    small, large = spec_bench.run_batches(llm, [1, 18], 8, 2, {})
    assert spec_bench.DISABLE_BY_BATCH_SIZE < 18 and large["num_requests"] == 36
    assert small["above_threshold_tokens_per_s"] is None and large["above_threshold_tokens_per_s"] > 0
    args = argparse.Namespace(model_label="tiny", num_speculative_tokens=3)
    row = spec_bench.e2e_row("always_on", [large, large], [large, {**large, "above_threshold_tokens_per_s": None}], args)
    assert row["above_threshold_speedups"] == [1.0] and row["above_threshold_speedup"] == 1.0
