"""The decode step against its memory roofline, batch sizes 1 ... 256, CUDA graphs on and off.

A decode step must read every weight once (the batch shares them) and the whole KV cache of every
sequence in the batch. Nothing can make it faster than those bytes divided by the memory
bandwidth, so

    roofline time = (weight bytes + KV bytes read) / copy bandwidth

where the copy bandwidth is a device-to-device copy measured in the same run. At batch 1 the
weights dominate and a step costs about the same at batch 8; at large batch with long contexts
the KV cache dominates and the step grows with batch x context.

For each batch size B the script submits B random prompts of --context tokens through the real
engine (so the numbers include the scheduler, the step packing, the sampler and the one sync),
lets them prefill, then times --steps engine steps in which all B sequences decode together, and
reports the median step time, the roofline time and their ratio. Runs once with CUDA graphs and
once with --enforce-eager semantics. JSON and a PNG go to benchmarks/results/ (or --out).

    python benchmarks/roofline.py                             # GPU: qwen3-0.6b, context 1024
    python benchmarks/roofline.py --batch-sizes 1,8,64,256 --context 2048 --modes graphs

On CPU it runs the tiny model at small batches; CPU numbers are no GPU claim.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (
    MODEL_CONFIGS,
    build_model,
    cpu_disclaimer,
    default_out,
    environment,
    measure_copy_bandwidth,
    write_json,
)


def weight_bytes(model) -> int:
    """Bytes of the weights one decode step reads: every parameter once (a tied embedding is one
    tensor), except an untied input embedding, of which a step gathers only B rows."""
    params = {id(p): p for p in model.parameters()}
    total = sum(p.numel() * p.element_size() for p in params.values())
    embed = model.model.embed_tokens.weight if hasattr(model, "model") else None
    lm_head = getattr(getattr(model, "lm_head", None), "weight", None)
    if embed is not None and lm_head is not None and embed is not lm_head:
        total -= embed.numel() * embed.element_size()
    return total


def time_decode_steps(llm, batch: int, context: int, steps: int, vocab: int, seed: int) -> dict:
    """Prefill `batch` prompts of `context` tokens, then time `steps` all-decode engine steps."""
    from minivllm import SamplingParams

    engine = llm.engine
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(10, vocab, size=context).tolist() for _ in range(batch)]
    warm = 2
    # Sequences whose prompt is prefilled early already decode while the others still prefill, so
    # they must not run out of tokens during the timed steps: give them all the room the model
    # length allows and abort them once timed.
    room = engine.config.scheduler_config.max_model_len - context
    params = SamplingParams(temperature=0.0, max_tokens=room, ignore_eos=True)
    request_ids = engine.add_requests(prompts, params)
    history = engine.scheduler.history
    while True:  # prefill (eager, chunked) until a step decodes the whole batch
        engine.step()
        r = history[-1]
        if r.num_prefill_seqs == 0 and r.num_decode_seqs == batch:
            break
    for _ in range(warm):
        engine.step()
    times, runner_times, seq_lens = [], [], []
    for _ in range(steps):
        seq_lens.append(statistics.mean(s.num_tokens for s in engine.scheduler.running))
        t0 = time.perf_counter()
        engine.step()  # ends by reading the sampled tokens: the GPU work is done when it returns
        times.append(time.perf_counter() - t0)
        r = history[-1]
        assert r.num_decode_seqs == batch and r.num_prefill_seqs == 0, "the batch changed while timing"
        runner_times.append(r.execute_time)
    for rid in request_ids:
        engine.abort(rid)
    return {"step_time_s": statistics.median(times), "execute_time_s": statistics.median(runner_times),
            "mean_context": statistics.mean(seq_lens)}


def run_mode(model_dir: Path, args, enforce_eager: bool, copy_bw: float) -> list[dict]:
    from minivllm import LLM

    max_batch = max(args.batch_sizes)
    # Room for the decodes that run during chunked prefill, the warm-up and the timed steps.
    max_model_len = args.context + args.steps + 128
    block_size = 16
    blocks = max_batch * -(-max_model_len // block_size) + 16
    llm = LLM(str(model_dir), max_num_seqs=max_batch, max_model_len=max_model_len,
              max_num_batched_tokens=max(8192, max_batch), num_kv_blocks=blocks, block_size=block_size,
              enable_prefix_caching=False, enforce_eager=enforce_eager)
    runner = llm.engine.model_runner
    vocab = runner.vocab_size
    weights = weight_bytes(runner.model)
    kv_per_token = runner.kv_bytes_per_block // block_size
    time_decode_steps(llm, 2, min(args.context, 64), 2, vocab, args.seed)  # warm-up: compile kernels
    rows = []
    for batch in args.batch_sizes:
        m = time_decode_steps(llm, batch, args.context, args.steps, vocab, args.seed + batch)
        # KV read: every cached token of every sequence, K and V, all layers (incl. the new one).
        kv_bytes = int(batch * m["mean_context"] * kv_per_token)
        roofline = (weights + kv_bytes) / copy_bw
        rows.append({
            "bench": "decode_roofline", "cuda_graphs": runner.uses_cuda_graphs, "batch_size": batch,
            "context": args.context, **m, "weight_bytes": weights, "kv_read_bytes": kv_bytes,
            "roofline_time_s": roofline, "step_over_roofline": m["step_time_s"] / roofline,
            "decode_tokens_per_s": batch / m["step_time_s"],
        })
        print(f"  graphs={'on ' if runner.uses_cuda_graphs else 'off'} B={batch:>4}  step "
              f"{1e3 * m['step_time_s']:8.3f} ms  roofline {1e3 * roofline:8.3f} ms  "
              f"x{m['step_time_s'] / roofline:6.2f}", flush=True)
    del llm, runner
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return rows


def plot(rows: list[dict], path: Path, title: str) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for graphs, style in ((True, "o-"), (False, "s--")):
        sel = [r for r in rows if r["cuda_graphs"] == graphs]
        if sel:
            label = "CUDA graphs" if graphs else "eager"
            ax.plot([r["batch_size"] for r in sel], [1e3 * r["step_time_s"] for r in sel], style, label=f"step, {label}")
            ax2.plot([r["batch_size"] for r in sel], [r["step_over_roofline"] for r in sel], style, label=label)
    ref = {r["batch_size"]: r["roofline_time_s"] for r in rows}
    xs = sorted(ref)
    ax.plot(xs, [1e3 * ref[x] for x in xs], "k:", label="roofline (bytes / copy BW)")
    for a in (ax, ax2):
        a.set_xscale("log", base=2)
        a.set_xlabel("decode batch size")
        a.grid(True, which="both", alpha=0.3)
        a.legend()
    ax.set_yscale("log")
    ax.set_ylabel("ms per decode step")
    ax2.set_ylabel("step time / roofline time")
    ax2.axhline(1.0, color="k", linestyle=":")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-config", choices=sorted(MODEL_CONFIGS), default=None)
    p.add_argument("--batch-sizes", default=None, help="comma-separated (default 1,2,4,...,256 on GPU)")
    p.add_argument("--context", type=int, default=None, help="prompt tokens per sequence (default 1024 on GPU)")
    p.add_argument("--steps", type=int, default=16, help="timed decode steps per batch size")
    p.add_argument("--modes", default="graphs,eager", help="graphs, eager or both")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-dir", type=Path, default=None)
    p.add_argument("--out", type=Path, default=None, help="JSON path (the PNG goes next to it)")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    args.model_config = args.model_config or ("qwen3-0.6b" if gpu else "tiny")
    args.batch_sizes = sorted({int(b) for b in (args.batch_sizes or ("1,2,4,8,16,32,64,128,256" if gpu else "1,2,4")).split(",")})
    args.context = args.context or (1024 if gpu else 32)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in ("graphs", "eager") for m in modes):
        p.error(f"--modes: choose from graphs, eager; got {args.modes!r}")
    if min(args.batch_sizes) < 1 or args.context < 1 or args.steps < 1:
        p.error("batch sizes, --context and --steps must be >= 1")
    note = cpu_disclaimer(device)
    if note:
        print(note)
    dtype = torch.bfloat16 if gpu else torch.float32
    model_dir = build_model(args.model_config, args.model_dir or Path(tempfile.mkdtemp(prefix="minivllm-roof-")),
                            dtype, seed=args.seed)
    copy_bw = measure_copy_bandwidth(device)
    print(f"copy bandwidth (read + write): {copy_bw / 1e9:.1f} GB/s")
    out = args.out or default_out("roofline", args.model_config, device)
    out.parent.mkdir(parents=True, exist_ok=True)
    title = f"decode step vs roofline: {args.model_config}, context {args.context}, {environment(device)['device']}"
    payload = {"bench": "decode_roofline", "model_config": args.model_config, "dtype": str(dtype).removeprefix("torch."),
               "context": args.context, "copy_bandwidth_bytes_per_s": copy_bw, "rows": [], "plot": None,
               **environment(device), "note": note}
    for mode in modes:
        payload["rows"] += run_mode(model_dir, args, enforce_eager=(mode == "eager") or not gpu, copy_bw=copy_bw)
        png = plot(payload["rows"], out.with_suffix(".png"), title)
        payload["plot"] = str(png) if png else None
        write_json(out, payload)  # after each mode: a later failure loses nothing measured
        if not gpu:
            break  # no graphs on CPU: one eager pass says it all
    rows = payload["rows"]
    print(f"\nwrote {out}" + (f" and {payload['plot']}" if payload["plot"] else ""))
    print(f"{'graphs':>6} {'batch':>6} {'step ms':>9} {'roofline ms':>12} {'ratio':>7} {'tok/s':>10}")
    for r in rows:
        print(f"{'on' if r['cuda_graphs'] else 'off':>6} {r['batch_size']:>6} {1e3 * r['step_time_s']:>9.3f} "
              f"{1e3 * r['roofline_time_s']:>12.3f} {r['step_over_roofline']:>7.2f} {r['decode_tokens_per_s']:>10.0f}")
    if note:
        print(note)
    return payload


if __name__ == "__main__":
    main()
