"""The skinny-GEMM kernel vs cuBLAS (F.linear) on a decode step's projections, as a share of
memory bandwidth, and where cuBLAS starts to win.

For each model's layer shapes (q|k|v, o_proj, gate|up, down_proj; per rank, one rank) and each
number of rows M (tokens in the step) it

1. checks both against an fp32 F.linear of the same inputs (gate|up: silu(gate) * up of it);
2. times cuBLAS: `F.linear` (gate|up: + `fused_ops.silu_and_mul`, the separate kernel the model
   runs today), and the skinny kernel (`skinny_linear`; gate|up: `skinny_gate_up_silu`, one
   kernel with the activation fused in);
3. reports the bytes the op must move (weight + x + output) over its time, in GB/s and as a
   fraction of a device-to-device copy bandwidth measured in the same run.

How it times, on the GPU: each op is captured in a CUDA graph, and every timed replay comes right
after a 256 MB write that evicts the L2 cache. Graphs, because the engine runs decode steps as
graph replays: what counts is GPU time, kernel gaps included (the split-K reduce, the separate
SiLU-and-mul), not the Python launch overhead, which would otherwise leak into a few-microsecond
measurement. The flush, because in a real step a weight matrix comes from HBM: the whole model's
weights pass through the L2 between two uses of one matrix, and a matrix timed in a loop would
sit in the L2 instead (o_proj of Qwen3-0.6B is 4 MB; the H100's L2 is 50 MB). Median of 100 replays.

It prints, last: per shape the time of both, the skinny kernel's share of copy bandwidth, and
the crossover M (the first M of the sweep at which F.linear is faster); per model the layer's
total and the largest M up to which the skinny kernel wins on every M of the sweep: what
`SKINNY_MAX_M` in minivllm/layers/skinny_gemm.py should be. `--tune` also times a grid of launch
configurations per shape and prints the best beside the one `choose_config` picks.

On a machine without CUDA it runs the tiny model's shapes in the Triton interpreter, in float32:
a check that everything runs, whose times say nothing about the GPU.

    python benchmarks/skinny_gemm_bench.py                    # qwen3-0.6b, llama-3.1-8b; M 1..32
    python benchmarks/skinny_gemm_bench.py --quick            # qwen3-0.6b; M = 1, 4, 8
    python benchmarks/skinny_gemm_bench.py --tune --m 1,8     # + launch configurations
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
FLUSH_BYTES = 256 << 20
# --tune: the grid of launch configurations tried per shape (num_warps 4).
TUNE_GRID = dict(BLOCK_N=(16, 32, 64), BLOCK_K=(64, 128, 256), SPLIT_K=(1, 2, 4), num_stages=(3, 4))


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
    """Median time of a function in microseconds (see the module docstring for how)."""

    def __init__(self, device: torch.device, repeats: int):
        self.device, self.repeats = device, repeats
        self.flush = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device=device) if device.type == "cuda" else None

    def __call__(self, fn) -> float:
        fn()  # compile, and let cuBLAS pick its kernel, outside the graph
        if self.device.type != "cuda":
            times = []
            for _ in range(self.repeats):
                start = time.perf_counter()
                fn()
                times.append((time.perf_counter() - start) * 1e6)
            return statistics.median(times)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up on a side stream, as capture wants
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(self.repeats)]
        for start, end in events:
            self.flush.zero_()
            start.record()
            graph.replay()
            end.record()
        torch.cuda.synchronize()
        return statistics.median(start.elapsed_time(end) * 1e3 for start, end in events)


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


def run_op(op: Op, m: int, dtype: torch.dtype, timer: Timer, copy_gbps: float,
           tune: bool) -> list[dict]:
    """Check, then time, cuBLAS and the skinny kernel (and with `tune`, its configurations)."""
    device = timer.device
    x, w = make_inputs(op, m, dtype, device)
    ref = reference(op, x, w)
    nbytes = bytes_moved(op, m, x.element_size())
    skinny_op = skinny_gemm.skinny_gate_up_silu if op.gated else skinny_gemm.skinny_linear

    def torch_fn():  # what the model runs without the skinny kernel
        y = F.linear(x, w)
        return silu_and_mul(y) if op.gated else y

    def skinny_fn(cfg=None):
        return skinny_op(x, w, config=cfg)

    n_out = op.n // 2 if op.gated else op.n
    chosen = skinny_gemm.choose_config(n_out, op.k, dtype, skinny_gemm._num_sms(device), op.gated)
    base = dict(model=op.model, op=op.name, n=op.n, k=op.k, m=m, dtype=str(dtype).removeprefix("torch."),
                bytes=nbytes)
    records = []
    for impl, fn, cfg in [("torch", torch_fn, None), ("skinny", skinny_fn, chosen)]:
        err = rel_error(fn(), ref)
        us = timer(fn)
        gbps = nbytes / (us * 1e-6) / 1e9
        records.append(dict(base, impl=impl, us=us, gbps=gbps, frac_copy_bw=gbps / copy_gbps,
                            rel_error=err, correct=err < REL_TOL[dtype],
                            config=asdict(cfg) if cfg else None))
    if tune:
        records += tune_op(op, base, skinny_fn, ref, timer, copy_gbps, dtype)
    return records


def tune_op(op, base, skinny_fn, ref, timer, copy_gbps, dtype) -> list[dict]:
    """Every configuration of TUNE_GRID that makes sense for the shape, checked and timed."""
    records = []
    for values in itertools.product(*TUNE_GRID.values()):
        cfg = skinny_gemm.SkinnyConfig(**dict(zip(TUNE_GRID, values)))
        if cfg.SPLIT_K > 1 and cfg.SPLIT_K * cfg.BLOCK_K > op.k:
            continue
        try:
            err = rel_error(skinny_fn(cfg), ref)
            us = timer(lambda cfg=cfg: skinny_fn(cfg))
        except Exception as exc:  # e.g. out of shared memory: skip that point
            print(f"  skip {cfg}: {type(exc).__name__}: {exc}".splitlines()[0])
            continue
        gbps = base["bytes"] / (us * 1e-6) / 1e9
        records.append(dict(base, impl="skinny_tune", us=us, gbps=gbps, frac_copy_bw=gbps / copy_gbps,
                            rel_error=err, correct=err < REL_TOL[dtype], config=asdict(cfg)))
    return records


# ------------------------------------------------------------------------------------------
# Summary
# ------------------------------------------------------------------------------------------
def summarize(records: list[dict]) -> dict:
    """Per shape the crossover M; per model the layer total per M and the suggested SKINNY_MAX_M."""
    times = {(r["model"], r["op"], r["m"], r["impl"]): r["us"] for r in records}
    models = list(dict.fromkeys(r["model"] for r in records))
    ms = sorted({r["m"] for r in records})
    summary = {}
    for model in models:
        ops = list(dict.fromkeys(r["op"] for r in records if r["model"] == model))
        crossover = {op: next((m for m in ms if times[model, op, m, "torch"] < times[model, op, m, "skinny"]),
                              None) for op in ops}
        layer = {m: {impl: sum(times[model, op, m, impl] for op in ops) for impl in ("torch", "skinny")}
                 for m in ms}
        wins = [m for m in ms if layer[m]["skinny"] < layer[m]["torch"]]
        suggested = 0
        for m in ms:  # the largest M such that the skinny kernel wins at it and every smaller M
            if m not in wins:
                break
            suggested = m
        summary[model] = dict(crossover_m=crossover, layer_us=layer, suggested_max_m=suggested)
    return summary


def print_table(records: list[dict], summary: dict) -> None:
    rows = {(r["model"], r["op"], r["m"]): {} for r in records}
    for r in records:
        if r["impl"] in ("torch", "skinny"):
            rows[r["model"], r["op"], r["m"]][r["impl"]] = r
    best = {}
    for r in records:
        if r["impl"] == "skinny_tune" and r["correct"]:
            key = (r["model"], r["op"], r["m"])
            if key not in best or r["us"] < best[key]["us"]:
                best[key] = r
    print(f"\n{'model':<14}{'op':<9}{'M':>4}{'torch us':>10}{'skinny us':>11}{'speed-up':>10}"
          f"{'skinny/copy bw':>16}{'torch/copy bw':>15}  skinny config" + ("  | best tuned" if best else ""))
    for (model, op, m), pair in rows.items():
        t, s = pair["torch"], pair["skinny"]
        c = s["config"]
        line = (f"{model:<14}{op:<9}{m:>4}{t['us']:>10.2f}{s['us']:>11.2f}{t['us'] / s['us']:>9.2f}x"
                f"{s['frac_copy_bw']:>16.2f}{t['frac_copy_bw']:>15.2f}  "
                f"N{c['BLOCK_N']} K{c['BLOCK_K']} split{c['SPLIT_K']} st{c['num_stages']}")
        if (model, op, m) in best:
            b = best[model, op, m]
            bc = b["config"]
            line += (f"  | {b['us']:.2f} us N{bc['BLOCK_N']} K{bc['BLOCK_K']} split{bc['SPLIT_K']} "
                     f"st{bc['num_stages']}")
        print(line)
    for model, s in summary.items():
        cross = ", ".join(f"{op} {m if m is not None else 'none in sweep'}" for op, m in s["crossover_m"].items())
        print(f"\n{model}: first M where F.linear is faster: {cross}")
        layer = "  ".join(f"M={m}: {v['torch']:.1f}/{v['skinny']:.1f}" for m, v in s["layer_us"].items())
        print(f"{model}: one layer's four GEMMs, torch/skinny us: {layer}")
        print(f"{model}: suggested SKINNY_MAX_M = {s['suggested_max_m']} "
              f"(largest M of the sweep up to which the skinny kernel wins at every M)")


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
    p.add_argument("--repeats", type=int, default=None, help="timed replays (default 100; CPU 3)")
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
    args.repeats = args.repeats or (100 if on_gpu else 3)
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
                timing="CUDA-graph replay after an L2 flush, median" if device.type == "cuda"
                else "CPU wall time, Triton interpreter: no GPU claim")
    records: list[dict] = []
    for model in args.models:
        for op in layer_ops(model):
            for m in args.ms:
                print(f"{model} {op.name} N={op.n} K={op.k} M={m}", flush=True)
                records += run_op(op, m, args.dtype, timer, copy_gbps, args.tune)
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
