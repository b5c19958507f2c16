"""benchmarks/spec_bench.py on the CPU: both parts end to end on tiny models, JSON checked."""

import json

import pytest
import torch

from benchmarks import spec_bench

cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU smoke test; on a GPU run the benchmark")


@cpu_only
def test_e2e_part_compares_speculation_on_and_off_on_the_same_outputs(tmp_path):
    from minivllm.models import make_random_model

    model = make_random_model(tmp_path / "m", arch="qwen3", size="tiny")
    out = tmp_path / "e2e.json"
    payload = spec_bench.main(["--part", "e2e", "--model", str(model), "--smoke", "--batch-sizes", "1,2",
                               "--max-tokens", "12", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(payload)) and "no GPU claim" in saved["note"]
    records = saved["records"]
    assert [(r["variant"], r["batch_size"]) for r in records] == [("always_on", 1), ("always_on", 2),
                                                                   ("default_threshold", 2)]
    for r in records:  # float32: greedy outputs are the same with speculation on
        assert r["output_tokens"] == r["off_output_tokens"] > 0 and r["identical_outputs"] == 1.0
        assert r["speedup"] > 0 and r["num_draft_tokens"] >= 0
    assert saved["disable_by_batch_size_measured"] in (None, 1, 2)


@cpu_only
def test_step_part_times_decode_verify_and_draft_steps(tmp_path):
    out = tmp_path / "step.json"
    spec_bench.main(["--part", "step", "--shapes", "tiny", "--smoke", "--model-dir", str(tmp_path / "models"),
                     "--out", str(out)])
    (record,) = json.loads(out.read_text())["records"]
    assert record["shape"] == "tiny" and record["batch_size"] == 1 and record["cuda_graphs"] is False
    for key in ("decode_step_s", "verify_step_s", "draft_step_s", "decode_step_with_draft_mirror_s"):
        assert record[key] > 0
    assert record["verify_over_decode"] == record["verify_step_s"] / record["decode_step_s"]
