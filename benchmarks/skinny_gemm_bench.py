"""The skinny-GEMM kernel vs cuBLAS (F.linear) on a decode step's projections, as a share of
memory bandwidth, and where cuBLAS starts to win.

For each model's layer shapes (q|k|v, o_proj, gate|up, down_proj; one rank) and each number
of rows M (tokens in the step) it

1. checks both against an fp32 F.linear of the same inputs (gate|up: silu(gate) * up of it);
2. times cuBLAS: `F.linear` (gate|up: + `fused_ops.silu_and_mul`, the separate kernel the model
   runs today), and the skinny kernel (`skinny_linear`; gate|up: `skinny_gate_up_silu`, one
   kernel with the activation fused in); then the whole layer, the four in sequence;
3. reports the bytes the op must move (weight + x + output) over its time, in GB/s and as a
   fraction of a device-to-device copy bandwidth measured in the same run.

How it times, on the GPU. A decode step is one CUDA graph in which the GEMMs of every layer
follow each other, each reading its own weights from HBM: the whole model's weights pass through
the L2 between two uses of one matrix. The benchmark rebuilds that: it makes enough copies of the
weight (4x the L2 in all, 2 at least) that none is still cached when its turn comes again,
captures one call per copy in a CUDA graph and times replays of it with CUDA events; time per
call = graph time / copies, median of the replays. So it counts GPU time only (the Python
launch overhead would dominate a few-microsecond op timed call by call), the gaps between
dependent kernels as in the step (the split-K reduce, the separate SiLU-and-mul), and weights
that come from HBM. It does not evict the L2 by writing a large buffer before each call: that
leaves the L2 full of dirty lines whose write-back the timed kernel pays for. (An earlier
version did, and its H100 run, benchmarks/results/skinny_gemm_h100_printed.txt, shows what looks
like that cost: Qwen3-0.6B's four GEMMs, 31 MB of weights, at 45 us where the same run read
Llama-3.1-8B's 235 MB gate|up at 2.4 TB/s, some 8 us per op more than their bytes explain.)
The layer is timed the same way, copies of its four weights in rotation.

It prints, last: per shape the time of both, the skinny kernel's share of copy bandwidth, and
the crossover M (the first M of the sweep at which F.linear is faster); per model the layer's
time and the largest M up to which the skinny kernel wins the layer at every M of the sweep:
what `SKINNY_MAX_M` in minivllm/layers/skinny_gemm.py should be. `--tune` also times a grid of
launch configurations per shape and prints the best beside the one `choose_config` picks.

On a machine without CUDA it runs the tiny model's shapes in the Triton interpreter, in float32:
a check that everything runs, whose times say nothing about the GPU.

    python benchmarks/skinny_gemm_bench.py                    # qwen3-0.6b, llama-3.1-8b; M 1..32
    python benchmarks/skinny_gemm_bench.py --quick            # qwen3-0.6b; M = 1, 4, 8
    python benchmarks/skinny_gemm_bench.py --tune --models qwen3-0.6b --m 1,8   # + configurations
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `minivllm` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
if not torch.cuda.is_available():  # before Triton is imported: its kernels run interpreted
    os.environ.setdefault("TRITON_INTERPRET", "1")

from benchmarks.common import (
    MODEL_CONFIGS,
    cpu_disclaimer,
    default_out,
    environment,
    measure_copy_bandwidth,
    write_json,
)
from minivllm.layers import skinny_gemm
from minivllm.layers.fused_ops import silu_and_mul
from minivllm.models.random_model import random_model_config

M_SWEEP = (1, 2, 4, 8, 16, 32)
REL_TOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-5}
MAX_COPIES = 64  # weight copies in rotation (a small matrix needs many to exceed the L2)
# --tune: the grid of launch configurations tried per shape: tile shapes, and more programs
# (split-K) or more loads in flight per program (stages) for the small-N shapes.
TUNE_GRID = dict(BLOCK_N=(16, 32, 64), BLOCK_K=(128, 256), SPLIT_K=(1, 2, 4, 8), num_stages=(3, 4, 6))


@dataclass(frozen=True)
class Op:
    model: str
    name: str  # qkv, o, gate_up, down
    n: int  # output features (gate_up: 2 * intermediate, the merged weight's rows)
    k: int  # input features

    @property
    def gated(self) -> bool:
        return self.name == "gate_up"


def layer_ops(model: str) -> list[Op]:
    """The four GEMMs of one decoder layer of `model`, from the config make_random_model writes."""
    arch, size = MODEL_CONFIGS[model]
    c = random_model_config(arch, size)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    q, kv = c.num_attention_heads * head_dim, c.num_key_value_heads * head_dim
    return [Op(model, "qkv", q + 2 * kv, c.hidden_size), Op(model, "o", c.hidden_size, q),
            Op(model, "gate_up", 2 * c.intermediate_size, c.hidden_size),
            Op(model, "down", c.hidden_size, c.intermediate_size)]


def bytes_moved(op: Op, m: int, itemsize: int) -> int:
    """What the op must read and write at least: W once, x, and the output (gate_up: the
    activation's output, [M, intermediate]), whichever way it is computed."""
    out_cols = op.n // 2 if op.gated else op.n
    return (op.n * op.k + m * op.k + m * out_cols) * itemsize


# ------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------
class Timer:
    """Median time per call of a list of calls, in microseconds (see the module docstring)."""

    def __init__(self, device: torch.device, repeats: int):
        self.device, self.repeats = device, repeats
        l2 = 50 << 20
        if device.type == "cuda":
            l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", l2) or l2
        self.rotate_bytes = 4 * l2

    def copies(self, nbytes: int) -> int:
        """How many copies of `nbytes` of weights make the rotation evict each from the L2."""
        if self.device.type != "cuda":
            return 1
        return max(2, min(MAX_COPIES, -(-self.rotate_bytes // nbytes)))

    def __call__(self, calls: list, per: int) -> float:
        """Run `calls` in order, as one CUDA graph on the GPU; return the time / `per`."""
        for call in calls:  # compile, and let cuBLAS pick its kernels, outside the graph
            call()
        if self.device.type != "cuda":
            times = []
            for _ in range(self.repeats):
                start = time.perf_counter()
                for call in calls:
                    call()
                times.append((time.perf_counter() - start) * 1e6 / per)
            return statistics.median(times)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up on a side stream, as capture wants
            calls[0]()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for call in calls:
                call()
        graph.replay()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(self.repeats)]
        for start, end in events:
            start.record()
            graph.replay()
            end.record()
        torch.cuda.synchronize()
        return statistics.median(start.elapsed_time(end) * 1e3 / per for start, end in events)


# ------------------------------------------------------------------------------------------
# One shape
# ------------------------------------------------------------------------------------------
def make_inputs(op: Op, m: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(m, op.k, generator=g).to(dtype).to(device)
    # Weights of a trained layer's scale (std 1/sqrt(K)), so outputs stay O(1).
    w = (torch.randn(op.n, op.k, generator=g) / op.k**0.5).to(dtype).to(device)
    return x, w


def reference(op: Op, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    y = F.linear(x.float(), w.float())
    if op.gated:
        gate, up = y.chunk(2, dim=-1)
        y = F.silu(gate) * up
    return y


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm())


def torch_op(op: Op, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """What the model runs without the skinny kernel."""
    y = F.linear(x, w)
    return silu_and_mul(y) if op.gated else y


def skinny_op(op: Op, x: torch.Tensor, w: torch.Tensor, cfg=None) -> torch.Tensor:
    fn = skinny_gemm.skinny_gate_up_silu if op.gated else skinny_gemm.skinny_linear
    return fn(x, w, config=cfg)


def record(base: dict, impl: str, us: float, copy_gbps: float, **extra) -> dict:
    gbps = base["bytes"] / (us * 1e-6) / 1e9
    return dict(base, impl=impl, us=us, gbps=gbps, frac_copy_bw=gbps / copy_gbps, **extra)


def run_op(op: Op, m: int, dtype: torch.dtype, timer: Timer, copy_gbps: float,
           tune: bool) -> list[dict]:
    """Check, then time, cuBLAS and the skinny kernel (and with `tune`, its configurations)."""
    device = timer.device
    x, w = make_inputs(op, m, dtype, device)
    ref = reference(op, x, w)
    nbytes = bytes_moved(op, m, x.element_size())
    weights = [w] + [w.clone() for _ in range(timer.copies(w.numel() * w.element_size()) - 1)]
    n_out = op.n // 2 if op.gated else op.n
    chosen = skinny_gemm.choose_config(n_out, op.k, dtype, skinny_gemm._num_sms(device), op.gated)
    base = dict(model=op.model, op=op.name, n=op.n, k=op.k, m=m, dtype=str(dtype).removeprefix("torch."),
                bytes=nbytes, copies=len(weights))
    records = []
    for impl, fn, cfg in [("torch", torch_op, None), ("skinny", skinny_op, chosen)]:
        err = rel_error(fn(op, x, w), ref)
        us = timer([lambda w=w, fn=fn: fn(op, x, w) for w in weights], per=len(weights))
        records.append(record(base, impl, us, copy_gbps, rel_error=err, correct=err < REL_TOL[dtype],
                              config=asdict(cfg) if cfg else None))
    if tune:
        records += tune_op(op, x, weights, base, ref, timer, copy_gbps, dtype)
    return records


def tune_op(op, x, weights, base, ref, timer, copy_gbps, dtype) -> list[dict]:
    """Every configuration of TUNE_GRID that makes sense for the shape, checked and timed."""
    records = []
    for values in itertools.product(*TUNE_GRID.values()):
        cfg = skinny_gemm.SkinnyConfig(**dict(zip(TUNE_GRID, values)))
        if cfg.SPLIT_K > 1 and 2 * cfg.SPLIT_K * cfg.BLOCK_K > op.k:  # < 2 steps per slice
            continue
        try:
            err = rel_error(skinny_op(op, x, weights[0], cfg), ref)
            us = timer([lambda w=w, cfg=cfg: skinny_op(op, x, w, cfg) for w in weights], per=len(weights))
        except Exception as exc:  # e.g. out of shared memory: skip that point
            print(f"  skip {cfg}: {type(exc).__name__}: {exc}".splitlines()[0])
            continue
        records.append(record(base, "skinny_tune", us, copy_gbps, rel_error=err,
                              correct=err < REL_TOL[dtype], config=asdict(cfg)))
    return records


def run_layer(model: str, m: int, dtype: torch.dtype, timer: Timer, copy_gbps: float) -> list[dict]:
    """The layer's four GEMMs in sequence (as the step runs them), copies of the layer in rotation."""
    ops = layer_ops(model)
    inputs = [make_inputs(op, m, dtype, timer.device, seed=i) for i, op in enumerate(ops)]
    weight_bytes = sum(w.numel() * w.element_size() for _, w in inputs)
    copies = timer.copies(weight_bytes)
    layers = [[(op, x, w if c == 0 else w.clone()) for op, (x, w) in zip(ops, inputs)] for c in range(copies)]
    base = dict(model=model, op="layer", n=None, k=None, m=m, dtype=str(dtype).removeprefix("torch."),
                bytes=sum(bytes_moved(op, m, inputs[0][0].element_size()) for op in ops), copies=copies)
    records = []
    for impl, fn in [("torch", torch_op), ("skinny", skinny_op)]:
        calls = [lambda op=op, x=x, w=w, fn=fn: fn(op, x, w) for layer in layers for op, x, w in layer]
        records.append(record(base, impl, timer(calls, per=copies), copy_gbps, rel_error=None,
                              correct=True, config=None))
    return records


# ------------------------------------------------------------------------------------------
# Summary
# ------------------------------------------------------------------------------------------
def summarize(records: list[dict]) -> dict:
    """Per shape the crossover M; per model the layer's time per M and the suggested SKINNY_MAX_M."""
    times = {(r["model"], r["op"], r["m"], r["impl"]): r["us"] for r in records}
    models = list(dict.fromkeys(r["model"] for r in records))
    ms = sorted({r["m"] for r in records})
    summary = {}
    for model in models:
        ops = [op for op in dict.fromkeys(r["op"] for r in records if r["model"] == model) if op != "layer"]
        crossover = {op: next((m for m in ms if times[model, op, m, "torch"] < times[model, op, m, "skinny"]),
                              None) for op in ops}
        layer = {m: {impl: times[model, "layer", m, impl] for impl in ("torch", "skinny")} for m in ms}
        suggested = 0
        for m in ms:  # the largest M such that the skinny kernel wins the layer at it and every smaller M
            if layer[m]["skinny"] >= layer[m]["torch"]:
                break
            suggested = m
        summary[model] = dict(crossover_m=crossover, layer_us=layer, suggested_max_m=suggested)
    return summary


def _config(c: dict) -> str:
    return f"N{c['BLOCK_N']} K{c['BLOCK_K']} split{c['SPLIT_K']} st{c['num_stages']}"


def print_table(records: list[dict], summary: dict) -> None:
    rows: dict[tuple, dict] = {}
    best: dict[tuple, dict] = {}
    for r in records:
        key = (r["model"], r["op"], r["m"])
        if r["impl"] in ("torch", "skinny"):
            rows.setdefault(key, {})[r["impl"]] = r
        elif r["correct"] and (key not in best or r["us"] < best[key]["us"]):
            best[key] = r
    print(f"\n{'model':<14}{'op':<9}{'M':>4}{'torch us':>10}{'skinny us':>11}{'speed-up':>10}"
          f"{'skinny/copy bw':>16}{'torch/copy bw':>15}  skinny config" + ("  | best tuned" if best else ""))
    for (model, op, m), pair in rows.items():
        t, s = pair["torch"], pair["skinny"]
        line = (f"{model:<14}{op:<9}{m:>4}{t['us']:>10.2f}{s['us']:>11.2f}{t['us'] / s['us']:>9.2f}x"
                f"{s['frac_copy_bw']:>16.2f}{t['frac_copy_bw']:>15.2f}  "
                + (_config(s["config"]) if s["config"] else "(four ops in sequence)"))
        if (model, op, m) in best:
            b = best[model, op, m]
            line += f"  | {b['us']:.2f} us {_config(b['config'])}"
        print(line)
    for model, s in summary.items():
        cross = ", ".join(f"{op} {m if m is not None else 'none in sweep'}" for op, m in s["crossover_m"].items())
        print(f"\n{model}: first M where F.linear is faster: {cross}")
        layer = "  ".join(f"M={m}: {v['torch']:.1f}/{v['skinny']:.1f}" for m, v in s["layer_us"].items())
        print(f"{model}: one layer's four GEMMs in sequence, torch/skinny us: {layer}")
        best_m = s["suggested_max_m"]
        why = ("largest M of the sweep up to which the skinny kernel wins the layer at every M" if best_m
               else "it loses already at the smallest M: 0 turns it off")
        print(f"{model}: suggested SKINNY_MAX_M = {best_m} ({why})")


# ------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=None,
                   help=f"comma list of {', '.join(MODEL_CONFIGS)} (default: qwen3-0.6b,llama-3.1-8b "
                        "on a GPU, tiny on the CPU)")
    p.add_argument("--m", default=None, help="comma list of row counts (default: 1,2,4,8,16,32)")
    p.add_argument("--dtype", default=None, choices=("bf16", "fp16", "fp32"),
                   help="default bf16 on a GPU, fp32 on the CPU (the interpreter's bf16 dot is wrong)")
    p.add_argument("--quick", action="store_true", help="one model (the first), M = 1, 4, 8")
    p.add_argument("--tune", action="store_true", help="also time a grid of launch configurations")
    p.add_argument("--repeats", type=int, default=None, help="timed replays (default 30; CPU 3)")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON path, or a directory for the default name (benchmarks/results/...)")
    args = p.parse_args(argv)
    on_gpu = torch.cuda.is_available()
    models = (args.models or ("qwen3-0.6b,llama-3.1-8b" if on_gpu else "tiny")).split(",")
    unknown = [m for m in models if m not in MODEL_CONFIGS]
    if unknown:
        p.error(f"--models: unknown {unknown}; choose from {sorted(MODEL_CONFIGS)}")
    if args.quick:
        models = models[:1]
    try:
        ms = [int(v) for v in args.m.split(",")] if args.m else (
            [1, 4, 8] if args.quick else list(M_SWEEP))
    except ValueError:
        p.error(f"--m must be a comma list of integers, got {args.m!r}")
    if any(m < 1 for m in ms):
        p.error(f"--m values must be >= 1, got {ms}")
    args.models, args.ms = models, sorted(set(ms))
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    args.dtype = dtypes[args.dtype or ("bf16" if on_gpu else "fp32")]
    args.repeats = args.repeats or (30 if on_gpu else 3)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    note = cpu_disclaimer(device)
    if note:
        print(note)
    copy_gbps = measure_copy_bandwidth(device) / 1e9
    print(f"device: {environment(device)['device']}; copy bandwidth {copy_gbps:.0f} GB/s (read + write)")
    tag = "+".join(args.models)
    out = default_out("skinny_gemm", tag, device)
    if args.out is not None:
        out = args.out if args.out.suffix == ".json" else args.out / out.name
    timer = Timer(device, args.repeats)
    meta = dict(environment(device), copy_gbps=copy_gbps, dtype=str(args.dtype), ms=args.ms,
                models=args.models, skinny_max_m=skinny_gemm.SKINNY_MAX_M, rel_tol=REL_TOL[args.dtype],
                timing="CUDA-graph replays of one call per weight copy (4x L2), median" if device.type == "cuda"
                else "CPU wall time, Triton interpreter: no GPU claim")
    records: list[dict] = []
    for model in args.models:
        for op in layer_ops(model):
            for m in args.ms:
                print(f"{model} {op.name} N={op.n} K={op.k} M={m}", flush=True)
                records += run_op(op, m, args.dtype, timer, copy_gbps, args.tune)
                write_json(out, dict(meta=dict(meta, complete=False), records=records))
        for m in args.ms:
            print(f"{model} layer M={m}", flush=True)
            records += run_layer(model, m, args.dtype, timer, copy_gbps)
            write_json(out, dict(meta=dict(meta, complete=False), records=records))
    summary = summarize(records)
    write_json(out, dict(meta=dict(meta, complete=True), records=records, summary=summary))
    print(f"\nwrote {out}")
    print_table(records, summary)
    wrong = [r for r in records if not r["correct"]]
    for r in wrong:
        print(f"WRONG: {r['model']} {r['op']} M={r['m']} {r['impl']} {r['config']}: "
              f"rel error {r['rel_error']:.2e} > {REL_TOL[args.dtype]:.0e}")
    if note:
        print(f"\n({note})")
    return 1 if wrong else 0


if __name__ == "__main__":
    raise SystemExit(main())
