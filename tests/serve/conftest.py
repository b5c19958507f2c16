"""Fixtures for the server tests: a tiny model, and a real `python -m minivllm serve` process.

The server is started once per test session on a free loopback port, with an API key, and
stopped at the end with SIGINT (Ctrl-C), which must exit 0 with no traceback in its log whatever
the tests did to it. The modules that use it share one xdist group (`pytestmark` there, and
`--dist loadgroup` in pyproject.toml), so `-n 2` still starts one server, not one per worker.
Tests talk to it with the official `openai` client, exactly as a user would. Every wait is
bounded; every request targets 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

API_KEY = "test-key"
MODEL_NAME = "tiny-qwen2"
MAX_MODEL_LEN = 256
MAX_NUM_SEQS = 32
START_TIMEOUT_S = 120
in_server_group = pytest.mark.xdist_group("server")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def serve_model(tmp_path_factory) -> Path:
    """A tiny random-weight qwen2 directory with a tokenizer and its chat template."""
    from minivllm.models import make_random_model

    return make_random_model(tmp_path_factory.mktemp("serve-model"), arch="qwen2", size="tiny", seed=0)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A `python -m minivllm serve` child process and its address. lockstep: an engine that, once
    it has reported tokens, steps again only when the server sends it a command (lockstep_server.py).
    script: another launcher in this directory, run in place of `-m minivllm`."""

    def __init__(self, model: Path, *extra: str, log_dir: Path, lockstep: bool = False, script: str | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log_dir / f"server-{self.port}.log"
        script = "lockstep_server.py" if lockstep else script
        launcher = [str(Path(__file__).with_name(script))] if script else ["-m", "minivllm"]
        args = [sys.executable, *launcher, "serve", "--model", str(model), "--port", str(self.port),
                "--served-model-name", MODEL_NAME, "--attention-backend", "torch", "--kv-cache-memory-bytes", "8MiB",
                "--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", str(MAX_NUM_SEQS), *extra]
        # Its temporary files (the metrics directory) under the test's own directory: a test
        # that SIGKILLs the launcher leaves them behind, and pytest cleans that up.
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TMPDIR": str(log_dir)}
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)

    def output(self) -> str:
        return self.log.read_text()

    def wait_healthy(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"the server was not healthy after {START_TIMEOUT_S} s:\n{self.output()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode


@contextlib.contextmanager
def healthy_server(model, *extra: str, log_dir: Path, lockstep: bool = False):
    """A server, healthy, for the `with` block. Afterwards Ctrl-C must stop it cleanly, and
    whatever the block did to it (bad requests, disconnects), it must have logged no traceback."""
    process = ServerProcess(model, *extra, log_dir=log_dir, lockstep=lockstep)
    try:
        process.wait_healthy()
        yield process
    finally:
        code = process.stop(signal.SIGINT)
    assert code == 0 and "Traceback" not in process.output(), process.output()


@pytest.fixture(scope="session")
def server(serve_model, tmp_path_factory):
    """One server for the whole session, with the API key set."""
    with healthy_server(serve_model, "--api-key", API_KEY, log_dir=tmp_path_factory.mktemp("logs")) as process:
        yield process


@pytest.fixture
def client(server):
    import openai

    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture
def async_client(server):
    import openai

    return openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="session")
def offline_llm(serve_model):
    """The offline LLM on the same directory: the oracle of the server's greedy outputs."""
    from minivllm import LLM

    return LLM(str(serve_model), attention_backend="torch", kv_cache_memory_bytes=8 << 20,
               max_model_len=MAX_MODEL_LEN)


def make_engine(model, **overrides):
    """An LLMEngine on `model` with the test settings (reference attention, small KV pool)."""
    from minivllm.config import EngineConfig
    from minivllm.engine.llm_engine import LLMEngine

    return LLMEngine(EngineConfig.from_dict({"model": str(model), "attention_backend": "torch",
                                             "kv_cache_memory_bytes": 8 << 20, "max_model_len": MAX_MODEL_LEN,
                                             **overrides}))


def fail_when_set(engine, monkeypatch) -> threading.Event:
    """Patch the engine's executor so that its next step raises "injected failure" each time the
    returned event is set (it clears it); the other steps run as they would."""
    execute, fail = engine.executor.execute, threading.Event()

    def flaky_execute(*args, **kwargs):
        if fail.is_set():
            fail.clear()
            raise RuntimeError("injected failure")
        return execute(*args, **kwargs)

    monkeypatch.setattr(engine.executor, "execute", flaky_execute)
    return fail


class EnginePipes:
    """A frontend's side of the engine loop's pipes (`engine_core.serve`, run by a test in a
    thread; the loop takes `engine_commands` and `engine_results`): send calls, and read its
    messages into replies by call id, outputs by request, and step errors."""

    def __init__(self):
        from minivllm.entrypoints.engine_core import OutputDecoder

        self.engine_commands, self.commands = multiprocessing.Pipe(duplex=False)
        self.results, self.engine_results = multiprocessing.Pipe(duplex=False)
        self.decoder, self.replies, self.outputs, self.errors = OutputDecoder(), {}, {}, []

    def send(self, call_id: int | None, method: str, *args) -> None:
        self.commands.send((call_id, method, args))

    def read_until(self, condition, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.results.poll(max(0.0, deadline - time.monotonic())), "no message from the engine loop"
            replies, wire, error, failed, _ = self.results.recv()
            self.replies.update({call_id: (err, value) for call_id, err, value in replies})
            for out in map(self.decoder.decode, wire + failed):
                self.outputs.setdefault(out.request_id, []).append(out)
            if error is not None:
                self.errors.append((error, [f[0] for f in failed]))

    def finished(self, request_id: str) -> bool:
        return bool(self.outputs.get(request_id)) and self.outputs[request_id][-1].finished


@pytest.fixture(scope="session")
def engine(serve_model):
    """An engine for in-process tests (AsyncLLM, the app without a socket); each test builds its
    own AsyncLLM on it."""
    return make_engine(serve_model, max_num_seqs=8)


def metric_values(url: str) -> dict[str, float]:
    """GET /metrics as {sample name{labels}: value}."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=10).text
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return values
