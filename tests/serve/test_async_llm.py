"""AsyncLLM without HTTP: many coroutines share one engine stepped by one background loop.

The oracle is the offline `LLM` on the same model directory: a request's deltas, joined, must be
exactly what `LLM.generate` returns for it.
"""

from __future__ import annotations

import asyncio
import json
import threading
from contextlib import aclosing

import jsonschema
import pytest

from minivllm import SamplingParams
from minivllm.engine.llm_engine import LLMEngine
from minivllm.entrypoints import AsyncLLM, EngineDeadError, EngineStepError
from minivllm.sampling_params import StructuredOutputsParams
from tests.engine.test_structured_output import SCHEMA, hold_compiles
from tests.serve.conftest import fail_when_set, make_engine

PROMPTS = ["Once upon a time", "The cache is cut into small blocks", [5, 6, 7, 8, 9, 10], "A small fox",
           "Keys and values of past tokens", "Read the code, change one line"]


@pytest.fixture(scope="module")
def one_seq_engine(serve_model) -> LLMEngine:
    """One sequence at a time: a second request waits while the first runs."""
    return make_engine(serve_model, max_num_seqs=1)


def run(coro_fn, timeout: float = 120):
    """asyncio.run with a bound, so a hang fails the test instead of blocking the suite."""
    return asyncio.run(asyncio.wait_for(coro_fn(), timeout))


def joined(outputs) -> dict[int, tuple[str, list[int], str | None]]:
    """Per completion index: the deltas' text and tokens joined, and the last finish reason."""
    result: dict[int, tuple[str, list[int], str | None]] = {}
    for output in outputs:
        for c in output.outputs:
            text, tokens, _ = result.get(c.index, ("", [], None))
            result[c.index] = (text + c.text, tokens + c.token_ids, c.finish_reason)
    return result


def test_concurrent_generates_equal_offline_generate(engine, offline_llm):
    params = [SamplingParams(max_tokens=6 + 3 * i, temperature=0) for i in range(len(PROMPTS))]
    params[1] = SamplingParams(max_tokens=12, temperature=0.8, seed=11, n=2)
    expected = offline_llm.generate(PROMPTS, params, use_tqdm=False)

    async def main():
        llm = AsyncLLM(engine)
        try:
            async def one(prompt, sp):
                return [out async for out in llm.generate(prompt, sp)]

            return await asyncio.gather(*(one(p, sp) for p, sp in zip(PROMPTS, params)))
        finally:
            await llm.shutdown()

    for outputs, want in zip(run(main), expected):
        assert outputs[-1].finished and not any(o.finished for o in outputs[:-1])
        got = joined(outputs)
        assert got == {c.index: (c.text, c.token_ids, c.finish_reason) for c in want.outputs}
    assert len(run_and_count_deltas(engine)) > 1  # tokens arrive in pieces, not all at the end


def run_and_count_deltas(engine) -> list:
    async def main():
        llm = AsyncLLM(engine)
        try:
            return [out async for out in llm.generate("Once", SamplingParams(max_tokens=8, temperature=0))]
        finally:
            await llm.shutdown()

    return run(main)


def test_a_compiling_grammar_holds_up_only_its_own_request(engine, offline_llm, monkeypatch):
    """In this process too, the engine thread steps the other requests while a grammar compiles:
    the plain request finishes while the structured one's `add_request` still waits, which,
    released, streams what the offline path gives."""
    release = hold_compiles(monkeypatch)
    params = SamplingParams(max_tokens=80, temperature=1.0, seed=7,
                            structured_outputs=StructuredOutputsParams(json=SCHEMA))

    async def main():
        llm = AsyncLLM(engine)
        try:
            adding = asyncio.create_task(llm.add_request(PROMPTS[0], params))
            plain = [out async for out in llm.generate(PROMPTS[1], SamplingParams(max_tokens=8, temperature=0))]
            assert plain[-1].finished and not adding.done()
            release.set()
            return [out async for out in await adding]
        finally:
            await llm.shutdown()

    text, tokens, reason = joined(run(main))[0]
    monkeypatch.undo()
    assert tokens == offline_llm.generate([PROMPTS[0]], params, use_tqdm=False)[0].outputs[0].token_ids
    assert reason == "stop"
    jsonschema.validate(json.loads(text), SCHEMA)
    assert not engine.has_unfinished_requests() and engine.block_manager.num_used_blocks == 0


def test_abort_ends_the_stream_and_frees_the_blocks(engine):
    async def main():
        llm = AsyncLLM(engine)
        try:
            stream = await llm.add_request("Once upon a time",
                                           SamplingParams(max_tokens=200, ignore_eos=True, temperature=0))
            first = await stream.__anext__()
            assert not first.finished and engine.block_manager.num_used_blocks > 0
            final = await llm.abort(stream.request_id)
            rest = [out async for out in stream]
            return first, final, rest
        finally:
            await llm.shutdown()

    first, final, rest = run(main)
    assert final.finished and final.finish_reason == "abort"
    # The stream ends with the abort (merged with any delta still queued before it), and what it
    # carried, joined, is everything the request generated.
    assert rest[-1].finished and rest[-1].finish_reason == "abort"
    assert first.token_ids + [t for out in rest for t in out.token_ids] == engine.get_output(final.request_id).token_ids
    assert not engine.has_unfinished_requests() and engine.block_manager.num_used_blocks == 0


@pytest.mark.parametrize("how", ["break", "cancel"])
def test_leaving_early_aborts_the_request(engine, how):
    async def main():
        llm = AsyncLLM(engine)
        params = SamplingParams(max_tokens=200, ignore_eos=True, temperature=0)
        try:
            if how == "break":
                async with aclosing(llm.generate("Once upon a time", params)) as outputs:
                    async for _ in outputs:
                        break
            else:
                started = asyncio.Event()

                async def consume():
                    async for _ in llm.generate("Once upon a time", params):
                        started.set()

                task = asyncio.create_task(consume())
                await started.wait()
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            for _ in range(1200):  # the abort runs as its own task: wait for it (a minute at most)
                if llm.num_in_flight == 0 and not engine.has_unfinished_requests():
                    break
                await asyncio.sleep(0.05)
            return llm.num_in_flight
        finally:
            await llm.shutdown()

    assert run(main) == 0
    assert not engine.has_unfinished_requests() and engine.block_manager.num_used_blocks == 0
    assert engine.get_stats()["engine"]["num_aborted_requests"] >= 1


def test_a_failing_step_errors_its_requests_and_the_loop_keeps_serving(one_seq_engine, offline_llm, monkeypatch):
    engine = one_seq_engine
    fail_next = fail_when_set(engine, monkeypatch)
    waiting_params = SamplingParams(max_tokens=8, temperature=0)
    expected = offline_llm.generate([PROMPTS[1], PROMPTS[3]], waiting_params, use_tqdm=False)
    seen = []

    async def main():
        llm = AsyncLLM(engine, on_output=seen.append)
        try:
            running = await llm.add_request(PROMPTS[0], SamplingParams(max_tokens=100, ignore_eos=True,
                                                                        temperature=0))
            waiting = await llm.add_request(PROMPTS[1], waiting_params)  # max_num_seqs=1: not in the step
            await running.__anext__()
            fail_next.set()
            with pytest.raises(EngineStepError, match="injected failure"):
                async for _ in running:
                    pass
            after = [out async for out in llm.generate(PROMPTS[3], waiting_params)]
            return [out async for out in waiting], after, running.request_id
        finally:
            await llm.shutdown()

    waiting_outputs, after, failed_id = run(main)
    assert joined(waiting_outputs)[0][1] == expected[0].token_ids  # untouched by the failure
    assert joined(after)[0][1] == expected[1].token_ids  # the loop kept serving
    failed = [o for o in seen if o.request_id == failed_id and o.finished]
    assert len(failed) == 1 and failed[0].finish_reason == "error" and failed[0].token_ids == []
    assert engine.get_output(failed_id).finish_reason == "error"
    assert not engine.has_unfinished_requests()


def test_the_loop_sleeps_when_idle_and_wakes_for_new_requests(engine, monkeypatch):
    calls = []
    step = engine.step
    monkeypatch.setattr(engine, "step", lambda: calls.append(threading.current_thread()) or step())

    async def main():
        llm = AsyncLLM(engine)
        try:
            await asyncio.gather(*(collect(llm, p) for p in PROMPTS[:3]))
            busy = len(calls)
            await asyncio.sleep(0.5)  # idle: a spinning loop would step hundreds of times here
            idle = len(calls) - busy
            await collect(llm, PROMPTS[3])
            return busy, idle, len(calls)
        finally:
            await llm.shutdown()

    busy, idle, total = run(main)
    assert busy > 0 and idle <= 1 and total > busy + idle
    # Every step ran in the one engine thread, never on the event loop's.
    assert {t.name for t in calls} == {calls[0].name} and calls[0] is not threading.main_thread()
    assert calls[0].name.startswith("minivllm-engine")


async def collect(llm: AsyncLLM, prompt) -> list:
    return [out async for out in llm.generate(prompt, SamplingParams(max_tokens=5, temperature=0))]


def test_bad_input_raises_at_add_request_and_queues_nothing(engine):
    async def main():
        llm = AsyncLLM(engine)
        try:
            for prompt, params, error in [("", SamplingParams(), ValueError),
                                          ([5, 100_000], SamplingParams(), ValueError),
                                          (3.5, SamplingParams(), TypeError)]:
                with pytest.raises(error):
                    await llm.add_request(prompt, params)
                assert llm.num_in_flight == 0 and not engine.has_unfinished_requests()
            stream = await llm.add_request("Hi", SamplingParams(max_tokens=2), request_id="mine")
            with pytest.raises(ValueError, match="already in use"):
                await llm.add_request("Hi", SamplingParams(max_tokens=2), request_id="mine")
            return [out async for out in stream]
        finally:
            await llm.shutdown()

    outputs = run(main)
    assert outputs[-1].finished and sum(len(o.token_ids) for o in outputs) == 2


def test_shutdown_aborts_what_runs_and_refuses_new_requests(engine):
    async def main():
        llm = AsyncLLM(engine)
        stream = await llm.add_request("Once", SamplingParams(max_tokens=200, ignore_eos=True))
        await stream.__anext__()
        await llm.shutdown()
        rest = [out async for out in stream]
        with pytest.raises(EngineDeadError):
            await llm.add_request("Hi", SamplingParams(max_tokens=2))
        return rest, llm.is_running

    rest, is_running = run(main)
    assert rest[-1].finish_reason == "abort" and not is_running
    assert not engine.has_unfinished_requests()


def test_drain_lets_requests_finish_within_the_grace_period(engine):
    async def main():
        llm = AsyncLLM(engine)
        try:
            short = await llm.add_request("Hi", SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
            await llm.drain(timeout=60)
            with pytest.raises(EngineDeadError, match="shutting down"):
                await llm.add_request("Hi", SamplingParams(max_tokens=2))
            return [out async for out in short]
        finally:
            await llm.shutdown()

    outputs = run(main)
    assert outputs[-1].finish_reason == "length" and sum(len(o.token_ids) for o in outputs) == 4
