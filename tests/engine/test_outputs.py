"""RequestMetrics prints as durations and a rate, never as raw clock readings."""

from __future__ import annotations

import dataclasses
import re

import pytest

from minivllm.outputs import CompletionOutput, RequestMetrics, RequestOutput

CLOCK = 81234.5678  # a perf_counter() reading: meaningless on its own


def metrics(**overrides) -> RequestMetrics:
    values = dict(arrival_time=CLOCK, first_scheduled_time=CLOCK + 0.002, first_token_time=CLOCK + 0.0123,
                  finish_time=CLOCK + 0.1, num_prompt_tokens=5, num_output_tokens=8, num_cached_tokens=4,
                  num_preemptions=1, ttft=0.0123, tpot=0.0034, e2e_latency=0.1, tokens_per_s=80.0)
    return RequestMetrics(**{**values, **overrides})


def test_str_shows_ttft_tpot_and_rate():
    assert str(metrics()) == "(ttft 12.3 ms, tpot 3.4 ms, 80.0 tok/s)"
    assert str(metrics(ttft=None, tpot=None, tokens_per_s=None)) == "(ttft n/a, tpot n/a, n/a tok/s)"
    assert str(metrics(tpot=None)) == "(ttft 12.3 ms, tpot n/a, 80.0 tok/s)"  # one output token


def test_repr_adds_the_counters_but_no_clock_reading():
    text = repr(metrics())
    assert text.startswith("RequestMetrics(ttft=12.3 ms, tpot=3.4 ms, tokens_per_s=80.0 tok/s")
    assert "prompt_tokens=5" in text and "output_tokens=8" in text and "cached_tokens=4" in text
    assert "preemptions=1" in text
    assert "81234" not in text and "81234" not in str(metrics())


def test_dict_forms_keep_every_field():
    m = metrics()
    assert dataclasses.asdict(m)["arrival_time"] == CLOCK
    out = RequestOutput("0", "Hi", [1, 2], [CompletionOutput(0, "x", [3], "length")], True, m)
    assert out.to_dict()["metrics"] == dataclasses.asdict(m)
    assert RequestMetrics(**dataclasses.asdict(m)) == m


def test_metrics_of_a_real_request_read_well(model_dir):
    from minivllm import LLM

    out = LLM(str(model_dir("llama")), attention_backend="torch").generate(
        ["Hello there"], max_tokens=4, temperature=0, ignore_eos=True, use_tqdm=False)[0]
    line = f"{out.prompt} -> {out.text} {out.metrics}"  # the README's print
    assert re.fullmatch(r".* -> .* \(ttft \d+\.\d ms, tpot \d+\.\d ms, \d+\.\d tok/s\)", line, re.S), line
    assert f"{out.metrics.arrival_time}" not in line
    assert f"tpot {out.metrics.tpot * 1e3:.1f} ms" in line


@pytest.mark.parametrize("seconds, shown", [(0.0, "0.0 ms"), (1.5, "1500.0 ms"), (0.00004, "0.0 ms")])
def test_durations_are_milliseconds(seconds, shown):
    assert f"ttft {shown}" in str(metrics(ttft=seconds))
