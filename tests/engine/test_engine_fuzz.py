"""The whole engine under random pressure: nothing lost, nothing leaked, nothing changed.

Each scenario (a seed) draws requests that share prompt prefixes, arrive at random steps, ask for
n = 1..3 samples, stop tokens and min_tokens, log-probabilities of their tokens and of their
prompts (some only score their prompt, max_tokens=0), or structured output (a JSON schema, a regex
or a choice drawn from a small family), and are sometimes aborted; the engine runs them on a KV
pool so small that it must preempt, with a token budget that forces chunked prefill, prefix
caching on, and overlap on or off. Then:

* every request comes back exactly once, finished, with a documented finish reason: "length" at
  exactly its length limit, "stop" only at an allowed stop token, "abort" only if we aborted it;
* every finished structured output is what was asked for: JSON that validates against its
  schema (`jsonschema`), a full match of its regex, one of its choices;
* every KV block is free again;
* every request we did not abort produced exactly the tokens of a run with a pool and budget
  that never constrain anything (greedy decoding), and the same log-probabilities: one per token,
  one per prompt token (none lost, none repeated by a preemption), equal to 1e-4.

Two more scenarios speculate (n-gram, or a draft model that is the target's first layer alone,
so that most drafts are rejected and rolled back, and some accepted) against the same reference
without speculation.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re

import jsonschema
import pytest

from minivllm import LLM, SamplingParams
from minivllm.sampling_params import StructuredOutputsParams

MAX_MODEL_LEN = 64
STRUCTURED_MAX_TOKENS = 30  # longer than any output of the family below (prompts have <= 28 tokens)
# Grammars whose every sentence is short: a random-weight model's output only ends where the
# grammar forces it to.
SCHEMAS = [
    {"enum": ["red", "green", "blue"]},
    {"type": "boolean"},
    {"type": "integer", "minimum": -50, "maximum": 999},
    {"type": "string", "maxLength": 3},
    {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 9}},
     "required": ["ok", "n"]},
]
REGEXES = [r"[a-f]{2}-\d{1,3}", r"(yes|no)!?"]
CHOICES = [("the fox", "a cache", "blocks"), ("x", "xy", "xyz")]


def draw_structured(rng: random.Random) -> StructuredOutputsParams:
    kind = rng.choice(["json", "json", "json", "regex", "choice"])
    if kind == "json":
        return StructuredOutputsParams(json=rng.choice(SCHEMAS))
    if kind == "regex":
        return StructuredOutputsParams(regex=rng.choice(REGEXES))
    return StructuredOutputsParams(choice=rng.choice(CHOICES))


def check_structured(text: str, spec: StructuredOutputsParams) -> None:
    if spec.json is not None:
        jsonschema.validate(json.loads(text), spec.json)
    elif spec.regex is not None:
        assert re.fullmatch(spec.regex, text), (text, spec.regex)
    else:
        assert text in spec.choice, (text, spec.choice)


@pytest.fixture(scope="module")
def model(model_dir):
    return str(model_dir("qwen3"))


@pytest.fixture(scope="module")
def draft(tmp_path_factory):
    """The fuzz model's first layer alone (same seed): a draft that agrees with it now and then."""
    from minivllm.models import make_random_model

    return str(make_random_model(tmp_path_factory.mktemp("draft"), arch="qwen3", size="tiny", seed=0,
                                 overrides={"num_hidden_layers": 1}))


def draw_scenario(seed: int):
    rng = random.Random(seed)
    logprob_rng = random.Random(seed + 1000)
    structured_rng = random.Random(-1 - seed)  # its own stream: the other draws stay as they were
    prefixes = [[rng.randrange(4, 500) for _ in range(rng.randint(4, 12))] for _ in range(2)]
    requests = []
    for i in range(rng.randint(7, 10)):
        prompt = rng.choice(prefixes) + [rng.randrange(4, 500) for _ in range(rng.randint(1, 16))]
        max_tokens = rng.randint(1, 14)
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, n=rng.choice([1, 1, 2, 3]),
                                ignore_eos=rng.random() < 0.5, min_tokens=rng.choice([0, 0, min(2, max_tokens)]),
                                stop_token_ids=rng.sample(range(4, 500), 40) if rng.random() < 0.3 else None)
        if structured_rng.random() < 0.4:  # the grammar ends it: EOS, min_tokens and stop ids stay free
            params = SamplingParams(temperature=0.0, max_tokens=STRUCTURED_MAX_TOKENS, n=params.n,
                                    structured_outputs=draw_structured(structured_rng))
        arrival = rng.randint(0, 10)
        abort_at = arrival + rng.randint(0, 8) if rng.random() < 0.2 else None
        requests.append((f"r{i}", prompt, with_logprobs(params, logprob_rng), arrival, abort_at))
    return requests, rng.random() < 0.5


def with_logprobs(params: SamplingParams, rng: random.Random) -> SamplingParams:
    """Some requests ask for log-probabilities; some of those only score their prompt. (A second
    generator, so the scenarios' other draws stay what they were.)"""
    kind = rng.choice(["none", "none", "tokens", "prompt", "score"])
    if kind == "none":
        return params
    if kind == "score":
        return dataclasses.replace(params, max_tokens=0, min_tokens=0, n=1, prompt_logprobs=rng.randint(0, 2))
    return dataclasses.replace(params, logprobs=rng.randint(0, 3),
                               prompt_logprobs=rng.randint(0, 2) if kind == "prompt" else None)


def run(model, requests, overlap: bool, constrained: bool, aborts: bool = True, speculative_config=None):
    """Drive the step API; returns ({request id: the outputs seen for it}, the engine)."""
    config = dict(num_kv_blocks=16, max_num_seqs=5, max_num_batched_tokens=16) if constrained else \
        dict(num_kv_blocks=512, max_num_seqs=64, max_num_batched_tokens=4096)
    llm = LLM(model, dtype="float32", attention_backend="torch", block_size=4, max_model_len=MAX_MODEL_LEN,
              async_scheduling=overlap, speculative_config=speculative_config, **config)
    seen: dict[str, list] = {}
    for step in range(10_000):
        for request_id, prompt, params, arrival, abort_at in requests:
            if arrival == step:
                llm.engine.add_request(prompt, params, request_id=request_id)
            if aborts and abort_at == step:
                out = llm.engine.abort(request_id)
                if out is not None:
                    seen.setdefault(request_id, []).append(out)
        if step > max(r[3] for r in requests) and not llm.engine.has_unfinished_requests():
            return seen, llm.engine
        for out in llm.engine.step():
            seen.setdefault(out.request_id, []).append(out)
    raise AssertionError("the engine did not finish")


def check_finish(output, params, prompt, aborted: bool, eos: frozenset[int]) -> None:
    for c in output.outputs:
        limit = min(params.max_tokens, MAX_MODEL_LEN - len(prompt))
        assert len(c.token_ids) <= limit
        if c.finish_reason == "length":
            assert len(c.token_ids) == limit
        elif c.finish_reason == "stop":
            stops = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos))
            assert c.token_ids[-1] in stops and len(c.token_ids) >= params.min_tokens
        else:
            assert c.finish_reason == "abort" and aborted, c.finish_reason


def check_logprobs(out, reference, params: SamplingParams) -> None:
    """The same log-probabilities as the unconstrained run: one per token, one per prompt token."""
    def values(positions, ids):
        return [None if p is None else p[t].logprob for p, t in zip(positions, ids, strict=True)]

    if params.prompt_logprobs is None:
        assert out.prompt_logprobs is None
    else:
        assert values(out.prompt_logprobs, out.prompt_token_ids) == pytest.approx(
            values(reference.prompt_logprobs, out.prompt_token_ids), abs=1e-4)
    for c, ref in zip(out.outputs, reference.outputs):
        if params.logprobs is None:
            assert c.logprobs is None
        else:
            assert values(c.logprobs, c.token_ids) == pytest.approx(values(ref.logprobs, c.token_ids), abs=1e-4)


@pytest.mark.parametrize("seed, speculative", [(0, None), (1, None), (2, None), (3, None),
                                               (10, "ngram"), (5, "draft")])
def test_random_workloads_lose_nothing_leak_nothing_change_nothing(model, draft, seed, speculative):
    requests, overlap = draw_scenario(seed)
    spec = None
    if speculative == "ngram":
        spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1}
    elif speculative == "draft":
        spec = {"method": "draft", "model": draft, "num_speculative_tokens": 2}
    seen, engine = run(model, requests, overlap, constrained=True, speculative_config=spec)
    reference, _ = run(model, requests, overlap=False, constrained=False, aborts=False)
    preempted = engine.get_stats()["scheduler"]["num_preemptions"]
    for request_id, prompt, params, _, abort_at in requests:
        outputs = seen.get(request_id, [])
        assert len(outputs) == 1, f"{request_id} came back {len(outputs)} times"
        (out,) = outputs
        assert out.finished and len(out.outputs) == params.n
        aborted = any(c.finish_reason == "abort" for c in out.outputs)
        assert not aborted or abort_at is not None
        check_finish(out, params, prompt, aborted, engine.eos_token_ids)
        if params.structured_outputs is not None and params.max_tokens:  # (max_tokens=0 only scores the prompt)
            for c in out.outputs:
                if c.finish_reason != "abort":
                    assert c.finish_reason == "stop", (request_id, c)
                    check_structured(c.text, params.structured_outputs)
        expected = [c.token_ids for c in reference[request_id][0].outputs]
        got = [c.token_ids for c in out.outputs]
        if aborted:  # stopped early: each sample is the start of the full answer
            assert all(g == e[: len(g)] for g, e in zip(got, expected))
        else:
            assert got == expected, request_id
            check_logprobs(out, reference[request_id][0], params)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert not engine.scheduler.running and not engine.scheduler.waiting
    if seed in (0, 5, 10):  # the pool is small enough to matter (checked, not assumed)
        assert preempted > 0
    if spec is not None:  # drafts were verified, and some rejected and rolled back
        stats = engine.get_stats()["speculative"]
        assert 0 < stats["num_accepted_tokens"] < stats["num_draft_tokens"], stats
    assert all(seq.grammar is None for r in engine._finished.values() for seq in r.seqs), "a matcher outlived its sequence"
