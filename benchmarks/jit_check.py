"""Does serving compile Triton kernels, and did keeping it from doing so cost speed? (GPU)

1. **Compilations.** A serving-like sequence of steps (decode batches of 1 to 256 sequences,
   mixed prefill + decode steps, chunked prefill, contexts up to 8k) with each step's metadata
   packed back to back into one flat int32 buffer, so the views start at offsets that change from
   step to step, as the engine packed them. Each kernel module is first warmed on its four
   variants (decode / mixed x one slice / split-KV, as `minivllm.kernels.warm_up` does); then
   every Triton compilation during the steps is counted (`minivllm.kernels.JitCounter`) and the
   slowest step is timed.
2. **Speed.** The same kernels at the attn_bench shapes (32 query / 8 KV heads, head_dim 128,
   block 16, bf16): median of CUDA-graph replays (`triton.testing.do_bench_cudagraph`, as
   attn_bench times them), and the largest difference between the two outputs.

With `--baseline FILE` an older `minivllm/kernels/triton_attention.py` (e.g. from `git show
<rev>:minivllm/kernels/triton_attention.py`) is measured in the same run, beside the current one.

    python benchmarks/jit_check.py --baseline /tmp/old_triton_attention.py --out benchmarks/results/
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import time
from pathlib import Path

import torch

from benchmarks.common import environment, write_json
from minivllm.kernels import JitCounter
from minivllm.kernels import triton_attention as current

HQ, HKV, D, BLOCK, DTYPE = 32, 8, 128, 16, torch.bfloat16
SPEED_CASES = [  # (name, query length per sequence, batch, context)
    ("decode B=64 ctx 4096", 1, 64, 4096),
    ("decode B=256 ctx 1024", 1, 256, 1024),
    ("decode B=1 ctx 32768", 1, 1, 32768),
    ("prefill 4 x 2048", 2048, 4, 2048),
]


def load_module(path: str):
    spec = importlib.util.spec_from_file_location("baseline_triton_attention", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def serving_steps(num_steps: int, seed: int) -> list[tuple[list[int], list[int]]]:
    """(query lengths, context lengths) per step: mostly decode, every third step mixed."""
    rng = random.Random(seed)
    steps = []
    for i in range(num_steps):
        batch = rng.choice([1, 2, 3, 7, 16, 17, 31, 64, 100, 128, 200, 256])
        seq_lens = [rng.randint(1, 4096) for _ in range(batch)]
        query_lens = [1] * batch
        if i % 3 == 2:  # a prefill chunk joins the decodes
            chunk = rng.randint(1, 512)
            query_lens.append(chunk)
            seq_lens.append(chunk + rng.choice([0, rng.randint(1, 8192 - chunk)]))
        steps.append((query_lens, seq_lens))
    return steps


def pack(tensors: list[torch.Tensor], offset: int, device) -> list[torch.Tensor]:
    """The tensors laid out back to back in one flat int32 buffer from element `offset`."""
    flat = torch.zeros(offset + sum(t.numel() for t in tensors), dtype=torch.int32)
    views, start = [], offset
    for t in tensors:
        flat[start:start + t.numel()] = t.flatten()
        start += t.numel()
    flat = flat.to(device)
    start = offset
    for t in tensors:
        views.append(flat[start:start + t.numel()].view(t.shape))
        start += t.numel()
    return views


def step_inputs(query_lens, seq_lens, num_blocks, offset, device, generator):
    max_blocks = max((s + BLOCK - 1) // BLOCK for s in seq_lens)
    tables = torch.randint(0, num_blocks, (len(seq_lens), max_blocks), generator=generator,
                           dtype=torch.int32)
    cu = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32)
    block_tables, lens, cu = pack([tables, torch.tensor(seq_lens, dtype=torch.int32), cu],
                                  offset, device)
    query = torch.randn(sum(query_lens), HQ, D, device=device, dtype=DTYPE)
    return query, block_tables, lens, cu


def warm(module, k_cache, v_cache, device):
    """The four variants, as minivllm.kernels.warm_up runs them."""
    for query_lens, seq_lens in (([1], [1]), ([2, 1], [2, 1])):
        query, tables, lens, cu = step_inputs(query_lens, seq_lens, 1, 0, device, None)
        for num_splits in (1, 2):
            module.paged_attention(query, k_cache, v_cache, tables, lens, cu, D ** -0.5, True,
                                   torch.empty_like(query), num_splits=num_splits)
    torch.cuda.synchronize()


def count_compilations(module, k_cache, v_cache, steps, device) -> dict:
    warm(module, k_cache, v_cache, device)
    generator = torch.Generator().manual_seed(0)
    inputs = [step_inputs(q, s, k_cache.shape[0], i % 5, device, generator)
              for i, (q, s) in enumerate(steps)]
    torch.cuda.synchronize()
    step_ms = []
    with JitCounter() as jit:
        for (query, tables, lens, cu), (_, seq_lens) in zip(inputs, steps):
            t0 = time.perf_counter()
            module.paged_attention(query, k_cache, v_cache, tables, lens, cu, D ** -0.5, True,
                                   torch.empty_like(query), max_seq_len=max(seq_lens))
            torch.cuda.synchronize()
            step_ms.append((time.perf_counter() - t0) * 1e3)
    return dict(steps=len(steps), compilations=jit.count, by_kernel=jit.by_kernel(),
                specializations=[f"{c.kernel}({c.specialization})" for c in jit.compilations],
                max_step_ms=max(step_ms), median_step_ms=sorted(step_ms)[len(step_ms) // 2])


def speed(modules: dict, device) -> list[dict]:
    import triton.testing

    rows = []
    for name, query_len, batch, context in SPEED_CASES:
        blocks_per_seq = context // BLOCK
        k_cache = torch.randn(batch * blocks_per_seq, BLOCK, HKV, D, device=device, dtype=DTYPE)
        v_cache = torch.randn_like(k_cache)
        tables = torch.randperm(batch * blocks_per_seq, device=device, dtype=torch.int32)
        tables = tables.view(batch, blocks_per_seq)
        lens = torch.full((batch,), context, dtype=torch.int32, device=device)
        cu = torch.arange(0, batch + 1, dtype=torch.int32, device=device) * query_len
        query = torch.randn(batch * query_len, HQ, D, device=device, dtype=DTYPE)
        row = dict(case=name)
        outs = {}
        for label, module in modules.items():
            out = torch.empty_like(query)

            def fn(module=module, out=out):
                module.paged_attention(query, k_cache, v_cache, tables, lens, cu, D ** -0.5, True,
                                       out, max_seq_len=context)

            fn()
            torch.cuda.synchronize()
            row[f"{label}_ms"] = triton.testing.do_bench_cudagraph(fn, rep=200,
                                                                   return_mode="median")
            outs[label] = out
        if "baseline" in outs:
            row["current_over_baseline"] = row["current_ms"] / row["baseline_ms"]
            row["max_abs_diff"] = float((outs["current"].float() - outs["baseline"].float())
                                        .abs().max())
        rows.append(row)
        del k_cache, v_cache
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", help="an older minivllm/kernels/triton_attention.py to compare with")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", default="benchmarks/results", help="folder for the JSON")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("jit_check.py needs a CUDA device (Triton compiles only there)")
    device = torch.device("cuda")
    modules = {"current": current}
    if args.baseline:
        modules = {"baseline": load_module(args.baseline), "current": current}
    num_blocks = 256 * 4096 // BLOCK + 64
    k_cache = torch.randn(num_blocks, BLOCK, HKV, D, device=device, dtype=DTYPE)
    v_cache = torch.randn_like(k_cache)
    steps = serving_steps(args.steps, seed=0)
    compiles = {label: count_compilations(m, k_cache, v_cache, steps, device)
                for label, m in modules.items()}
    del k_cache, v_cache
    torch.cuda.empty_cache()
    rows = speed(modules, device)
    path = Path(args.out) / "jit_check_gpu.json"
    write_json(path, dict(environment=environment(device), compilations=compiles, speed=rows))
    print(f"wrote {path}\n")
    print(f"{'kernels':<10} {'steps':>5} {'compilations':>12} {'slowest step ms':>16} "
          f"{'median step ms':>15}")
    for label, c in compiles.items():
        print(f"{label:<10} {c['steps']:>5} {c['compilations']:>12} {c['max_step_ms']:>16.1f} "
              f"{c['median_step_ms']:>15.2f}")
    print()
    header = f"{'case':<24}" + "".join(f"{label + ' ms':>14}" for label in modules)
    print(header + (f"{'current/base':>13} {'max |diff|':>11}" if args.baseline else ""))
    for r in rows:
        line = f"{r['case']:<24}" + "".join(f"{r[label + '_ms']:>14.4f}" for label in modules)
        if args.baseline:
            line += f"{r['current_over_baseline']:>13.3f} {r['max_abs_diff']:>11.2e}"
        print(line)


if __name__ == "__main__":
    main()
