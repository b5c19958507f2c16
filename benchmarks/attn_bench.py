"""Paged attention vs dense SDPA vs the memory-bandwidth limit.

For each case (decode, causal prefill, chunked prefill; batch x context x block size x dtype) it

1. builds a random paged KV cache with shuffled block tables and the same K/V made contiguous,
2. checks every backend's output against the reference (and dense SDPA against it too),
3. times each backend and dense `scaled_dot_product_attention` on the contiguous K/V
   (median of CUDA-event timings of CUDA-graph replays after warm-up, so Python launch overhead
   is not counted; on CPU: median wall time),
4. reports achieved bandwidth over the K/V bytes the op must read, that as a fraction of a
   device-to-device copy bandwidth measured in the same run, TFLOP/s for prefill, and the time
   ratio to dense SDPA: "time / SDPA" in the table, `ratio_vs_sdpa` in the JSON; below 1 is
   faster than SDPA, above 1 slower.

Writes one JSON record per case and backend to benchmarks/results/, a PNG plot, and prints a
table last. On a machine without CUDA it runs small shapes with the reference backend: CPU
timings say nothing about the GPU, so they go to benchmarks/results/cpu/, which git ignores.

    python benchmarks/attn_bench.py                 # default sweep on whatever device is here
    python benchmarks/attn_bench.py --quick         # a few cases
    python benchmarks/attn_bench.py --cases decode --batch 64 --context 4096 --block-sizes 16,32,64
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from minivllm.kernels import available_backends, paged_attention
from minivllm.kernels import cuda as cuda_ext

RESULTS_DIR = Path(__file__).resolve().parent / "results"
CPU_RESULTS_DIR = RESULTS_DIR / "cpu"  # in .gitignore: CPU times are never results to commit
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Case:
    op: str  # "decode" | "prefill" (causal, query = whole context) | "chunked_prefill"
    batch: int
    context: int  # tokens of context per sequence, including the new queries
    query_len: int  # new query tokens per sequence
    block_size: int
    dtype: str
    num_q_heads: int
    num_kv_heads: int
    head_dim: int


# ------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------
def time_ms(fn, device: torch.device, graph: bool = True) -> float:
    """Median time of `fn` in milliseconds, after warm-up.

    On the GPU the call is captured in a CUDA graph and its replays are timed with CUDA events
    (`triton.testing.do_bench_cudagraph`), which is how the engine runs decode steps; functions
    that cannot be captured (the reference syncs) are timed eagerly with `do_bench`.
    """
    if device.type == "cuda":
        import triton.testing

        fn()
        torch.cuda.synchronize()
        if graph:
            return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def copy_bandwidth_gbps(device: torch.device, nbytes: int) -> float:
    """Device-to-device copy bandwidth, counting bytes read plus bytes written."""
    src = torch.empty(nbytes // 2, dtype=torch.float16, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, graph=False)
    return 2 * nbytes / (ms * 1e-3) / 1e9


# ------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------
def make_inputs(case: Case, device: torch.device, seed: int = 0):
    """A paged cache with shuffled block tables, and the same K/V as contiguous tensors."""
    g = torch.Generator(device=device).manual_seed(seed)
    dtype = DTYPES[case.dtype]
    b, L, hkv, d, bs = case.batch, case.context, case.num_kv_heads, case.head_dim, case.block_size
    blocks_per_seq = math.ceil(L / bs)
    num_blocks = b * blocks_per_seq
    k_dense = torch.randn(b, L, hkv, d, device=device, dtype=dtype, generator=g)
    v_dense = torch.randn(b, L, hkv, d, device=device, dtype=dtype, generator=g)
    k_cache = torch.zeros(num_blocks, bs, hkv, d, device=device, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    block_tables = torch.randperm(num_blocks, device=device, generator=g).view(b, blocks_per_seq)
    pad = blocks_per_seq * bs - L
    for cache, dense in ((k_cache, k_dense), (v_cache, v_dense)):
        padded = F.pad(dense, (0, 0, 0, 0, 0, pad)).view(b, blocks_per_seq, bs, hkv, d)
        cache[block_tables.flatten()] = padded.flatten(0, 1)
    q = torch.randn(b * case.query_len, case.num_q_heads, d, device=device, dtype=dtype,
                    generator=g)
    seq_lens = torch.full((b,), L, dtype=torch.int32, device=device)
    cu = torch.arange(0, b + 1, dtype=torch.int32, device=device) * case.query_len
    paged = (q, k_cache, v_cache, block_tables.to(torch.int32), seq_lens, cu)
    return paged, (k_dense, v_dense)


def sdpa_fn(case: Case, q: torch.Tensor, k_dense: torch.Tensor, v_dense: torch.Tensor):
    """Dense SDPA on contiguous [B, H, L, D] K/V: what a paged kernel aims to match."""
    b, ql = case.batch, case.query_len
    qd = q.view(b, ql, case.num_q_heads, case.head_dim).transpose(1, 2)
    group = case.num_q_heads // case.num_kv_heads
    if case.op == "decode":
        # GQA-aware kernel: reads each KV head once, like ours.
        kd, vd = (t.transpose(1, 2) for t in (k_dense, v_dense))
        return lambda: F.scaled_dot_product_attention(qd, kd, vd, enable_gqa=True), kd, vd
    # Prefill: heads expanded so the flash backend is used for sure (compute-bound: the extra
    # K/V bytes cost nothing measurable).
    kd, vd = (t.repeat_interleave(group, dim=2).transpose(1, 2).contiguous()
              for t in (k_dense, v_dense))
    if case.op == "prefill":
        return lambda: F.scaled_dot_product_attention(qd, kd, vd, is_causal=True), kd, vd
    # Chunked prefill: queries at the end of the context need a bottom-right causal mask,
    # which SDPA's is_causal does not express; no fair dense baseline, so none is timed.
    return None, kd, vd


def kv_bytes(case: Case) -> int:
    """Bytes of K and V the op must read at least once."""
    elem = torch.finfo(DTYPES[case.dtype]).bits // 8
    return 2 * case.batch * case.context * case.num_kv_heads * case.head_dim * elem


def attention_flops(case: Case) -> float:
    """2 matmuls x 2 flops per multiply-add, counting only the unmasked (causal) part."""
    ql, L = case.query_len, case.context
    visible = ql * (L - ql) + ql * (ql + 1) / 2  # keys seen, summed over the queries
    return 4 * case.batch * case.num_q_heads * case.head_dim * visible


# ------------------------------------------------------------------------------------------
# Sweep
# ------------------------------------------------------------------------------------------
def build_cases(args, on_gpu: bool) -> list[Case]:
    heads = (args.num_q_heads, args.num_kv_heads, args.head_dim)
    cases = []
    for dtype in args.dtypes.split(","):
        for bs in [int(x) for x in args.block_sizes.split(",")]:
            if "decode" in args.cases:
                for b, L in _pairs(args, decode=True, on_gpu=on_gpu):
                    cases.append(Case("decode", b, L, 1, bs, dtype, *heads))
            if "prefill" in args.cases.split(","):
                for b, L in _pairs(args, decode=False, on_gpu=on_gpu):
                    cases.append(Case("prefill", b, L, L, bs, dtype, *heads))
            if "chunked" in args.cases:
                b, L, ql = (4, 8192, 512) if on_gpu else (2, 256, 32)
                if not args.quick or on_gpu:
                    cases.append(Case("chunked_prefill", args.batch or b, args.context or L,
                                      args.chunk or ql, bs, dtype, *heads))
    return cases


def _pairs(args, decode: bool, on_gpu: bool) -> list[tuple[int, int]]:
    if args.batch or args.context:
        default_b, default_l = (64, 4096) if decode else (4, 2048)
        return [(args.batch or default_b, args.context or default_l)]
    if not on_gpu:
        return [(4, 256), (1, 1024)] if decode else [(2, 128)]
    if decode:
        pairs = [(64, 4096), (256, 1024), (16, 8192), (1, 32768)]
        return pairs[:2] if args.quick else pairs
    return [(4, 2048)]


def run_case(case: Case, backends: list[str], device: torch.device, copy_gbps: float):
    paged, (k_dense, v_dense) = make_inputs(case, device)
    q = paged[0]
    max_seq_len = case.context
    reference = paged_attention(*paged, backend="torch")
    sdpa, kd, vd = sdpa_fn(case, q, k_dense, v_dense)
    records = []
    sdpa_ms = None
    if sdpa is not None:
        dense_out = sdpa().transpose(1, 2).reshape_as(q)
        sdpa_err = _rel(dense_out, reference)
        sdpa_ms = time_ms(sdpa, device)
        records.append(_record(case, "sdpa", sdpa_ms, copy_gbps, sdpa_ms, sdpa_err, device))
    for backend in backends:
        out = torch.empty_like(q)
        if backend == "cuda":
            reason = cuda_ext.decode_unsupported(q, paged[1], paged[2], paged[4], out)
            if reason is not None:  # it would run on Triton: no record that claims otherwise
                print(f"    cuda: not timed, the extension does not cover {reason}")
                continue

        def fn(backend=backend, out=out):
            return paged_attention(*paged, backend=backend, out=out, max_seq_len=max_seq_len)

        fn()
        err = _rel(out, reference)
        ms = time_ms(fn, device, graph=backend != "torch")
        records.append(_record(case, backend, ms, copy_gbps, sdpa_ms, err, device))
    del paged, k_dense, v_dense, kd, vd
    return records


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def _record(case, backend, ms, copy_gbps, sdpa_ms, err, device) -> dict:
    gbps = kv_bytes(case) / (ms * 1e-3) / 1e9
    rec = dict(asdict(case), backend=backend, ms=ms, gbps=gbps, frac_copy_bw=gbps / copy_gbps,
               tflops=attention_flops(case) / (ms * 1e-3) / 1e12,
               ratio_vs_sdpa=(ms / sdpa_ms) if sdpa_ms else None,  # time / SDPA time
               rel_error=err,
               copy_gbps=copy_gbps, device=_device_name(device))
    return rec


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()})"


# ------------------------------------------------------------------------------------------
# Output
# ------------------------------------------------------------------------------------------
def print_table(records: list[dict]) -> None:
    header = (f"{'op':<16}{'backend':<8}{'dtype':<6}{'B':>5}{'ctx':>7}{'q':>6}{'bs':>4}"
              f"{'ms':>10}{'GB/s':>9}{'copyBW':>8}{'TFLOP/s':>9}{'time/SDPA':>11}{'err':>10}")
    print(header)
    print("-" * len(header))
    for r in records:
        ratio = f"{r['ratio_vs_sdpa']:.2f}" if r["ratio_vs_sdpa"] else "-"
        print(f"{r['op']:<16}{r['backend']:<8}{r['dtype']:<6}{r['batch']:>5}{r['context']:>7}"
              f"{r['query_len']:>6}{r['block_size']:>4}{r['ms']:>10.4f}{r['gbps']:>9.0f}"
              f"{r['frac_copy_bw']:>8.2f}{r['tflops']:>9.1f}{ratio:>11}{r['rel_error']:>10.1e}")
    print("time/SDPA: this backend's time over dense SDPA's in the same run (below 1 = faster)")


def plot(records: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    decode = [r for r in records if r["op"] == "decode"]
    other = [r for r in records if r["op"] != "decode"]
    fig, axes = plt.subplots(1, 2, figsize=(16, 5.5), gridspec_kw={"width_ratios": [3, 1]})
    for ax, recs, key, label in ((axes[0], decode, "frac_copy_bw", "fraction of copy bandwidth"),
                                 (axes[1], other, "tflops", "TFLOP/s")):
        labels = sorted({(r["op"], r["batch"], r["context"], r["query_len"], r["block_size"],
                          r["dtype"]) for r in recs})
        backends = sorted({r["backend"] for r in recs})
        width = 0.8 / max(1, len(backends))
        for i, backend in enumerate(backends):
            values = []
            for lab in labels:
                match = [r[key] for r in recs if r["backend"] == backend and
                         (r["op"], r["batch"], r["context"], r["query_len"], r["block_size"],
                          r["dtype"]) == lab]
                values.append(match[0] if match else 0.0)
            ax.bar([x + i * width for x in range(len(labels))], values, width, label=backend)
        ax.set_xticks([x + width * (len(backends) - 1) / 2 for x in range(len(labels))])
        ax.set_xticklabels([f"{op.replace('_prefill', '')}\nB={b}\nctx={_k(L)}\n"
                            + (f"q={q}\n" if q > 1 else "") + f"bs={bs}"
                            for op, b, L, q, bs, _ in labels], fontsize=7)
        ax.set_ylabel(label)
        if recs:  # a sweep without this kind of case leaves the panel empty
            ax.legend()
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_title("decode: achieved K/V bandwidth / copy bandwidth (higher is better)")
    axes[1].set_title("prefill: attention TFLOP/s")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _k(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a few cases only")
    p.add_argument("--cases", default="decode,prefill,chunked",
                   help="comma list of decode, prefill, chunked")
    p.add_argument("--backends", default=None,
                   help="comma list of torch, triton, cuda (default: all that run here but the "
                        "slow reference on GPU)")
    p.add_argument("--dtypes", default=None, help="comma list of bf16, fp16, fp32")
    p.add_argument("--block-sizes", default=None, help="comma list, e.g. 16,32,64")
    p.add_argument("--batch", type=int, default=None, help="only this batch size")
    p.add_argument("--context", type=int, default=None, help="only this context length")
    p.add_argument("--chunk", type=int, default=None, help="new tokens per chunked-prefill step")
    p.add_argument("--num-q-heads", type=int, default=None)
    p.add_argument("--num-kv-heads", type=int, default=None)
    p.add_argument("--head-dim", type=int, default=None)
    p.add_argument("--out", type=Path, default=None,
                   help="directory for JSON and PNG (default: benchmarks/results on a GPU, "
                        "benchmarks/results/cpu, which git ignores, on the CPU)")
    p.add_argument("--tag", default=None, help="name of the output files (default: device)")
    p.add_argument("--replot", type=Path, default=None, metavar="JSON",
                   help="only redraw the plot and table of an earlier run's JSON")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.replot:
        saved = json.loads(args.replot.read_text())
        meta = saved["meta"]
        plot(saved["records"], args.replot.with_suffix(".png"),
             f"minivllm paged attention, {meta['device']}, {meta['date'][:10]}")
        print_table(saved["records"])
        return 0
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    # GPU defaults are the shapes that matter (Llama-3-8B-like heads); CPU ones stay small.
    args.num_q_heads = args.num_q_heads or (32 if on_gpu else 8)
    args.num_kv_heads = args.num_kv_heads or (8 if on_gpu else 2)
    args.head_dim = args.head_dim or (128 if on_gpu else 64)
    args.dtypes = args.dtypes or ("bf16" if on_gpu else "fp32")
    args.block_sizes = args.block_sizes or ("16" if args.quick or not on_gpu else "16,32,64")
    for name in args.dtypes.split(","):
        if name not in DTYPES:
            raise SystemExit(f"--dtypes: unknown dtype {name!r} (choose from {list(DTYPES)})")
    runnable = available_backends(device)
    if args.backends:
        backends = args.backends.split(",")
        missing = [b for b in backends if b not in runnable]
        if missing:
            raise SystemExit(f"--backends: {missing} cannot run on {device} (available: {runnable})")
    else:
        backends = [b for b in runnable if not (on_gpu and b == "torch")]
        if not on_gpu:
            backends = ["torch"]  # the interpreter would time numpy, not a kernel

    if not on_gpu:
        print("NOTE: no CUDA device here: running small shapes on the CPU with the reference "
              "backend. CPU timings are not GPU claims.\n")
    copy_gbps = copy_bandwidth_gbps(device, (2 << 30) if on_gpu else (256 << 20))
    print(f"device: {_device_name(device)}; copy bandwidth {copy_gbps:.0f} GB/s (read + write)")
    cases = build_cases(args, on_gpu)
    records = []
    for i, case in enumerate(cases, 1):
        print(f"[{i}/{len(cases)}] {case.op} B={case.batch} ctx={case.context} "
              f"q={case.query_len} bs={case.block_size} {case.dtype}", flush=True)
        records.extend(run_case(case, backends, device, copy_gbps))

    stamp = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    meta = dict(date=stamp, torch=torch.__version__, python=sys.version.split()[0],
                device=_device_name(device), copy_gbps=copy_gbps, argv=sys.argv[1:])
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        pass
    out = args.out or (RESULTS_DIR if on_gpu else CPU_RESULTS_DIR)
    out.mkdir(parents=True, exist_ok=True)
    tag = args.tag or ("gpu" if on_gpu else "cpu")
    json_path = out / f"attn_bench_{tag}.json"
    json_path.write_text(json.dumps({"meta": meta, "records": records}, indent=1))
    png_path = out / f"attn_bench_{tag}.png"
    plot(records, png_path, f"minivllm paged attention, {meta['device']}, {stamp[:10]}")
    print(f"\nwrote {json_path} and {png_path}\n")
    print_table(records)
    if not on_gpu:
        print("\n(CPU run: times are for the reference code on this CPU, not GPU claims.)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
