"""benchmarks/roofline.py on the CPU: the decode step against its roofline, the profiler's kernel
counts, tensor parallelism over gloo, and the arithmetic on known inputs."""

import json
from types import SimpleNamespace

import pytest
import torch
from torch.autograd import DeviceType

from benchmarks import roofline

cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU smoke test; on a GPU run the benchmark")
TINY = ["--device", "cpu", "--batch-sizes", "1,2", "--context", "8", "--steps", "2", "--profile-steps", "2"]


@cpu_only
def test_decode_steps_against_the_roofline_with_a_profile(tmp_path, model_cache, capsys):
    out = tmp_path / "roof.json"
    record = roofline.main([*TINY, "--profile-batches", "2", "--model-cache", str(model_cache), "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(record, default=str))
    assert saved["bench"] == "roofline" and saved["copy_bandwidth_bytes_per_s"] > 0
    one, two = saved["results"]
    assert (one["batch_size"], two["batch_size"]) == (1, 2)
    for r in (one, two):
        assert r["variant"] == "base" and r["step_time_s"] > 0 and r["tensor_parallel_size"] == 1
        assert r["roofline_time_s"] == pytest.approx(
            (r["weight_bytes"] + r["kv_read_bytes"]) / saved["copy_bandwidth_bytes_per_s"])
        assert r["step_over_roofline"] == pytest.approx(r["step_time_s"] / r["roofline_time_s"])
        # CPU: eager by necessity, not by accident, so no warning; the forward is real host work.
        assert r["graph_fraction"] == 0.0 and r["graph_warning"] is None and r["cuda_graphs"] is False
        assert r["forward_time_s"] > 0 and r["host_time_s"] >= r["forward_time_s"]
    assert "kernels_per_step" not in one  # batch 1 was not profiled
    # The profiled batch: no CUDA kernels on a CPU (None, not 0), the top ops next to the JSON.
    assert two["kernels_per_step"] is None and two["profiled_steps"] == 2
    assert two["kernel_launches_per_step"] == 0 and two["graph_launches_per_step"] == 0
    assert "self CPU time" in (tmp_path / "roof_profile_b2.txt").read_text()
    printed = capsys.readouterr().out
    assert "step/roofline" in printed and "no GPU claim" in printed


def test_kernels_are_counted_per_step_from_profiler_events():
    def event(name, device_type, parent=None):
        return SimpleNamespace(name=name, device_type=device_type, cpu_parent=parent)

    cuda, cpu = DeviceType.CUDA, DeviceType.CPU
    step = event("engine.step", cpu)  # a record_function range is not an op
    to = event("aten::to", cpu, step)
    inner = [event("aten::_to_copy", cpu, to), event("aten::copy_", cpu, event("aten::_to_copy", cpu, to))]
    events = ([event("triton_rms_norm", cuda)] * 6 + [event("Memcpy DtoH (Device -> Pinned)", cuda)] * 2
              + [event("Memset (Device)", cuda)] * 2 + [event("cudaGraphLaunch", cpu)] * 2
              + [event("cuLaunchKernelEx", cpu), event("cudaLaunchKernel", cpu), event("aten::mm", cpu)]
              + [step, to, *inner])
    got = roofline.count_kernels(events, steps=2, device=torch.device("cuda"))
    assert got == {"kernels_per_step": 3.0, "memcpy_per_step": 2.0, "kernel_launches_per_step": 1.0,
                   "graph_launches_per_step": 1.0, "torch_ops_per_step": 1.0, "profiled_steps": 2}
    # Graph replays whose kernels the profiler did not see are said to be so, not counted as 0.
    blind = roofline.count_kernels([event("cudaGraphLaunch", cpu)], 1, torch.device("cuda"))
    assert blind["kernels_per_step"] == 0 and "saw no kernels" in blind["kernel_count_note"]


def test_the_row_puts_the_step_over_weights_and_kv_bytes():
    measured = {"step_time_s": 0.003, "mean_context": 100.5}
    row = roofline.roofline_row(measured, batch=4, weights=1000, kv_per_token=10, copy_bw=2000.0)
    assert row["kv_read_bytes"] == 4020 and row["roofline_time_s"] == pytest.approx(5020 / 2000)
    assert row["step_over_roofline"] == pytest.approx(0.003 / 2.51)
    assert row["decode_tokens_per_s"] == pytest.approx(4 / 0.003)


def test_a_requested_graph_that_did_not_replay_is_a_warning():
    runner = SimpleNamespace(graphs_off_reason=None)
    row = {"batch_size": 32, "graph_fraction": 0.25, "graph_miss_reasons": ["no bucket for 33 sequences"]}
    warning = roofline.graph_warning(runner, row, steps=8)
    assert warning.startswith("WARNING") and "6 of 8" in warning and "no bucket for 33" in warning
    assert roofline.graph_warning(runner, {**row, "graph_fraction": 1.0}, steps=8) is None


@cpu_only
def test_tensor_parallel_step_holds_half_the_weights_per_rank(tmp_path, model_cache):
    """-tp 2 over gloo: the roofline counts one rank's shard of the weights."""
    args = ["--device", "cpu", "--batch-sizes", "1", "--context", "8", "--steps", "1",
            "--profile-batches", "64", "--model-cache", str(model_cache)]
    one = roofline.main([*args, "--out", str(tmp_path / "tp1.json")])["results"][0]
    two = roofline.main([*args, "-tp", "2", "--out", str(tmp_path / "tp2.json")])["results"][0]
    assert (one["tensor_parallel_size"], two["tensor_parallel_size"]) == (1, 2)
    assert 0.45 < two["weight_bytes"] / one["weight_bytes"] < 0.6  # norms are whole on both ranks
    assert two["step_time_s"] > 0


def test_bad_arguments_are_refused():
    for argv in (["--batch-sizes", "0,4"], ["--steps", "0"], ["-tp", "0"]):
        with pytest.raises(SystemExit):
            roofline.parse_args(["--device", "cpu", *argv])


@cpu_only
def test_host_only_steps_run_the_engine_without_the_model(tmp_path, model_cache):
    out = tmp_path / "host.json"
    record = roofline.main([*TINY, "--host-only", "--profile-batches", "99", "--model-cache", str(model_cache),
                            "--out", str(out)])
    assert [r["batch_size"] for r in record["results"]] == [1, 2]
    assert all(r["host_only"] and r["step_time_s"] > 0 and r["prepare_time_s"] > 0 for r in record["results"])
    with pytest.raises(SystemExit):
        roofline.parse_args(["--host-only", "-tp", "2"])


@cpu_only
def test_skipping_the_model_gives_zero_tokens_through_the_whole_engine(model_cache):
    from benchmarks.common import build_model
    from minivllm import LLM

    llm = LLM(str(build_model("tiny", model_cache, torch.float32)), device="cpu", max_num_seqs=4, max_model_len=64)
    roofline.skip_the_model(llm.engine.executor.runner)
    outs = llm.generate([[5, 6, 7], [8, 9]], temperature=0.0, max_tokens=4, ignore_eos=True, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [[0] * 4, [0] * 4]
