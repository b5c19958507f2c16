"""benchmarks/throughput.py on the CPU: minivllm against HF `generate` at two concurrency levels,
minivllm's attention inside HF against sdpa, variants in child processes, and the arithmetic of
the workload roofline and the ratios."""

import json

import pytest
import torch

from benchmarks import throughput

cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU smoke test; on a GPU run the benchmark")
TINY = ["--device", "cpu", "--num-requests", "3", "--input-len", "8:16", "--output-len", "6"]


@cpu_only
def test_minivllm_against_hf_generate_at_each_concurrency(tmp_path, model_cache, capsys):
    """The CPU case of issue 24 in small: the same requests, the same process, 1 and then 3 at
    once; HF's batch is one left-padded call. minivllm's kernel inside HF (float32) must give
    sdpa's greedy tokens exactly."""
    out = tmp_path / "t.json"
    record = throughput.main([*TINY, "--concurrency", "1,3", "--backends", "minivllm,hf_generate",
                              "--hf-attn", "sdpa,minivllm", "--model-cache", str(model_cache),
                              "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(record, default=str))
    assert saved["bench"] == "throughput" and saved["environment"]["device"].startswith("cpu")
    rows = {(r["backend"], r.get("attn"), r["concurrency"]): r for r in saved["results"]}
    assert set(rows) == {(b, a, c) for b, a in (("minivllm", None), ("hf_generate", "sdpa"),
                                                ("hf_generate", "minivllm")) for c in (1, 3)}
    for r in rows.values():
        assert r["variant"] == "base" and r["output_tokens_per_s"] > 0
        assert r["num_output_tokens"] == 6 * r["concurrency"]  # exactly the asked tokens, everywhere
    mine = rows[("minivllm", None, 3)]
    assert mine["all_requests_complete"] and mine["jit_compiles_during_run"] in (0, None)
    assert mine["roofline_fraction"] == pytest.approx(mine["workload_roofline_s"] / mine["wall_time_s"])
    assert mine["tensor_parallel_size"] == 1 and mine["ttft_s"]["p50"] > 0
    assert rows[("hf_generate", "sdpa", 3)]["hf_batch_size"] == 3  # one batched call
    for c in (1, 3):
        assert rows[("hf_generate", "minivllm", c)]["agreement_with_first_attn"]["exact"] == 1.0
    ratios = {(q["subject"], q["baseline"], q["concurrency"]): q["output_tokens_per_s_ratio"]
              for q in saved["ratios"]}
    for c in (1, 3):
        expected = rows[("minivllm", None, c)]["output_tokens_per_s"] / rows[("hf_generate", "sdpa", c)]["output_tokens_per_s"]
        assert ratios[("base/minivllm", "base/hf_generate[sdpa]", c)] == pytest.approx(expected)
    printed = capsys.readouterr().out
    assert "base/minivllm / base/hf_generate[sdpa] at concurrency 1:" in printed
    assert "no GPU claim" in printed


@cpu_only
def test_a_variant_child_applies_its_engine_and_sampling_settings(tmp_path, model_cache):
    """What each child process of --variants runs (here in this process: run_variants itself is
    tested in test_common.py): the named variant, its engine and sampling settings applied."""
    record = throughput.main([*TINY, "--model-cache", str(model_cache), "--out", str(tmp_path / "v.json"),
                              "--variants", "overlap:,sync:async_scheduling=false sampling.top_k=1",
                              "--child-variant", "sync"])
    (row,) = record["results"]
    assert row["variant"] == "sync" and row["async_scheduling"] is False
    assert row["num_output_tokens"] == 18 and row["all_requests_complete"]


def test_workload_roofline_adds_decode_bytes_and_prefill_flops():
    class Model(torch.nn.Module):  # 1,000 bf16 parameters; K/V of 2 layers x 1 head x 4 dims
        num_layers, num_kv_heads, head_dim = 2, 1, 4

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1000, dtype=torch.bfloat16))

    prompts, out_lens = [[1] * 10, [1] * 20], [3, 1]
    got = throughput.workload_roofline(prompts, out_lens, Model(), copy_bw=1e3, matmul=1e4)
    kv_per_token = 2 * 2 * 1 * 4 * 2
    context_tokens = (3 * 10 + 3) + (1 * 20 + 0)  # token j of a request reads prompt + j tokens
    assert got["decode_bytes"] == 3 * 2000 + context_tokens * kv_per_token
    assert got["prefill_flops"] == 2 * 1000 * 30
    assert got["workload_roofline_s"] == pytest.approx(got["decode_bytes"] / 1e3 + got["prefill_flops"] / 1e4)


def test_ratios_pair_rows_of_the_same_requests():
    def row(variant, backend, c, tps, attn=None):
        return {"variant": variant, "backend": backend, "concurrency": c, "output_tokens_per_s": tps,
                **({"attn": attn} if attn else {})}

    rows = [row("a", "minivllm", 8, 80.0), row("a", "hf_generate", 8, 40.0, "sdpa"),
            row("a", "hf_generate", 8, 20.0, "minivllm"), row("a", "minivllm", 1, 10.0),
            row("b", "minivllm", 8, 120.0), row("a", "hf_generate_batch", 8, None, "sdpa")]
    got = {(q["subject"], q["baseline"], q["concurrency"]): q["output_tokens_per_s_ratio"]
           for q in throughput.compare(rows)}
    assert got == {("a/minivllm", "a/hf_generate[sdpa]", 8): 2.0,
                   ("a/minivllm", "a/hf_generate[minivllm]", 8): 4.0,
                   ("a/hf_generate[minivllm]", "a/hf_generate[sdpa]", 8): 0.5,
                   ("b/minivllm", "a/minivllm", 8): 1.5}  # a timed-out row (None) is never a baseline


@pytest.mark.parametrize("argv", [["--input-len", "9:3"], ["--backends", "vllm"], ["--hf-attn", "flash"],
                                  ["--num-requests", "2", "--concurrency", "4"], ["--concurrency", "0"]])
def test_bad_arguments_are_refused(argv):
    with pytest.raises(SystemExit):
        throughput.parse_args(["--device", "cpu", *argv])


def test_the_random_workload_draws_ids_of_the_models_vocabulary(model_cache):
    from benchmarks.common import build_model, random_requests, vocab_size

    model_dir = build_model("tiny", model_cache, torch.float32)
    draw = lambda: random_requests(4, (5, 7), (2, 3), vocab_size(model_dir), seed=1)  # noqa: E731
    prompts, out_lens = draw()
    assert len(prompts) == 4 and all(5 <= len(p) <= 7 and max(p) < vocab_size(model_dir) for p in prompts)
    assert all(2 <= n <= 3 for n in out_lens) and (prompts, out_lens) == draw()


@cpu_only
def test_a_structured_output_variant_keeps_every_request_at_its_length(tmp_path, model_cache):
    """A JSON schema on every request (a string longer than any output): EOS is kept, yet every
    request runs its full length, and the host fills a grammar bitmask every step."""
    spec = '{"json":{"type":"object","properties":{"text":{"type":"string","minLength":100000}},"required":["text"]}}'
    record = throughput.main([*TINY, "--model-cache", str(model_cache), "--out", str(tmp_path / "s.json"),
                              "--variants", f"plain:,json:sampling.structured_outputs={spec}",
                              "--child-variant", "json"])
    (row,) = record["results"]
    assert row["variant"] == "json" and row["all_requests_complete"] and row["num_output_tokens"] == 18
    assert row["step_phases_ms"]["grammar"] > 0
    params = throughput.sampling_params(6, {"structured_outputs": json.loads(spec)})
    assert params.structured_outputs.json["properties"]["text"]["minLength"] == 100000 and not params.ignore_eos
    assert throughput.sampling_params(6, {}).ignore_eos
