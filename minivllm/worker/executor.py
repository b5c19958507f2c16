"""Executors: how the engine's one call per step reaches the model, in one process or in N.

An executor has four things the engine uses: `execute(output)` launches a step and returns its
`SampledTokens` (None for a step with structured output, whose sampling waits for its grammar
bitmask), `sample(bitmask)` launches that sampling, `close()` stops whatever it started, and
`runner` is rank 0's `ModelRunner`, which describes the model (its KV pool, vocabulary,
device, ...) for every rank. `make_executor` picks one:

* **One rank**: `Executor`, a `ModelRunner` in this process; `execute` goes straight to it.
* **N ranks** (tensor parallelism): `MultiprocExecutor`. The engine's own process is rank 0, the
  *driver*: it keeps the scheduler and the block manager, and a ModelRunner of its own (rank 0's
  shard). It starts N - 1 worker processes (minivllm/distributed/process.py), one ModelRunner
  each on its own GPU, all in one torch.distributed group. Each step:

      driver      pickles the SchedulerOutput once and writes it to every worker's pipe, then
                  launches it on its own runner and returns a handle on the tokens
      worker r    reads it, launches the same step on its runner (the same forward pass on its
                  shard: the all-reduces pair up with the other ranks'), answers "ok"

  A step with structured output samples in a second call (`sample(bitmask)`, see
  ModelRunner.execute): the driver then writes the grammar bitmask to every pipe too, and each
  worker samples with it, so every rank applies the same mask and draws the same tokens.

  Nothing else crosses between processes. Every rank computes the whole logits (the LM head
  gathers them) and samples them with the same sampler, seeded the same way, so every rank
  draws the same tokens and keeps them on its own GPU: the next step's pending decodes
  (overlap, see engine/llm_engine.py) read them there, exactly as with one GPU.

Why pipes and not `broadcast_object_list` over a gloo group: a pipe per worker carries the step
in one write, the way back ("ok", or a worker's traceback) comes with it, and a closed pipe says
when a process died.

**Failures.** A worker that raises reports its traceback and exits; a worker that dies closes
its pipe and its sockets. The driver notices either way, wherever it waits (its own collectives
fail when a peer's gloo sockets close; its pipe reads watch the sentinels; on a GPU, waiting for
the tokens polls the workers' liveness), and raises `TensorParallelError` naming the rank and
what it said. The group is then out of step, so the executor refuses every later step with the
same error: the engine finishes the failed step's requests with finish_reason "error", and a
new LLM is needed. **Shutdown**: `close()` (LLM.close, or a `with` block) stops the workers
and leaves the process group; `weakref.finalize` does the same when the LLM is garbage
collected or the interpreter exits, so no worker outlives its engine.

Spawned workers import the script that built the LLM, as every "spawn" start does: scripts that
build a tensor-parallel LLM need the `if __name__ == "__main__":` guard.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import time
import traceback
import weakref
from dataclasses import dataclass, field
from typing import NoReturn

import torch
import torch.distributed as dist

from minivllm.config import EngineConfig
from minivllm.distributed import TIMEOUT, destroy_tensor_parallel, init_tensor_parallel
from minivllm.distributed.process import ChildDied, ChildProcess, exit_now, stop_children
from minivllm.step import SchedulerOutput
from minivllm.worker.model_runner import ModelRunner, SampledTokens

LIVENESS_INTERVAL_S = 0.1  # how often a wait for the GPU checks that every worker is alive
STOP_TIMEOUT_S = 5.0  # how long close() lets the workers finish before it kills them


def make_executor(config: EngineConfig) -> Executor | MultiprocExecutor:
    """An Executor for one rank; a MultiprocExecutor for tensor_parallel_size > 1."""
    if config.model_config.tensor_parallel_size == 1:
        return Executor(config)
    return MultiprocExecutor(config)


class Executor:
    """One rank: every step goes to the ModelRunner in this process."""

    def __init__(self, config: EngineConfig):
        self.runner = ModelRunner(config)

    def execute(self, output: SchedulerOutput) -> SampledTokens | None:
        return self.runner.execute(output)

    def sample(self, bitmask: torch.Tensor) -> SampledTokens:
        return self.runner.sample(bitmask)

    def close(self) -> None:
        """Nothing to stop: no other process was started."""


class TensorParallelError(RuntimeError):
    """A tensor-parallel worker failed or died; the group cannot run further steps."""


# ----------------------------------------------------------------------------------------------
# The worker process
# ----------------------------------------------------------------------------------------------
def run_worker(config: EngineConfig, rank: int, address: tuple[str, int], conn) -> None:
    """The life of worker `rank`: join the group, build its ModelRunner, then run every step the
    driver sends until told to stop, or until the driver is gone (its pipe closes).

    Its first error is sent to the driver as a traceback, and the process exits at once: its
    sockets close, so a peer waiting in a collective with it fails instead of waiting forever.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle: it stops us
    try:
        conn.send(("started", os.getpid()))
        size = config.model_config.tensor_parallel_size
        device = config.model_config.torch_device
        if device.type == "cpu":  # N processes share the cores
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
        store = dist.TCPStore(*address, size, is_master=False, timeout=TIMEOUT)
        runner = ModelRunner(config, init_tensor_parallel(rank, size, store, device))
        conn.send(("ready", None))
        while True:
            try:
                output = pickle.loads(conn.recv_bytes())
            except EOFError:  # the driver is gone: nothing to finish, nobody to tell
                exit_now(0)
            if output is None:  # close(): this rank's last collectives complete, then it leaves
                if runner.device.type == "cuda":
                    torch.cuda.synchronize(runner.device)
                break
            if isinstance(output, torch.Tensor):  # the grammar bitmask of the step just launched
                runner.sample(output)
                continue
            runner.execute(output)  # launched; the tokens stay on this rank's device
            conn.send(("ok", None))
    except BaseException:  # noqa: BLE001 - whatever it is, the driver must hear of it
        with contextlib.suppress(OSError):
            conn.send(("error", traceback.format_exc()))
        exit_now(1)
    destroy_tensor_parallel()
    exit_now(0)


# ----------------------------------------------------------------------------------------------
# The driver's side
# ----------------------------------------------------------------------------------------------
@dataclass
class _Worker:
    rank: int
    child: ChildProcess
    acked: int = 0  # steps it has answered "ok" for

    def describe(self) -> str:
        return f"tensor-parallel worker rank {self.rank} (pid {self.child.pid})"


@dataclass
class _Fleet:
    """What shutting down needs, apart from the executor (which `weakref.finalize` must not hold)."""

    workers: list[_Worker] = field(default_factory=list)
    in_group: bool = False  # this process joined the process group, so shutdown leaves it
    failed: bool = False  # a worker may be stuck in a collective: do not wait long for it
    runner: ModelRunner | None = None  # rank 0's: its CUDA graphs hold NCCL calls, dropped first


class MultiprocExecutor:
    """Rank 0 in this process, ranks 1..N-1 in worker processes it starts; see the module docstring."""

    def __init__(self, config: EngineConfig):
        if dist.is_initialized():  # before starting anything: this process is in a group already
            raise TensorParallelError(
                "torch.distributed is already initialized in this process: one tensor-parallel LLM "
                "per process at a time (close the other one first: LLM.close())")
        self.tensor_parallel_size = size = config.model_config.tensor_parallel_size
        device = config.model_config.torch_device
        self._num_steps = 0
        self._failure: str | None = None  # why the group stopped, once it did
        self._closed = False
        # The rendezvous: rank 0 serves a store on a free port; the workers connect to it.
        store = dist.TCPStore("127.0.0.1", 0, size, is_master=True, timeout=TIMEOUT, wait_for_workers=False)
        self._fleet = _Fleet()
        self._workers = self._fleet.workers
        self._finalizer = weakref.finalize(self, _shutdown, self._fleet)
        try:
            for rank in range(1, size):
                child = ChildProcess(run_worker, (config, rank, ("127.0.0.1", store.port)),
                                     name=f"minivllm-tp-rank{rank}")
                self._workers.append(_Worker(rank, child))
            for worker in self._workers:
                self._receive(worker, "start", expect="started")
            tp = init_tensor_parallel(0, size, store, device)
            self._fleet.in_group = True
            self.runner = self._fleet.runner = ModelRunner(config, tp)
            for worker in self._workers:
                self._receive(worker, "start-up", expect="ready")
        except BaseException as err:
            failure = err if isinstance(err, TensorParallelError) else self._worker_failure(err, "start-up")
            self._fleet.failed = True
            self.close()
            if failure is err:
                raise
            raise failure from err

    # `runner`, rank 0's, answers for all: the ranks agree on the KV pool size, and the model,
    # device and per-block bytes are rank 0's shard (per GPU, what a per-GPU roofline needs).

    @property
    def worker_pids(self) -> list[int]:
        return [w.child.pid for w in self._workers]

    # -- one step ----------------------------------------------------------------------------------
    def execute(self, output: SchedulerOutput) -> SampledTokens | None:
        """Send the step to every worker, launch it here; the tokens' `wait()` also waits for
        every worker's answer. None for a step that samples later (`sample`), as the runner's."""
        self._check_usable()
        step = self._num_steps + 1
        try:
            self._send(output)
            tokens = self.runner.execute(output)
        except BaseException as err:  # noqa: BLE001 - re-raised, as the workers' failure if it was theirs
            self._raise_failure(err, f"step {step}")
        self._num_steps = step
        return None if tokens is None else _TensorParallelTokens(tokens, self, step)

    def sample(self, bitmask: torch.Tensor) -> SampledTokens:
        """Sample the step just launched with its grammar bitmask, on every rank."""
        self._check_usable()
        try:
            self._send(bitmask.clone())  # a view would pickle the whole buffer behind it
            tokens = self.runner.sample(bitmask)
        except BaseException as err:  # noqa: BLE001 - re-raised, as the workers' failure if it was theirs
            self._raise_failure(err, f"step {self._num_steps}")
        return _TensorParallelTokens(tokens, self, self._num_steps)

    def _send(self, message) -> None:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)  # once, for every worker
        for worker in self._workers:
            worker.child.to_child.send_bytes(data)

    def _wait(self, tokens: SampledTokens, step: int) -> list[int]:
        """Every worker's "ok" for `step`, then rank 0's tokens. On a GPU the tokens arrive only
        when the step's all-reduces completed on every rank, so the wait polls the workers'
        liveness: a dead worker would leave them waiting forever."""
        try:
            for worker in self._workers:
                while worker.acked < step:
                    self._receive(worker, f"step {step}", expect="ok")
                    worker.acked += 1
            next_check = time.monotonic() + LIVENESS_INTERVAL_S
            while not tokens.done():
                if time.monotonic() > next_check:
                    self._check_alive(f"step {step}")
                    next_check = time.monotonic() + LIVENESS_INTERVAL_S
                time.sleep(0)  # a spin, but one that lets other threads (a server's) have the GIL
            return tokens.wait()
        except BaseException as err:  # noqa: BLE001 - re-raised, as the workers' failure if it was theirs
            self._raise_failure(err, f"step {step}")

    # -- failures ----------------------------------------------------------------------------------
    def _receive(self, worker: _Worker, when: str, expect: str) -> None:
        """Wait for `worker`'s next message, which must be `expect`; its error report or its
        death raise TensorParallelError instead of waiting forever."""
        try:
            kind, payload = worker.child.receive(TIMEOUT.total_seconds())
        except TimeoutError:
            raise TensorParallelError(f"{worker.describe()} did not answer within {TIMEOUT} ({when})") from None
        except ChildDied as died:
            raise self._died(worker, when, died.exitcode) from None
        if kind == "error":
            raise self._failed(worker, when, payload)
        if kind != expect:
            raise TensorParallelError(f"{worker.describe()} sent {kind!r} during {when}, expected {expect!r}")

    @staticmethod
    def _failed(worker: _Worker, when: str, traceback_text: str) -> TensorParallelError:
        return TensorParallelError(f"{worker.describe()} failed during {when}:\n{traceback_text}")

    @staticmethod
    def _died(worker: _Worker, when: str, exitcode: int | None) -> TensorParallelError:
        return TensorParallelError(f"{worker.describe()} died during {when} (exit code {exitcode}); "
                                   "the tensor-parallel group cannot continue")

    def _check_alive(self, when: str) -> None:
        """Raise for a dead worker: its traceback if it left one in the pipe, else its death."""
        for worker in self._workers:
            if not worker.child.is_alive():
                while worker.child.from_child.poll():  # (a closed pipe polls readable forever)
                    message = worker.child.read()
                    if message is None:
                        break
                    if message[0] == "error":
                        raise self._failed(worker, when, message[1])
                raise self._died(worker, when, worker.child.exitcode())

    def _worker_failure(self, err: BaseException, when: str, grace_s: float = 2.0) -> BaseException:
        """The workers' side of a failure the driver saw as `err`: the first worker that reported
        an error or died within `grace_s`, as a TensorParallelError; else `err` itself."""
        if isinstance(err, TensorParallelError):
            return err
        deadline = time.monotonic() + grace_s
        for worker in self._workers:
            while True:
                try:
                    kind, payload = worker.child.receive(max(0.0, deadline - time.monotonic()))
                except TimeoutError:
                    break  # nothing to say: this worker looks healthy
                except ChildDied as died:
                    return self._died(worker, when, died.exitcode)
                if kind == "error":
                    return self._failed(worker, when, payload)
                # an "ok" of an earlier step: read on
        return err

    def _raise_failure(self, err: BaseException, when: str) -> NoReturn:
        """Stop accepting steps, and raise what the workers say went wrong (or `err`)."""
        failure = self._worker_failure(err, when)
        self._failure = f"{when}: {str(failure).splitlines()[0] if str(failure) else type(failure).__name__}"
        self._fleet.failed = True
        if failure is err:
            raise err
        raise failure from err

    def _check_usable(self) -> None:
        if self._closed:
            raise TensorParallelError("this tensor-parallel executor is closed (LLM.close() was called)")
        if self._failure is not None:
            raise TensorParallelError(f"the tensor-parallel group stopped after a failure in {self._failure}; "
                                      "create a new LLM")

    # -- shutdown ----------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the workers and leave the process group. Idempotent; also run by garbage collection
        and at interpreter exit if never called."""
        self._closed = True
        self._finalizer()


class _TensorParallelTokens:
    """Rank 0's `SampledTokens` of a step, whose `wait` also hears from every worker."""

    def __init__(self, tokens: SampledTokens, executor: MultiprocExecutor, step: int):
        self.timings = tokens.timings
        self._tokens, self._executor, self._step = tokens, executor, step

    def done(self) -> bool:
        return self._tokens.done()

    def wait(self) -> list[int]:
        return self._executor._wait(self._tokens, self._step)

    def logprobs(self):
        return self._tokens.logprobs()


def _shutdown(fleet: _Fleet) -> None:
    """Ask every worker to stop, kill the ones that do not within STOP_TIMEOUT_S (after a
    failure, half a second: a worker may be stuck in a collective whose peer is gone), then leave
    the process group.

    A plain function, not a method: `weakref.finalize` must not hold the executor.
    """
    workers = fleet.workers
    runner, fleet.runner = fleet.runner, None
    if runner is not None and not fleet.failed and runner.device.type == "cuda":
        fleet.failed = not _drain(runner.device, workers)
    stop_children([w.child for w in workers], None, 0.5 if fleet.failed else STOP_TIMEOUT_S)
    if runner is not None and not fleet.failed:  # graphs that hold collectives go before their communicator
        runner.graphs = None
    if fleet.in_group:
        destroy_tensor_parallel()
        fleet.in_group = False


def _drain(device: torch.device, workers: list[_Worker]) -> bool:
    """Let the steps in flight finish on this GPU (and so, through their all-reduces, on every
    GPU) before anything is torn down; False if a worker is dead or it takes over STOP_TIMEOUT_S
    (a plain synchronize could wait forever on a collective whose peer is gone)."""
    done = torch.cuda.Event()
    done.record(torch.cuda.current_stream(device))
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while not done.query():
        if time.monotonic() > deadline or not all(w.child.is_alive() for w in workers):
            return False
        time.sleep(0.001)
    return True
