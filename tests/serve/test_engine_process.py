"""AsyncLLM with the engine in its own process (`AsyncLLM.from_config`), what `python -m minivllm
serve` runs: outputs equal offline `LLM.generate`, aborts free the blocks in the engine process,
refused requests raise at `add_request`, a failing step errors only its requests, a killed
engine process ends every stream with EngineDeadError, and shutdown leaves no process behind
(tensor-parallel workers included). Also the merging of queued deltas (`coalesce`).

One engine process serves most tests (module scope, one event loop for all of them); the tests
that kill or stop an engine start their own. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import threading
import time
from contextlib import aclosing

import httpx
import jsonschema
import pytest

from minivllm import SamplingParams
from minivllm.entrypoints import AsyncLLM, EngineDeadError, EngineStepError, RequestStream
from minivllm.entrypoints.async_llm import coalesce
from minivllm.entrypoints.engine_core import EngineCore, EngineState, Wakeup, serve
from minivllm.outputs import CompletionOutput, RequestMetrics, RequestOutput
from minivllm.sampling_params import StructuredOutputsParams
from tests.engine.test_structured_output import SCHEMA, hold_compiles
from tests.serve.conftest import MAX_MODEL_LEN, EnginePipes, fail_when_set, make_engine
from tests.serve.test_async_llm import PROMPTS, joined

pytestmark = pytest.mark.xdist_group("engine_process")  # one worker, so one shared engine process

ENGINE = {"attention_backend": "torch", "kv_cache_memory_bytes": 8 << 20, "max_model_len": MAX_MODEL_LEN}
LONG = SamplingParams(max_tokens=200, ignore_eos=True, temperature=0)


@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def run(loop, coro_fn, timeout: float = 120):
    """Run `coro_fn()` on the module's event loop, bounded in time."""
    return loop.run_until_complete(asyncio.wait_for(coro_fn(), timeout))


@pytest.fixture(scope="module")
def llm(serve_model, loop):
    llm = AsyncLLM.from_config({"model": str(serve_model), **ENGINE, "max_num_seqs": 8})
    yield llm
    run(loop, llm.shutdown)


def _alive(pid: int) -> bool:
    try:
        import psutil
    except ImportError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE


async def _until(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


# ----------------------------------------------------------------------------------------------
# One shared engine process
# ----------------------------------------------------------------------------------------------
def test_concurrent_generates_equal_offline_generate(llm, loop, offline_llm):
    params = [SamplingParams(max_tokens=6 + 3 * i, temperature=0) for i in range(len(PROMPTS))]
    params[1] = SamplingParams(max_tokens=12, temperature=0.8, seed=11, n=2)
    expected = offline_llm.generate(PROMPTS, params, use_tqdm=False)

    async def main():
        async def one(prompt, sp):
            return [out async for out in llm.generate(prompt, sp)]

        return await asyncio.gather(*(one(p, sp) for p, sp in zip(PROMPTS, params)))

    assert llm.engine is None and llm.engine_pid != os.getpid() and llm.is_running
    for outputs, want in zip(run(loop, main), expected):
        assert outputs[-1].finished and not any(o.finished for o in outputs[:-1])
        assert joined(outputs) == {c.index: (c.text, c.token_ids, c.finish_reason) for c in want.outputs}
        # The prompt crosses once, but every output carries it, and the engine's metrics.
        assert all(o.prompt_token_ids == want.prompt_token_ids and o.prompt == want.prompt for o in outputs)
        assert outputs[-1].metrics.num_output_tokens == sum(len(c.token_ids) for c in want.outputs)
        assert outputs[-1].metrics.ttft > 0 and outputs[-1].metrics.e2e_latency >= outputs[-1].metrics.ttft


def test_abort_frees_the_blocks_in_the_engine_process(llm, loop):
    async def main():
        stream = await llm.add_request("Once upon a time", LONG)
        await stream.__anext__()
        during = await llm.stats(), llm.state
        final = await llm.abort(stream.request_id)
        rest = [out async for out in stream]
        async with aclosing(llm.generate("A small fox", LONG)) as outputs:  # leaving early aborts too
            async for _ in outputs:
                break
        await _until(lambda: llm.num_in_flight == 0)
        return during, final, rest, await llm.stats()

    (stats, state), final, rest, after = run(loop, main)
    assert stats["kv_cache"]["num_used_blocks"] > 0 and state.num_running == 1 and state.kv_cache_usage > 0
    assert final.finished and final.finish_reason == "abort" and rest[-1].finish_reason == "abort"
    assert after["kv_cache"]["num_used_blocks"] == 0 and after["engine"]["num_unfinished_requests"] == 0
    assert after["engine"]["num_aborted_requests"] - stats["engine"]["num_aborted_requests"] == 2
    assert llm.state == EngineState(0, 0, 0.0)  # what /metrics shows, as the engine process reported it


def test_bad_input_raises_at_add_request_and_queues_nothing(llm, loop):
    async def main():
        for prompt, params, error, words in [
            ("", SamplingParams(), ValueError, "must not be empty"),
            ([5, 100_000], SamplingParams(), ValueError, "outside the vocabulary"),
            (3.5, SamplingParams(), TypeError, "prompt must be"),
            ("Hi", SamplingParams(stop_token_ids=[100_000]), ValueError, "stop_token_ids"),
            ([5] * MAX_MODEL_LEN, SamplingParams(), ValueError, "max_model_len"),
        ]:
            with pytest.raises(error, match=words):  # raised in the engine process, re-raised here
                await llm.add_request(prompt, params)
            assert llm.num_in_flight == 0
        stream = await llm.add_request("Hi", SamplingParams(max_tokens=2), request_id="mine")
        with pytest.raises(ValueError, match="already in use"):
            await llm.add_request("Hi", SamplingParams(max_tokens=2), request_id="mine")
        return [out async for out in stream], await llm.stats()

    outputs, stats = run(loop, main)
    assert outputs[-1].finished and sum(len(o.token_ids) for o in outputs) == 2
    assert stats["engine"]["num_unfinished_requests"] == 0


def test_a_slow_reader_gets_the_queued_deltas_merged(llm, loop, offline_llm):
    params = SamplingParams(max_tokens=24, ignore_eos=True, temperature=0)
    want = offline_llm.generate([PROMPTS[1]], params, use_tqdm=False)[0]

    async def main():
        stream = await llm.add_request(PROMPTS[1], params)
        first = await stream.__anext__()
        await _until(lambda: llm.num_in_flight == 0)  # the engine finished; we did not read
        rest = [out async for out in stream]
        steps = (await llm.stats())["engine"]["num_steps"]
        await asyncio.sleep(0.3)
        return first, rest, steps, (await llm.stats())["engine"]["num_steps"]

    first, rest, steps_before, steps_after = run(loop, main)
    assert len(rest) == 1 and rest[0].finished  # every delta left in the queue, as one output
    assert first.text + rest[0].text == want.text and first.token_ids + rest[0].token_ids == want.token_ids
    assert steps_after == steps_before  # idle, the engine process blocks on its pipe: no steps


# ----------------------------------------------------------------------------------------------
# Merging queued deltas (no engine)
# ----------------------------------------------------------------------------------------------
def _delta(completions, finished=False, output_tokens=0) -> RequestOutput:
    metrics = RequestMetrics(0.0, 0.1, 0.2, 1.0 if finished else None, 3, output_tokens, 0, 0, 0.2, None,
                             None, None)
    return RequestOutput("r", "Hi", [1, 2, 3], completions, finished, metrics)


def test_coalesce_joins_text_and_tokens_per_completion():
    deltas = [_delta([CompletionOutput(0, "a", [1], None), CompletionOutput(1, "x", [7], None)], output_tokens=2),
              _delta([CompletionOutput(0, "b", [2], "length")], output_tokens=3),
              _delta([CompletionOutput(1, "yz", [8, 9], "stop", stop_reason=9)], finished=True, output_tokens=5)]
    merged = coalesce(deltas)
    assert merged.outputs == [CompletionOutput(0, "ab", [1, 2], "length"),
                              CompletionOutput(1, "xyz", [7, 8, 9], "stop", stop_reason=9)]
    assert merged.finished and merged.metrics is deltas[-1].metrics and merged.prompt_token_ids == [1, 2, 3]
    assert coalesce(deltas[:1]) is deltas[0]
    assert deltas[0].outputs[0].token_ids == [1]  # the inputs are left as they were


def test_a_stream_merges_what_is_queued_but_not_past_an_error():
    async def main():
        stream = RequestStream("r", on_close=lambda _: None)
        stream.put(_delta([CompletionOutput(0, "a", [1], None)]))
        stream.put(_delta([CompletionOutput(0, "b", [2], None)]))
        stream.put(EngineStepError("boom"))
        merged = await stream.__anext__()
        with pytest.raises(EngineStepError, match="boom"):
            await stream.__anext__()
        with pytest.raises(StopAsyncIteration):
            await stream.__anext__()
        late = RequestStream("s", on_close=lambda _: None)
        waiter = asyncio.ensure_future(late.__anext__())  # nothing queued: it waits for the first
        await asyncio.sleep(0.01)
        late.put(_delta([CompletionOutput(0, "c", [3], "stop")], finished=True))
        return merged, await asyncio.wait_for(waiter, 5), late

    merged, single, late = asyncio.run(main())
    assert merged.outputs == [CompletionOutput(0, "ab", [1, 2], None)] and not merged.finished
    assert single.text == "c" and late.finished


# ----------------------------------------------------------------------------------------------
# The engine's loop, in a thread: a failing step, grammars that compile while others step
# ----------------------------------------------------------------------------------------------
class LoopInThread(EnginePipes):
    """`serve` as the engine process runs it, here in a thread (so the engine can be patched),
    with this test as its one frontend."""

    def __init__(self, engine):
        super().__init__()
        self.thread = threading.Thread(target=serve, args=(EngineCore(engine), self.engine_commands,
                                                           self.engine_results), daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.send(None, "shutdown")
        self.thread.join(timeout=30)
        assert not self.thread.is_alive()


def test_a_failing_step_errors_its_requests_and_the_engine_loop_keeps_serving(serve_model, offline_llm,
                                                                              monkeypatch):
    """The step's error and the requests it ended come in one message; the others go on."""
    engine = make_engine(serve_model, max_num_seqs=1)
    fail = fail_when_set(engine, monkeypatch)
    loop = LoopInThread(engine)
    waiting_params = SamplingParams(max_tokens=8, temperature=0)
    loop.send(0, "add", PROMPTS[0], LONG, "running")
    loop.send(1, "add", PROMPTS[1], waiting_params, "waiting")  # max_num_seqs=1: not stepped yet
    loop.send(2, "add", "", waiting_params, "empty")
    loop.read_until(lambda: len(loop.replies) == 3 and "running" in loop.outputs)
    fail.set()
    loop.read_until(lambda: loop.errors)
    loop.read_until(lambda: loop.finished("waiting"))
    loop.stop()

    replies, outputs = loop.replies, loop.outputs
    assert replies[0] == (None, None) and replies[1] == (None, None)
    assert isinstance(replies[2][0], ValueError) and "must not be empty" in str(replies[2][0])
    assert loop.errors == [("RuntimeError: injected failure", ["running"])]
    last = outputs["running"][-1]
    assert last.finished and last.finish_reason == "error" and last.token_ids == []
    want = offline_llm.generate([PROMPTS[1]], waiting_params, use_tqdm=False)[0]
    assert joined(outputs["waiting"])[0][1] == want.token_ids  # untouched by the failure
    assert not engine.has_unfinished_requests()


JSON = SamplingParams(max_tokens=80, temperature=1.0, seed=3, structured_outputs=StructuredOutputsParams(json=SCHEMA))


def test_the_engine_loop_steps_the_others_while_a_grammar_compiles(serve_model, offline_llm, monkeypatch):
    """The add of a structured request is answered only once its grammar has compiled; another
    request added after it runs to its end meanwhile. Released, the structured request gives what
    the offline (synchronous) path gives, valid JSON; a schema that cannot compile is refused
    in its add's answer, naming the field."""
    engine = make_engine(serve_model)
    release = hold_compiles(monkeypatch)
    loop = LoopInThread(engine)
    bad = SamplingParams(structured_outputs=StructuredOutputsParams(json={"type": "nonsense"}))
    loop.send(0, "add", PROMPTS[0], JSON, "json")
    loop.send(1, "add", PROMPTS[1], bad, "bad")
    loop.send(2, "add", PROMPTS[3], SamplingParams(max_tokens=8, temperature=0), "plain")
    loop.read_until(lambda: loop.finished("plain"))
    assert 0 not in loop.replies and 1 not in loop.replies and "json" not in loop.outputs
    release.set()
    loop.read_until(lambda: loop.finished("json") and 1 in loop.replies)
    loop.stop()

    assert loop.replies[0] == (None, None) and loop.replies[2] == (None, None)
    assert isinstance(loop.replies[1][0], ValueError) and "structured_outputs.json" in str(loop.replies[1][0])
    text, tokens, reason = joined(loop.outputs["json"])[0]
    monkeypatch.undo()
    assert tokens == offline_llm.generate([PROMPTS[0]], JSON, use_tqdm=False)[0].outputs[0].token_ids
    assert reason == "stop"
    jsonschema.validate(json.loads(text), SCHEMA)
    assert not engine._prepared and engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_an_abort_while_the_grammar_compiles_answers_both_calls(serve_model, monkeypatch):
    """Aborted before its grammar is ready, a request is answered at once: its add (it was
    accepted), and the abort with its final output, every sample "abort". Nothing stays behind,
    and the loop serves the same schema afterwards."""
    engine = make_engine(serve_model)
    release = hold_compiles(monkeypatch)
    loop = LoopInThread(engine)
    loop.send(0, "add", PROMPTS[0], dataclasses.replace(JSON, n=2), "json")
    loop.send(1, "abort", "json")
    loop.read_until(lambda: 0 in loop.replies and 1 in loop.replies)
    assert loop.replies[0] == (None, None) and loop.replies[1][0] is None
    aborted = loop.decoder.decode(loop.replies[1][1])
    assert aborted.finished and [c.finish_reason for c in aborted.outputs] == ["abort", "abort"]
    release.set()
    loop.send(2, "add", PROMPTS[1], JSON, "again")
    loop.read_until(lambda: loop.finished("again"))
    loop.stop()

    jsonschema.validate(json.loads(joined(loop.outputs["again"])[0][0]), SCHEMA)
    assert "json" not in loop.outputs  # never scheduled
    assert not engine._prepared and not engine.has_unfinished_requests()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_a_compile_that_ends_while_the_loop_is_idle_wakes_it(serve_model, monkeypatch):
    """With nothing to step, the loop waits on its pipes with no timeout: the end of a compile
    must wake it. The add is taken and looked at while its compile is held (the stats call sent
    after it is answered only after that), then the compile is released, and the request must
    be queued and run to its end with no further word from the frontend."""
    engine = make_engine(serve_model)
    release = hold_compiles(monkeypatch)
    loop = LoopInThread(engine)
    try:
        loop.send(0, "add", PROMPTS[0], JSON, "json")
        loop.send(1, "stats")
        loop.read_until(lambda: 1 in loop.replies)
        assert 0 not in loop.replies and not engine.has_unfinished_requests()  # idle, compiling
        release.set()
        loop.read_until(lambda: loop.finished("json"), timeout=60)
    finally:
        release.set()
        loop.stop()

    assert loop.replies[0] == (None, None)
    text, _, reason = joined(loop.outputs["json"])[0]
    assert reason == "stop"
    jsonschema.validate(json.loads(text), SCHEMA)
    assert not engine._prepared and engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_a_wakeup_set_from_threads_wakes_one_wait_and_nothing_after_close():
    """`Wakeup`: sets from many threads make its fd readable until one `clear`; a set after
    `close` writes nothing, not even to a pipe that took over its numbers (a grammar thread may
    finish after the loop has left)."""
    wakeup = Wakeup()
    assert multiprocessing.connection.wait([wakeup.fd], timeout=0) == []
    threads = [threading.Thread(target=wakeup.set) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert multiprocessing.connection.wait([wakeup.fd], timeout=30) == [wakeup.fd]
    wakeup.clear()
    assert multiprocessing.connection.wait([wakeup.fd], timeout=0) == []
    wakeup.close()
    read, write = os.pipe()  # most likely the numbers the wakeup's pipe had
    try:
        wakeup.set()
        assert multiprocessing.connection.wait([read], timeout=0) == []
    finally:
        os.close(read)
        os.close(write)


# ----------------------------------------------------------------------------------------------
# Engine processes of their own: killed, failing to start, tensor-parallel
# ----------------------------------------------------------------------------------------------
def test_a_killed_engine_process_ends_every_stream_and_health_turns_503(serve_model, loop):
    from minivllm.entrypoints.api_server import build_app

    doomed = AsyncLLM.from_config({"model": str(serve_model), **ENGINE})
    app = build_app(doomed, "tiny")
    pid = doomed.engine_pid

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as http:
            healthy = (await http.get("/health")).status_code
            streams = [await doomed.add_request(p, LONG) for p in PROMPTS[:3]]
            await streams[0].__anext__()
            os.kill(pid, signal.SIGKILL)
            for stream in streams:
                with pytest.raises(EngineDeadError, match="died"):
                    async for _ in stream:
                        pass
            dead = (await http.get("/health")).status_code
            with pytest.raises(EngineDeadError):
                await doomed.add_request("Hi", SamplingParams(max_tokens=2))
            refused = await http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
            await doomed.shutdown()
            return healthy, dead, refused

    healthy, dead, refused = run(loop, main)
    assert (healthy, dead) == (200, 503) and not doomed.is_running
    assert refused.status_code == 503 and "not running" in refused.json()["error"]["message"]
    assert not _alive(pid) and doomed.num_in_flight == 0


def test_shutdown_kills_an_engine_process_that_does_not_answer(serve_model, loop, monkeypatch):
    from minivllm.entrypoints import engine_core

    stuck = AsyncLLM.from_config({"model": str(serve_model), **ENGINE})
    pid = stuck.engine_pid
    monkeypatch.setattr(engine_core, "STOP_TIMEOUT_S", 1.0)
    stop, stops = engine_core.stop_children, []

    def watched_stop(children, message, timeout):
        stop(children, message, timeout)
        stops.extend((timeout, child.process.exitcode) for child in children)

    monkeypatch.setattr(engine_core, "stop_children", watched_stop)

    async def main():
        stream = await stuck.add_request("Once upon a time", LONG)
        await stream.__anext__()
        os.kill(pid, signal.SIGSTOP)  # as if hung in a step: no answer to the aborts or to "shutdown"
        await stuck.shutdown()
        with pytest.raises(EngineDeadError, match="shut down"):
            async for _ in stream:
                pass

    run(loop, main)
    # It was given STOP_TIMEOUT_S to leave, then killed: shutdown never waits for a hung engine.
    assert stops == [(1.0, -signal.SIGKILL)]
    assert not stuck.is_running and not _alive(pid)


def test_bad_arguments_are_refused_before_any_process_starts(serve_model):
    before = set(multiprocessing.active_children())
    with pytest.raises(TypeError, match="config must be"):
        AsyncLLM.from_config(str(serve_model))
    with pytest.raises(ValueError, match="unknown config key 'max_num_seq'"):
        AsyncLLM.from_config({"model": str(serve_model), "max_num_seq": 4})
    with pytest.raises(ValueError, match="start_timeout"):
        AsyncLLM.from_config({"model": str(serve_model), **ENGINE}, start_timeout=0)
    with pytest.raises(TypeError, match="engine must be"):
        AsyncLLM("not an engine")
    assert set(multiprocessing.active_children()) == before


def test_a_model_that_cannot_load_raises_its_error_and_leaves_no_process(serve_model, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(serve_model, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    before = set(multiprocessing.active_children())
    with pytest.raises(ValueError, match="not a valid safetensors file"):  # the loader's own words
        AsyncLLM.from_config({"model": str(broken), **ENGINE})
    assert set(multiprocessing.active_children()) == before


def test_tensor_parallel_engine_process_serves_and_stops_with_its_workers(serve_model, loop, offline_llm):
    tp = AsyncLLM.from_config({"model": str(serve_model), **ENGINE, "tensor_parallel_size": 2, "device": "cpu"})
    pids = [tp.engine_pid]
    try:
        import psutil

        pids += [child.pid for child in psutil.Process(tp.engine_pid).children(recursive=True)]
        assert len(pids) >= 2  # the engine process started its tensor-parallel worker
    except ImportError:
        pass
    params = SamplingParams(max_tokens=10, temperature=0)
    expected = offline_llm.generate(PROMPTS[:3], params, use_tqdm=False)

    async def main():
        async def one(prompt):
            return [out async for out in tp.generate(prompt, params)]

        try:
            return await asyncio.gather(*(one(p) for p in PROMPTS[:3]))
        finally:
            await tp.shutdown()

    for outputs, want in zip(run(loop, main), expected):
        assert joined(outputs)[0][1] == want.token_ids
    assert not any(_alive(pid) for pid in pids)
    assert all(p.pid not in pids for p in multiprocessing.active_children())
