"""How EOS, stop_token_ids, stop strings, min_tokens, ignore_eos and max_tokens play together, as
SamplingParams documents it. A +100 logit_bias forces the next token, so each case is exact."""

from __future__ import annotations

import pytest

from minivllm import LLM, SamplingParams
from minivllm.models.toy_tokenizer import EOS_ID

from .conftest import random_prompts

PROMPT = random_prompts([6], seed=3)[0]


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(str(model_dir("llama")), dtype="float32", attention_backend="torch", block_size=4, max_num_seqs=4)


def run(llm, **kwargs):
    return llm.generate([PROMPT], SamplingParams(temperature=0, **kwargs), use_tqdm=False)[0].outputs[0]


def forced(token_id: int) -> dict[int, float]:
    return {token_id: 100.0}


def test_eos_stops_is_kept_in_the_tokens_and_left_out_of_the_text(llm):
    out = run(llm, logit_bias=forced(EOS_ID), max_tokens=5)
    assert out.token_ids == [EOS_ID] and out.text == "" and out.finish_reason == "stop"
    assert out.stop_reason is None


def test_ignore_eos_runs_to_max_tokens_but_stop_token_ids_still_stop(llm):
    out = run(llm, logit_bias=forced(EOS_ID), max_tokens=3, ignore_eos=True)
    assert out.token_ids == [EOS_ID] * 3 and out.finish_reason == "length"
    out = run(llm, logit_bias=forced(EOS_ID), max_tokens=3, ignore_eos=True, stop_token_ids=[EOS_ID])
    assert out.token_ids == [EOS_ID] and out.finish_reason == "stop" and out.stop_reason == EOS_ID


def test_eos_is_checked_before_stop_token_ids(llm):
    out = run(llm, logit_bias=forced(EOS_ID), max_tokens=3, stop_token_ids=[EOS_ID])
    assert out.finish_reason == "stop" and out.stop_reason is None  # EOS's rule fired, not the id's


def test_min_tokens_bans_eos_and_stop_ids_until_then(llm):
    out = run(llm, logit_bias={EOS_ID: 100.0, 77: 50.0}, max_tokens=8, min_tokens=3, stop_token_ids=[77])
    # Banned for the first 3 tokens, the forced tokens cannot be drawn; then EOS (the stronger) ends it.
    assert EOS_ID not in out.token_ids[:3] and 77 not in out.token_ids[:3]
    assert len(out.token_ids) == 4 and out.token_ids[-1] == EOS_ID and out.finish_reason == "stop"


def test_a_stop_token_is_kept_in_the_text_unless_special(llm):
    token = 77
    text = llm.engine.tokenizer.decode([token])
    out = run(llm, logit_bias=forced(token), max_tokens=4, stop_token_ids=[token])
    assert out.token_ids == [token] and out.text == text and out.stop_reason == token


def test_stop_token_ids_are_checked_before_stop_strings(llm):
    token = 77
    text = llm.engine.tokenizer.decode([token])
    out = run(llm, logit_bias=forced(token), max_tokens=4, stop_token_ids=[token], stop=[text])
    assert out.stop_reason == token and out.text == text


def test_a_stop_string_cuts_the_text_but_not_the_tokens(llm):
    token = 77
    text = llm.engine.tokenizer.decode([token])
    out = run(llm, logit_bias=forced(token), max_tokens=4, stop=[text])
    assert out.token_ids == [token] and out.text == "" and out.stop_reason == text
    kept = run(llm, logit_bias=forced(token), max_tokens=4, stop=[text], include_stop_str_in_output=True)
    assert kept.text == text


def test_a_stop_string_on_the_last_allowed_token_is_a_stop(llm):
    token = 77
    text = llm.engine.tokenizer.decode([token])
    out = run(llm, logit_bias=forced(token), max_tokens=2, min_tokens=1, stop=[text + text])
    assert out.token_ids == [token, token] and out.finish_reason == "stop" and out.text == ""
