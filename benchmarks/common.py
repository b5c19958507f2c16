"""What every benchmark shares: the model, the workload, timing, the JSON record, the table, variants run side by
side, and the run around them (`run_benchmark`, then `finish`).

**The model.** `--model DIR` is any local Hugging Face model directory (real weights); `--model-config NAME` builds a
random-weight model of a named shape instead (speed depends on the shapes, not on the values of the weights, so no
checkpoint is needed). Both minivllm and transformers load the same directory.

**The record.** Every benchmark writes one JSON file:

    bench        the script's name
    environment  device, date, versions (python, torch, triton, transformers, CUDA), the command
    args         the parsed command line
    variants     name, environment, engine and sampling settings of each variant (see below)
    results      one dict per measured row; rows of a variant carry "variant": its name
    ...          what else the benchmark reports (copy bandwidth, ratios, a summary)

GPU runs go to benchmarks/results/, CPU runs to benchmarks/results/cpu/ (git ignores it: CPU timings of a shared
machine are never results).

**Variants.** `--variants "base:,nofused:MINIVLLM_FUSED_OPS=0"` runs the same benchmark once per variant, each in a
child process of its own (so a switch read at import takes effect), and puts the rows side by side in one JSON and
one table. A variant is `NAME:SETTING SETTING ...`, where a setting is `KEY=VALUE`:

    MINIVLLM_FUSED_OPS=0         an UPPER_CASE key sets an environment variable of the child
    kv_cache_dtype=fp8           any other key is a keyword argument of `LLM(...)`
    sampling.temperature=0.8     `sampling.` prefixes a keyword argument of `SamplingParams`

A value is read as JSON where it parses (`true`, `2`, `{"method": "ngram"}`), else as a string. Commas and spaces
inside braces, brackets or quotes do not split.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import gc
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "benchmarks" / "results"
CPU_RESULTS_DIR = RESULTS_DIR / "cpu"  # in .gitignore

# --model-config name -> (architecture, size for make_random_model)
MODEL_CONFIGS = {
    "qwen3-0.6b": ("qwen3", "qwen3-0.6b"),
    "llama-3.2-1b": ("llama", "llama-3.2-1b"),
    "llama-3.1-8b": ("llama", "llama-3.1-8b"),
    "tiny": ("qwen3", "tiny"),  # a few hundred thousand parameters: the CPU smoke tests
    **{f"{arch}-small": (arch, "small") for arch in ("llama", "qwen2", "qwen3", "opt")},
}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


# ------------------------------------------------------------------------------------------
# The command line
# ------------------------------------------------------------------------------------------
def names(allowed, option: str):
    """An argparse type: a comma list of distinct names from `allowed` (a dict maps them to its
    values). argparse passes a default given as a string through it too."""
    def parse(text: str) -> list:
        chosen = [n.strip() for n in text.split(",") if n.strip()]
        if not chosen or set(chosen) - set(allowed) or len(set(chosen)) < len(chosen):
            raise argparse.ArgumentTypeError(
                f"{option}: distinct names from {', '.join(allowed)}; got {text!r}")
        return [allowed[n] for n in chosen] if isinstance(allowed, dict) else chosen
    return parse


def int_list(text: str, name: str) -> list[int]:
    """'1,8,64' -> [1, 8, 64], every value >= 1."""
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"{name}: expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise SystemExit(f"{name}: expected integers >= 1, got {text!r}")
    return values


def parse_range(text: str, name: str) -> tuple[int, int]:
    """'100:1024' -> (100, 1024); '512' -> (512, 512). Both ends inclusive, >= 1."""
    parts = str(text).split(":")
    try:
        low, high = (int(parts[0]),) * 2 if len(parts) == 1 else map(int, parts)
    except ValueError:
        raise SystemExit(f"{name} must be N or LOW:HIGH (e.g. 100:1024), got {text!r}") from None
    if not 1 <= low <= high:
        raise SystemExit(f"{name} must satisfy 1 <= LOW <= HIGH, got {text!r}")
    return low, high


def with_device_defaults(parser, argv, gpu: dict, cpu: dict) -> argparse.Namespace:
    """Parse `argv` with the defaults of the device --device names: `gpu` or `cpu`. A default
    given as a string goes through its option's type, as the command line does."""
    device = pick_device(parser.parse_known_args(argv)[0].device)
    parser.set_defaults(**(gpu if device.type == "cuda" else cpu))
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------------
# Device and model
# ------------------------------------------------------------------------------------------
def add_model_arguments(parser, gpu_default: str = "qwen3-0.6b") -> None:
    """--model / --model-config / --model-cache / --device / --dtype, and --out (the record)."""
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/...)")
    parser.add_argument("--model", type=Path, default=None,
                        help="a local Hugging Face model directory (e.g. real weights)")
    parser.add_argument("--model-config", choices=sorted(MODEL_CONFIGS), default=None,
                        help=f"a named shape with random weights (default {gpu_default} on a GPU, "
                             "tiny on the CPU)")
    parser.add_argument("--model-cache", type=Path, default=None,
                        help="where random-weight models are built and reused (default: a "
                             "temporary directory)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--dtype", choices=("auto", *DTYPES), default="auto",
                        help="auto: bfloat16 on a GPU, float32 on the CPU")


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    return torch.device(name)


def resolve_model(args, device: torch.device, gpu_default: str = "qwen3-0.6b") -> tuple[Path, str]:
    """(model directory, dtype name) from --model or --model-config; sets args.model_label."""
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    if args.model is not None:
        if not (args.model / "config.json").is_file():
            raise SystemExit(f"--model {args.model}: no config.json there")
        args.model_label = args.model.name
        return args.model, dtype
    name = args.model_config or (gpu_default if device.type == "cuda" else "tiny")
    args.model_label = name
    if args.model_cache is None:
        args.model_cache = Path(tempfile.mkdtemp(prefix="minivllm-bench-"))
    return build_model(name, args.model_cache, DTYPES[dtype]), dtype


def build_model(name: str, root: Path, dtype: torch.dtype, seed: int = 0,
                num_layers: int | None = None) -> Path:
    """The random-weight model directory for `name` under `root` (reused if already there);
    `num_layers` cuts the shape to that many layers (a draft of the same width and vocabulary)."""
    from minivllm.models import make_random_model

    if name not in MODEL_CONFIGS:
        raise ValueError(f"unknown model config {name!r}; choose one of {sorted(MODEL_CONFIGS)}")
    arch, size = MODEL_CONFIGS[name]
    layers = "" if num_layers is None else f"-{num_layers}-layers"
    out = Path(root) / f"{name}{layers}-{str(dtype).removeprefix('torch.')}-seed{seed}"
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    print(f"building the {name}{layers} model (random weights) in {out} ...", flush=True)
    overrides = None if num_layers is None else {"num_hidden_layers": num_layers}
    return make_random_model(out, arch=arch, size=size, seed=seed, dtype=dtype, overrides=overrides,
                             overwrite=True)


def vocab_size(model_dir: Path) -> int:
    return json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"]


def release_memory(device: torch.device) -> None:
    """Free what the last engine or model left behind, so the next one starts from a clean pool."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------
# Workload
# ------------------------------------------------------------------------------------------
def random_requests(num: int, input_len: tuple[int, int], output_len: tuple[int, int],
                    vocab: int, seed: int) -> tuple[list[list[int]], list[int]]:
    """vLLM's "random" dataset: random prompt token ids and output lengths, both uniform in their
    ranges; the same seed gives the same requests. Ids from 10 up keep clear of special tokens."""
    rng = np.random.default_rng(seed)
    in_lens = rng.integers(input_len[0], input_len[1], endpoint=True, size=num)
    out_lens = rng.integers(output_len[0], output_len[1], endpoint=True, size=num)
    return [rng.integers(10, vocab, size=n).tolist() for n in in_lens], out_lens.tolist()


def percentiles(values: list[float]) -> dict | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return {"mean": float(np.mean(values)), "p50": float(p50), "p90": float(p90), "p99": float(p99)}


def agreement(ours: list[list[int]], theirs: list[list[int]]) -> dict:
    """How far two greedy runs of the same prompts agree: the share of identical rows (`exact`),
    the mean common prefix as a share of the row's length (`prefix`: where they part), and the
    share whose first token agrees."""
    prefixes = []
    for a, b in zip(ours, theirs, strict=True):
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        prefixes.append(n)
    return {"exact": float(np.mean([a == b for a, b in zip(ours, theirs)])),
            "prefix": float(np.mean([n / max(len(b), 1) for n, b in zip(prefixes, theirs)])),
            "first_token": float(np.mean([n > 0 for n in prefixes])),
            "common_prefix_lengths": prefixes}


# ------------------------------------------------------------------------------------------
# Hugging Face: the baseline
# ------------------------------------------------------------------------------------------
def load_hf(model_dir: Path, device: torch.device, dtype: str, attn: str | None = None):
    """The transformers model of `model_dir`, for inference; `attn` names its attention
    implementation (None: transformers' default)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=DTYPES[dtype],
                                                attn_implementation=attn).to(device).eval()


@torch.inference_mode()
def hf_generate(model, prompts: list[list[int]], new_tokens: int, device) -> list[list[int]]:
    """One left-padded batched `generate` call, exactly `new_tokens` greedy tokens a row."""
    pad = model.config.pad_token_id or 0
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, pad_token_id=pad)
    return out[:, width:].tolist()


# ------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device: torch.device, graph: bool = True, repeats: int = 5) -> float:
    """Median time of `fn` in milliseconds, after warm-up.

    On the GPU the call is captured in a CUDA graph and its replays are timed with CUDA events
    (`triton.testing.do_bench_cudagraph`), so Python launch overhead is not counted, as the
    engine's decode graphs do not pay it; `graph=False` times eager calls (`do_bench`). On the
    CPU: the median of `repeats` wall-clock timings.
    """
    fn()
    if device.type == "cuda":
        import triton.testing

        torch.cuda.synchronize()
        if graph:
            return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def copy_bandwidth(device: torch.device) -> float:
    """Bytes/s of a device-to-device copy, counting bytes read plus bytes written: the memory
    roofline of everything else in the same run (a kernel that only reads may exceed it a little,
    the copy paying for read/write turnarounds)."""
    num_bytes = (1 << 30) if device.type == "cuda" else (64 << 20)
    src = torch.empty(num_bytes // 2, dtype=torch.float16, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, graph=False)
    return 2 * num_bytes / (ms * 1e-3)


def matmul_rate(device: torch.device) -> float:
    """FLOP/s of one large square `torch.mm` (2 n^3 FLOPs): the compute roofline of the same run
    (bf16, n = 8192 on a GPU; float32, n = 512 on the CPU)."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (512, torch.float32)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    ms = time_ms(lambda: torch.mm(a, b), device, graph=False)
    return 2 * n**3 / (ms * 1e-3)


# ------------------------------------------------------------------------------------------
# The record
# ------------------------------------------------------------------------------------------
def environment(device: torch.device) -> dict:
    """Device, date, versions and the command: what a number needs beside it to mean anything."""
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                                capture_output=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None  # a copy of the tree without its history
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)")
    return {"device": name, "device_type": device.type,
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "triton": triton_version, "transformers": transformers.__version__, "git_commit": commit,
            "command": " ".join(["python", os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])}


def new_record(bench: str, device: torch.device, args) -> dict:
    """The start of a benchmark's JSON record; `results` fills in as rows are measured."""
    plain = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    note = None if device.type == "cuda" else (
        "CPU run: these numbers say nothing about GPU performance and are no GPU claim.")
    return {"bench": bench, "environment": environment(device), "args": plain, "note": note,
            "variants": [], "results": []}


def default_out(bench: str, label: str, device: torch.device) -> Path:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    folder = RESULTS_DIR if device.type == "cuda" else CPU_RESULTS_DIR
    return folder / f"{bench}_{label}_{device.type}_{stamp}.json"


def add_row(record: dict, out: Path, row: dict, columns: list | None = None) -> None:
    """Add a measured row and write the record at once: a later crash loses nothing measured.
    With `columns`, also print the row as a line of its table."""
    record["results"].append(row)
    write_json(out, record)
    if columns is not None:
        print(format_table([row], columns).splitlines()[-1], flush=True)


def write_json(path: Path, payload: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str))
    tmp.replace(path)  # a run killed mid-write never leaves a truncated file


# ------------------------------------------------------------------------------------------
# The table
# ------------------------------------------------------------------------------------------
def format_table(rows: list[dict], columns: list[tuple]) -> str:
    """One line per row. A column is (title, key or function of the row, format spec); a
    missing value prints as '-', a column with no value at all is left out. Numbers are
    right-aligned, text left-aligned."""
    def get(row, column):
        key = column[1]
        return key(row) if callable(key) else row.get(key)

    columns = [c for c in columns if any(get(row, c) is not None for row in rows)] or columns[:1]
    cells = []
    for row in rows:
        line = []
        for column in columns:
            value, spec = get(row, column), column[2]
            line.append("-" if value is None else format(value, spec)
                        if spec and not isinstance(value, str) else str(value))
        cells.append(line)
    widths = [max([len(c[0])] + [len(line[i]) for line in cells]) for i, c in enumerate(columns)]
    numeric = [all(re.fullmatch(r"[-+]?[\d.,e+%x-]*|-|n/a|inf", line[i]) for line in cells)
               for i in range(len(columns))]
    def fmt(values):
        return "  ".join(v.rjust(w) if num else v.ljust(w)
                         for v, w, num in zip(values, widths, numeric)).rstrip()
    header = fmt([c[0] for c in columns])
    return "\n".join([header, "-" * len(header), *(fmt(line) for line in cells)])


def sig(value: float | None, digits: int = 3) -> str | None:
    """A number with `digits` significant figures (small rates on a CPU must not print as 0)."""
    return None if value is None else f"{value:.{digits}g}"


# ------------------------------------------------------------------------------------------
# Variants: the same benchmark with switches on and off, side by side
# ------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    env: dict = dataclasses.field(default_factory=dict)  # environment of the child process
    engine: dict = dataclasses.field(default_factory=dict)  # LLM(...) keyword arguments
    sampling: dict = dataclasses.field(default_factory=dict)  # SamplingParams keyword arguments


def _split_top(text: str, separators: str) -> list[str]:
    """Split on any of `separators` outside braces, brackets and double quotes."""
    parts, depth, quoted, current = [], 0, False, ""
    for ch in text:
        if ch == '"':
            quoted = not quoted
        elif not quoted and ch in "{[":
            depth += 1
        elif not quoted and ch in "}]":
            depth -= 1
        if ch in separators and depth == 0 and not quoted:
            parts.append(current)
            current = ""
        else:
            current += ch
    return [p.strip() for p in [*parts, current] if p.strip()]


def parse_variants(text: str | None) -> list[Variant]:
    """'base:,fp8:kv_cache_dtype=fp8 MINIVLLM_X=0' -> variants (see the module docstring)."""
    if not text:
        return []
    variants = []
    for item in _split_top(text, ","):
        name, sep, settings = item.partition(":")
        if not sep or not re.fullmatch(r"[\w.-]+", name.strip()):
            raise SystemExit(f"--variants: {item!r} is not NAME:SETTINGS (e.g. fp8:kv_cache_dtype=fp8)")
        env, engine, sampling = {}, {}, {}
        for setting in _split_top(settings, " \t"):
            key, eq, raw = setting.partition("=")
            if not eq or not key:
                raise SystemExit(f"--variants: {setting!r} in {name!r} is not KEY=VALUE")
            if re.fullmatch(r"[A-Z][A-Z0-9_]*", key):
                env[key] = raw
                continue
            try:
                value = json.loads(raw)
            except json.JSONDecodeError:
                value = raw
            if key.startswith("sampling."):
                sampling[key.removeprefix("sampling.")] = value
            else:
                engine[key] = value
        variants.append(Variant(name.strip(), env, engine, sampling))
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise SystemExit(f"--variants: names must differ, got {names}")
    return variants


def add_variant_arguments(parser) -> None:
    parser.add_argument("--variants", default=None,
                        help='run once per variant, side by side, e.g. "base:,nofused:'
                             'MINIVLLM_FUSED_OPS=0,fp8:kv_cache_dtype=fp8" (benchmarks/common.py)')
    parser.add_argument("--child-variant", default=None, help=argparse.SUPPRESS)


def this_variant(args) -> Variant:
    """The variant this process measures: the one named by --child-variant, else the base."""
    if args.child_variant is None:
        return Variant("base")
    return next(v for v in parse_variants(args.variants) if v.name == args.child_variant)


def run_variants(script: Path, argv: list[str], args, record: dict, out: Path) -> None:
    """Run `script` once per variant of --variants, each in a child process with the variant's
    environment, and gather the children's rows into `record` (written to `out` after each).

    A child that fails leaves a row that says so; the others still run. The children share one
    model directory (--model-cache), so a random-weight model is built once.
    """
    extra = [] if args.model is not None else ["--model-cache", str(args.model_cache)]
    for variant in parse_variants(args.variants):
        record["variants"].append(dataclasses.asdict(variant))
        # The child writes beside `out` (its side files too, e.g. profiles); its rows move here.
        child_out = Path(out).with_name(f"{Path(out).stem}_{variant.name}.json")
        command = [sys.executable, str(script), *argv, *extra, "--child-variant", variant.name,
                   "--out", str(child_out)]
        print(f"\n=== variant {variant.name}: {variant.env or ''} {variant.engine or ''} "
              f"{variant.sampling or ''}", flush=True)
        done = subprocess.run(command, env={**os.environ, **variant.env}, cwd=ROOT, check=False)
        if done.returncode == 0 and child_out.is_file():
            child = json.loads(child_out.read_text())
            record["results"] += child["results"]
            for key, value in child.items():  # measured context, e.g. the copy bandwidth
                if key not in record or record[key] in (None, [], {}):
                    record[key] = value
        else:
            record["results"].append({"variant": variant.name,
                                      "error": f"child exited with {done.returncode}"})
        child_out.unlink(missing_ok=True)
        write_json(out, record)


def ratio_to_first_variant(rows: list[dict], key, metric: str) -> None:
    """Give every row `<metric>_vs_<first variant>`: its metric over the first variant's row with
    the same key (a function of the row)."""
    named = [r for r in rows if r.get(metric) is not None]
    if len({r["variant"] for r in named}) < 2:
        return
    first = named[0]["variant"]
    base = {key(r): r[metric] for r in named if r["variant"] == first}
    for r in named:
        if key(r) in base and base[key(r)]:
            r[f"{metric}_vs_{first}"] = r[metric] / base[key(r)]


# ------------------------------------------------------------------------------------------
# The run: what every model benchmark's main does around its measurement
# ------------------------------------------------------------------------------------------
def run_benchmark(bench, script: str, argv, parse_args, measure) -> tuple[argparse.Namespace, dict, Path]:
    """Read the command line, pick the device and the model, start the record `bench` (a name, or
    a function of the parsed arguments that gives it), then measure: in this process, calling
    `measure(model_dir, dtype, args, device, record, out)`, or with --variants once per variant,
    each in a child process running `script` again. Returns (args, record, out); the caller adds
    what it derives from the rows, then `finish`es."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    device = pick_device(args.device)
    model_dir, dtype = resolve_model(args, device)
    bench = bench(args) if callable(bench) else bench
    out = args.out or default_out(bench, args.model_label, device)
    record = new_record(bench, device, args)
    if args.variants and args.child_variant is None:
        run_variants(Path(script), argv, args, record, out)
    else:
        measure(model_dir, dtype, args, device, record, out)
    return args, record, out


def finish(out: Path, record: dict, table: str, *lines: str) -> None:
    """Write the record; unless this process is a variant's child (its parent reports), print
    where it went, its table, `lines`, each variant whose child failed, and the record's note."""
    write_json(out, record)
    if record["args"].get("child_variant") is not None:
        return
    print(f"\nwrote {out}\n{table}")
    for line in lines:
        print(line)
    for row in record["results"]:
        if row.keys() == {"variant", "error"}:  # run_variants' row for a child that failed
            print(f"variant {row['variant']}: {row['error']}")
    if record["note"]:
        print(record["note"])
