"""Tutorial 2: the scheduler — token budget, continuous batching, chunked prefill, preemption.

    python tutorials/02_scheduler.py [--out DIR] [--smoke]

Every step the scheduler rebuilds the batch from scratch under two budgets: at most
`max_num_batched_tokens` tokens (prefill and decode together) and `max_num_seqs` sequences.

* Continuous batching: a finished sequence's place is taken by a waiting one at the next step,
  instead of the whole batch waiting for its slowest member.
* Chunked prefill: a prompt longer than what is left of the budget is split over several steps,
  so one long prompt never stalls everyone else's decoding.
* Preemption: when the KV pool has no free block, the newest running sequence is sent back to
  the queue (its blocks freed, to be recomputed later) so the older ones can go on.

We run the real engine with a deliberately small token budget and KV pool so that all three
happen within a few dozen steps, record a step trace, print it and draw the timeline.
"""

from __future__ import annotations

import random

from common import heading, parse_args, tiny_model

from minivllm import LLM, SamplingParams
from minivllm.observe import plot_timeline, text_block_map


def describe(event: dict) -> str:
    """One line per step: who ran with how many tokens, and what happened to memory."""
    parts = []
    for s in event["seqs"]:
        kind = f"prefill {s['prefill']}" if s["prefill"] else "decode"
        parts.append(f"{s['seq_id']}:{kind}")
    line = (f"step {event['step']:>3} | {event['num_batched_tokens']:>2}/{event['token_budget']} tokens | "
            f"run {event['num_running']} wait {event['num_waiting']} | blocks {event['num_used_blocks']:>2} | "
            + ", ".join(parts))
    for p in event["preemptions"]:
        line += f"\n          PREEMPTED seq {p['seq_id']} (lost {p['num_computed_tokens_lost']} tokens): {p['reason']}"
    if event["finished"]:
        line += f"  -> finished {event['finished']}"
    return line


def main() -> None:
    args = parse_args(__doc__.split("\n")[0], "02_scheduler")
    num_requests = 6 if args.smoke else 10
    llm = LLM(tiny_model(args.model), device="cpu", block_size=4,
              num_kv_blocks=32,              # 128 token slots for everyone: memory will run out
              max_num_batched_tokens=16,     # a small per-step token budget
              max_num_seqs=4, max_model_len=96, enable_prefix_caching=False)
    trace = llm.engine.enable_trace()

    rng = random.Random(0)
    prompts = [[rng.randrange(4, 500) for _ in range(rng.choice([6, 12, 40]))] for _ in range(num_requests)]
    lengths = [rng.choice([8, 16, 24]) for _ in prompts]
    heading(f"{num_requests} requests, prompt lengths {[len(p) for p in prompts]}, outputs {lengths}")
    print("Budget: 16 tokens and 4 sequences per step; KV pool: 32 blocks of 4 tokens.\n")
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in lengths]
    llm.generate(prompts, params, use_tqdm=False)

    for event in trace:
        print(describe(event))

    stats = llm.engine.get_stats()["scheduler"]
    heading("What happened")
    print(f"* {stats['num_steps']} steps, {stats['avg_batch_size']:.2f} sequences per step on average: "
          "requests joined as soon as others left (continuous batching).")
    print(f"* {stats['num_partial_prefills']} prefill chunks did not finish their prompt: the 40-token prompts "
          "were split to fit the 16-token budget (chunked prefill).")
    print(f"* {stats['num_preemptions']} preemptions: the pool ran out of blocks, the newest sequence "
          "went back to the queue and was recomputed later (marked in red on the timeline).")
    print(f"* budget utilization {stats['budget_utilization']:.0%}: decode steps use 1 token per sequence, "
          "far below the budget — that is why engines mix prefill chunks into decode steps.")

    busiest = max(trace, key=lambda e: e["num_used_blocks"])
    print(f"\nThe pool at its fullest (step {busiest['step']}):")
    print(text_block_map(busiest["blocks"]))
    plot_timeline(list(trace), args.out / "timeline.png", title="Tutorial 2")
    paths = llm.visualize(args.out)
    print(f"\nFigures written to {args.out}: {', '.join(sorted(paths))}")


if __name__ == "__main__":
    main()
