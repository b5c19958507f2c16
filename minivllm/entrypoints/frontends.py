"""How `serve` runs (`run_server`): one frontend process, or several in front of one engine
process (`serve --api-server-count N`).

    this process (the launcher)          N frontend processes                the engine process
    ───────────────────────────          ──────────────────────              ──────────────────
    reserves the port                    each listens on it (SO_REUSEPORT)   engine_core.serve():
    starts the engine ──────────────────────────────────────────────────────> requests from every
    starts the frontends ─ a channel ──> AsyncLLM ── commands / outputs ═════> frontend, each output
    forwards SIGTERM, waits               (EngineCoreClient.attach)             to the one that added it

**Why.** A frontend parses HTTP, validates bodies, and writes a JSON chunk and a socket write per
streamed delta, all on one event loop under one GIL. On an H200 one such process streamed about
20,000 tokens/s, close to the engine's own rate with 256 requests at once, so the ratio to
offline throughput wandered with how busy it was (benchmarks/RESULTS.md). The work of one
request never needs another's, so it spreads over processes: the engine stays one process (one
batch, one KV cache), and N frontends share the HTTP work.

**One port.** Every frontend listens on the same address with SO_REUSEPORT, and the kernel
deals each new connection to one of them by a hash of its addresses, so they get even shares
(one socket shared by all would go to whichever woke first: a burst of connections can land on
one process). A connection, and every request on it, stays where it landed; nothing is routed
between frontends. The launcher binds the address too (without listening, so it gets no
connection) before the model loads, so a taken port fails at once, and holds it for the whole
run.

**One engine.** Each frontend has its own pair of pipes to the engine process. The engine notes
which frontend added a request, sends each step's outputs to their own frontends, its state
(running, waiting, KV usage) to all, and lets only a request's frontend abort it
(engine_core.py).

**/metrics** answers the same, whichever frontend serves it: the engine's state as every
frontend last heard it, and the counters and histograms of all frontends summed. They are kept
by `prometheus_client` in its multiprocess mode: each frontend writes its own in a directory
the launcher makes (PROMETHEUS_MULTIPROC_DIR) and removes at exit, and a scrape reads them all.

**Stopping.** SIGTERM or Ctrl-C reaches the launcher; it sends SIGTERM to every frontend, and
each one stops as a single server does: no new connection, the requests in flight drained for
up to `--shutdown-timeout`, then aborted, every stream properly ended. A frontend that has
stopped closes its pipes; when the last one has, the engine process leaves by itself, and the
launcher waits for it (killing it after STOP_TIMEOUT_S). If a frontend dies on its own, the
engine aborts its requests, and the launcher stops the others: a server that lost part of its
frontend stops whole (for its supervisor to restart) rather than serve on half-staffed. No
process outlives the launcher, even a killed one: each frontend watches a pipe to it and stops
as on SIGTERM when it closes, and the engine process leaves with the last frontend.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import tempfile
import threading
from multiprocessing import connection

from minivllm.config import EngineConfig
from minivllm.distributed.process import ChildProcess, one_way_pipe, stop_children
from minivllm.entrypoints.api_server import listening_socket, serve_app, serve_one, start_engine
from minivllm.entrypoints.async_llm import AsyncLLM
from minivllm.entrypoints.engine_core import (
    PIPE_BYTES,
    SHUTDOWN,
    STOP_TIMEOUT_S,
    EngineChannel,
    EngineCoreClient,
    start_engine_process,
)
from minivllm.entrypoints.metrics import SHARED_DIR_ENV


def run_server(model: str, engine_kwargs: dict | None = None, model_name: str | None = None,
               host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
               shutdown_timeout: float = 5.0, log_level: str = "info", api_server_count: int = 1) -> int:
    """Start the engine process and load `model`, then serve it until SIGTERM or Ctrl-C; returns
    the exit status (0 after a clean shutdown, also when stopped while the model was loading).
    The port is bound first: if it is taken, an OSError says so before anything loads.

    api_server_count: frontend processes (HTTP, JSON, streaming) in front of the one engine
        process; with more than one, this process only starts and stops them (frontends.py).
    """
    engine_config = EngineConfig.from_dict({"model": model, **(engine_kwargs or {})})  # checked before any process
    if isinstance(api_server_count, bool) or not isinstance(api_server_count, int) or api_server_count < 1:
        raise ValueError(f"api_server_count must be an integer >= 1, got {api_server_count!r}")
    if api_server_count > 1:
        return run_frontends(engine_config, api_server_count, model_name or model, host, port, api_key,
                             shutdown_timeout, log_level)
    with listening_socket(host, port) as listener:  # a taken port fails now, not after the model loads
        return serve_one(listener, engine_config, model_name or model, api_key, shutdown_timeout, log_level)


def run_frontends(engine_config: EngineConfig, count: int, model_name: str, host: str, port: int,
                  api_key: str | None, shutdown_timeout: float, log_level: str) -> int:
    """Bind the port, start the engine process and `count` frontends, serve until SIGTERM or
    Ctrl-C, stop them all; returns the exit status (0 after a clean shutdown)."""
    # A taken port fails now, before the model loads. Bound, not listening: no connection comes here.
    with listening_socket(host, port, reuse_port=True):
        return _serve(engine_config, count, model_name, host, port, api_key, shutdown_timeout, log_level)


def _serve(engine_config: EngineConfig, count: int, model_name: str, host: str, port: int, api_key: str | None,
           shutdown_timeout: float, log_level: str) -> int:
    """run_frontends, with the port held."""
    pipes = [(one_way_pipe(PIPE_BYTES), one_way_pipe(PIPE_BYTES)) for _ in range(count)]
    engine_ends = [(commands[0], results[1]) for commands, results in pipes]
    frontend_ends = [(commands[1], results[0]) for commands, results in pipes]
    started, status = start_engine(lambda: start_engine_process(engine_config, engine_ends))
    _close(*(end for pair in engine_ends for end in pair))  # the engine holds the only copies now
    if status is not None:
        return status
    engine, info = started
    metrics_dir = tempfile.mkdtemp(prefix="minivllm-metrics-")
    frontends = Frontends()
    for sig in (signal.SIGINT, signal.SIGTERM):  # from now on a signal stops the frontends
        signal.signal(sig, lambda signum, frame: frontends.stop())
    try:
        _start_frontends(frontends, (host, port), frontend_ends, info, engine_config, model_name, api_key,
                         shutdown_timeout, log_level, metrics_dir)
        _close(*(end for pair in frontend_ends for end in pair))
        codes = frontends.wait()
    finally:
        frontends.stop()  # (if starting them failed; else all have exited, and this does nothing)
        frontends.wait()
        stop_children([engine], SHUTDOWN, STOP_TIMEOUT_S)  # it has left by itself once the frontends did
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0 if all(code == 0 for code in codes) else 1


def _start_frontends(frontends: Frontends, address: tuple[str, int], ends, info, engine_config, model_name, api_key,
                     shutdown_timeout, log_level, metrics_dir) -> None:
    with _environment(SHARED_DIR_ENV, metrics_dir):  # read by prometheus_client when a frontend imports it
        for i, (commands, results) in enumerate(ends):
            args = (address, EngineChannel(commands, results, info), engine_config, model_name, api_key,
                    shutdown_timeout, log_level)
            # Not a daemon: a frontend drains its streams before it exits, whoever stops first.
            frontends.start(lambda args=args, i=i: ChildProcess(run_frontend, args, f"minivllm-api-server-{i}",
                                                                daemon=False))


class Frontends:
    """The frontend processes, and stopping them: SIGTERM to each, once. (A second one could
    land after its uvicorn has finished, when the interpreter has put the default handlers back
    for its exit, and kill it.)"""

    def __init__(self):
        self.processes: list = []
        self.stopping = False
        self._signalled: set[int] = set()
        self._children: list[ChildProcess] = []  # their pipes: closed when this process dies

    def start(self, make_child) -> None:
        """Start a frontend (`make_child()` gives its ChildProcess), unless a signal has come meanwhile."""
        if self.stopping:
            return
        child = make_child()
        self._children.append(child)
        self.processes.append(child.process)
        if self.stopping:  # the signal came while it started
            self.stop()

    def stop(self) -> None:
        """Each drains and stops as a single server does."""
        self.stopping = True
        for process in self.processes:
            if process.pid not in self._signalled and process.exitcode is None:
                self._signalled.add(process.pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGTERM)

    def wait(self) -> list[int | None]:
        """Until every frontend has exited (one that leaves on its own stops the others); their
        exit codes. One that our SIGTERM killed counts as stopped cleanly (0): it came while the
        process was still starting, before it had handlers, and so before it had served anything."""
        running = list(self.processes)
        while running:
            connection.wait([p.sentinel for p in running])
            for process in [p for p in running if not p.is_alive()]:
                process.join()
                running.remove(process)
                self.stop()
        return [0 if p.exitcode == -signal.SIGTERM and p.pid in self._signalled else p.exitcode
                for p in self.processes]


def run_frontend(address: tuple[str, int], channel: EngineChannel, engine_config: EngineConfig, model_name: str,
                 api_key: str | None, shutdown_timeout: float, log_level: str, launcher) -> None:
    """(a frontend process) Serve HTTP on `address`, beside the other frontends, with the engine
    behind `channel`; stop as on SIGTERM if the launcher dies (its end of `launcher` closes)."""
    for sig in (signal.SIGINT, signal.SIGTERM):  # until uvicorn handles them: stop before serving
        signal.signal(sig, _interrupt)
    threading.Thread(target=_stop_with, args=(launcher,), daemon=True, name="launcher-watch").start()
    try:
        listener = listening_socket(*address, reuse_port=True)
        listener.listen(2048)  # uvicorn's default backlog
        async_llm = AsyncLLM(EngineCoreClient.attach(engine_config, channel))
        code = serve_app(async_llm, model_name, api_key, shutdown_timeout, log_level, sockets=[listener])
    except KeyboardInterrupt:
        code = 0
    sys.exit(code)


def _stop_with(launcher) -> None:
    """(a frontend's watch thread) Wait for the launcher's pipe to close, then stop this frontend
    as SIGTERM does (drain, then exit): no frontend outlives the launcher, even one killed."""
    with contextlib.suppress(EOFError, OSError):
        launcher.recv()  # it never sends: this returns when it is gone
    os.kill(os.getpid(), signal.SIGTERM)


@contextlib.contextmanager
def _environment(name: str, value: str):
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            del os.environ[name]
        else:
            os.environ[name] = before


def _close(*ends) -> None:
    for end in ends:
        end.close()


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt
