"""Sweep the Triton paged-attention launch configuration on the GPU.

The defaults in `minivllm/kernels/triton_attention.py` (`_launch_config`, `choose_num_splits`, the prefill
path) come from this sweep, so a change of defaults is a measured decision. Four sections:

* `decode`: every (BLOCK_M, BLOCK_N, num_warps, num_stages) of a small grid, then the split count
  for the best one, on the decode cases of attn_bench.
* `prefill`: the two inner loops of prefill, chunked prefill and mixed batches side by side on the
  same inputs: "tokens" (one block-table read per key) and "pages" (one per page, softmax scale
  folded into exp2), each over tile shapes and pipeline depths, with the two changes of the page
  path also timed alone. Cases: causal prefill 4 x 2048, chunked prefill of 512 new tokens over
  8k context (4 sequences), and attn_bench's mixed step (62 decodes at 2k + 2 chunks of 512 over
  8k). Each point: median of CUDA-graph replays, output checked against the reference, TFLOP/s
  against a bf16 matmul rate and (prefill) the time of dense SDPA, both measured in the same run,
  and what the compiled kernel holds (registers, spills, shared memory, so programs per SM). A
  configuration that fails to compile or to launch (e.g. too much shared memory) is recorded with
  the reason and the sweep goes on. Writes tune_attn_prefill_<tag>.json and a .png of TFLOP/s per
  configuration, and prints a table last.
* `cuda`: the split count of the C++ extension's decode kernel (`decode_num_splits` in
  minivllm/kernels/cuda.py) beside the Triton default, and write_kv_cache of both.
* `static` (no GPU needed): the quick sweep's prefill variants compiled for sm_90 by the
  installed Triton, and what each compiles to: 16-byte cp.async copies, wgmma, narrow loads,
  registers, shared memory, programs per SM, machine instructions per tile loop. A change to
  the inner loop can be judged this way before GPU time is spent timing it.

    python benchmarks/tune_attn.py --only prefill --quick --out $OUT   # sized for ~3 GPU minutes
    python benchmarks/tune_attn.py --only prefill --out $OUT           # the full tile grid
    python benchmarks/tune_attn.py --only prefill --cases prefill_d64,chunked_fp8 --out $OUT
    python benchmarks/tune_attn.py --out results/                      # decode + prefill
    TRITON_INTERPRET=1 python benchmarks/tune_attn.py --only prefill --smoke   # CPU: no timing
    python benchmarks/tune_attn.py --only static --out /tmp/static        # CPU: compiled code
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
import triton

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `minivllm` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from minivllm.kernels import paged_attention as checked_attention
from minivllm.kernels import triton_attention as kernel
from minivllm.kernels.triton_attention import paged_attention as triton_attention

from benchmarks.attn_bench import (DTYPES, MIXED, REL_TOL, Case, _rel, attention_flops,
                                   copy_bandwidth_gbps, fp8_cache, kv_bytes, make_inputs,
                                   mixed_case, sdpa_fn, time_ms)
from benchmarks.common import device_name, measure_matmul_rate, write_json
from benchmarks.sass_count import compile_paged_attention, disassemble, loops

DECODE_CASES = [(64, 4096, 16), (256, 1024, 16), (64, 4096, 64), (256, 1024, 64), (16, 8192, 16),
                (1, 32768, 16)]
VARIANTS = [dict(INT64_OFFSETS=i) for i in (False, True)]

def sweep(case: Case, grid: list[dict], splits: list[int | None], device, copy_gbps):
    paged, _ = make_inputs(case, device)
    q = paged[0]
    scale = case.head_dim ** -0.5
    ref = checked_attention(*paged, backend="torch")
    rows = []
    for cfg, num_splits in itertools.product(grid, splits):
        out = torch.empty_like(q)

        def fn(cfg=cfg, num_splits=num_splits, out=out):
            triton_attention(*paged, scale, True, out, max_seq_len=case.context,
                             num_splits=num_splits, config=dict(cfg))

        try:
            fn()
            err = _rel(out, ref)
            ms = time_ms(fn, device)
        except Exception as exc:  # e.g. out of shared memory for a large tile: skip that point
            print(f"  skip {cfg} splits={num_splits}: {type(exc).__name__}")
            continue
        gbps = kv_bytes(case) / (ms * 1e-3) / 1e9
        rows.append(dict(cfg=cfg, num_splits=num_splits, ms=ms, frac_copy_bw=gbps / copy_gbps,
                         rel_error=err))
    # The default configuration, as the engine would run it.
    out = torch.empty_like(q)

    def default_fn():
        triton_attention(*paged, scale, True, out, max_seq_len=case.context)

    default_fn()
    ms = time_ms(default_fn, device)
    default = dict(cfg="default", num_splits=None, ms=ms,
                   frac_copy_bw=kv_bytes(case) / (ms * 1e-3) / 1e9 / copy_gbps,
                   rel_error=_rel(out, ref))
    return rows, default


def sweep_cuda_splits(case: Case, splits: list[int | None], device, copy_gbps):
    """The extension's decode kernel at each split count (None: its heuristic), and Triton's
    default on the same inputs, in the same run."""
    paged, _ = make_inputs(case, device)
    ref = checked_attention(*paged, backend="torch")

    def measure(**kwargs) -> dict:
        out = torch.empty_like(paged[0])

        def fn():
            checked_attention(*paged, out=out, max_seq_len=case.context, **kwargs)

        fn()
        ms = time_ms(fn, device)
        return dict(ms=ms, frac_copy_bw=kv_bytes(case) / (ms * 1e-3) / 1e9 / copy_gbps,
                    rel_error=_rel(out, ref))

    rows = [dict(num_splits=n, **measure(backend="cuda", num_splits=n)) for n in splits]
    return rows, measure(backend="triton")


def time_write_kv(num_tokens: int, device, num_kv_heads: int = 8, head_dim: int = 128) -> dict:
    """write_kv_cache of `num_tokens` bf16 K/V rows (strided views of one qkv tensor, as in the
    model) into a shuffled set of slots, Triton against the extension."""
    from minivllm.kernels import write_kv_cache

    qkv = torch.randn(num_tokens, 48, head_dim, device=device, dtype=torch.bfloat16)
    key, value = qkv[:, 32:40], qkv[:, 40:48]
    k_cache = torch.empty(4 * num_tokens // 16 + 1, 16, num_kv_heads, head_dim, device=device,
                          dtype=torch.bfloat16)
    v_cache = torch.empty_like(k_cache)
    slots = torch.randperm(k_cache.shape[0] * 16, device=device)[:num_tokens]
    row = {"op": "write_kv_cache", "num_tokens": num_tokens}
    for backend in ("triton", "cuda"):
        row[f"{backend}_ms"] = time_ms(
            lambda backend=backend: write_kv_cache(key, value, k_cache, v_cache, slots, backend=backend),
            device)
    return row


# ------------------------------------------------------------------------------------------
# Prefill: the token path against the page path, over tiles and pipeline depths
# ------------------------------------------------------------------------------------------
PATHS = {  # the kernel's two switches (config keys), per path; the last two: one change alone
    "tokens": dict(PAGE_LOADS=False, FOLD_SCALE=False),
    "pages": dict(PAGE_LOADS=True, FOLD_SCALE=True),
    "page loads only": dict(PAGE_LOADS=True, FOLD_SCALE=False),
    "folded scale only": dict(PAGE_LOADS=False, FOLD_SCALE=True),
}
# (BLOCK_M, BLOCK_N, num_warps, num_stages); None is the kernel's own choice (_launch_config).
# --quick: the default, the previous sweep's best for causal prefill (128 x 32, 4 warps), and on
# the page path the shapes that trade one 8-warp program per SM for two 4-warp ones, or change
# the pipeline depth.
QUICK_TILES = {
    "tokens": [None, (128, 32, 4, 3)],
    "pages": [None, (128, 128, 8, 2), (128, 64, 8, 3), (128, 64, 4, 3), (128, 32, 4, 3),
              (64, 64, 4, 3), (64, 128, 4, 3)],
    "page loads only": [None],
    "folded scale only": [None],
}
SMOKE_TILES = {"tokens": [None], "pages": [None, (32, 16, 4, 2)], "page loads only": [None],
               "folded scale only": [None]}
SHARED_MEMORY = 227 * 1024  # the most one program may use on an H100 / H200
SM_REGISTERS, SM_SHARED, SM_WARPS = 65536, 228 * 1024, 64  # per SM, Hopper
_RESOURCES: dict[str, dict] = {}  # compiled variant -> resources(), across cases


def full_tiles() -> dict[str, list]:
    """Every 128-row tile with 4 or 8 warps and every 64-row tile with 4, at BLOCK_N 32/64/128
    and 2 to 4 stages, on both paths; the single changes at the default only."""
    grid = [(128, n, w, s) for n, w, s in itertools.product([32, 64, 128], [4, 8], [2, 3, 4])]
    grid += [(64, n, 4, s) for n, s in itertools.product([32, 64, 128], [2, 3, 4])]
    return {"tokens": [None, *grid], "pages": [None, *grid], "page loads only": [None],
            "folded scale only": [None]}


def prefill_cases(names: list[str], smoke: bool) -> list[tuple[str, Case, str]]:
    """(name, case, KV-cache dtype) for the named cases: attn_bench's shapes (Llama-3-8B-like
    heads, block 16, bf16), or tiny ones for a CPU smoke run."""
    heads = (4, 2, 32) if smoke else (32, 8, 128)
    bs = 8 if smoke else 16
    rest = (bs, "fp32" if smoke else "bf16", *heads)
    size = "smoke" if smoke else "gpu"
    table = {
        "prefill": (Case("prefill", 2, 48, 48, *rest) if smoke
                    else Case("prefill", 4, 2048, 2048, *rest), "auto"),
        "chunked": (Case("chunked_prefill", 2, 64, 16, *rest) if smoke
                    else Case("chunked_prefill", 4, 8192, 512, *rest), "auto"),
        "mixed": (mixed_case(*MIXED[size], *rest), "auto"),
        "prefill_d64": (Case("prefill", 4, 2048, 2048, bs, rest[1], 32, 8, 64) if not smoke
                        else Case("prefill", 2, 48, 48, bs, rest[1], 4, 2, 16), "auto"),
        "chunked_fp8": (Case("chunked_prefill", 4, 8192, 512, *rest) if not smoke
                        else Case("chunked_prefill", 2, 64, 16, *rest), "fp8"),
    }
    return [(name, *table[name]) for name in names]


def tile_label(tile) -> str:
    return "default" if tile is None else "{}x{} w{} s{}".format(*tile)


def _config(path: str, tile) -> dict:
    cfg = dict(PATHS[path])
    if tile is not None:
        cfg.update(BLOCK_M=tile[0], BLOCK_N=tile[1], num_warps=tile[2], num_stages=tile[3])
    return cfg


def _default_tile(case: Case, kv_dtype: torch.dtype, device) -> tuple:
    """What `tile=None` launches: the kernel's own choice for this model shape."""
    group = case.num_q_heads // case.num_kv_heads
    block_m = kernel._block_m(False, group, case.head_dim)
    cfg = kernel._launch_config(False, block_m, case.head_dim, DTYPES[case.dtype], device,
                                split_kv=False, kv_dtype=kv_dtype)
    return cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["num_warps"], cfg["num_stages"]


def too_much_shared_memory(tile, case: Case, kv_dtype: torch.dtype) -> str | None:
    """Why a tile surely cannot launch: the least shared memory it needs (the Q tile and
    num_stages - 1 buffered K and V tiles) is over the per-program limit; None otherwise.
    Skipping it saves a compilation that would fail at launch."""
    if tile is None:
        return None
    m, n, _, stages = tile
    dim = triton.next_power_of_2(case.head_dim)
    need = (max(stages - 1, 1) * 2 * n * dim * kv_dtype.itemsize
            + m * dim * DTYPES[case.dtype].itemsize)
    if need > SHARED_MEMORY:
        return (f"needs at least {need // 1024} KB of shared memory "
                f"(limit {SHARED_MEMORY // 1024} KB)")
    return None


def compiled_kernels() -> dict:
    """The attention kernel's compiled variants on the current GPU, by cache key (empty where
    this Triton keeps them elsewhere, or under the interpreter)."""
    try:
        caches = kernel._paged_attention_kernel.device_caches
        return dict(caches[torch.cuda.current_device()][0])
    except (AttributeError, KeyError, IndexError, TypeError, RuntimeError):
        return {}


def resources(compiled) -> dict:
    """Registers, spills and shared memory of a compiled kernel, and the programs one SM can hold
    at once (the least of what registers, shared memory and warps allow; registers are handed
    out per warp in units of 256): two programs per SM let one's softmax run while the other's
    MMAs do."""
    try:
        regs, spills = compiled.n_regs, compiled.n_spills
        shared, warps = compiled.metadata.shared, compiled.metadata.num_warps
    except AttributeError:
        return {}
    per_warp = -(-regs * 32 // 256) * 256
    fits = min(SM_REGISTERS // max(per_warp * warps, 1), SM_SHARED // (shared + 1024),
               SM_WARPS // warps)
    return dict(regs=regs, spills=spills, shared_kb=round(shared / 1024, 1), programs_per_sm=fits)


def sweep_prefill(name: str, case: Case, kv_cache_dtype: str, tiles: dict, device,
                  matmul_tflops: float, repeats: int = 5) -> dict:
    """Every (path, tile) on one case, against the reference and dense SDPA."""
    paged, (k_dense, v_dense) = make_inputs(case, device)
    q = paged[0]
    scales = {}
    if kv_cache_dtype == "fp8":
        k8, v8, scales = fp8_cache(paged[1], paged[2], "auto")
        paged = (q, k8, v8, *paged[3:])
    ref = checked_attention(*paged, backend="torch", **scales)
    flops = attention_flops(case)
    result = dict(name=name, case=case.__dict__, kv_cache_dtype=kv_cache_dtype, flops=flops,
                  sdpa_ms=None, rows=[])
    sdpa, kd, vd = sdpa_fn(case, q, k_dense, v_dense)
    if sdpa is not None and kv_cache_dtype == "auto":
        result["sdpa_ms"] = time_ms(sdpa, device, repeats=repeats)
        result["sdpa_tflops"] = flops / (result["sdpa_ms"] * 1e-3) / 1e12
    del k_dense, v_dense, kd, vd, sdpa
    kv_dtype = paged[1].dtype
    default = _default_tile(case, kv_dtype, device)
    result["default_tile"] = tile_label(default)
    for path, path_tiles in tiles.items():
        for tile in path_tiles:
            if tile == default:  # timed once, as "default"
                continue
            row = dict(path=path, tile=tile_label(tile), config=_config(path, tile))
            result["rows"].append(row)
            reason = too_much_shared_memory(tile, case, kv_dtype)
            if reason is not None:
                row["skipped"] = reason
                continue
            out = torch.empty_like(q)

            def fn(cfg=row["config"], out=out):
                triton_attention(*paged, case.head_dim ** -0.5, True, out,
                                 max_seq_len=case.context, config=dict(cfg), **scales)

            before = compiled_kernels()
            try:
                fn()
                row["rel_error"] = _rel(out, ref)
                row["ms"] = time_ms(fn, device, repeats=repeats)
            except Exception as exc:  # noqa: BLE001 - a config that cannot compile or launch
                first_line = (str(exc).strip().splitlines() or [""])[0][:200]
                row["failed"] = f"{type(exc).__name__}: {first_line}"
                print(f"  {name}: {path} {row['tile']}: failed: {row['failed']}")
                continue
            # A variant compiled for an earlier case is reused: look its resources up.
            new = [k for key, k in compiled_kernels().items() if key not in before]
            variant = json.dumps([row["config"], case.head_dim, str(kv_dtype), case.num_q_heads,
                                  case.num_kv_heads], sort_keys=True)
            if new:
                _RESOURCES[variant] = resources(new[-1])
            row.update(_RESOURCES.get(variant, {}))
            row["correct"] = bool(row["rel_error"] <= REL_TOL[case.dtype])
            row["tflops"] = flops / (row["ms"] * 1e-3) / 1e12
            row["frac_matmul_rate"] = row["tflops"] / matmul_tflops
            if result["sdpa_ms"]:
                row["ratio_vs_sdpa"] = row["ms"] / result["sdpa_ms"]
    base = next((r for r in result["rows"] if r["path"] == "tokens" and r["tile"] == "default"
                 and r.get("ms")), None)
    for r in result["rows"]:
        if base and r.get("ms"):
            r["ratio_vs_tokens_default"] = r["ms"] / base["ms"]
    return result


def plot_prefill(results: list[dict], path: Path, title: str, matmul_tflops: float) -> None:
    """One panel per case: TFLOP/s of every tile on each path, the matmul rate, SDPA and the
    targets (prefill at most 1.15x SDPA's time, chunked prefill 0.6 of the matmul rate)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 1, figsize=(16, 4.2 * len(results)), squeeze=False)
    for ax, res in zip(axes[:, 0], results):
        tiles = list(dict.fromkeys(r["tile"] for r in res["rows"]))
        paths = list(dict.fromkeys(r["path"] for r in res["rows"]))
        width = 0.8 / len(paths)
        for i, p in enumerate(paths):
            xs, ys = [], []
            for x, t in enumerate(tiles):
                match = [r for r in res["rows"] if (r["path"], r["tile"]) == (p, t)]
                if match:
                    xs.append(x + i * width)
                    ys.append(match[0].get("tflops", 0.0))  # 0: failed or skipped
            ax.bar(xs, ys, width, label=p)
        ax.axhline(matmul_tflops, color="gray", lw=0.8, ls="--",
                   label=f"matmul rate, same run ({matmul_tflops:.3g})")
        if res["case"]["op"] == "chunked_prefill":
            ax.axhline(0.6 * matmul_tflops, color="tab:red", lw=0.8, ls=":",
                       label="target: 0.6 of the matmul rate")
        if res.get("sdpa_tflops"):
            ax.axhline(res["sdpa_tflops"], color="black", lw=0.8,
                       label=f"dense SDPA ({res['sdpa_tflops']:.3g})")
            ax.axhline(res["sdpa_tflops"] / 1.15, color="tab:red", lw=0.8, ls=":",
                       label="target: 1.15x SDPA's time")
        ax.set_xticks([x + width * (len(paths) - 1) / 2 for x in range(len(tiles))])
        ax.set_xticklabels([t.replace(" ", "\n", 1) for t in tiles], fontsize=7)
        ax.set_ylabel("TFLOP/s")
        ax.set_title(f"{res['name']}: {_case_label(res)} (default tile {res['default_tile']})",
                     fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, ncol=3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _case_label(res: dict) -> str:
    c = res["case"]
    kv = "" if res["kv_cache_dtype"] == "auto" else f", {res['kv_cache_dtype']} cache"
    heads = f"Hq {c['num_q_heads']} / Hkv {c['num_kv_heads']} / D {c['head_dim']}"
    if c["op"] == "mixed":
        return f"mixed step, {len(c['query_lens'])} sequences, {heads}{kv}"
    return f"{c['op']} {c['batch']} x {c['query_len']}/{c['context']}, {heads}{kv}"


def print_prefill(results: list[dict]) -> None:
    """The table, fastest first per case, then one summary line per case."""
    for res in results:
        sdpa = f", dense SDPA {res['sdpa_ms']:.4f} ms" if res["sdpa_ms"] else ""
        print(f"\n== {res['name']}: {_case_label(res)}{sdpa}")
        print(f"  {'path':<18}{'tile':<18}{'ms':>9}{'TFLOP/s':>9}{'matmul':>8}{'xSDPA':>7}"
              f"{'xtokens':>8}{'regs':>6}{'smemKB':>8}{'prog/SM':>8}{'err':>9}")
        timed = sorted((r for r in res["rows"] if r.get("ms")), key=lambda r: r["ms"])
        for r in timed:
            flag = "" if r["correct"] else "  WRONG"
            print(f"  {r['path']:<18}{r['tile']:<18}{r['ms']:>9.4f}{r['tflops']:>9.1f}"
                  f"{r['frac_matmul_rate']:>8.2f}{_fmt(r.get('ratio_vs_sdpa'), 7)}"
                  f"{_fmt(r.get('ratio_vs_tokens_default'), 8)}{_fmt(r.get('regs'), 6, 'd')}"
                  f"{_fmt(r.get('shared_kb'), 8, '.0f')}{_fmt(r.get('programs_per_sm'), 8, 'd')}"
                  f"{r['rel_error']:>9.1e}{flag}")
        for r in res["rows"]:
            if not r.get("ms"):
                print(f"  {r['path']:<18}{r['tile']:<18}  {r.get('failed') or r.get('skipped')}")
    print("\nxSDPA: time over dense SDPA's; xtokens: time over the token path's default; "
          "matmul: TFLOP/s over the bf16 matmul rate of this run; prog/SM: programs one SM holds")
    for res in results:
        best = {}
        for r in res["rows"]:
            if r.get("ms") and r["correct"] and (r["path"] not in best
                                                 or r["ms"] < best[r["path"]]["ms"]):
                best[r["path"]] = r
        parts = [f"{p} best {r['tile']} {r['ms']:.4f} ms" + (
            f" ({r['ratio_vs_sdpa']:.2f}x SDPA)" if r.get("ratio_vs_sdpa") else
            f" ({r['frac_matmul_rate']:.2f} of matmul)") for p, r in best.items()
            if p in ("tokens", "pages")]
        print(f"{res['name']}: " + "; ".join(parts))


def _fmt(value, width: int, spec: str = ".2f") -> str:
    return f"{'-' if value is None else format(value, spec):>{width}}"


def run_prefill(args, device) -> int:
    """The prefill section; returns 1 if any output was wrong."""
    started = time.perf_counter()
    matmul_tflops = measure_matmul_rate(device) / 1e12
    tiles = SMOKE_TILES if args.smoke else QUICK_TILES if args.quick else full_tiles()
    names = args.cases.split(",")
    unknown = [n for n in names if n not in ("prefill", "chunked", "mixed", "prefill_d64",
                                             "chunked_fp8")]
    if unknown:
        raise SystemExit(f"--cases: unknown {unknown}; choose from prefill, chunked, mixed, "
                         "prefill_d64, chunked_fp8")
    meta = dict(date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                device=device_name(device), torch=torch.__version__, triton=triton.__version__,
                matmul_tflops=matmul_tflops, prefill_path_default=kernel.PREFILL_PATH,
                argv=sys.argv[1:], quick=args.quick, smoke=args.smoke)
    print(f"device: {meta['device']}; matmul {matmul_tflops:.3g} TFLOP/s")
    tag = args.tag or ("gpu" if device.type == "cuda" else "cpu")
    json_path = args.out / f"tune_attn_prefill_{tag}.json"
    results = []
    for name, case, kv in prefill_cases(names, args.smoke):
        print(f"[{name}] ({time.perf_counter() - started:.0f} s)", flush=True)
        results.append(sweep_prefill(name, case, kv, tiles, device, matmul_tflops,
                                     repeats=1 if args.smoke else 5))
        meta["wall_s"] = time.perf_counter() - started
        write_json(json_path, dict(meta=meta, results=results))  # kept if the run is cut short
    plot_prefill(results, json_path.with_suffix(".png"),
                 f"paged prefill: token vs page path, {meta['device']}, {meta['date'][:10]}",
                 matmul_tflops)
    print(f"\nwrote {json_path} and {json_path.with_suffix('.png')} ({meta['wall_s']:.0f} s)")
    print_prefill(results)
    wrong = [(res["name"], r["path"], r["tile"]) for res in results for r in res["rows"]
             if r.get("correct") is False]
    for w in wrong:
        print("WRONG output: {} {} {}".format(*w))
    return 1 if wrong else 0



# ------------------------------------------------------------------------------------------
# Static: what a prefill variant compiles to on Hopper, read without a GPU
# ------------------------------------------------------------------------------------------
def compile_for_hopper(case: Case, path: str, tile=None, kv_cache_dtype: str = "auto",
                       arch: int = 90):
    """The prefill variant the kernel would launch for `case` on `path` with `tile` (None: the
    default), compiled ahead of time for sm_<arch> by the installed Triton (not under the
    interpreter). Arguments are specialized as a launch on attn_bench's cache would: data
    pointers 16-byte aligned, ints marked divisible by 16 or equal to 1 by their value, except
    those the kernel lists in do_not_specialize."""
    fp8 = kv_cache_dtype == "fp8"
    dtype = DTYPES[case.dtype]
    kv_dtype = torch.float8_e4m3fn if fp8 else dtype
    hq, hkv, d, bs = case.num_q_heads, case.num_kv_heads, case.head_dim, case.block_size
    group, dim_pad = hq // hkv, triton.next_power_of_2(d)
    m, n, warps, stages = tile or _default_tile(case, kv_dtype, torch.device("cuda"))
    switches = PATHS[path]
    page = switches["PAGE_LOADS"]
    cache_strides = (bs * hkv * d, hkv * d, d)
    consts = dict(
        NUM_Q_HEADS=hq, GROUP=group, HEAD_DIM=d, DIM_PAD=dim_pad, BLOCK_SIZE=bs, BLOCK_M=m,
        BLOCK_Q=max(1, m // group), BLOCK_N=n, SPLIT_KV=False, DECODE_ONLY=False, CAUSAL=True,
        DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32", INT64_OFFSETS=False,
        U32_OFFSETS=False,
        NUM_KV_HEADS=hkv, KV_FP8=fp8, DOT_FP16=fp8 and dtype != torch.float32, PAGE_LOADS=page,
        PAGES=max(1, n // bs) if page else 1, FOLD_SCALE=switches["FOLD_SCALE"],
        ROW_ALIGN=16 if page and all(st % 16 == 0 for st in cache_strides[:2]) else 1)
    elem = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}[dtype]
    kv = "*fp8e4nv" if fp8 else elem
    scale = "*fp32" if fp8 else elem  # without fp8, `out` stands in for the unused pointers
    pointers = dict(query_ptr=elem, k_cache_ptr=kv, v_cache_ptr=kv, out_ptr=elem,
                    block_tables_ptr="*i32", seq_lens_ptr="*i32", cu_seqlens_q_ptr="*i32",
                    partial_acc_ptr=elem, partial_m_ptr=elem, partial_l_ptr=elem,
                    k_scale_ptr=scale, v_scale_ptr=scale)
    ints = dict(stride_qt=hq * d, stride_qh=d, stride_ot=hq * d, stride_oh=d,
                stride_cb=cache_strides[0], stride_ct=cache_strides[1], stride_ch=d,
                # fp8.empty_scales: head-major [num_blocks, block_size, Hkv] scales
                stride_sb=bs * hkv if fp8 else 0, stride_st=1 if fp8 else 0,
                stride_sh=bs if fp8 else 0)
    return compile_paged_attention(consts, pointers, ints,
                                   dict(num_warps=warps, num_stages=stages), arch)


def static_report(compiled) -> dict:
    """What the compiled kernel does, read from its PTX and machine code: K/V copies of 16 bytes
    through cp.async (the pipelined, vectorized loads), wgmma instructions, narrow (1-2 byte)
    global loads; registers, spills and shared memory, so programs per SM; and the number of
    machine instructions in each loop (the unmasked tiles' loop first, then the masked one)."""
    ptx = compiled.asm["ptx"]
    report = dict(
        cp_async_16=len(re.findall(r"cp\.async\.cg\.shared\.global[^;]*\], 0x10\b", ptx)),
        wgmma=len(re.findall(r"wgmma\.mma_async", ptx)),
        narrow_loads=len(re.findall(r"ld\.global(\.[a-z0-9:_]+)*\.(b8|b16|u8|u16)\b", ptx)),
        shared_kb=round(compiled.metadata.shared / 1024, 1), num_warps=compiled.metadata.num_warps)
    try:
        sass, usage = disassemble(compiled)
    except (OSError, subprocess.CalledProcessError):  # no CUDA binary tools in this Triton
        usage = sass = ""
    # Registers that do not fit spill to the per-thread stack frame (STACK), not to LOCAL.
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", usage)
    if found:
        regs = int(found.group(1))
        report.update(regs=regs, spill_bytes=int(found.group(2)) + int(found.group(3)),
                      programs_per_sm=min(
            SM_REGISTERS // (-(-regs * 32 // 256) * 256 * report["num_warps"]),
            SM_SHARED // (compiled.metadata.shared + 1024), SM_WARPS // report["num_warps"]))
    report["loop_instructions"] = [len(body) for body in loops(sass)]  # the tile loops
    return report


def run_static(args) -> int:
    """Compile the quick sweep's prefill variants for sm_90 here, print and save what each
    compiles to. No GPU needed: this is how a change to the inner loop can be judged before
    GPU time is spent on timing it."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("--only static compiles for the GPU: unset TRITON_INTERPRET")
    results = []
    # The bf16 cases all compile to one variant (batch shapes are not part of it): one per KV
    # dtype covers them.
    for name, case, kv in prefill_cases(["prefill", "chunked_fp8"], False):
        for path, tiles in QUICK_TILES.items():
            for tile in tiles:
                row = dict(case=name, kv_cache_dtype=kv, path=path, tile=tile_label(tile))
                try:
                    row.update(static_report(compile_for_hopper(case, path, tile, kv)))
                except Exception as exc:  # noqa: BLE001 - a tile that does not compile
                    row["failed"] = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
                results.append(row)
                print(f"{name:<12}{path:<18}{row['tile']:<14}" + (row.get("failed") or (
                    f"regs {row.get('regs', '-')}, shared {row['shared_kb']} KB, "
                    f"{row.get('programs_per_sm', '-')} program(s)/SM, loops "
                    f"{row['loop_instructions']} instructions, cp.async16 {row['cp_async_16']}, "
                    f"narrow loads {row['narrow_loads']}")), flush=True)
    path = args.out / f"tune_attn_static_triton{triton.__version__}.json"
    write_json(path, dict(meta=dict(triton=triton.__version__, target="sm_90",
                                    date=dt.datetime.now(dt.timezone.utc).isoformat()),
                          rows=results))
    print(f"wrote {path}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--only", default="decode,prefill",
                   help="comma list of decode, prefill, cuda; or static (no GPU needed)")
    p.add_argument("--quick", action="store_true",
                   help="prefill: a handful of tiles per path (about 3 minutes on one GPU)")
    p.add_argument("--smoke", action="store_true",
                   help="prefill: tiny shapes in the Triton interpreter on the CPU "
                        "(TRITON_INTERPRET=1): checks that the sweep runs; times mean nothing")
    p.add_argument("--cases", default="prefill,chunked,mixed",
                   help="prefill section: comma list of prefill, chunked, mixed, prefill_d64 "
                        "(head_dim 64), chunked_fp8 (fp8 cache)")
    p.add_argument("--tag", default=None, help="name of the prefill output files (default: gpu)")
    args = p.parse_args(argv)
    if args.only == "static":
        args.out.mkdir(parents=True, exist_ok=True)
        return run_static(args)
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
            raise SystemExit("--smoke on a CPU needs the Triton interpreter: TRITON_INTERPRET=1")
        args.out.mkdir(parents=True, exist_ok=True)
        return run_prefill(args, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    if not torch.cuda.is_available():
        raise SystemExit("tune_attn.py needs a CUDA device (or --smoke in the interpreter)")
    device = torch.device("cuda")
    args.out.mkdir(parents=True, exist_ok=True)
    status = 0
    if "prefill" in args.only:  # first: the section a short GPU session is for
        status = run_prefill(args, device)
    if "decode" not in args.only and "cuda" not in args.only:
        return status
    copy_gbps = copy_bandwidth_gbps(device, 2 << 30)
    print(f"copy bandwidth {copy_gbps:.0f} GB/s")
    results = []
    if "decode" in args.only:
        grid = [dict(BLOCK_M=16, BLOCK_N=n, num_warps=w, num_stages=s, **v)
                for n, w, s, v in itertools.product([64, 128], [2, 4], [2, 3], VARIANTS)]
        for b, L, bs in DECODE_CASES:
            case = Case("decode", b, L, 1, bs, "bf16", 32, 8, 128)
            rows, default = sweep(case, grid, [None], device, copy_gbps)
            best = sorted(rows, key=lambda r: r["ms"])[:3]
            # then the split count for the best tile config
            split_rows, _ = sweep(case, [best[0]["cfg"]], [1, 2, 4, 8, 16, 32, 64] if b < 64
                                  else [1, 2], device, copy_gbps)
            results.append(dict(case=case.__dict__, best=best, splits=split_rows, default=default))
            _print(case, best, split_rows, default)
    if "cuda" in args.only:
        for b, L, bs in DECODE_CASES:
            case = Case("decode", b, L, 1, bs, "bf16", 32, 8, 128)
            rows, triton_default = sweep_cuda_splits(case, [None, 1, 2, 3, 4, 6, 8, 16, 33, 48, 64, 132],
                                                     device, copy_gbps)
            results.append(dict(case=case.__dict__, cuda_splits=rows, triton_default=triton_default))
            print(f"\n== cuda decode B={b} ctx={L} bs={bs}: triton default {triton_default['ms']:.4f} ms")
            for r in rows:
                print(f"    splits={r['num_splits']}: {r['ms']:.4f} ms {r['frac_copy_bw']:.2f} "
                      f"x{r['ms'] / triton_default['ms']:.3f} of triton  err {r['rel_error']:.1e}")
        for num_tokens in (256, 8192):  # a decode step of 256 sequences; a prefill chunk
            row = time_write_kv(num_tokens, device)
            results.append(row)
            print(f"\n== write_kv_cache {num_tokens} tokens: triton {row['triton_ms'] * 1e3:.1f} us, "
                  f"cuda {row['cuda_ms'] * 1e3:.1f} us (x{row['cuda_ms'] / row['triton_ms']:.2f})")
    name = "tune_attn_cuda.json" if "decode" not in args.only else "tune_attn.json"
    (args.out / name).write_text(json.dumps(results, indent=1))
    return status


def _print(case, best, split_rows, default):
    print(f"\n== {case.op} B={case.batch} ctx={case.context} q={case.query_len}")
    print(f"  default: {default['ms']:.4f} ms  {default['frac_copy_bw']:.2f} of copy BW  "
          f"err {default['rel_error']:.1e}")
    for r in best:
        print(f"  {r['cfg']} splits={r['num_splits']}: {r['ms']:.4f} ms "
              f"{r['frac_copy_bw']:.2f}  err {r['rel_error']:.1e}")
    for r in split_rows:
        print(f"    splits={r['num_splits']}: {r['ms']:.4f} ms {r['frac_copy_bw']:.2f}")


if __name__ == "__main__":
    raise SystemExit(main())
