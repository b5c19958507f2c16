"""Accuracy: how close are two ways of computing the same model's output? Three questions:

* `hf`      minivllm's greedy tokens against Hugging Face `generate`'s, per model and dtype. In
            float32 they must be equal (tests/engine/test_engine_vs_hf.py asserts it); in bf16
            two correct implementations sum in a different order, and once two candidates'
            logits are closer than that rounding, greedy decoding may pick either. HF runs one
            prompt at a time (no padding: exactly the unpadded sequence).
* `engine`  minivllm with --test settings against minivllm with --reference settings (default: the defaults),
            e.g. `--test kv_cache_dtype=fp8` or `--test tensor_parallel_size=2`: greedy agreement, and
            **teacher-forced logits**: both engines are fed the same tokens (the prompt, then the reference's
            greedy continuation) through minivllm's own model and paged cache, prefill then one decode step per
            token, as generation does, so every position reads the earlier K/V back from its engine's cache.
            Reported: mean |logit difference| over the vocabulary (mean and worst position), the largest single
            one, the reference's mean |logit| and top-1 minus top-2 margin (the scale to read it against), and
            the share of positions whose argmax agrees; `reference_matches_greedy` checks the method (the
            reference's teacher-forced argmax is its own greedy token). Logits need one process: with tensor
            parallelism only the tokens are compared.
* `scales`  which scale granularity an fp8 (e4m3) KV cache should use: per tensor or per head (fixed:
            calibrated on all the data, on its first 10 %, or 1), per token, per token and head (float32 or
            bfloat16). For synthetic K/V (`gaussian`; `outliers`: log-normal channel magnitudes, two channels per
            head 20x larger; `sinks`: outliers plus heads 100x apart), the reference attention on the dequantized
            cache against float32 attention on the exact values: the worst relative error over seeds, and the
            scale bytes over the fp8 K/V bytes. Accuracy, not speed: CPU numbers are the real ones.

Agreement: `exact` (identical rows), `prefix` (mean common prefix as a share of the row),
`first_token`. Random weights give nearly flat next-token distributions (near-ties everywhere), so
their bf16 and fp8 agreement is a pessimistic bound for a trained model; --model DIR takes one.

    python benchmarks/agreement.py hf                          # GPU: four small models, bf16 and float32
    python benchmarks/agreement.py engine --test kv_cache_dtype=fp8 --model-configs qwen3-0.6b,llama-3.2-1b
    python benchmarks/agreement.py engine --test tensor_parallel_size=2 --model-configs llama-3.1-8b
    python benchmarks/agreement.py scales
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `minivllm` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from minivllm import LLM, SamplingParams
from minivllm.step import SampleRow, ScheduledSeq, SchedulerOutput
from minivllm.worker.input_batch import build_input_batch

from benchmarks.common import (DTYPES, MODEL_CONFIGS, add_row, agreement, build_model, default_out,
                               finish, format_table, hf_generate, load_hf, names, new_record,
                               parse_range, parse_variants, pick_device, random_requests,
                               release_memory, vocab_size, write_json)

BLOCK_SIZE = 16


def greedy(llm, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    outputs = llm.generate(prompts, max_tokens=max_tokens, temperature=0.0, ignore_eos=True, use_tqdm=False)
    return [o.token_ids for o in outputs]


def make_llm(model_dir: Path, dtype: str, args, device, **settings):
    """One engine. Prefix caching is off: the teacher-forced pass borrows free blocks of the pool,
    which must hold nothing a later lookup could find."""
    # On the CPU there is no free memory to size the pool from: give it what the prompts need.
    blocks = None if device.type == "cuda" else args.num_prompts * -(-args.max_model_len // BLOCK_SIZE)
    return LLM(str(model_dir), dtype=dtype, device=device.type, block_size=BLOCK_SIZE,
               num_kv_blocks=blocks, gpu_memory_utilization=args.gpu_memory_utilization,
               enable_prefix_caching=False, max_num_seqs=args.num_prompts,
               max_model_len=args.max_model_len, **settings)


def models(args, device) -> list[tuple[str, Path]]:
    if args.model is not None:
        return [(args.model.name, args.model)]
    root = args.model_cache or Path(tempfile.mkdtemp(prefix="minivllm-agreement-"))
    # Weights saved in float32: each dtype of the comparison rounds the same values.
    return [(name, build_model(name, root, torch.float32)) for name in args.model_configs]


# ------------------------------------------------------------------------------------------
# hf: minivllm against HF generate
# ------------------------------------------------------------------------------------------
def run_hf(args, device, record: dict, out: Path) -> None:
    for (name, model_dir), dtype in itertools.product(models(args, device), args.dtypes):
        prompts = random_requests(args.num_prompts, args.prompt_len, (1, 1), vocab_size(model_dir),
                                  args.seed)[0]
        hf = load_hf(model_dir, device, dtype)
        theirs = [hf_generate(hf, [prompt], args.max_tokens, device)[0] for prompt in prompts]
        del hf
        llm = make_llm(model_dir, dtype, args, device)
        ours = greedy(llm, prompts, args.max_tokens)
        llm.close()
        del llm
        release_memory(device)
        add_row(record, out, {"model": name, "dtype": dtype, "num_prompts": len(prompts),
                              "max_tokens": args.max_tokens, **agreement(ours, theirs)})


# ------------------------------------------------------------------------------------------
# engine: minivllm with other settings against minivllm
# ------------------------------------------------------------------------------------------
@torch.inference_mode()
def teacher_forced_logits(llm, prompts: list[list[int]], continuations: list[list[int]]) -> torch.Tensor:
    """Float32 logits [prompts, M, vocab] on the CPU: [i, j] predicts continuation token j of
    prompt i from the prompt and the continuation before j.

    Each step is what the runner does with a scheduled batch, minus the sampler: pack it (the
    engine's own `build_input_batch`), run the model, which writes the new K/V into its cache and
    attends over everything cached, and take each sequence's last logits. Step 0 prefills one
    prompt at a time; step j >= 1 decodes token j - 1 of every prompt. The engine must be idle
    (after `generate` every block is free): each prompt borrows blocks of the free list.
    """
    runner, blocks = llm.engine.executor.runner, llm.engine.block_manager
    num_new = len(continuations[0])
    need = [blocks.blocks_for(len(p) + num_new) for p in prompts]
    free = blocks.free_block_ids()
    if blocks.num_used_blocks or sum(need) > len(free):
        raise RuntimeError(f"teacher forcing needs an idle engine with {sum(need)} free blocks")
    tables = [free[a:b] for a, b in itertools.pairwise(itertools.accumulate(need, initial=0))]
    greedy_params = SamplingParams(temperature=0.0)

    def last_logits(seqs: list[ScheduledSeq]) -> torch.Tensor:
        step = SchedulerOutput(seqs, [SampleRow(s.seq_id, greedy_params) for s in seqs])
        batch = build_input_batch(step, blocks.block_size, runner.device, backend=runner.backend)
        hidden = runner.model(batch.input_ids, batch.positions, batch.attn_metadata)
        return runner.model.compute_logits(hidden[batch.logits_indices]).float().cpu()

    logits = torch.empty(len(prompts), num_new, runner.vocab_size)
    for i, (prompt, table) in enumerate(zip(prompts, tables)):
        logits[i, 0] = last_logits([ScheduledSeq(i, 0, list(prompt), False, table, 1)])[0]
    for j in range(1, num_new):
        logits[:, j] = last_logits([ScheduledSeq(i, len(p) + j - 1, [c[j - 1]], False, t, 1, is_decode=True)
                                    for i, (p, c, t) in enumerate(zip(prompts, continuations, tables))])
    return logits


def logit_stats(reference: torch.Tensor, test: torch.Tensor, continuations: list[list[int]]) -> dict:
    """How far `test`'s logits are from `reference`'s, position by position (both [N, M, vocab]),
    folded one prompt at a time so the temporaries stay one prompt's size."""
    per_position, largest, scale, margin, agree = [], 0.0, [], [], []
    for ref, got in zip(reference, test):
        diff = (got - ref).abs_()
        per_position.append(diff.mean(-1))
        largest = max(largest, diff.max().item())
        scale.append(ref.abs().mean(-1))
        top2 = ref.topk(2, dim=-1).values
        margin.append(top2[:, 0] - top2[:, 1])
        agree.append(ref.argmax(-1) == got.argmax(-1))
    per_position = torch.cat(per_position)
    own = reference.argmax(-1) == torch.tensor(continuations)
    return {"mean_abs_diff": per_position.mean().item(),
            "max_position_abs_diff": per_position.max().item(), "max_abs_diff": largest,
            "mean_abs_logit": torch.cat(scale).mean().item(),
            "mean_top2_margin": torch.cat(margin).mean().item(),
            "argmax_agreement": torch.cat(agree).float().mean().item(),
            "reference_matches_greedy": own.float().mean().item()}


def run_engine(args, device, record: dict, out: Path) -> None:
    settings = parse_variants(f"reference:{args.reference},test:{args.test}")
    if any(v.env or v.sampling for v in settings):
        raise SystemExit("--reference/--test take engine settings (key=value) only")
    for name, model_dir in models(args, device):
        prompts = random_requests(args.num_prompts, args.prompt_len, (1, 1), vocab_size(model_dir),
                                  args.seed)[0]
        tokens, logits = {}, {}
        for v in settings:  # one engine alive at a time
            llm = make_llm(model_dir, args.dtypes[0], args, device, **v.engine)
            tokens[v.name] = greedy(llm, prompts, args.max_tokens)
            if llm.engine.config.model_config.tensor_parallel_size == 1:
                logits[v.name] = teacher_forced_logits(llm, prompts, tokens["reference"])
            llm.close()
            del llm
            release_memory(device)
        row = {"model": name, "dtype": args.dtypes[0], "reference": args.reference, "test": args.test,
               "num_prompts": len(prompts), "max_tokens": args.max_tokens,
               **agreement(tokens["test"], tokens["reference"])}
        if len(logits) == 2:
            row.update(logit_stats(logits["reference"], logits["test"], tokens["reference"]))
        add_row(record, out, row)


# ------------------------------------------------------------------------------------------
# scales: the fp8 scale granularity
# ------------------------------------------------------------------------------------------
E4M3_MAX = 448.0
HQ, HKV, D = 32, 8, 128  # the attn_bench shape
QUERY_LENS, SEQ_LENS = [1, 1, 1, 1, 64], [2048, 1500, 700, 33, 1024]  # decodes + a prefill chunk
DISTRIBUTIONS = ("gaussian", "outliers", "sinks")
# Scale bytes per token and layer for K and V; a scale fixed per layer or head counts 0.
SCALE_BYTES = {"unit": 0, "tensor": 0, "tensor_calib10": 0, "head": 0, "head_calib10": 0,
               "token": 2 * 4, "token_head": 2 * HKV * 4, "token_head_bf16": 2 * HKV * 2}


def synthetic_kv(kind: str, num_tokens: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    k, v = torch.randn(2, num_tokens, HKV, D, generator=g)
    if kind == "gaussian":
        return k, v
    channel = torch.exp(torch.randn(HKV, D, generator=g))
    channel[:, torch.randperm(D, generator=g)[:2]] *= 20.0
    k, v = k * channel, v * torch.exp(0.5 * torch.randn(num_tokens, 1, 1, generator=g))
    if kind == "sinks":
        head = torch.logspace(-1, 1, HKV)[torch.randperm(HKV, generator=g)][None, :, None]
        k, v = k * head, v * head
    return k, v


def fp8_round_trip(x: torch.Tensor, granularity: str) -> torch.Tensor:
    """Quantize x [N, Hkv, D] to e4m3 with scales of `granularity` (amax / 448), dequantize."""
    base = granularity.removesuffix("_bf16")
    first = x[: max(1, x.shape[0] // 10)]
    amax = {"unit": lambda: torch.tensor(E4M3_MAX), "tensor": lambda: x.abs().amax(),
            "tensor_calib10": lambda: first.abs().amax(),
            "head": lambda: x.abs().amax(dim=(0, 2), keepdim=True),
            "head_calib10": lambda: first.abs().amax(dim=(0, 2), keepdim=True),
            "token": lambda: x.abs().amax(dim=(1, 2), keepdim=True),
            "token_head": lambda: x.abs().amax(dim=2, keepdim=True)}[base]()
    scale = (amax / E4M3_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    if granularity.endswith("_bf16"):  # the scale stored in bf16 is the one that quantizes
        scale = scale.bfloat16().float()
    return (x / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float() * scale


def reference_attention(query, k, v) -> torch.Tensor:
    """The reference paged attention, each sequence's K/V in one block of its own."""
    from minivllm.kernels import reference

    longest = max(SEQ_LENS)
    k_cache = torch.zeros(len(SEQ_LENS), longest, HKV, D)
    v_cache = torch.zeros_like(k_cache)
    for b, (first, n) in enumerate(zip(itertools.accumulate(SEQ_LENS, initial=0), SEQ_LENS)):
        k_cache[b, :n], v_cache[b, :n] = k[first:first + n], v[first:first + n]
    tables = torch.arange(len(SEQ_LENS), dtype=torch.int32)[:, None]
    cu = torch.tensor([0, *itertools.accumulate(QUERY_LENS)], dtype=torch.int32)
    return reference.paged_attention(query, k_cache, v_cache, tables,
                                     torch.tensor(SEQ_LENS, dtype=torch.int32), cu, D ** -0.5)


def run_scales(args, device, record: dict, out: Path) -> None:
    def rel(a, b):
        return float((a.double() - b.double()).norm() / b.double().norm())

    errors = {}  # (distribution, storage) -> attention errors over seeds
    for kind, seed in itertools.product(DISTRIBUTIONS, range(args.seeds)):
        g = torch.Generator().manual_seed(seed)
        k, v = synthetic_kv(kind, sum(SEQ_LENS), g)
        # Queries scaled per head so that the logits have a standard deviation of 3: peaked, as
        # trained models' are (raw outlier keys would make attention an argmax).
        key_power = (k ** 2).mean(dim=(0, 2)).repeat_interleave(HQ // HKV)
        query = torch.randn(sum(QUERY_LENS), HQ, D, generator=g) * (3.0 / key_power.sqrt())[:, None]
        exact = reference_attention(query, k, v)
        bf16 = reference_attention(query, k.bfloat16().float(), v.bfloat16().float())
        errors.setdefault((kind, "bf16"), []).append(rel(bf16, exact))
        for granularity in SCALE_BYTES:
            out_q = reference_attention(query, fp8_round_trip(k, granularity), fp8_round_trip(v, granularity))
            errors.setdefault((kind, granularity), []).append(rel(out_q, exact))
    fp8_bytes = 2 * HKV * D  # fp8 K and V per token and layer
    for storage in ("bf16", *SCALE_BYTES):
        record["results"].append({
            "storage": storage, "extra_bytes_over_fp8_kv": 1.0 if storage == "bf16" else
            SCALE_BYTES[storage] / fp8_bytes,
            **{f"{kind}_worst_rel_error": max(errors[(kind, storage)]) for kind in DISTRIBUTIONS}})
    write_json(out, record)


# ------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------
COLUMNS = {
    "hf": [("model", "model", ""), ("dtype", "dtype", ""), ("exact", "exact", ".2f"),
           ("prefix", "prefix", ".2f"), ("first token", "first_token", ".2f")],
    "engine": [("model", "model", ""), ("test", "test", ""), ("exact", "exact", ".2f"),
               ("prefix", "prefix", ".2f"), ("first", "first_token", ".2f"),
               ("|dlogit|", "mean_abs_diff", ".3g"), ("worst pos", "max_position_abs_diff", ".3g"),
               ("|logit|", "mean_abs_logit", ".3g"), ("top-2 margin", "mean_top2_margin", ".3g"),
               ("argmax agrees", "argmax_agreement", ".3f"), ("self", "reference_matches_greedy", ".2f")],
    "scales": [("storage", "storage", ""), *((f"{k} error", f"{k}_worst_rel_error", ".2e")
                                             for k in DISTRIBUTIONS),
               ("extra bytes", "extra_bytes_over_fp8_kv", ".3f")],
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("question", choices=("hf", "engine", "scales"))
    p.add_argument("--model", type=Path, default=None, help="a local Hugging Face model directory")
    p.add_argument("--model-configs", type=names(tuple(MODEL_CONFIGS), "--model-configs"),
                   help=f"comma list from {', '.join(MODEL_CONFIGS)} (random weights; default "
                        "hf: the four *-small, engine: qwen3-0.6b,llama-3.2-1b; tiny on the CPU)")
    p.add_argument("--model-cache", type=Path, default=None)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--dtypes", type=names(tuple(DTYPES), "--dtypes"),
                   help="hf: comma list (default bfloat16,float32 on a GPU); engine: the first")
    p.add_argument("--reference", default="", help="engine: the reference's settings, key=value ...")
    p.add_argument("--test", default="kv_cache_dtype=fp8", help="engine: the tested settings")
    p.add_argument("--num-prompts", type=int, default=None, help="default 16 (engine 32); CPU 2")
    p.add_argument("--prompt-len", default=None, help="LOW:HIGH (default 8:200, engine 128:512)")
    p.add_argument("--max-tokens", type=int, default=None, help="default 64 (engine 128); CPU 8")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.45)
    p.add_argument("--seeds", type=int, default=3, help="scales: seeds per distribution")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    gpu = pick_device(args.device).type == "cuda" and args.question != "scales"
    engine = args.question == "engine"
    default_models = ("qwen3-0.6b,llama-3.2-1b" if engine else
                      "llama-small,qwen2-small,qwen3-small,opt-small") if gpu else "tiny"
    args.model_configs = args.model_configs or default_models.split(",")
    if args.dtypes is None:
        args.dtypes = ["bfloat16", "float32"] if gpu and not engine else ["bfloat16" if gpu else "float32"]
    args.num_prompts = args.num_prompts or ((32 if engine else 16) if gpu else 2)
    args.max_tokens = args.max_tokens or ((128 if engine else 64) if gpu else 8)
    args.prompt_len = parse_range(args.prompt_len or (("128:512" if engine else "8:200") if gpu
                                                      else "8:24"), "--prompt-len")
    args.max_model_len = args.prompt_len[1] + args.max_tokens
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device("cpu") if args.question == "scales" else pick_device(args.device)
    label = args.question if args.model is None else f"{args.question}_{args.model.name}"
    out = args.out or default_out("agreement", label, device)
    record = new_record("agreement", device, args)
    if args.question == "scales":
        record["note"] = "accuracy, not speed: CPU numbers are the real ones"
        record["shape"] = dict(num_q_heads=HQ, num_kv_heads=HKV, head_dim=D, query_lens=QUERY_LENS,
                               seq_lens=SEQ_LENS)
    {"hf": run_hf, "engine": run_engine, "scales": run_scales}[args.question](args, device, record, out)
    legend = (f"error: attention output against float32 attention on the exact values, worst of {args.seeds} "
              "seeds; extra bytes: scale bytes over fp8 K/V bytes (bf16: its K/V bytes over fp8's)")
    finish(out, record, format_table(record["results"], COLUMNS[args.question]),
           *([legend] if args.question == "scales" else []))
    return record


if __name__ == "__main__":
    main()
