"""tensor_parallel_size=2 on two CPU processes (gloo) gives the tokens one process gives.

Greedy decoding equals Hugging Face `generate` token for token for tiny Llama, Qwen2, Qwen3 and
OPT models, in float32, under the scheduling that stresses the split the most: a KV pool small
enough to force preemptions, a token budget small enough to chunk every prompt, and prefix
caching, with overlap on (the default). Then, on a model with one KV head (replicated on both
ranks) and a vocabulary that does not divide by 2, with overlap off: greedy still equals
Hugging Face, and *sampled* tokens, seeded and unseeded, equal those of one process: if the
ranks ever drew different tokens, their next inputs would differ and so would the outputs.
"""

from __future__ import annotations

import gc
import json

import pytest

from minivllm import LLM, SamplingParams
from tests.engine.conftest import random_prompts

from .conftest import CPU_ENGINE, pid_alive

MAX_TOKENS = 12
PROMPTS = random_prompts([5, 16, 3, 29, 8], seed=1)
SHARED = PROMPTS + [PROMPTS[1] + [5, 6, 7]]  # the last one starts with another's 16 tokens


def assert_matches_hf(outputs, prompts, variant, hf_greedy):
    for prompt, out in zip(prompts, outputs, strict=True):
        assert out.token_ids == hf_greedy(variant, prompt, MAX_TOKENS), f"{variant}: {len(prompt)}-token prompt"


@pytest.mark.filterwarnings("ignore:the KV pool")  # tiny on purpose
@pytest.mark.parametrize("variant", ["llama", "qwen2", "qwen3", "opt"])
def test_two_ranks_match_hf_through_preemption_chunking_and_prefix_caching(variant, model_dir, hf_greedy):
    with LLM(str(model_dir(variant)), tensor_parallel_size=2, num_kv_blocks=14, max_num_batched_tokens=8,
             max_num_seqs=4, enable_prefix_caching=True, **CPU_ENGINE) as llm:
        outputs = llm.generate(SHARED, max_tokens=MAX_TOKENS, temperature=0, use_tqdm=False)
        stats = llm.engine.get_stats()
    assert_matches_hf(outputs, SHARED, variant, hf_greedy)
    assert stats["scheduler"]["num_preemptions"] > 0, "the pool was meant to force preemptions"
    assert stats["scheduler"]["num_partial_prefills"] > 0, "the budget was meant to chunk prompts"
    assert stats["kv_cache"]["prefix_cache_hit_tokens"] > 0, "the shared prefix was meant to hit"
    assert stats["kv_cache"]["num_used_blocks"] == 0


def sampled(llm, prompts):
    params = [
        SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, seed=11, ignore_eos=True),
        SamplingParams(max_tokens=8, n=2, temperature=1.0, top_k=20, seed=5, ignore_eos=True),
        SamplingParams(max_tokens=10, temperature=0.8, ignore_eos=True),  # the global RNG
        SamplingParams(max_tokens=9, repetition_penalty=1.3, temperature=0.7, seed=3, ignore_eos=True),
    ]
    return [[c.token_ids for c in o.outputs] for o in llm.generate(prompts[:4], params, use_tqdm=False)]


def test_replicated_kv_head_padded_vocabulary_and_sampling_without_overlap(model_dir, hf_greedy):
    path = str(model_dir("llama-mqa"))
    prompts = random_prompts([5, 16, 3, 29, 8], seed=1, vocab=509)
    engine = dict(max_num_seqs=4, async_scheduling=False, **CPU_ENGINE)
    # Two ranks first, then one: each engine seeds the process's RNG when it starts, and the
    # unseeded request draws from it, so both must run in the same order from a fresh start.
    two = LLM(path, tensor_parallel_size=2, **engine)
    pids = two.engine.executor.worker_pids
    greedy = two.generate(prompts, max_tokens=MAX_TOKENS, temperature=0, use_tqdm=False)
    draws_two = sampled(two, prompts)
    assert two.engine.get_stats()["engine"]["async_scheduling"] is False
    del two  # no close(): the garbage collector must stop the worker
    gc.collect()
    assert pids and not any(pid_alive(pid) for pid in pids)
    assert_matches_hf(greedy, prompts, "llama-mqa", hf_greedy)
    one = LLM(path, **engine)
    one.generate(prompts, max_tokens=MAX_TOKENS, temperature=0, use_tqdm=False)
    assert sampled(one, prompts) == draws_two


def test_two_ranks_give_one_process_log_probabilities(model_dir):
    """Token and prompt log-probabilities (the prompt's logits computed chunk by chunk, an
    all-gather each) come out of two ranks as out of one."""
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=3, prompt_logprobs=2)
    engine = dict(max_num_seqs=4, max_num_batched_tokens=8, **CPU_ENGINE)

    def run(**tp):
        with LLM(str(model_dir("qwen2")), **engine, **tp) as llm:
            return llm.generate(PROMPTS, params, use_tqdm=False)

    def flat(out):
        entries = out.prompt_logprobs[1:] + out.outputs[0].logprobs
        return [(t, lp.rank) for e in entries for t, lp in e.items()], [lp.logprob for e in entries for lp in e.values()]

    for two, one in zip(run(tensor_parallel_size=2), run(), strict=True):
        assert two.token_ids == one.token_ids
        (ids_two, values_two), (ids_one, values_one) = flat(two), flat(one)
        assert ids_two == ids_one and values_two == pytest.approx(values_one, abs=1e-4)


def test_two_ranks_speculate_with_ngram_drafts_like_one(model_dir, hf_greedy):
    """Every rank verifies the same drafts and draws the same tokens: greedy equals Hugging
    Face, and seeded sampling with speculation equals one process's (a draft model would run
    on one rank only, so speculative_config 'draft' is refused with two)."""
    from tests.engine.test_speculative_decoding import repetitive_prompts

    prompts = repetitive_prompts(2, seed=1)
    ngram = {"method": "ngram", "num_speculative_tokens": 3}
    engine = dict(max_num_seqs=4, max_model_len=96, speculative_config=ngram, **CPU_ENGINE)
    params = SamplingParams(max_tokens=14, temperature=0.5, top_k=3, seed=9, ignore_eos=True)
    with LLM(str(model_dir("qwen3")), tensor_parallel_size=2, **engine) as two:
        greedy = two.generate(prompts, max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True, use_tqdm=False)
        draws_two = [o.token_ids for o in two.generate(prompts, params, use_tqdm=False)]
        assert two.engine.get_stats()["speculative"]["num_accepted_tokens"] > 0
    for prompt, out in zip(prompts, greedy):
        assert out.token_ids == hf_greedy("qwen3", prompt, MAX_TOKENS)
    one = LLM(str(model_dir("qwen3")), **engine)
    assert [o.token_ids for o in one.generate(prompts, params, use_tqdm=False)] == draws_two
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        LLM(str(model_dir("qwen3")), tensor_parallel_size=2, **dict(engine, speculative_config={
            "method": "draft", "model": str(model_dir("qwen3")), "num_speculative_tokens": 2}))
def test_structured_output_two_ranks_draw_what_one_draws(model_dir):
    """The grammar bitmask reaches both ranks (ModelRunner.sample on each): seeded, sampled JSON
    with n = 2 and overlap on is the same on two ranks as on one, and validates."""
    import jsonschema

    from minivllm.sampling_params import StructuredOutputsParams

    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 22, 333]}},
              "required": ["ok", "n"]}
    params = [SamplingParams(max_tokens=40, n=2, temperature=1.0, seed=3,
                             structured_outputs=StructuredOutputsParams(json=schema)),
              SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)]  # unstructured, same steps
    prompts = random_prompts([5, 9], seed=2)
    with LLM(str(model_dir("qwen3")), tensor_parallel_size=2, **CPU_ENGINE) as two:
        draws = [[c.token_ids for c in o.outputs] for o in two.generate(prompts, params, use_tqdm=False)]
    one = LLM(str(model_dir("qwen3")), **CPU_ENGINE).generate(prompts, params, use_tqdm=False)
    assert draws == [[c.token_ids for c in o.outputs] for o in one]
    for c in one[0].outputs:
        jsonschema.validate(json.loads(c.text), schema)
