"""The engine on a real model (SmolLM2-135M-Instruct, CPU, float32) equals Hugging Face greedy.

Random weights make flat, noisy logits where a near-tie can hide a wrong token or flip on a
rounding difference; a trained model has a real answer. Greedy decoding must give transformers'
tokens exactly, for raw prompts and through the chat template, and chunked prefill, preemption
and prefix caching (which change *how* the tokens are computed) must not change a single one.
Outputs are short (16 tokens) and the prompts few, so the module runs in about a minute.
"""

from __future__ import annotations

import pytest
import torch

from minivllm import LLM
from tests.real_model import FRANCE, chat_prompt

MAX_TOKENS = 16
# One worker runs the whole module, so its Hugging Face oracle is computed once.
pytestmark = pytest.mark.xdist_group("real-model-engine")
RAW = ["The capital of Germany is", "def fibonacci(n):"]
QUESTIONS = [FRANCE, "Write a haiku about the sea."]


@pytest.fixture(scope="module")
def prompts(smollm2) -> list[str]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(smollm2))
    return RAW + [chat_prompt(tokenizer, q) for q in QUESTIONS]


@pytest.fixture(scope="module")
def hf_greedy(smollm2, prompts) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, transformers' greedy continuation) for every prompt, one prompt at a time."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(smollm2))
    model = AutoModelForCausalLM.from_pretrained(str(smollm2), dtype=torch.float32).eval()
    results = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=MAX_TOKENS)
        results.append((ids[0].tolist(), out[0, ids.shape[1]:].tolist()))
    return results


def generate(model, prompts, **config):
    llm = LLM(str(model), dtype="float32", device="cpu", attention_backend="torch", **config)
    return llm, llm.generate(prompts, max_tokens=MAX_TOKENS, temperature=0, use_tqdm=False)


def assert_matches_hf(outputs, expected):
    for out, (prompt_ids, tokens) in zip(outputs, expected, strict=True):
        assert out.prompt_token_ids == prompt_ids  # the engine tokenizes as transformers does
        assert out.token_ids == tokens, f"{out.prompt!r}: {out.text!r}"


def test_greedy_equals_hf_raw_and_through_the_chat_template(smollm2, prompts, hf_greedy):
    llm, outputs = generate(smollm2, prompts)
    assert_matches_hf(outputs, hf_greedy)
    assert outputs[2].text == "The capital of France is Paris."
    assert outputs[2].finish_reason == "stop"  # at <|im_end|>, the end of the assistant's turn
    assert llm.engine.get_stats()["scheduler"]["avg_batch_size"] > 1  # the four ran together


def test_chunked_prefill_leaves_the_text_unchanged(smollm2, prompts, hf_greedy):
    llm, outputs = generate(smollm2, prompts, max_num_batched_tokens=8, max_num_seqs=4,
                            enable_prefix_caching=False)
    assert llm.engine.get_stats()["scheduler"]["num_partial_prefills"] > 0
    assert_matches_hf(outputs, hf_greedy)


@pytest.mark.filterwarnings("ignore:the KV pool")  # tiny on purpose
def test_preemption_leaves_the_text_unchanged(smollm2, prompts, hf_greedy):
    # 16 blocks of 4 slots: one chat prompt and its answer fit (14 blocks), all four (about 40) don't.
    llm, outputs = generate(smollm2, prompts, block_size=4, num_kv_blocks=16, enable_prefix_caching=False)
    assert llm.engine.get_stats()["scheduler"]["num_preemptions"] > 0
    assert_matches_hf(outputs, hf_greedy)
    assert llm.engine.get_stats()["kv_cache"]["num_free_blocks"] == 16


def test_prefix_caching_leaves_the_text_unchanged(smollm2, prompts, hf_greedy):
    llm = LLM(str(smollm2), dtype="float32", device="cpu", attention_backend="torch", block_size=4,
              enable_prefix_caching=True)
    first = llm.generate(prompts[2], max_tokens=MAX_TOKENS, temperature=0, use_tqdm=False)
    assert first[0].metrics.num_cached_tokens == 0
    again = llm.generate(prompts[2:], max_tokens=MAX_TOKENS, temperature=0, use_tqdm=False)
    # The same chat prompt again, all but its last block; the other shares the system prompt.
    assert again[0].metrics.num_cached_tokens == (len(hf_greedy[2][0]) - 1) // 4 * 4
    assert again[1].metrics.num_cached_tokens >= 20
    assert_matches_hf(first + again, hf_greedy[2:3] + hf_greedy[2:])
