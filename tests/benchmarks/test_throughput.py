"""benchmarks/throughput.py and roofline.py on the CPU: a tiny case end to end, JSON checked."""

import json

import pytest

import torch

from benchmarks import roofline, throughput

# These smoke tests pin the CPU path (eager steps, the CPU disclaimer). On a GPU machine the
# benchmarks themselves are the test: benchmarks/RESULTS.md.
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU smoke test; on a GPU run the benchmark")

REQUIRED = {"bench", "backend", "model_config", "num_requests", "output_tokens_per_s", "total_tokens_per_s",
            "device"}


@cpu_only
def test_throughput_smoke_writes_one_record_per_backend(tmp_path):
    out = tmp_path / "tp.json"
    payload = throughput.main([
        "--device", "cpu", "--model-config", "tiny", "--num-requests", "3", "--input-len", "8:16",
        "--output-len", "3:6", "--backends", "minivllm,hf_generate", "--hf-batch-size", "2",
        "--model-dir", str(tmp_path / "models"), "--out", str(out),
    ])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(payload))
    records = {r["backend"]: r for r in saved["records"]}
    assert set(records) == {"minivllm", "hf_generate"}
    for r in records.values():
        assert REQUIRED <= set(r) and r["bench"] == "throughput" and r["model_config"] == "tiny"
        assert r["num_requests"] == 3 and r["output_tokens_per_s"] > 0 and r["device"].startswith("cpu")
    mine = records["minivllm"]
    assert mine["all_requests_complete"] and mine["num_output_tokens"] == records["hf_generate"]["num_output_tokens"]
    assert mine["ttft_s"]["p50"] > 0 and mine["cuda_graphs"] is False
    assert "no GPU claim" in saved["note"]
    assert [q["baseline"] for q in saved["ratios"]] == ["hf_generate"]


def test_throughput_rejects_bad_ranges():
    with pytest.raises(SystemExit):
        throughput.resolve(throughput.parse_args(["--device", "cpu", "--input-len", "9:3"]))
    with pytest.raises(SystemExit):
        throughput.parse_args(["--backends", "vllm"])


@cpu_only
def test_roofline_smoke(tmp_path, capsys):
    out = tmp_path / "roof.json"
    payload = roofline.main(["--batch-sizes", "1,2", "--context", "8", "--steps", "2", "--profile", "2",
                             "--model-dir", str(tmp_path / "models"), "--out", str(out)])
    saved = json.loads(out.read_text())
    rows = saved["rows"]
    assert [r["batch_size"] for r in rows] == [1, 2] and payload["copy_bandwidth_bytes_per_s"] > 0
    assert all(r["step_time_s"] > 0 and r["roofline_time_s"] > 0 for r in rows)
    for r in rows:  # CPU: eager by necessity, not by accident, so no warning
        assert r["graph_fraction"] == 0.0 and r["graph_batch_sizes"] == [] and r["graph_warning"] is None
        phases = [r[f"{p}_time_s"] for p in ("schedule", "prepare", "forward", "sample", "wait", "update")]
        # (With overlap a step's phases span two engine.step() calls, so they are not bounded by
        # one call's time; on CPU the forward runs inside `forward`, so the host time is real work.)
        assert all(t >= 0 for t in phases) and r["forward_time_s"] > 0 and r["host_time_s"] >= r["forward_time_s"]
    # --profile 2: the tables next to the JSON, the top ops in it (CPU only here), a table printed.
    profile = saved["profile"]
    assert profile["batch_size"] == 2 and profile["mode"] == "eager" and "error" not in profile
    text = (tmp_path / "roof_profile_b2.txt").read_text()
    assert profile["file"] == str(tmp_path / "roof_profile_b2.txt") and "self CPU time" in text
    top = profile["top_self_cpu"]
    assert 0 < len(top) <= 30 and any(op["name"].startswith("aten::") for op in top)
    assert top[0]["self_cpu_us_per_step"] >= top[-1]["self_cpu_us_per_step"] and "top_self_cuda" not in profile
    printed = capsys.readouterr().out
    assert "top 15 ops by self CPU time" in printed and "replay" in printed


def test_roofline_profile_batch_must_be_measured(tmp_path):
    with pytest.raises(SystemExit):
        roofline.main(["--batch-sizes", "1,2", "--profile", "4", "--out", str(tmp_path / "r.json")])


def test_roofline_warns_when_a_requested_graph_did_not_replay():
    class Runner:  # what graph_warning reads from a ModelRunner
        graphs_off_reason = None

    row = {"batch_size": 32, "graph_fraction": 0.25, "graph_miss_reasons": ["no bucket for 33 sequences"]}
    warning = roofline.graph_warning(Runner(), row, steps=8)
    assert warning.startswith("WARNING") and "6 of 8" in warning and "no bucket for 33" in warning
    Runner.graphs_off_reason = "enforce_eager=True"
    assert "enforce_eager" in roofline.graph_warning(Runner(), {**row, "graph_miss_reasons": []}, steps=8)
    assert roofline.graph_warning(Runner(), {**row, "graph_fraction": 1.0}, steps=8) is None


def test_kv_cache_dtypes_option_and_the_fp8_ratio():
    assert throughput.parse_args(["--kv-cache-dtypes", "auto,fp8"]).kv_cache_dtypes == ["auto", "fp8"]
    with pytest.raises(SystemExit):
        throughput.parse_args(["--kv-cache-dtypes", "int8"])
    records = [
        {"backend": "minivllm", "num_requests": 8, "kv_cache_dtype": "bfloat16", "output_tokens_per_s": 100.0,
         "total_tokens_per_s": 200.0},
        {"backend": "minivllm", "num_requests": 8, "kv_cache_dtype": "fp8_e4m3", "output_tokens_per_s": 150.0,
         "total_tokens_per_s": 300.0},
        {"backend": "hf_generate", "num_requests": 8, "output_tokens_per_s": 10.0, "total_tokens_per_s": 20.0},
    ]
    by_baseline = {(q["subject"], q["baseline"]): q["output_tokens_per_s_ratio"] for q in throughput.ratios(records)}
    assert by_baseline == {("minivllm (fp8_e4m3 KV)", "minivllm (bfloat16 KV)"): 1.5, ("minivllm", "hf_generate"): 10.0}
