"""A client that disconnects mid-stream, or while it waits for a plain answer, has its request
aborted and freed at once; SIGTERM stops the server cleanly (exit 0, no traceback, its engine
process gone), ending what is in flight with finish_reason "abort". (Ctrl-C is how the session's
server is stopped: see conftest.py. Letting requests finish within the grace period is tested on
AsyncLLM.drain.)

Each test needs a request still running when the client leaves or the signal lands. They run on
a lockstep server (lockstep_server.py): once the engine has reported tokens, it steps again only
when the server sends it a command. So a request that has streamed its first token cannot finish
on its own, however fast the machine, and the abort lets exactly one more step out: every
aborted request here generated exactly 2 tokens.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.serve.conftest import (MAX_MODEL_LEN, MODEL_NAME, ServerProcess, healthy_server, in_server_group,
                                  metric_values)

ABORTED = 'minivllm:request_success_total{finished_reason="abort"}'
GENERATED = "minivllm:generation_tokens_total"
TOKENS_BEFORE_THE_ABORT = 2  # the first step's token, and the step the abort lets run

pytestmark = in_server_group


@pytest.fixture(scope="module")
def lockstep(serve_model, tmp_path_factory):
    with healthy_server(serve_model, log_dir=tmp_path_factory.mktemp("lockstep"), lockstep=True) as server:
        yield server


def _wait_for(condition, timeout: float = 60.0, every: float = 0.05) -> bool:
    """Poll `condition` (a state of the server) until it holds; the timeout only bounds a hang."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(every)
    return condition()


def _long_body(**extra) -> dict:
    return {"model": MODEL_NAME, "prompt": "Once upon a time", "max_tokens": MAX_MODEL_LEN - 16,
            "temperature": 0, "ignore_eos": True, "stream": True, **extra}


def _aborted_and_freed(url: str, before: dict) -> bool:
    values = metric_values(url)
    return (values["minivllm:num_requests_running"] == 0 and values["minivllm:num_requests_waiting"] == 0
            and values.get(ABORTED, 0) == before.get(ABORTED, 0) + 1)


def test_disconnect_mid_stream_aborts_and_frees_the_request(lockstep):
    before = metric_values(lockstep.url)
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{lockstep.url}/v1/completions", json=_long_body()) as response:
            assert response.status_code == 200
            first = next(line for line in response.iter_lines() if line.startswith("data: {"))
            # Leaving the block closes the connection: the request has streamed its first token
            # and is waiting for the engine's next step.
    assert json.loads(first[6:])["choices"][0]["finish_reason"] is None
    assert _wait_for(lambda: _aborted_and_freed(lockstep.url, before)), metric_values(lockstep.url)
    assert metric_values(lockstep.url)[GENERATED] - before[GENERATED] == TOKENS_BEFORE_THE_ABORT


def test_disconnect_while_waiting_for_a_plain_answer_aborts_it(lockstep):
    before = metric_values(lockstep.url)
    body = json.dumps({**_long_body(), "stream": False}).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{lockstep.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", lockstep.port), timeout=60) as client:
        client.sendall(head + body)
        # A plain answer sends nothing until the end; the server's metrics say when the request
        # has run and reported its first token. Then the client gives up: the socket closes.
        assert _wait_for(lambda: metric_values(lockstep.url)[GENERATED] > before[GENERATED])
    assert _wait_for(lambda: _aborted_and_freed(lockstep.url, before)), metric_values(lockstep.url)
    assert metric_values(lockstep.url)[GENERATED] - before[GENERATED] == TOKENS_BEFORE_THE_ABORT


def test_sigterm_aborts_what_runs_and_exits_cleanly(serve_model, tmp_path):
    process = ServerProcess(serve_model, "--shutdown-timeout", "0", log_dir=tmp_path, lockstep=True)
    events, errors = [], []
    first_chunk = threading.Event()

    def stream() -> None:  # a request still running when the signal comes
        try:
            body = _long_body(stream_options={"include_usage": True})
            with httpx.stream("POST", f"{process.url}/v1/completions", json=body, timeout=60) as response:
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
                        first_chunk.set()
        except httpx.HTTPError as err:
            errors.append(err)
            first_chunk.set()

    client = threading.Thread(target=stream)
    try:
        process.wait_healthy()
        children = _children(process.proc.pid)  # the engine process (and multiprocessing's helper)
        assert children
        client.start()
        assert first_chunk.wait(timeout=60) and not errors, errors
        code = process.stop(signal.SIGTERM, timeout=90)
        client.join(timeout=60)
    finally:
        process.stop(signal.SIGKILL)
    output = process.output()
    assert code == 0, output
    assert "Traceback" not in output and "Shutting down" in output, output
    assert not client.is_alive() and errors == []
    assert events[-1] == "[DONE]"  # the stream ended properly, with its last chunks
    chunks = [json.loads(e) for e in events[:-1]]
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "abort"
    assert chunks[-1]["usage"]["completion_tokens"] == TOKENS_BEFORE_THE_ABORT
    # After the signal the server takes no new connection, and left no process behind.
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{process.url}/health", timeout=2)
    assert _wait_for(lambda: not any(_running(pid) for pid in children)), children


def _children(pid: int) -> list[int]:
    """The processes `pid` started (psutil if installed, else Linux's /proc)."""
    try:
        import psutil
    except ImportError:
        tasks = Path(f"/proc/{pid}/task")
        return [int(c) for t in tasks.iterdir() for c in (t / "children").read_text().split()]
    return [child.pid for child in psutil.Process(pid).children(recursive=True)]


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")  # a zombie still answers kill(0); it runs nothing
    return not (stat.exists() and stat.read_text().rsplit(")", 1)[-1].split()[0] == "Z")
