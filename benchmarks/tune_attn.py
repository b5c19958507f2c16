"""Sweep the Triton paged-attention launch configuration on the GPU.

The defaults in `kernels/triton_attention.py` (`_launch_config`, `choose_num_splits`) come from
this sweep; `--only cuda` sweeps the split count of the C++ extension's decode kernel
(`choose_num_splits` in csrc/paged_decode.cu) beside the Triton default. For each case it times every (BLOCK_M, BLOCK_N, num_warps, num_stages, num_splits)
combination the grid allows, checks each output against the reference, and prints the best
configurations next to the default one, so a change of defaults is a measured decision.

    python benchmarks/tune_attn.py --out results/   # needs a CUDA device
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch

from benchmarks.attn_bench import Case, _rel, copy_bandwidth_gbps, kv_bytes, make_inputs, time_ms
from minivllm.kernels import paged_attention as checked_attention
from minivllm.kernels.triton_attention import paged_attention as triton_attention

DECODE_CASES = [(64, 4096, 16), (256, 1024, 16), (64, 4096, 64), (256, 1024, 64), (16, 8192, 16),
                (1, 32768, 16)]
VARIANTS = [dict(INT64_OFFSETS=i) for i in (False, True)]
PREFILL_CASES = [("prefill", 4, 2048, 2048), ("chunked_prefill", 4, 8192, 512)]


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--only", default="decode,prefill", help="comma list of decode, prefill, cuda")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("tune_attn.py needs a CUDA device")
    device = torch.device("cuda")
    copy_gbps = copy_bandwidth_gbps(device, 2 << 30)
    print(f"copy bandwidth {copy_gbps:.0f} GB/s")
    results = []
    if "decode" in args.only:
        grid = [dict(BLOCK_M=16, BLOCK_N=n, num_warps=w, num_stages=s, **v)
                for n, w, s, v in itertools.product([64, 128], [2, 4], [2, 3], VARIANTS)]
        for b, L, bs in DECODE_CASES:
            case = Case("decode", b, L, 1, bs, "bf16", 32, 8, 128)
            splits = [None] if b >= 64 else [None]
            rows, default = sweep(case, grid, splits, device, copy_gbps)
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
    if "prefill" in args.only:
        tiles = [(64, 64, 4, 2), (128, 32, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 128, 4, 3)]
        grid = [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s, **v)
                for (m, n, w, s), v in itertools.product(tiles, VARIANTS)]
        for op, b, L, ql in PREFILL_CASES:
            case = Case(op, b, L, ql, 16, "bf16", 32, 8, 128)
            rows, default = sweep(case, grid, [None], device, copy_gbps)
            best = sorted(rows, key=lambda r: r["ms"])[:5]
            results.append(dict(case=case.__dict__, best=best, default=default))
            _print(case, best, [], default)
    args.out.mkdir(parents=True, exist_ok=True)
    name = "tune_attn_cuda.json" if args.only == "cuda" else "tune_attn.json"
    (args.out / name).write_text(json.dumps(results, indent=1))


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
    main()
