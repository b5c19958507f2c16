"""Online serving: the OpenAI server under Poisson load, against offline `LLM.generate`, one run.

The workload is the random one of `throughput.py` (random prompt token ids, input and output lengths uniform in
ranges, a fixed seed, EOS ignored so every request generates exactly its output length, greedy). The requests are
replayed through the *streaming* completions API of a `python -m minivllm serve` process started here (or one given
with --url), arriving as a Poisson process at each rate of --rates (requests per second; `inf` = all at once). Per rate:

* TTFT (request sent -> first text chunk), inter-token latency (gap between text chunks), TPOT ((end - first chunk) /
  (output tokens - 1)) and end-to-end latency: mean, p50, p90, p99;
* output tokens/s over the run (first request sent -> last one done) and failed requests (an HTTP error, an error
  event, no `[DONE]`, or fewer tokens than asked for);
* the client's own CPU share, so a client that could not keep up is seen, not mistaken for a slow server. Parsing
  thousands of chunks a second takes a Python client more than a core, so the requests are sent from several
  processes (--client-processes; half the cores, at most 8);
* the frontends' CPU (a server started here): seconds of all frontend processes, microseconds per streamed token, and
  the busiest one's share of a core (near 1: saturated; tokens per text chunk above 1: it fell behind and merged
  deltas). `--api-server-count 1,2,4`: one server per value.

In the same run, before the server starts, offline `LLM.generate` computes the same requests with the same engine
settings: `ratio_vs_offline` = server output tok/s at `inf` / offline output tok/s (HTTP and streaming should cost at
most 15 %: >= 0.85). --extra-body adds fields to every request.

**Request mixes** (`--mixes plain,json,logprobs`): the same requests again, each mix adding its fields (MIXES), one
wave per mix at each rate, the mixes taking turns on the same server so that any drift of the machine touches them
alike. `json` puts a JSON schema on every request (`response_format`): an object with one string longer than any
output, so the grammar never lets a request end early (its EOS stays allowed: structured output refuses
`ignore_eos`), every request still generates exactly its length, and the engine fills a grammar bitmask for every
row of every step. `logprobs` asks for the top 5 log-probabilities of every token. `mix_ratios` in the summary is
each mix's output tok/s over the first mix's, wave by wave (targets: json >= 0.9, logprobs >= 0.95).

**transformers serve** (`--backends minivllm,transformers`): it takes text prompts only, so the comparison runs on
text made from the workload (random ids of the tokenizer's vocabulary, decoded and cut to the drawn length) on the
first --hf-num-requests requests, all at once, asking for exactly max_tokens tokens, greedy, continuous batching on;
minivllm's server runs the same text requests. It needs transformers' `[serving]` extra; if it cannot run, the
record says why.

    python benchmarks/serve_bench.py                          # GPU: qwen3-0.6b, 256 reqs, 4/16/64/inf
    python benchmarks/serve_bench.py --rates inf,inf,inf --api-server-count 4   # three waves, four frontends
    python benchmarks/serve_bench.py --backends minivllm,transformers --rates 16,inf --hf-num-requests 32
    python benchmarks/serve_bench.py --url http://127.0.0.1:8000 --model-name NAME   # a running server
    python benchmarks/serve_bench.py --num-requests 64 --output-len 512 --rates inf,inf,inf --mixes plain,json

**The frontend alone** (`--fountain-step-ms MS`): the engine process runs a *token fountain* (`TokenFountain`: each
running request gets one token a step, a word of text, after MS of sleep, the GPU's time), so the frontend does the
work it does with a model while the engine costs nearly nothing; no offline baseline, and the model (default
qwen3-small) gives only the tokenizer and the config. With a core per process, N frontends keep up with N times the
tokens/s of one for the same CPU per token. A request with `logprobs` gets a record per token, as from a model, so
`--mixes plain,logprobs` says what log-probabilities cost the frontend (CPU per token).

    python benchmarks/serve_bench.py --fountain-step-ms 8 --api-server-count 1,2,4 --num-requests 256 --input-len 4 --output-len 512 --rates inf
    python benchmarks/serve_bench.py --fountain-step-ms 4 --mixes plain,logprobs --num-requests 64 --input-len 4 --output-len 512 --rates inf,inf,inf
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import psutil

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `minivllm` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from minivllm import LLM, SamplingParams
from minivllm.outputs import CompletionOutput, RequestMetrics, RequestOutput

from benchmarks.common import (ROOT, add_model_arguments, add_row, default_out, finish,
                               format_table, free_port, int_list, names, new_record, parse_range,
                               percentiles, pick_device, random_requests, release_memory,
                               resolve_model, sync, vocab_size, with_device_defaults)

BACKENDS = ("minivllm", "transformers")
GPU_DEFAULTS = {"num_requests": 256, "input_len": "100:1024", "output_len": "100:1024",
                "rates": "4,16,64,inf", "client_processes": max(1, min(8, (os.cpu_count() or 2) // 2))}
CPU_DEFAULTS = {"num_requests": 4, "input_len": "8:16", "output_len": "4:8", "rates": "16,inf",
                "client_processes": 1}
# A JSON object whose one string must be longer than any output: the grammar is followed at every
# token, and never complete, so each request runs to its max_tokens as an unconstrained one does.
ENDLESS_STRING_SCHEMA = {"type": "object", "properties": {"text": {"type": "string", "minLength": 1_000_000}},
                         "required": ["text"]}
MIXES = {
    "plain": {},
    "json": {"ignore_eos": False, "response_format": {
        "type": "json_schema", "json_schema": {"name": "bench", "schema": ENDLESS_STRING_SCHEMA}}},
    "logprobs": {"logprobs": 5},
}


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
class ServerProcess:
    """A server started as a child process, its output in a log file, stopped with SIGTERM."""

    def __init__(self, name: str, command: list[str], port: int, log: Path, env: dict | None = None):
        self.name, self.port, self.url, self.log = name, port, f"http://127.0.0.1:{port}", log
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


def frontend_pids(port: int) -> list[int]:
    """The processes that listen on the server's port: its frontends (the launcher of several
    binds the port without listening, the engine process never binds it)."""
    return sorted({c.pid for c in psutil.net_connections(kind="tcp")
                   if c.status == psutil.CONN_LISTEN and c.laddr.port == port})


def cpu_seconds(pids: list[int]) -> dict[int, float]:
    return {pid: sum(psutil.Process(pid).cpu_times()[:2]) for pid in pids}


def frontend_load(pids: list[int], before: dict[int, float], tokens: int, wall: float) -> dict:
    """The frontends' CPU over a wave (the module docstring); nothing for a server not started here."""
    if not pids:
        return {}
    busy = [seconds - before[pid] for pid, seconds in cpu_seconds(pids).items()]
    return {"frontend_processes": len(pids), "frontend_cpu_s": sum(busy),
            "frontend_cpu_us_per_token": 1e6 * sum(busy) / tokens if tokens else None,
            "busiest_frontend_core_share": max(busy) / wall if wall else None}


def engine_flags(args, dtype: str) -> list[str]:
    """The server's engine settings: the same as the offline LLM's (see run_offline)."""
    return ["--dtype", dtype, "--max-num-seqs", str(args.max_num_seqs),
            "--max-num-batched-tokens", str(args.max_num_batched_tokens),
            "--max-model-len", str(args.max_model_len),
            "--gpu-memory-utilization", str(args.gpu_memory_utilization),
            "--no-enable-prefix-caching"]  # random prompts share nothing; re-runs must not hit the cache


def start_minivllm(args, model_dir: Path, dtype: str, log_dir: Path, count: int) -> ServerProcess:
    """`minivllm serve` with `count` frontend processes; with --fountain-step-ms, its engine a
    token fountain (on the CPU: it runs no model)."""
    port = free_port()
    command = [sys.executable, "-m", "minivllm", "serve", "--model", str(model_dir), "--port", str(port),
               "--served-model-name", args.model_name, "--log-level", "warning",
               "--api-server-count", str(count), *engine_flags(args, dtype)]
    env = None
    if args.fountain_step_ms is not None:
        command[1:3] = [str(Path(__file__).resolve())]  # `python serve_bench.py serve ...`
        command.extend(["--device", "cpu"])
        env = {FOUNTAIN_ENV: str(args.fountain_step_ms)}
    return ServerProcess(f"minivllm serve x{count}", command, port, log_dir / f"minivllm_serve_{count}.log", env)


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
# The token fountain: the engine process without a model
# ------------------------------------------------------------------------------------------
FOUNTAIN_ENV = "MINIVLLM_TOKEN_FOUNTAIN_STEP_MS"  # set on the server: its engine is a fountain
WORDS = [" the", " cat", " sat", " on", " a", " mat", ",", " and"]


class TokenFountain:
    """What the engine process asks of `LLMEngine`, answered without a model (--fountain-step-ms).

    Token ids are spread over the vocabulary, as a model's are. A request that asks for
    `logprobs=k` gets a record per token as a greedy engine's would be (`TokenLogprobs`: the
    token first in its top k), so the frontend formats and names as many tokens as with a model.
    """

    def __init__(self, config):
        self.config = config
        self.step_s = float(os.environ[FOUNTAIN_ENV]) / 1e3
        self.max_num_seqs = config.scheduler_config.max_num_seqs
        self.vocab_size = vocab_size(config.model_config.model)
        self.requests: dict[str, list] = {}  # id -> [prompt ids, max_tokens, generated, arrival, logprobs, seed]
        self.scheduler = SimpleNamespace(running=[], waiting=[], speculation=None)
        self.block_manager = SimpleNamespace(num_used_blocks=0, num_blocks=1)
        self.num_waiting = 0
        self.executor = SimpleNamespace(runner=SimpleNamespace(device="cpu", num_kv_blocks=1))

    def prepare_request(self, prompt, params, request_id, stream=True):
        """Nothing to compile (no grammar): the request is ready, and already in the fountain."""
        self.requests[request_id] = [list(prompt), params.max_tokens, 0, time.perf_counter(), params.logprobs,
                                     7919 * len(self.requests)]
        return SimpleNamespace(request_id=request_id, ready=lambda: True, grammar=None)

    def add_prepared(self, prepared) -> None:
        pass

    def abort(self, request_id):
        request = self.requests.pop(request_id, None)
        return None if request is None else self._output(request_id, request, [], "abort")

    def step(self) -> list:
        time.sleep(self.step_s)
        outputs = []
        for request_id in list(self.requests)[:self.max_num_seqs]:
            request = self.requests[request_id]
            request[2] += 1
            done = request[2] >= request[1]
            token_id = (request[5] + 104729 * request[2]) % self.vocab_size
            outputs.append(self._output(request_id, request, [token_id], "length" if done else None))
            if done:
                del self.requests[request_id]
        self.scheduler.running = [None] * min(len(self.requests), self.max_num_seqs)
        return outputs

    def _output(self, request_id, request, token_ids, finish_reason):
        prompt, _, generated, arrival, num_top, _ = request
        metrics = RequestMetrics(arrival, arrival, arrival, None, len(prompt), generated, 0, 0, 0.0, None, None, None)
        text = "".join(WORDS[t % len(WORDS)] for t in token_ids)
        logprobs = None if num_top is None else [self._logprobs(t, num_top) for t in token_ids]
        return RequestOutput(request_id, None, prompt, [CompletionOutput(0, text, token_ids, finish_reason, None, logprobs)],
                             finish_reason is not None, metrics)

    def _logprobs(self, token_id: int, num_top: int) -> tuple:
        """Values with as many digits as a float32's (what JSON then writes out)."""
        top_ids = tuple((token_id + 15485863 * k) % self.vocab_size for k in range(num_top))
        top_logprobs = tuple(-(token_id % 997 + 1) / 331 - 0.75 * k for k in range(num_top))
        return token_id, top_logprobs[0], 1, top_ids, top_logprobs

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def take_failed_outputs(self) -> list:
        return []

    def get_stats(self) -> dict:
        return {}

    def close(self) -> None:
        pass


if os.environ.get(FOUNTAIN_ENV):  # the server this script starts, and the processes it spawns
    from minivllm.entrypoints import engine_core  # (they import this file as their main module)

    engine_core.LLMEngine = TokenFountain


# ------------------------------------------------------------------------------------------
# Offline baseline and request bodies
# ------------------------------------------------------------------------------------------
def run_offline(model_dir: Path, dtype: str, prompts, out_lens, args, device) -> dict:
    """LLM.generate on the same requests (after a short untimed warm-up); the engine is freed
    afterwards so the server can have the GPU."""
    llm = LLM(str(model_dir), dtype=dtype, device=device.type, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
              gpu_memory_utilization=args.gpu_memory_utilization, enable_prefix_caching=False)
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in out_lens]
    llm.generate([p[:16] for p in prompts[:4]], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    sync(device)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    sync(device)
    wall = time.perf_counter() - start
    out_tokens = sum(len(o.token_ids) for o in outputs)
    llm.close()
    del llm, outputs
    release_memory(device)
    return {"backend": "offline LLM.generate", "rate": "inf", "prompts": "ids", "mix": "plain",
            "num_requests": len(prompts), "failed_requests": 0, "num_output_tokens": out_tokens,
            "num_prompt_tokens": sum(len(p) for p in prompts), "duration_s": wall,
            "output_tokens_per_s": out_tokens / wall, "all_requests_complete": out_tokens == sum(out_lens)}


def token_bodies(args, prompts, out_lens, mix: str = "plain") -> list[dict]:
    return [{"model": args.model_name, "prompt": p, "max_tokens": n, "temperature": 0, "ignore_eos": True,
             "stream": True, "stream_options": {"include_usage": True}, **args.extra_body, **MIXES[mix]}
            for p, n in zip(prompts, out_lens)]


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
    ids, out_lens = random_requests(args.hf_num_requests, args.input_range, args.output_range,
                                    len(tokenizer), args.seed)
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
    add_model_arguments(p)
    p.add_argument("--num-requests", type=int, default=None, help="default 256 (CPU 4)")
    p.add_argument("--input-len", default=None, help="prompt lengths LOW:HIGH (default 100:1024)")
    p.add_argument("--output-len", default=None, help="output lengths LOW:HIGH (default 100:1024)")
    p.add_argument("--rates", default=None, help="requests/s, comma list; inf = all at once "
                                                 "(default 4,16,64,inf)")
    p.add_argument("--backends", type=names(BACKENDS, "--backends"), default="minivllm",
                   help=f"comma list from {', '.join(BACKENDS)}")
    p.add_argument("--extra-body", type=json.loads, default={},
                   help='JSON fields added to every minivllm request, e.g. \'{"logprobs": 5}\'')
    p.add_argument("--mixes", type=names(tuple(MIXES), "--mixes"), default="plain",
                   help=f"request mixes, comma list from {', '.join(MIXES)}, taking turns at each rate; "
                        "the summary divides each by the first")
    p.add_argument("--hf-num-requests", type=int, default=64,
                   help="requests of the transformers-serve comparison (the first K, as text)")
    p.add_argument("--url", default=None, help="use this running minivllm server instead of starting one "
                                               "(no offline baseline then)")
    p.add_argument("--model-name", default="minivllm-bench", help="the served model name")
    p.add_argument("--api-server-count", dest="api_server_counts", default="1",
                   type=lambda text: int_list(text, "--api-server-count"),
                   help="frontend processes of the minivllm server (serve --api-server-count); a comma "
                        "list starts one server per value, in turn")
    p.add_argument("--fountain-step-ms", type=float, default=None,
                   help="measure the frontend alone: the engine a token fountain, one token per request "
                        "every MS milliseconds (TokenFountain)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-num-seqs", type=int, default=None, help="default: all requests, at most 256")
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--client-processes", type=int, default=None,
                   help="processes sending the requests (default: half the cores, at most 8; CPU 1)")
    p.add_argument("--start-timeout", type=float, default=900.0, help="seconds for a server to become healthy")
    args = with_device_defaults(p, argv, GPU_DEFAULTS, CPU_DEFAULTS)
    if args.fountain_step_ms is not None and args.model is None:
        args.model_config = args.model_config or "qwen3-small"  # a tokenizer and a 2k context
    args.input_range = parse_range(args.input_len, "--input-len")
    args.output_range = parse_range(args.output_len, "--output-len")
    try:
        args.rate_values = [math.inf if r.strip() == "inf" else float(r) for r in args.rates.split(",")]
    except ValueError:
        p.error(f"--rates: numbers or inf, got {args.rates}")
    if any(r <= 0 for r in args.rate_values):
        p.error(f"--rates must be > 0 (or inf), got {args.rates}")
    if not isinstance(args.extra_body, dict):
        p.error("--extra-body must be a JSON object")
    if min(args.num_requests, args.hf_num_requests, args.client_processes) < 1:
        p.error("--num-requests, --hf-num-requests and --client-processes must be >= 1")
    if args.url is not None and (len(args.api_server_counts) > 1 or args.fountain_step_ms is not None):
        p.error("--url measures the server that runs there: no --api-server-count list, no --fountain-step-ms")
    if args.fountain_step_ms is not None and (args.fountain_step_ms < 0 or args.backends != ["minivllm"]):
        p.error("--fountain-step-ms must be >= 0, with --backends minivllm")
    args.hf_num_requests = min(args.hf_num_requests, args.num_requests)
    args.max_num_seqs = args.max_num_seqs or min(args.num_requests, 256)
    args.max_num_batched_tokens = max(args.max_num_batched_tokens, args.max_num_seqs)
    args.max_model_len = args.input_range[1] + args.output_range[1]
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = pick_device(args.device)
    model_dir, dtype = resolve_model(args, device)
    prompts, out_lens = random_requests(args.num_requests, args.input_range, args.output_range,
                                        vocab_size(model_dir), args.seed)
    out = args.out or default_out("serve_bench", args.model_label, device)
    record = new_record("serve_bench", device, args)
    record["server_logs"] = str(log_dir := Path(tempfile.mkdtemp(prefix="serve-bench-logs-")))
    if args.fountain_step_ms is not None:
        record["note"] = ("The engine is a token fountain (no model): frontend figures of this machine's CPU. "
                          + (record["note"] or ""))

    def save(result: dict) -> None:
        record["summary"] = summary([*record["results"], result])
        add_row(record, out, result, COLUMNS)

    if "minivllm" in args.backends and args.url is None and args.fountain_step_ms is None:
        save(run_offline(model_dir, dtype, prompts, out_lens, args, device))
    pool = client_pool(args.client_processes)
    try:
        run_servers(args, model_dir, dtype, prompts, out_lens, log_dir, record, save, pool, device)
    finally:
        if pool is not None:
            pool.shutdown()
    record["summary"] = s = summary(record["results"])
    lines = []
    if s["ratio_vs_offline"] is not None:
        lines.append(f"server at 'inf' / offline LLM.generate: {s['ratio_vs_offline']:.3f} output tok/s")
    for mix, by_rate in s["mix_ratios"].items():
        for rate, ratios in by_rate.items():
            waves = ", ".join("-" if r is None else f"{r:.3f}" for r in ratios)
            lines.append(f"{mix} / {args.mixes[0]} at rate {rate}: {waves} output tok/s (per wave)")
    if s["ttft_p99_at_16_s"] is not None:
        lines.append(f"p99 TTFT at 16 req/s: {s['ttft_p99_at_16_s']:.3f} s")
    lines.append(f"failed requests: {s['failed_requests']}")
    if max((r.get("client_cpu_fraction") or 0 for r in record["results"]), default=0) > 0.8:
        lines.append("WARNING: a client process used over 80 % of a core: it may have limited the numbers")
    finish(out, record, format_table(record["results"], COLUMNS), *lines)
    return record


def run_servers(args, model_dir, dtype, prompts, out_lens, log_dir, record, save, pool, device) -> None:
    """minivllm's server with each --api-server-count at every rate (the first also on the text
    requests), then transformers serve."""
    text = text_workload(model_dir, args) if "transformers" in args.backends else None
    for count in args.api_server_counts:
        server = None
        try:
            if args.url is None:
                server = start_minivllm(args, model_dir, dtype, log_dir, count)
                server.wait_healthy(args.start_timeout)
            url = args.url or server.url
            for mix in args.mixes:  # warm-up, untimed (a schema is compiled here, not in a timed wave)
                replay(f"{url}/v1/completions", token_bodies(args, [p[:16] for p in prompts[:4]], [4] * 4, mix),
                       [4] * 4, math.inf, args.seed, args.request_timeout)
            if "minivllm" in args.backends:
                pids = [] if server is None else frontend_pids(server.port)
                run_waves(args, url, prompts, out_lens, save, pool, pids, count)
            if text is not None and count == args.api_server_counts[0]:
                route = asyncio.run(pick_route(url, args.model_name))
                save(run_text(url, "minivllm serve", args.model_name, *text, route, "minivllm", args, pool))
        finally:
            if server is not None:  # the first failed exit stays on record
                code = server.stop()
                record["minivllm_server_exit_code"] = record.get("minivllm_server_exit_code") or code
    if text is not None:
        save(run_transformers(model_dir, *text, log_dir, args, device, pool))


def run_waves(args, url: str, prompts, out_lens, save, pool, pids: list[int], count: int) -> None:
    """One wave per rate and mix, the mixes taking turns at each rate (the same arrivals)."""
    bodies = {mix: token_bodies(args, prompts, out_lens, mix) for mix in args.mixes}
    for i, rate in enumerate(args.rate_values):
        for mix in args.mixes:
            before = cpu_seconds(pids)
            results, wall, cpu = replay(f"{url}/v1/completions", bodies[mix], out_lens, rate, args.seed + i,
                                        args.request_timeout, pool, args.client_processes)
            row = summarize("minivllm serve", rate, results, wall, cpu)
            save({**row, "prompts": "ids", "mix": mix, "api_server_count": count,
                  **frontend_load(pids, before, row["num_output_tokens"], wall)})


def run_text(url: str, label: str, model: str, texts, out_lens, route: str, server: str, args, pool) -> dict:
    bodies = text_bodies(model, texts, out_lens, route, server)
    results, wall, cpu = replay(f"{url}/v1/{route}", bodies, out_lens, math.inf, args.seed,
                                args.request_timeout, pool, args.client_processes)
    return {**summarize(label, math.inf, results, wall, cpu), "route": route, "prompts": "text", "mix": "plain"}


def run_transformers(model_dir: Path, texts, out_lens, log_dir: Path, args, device, pool) -> dict:
    """transformers serve on the text requests; an error row if it cannot run here."""
    release_memory(device)
    server = None
    try:
        server = start_transformers(model_dir, log_dir)
        server.wait_healthy(args.start_timeout)
        route = asyncio.run(pick_route(server.url, str(model_dir)))
        return run_text(server.url, "transformers serve", str(model_dir), texts, out_lens, route, "transformers",
                        args, pool)
    except Exception as err:  # noqa: BLE001 - an unavailable baseline is a result, not a crash
        return {"backend": "transformers serve", "rate": "inf", "prompts": "text",
                "num_requests": len(texts), "error": f"{type(err).__name__}: {err}"[:2000]}
    finally:
        if server is not None:
            server.stop()


def summary(results: list[dict]) -> dict:
    """Server over offline output tok/s at "inf" (the last all-at-once wave of the plain mix, which
    is what offline runs; and every such wave, for a run of several), p99 TTFT at 16 req/s (plain),
    each mix over the first mix, wave by wave, failed requests (None where this run did not measure
    one)."""
    offline = next((r for r in results if r["backend"].startswith("offline")), None)
    served = [r for r in results if r["backend"] == "minivllm serve" and r["prompts"] == "ids"]
    plain = [r for r in served if r["mix"] == "plain"]
    at_inf = [r for r in plain if r["rate"] == "inf" and r.get("output_tokens_per_s")]
    at_16 = [r for r in plain if r["rate"] == 16.0 and r.get("ttft_s")]
    ratios = [r["output_tokens_per_s"] / offline["output_tokens_per_s"] for r in at_inf] if offline else []
    return {"ratio_vs_offline": ratios[-1] if ratios else None,
            "ratios_vs_offline": ratios,
            "ttft_p99_at_16_s": at_16[-1]["ttft_s"]["p99"] if at_16 else None,
            "mix_ratios": mix_ratios(served),
            "failed_requests": sum(r.get("failed_requests", 0) for r in served)}


def mix_ratios(served: list[dict]) -> dict:
    """{mix: {rate: [its output tok/s / the first mix's, one per wave]}} for every mix but the
    first: a wave of a mix is paired with the first mix's wave of the same rate and the same turn."""
    mixes = list(dict.fromkeys(r["mix"] for r in served))
    waves = {}  # (mix, rate) -> output tok/s of each wave, in order
    for r in served:
        waves.setdefault((r["mix"], r["rate"]), []).append(r.get("output_tokens_per_s"))
    return {mix: {str(rate): [a / b if a and b else None for a, b in zip(rates, waves.get((mixes[0], rate), []))]
                  for (m, rate), rates in waves.items() if m == mix}
            for mix in mixes[1:]}


def _ms(key: str, q: str):
    return lambda r: 1e3 * r[key][q] if r.get(key) else None


COLUMNS = [
    ("backend", "backend", ""), ("prompts", "prompts", ""), ("mix", "mix", ""), ("rate", "rate", ""),
    ("frontends", "api_server_count", "d"), ("reqs", "num_requests", "d"), ("failed", "failed_requests", "d"),
    ("out tok/s", "output_tokens_per_s", ",.1f"),
    ("TTFT p50 ms", _ms("ttft_s", "p50"), ".0f"), ("TTFT p99 ms", _ms("ttft_s", "p99"), ".0f"),
    ("ITL p50 ms", _ms("itl_s", "p50"), ".1f"), ("TPOT p99 ms", _ms("tpot_s", "p99"), ".1f"),
    ("E2E p99 ms", _ms("e2e_s", "p99"), ".0f"), ("tok/chunk", "tokens_per_text_chunk", ".2f"),
    ("CPU us/token", "frontend_cpu_us_per_token", ".1f"), ("busiest core", "busiest_frontend_core_share", ".2f"),
    ("error", lambda r: (r.get("error") or "")[:120] or None, ""),
]


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:  # the fountain's server (start_minivllm)
        from minivllm.cli import main as serve

        sys.exit(serve(sys.argv[1:]))
    main()
