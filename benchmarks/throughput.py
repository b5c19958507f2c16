"""Offline throughput: minivllm against Hugging Face `generate`, same requests, same process.

The workload (vLLM's "random" dataset, the usual way to compare engines): N requests with random prompt token ids,
input and output lengths uniform in ranges, a fixed seed, EOS ignored so every request generates exactly its output
length, greedy. At each level of --concurrency C (default: all N), every backend runs the first C requests at once:

* `minivllm`           `LLM` (continuous batching, paged KV cache, CUDA graphs, overlap): the C
                       requests submitted together, then engine steps until all are done;
* `hf_generate`        transformers `model.generate`: the C prompts as one left-padded batch
                       (or batches of --hf-batch-size); a batch runs to its longest output and only
                       the requested tokens count;
* `hf_generate_batch`  transformers continuous batching (its paged cache, the manager API); a run
                       cut by --hf-time-limit reports a lower bound and no ratio.

Each HF backend runs once per --hf-attn implementation: `sdpa`, and `minivllm` (minivllm's kernel inside
transformers, integrations/hf.py), whose greedy tokens are compared with sdpa's.

Per row: output and total tokens/s over the wall time, peak GPU memory; for minivllm TTFT/TPOT percentiles, the wall
time per kind of step, the Triton compilations during the timed run (must be 0), and the **workload roofline**, a
lower bound no schedule can beat, on this GPU:

    decode bytes  = max(output length) x weight bytes    (every decode step reads the weights)
                  + sum over generated tokens of the K/V bytes of its context (model dtype)
    prefill FLOPs = 2 x parameters x prompt tokens
    roofline      = decode bytes / copy bandwidth + prefill FLOPs / matmul rate

both rates measured in the same run; `roofline_fraction` = roofline / wall time. `ratios` puts
minivllm over each HF row of the same concurrency, and each variant over the first.

    python benchmarks/throughput.py                                    # GPU: qwen3-0.6b, 256 requests
    python benchmarks/throughput.py --variants "bf16:,fp8:kv_cache_dtype=fp8"
    python benchmarks/throughput.py --concurrency 64 --backends minivllm,hf_generate
    python benchmarks/throughput.py --model DIR --device cpu --backends minivllm,hf_generate \\
        --concurrency 1,8 --input-len 32 --output-len 64           # CPU: minivllm vs HF generate

Variants (`benchmarks/common.py`) run side by side, each in a process of its own.

Structured output is a variant: `sampling.structured_outputs` takes the fields of `StructuredOutputsParams` as JSON,
and such a request keeps its EOS (the grammar ends it). A JSON schema whose one string is longer than any output
keeps every request at its output length, the batch as full as without the grammar, and a bitmask to fill for every
row of every step:

    python benchmarks/throughput.py --num-requests 64 --output-len 512 --variants 'plain:,json:sampling.structured_outputs={"json":{"type":"object","properties":{"text":{"type":"string","minLength":1000000}},"required":["text"]}}'
"""

from __future__ import annotations

import argparse
import inspect
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `minivllm` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from minivllm import LLM, SamplingParams, StructuredOutputsParams
from minivllm.kernels import JitCounter

from benchmarks.common import (add_model_arguments, add_row, add_variant_arguments, agreement,
                               copy_bandwidth, finish, format_table, hf_generate, int_list, load_hf,
                               matmul_rate, names, parse_range, peak_memory, percentiles,
                               random_requests, release_memory, run_benchmark, sync, this_variant,
                               vocab_size, with_device_defaults)

BACKENDS = ("minivllm", "hf_generate", "hf_generate_batch")
GPU_DEFAULTS = {"num_requests": 256, "input_len": "100:1024", "output_len": "100:1024"}
CPU_DEFAULTS = {"num_requests": 8, "input_len": "16:64", "output_len": "8:32"}


def workload_roofline(prompts, out_lens, model, copy_bw: float, matmul: float) -> dict:
    """The lower bound of the module docstring, with its parts."""
    params = list(model.parameters())
    weights = sum(p.numel() * p.element_size() for p in params)
    kv_per_token = 2 * model.num_layers * model.num_kv_heads * model.head_dim * params[0].element_size()
    # Output token j of a request is sampled from a forward over its prompt and j earlier tokens.
    context_tokens = sum(n * len(p) + n * (n - 1) // 2 for p, n in zip(prompts, out_lens))
    decode_bytes = max(out_lens) * weights + context_tokens * kv_per_token
    prefill_flops = 2 * sum(p.numel() for p in params) * sum(len(p) for p in prompts)
    return {"workload_roofline_s": decode_bytes / copy_bw + prefill_flops / matmul,
            "decode_bytes": decode_bytes, "weight_bytes": weights, "prefill_flops": prefill_flops}


def row(backend: str, prompts, out_tokens: int, wall: float, device, **extra) -> dict:
    prompt_tokens = sum(len(p) for p in prompts)
    return {"backend": backend, "concurrency": len(prompts), "num_prompt_tokens": prompt_tokens,
            "num_output_tokens": out_tokens, "wall_time_s": wall,
            "output_tokens_per_s": out_tokens / wall,
            "total_tokens_per_s": (prompt_tokens + out_tokens) / wall,
            "peak_gpu_memory_bytes": peak_memory(device), **extra}


# ------------------------------------------------------------------------------------------
# minivllm
# ------------------------------------------------------------------------------------------
def make_llm(model_dir: Path, dtype: str, args, device, variant):
    engine_args = dict(
        dtype=dtype, device=device.type, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=max(args.max_num_batched_tokens, args.max_num_seqs),
        max_model_len=args.input_range[1] + args.output_range[1],
        gpu_memory_utilization=args.gpu_memory_utilization,
        enable_prefix_caching=False,  # random prompts share nothing; re-runs must not hit
        tensor_parallel_size=args.tensor_parallel_size)
    return LLM(str(model_dir), **{**engine_args, **variant.engine})


def sampling_params(n: int, sampling: dict):
    """Greedy, exactly n tokens with EOS ignored, then the variant's settings. With
    `structured_outputs` (a dict of StructuredOutputsParams' fields) EOS is kept: the grammar ends
    the output."""
    spec = sampling.get("structured_outputs")
    if spec is not None:
        sampling = {**sampling, "structured_outputs": StructuredOutputsParams(**spec)}
    return SamplingParams(**{"temperature": 0.0, "max_tokens": n, "ignore_eos": spec is None, **sampling})


def run_minivllm(llm, prompts, out_lens, device, sampling: dict) -> dict:
    """All requests at once, then engine steps until done (as LLM.generate), with every Triton
    compilation counted."""
    engine = llm.engine
    params = [sampling_params(n, sampling) for n in out_lens]
    before = engine.stats.step_stats()
    release_memory(device)
    sync(device)
    with JitCounter() as jit:
        start = time.perf_counter()
        ids = engine.add_requests(prompts, params)
        pending, outputs, steps = set(ids), {}, 0
        while pending:
            for out in engine.step():
                if out.request_id in pending:
                    pending.discard(out.request_id)
                    outputs[out.request_id] = out
            steps += 1
        sync(device)
        wall = time.perf_counter() - start
    after = engine.stats.step_stats()
    done = [outputs[i] for i in ids]
    kinds = {kind: {"time_s": after["step_kind_time_s"][kind] - before["step_kind_time_s"][kind],
                    "steps": after["step_kind_steps"][kind] - before["step_kind_steps"][kind]}
             for kind in after["step_kind_time_s"]}
    n0, n1 = before["num_steps"], after["num_steps"]  # host ms per step phase, this run's steps only
    phases = {phase: (mean * n1 - before["step_phases_ms"][phase] * n0) / max(n1 - n0, 1)
              for phase, mean in after["step_phases_ms"].items()}
    return row("minivllm", prompts, sum(len(o.token_ids) for o in done), wall, device,
               all_requests_complete=all(len(o.token_ids) == n for o, n in zip(done, out_lens)),
               ttft_s=percentiles([o.metrics.ttft for o in done]),
               tpot_s=percentiles([o.metrics.tpot for o in done]),
               num_steps=steps, step_kinds=kinds, step_phases_ms=phases,
               jit_compiles_during_run=jit.count if jit.available else None,
               cuda_graphs=llm.engine.executor.runner.graphs is not None, async_scheduling=engine.overlap,
               kv_cache_dtype=engine.config.kv_cache_spec.name,
               tensor_parallel_size=engine.config.model_config.tensor_parallel_size)


# ------------------------------------------------------------------------------------------
# Hugging Face
# ------------------------------------------------------------------------------------------
def run_hf_generate(model, attn: str, prompts, out_lens, batch_size: int, device) -> dict:
    hf_generate(model, prompts[:2], 4, device)  # warm-up: CUDA/cuBLAS, Triton compiles
    release_memory(device)
    sync(device)
    start = time.perf_counter()
    tokens = []
    for first in range(0, len(prompts), batch_size):
        lens = out_lens[first:first + batch_size]
        new = hf_generate(model, prompts[first:first + batch_size], max(lens), device)
        tokens += [t[:n] for t, n in zip(new, lens)]  # only the requested tokens count
    sync(device)
    wall = time.perf_counter() - start
    return row("hf_generate", prompts, sum(map(len, tokens)), wall, device, attn=attn,
               hf_batch_size=batch_size, token_ids=tokens)


def run_hf_generate_batch(model, attn: str, prompts, out_lens, device, time_limit) -> dict:
    """transformers' continuous batching with per-request output lengths, greedy, EOS off.

    The manager API of transformers 5.x (`continuous_batching_context_manager`, `add_request`,
    `get_result`), given only the keyword arguments the installed version accepts. No
    inference_mode: the manager's worker thread updates tensors made in this thread.
    """
    from transformers import GenerationConfig

    # eos_token_id=-1 never matches a token: the manager's "no EOS" value.
    config = GenerationConfig(do_sample=False, max_new_tokens=max(out_lens), eos_token_id=-1,
                              pad_token_id=model.config.pad_token_id or 0)
    manager_of = model.continuous_batching_context_manager
    accepted = inspect.signature(manager_of).parameters
    kwargs = {k: v for k, v in dict(generation_config=config, block=True, timeout=30).items()
              if k in accepted}
    release_memory(device)
    results, ids = {}, [f"req{i}" for i in range(len(prompts))]
    with manager_of(**kwargs) as manager:
        sync(device)
        start = time.perf_counter()
        for rid, prompt, n in zip(ids, prompts, out_lens):
            manager.add_request(input_ids=prompt, request_id=rid, max_new_tokens=n)
        while len(results) < len(prompts):
            if time_limit is not None and time.perf_counter() - start > time_limit:
                break
            result = manager.get_result(timeout=1)
            if result is None:
                if not manager.is_running():
                    raise RuntimeError("the continuous-batching thread stopped before finishing")
            elif result.is_finished():
                results[result.request_id] = list(result.generated_tokens)
        sync(device)
        wall = time.perf_counter() - start
        for rid in set(ids) - set(results):  # cut by the time limit
            if hasattr(manager, "cancel_request"):
                manager.cancel_request(rid)
    tokens = [results.get(rid) for rid in ids]
    record = row("hf_generate_batch", prompts, sum(len(t or []) for t in tokens), wall, device,
                 attn=attn, token_ids=tokens)
    if len(results) < len(prompts):  # cut by the time limit: a lower bound, never a ratio
        record.update(timed_out_after_s=time_limit, num_finished_requests=len(results),
                      lower_bound_output_tokens_per_s=record["output_tokens_per_s"],
                      output_tokens_per_s=None, total_tokens_per_s=None)
    return record


def hf_attn_names(attn: str, api: str) -> str | None:
    """transformers' name for attention implementation `attn` under `api` (None: cannot run)."""
    from minivllm.integrations import hf

    name = hf.register() if attn == "minivllm" else attn
    if api == "hf_generate":
        return name
    return hf.continuous_batching_name(name) if attn == "minivllm" else f"paged|{name}"


# ------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------
def measure(model_dir: Path, dtype: str, args, device, record: dict, out: Path) -> None:
    variant = this_variant(args)
    prompts, out_lens = random_requests(args.num_requests, args.input_range, args.output_range,
                                        vocab_size(model_dir), args.seed)

    def add(result: dict) -> None:
        add_row(record, out, {**result, "variant": variant.name})

    if "minivllm" in args.backends:
        record["copy_bandwidth_bytes_per_s"] = copy_bw = copy_bandwidth(device)
        record["matmul_flops_per_s"] = matmul = matmul_rate(device)
        llm = make_llm(model_dir, dtype, args, device, variant)
        warm = min(len(prompts), 4)  # kernels compiled at start-up; this warms the allocators
        run_minivllm(llm, [p[:16] for p in prompts[:warm]], [4] * warm, device, variant.sampling)
        for c in args.concurrency:
            result = run_minivllm(llm, prompts[:c], out_lens[:c], device, variant.sampling)
            result.update(workload_roofline(prompts[:c], out_lens[:c], llm.engine.executor.runner.model, copy_bw, matmul))
            result["roofline_fraction"] = result["workload_roofline_s"] / result["wall_time_s"]
            add(result)
        llm.close()
        del llm
        release_memory(device)
    first_tokens = {}  # (api, concurrency) -> the first attention's greedy tokens
    for attn, api in ((a, b) for a in args.hf_attn for b in args.backends if b.startswith("hf_")):
        try:
            name = hf_attn_names(attn, api)
            if name is None:
                raise RuntimeError("this transformers runs no registered attention in continuous "
                                   "batching (docs/hf_backend.md)")
            model = load_hf(model_dir, device, dtype, name)
        except Exception as err:  # noqa: BLE001 - a baseline that cannot run is a result
            add({"backend": api, "attn": attn, "error": f"{type(err).__name__}: {err}"})
            continue
        for c in args.concurrency:
            try:
                if api == "hf_generate":
                    result = run_hf_generate(model, attn, prompts[:c], out_lens[:c],
                                             args.hf_batch_size or c, device)
                else:
                    result = run_hf_generate_batch(model, attn, prompts[:c], out_lens[:c], device,
                                                   args.hf_time_limit)
            except Exception as err:  # noqa: BLE001 - as above
                add({"backend": api, "attn": attn, "concurrency": c, "error": f"{type(err).__name__}: {err}"})
                continue
            tokens = result.pop("token_ids")
            first = first_tokens.setdefault((api, c), tokens)
            if first is not tokens and None not in tokens + first:
                result["agreement_with_first_attn"] = agreement(tokens, first)
            add(result)
        del model
        release_memory(device)


def compare(results: list[dict]) -> list[dict]:
    """Output tokens/s ratios on the same requests (same concurrency): minivllm over each HF row
    of its variant; an HF row with another attention over the same with the first; every row of
    a later variant over the first variant's."""
    rows = [r for r in results if r.get("output_tokens_per_s")]
    first_variant = rows[0]["variant"] if rows else None
    first_attn = next((r["attn"] for r in rows if "attn" in r), None)
    out = []
    for r, base in ((r, b) for r in rows for b in rows if b["concurrency"] == r["concurrency"]):
        same_variant = base["variant"] == r["variant"]
        if ((same_variant and r["backend"] == "minivllm" != base["backend"])
                or (same_variant and base["backend"] == r["backend"] != "minivllm"
                    and base["attn"] == first_attn != r["attn"])
                or (base["variant"] == first_variant != r["variant"]
                    and (base["backend"], base.get("attn")) == (r["backend"], r.get("attn")))):
            out.append({"subject": _label(r), "baseline": _label(base), "concurrency": r["concurrency"],
                        "output_tokens_per_s_ratio": r["output_tokens_per_s"] / base["output_tokens_per_s"]})
    return out


def _label(r: dict) -> str:
    return f"{r['variant']}/{r['backend']}" + (f"[{r['attn']}]" if "attn" in r else "")


COLUMNS = [
    ("variant", "variant", ""), ("backend", "backend", ""), ("attn", "attn", ""),
    ("conc", "concurrency", "d"), ("out tok/s", "output_tokens_per_s", ",.1f"),
    ("total tok/s", "total_tokens_per_s", ",.1f"), ("wall s", "wall_time_s", ".2f"),
    ("roofline", "roofline_fraction", ".2f"),
    ("TTFT p50 s", lambda r: (r.get("ttft_s") or {}).get("p50"), ".3f"),
    ("TPOT p50 ms", lambda r: 1e3 * r["tpot_s"]["p50"] if r.get("tpot_s") else None, ".2f"),
    ("JIT", "jit_compiles_during_run", "d"),
    ("note", lambda r: r.get("error") or (f"timed out: {r['num_finished_requests']} done, >= "
                                          f"{r['lower_bound_output_tokens_per_s']:.1f} tok/s"
                                          if r.get("timed_out_after_s") else None), ""),
]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    add_variant_arguments(p)
    p.add_argument("--num-requests", type=int, default=None, help="default 256 on a GPU, 8 on the CPU")
    p.add_argument("--input-len", default=None, help="prompt lengths LOW:HIGH (default 100:1024)")
    p.add_argument("--output-len", default=None, help="output lengths LOW:HIGH (default 100:1024)")
    p.add_argument("--concurrency", default=None,
                   help="comma list: run the first C requests at once, per C (default: all)")
    p.add_argument("--backends", type=names(BACKENDS, "--backends"), default="minivllm",
                   help=f"comma list from {', '.join(BACKENDS)}")
    p.add_argument("--hf-attn", type=names(("sdpa", "minivllm"), "--hf-attn"), default="sdpa",
                   help="HF attention implementations: sdpa, minivllm")
    p.add_argument("--hf-batch-size", type=int, default=None,
                   help="hf_generate: requests per batched call (default: all C at once)")
    p.add_argument("--hf-time-limit", type=float, default=None,
                   help="seconds after which hf_generate_batch stops (reported as a lower bound)")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    p.add_argument("--max-num-seqs", type=int, default=None, help="default: the largest C, <= 256")
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    args = with_device_defaults(p, argv, GPU_DEFAULTS, CPU_DEFAULTS)
    args.input_range = parse_range(args.input_len, "--input-len")
    args.output_range = parse_range(args.output_len, "--output-len")
    args.concurrency = int_list(args.concurrency or str(args.num_requests), "--concurrency")
    if args.num_requests < max(args.concurrency):
        p.error(f"--concurrency {max(args.concurrency)} exceeds --num-requests {args.num_requests}")
    args.max_num_seqs = args.max_num_seqs or min(max(args.concurrency), 256)
    return args


def main(argv=None) -> dict:
    args, record, out = run_benchmark("throughput", __file__, argv, parse_args, measure)
    record["ratios"] = compare(record["results"])
    lines = [f"{q['subject']} / {q['baseline']} at concurrency {q['concurrency']}: "
             f"{q['output_tokens_per_s_ratio']:.2f}x output tokens/s" for q in record["ratios"]]
    for r in record["results"]:
        if "agreement_with_first_attn" in r:
            a = r["agreement_with_first_attn"]
            lines.append(f"{_label(r)} at concurrency {r['concurrency']}, greedy tokens against "
                         f"{args.hf_attn[0]}'s: exact {a['exact']:.2f}, common prefix {a['prefix']:.2f}, "
                         f"first token {a['first_token']:.2f}")
    finish(out, record, format_table(record["results"], COLUMNS), *lines)
    return record


if __name__ == "__main__":
    main()
