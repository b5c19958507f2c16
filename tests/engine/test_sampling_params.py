"""SamplingParams validation: clear errors that name the field."""

import pytest

from minivllm.sampling_params import SamplingParams


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
        ({"stop": ""}, "stop"),
        ({"stop": [1, 2]}, "stop"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"ignore_eos": 1}, "ignore_eos"),
    ],
)
def test_invalid_fields(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


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
