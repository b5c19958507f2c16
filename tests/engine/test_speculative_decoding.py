"""Speculative decoding on the real engine (CPU, float32): it changes the speed, never the output.

Greedy output with speculation must be token for token the output without it: for the n-gram
proposer on every architecture (prompts that repeat themselves, so that drafts are made and
accepted: each test checks that acceptances happened), and for a draft model on both model files
(the target itself as its own draft accepts every draft; a different random model rejects most).
Then the
corners: stops inside an accepted run, n > 1, mixed batches, the batch size where speculation
turns off, overlap on and off, statistics, and nothing leaked.
"""

from __future__ import annotations

import random

import pytest

from minivllm import LLM, SamplingParams
from minivllm.models import make_random_model

ENGINE = dict(dtype="float32", attention_backend="torch", block_size=4, max_model_len=96, num_kv_blocks=160)
NGRAM = {"method": "ngram", "num_speculative_tokens": 4}
ARCHS = ("llama", "mistral", "qwen2", "qwen3", "opt")


def repetitive_prompts(count: int = 2, seed: int = 1) -> list[list[int]]:
    """A phrase said three times and begun a fourth: prompt lookup finds it again."""
    rng = random.Random(seed)
    phrases = [[rng.randrange(4, 500) for _ in range(8)] for _ in range(count)]
    return [p * 3 + p[:3] for p in phrases]


def greedy(llm: LLM, prompts, max_tokens: int = 24, **params) -> list[list[list[int]]]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **params)
    return [[c.token_ids for c in out.outputs] for out in llm.generate(prompts, params, use_tqdm=False)]


@pytest.fixture(scope="module")
def reference(model_dir):
    """reference(arch, prompts, **params) -> greedy outputs without speculation (memoized)."""
    engines, memo = {}, {}

    def run(arch, prompts, max_tokens=24, **params):
        key = (arch, repr(prompts), max_tokens, repr(sorted(params.items())))
        if key not in memo:
            if arch not in engines:
                engines[arch] = LLM(str(model_dir(arch)), **ENGINE)
            memo[key] = greedy(engines[arch], prompts, max_tokens, **params)
        return memo[key]

    return run


def check_speculation(llm: LLM, min_rate: float = 0.0, max_rate: float = 1.0) -> dict:
    """Speculation happened, at an acceptance rate in [min_rate, max_rate]; every block is free."""
    stats = llm.engine.get_stats()
    spec = stats["speculative"]
    assert spec["num_draft_tokens"] > 0, "no drafts were verified: the test would pass vacuously"
    assert min_rate <= spec["acceptance_rate"] <= max_rate, spec
    rates = list(spec["acceptance_rate_per_position"].values())
    assert rates == sorted(rates, reverse=True)
    assert 1 + sum(rates) == pytest.approx(spec["mean_acceptance_length"])
    assert stats["kv_cache"]["num_used_blocks"] == 0 and not llm.engine.has_unfinished_requests()
    return spec


@pytest.mark.parametrize("arch", ARCHS)
def test_ngram_greedy_output_equals_no_speculation(model_dir, reference, arch):
    prompts = repetitive_prompts()
    llm = LLM(str(model_dir(arch)), speculative_config=NGRAM, **ENGINE)
    assert greedy(llm, prompts) == reference(arch, prompts)
    spec = check_speculation(llm)
    assert spec["num_accepted_tokens"] > 0, "no draft was accepted: the test would pass vacuously"


@pytest.mark.parametrize("arch", ["qwen3", "opt"])  # the two model files; n-gram covers every architecture
def test_draft_model_greedy_output_equals_no_speculation(model_dir, reference, tmp_path_factory, arch):
    """The target as its own draft accepts everything; another random model rejects most."""
    target = str(model_dir(arch))
    prompts = [p[:9] for p in repetitive_prompts(seed=2)]
    other = make_random_model(tmp_path_factory.mktemp(f"draft-{arch}"), arch=arch, size="tiny", seed=7)
    for draft, rates in ((target, (1.0, 1.0)), (str(other), (0.0, 0.5))):
        llm = LLM(target, speculative_config={"method": "draft", "model": draft, "num_speculative_tokens": 3},
                  **ENGINE)
        assert greedy(llm, prompts) == reference(arch, prompts), draft
        check_speculation(llm, *rates)


@pytest.mark.parametrize("arch", ["qwen3", "opt"])
def test_the_cpu_path_verifies_as_the_reference(model_dir, reference, arch):
    """The CPU's own path ("auto": the sdpa backend with its plan made once per step, oneDNN
    weights) through verification steps, 1 + k queries per sequence causal among themselves,
    and the draft model's planned forwards: greedy output is the reference's without speculation."""
    target, prompts = str(model_dir(arch)), repetitive_prompts(seed=4)
    cpu = {**ENGINE, "attention_backend": "auto"}
    for spec in (NGRAM, {"method": "draft", "model": target, "num_speculative_tokens": 3}):
        llm = LLM(target, speculative_config=spec, **cpu)
        assert greedy(llm, prompts) == reference(arch, prompts), spec["method"]
        assert check_speculation(llm)["num_accepted_tokens"] > 0


def test_a_stop_inside_an_accepted_run_ends_it_there(model_dir, reference):
    """With every draft accepted (the target drafts for itself), a step gains up to 5 tokens:
    a stop token, a stop string or max_tokens in the middle of them must end the output exactly
    where decoding one token at a time ends it."""
    target = str(model_dir("qwen3"))
    llm = LLM(target, speculative_config={"method": "draft", "model": target, "num_speculative_tokens": 4},
              **ENGINE)
    prompts = [p[:10] for p in repetitive_prompts(seed=3)]
    full = reference("qwen3", prompts, max_tokens=30)
    stop_id = full[0][0][7]  # a token of the first answer, its first occurrence cut there
    cut = full[0][0].index(stop_id) + 1
    got = llm.generate(prompts[0], SamplingParams(max_tokens=30, temperature=0.0, stop_token_ids=[stop_id]),
                       use_tqdm=False)[0]
    assert got.token_ids == full[0][0][:cut] and got.finish_reason == "stop"
    for max_tokens in (6, 7, 13):  # not multiples of the 5 tokens a step can gain
        assert greedy(llm, prompts, max_tokens=max_tokens) == reference("qwen3", prompts, max_tokens=max_tokens)
    off = LLM(target, **ENGINE)
    text = off.generate(prompts[1], max_tokens=30, temperature=0.0, ignore_eos=True, use_tqdm=False)[0].text
    stop = text[12:15]
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True, stop=[stop])
    want = off.generate(prompts[1], params, use_tqdm=False)[0]
    got = llm.generate(prompts[1], params, use_tqdm=False)[0]
    assert (got.text, got.token_ids, got.finish_reason) == (want.text, want.token_ids, "stop")
    check_speculation(llm, 1.0, 1.0)


@pytest.mark.parametrize("overlap", [True, False])
def test_mixed_batches_n_samples_and_penalties_equal_no_speculation(model_dir, reference, overlap):
    """Requests arrive at different steps with a budget that chunks their prompts, so steps mix
    prefill chunks, plain decodes and verifications; n = 2 forks; a request with penalties
    never speculates. Greedy, so every output is known. A pool of 40 blocks forces preemption."""
    path = str(model_dir("qwen2"))
    prompts = repetitive_prompts(4, seed=4) + [[9, 8, 7] * 9]
    params = [SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True),
              SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, n=2),
              SamplingParams(max_tokens=18, temperature=0.0, ignore_eos=True, repetition_penalty=1.3),
              SamplingParams(max_tokens=22, temperature=0.0, ignore_eos=True, min_tokens=4),
              SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)]
    config = dict(ENGINE, num_kv_blocks=40, max_num_seqs=8, max_num_batched_tokens=24, async_scheduling=overlap)

    def run(speculative_config):
        llm = LLM(path, speculative_config=speculative_config, **config)
        ids = []
        for step in range(10_000):
            if step < len(prompts):
                ids.append(llm.engine.add_request(prompts[step], params[step]))
            if step >= len(prompts) and not llm.engine.has_unfinished_requests():
                return [[c.token_ids for c in llm.engine.get_output(i).outputs] for i in ids], llm
            llm.engine.step()

    want, _ = run(None)
    got, llm = run(NGRAM)
    assert got == want
    spec = check_speculation(llm)
    assert spec["num_accepted_tokens"] > 0
    assert llm.engine.get_stats()["scheduler"]["num_preemptions"] > 0, "the pool was meant to force preemptions"
    records = list(llm.engine.stats.history)
    assert any(r.num_draft_tokens and r.num_prefill_tokens for r in records), "no step mixed them"


def test_logprobs_requests_decode_plainly_and_logit_bias_is_verified(model_dir, reference):
    """A request asking for logprobs does not speculate: its tokens and log-probabilities are
    those without speculation, while its neighbour in the batch speculates. A greedy request
    with logit_bias speculates against the biased argmax: the bias makes one token the argmax
    everywhere, so prompt lookup proposes it again and again, and a verification that ignored
    the bias would take the model's own argmax instead."""
    path = str(model_dir("qwen3"))
    prompts = repetitive_prompts(2, seed=8)
    with_logprobs = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, logprobs=2)
    plain = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)

    def values(c):
        return [entry[t].logprob for entry, t in zip(c.logprobs, c.token_ids, strict=True)]

    want = LLM(path, **ENGINE).generate(prompts, [with_logprobs, plain], use_tqdm=False)
    llm = LLM(path, speculative_config=NGRAM, **ENGINE)
    got = llm.generate(prompts, [with_logprobs, plain], use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    assert values(got[0].outputs[0]) == pytest.approx(values(want[0].outputs[0]), abs=1e-5)
    assert got[1].outputs[0].logprobs is None
    spec = check_speculation(llm)
    # Only the plain request verified drafts: one verification per step at most.
    assert all(r.num_draft_tokens <= NGRAM["num_speculative_tokens"] for r in llm.engine.stats.history)

    favoured = prompts[0][1]
    biased = reference("qwen3", prompts[:1], 16, logit_bias={favoured: 100.0})
    assert biased == [[[favoured] * 16]] != reference("qwen3", prompts[:1], 16)
    assert greedy(llm, prompts[:1], 16, logit_bias={favoured: 100.0}) == biased
    assert llm.engine.get_stats()["speculative"]["num_draft_tokens"] > spec["num_draft_tokens"]


@pytest.mark.parametrize("overlap", [True, False])
def test_speculation_turns_off_above_the_batch_size(model_dir, overlap):
    """disable_by_batch_size=2: no step planned while 3 or more sequences run has drafts; once
    requests finish and two remain, they speculate; the outputs are those without speculation."""
    path = str(model_dir("qwen3"))
    engine = {**ENGINE, "async_scheduling": overlap}
    prompts = repetitive_prompts(4, seed=5)
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in (4, 5, 30, 30)]
    llms = [LLM(path, speculative_config=spec, **engine) for spec in (None, {**NGRAM, "disable_by_batch_size": 2})]
    plain, speculated = ([o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)] for llm in llms)
    assert speculated == plain
    llm = llms[1]
    records = list(llm.engine.stats.history)
    assert all(r.num_running <= 2 for r in records if r.num_draft_tokens)
    assert any(r.num_draft_tokens for r in records)
    assert any(r.num_running > 2 and r.num_decode_seqs for r in records)


def test_sampled_speculation_is_reproducible_with_a_seed(model_dir):
    """Sampling with a seed gives the same tokens twice, with drafts verified."""
    target = str(model_dir("qwen3"))
    other = str(model_dir("qwen2"))  # a draft of the same vocabulary and another mind
    prompts = repetitive_prompts(2, seed=6)
    # Cool enough for the random model's loops, where prompt lookup finds drafts.
    params = SamplingParams(max_tokens=20, temperature=0.5, top_k=3, seed=123, ignore_eos=True)
    for spec in (NGRAM, {"method": "draft", "model": other, "num_speculative_tokens": 3}):
        runs = []
        for _ in range(2):
            llm = LLM(target, speculative_config=spec, **ENGINE)
            runs.append([o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)])
            check_speculation(llm, 0.0, 1.0)
        assert runs[0] == runs[1] and all(len(t) == 20 for t in runs[0])


def test_statistics_and_the_trace_count_drafts_per_position(model_dir):
    path = str(model_dir("qwen3"))
    llm = LLM(path, speculative_config={"method": "draft", "model": path, "num_speculative_tokens": 3}, **ENGINE)
    trace = llm.engine.enable_trace()
    llm.generate(repetitive_prompts(1, seed=7), max_tokens=13, temperature=0.0, ignore_eos=True, use_tqdm=False)
    stats = llm.engine.get_stats()
    assert stats["engine"]["num_generated_tokens"] == 13  # accepted drafts are generated tokens too
    spec = stats["speculative"]
    # Every step after the prompt verifies 3 drafts and accepts them all: 1 + 4 + 4 + 4 tokens.
    assert spec["num_verifications"] == 3 and spec["num_draft_tokens"] == 9 == spec["num_accepted_tokens"]
    assert spec["mean_acceptance_length"] == 4.0
    assert spec["acceptance_rate_per_position"] == {"1": 1.0, "2": 1.0, "3": 1.0}
    events = [e for e in trace if e["num_draft_tokens"]]
    assert [e["accepted_per_position"] for e in events] == [[1, 1, 1]] * 3
    assert [e["seqs"][0]["accepted"] for e in events] == [3, 3, 3]
    assert [e["num_generated_tokens"] for e in events] == [4, 4, 4]


def test_bad_speculative_configs_are_refused_naming_the_field(model_dir, tmp_path):
    path = str(model_dir("qwen3"))
    bad = [({"method": "medusa", "num_speculative_tokens": 2}, "speculative_config.method"),
           ({"method": "ngram"}, "num_speculative_tokens"),
           ({"method": "ngram", "num_speculative_tokens": 2, "model": path}, "speculative_config.model"),
           ({"method": "draft", "num_speculative_tokens": 2}, "speculative_config.model"),
           ({"method": "draft", "model": path, "num_speculative_tokens": 2, "prompt_lookup_max": 3},
            "prompt_lookup_max"),
           ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 5, "prompt_lookup_max": 3},
            "prompt_lookup_min"),
           ({"method": "ngram", "num_speculative_tokens": 2, "disable_by_batch_size": 0}, "disable_by_batch_size"),
           ({"method": "ngram", "num_speculative_tokens": 2, "typo": 1}, "typo")]
    for config, field in bad:
        with pytest.raises(ValueError, match=field):
            LLM(path, speculative_config=config, **ENGINE)
    with pytest.raises(TypeError, match="speculative_config"):
        LLM(path, speculative_config="ngram", **ENGINE)
    other_vocab = make_random_model(tmp_path / "v", arch="qwen3", size="tiny", overrides={"vocab_size": 300})
    with pytest.raises(ValueError, match="share the target's vocabulary"):
        LLM(path, speculative_config={"method": "draft", "model": str(other_vocab), "num_speculative_tokens": 2},
            **ENGINE)
