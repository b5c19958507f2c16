"""The user API end to end on a tiny Llama: sampling, n > 1, stops, bad input, the step-level
API, tokenizer-less directories, metrics and stats."""

from __future__ import annotations

import shutil

import pytest
import torch

from minivllm import LLM, SamplingParams
from minivllm.engine.tokenizer import TOKENIZER_FILES

from .conftest import random_prompts

PROMPT = random_prompts([10], seed=5)[0]  # 10 tokens: with block_size 4 the last block is partial


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(str(model_dir("llama")), dtype="float32", attention_backend="torch", block_size=4,
               max_num_seqs=8)


def test_seeded_sampling_is_reproducible_whatever_the_batch(llm):
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=1234, max_tokens=16, ignore_eos=True)
    alone = llm.generate([PROMPT], params, use_tqdm=False)[0].token_ids
    again = llm.generate([PROMPT], params, use_tqdm=False)[0].token_ids
    others = random_prompts([3, 17, 25], seed=9)
    mixed = llm.generate(
        [others[0], PROMPT, others[1], others[2]],
        [SamplingParams(temperature=0.7, max_tokens=20), params, SamplingParams(max_tokens=5),
         SamplingParams(temperature=0)],
        use_tqdm=False,
    )[1].token_ids
    assert alone == again == mixed
    other_seed = SamplingParams(temperature=1.0, top_p=0.95, seed=4321, max_tokens=16, ignore_eos=True)
    assert llm.generate([PROMPT], other_seed, use_tqdm=False)[0].token_ids != alone


def test_n_greedy_samples_share_the_prompt_blocks_and_all_equal_hf(llm, hf_greedy):
    engine = llm.engine
    request_id = llm.engine.add_request(PROMPT, SamplingParams(n=3, temperature=0, max_tokens=12))
    llm.engine.step()  # prefill, fork, first token of each sample
    seqs = engine._unfinished[request_id].seqs
    assert len(seqs) == 3
    prompt_blocks = seqs[0].block_table[: len(PROMPT) // 4 + 1]
    assert all(engine.block_manager.ref_count(b) == 3 for b in prompt_blocks)
    assert all(s.block_table[:2] == seqs[0].block_table[:2] for s in seqs)
    while llm.engine.has_unfinished_requests():
        llm.engine.step()
    out = llm.engine.get_output(request_id)
    expected = hf_greedy("llama", PROMPT, 12)
    assert [c.index for c in out.outputs] == [0, 1, 2]
    # The partly filled prompt block was copied on write; any mix-up of the copies would show here.
    assert all(c.token_ids == expected for c in out.outputs)
    assert engine.get_stats()["scheduler"]["num_block_copies"] >= 2


def test_n_random_samples_are_distinct_and_each_is_a_valid_sample(llm, hf_greedy):
    """Each sampled token must be in the top-k of HF's distribution given *that sample's* prefix."""
    top_k = 3
    out = llm.generate([PROMPT], n=4, temperature=1.0, top_k=top_k, seed=7, max_tokens=10,
                       ignore_eos=True, use_tqdm=False)[0]
    samples = [c.token_ids for c in out.outputs]
    assert len(samples) == 4 and len({tuple(s) for s in samples}) > 1
    hf_greedy("llama", PROMPT, 1)  # loads the HF model
    model = hf_greedy.models["llama"]
    for tokens in samples:
        assert len(tokens) == 10
        ids = torch.tensor([PROMPT + tokens])
        with torch.no_grad():
            logits = model(ids).logits[0, len(PROMPT) - 1 : -1]
        kth_best = logits.topk(top_k, dim=-1).values[:, -1]
        chosen = logits[torch.arange(len(tokens)), torch.tensor(tokens)]
        assert torch.all(chosen >= kth_best - 1e-4), "a sample left HF's top-k: its K/V was wrong"


def test_stop_strings_cut_the_text(llm):
    full = llm.generate("Once upon a time", max_tokens=24, temperature=0, ignore_eos=True, use_tqdm=False)[0]
    text = full.text
    assert len(text) > 8
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    cut = llm.generate("Once upon a time", max_tokens=24, temperature=0, ignore_eos=True, stop=[stop],
                       use_tqdm=False)[0]
    assert cut.finish_reason == "stop" and cut.outputs[0].stop_reason == stop
    assert cut.text == text[: text.find(stop)]
    assert full.token_ids[: len(cut.token_ids)] == cut.token_ids
    kept = llm.generate("Once upon a time", max_tokens=24, temperature=0, ignore_eos=True, stop=stop,
                        include_stop_str_in_output=True, use_tqdm=False)[0]
    assert kept.text == text[: text.find(stop) + len(stop)]


def test_stop_token_ids_and_min_tokens(llm):
    full = llm.generate([PROMPT], max_tokens=16, temperature=0, ignore_eos=True, use_tqdm=False)[0].token_ids
    stop_id = full[4]
    first = full.index(stop_id)
    out = llm.generate([PROMPT], max_tokens=16, temperature=0, ignore_eos=True, stop_token_ids=[stop_id],
                       use_tqdm=False)[0]
    assert out.token_ids == full[: first + 1] and out.finish_reason == "stop"
    assert out.outputs[0].stop_reason == stop_id
    late = llm.generate([PROMPT], max_tokens=16, temperature=0, ignore_eos=True, stop_token_ids=[stop_id],
                        min_tokens=first + 2, use_tqdm=False)[0]
    # The stop token is banned until min_tokens are out, so it cannot appear before then.
    assert stop_id not in late.token_ids[: first + 2]
    assert len(late.token_ids) >= first + 2


def test_max_model_len_ends_generation(model_dir):
    llm = LLM(str(model_dir("llama")), attention_backend="torch", max_model_len=20, max_num_seqs=4)
    prompt = random_prompts([15], seed=2)[0]
    out = llm.generate([prompt], max_tokens=None, temperature=0, ignore_eos=True, use_tqdm=False)[0]
    assert len(out.token_ids) == 5 and out.finish_reason == "length"


def test_outputs_keep_input_order_and_carry_metrics(llm):
    prompts = ["a long prompt about the fox and the river and the forest", "Hi", "The weather today"]
    outputs = llm.generate(prompts, max_tokens=6, temperature=0.5, seed=3, use_tqdm=False)
    assert [o.prompt for o in outputs] == prompts
    for out in outputs:
        m = out.metrics
        assert out.finished and out.prompt_token_ids == llm.engine.tokenizer(out.prompt).input_ids
        assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.finish_time
        assert m.ttft > 0 and m.e2e_latency >= m.ttft and m.tokens_per_s > 0
        assert m.num_output_tokens == len(out.token_ids) and m.num_prompt_tokens == len(out.prompt_token_ids)
        if len(out.token_ids) > 1:
            assert m.tpot > 0
        assert isinstance(out.text, str) and out.to_dict()["outputs"][0]["text"] == out.text


def test_step_level_api_and_abort(llm, hf_greedy):
    """The step-level API is the engine's: LLM adds no second door to it."""
    engine, greedy = llm.engine, SamplingParams(max_tokens=8, temperature=0)
    keep = engine.add_request(PROMPT, greedy)
    drop = engine.add_request(random_prompts([7], seed=11)[0], greedy, request_id="drop-me")
    assert drop == "drop-me" and engine.get_num_unfinished_requests() == 2
    engine.step()
    engine.step()
    partial = engine.get_output(keep)
    assert not partial.finished and 1 <= len(partial.token_ids) < 8 and partial.finish_reason is None
    aborted = engine.abort(drop)
    assert aborted.finish_reason == "abort" and aborted.finished
    assert engine.abort(drop) is None
    finished = []
    while engine.has_unfinished_requests():
        finished += engine.step()
    assert [o.request_id for o in finished] == [keep]
    assert engine.get_output(keep).token_ids == hf_greedy("llama", PROMPT, 8)
    assert engine.get_output(drop).finish_reason == "abort"
    with pytest.raises(KeyError, match="unknown request id"):
        engine.get_output("never-added")
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request(PROMPT, request_id="drop-me")


@pytest.mark.parametrize(
    "prompt, kwargs, match",
    [
        ("", {}, "empty"),
        ([], {}, "empty"),
        ([5] * 600, {}, "max_model_len"),
        ([5, 100000], {}, "vocabulary"),
        ([5, 6], {"max_tokens": 0}, "max_tokens"),
        ([5, 6], {"temperature": -1.0}, "temperature"),
        ([5, 6], {"top_p": 0.0}, "top_p"),
        ([5, 6], {"top_p": 1.2}, "top_p"),
        ([5, 6], {"n": 99}, "max_num_seqs"),
        ([5, 6], {"max_tokenz": 3}, "max_tokenz"),
    ],
)
def test_bad_input_is_refused_and_the_engine_keeps_serving(llm, hf_greedy, prompt, kwargs, match):
    good = llm.engine.add_request(PROMPT, SamplingParams(max_tokens=6, temperature=0))
    llm.engine.step()
    with pytest.raises((ValueError, TypeError), match=match):
        llm.generate([prompt], use_tqdm=False, **kwargs)
    with pytest.raises((ValueError, TypeError), match=match):  # in a batch: nothing is queued
        llm.generate([[7, 8, 9], prompt], use_tqdm=False, **kwargs)
    assert llm.engine.get_num_unfinished_requests() == 1
    while llm.engine.has_unfinished_requests():
        llm.engine.step()
    assert llm.engine.get_output(good).token_ids == hf_greedy("llama", PROMPT, 6)


def test_a_pool_too_small_for_one_sequence_is_a_clear_error(model_dir, hf_greedy):
    with pytest.warns(UserWarning, match="cannot hold one sequence"):
        llm = LLM(str(model_dir("llama")), attention_backend="torch", block_size=4, num_kv_blocks=5,
                  max_num_seqs=4)
    with pytest.raises(ValueError, match="KV blocks"):
        llm.generate([PROMPT], max_tokens=20, use_tqdm=False)  # 29 slots > 5 x 4
    out = llm.generate([PROMPT], max_tokens=8, temperature=0, use_tqdm=False)[0]  # 17 slots fit
    assert out.token_ids == hf_greedy("llama", PROMPT, 8)


def test_a_directory_without_tokenizer_takes_token_ids_only(model_dir, tmp_path, hf_greedy):
    source = model_dir("llama")
    for path in source.iterdir():
        if path.name not in TOKENIZER_FILES:
            shutil.copy(path, tmp_path / path.name)
    llm = LLM(str(tmp_path), attention_backend="torch", max_num_seqs=4)
    assert llm.engine.tokenizer is None
    with pytest.raises(ValueError, match="no tokenizer"):
        llm.generate("some text", use_tqdm=False)
    with pytest.raises(ValueError, match="tokenizer"):
        llm.generate([PROMPT], stop=["x"], use_tqdm=False)
    out = llm.generate(PROMPT, max_tokens=5, temperature=0, use_tqdm=False)[0]
    assert out.token_ids == hf_greedy("llama", PROMPT, 5) and out.text == ""


def test_stats_and_block_map(llm):
    llm.generate([PROMPT, PROMPT[:5]], max_tokens=4, use_tqdm=False)
    stats = llm.engine.get_stats()
    assert stats["engine"]["num_generated_tokens"] >= 8 and stats["engine"]["num_steps"] > 0
    assert stats["kv_cache"]["num_used_blocks"] == 0  # everything finished, nothing held
    assert 0 <= stats["scheduler"]["budget_utilization"] <= 1
    assert "blocks x 4 slots" in llm.engine.render_block_map()


def test_no_prompts_no_outputs(llm):
    assert llm.generate([], use_tqdm=False) == []


def test_sampling_keywords_and_params_do_not_mix(llm):
    with pytest.raises(TypeError, match="not both"):
        llm.generate(PROMPT, SamplingParams(), max_tokens=3, use_tqdm=False)
    with pytest.raises(ValueError, match="sampling_params"):
        llm.generate([PROMPT, PROMPT], [SamplingParams()], use_tqdm=False)
