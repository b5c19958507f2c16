"""The decode step against its memory roofline, per batch size, and the kernels it launches.

A decode step must read every weight once (the batch shares them) and the whole KV cache of every
sequence in the batch. Nothing can make it faster than those bytes over the memory bandwidth:

    roofline time = (weight bytes + KV bytes read) / copy bandwidth

with the copy bandwidth measured in the same run (with tensor parallelism: one GPU's shard of the weights and of the
KV heads). For each batch size B, B random prompts of --context tokens go through the real engine (scheduler,
packing, sampler and sync included) and prefill; then --steps engine steps in which all B sequences decode together
are timed. A row reports the median step time, the roofline and their ratio, the median host time of each phase of
the step (schedule, prepare, forward, sample, wait, update: `minivllm/observe/records.py`), and `graph_fraction`, the
share of timed steps whose forward replayed a CUDA graph (a graphs-on step that ran eagerly prints a WARNING).

**Kernels per step.** At the batch sizes of --profile-batches (default 1 and 64), torch.profiler records
--profile-steps more decode steps, after the timed ones (it slows them down). The GPU is synchronized before and
after, so the window holds exactly those steps' kernels:

    kernels_per_step         GPU kernels executed per step, as CUPTI reports them: inside a
                             replayed CUDA graph every kernel node counts (memory copies and
                             sets are not kernels: memcpy_per_step)
    kernel_launches_per_step host calls that launch one kernel (cudaLaunchKernel, cuLaunchKernel*)
    graph_launches_per_step  host calls that replay a graph (cudaGraphLaunch)
    torch_ops_per_step       eager torch ops the host dispatched (outermost aten:: calls): each
                             costs microseconds of host time, and on a GPU is a launch or a copy

so eager steps show kernels = launches, graphed ones a few launches for hundreds of kernels. On the
CPU there are no kernels (None). The profiler's top ops go to <json stem>[_<variant>]_profile_b<B>.txt.

**Tensor parallelism** (`-tp N`, or a variant `tensor_parallel_size=N`): on N GPUs the all-reduce is also timed
alone before the engine starts (`all_reduce` in the JSON), [B, hidden] bf16 per batch size, through NCCL, through peer
memory (the engine's one-shot sum, where it can run) and as the seam after it (the sum, then add + RMSNorm; or all in
one kernel), eager and replayed from a CUDA graph of 2 x layers + 1 calls (a decode step's), each result checked.

    python benchmarks/roofline.py                                  # GPU: qwen3-0.6b, context 1024
    python benchmarks/roofline.py --batch-sizes 1,64 --variants "graphs:,eager:enforce_eager=true"
    python benchmarks/roofline.py --variants "base:,nofused:MINIVLLM_FUSED_OPS=0"
    python benchmarks/roofline.py --model-config llama-3.1-8b --variants "tp1:,tp2:tensor_parallel_size=2"

**The host alone** (`--host-only`): the forward pass and LM head give zeros, so a step is the engine's own work
(schedule, prepare, sample, update) and its time the fastest step the host allows: a GPU step shorter than that is
host-bound. The host code is the same on a CPU, so a CPU run (no CPU forward pass slowing the code around it) says
what a change does to it:

    python benchmarks/roofline.py --device cpu --host-only --batch-sizes 16,256 --context 32 --steps 200

Variants (`benchmarks/common.py`) run side by side, each in a process of its own; every row gets its step time over
the first variant's at the same batch size. CPU runs are no GPU claim.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `minivllm` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from minivllm import LLM, SamplingParams
from minivllm.observe.records import STEP_PHASES

from benchmarks.common import (add_model_arguments, add_row, add_variant_arguments, copy_bandwidth,
                               finish, format_table, free_port, int_list, random_requests,
                               ratio_to_first_variant, release_memory, run_benchmark, sync,
                               this_variant, with_device_defaults)

BLOCK_SIZE = 16


def weight_bytes(model) -> int:
    """Bytes of the weights one decode step reads: every parameter once (a tied embedding is one
    tensor), except an untied input embedding, of which a step gathers only B rows."""
    params = {id(p): p for p in model.parameters()}
    total = sum(p.numel() * p.element_size() for p in params.values())
    embed = model.model.embed_tokens.weight if hasattr(model, "model") else None
    lm_head = getattr(getattr(model, "lm_head", None), "weight", None)
    if embed is not None and lm_head is not None and embed is not lm_head:
        total -= embed.numel() * embed.element_size()
    return total


def roofline_row(measured: dict, batch: int, weights: int, kv_per_token: int,
                 copy_bw: float) -> dict:
    """The step against (weights + every sequence's cached K/V, all layers) / copy bandwidth."""
    kv_bytes = int(batch * measured["mean_context"] * kv_per_token)
    roofline = (weights + kv_bytes) / copy_bw
    return {"batch_size": batch, **measured, "weight_bytes": weights, "kv_read_bytes": kv_bytes,
            "roofline_time_s": roofline, "step_over_roofline": measured["step_time_s"] / roofline,
            "decode_tokens_per_s": batch / measured["step_time_s"]}


# ------------------------------------------------------------------------------------------
# Timing the decode steps
# ------------------------------------------------------------------------------------------
def time_decode_steps(llm, batch: int, context: int, steps: int, seed: int,
                      profile: tuple[int, Path] | None = None, sampling: dict | None = None) -> dict:
    """Prefill `batch` prompts of `context` tokens, then time `steps` all-decode engine steps;
    `profile` = (steps, file): then profile that many more (module docstring)."""
    engine = llm.engine
    prompts, _ = random_requests(batch, (context, context), (1, 1), engine.vocab_size, seed)
    # Sequences prefilled early decode while the others still prefill: give them all the room
    # the model length allows, and abort them once measured.
    room = engine.config.scheduler_config.max_model_len - context
    params = SamplingParams(**{"temperature": 0.0, "max_tokens": room, "ignore_eos": True, **(sampling or {})})
    ids = engine.add_requests(prompts, params)
    history = engine.stats.history
    for _ in range(100 * batch + 1000):  # prefill, chunked, until one step decodes the whole batch
        if history and history[-1].num_prefill_seqs == 0 and history[-1].num_decode_seqs == batch:
            break
        engine.step()
    else:
        raise RuntimeError(f"the {batch} sequences never decoded together (max_num_seqs too small?)")
    for _ in range(2):  # warm-up
        engine.step()
    times, records, contexts = [], [], []
    for _ in range(steps):
        contexts.append(statistics.mean(s.num_tokens for s in engine.scheduler.running))
        start = time.perf_counter()
        engine.step()  # returns with a step's tokens: in steady state, one step apart
        times.append(time.perf_counter() - start)
        records.append(history[-1])
        assert records[-1].num_decode_seqs == batch, "the batch changed while timing"
    measured = {"step_time_s": statistics.median(times), "mean_context": statistics.mean(contexts),
                **phase_summary([r.timings for r in records])}
    if profile is not None:
        measured.update(profile_steps(engine, *profile))
    for request_id in ids:
        engine.abort(request_id)
    return measured


def phase_summary(timings) -> dict:
    """Median host seconds per step phase, and how many steps replayed a graph."""
    summary = {f"{p}_time_s": statistics.median(getattr(t, p) for t in timings) for p in STEP_PHASES}
    summary["host_time_s"] = statistics.median(t.host for t in timings)
    summary["graph_fraction"] = sum(t.cuda_graph for t in timings) / len(timings)
    summary["graph_miss_reasons"] = sorted({t.graph_miss for t in timings if t.graph_miss})
    return summary


def graph_warning(runner, row: dict, steps: int) -> str | None:
    """A loud line when graphs were on but some timed step ran eagerly, with the reason."""
    if row["graph_fraction"] >= 1.0:
        return None
    eager = round((1.0 - row["graph_fraction"]) * steps)
    reason = runner.graphs_off_reason or "; ".join(row["graph_miss_reasons"]) or "unknown"
    return (f"WARNING: CUDA graphs on, but {eager} of {steps} timed decode steps at "
            f"B={row['batch_size']} ran eagerly: {reason}")


# ------------------------------------------------------------------------------------------
# Kernels per step
# ------------------------------------------------------------------------------------------
def profile_steps(engine, steps: int, path: Path) -> dict:
    """torch.profiler over `steps` decode steps: the counts of the module docstring, and the top
    ops written to `path`. A profiler failure is recorded, not raised: the timings stand."""
    from torch.profiler import ProfilerActivity, profile

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    try:
        sync(device)  # the step in flight finishes outside the window
        with profile(activities=activities) as prof:
            for _ in range(steps):
                engine.step()
            sync(device)  # ... and the last one launched inside it finishes inside it
        write_profile_tables(prof.key_averages(), path, steps, device)
        return {**count_kernels(prof.events(), steps, device), "profile_file": str(path)}
    except Exception as err:  # noqa: BLE001 - see the docstring
        print(f"WARNING: the profiler failed: {type(err).__name__}: {err}")
        return {"kernels_per_step": None, "profile_error": f"{type(err).__name__}: {err}"}


def count_kernels(events, steps: int, device: torch.device) -> dict:
    """GPU kernels, memory copies/sets, and host launch calls per step, from profiler events."""
    from torch.autograd import DeviceType

    on_gpu = [e for e in events if e.device_type == DeviceType.CUDA]
    copies = sum(e.name.startswith(("Memcpy", "Memset")) for e in on_gpu)
    host = [e.name for e in events if e.device_type == DeviceType.CPU]
    counts = {
        "kernels_per_step": (len(on_gpu) - copies) / steps if device.type == "cuda" else None,
        "memcpy_per_step": copies / steps if device.type == "cuda" else None,
        "kernel_launches_per_step": sum("LaunchKernel" in n for n in host) / steps,
        "graph_launches_per_step": sum("GraphLaunch" in n for n in host) / steps,
        "torch_ops_per_step": sum(_outermost_op(e) for e in events if e.device_type == DeviceType.CPU) / steps,
        "profiled_steps": steps,
    }
    if counts["graph_launches_per_step"] and not counts["kernels_per_step"]:
        counts["kernel_count_note"] = "the profiler saw no kernels inside the graph replays"
    return counts


def _outermost_op(event) -> bool:
    """An aten:: op called by no other aten:: op (one eager op, whatever it calls inside)."""
    parent = event.cpu_parent
    while parent is not None and not parent.name.startswith("aten::"):
        parent = parent.cpu_parent
    return event.name.startswith("aten::") and parent is None


def write_profile_tables(averages, path: Path, steps: int, device: torch.device) -> None:
    sorts = [("self CPU time", "self_cpu_time_total")]
    if device.type == "cuda":
        sorts.append(("self device time", "self_device_time_total"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(
        f"torch.profiler over {steps} decode steps, top 30 ops by {label}:\n"
        f"{averages.table(sort_by=key, row_limit=30)}" for label, key in sorts) + "\n")


# ------------------------------------------------------------------------------------------
# The all-reduce alone (tensor parallelism)
# ------------------------------------------------------------------------------------------
def time_all_reduce(size: int, hidden: int, calls: int, batch_sizes: list[int]) -> list[dict]:
    """Per call, [B, hidden] bf16 over `size` GPUs, each method of `_all_reduce_rank` (rows of rank 0)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        rank_args = (size, free_port(), hidden, calls, batch_sizes, str(out))  # the port: the rendezvous
        torch.multiprocessing.spawn(_all_reduce_rank, args=rank_args, nprocs=size, join=True)
        return json.loads(out.read_text())


def _all_reduce_rank(rank: int, size: int, port: int, hidden: int, calls: int, batch_sizes, out: str):
    import datetime as dt

    import torch.distributed as dist

    from minivllm.distributed.peer_all_reduce import PeerAllReduce, unavailable_reason
    from minivllm.layers.fused_ops import rms_norm

    torch.cuda.set_device(rank)
    store = dist.TCPStore("127.0.0.1", port, size, is_master=rank == 0, timeout=dt.timedelta(minutes=5))
    dist.init_process_group("nccl", store=store, rank=rank, world_size=size)
    methods = {"nccl": dist.all_reduce}
    peer_reason = unavailable_reason(size, torch.device("cuda"))
    if peer_reason is None:  # the sum, and the seam after it: sum, then add + RMSNorm; all in one kernel
        peer = methods["peer"] = PeerAllReduce(dist.group.WORLD, torch.device("cuda", rank), torch.bfloat16)
        weight = torch.ones(hidden, dtype=torch.bfloat16, device="cuda")
        methods["peer, add+norm"] = lambda x: rms_norm(peer(x), weight, 1e-6, residual)
        methods["peer+add+norm"] = lambda x: peer.add_rms_norm(x, residual, weight, 1e-6)
    rows = []
    for batch, (method, fn) in itertools.product(batch_sizes, methods.items()):
        x = torch.ones(batch, hidden, dtype=torch.bfloat16, device="cuda")
        residual = torch.zeros_like(x)  # the seams' (their lambdas read it)
        if method != "nccl" and not (peer.fits_norm(x, residual) if "norm" in method else peer.fits(x)):
            continue
        summed = x.clone()
        summed = summed if (out := fn(summed)) is None else out  # NCCL sums in place, returning None
        eager = _median_cuda_s(lambda fn=fn, x=x: fn(x), repeats=100)
        graph = torch.cuda.CUDAGraph()  # `calls` all-reduces in one graph, as a decode graph has
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn(x)
        graphed = _median_cuda_s(graph.replay, repeats=20) / calls
        rows.append({"method": method, "batch_size": batch, "hidden": hidden, "num_gpus": size,
                     "bytes": x.numel() * x.element_size(),  # a seam normalises the sum: a row of ones
                     "correct": bool((summed == (1 if "norm" in method else size)).all()),
                     "eager_s": eager, "graphed_s": graphed, "calls_per_step": calls,
                     "graphed_per_step_s": graphed * calls, "peer_unavailable": peer_reason})
    if rank == 0:
        Path(out).write_text(json.dumps(rows))
    dist.destroy_process_group()


def _median_cuda_s(fn, repeats: int) -> float:
    """Median seconds of `fn` by CUDA events, after a warm-up: a fixed count of calls, as every
    rank must make the same collective calls (an adaptive timer could pick different counts)."""
    for _ in range(10):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def skip_the_model(runner) -> None:
    """`--host-only`: the runner's forward gives zero hidden states and its LM head 8 zero logits
    a row (so every sampled token is 0), at once. Everything before and after runs as usual."""
    hidden_size = runner.model.config.hidden_size
    runner._forward = lambda prepared, batch: torch.zeros(batch.num_tokens, hidden_size, device=runner.device)
    runner.model.compute_logits = lambda hidden: torch.zeros(hidden.shape[0], 8, device=hidden.device)


def measure(model_dir: Path, dtype: str, args, device: torch.device, record: dict, out: Path) -> None:
    """One engine (this process's variant), every batch size: rows into `record`."""
    variant = this_variant(args)
    record["copy_bandwidth_bytes_per_s"] = copy_bw = copy_bandwidth(device)
    print(f"copy bandwidth (read + write): {copy_bw / 1e9:.1f} GB/s", flush=True)
    max_batch = max(args.batch_sizes)
    max_model_len = args.context + args.steps + args.profile_steps + 128
    engine_args = {**dict(
        dtype=dtype, device=device.type, max_num_seqs=max_batch, max_model_len=max_model_len,
        max_num_batched_tokens=max(8192, max_batch), block_size=BLOCK_SIZE,
        num_kv_blocks=max_batch * -(-max_model_len // BLOCK_SIZE) + 16, enable_prefix_caching=False,
        tensor_parallel_size=args.tensor_parallel_size), **variant.engine}
    tp = engine_args["tensor_parallel_size"]
    if tp > 1 and device.type == "cuda":
        config = json.loads((Path(model_dir) / "config.json").read_text())
        calls = 2 * config["num_hidden_layers"] + 1  # two per layer, one for the embedding
        record["all_reduce"] = time_all_reduce(tp, config["hidden_size"], calls, args.batch_sizes)
        print(format_table(record["all_reduce"], ALL_REDUCE_COLUMNS), flush=True)
    llm = LLM(str(model_dir), **engine_args)
    runner = llm.engine.executor.runner
    if args.host_only:
        skip_the_model(runner)
    weights = weight_bytes(runner.model)  # this rank's shard
    kv_per_token = runner.kv_bytes_per_block // runner.block_size
    time_decode_steps(llm, min(2, max_batch), min(args.context, 64), 2, args.seed)  # warm-up
    for batch in args.batch_sizes:
        profile = None
        if batch in args.profile_batches:
            profile = (args.profile_steps, out.with_name(f"{out.stem}_profile_b{batch}.txt"))
        measured = time_decode_steps(llm, batch, args.context, args.steps, args.seed + batch, profile,
                                     variant.sampling)
        row = {"variant": variant.name, **roofline_row(measured, batch, weights, kv_per_token, copy_bw),
               "context": args.context, "cuda_graphs": runner.graphs is not None,
               "async_scheduling": llm.engine.overlap, "kv_cache_dtype": llm.engine.config.kv_cache_spec.name,
               "tensor_parallel_size": tp, "host_only": args.host_only}
        row["graph_warning"] = graph_warning(runner, row, args.steps) if row["cuda_graphs"] else None
        add_row(record, out, row, COLUMNS)
        if row["graph_warning"]:
            print(f"{'!' * 78}\n{row['graph_warning']}\n{'!' * 78}", flush=True)
    llm.close()
    del llm, runner
    release_memory(device)


COLUMNS = [
    ("variant", "variant", ""), ("batch", "batch_size", "d"),
    ("step ms", lambda r: 1e3 * r["step_time_s"], ".3f"), ("roofline ms", lambda r: 1e3 * r["roofline_time_s"], ".3f"),
    ("step/roofline", "step_over_roofline", ".2f"),
    ("vs first", lambda r: next((v for k, v in r.items() if k.startswith("step_time_s_vs_")), None), ".3f"),
    ("tok/s", "decode_tokens_per_s", ",.0f"), ("replayed", "graph_fraction", ".0%"),
    ("kernels/step", "kernels_per_step", ".0f"), ("launches/step", "kernel_launches_per_step", ".0f"),
    ("graphs/step", "graph_launches_per_step", ".1f"), ("ops/step", "torch_ops_per_step", ".1f"),
    ("host ms", lambda r: 1e3 * r["host_time_s"], ".3f"), ("wait ms", lambda r: 1e3 * r["wait_time_s"], ".3f"),
    ("sched ms", lambda r: 1e3 * r["schedule_time_s"], ".3f"), ("prep ms", lambda r: 1e3 * r["prepare_time_s"], ".3f"),
    ("upd ms", lambda r: 1e3 * r["update_time_s"], ".3f"),
]
ALL_REDUCE_COLUMNS = [
    ("all-reduce", "method", ""), ("batch", "batch_size", "d"), ("bytes", "bytes", ",d"),
    ("eager us", lambda r: 1e6 * r["eager_s"], ".1f"), ("graphed us", lambda r: 1e6 * r["graphed_s"], ".1f"),
    ("per step ms", lambda r: 1e3 * r["graphed_per_step_s"], ".3f"), ("correct", "correct", ""),
]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(p)
    add_variant_arguments(p)
    p.add_argument("--batch-sizes", type=lambda t: sorted(set(int_list(t, "--batch-sizes"))),
                   help="default 1,8,64,256 on a GPU, 1,4 on the CPU")
    p.add_argument("--context", type=int, help="prompt tokens per sequence (default 1024; CPU 32)")
    p.add_argument("--steps", type=int, default=16, help="timed decode steps per batch size")
    p.add_argument("--profile-batches", type=lambda t: int_list(t, "--profile-batches"), default="1,64",
                   help="batch sizes whose kernels are counted (default 1,64: those measured)")
    p.add_argument("--profile-steps", type=int, default=5, help="decode steps profiled per batch size")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    p.add_argument("--host-only", action="store_true",
                   help="replace the forward pass and LM head by zeros: time the host's own work")
    p.add_argument("--seed", type=int, default=0)
    args = with_device_defaults(p, argv, gpu={"batch_sizes": "1,8,64,256", "context": 1024},
                                cpu={"batch_sizes": "1,4", "context": 32})
    if min(args.context, args.steps, args.profile_steps, args.tensor_parallel_size) < 1:
        p.error("--context, --steps, --profile-steps and --tensor-parallel-size must be >= 1")
    if args.host_only and args.tensor_parallel_size > 1:
        p.error("--host-only replaces the model of this process's runner: it needs -tp 1")
    return args


def main(argv=None) -> dict:
    args, record, out = run_benchmark("roofline", __file__, argv, parse_args, measure)
    ratio_to_first_variant(record["results"], lambda r: r["batch_size"], "step_time_s")
    tables = [format_table([r for r in record["results"] if "error" not in r], COLUMNS)]
    if record.get("all_reduce"):
        tables.append(format_table(record["all_reduce"], ALL_REDUCE_COLUMNS))
    warnings = [r["graph_warning"] for r in record["results"] if r.get("graph_warning")]
    finish(out, record, *tables, *warnings)
    return record


if __name__ == "__main__":
    main()
