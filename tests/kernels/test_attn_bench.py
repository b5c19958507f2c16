"""benchmarks/attn_bench.py on the CPU: where it writes, and what its table calls its columns."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from benchmarks import attn_bench

ROOT = Path(__file__).resolve().parents[2]
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU smoke test; on a GPU run the benchmark")


@cpu_only
def test_cpu_run_writes_outside_git_and_labels_the_time_ratio(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(attn_bench, "CPU_RESULTS_DIR", tmp_path / "cpu")
    assert attn_bench.main(["--cases", "decode", "--batch", "2", "--context", "40"]) == 0
    saved = json.loads((tmp_path / "cpu" / "attn_bench_cpu.json").read_text())
    assert (tmp_path / "cpu" / "attn_bench_cpu.png").stat().st_size > 5_000

    by_backend = {r["backend"]: r for r in saved["records"]}
    assert set(by_backend) == {"sdpa", "torch"}
    mine, sdpa = by_backend["torch"], by_backend["sdpa"]
    assert mine["ratio_vs_sdpa"] == pytest.approx(mine["ms"] / sdpa["ms"])  # a time ratio, not a speed-up
    assert mine["rel_error"] < 1e-5

    table = capsys.readouterr().out.split("time/SDPA")
    assert len(table) >= 2 and "vs sdpa" not in "".join(table)
    row = next(line for line in table[1].splitlines() if line.startswith("decode") and " torch " in line)
    assert f"{mine['ratio_vs_sdpa']:.2f}" in row.split()


def test_default_cpu_output_is_ignored_by_git():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs the git checkout")
    for name in ("attn_bench_cpu.json", "attn_bench_cpu.png"):
        path = (attn_bench.CPU_RESULTS_DIR / name).relative_to(ROOT)
        done = subprocess.run(["git", "check-ignore", "-q", str(path)], cwd=ROOT, check=False)
        assert done.returncode == 0, f"{path} would show up in git status"
    # The GPU results beside it are what RESULTS.md cites: never ignored.
    done = subprocess.run(["git", "check-ignore", "-q", "benchmarks/results/attn_bench_gpu.json"], cwd=ROOT,
                          check=False)
    assert done.returncode == 1
