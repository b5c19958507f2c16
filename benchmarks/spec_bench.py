"""Speculative decoding, on against off in the same run: does it pay, and where does it stop?

Two parts (docs/speculative_decoding.md):

* `e2e` (a real model, `--model DIR`, e.g. SmolLM2-135M-Instruct): a prompt-lookup-friendly
  workload (rewrite, continue or edit a passage or code given in the prompt), greedy, so both
  variants produce the same tokens (up to bf16 rounding: the share of identical outputs is
  recorded). For each batch size, output tokens/s with n-gram speculation
  always on and with it off, their ratio, and the acceptance (mean acceptance length, rate per
  draft position). The largest batch at which speculation still pays is what
  `disable_by_batch_size` should be; at the largest batch the engine's default threshold is
  timed too (speculation then turns itself off).
* `step` (random weights of a named shape, `--shapes qwen3-0.6b,llama-3.1-8b`): the model
  runner's step, launched and waited for, at batch 1 (and --batch-sizes): a plain decode step, a
  verification step of k drafts (the target alone), and a draft-model step (a 2-layer draft of
  the same shape family proposes k drafts, the target verifies them, the draft mirrors the
  forward). Same engine, same sequence, same context; only the step differs.

    python benchmarks/spec_bench.py --part e2e --model DIR           # real model: tok/s, acceptance
    python benchmarks/spec_bench.py --part step --shapes qwen3-0.6b   # random weights: step times

JSON goes to benchmarks/results/ (or --out); the table is printed last. On the CPU it runs tiny
cases (`--smoke`): CPU numbers are no GPU claim.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import cpu_disclaimer, default_out, environment, release_memory, write_json

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
def run_batches(llm, batch_sizes: list[int], max_tokens: int, rounds_for_one: int) -> list[dict]:
    """Each batch size: rounds of `batch` requests submitted at once, greedy; tokens/s over all."""
    from minivllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    rows = []
    for batch in batch_sizes:
        rounds = max(1, rounds_for_one // batch)
        prompts = workload_prompts(llm.tokenizer, batch * rounds)
        before = llm.get_stats().get("speculative", {})
        start = time.perf_counter()
        tokens, outputs = 0, []
        for r in range(rounds):
            outs = llm.generate(prompts[r * batch:(r + 1) * batch], params, use_tqdm=False)
            tokens += sum(len(o.token_ids) for o in outs)
            outputs += [o.token_ids for o in outs]
        elapsed = time.perf_counter() - start
        after = llm.get_stats().get("speculative", {})
        row = {"batch_size": batch, "num_requests": batch * rounds, "output_tokens": tokens,
               "elapsed_s": elapsed, "output_tokens_per_s": tokens / elapsed, "outputs": outputs}
        if after:
            drafts = after["num_draft_tokens"] - before["num_draft_tokens"]
            accepted = after["num_accepted_tokens"] - before["num_accepted_tokens"]
            verifications = after["num_verifications"] - before["num_verifications"]
            row.update(num_draft_tokens=drafts, num_accepted_tokens=accepted, num_verifications=verifications,
                       acceptance_rate=accepted / drafts if drafts else 0.0,
                       mean_acceptance_length=1 + accepted / verifications if verifications else None)
        rows.append(row)
    return rows


def e2e(args, device: torch.device) -> list[dict]:
    from minivllm import LLM

    batch_sizes = args.batch_sizes
    ngram = {"method": "ngram", "num_speculative_tokens": args.num_speculative_tokens}
    variants = [("off", None), ("on", {**ngram, "disable_by_batch_size": None})]
    if max(batch_sizes) > 1:
        variants.append(("default", ngram))  # the engine's own threshold, at the largest batch only
    engine = dict(max_num_seqs=max(batch_sizes), max_model_len=args.max_model_len)
    if device.type == "cpu":
        engine.update(dtype="float32", num_kv_blocks=256)
    results = {}
    for name, spec in variants:
        llm = LLM(str(args.model), speculative_config=spec, **engine)
        sizes = batch_sizes if name != "default" else [max(batch_sizes)]
        run_batches(llm, [1], min(16, args.max_tokens), 1)  # warm-up
        results[name] = run_batches(llm, sizes, args.max_tokens, args.rounds)
        if spec is not None:
            results[name][0]["disable_by_batch_size"] = llm.get_stats()["speculative"]["disable_by_batch_size"]
        del llm
        release_memory(device)
    records = [_e2e_record("always_on", off, on, args) for off, on in zip(results["off"], results["on"])]
    if "default" in results:
        records.append(_e2e_record("default_threshold", results["off"][-1], results["default"][0], args))
    return records


def _e2e_record(variant: str, off: dict, on: dict, args) -> dict:
    """One batch size, on against off. Greedy outputs are the same token for token in float32
    (the tests); in bf16 a verification's other shapes may round a near tie the other way, so
    the share of identical outputs is recorded, not assumed."""
    keep = {k: v for k, v in on.items() if k not in ("outputs", "elapsed_s")}
    same = sum(a == b for a, b in zip(on["outputs"], off["outputs"])) / len(off["outputs"])
    return {"bench": "spec_e2e", "variant": variant, "model": str(args.model),
            "num_speculative_tokens": args.num_speculative_tokens, **keep,
            "off_output_tokens": off["output_tokens"], "off_output_tokens_per_s": off["output_tokens_per_s"],
            "identical_outputs": same, "speedup": on["output_tokens_per_s"] / off["output_tokens_per_s"]}


def threshold_from(records: list[dict]) -> int | None:
    """The largest batch size up to which speculation always paid (speedup >= 1): what
    `disable_by_batch_size` should be. None if it never paid."""
    paying = None
    for r in sorted((r for r in records if r["variant"] == "always_on"), key=lambda r: r["batch_size"]):
        if r["speedup"] < 1.0:
            break
        paying = r["batch_size"]
    return paying


# ---------------------------------------------------------------------------------------------
# step: the runner's plain decode, verification and draft-model steps
# ---------------------------------------------------------------------------------------------
def time_runner_steps(llm, batch: int, context: int, k: int, steps: int, with_draft: bool) -> dict:
    """Prefill `batch` sequences of about `context` tokens, then time the runner launching and
    waiting for one step of each kind, repeated at the same positions (rewriting the same slots).

    The step recomputes each sequence's last prompt token and, when speculating, verifies k
    drafts after it; the prompt length leaves room for them in its last block.
    """
    from minivllm import SamplingParams
    from minivllm.step import SampleRow, ScheduledSeq, SchedulerOutput

    engine = llm.engine
    runner = engine.model_runner
    bs = runner.block_size
    length = -(-context // bs) * bs - k  # the last block has room for k drafts
    room = engine.config.scheduler_config.max_model_len - length  # never finishes while timed
    params = SamplingParams(temperature=0.0, max_tokens=room, ignore_eos=True)
    generator = torch.Generator().manual_seed(batch)
    prompts = [torch.randint(10, runner.vocab_size, (length,), generator=generator).tolist() for _ in range(batch)]
    ids = engine.add_requests(prompts, params)
    engine.step()  # the prefill, in one step (the token budget holds it; overlap is off)
    seqs = list(engine.scheduler.running)
    assert len(seqs) == batch and all(s.num_computed_tokens == length for s in seqs)

    def step(drafts: bool, device_drafts: bool) -> SchedulerOutput:
        scheduled = [ScheduledSeq(s.seq_id, length - 1, [s.token_ids[length - 1]], False, s.block_table, 1,
                                  True, [] if device_drafts or not drafts else [11] * k, k if drafts else 0)
                     for s in seqs]
        return SchedulerOutput(scheduled, [SampleRow(s.seq_id, params) for s in seqs])

    kinds = {"decode": step(False, False), "verify": step(True, False)}
    if with_draft:
        kinds = {"decode": kinds["decode"], "draft": step(True, True)}
    times = {}
    for name, output in kinds.items():
        for _ in range(3):  # warm-up
            runner.execute(output).wait()
        samples = []
        for _ in range(steps):
            t0 = time.perf_counter()
            runner.execute(output).wait()
            samples.append(time.perf_counter() - t0)
        times[name] = statistics.median(samples)
    for request_id in ids:
        engine.abort(request_id)
    runner.execute(SchedulerOutput([], [], finished_seq_ids=[s.seq_id for s in seqs]))  # free their rows
    return {"cuda_graphs": runner.graphs is not None, **{f"{name}_step_s": t for name, t in times.items()}}


def step_part(args, device: torch.device) -> list[dict]:
    from benchmarks.common import MODEL_CONFIGS, build_model
    from minivllm import LLM
    from minivllm.models import make_random_model

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    root = args.model_dir or Path("/tmp/minivllm-spec-bench")
    k = args.num_speculative_tokens
    records = []
    for shape in args.shapes:
        print(f"building the {shape} target and its 2-layer draft (random weights) in {root} ...", flush=True)
        target = build_model(shape, root, dtype)
        arch, size = MODEL_CONFIGS[shape]
        draft_dir = root / f"{shape}-2-layer-draft-{str(dtype).removeprefix('torch.')}"
        if not (draft_dir / "config.json").is_file():
            make_random_model(draft_dir, arch=arch, size=size, seed=1, dtype=dtype,
                              overrides={"num_hidden_layers": 2}, overwrite=True)
        batch = max(args.batch_sizes)
        engine = dict(max_num_seqs=batch, max_model_len=args.context + 64, async_scheduling=False,
                      max_num_batched_tokens=max(2048, batch * (args.context + 16)), enable_prefix_caching=False)
        if device.type == "cpu":
            engine.update(dtype="float32", num_kv_blocks=batch * (args.context // 16 + 8))
        measured: dict[int, dict] = {}
        for name, spec in (("ngram", {"method": "ngram", "num_speculative_tokens": k}),
                           ("draft", {"method": "draft", "model": str(draft_dir), "num_speculative_tokens": k})):
            llm = LLM(str(target), speculative_config=spec, **engine)
            for b in args.batch_sizes:
                timed = time_runner_steps(llm, b, args.context, k, args.steps, with_draft=name == "draft")
                measured.setdefault(b, {}).update({f"{name}_{key}": v for key, v in timed.items()})
            del llm
            release_memory(device)
        for b, m in measured.items():
            plain = m["ngram_decode_step_s"]  # the decode step of an engine without a draft model
            records.append({
                "bench": "spec_step", "shape": shape, "batch_size": b, "context": args.context,
                "num_speculative_tokens": k, "cuda_graphs": m["ngram_cuda_graphs"],
                "decode_step_s": plain, "verify_step_s": m["ngram_verify_step_s"],
                "draft_step_s": m["draft_draft_step_s"],
                "decode_step_with_draft_mirror_s": m["draft_decode_step_s"],
                "verify_over_decode": m["ngram_verify_step_s"] / plain,
                "draft_step_over_decode": m["draft_draft_step_s"] / plain,
            })
    return records


# ---------------------------------------------------------------------------------------------
def print_table(records: list[dict]) -> None:
    for r in records:
        if r["bench"] == "spec_e2e":
            acc = r.get("mean_acceptance_length")
            print(f"  e2e {r['variant']:<17} B={r['batch_size']:>3}  off {r['off_output_tokens_per_s']:9.1f} tok/s  "
                  f"on {r['output_tokens_per_s']:9.1f} tok/s  x{r['speedup']:.2f}  "
                  f"acceptance length {acc if acc is None else round(acc, 2)}  "
                  f"rate {r.get('acceptance_rate', 0):.2f}  identical outputs {r['identical_outputs']:.0%}")
        else:
            print(f"  step {r['shape']:<13} B={r['batch_size']:>3}  decode {1e3 * r['decode_step_s']:7.3f} ms  "
                  f"verify k={r['num_speculative_tokens']} {1e3 * r['verify_step_s']:7.3f} ms "
                  f"(x{r['verify_over_decode']:.2f})  draft step {1e3 * r['draft_step_s']:7.3f} ms "
                  f"(x{r['draft_step_over_decode']:.2f})  graphs={r['cuda_graphs']}")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=("e2e", "step"), required=True)
    p.add_argument("--model", type=Path, default=None, help="e2e: the model directory (a real model)")
    p.add_argument("--batch-sizes", default=None,
                   help="comma-separated (e2e default 1,2,4,8,16,32,64; step default 1)")
    p.add_argument("--num-speculative-tokens", type=int, default=4, help="k")
    p.add_argument("--max-tokens", type=int, default=256, help="e2e: output tokens per request")
    p.add_argument("--max-model-len", type=int, default=2048, help="e2e")
    p.add_argument("--rounds", type=int, default=8, help="e2e: requests at batch 1 (fewer rounds at larger batches)")
    p.add_argument("--shapes", default="qwen3-0.6b,llama-3.1-8b", help="step: named random-weight shapes")
    p.add_argument("--context", type=int, default=1024, help="step: tokens of context per sequence")
    p.add_argument("--steps", type=int, default=50, help="step: timed steps per kind")
    p.add_argument("--model-dir", type=Path, default=None, help="step: where the random models are built")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, for a CPU check of the code")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    default_sizes = "1,2,4,8,16,32,64" if args.part == "e2e" else "1"
    args.batch_sizes = [int(b) for b in (args.batch_sizes or default_sizes).split(",")]
    args.shapes = args.shapes.split(",")
    if args.smoke:
        args.max_tokens, args.rounds, args.max_model_len = min(args.max_tokens, 24), min(args.rounds, 2), 512
        args.context, args.steps = min(args.context, 40), min(args.steps, 3)
    if args.part == "e2e" and args.model is None:
        p.error("--part e2e needs --model DIR (a real model: random weights make acceptance meaningless)")
    note = cpu_disclaimer(device)
    if note:
        print(note)
    records = e2e(args, device) if args.part == "e2e" else step_part(args, device)
    payload = {"environment": environment(device), "note": note, "records": records}
    if args.part == "e2e":
        payload["disable_by_batch_size_measured"] = threshold_from(records)
    out = args.out or default_out(f"spec_{args.part}", "spec", device)
    write_json(out, payload)
    print(f"wrote {out}")
    print_table(records)
    if args.part == "e2e":
        print(f"  speculation pays up to batch {payload['disable_by_batch_size_measured']} "
              "(the value for disable_by_batch_size)")
    return payload


if __name__ == "__main__":
    main()
