"""Sweep the Triton kernel's launch configuration on an fp8 KV cache (GPU).

The defaults of `_launch_config` were tuned on bf16 caches (tune_attn.py). An fp8 tile holds half
the bytes, its scales are extra loads, and the values must be widened before the tensor cores
take them, so the best tiles may differ. For decode and prefill cases of the attn_bench shape,
this times every (BLOCK_N, num_warps, num_stages) of a small grid, for the two layouts of the
scales ("token-major": [num_blocks, block_size, Hkv] contiguous; "head-major": each head's
block_size scales contiguous, [num_blocks, Hkv, block_size] seen through a transpose) and the two
dtypes the widened values can take for the dot (the query's bf16, or fp16: `DOT_FP16`), beside
the bf16 cache with its default configuration. Median of CUDA-graph replays; outputs checked
against the fp8 reference. (The run recorded in benchmarks/results/fp8_tune_h100.json predates
the fp16 path's two range guards: queries clamped to +-65504, probabilities scaled by
v_scale / max(v_scale) of the tile.)

    python benchmarks/fp8_tune.py --out benchmarks/results/
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import torch

from benchmarks.common import environment, write_json
from minivllm.kernels import fp8, paged_attention, write_kv_cache
from minivllm.kernels import triton_attention

HQ, HKV, D, BLOCK = 32, 8, 128, 16
CASES = {  # name: (query length, batch, context, grid of (BLOCK_N, num_warps, num_stages))
    "decode B=64 ctx 4096": (1, 64, 4096, list(itertools.product([64, 128, 256], [2, 4],
                                                                  [2, 3, 4]))),
    "decode B=1 ctx 32768": (1, 1, 32768, list(itertools.product([128, 256], [4], [2, 3]))),
    "prefill 4 x 2048": (2048, 4, 2048, list(itertools.product([64, 128], [4, 8], [2, 3]))),
}


def scales(k8, layout):
    if layout == "head-major":  # the layout fp8.empty_scales allocates
        return fp8.empty_scales(k8)
    return torch.empty(k8.shape[:3], device=k8.device), torch.empty(k8.shape[:3], device=k8.device)


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def main() -> None:
    import triton.testing

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    device = torch.device("cuda")
    rows = []
    for name, (query_len, batch, context, grid) in CASES.items():
        blocks = batch * context // BLOCK
        k = torch.randn(blocks, BLOCK, HKV, D, device=device).bfloat16()
        v = torch.randn_like(k)
        tables = torch.randperm(blocks, device=device, dtype=torch.int32).view(batch, -1)
        lens = torch.full((batch,), context, dtype=torch.int32, device=device)
        cu = torch.arange(batch + 1, dtype=torch.int32, device=device) * query_len
        q = torch.randn(batch * query_len, HQ, D, device=device).bfloat16()
        meta = (tables, lens, cu)
        out = torch.empty_like(q)

        def bf16_fn():
            paged_attention(q, k, v, *meta, backend="triton", out=out, max_seq_len=context)

        bf16_fn()
        bf16_ms = triton.testing.do_bench_cudagraph(bf16_fn, rep=100, return_mode="median")
        rows.append(dict(case=name, variant="bf16 default", ms=bf16_ms, ratio=1.0))
        print(f"{name}: bf16 {bf16_ms * 1e3:.1f} us", flush=True)
        for layout in ("token-major", "head-major"):
            k8 = torch.empty(k.shape, dtype=fp8.FP8_DTYPE, device=device)
            v8 = torch.empty_like(k8)
            ks, vs = scales(k8, layout)
            write_kv_cache(k.view(-1, HKV, D), v.view(-1, HKV, D), k8, v8,
                           torch.arange(blocks * BLOCK, device=device), backend="triton",
                           k_scale=ks, v_scale=vs)
            ref = paged_attention(q, k8, v8, *meta, backend="torch", k_scale=ks, v_scale=vs)
            configs = [None] + [dict(BLOCK_N=n, num_warps=w, num_stages=st) for n, w, st in grid]
            for cfg, fp16_dot in itertools.product(configs, (False, True)):
                config = dict(cfg or {}, DOT_FP16=fp16_dot)

                def fn(config=config):
                    triton_attention.paged_attention(q, k8, v8, *meta, D ** -0.5, True, out,
                                                     max_seq_len=context, config=dict(config),
                                                     k_scale=ks, v_scale=vs)

                try:
                    fn()
                    err = rel(out, ref)
                    ms = triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
                except Exception as exc:  # out of shared memory for a large tile: skip
                    print(f"  skip {layout} {config}: {type(exc).__name__}", flush=True)
                    continue
                rows.append(dict(case=name, variant=f"fp8 {layout}", config=cfg or "default",
                                 fp16_dot=fp16_dot, ms=ms, ratio=ms / bf16_ms, rel_error=err))
            del k8, v8
        best = sorted((r for r in rows if r["case"] == name and "config" in r),
                      key=lambda r: r["ms"])[:6]
        default = [r for r in rows if r["case"] == name and r.get("config") == "default"]
        for r in default + best:
            print(f"  {r['variant']:<16} {str(r['config']):<52} fp16_dot={r['fp16_dot']!s:<5} "
                  f"{r['ms'] * 1e3:8.1f} us  x{r['ratio']:.3f}  err {r['rel_error']:.1e}",
                  flush=True)
        del k, v
        torch.cuda.empty_cache()
    write_json(Path(args.out) / "fp8_tune_gpu.json", dict(environment=environment(device),
                                                           rows=rows))


if __name__ == "__main__":
    main()
