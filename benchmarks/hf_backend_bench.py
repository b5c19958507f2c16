"""Hugging Face `generate` with minivllm's attention vs `sdpa`, same model, same prompts, same run.

minivllm's paged attention runs inside transformers as `attn_implementation="minivllm"`
(minivllm/integrations/hf.py, docs/hf_backend.md). Everything else (the model, HF's dynamic cache,
its sampling loop) is transformers' own, so the comparison isolates the attention:

* `generate` at each batch size (default 1, 16, 64), prompts of exactly --prompt-len random tokens
  (no padding), --new-tokens greedy tokens with EOS suppressed, once per implementation;
* `generate` on a left-padded batch (prompt lengths uniform in [prompt_len / 2, prompt_len]) at
  --ragged-batch-sizes: there SDPA needs an explicit mask and minivllm a start offset per row;
* `generate_batch` (transformers' continuous batching, paged cache) through minivllm's kernel and
  through sdpa, on the largest batch's prompts, where the installed transformers can run it
  (5.17 can, later versions refuse any registered name: the JSON says why).

Reported per run: output tokens/s (B x new tokens / wall time), wall time, peak GPU memory, the
host time of one decode-step attention call (a `generate` step is often bound by host time), the
time ratio minivllm / sdpa, and the greedy agreement of minivllm's tokens with sdpa's (exact rows,
common-prefix fraction, first token: in bf16 two correct implementations may split at near-ties).
Wall time is taken between `torch.cuda.synchronize()` calls, after an untimed warm-up of the same
shapes (Triton compiles its kernel variants there).

    python benchmarks/hf_backend_bench.py                     # GPU: qwen3-0.6b bf16, B = 1, 16, 64
    python benchmarks/hf_backend_bench.py --batch-sizes 16 --new-tokens 64
    python benchmarks/hf_backend_bench.py --smoke             # CPU, tiny model, a few seconds

JSON goes to benchmarks/results/ (or --out), a table is printed last. CPU numbers are no GPU claim.
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `minivllm` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import MODEL_CONFIGS, default_out, environment, release_memory, setup_model, write_json
from benchmarks.hf_agreement import agreement

BASELINE = "sdpa"
GPU_DEFAULTS = dict(model_config="qwen3-0.6b", batch_sizes="1,16,64", ragged_batch_sizes="16",
                    prompt_len=512, new_tokens=256)
SMOKE_DEFAULTS = dict(model_config="tiny", batch_sizes="1,2", ragged_batch_sizes="2", prompt_len=12,
                      new_tokens=6)


# ------------------------------------------------------------------------------------------
# Workload and timing
# ------------------------------------------------------------------------------------------
def make_prompts(batch: int, prompt_len: int, vocab: int, seed: int, ragged: bool) -> list[list[int]]:
    """Random token ids (10 and up: clear of the special tokens); ragged = lengths in [L/2, L]."""
    rng = np.random.default_rng(seed)
    lens = rng.integers(max(1, prompt_len // 2), prompt_len, endpoint=True, size=batch) if ragged \
        else [prompt_len] * batch
    return [rng.integers(10, vocab, size=int(n)).tolist() for n in lens]


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    return ids.to(device), mask.to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_reset(device: torch.device) -> None:
    release_memory(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


class FallbackLog:
    """The SDPA-fallback warnings minivllm's attention issues during a run (none expected here)."""

    def __enter__(self):
        from minivllm.integrations import hf

        hf._warned.clear()  # warn (and so record) every reason again in this run
        self._catch = warnings.catch_warnings(record=True)
        self.caught = self._catch.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc):
        self._catch.__exit__(*exc)
        self.messages = sorted({str(w.message) for w in self.caught if "falls back to SDPA" in str(w.message)})


# ------------------------------------------------------------------------------------------
# generate
# ------------------------------------------------------------------------------------------
@torch.inference_mode()
def _generate(model, ids, mask, new_tokens: int, pad_id: int) -> torch.Tensor:
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, pad_token_id=pad_id)
    return out[:, ids.shape[1]:]


def attention_host_us(model, impl: str, ids, mask, pad_id: int, steps: int = 16) -> float:
    """Median host time (µs) of one decode-step attention call: Python, checks and launches, the
    GPU running asynchronously. A `generate` step is often bound by exactly this host time, so it
    tells whether a gap between the two implementations comes from the host or from the GPU."""
    from transformers import AttentionInterface

    mapping, times = AttentionInterface._global_mapping, []
    real = mapping[impl]

    def timed(module, query, *args, **kwargs):
        start = time.perf_counter()
        out = real(module, query, *args, **kwargs)
        if query.shape[2] == 1:
            times.append(time.perf_counter() - start)
        return out

    mapping[impl] = timed  # transformers looks the function up by name at every call
    try:
        _generate(model, ids, mask, steps, pad_id)
    finally:
        mapping[impl] = real
    return statistics.median(times) * 1e6


def run_generate(model, impl: str, prompts, args, device, pad_id: int) -> tuple[dict, list[list[int]]]:
    """Warm up on the same shapes, then time `repeats` generate calls; median wall time."""
    model.set_attn_implementation(impl)
    ids, mask = left_pad(prompts, pad_id, device)
    _generate(model, ids, mask, min(args.new_tokens, 24), pad_id)  # compile, cuBLAS/Triton warm-up
    host_us = attention_host_us(model, impl, ids, mask, pad_id, steps=min(args.new_tokens, 16))
    _peak_reset(device)
    times = []
    with FallbackLog() as log:
        for _ in range(args.repeats):
            _sync(device)
            start = time.perf_counter()
            new = _generate(model, ids, mask, args.new_tokens, pad_id)
            _sync(device)
            times.append(time.perf_counter() - start)
    wall = statistics.median(times)
    tokens = new.shape[0] * new.shape[1]
    record = {"bench": "hf_backend", "api": "generate", "attn_implementation": impl,
              "batch_size": len(prompts), "prompt_lens": [min(map(len, prompts)), max(map(len, prompts))],
              "left_padded": len({len(p) for p in prompts}) > 1, "new_tokens": args.new_tokens,
              "wall_time_s": wall, "wall_times_s": times, "output_tokens_per_s": tokens / wall,
              "peak_gpu_memory_bytes": _peak(device), "attention_host_us_per_decode_call": host_us,
              "sdpa_fallbacks": log.messages}
    return record, new.tolist()


# ------------------------------------------------------------------------------------------
# generate_batch (continuous batching)
# ------------------------------------------------------------------------------------------
def _cb_config(prompts, new_tokens: int, device):
    """A pool sized for this workload (not from free memory): every request fits at once."""
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    page = 256 if device.type == "cuda" else 16
    pages_per_request = -(-(max(map(len, prompts)) + new_tokens) // page) + 1
    fields = inspect.signature(ContinuousBatchingConfig).parameters
    size_key = "block_size" if "block_size" in fields else "page_size"
    return ContinuousBatchingConfig(**{size_key: page}, num_blocks=len(prompts) * pages_per_request + 8,
                                    max_batch_tokens=2048 if device.type == "cuda" else 32)


def _generate_batch(model, prompts, new_tokens: int, pad_id: int, device) -> list[list[int]]:
    from transformers import GenerationConfig

    # eos_token_id=-1 never matches: every request makes exactly new_tokens tokens.
    gen = GenerationConfig(do_sample=False, max_new_tokens=new_tokens, eos_token_id=-1, pad_token_id=pad_id)
    kwargs = dict(inputs=prompts, generation_config=gen, continuous_batching_config=_cb_config(prompts, new_tokens, device),
                  progress_bar=False)
    accepted = inspect.signature(model.generate_batch).parameters
    out = model.generate_batch(**{k: v for k, v in kwargs.items() if k in accepted})
    return [out[rid].generated_tokens for rid in sorted(out, key=lambda rid: int(rid.rsplit("_", 1)[1]))]


def run_generate_batch(model, impl: str, paged_name: str, prompts, args, device,
                       pad_id: int) -> tuple[dict, list[list[int]] | None]:
    """`impl` under its continuous-batching name `paged_name` (set explicitly, so that transformers
    does not switch to a flash implementation it may find installed); the calls of that function
    are counted to show that it ran. No inference_mode: the manager's worker thread updates
    tensors made in this thread."""
    from transformers import AttentionInterface

    mapping, calls = AttentionInterface._global_mapping, [0]
    real = mapping[paged_name]

    def counted(*a, **k):
        calls[0] += 1
        return real(*a, **k)

    record = {"bench": "hf_backend", "api": "generate_batch", "attn_implementation": impl,
              "attn_implementation_in_batching": paged_name, "batch_size": len(prompts),
              "prompt_lens": [min(map(len, prompts)), max(map(len, prompts))], "new_tokens": args.new_tokens}
    model.set_attn_implementation(paged_name)
    mapping[paged_name] = counted
    try:
        _generate_batch(model, prompts[:4], min(args.new_tokens, 24), pad_id, device)  # warm-up
        _peak_reset(device)
        calls[0] = 0
        with FallbackLog() as log:
            _sync(device)
            start = time.perf_counter()
            tokens = _generate_batch(model, prompts, args.new_tokens, pad_id, device)
            _sync(device)
            wall = time.perf_counter() - start
    except Exception as err:  # noqa: BLE001 - a version that cannot run it is a result, not a crash
        record.update(error=f"{type(err).__name__}: {err}", output_tokens_per_s=None)
        return record, None
    finally:
        mapping[paged_name] = real
    record.update(wall_time_s=wall, output_tokens_per_s=sum(map(len, tokens)) / wall,
                  peak_gpu_memory_bytes=_peak(device), attention_calls=calls[0], sdpa_fallbacks=log.messages,
                  all_requests_complete=all(len(t) == args.new_tokens for t in tokens))
    return record, tokens


# ------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------
def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"values must be >= 1, got {text!r}")
    return values


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny model and shapes on the CPU, a few seconds")
    p.add_argument("--model-config", choices=sorted(MODEL_CONFIGS), default=None)
    p.add_argument("--batch-sizes", type=_int_list, default=None, help="default 1,16,64")
    p.add_argument("--ragged-batch-sizes", type=_int_list, default=None,
                   help="left-padded batches (lengths in [L/2, L]); default 16; '' for none")
    p.add_argument("--prompt-len", type=int, default=None, help="default 512")
    p.add_argument("--new-tokens", type=int, default=None, help="default 256")
    p.add_argument("--repeats", type=int, default=1, help="timed generate calls per run (median)")
    p.add_argument("--no-generate-batch", action="store_true", help="skip continuous batching")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-dir", type=Path, default=None, help="where to build/reuse the random model")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/...)")
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    defaults = GPU_DEFAULTS if args.device == "cuda" and not args.smoke else SMOKE_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, _int_list(value) if key.endswith("batch_sizes") else value)
    if not args.batch_sizes:
        p.error("--batch-sizes: at least one batch size")
    for key in ("prompt_len", "new_tokens", "repeats"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    from transformers import AutoModelForCausalLM

    from minivllm import kernels
    from minivllm.integrations import hf

    name = hf.register()
    model_dir, dtype, note = setup_model(args.model_config, args.model_dir, device, args.seed, "minivllm-hfbench-")
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, attn_implementation=BASELINE)
    model = model.to(device).eval()
    pad_id = model.config.pad_token_id or 0
    out_path = args.out or default_out("hf_backend", args.model_config, device)
    payload = {"bench": "hf_backend", "model_config": args.model_config, "dtype": str(dtype).removeprefix("torch."),
               "minivllm_name": name, "kernel_backend": kernels.resolve_backend("auto", device),
               "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "seed": args.seed,
               "sampling": "greedy, EOS suppressed", **environment(device), "note": note,
               "runs": [], "comparisons": []}

    def compare(mine: dict, base: dict, ours, theirs) -> None:
        row = {"api": mine["api"], "batch_size": mine["batch_size"], "left_padded": mine.get("left_padded", False)}
        if mine.get("wall_time_s") and base.get("wall_time_s"):
            row["time_ratio"] = mine["wall_time_s"] / base["wall_time_s"]  # <= 1.0: no slower than sdpa
        if ours is not None and theirs is not None:
            row["agreement"] = agreement(ours, theirs, args.new_tokens)
        payload["comparisons"].append(row)

    cases = [(b, False) for b in args.batch_sizes] + [(b, True) for b in args.ragged_batch_sizes]
    largest = generate_tokens = None  # the largest plain batch: generate_batch reruns its prompts
    for batch, ragged in cases:
        prompts = make_prompts(batch, args.prompt_len, model.config.vocab_size, args.seed + batch, ragged)
        base, theirs = run_generate(model, BASELINE, prompts, args, device, pad_id)
        mine, ours = run_generate(model, name, prompts, args, device, pad_id)
        payload["runs"] += [base, mine]
        compare(mine, base, ours, theirs)
        write_json(out_path, payload)  # after every case: a later crash loses nothing measured
        print(f"generate B={batch}{' ragged' if ragged else ''}: sdpa {base['output_tokens_per_s']:.0f} tok/s, "
              f"minivllm {mine['output_tokens_per_s']:.0f} tok/s", flush=True)
        if batch == max(args.batch_sizes) and not ragged:
            largest, generate_tokens = prompts, theirs

    if not args.no_generate_batch:
        if hf.supports_continuous_batching():
            base, theirs_cb = run_generate_batch(model, BASELINE, f"paged|{BASELINE}", largest, args, device, pad_id)
            mine, ours_cb = run_generate_batch(model, name, hf.continuous_batching_name(name), largest, args,
                                               device, pad_id)
            payload["runs"] += [base, mine]
            compare(mine, base, ours_cb, theirs_cb)
            if ours_cb is not None:  # continuous batching vs plain generate, both minivllm vs sdpa
                payload["comparisons"][-1]["agreement_with_generate_sdpa"] = agreement(
                    ours_cb, generate_tokens, args.new_tokens)
        else:
            payload["generate_batch"] = (
                "not run: this transformers accepts only 'sdpa', 'paged|eager' and flash names in continuous "
                "batching, so no registered implementation can run there (docs/hf_backend.md)")
        write_json(out_path, payload)
    print(f"\nwrote {out_path}")
    print(format_table(payload))
    return payload


def format_table(payload: dict) -> str:
    lines = [f"{payload['model_config']} ({payload['dtype']}) on {payload['device']}, transformers "
             f"{payload['transformers']}, prompt {payload['prompt_len']}, {payload['new_tokens']} new tokens, "
             f"minivllm kernel backend: {payload['kernel_backend']}"]
    header = (f"{'api':<15} {'B':>4} {'pad':>4} {'impl':<9} {'out tok/s':>10} {'wall s':>8} {'peak GiB':>9} "
              f"{'attn host us':>12}  note")
    lines += [header, "-" * len(header)]
    for r in payload["runs"]:
        peak = r.get("peak_gpu_memory_bytes")
        tps = r.get("output_tokens_per_s")
        note = r.get("error") or ("; ".join(r.get("sdpa_fallbacks") or []))
        lines.append(f"{r['api']:<15} {r['batch_size']:>4} {'yes' if r.get('left_padded') else 'no':>4} "
                     f"{r['attn_implementation']:<9} {f'{tps:.1f}' if tps else '-':>10} "
                     f"{r['wall_time_s'] if 'wall_time_s' in r else float('nan'):>8.2f} "
                     f"{f'{peak / 2**30:.2f}' if peak else '-':>9} "
                     f"{r['attention_host_us_per_decode_call'] if 'attention_host_us_per_decode_call' in r else float('nan'):>12.1f}"
                     f"  {note}")
    for c in payload["comparisons"]:
        ratio = f"{c['time_ratio']:.3f}x the time of sdpa" if "time_ratio" in c else "no ratio"
        agree = c.get("agreement")
        agree = (f", agreement: exact {agree['exact']:.2f}, prefix {agree['prefix']:.2f}, first token "
                 f"{agree['first_token']:.2f}") if agree else ""
        lines.append(f"minivllm {c['api']} B={c['batch_size']}{' (left-padded)' if c['left_padded'] else ''}: "
                     f"{ratio}{agree}")
    if payload.get("generate_batch"):
        lines.append(f"generate_batch: {payload['generate_batch']}")
    if payload.get("note"):
        lines.append(payload["note"])
    return "\n".join(lines)


if __name__ == "__main__":
    main()
