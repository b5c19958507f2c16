"""Speculative decoding, on against off in the same run: does it pay, and where does it stop?

Two parts (docs/speculative_decoding.md):

* `--part e2e` (a real model, `--model DIR`, e.g. SmolLM2-135M-Instruct; random weights make acceptance meaningless): a
  prompt-lookup-friendly workload (rewrite, correct, continue or document a passage or code given in the prompt),
  greedy, `--rounds` rounds of batch-size requests at once: output tokens/s with n-gram speculation always on against
  off (two engines), the acceptance and the share of identical outputs (1.0 in float32, as the tests check; in bf16 a
  verification's other shapes may round a near tie the other way). `disable_by_batch_size_measured`, the largest batch
  up to which speculation paid, is what `DISABLE_BY_BATCH_SIZE` (minivllm/config.py) should be. At the largest batch the
  default threshold is timed too (`default_threshold`), and `above_threshold_speedup` compares the steps planned while
  more sequences ran than it: there it runs without speculation, and must cost nothing.
* `--part step` (random weights of a named shape, `--model-config`): the model runner's step, launched and waited for,
  at batch 1 (and --batch-sizes), one engine holding the target and a 2-layer draft of the same shape and vocabulary:
  the plain decode step (the target alone, as an engine without speculation runs it), the verification of k drafts (the
  target alone), and the draft-model step (the draft proposes k drafts, the target verifies them, the draft mirrors the
  forward). Same sequence, same context, same slots; only the step differs.

    python benchmarks/spec_bench.py --part e2e --model DIR --batch-sizes 1,64   # tok/s, acceptance
    python benchmarks/spec_bench.py --part step --model-config llama-3.1-8b --model-cache /tmp/models

The model, the JSON record, the table and `--variants` (each variant a child process running
the whole part, e.g. `"k4:,k2:speculative_config={...}"` for e2e) are benchmarks/common.py's.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from statistics import median
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `minivllm` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from minivllm import LLM, SamplingParams
from minivllm.config import DISABLE_BY_BATCH_SIZE
from minivllm.step import SampleRow, ScheduledSeq, SchedulerOutput

from benchmarks.common import (DTYPES, add_model_arguments, add_row, add_variant_arguments,
                               agreement, build_model, finish, format_table, int_list,
                               release_memory, run_benchmark, this_variant, time_ms,
                               with_device_defaults)

# The workload: each task hands the model a text to give back changed a little, so most of the
# answer is in the prompt already. Written for this benchmark.
PASSAGES = [
    "The lighthouse keeper climbed the spiral stairs every evening at dusk. He carried a tin can of "
    "oil, a rag and a small notebook in which he wrote the weather, the ships he saw and the time "
    "the lamp was lit. In forty years he had missed the hour only twice: once when a storm tore the "
    "door from its hinges, and once when his daughter was born in the cottage below the tower.",
    "To make the bread, mix the flour, the salt and the yeast in a large bowl. Add the warm water a "
    "little at a time and knead the dough for ten minutes, until it is smooth and springs back when "
    "pressed. Cover the bowl with a damp cloth and leave it in a warm place for an hour. Shape the "
    "loaf, let it rise again, then bake it for forty minutes until the crust is brown.",
    "The committee met on Tuesday to review the budget for the coming year. The treasurer reported "
    "that spending on repairs had doubled, mostly because of the roof of the library, and proposed "
    "to delay the purchase of new chairs. After a long discussion the members agreed to raise the "
    "annual fee by five percent and to ask the city for a grant for the roof.",
    "def moving_average(values, window):\n    result = []\n    total = 0.0\n    for i, value in "
    "enumerate(values):\n        total += value\n        if i >= window:\n            total -= "
    "values[i - window]\n        if i >= window - 1:\n            result.append(total / window)\n"
    "    return result\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n"
    "        self.items.append(item)\n\n    def pop(self):\n        if not self.items:\n            "
    "raise IndexError('pop from an empty stack')\n        return self.items.pop()\n\n    def "
    "peek(self):\n        return self.items[-1]\n",
]
TASKS = [
    "Rewrite the following text exactly as it is, but in the present tense:\n\n{}",
    "Copy the following text and correct any spelling mistakes:\n\n{}",
    "Repeat the following text, then continue it with one more sentence:\n\n{}",
    "Add a docstring to this code and give the whole code back:\n\n{}",
]


def workload_prompts(tokenizer, count: int) -> list:
    """`count` prompts, every task on every passage in turn; with a chat template when the model
    has one (an instruct model answers better inside it)."""
    prompts = []
    for i in range(count):
        text = TASKS[i % len(TASKS)].format(PASSAGES[i % len(PASSAGES)])
        if tokenizer is not None and getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                 add_generation_prompt=True)
        prompts.append(text)
    return prompts


# ---------------------------------------------------------------------------------------------
# e2e: output tokens/s with and without speculation
# ---------------------------------------------------------------------------------------------
COUNTS = ("num_draft_tokens", "num_accepted_tokens", "num_verifications")  # the engine's speculative stats


def run_batches(llm, batch_sizes: list[int], max_tokens: int, rounds: int, sampling: dict) -> list[dict]:
    """Each batch size: `rounds` rounds of `batch` requests at once, greedy (a round lasts as its longest request at any
    batch size); output tokens/s over all, and over the steps planned with more running than the default threshold."""
    params = SamplingParams(**{"temperature": 0.0, "max_tokens": max_tokens, **sampling})
    rows, stats = [], llm.engine.stats
    for batch in batch_sizes:
        prompts = workload_prompts(llm.engine.tokenizer, batch * rounds)
        before, first_step = llm.engine.get_stats().get("speculative", {}), stats.totals["steps"]
        start = time.perf_counter()
        outputs = [o.token_ids for r in range(rounds)
                   for o in llm.generate(prompts[r * batch:(r + 1) * batch], params, use_tqdm=False)]
        elapsed = time.perf_counter() - start
        steps = list(stats.history)[first_step - stats.totals["steps"] - 1:]  # this run's, and the one before
        above = [(r.num_generated_tokens, r.finish_time - max(r.time, p.finish_time))  # (tokens, wall s)
                 for p, r in zip(steps, steps[1:]) if r.num_running > DISABLE_BY_BATCH_SIZE]
        tokens = sum(len(o) for o in outputs)
        row = {"batch_size": batch, "num_requests": batch * rounds, "output_tokens": tokens, "outputs": outputs,
               "output_tokens_per_s": tokens / elapsed, "above_threshold_tokens_per_s":
               sum(n for n, _ in above) / sum(t for _, t in above) if above else None}
        after = llm.engine.get_stats().get("speculative", {})
        if after:
            row.update({key: after[key] - before[key] for key in COUNTS},
                       disable_by_batch_size=after["disable_by_batch_size"])
        rows.append(row)
    return rows


def e2e(model_dir: Path, dtype: str, args, device: torch.device, record: dict, out: Path) -> None:
    """Speculation off, always on, and (at the largest batch) with the default threshold: one
    engine each, the same requests; rows into `record`."""
    variant, sizes = this_variant(args), args.batch_sizes
    ngram = {"method": "ngram", "num_speculative_tokens": args.num_speculative_tokens}
    spec = variant.engine.get("speculative_config", ngram)  # a variant may set its own
    engine = {**dict(dtype=dtype, device=device.type, max_num_seqs=max(sizes), max_model_len=args.max_model_len),
              **({"num_kv_blocks": 256} if device.type == "cpu" else {}),
              **{k: v for k, v in variant.engine.items() if k != "speculative_config"}}
    modes = [("off", None, sizes), ("always_on", {**spec, "disable_by_batch_size": None}, sizes)]
    if max(sizes) > 1:
        modes.append(("default_threshold", {k: v for k, v in spec.items() if k != "disable_by_batch_size"}, [max(sizes)]))
    measured = {mode: [] for mode, _, _ in modes}
    for turn in range(args.repeats):  # the modes take turns, each first in one: a drift hits all alike
        for mode, speculative_config, batch_sizes in modes[turn % len(modes):] + modes[:turn % len(modes)]:
            with LLM(str(model_dir), speculative_config=speculative_config, **engine) as llm:
                for _ in range(2):  # warm-up: batch 1's prompts, 16 tokens each, then from the prefix cache
                    run_batches(llm, [1], 16, args.rounds, variant.sampling)  # (as the timed rounds find them)
                measured[mode].append({r["batch_size"]: r for r in run_batches(
                    llm, batch_sizes, args.max_tokens, args.rounds, variant.sampling)})
            del llm
            release_memory(device)
    for mode, _, batch_sizes in modes[1:]:
        for batch in batch_sizes:
            add_row(record, out, {"variant": variant.name, **e2e_row(
                mode, [m[batch] for m in measured["off"]], [m[batch] for m in measured[mode]], args)})


def e2e_row(mode: str, offs: list[dict], ons: list[dict], args) -> dict:
    """One batch size, speculation on against off: the median of the repeats' ratios (each on
    run over the off run of its own turn), the acceptance over all of them."""
    speedups, above = (sorted(on[key] / off[key] for on, off in zip(ons, offs) if on[key] and off[key])
                       for key in ("output_tokens_per_s", "above_threshold_tokens_per_s"))
    same = agreement(ons[0]["outputs"], offs[0]["outputs"])
    total = {key: sum(on.get(key, 0) for on in ons) for key in COUNTS + ("output_tokens",)}
    drafts, accepted, verifications = (total[key] for key in COUNTS)
    return {"part": "e2e", "mode": mode, "model": str(args.model_label),
            "num_speculative_tokens": args.num_speculative_tokens, "acceptance_rate": accepted / max(drafts, 1),
            **{key: ons[0].get(key) for key in ("batch_size", "num_requests", "disable_by_batch_size")}, **total,
            "mean_acceptance_length": 1 + accepted / verifications if verifications else None,
            "output_tokens_per_s": median([on["output_tokens_per_s"] for on in ons]),
            "off_output_tokens": sum(off["output_tokens"] for off in offs),
            "off_output_tokens_per_s": median([off["output_tokens_per_s"] for off in offs]),
            "speedup": median(speedups), "speedups": speedups, "above_threshold_speedups": above,
            "above_threshold_speedup": median(above) if above else None,
            "identical_outputs": same["exact"], "common_prefix": same["prefix"]}


def threshold_from(rows: list[dict]) -> int | None:
    """The largest batch size up to which always-on speculation paid at every measured size
    (speedup >= 1): what `disable_by_batch_size` should be. None if it never paid."""
    always_on = sorted((r for r in rows if r.get("mode") == "always_on"), key=lambda r: r["batch_size"])
    paying = [r["batch_size"] for r in itertools.takewhile(lambda r: r["speedup"] >= 1.0, always_on)]
    return paying[-1] if paying else None


# ---------------------------------------------------------------------------------------------
# step: the runner's plain decode, verification and draft-model steps
# ---------------------------------------------------------------------------------------------
def time_runner_steps(llm, batch: int, context: int, k: int, device: torch.device) -> dict:
    """Prefill `batch` sequences of about `context` tokens, then time the runner launching and
    waiting for one step of each kind, repeated at the same positions (rewriting the same slots).

    The step recomputes each sequence's last prompt token and, when speculating, verifies k
    drafts after it; the prompt length leaves room for them in its last block. The plain steps
    run with the draft model set aside (no mirror), as an engine without speculation runs them.
    """
    engine, runner = llm.engine, llm.engine.executor.runner
    length = -(-context // runner.block_size) * runner.block_size - k  # the last block has room for k drafts
    room = engine.config.scheduler_config.max_model_len - length  # never finishes while timed
    params = SamplingParams(temperature=0.0, max_tokens=room, ignore_eos=True)
    generator = torch.Generator().manual_seed(batch)
    prompts = [torch.randint(10, runner.vocab_size, (length,), generator=generator).tolist() for _ in range(batch)]
    ids = engine.add_requests(prompts, params)
    engine.step()  # the prefill, in one step (the token budget holds it; overlap is off)
    seqs = list(engine.scheduler.running)
    assert len(seqs) == batch and all(s.num_computed_tokens == length for s in seqs)

    def step(num_drafts: int, on_device: bool) -> SchedulerOutput:
        scheduled = [ScheduledSeq(s.seq_id, length - 1, [s.token_ids[length - 1]], False, s.block_table, 1,
                                  is_decode=True, draft_token_ids=[] if on_device else [11] * num_drafts,
                                  num_draft_tokens=num_drafts) for s in seqs]
        return SchedulerOutput(scheduled, [SampleRow(s.seq_id, params) for s in seqs])

    def timed(output: SchedulerOutput) -> float:
        return time_ms(lambda: runner.execute(output).wait(), device, graph=False) * 1e-3

    draft, runner.draft = runner.draft, None
    times = {"decode_step_s": timed(step(0, False)), "verify_step_s": timed(step(k, False))}
    runner.draft = draft
    times["draft_step_s"] = timed(step(k, True))
    for request_id in ids:
        engine.abort(request_id)
    runner.execute(SchedulerOutput([], [], finished_seq_ids=[s.seq_id for s in seqs]))  # free their rows
    return {"cuda_graphs": runner.graphs is not None, **times}


def step_part(model_dir: Path, dtype: str, args, device: torch.device, record: dict, out: Path) -> None:
    if args.model is not None:
        raise SystemExit("--part step times random-weight shapes: use --model-config, not --model")
    variant = this_variant(args)
    k, batch = args.num_speculative_tokens, max(args.batch_sizes)
    draft = build_model(args.model_label, args.model_cache, DTYPES[dtype], seed=1, num_layers=2)
    spec = {"method": "draft", "model": str(draft), "num_speculative_tokens": k}
    engine = {**dict(dtype=dtype, device=device.type, max_num_seqs=batch, max_model_len=args.context + 64,
                     async_scheduling=False, max_num_batched_tokens=max(2048, batch * (args.context + 16)),
                     enable_prefix_caching=False, speculative_config=spec), **variant.engine}
    if device.type == "cpu":
        engine.setdefault("num_kv_blocks", batch * (args.context // 16 + 8))
    with LLM(str(model_dir), **engine) as llm:
        for b in args.batch_sizes:
            m = time_runner_steps(llm, b, args.context, k, device)
            add_row(record, out, {
                "variant": variant.name, "part": "step", "model": args.model_label, "batch_size": b,
                "context": args.context, "num_speculative_tokens": k, **m,
                "verify_over_decode": m["verify_step_s"] / m["decode_step_s"],
                "draft_step_over_decode": m["draft_step_s"] / m["decode_step_s"]})
    del llm
    release_memory(device)


E2E_COLUMNS = [("variant", "variant", ""), ("mode", "mode", ""), ("batch", "batch_size", "d"),
               ("off tok/s", "off_output_tokens_per_s", ".1f"), ("on tok/s", "output_tokens_per_s", ".1f"),
               ("speedup", "speedup", ".2f"), (f"> {DISABLE_BY_BATCH_SIZE} running", "above_threshold_speedup", ".2f"),
               ("accept len", "mean_acceptance_length", ".2f"), ("accept rate", "acceptance_rate", ".2f"),
               ("identical", "identical_outputs", ".0%")]
STEP_COLUMNS = [
    ("variant", "variant", ""), ("model", "model", ""), ("batch", "batch_size", "d"),
    ("decode ms", lambda r: 1e3 * r["decode_step_s"], ".3f"), ("verify k ms", lambda r: 1e3 * r["verify_step_s"], ".3f"),
    ("verify/decode", "verify_over_decode", ".2f"), ("draft step ms", lambda r: 1e3 * r["draft_step_s"], ".3f"),
    ("draft/decode", "draft_step_over_decode", ".2f"), ("graphs", "cuda_graphs", "")]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(p)
    add_variant_arguments(p)
    p.add_argument("--part", choices=("e2e", "step"), required=True)
    p.add_argument("--batch-sizes", default=None, help="e2e default 1,2,4,8,16,32,64; step default 1")
    p.add_argument("--num-speculative-tokens", "-k", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=256, help="e2e: output tokens per request")
    p.add_argument("--max-model-len", type=int, default=1024, help="e2e")
    p.add_argument("--rounds", type=int, default=8, help="e2e: rounds of batch-size requests at once")
    p.add_argument("--repeats", type=int, default=3, help="e2e: runs of every mode, in turns (median ratio)")
    p.add_argument("--context", type=int, help="step: context per sequence (default 1024; CPU 40)")
    args = with_device_defaults(p, argv, gpu={"context": 1024}, cpu={"context": 40})
    args.batch_sizes = sorted(set(int_list(args.batch_sizes or ("1,2,4,8,16,32,64" if args.part == "e2e" else "1"),
                                           "--batch-sizes")))
    if args.part == "e2e" and args.model is None:
        p.error("--part e2e needs --model DIR (a real model: random weights make acceptance meaningless)")
    if min(args.num_speculative_tokens, args.max_tokens, args.rounds, args.repeats, args.context) < 1:
        p.error("-k, --max-tokens, --rounds, --repeats and --context must be >= 1")
    return args


def main(argv=None) -> dict:
    args, record, out = run_benchmark(lambda args: f"spec_{args.part}", __file__, argv, parse_args,
                                      lambda *a: (e2e if a[2].part == "e2e" else step_part)(*a))
    measured = [r for r in record["results"] if "error" not in r]
    if args.part == "step":
        finish(out, record, format_table(measured, STEP_COLUMNS))
        return record
    if measured:  # of the first variant: what config.py's default should be
        record["disable_by_batch_size_measured"] = threshold_from(
            [r for r in measured if r["variant"] == measured[0]["variant"]])
    finish(out, record, format_table(measured, E2E_COLUMNS),
           f"speculation paid up to batch {record.get('disable_by_batch_size_measured')}: "
           "the value for DISABLE_BY_BATCH_SIZE (minivllm/config.py)")
    return record


if __name__ == "__main__":
    main()
