"""The engine in a process of its own, so that stepping it and serving HTTP stop getting in each
other's way.

    frontend process (uvicorn, asyncio)                    engine process (spawned)
    ────────────────────────────────────                   ─────────────────────────────────
    handlers ─> AsyncLLM ─> EngineCoreClient               run_engine_core: LLMEngine, then
                             │  add / abort / stats         serve(), a busy loop:
                             └─── commands pipe ─────────>    take every command waiting
                                                              engine.step()
          streams <── event loop <── reader thread <───────  one message: outputs, replies,
                    (call_soon_threadsafe)  outputs pipe      the engine's state

**Why a process.** In one process (`AsyncLLM(engine)`, the library's way) each step's outputs go
back to the event loop, which must hand them out and serve every open stream (JSON per chunk)
before it gets round to starting the next step: the engine idles as long as the loop's backlog,
and its own host code (scheduling, sampling, detokenizing) shares one GIL with all the HTTP work.
Here the engine steps back to back on its own core, and the frontend does only the HTTP work.

**The engine's loop** (`serve`). While requests run, it takes every command already waiting
(without blocking), runs one `step()`, and sends ONE message: the step's outputs, the replies to
the commands, and `EngineState` (requests running and waiting, KV-cache usage: what /metrics
shows). With nothing to run it blocks on the command pipe, so an idle engine costs nothing.

**Commands are calls** (add, abort, stats, shutdown), answered in the next message. An add that
the engine refuses comes back as its ValueError/TypeError, and `AsyncLLM.add_request` raises it
before anything streams, so a server still answers 400. One set of checks, the engine's own:
nothing is duplicated at the door, and waiting for the answer costs no time to first token, as
the request could not be scheduled before the next step anyway.

**An add with structured output is answered when its grammar has compiled**, on a grammar thread
(engine/structured_output.py): the loop keeps stepping the other requests meanwhile, and then
queues the request, or answers the compile's ValueError (a 400 naming the field). The compile's
end wakes the loop (`Wakeup`: a pipe it waits on beside the commands, written by the grammar
thread), so a loop with nothing else to do sleeps until then, and takes the request at once.
Its frontend may abort it before that: the add is answered at once, and the abort with its final
output.

**Only what is new crosses.** A streaming request's output after a step is a delta (its new
tokens and text), but a `RequestOutput` also carries the whole prompt, and pickling dataclasses is
slow. For one step of 256 one-token deltas with prompts of 100-1024 tokens, on a 2-core CPU: the
objects took 5-9 ms to pickle and 9-15 ms to unpickle (600 KB). `OutputEncoder`'s plain tuples,
which carry a request's prompt only with its first report, took 0.3 ms to encode and 0.2 ms to
pickle in the engine process, 0.2 ms to unpickle and 0.4 ms to decode here (30 KB).

**Several frontends** (`serve --api-server-count N`, frontends.py). The engine process can
serve N frontend processes, each over its own pair of pipes (`serve(..., frontends)`): it waits
on all of them, notes which frontend added each request, sends each frontend the outputs of its
own requests (and the state to all), and lets only that frontend abort them. A frontend that
goes away has its requests aborted; the process leaves when the last one has. The frontends
talk to it through `EngineCoreClient.attach`, which does not own the process.

**Failures.** A step that raises finishes its requests with finish_reason "error" (the engine
does that); the message names them and the frontend raises `EngineStepError` in exactly their
streams. If the engine process dies (a crash, the OOM killer, SIGKILL), the outputs pipe closes:
the reader thread sees EOF, and every stream gets `EngineDeadError`. If the *frontend* dies, the
commands pipe closes and the engine process leaves by itself.

**Signals.** The engine process ignores SIGINT and SIGTERM: Ctrl-C in a terminal reaches the
whole process group, but only the frontend decides when to stop (it drains the requests first,
then sends "shutdown", waits, and kills the process if it does not leave in time). Tensor
parallelism works unchanged: the engine process starts its worker processes itself, which is why
it cannot be a daemon process (those may not have children); `multiprocessing.util.Finalize`
stops it if the frontend forgets to. Starting, watching and stopping the process is
minivllm/distributed/process.py's, as for the tensor-parallel workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import itertools
import os
import pickle
import signal
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing import connection, util
from typing import Any, NamedTuple

import torch

from minivllm.config import EngineConfig
from minivllm.distributed.process import ChildDied, ChildProcess, exit_now, stop_children
from minivllm.engine.llm_engine import LLMEngine, PreparedRequest, Prompt
from minivllm.observe.stats import SpecDecodeCounts
from minivllm.outputs import CompletionOutput, RequestMetrics, RequestOutput
from minivllm.sampling_params import SamplingParams

STOP_TIMEOUT_S = 10.0  # how long a stopping engine process may take before it is killed
SHUTDOWN = (None, "shutdown", ())  # the command that stops the engine process
# Let the commands pipe hold a burst (Linux only): a send to a full pipe blocks until the other
# side reads, and the engine reads its commands only between steps; 256 prompts of 1k tokens
# arriving at once pickle to ~1 MB, and the event loop must not stall on them.
PIPE_BYTES = 1 << 20


class EngineStepError(RuntimeError):
    """The engine step that was computing this request raised; the request is finished."""


class EngineDeadError(RuntimeError):
    """The engine has stopped (shut down, crashed, or its process died): no request can be served."""


class EngineStartError(RuntimeError):
    """The engine process could not start (its traceback is in the message)."""


class EngineState(NamedTuple):
    """The engine's queues and KV pool at the end of its last step (what /metrics shows)."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float  # used KV blocks / all KV blocks, 0 to 1
    spec_decode: SpecDecodeCounts | None = None  # totals so far, with speculative decoding on


@dataclass
class StepResult:
    """What one step gave: the outputs, and, if it raised, the error and the requests it ended."""

    outputs: list[RequestOutput]
    error: str | None = None  # "RuntimeError: ..." when the step raised
    failed: list[RequestOutput] = field(default_factory=list)  # finished by that error, nothing new


# ----------------------------------------------------------------------------------------------
# The core: an LLMEngine and what serving needs around its steps (in either process)
# ----------------------------------------------------------------------------------------------
class EngineCore:
    """The engine as a server drives it: streaming requests, and steps that never raise.

    Both ways of running the engine use it: in the server's own process (through a worker
    thread, see async_llm.py) and in the engine process (`serve` below).
    """

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        engine.logprobs_as_records = True  # the frontend names the tokens (serving.token_text)

    def add(self, prompt: Prompt, params: SamplingParams | None, request_id: str) -> PreparedRequest:
        """Check a streaming request and start compiling its grammar (the engine's ValueError/
        TypeError if it is refused on sight); `queue` it once it is `ready()`."""
        return self.engine.prepare_request(prompt, params, request_id, stream=True)

    def queue(self, prepared: PreparedRequest) -> None:
        """Queue a request `add` prepared; the ValueError of a grammar that could not compile."""
        self.engine.add_prepared(prepared)

    def abort(self, request_id: str) -> RequestOutput | None:
        return self.engine.abort(request_id)

    def stats(self) -> dict:
        return self.engine.get_stats()

    def has_work(self) -> bool:
        return self.engine.has_unfinished_requests()

    def step(self) -> StepResult:
        """One engine step. If it raises, the engine has finished that step's requests with
        finish_reason "error": they are returned in `failed`, and the engine steps on."""
        try:
            outputs = self.engine.step()
        except Exception as err:  # noqa: BLE001 - reported to exactly the requests it ended
            failed = [nothing_new(o) for o in self.engine.take_failed_outputs()]
            return StepResult([], f"{type(err).__name__}: {err}", failed)
        return StepResult(outputs)

    def state(self) -> EngineState:
        scheduler, blocks = self.engine.scheduler, self.engine.block_manager
        spec = self.engine.stats.spec_decode_counts() if scheduler.speculation is not None else None
        return EngineState(len(scheduler.running), self.engine.num_waiting,
                           blocks.num_used_blocks / blocks.num_blocks, spec)


def nothing_new(output: RequestOutput) -> RequestOutput:
    """A finished request's last report as a delta: its finish reasons, no new text or tokens."""
    empty = [dataclasses.replace(c, text="", token_ids=[], logprobs=None if c.logprobs is None else [])
             for c in output.outputs]
    return dataclasses.replace(output, outputs=empty, prompt_logprobs=None)


# ----------------------------------------------------------------------------------------------
# Outputs on the wire
# ----------------------------------------------------------------------------------------------
class OutputEncoder:
    """Engine side: a RequestOutput as plain tuples (see "Only what is new crosses" above)

        (request_id, finished, [(index, text, token_ids, finish_reason, stop_reason, logprobs), ...],
         metrics as a tuple of its fields, (prompt, prompt_token_ids) on the first report or None,
         prompt_logprobs)

    Log-probabilities travel as the engine holds them (`logprobs_as_records`): one `TokenLogprobs`
    tuple per position (ids and numbers, no text: the frontend names the tokens), or None where
    the position has none (the first prompt token), and None when not asked for.
    """

    def __init__(self):
        self._reported: set[str] = set()  # requests whose prompt was sent already

    def forget(self, request_id: str) -> None:
        """A request that ends unreported (its frontend left)."""
        self._reported.discard(request_id)

    def encode(self, output: RequestOutput) -> tuple:
        request_id = output.request_id
        prompt = None
        if request_id not in self._reported:
            prompt = (output.prompt, output.prompt_token_ids)
            self._reported.add(request_id)
        if output.finished:
            self._reported.discard(request_id)
        completions = [(c.index, c.text, c.token_ids, c.finish_reason, c.stop_reason, c.logprobs)
                       for c in output.outputs]
        return (request_id, output.finished, completions, tuple(vars(output.metrics).values()), prompt,
                output.prompt_logprobs)


class OutputDecoder:
    """Frontend side: the tuples back into RequestOutputs, each with its request's prompt."""

    def __init__(self):
        self._prompts: dict[str, tuple[str | None, list[int]]] = {}  # unfinished requests' prompts

    def decode(self, wire: tuple) -> RequestOutput:
        request_id, finished, completions, metrics, prompt, prompt_logprobs = wire
        if prompt is not None:
            self._prompts[request_id] = prompt
        text, token_ids = (self._prompts.pop if finished else self._prompts.get)(request_id, (None, []))
        outputs = [CompletionOutput(*c) for c in completions]
        return RequestOutput(request_id, text, token_ids, outputs, finished, RequestMetrics(*metrics), prompt_logprobs)


# ----------------------------------------------------------------------------------------------
# The engine process
# ----------------------------------------------------------------------------------------------
def run_engine_core(config: EngineConfig, frontends: list, commands, results) -> None:
    """The engine process's life: build the engine, say "ready", serve until told to stop (or
    until its frontends are gone), stop the engine's own workers, leave.

    frontends: the (commands, results) pipe ends of the frontend processes that send it requests
        (`python -m minivllm serve --api-server-count N`); empty when the parent is the one
        frontend. (commands, results) are the parent's: "ready" goes there, "shutdown" comes from it.
    """
    for sig in (signal.SIGINT, signal.SIGTERM):  # the frontend decides when we stop
        signal.signal(sig, signal.SIG_IGN)
    if config.model_config.torch_device.type == "cpu":
        # Leave a core to the frontend: with compute threads on every core (OpenMP's, which wait
        # by spinning), a tiny model's steps ran ~8x slower on a busy 2-core machine.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) - 1))
    try:
        engine = LLMEngine(config)
    except BaseException as err:  # noqa: BLE001 - the frontend re-raises it
        with contextlib.suppress(OSError):
            results.send(("failed", (_picklable(err), traceback.format_exc())))
        exit_now(1)
    core = EngineCore(engine)
    runner = engine.executor.runner
    # What exists now (the model, torch's and transformers' modules: a few hundred thousand
    # objects) lives as long as the process. Out of the collector's sight, a full collection looks
    # only at what the steps made since, instead of stalling the loop for all of it (one took
    # ~0.12 s at ~270k tracked objects in a benchmark process on a 2-core CPU).
    gc.collect()
    gc.freeze()
    try:
        results.send(("ready", {"pid": os.getpid(), "device": str(runner.device),
                                "num_kv_blocks": runner.num_kv_blocks, "state": core.state()}))
        serve(core, commands, results, frontends)
    except OSError:  # the frontend went away while we loaded
        pass
    finally:
        engine.close()  # tensor-parallel workers, if any
    exit_now(0)


@dataclass(eq=False)
class Frontend:
    """(engine process) One frontend's pipe ends and the requests it added that are unfinished:
    its outputs go to it alone, and only it may abort them."""

    commands: Any  # receiving end
    results: Any  # sending end
    requests: set[str] = field(default_factory=set)
    replies: list = field(default_factory=list)  # answers to its commands, sent with the next message


def serve(core: EngineCore, commands, results, frontends: list | tuple = ()) -> None:
    """The busy loop: take the commands, step, send each frontend one message; block while idle.

    With no `frontends`, (commands, results) is the one frontend. Otherwise the requests come
    from `frontends` and `commands` only stops the loop. Returns on "shutdown", when the parent
    is gone, or when the last frontend is gone (a frontend that leaves has its requests aborted).
    """
    encoder = OutputEncoder()
    peers = [Frontend(c, r) for c, r in frontends] or [Frontend(commands, results)]
    control = [commands] if frontends else []  # the parent's pipe, when it sends no requests
    owners: dict[str, Frontend] = {}  # unfinished request -> the frontend that added it
    adding: list[Adding] = []  # adds whose grammar is compiling
    with contextlib.closing(Wakeup()) as compiled:  # set by a grammar thread when a compile ends
        while _drop_gone(core, encoder, owners, peers):  # (a failed send of the last turn closed one)
            pipes = [p.commands for p in peers] + control + [compiled.fd]
            ready = connection.wait(pipes, timeout=0 if core.has_work() else None)
            if compiled.fd in ready:
                compiled.clear()  # before `_finish_adds` looks, so a compile ending after that wakes us
            if commands in control and commands in ready and _stop_requested(commands):
                return
            for peer in [p for p in peers if p.commands in ready]:
                if not _take(core, encoder, owners, peer, adding, compiled):
                    return  # "shutdown" from the one frontend
            if not _drop_gone(core, encoder, owners, peers):  # (a closed pipe, read just now)
                return
            adding = _finish_adds(core, owners, adding)
            _send_messages(core, encoder, owners, peers, core.step() if core.has_work() else None)


def _send_messages(core: EngineCore, encoder: OutputEncoder, owners: dict, peers: list[Frontend],
                   result: StepResult | None) -> None:
    """Send one message to each frontend that has something: outputs of the step, or replies."""
    routed = _route(result, owners) if result is not None else {}
    state = None  # (read once, and only for a turn that sends something)
    for peer in peers:
        if result is None and not peer.replies:
            continue
        if state is None:
            state = core.state()
        outputs, failed = routed.get(peer, ((), ()))
        message = (peer.replies, [encoder.encode(o) for o in outputs], result and result.error,
                   [encoder.encode(o) for o in failed], state)
        peer.replies = []
        try:
            peer.results.send(message)
        except OSError:  # it left: dropped at the top of the next turn
            peer.commands.close()


def _drop_gone(core: EngineCore, encoder: OutputEncoder, owners: dict, peers: list[Frontend]) -> bool:
    """Forget the frontends whose pipe we closed (they left); whether any frontend is left."""
    for peer in [p for p in peers if p.commands.closed]:
        peers.remove(peer)
        _forget(core, encoder, owners, peer)
    return bool(peers)


def _stop_requested(control) -> bool:
    """The parent's pipe is readable: "shutdown", or closed (the parent is gone)."""
    try:
        return control.recv() == SHUTDOWN
    except (EOFError, OSError):
        return True


class Wakeup:
    """(engine process) How a grammar thread wakes the loop when a compile ends: a pipe whose read
    end (`fd`) the loop waits on beside the frontends' pipes, and that `set` writes a byte to.
    A byte written while the loop is busy stays in the pipe until `clear`, so no wake-up is lost
    between the loop's last look at its adds and its next wait; an idle loop sleeps until then."""

    def __init__(self):
        self.fd, self._write_fd = os.pipe()
        os.set_blocking(self.fd, False)
        os.set_blocking(self._write_fd, False)
        self._lock = threading.Lock()  # no write once closed: the number may be another file's then

    def set(self) -> None:
        """(any thread) Make `fd` readable; nothing once closed."""
        with self._lock:
            if self._write_fd is not None:
                with contextlib.suppress(BlockingIOError):  # the pipe is full, so readable already
                    os.write(self._write_fd, b"\0")

    def clear(self) -> None:
        """(the loop) Read every byte written so far."""
        with contextlib.suppress(BlockingIOError):  # empty
            while os.read(self.fd, 4096):
                pass

    def close(self) -> None:
        with self._lock:
            if self._write_fd is not None:
                os.close(self._write_fd)
                os.close(self.fd)
                self._write_fd = None


@dataclass(eq=False)
class Adding:
    """(engine process) An add that is answered once its request is `ready()` (its grammar compiled)."""

    peer: Frontend
    call_id: int
    prepared: PreparedRequest


def _take(core: EngineCore, encoder: OutputEncoder, owners: dict, peer: Frontend, adding: list[Adding],
          compiled: Wakeup) -> bool:
    """Run every command waiting from `peer`; False on "shutdown". A closed pipe (the frontend
    left) closes our end, so that it is dropped. An add joins `adding`, its request `peer`'s, and
    sets `compiled` when its grammar is ready."""
    try:
        while peer.commands.poll():
            call_id, method, args = peer.commands.recv()
            if method == "shutdown":
                return False
            if method == "add":
                _start_add(core, owners, peer, call_id, args, adding, compiled)
                continue
            if method == "abort" and owners.get(args[0]) is not peer:
                peer.replies.append((call_id, None, None))  # not its request (or finished): nothing to do
                continue
            peer.replies.append(_answer(core, encoder, call_id, method, args))
            if method == "abort":
                del owners[args[0]]
                peer.requests.discard(args[0])
    except (EOFError, OSError):
        peer.commands.close()
    return True


def _start_add(core: EngineCore, owners: dict, peer: Frontend, call_id: int, args: tuple,
               adding: list[Adding], compiled: Wakeup) -> None:
    """Check the request and start its grammar; refused on sight, the add is answered now."""
    try:
        prepared = core.add(*args)
    except Exception as err:  # noqa: BLE001 - raised again on the frontend, by the caller
        peer.replies.append((call_id, _picklable(err), None))
        return
    owners[prepared.request_id] = peer  # from now on its frontend may abort it
    peer.requests.add(prepared.request_id)
    adding.append(Adding(peer, call_id, prepared))
    if prepared.grammar is not None:  # (run on the grammar thread, or here if it is done already)
        prepared.grammar.add_done_callback(lambda _: compiled.set())


def _finish_adds(core: EngineCore, owners: dict, adding: list[Adding]) -> list[Adding]:
    """Queue the requests whose grammar is ready and answer their adds (with the compile's
    error, if any); returns the adds still waiting."""
    waiting = []
    for add in adding:
        if not add.prepared.ready():
            waiting.append(add)
            continue
        try:
            core.queue(add.prepared)
        except Exception as err:  # noqa: BLE001 - raised again on the frontend, by the caller
            add.peer.replies.append((add.call_id, _picklable(err), None))
            owners.pop(add.prepared.request_id, None)
            add.peer.requests.discard(add.prepared.request_id)
        else:
            add.peer.replies.append((add.call_id, None, None))
    return waiting


def _forget(core: EngineCore, encoder: OutputEncoder, owners: dict, peer: Frontend) -> None:
    """A frontend left: abort what it was running (its KV blocks free at once)."""
    for request_id in peer.requests:
        core.abort(request_id)
        owners.pop(request_id, None)
        encoder.forget(request_id)
    peer.results.close()


def _route(result: StepResult, owners: dict) -> dict[Frontend, tuple[list, list]]:
    """Each frontend's (outputs, failed outputs) of the step; finished requests leave the books."""
    routed: dict[Frontend, tuple[list, list]] = {}
    for kind, outputs in enumerate((result.outputs, result.failed)):
        for output in outputs:
            peer = owners.get(output.request_id)
            if peer is None:  # aborted by a frontend that left meanwhile
                continue
            routed.setdefault(peer, ([], []))[kind].append(output)
            if output.finished:
                del owners[output.request_id]
                peer.requests.discard(output.request_id)
    return routed


def _answer(core: EngineCore, encoder: OutputEncoder, call_id: int, method: str, args: tuple) -> tuple:
    """(call_id, error, value): run one call on the core; an output it returns goes encoded."""
    try:
        value = getattr(core, method)(*args)
    except Exception as err:  # noqa: BLE001 - raised again on the frontend, by the caller
        return call_id, _picklable(err), None
    if isinstance(value, RequestOutput):
        value = encoder.encode(value)
    return call_id, None, value


def _picklable(err: BaseException) -> BaseException:
    """`err` if it survives pickling (so its type is raised again on the other side), else a
    RuntimeError with its text."""
    try:
        pickle.loads(pickle.dumps(err))
        return err
    except Exception:  # noqa: BLE001
        return RuntimeError(f"{type(err).__name__}: {err}")


# ----------------------------------------------------------------------------------------------
# The frontend's side
# ----------------------------------------------------------------------------------------------
def _check_config(config) -> None:
    if not isinstance(config, EngineConfig):
        raise TypeError(f"config must be an EngineConfig, got {type(config).__name__}")


def start_engine_process(config: EngineConfig, frontends: list | tuple = (),
                         start_timeout: float | None = None) -> tuple[ChildProcess, dict]:
    """Spawn the engine process and wait until it is loaded: (the child, its "ready" payload).
    Raises what loading raised; the process is gone then. frontends: see `run_engine_core`."""
    # Not a daemon: it may start tensor-parallel workers. Two one-way pipes: commands in,
    # results out, each read by one thread.
    child = ChildProcess(run_engine_core, (config, list(frontends)), name="minivllm-engine-core",
                         daemon=False, duplex=False, pipe_bytes=PIPE_BYTES)
    try:
        kind, payload = child.receive(start_timeout)
        if kind == "failed":
            err, trace = payload
            if isinstance(err, (ValueError, TypeError, OSError)):  # bad input: its own words reach the user
                raise err
            raise EngineStartError(f"the engine process failed to start:\n{trace}")
    except BaseException as err:
        stop_children([child], SHUTDOWN, timeout=0.0)
        child.from_child.close()
        if isinstance(err, TimeoutError):
            raise EngineStartError(f"the engine process did not get ready within {start_timeout} s") from None
        if isinstance(err, ChildDied):
            raise EngineStartError(f"the engine process died while starting (exit code {err.exitcode})") from None
        raise
    return child, payload


@dataclass
class EngineChannel:
    """A frontend's line to an engine process that another process started and stops (the
    frontends of `serve --api-server-count N`): its pipe ends, and the engine's "ready" payload."""

    commands: Any  # sending end
    results: Any  # receiving end
    info: dict


class EngineCoreClient:
    """Talks to an engine process: sends it calls, hands what it reports to the event loop.

    `EngineCoreClient(config)` starts the process and owns it (blocking until the engine is
    loaded; it raises what loading raised); `EngineCoreClient.attach(config, channel)` talks to
    one that another process owns, over `channel`. `start` binds it to the running event loop:
    from then on a reader thread receives every message and passes it to the loop
    (`call_soon_threadsafe`), where `on_result` gets each step's outputs and `on_dead` the end of
    the engine.
    """

    def __init__(self, config: EngineConfig, start_timeout: float | None = None):
        _check_config(config)
        if start_timeout is not None and (isinstance(start_timeout, bool) or not isinstance(start_timeout, (int, float))
                                          or not start_timeout > 0):
            raise ValueError(f"start_timeout must be a positive number of seconds or None, got {start_timeout!r}")
        self._child, info = start_engine_process(config, (), start_timeout)
        self.process = self._child.process
        self._finalizer = util.Finalize(self, stop_children, args=([self._child], SHUTDOWN, STOP_TIMEOUT_S),
                                        exitpriority=100)  # before multiprocessing joins its children at exit
        self._setup(config, EngineChannel(self._child.to_child, self._child.from_child, info))

    @classmethod
    def attach(cls, config: EngineConfig, channel: EngineChannel) -> EngineCoreClient:
        """A client of an engine process it does not own: closing it leaves the process running
        (the engine aborts this client's requests when its pipe closes)."""
        _check_config(config)
        client = cls.__new__(cls)
        client._child = client.process = None
        client._setup(config, channel)
        return client

    def _setup(self, config: EngineConfig, channel: EngineChannel) -> None:
        self.config = config
        self.info = channel.info
        self._commands, self._results = channel.commands, channel.results
        self._state: EngineState = self.info["state"]
        self._decoder = OutputDecoder()
        self._calls: dict[int, tuple[asyncio.Future, str]] = {}
        self._ids = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reader: threading.Thread | None = None
        self._on_result: Callable[[StepResult], None] | None = None
        self._on_dead: Callable[[BaseException], None] | None = None
        self._closed = False
        self._gone = False  # its pipe closed: the engine process ended, or dropped us

    # -- what AsyncLLM calls ----------------------------------------------------------------------
    @property
    def pid(self) -> int:
        return self.info["pid"]

    def start(self, on_result: Callable[[StepResult], None], on_dead: Callable[[BaseException], None]) -> None:
        """Deliver the engine's messages to the running event loop from now on (once)."""
        if self._reader is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._on_result, self._on_dead = on_result, on_dead
        self._reader = threading.Thread(target=self._read, name="minivllm-engine-reader", daemon=True)
        self._reader.start()

    async def add(self, prompt: Prompt, params: SamplingParams | None, request_id: str) -> None:
        await self._call("add", prompt, params, request_id)

    async def abort(self, request_id: str) -> RequestOutput | None:
        return await self._call("abort", request_id)

    async def stats(self) -> dict:
        return await self._call("stats")

    def state(self) -> EngineState:
        return self._state

    def is_alive(self) -> bool:
        return not self._closed and not self._gone and (self._child is None or self._child.is_alive())

    async def close(self) -> None:
        """Stop the engine process if this client owns it (asking, waiting, then killing), else
        hang up (the engine aborts what is left of ours); end the reader."""
        if self._closed:
            return
        self._closed = True
        if self._child is not None:
            self._finalizer.cancel()
            await asyncio.to_thread(stop_children, [self._child], SHUTDOWN, STOP_TIMEOUT_S)
        else:
            self._commands.close()  # the engine drops us and closes our results pipe
        if self._reader is not None:  # the pipe is closed on the other side: the reader sees EOF
            await asyncio.to_thread(self._reader.join, 5.0)
        if self._reader is None or not self._reader.is_alive():
            self._results.close()

    # -- calls ---------------------------------------------------------------------------------------
    async def _call(self, method: str, *args):
        """Send one call; its reply comes in a later message (`_deliver` resolves the future)."""
        if not self.is_alive():
            raise EngineDeadError(f"the engine process (pid {self.pid}) is not running")
        call_id = next(self._ids)
        future = self._loop.create_future()
        self._calls[call_id] = (future, method)
        try:
            self._commands.send((call_id, method, args))
        except (OSError, ValueError) as err:  # a closed pipe: the process is gone
            del self._calls[call_id]
            raise EngineDeadError(f"the engine process (pid {self.pid}) is not running: {err}") from None
        return await future

    # -- messages (reader thread, then event loop) -------------------------------------------------
    def _read(self) -> None:
        """(reader thread) Receive (and unpickle) each message, hand it to the event loop."""
        while True:
            try:
                message = self._results.recv()
            except (EOFError, OSError):  # the process is gone, or dropped us
                break
            if not self._post(self._deliver, message):
                return
        self._post(self._engine_gone)

    def _post(self, fn, *args) -> bool:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
            return True
        except RuntimeError:  # the event loop is closed: nobody listens anymore
            return False

    def _deliver(self, message: tuple) -> None:
        """(event loop) One message of the engine: replies first, then the step's outputs."""
        replies, outputs, error, failed, self._state = message
        for call_id, err, value in replies:
            future, method = self._calls.pop(call_id, (None, None))
            if future is None or future.done():  # its caller was cancelled meanwhile
                continue
            if err is not None:
                future.set_exception(err)
            else:
                future.set_result(self._decoder.decode(value) if method == "abort" and value else value)
        if outputs or error is not None:
            decode = self._decoder.decode
            self._on_result(StepResult([decode(w) for w in outputs], error, [decode(w) for w in failed]))

    def _engine_gone(self) -> None:
        """(event loop) The outputs pipe closed: the process exited, was killed or crashed."""
        self._gone = True
        if self._child is None:  # another process owns it: its exit code is not ours to read
            error = EngineDeadError(f"the engine process (pid {self.pid}) is gone")
        else:
            exitcode = self._child.exitcode() if not self._closed else self.process.exitcode
            error = EngineDeadError(f"the engine process (pid {self.pid}) died (exit code {exitcode})")
        for future, _ in self._calls.values():
            if not future.done():
                future.set_exception(error)
        self._calls.clear()
        if not self._closed:
            self._on_dead(error)
