"""benchmarks/tune_attn.py's prefill sweep on the CPU (Triton interpreter, tiny shapes): it times
both paths on the same inputs, checks every output, records a configuration that cannot compile
or cannot fit in shared memory instead of stopping, and writes its JSON, plot and table. The
times mean nothing here; what is checked is that the GPU run will produce what it claims."""

from __future__ import annotations

import json
import os

import pytest
import torch

from benchmarks import tune_attn

pytestmark = [
    pytest.mark.skipif(torch.cuda.is_available(), reason="CPU smoke test; on a GPU run the sweep"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                       reason="needs the Triton interpreter (TRITON_INTERPRET=1)"),
]

TILES = {
    "tokens": [None],
    "pages": [None, (32, 24, 4, 2), (128, 1024, 4, 4)],  # 24: not a power of two; 1024: too big
    "page loads only": [None],
}


def test_smoke_sweep_records_every_configuration(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tune_attn, "SMOKE_TILES", TILES)
    code = tune_attn.main(["--only", "prefill", "--smoke", "--cases", "prefill,mixed",
                           "--out", str(tmp_path)])
    assert code == 0
    saved = json.loads((tmp_path / "tune_attn_prefill_cpu.json").read_text())
    assert (tmp_path / "tune_attn_prefill_cpu.png").stat().st_size > 10_000
    assert saved["meta"]["smoke"] and saved["meta"]["matmul_tflops"] > 0
    prefill, mixed = saved["results"]
    assert (prefill["name"], mixed["name"]) == ("prefill", "mixed")
    assert prefill["sdpa_ms"] > 0 and mixed["sdpa_ms"] is None  # no dense equivalent for mixed

    for res in (prefill, mixed):
        rows = {(r["path"], r["tile"]): r for r in res["rows"]}
        assert set(rows) == {("tokens", "default"), ("pages", "default"),
                             ("pages", "32x24 w4 s2"), ("pages", "128x1024 w4 s4"),
                             ("page loads only", "default")}
        for key in [("tokens", "default"), ("pages", "default"), ("page loads only", "default")]:
            r = rows[key]
            assert r["correct"] and r["rel_error"] < 1e-5, key
            assert r["config"]["PAGE_LOADS"] == (key[0] != "tokens")
            assert r["config"]["FOLD_SCALE"] == (key[0] == "pages")
            assert r["tflops"] == pytest.approx(res["flops"] / (r["ms"] * 1e-3) / 1e12)
        assert rows[("tokens", "default")]["ratio_vs_tokens_default"] == 1.0
        failed = rows[("pages", "32x24 w4 s2")]
        assert "ms" not in failed and "power of 2" in failed["failed"]
        assert failed["config"]["BLOCK_N"] == 24
        skipped = rows[("pages", "128x1024 w4 s4")]
        assert "ms" not in skipped and "shared memory" in skipped["skipped"]
    pages = next(r for r in prefill["rows"] if (r["path"], r["tile"]) == ("pages", "default"))
    assert pages["ratio_vs_sdpa"] == pytest.approx(pages["ms"] / prefill["sdpa_ms"])

    out = capsys.readouterr().out
    table = out[out.index("== prefill"):]
    assert "WRONG" not in out and "x24 w4 s2" in table and "shared memory" in table
    assert "prefill: tokens best default" in table and "mixed: tokens best default" in table


def test_a_wrong_output_fails_the_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tune_attn, "SMOKE_TILES", {"tokens": [None]})
    monkeypatch.setattr(tune_attn, "REL_TOL", {"fp32": 0.0})  # no output is exact
    code = tune_attn.main(["--only", "prefill", "--smoke", "--cases", "prefill",
                           "--out", str(tmp_path)])
    assert code == 1
    assert "WRONG output: prefill tokens default" in capsys.readouterr().out
    (row,) = json.loads((tmp_path / "tune_attn_prefill_cpu.json").read_text())["results"][0]["rows"]
    assert row["correct"] is False


def test_shared_memory_bound_is_a_lower_bound():
    """The skip rule never drops a tile the kernel's own default uses, and drops only tiles
    whose Q tile plus num_stages - 1 buffered K/V tiles exceed 227 KB."""
    case = tune_attn.Case("prefill", 4, 2048, 2048, 16, "bf16", 32, 8, 128)
    bf16 = torch.bfloat16
    assert tune_attn.too_much_shared_memory((128, 128, 8, 3), case, bf16) is None
    assert tune_attn.too_much_shared_memory((128, 128, 8, 4), case, bf16) is None  # 224 KB
    assert "shared memory" in tune_attn.too_much_shared_memory((128, 128, 8, 5), case, bf16)
    assert tune_attn.too_much_shared_memory(None, case, bf16) is None
