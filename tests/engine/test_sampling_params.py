"""SamplingParams validation: clear errors that name the field, and nothing accepted that fails later."""

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minivllm.layers.sampler import Sampler, SamplingBatch
from minivllm.sampling_params import SamplingParams, StructuredOutputsParams
from minivllm.step import SampleRow

FLOAT32_MAX = torch.finfo(torch.float32).max


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"top_k": 2.0}, "top_k"),
        ({"min_p": -0.1}, "min_p"),
        ({"min_p": 1.1}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"presence_penalty": 3.0}, "presence_penalty"),
        ({"frequency_penalty": -2.5}, "frequency_penalty"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -5}, "max_tokens"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 10, "max_tokens": 5}, "min_tokens"),
        ({"n": 0}, "n"),
        ({"seed": 1.5}, "seed"),
        ({"seed": True}, "seed"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**64}, "seed"),
        ({"seed": 2**64 - 1, "n": 2}, "seed"),  # sample 1 would be seeded with 2**64
        ({"seed": 2**64 - 3, "n": 4}, "seed"),
        ({"temperature": 1e39}, "temperature"),  # finite in Python, inf as float32
        ({"temperature": 10**400}, "temperature"),  # too large even for a Python float
        ({"temperature": float("inf")}, "temperature"),
        ({"temperature": "0.5"}, "temperature"),
        ({"top_k": 2**63}, "top_k"),  # does not fit the sampler's int64 column
        ({"top_k": True}, "top_k"),
        ({"top_p": float("nan")}, "top_p"),
        ({"repetition_penalty": 1e-300}, "repetition_penalty"),  # 0 as float32: logits / 0
        ({"repetition_penalty": 0.001}, "repetition_penalty"),
        ({"repetition_penalty": 1000.0}, "repetition_penalty"),
        ({"repetition_penalty": float("inf")}, "repetition_penalty"),
        ({"presence_penalty": float("nan")}, "presence_penalty"),
        ({"max_tokens": True}, "max_tokens"),
        ({"max_tokens": 4.0}, "max_tokens"),
        ({"min_tokens": 1.0}, "min_tokens"),
        ({"n": True}, "n"),
        ({"stop": "x", "stop_token_ids": [True]}, "stop_token_ids"),
        ({"stop_token_ids": ["3"]}, "stop_token_ids"),
        ({"stop_token_ids": [3.0]}, "stop_token_ids"),
        ({"stop_token_ids": 3}, "stop_token_ids"),
        ({"stop": b"###"}, "stop"),
        ({"include_stop_str_in_output": None}, "include_stop_str_in_output"),
        ({"skip_special_tokens": "no"}, "skip_special_tokens"),
        ({"stop": ""}, "stop"),
        ({"stop": [1, 2]}, "stop"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"ignore_eos": 1}, "ignore_eos"),
    ],
)
def test_invalid_fields(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({}, "exactly one"),
        ({"json": {"type": "string"}, "regex": "a+"}, "exactly one"),
        ({"choice": ["a"], "json_object": True}, "exactly one"),
        ({"json": "{not json"}, "structured_outputs.json is not valid JSON"),
        ({"json": "[1, 2]"}, "structured_outputs.json must be a JSON schema"),
        ({"json": 5}, "structured_outputs.json must be a JSON schema"),
        ({"regex": ""}, "structured_outputs.regex"),
        ({"regex": 5}, "structured_outputs.regex"),
        ({"grammar": b"root ::= x"}, "structured_outputs.grammar"),
        ({"choice": []}, "structured_outputs.choice"),
        ({"choice": "yes"}, "structured_outputs.choice"),
        ({"choice": ["yes", ""]}, "structured_outputs.choice"),
        ({"choice": ["yes", 1]}, "structured_outputs.choice"),
        ({"json_object": 1}, "structured_outputs.json_object"),
    ],
)
def test_invalid_structured_outputs(kwargs, field):
    with pytest.raises(ValueError, match=re.escape(field)):
        StructuredOutputsParams(**kwargs)


def test_structured_outputs_in_sampling_params():
    spec = StructuredOutputsParams(json='{"type": "boolean"}')
    assert spec.json == {"type": "boolean"} and spec.kind == "json"  # a JSON string is parsed once
    assert StructuredOutputsParams(choice=["a", "b"]).choice == ("a", "b")
    assert StructuredOutputsParams(json_object=True).kind == "json_object"
    assert SamplingParams.from_kwargs(structured_outputs=spec).structured_outputs is spec
    with pytest.raises(ValueError, match="structured_outputs must be a StructuredOutputsParams"):
        SamplingParams(structured_outputs={"json": {}})
    # EOS ends a structured output where the grammar is complete: nothing may keep it away.
    with pytest.raises(ValueError, match="min_tokens cannot be combined with structured_outputs"):
        SamplingParams(structured_outputs=spec, min_tokens=1)
    with pytest.raises(ValueError, match="ignore_eos cannot be combined with structured_outputs"):
        SamplingParams(structured_outputs=spec, ignore_eos=True)


def test_normalization_and_flags():
    p = SamplingParams(temperature=0, stop="###", stop_token_ids=(3, 4), top_k=-1)
    assert p.is_greedy and not p.has_top_k and not p.has_penalties
    assert p.stop_strings == ["###"] and p.stop_token_ids == [3, 4]
    q = SamplingParams(temperature=0.7, top_k=5, repetition_penalty=1.2, max_tokens=None)
    assert not q.is_greedy and q.has_top_k and q.has_penalties and q.max_tokens is None


def test_from_kwargs_names_unknown_options():
    assert SamplingParams.from_kwargs(max_tokens=3, temperature=0.5).max_tokens == 3
    with pytest.raises(TypeError, match="max_token"):
        SamplingParams.from_kwargs(max_token=3)


SEED_EDGES = [(0, 1), (0, 64), (2**64 - 1, 1), (2**64 - 2, 2), (2**63, 3), (2**64 - 64, 64)]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _seeded_draws(sampler: Sampler, seed: int, seed_offset: int, n: int = 1, steps: int = 24) -> list[int]:
    """`steps` tokens the sampler draws for one sequence seeded `seed` (sample `seed_offset` of
    a request of `n`), from flat logits: a sequence of draws no other seed repeats."""
    params = SamplingParams(seed=seed, n=n, temperature=1.0)
    logits = torch.zeros(1, sampler.vocab_size, device=sampler.device)
    row = SampleRow(seq_id=7, params=params, seed_offset=seed_offset)
    return [int(sampler.sample(logits, [row]).tokens) for _ in range(steps)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed, n", SEED_EDGES)
def test_seed_range_edges_seed_every_sample(seed, n, device):
    """The documented range, 0 <= seed and seed + n - 1 < 2**64, is accepted, and the engine's
    sampler seeds sample i with seed + i, right up to 2**64 - 1: the last sample of the request
    draws what a one-sample request seeded seed + n - 1 draws, and not what sample 0 draws."""
    last = n - 1
    draws = _seeded_draws(Sampler(256, device), seed, last, n)
    assert draws == _seeded_draws(Sampler(256, device), seed + last, 0)
    assert draws == _seeded_draws(Sampler(256, device), seed, last, n)  # reproducible
    if n > 1:
        assert draws != _seeded_draws(Sampler(256, device), seed, 0, n)


# Wide strategies: boundary values on both sides of every documented limit, and junk.
_floats = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=0.0, max_value=1.0),
    st.sampled_from([0.0, 1e-300, 1e-40, 1e-5, 0.01, 1.0, 2.0, 100.0, 1e4, FLOAT32_MAX, 3.5e38, 1e39]),
    st.integers(min_value=-3, max_value=10**40),
)
_wide = {
    "n": st.integers(min_value=-1, max_value=2**65),
    "temperature": _floats,
    "top_k": st.one_of(st.integers(min_value=-3, max_value=100),
                       st.integers(min_value=2**63 - 2, max_value=2**63 + 1)),
    "top_p": _floats,
    "min_p": _floats,
    "repetition_penalty": _floats,
    "presence_penalty": _floats,
    "frequency_penalty": _floats,
    "seed": st.one_of(st.none(), st.integers(min_value=-2, max_value=2**64 + 2),
                      st.integers(min_value=2**64 - 70, max_value=2**64 + 1)),
    "max_tokens": st.one_of(st.none(), st.integers(min_value=-1, max_value=10**30)),
    "min_tokens": st.integers(min_value=-1, max_value=10**30),
    "stop_token_ids": st.one_of(st.none(), st.lists(st.one_of(st.integers(-1, 30), st.booleans(), st.floats()))),
}
# The accepted domain, right up to its limits.
_accepted = {
    "temperature": st.one_of(st.floats(min_value=0.0, max_value=FLOAT32_MAX),
                             st.sampled_from([0.0, 1e-5, FLOAT32_MAX])),
    "top_k": st.one_of(st.integers(min_value=-1, max_value=100), st.integers(min_value=2**62, max_value=2**63 - 1)),
    "top_p": st.one_of(st.floats(min_value=1e-300, max_value=1.0), st.just(1.0)),
    "min_p": st.floats(min_value=0.0, max_value=1.0),
    "repetition_penalty": st.one_of(st.floats(min_value=0.01, max_value=100.0), st.sampled_from([0.01, 100.0])),
    "presence_penalty": st.floats(min_value=-2.0, max_value=2.0),
    "frequency_penalty": st.floats(min_value=-2.0, max_value=2.0),
}


@st.composite
def _accepted_n_and_seed(draw):
    n = draw(st.integers(min_value=1, max_value=64))
    last = 2**64 - n  # the largest seed whose samples all fit: seed + n - 1 = 2**64 - 1
    seed = draw(st.one_of(st.none(), st.integers(0, last), st.integers(last - 8, last)))
    return {"n": n, "seed": seed}


VOCAB = 64
BANNED = [0, 1]  # as if 0 and 1 were EOS / stop tokens under min_tokens


def _check_usable(params: SamplingParams) -> None:
    """What a step does with the params: seed every sample's generator, sample with them."""
    generators = []
    if params.seed is not None:
        for i in sorted({0, params.n - 1}):
            generators.append(torch.Generator().manual_seed(params.seed + i))
    if not generators:
        generators = [None]
    rows = len(generators)
    batch = SamplingBatch.build(
        [params] * rows, prompt_token_ids=[[2, 3, 4, 2]] * rows, output_token_ids=[[5, 5, 6]] * rows,
        banned_token_ids=[BANNED] * rows, generators=generators, vocab_size=VOCAB,
    )
    logits = torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(0)) * 10
    tokens = Sampler()(logits, batch)
    assert all(0 <= t < VOCAB and t not in BANNED for t in tokens.tolist()), (params, tokens)


def test_huge_counts_and_limits_sample_safely():
    """max_tokens / min_tokens are plain ints (a huge value is only a very long request), and the
    largest top_k and temperature fit the sampler's int64 and float32 columns."""
    _check_usable(SamplingParams(max_tokens=10**30, min_tokens=10**29, top_k=2**63 - 1, temperature=FLOAT32_MAX,
                                 seed=2**64 - 1))


@settings(max_examples=150, deadline=None)
@given(_accepted_n_and_seed(), st.fixed_dictionaries({}, optional=_accepted))
def test_the_accepted_domain_samples_safely(n_and_seed, kwargs):
    _check_usable(SamplingParams(**n_and_seed, **kwargs))


@settings(max_examples=300, deadline=None)
@given(_accepted_n_and_seed(), st.fixed_dictionaries({}, optional=_accepted), st.data())
def test_any_input_is_refused_at_once_or_samples_safely(n_and_seed, kwargs, data):
    """Valid params with one or two fields pushed anywhere, limits and junk included."""
    kwargs = {**n_and_seed, **kwargs}
    pushed = data.draw(st.lists(st.sampled_from(sorted(_wide)), min_size=1, max_size=2, unique=True))
    for name in pushed:
        kwargs[name] = data.draw(_wide[name], label=name)
    try:
        params = SamplingParams(**kwargs)
    except ValueError as err:
        assert any(re.search(rf"\b{name}\b", str(err)) for name in pushed), err  # names a pushed field
        return
    _check_usable(params)
