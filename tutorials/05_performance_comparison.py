"""Tutorial 5: performance comparisons, measured on the real engine.

    python tutorials/05_performance_comparison.py [--out DIR] [--smoke]

Three questions every serving engine answers with a knob, each answered here by running it:

1. Batch size (max_num_seqs 1..16): how much throughput does batching buy, and what does each
   sequence pay for sharing the step?
2. Block size (4..64 tokens per KV block, same KV memory): how full is the pool, how much of it
   is wasted inside half-empty last blocks (internal fragmentation), and what does it cost in time?
3. Scheduling strategy: static batching (a batch runs until its slowest member is done),
   continuous batching, chunked prefill, and chunked prefill + prefix caching.

Plus a heat map of throughput over batch size x block size.

Two models. The sweeps (1, 2 and the heat map) run many configurations, so they use the tiny
random model, whose steps are cheap. The strategies (3) run on the real SmolLM2-135M: the four
strategies generate the same tokens in different numbers of steps, so they differ in time only
where a step costs about the same however many sequences it carries. That holds for a real model
(each step reads all its weights once, as a GPU's decode step does) but not for the tiny one on a
CPU, where the work per token (the engine's own bookkeeping) outweighs the weights, and where
static batching came out as fast as continuous batching for that reason.

Honest caveat, printed with the results: these are CPU numbers. Trends that come from *scheduling*
(batching, waiting, recomputation) carry over to a GPU; absolute numbers do not.
"""

from __future__ import annotations

import json
import random
import time

from common import heading, parse_args, real_model, tiny_model

from minivllm import LLM, SamplingParams
from minivllm.observe import kv_cache_stats
from minivllm.observe.figures import new_figure, save_figure

KV_TOKENS = 2048  # the KV memory every block-size run gets, in token slots


# ---------------------------------------------------------------------------------------------
# Running one configuration
# ---------------------------------------------------------------------------------------------
def make_workload(num_requests: int, prompt_lens, output_lens, shared_prefix: int = 0, seed: int = 0):
    """Token-id prompts (optionally starting with a common prefix) and their SamplingParams."""
    rng = random.Random(seed)
    prefix = [rng.randrange(4, 500) for _ in range(shared_prefix)]
    prompts = [prefix + [rng.randrange(4, 500) for _ in range(rng.choice(prompt_lens))] for _ in range(num_requests)]
    params = [SamplingParams(max_tokens=rng.choice(output_lens), temperature=0, ignore_eos=True) for _ in prompts]
    return prompts, params


def run(model: str, prompts, params, static_batch: int | None = None, **engine_kwargs) -> dict:
    """Serve the workload on a fresh engine; returns the measured numbers.

    All requests are known at the start (offline serving); TTFT is measured from there.
    static_batch: admit requests in groups of this size, the next group only when the whole
        previous one has finished (static batching); None admits all at once (continuous).
    Drives the step API so that KV utilization and fragmentation can be sampled after each step.
    """
    engine = LLM(model, device="cpu", **engine_kwargs).engine
    groups = [list(range(len(prompts)))] if static_batch is None else [
        list(range(i, min(i + static_batch, len(prompts)))) for i in range(0, len(prompts), static_batch)]
    utilization, fragmentation, request_ids = [], [], []
    start = time.perf_counter()
    for group in groups:
        for i in group:
            request_ids.append(engine.add_request(prompts[i], params[i]))
        while engine.has_unfinished_requests():
            engine.step()
            kv = kv_cache_stats(engine.block_manager, engine.scheduler.running)
            if kv["num_used_blocks"]:
                utilization.append(kv["utilization"])
                fragmentation.append(kv["fragmentation"])
    wall = time.perf_counter() - start
    stats = engine.get_stats()
    generated = stats["engine"]["num_generated_tokens"]
    # Every request counts as arriving at the start: under static batching a request "added"
    # late has really been waiting all along, and that wait belongs in its time to first token.
    ttft = [engine.get_output(r).metrics.first_token_time - start for r in request_ids]
    return {
        "wall_s": wall,
        "throughput": generated / wall,
        "generated_tokens": generated,
        "steps": stats["engine"]["num_steps"],
        "mean_batch": stats["scheduler"]["avg_batch_size"],
        "chunks": stats["scheduler"]["num_prefill_chunks"],
        "ttft_ms": 1e3 * sum(ttft) / len(ttft),
        "tpot_ms": 1e3 * stats["requests"].get("tpot_mean", float("nan")),
        "kv_utilization": sum(utilization) / len(utilization) if utilization else 0.0,
        "fragmentation": sum(fragmentation) / len(fragmentation) if fragmentation else 0.0,
        "prefix_hit_rate": stats["kv_cache"]["prefix_cache_hit_rate"],
    }


# ---------------------------------------------------------------------------------------------
# The three comparisons
# ---------------------------------------------------------------------------------------------
def compare_batch_sizes(model, sizes, num_requests, out) -> list[dict]:
    heading("1. Batch size: throughput vs per-sequence speed")
    prompts, params = make_workload(num_requests, prompt_lens=[16, 32], output_lens=[32])
    rows = []
    for b in sizes:
        r = run(model, prompts, params, max_num_seqs=b, max_model_len=256)
        r["batch_size"], r["per_seq"] = b, r["throughput"] / b
        rows.append(r)
        print(f"max_num_seqs {b:>2}: {r['throughput']:7.0f} tokens/s total, {r['per_seq']:6.0f} tokens/s per "
              f"sequence, mean batch {r['mean_batch']:.1f}, {r['steps']} steps")
    base = rows[0]["throughput"]
    print(f"-> batching {sizes[-1]} sequences gives {rows[-1]['throughput'] / base:.1f}x the throughput of one "
          "at a time: a step costs nearly the same whether it carries 1 token or 16, so each step does more. "
          "Each single sequence gets slower, though (it shares every step).")

    fig = new_figure(figsize=(8, 4.5))
    ax = fig.add_subplot()
    x = range(len(rows))
    ax.bar(x, [r["throughput"] for r in rows], color="tab:blue", label="total throughput")
    ax.set_xticks(list(x), [str(r["batch_size"]) for r in rows])
    ax.set_xlabel("batch size (max_num_seqs)")
    ax.set_ylabel("generated tokens / s (all sequences)")
    twin = ax.twinx()
    twin.plot(list(x), [r["per_seq"] for r in rows], "o-", color="tab:orange", label="per sequence")
    twin.set_ylabel("generated tokens / s per sequence")
    twin.set_ylim(0, max(r["per_seq"] for r in rows) * 1.15)
    handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax.legend(handles, ["total throughput", "per-sequence speed"], loc="upper left", fontsize=8)
    ax.set_title(f"Batch size: {num_requests} requests x 32 tokens (tiny model, CPU)", fontsize=10)
    save_figure(fig, out / "batch_size.png")
    return rows


def compare_block_sizes(model, sizes, num_requests, out) -> list[dict]:
    heading(f"2. Block size: the same {KV_TOKENS} KV slots cut into blocks of 4..64 tokens")
    prompts, params = make_workload(num_requests, prompt_lens=[5, 13, 21, 30], output_lens=[7, 19, 33])
    rows = []
    for bs in sizes:
        r = run(model, prompts, params, block_size=bs, num_kv_blocks=KV_TOKENS // bs, max_num_seqs=8,
                max_model_len=256, enable_prefix_caching=False)
        r["block_size"] = bs
        rows.append(r)
        print(f"block_size {bs:>2}: KV utilization {r['kv_utilization']:5.1%}, internal fragmentation "
              f"{r['fragmentation']:5.1%}, {r['wall_s'] * 1e3:6.0f} ms")
    print("-> bigger blocks waste more slots in each sequence's last block (fragmentation grows with the "
          "block size), so the same work occupies more of the pool; smaller blocks waste less but mean "
          "longer block tables and more, smaller memory reads for the attention kernel on a GPU.")

    fig = new_figure(figsize=(11, 3.8))
    axes = fig.subplots(1, 3)
    labels = [str(r["block_size"]) for r in rows]
    for ax, key, label, colour in zip(
        axes, ("kv_utilization", "fragmentation", "wall_s"),
        ("mean KV pool utilization (%)", "mean internal fragmentation (%)", "wall time (ms)"),
        ("tab:green", "tab:red", "tab:blue")):
        scale = 1e3 if key == "wall_s" else 100
        ax.bar(labels, [r[key] * scale for r in rows], color=colour)
        ax.set_xlabel("block size (tokens per block)")
        ax.set_ylabel(label)
    axes[0].set_title("pool in use", fontsize=10)
    axes[1].set_title("wasted slots inside blocks", fontsize=10)
    axes[2].set_title("time for the workload", fontsize=10)
    fig.suptitle(f"Block size: {num_requests} requests, {KV_TOKENS} KV slots (tiny model, CPU)", fontsize=11)
    save_figure(fig, out / "block_size.png")
    return rows


STRATEGIES = {
    # name: (static batch size, engine keywords)
    "static batching": (4, {"enable_chunked_prefill": False, "enable_prefix_caching": False}),
    "continuous batching": (None, {"enable_chunked_prefill": False, "enable_prefix_caching": False}),
    "chunked prefill": (None, {"max_num_batched_tokens": 64, "prefill_chunk_size": 32,
                               "enable_prefix_caching": False}),
    "chunked + prefix cache": (None, {"max_num_batched_tokens": 64, "prefill_chunk_size": 32,
                                      "enable_prefix_caching": True}),
}


def compare_strategies(model, num_requests, output_lens, out) -> list[dict]:
    heading("3. Scheduling strategies on SmolLM2-135M (4 sequences at a time, prompts share a 32-token prefix)")
    prompts, params = make_workload(num_requests, prompt_lens=[8, 40, 72], output_lens=output_lens,
                                    shared_prefix=32)
    rows = []
    for name, (static, kwargs) in STRATEGIES.items():
        r = run(model, prompts, params, static_batch=static, max_num_seqs=4, max_model_len=256, **kwargs)
        r["strategy"] = name
        rows.append(r)
        print(f"{name:<23} {r['throughput']:6.0f} tok/s | mean batch {r['mean_batch']:.2f} | {r['steps']:>3} steps | "
              f"{r['chunks']:>3} prefill chunks | TTFT {r['ttft_ms']:6.1f} ms | TPOT {r['tpot_ms']:5.2f} ms | "
              f"prefix hits {r['prefix_hit_rate']:.0%}")
    print("-> static batching idles slots while the longest request of each batch finishes (lowest mean "
          "batch, most steps); continuous batching refills them at once, so the same tokens take fewer steps, "
          "and a step of this model costs about the same for 1 or 4 sequences. Chunking splits prompts into 32-token pieces: "
          "more steps and chunks, but no step is ever blocked by a long prompt (on a GPU this keeps TPOT "
          "smooth). Prefix caching skips the shared 32 tokens of every prompt after the first.")

    fig = new_figure(figsize=(12, 3.8))
    axes = fig.subplots(1, 4)
    names = [r["strategy"].replace(" + ", "\n+ ").replace(" ", "\n", 1) for r in rows]
    colours = ["tab:gray", "tab:blue", "tab:orange", "tab:green"]
    for ax, key, label in zip(axes, ("throughput", "mean_batch", "chunks", "ttft_ms"),
                              ("generated tokens / s", "mean sequences per step", "prefill chunks scheduled",
                               "mean time to first token (ms)")):
        ax.bar(names, [r[key] for r in rows], color=colours)
        ax.set_ylabel(label)
        ax.tick_params(axis="x", labelsize=7)
    fig.suptitle(f"Scheduling strategies: {num_requests} requests, outputs {min(output_lens)}-{max(output_lens)} "
                 "tokens (SmolLM2-135M, CPU)", fontsize=11)
    save_figure(fig, out / "strategies.png")
    return rows


def heat_map(model, batch_sizes, block_sizes, num_requests, out) -> list[list[float]]:
    heading("4. Heat map: throughput over batch size x block size")
    prompts, params = make_workload(num_requests, prompt_lens=[8, 24], output_lens=[16])
    grid = [[run(model, prompts, params, max_num_seqs=b, block_size=bs, num_kv_blocks=KV_TOKENS // bs,
                 max_model_len=256)["throughput"] for bs in block_sizes] for b in batch_sizes]
    fig = new_figure(figsize=(6.5, 5))
    ax = fig.add_subplot()
    image = ax.imshow(grid, cmap="viridis", origin="lower", aspect="auto")
    ax.set_xticks(range(len(block_sizes)), [str(s) for s in block_sizes])
    ax.set_yticks(range(len(batch_sizes)), [str(b) for b in batch_sizes])
    ax.set_xlabel("block size (tokens per block)")
    ax.set_ylabel("batch size (max_num_seqs)")
    peak = max(max(row) for row in grid)
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=8,
                    color="black" if value > 0.6 * peak else "white")
    fig.colorbar(image, ax=ax, label="generated tokens / s")
    ax.set_title(f"Throughput, {num_requests} requests x 16 tokens (tiny model, CPU)", fontsize=10)
    save_figure(fig, out / "heat_map.png")
    # Which knob matters more: the spread across batch sizes vs across block sizes (mean ratios).
    by_batch = sum(max(col) / min(col) for col in zip(*grid)) / len(block_sizes)
    by_block = sum(max(row) / min(row) for row in grid) / len(batch_sizes)
    print(f"-> best/worst throughput ratio: {by_batch:.1f}x across batch sizes (same block size), "
          f"{by_block:.1f}x across block sizes (same batch size); "
          f"{'batch size' if by_batch > by_block else 'block size'} is the bigger knob here.")
    return grid


def main() -> None:
    args = parse_args(__doc__.split("\n")[0], "05_performance_comparison")
    model, real = tiny_model(args.model), real_model()
    for warm in (model, real):  # warm-up: first calls are slow
        run(warm, *make_workload(2, [16], [4]), max_model_len=256)
    if args.smoke:
        results = {
            "batch_size": compare_batch_sizes(model, [1, 4], 4, args.out),
            "block_size": compare_block_sizes(model, [4, 64], 4, args.out),
            "strategies": compare_strategies(real, 4, [2, 4, 8], args.out),
            "heat_map": heat_map(model, [1, 4], [8, 32], 4, args.out),
        }
    else:
        results = {
            "batch_size": compare_batch_sizes(model, [1, 2, 4, 8, 16], 16, args.out),
            "block_size": compare_block_sizes(model, [4, 8, 16, 32, 64], 16, args.out),
            "strategies": compare_strategies(real, 8, [4, 16, 32], args.out),
            "heat_map": heat_map(model, [1, 2, 4, 8, 16], [4, 8, 16, 32, 64], 8, args.out),
        }
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print("\nCPU numbers: scheduling trends carry over to GPUs, absolute speeds do not.")
    print(f"Figures and results.json written to {args.out}")


if __name__ == "__main__":
    main()
