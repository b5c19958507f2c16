"""The decode step against its memory roofline, batch sizes 1 ... 256, CUDA graphs on and off.

A decode step must read every weight once (the batch shares them) and the whole KV cache of every
sequence in the batch. Nothing can make it faster than those bytes divided by the memory
bandwidth, so

    roofline time = (weight bytes + KV bytes read) / copy bandwidth

where the copy bandwidth is a device-to-device copy measured in the same run. At batch 1 the
weights dominate and a step costs about the same at batch 8; at large batch with long contexts
the KV cache dominates and the step grows with batch x context.

For each batch size B the script submits B random prompts of --context tokens through the real
engine (so the numbers include the scheduler, the step packing, the sampler and the sync),
lets them prefill, then times --steps engine steps in which all B sequences decode together, and
reports the median step time, the roofline time and their ratio. The modes: `graphs` (CUDA
graphs, overlap on: the default engine), `sync` (graphs, overlap off: each step start to finish)
and `eager` (no graphs). JSON and a PNG go to benchmarks/results/ (or --out).

Where a step's time goes: every row also has the median host time of each phase of the engine
step (schedule, prepare, forward, sample, wait, update; see `observe/records.py`) and
`graph_fraction`, the share of timed steps whose forward was one CUDA-graph replay. On a GPU the
host only launches work: a slow *forward* phase means launch overhead (eager), a long *wait*
means the GPU is the bottleneck, and host phases that add up to more than the step mean the host
is. A graphs-mode step that ran eagerly prints a WARNING with the reason. `--profile B` also runs torch.profiler over a few extra decode
steps at batch B (first mode only) and writes its top ops next to the JSON.

    python benchmarks/roofline.py                             # GPU: qwen3-0.6b, context 1024
    python benchmarks/roofline.py --batch-sizes 1,8,64,256 --context 2048 --modes graphs
    python benchmarks/roofline.py --batch-sizes 1,32,256 --profile 1   # where does the time go?

On CPU it runs the tiny model at small batches; CPU numbers are no GPU claim.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (
    MODEL_CONFIGS,
    default_out,
    environment,
    measure_copy_bandwidth,
    release_memory,
    setup_model,
    write_json,
)
from minivllm.observe.records import STEP_PHASES

PROFILE_STEPS = 5  # decode steps recorded by --profile, after the timed ones


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


def time_decode_steps(llm, batch: int, context: int, steps: int, vocab: int, seed: int,
                      profile_path: Path | None = None) -> dict:
    """Prefill `batch` prompts of `context` tokens, then time `steps` all-decode engine steps.

    profile_path: also record `PROFILE_STEPS` more decode steps with torch.profiler (after the
    timed ones, which it would slow down) and write its tables there; the result gets "profile".
    """
    from minivllm import SamplingParams

    engine = llm.engine
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(10, vocab, size=context).tolist() for _ in range(batch)]
    warm = 2
    # Sequences whose prompt is prefilled early already decode while the others still prefill, so
    # they must not run out of tokens during the timed steps: give them all the room the model
    # length allows and abort them once timed.
    room = engine.config.scheduler_config.max_model_len - context
    params = SamplingParams(temperature=0.0, max_tokens=room, ignore_eos=True)
    request_ids = engine.add_requests(prompts, params)
    history = engine.stats.history
    while True:  # prefill (eager, chunked) until a step decodes the whole batch
        engine.step()
        r = history[-1] if history else None
        if r is not None and r.num_prefill_seqs == 0 and r.num_decode_seqs == batch:
            break
    for _ in range(warm):
        engine.step()
    times, records, seq_lens = [], [], []
    for _ in range(steps):
        seq_lens.append(statistics.mean(s.num_tokens for s in engine.scheduler.running))
        t0 = time.perf_counter()
        engine.step()  # returns after waiting for a step's tokens: in steady state, one step apart
        times.append(time.perf_counter() - t0)
        r = history[-1]
        assert r.num_decode_seqs == batch and r.num_prefill_seqs == 0, "the batch changed while timing"
        records.append(r)
    measured = {"step_time_s": statistics.median(times),
                "mean_context": statistics.mean(seq_lens), **phase_summary(records)}
    if profile_path is not None:
        measured["profile"] = profile_decode_steps(engine, batch, profile_path)
    for rid in request_ids:
        engine.abort(rid)
    return measured


def phase_summary(records) -> dict:
    """Median host seconds per step phase over the timed steps, and how many replayed a graph.

    `host_time_s` is the host's own work on a step (every phase but the wait).
    """
    timings = [r.timings for r in records]
    summary = {f"{phase}_time_s": statistics.median(getattr(t, phase) for t in timings) for phase in STEP_PHASES}
    summary["host_time_s"] = statistics.median(t.host for t in timings)
    summary["graph_fraction"] = sum(t.cuda_graph for t in timings) / len(timings)
    summary["graph_batch_sizes"] = sorted({t.graph_batch_size for t in timings if t.cuda_graph})
    summary["graph_miss_reasons"] = sorted({t.graph_miss for t in timings if t.graph_miss})
    return summary


def graph_warning(runner, row: dict, steps: int) -> str | None:
    """A loud line when graphs were requested but some timed step ran eagerly, with the reason."""
    if row["graph_fraction"] >= 1.0:
        return None
    eager = round((1.0 - row["graph_fraction"]) * steps)
    reason = runner.graphs_off_reason or "; ".join(row["graph_miss_reasons"]) or "unknown"
    return (f"WARNING: CUDA graphs requested, but {eager} of {steps} timed decode steps at "
            f"B={row['batch_size']} ran eagerly: {reason}")


def run_mode(model_dir: Path, args, enforce_eager: bool, copy_bw: float, profile_path: Path | None = None,
             overlap: bool = True):
    """Yield one row per batch size (so the caller can save each as soon as it is measured).

    profile_path: profile the decode steps at batch `args.profile` into that file.
    """
    from minivllm import LLM

    max_batch = max(args.batch_sizes)
    # Room for the decodes that run during chunked prefill, the warm-up, the timed and the
    # profiled steps.
    max_model_len = args.context + args.steps + PROFILE_STEPS + 128
    block_size = 16
    blocks = max_batch * -(-max_model_len // block_size) + 16
    llm = LLM(str(model_dir), max_num_seqs=max_batch, max_model_len=max_model_len,
              max_num_batched_tokens=max(8192, max_batch), num_kv_blocks=blocks, block_size=block_size,
              enable_prefix_caching=False, enforce_eager=enforce_eager, async_scheduling=overlap,
              kv_cache_dtype=args.kv_cache_dtype)
    runner = llm.engine.model_runner
    graphs_requested = not enforce_eager
    if graphs_requested and runner.graphs is None:
        print(f"WARNING: CUDA graphs requested, but the runner captured none: {runner.graphs_off_reason}")
    vocab = runner.vocab_size
    weights = weight_bytes(runner.model)
    kv_per_token = runner.kv_bytes_per_block // block_size
    time_decode_steps(llm, 2, min(args.context, 64), 2, vocab, args.seed)  # warm-up: compile kernels
    for batch in args.batch_sizes:
        profile_here = profile_path if batch == args.profile else None
        m = time_decode_steps(llm, batch, args.context, args.steps, vocab, args.seed + batch, profile_here)
        # KV read: every cached token of every sequence, K and V, all layers (incl. the new one).
        kv_bytes = int(batch * m["mean_context"] * kv_per_token)
        roofline = (weights + kv_bytes) / copy_bw
        row = {
            "bench": "decode_roofline", "cuda_graphs": runner.graphs is not None, "async_scheduling": overlap,
            "kv_cache_dtype": args.kv_cache_dtype,
            "graphs_requested": graphs_requested, "batch_size": batch,
            "context": args.context, **m, "weight_bytes": weights, "kv_read_bytes": kv_bytes,
            "roofline_time_s": roofline, "step_over_roofline": m["step_time_s"] / roofline,
            "decode_tokens_per_s": batch / m["step_time_s"],
        }
        row["graph_warning"] = graph_warning(runner, row, args.steps) if graphs_requested else None
        print(f"  graphs={'on ' if runner.graphs is not None else 'off'} overlap={'on ' if overlap else 'off'} "
              f"B={batch:>4}  step {1e3 * m['step_time_s']:8.3f} ms  roofline {1e3 * roofline:8.3f} ms  "
              f"x{m['step_time_s'] / roofline:6.2f}  replayed {m['graph_fraction']:4.0%}  "
              f"host {1e3 * m['host_time_s']:.3f} ms  wait {1e3 * m['wait_time_s']:.3f} ms", flush=True)
        if row["graph_warning"]:
            print(f"  {'!' * 78}\n  {row['graph_warning']}\n  {'!' * 78}", flush=True)
        yield row
    del llm, runner
    release_memory(torch.device("cuda" if torch.cuda.is_available() else "cpu"))


# ---------------------------------------------------------------------------------------------
# --profile: which ops the host and the GPU spend a decode step on
# ---------------------------------------------------------------------------------------------
def profile_decode_steps(engine, batch: int, path: Path) -> dict:
    """torch.profiler over `PROFILE_STEPS` decode steps; writes the top-30 tables to `path`.

    Answers "eager or graph?" directly: an eager step shows hundreds of kernel launches
    (cudaLaunchKernel / cuLaunchKernel) and aten ops per step, a replayed one a single
    cudaGraphLaunch. A profiler failure is recorded, not raised: the timings must survive it.
    """
    from torch.profiler import ProfilerActivity, profile

    on_cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    try:
        with profile(activities=activities) as prof:
            for _ in range(PROFILE_STEPS):
                engine.step()
        return profile_report(prof.key_averages(), batch, path, on_cuda)
    except Exception as err:  # noqa: BLE001 - see the docstring
        print(f"WARNING: the profiler failed at B={batch}: {type(err).__name__}: {err}")
        return {"batch_size": batch, "steps": PROFILE_STEPS, "error": f"{type(err).__name__}: {err}"}


def _device_time_key(averages) -> str:
    """The profiler's name for self device time: self_device_time_total since torch 2.4."""
    sample = averages[0] if len(averages) else None
    return "self_device_time_total" if hasattr(sample, "self_device_time_total") else "self_cuda_time_total"


def profile_report(averages, batch: int, path: Path, on_cuda: bool) -> dict:
    """Tables into `path`, the top 15 by self CPU printed, and a compact summary for the JSON."""
    sorts = [("self CPU time", "self_cpu_time_total")]
    if on_cuda:
        sorts.append(("self CUDA time", _device_time_key(averages)))
    header = f"torch.profiler over {PROFILE_STEPS} decode steps at batch {batch}"
    text = [f"{header}, top 30 ops by {label}:\n{averages.table(sort_by=key, row_limit=30)}" for label, key in sorts]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(text) + "\n")
    print(f"\n{header}, top 15 ops by self CPU time (the top 30{' and by CUDA time' if on_cuda else ''} "
          f"are in {path}):")
    print(averages.table(sort_by="self_cpu_time_total", row_limit=15))

    def top(key: str) -> list[dict]:
        ranked = sorted(averages, key=lambda e: getattr(e, key), reverse=True)[:30]
        return [{"name": e.key, "calls_per_step": e.count / PROFILE_STEPS,
                 "self_cpu_us_per_step": e.self_cpu_time_total / PROFILE_STEPS,
                 **({"self_cuda_us_per_step": getattr(e, key) / PROFILE_STEPS} if key != "self_cpu_time_total" else {})}
                for e in ranked]

    # Host-side launch calls per step: ~1 cudaGraphLaunch when a graph replays, hundreds of
    # kernel launches when the forward runs eagerly.
    launches = {e.key: e.count / PROFILE_STEPS for e in averages if "Launch" in e.key}
    report = {"batch_size": batch, "steps": PROFILE_STEPS, "file": str(path),
              "launch_calls_per_step": launches, "top_self_cpu": top("self_cpu_time_total")}
    if on_cuda:
        report["top_self_cuda"] = top(_device_time_key(averages))
    return report


def plot(rows: list[dict], path: Path, title: str) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    modes = (((True, True), "o-", "CUDA graphs + overlap"), ((True, False), "^-.", "CUDA graphs, no overlap"),
             ((False, True), "s--", "eager"), ((False, False), "s--", "eager, no overlap"))
    for key, style, label in modes:
        sel = [r for r in rows if (r["cuda_graphs"], r.get("async_scheduling", True)) == key]
        if sel:
            ax.plot([r["batch_size"] for r in sel], [1e3 * r["step_time_s"] for r in sel], style, label=f"step, {label}")
            ax2.plot([r["batch_size"] for r in sel], [r["step_over_roofline"] for r in sel], style, label=label)
    ref = {r["batch_size"]: r["roofline_time_s"] for r in rows}
    xs = sorted(ref)
    ax.plot(xs, [1e3 * ref[x] for x in xs], "k:", label="roofline (bytes / copy BW)")
    for a in (ax, ax2):
        a.set_xscale("log", base=2)
        a.set_xlabel("decode batch size")
        a.grid(True, which="both", alpha=0.3)
        a.legend()
    ax.set_yscale("log")
    ax.set_ylabel("ms per decode step")
    ax2.set_ylabel("step time / roofline time")
    ax2.axhline(1.0, color="k", linestyle=":")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-config", choices=sorted(MODEL_CONFIGS), default=None)
    p.add_argument("--batch-sizes", default=None, help="comma-separated (default 1,2,4,...,256 on GPU)")
    p.add_argument("--context", type=int, default=None, help="prompt tokens per sequence (default 1024 on GPU)")
    p.add_argument("--steps", type=int, default=16, help="timed decode steps per batch size")
    p.add_argument("--modes", default="graphs,sync,eager",
                   help="graphs (overlap on), sync (graphs, overlap off), eager; comma-separated")
    p.add_argument("--kv-cache-dtype", choices=("auto", "fp8"), default="auto",
                   help="K/V in the model dtype, or e4m3 (the roofline then counts the fp8 bytes and scales)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-dir", type=Path, default=None)
    p.add_argument("--out", type=Path, default=None, help="JSON path (the PNG goes next to it)")
    p.add_argument("--profile", type=int, default=None, metavar="BATCH",
                   help=f"torch.profiler over {PROFILE_STEPS} decode steps at this batch size (first mode); "
                        "tables go to <json stem>_profile_b<BATCH>.txt")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    args.model_config = args.model_config or ("qwen3-0.6b" if gpu else "tiny")
    args.batch_sizes = sorted({int(b) for b in (args.batch_sizes or ("1,2,4,8,16,32,64,128,256" if gpu else "1,2,4")).split(",")})
    args.context = args.context or (1024 if gpu else 32)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in ("graphs", "sync", "eager") for m in modes):
        p.error(f"--modes: choose from graphs, sync, eager; got {args.modes!r}")
    if min(args.batch_sizes) < 1 or args.context < 1 or args.steps < 1:
        p.error("batch sizes, --context and --steps must be >= 1")
    if args.profile is not None and args.profile not in args.batch_sizes:
        p.error(f"--profile {args.profile} is not one of the batch sizes {args.batch_sizes}")
    model_dir, dtype, note = setup_model(args.model_config, args.model_dir, device, args.seed, "minivllm-roof-")
    copy_bw = measure_copy_bandwidth(device)
    print(f"copy bandwidth (read + write): {copy_bw / 1e9:.1f} GB/s")
    out = args.out or default_out("roofline", args.model_config, device)
    out.parent.mkdir(parents=True, exist_ok=True)
    title = f"decode step vs roofline: {args.model_config}, context {args.context}, {environment(device)['device']}"
    payload = {"bench": "decode_roofline", "model_config": args.model_config, "dtype": str(dtype).removeprefix("torch."),
               "context": args.context, "copy_bandwidth_bytes_per_s": copy_bw, "rows": [], "plot": None,
               **environment(device), "note": note, "profile": None}
    for i, mode in enumerate(modes):
        eager = (mode == "eager") or not gpu
        profile_path = out.with_name(f"{out.stem}_profile_b{args.profile}.txt") if i == 0 and args.profile else None
        for row in run_mode(model_dir, args, enforce_eager=eager, copy_bw=copy_bw, profile_path=profile_path,
                            overlap=mode != "sync"):
            if "profile" in row:
                payload["profile"] = {"mode": "eager" if eager else "graphs", **row.pop("profile")}
            payload["rows"].append(row)
            write_json(out, payload)  # after each row: a later failure loses nothing measured
        png = plot(payload["rows"], out.with_suffix(".png"), title)
        payload["plot"] = str(png) if png else None
        write_json(out, payload)
        if not gpu:
            break  # no graphs on CPU: one eager pass says it all
    print(f"\nwrote {out}" + (f" and {payload['plot']}" if payload["plot"] else ""))
    print(format_table(payload["rows"]))
    if note:
        print(note)
    return payload


def format_table(rows: list[dict]) -> str:
    """One line per row: step vs roofline, the share of graph replays, median host ms per phase."""
    phases = [*STEP_PHASES, "host"]
    lines = [f"{'graphs':>6} {'overlap':>7} {'batch':>6} {'step ms':>9} {'roofline ms':>12} {'ratio':>7} {'tok/s':>10} "
             f"{'replay':>7} " + " ".join(f"{p:>9}" for p in phases) + "   (host ms per phase, median)"]
    for r in rows:
        lines.append(
            f"{'on' if r['cuda_graphs'] else 'off':>6} {'on' if r.get('async_scheduling', True) else 'off':>7} "
            f"{r['batch_size']:>6} {1e3 * r['step_time_s']:>9.3f} "
            f"{1e3 * r['roofline_time_s']:>12.3f} {r['step_over_roofline']:>7.2f} {r['decode_tokens_per_s']:>10.0f} "
            f"{r['graph_fraction']:>7.0%} " + " ".join(f"{1e3 * r[f'{p}_time_s']:>9.3f}" for p in phases))
    lines += [r["graph_warning"] for r in rows if r.get("graph_warning")]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
