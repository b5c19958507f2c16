"""Online serving: the OpenAI server under Poisson load, against offline `LLM.generate`, one run.

The workload is the random one of `throughput.py` (`make_workload`: random prompt token ids, input
and output lengths uniform in ranges, a fixed seed, EOS ignored so every request generates exactly
its output length, greedy). The requests are replayed through the *streaming* completions API of a
`python -m minivllm serve` process started here (or one given with --url), arriving as a Poisson
process at each rate of --rates (requests per second; `inf` = all at once). Per rate it records:

* TTFT (request sent -> first text chunk), inter-token latency (gap between text chunks), TPOT
  ((end - first chunk) / (output tokens - 1)) and end-to-end latency: mean, p50, p90, p99;
* output tokens/s over the run (first request sent -> last one done) and failed requests (an HTTP
  error, an error event, no `[DONE]`, or fewer tokens than asked for);
* the client's own CPU share, so a client that could not keep up is seen, not mistaken for a slow
  server. Parsing thousands of chunks a second takes a Python client more than a core, so the
  requests are sent from several processes (--client-processes; half the cores, at most 8).

In the same run, before the server starts, offline `LLM.generate` computes the same requests with
the same engine settings: `ratio_vs_offline` = server output tok/s at `inf` / offline output tok/s
(the issue's target: >= 0.85, i.e. HTTP and streaming cost at most 15 %).

**transformers serve** (Hugging Face's OpenAI-compatible server; `--backends ...,transformers`):
it takes text prompts only, so the comparison runs on text made from the workload (random ids of
the tokenizer's vocabulary, decoded; prompt lengths in tokens then differ a little from the drawn
ones and are read back from each server's `usage`), on the first --hf-num-requests requests, all at
once, with `generation_config` asking for exactly max_tokens tokens, greedy, continuous batching
on; minivllm's server runs the same text requests, so the two rows compare like with like. It
needs `fastapi`, `uvicorn`, `pydantic` and `openai` (transformers' `[serving]` extra) and
`accelerate`. If it cannot start or answer, the record says why instead of the benchmark crashing.

    python benchmarks/serve_bench.py                          # GPU: qwen3-0.6b, 256 reqs, 4/16/64/inf
    python benchmarks/serve_bench.py --backends minivllm --rates 16,inf
    python benchmarks/serve_bench.py --url http://127.0.0.1:8000 --model-name NAME   # a running server
    python benchmarks/serve_bench.py --smoke                  # CPU: tiny model, a few requests

A machine without network access that lacks the server's packages can be given them as wheels
(docs/serving.md lists them and the install line). JSON and a PNG (latency against rate) go to
benchmarks/results/ (CPU runs to benchmarks/results/cpu/, not committed); a table is printed
last. CPU numbers are no GPU claim.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `minivllm` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (
    MODEL_CONFIGS,
    RESULTS_DIR,
    environment,
    parse_range,
    release_memory,
    setup_model,
    write_json,
)
from benchmarks.throughput import make_workload, percentiles

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = ("minivllm", "transformers")
GPU_DEFAULTS = {"model_config": "qwen3-0.6b", "num_requests": 256, "input_len": "100:1024",
                "output_len": "100:1024", "rates": "4,16,64,inf", "backends": "minivllm,transformers"}
SMOKE_DEFAULTS = {"model_config": "tiny", "num_requests": 4, "input_len": "8:16", "output_len": "4:8",
                  "rates": "16,inf", "backends": "minivllm"}
TARGETS = {"ratio_vs_offline_min": 0.85, "ttft_p99_at_16_max_s": 1.0, "failed_requests": 0}


# ------------------------------------------------------------------------------------------
# The client: one streamed request, and a Poisson replay of many
# ------------------------------------------------------------------------------------------
@dataclass
class Result:
    """What the client saw of one request (seconds from the start of its run)."""

    sent: float = 0.0
    first: float | None = None  # first text chunk
    end: float | None = None
    chunk_times: list[float] = field(default_factory=list)
    output_tokens: int | None = None  # from the server's usage chunk
    prompt_tokens: int | None = None
    error: str | None = None

    def metrics(self) -> dict:
        gaps = np.diff(self.chunk_times).tolist() if len(self.chunk_times) > 1 else []
        tpot = None
        if self.first is not None and self.output_tokens and self.output_tokens > 1:
            tpot = (self.end - self.first) / (self.output_tokens - 1)
        return {"ttft": None if self.first is None else self.first - self.sent, "itl": gaps, "tpot": tpot,
                "e2e": None if self.end is None else self.end - self.sent}


async def stream_one(client, url: str, body: dict, expected_tokens: int | None, t0: float,
                     delay: float) -> Result:
    """Send one streaming request at t0 + delay; time its chunks; check it ended properly."""
    await asyncio.sleep(max(0.0, t0 + delay - time.monotonic()))
    result = Result(sent=time.monotonic() - t0)
    done = False
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return result
            buffer = b""
            async for data in response.aiter_bytes():
                now = time.monotonic() - t0  # events that came in one read arrived together
                buffer += data
                while b"\n\n" in buffer:
                    event, buffer = buffer.split(b"\n\n", 1)
                    done |= _read_event(event, result, now)
    except Exception as err:  # noqa: BLE001 - a failed request is a result, not a crash
        result.error = f"{type(err).__name__}: {err}"
    result.end = time.monotonic() - t0
    if result.error is None and not done:
        result.error = "the stream ended without a finish_reason or data: [DONE]"
    if result.error is None and expected_tokens is not None and result.output_tokens != expected_tokens:
        result.error = f"{result.output_tokens} output tokens, asked for {expected_tokens}"
    return result


def _read_event(event: bytes, result: Result, now: float) -> bool:
    """Fold one server-sent event into `result`; True once the stream has properly ended (the
    closing [DONE], or a finish_reason: transformers serve sends no [DONE])."""
    data = event.strip()
    if not data.startswith(b"data:"):
        return False
    data = data[5:].strip()
    if data == b"[DONE]":
        return True
    chunk = json.loads(data)
    if "error" in chunk:
        result.error = str(chunk["error"])[:200]
        return False
    finished = False
    for choice in chunk.get("choices") or ():
        text = choice.get("text") if "text" in choice else (choice.get("delta") or {}).get("content")
        if text:
            result.chunk_times.append(now)
            if result.first is None:
                result.first = now
        finished |= bool(choice.get("finish_reason"))
    usage = chunk.get("usage")
    if usage:
        result.output_tokens, result.prompt_tokens = usage.get("completion_tokens"), usage.get("prompt_tokens")
    return finished


def arrival_delays(n: int, rate: float, seed: int) -> list[float]:
    """Send times of a Poisson process of `rate` requests/s (exponential gaps); inf: all at 0."""
    if math.isinf(rate):
        return [0.0] * n
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=n)
    return np.cumsum(gaps).tolist()


def replay(url: str, bodies: list[dict], expected: list[int | None], rate: float, seed: int, timeout: float,
           pool=None, processes: int = 1) -> tuple[list[Result], float, float]:
    """Send every request at its Poisson time; returns (results in request order, wall seconds,
    the busiest client process's CPU share).

    Parsing thousands of streamed chunks a second costs a Python client a core or more, so with a
    `pool` of `processes` client processes the requests are dealt round-robin to them; all keep
    one clock (time.monotonic is system-wide) and start at the same moment t0.
    """
    delays = arrival_delays(len(bodies), rate, seed)
    workers = processes if pool is not None else 1
    t0 = time.monotonic() + (1.0 if pool is not None else 0.05)
    slices = [(url, bodies[w::workers], expected[w::workers], delays[w::workers], t0, timeout)
              for w in range(workers)]
    outs = list(pool.map(_replay_slice, slices)) if pool is not None else [_replay_slice(slices[0])]
    results: list[Result] = [None] * len(bodies)  # type: ignore[list-item]
    for w, (part, _) in enumerate(outs):
        results[w::workers] = part
    wall = max((r.end for r in results if r.end is not None), default=0.0) - min(r.sent for r in results)
    return results, wall, max(cpu for _, cpu in outs) / wall if wall else 0.0


def _replay_slice(job) -> tuple[list[Result], float]:
    """(one client process) Its share of the requests; returns (results, CPU seconds)."""
    url, bodies, expected, delays, t0, timeout = job

    async def run() -> tuple[list[Result], float]:
        import httpx

        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        async with httpx.AsyncClient(timeout=httpx.Timeout(timeout), limits=limits) as client:
            cpu = time.process_time()
            results = await asyncio.gather(*(stream_one(client, url, b, n, t0, d)
                                             for b, n, d in zip(bodies, expected, delays)))
            return list(results), time.process_time() - cpu

    return asyncio.run(run())


def client_pool(processes: int):
    """Client processes, started (spawn: no inherited CUDA state) and warmed before any timing."""
    if processes <= 1:
        return None
    import concurrent.futures
    import multiprocessing

    pool = concurrent.futures.ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"))
    list(pool.map(_ping, range(processes)))
    return pool


def _ping(_: int) -> int:
    import httpx  # noqa: F401 - imported now, not in the first timed run

    return os.getpid()


def summarize(label: str, rate: float, results: list[Result], wall: float, client_cpu: float) -> dict:
    ok = [r for r in results if r.error is None]
    per = [r.metrics() for r in ok]
    out_tokens = sum(r.output_tokens or 0 for r in ok)
    started = min((r.sent for r in results), default=0.0)
    finished = max((r.end for r in results if r.end is not None), default=wall)
    return {
        "backend": label,
        "rate": "inf" if math.isinf(rate) else rate,
        "num_requests": len(results),
        "failed_requests": len(results) - len(ok),
        "errors": sorted({r.error for r in results if r.error})[:5],
        "num_output_tokens": out_tokens,
        "num_prompt_tokens": sum(r.prompt_tokens or 0 for r in ok),
        "duration_s": finished - started,
        "output_tokens_per_s": out_tokens / (finished - started) if finished > started else None,
        "requests_per_s": len(ok) / (finished - started) if finished > started else None,
        "ttft_s": percentiles([m["ttft"] for m in per]),
        "itl_s": percentiles([g for m in per for g in m["itl"]]),
        "tpot_s": percentiles([m["tpot"] for m in per]),
        "e2e_s": percentiles([m["e2e"] for m in per]),
        # Latencies are timed per chunk that carries text. Well above 1 at a low rate, this says
        # that many tokens decode to no text (the toy tokenizer once knew 923 of a random Qwen3
        # model's 151,936 ids), and TTFT/ITL then measure the tokenizer, not the server.
        "tokens_per_text_chunk": out_tokens / chunks if (chunks := sum(len(r.chunk_times) for r in ok)) else None,
        "client_cpu_fraction": client_cpu,  # of the busiest client process
    }


# ------------------------------------------------------------------------------------------
# Servers as child processes
# ------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A server started as a child process, its output in a log file, stopped with SIGTERM."""

    def __init__(self, name: str, command: list[str], port: int, log: Path, env: dict | None = None):
        self.name, self.url, self.log = name, f"http://127.0.0.1:{port}", log
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as out:
            self.proc = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})

    def wait_healthy(self, timeout: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: {self.tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} was not healthy after {timeout:.0f} s: {self.tail()}")

    def tail(self, chars: int = 1500) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        return self.proc.returncode


def engine_flags(args) -> list[str]:
    """The server's engine settings: the same as the offline LLM's (see offline_llm)."""
    return ["--max-num-seqs", str(args.max_num_seqs), "--max-num-batched-tokens", str(args.max_num_batched_tokens),
            "--max-model-len", str(args.max_model_len), "--gpu-memory-utilization", str(args.gpu_memory_utilization),
            "--no-prefix-caching"]  # random prompts share nothing, and re-runs must not hit the cache


def start_minivllm(args, model_dir: Path, log_dir: Path) -> ServerProcess:
    port = free_port()
    command = [sys.executable, "-m", "minivllm", "serve", "--model", str(model_dir), "--port", str(port),
               "--served-model-name", args.model_name, "--log-level", "warning", *engine_flags(args)]
    return ServerProcess("minivllm serve", command, port, log_dir / "minivllm_serve.log")


def start_transformers(model_dir: Path, log_dir: Path) -> ServerProcess:
    """`transformers serve` with the model preloaded and continuous batching, if this version has
    the flags (read from its --help: older versions name the model with --force-model)."""
    cli = [sys.executable, "-m", "transformers.cli.transformers", "serve"]
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    shown = subprocess.run([*cli, "--help"], capture_output=True, text=True, timeout=120, cwd=ROOT,
                           env={**os.environ, **env, "COLUMNS": "200"})
    help_text = shown.stdout + shown.stderr
    if shown.returncode != 0:
        raise RuntimeError(f"`transformers serve --help` failed: {help_text[-800:]}")
    port = free_port()
    model = ["--force-model", str(model_dir)] if "--force-model" in help_text else [str(model_dir)]
    batching = ["--continuous-batching"] if "--continuous-batching" in help_text else []
    command = [*cli, *model, *batching, "--host", "127.0.0.1", "--port", str(port)]
    return ServerProcess("transformers serve", command, port, log_dir / "transformers_serve.log", env)


# ------------------------------------------------------------------------------------------
# Offline baseline
# ------------------------------------------------------------------------------------------
def offline_llm(model_dir: Path, args):
    from minivllm import LLM

    return LLM(str(model_dir), max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
               max_model_len=args.max_model_len, gpu_memory_utilization=args.gpu_memory_utilization,
               enable_prefix_caching=False)


def run_offline(model_dir: Path, prompts, out_lens, args, device) -> dict:
    """LLM.generate on the same requests (after a short untimed warm-up); the engine is freed
    afterwards so the server can have the GPU."""
    from minivllm import SamplingParams

    llm = offline_llm(model_dir, args)
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in out_lens]
    llm.generate([p[:16] for p in prompts[:4]], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - start
    out_tokens = sum(len(o.token_ids) for o in outputs)
    del llm, outputs
    release_memory(device)
    return {"backend": "offline LLM.generate", "rate": "inf", "num_requests": len(prompts), "failed_requests": 0,
            "num_output_tokens": out_tokens, "num_prompt_tokens": sum(len(p) for p in prompts),
            "duration_s": wall, "output_tokens_per_s": out_tokens / wall,
            "all_requests_complete": out_tokens == sum(out_lens)}


# ------------------------------------------------------------------------------------------
# Request bodies
# ------------------------------------------------------------------------------------------
def token_bodies(args, prompts, out_lens) -> list[dict]:
    return [{"model": args.model_name, "prompt": p, "max_tokens": n, "temperature": 0, "ignore_eos": True,
             "stream": True, "stream_options": {"include_usage": True}} for p, n in zip(prompts, out_lens)]


def text_bodies(model: str, texts: list[str], out_lens: list[int], route: str, server: str) -> list[dict]:
    """Text requests for `route`; EOS is turned off the way each server understands it."""
    bodies = []
    for text, n in zip(texts, out_lens):
        body = {"model": model, "max_tokens": n, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}
        if route == "completions":
            body["prompt"] = text
        else:
            body["messages"] = [{"role": "user", "content": text}]
        if server == "minivllm":
            body["ignore_eos"] = True
        else:  # transformers reads its own GenerationConfig from the request
            body["generation_config"] = json.dumps({"max_new_tokens": n, "min_new_tokens": n, "do_sample": False})
        bodies.append(body)
    return bodies


def text_workload(model_dir: Path, args) -> tuple[list[str], list[int]]:
    """The first --hf-num-requests requests as text: random ids of the tokenizer's own vocabulary
    (the model's may be larger), decoded.

    Text of random ids need not encode back to as many tokens (a token that encoding never
    produces, like the toy tokenizer's fillers, comes back as several), so each prompt is encoded
    again and cut to its drawn length: the servers then see prompts of about the drawn size."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    ids, out_lens = make_workload(args.hf_num_requests, args.input_range, args.output_range, len(tokenizer),
                                  args.seed)
    texts = []
    for prompt in ids:
        text = tokenizer.decode(prompt, skip_special_tokens=True)
        again = tokenizer.encode(text, add_special_tokens=False)[:len(prompt)]
        texts.append(tokenizer.decode(again, skip_special_tokens=True))
    return texts, out_lens


async def pick_route(url: str, model: str) -> str:
    """completions if the server has it (transformers serve got it late), else chat/completions."""
    import httpx

    async with httpx.AsyncClient(timeout=600) as client:
        probe = await client.post(f"{url}/v1/completions", json={"model": model, "prompt": "Hello", "max_tokens": 2})
    return "chat/completions" if probe.status_code in (404, 405) else "completions"


# ------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="CPU smoke run: tiny model, a few requests")
    p.add_argument("--model-config", choices=sorted(MODEL_CONFIGS), default=None, help="default qwen3-0.6b")
    p.add_argument("--num-requests", type=int, default=None, help="default 256")
    p.add_argument("--input-len", default=None, help="prompt lengths LOW:HIGH (default 100:1024)")
    p.add_argument("--output-len", default=None, help="output lengths LOW:HIGH (default 100:1024)")
    p.add_argument("--rates", default=None, help="requests/s, comma-separated; inf = all at once "
                                                 "(default 4,16,64,inf)")
    p.add_argument("--backends", default=None, help=f"comma-separated subset of {BACKENDS}")
    p.add_argument("--hf-num-requests", type=int, default=64,
                   help="requests of the transformers-serve comparison (the first K, as text)")
    p.add_argument("--url", default=None, help="use this running minivllm server instead of starting one "
                                               "(no offline baseline then)")
    p.add_argument("--model-name", default="minivllm-bench", help="the served model name")
    p.add_argument("--model-dir", type=Path, default=None, help="where to build/reuse the random model")
    p.add_argument("--out", type=Path, default=None, help="JSON path (the PNG goes beside it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-num-seqs", type=int, default=None, help="default: all requests, at most 256")
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--client-processes", type=int, default=None,
                   help="processes sending the requests (default: half the cores, at most 8; 1 with --smoke)")
    p.add_argument("--start-timeout", type=float, default=900.0, help="seconds for a server to become healthy")
    args = p.parse_args(argv)
    defaults = SMOKE_DEFAULTS if args.smoke else GPU_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    try:
        args.input_range = parse_range(args.input_len, "--input-len")
        args.output_range = parse_range(args.output_len, "--output-len")
        args.rate_values = [math.inf if r.strip() == "inf" else float(r) for r in args.rates.split(",")]
    except ValueError as err:
        p.error(str(err))
    if any(r <= 0 for r in args.rate_values):
        p.error(f"--rates must be > 0 (or inf), got {args.rates}")
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if not args.backends or set(args.backends) - set(BACKENDS):
        p.error(f"--backends: choose from {BACKENDS}, got {args.backends}")
    if args.num_requests < 1 or args.hf_num_requests < 1:
        p.error("--num-requests and --hf-num-requests must be >= 1")
    args.hf_num_requests = min(args.hf_num_requests, args.num_requests)
    args.max_num_seqs = args.max_num_seqs or min(args.num_requests, 256)
    if args.client_processes is None:
        args.client_processes = 1 if args.smoke else max(1, min(8, (os.cpu_count() or 2) // 2))
    if args.client_processes < 1:
        p.error(f"--client-processes must be >= 1, got {args.client_processes}")
    args.max_num_batched_tokens = max(args.max_num_batched_tokens, args.max_num_seqs)
    args.max_model_len = args.input_range[1] + args.output_range[1]
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model_dir, dtype, note = setup_model(args.model_config, args.model_dir, device, args.seed, "minivllm-serve-bench-")
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(str(model_dir)).vocab_size
    prompts, out_lens = make_workload(args.num_requests, args.input_range, args.output_range, vocab, args.seed)
    out_path = args.out or _default_out(args.model_config, device)
    log_dir = Path(tempfile.mkdtemp(prefix="serve-bench-logs-"))  # the servers' own output
    payload = {"bench": "serve", "model_config": args.model_config, "dtype": str(dtype).removeprefix("torch."),
               "num_requests": args.num_requests, "input_len": list(args.input_range),
               "output_len": list(args.output_range), "seed": args.seed, "rates": args.rates,
               "sampling": "greedy, ignore_eos, streamed", "engine": vars_of(args), **environment(device),
               "note": note, "targets": TARGETS, "server_logs": str(log_dir), "records": [], "comparison": []}

    def save() -> None:
        payload["summary"] = summary(payload)
        write_json(out_path, payload)  # after every record: a later crash loses nothing measured

    if "minivllm" in args.backends and args.url is None:
        payload["offline"] = run_offline(model_dir, prompts, out_lens, args, device)
        save()
    pool = client_pool(args.client_processes)
    try:
        run_servers(args, model_dir, prompts, out_lens, log_dir, payload, save, pool, device)
    finally:
        if pool is not None:
            pool.shutdown()
    save()
    plot(payload, out_path.with_suffix(".png"))
    print(f"\nwrote {out_path} and {out_path.with_suffix('.png')}")
    print(format_table(payload))
    return payload


def run_servers(args, model_dir, prompts, out_lens, log_dir, payload, save, pool, device) -> None:
    """minivllm's server at every rate (and on the text requests), then transformers serve."""
    server = None
    try:
        if args.url is None:
            server = start_minivllm(args, model_dir, log_dir)
            server.wait_healthy(args.start_timeout)
        url = args.url or server.url
        replay(f"{url}/v1/completions", token_bodies(args, [p[:16] for p in prompts[:4]], [4] * 4), [4] * 4,
               math.inf, args.seed, args.request_timeout)  # warm-up, untimed
        if "minivllm" in args.backends:
            bodies = token_bodies(args, prompts, out_lens)
            for i, rate in enumerate(args.rate_values):
                results, wall, cpu = replay(f"{url}/v1/completions", bodies, out_lens, rate, args.seed + i,
                                            args.request_timeout, pool, args.client_processes)
                payload["records"].append(summarize("minivllm serve", rate, results, wall, cpu))
                save()
                print(format_record(payload["records"][-1]), flush=True)
        if "transformers" in args.backends:
            texts, text_lens = text_workload(model_dir, args)
            route = asyncio.run(pick_route(url, args.model_name))
            payload["comparison"].append(run_text(url, "minivllm serve", args.model_name, texts, text_lens,
                                                  route, "minivllm", args, pool))
            save()
    finally:
        if server is not None:
            payload["minivllm_server_exit_code"] = server.stop()
    if "transformers" in args.backends:
        payload["comparison"].append(run_transformers(model_dir, texts, text_lens, log_dir, args, device, pool))
        save()


def run_text(url: str, label: str, model: str, texts, out_lens, route: str, server: str, args, pool) -> dict:
    bodies = text_bodies(model, texts, out_lens, route, server)
    results, wall, cpu = replay(f"{url}/v1/{route}", bodies, out_lens, math.inf, args.seed,
                                args.request_timeout, pool, args.client_processes)
    return {**summarize(label, math.inf, results, wall, cpu), "route": route, "prompts": "text"}


def run_transformers(model_dir: Path, texts, out_lens, log_dir: Path, args, device, pool) -> dict:
    """transformers serve on the text requests; an error record if it cannot run here."""
    release_memory(device)
    server = None
    try:
        server = start_transformers(model_dir, log_dir)
        server.wait_healthy(args.start_timeout)
        route = asyncio.run(pick_route(server.url, str(model_dir)))
        return run_text(server.url, "transformers serve", str(model_dir), texts, out_lens, route, "transformers",
                        args, pool)
    except Exception as err:  # noqa: BLE001 - an unavailable baseline is a result, not a crash
        print(f"transformers serve could not run: {err}")
        return {"backend": "transformers serve", "rate": "inf", "num_requests": len(texts),
                "error": f"{type(err).__name__}: {err}"[:2000]}
    finally:
        if server is not None:
            server.stop()


def vars_of(args) -> dict:
    return {k: getattr(args, k) for k in ("max_num_seqs", "max_num_batched_tokens", "max_model_len",
                                          "gpu_memory_utilization", "hf_num_requests", "url")}


def _default_out(model_config: str, device: torch.device) -> Path:
    import datetime as dt

    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    folder = RESULTS_DIR if device.type == "cuda" else RESULTS_DIR / "cpu"
    return folder / f"serve_bench_{model_config}_{device.type}_{stamp}.json"


# ------------------------------------------------------------------------------------------
# Results: the targets, a plot, a table
# ------------------------------------------------------------------------------------------
def summary(payload: dict) -> dict:
    """The issue's three targets, as measured (None where this run did not measure one)."""
    by_rate = {r["rate"]: r for r in payload["records"]}
    offline = payload.get("offline")
    ratio = None
    if offline and "inf" in by_rate and by_rate["inf"].get("output_tokens_per_s"):
        ratio = by_rate["inf"]["output_tokens_per_s"] / offline["output_tokens_per_s"]
    ttft16 = (by_rate.get(16.0) or {}).get("ttft_s")
    failed = sum(r.get("failed_requests", 0) for r in payload["records"])
    return {"ratio_vs_offline": ratio,
            "ttft_p99_at_16_s": ttft16["p99"] if ttft16 else None,
            "failed_requests": failed,
            "meets_ratio": None if ratio is None else ratio >= TARGETS["ratio_vs_offline_min"],
            "meets_ttft": None if not ttft16 else ttft16["p99"] <= TARGETS["ttft_p99_at_16_max_s"],
            "meets_no_failures": failed == 0}


def plot(payload: dict, path: Path) -> None:
    """Latency percentiles (TTFT, TPOT, end to end) and output tok/s against the arrival rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in payload["records"] if r.get("ttft_s")]
    labels = [str(r["rate"]) if r["rate"] == "inf" else f"{r['rate']:g}" for r in records]
    x = range(len(records))
    fig, axes = plt.subplots(1, 4, figsize=(17, 4))
    for ax, key, title in zip(axes, ("ttft_s", "tpot_s", "e2e_s"), ("time to first token", "time per output token",
                                                                   "end-to-end latency")):
        for q, style in (("p50", "o-"), ("p90", "s--"), ("p99", "^:")):
            ax.plot(x, [r[key][q] for r in records], style, label=q)
        ax.set(title=title, xlabel="arrival rate (requests/s)", ylabel="seconds", yscale="log")
        ax.legend()
    axes[3].bar(x, [r["output_tokens_per_s"] for r in records], label="server (streamed)")
    if payload.get("offline"):
        axes[3].axhline(payload["offline"]["output_tokens_per_s"], color="k", ls="--", label="offline LLM.generate")
    axes[3].set(title="output tokens/s", xlabel="arrival rate (requests/s)")
    axes[3].legend()
    for ax in axes:
        ax.set_xticks(list(x), labels)
    fig.suptitle(f"minivllm serve: {payload['model_config']} on {payload['device']}, {payload['num_requests']} "
                 f"requests, in {payload['input_len']} out {payload['output_len']}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _ms(stats: dict | None, q: str) -> str:
    return f"{1e3 * stats[q]:.0f}" if stats else "-"


def format_record(r: dict) -> str:
    if r.get("error"):
        return f"{r['backend']:<22} {str(r['rate']):>6}  error: {r['error'][:150]}"
    tps = f"{r['output_tokens_per_s']:.1f}" if r.get("output_tokens_per_s") else "-"
    per_chunk = f"{r['tokens_per_text_chunk']:.2f}" if r.get("tokens_per_text_chunk") else "-"
    return (f"{r['backend']:<22} {str(r['rate']):>6} {r['num_requests']:>5} {r.get('failed_requests', 0):>6} "
            f"{tps:>10} {_ms(r.get('ttft_s'), 'p50'):>8} {_ms(r.get('ttft_s'), 'p99'):>8} "
            f"{_ms(r.get('itl_s'), 'p50'):>7} {_ms(r.get('tpot_s'), 'p99'):>8} {_ms(r.get('e2e_s'), 'p99'):>8} "
            f"{per_chunk:>9}")


def format_table(payload: dict) -> str:
    lines = [f"{payload['model_config']} on {payload['device']} ({payload['dtype']}), {payload['num_requests']} "
             f"requests, in {payload['input_len']} out {payload['output_len']}, seed {payload['seed']}"]
    header = (f"{'backend':<22} {'rate':>6} {'reqs':>5} {'failed':>6} {'out tok/s':>10} {'TTFT50':>8} "
              f"{'TTFT99':>8} {'ITL50':>7} {'TPOT99':>8} {'E2E99':>8} {'tok/chunk':>9}   (latencies in ms)")
    lines += [header, "-" * len(header)]
    if payload.get("offline"):
        lines.append(format_record(payload["offline"]))
    lines += [format_record(r) for r in payload["records"]]
    if payload["comparison"]:
        lines.append("text prompts, all at once (same requests for both servers):")
        lines += [format_record(r) for r in payload["comparison"]]
    s = payload.get("summary") or {}
    if s.get("ratio_vs_offline") is not None:
        lines.append(f"server at 'inf' / offline LLM.generate: {s['ratio_vs_offline']:.3f} output tok/s "
                     f"(target >= {TARGETS['ratio_vs_offline_min']})")
    if s.get("ttft_p99_at_16_s") is not None:
        lines.append(f"p99 TTFT at 16 req/s: {s['ttft_p99_at_16_s']:.3f} s (target <= 1 s)")
    lines.append(f"failed requests: {s.get('failed_requests', 0)} (target 0)")
    clients = [r.get("client_cpu_fraction") for r in payload["records"] if r.get("client_cpu_fraction") is not None]
    if clients and max(clients) > 0.8:
        lines.append(f"WARNING: the client used {max(clients):.0%} of a CPU core: it may have limited the numbers")
    if payload.get("note"):
        lines.append(payload["note"])
    return "\n".join(lines)


if __name__ == "__main__":
    main()
