"""benchmarks/frontend_bench.py on the CPU: the real server with a token fountain for an engine,
one frontend and two, every request answered in full; its JSON checked. No timing is asserted."""

from __future__ import annotations

import json

import pytest

from benchmarks import frontend_bench


def test_frontend_bench_smoke(tmp_path):
    out = tmp_path / "frontend.json"
    record = frontend_bench.main(["--api-server-counts", "1,2", "--num-requests", "6", "--max-tokens", "5",
                                  "--step-ms", "0", "--client-processes", "1", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(record, default=str))
    assert [r["api_server_count"] for r in saved["results"]] == [1, 2]
    for row, processes in zip(saved["results"], (1, 2)):
        assert row["frontend_processes"] == processes  # the frontends were found and measured
        assert row["failed_requests"] == 0 and row["output_tokens"] == 6 * 5
        # CPU time is read in clock ticks (10 ms): a wave this small may read 0, never less
        assert row["frontend_cpu_s"] >= 0 and row["server_exit_code"] == 0
        assert 1.0 <= row["tokens_per_text_chunk"] <= 5
    assert saved["results"][0]["tokens_per_s_vs_first"] == 1.0


def test_bad_arguments_are_refused():
    for argv in (["--api-server-counts", "0,2"], ["--api-server-counts", "x"], ["--num-requests", "0"],
                 ["--step-ms", "-1"]):
        with pytest.raises(SystemExit):
            frontend_bench.parse_args(argv)
