"""Every tutorial and the basic example run in smoke mode and draw non-empty PNGs.

Those that show generated text (the example, tutorial 4) run on the real model, as they do by
default, and tutorial 5 compares scheduling strategies on it (found in the cache, where the
`smollm2` fixture put it); the others on the tiny random model.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted((ROOT / "tutorials").glob("[0-9][0-9]_*.py")) + [ROOT / "examples" / "basic_usage.py"]
ON_THE_REAL_MODEL = ("04_complete_workflow", "basic_usage")


def test_all_eight_tutorials_exist():
    assert [p.name for p in SCRIPTS[:8]] == ["01_paged_kv_cache.py", "02_scheduler.py", "03_engine_step.py",
                                             "04_complete_workflow.py", "05_performance_comparison.py",
                                             "06_serving.py", "07_tensor_parallel.py",
                                             "08_speculative_decoding.py"]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_script_runs_in_smoke_mode(script, tiny_llama, smollm2, tmp_path):
    env = {**os.environ, "MPLBACKEND": "Agg", "PYTHONWARNINGS": "ignore"}
    model = str(smollm2) if script.stem in ON_THE_REAL_MODEL else tiny_llama
    done = subprocess.run([sys.executable, str(script), "--smoke", "--out", str(tmp_path), "--model", model],
                          capture_output=True, text=True, timeout=300, env=env, cwd=ROOT, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    pngs = list(tmp_path.rglob("*.png"))
    assert pngs, f"{script.name} wrote no figure"
    assert all(p.stat().st_size > 5_000 for p in pngs)
    assert len(done.stdout.splitlines()) > 10  # it explains what it shows
    if script.stem == "04_complete_workflow":  # the real model's greedy answer, through its chat template
        assert "What is the capital of France?\n    -> 'The capital of France is Paris.'" in done.stdout
