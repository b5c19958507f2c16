"""Command line: `python -m minivllm <command>` (or the `minivllm` script).

    python -m minivllm make-model /tmp/tiny-llama --arch llama --size tiny
    python -m minivllm generate --model /tmp/tiny-llama --prompt "Once upon a time" --max-tokens 32
    python -m minivllm generate --model /tmp/tiny-llama --prompt "Hi" --trace /tmp/trace.jsonl
    python -m minivllm visualize /tmp/trace.jsonl --out /tmp/figures
    python -m minivllm serve --model /tmp/tiny-llama --port 8000
    python -m minivllm generate --model /tmp/tiny-llama --prompt "a b a b a" \
        --speculative-config '{"method": "ngram", "num_speculative_tokens": 4}'

`make-model` writes a random-weight Hugging Face directory (weights, config, tokenizer), so the
engine can be tried with no download. `generate` runs prompts through the engine and prints the
completions and their timings (or JSON with --json); `--trace` also records every step.
`visualize` draws a recorded trace: schedule timeline, throughput and KV usage, block map.
`serve` answers OpenAI API requests over HTTP (minivllm/entrypoints/, docs/serving.md).

Errors are printed in the command line's own words: the library names its Python arguments
(`max_tokens`, `overwrite=True`), and `cli_words` turns them into the flags (`--max-tokens`,
`--overwrite`) before they are shown.
"""

from __future__ import annotations

import argparse
import json
import re
import sys

from minivllm.config import ALL_REDUCE_CHOICES, DEVICES, DTYPES, KV_CACHE_DTYPES
from minivllm.kernels import BACKENDS

MiB = 1 << 20
# Library argument names that differ from their flag's dest.
_FLAG_ALIASES = {
    "enable_chunked_prefill": "chunked_prefill",
    "enable_prefix_caching": "prefix_caching",
    "kv_cache_memory_bytes": "kv_cache_memory_mib",
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default, except where there is nothing to show (None,
    an empty list, the False of a plain on/off flag)."""

    def _get_help_string(self, action):
        default = action.default
        if default is None or default is False or default == [] or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _token_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token ids, got {text!r}") from None


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r} ({err.msg})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object ({{...}}), got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_engine_args(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """Declare the engine's options (the "engine" group) on a command that builds an engine.

    Every such command (`generate`, `serve`) shares this one list, so a new engine option is added
    here once and `engine_kwargs` turns it into its EngineConfig keyword.
    """
    engine = parser.add_argument_group("engine")
    engine.add_argument("--dtype", default="auto", choices=DTYPES,
                        help="auto = float32 on CPU, bfloat16 on CUDA")
    engine.add_argument("--device", default="auto", choices=DEVICES, help="auto = cuda when available")
    engine.add_argument("--attention-backend", default="auto", choices=BACKENDS,
                        help="paged-attention kernels; auto = the fastest that runs here")
    engine.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    engine.add_argument("--num-kv-blocks", type=int, default=None,
                        help="KV pool size in blocks (default: sized from the memory budget)")
    engine.add_argument("--kv-cache-memory-mib", type=_positive_int, default=256, help="KV budget on CPU")
    engine.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                        help="fraction of GPU memory the engine may use")
    engine.add_argument("--max-num-seqs", type=int, default=64, help="most sequences in one step")
    engine.add_argument("--max-num-batched-tokens", type=int, default=None,
                        help="token budget of one step (default: 2048, or what the other limits need)")
    engine.add_argument("--max-model-len", type=int, default=None,
                        help="longest prompt + output (default: the model's context length)")
    engine.add_argument("--chunked-prefill", action=argparse.BooleanOptionalAction, default=True,
                        help="split long prompts over several steps")
    engine.add_argument("--prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                        help="reuse the KV blocks of a prefix computed before")
    engine.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES,
                        help="auto = the model's dtype; fp8 = e4m3 with a scale per token and head")
    engine.add_argument("--tensor-parallel-size", type=_positive_int, default=1,
                        help="split the model over this many GPUs (one process each; CPU processes with --device cpu)")
    engine.add_argument("--all-reduce", default="auto", choices=ALL_REDUCE_CHOICES,
                        help="how tensor-parallel ranks sum: dist = torch.distributed (NCCL/gloo); peer = small "
                             "sums through peer GPU memory in one kernel; auto = peer for 2 linked GPUs")
    engine.add_argument("--speculative-config", type=_json_object, default=None, metavar="JSON",
                        help='speculative decoding, e.g. \'{"method": "ngram", "num_speculative_tokens": 4}\' '
                             'or \'{"method": "draft", "model": "DIR", "num_speculative_tokens": 4}\' '
                             "(docs/speculative_decoding.md)")
    return engine


def engine_kwargs(args: argparse.Namespace) -> dict:
    """The `LLM(model, **kwargs)` / EngineConfig keywords of the flags `add_engine_args` declared."""
    return dict(
        dtype=args.dtype, device=args.device, attention_backend=args.attention_backend,
        block_size=args.block_size, num_kv_blocks=args.num_kv_blocks,
        kv_cache_memory_bytes=args.kv_cache_memory_mib * MiB,
        gpu_memory_utilization=args.gpu_memory_utilization, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
        enable_chunked_prefill=args.chunked_prefill, enable_prefix_caching=args.prefix_caching,
        kv_cache_dtype=args.kv_cache_dtype, tensor_parallel_size=args.tensor_parallel_size,
        all_reduce=args.all_reduce, speculative_config=args.speculative_config,
    )


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be in [0, 65535], got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from minivllm.models import ARCHITECTURES, SIZES

    parser = argparse.ArgumentParser(prog="minivllm", description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help, formatter_class=HelpFormatter)
        sub.set_defaults(command_parser=sub)  # main() words errors in this command's flags
        return sub

    make = command("make-model", "write a random-weight Hugging Face model directory")
    make.add_argument("out_dir", help="directory to create")
    make.add_argument("--arch", default="llama", choices=ARCHITECTURES, help="model architecture")
    make.add_argument("--size", default="tiny", choices=SIZES,
                      help="tiny and small run fast on a CPU; named sizes copy a real model's shapes")
    make.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    make.add_argument("--overwrite", action="store_true", help="replace a model already in out_dir")

    gen = command("generate", "generate completions for prompts")
    gen.add_argument("--model", required=True, help="Hugging Face model directory")
    gen.add_argument("--prompt", action="append", default=[], help="a text prompt (repeatable)")
    gen.add_argument("--prompt-token-ids", action="append", default=[], type=_token_ids,
                     help="a prompt as token ids, e.g. '1,15,27' (repeatable)")
    sampling = gen.add_argument_group("sampling")
    sampling.add_argument("--max-tokens", type=int, default=32, help="most tokens to generate per sample")
    sampling.add_argument("--min-tokens", type=int, default=0,
                          help="tokens to generate before EOS or a stop may end a sample")
    sampling.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    sampling.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens; 0 = all")
    sampling.add_argument("--top-p", type=float, default=1.0,
                          help="keep the most likely tokens up to this probability mass; 1 = all")
    sampling.add_argument("--min-p", type=float, default=0.0,
                          help="drop tokens less likely than this times the most likely one; 0 = off")
    sampling.add_argument("--repetition-penalty", type=float, default=1.0,
                          help="> 1 discourages tokens already seen; 1 = off")
    sampling.add_argument("--presence-penalty", type=float, default=0.0,
                          help="subtracted from the logit of every generated token; in [-2, 2]")
    sampling.add_argument("--frequency-penalty", type=float, default=0.0,
                          help="subtracted per earlier occurrence of a generated token; in [-2, 2]")
    sampling.add_argument("--seed", type=int, default=None,
                          help="per-request sampling seed (default: unseeded)")
    sampling.add_argument("--n", type=int, default=1, help="samples per prompt")
    sampling.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    sampling.add_argument("--ignore-eos", action="store_true", help="keep generating after EOS")
    add_engine_args(gen)
    output = gen.add_argument_group("output")
    output.add_argument("--json", action="store_true", help="print the outputs as JSON")
    output.add_argument("--stats", action="store_true", help="print engine statistics at the end")
    output.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    output.add_argument("--trace", default=None, metavar="FILE",
                        help="record every engine step and write it to FILE as JSON lines")

    srv = command("serve", "serve a model over an OpenAI-compatible HTTP API (see docs/serving.md)")
    srv.add_argument("--model", required=True, help="Hugging Face model directory")
    srv.add_argument("--host", default="127.0.0.1",
                     help="address to listen on; 127.0.0.1 = this machine only, 0.0.0.0 = every interface")
    srv.add_argument("--port", type=_port, default=8000, help="TCP port to listen on")
    srv.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every /v1 route")
    srv.add_argument("--served-model-name", default=None,
                     help="the model name clients send and see (default: --model as given)")
    srv.add_argument("--shutdown-timeout", type=float, default=5.0,
                     help="on SIGTERM/Ctrl-C, seconds the requests in flight may still run before "
                          "they are aborted")
    srv.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                     help="uvicorn's log level")
    add_engine_args(srv)

    vis = command("visualize", "draw a step trace (timeline, throughput, block map)")
    vis.add_argument("trace", help="a trace written by `generate --trace` or LLM.save_trace")
    vis.add_argument("--out", required=True, help="directory for the PNGs (created if missing)")
    return parser


def cli_words(message: str, parser: argparse.ArgumentParser) -> str:
    """Rewrite an error of the library in the words of `parser`'s command line.

    `name=True` becomes `--flag`, `name=False` `--no-flag`, `name=value` `--flag value`; a name
    with an underscore becomes its flag wherever it stands, a one-word name (seed, n, stop) only
    where it is clearly the argument: starting a clause, before "must" or "(". Paths and quoted
    text are left alone.
    """
    flags = {a.dest: a for a in parser._actions if a.option_strings}
    flags.update({name: flags[dest] for name, dest in _FLAG_ALIASES.items() if dest in flags})
    edge = r"(?<![\w./'-])"  # not inside a path, a flag or a longer name
    clause = r"(?:^|(?<=: )|(?<=; ))"  # where a sentence about an argument starts

    def flag(name: str) -> str:
        return next(o for o in flags[name].option_strings if o.startswith("--"))

    def assignment(match: re.Match) -> str:
        name, value = match.group(1), match.group(2).strip("'\"")
        action = flags[name]
        if action.nargs == 0:  # an on/off flag
            if value == "True":
                return flag(name)
            if value == "False" and isinstance(action, argparse.BooleanOptionalAction):
                return "--no-" + flag(name)[2:]
        return f"{flag(name)} {value}"

    def bare_name(match: re.Match) -> str:
        word = match.group(1) or match.group(2)
        return flag(word) if word in flags else word

    names = "|".join(sorted(map(re.escape, flags), key=len, reverse=True))
    value = r"('[^']*'|\"[^\"]*\"|[^\s,;)]+)"
    message = re.sub(edge + rf"({names})={value}", assignment, message)
    one_word = clause + rf"({names})(?=\s+must\b|\s+\()"  # "seed must ...", "n (3) is ..."
    with_underscore = edge + r"(\w*_\w*)\b(?![=/.])"  # "max_tokens", anywhere
    return re.sub(f"{one_word}|{with_underscore}", bare_name, message)


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
    llm = LLM(args.model, **engine_kwargs(args))
    if args.trace:
        llm.engine.enable_trace()
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
            print(f"    {out.metrics}")
    if args.stats:
        print(format_stats(llm.engine.get_stats()), file=sys.stderr if args.json else sys.stdout)
    return 0


def serve(args) -> int:
    try:
        from minivllm.entrypoints.api_server import run_server
    except ImportError as err:
        print(f"minivllm serve: error: the server needs the `serve` extra ({err.name} is missing): "
              "pip install -e '.[serve]'", file=sys.stderr)
        return 2
    return run_server(args.model, engine_kwargs(args), args.served_model_name, host=args.host, port=args.port,
                      api_key=args.api_key, shutdown_timeout=args.shutdown_timeout, log_level=args.log_level)


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
    commands = {"make-model": make_model, "generate": generate, "serve": serve, "visualize": visualize}
    try:
        return commands[args.command](args)
    except (ValueError, TypeError, OSError) as err:  # bad input, a missing or broken file
        print(f"minivllm {args.command}: error: {cli_words(str(err), args.command_parser)}",
              file=sys.stderr)
        return 2
