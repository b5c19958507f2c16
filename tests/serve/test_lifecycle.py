"""A client that disconnects mid-stream frees its request at once; SIGTERM stops the server
cleanly (exit 0, no traceback, its engine process gone), ending what is in flight with
finish_reason "abort". (Ctrl-C is
how the session's server is stopped: see conftest.py. Letting requests finish within the grace
period is tested on AsyncLLM.drain.)"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.serve.conftest import API_KEY, MAX_MODEL_LEN, MODEL_NAME, ServerProcess, in_server_group, metric_values

AUTH = {"Authorization": f"Bearer {API_KEY}"}
ABORTED = 'minivllm:request_success_total{finished_reason="abort"}'

pytestmark = in_server_group


def _wait_for(condition, timeout: float = 30.0, every: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(every)
    return condition()


def _long_stream_body(**extra) -> dict:
    return {"model": MODEL_NAME, "prompt": "Once upon a time", "max_tokens": MAX_MODEL_LEN - 16,
            "temperature": 0, "ignore_eos": True, "stream": True, **extra}


def test_disconnect_mid_stream_aborts_and_frees_the_request(server):
    before = metric_values(server.url).get(ABORTED, 0)
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", f"{server.url}/v1/completions", headers=AUTH, json=_long_stream_body()) as response:
            assert response.status_code == 200
            chunks = 0
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    chunks += 1
                    if chunks == 3:
                        break  # leaving the block closes the connection mid-stream
    assert chunks == 3

    def freed() -> bool:
        values = metric_values(server.url)
        return (values["minivllm:num_requests_running"] == 0 and values["minivllm:num_requests_waiting"] == 0
                and values.get(ABORTED, 0) == before + 1)

    assert _wait_for(freed), metric_values(server.url)


def test_disconnect_while_waiting_for_a_plain_answer_aborts_it(server):
    before = metric_values(server.url).get(ABORTED, 0)
    body = {**_long_stream_body(), "stream": False}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", headers=AUTH, json=body, timeout=0.5)

    def freed() -> bool:
        values = metric_values(server.url)
        return values["minivllm:num_requests_running"] == 0 and values.get(ABORTED, 0) == before + 1

    assert _wait_for(freed), metric_values(server.url)


def test_sigterm_aborts_what_runs_and_exits_cleanly(serve_model, tmp_path):
    process = ServerProcess(serve_model, "--shutdown-timeout", "0", log_dir=tmp_path)
    max_tokens = MAX_MODEL_LEN - 16
    events, errors = [], []

    def stream() -> None:  # a request still running when the signal comes
        try:
            body = _long_stream_body(max_tokens=max_tokens, stream_options={"include_usage": True})
            with httpx.stream("POST", f"{process.url}/v1/completions", json=body, timeout=60) as response:
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
        except httpx.HTTPError as err:
            errors.append(err)

    client = threading.Thread(target=stream)
    try:
        process.wait_healthy()
        children = _children(process.proc.pid)  # the engine process (and multiprocessing's helper)
        assert children
        client.start()
        assert _wait_for(lambda: len(events) >= 2, timeout=60)
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
    assert 0 < chunks[-1]["usage"]["completion_tokens"] < max_tokens
    # After the signal the server takes no new connection, and left no process behind.
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{process.url}/health", timeout=2)
    assert _wait_for(lambda: not any(_running(pid) for pid in children), timeout=10), children


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
