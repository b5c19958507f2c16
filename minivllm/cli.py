"""Command line: `python -m minivllm <command>` (or the `minivllm` script).

    python -m minivllm make-model /tmp/tiny-llama --arch llama --size tiny
    python -m minivllm generate --model /tmp/tiny-llama --prompt "Once upon a time" --max-tokens 32
    python -m minivllm generate --model /tmp/tiny-llama --prompt "Hi" --trace /tmp/trace.jsonl
    python -m minivllm visualize /tmp/trace.jsonl --out /tmp/figures

`make-model` writes a random-weight Hugging Face directory (weights, config, tokenizer), so the
engine can be tried with no download. `generate` runs prompts through the engine and prints the
completions and their timings (or JSON with --json); `--trace` also records every step.
`visualize` draws a recorded trace: schedule timeline, throughput and KV usage, block map.
"""

from __future__ import annotations

import argparse
import json
import sys

MiB = 1 << 20


def _token_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token ids, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    from minivllm.models import ARCHITECTURES, SIZES

    parser = argparse.ArgumentParser(prog="minivllm", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    make = commands.add_parser("make-model", help="write a random-weight Hugging Face model directory")
    make.add_argument("out_dir", help="directory to create")
    make.add_argument("--arch", default="llama", choices=ARCHITECTURES)
    make.add_argument("--size", default="tiny", choices=SIZES)
    make.add_argument("--seed", type=int, default=0, help="weight seed")
    make.add_argument("--overwrite", action="store_true", help="replace a model already in out_dir")

    gen = commands.add_parser("generate", help="generate completions for prompts")
    gen.add_argument("--model", required=True, help="Hugging Face model directory")
    gen.add_argument("--prompt", action="append", default=[], help="a text prompt (repeatable)")
    gen.add_argument("--prompt-token-ids", action="append", default=[], type=_token_ids,
                     help="a prompt as token ids, e.g. '1,15,27' (repeatable)")
    sampling = gen.add_argument_group("sampling")
    sampling.add_argument("--max-tokens", type=int, default=32)
    sampling.add_argument("--min-tokens", type=int, default=0)
    sampling.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    sampling.add_argument("--top-k", type=int, default=0)
    sampling.add_argument("--top-p", type=float, default=1.0)
    sampling.add_argument("--min-p", type=float, default=0.0)
    sampling.add_argument("--repetition-penalty", type=float, default=1.0)
    sampling.add_argument("--presence-penalty", type=float, default=0.0)
    sampling.add_argument("--frequency-penalty", type=float, default=0.0)
    sampling.add_argument("--seed", type=int, default=None, help="per-request sampling seed")
    sampling.add_argument("--n", type=int, default=1, help="samples per prompt")
    sampling.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    sampling.add_argument("--ignore-eos", action="store_true")
    engine = gen.add_argument_group("engine")
    engine.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    engine.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    engine.add_argument("--attention-backend", default="auto", choices=["auto", "torch", "triton", "cuda"])
    engine.add_argument("--block-size", type=int, default=16)
    engine.add_argument("--num-kv-blocks", type=int, default=None)
    engine.add_argument("--kv-cache-memory-mib", type=int, default=256, help="KV budget on CPU")
    engine.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    engine.add_argument("--max-num-seqs", type=int, default=64)
    engine.add_argument("--max-num-batched-tokens", type=int, default=None)
    engine.add_argument("--max-model-len", type=int, default=None)
    engine.add_argument("--chunked-prefill", action=argparse.BooleanOptionalAction, default=True)
    engine.add_argument("--prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    output = gen.add_argument_group("output")
    output.add_argument("--json", action="store_true", help="print the outputs as JSON")
    output.add_argument("--stats", action="store_true", help="print engine statistics at the end")
    output.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    output.add_argument("--trace", default=None, metavar="FILE",
                        help="record every engine step and write it to FILE as JSON lines")

    vis = commands.add_parser("visualize", help="draw a step trace (timeline, throughput, block map)")
    vis.add_argument("trace", help="a trace written by `generate --trace` or LLM.save_trace")
    vis.add_argument("--out", required=True, help="directory for the PNGs (created if missing)")
    return parser


def make_model(args) -> int:
    from minivllm.models import make_random_model

    path = make_random_model(args.out_dir, arch=args.arch, size=args.size, seed=args.seed,
                             overwrite=args.overwrite)
    print(f"wrote a random-weight {args.arch} ({args.size}) model to {path}")
    return 0


def generate(args) -> int:
    from minivllm.llm import LLM, format_stats
    from minivllm.sampling_params import SamplingParams

    prompts = list(args.prompt) + list(args.prompt_token_ids)
    if not prompts:
        raise ValueError("give at least one --prompt or --prompt-token-ids")
    params = SamplingParams(
        n=args.n, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
        repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty, seed=args.seed, stop=args.stop,
        max_tokens=args.max_tokens, min_tokens=args.min_tokens, ignore_eos=args.ignore_eos,
    )
    llm = LLM(
        args.model, dtype=args.dtype, device=args.device, attention_backend=args.attention_backend,
        block_size=args.block_size, num_kv_blocks=args.num_kv_blocks,
        kv_cache_memory_bytes=args.kv_cache_memory_mib * MiB,
        gpu_memory_utilization=args.gpu_memory_utilization, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
        enable_chunked_prefill=args.chunked_prefill, enable_prefix_caching=args.prefix_caching,
    )
    if args.trace:
        llm.enable_trace()
    outputs = llm.generate(prompts, params, use_tqdm=not args.no_progress)
    if args.trace:
        print(f"trace of {len(llm.engine.trace)} steps written to {llm.save_trace(args.trace)}",
              file=sys.stderr)
    if args.json:
        print(json.dumps([o.to_dict() for o in outputs], indent=2))
    else:
        for out in outputs:
            shown = out.prompt if out.prompt is not None else f"<token ids {out.prompt_token_ids}>"
            print(f"\n=== prompt: {shown!r}")
            for completion in out.outputs:
                label = f"[{completion.index}] " if len(out.outputs) > 1 else ""
                print(f"{label}{completion.text!r}")
                print(f"    token ids: {completion.token_ids}  (finish: {completion.finish_reason})")
            m = out.metrics
            tpot = f"{m.tpot * 1e3:.1f} ms" if m.tpot is not None else "n/a"
            print(f"    ttft {m.ttft * 1e3:.1f} ms | tpot {tpot} | {m.tokens_per_s:.1f} tokens/s")
    if args.stats:
        print(format_stats(llm.get_stats()), file=sys.stderr if args.json else sys.stdout)
    return 0


def visualize(args) -> int:
    from minivllm.observe import read_trace
    from minivllm.observe import visualize as draw

    header, events = read_trace(args.trace)
    paths = draw(events, args.out, num_blocks=header.get("num_blocks"))
    for name, path in paths.items():
        print(f"{name:<15} {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    commands = {"make-model": make_model, "generate": generate, "visualize": visualize}
    try:
        return commands[args.command](args)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError) as err:
        print(f"minivllm {args.command}: error: {err}", file=sys.stderr)
        return 2
