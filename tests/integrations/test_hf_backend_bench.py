"""benchmarks/hf_backend_bench.py on the CPU: a tiny case end to end, JSON checked."""

import json

import pytest
import torch

from benchmarks import hf_backend_bench
from minivllm.integrations import hf

# The smoke test pins the CPU path. On a GPU machine the benchmark itself is the test
# (benchmarks/RESULTS.md).
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU smoke test; on a GPU run the benchmark")


@cpu_only
def test_smoke_compares_minivllm_with_sdpa(tmp_path, capsys):
    out = tmp_path / "hf.json"
    payload = hf_backend_bench.main(["--smoke", "--new-tokens", "4", "--model-dir", str(tmp_path / "models"),
                                     "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(payload))
    assert saved["kernel_backend"] == "torch" and "no GPU claim" in saved["note"]
    generate = [r for r in saved["runs"] if r["api"] == "generate"]
    # batch sizes 1 and 2, then the left-padded batch of 2; sdpa then minivllm for each
    assert [(r["batch_size"], r["left_padded"], r["attn_implementation"]) for r in generate] == [
        (1, False, "sdpa"), (1, False, "minivllm"), (2, False, "sdpa"), (2, False, "minivllm"),
        (2, True, "sdpa"), (2, True, "minivllm")]
    for r in generate:
        assert r["output_tokens_per_s"] > 0 and r["attention_host_us_per_decode_call"] > 0
        assert r["sdpa_fallbacks"] == [] and r["new_tokens"] == 4
    # float32 on the CPU: minivllm's greedy tokens are sdpa's, every row, every token
    for c in saved["comparisons"]:
        assert c["agreement"]["exact"] == 1.0 and c["time_ratio"] > 0
    if hf.supports_continuous_batching():
        batch = [r for r in saved["runs"] if r["api"] == "generate_batch"]
        assert [r["attn_implementation"] for r in batch] == ["sdpa", "minivllm"]
        assert all(r["all_requests_complete"] and r["attention_calls"] > 0 for r in batch)
        assert batch[1]["attn_implementation_in_batching"] == "paged|minivllm"
        assert saved["comparisons"][-1]["agreement_with_generate_sdpa"]["exact"] == 1.0
    else:
        assert "no registered implementation can run there" in saved["generate_batch"]
    assert "minivllm generate B=2 (left-padded)" in capsys.readouterr().out


def test_rejects_bad_arguments():
    with pytest.raises(SystemExit):
        hf_backend_bench.parse_args(["--batch-sizes", "0,4"])
    with pytest.raises(SystemExit):
        hf_backend_bench.parse_args(["--smoke", "--new-tokens", "0"])
