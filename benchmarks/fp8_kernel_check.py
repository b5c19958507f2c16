"""The fp8 KV cache on the GPU: correctness against the reference, accuracy against bf16, speed.

For each case (the attn_bench shapes: 32 query / 8 KV heads, head_dim 128, block 16, shuffled
block tables), a bf16 paged cache of random K/V is written into an fp8 cache by the Triton write
kernel, then

* `kernel_vs_reference`: the Triton kernel on the fp8 cache against the reference on the same
  fp8 cache (what the kernel alone adds: rounding of the probabilities, as for bf16);
* `fp8_vs_bf16_reference` and `bf16_vs_bf16_reference`: the Triton kernel on the fp8 and on the
  bf16 cache against the reference on the bf16 cache (fp32 math): what fp8 storage costs;
* time of the Triton kernel on each cache (median of CUDA-graph replays,
  `triton.testing.do_bench_cudagraph`, as attn_bench times them), their ratio, and the bytes each
  must read (K/V, plus the fp8 scales) over that time, as a fraction of a device-to-device copy
  bandwidth measured in the same run.

The issue's target: decode B=64 / context 4096 with an fp8 cache in <= 0.55x the bf16 time.

    python benchmarks/fp8_kernel_check.py --out benchmarks/results/
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from benchmarks.common import environment, measure_copy_bandwidth, write_json
from minivllm.kernels import fp8, paged_attention, write_kv_cache

HQ, HKV, D, BLOCK = 32, 8, 128, 16
CASES = [  # (name, query length per sequence, batch, context)
    ("decode B=64 ctx 4096", 1, 64, 4096),
    ("decode B=256 ctx 1024", 1, 256, 1024),
    ("decode B=1 ctx 32768", 1, 1, 32768),
    ("prefill 4 x 2048", 2048, 4, 2048),
    ("chunked prefill 4 x 512 over 8192", 512, 4, 8192),
]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def make_case(query_len: int, batch: int, context: int, device, seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    blocks_per_seq = context // BLOCK
    num_blocks = batch * blocks_per_seq
    k = torch.randn(num_blocks, BLOCK, HKV, D, device=device, generator=g).bfloat16()
    v = torch.randn(num_blocks, BLOCK, HKV, D, device=device, generator=g).bfloat16()
    tables = torch.randperm(num_blocks, device=device, generator=g).to(torch.int32)
    tables = tables.view(batch, blocks_per_seq)
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    cu = torch.arange(batch + 1, dtype=torch.int32, device=device) * query_len
    query = torch.randn(batch * query_len, HQ, D, device=device, generator=g).bfloat16()
    # The fp8 cache holds the same tokens, quantized by the Triton write kernel.
    k8 = torch.empty(k.shape, dtype=fp8.FP8_DTYPE, device=device)
    v8 = torch.empty_like(k8)
    k_scale, v_scale = fp8.empty_scales(k8)
    write_kv_cache(k.view(-1, HKV, D), v.view(-1, HKV, D), k8, v8,
                   torch.arange(num_blocks * BLOCK, device=device), backend="triton",
                   k_scale=k_scale, v_scale=v_scale)
    return query, (k, v, {}), (k8, v8, dict(k_scale=k_scale, v_scale=v_scale)), tables, seq_lens, cu


def run_case(name, query_len, batch, context, device, copy_gbps) -> dict:
    import triton.testing

    query, bf16, fp8_cache, tables, seq_lens, cu = make_case(query_len, batch, context, device)
    meta = (tables, seq_lens, cu)
    reference = paged_attention(query, bf16[0], bf16[1], *meta, backend="torch")
    row = dict(case=name, batch=batch, context=context, query_len=query_len)
    outs = {}
    for label, (k, v, scales) in (("bf16", bf16), ("fp8", fp8_cache)):
        out = torch.empty_like(query)

        def fn(k=k, v=v, scales=scales, out=out):
            paged_attention(query, k, v, *meta, backend="triton", out=out, max_seq_len=context,
                            **scales)

        fn()
        torch.cuda.synchronize()
        outs[label] = out
        ms = triton.testing.do_bench_cudagraph(fn, rep=200, return_mode="median")
        kv_bytes = 2 * batch * context * HKV * D * k.element_size()
        kv_bytes += sum(s.element_size() * batch * context * HKV for s in scales.values())
        row[f"{label}_ms"] = ms
        row[f"{label}_bytes"] = kv_bytes
        row[f"{label}_frac_copy_bw"] = kv_bytes / (ms * 1e-3) / 1e9 / copy_gbps
    fp8_reference = paged_attention(query, fp8_cache[0], fp8_cache[1], *meta, backend="torch",
                                    **fp8_cache[2])
    row["fp8_over_bf16_time"] = row["fp8_ms"] / row["bf16_ms"]
    row["kernel_vs_reference"] = rel(outs["fp8"], fp8_reference)
    row["fp8_vs_bf16_reference"] = rel(outs["fp8"], reference)
    row["bf16_vs_bf16_reference"] = rel(outs["bf16"], reference)
    row["fp8_finite"] = bool(torch.isfinite(outs["fp8"]).all())
    return row


def write_timing(device) -> dict:
    """write_kv_cache of 256 tokens into a bf16 and an fp8 cache (the quantizing write)."""
    import triton.testing

    key = torch.randn(256, HKV, D, device=device).bfloat16()
    slots = torch.randperm(4096 * BLOCK, device=device)[:256]
    k = torch.empty(4096, BLOCK, HKV, D, device=device, dtype=torch.bfloat16)
    k8 = torch.empty(k.shape, device=device, dtype=fp8.FP8_DTYPE)
    k_scale, v_scale = fp8.empty_scales(k8)
    times = {}
    for label, caches, scales in (("bf16", (k, k.clone()), {}),
                                  ("fp8", (k8, k8.clone()), dict(k_scale=k_scale,
                                                                 v_scale=v_scale))):
        def fn(caches=caches, scales=scales):
            write_kv_cache(key, key, *caches, slots, backend="triton", **scales)

        fn()
        times[f"write_256_tokens_{label}_ms"] = triton.testing.do_bench_cudagraph(
            fn, rep=100, return_mode="median")
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results", help="folder for the JSON")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("fp8_kernel_check.py needs a CUDA device")
    device = torch.device("cuda")
    copy_gbps = measure_copy_bandwidth(device) / 1e9
    rows = []
    for case in CASES:
        rows.append(run_case(*case, device, copy_gbps))
        torch.cuda.empty_cache()
    writes = write_timing(device)
    path = Path(args.out) / "fp8_kernel_check_gpu.json"
    write_json(path, dict(environment=environment(device), copy_gbps=copy_gbps, cases=rows,
                          writes=writes, target="decode B=64 ctx 4096: fp8 <= 0.55x bf16 time"))
    print(f"wrote {path}; copy bandwidth {copy_gbps:.0f} GB/s")
    print(", ".join(f"{k} {v * 1e3:.1f} us" for k, v in writes.items()))
    print(f"\n{'case':<34} {'bf16 ms':>8} {'fp8 ms':>8} {'fp8/bf16':>8} {'bf16 BW':>7} "
          f"{'fp8 BW':>7} {'kern/ref':>9} {'fp8 err':>8} {'bf16 err':>8}")
    for r in rows:
        print(f"{r['case']:<34} {r['bf16_ms']:>8.4f} {r['fp8_ms']:>8.4f} "
              f"{r['fp8_over_bf16_time']:>8.3f} {r['bf16_frac_copy_bw']:>7.2f} "
              f"{r['fp8_frac_copy_bw']:>7.2f} {r['kernel_vs_reference']:>9.1e} "
              f"{r['fp8_vs_bf16_reference']:>8.1e} {r['bf16_vs_bf16_reference']:>8.1e}")
    print("BW: bytes read over time / copy bandwidth; kern/ref: fp8 kernel vs fp8 reference; "
          "err: vs the reference on the bf16 cache")


if __name__ == "__main__":
    main()
