"""Several frontend processes in front of one engine process (`serve --api-server-count 2`).

The engine's loop with two frontends (in a thread, driven through its pipes): each frontend gets
the outputs of its own requests only, cannot abort another's, and one that leaves has its
requests aborted. Then real servers: concurrent requests over fresh connections, spread by the
kernel over both frontends, are each answered once and equal offline `LLM.generate`; /metrics
says the same through either frontend; streams held open on both frontends (a lockstep server,
lockstep_server.py) are aborted in the engine when their clients leave; SIGTERM ends what is in
flight properly and leaves no process behind. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import os
import signal
import subprocess
import threading
import time
import types

import httpx
import psutil
import pytest

from minivllm import SamplingParams
from minivllm.entrypoints.engine_core import EngineCore, serve
from minivllm.entrypoints.frontends import Frontends
from tests.serve.conftest import (MODEL_NAME, START_TIMEOUT_S, EnginePipes, ServerProcess, healthy_server,
                                  in_server_group, make_engine, metric_values)
from tests.serve.test_lifecycle import ABORTED, GENERATED, _children, _long_body, _running, _wait_for

pytestmark = in_server_group

PROMPTS = ["Once upon a time", "The cache is cut into small blocks", "Keys and values", "A small fox"]
SUCCEEDED = 'minivllm:request_success_total{finished_reason="length"}'
NUM_REQUESTS = 16  # over fresh connections: all on one of two frontends has odds 2 / 2**16


# ----------------------------------------------------------------------------------------------
# The engine's loop with two frontends, in a thread
# ----------------------------------------------------------------------------------------------
def test_the_engine_loop_routes_each_frontends_requests_to_it_alone(serve_model, offline_llm):
    engine = make_engine(serve_model, max_num_seqs=8)
    a, b = EnginePipes(), EnginePipes()
    control_in, control = multiprocessing.Pipe(duplex=False)
    _, parent_results = multiprocessing.Pipe(duplex=False)
    frontends = [(a.engine_commands, a.engine_results), (b.engine_commands, b.engine_results)]
    loop_thread = threading.Thread(target=serve, args=(EngineCore(engine), control_in, parent_results, frontends),
                                   daemon=True)
    loop_thread.start()
    short = SamplingParams(max_tokens=6, temperature=0)
    long = SamplingParams(max_tokens=200, ignore_eos=True, temperature=0)
    a.commands.send((0, "add", (PROMPTS[0], long, "a-long")))
    a.commands.send((1, "add", (PROMPTS[1], short, "a-short")))
    b.commands.send((0, "add", (PROMPTS[2], short, "b-short")))
    a.read_until(lambda: a.outputs.get("a-long"))
    b.commands.send((1, "abort", ("a-long",)))  # not B's request: refused, it runs on
    b.read_until(lambda: 1 in b.replies and b.finished("b-short"))
    a.read_until(lambda: a.finished("a-short"))

    assert b.replies[1] == (None, None) and not a.finished("a-long")
    assert set(a.outputs) == {"a-long", "a-short"} and set(b.outputs) == {"b-short"}
    want = offline_llm.generate(PROMPTS[1:3], short, use_tqdm=False)
    for pipes, request_id, expected in ((a, "a-short", want[0]), (b, "b-short", want[1])):
        assert [t for out in pipes.outputs[request_id] for t in out.token_ids] == expected.token_ids
    # A leaves with its long request running: the engine aborts it; when B leaves too, the loop ends.
    a.commands.close()
    b.commands.close()
    loop_thread.join(timeout=60)
    assert not loop_thread.is_alive() and not engine.has_unfinished_requests()
    assert engine.block_manager.num_used_blocks == 0
    control.close()


# ----------------------------------------------------------------------------------------------
# Real servers with two frontends
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_frontends(serve_model, tmp_path_factory):
    with healthy_server(serve_model, "--api-server-count", "2", log_dir=tmp_path_factory.mktemp("frontends")) as server:
        yield server


async def _one_request(url: str, prompt: str, stream: bool) -> tuple[str, str, int]:
    """(text, finish reason, [DONE] events) of one request, on a connection of its own."""
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": 8, "temperature": 0, "stream": stream}
    async with httpx.AsyncClient(timeout=60) as http:
        if not stream:
            choice = (await http.post(f"{url}/v1/completions", json=body)).json()["choices"][0]
            return choice["text"], choice["finish_reason"], 0
        text, reason, done = "", None, 0
        async with http.stream("POST", f"{url}/v1/completions", json=body) as response:
            async for line in response.aiter_lines():
                if line == "data: [DONE]":
                    done += 1
                elif line.startswith("data: "):
                    choice = json.loads(line[6:])["choices"][0]
                    text += choice["text"]
                    reason = choice["finish_reason"] or reason
        return text, reason, done


def test_concurrent_requests_are_each_answered_once_and_equal_offline(two_frontends, offline_llm):
    before = metric_values(two_frontends.url)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(NUM_REQUESTS)]

    async def send_all():
        return await asyncio.gather(*(_one_request(two_frontends.url, p, stream=i % 2 == 0)
                                      for i, p in enumerate(prompts)))

    answers = asyncio.run(asyncio.wait_for(send_all(), 120))
    expected = offline_llm.generate(prompts, max_tokens=8, temperature=0, use_tqdm=False)
    for i, ((text, reason, done), want) in enumerate(zip(answers, expected)):
        assert (text, reason) == (want.text, want.finish_reason)
        assert done == (1 if i % 2 == 0 else 0)  # each stream ended once, with [DONE]
    # Every scrape (each on a fresh connection, so through either frontend) counts all of them.
    tokens = sum(len(want.token_ids) for want in expected)
    for _ in range(6):
        after = metric_values(two_frontends.url)
        assert after[SUCCEEDED] - before.get(SUCCEEDED, 0) == NUM_REQUESTS
        assert after[GENERATED] - before[GENERATED] == tokens
        assert after["minivllm:num_requests_running"] == 0


def _frontend_connections(server: ServerProcess) -> list[int]:
    """Established connections to the server's port, per frontend (the processes listening on it)."""
    counts = []
    for pid in _children(server.proc.pid):
        try:
            connections = psutil.Process(pid).net_connections(kind="tcp")
        except psutil.NoSuchProcess:
            continue
        mine = [c for c in connections if c.laddr and c.laddr.port == server.port]
        if any(c.status == psutil.CONN_LISTEN for c in mine):
            counts.append(sum(c.status == psutil.CONN_ESTABLISHED for c in mine))
    return counts


def test_streams_on_both_frontends_are_aborted_in_the_engine_when_clients_leave(serve_model, tmp_path):
    with healthy_server(serve_model, "--api-server-count", "2", log_dir=tmp_path, lockstep=True) as server:
        before = metric_values(server.url)
        clients = [httpx.Client(timeout=60) for _ in range(NUM_REQUESTS)]
        streams = [c.stream("POST", f"{server.url}/v1/completions", json=_long_body()) for c in clients]
        lines = [stream.__enter__().iter_lines() for stream in streams]
        for stream_lines in lines:  # each has streamed its first token, and is held there by the engine
            assert next(line for line in stream_lines if line.startswith("data: {"))
        connections = _frontend_connections(server)
        for stream, client in zip(streams, clients):  # the clients leave
            stream.__exit__(None, None, None)
            client.close()
        assert len(connections) == 2 and all(connections), connections  # both frontends served some

        def all_aborted() -> bool:
            values = metric_values(server.url)
            return (values.get(ABORTED, 0) - before.get(ABORTED, 0) == NUM_REQUESTS
                    and values["minivllm:num_requests_running"] == 0 and values["minivllm:kv_cache_usage_perc"] == 0)

        assert _wait_for(all_aborted), metric_values(server.url)


def test_sigterm_ends_the_streams_in_flight_and_leaves_no_process(serve_model, tmp_path):
    server = ServerProcess(serve_model, "--api-server-count", "2", "--shutdown-timeout", "0", log_dir=tmp_path,
                           lockstep=True)
    events, first_chunk = [], threading.Event()

    def stream() -> None:  # a request still running when the signal comes
        with httpx.stream("POST", f"{server.url}/v1/completions", json=_long_body(), timeout=60) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    first_chunk.set()

    client = threading.Thread(target=stream)
    try:
        server.wait_healthy()
        children = _children(server.proc.pid)  # the engine, the frontends, multiprocessing's helper
        assert len(children) >= 3
        client.start()
        assert first_chunk.wait(timeout=60)
        code = server.stop(signal.SIGTERM, timeout=90)
        client.join(timeout=60)
    finally:
        server.stop(signal.SIGKILL)
    output = server.output()
    assert code == 0 and "Traceback" not in output, output
    # A frontend stopped as a single server does. (Its log lines, not their count: the frontends
    # share one log file, and their lines can overwrite each other; every process leaving is
    # checked below.)
    assert "Shutting down" in output
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all("choices" in chunk for chunk in chunks), chunks  # no error event: the request was aborted
    reasons = [c["finish_reason"] for chunk in chunks for c in chunk["choices"]]
    assert reasons[-1] == "abort" and reasons.count("abort") == 1
    assert _wait_for(lambda: not any(_running(pid) for pid in children)), children
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{server.url}/health", timeout=2)


@pytest.mark.parametrize("count", [1, 2])
def test_a_signal_just_before_uvicorn_serves_still_stops_the_server(serve_model, tmp_path, count):
    """SIGTERM that lands after the frontend has set its handlers and before uvicorn has set its
    own (late_signal_server.py) is not lost: the frontend starts, shuts down, and exits 0."""
    server = ServerProcess(serve_model, "--api-server-count", str(count), log_dir=tmp_path,
                           script="late_signal_server.py")
    try:
        code = server.proc.wait(timeout=START_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        code = None
    finally:
        server.stop(signal.SIGKILL)
    output = server.output()
    assert code == 0 and "Traceback" not in output, output


def test_a_frontend_that_the_stop_kills_while_it_starts_counts_as_stopped():
    """The launcher's SIGTERM can reach a frontend before it has handlers (still importing): it
    dies of it, having served nothing, and the server's exit status is still 0."""
    ctx = multiprocessing.get_context("spawn")
    frontends = Frontends()
    frontends.start(lambda: _started(ctx.Process(target=int)))  # leaves at once: the others are stopped
    frontends.start(lambda: _started(ctx.Process(target=time.sleep, args=(60,))))  # default handlers: dies
    codes = frontends.wait()
    assert codes == [0, 0]
    assert frontends.processes[1].exitcode == -signal.SIGTERM


def _started(process) -> types.SimpleNamespace:
    process.start()
    return types.SimpleNamespace(process=process)


def test_a_killed_launcher_leaves_no_process(serve_model, tmp_path):
    """SIGKILL gives the launcher no chance to stop anything: each frontend sees its pipe to the
    launcher close and stops as on SIGTERM, and the engine process leaves with the last one."""
    server = ServerProcess(serve_model, "--api-server-count", "2", "--shutdown-timeout", "0", log_dir=tmp_path)
    children = []
    try:
        server.wait_healthy()  # (one frontend answering is enough for that: wait for both)
        assert _wait_for(lambda: server.output().count("Application startup complete.") == 2), server.output()
        children = _children(server.proc.pid)  # the engine, the frontends, multiprocessing's helper
        assert len(children) >= 3
        server.stop(signal.SIGKILL)
        assert _wait_for(lambda: not any(_running(pid) for pid in children)), _described(children)
    finally:
        server.stop(signal.SIGKILL)
        for pid in children:  # (only if the test failed: nothing may outlive it)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_bad_counts_are_refused():
    from minivllm.cli import main

    for count in ("0", "-1", "two"):
        with pytest.raises(SystemExit):
            main(["serve", "--model", "unused", "--api-server-count", count])


def _described(pids: list[int]) -> list[str]:
    """The processes of `pids` still running, each with its command line (which one hung)."""
    described = []
    for pid in filter(_running, pids):
        with contextlib.suppress(psutil.Error):
            described.append(f"{pid}: {' '.join(psutil.Process(pid).cmdline())[:200]}")
    return described
