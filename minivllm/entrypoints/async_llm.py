"""AsyncLLM: the engine for many coroutines at once.

    engine = AsyncLLM.from_config({"model": "path/to/model", "max_num_seqs": 64})   # its own process
    engine = AsyncLLM(LLMEngine(config))                                            # or in this one
    async for out in engine.generate("Hello", SamplingParams(max_tokens=16)):
        print(out.outputs[0].text, end="")        # only what is new since the last report

`LLM.generate` owns the thread that calls it: it adds its requests and steps the engine until they
are done. A server cannot work that way: requests arrive one by one, from many coroutines, while
others are half done. So the engine is stepped by a loop of its own as long as any request is in
flight, and every request gets its own stream (a queue) that the loop's outputs are put into:

    coroutine A: add_request ──┐                              ┌──> stream A ──> async for ... (A)
    coroutine B: add_request ──┼──> engine <── stepping loop ──┼──> stream B ──> async for ... (B)
    coroutine C: abort ────────┘                              └──> stream C ...

Requests are added with `stream=True`, so the engine reports each one after every step that gave
it tokens, as a delta (see minivllm/engine/request.py): a stream carries exactly what a streaming
client is sent next. Log-probabilities come as the runner's records (`TokenLogprobs`: ids and
numbers), not `LLM`'s {token id: Logprob} dicts: a server formats them for its API anyway, naming
the tokens itself (entrypoints/logprobs.py).

**Where the engine runs: two clients behind one interface.**

* `AsyncLLM(engine)`: in this process (`InProcessClient`). An asyncio task steps the engine; every
  engine call runs in one dedicated worker thread, so the event loop stays free while a step runs
  and the engine (not thread-safe) is only ever touched by that one thread. Simple, and what
  library code and tests that reach into the engine want.
* `AsyncLLM.from_config(config)`: in a process of its own (`EngineCoreClient`, engine_core.py),
  which steps back to back while a reader thread here hands its outputs to the event loop. What
  `python -m minivllm serve` uses: the engine and the HTTP work no longer share one GIL, and the
  engine does not wait for the event loop between steps.

**Slow readers get fewer, bigger deltas.** When a reader falls behind (a client's connection is
slow, or the event loop is busy), its stream holds several deltas; the next read merges all of
them into one (`coalesce`), so the server sends one chunk instead of many. The HTTP work per
step stays bounded whatever the token rate.

**Failures.** If a step raises, the engine finishes that step's requests with finish_reason
"error" and steps on; exactly their streams raise `EngineStepError`. If the engine is gone (its
process died), every stream raises `EngineDeadError` and `is_running` turns False.

**Leaving early.** A caller that stops iterating (a client that disconnects, a task that is
cancelled) has its request aborted, which frees its KV blocks at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial

from minivllm.config import EngineConfig
from minivllm.engine.llm_engine import LLMEngine, Prompt
from minivllm.entrypoints import engine_core
from minivllm.entrypoints.engine_core import (
    EngineCore,
    EngineCoreClient,
    EngineDeadError,
    EngineState,
    EngineStepError,
    StepResult,
)
from minivllm.outputs import CompletionOutput, RequestOutput
from minivllm.sampling_params import SamplingParams

__all__ = ["AsyncLLM", "EngineDeadError", "EngineStepError", "InProcessClient", "RequestStream", "coalesce"]


class RequestStream:
    """The outputs of one request as they arrive: `async for out in stream`.

    Yields the engine's deltas until the one with `finished=True`, several queued deltas merged
    into one; raises `EngineStepError` if the step computing the request failed. `close()`
    aborts the request if it is still running, so a stream that is dropped half way does not
    keep its KV blocks.
    """

    def __init__(self, request_id: str, on_close: Callable[[str], None]):
        self.request_id = request_id
        self.finished = False
        self._items: deque[RequestOutput | BaseException] = deque()
        self._ready = asyncio.Event()
        self._on_close = on_close

    def put(self, item: RequestOutput | BaseException) -> None:
        """Called by the loop (on the event loop thread): the next output, or the error."""
        self._items.append(item)
        self._ready.set()

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        if isinstance(self._items[0], BaseException):
            self.finished = True
            raise self._items.popleft()
        outputs = [self._items.popleft()]
        while self._items and not isinstance(self._items[0], BaseException):  # an error is raised next time
            outputs.append(self._items.popleft())
        output = coalesce(outputs)
        self.finished = output.finished
        return output

    def close(self) -> None:
        """Stop listening; a request that is not finished yet is aborted (without waiting)."""
        if not self.finished:
            self.finished = True
            self._on_close(self.request_id)


def coalesce(outputs: list[RequestOutput]) -> RequestOutput:
    """Consecutive deltas of one request as one: per completion, the texts, token ids and
    log-probabilities joined, the finish reason of its last delta; the request's finished state
    and metrics of the last, its prompt log-probabilities from whichever delta had them."""
    if len(outputs) == 1:
        return outputs[0]
    texts: dict[int, list[str]] = {}
    token_ids: dict[int, list[int]] = {}
    logprobs: dict[int, list] = {}
    last: dict[int, CompletionOutput] = {}
    for output in outputs:
        for c in output.outputs:
            texts.setdefault(c.index, []).append(c.text)
            token_ids.setdefault(c.index, []).extend(c.token_ids)
            if c.logprobs is not None:
                logprobs.setdefault(c.index, []).extend(c.logprobs)
            last[c.index] = c
    merged = [CompletionOutput(i, "".join(texts[i]), token_ids[i], last[i].finish_reason, last[i].stop_reason,
                               logprobs.get(i)) for i in sorted(last)]
    # Prompt log-probabilities come in one delta only.
    prompt_logprobs = next((o.prompt_logprobs for o in outputs if o.prompt_logprobs is not None), None)
    return dataclasses.replace(outputs[-1], outputs=merged, prompt_logprobs=prompt_logprobs)


class InProcessClient:
    """The engine in this process: an asyncio task steps it, through one worker thread.

    The same interface as `EngineCoreClient` (engine_core.py): `start`, `add`, `abort`,
    `stats`, `state`, `is_alive`, `close`.
    """

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.config = engine.config
        self.pid = os.getpid()
        self.core = EngineCore(engine)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="minivllm-engine")
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    def start(self, on_result: Callable[[StepResult], None], on_dead: Callable[[BaseException], None]) -> None:
        if self._task is None:
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run(on_result, on_dead), name="minivllm-loop")

    async def _on_engine(self, fn, *args):
        """Run one engine call in the engine thread and wait for it without blocking the loop."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, partial(fn, *args))

    async def add(self, prompt: Prompt, params: SamplingParams | None, request_id: str) -> None:
        """Check the request, wait for its grammar off the engine thread (which steps the others
        meanwhile), then queue it, or raise the compile's ValueError."""
        prepared = await self._on_engine(self.core.add, prompt, params, request_id)
        if not prepared.ready():
            waiter = asyncio.wrap_future(prepared.grammar)
            waiter.add_done_callback(lambda f: f.cancelled() or f.exception())  # `queue` raises it
            await asyncio.wait([waiter])
        await self._on_engine(self.core.queue, prepared)
        self._wake.set()

    async def abort(self, request_id: str) -> RequestOutput | None:
        return await self._on_engine(self.core.abort, request_id)

    async def stats(self) -> dict:
        return await self._on_engine(self.core.stats)

    def state(self) -> EngineState:
        return self.core.state()  # single reads, safe while the engine thread steps

    def is_alive(self) -> bool:
        return self._task is None or not self._task.done()

    async def _run(self, on_result, on_dead) -> None:
        """Step while the engine has requests; sleep on `_wake` while it has none. (The executor
        is first in, first out: an add or an abort waits at most for the step that is running.)"""
        try:
            while True:
                self._wake.clear()
                if not self.core.has_work():
                    await self._wake.wait()
                    continue
                on_result(await self._on_engine(self.core.step))
        except asyncio.CancelledError:
            raise
        except BaseException as err:  # a bug of the loop itself: nobody may wait forever
            on_dead(err)
            raise

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await asyncio.to_thread(self._executor.shutdown, True)
        self.engine.close()  # tensor-parallel worker processes, if any, stop with it


class AsyncLLM:
    """One engine shared by many coroutines; see the module docstring.

    engine: an `LLMEngine` (run in this process) or an `EngineCoreClient` (its own process;
        `from_config` makes one).
    on_output: called (on the event loop thread) with every output the engine reports, deltas and
        final ones, aborted and failed requests included; the server's metrics hang here.

    It serves one event loop: the one running when it is first used.
    """

    def __init__(self, engine: LLMEngine | EngineCoreClient,
                 on_output: Callable[[RequestOutput], None] | None = None):
        if isinstance(engine, LLMEngine):
            self.engine: LLMEngine | None = engine  # None when the engine lives in its own process
            self._client = InProcessClient(engine)
        elif isinstance(engine, EngineCoreClient):
            self.engine, self._client = None, engine
        else:
            raise TypeError(f"engine must be an LLMEngine or an EngineCoreClient, got {type(engine).__name__}")
        self.config: EngineConfig = self._client.config
        self.on_output = on_output
        self._streams: dict[str, RequestStream] = {}  # requests whose caller is still listening
        self._live: set[str] = set()  # requests the engine may still be running
        self._background: set[asyncio.Task] = set()  # aborts started without waiting for them
        self._loop: asyncio.AbstractEventLoop | None = None  # the event loop it serves, once started
        self._dead: BaseException | None = None
        self._draining = False
        self._closed = False

    @classmethod
    def from_config(cls, config: EngineConfig | dict, on_output: Callable[[RequestOutput], None] | None = None,
                    start_timeout: float | None = None) -> AsyncLLM:
        """Start the engine in a process of its own (engine_core.py) and wait until it is loaded.

        config: an EngineConfig, or the dict `EngineConfig.from_dict` takes ({"model": ..., ...});
            checked here, so a bad option raises before any process starts.
        start_timeout: seconds to wait for the model to load (None: no limit).

        The process is spawned: a script that calls this needs the `if __name__ == "__main__":` guard.
        """
        if isinstance(config, dict):
            config = EngineConfig.from_dict(config)
        elif not isinstance(config, EngineConfig):
            raise TypeError(f"config must be an EngineConfig or a dict of its options, got {type(config).__name__}")
        return cls(EngineCoreClient(config, start_timeout), on_output)

    @classmethod
    def from_kwargs(cls, model: str, **kwargs) -> AsyncLLM:
        """Load `model` in this process, with EngineConfig options as keywords (as `LLM` does)."""
        return cls(LLMEngine(EngineConfig.from_dict({"model": model, **kwargs})))

    # ------------------------------------------------------------------------------------------
    # Requests in
    # ------------------------------------------------------------------------------------------
    async def add_request(self, prompt: Prompt, sampling_params: SamplingParams | None = None,
                          request_id: str | None = None) -> RequestStream:
        """Queue a request in the engine; returns the stream of its outputs.

        Invalid input raises ValueError/TypeError here, before anything is queued, so a server can
        answer 400 before it starts streaming.
        """
        if self._draining:
            raise EngineDeadError("the engine is shutting down and takes no new requests")
        self._start()
        if request_id is None:
            request_id = uuid.uuid4().hex
        if request_id in self._streams or request_id in self._live:
            raise ValueError(f"request_id {request_id!r} is already in use")
        # Registered before the engine sees it: the loop may report its first tokens at any step.
        stream = RequestStream(request_id, self._abort_soon)
        self._streams[request_id] = stream
        self._live.add(request_id)
        try:
            await self._client.add(prompt, sampling_params, request_id)
        except (ValueError, TypeError):  # refused: nothing was queued
            self._streams.pop(request_id, None)
            self._live.discard(request_id)
            raise
        except BaseException:  # e.g. cancelled while the engine adds it: it may be in now
            stream.close()
            raise
        return stream

    async def generate(self, prompt: Prompt, sampling_params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Add a request and yield its outputs (deltas) until it is finished.

        Leaving the `async for` early (break, cancellation, an exception) aborts the request.
        """
        stream = await self.add_request(prompt, sampling_params, request_id)
        try:
            async for output in stream:
                yield output
        finally:
            stream.close()

    async def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its KV blocks; returns its final output (None if unknown or
        already finished). Its stream ends with that output (finish_reason "abort")."""
        if not self.is_running:
            return None
        self._start()
        output = await self._client.abort(request_id)
        self._live.discard(request_id)
        if output is not None:
            self._dispatch(output)
        return output

    def _abort_soon(self, request_id: str) -> None:
        """Abort without waiting: from a `finally` of a cancelled task, where awaiting is not
        possible, the abort runs as a task of its own."""
        self._streams.pop(request_id, None)
        if request_id not in self._live or not self.is_running:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # closed outside the event loop (at exit): nothing is running anymore
            return
        task = loop.create_task(self._abort_quietly(request_id))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _abort_quietly(self, request_id: str) -> None:
        with contextlib.suppress(EngineDeadError):  # the engine died meanwhile: nothing to free
            await self.abort(request_id)

    # ------------------------------------------------------------------------------------------
    # Outputs out (on the event loop thread)
    # ------------------------------------------------------------------------------------------
    def _start(self) -> None:
        """Bind to the running event loop on first use; refuse once the engine is gone."""
        if not self.is_running:
            raise EngineDeadError(f"the engine is not running: {self._dead or 'its process is gone'}")
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
            self._client.start(self._on_result, self._die)
        elif loop is not self._loop:  # its outputs are delivered to that first loop only
            raise RuntimeError("an AsyncLLM serves the event loop of its first request; this is another one")

    def _on_result(self, result: StepResult) -> None:
        """One step's outputs into their streams; a failed step's error into exactly its requests'."""
        for output in result.outputs:
            self._dispatch(output)
        if result.error is None:
            return
        error = EngineStepError(f"the engine step failed: {result.error}")
        for output in result.failed:  # a delta with nothing new, finished ("error")
            self._live.discard(output.request_id)
            if self.on_output is not None:
                self.on_output(output)
            stream = self._streams.pop(output.request_id, None)
            if stream is not None:
                stream.put(error)

    def _dispatch(self, output: RequestOutput) -> None:
        """Hand one output to its request's stream (if anyone still listens) and to on_output."""
        if output.finished:
            self._live.discard(output.request_id)
        if self.on_output is not None:
            self.on_output(output)
        stream = self._streams.get(output.request_id)
        if stream is not None:
            stream.put(output)
            if output.finished:
                del self._streams[output.request_id]

    def _die(self, err: BaseException) -> None:
        if self._dead is not None:
            return
        self._dead = err
        error = err if isinstance(err, EngineDeadError) else EngineDeadError(
            f"the engine loop stopped: {type(err).__name__}: {err}")
        for stream in self._streams.values():
            stream.put(error)
        self._streams.clear()
        self._live.clear()

    # ------------------------------------------------------------------------------------------
    # Looking inside, and stopping
    # ------------------------------------------------------------------------------------------
    @property
    def num_in_flight(self) -> int:
        """Requests the engine is still running for this AsyncLLM."""
        return len(self._live)

    @property
    def is_running(self) -> bool:
        """The engine can take requests (its loop or process is alive)."""
        return self._dead is None and self._client.is_alive()

    @property
    def is_closed(self) -> bool:
        """`shutdown()` was called."""
        return self._closed

    @property
    def state(self) -> EngineState:
        """Requests running and waiting in the engine, and its KV-cache usage (from the engine
        process, as of its last message, when it has one)."""
        return self._client.state()

    @property
    def engine_pid(self) -> int:
        """The process that runs the engine (this one, with an in-process engine)."""
        return self._client.pid

    async def stats(self) -> dict:
        """The engine's `get_stats()` (a plain dict), wherever the engine runs."""
        self._start()
        return await self._client.stats()

    async def drain(self, timeout: float) -> None:
        """Take no new request; let those in flight finish for up to `timeout` seconds, then abort
        the rest (their streams end with finish_reason "abort")."""
        self._draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(timeout, 0.0)
        while self._live and self.is_running and loop.time() < deadline:
            await asyncio.sleep(0.05)
        await self._abort_all()

    async def _abort_all(self) -> None:
        """Abort every request in flight, all at once (the engine takes them in one go). An engine
        stuck in a step gets STOP_TIMEOUT_S to answer; then stopping goes on without it."""
        if self._live and self.is_running:
            aborts = asyncio.gather(*(self.abort(r) for r in list(self._live)), return_exceptions=True)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(aborts, engine_core.STOP_TIMEOUT_S)

    async def shutdown(self) -> None:
        """Abort every request still running (their streams end with finish_reason "abort"), then
        stop the engine (its thread, or its process). The engine is not used again."""
        if self._closed:
            return
        self._closed = True
        await self._abort_all()
        self._die(EngineDeadError("the engine was shut down"))
        await self._client.close()
