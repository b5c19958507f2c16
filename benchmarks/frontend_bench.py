"""The server's frontend alone: how many streamed tokens/s its processes keep up with.

`serve_bench.py` measures the whole server against offline generation; when the ratio falls
short, this says whether the frontend (HTTP, JSON, server-sent events; `--api-server-count`
processes of it) is what limits. The engine process is replaced by a *token fountain*: a stand-in
for `LLMEngine`, behind the real engine loop and pipes, that gives every running request one token
per step, after `--step-ms` of sleep (the GPU's time), so the frontend's work is the same as
with a model while the engine costs nearly nothing. Everything else is the real server, started
as `python -m minivllm serve` would be, and the requests come over HTTP from client processes
(serve_bench.py's client).

Per `--api-server-count` value, one wave of `--num-requests` streaming requests sent at once:

* output tokens/s over the wave, and tokens per text chunk (above 1: the frontend fell behind and
  merged deltas);
* frontend CPU: seconds of all frontend processes (user + system, from /proc through psutil),
  microseconds per streamed token, and the busiest one's share of a core over the wave (near 1:
  saturated). These are the capacity: on a machine with a core per process, N frontends keep up
  with N times the tokens/s of one for the same CPU per token.

    python benchmarks/frontend_bench.py                               # 256 x 512 tokens, N = 1, 2, 4
    python benchmarks/frontend_bench.py --api-server-counts 1,2 --num-requests 64 --step-ms 20

CPU timings of a shared machine are no result; the CPU per token is the steadier figure there.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `minivllm` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

FOUNTAIN_ENV = "MINIVLLM_TOKEN_FOUNTAIN_STEP_MS"  # set on the server process: its engine is a fountain
WORDS = [" the", " cat", " sat", " on", " a", " mat", ",", " and"]


class TokenFountain:
    """Stands in for `LLMEngine` in the engine process: every running request (up to
    max_num_seqs) gets one token a step, a word of text, until its max_tokens."""

    def __init__(self, config):
        self.config = config
        self.step_s = float(os.environ[FOUNTAIN_ENV]) / 1e3
        self.max_num_seqs = config.scheduler_config.max_num_seqs
        self.requests: dict[str, list] = {}  # id -> [prompt ids, max_tokens, generated, arrival]
        self.scheduler = SimpleNamespace(running=[], waiting=[], speculation=None)
        self.block_manager = SimpleNamespace(num_used_blocks=0, num_blocks=1)
        self.executor = SimpleNamespace(runner=SimpleNamespace(device="cpu", num_kv_blocks=1))

    def add_request(self, prompt, params, request_id, stream=True) -> None:
        self.requests[request_id] = [list(prompt), params.max_tokens, 0, time.perf_counter()]

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
            outputs.append(self._output(request_id, request, [request[2]], "length" if done else None))
            if done:
                del self.requests[request_id]
        self.scheduler.running = [None] * min(len(self.requests), self.max_num_seqs)
        return outputs

    def _output(self, request_id, request, token_ids, finish_reason):
        from minivllm.outputs import CompletionOutput, RequestMetrics, RequestOutput

        prompt, _, generated, arrival = request
        metrics = RequestMetrics(arrival, arrival, arrival, None, len(prompt), generated, 0, 0, 0.0, None, None, None)
        text = "".join(WORDS[t % len(WORDS)] for t in token_ids)
        return RequestOutput(request_id, None, prompt, [CompletionOutput(0, text, token_ids, finish_reason)],
                             finish_reason is not None, metrics)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def take_failed_outputs(self) -> list:
        return []

    def get_stats(self) -> dict:
        return {}

    def close(self) -> None:
        pass


if os.environ.get(FOUNTAIN_ENV):  # the server and its spawned processes (they import this as __mp_main__)
    from minivllm.entrypoints import engine_core

    engine_core.LLMEngine = TokenFountain


# ------------------------------------------------------------------------------------------
# The benchmark
# ------------------------------------------------------------------------------------------
def frontend_pids(server_pid: int) -> list[int]:
    """The processes that listen for HTTP: the server itself (one frontend), or its frontend
    children (several); the engine process and multiprocessing's helper are left out."""
    import psutil

    children = psutil.Process(server_pid).children()
    frontends = [c.pid for c in children if any(conn.status == psutil.CONN_LISTEN for conn in _connections(c))]
    return frontends or [server_pid]


def _connections(process):
    import psutil

    try:
        return process.net_connections(kind="tcp")
    except psutil.Error:
        return []


def cpu_seconds(pids: list[int]) -> dict[int, float]:
    import psutil

    return {pid: sum(psutil.Process(pid).cpu_times()[:2]) for pid in pids}


def run_count(args, count: int, model_dir: Path, log_dir: Path, pool) -> dict:
    """One server with `count` frontends, one wave of requests; its row."""
    from benchmarks.serve_bench import ServerProcess, free_port, replay

    port = free_port()
    command = [sys.executable, str(Path(__file__).resolve()), "serve", "--model", str(model_dir),
               "--port", str(port), "--api-server-count", str(count), "--max-num-seqs", str(args.num_requests),
               "--log-level", "warning", "--device", "cpu"]
    server = ServerProcess(f"fountain x{count}", command, port, log_dir / f"fountain_{count}.log",
                           env={FOUNTAIN_ENV: str(args.step_ms)})
    try:
        server.wait_healthy(args.start_timeout)
        url = f"{server.url}/v1/completions"
        body = {"prompt": [1, 2, 3, 4], "max_tokens": args.max_tokens, "stream": True, "ignore_eos": True,
                "stream_options": {"include_usage": True}}
        replay(url, [dict(body, max_tokens=4)] * 8, [4] * 8, math.inf, 0, 600)  # warm-up, untimed
        pids = frontend_pids(server.proc.pid)
        before = cpu_seconds(pids)
        results, wall, _ = replay(url, [body] * args.num_requests, [args.max_tokens] * args.num_requests,
                                  math.inf, 0, 600, pool, args.client_processes)
        after = cpu_seconds(pids)
    finally:
        exit_code = server.stop()
    tokens = sum(r.output_tokens or 0 for r in results if r.error is None)
    chunks = sum(len(r.chunk_times) for r in results if r.error is None)
    busy = {pid: after[pid] - before[pid] for pid in pids}
    return {"api_server_count": count, "frontend_processes": len(pids), "num_requests": len(results),
            "failed_requests": sum(r.error is not None for r in results), "output_tokens": tokens,
            "duration_s": wall, "output_tokens_per_s": tokens / wall if wall else None,
            "tokens_per_text_chunk": tokens / chunks if chunks else None,
            "frontend_cpu_s": sum(busy.values()),
            "frontend_cpu_us_per_token": 1e6 * sum(busy.values()) / tokens if tokens else None,
            "busiest_frontend_core_share": max(busy.values()) / wall if wall else None,
            "server_exit_code": exit_code}


COLUMNS = [("frontends", "api_server_count", "d"), ("reqs", "num_requests", "d"), ("failed", "failed_requests", "d"),
           ("out tok/s", "output_tokens_per_s", ",.0f"), ("tok/chunk", "tokens_per_text_chunk", ".2f"),
           ("frontend CPU s", "frontend_cpu_s", ".2f"), ("CPU us/token", "frontend_cpu_us_per_token", ".1f"),
           ("busiest core share", "busiest_frontend_core_share", ".2f")]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--api-server-counts", default="1,2,4", help="comma list of frontend process counts")
    p.add_argument("--num-requests", type=int, default=256, help="streaming requests sent at once")
    p.add_argument("--max-tokens", type=int, default=512, help="tokens per request")
    p.add_argument("--step-ms", type=float, default=8.0,
                   help="the fountain's time per step (a GPU decode step of the whole batch)")
    p.add_argument("--client-processes", type=int, default=None,
                   help="processes sending the requests (default: half the cores, at most 8)")
    p.add_argument("--start-timeout", type=float, default=300.0)
    p.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/...)")
    args = p.parse_args(argv)
    try:
        args.counts = [int(c) for c in args.api_server_counts.split(",")]
    except ValueError:
        p.error(f"--api-server-counts: integers, got {args.api_server_counts}")
    if not args.counts or min(args.counts) < 1:
        p.error(f"--api-server-counts must be >= 1, got {args.api_server_counts}")
    if args.num_requests < 1 or args.max_tokens < 1 or args.step_ms < 0:
        p.error("--num-requests and --max-tokens must be >= 1, --step-ms >= 0")
    if args.client_processes is None:
        args.client_processes = max(1, min(8, (os.cpu_count() or 2) // 2))
    return args


def main(argv=None) -> dict:
    import tempfile

    import torch

    from benchmarks.common import default_out, format_table, new_record, write_json
    from benchmarks.serve_bench import client_pool
    from minivllm.models import make_random_model

    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # names the machine in the record
    out = args.out or default_out("frontend_bench", "fountain", device)
    record = new_record("frontend_bench", device, args)
    record["note"] = ("The engine is a token fountain (no model): frontend figures of this machine's CPU. "
                      + (record["note"] or ""))
    work = Path(tempfile.mkdtemp(prefix="frontend-bench-"))
    model_dir = make_random_model(work / "tiny", arch="qwen2", size="tiny", seed=0)  # its tokenizer and config
    model_dir = _long_context(model_dir, args.max_tokens + 16)
    pool = client_pool(args.client_processes)
    try:
        for count in args.counts:
            record["results"].append(run_count(args, count, model_dir, work, pool))
            print(format_table(record["results"][-1:], COLUMNS).splitlines()[-1], flush=True)
            write_json(out, record)
    finally:
        if pool is not None:
            pool.shutdown()
    first = record["results"][0]
    for row in record["results"]:
        row["tokens_per_s_vs_first"] = row["output_tokens_per_s"] / first["output_tokens_per_s"]
    write_json(out, record)
    print(f"\nwrote {out}\n{format_table(record['results'], COLUMNS)}")
    return record


def _long_context(model_dir: Path, length: int) -> Path:
    """The tiny model's config with a context of at least `length` (the fountain runs no model)."""
    import json

    config_path = model_dir / "config.json"
    config = json.loads(config_path.read_text())
    config["max_position_embeddings"] = max(config["max_position_embeddings"], length)
    config_path.write_text(json.dumps(config))
    return model_dir


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "serve":  # the server this benchmark starts
        from minivllm.cli import main as cli_main

        sys.exit(cli_main(sys.argv[1:]))
    main()
