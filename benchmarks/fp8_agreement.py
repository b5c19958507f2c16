"""What an fp8 KV cache changes in the model's output: greedy agreement and logit error, end to end.

An fp8 (e4m3) cache keeps 3 mantissa bits of every stored K and V (docs/fp8_kv_cache.md). The
kernel benchmarks measure what that does to one attention call; this script measures what reaches
the tokens and the logits of a whole model. On the same random-weight model and the same prompts
it runs the engine twice, once per cache dtype (`--compare REF,TEST`, default `auto,fp8`: the
model's dtype against fp8), one engine alive at a time, and measures two things:

1. **Greedy agreement** of the generated tokens (`ignore_eos`, so every output has max_tokens):
   exact rows, common prefix as a share of max_tokens, first token (benchmarks/hf_agreement.py).
   Once one token differs the two continuations are different texts, so this says how soon the
   runs part, not how far apart they are.
2. **Teacher-forced logits.** Both engines are fed the *same* tokens, the prompt followed by the
   reference run's greedy continuation, through minivllm's own model and paged cache: the prompt
   is prefilled, then the continuation decoded one token per step (all prompts batched), as
   generation does. Every position's attention thus reads the K/V of the earlier ones back from
   its engine's cache, in that cache's dtype. At each of the max_tokens positions: the mean
   |logit difference| over the vocabulary. Reported: its mean over positions and its maximum,
   the largest single difference, the mean |logit| and the mean top-1 minus top-2 logit margin
   of the reference (the scale to read the difference against), and the share of positions whose
   argmax agrees. `reference_matches_greedy` checks the measurement itself: the reference's
   teacher-forced argmax should be its own greedy token (exactly so in float32 on the CPU).

Random weights are a harsh test: their next-token distributions are nearly flat, so the top two
logits are close and a small error tips the argmax. Agreement here is a pessimistic bound for a
trained model; the logit difference against the margin says why.

    python benchmarks/fp8_agreement.py --model-dir /tmp/models         # GPU: qwen3-0.6b, llama-3.2-1b
    python benchmarks/fp8_agreement.py --compare auto,auto             # self-check: exact, zero difference
    python benchmarks/fp8_agreement.py --num-prompts 8 --max-tokens 32 --prompt-len 64:128

On CPU the defaults are a smoke run (`tiny` model, 2 prompts of 8..24 tokens, 8 tokens each,
float32 with the reference attention); it checks the script, it measures no GPU.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (
    MODEL_CONFIGS,
    default_out,
    environment,
    parse_range,
    release_memory,
    setup_model,
    write_json,
)
from benchmarks.hf_agreement import agreement, greedy_tokens

KV_CACHE_DTYPES = ("auto", "fp8")
BLOCK_SIZE = 16


def make_prompts(num_prompts: int, lengths: tuple[int, int], vocab_size: int, seed: int) -> list[list[int]]:
    """Random token ids (>= 4, past the usual special tokens), lengths uniform in `lengths`."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(lengths[0], lengths[1] + 1, size=num_prompts)
    return [rng.integers(4, vocab_size, size=int(n)).tolist() for n in sizes]


def make_llm(model_dir: Path, kv_cache_dtype: str, dtype: torch.dtype, args):
    """One engine for one cache dtype. Prefix caching is off: the teacher-forced pass writes into
    free blocks of the pool, which must hold nothing that a later lookup could find."""
    from minivllm import LLM

    # On CPU there is no free memory to size the pool from: give it what the prompts need.
    blocks = None if torch.cuda.is_available() else args.num_prompts * -(-args.max_model_len // BLOCK_SIZE)
    return LLM(str(model_dir), dtype=str(dtype).removeprefix("torch."), kv_cache_dtype=kv_cache_dtype,
               attention_backend=args.attention_backend, block_size=BLOCK_SIZE, num_kv_blocks=blocks,
               gpu_memory_utilization=args.gpu_memory_utilization, enable_prefix_caching=False,
               max_num_seqs=args.num_prompts, max_model_len=args.max_model_len)


@torch.inference_mode()
def teacher_forced_logits(llm, prompts: list[list[int]], continuations: list[list[int]]) -> torch.Tensor:
    """Float32 logits [num_prompts, M, vocab] (on the CPU): row [i, j] predicts continuation token
    j of prompt i, given the prompt and continuation tokens < j.

    Each step is what the engine's runner does with a scheduled batch, minus the sampler: pack it
    (`build_input_batch`, the engine's own packing), run the model, which writes the new K/V into
    its cache and attends over everything cached, and take the logits of each sequence's last
    token. Step 0 prefills one prompt at a time; step j >= 1 decodes token j - 1 of every prompt.

    The engine must be idle (after `generate`, every block is free): each prompt borrows blocks
    from the pool's free list. Nothing else reads them, since prefix caching is off.
    """
    from minivllm.sampling_params import SamplingParams
    from minivllm.step import SampleRow, ScheduledSeq, SchedulerOutput
    from minivllm.worker.input_batch import build_input_batch

    runner, blocks = llm.engine.model_runner, llm.engine.block_manager
    if blocks.num_used_blocks or blocks.enable_prefix_caching:
        raise RuntimeError("teacher_forced_logits needs an idle engine without prefix caching")
    num_new = len(continuations[0])
    need = [blocks.blocks_for(len(p) + num_new) for p in prompts]
    free = blocks.free_block_ids()
    if sum(need) > len(free):
        raise RuntimeError(f"the KV pool has {len(free)} free blocks; the prompts need {sum(need)}")
    tables = [free[a:b] for a, b in itertools.pairwise(itertools.accumulate(need, initial=0))]
    greedy = SamplingParams(temperature=0.0)

    def last_token_logits(seqs: list[ScheduledSeq]) -> torch.Tensor:
        step = SchedulerOutput(seqs, [SampleRow(s.seq_id, greedy) for s in seqs])
        batch = build_input_batch(step, blocks.block_size, runner.device, backend=runner.backend)
        hidden = runner.model(batch.input_ids, batch.positions, batch.attn_metadata)
        return runner.model.compute_logits(hidden[batch.logits_indices]).cpu()

    logits = torch.empty(len(prompts), num_new, runner.vocab_size)
    for i, (prompt, table) in enumerate(zip(prompts, tables)):
        logits[i, 0] = last_token_logits([ScheduledSeq(i, 0, list(prompt), False, table, 1)])[0]
    for j in range(1, num_new):
        logits[:, j] = last_token_logits([
            ScheduledSeq(i, len(p) + j - 1, [c[j - 1]], False, t, 1, is_decode=True)
            for i, (p, c, t) in enumerate(zip(prompts, continuations, tables))])
    return logits


def logit_stats(reference: torch.Tensor, test: torch.Tensor, continuations: list[list[int]]) -> dict:
    """How far `test`'s logits are from `reference`'s, both [N, M, vocab], position by position.

    Folded one prompt at a time, so the temporaries stay the size of one prompt's logits.
    """
    per_token, largest, scale, margin, agree, own = [], 0.0, [], [], [], []
    for ref, got, cont in zip(reference, test, continuations):
        diff = (got - ref).abs_()
        per_token.append(diff.mean(-1))
        largest = max(largest, diff.max().item())
        scale.append(ref.abs().mean(-1))
        top2 = ref.topk(2, dim=-1).values
        margin.append(top2[:, 0] - top2[:, 1])
        agree.append(ref.argmax(-1) == got.argmax(-1))
        own.append(ref.argmax(-1) == torch.tensor(cont))
    per_token = torch.cat(per_token)
    mean_abs_logit = torch.cat(scale).mean().item()
    return {
        "mean_abs_diff": per_token.mean().item(),        # mean over positions of the vocab-mean |diff|
        "max_token_abs_diff": per_token.max().item(),    # the worst position's vocab-mean |diff|
        "max_abs_diff": largest,                          # the largest single logit difference
        "mean_abs_logit": mean_abs_logit,
        "relative_abs_diff": per_token.mean().item() / mean_abs_logit,
        "mean_top2_margin": torch.cat(margin).mean().item(),
        "argmax_agreement": torch.cat(agree).float().mean().item(),
        "reference_matches_greedy": torch.cat(own).float().mean().item(),
        "num_positions": per_token.numel(),
    }


def run_config(name: str, args, device: torch.device) -> dict:
    """Both engines on one model shape: greedy tokens, then teacher-forced logits, one at a time."""
    from minivllm.config import read_config_json

    start = time.perf_counter()
    model_dir, dtype, _ = setup_model(name, args.model_dir, device, args.seed, "minivllm-fp8-agree-")
    prompts = make_prompts(args.num_prompts, args.prompt_len, read_config_json(str(model_dir))["vocab_size"],
                           args.seed)
    tokens, logits = {}, {}
    for role, kv in zip(("reference", "test"), args.compare):
        llm = make_llm(model_dir, kv, dtype, args)
        tokens[role] = greedy_tokens(llm, prompts, args.max_tokens)
        # Both runs are fed the reference's continuation: the same tokens, two caches.
        logits[role] = teacher_forced_logits(llm, prompts, tokens["reference"])
        llm.close()
        del llm
        release_memory(device)
    row = {"model_config": name, "dtype": str(dtype).removeprefix("torch."),
           "kv_cache_dtypes": {"reference": args.compare[0], "test": args.compare[1]},
           "attention_backend": args.attention_backend, "num_prompts": args.num_prompts,
           "prompt_len_range": list(args.prompt_len), "prompt_lens": [len(p) for p in prompts],
           "max_tokens": args.max_tokens, "seed": args.seed,
           **agreement(tokens["test"], tokens["reference"], args.max_tokens),
           **logit_stats(logits["reference"], logits["test"], tokens["reference"]),
           "wall_time_s": time.perf_counter() - start}
    print(f"  {name}: {args.compare[1]} vs {args.compare[0]}: exact {row['exact']:.2f}, prefix {row['prefix']:.2f}, "
          f"mean |dlogit| {row['mean_abs_diff']:.3g} of mean |logit| {row['mean_abs_logit']:.3g}, "
          f"argmax {row['argmax_agreement']:.3f}", flush=True)
    return row


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-configs", default=None, help=f"comma list from {sorted(MODEL_CONFIGS)} "
                                                          "(default qwen3-0.6b,llama-3.2-1b on GPU, tiny on CPU)")
    p.add_argument("--compare", default="auto,fp8", help="REF,TEST kv_cache_dtypes; auto,auto checks the measurement")
    p.add_argument("--num-prompts", type=int, default=None, help="default 32 on GPU, 2 on CPU")
    p.add_argument("--prompt-len", default=None, help="prompt lengths LOW:HIGH (default 128:512 on GPU, 8:24 on CPU)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="tokens generated per prompt (default 128 on GPU, 8 on CPU)")
    p.add_argument("--attention-backend", default="auto")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.45,
                   help="each engine's share of the GPU (one is alive at a time; the margin is for safety)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-dir", type=Path, default=None, help="where to build/reuse the random models")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    gpu = torch.cuda.is_available()
    args.model_configs = (args.model_configs or ("qwen3-0.6b,llama-3.2-1b" if gpu else "tiny")).split(",")
    unknown = [m for m in args.model_configs if m not in MODEL_CONFIGS]
    if unknown:
        raise ValueError(f"--model-configs: unknown {unknown}; choose from {sorted(MODEL_CONFIGS)}")
    args.compare = args.compare.split(",")
    if len(args.compare) != 2 or any(kv not in KV_CACHE_DTYPES for kv in args.compare):
        raise ValueError(f"--compare must be REF,TEST, each one of {KV_CACHE_DTYPES}; "
                         f"got {','.join(args.compare)!r}")
    if args.num_prompts is None:
        args.num_prompts = 32 if gpu else 2
    if args.max_tokens is None:
        args.max_tokens = 128 if gpu else 8
    if args.num_prompts < 1 or args.max_tokens < 1:
        raise ValueError(f"--num-prompts and --max-tokens must be >= 1, got {args.num_prompts}, {args.max_tokens}")
    args.prompt_len = parse_range(args.prompt_len or ("128:512" if gpu else "8:24"), "--prompt-len")
    args.max_model_len = args.prompt_len[1] + args.max_tokens
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = args.out or default_out("fp8_agreement", "+".join(args.model_configs), device)
    payload = {"bench": "fp8_agreement", "rows": [], **environment(device)}
    for name in args.model_configs:
        payload["rows"].append(run_config(name, args, device))
        write_json(out, payload)  # after every shape: a run cut short keeps what it measured
    print(f"\nwrote {out}\n{'config':<14}{'test/ref':<11}{'exact':>6}{'prefix':>7}{'first':>6}"
          f"{'|dlogit|':>10}{'max':>9}{'|logit|':>9}{'margin':>8}{'argmax':>8}{'self':>6}")
    for r in payload["rows"]:
        pair = f"{r['kv_cache_dtypes']['test']}/{r['kv_cache_dtypes']['reference']}"
        print(f"{r['model_config']:<14}{pair:<11}{r['exact']:>6.2f}{r['prefix']:>7.2f}{r['first_token']:>6.2f}"
              f"{r['mean_abs_diff']:>10.3g}{r['max_token_abs_diff']:>9.3g}{r['mean_abs_logit']:>9.3g}"
              f"{r['mean_top2_margin']:>8.3g}{r['argmax_agreement']:>8.3f}{r['reference_matches_greedy']:>6.2f}")
    return payload


if __name__ == "__main__":
    main()
