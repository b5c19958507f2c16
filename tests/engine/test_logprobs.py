"""Log-probabilities end to end, against transformers' log_softmax (float32, CPU).

Every scored position is checked: the token's own log-probability and rank, and the top-k ids
and values. Also through chunked prefill, prefix caching, preemption, overlap on and off,
n > 1, streaming deltas, prompt-only scoring (max_tokens=0) and the processed distribution.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from minivllm import LLM, SamplingParams

from .conftest import random_prompts

ARCH = "llama"
PROMPTS = random_prompts([3, 9, 14, 21], seed=11)
K = 5
TOL = 1e-4


@pytest.fixture(scope="module")
def hf_logits(model_dir):
    """hf_logits(ids) -> float32 [len(ids), V] logits of transformers on the same directory."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir(ARCH), dtype=torch.float32).eval()

    def run(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return model(torch.tensor([ids])).logits[0].float()

    return run


def make_llm(model_dir, **config):
    config.setdefault("block_size", 4)
    return LLM(str(model_dir(ARCH)), dtype="float32", attention_backend="torch", **config)


def assert_position(position, token: int, logits: torch.Tensor, k: int = K):
    """One entry {token id: Logprob} against log_softmax(logits): the token itself, then the top k."""
    lp = logits.log_softmax(-1)
    assert next(iter(position)) == token
    assert position[token].logprob == pytest.approx(float(lp[token]), abs=TOL)
    assert position[token].rank == 1 + int((logits > logits[token]).sum())
    top = lp.topk(k)
    for rank, (value, token_id) in enumerate(zip(top.values.tolist(), top.indices.tolist()), start=1):
        assert position[token_id].logprob == pytest.approx(value, abs=TOL)
        if token_id != token:
            assert position[token_id].rank == rank
    assert len(position) in (k, k + 1)


def assert_matches_hf(out, hf_logits, k=K, prompt_k=K):
    prompt = out.prompt_token_ids
    if prompt_k is not None:
        logits = hf_logits(prompt)
        assert len(out.prompt_logprobs) == len(prompt) and out.prompt_logprobs[0] is None
        for i in range(1, len(prompt)):
            assert_position(out.prompt_logprobs[i], prompt[i], logits[i - 1], prompt_k)
    for c in out.outputs:
        logits = hf_logits(prompt + c.token_ids)
        assert len(c.logprobs) == len(c.token_ids)
        for j, token in enumerate(c.token_ids):
            assert_position(c.logprobs[j], token, logits[len(prompt) - 1 + j], k)


GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=K, prompt_logprobs=K)


@pytest.mark.parametrize("overlap", [True, False])
def test_logprobs_equal_hf_with_chunked_prefill(model_dir, hf_logits, overlap):
    llm = make_llm(model_dir, max_num_batched_tokens=6, max_num_seqs=4, enable_chunked_prefill=True,
                   async_scheduling=overlap)
    outputs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert llm.engine.get_stats()["scheduler"]["num_partial_prefills"] > 0
    for out in outputs:
        assert_matches_hf(out, hf_logits)
    assert outputs[0].outputs[0].logprobs[0][outputs[0].token_ids[0]].decoded_token == llm.engine.tokenizer.decode(
        [outputs[0].token_ids[0]])


def test_a_prompt_to_score_skips_the_prefix_cache(model_dir, hf_logits):
    llm = make_llm(model_dir, enable_prefix_caching=True)
    prompt = PROMPTS[3]
    llm.generate([prompt], max_tokens=2, temperature=0, use_tqdm=False)  # its blocks are now cached
    plain = llm.generate([prompt], max_tokens=2, temperature=0, use_tqdm=False)[0]
    assert plain.metrics.num_cached_tokens > 0
    scored = llm.generate([prompt], GREEDY, use_tqdm=False)[0]
    assert scored.metrics.num_cached_tokens == 0
    assert_matches_hf(scored, hf_logits)


@pytest.mark.filterwarnings("ignore:the KV pool")
def test_preemption_neither_loses_nor_repeats_prompt_logprobs(model_dir, hf_logits):
    # 12 blocks of 4 slots for 4 prompts that grow to 71 tokens: some are preempted mid-way.
    llm = make_llm(model_dir, num_kv_blocks=12, max_num_batched_tokens=8, max_num_seqs=4,
                   enable_chunked_prefill=True)
    outputs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert sum(o.metrics.num_preemptions for o in outputs) > 0
    for out in outputs:
        assert_matches_hf(out, hf_logits)
    assert llm.engine.get_stats()["kv_cache"]["num_free_blocks"] == 12


def test_n_samples_each_carry_their_own_logprobs(model_dir, hf_logits):
    llm = make_llm(model_dir)
    params = SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=5, ignore_eos=True, logprobs=2,
                            prompt_logprobs=1)
    out = llm.generate([PROMPTS[2]], params, use_tqdm=False)[0]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    assert_matches_hf(out, hf_logits, k=2, prompt_k=1)


def test_stream_deltas_add_up_to_the_unstreamed_output(model_dir):
    llm = make_llm(model_dir)
    engine = llm.engine
    params = GREEDY
    request_id = engine.add_request(PROMPTS[1], params, stream=True)
    deltas = []
    while engine.has_unfinished_requests():
        deltas += [o for o in engine.step() if o.request_id == request_id]
    whole = llm.generate([PROMPTS[1]], params, use_tqdm=False)[0]
    streamed = [e for d in deltas for e in d.outputs[0].logprobs]
    assert [list(p) for p in streamed] == [list(p) for p in whole.outputs[0].logprobs]
    prompt_deltas = [d.prompt_logprobs for d in deltas if d.prompt_logprobs is not None]
    assert len(prompt_deltas) == 1 and prompt_deltas[0] == whole.prompt_logprobs


def test_a_finished_streamed_request_keeps_no_records(model_dir):
    """Its deltas delivered every record; the finished request the engine retains (for
    get_output) must not hold a tuple per scored token, or a server's memory grows with every
    token it ever scored."""
    llm = make_llm(model_dir)
    engine = llm.engine
    params = GREEDY
    request_id = engine.add_request(PROMPTS[1], params, stream=True)
    while engine.has_unfinished_requests():
        engine.step()
    seq = engine._finished[request_id].seqs[0]
    assert seq.output_logprobs is None and seq.prompt_logprobs is None
    final = engine.get_output(request_id)
    assert final.outputs[0].logprobs is None and final.prompt_logprobs is None
    assert len(final.outputs[0].token_ids) == params.max_tokens


def test_max_tokens_zero_only_scores_the_prompt(model_dir, hf_logits):
    llm = make_llm(model_dir, max_num_batched_tokens=8, max_num_seqs=4, enable_chunked_prefill=True)
    score = SamplingParams(max_tokens=0, prompt_logprobs=K, logprobs=K)
    outputs = llm.generate(PROMPTS, [score, GREEDY, score, GREEDY], use_tqdm=False)
    for out in outputs[0::2]:
        assert out.finish_reason == "length" and out.token_ids == [] and out.outputs[0].logprobs == []
        assert out.metrics.num_output_tokens == 0
        assert_matches_hf(out, hf_logits)
    for out in outputs[1::2]:
        assert_matches_hf(out, hf_logits)
    assert llm.engine.get_stats()["kv_cache"]["num_free_blocks"] == llm.engine.block_manager.num_blocks


def test_processed_logprobs_are_the_distribution_drawn_from(model_dir, hf_logits):
    llm = make_llm(model_dir)
    params = SamplingParams(temperature=0.7, top_k=4, seed=3, max_tokens=6, ignore_eos=True, logprobs=4,
                            logprobs_mode="processed")
    out = llm.generate([PROMPTS[2]], params, use_tqdm=False)[0]
    logits = hf_logits(out.prompt_token_ids + out.token_ids)
    for j, token in enumerate(out.token_ids):
        scaled = logits[len(out.prompt_token_ids) - 1 + j] / 0.7
        kept = scaled.topk(4).indices
        expected = torch.full_like(scaled, float("-inf"))
        expected[kept] = scaled[kept].log_softmax(-1)
        position = out.outputs[0].logprobs[j]
        assert token in kept.tolist()
        assert position[token].logprob == pytest.approx(float(expected[token]), abs=TOL)
        assert sorted(position) == sorted(kept.tolist())  # the token is among the 4 kept
    raw = llm.generate([PROMPTS[2]], dataclasses.replace(params, logprobs_mode="raw"),
                       use_tqdm=False)[0]
    assert raw.token_ids == out.token_ids  # the mode changes what is reported, not what is drawn


def test_logit_bias_outside_the_vocabulary_is_refused(model_dir):
    llm = make_llm(model_dir)
    with pytest.raises(ValueError, match="logit_bias holds 512, outside the vocabulary"):
        llm.generate([PROMPTS[0]], SamplingParams(logit_bias={512: 1.0}), use_tqdm=False)
