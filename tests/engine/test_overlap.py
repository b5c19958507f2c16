"""Overlap (async_scheduling) changes when the host does its work, never what comes out.

Each test runs the same requests through an engine with overlap on and one with it off and
compares every completion token for token: greedy and seeded sampling, n > 1, preemption by a
tiny KV pool, chunked prefill, prefix caching, stop strings and stop tokens, min_tokens,
penalties (which make the engine wait for each step before planning the next), and aborts.
"""

from __future__ import annotations

import pytest

from minivllm import LLM, SamplingParams

from .conftest import random_prompts

ENGINE = dict(dtype="float32", attention_backend="torch", block_size=4, max_num_seqs=6,
              max_num_batched_tokens=24, max_model_len=80)


@pytest.fixture(scope="module")
def engines(model_dir):
    """(overlap on, overlap off) on a pool small enough to force preemptions."""
    path = str(model_dir("qwen2"))
    return tuple(LLM(path, num_kv_blocks=20, async_scheduling=overlap, **ENGINE) for overlap in (True, False))


def completions(outputs):
    return [[(c.index, c.token_ids, c.text, c.finish_reason, c.stop_reason) for c in o.outputs] for o in outputs]


def mixed_params(stop_texts):
    greedy = dict(temperature=0.0, ignore_eos=True)
    return [
        SamplingParams(max_tokens=20, **greedy),
        SamplingParams(max_tokens=17, temperature=0.9, top_p=0.9, seed=11, ignore_eos=True),
        SamplingParams(max_tokens=12, n=2, temperature=1.0, top_k=20, seed=5, ignore_eos=True),
        SamplingParams(max_tokens=25, stop=stop_texts, **greedy),
        SamplingParams(max_tokens=15, min_tokens=6, stop_token_ids=[7, 8, 9, 10, 11, 12], temperature=0.0),
        SamplingParams(max_tokens=9, n=3, temperature=0.0),
        SamplingParams(max_tokens=14, repetition_penalty=1.3, frequency_penalty=0.4, seed=3, temperature=0.8),
        SamplingParams(max_tokens=30, **greedy),
    ]


def test_overlap_on_and_off_give_the_same_outputs(engines):
    on, off = engines
    prefix = random_prompts([12], seed=1)[0]
    prompts = [prefix + p for p in random_prompts([3, 9, 20, 1, 14, 6, 25, 2], seed=2)]
    # Stop strings that really occur: pieces of a greedy answer to the fourth prompt.
    probe = off.generate(prompts[3], max_tokens=25, temperature=0.0, ignore_eos=True, use_tqdm=False)[0]
    stop_texts = [probe.text[8:11], probe.text[15:17]]
    params = mixed_params(stop_texts)
    got_on = on.generate(prompts, params, use_tqdm=False)
    got_off = off.generate(prompts, params, use_tqdm=False)
    assert completions(got_on) == completions(got_off)
    assert got_off[3].finish_reason == "stop" and got_off[3].outputs[0].stop_reason in stop_texts
    for llm in engines:
        stats = llm.engine.get_stats()
        assert stats["scheduler"]["num_preemptions"] > 0, "the pool was meant to force preemptions"
        assert stats["kv_cache"]["num_used_blocks"] == 0 and not llm.engine.has_unfinished_requests()


def test_aborts_leave_the_other_requests_unchanged(engines):
    prompts = random_prompts([5, 30, 11, 18], seed=7)
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    results = []
    for llm in engines:
        ids = [llm.engine.add_request(p, params) for p in prompts]
        for _ in range(6):
            llm.engine.step()
        aborted = llm.engine.abort(ids[1])
        assert aborted.finished and aborted.finish_reason == "abort"
        assert llm.engine.abort(ids[1]) is None  # once only
        while llm.engine.has_unfinished_requests():
            llm.engine.step()
        results.append(([llm.engine.get_output(i) for i in ids], aborted))
        assert llm.engine.get_stats()["kv_cache"]["num_used_blocks"] == 0
    (on, on_aborted), (off, off_aborted) = results
    kept = [0, 2, 3]
    assert [on[i].token_ids for i in kept] == [off[i].token_ids for i in kept]
    # The aborted one stopped early; what it had is the start of the full answer.
    full = engines[1].generate(prompts[1], params, use_tqdm=False)[0].token_ids
    for partial in (on_aborted.token_ids, off_aborted.token_ids):
        assert partial == full[: len(partial)]


def test_streaming_deltas_add_up_to_the_final_output(engines):
    for llm in engines:
        prompt = random_prompts([7], seed=3)[0]
        params = SamplingParams(max_tokens=12, n=2, temperature=1.0, seed=9, ignore_eos=True)
        request_id = llm.engine.add_request(prompt, params, stream=True)
        tokens, texts, finished = {0: [], 1: []}, {0: "", 1: ""}, []
        while llm.engine.has_unfinished_requests():
            for out in llm.engine.step():
                assert out.request_id == request_id
                for c in out.outputs:
                    tokens[c.index] += c.token_ids
                    texts[c.index] += c.text
                finished.append(out.finished)
        assert finished[-1] and not any(finished[:-1])
        final = llm.engine.get_output(request_id)
        assert [tokens[c.index] for c in final.outputs] == [c.token_ids for c in final.outputs]
        assert [texts[c.index] for c in final.outputs] == [c.text for c in final.outputs]
