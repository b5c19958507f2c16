"""The engine's oracle (docs/design.md, "Correctness oracles"): greedy decoding equals Hugging
Face `generate`, token for token, for tiny random-weight Llama, Qwen2, Qwen3 and OPT directories, under every scheduling
regime that changes *how* the tokens are computed but must not change *which* tokens come out:
one prompt, a batch of different lengths, chunked prefill with a tiny budget, preemption forced
by a tiny KV pool, and prefix caching.
"""

from __future__ import annotations

import pytest

from minivllm import LLM

from .conftest import ARCHS, BACKEND_ON, random_prompts

MAX_TOKENS = 12
# Lengths that start, end and straddle 4-token blocks. The seed is one whose prompts make every
# tiny model say something varied (test_the_oracle_is_not_degenerate): a model that repeats one
# token would let a wrong engine match it by chance.
PROMPTS = random_prompts([5, 16, 3, 29, 8], seed=255)
MIN_DISTINCT_TOKENS = 4


def make_llm(model_dir, arch, device, **config):
    config.setdefault("block_size", 4)
    if device == "cuda":
        # A fixed, small pool: by default every engine would take 90% of the GPU's free memory, so
        # test workers running side by side (pytest -n) would leave each other no KV block.
        config.setdefault("num_kv_blocks", 2048)
        # Decode steps replay CUDA graphs there, so the oracle covers the graph path too; a few
        # batch-size buckets keep the capture at start-up short.
        config.setdefault("max_num_seqs", 8)
    return LLM(str(model_dir(arch)), dtype="float32", device=device, attention_backend=BACKEND_ON[device],
               **config)


def assert_matches_hf(outputs, prompts, arch, hf_greedy, max_tokens=MAX_TOKENS):
    for prompt, out in zip(prompts, outputs, strict=True):
        expected = hf_greedy(arch, prompt, max_tokens)
        assert out.prompt_token_ids == prompt
        assert out.token_ids == expected, f"{arch}: prompt of {len(prompt)} tokens diverges from HF"
        assert out.finish_reason == ("length" if len(expected) == max_tokens else "stop")


@pytest.mark.parametrize("arch", ARCHS)
def test_the_oracle_is_not_degenerate(arch, hf_greedy):
    """Every prompt's expected continuation has several distinct tokens."""
    distinct = [len(set(hf_greedy(arch, prompt, MAX_TOKENS))) for prompt in PROMPTS]
    assert min(distinct) >= MIN_DISTINCT_TOKENS, distinct


@pytest.mark.parametrize("arch", ARCHS)
def test_single_prompt_and_batch(arch, model_dir, hf_greedy, engine_device):
    llm = make_llm(model_dir, arch, engine_device)
    single = llm.generate(PROMPTS[3], max_tokens=MAX_TOKENS, temperature=0, use_tqdm=False)
    assert_matches_hf(single, PROMPTS[3:4], arch, hf_greedy)
    batch = llm.generate(PROMPTS, max_tokens=MAX_TOKENS, temperature=0, use_tqdm=False)
    assert_matches_hf(batch, PROMPTS, arch, hf_greedy)
    assert llm.engine.get_stats()["scheduler"]["avg_batch_size"] > 1  # they really ran together


@pytest.mark.parametrize("arch", ARCHS)
def test_chunked_prefill_with_a_tiny_budget(arch, model_dir, hf_greedy, engine_device):
    llm = make_llm(model_dir, arch, engine_device, max_num_batched_tokens=6, max_num_seqs=4,
                   enable_chunked_prefill=True, enable_prefix_caching=False)
    outputs = llm.generate(PROMPTS, max_tokens=MAX_TOKENS, temperature=0, use_tqdm=False)
    assert_matches_hf(outputs, PROMPTS, arch, hf_greedy)
    stats = llm.engine.get_stats()["scheduler"]
    assert stats["num_partial_prefills"] > 0
    assert max(r.num_batched_tokens for r in llm.engine.stats.history) <= 6


@pytest.mark.parametrize("arch", ARCHS)
def test_the_cpu_path(arch, model_dir, hf_greedy):
    """The other tests run the reference attention on a CPU; this one the CPU's own path, as a
    user gets it ("auto": the sdpa backend, float32 weights reordered for oneDNN), with chunks
    and decodes of different lengths in the same steps."""
    llm = LLM(str(model_dir(arch)), dtype="float32", device="cpu", attention_backend="auto",
              block_size=4, max_num_batched_tokens=6, max_num_seqs=4, enable_chunked_prefill=True,
              enable_prefix_caching=False)
    outputs = llm.generate(PROMPTS, max_tokens=MAX_TOKENS, temperature=0, use_tqdm=False)
    assert_matches_hf(outputs, PROMPTS, arch, hf_greedy)


@pytest.mark.filterwarnings("ignore:the KV pool")  # tiny on purpose
@pytest.mark.parametrize("arch", ARCHS)
def test_preemption_by_a_tiny_kv_pool(arch, model_dir, hf_greedy, engine_device):
    # 12 blocks of 4 slots = 48 token slots for 5 prompts that grow to 82 tokens in all.
    llm = make_llm(model_dir, arch, engine_device, num_kv_blocks=12, enable_prefix_caching=False)
    outputs = llm.generate(PROMPTS, max_tokens=MAX_TOKENS, temperature=0, use_tqdm=False)
    assert llm.engine.get_stats()["scheduler"]["num_preemptions"] > 0
    assert sum(o.metrics.num_preemptions for o in outputs) > 0
    assert_matches_hf(outputs, PROMPTS, arch, hf_greedy)
    assert llm.engine.get_stats()["kv_cache"]["num_free_blocks"] == 12


@pytest.mark.parametrize("arch", ARCHS)
def test_prefix_caching_reuses_blocks_and_keeps_the_tokens(arch, model_dir, hf_greedy, engine_device):
    llm = make_llm(model_dir, arch, engine_device, enable_prefix_caching=True)
    shared = PROMPTS[3][:21]  # 5 full blocks of 4
    first = llm.generate([shared + [7, 8, 9]], max_tokens=MAX_TOKENS, temperature=0, use_tqdm=False)
    assert first[0].metrics.num_cached_tokens == 0
    second_prompts = [shared + [10, 11], shared[:13] + [12, 13, 14, 15, 16]]
    second = llm.generate(second_prompts, max_tokens=MAX_TOKENS, temperature=0, use_tqdm=False)
    assert [o.metrics.num_cached_tokens for o in second] == [20, 12]
    assert llm.engine.get_stats()["kv_cache"]["prefix_cache_hit_tokens"] >= 32
    assert_matches_hf(first, [shared + [7, 8, 9]], arch, hf_greedy)
    assert_matches_hf(second, second_prompts, arch, hf_greedy)


@pytest.mark.filterwarnings("ignore:the KV pool")
def test_preemption_with_prefix_caching_and_chunking_together(model_dir, hf_greedy, engine_device):
    llm = make_llm(model_dir, "llama", engine_device, num_kv_blocks=14, max_num_batched_tokens=8,
                   max_num_seqs=4, enable_prefix_caching=True)
    prompts = PROMPTS + [PROMPTS[1] + [5, 6, 7]]
    outputs = llm.generate(prompts, max_tokens=MAX_TOKENS, temperature=0, use_tqdm=False)
    stats = llm.engine.get_stats()
    assert stats["scheduler"]["num_preemptions"] > 0 and stats["scheduler"]["num_partial_prefills"] > 0
    assert_matches_hf(outputs, prompts, "llama", hf_greedy)
