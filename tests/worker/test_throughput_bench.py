"""benchmarks/throughput.py and roofline.py on the CPU: a tiny case end to end, JSON checked."""

import json

import pytest

from benchmarks import roofline, throughput

REQUIRED = {"bench", "backend", "model_config", "num_requests", "output_tokens_per_s", "total_tokens_per_s",
            "device"}


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


def test_roofline_smoke(tmp_path):
    out = tmp_path / "roof.json"
    payload = roofline.main(["--batch-sizes", "1,2", "--context", "8", "--steps", "2",
                             "--model-dir", str(tmp_path / "models"), "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["batch_size"] for r in rows] == [1, 2] and payload["copy_bandwidth_bytes_per_s"] > 0
    assert all(r["step_time_s"] > 0 and r["roofline_time_s"] > 0 for r in rows)
