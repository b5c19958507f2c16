"""A failing step strands nothing; the stop rules hold at the edges.

Failures are injected where a real one would surface: the model runner raising while it
launches a step (a bad kernel input, CUDA out of memory) and the wait for a step's tokens
raising (an error reported by the GPU at the sync).
"""

from __future__ import annotations

import pytest

from minivllm import LLM, SamplingParams
from minivllm.worker.model_runner import SampledTokens

from .conftest import random_prompts

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


@pytest.fixture(params=[True, False], ids=["overlap", "no-overlap"])
def llm(model_dir, request):
    return LLM(str(model_dir("llama")), dtype="float32", attention_backend="torch", block_size=4,
               num_kv_blocks=64, max_num_seqs=4, max_model_len=64, async_scheduling=request.param)


def fail_on_call(monkeypatch, obj, name, call: int, error=RuntimeError("injected failure")):
    """Make `obj.name` raise `error` on its `call`-th call (1-based), and only then."""
    original = getattr(obj, name)
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            raise error
        return original(*args, **kwargs)

    monkeypatch.setattr(obj, name, wrapper)
    return calls


def assert_clean(llm):
    engine = llm.engine
    assert not engine.has_unfinished_requests()
    assert not engine.scheduler.running and not engine.scheduler.waiting
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


@pytest.mark.parametrize("where", ["launch", "wait"])
def test_generate_aborts_its_requests_when_a_step_fails_and_the_engine_stays_usable(llm, monkeypatch, where):
    prompts = random_prompts([5, 9, 13, 6, 20], seed=4)  # 5 requests, 4 at a time: one waits
    expected = llm.generate(prompts, GREEDY, use_tqdm=False)
    if where == "launch":
        fail_on_call(monkeypatch, llm.engine.executor, "execute", call=3)
    else:
        fail_on_call(monkeypatch, SampledTokens, "wait", call=3)
    with pytest.raises(RuntimeError, match="injected failure"):
        llm.generate(prompts, GREEDY, use_tqdm=False)
    assert_clean(llm)
    monkeypatch.undo()
    again = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.token_ids for o in again] == [o.token_ids for o in expected]
    assert llm.engine.get_stats()["engine"]["num_failed_requests"] >= 1


def test_the_requests_of_a_failed_step_finish_with_an_error(llm, monkeypatch):
    engine = llm.engine
    ids = [llm.engine.add_request(p, GREEDY) for p in random_prompts([5, 9], seed=6)]
    llm.engine.step()
    fail_on_call(monkeypatch, engine.executor, "execute", call=1)
    with pytest.raises(RuntimeError, match="injected failure"):
        llm.engine.step()
    monkeypatch.undo()
    outputs = [llm.engine.get_output(i) for i in ids]
    assert all(o.finished and o.finish_reason == "error" for o in outputs)
    # The engine hands those outputs over once, to whoever serves the requests.
    assert sorted(o.request_id for o in engine.take_failed_outputs()) == sorted(ids)
    assert engine.take_failed_outputs() == []
    assert_clean(llm)
    late = llm.engine.add_request(random_prompts([7], seed=8)[0], GREEDY)
    while llm.engine.has_unfinished_requests():
        llm.engine.step()
    assert len(llm.engine.get_output(late).token_ids) == 8


def test_an_interrupted_generate_frees_everything(llm, monkeypatch):
    fail_on_call(monkeypatch, llm.engine, "step", call=2, error=KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        llm.generate(random_prompts([5, 9, 3], seed=1), GREEDY, use_tqdm=False)
    assert_clean(llm)


def test_a_stop_string_completed_by_the_last_allowed_token_wins(model_dir):
    llm = LLM(str(model_dir("qwen3")), dtype="float32", attention_backend="torch", block_size=4,
              num_kv_blocks=64, max_num_seqs=4, max_model_len=64)
    detok = llm.engine.detokenizer
    for prompt in random_prompts([6, 8, 10, 12, 14, 5, 7, 9, 11, 13], seed=12):
        full = llm.generate(prompt, GREEDY, use_tqdm=False)[0]
        before = llm.engine.tokenizer.decode(full.token_ids[:-1])
        # A stop string that ends the text and occurs nowhere earlier: only the 8th token, the
        # one that also reaches max_tokens, completes it. (Random tokens can end mid-character;
        # such a tail is no text anyone would stop on.)
        stops = [full.text[-n:] for n in range(2, 7) if len(full.text) - n < len(before)]
        stops = [s for s in stops if "\ufffd" not in s and full.text.find(s) == len(full.text) - len(s)]
        if not stops:
            continue
        stop = stops[0]
        for include in (False, True):
            params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, stop=[stop],
                                    include_stop_str_in_output=include)
            out = llm.generate(prompt, params, use_tqdm=False)[0]
            assert out.finish_reason == "stop" and out.outputs[0].stop_reason == stop
            assert out.token_ids == full.token_ids
            assert out.text == (full.text if include else full.text[: len(full.text) - len(stop)])
        assert detok is llm.engine.detokenizer
        return
    pytest.fail("no prompt gave a usable stop string; pick other prompts")


def test_aborting_before_the_samples_fork_still_returns_n_completions(llm):
    request_id = llm.engine.add_request(random_prompts([9], seed=2)[0], SamplingParams(n=3, max_tokens=4))
    out = llm.engine.abort(request_id)
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(c.finish_reason == "abort" and c.token_ids == [] for c in out.outputs)
    assert_clean(llm)


def test_max_tokens_beyond_the_model_length_is_said_not_silently_capped(llm):
    prompt = random_prompts([10], seed=3)[0]
    with pytest.warns(UserWarning, match="max_model_len=64"):
        out = llm.generate(prompt, SamplingParams(max_tokens=1000, temperature=0.0, ignore_eos=True),
                           use_tqdm=False)[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 64 - 10


def test_stop_token_ids_outside_the_vocabulary_are_refused_at_the_door(llm):
    with pytest.raises(ValueError, match="stop_token_ids"):
        llm.engine.add_request([5, 6, 7], SamplingParams(min_tokens=2, stop_token_ids=[10**6]))
    assert_clean(llm)


def test_sampling_params_of_the_wrong_type_are_refused_naming_them(llm):
    with pytest.raises(TypeError, match="sampling_params"):
        llm.engine.add_requests([[5, 6, 7]], "temperature=0")
    assert_clean(llm)
