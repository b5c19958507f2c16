"""AsyncLLM: the engine for many coroutines at once, one loop stepping it in the background.

    engine = AsyncLLM.from_kwargs("path/to/model", max_num_seqs=64)
    async for out in engine.generate("Hello", SamplingParams(max_tokens=16)):
        print(out.outputs[0].text, end="")        # only what is new since the last report

`LLM.generate` owns the thread that calls it: it adds its requests and steps the engine until they
are done. A server cannot work that way: requests arrive one by one, from many coroutines, while
others are half done. So here one background *loop* (an asyncio task) steps the engine as long as
any request is in flight and sleeps on an event when none is; every request gets its own
`asyncio.Queue`, and the loop puts each step's outputs into the queues of their requests:

    coroutine A: add_request ──┐                         ┌──> queue A ──> async for ... (A)
    coroutine B: add_request ──┼──> LLMEngine <── loop ──┼──> queue B ──> async for ... (B)
    coroutine C: abort ────────┘     step()              └──> queue C ...

Requests are added with `stream=True`, so the engine reports each one after every step that gave
it tokens, as a delta (see minivllm/engine/request.py): the queues carry exactly what a streaming
client is sent next.

**One engine thread.** `LLMEngine.step()` is synchronous and takes milliseconds to seconds. Run on
the event loop it would freeze every connection for that long. So every engine call (add_request,
step, abort, get_output) runs in one dedicated worker thread, through a single-thread executor:
the event loop stays free to accept requests and send tokens while a step runs, and the engine,
which is not thread-safe, is only ever touched by that one thread, one call after another (the
executor's queue is first in, first out, so an add or an abort waits at most for the step that is
running).

**Failures.** If a step raises, the engine has already finished the requests of that step with
finish_reason "error" and stays usable. The loop asks the engine which of its requests are now
finished, delivers an `EngineStepError` to exactly those callers, and goes on stepping the rest.

**Leaving early.** A caller that stops iterating (a client that disconnects, a task that is
cancelled) has its request aborted, which frees its KV blocks at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial

from minivllm.config import EngineConfig
from minivllm.engine.llm_engine import LLMEngine, Prompt
from minivllm.outputs import RequestOutput
from minivllm.sampling_params import SamplingParams


class EngineStepError(RuntimeError):
    """The engine step that was computing this request raised; the request is finished."""


class EngineDeadError(RuntimeError):
    """The engine loop has stopped (shut down, or crashed): no request can be served."""


class RequestStream:
    """The outputs of one request as they arrive: `async for out in stream`.

    Yields the engine's deltas until the one with `finished=True`; raises `EngineStepError` if the
    step computing the request failed. `close()` aborts the request if it is still running, so a
    stream that is dropped half way does not keep its KV blocks.
    """

    def __init__(self, request_id: str, on_close: Callable[[str], None]):
        self.request_id = request_id
        self.finished = False
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._on_close = on_close

    def put(self, item: RequestOutput | BaseException) -> None:
        """Called by the loop (on the event loop thread): the next output, or the error."""
        self._queue.put_nowait(item)

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        self.finished = item.finished
        return item

    def close(self) -> None:
        """Stop listening; a request that is not finished yet is aborted (without waiting)."""
        if not self.finished:
            self.finished = True
            self._on_close(self.request_id)


class AsyncLLM:
    """An `LLMEngine` shared by many coroutines, stepped by one background loop.

    on_output: called (on the event loop thread) with every output the engine reports, deltas and
        final ones, aborted and failed requests included; the server's metrics hang here.
    """

    def __init__(self, engine: LLMEngine, on_output: Callable[[RequestOutput], None] | None = None):
        if not isinstance(engine, LLMEngine):
            raise TypeError(f"engine must be an LLMEngine, got {type(engine).__name__}")
        self.engine = engine
        self.on_output = on_output
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="minivllm-engine")
        self._streams: dict[str, RequestStream] = {}  # requests whose caller is still listening
        self._live: set[str] = set()  # requests the engine may still be running: the loop's work
        self._background: set[asyncio.Task] = set()  # aborts started without waiting for them
        self._wake: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self._dead: BaseException | None = None
        self._draining = False

    @classmethod
    def from_kwargs(cls, model: str, **kwargs) -> AsyncLLM:
        """Load `model` with EngineConfig options as keywords, as `LLM(model, **kwargs)` does."""
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
        self._start_loop()
        if request_id is None:
            request_id = uuid.uuid4().hex
        if request_id in self._streams or request_id in self._live:
            raise ValueError(f"request_id {request_id!r} is already in use")
        # Registered before the engine sees it: the loop may report its first tokens at any step.
        stream = RequestStream(request_id, self._abort_soon)
        self._streams[request_id] = stream
        self._live.add(request_id)
        try:
            await self._on_engine(self.engine.add_request, prompt, sampling_params, request_id, True)
        except (ValueError, TypeError):  # refused: nothing was queued
            self._streams.pop(request_id, None)
            self._live.discard(request_id)
            raise
        except BaseException:  # e.g. cancelled while the engine thread adds it: it may be in now
            stream.close()
            raise
        self._wake.set()
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
        if self._dead is not None:
            return None
        output = await self._on_engine(self.engine.abort, request_id)
        self._live.discard(request_id)
        if output is not None:
            self._dispatch(output)
        return output

    def _abort_soon(self, request_id: str) -> None:
        """Abort without waiting: from a `finally` of a cancelled task, where awaiting is not
        possible, the abort runs as a task of its own."""
        self._streams.pop(request_id, None)
        if request_id not in self._live or self._dead is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # closed outside the event loop (at exit): nothing is running anymore
            return
        task = loop.create_task(self.abort(request_id))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ------------------------------------------------------------------------------------------
    # The loop
    # ------------------------------------------------------------------------------------------
    def _start_loop(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(f"the engine loop has stopped: {self._dead}")
        if self._loop_task is None:
            self._wake = asyncio.Event()
            self._loop_task = asyncio.get_running_loop().create_task(self._run(), name="minivllm-loop")

    async def _on_engine(self, fn, *args):
        """Run one engine call in the engine thread and wait for it without blocking the loop."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, partial(fn, *args))

    async def _run(self) -> None:
        """Step while requests are in flight; sleep on `_wake` while none is."""
        try:
            while True:
                if not self._live:
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                try:
                    outputs = await self._on_engine(self.engine.step)
                except Exception as err:  # the engine has finished that step's requests ("error")
                    await self._fail_step(err)
                    continue
                for output in outputs:
                    self._dispatch(output)
        except asyncio.CancelledError:
            raise
        except BaseException as err:  # a bug of the loop itself: nobody may wait forever
            self._die(err)
            raise

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

    async def _fail_step(self, err: Exception) -> None:
        """Deliver the step's error to the requests it finished, and only to them."""
        finished = await self._on_engine(self._finished_outputs, list(self._live))
        error = EngineStepError(f"the engine step failed: {type(err).__name__}: {err}")
        for output in finished:
            self._live.discard(output.request_id)
            if self.on_output is not None:  # as a delta: nothing new, finished ("error")
                self.on_output(_nothing_new(output))
            stream = self._streams.pop(output.request_id, None)
            if stream is not None:
                stream.put(error)

    def _finished_outputs(self, request_ids: list[str]) -> list[RequestOutput]:
        """(engine thread) The outputs of those requests that the engine has finished."""
        outputs = []
        for request_id in request_ids:
            try:
                output = self.engine.get_output(request_id)
            except KeyError:  # not added yet (its add_request is queued behind this call)
                continue
            if output.finished:
                outputs.append(output)
        return outputs

    def _die(self, err: BaseException) -> None:
        self._dead = err
        error = EngineDeadError(f"the engine loop stopped: {type(err).__name__}: {err}")
        for stream in self._streams.values():
            stream.put(error)
        self._streams.clear()
        self._live.clear()

    # ------------------------------------------------------------------------------------------
    # Looking inside, and stopping
    # ------------------------------------------------------------------------------------------
    @property
    def num_in_flight(self) -> int:
        """Requests the loop is still stepping for."""
        return len(self._live)

    @property
    def is_running(self) -> bool:
        """The loop is alive (started, or ready to start on the first request)."""
        return self._dead is None and (self._loop_task is None or not self._loop_task.done())

    async def drain(self, timeout: float) -> None:
        """Take no new request; let those in flight finish for up to `timeout` seconds, then abort
        the rest (their streams end with finish_reason "abort")."""
        self._draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(timeout, 0.0)
        while self._live and self._dead is None and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if self._dead is None:
            for request_id in list(self._live):
                await self.abort(request_id)

    async def shutdown(self) -> None:
        """Abort every request still running (their streams end with finish_reason "abort"),
        stop the loop and the engine thread. The engine is not used again."""
        if self._dead is None:
            for request_id in list(self._live):
                await self.abort(request_id)
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        if self._dead is None:
            self._die(RuntimeError("shut down"))
        await asyncio.to_thread(self._executor.shutdown, True)
        self.engine.close()  # tensor-parallel worker processes, if any, stop with it


def _nothing_new(output: RequestOutput) -> RequestOutput:
    """A finished request's last report as a delta: its finish reasons, no new text or tokens."""
    empty = [dataclasses.replace(c, text="", token_ids=[]) for c in output.outputs]
    return dataclasses.replace(output, outputs=empty)
