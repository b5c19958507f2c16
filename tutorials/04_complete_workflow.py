"""Tutorial 4: the complete workflow — generate, read the statistics, draw the pictures.

    python tutorials/04_complete_workflow.py [--out DIR] [--smoke]

What a user of the engine does, start to finish: build an `LLM` on a real model (SmolLM2-135M-
Instruct, fetched and converted the first time), turn on the step trace, ask it a batch of
questions through its chat template with different sampling settings, read the answers and
per-request metrics (TTFT, TPOT, tokens/s), print the engine's statistics table, and draw the run.
The trace is also saved as JSON lines, which `python -m minivllm visualize` turns into the same
pictures later.
"""

from __future__ import annotations

from common import heading, parse_args, real_model

from minivllm import LLM, SamplingParams


def main() -> None:
    args = parse_args(__doc__.split("\n")[0], "04_complete_workflow")
    llm = LLM(real_model(args.model), device="cpu", block_size=8, num_kv_blocks=64,
              max_num_seqs=8, max_num_batched_tokens=64, max_model_len=256)
    llm.engine.enable_trace()

    questions = ["What is the capital of France?", "Name three colors.", "What is 2 + 2?",
                 "Who wrote Hamlet?", "What do bees make?", "Say hello in Spanish."]
    if args.smoke:
        questions = questions[:3]
    # The chat template starts every prompt with the same system prompt: prefix caching reuses it.
    prompts = [llm.engine.tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                 tokenize=False) for q in questions]
    # Greedy for the first, sampled for the others (each with its seed, so every run is the same).
    params = [SamplingParams(max_tokens=16 if args.smoke else 32, temperature=0.0 if i == 0 else 0.7,
                             top_p=0.95, seed=i) for i in range(len(prompts))]

    heading("1. generate")
    outputs = llm.generate(prompts, params, use_tqdm=False)
    for question, out in zip(questions, outputs):
        m = out.metrics
        tpot = f"{m.tpot * 1e3:5.1f} ms" if m.tpot is not None else "  n/a"
        print(f"{question}\n    -> {out.text!r}")
        print(f"    {len(out.token_ids)} tokens ({out.finish_reason}) | ttft {m.ttft * 1e3:6.1f} ms | tpot {tpot} | "
              f"{m.tokens_per_s:5.1f} tok/s | {m.num_cached_tokens} prompt tokens from cache")
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
