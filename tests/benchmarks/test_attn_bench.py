"""benchmarks/attn_bench.py on the CPU: where it writes, what its table calls its columns, that
the mixed and ragged cases, the fp8 cache and the bytes/FLOPs it reports are what they claim, and
that its tuning modes time every setting, checked, beside the default."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from minivllm.kernels import available_backends
from minivllm.kernels.reference import causal_mask

from benchmarks import attn_bench, common

ROOT = Path(__file__).resolve().parents[2]
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU smoke test; on a GPU run the benchmark")
needs_interpreter = pytest.mark.skipif("triton" not in available_backends("cpu"),
                                       reason="needs the Triton interpreter (TRITON_INTERPRET=1)")


def _run(tmp_path, *argv) -> tuple[int, list[dict]]:
    code = attn_bench.main([*argv, "--out", str(tmp_path / "a.json")])
    return code, json.loads((tmp_path / "a.json").read_text())["results"]


def _visible_keys(record: dict) -> int:
    """Keys seen by every query, counted on the reference's own causal mask."""
    lens = (zip(record["query_lens"], record["context_lens"]) if record["query_lens"]
            else [(record["query_len"], record["context"])] * record["batch"])
    return sum(int(causal_mask(q, L, torch.device("cpu")).sum()) for q, L in lens)


@cpu_only
def test_cpu_run_writes_outside_git_and_labels_the_time_ratio(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(common, "CPU_RESULTS_DIR", tmp_path / "cpu")
    assert attn_bench.main(["--cases", "decode", "--batch", "2", "--context", "40"]) == 0
    (json_path,) = (tmp_path / "cpu").glob("attn_bench_*.json")
    saved = json.loads(json_path.read_text())
    assert json_path.with_suffix(".png").stat().st_size > 5_000
    assert saved["bench"] == "attn_bench" and saved["environment"]["device"].startswith("cpu")
    assert saved["copy_gbps"] > 0 and saved["matmul_tflops"] > 0

    by_backend = {r["backend"]: r for r in saved["results"]}
    assert set(by_backend) == {"sdpa", "torch"}
    mine, sdpa = by_backend["torch"], by_backend["sdpa"]
    assert mine["ratio_vs_sdpa"] == pytest.approx(mine["ms"] / sdpa["ms"])  # a time ratio, not a speed-up
    assert mine["rel_error"] < 1e-5
    assert {r["kv_cache_dtype"] for r in saved["results"]} == {"auto"}  # the default: model dtype

    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if line.startswith("op ") and "time/SDPA" in line)
    row = next(line for line in lines if line.startswith("decode") and " torch " in line)

    def cell(title):  # numbers are right-aligned under their title
        return row[:header.index(title) + len(title)].split()[-1]

    assert cell("time/SDPA") == f"{mine['ratio_vs_sdpa']:.2f}"
    # Even the slow reference on a CPU moves a measurable number of bytes: never "GB/s 0".
    assert float(cell("GB/s")) == pytest.approx(mine["gbps"], rel=1e-2)


def test_cpu_output_is_ignored_by_git_and_gpu_output_is_not():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs the git checkout")
    for path, ignored in (("benchmarks/results/cpu/attn_bench_sweep_cpu_1.json", 0),
                          ("benchmarks/results/attn_bench_sweep_cuda_1.json", 1)):
        done = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT, check=False)
        assert done.returncode == ignored, path


def test_default_gpu_sweep_has_the_issue_shapes():
    args = attn_bench.parse_args(["--num-q-heads", "32", "--num-kv-heads", "8", "--head-dim", "128",
                                  "--dtypes", "bf16", "--block-sizes", "16"])
    cases = {c.op: c for c in attn_bench.build_cases(args, on_gpu=True)}
    assert set(cases) == {"decode", "prefill", "chunked_prefill", "mixed", "ragged_decode"}  # no write
    mixed = cases["mixed"].seqs()
    assert sorted(set(mixed)) == [(1, 2048), (512, 8192)]
    assert mixed.count((512, 8192)) == 2 and mixed.count((1, 2048)) == 62
    ragged = cases["ragged_decode"]
    contexts = [L for _, L in ragged.seqs()]
    assert len(contexts) == 128 and {q for q, _ in ragged.seqs()} == {1}
    assert 100 <= min(contexts) and max(contexts) <= 2048 and len(set(contexts)) > 100
    # Fixed seed: the same batch on every run and every device.
    again = attn_bench.ragged_decode_case(*attn_bench.RAGGED["gpu"], 16, "bf16", 32, 8, 128)
    assert again.context_lens == ragged.context_lens


def test_kv_cache_dtypes_option():
    assert attn_bench.parse_args([]).kv_cache_dtypes == ["auto"]
    assert attn_bench.parse_args(["--kv-cache-dtypes", "fp8,auto"]).kv_cache_dtypes == ["auto", "fp8"]


def test_kv_cache_dtypes_option_rejects_unknown_names(capsys):
    with pytest.raises(SystemExit):
        attn_bench.parse_args(["--kv-cache-dtypes", "auto,fp16"])
    err = capsys.readouterr().err
    assert "--kv-cache-dtypes" in err and "fp16" in err and "auto, fp8" in err


@cpu_only
@needs_interpreter
def test_new_cases_and_fp8_cache_on_triton_and_reference(tmp_path, capsys):
    code, records = _run(tmp_path, "--smoke", "--cases", "prefill,mixed,ragged", "--kv-cache-dtypes",
                         "auto,fp8", "--backends", "torch,triton", "--dtypes", "bf16")
    saved = json.loads((tmp_path / "a.json").read_text())
    assert code == 0
    by_key = {(r["op"], r["backend"], r["kv_cache_dtype"]): r for r in records}
    for op in ("prefill", "mixed", "ragged_decode"):
        for backend in ("torch", "triton"):
            for kv in ("auto", "fp8"):
                assert by_key[(op, backend, kv)]["ms"] > 0
    assert {key for key in by_key if key[1] == "sdpa"} == {("prefill", "sdpa", "auto")}  # SDPA only there

    for r in records:
        assert r["correct"] and r["rel_error"] < 1.5e-2  # against the reference on the same cache
        if r["kv_cache_dtype"] == "fp8":
            assert r["kv_cache_element"] == "float8_e4m3fn"
            # Really quantized (bf16 alone is ~1e-3 here), and within e4m3's 3 mantissa bits (2^-4).
            assert 1e-2 < r["rel_error_vs_model_dtype"] < 2.0 ** -4
            auto = by_key[(r["op"], r["backend"], "auto")]
            assert r["ratio_vs_model_dtype_kv"] == pytest.approx(r["ms"] / auto["ms"])
        else:
            assert r["kv_cache_element"] == "bfloat16"
            assert r["rel_error_vs_model_dtype"] == r["rel_error"]
            assert r["ratio_vs_model_dtype_kv"] is None

    # Bytes of the ragged decode: every context's K and V (fp8: 1 byte a value + float32 scale per
    # token and KV head), plus q and out in bf16. Smoke heads: Hq 4, Hkv 2, D 32.
    hq, hkv, d = 4, 2, 32
    for kv, per_value, per_scale in (("auto", 2, 0), ("fp8", 1, 4)):
        r = by_key[("ragged_decode", "triton", kv)]
        tokens = sum(r["context_lens"])
        expected = 2 * tokens * hkv * (d * per_value + per_scale) + 2 * r["batch"] * hq * d * 2
        assert r["bytes"] == expected
        assert r["gbps"] * r["ms"] * 1e6 == pytest.approx(expected)
        assert r["frac_copy_bw"] == pytest.approx(r["gbps"] / saved["copy_gbps"])
        assert r["ratio_vs_sdpa"] is None and r["frac_matmul_rate"] is None

    # FLOPs: 4 * Hq * D * (keys each query sees), against the reference's causal mask.
    for op in ("prefill", "mixed"):
        r = by_key[(op, "triton", "auto")]
        assert r["flops"] == 4 * hq * d * _visible_keys(r)
        assert r["tflops"] == pytest.approx(r["flops"] / (r["ms"] * 1e-3) / 1e12)
        assert r["frac_matmul_rate"] == pytest.approx(r["tflops"] / saved["matmul_tflops"])
    prefill = by_key[("prefill", "triton", "auto")]
    assert prefill["ratio_vs_sdpa"] == pytest.approx(prefill["ms"] / by_key[("prefill", "sdpa", "auto")]["ms"])

    # The mixed step: decodes then chunks, in one call, and the same two parts timed apart.
    mixed = by_key[("mixed", "triton", "fp8")]
    assert mixed["query_lens"] == [1, 1, 1, 8, 8] and mixed["context_lens"] == [24, 24, 24, 40, 40]
    assert mixed["ratio_vs_sdpa"] is None and "query length" in mixed["no_sdpa_reason"]
    assert mixed["ratio_vs_parts"] == pytest.approx(
        mixed["ms"] / (mixed["decode_part_ms"] + mixed["prefill_part_ms"]))
    chunk_flops = 4 * hq * d * 2 * (8 * 32 + 8 * 9 / 2)
    assert mixed["prefill_part_tflops"] == pytest.approx(chunk_flops / (mixed["prefill_part_ms"] * 1e-3) / 1e12)

    out = capsys.readouterr().out
    assert "no SDPA ratio for mixed" in out and "no SDPA ratio for ragged_decode" in out
    assert "WRONG" not in out


@cpu_only
@needs_interpreter
def test_fp8_that_cannot_run_gets_a_record_saying_why(tmp_path, monkeypatch):
    reason = "the Triton kernels need compute capability 8.9 or newer (test: 8.6)"
    monkeypatch.setattr(attn_bench, "triton_fp8_unsupported", lambda device: reason)
    code, records = _run(tmp_path, "--smoke", "--cases", "ragged", "--kv-cache-dtypes", "auto,fp8",
                         "--backends", "torch,triton")
    assert code == 0
    by_key = {(r["backend"], r["kv_cache_dtype"]): r for r in records}
    assert by_key[("triton", "fp8")]["ms"] is None and by_key[("triton", "fp8")]["not_run"] == reason
    assert by_key[("triton", "auto")]["correct"]
    assert by_key[("torch", "fp8")]["correct"] and by_key[("torch", "fp8")]["rel_error_vs_model_dtype"] > 1e-2


@cpu_only
def test_a_wrong_output_fails_the_run(tmp_path, monkeypatch, capsys):
    real = attn_bench.paged_attention

    def off_by_5_percent(*args, **kwargs):
        out = real(*args, **kwargs)
        if kwargs.get("out") is not None:  # the benchmarked calls, not the reference's
            out.mul_(1.05)
        return out

    monkeypatch.setattr(attn_bench, "paged_attention", off_by_5_percent)
    code, records = _run(tmp_path, "--smoke", "--cases", "ragged", "--backends", "torch")
    assert code == 1
    assert [r["correct"] for r in records] == [False]
    assert records[0]["rel_error"] == pytest.approx(0.05, rel=1e-3)
    assert "WRONG: ragged_decode" in capsys.readouterr().out


@cpu_only
def test_a_backend_that_raises_is_recorded_and_fails_the_run(tmp_path, monkeypatch, capsys):
    real = attn_bench.paged_attention

    def broken_for_chunks(*args, **kwargs):
        if kwargs.get("out") is not None and args[0].shape[0] > args[4].shape[0]:  # prefill rows
            raise RuntimeError("out of resources: shared memory")
        return real(*args, **kwargs)

    monkeypatch.setattr(attn_bench, "paged_attention", broken_for_chunks)
    code, records = _run(tmp_path, "--smoke", "--cases", "chunked,ragged", "--backends", "torch")
    assert code == 1
    by_op = {r["op"]: r for r in records}
    assert by_op["chunked_prefill"]["failed"] and by_op["chunked_prefill"]["ms"] is None
    assert "RuntimeError: out of resources" in by_op["chunked_prefill"]["not_run"]
    assert by_op["ragged_decode"]["correct"]  # the cases after it still ran
    assert "WRONG: chunked_prefill" in capsys.readouterr().out


@cpu_only
def test_script_smoke_runs_every_case(tmp_path):
    env = dict(os.environ, PYTHONPATH="")  # as a user runs it: the script finds the repo itself
    done = subprocess.run([sys.executable, "benchmarks/attn_bench.py", "--smoke", "--out", str(tmp_path / "a.json")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    records = json.loads((tmp_path / "a.json").read_text())["results"]
    assert {r["op"] for r in records} == {"decode", "prefill", "chunked_prefill", "mixed", "ragged_decode"}
    assert all(r["kv_cache_dtype"] == "auto" and r["correct"] for r in records)
    assert {r["backend"] for r in records} == {"sdpa", "torch"}


@cpu_only
@needs_interpreter
def test_tuning_times_every_setting_checked_beside_the_default(tmp_path, monkeypatch):
    """--tune tiles and --configs on the Triton kernel (interpreter): every setting gets a record
    checked against the reference and its time over the default's; a setting that cannot launch
    is recorded as not run, and does not fail the run."""
    monkeypatch.setattr(attn_bench, "SMOKE_TILES", {"decode": [(None, 16, 1, 1)], "prefill": [(32, 16, 1, 1)]})
    configs = '[{"INT64_OFFSETS": true}, {"BLOCK_N": 24}]'  # 24 keys: not a power of two
    code, records = _run(tmp_path, "--smoke", "--cases", "decode", "--backends", "triton",
                         "--tune", "tiles", "--configs", configs)
    assert code == 0
    default, tile, int64, bad = records[1:]  # after SDPA
    assert default["setting"] is None and "ratio_vs_default" not in default
    assert tile["setting"] == {"BLOCK_N": 16, "num_warps": 1, "num_stages": 1}
    assert int64["setting"] == {"INT64_OFFSETS": True}
    for r in (tile, int64):
        assert r["correct"] and r["ratio_vs_default"] == pytest.approx(r["ms"] / default["ms"])
    assert bad["ms"] is None and not bad["failed"] and "power of 2" in bad["not_run"]


@cpu_only
@needs_interpreter
def test_split_sweep_forces_each_split_count(tmp_path, monkeypatch):
    monkeypatch.setattr(attn_bench, "SPLITS", [1, 2])
    code, records = _run(tmp_path, "--smoke", "--cases", "decode", "--backends", "triton", "--tune", "splits")
    assert code == 0
    mine = [r for r in records if r["backend"] == "triton"]
    assert [r["setting"] for r in mine] == [None, {"num_splits": 1}, {"num_splits": 2}]
    assert all(r["correct"] for r in mine)


def test_tuning_needs_a_kernel_backend():
    with pytest.raises(SystemExit, match="--backends triton"):
        attn_bench.main(["--smoke", "--backends", "torch", "--tune", "tiles"])


@cpu_only
@needs_interpreter
def test_write_case_checks_each_backend_against_the_reference(tmp_path):
    code, records = _run(tmp_path, "--smoke", "--cases", "write", "--backends", "torch,triton",
                         "--kv-cache-dtypes", "auto,fp8")
    assert code == 0 and len(records) == 4
    hkv, d = 2, 32  # smoke heads; 16 tokens
    for r in records:
        assert r["op"] == "write_kv_cache" and r["correct"] and r["flops"] == 0
        written = 16 * 2 * hkv * (d + 4 if r["kv_cache_dtype"] == "fp8" else 4 * d)
        assert r["bytes"] == 16 * 2 * hkv * d * 4 + written  # fp32 rows read, the cache written
