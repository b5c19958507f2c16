"""Tutorial 4: the complete workflow — generate, read the statistics, draw the pictures.

    python tutorials/04_complete_workflow.py [--out DIR] [--smoke]

What a user of the engine does, start to finish: build an `LLM`, turn on the step trace, generate
a batch of prompts with different sampling settings, read per-request metrics (TTFT, TPOT,
tokens/s), print the engine's statistics table, and draw the run. The trace is also saved as
JSON lines, which `python -m minivllm visualize` turns into the same pictures later.
"""

from __future__ import annotations

from common import heading, parse_args, tiny_model

from minivllm import LLM, SamplingParams


def main() -> None:
    args = parse_args(__doc__.split("\n")[0], "04_complete_workflow")
    llm = LLM(tiny_model(args.model), device="cpu", block_size=8, num_kv_blocks=64,
              max_num_seqs=8, max_num_batched_tokens=64, max_model_len=256)
    llm.engine.enable_trace()

    system = "You are a helpful assistant. Answer briefly. "  # shared prefix: prefix caching reuses it
    questions = ["What is paged attention?", "Why batch requests?", "What is a KV cache?",
                 "Explain chunked prefill.", "What is preemption?", "Name a sampling method."]
    if args.smoke:
        questions = questions[:3]
    prompts = [system + q for q in questions]
    params = [SamplingParams(max_tokens=24 + 8 * i, temperature=0.8, top_p=0.95, seed=i, ignore_eos=True)
              for i in range(len(prompts))]

    heading("1. generate")
    outputs = llm.generate(prompts, params, use_tqdm=False)
    for out in outputs:
        m = out.metrics
        tpot = f"{m.tpot * 1e3:5.2f} ms" if m.tpot is not None else "  n/a"
        print(f"{out.prompt[len(system):]:<26} -> {len(out.token_ids):>2} tokens | ttft {m.ttft * 1e3:6.2f} ms | "
              f"tpot {tpot} | {m.tokens_per_s:7.1f} tok/s | {m.num_cached_tokens} prompt tokens from cache")
    print("(random weights: the text is gibberish, but every number above is real)")
    print("TTFT = waiting + prefill; TPOT = time per token after the first; later requests reuse the "
          "cached system prompt.")

    heading("2. statistics (LLM.print_stats)")
    llm.print_stats()

    heading("3. pictures (LLM.visualize) and the trace on disk")
    paths = llm.visualize(args.out)
    trace_path = llm.save_trace(args.out / "trace.jsonl")
    for name, path in paths.items():
        print(f"{name:<15} {path}")
    print(f"trace          {trace_path}")
    print(f"\nRedraw it any time:  python -m minivllm visualize {trace_path} --out {args.out / 'from_trace'}")


if __name__ == "__main__":
    main()
