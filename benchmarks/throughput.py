"""Offline throughput: minivllm vs Hugging Face `generate` and continuous batching, same prompts.

The workload (vLLM's "random" dataset, the usual way to compare engines): N requests whose
prompts are random token ids and whose input and output lengths are drawn uniformly from ranges,
with a fixed seed, and EOS ignored so every request generates exactly its output length. All
backends decode greedily and run one after another in this process on the same requests:

* `minivllm`          LLM with continuous batching, paged KV cache, CUDA graphs (unless
                      --enforce-eager), all requests submitted at once;
* `hf_generate`       transformers `model.generate` on static, left-padded batches of
                      --hf-batch-size requests in request order; each batch runs until its longest
                      output is done, and only the requested tokens count as output;
* `hf_generate_batch` transformers continuous batching (paged cache), through
                      `continuous_batching_context_manager`; if it cannot run here, the record
                      says why instead of the benchmark crashing.

Reported per backend: output tokens/s and total (prompt + output) tokens/s over the wall time,
peak GPU memory, and for minivllm the TTFT/TPOT percentiles, the KV-cache waste sampled during
the run, the wall time per kind of step (prefill-only, decode-only, mixed), the Triton
compilations during the timed run (`jit_compiles_during_run`, which must be 0), and the
**workload roofline**: a lower bound no schedule can beat, measured against this very GPU:

    decode bytes  = max(output length) x weight bytes      (every decode step reads the weights,
                                                            and there are at least that many)
                  + sum over generated tokens of the K/V bytes of its context
    prefill FLOPs = 2 x parameters x prompt tokens
    roofline      = decode bytes / copy bandwidth + prefill FLOPs / bf16 matmul rate

both rates measured in the same run (`common.py`). `roofline_fraction` = roofline / wall time. Ratios compare minivllm against each baseline on the *same* requests: when the HF
baselines run on a subset (--hf-num-requests, because they are slow), minivllm runs that subset
too and the ratio uses that run; the full-workload minivllm record stays as measured.

    python benchmarks/throughput.py                                   # GPU: qwen3-0.6b, 256 reqs
    python benchmarks/throughput.py --model-config llama-3.2-1b --hf-num-requests 64
    python benchmarks/throughput.py --backends minivllm --num-requests 512 --input-len 128:512
    python benchmarks/throughput.py --model-config tiny --num-requests 8    # the CPU smoke test

Without a GPU the defaults shrink to a tiny model and a handful of short requests; those numbers
are no GPU claim. JSON goes to benchmarks/results/ (or --out), a table is printed last.
"""

from __future__ import annotations

import argparse
import inspect
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `minivllm` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (
    MODEL_CONFIGS,
    default_out,
    environment,
    measure_copy_bandwidth,
    measure_matmul_rate,
    parse_range,
    release_memory,
    setup_model,
    write_json,
)

BACKENDS = ("minivllm", "hf_generate", "hf_generate_batch")
# Sampling the KV waste walks every held block table on the host, inside the timed loop, where it
# delays the next step (about 10 ms at 256 sequences): rarely enough that it costs nothing visible.
WASTE_SAMPLE_EVERY = 128
GPU_DEFAULTS = {"model_config": "qwen3-0.6b", "num_requests": 256, "input_len": "100:1024", "output_len": "100:1024"}
CPU_DEFAULTS = {"model_config": "tiny", "num_requests": 8, "input_len": "16:64", "output_len": "8:32"}


# ------------------------------------------------------------------------------------------
# Workload
# ------------------------------------------------------------------------------------------
def make_workload(num_requests: int, input_len: tuple[int, int], output_len: tuple[int, int],
                  vocab_size: int, seed: int) -> tuple[list[list[int]], list[int]]:
    """Random prompt token ids and output lengths; the same seed gives the same requests."""
    rng = np.random.default_rng(seed)
    in_lens = rng.integers(input_len[0], input_len[1], endpoint=True, size=num_requests)
    out_lens = rng.integers(output_len[0], output_len[1], endpoint=True, size=num_requests)
    # Ids from 10 up keep clear of the special tokens at the bottom of the vocabulary.
    prompts = [rng.integers(10, vocab_size, size=n).tolist() for n in in_lens]
    return prompts, out_lens.tolist()


def workload_roofline(prompts, out_lens, model, copy_bandwidth: float, matmul_rate: float) -> dict:
    """The lower bound of the module docstring, with its parts."""
    params = list(model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in params)
    num_params = sum(p.numel() for p in params)
    kv_bytes_per_token = (2 * model.num_layers * model.num_kv_heads * model.head_dim
                          * params[0].element_size())
    # Output token j of a request is sampled from a forward over its prompt and j earlier tokens.
    context_tokens = sum(n * len(p) + n * (n - 1) // 2 for p, n in zip(prompts, out_lens))
    decode_bytes = max(out_lens) * weight_bytes + context_tokens * kv_bytes_per_token
    prefill_flops = 2 * num_params * sum(len(p) for p in prompts)
    return {
        "workload_roofline_s": decode_bytes / copy_bandwidth + prefill_flops / matmul_rate,
        "decode_bytes": decode_bytes,
        "weight_bytes": weight_bytes,
        "kv_context_token_reads": context_tokens,
        "kv_bytes_per_token": kv_bytes_per_token,
        "prefill_flops": prefill_flops,
        "copy_bandwidth_bytes_per_s": copy_bandwidth,
        "matmul_flops_per_s": matmul_rate,
    }


def percentiles(values: list[float]) -> dict | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    p = np.percentile(values, [50, 90, 99])
    return {"mean": float(np.mean(values)), "p50": float(p[0]), "p90": float(p[1]), "p99": float(p[2])}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    release_memory(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def _record(backend: str, prompts, out_tokens: int, wall: float, device, **extra) -> dict:
    prompt_tokens = sum(len(p) for p in prompts)
    return {
        "bench": "throughput",
        "backend": backend,
        "num_requests": len(prompts),
        "num_prompt_tokens": prompt_tokens,
        "num_output_tokens": out_tokens,
        "wall_time_s": wall,
        "output_tokens_per_s": out_tokens / wall,
        "total_tokens_per_s": (prompt_tokens + out_tokens) / wall,
        "peak_gpu_memory_bytes": _peak(device),
        **extra,
    }


# ------------------------------------------------------------------------------------------
# minivllm
# ------------------------------------------------------------------------------------------
def make_llm(model_dir: Path, args, max_model_len: int, kv_cache_dtype: str = "auto"):
    from minivllm import LLM

    return LLM(
        str(model_dir),
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=max(args.max_num_batched_tokens, args.max_num_seqs),
        max_model_len=max_model_len,
        gpu_memory_utilization=args.gpu_memory_utilization,
        enable_prefix_caching=False,  # random prompts share nothing, and re-runs must not hit
        enforce_eager=args.enforce_eager,
        async_scheduling=not args.no_overlap,
        kv_cache_dtype=kv_cache_dtype,
    )


def run_minivllm(llm, prompts, out_lens, device, desc: str = "minivllm") -> dict:
    """All requests submitted at once, then engine steps until done (like LLM.generate), with the
    KV-cache waste sampled every WASTE_SAMPLE_EVERY steps while requests are running, and every Triton
    compilation counted."""
    from minivllm import SamplingParams
    from minivllm.kernels import JitCounter
    from minivllm.observe import kv_cache_stats

    engine = llm.engine
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in out_lens]
    before = engine.stats.step_stats()
    _sync(device)
    with JitCounter() as jit:
        start = time.perf_counter()
        request_ids = engine.add_requests(prompts, params)
        pending, outputs, waste, steps = set(request_ids), {}, [], 0
        with tqdm(total=len(prompts), desc=desc, unit="req", leave=False) as bar:
            while pending:
                for out in engine.step():
                    if out.request_id in pending:
                        pending.discard(out.request_id)
                        outputs[out.request_id] = out
                        bar.update(1)
                steps += 1
                if steps % WASTE_SAMPLE_EVERY == 0 and pending:
                    waste.append(kv_cache_stats(engine.block_manager, engine.scheduler.running)["fragmentation"])
        _sync(device)
        wall = time.perf_counter() - start
    after = engine.stats.step_stats()
    results = [outputs[r] for r in request_ids]
    out_tokens = sum(len(o.token_ids) for o in results)
    runner = engine.model_runner
    step_kinds = {kind: {"time_s": after["step_kind_time_s"][kind] - before["step_kind_time_s"][kind],
                         "steps": after["step_kind_steps"][kind] - before["step_kind_steps"][kind]}
                  for kind in after["step_kind_time_s"]}
    return _record(
        "minivllm", prompts, out_tokens, wall, device,
        all_requests_complete=all(len(o.token_ids) == n for o, n in zip(results, out_lens)),
        ttft_s=percentiles([o.metrics.ttft for o in results]),
        tpot_s=percentiles([o.metrics.tpot for o in results]),
        cuda_graphs=runner.graphs is not None,
        async_scheduling=engine.overlap,
        num_steps=steps,
        step_kinds=step_kinds,
        jit_compiles_during_run=jit.count if jit.available else None,
        jit_compilations=[f"{c.kernel}: {c.specialization}" for c in jit.compilations] if jit.available else jit.reason,
        kv_waste_fraction=percentiles(waste),
        engine={
            "dtype": str(runner.dtype).removeprefix("torch."),
            "num_kv_blocks": runner.num_kv_blocks,
            "kv_cache_bytes": runner.num_kv_blocks * runner.kv_bytes_per_block,
            **{k: v for k, v in llm.engine.config.to_dict()["scheduler"].items() if k != "history_size"},
            "block_size": llm.engine.config.cache_config.block_size,
            "gpu_memory_utilization": llm.engine.config.cache_config.gpu_memory_utilization,
            "prefix_caching": False,
        },
    )


# ------------------------------------------------------------------------------------------
# Hugging Face
# ------------------------------------------------------------------------------------------
def load_hf(model_dir: Path, device, dtype, attn_implementation: str | None = None):
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    return AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs).to(device).eval()


def _left_pad(batch: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, p in enumerate(batch):
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = 1
    return ids.to(device), mask.to(device)


@torch.inference_mode()
def _hf_generate_batch(model, batch, max_new_tokens: int, pad_id: int, device) -> torch.Tensor:
    ids, mask = _left_pad(batch, pad_id, device)
    # min_new_tokens = max_new_tokens: EOS is suppressed, every row runs to the end (ignore_eos).
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                         min_new_tokens=max_new_tokens, pad_token_id=pad_id)
    return out[:, ids.shape[1]:]


def run_hf_generate(model_dir, prompts, out_lens, device, dtype, batch_size: int) -> dict:
    model = load_hf(model_dir, device, dtype)
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    _hf_generate_batch(model, prompts[:2], 4, pad_id, device)  # warm-up: CUDA/cuBLAS initialisation
    _reset_peak(device)
    _sync(device)
    start = time.perf_counter()
    useful = computed = 0
    for first in tqdm(range(0, len(prompts), batch_size), desc="hf_generate", unit="batch", leave=False):
        batch, lens = prompts[first:first + batch_size], out_lens[first:first + batch_size]
        new = _hf_generate_batch(model, batch, max(lens), pad_id, device)
        computed += new.numel()
        useful += sum(min(n, new.shape[1]) for n in lens)
    _sync(device)
    wall = time.perf_counter() - start
    record = _record("hf_generate", prompts, useful, wall, device, batch_size=batch_size,
                     num_computed_output_tokens=computed,
                     batching="static batches in request order, left padding; a batch runs to its "
                              "longest output and only the requested tokens count as output")
    del model
    return record


def run_hf_generate_batch(model_dir, prompts, out_lens, device, dtype, time_limit: float | None) -> dict:
    """transformers continuous batching with per-request output lengths, greedy, EOS off.

    Uses the manager API that transformers 5.x has had throughout (`continuous_batching_context_
    manager`, `add_request(input_ids, request_id, max_new_tokens)`, `get_result`), passing only
    the keyword arguments the installed version accepts. Model loading, the manager's warm-up
    (its CUDA-graph capture) and its shutdown are outside the timed region.
    """
    from transformers import GenerationConfig

    try:
        model = load_hf(model_dir, device, dtype, attn_implementation="paged|sdpa")
        attn = "paged|sdpa"
    except Exception:  # noqa: BLE001 - a version without that name: let the manager pick its own
        model = load_hf(model_dir, device, dtype)
        attn = getattr(model.config, "_attn_implementation", None)
    # eos_token_id=-1 never matches a token: the documented "no EOS" value of the manager.
    gen_config = GenerationConfig(do_sample=False, max_new_tokens=max(out_lens), eos_token_id=-1,
                                  pad_token_id=model.config.pad_token_id or 0)
    cm = model.continuous_batching_context_manager
    accepted = inspect.signature(cm).parameters
    kwargs = {k: v for k, v in {"generation_config": gen_config, "block": True, "timeout": 30}.items()
              if k in accepted}
    _reset_peak(device)
    results, timed_out = {}, False
    # No inference_mode here: the manager allocates its static tensors in this thread and updates
    # them in place from its own worker thread, where inference mode is off (transformers 5.17
    # then refuses the update: "Inplace update to inference tensor outside InferenceMode").
    with cm(**kwargs) as manager:
        _sync(device)
        start = time.perf_counter()
        ids = [f"req{i}" for i in range(len(prompts))]
        for rid, prompt, n in zip(ids, prompts, out_lens):
            manager.add_request(input_ids=prompt, request_id=rid, max_new_tokens=n)
        with tqdm(total=len(prompts), desc="hf_generate_batch", unit="req", leave=False) as bar:
            while len(results) < len(prompts):
                if time_limit is not None and time.perf_counter() - start > time_limit:
                    timed_out = True
                    break
                result = manager.get_result(timeout=1)
                if result is None:
                    if not manager.is_running():
                        raise RuntimeError("the continuous-batching thread stopped before finishing")
                    continue
                if result.is_finished() and result.request_id not in results:
                    if getattr(result, "error", None):
                        raise RuntimeError(f"request {result.request_id} failed: {result.error}")
                    results[result.request_id] = result
                    bar.update(1)
        _sync(device)
        wall = time.perf_counter() - start
        if timed_out and hasattr(manager, "cancel_request"):
            for rid in ids:
                if rid not in results:
                    manager.cancel_request(rid)
    done = [len(r.generated_tokens) for r in results.values()]
    record = _record("hf_generate_batch", prompts, sum(done), wall, device, attn_implementation=attn,
                     all_requests_complete=not timed_out and all(
                         len(results[r].generated_tokens) == n for r, n in zip(ids, out_lens)))
    if timed_out:
        # Only finished requests were counted: tokens/s over this wall time is a lower bound and
        # is not compared with anything.
        record.update(timed_out_after_s=time_limit, num_finished_requests=len(results),
                      output_tokens_per_s=None, total_tokens_per_s=None,
                      lower_bound_output_tokens_per_s=sum(done) / wall)
    del model
    return record


# ------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-config", choices=sorted(MODEL_CONFIGS), default=None,
                   help="model shape (random weights); default qwen3-0.6b on GPU, tiny on CPU")
    p.add_argument("--num-requests", type=int, default=None, help="default 256 on GPU, 8 on CPU")
    p.add_argument("--input-len", default=None, help="prompt lengths LOW:HIGH (default 100:1024 on GPU)")
    p.add_argument("--output-len", default=None, help="output lengths LOW:HIGH (default 100:1024 on GPU)")
    p.add_argument("--backends", default=",".join(BACKENDS), help=f"comma-separated subset of {BACKENDS}")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/...)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--model-dir", type=Path, default=None,
                   help="where to build/reuse the random model (default: a temporary directory)")
    p.add_argument("--hf-num-requests", type=int, default=None,
                   help="run the HF baselines (and a matching minivllm run) on the first K requests only")
    p.add_argument("--hf-batch-size", type=int, default=None, help="hf_generate static batch size (default 64)")
    p.add_argument("--hf-time-limit", type=float, default=None,
                   help="seconds after which hf_generate_batch stops; counted as incomplete, no ratio")
    p.add_argument("--max-num-seqs", type=int, default=None, help="minivllm (default: all requests, <= 256)")
    p.add_argument("--max-num-batched-tokens", type=int, default=8192, help="minivllm token budget per step")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--enforce-eager", action="store_true", help="minivllm without CUDA graphs")
    p.add_argument("--kv-cache-dtypes", default="auto",
                   help="minivllm KV cache dtypes to run one after the other, e.g. auto,fp8; every "
                        "record's roofline_fraction is against the model-dtype workload roofline")
    p.add_argument("--no-overlap", action="store_true",
                   help="minivllm with async_scheduling=False: each step runs start to finish")
    p.add_argument("--warmup-requests", type=int, default=4,
                   help="minivllm: tiny untimed requests before the timed run (the engine compiles "
                        "its kernels itself at start-up; this only warms allocators)")
    args = p.parse_args(argv)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown or not backends:
        p.error(f"--backends: unknown {unknown}; choose from {BACKENDS}")
    args.backends = backends
    args.kv_cache_dtypes = [d.strip() for d in args.kv_cache_dtypes.split(",") if d.strip()]
    if not args.kv_cache_dtypes or any(d not in ("auto", "fp8") for d in args.kv_cache_dtypes):
        p.error(f"--kv-cache-dtypes: choose from auto, fp8; got {args.kv_cache_dtypes!r}")
    return args


def resolve(args) -> tuple[argparse.Namespace, torch.device]:
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        if args.device == "cuda" and not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is available")
        device = torch.device(args.device)
    defaults = GPU_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.num_requests < 1:
        raise SystemExit(f"--num-requests must be >= 1, got {args.num_requests}")
    try:
        args.input_range = parse_range(args.input_len, "--input-len")
        args.output_range = parse_range(args.output_len, "--output-len")
    except ValueError as err:
        raise SystemExit(str(err)) from None
    if args.hf_num_requests is not None and not 1 <= args.hf_num_requests:
        raise SystemExit(f"--hf-num-requests must be >= 1, got {args.hf_num_requests}")
    args.hf_num_requests = min(args.hf_num_requests or args.num_requests, args.num_requests)
    args.hf_batch_size = args.hf_batch_size or 64
    args.max_num_seqs = args.max_num_seqs or min(args.num_requests, 256)
    return args, device


def main(argv=None) -> dict:
    args, device = resolve(parse_args(argv))
    model_dir, dtype, note = setup_model(args.model_config, args.model_dir, device, args.seed, "minivllm-bench-")

    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(str(model_dir)).vocab_size
    prompts, out_lens = make_workload(args.num_requests, args.input_range, args.output_range, vocab, args.seed)
    k = args.hf_num_requests
    subset = (prompts[:k], out_lens[:k])
    max_model_len = args.input_range[1] + args.output_range[1]
    common = {
        "model_config": args.model_config,
        "dtype": str(dtype).removeprefix("torch."),
        "input_len": list(args.input_range),
        "output_len": list(args.output_range),
        "seed": args.seed,
        "sampling": "greedy, ignore_eos",
        **environment(device),
        "note": note,
    }
    out_path = args.out or default_out("throughput", args.model_config, device)
    payload = {"bench": "throughput", "records": [], "ratios": [], **common}

    def add(record: dict, subset_of: int | None = None) -> None:
        record.update(common, subset_of=subset_of)
        payload["records"].append(record)
        payload["ratios"] = ratios(payload["records"])
        write_json(out_path, payload)  # after every backend: a later crash loses nothing measured

    roofline = None  # the workload's, with K/V in the model's dtype: the same bar for every cache dtype
    for kv_cache_dtype in args.kv_cache_dtypes if "minivllm" in args.backends else []:
        _reset_peak(device)
        llm = make_llm(model_dir, args, max_model_len, kv_cache_dtype)
        # The engine compiled its kernels when it started (kernels.warm_up, CUDA-graph capture);
        # a few tiny untimed requests only warm the allocators. The timed run counts any Triton
        # compilation that still happens: it must be none.
        warm = min(len(prompts), args.warmup_requests)
        if warm:
            run_minivllm(llm, [p[:16] for p in prompts[:warm]], [4] * warm, device, "warm-up")
        _reset_peak(device)
        record = run_minivllm(llm, prompts, out_lens, device, f"minivllm ({kv_cache_dtype} KV)")
        if roofline is None:
            roofline = workload_roofline(prompts, out_lens, llm.engine.model_runner.model,
                                         measure_copy_bandwidth(device), measure_matmul_rate(device))
        record.update(roofline, kv_cache_dtype=llm.engine.kv_cache_dtype,
                      roofline_fraction=roofline["workload_roofline_s"] / record["wall_time_s"])
        add(record)
        if k < args.num_requests and any(b != "minivllm" for b in args.backends):
            add(run_minivllm(llm, *subset, device, f"minivllm ({k} requests)"), subset_of=args.num_requests)
        del llm
    hf_subset_of = args.num_requests if k < args.num_requests else None
    if "hf_generate_batch" in args.backends:
        _reset_peak(device)
        try:
            record = run_hf_generate_batch(model_dir, *subset, device, dtype, args.hf_time_limit)
        except Exception as err:  # noqa: BLE001 - an unavailable baseline is a result, not a crash
            record = {"bench": "throughput", "backend": "hf_generate_batch", "num_requests": k,
                      "output_tokens_per_s": None, "total_tokens_per_s": None,
                      "error": f"{type(err).__name__}: {err}"}
            print(f"hf_generate_batch could not run: {record['error']}")
        add(record, subset_of=hf_subset_of)
    if "hf_generate" in args.backends:
        _reset_peak(device)
        add(run_hf_generate(model_dir, *subset, device, dtype, args.hf_batch_size), subset_of=hf_subset_of)
    print(f"\nwrote {out_path}")
    print(format_table(payload))
    return payload


def ratios(records: list[dict]) -> list[dict]:
    """minivllm / baseline for each baseline, on the same requests (same num_requests), with
    minivllm's K/V in the model's dtype; and minivllm with an fp8 cache / with the model's dtype."""
    ours = {r["num_requests"]: r for r in records
            if r["backend"] == "minivllm" and r.get("kv_cache_dtype") != "fp8_e4m3"}
    out = []
    for r in records:
        mine = ours.get(r["num_requests"])
        if mine is None or not r.get("output_tokens_per_s") or r is mine:
            continue
        if r["backend"] == "minivllm":  # the fp8 cache against the model-dtype cache
            mine, r = r, mine
        out.append({
            "subject": "minivllm" if mine["backend"] != "minivllm" or mine is ours.get(r["num_requests"])
            else f"minivllm ({mine.get('kv_cache_dtype')} KV)",
            "baseline": r["backend"] if r["backend"] != "minivllm" else f"minivllm ({r.get('kv_cache_dtype')} KV)",
            "num_requests": r["num_requests"],
            "output_tokens_per_s_ratio": mine["output_tokens_per_s"] / r["output_tokens_per_s"],
            "total_tokens_per_s_ratio": mine["total_tokens_per_s"] / r["total_tokens_per_s"],
        })
    return out


def format_table(payload: dict) -> str:
    lines = [(f"{payload['model_config']} on {payload['device']} ({payload['dtype']}), "
             f"in {payload['input_len']} out {payload['output_len']}, seed {payload['seed']}")]
    header = f"{'backend':<18} {'reqs':>5} {'out tok/s':>10} {'total tok/s':>12} {'wall s':>8} {'peak GiB':>9}  note"
    lines += [header, "-" * len(header)]
    for r in payload["records"]:
        def num(key, fmt="{:.1f}", r=r):
            return fmt.format(r[key]) if r.get(key) is not None else "-"
        peak = r.get("peak_gpu_memory_bytes")
        peak = f"{peak / 2**30:.2f}" if peak else "-"
        note = r.get("error") or (f"timed out: {r['num_finished_requests']} finished"
                                  if r.get("timed_out_after_s") else "")
        if r["backend"] == "minivllm" and r.get("ttft_s"):
            note = (f"KV {r.get('kv_cache_dtype', '?')}, TTFT p50 {r['ttft_s']['p50']:.3f}s, TPOT p50 {1e3 * r['tpot_s']['p50']:.2f}ms, "
                    f"graphs {'on' if r['cuda_graphs'] else 'off'}, overlap {'on' if r['async_scheduling'] else 'off'}, "
                    f"JIT compiles {r['jit_compiles_during_run']}")
            if r.get("roofline_fraction") is not None:
                note += f", roofline {r['workload_roofline_s']:.2f}s = {r['roofline_fraction']:.2f} of wall"
        lines.append(f"{r['backend']:<18} {r['num_requests']:>5} {num('output_tokens_per_s'):>10} "
                     f"{num('total_tokens_per_s'):>12} {num('wall_time_s', '{:.2f}'):>8} {peak:>9}  {note}")
    for q in payload["ratios"]:
        lines.append(f"{q.get('subject', 'minivllm')} / {q['baseline']} on {q['num_requests']} requests: "
                     f"{q['output_tokens_per_s_ratio']:.2f}x output tokens/s")
    if payload.get("note"):
        lines.append(payload["note"])
    return "\n".join(lines)


if __name__ == "__main__":
    main()
