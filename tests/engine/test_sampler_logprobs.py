"""The sampler's log-probabilities and logit_bias against plain PyTorch oracles.

The oracle of a payload row is the obvious computation: log_softmax over the whole row, the
token's value, its rank by counting, and the k largest by sorting.
"""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minivllm.layers.logprobs import MAX_VOCAB, decode_rows, logprobs_payload, pad_payload
from minivllm.layers.sampler import Sampler, SamplingBatch, apply_logit_bias, apply_top_k_top_p_min_p
from minivllm.sampling_params import SamplingParams
from minivllm.step import SampleRow

VOCAB = 64


def oracle(logits: torch.Tensor, token: int, k: int):
    """(logprob, rank, top ids, top logprobs) of one row, the plain way."""
    lp = logits.double().log_softmax(-1)
    rank = 1 + int((logits > logits[token]).sum())
    order = sorted(range(len(logits)), key=lambda i: -float(logits[i]))[:k]
    return float(lp[token]), rank, order, [float(lp[i]) for i in order]


def rows_of(params: list[SamplingParams], banned=None) -> list[SampleRow]:
    return [SampleRow(i, p, 0, tuple((banned or {}).get(i, ()))) for i, p in enumerate(params)]


class Record(NamedTuple):
    """A record's fields by name (the runner's are plain tuples), its top-k as lists."""

    token_id: int
    logprob: float
    rank: int
    top_ids: list[int]
    top_logprobs: list[float]


def named(record) -> Record:
    token_id, logprob, rank, top_ids, top_logprobs = record
    return Record(token_id, logprob, rank, list(top_ids), list(top_logprobs))


def decoded(payload: torch.Tensor, tokens: list[int], ks: list[int]) -> list[Record]:
    return [named(r) for r in decode_rows(payload, tokens[:len(ks)], ks)]


def decode_row(payload: torch.Tensor, r: int, token_id: int, k: int) -> Record:
    """Row r of a payload as its record."""
    return named(decode_rows(payload[r:r + 1], [token_id], [k])[0])


@pytest.mark.parametrize("k", [0, 1, 5, 20])
def test_payload_matches_log_softmax_topk_and_rank(k):
    torch.manual_seed(k)
    logits = torch.randn(7, VOCAB) * 3
    tokens = torch.randint(0, VOCAB, (7,))
    for r, got in enumerate(decoded(logprobs_payload(logits, tokens, k), tokens.tolist(), [k] * 7)):
        logprob, rank, top_ids, top_lps = oracle(logits[r], int(tokens[r]), k)
        assert got.token_id == int(tokens[r]) and got.rank == rank
        assert got.logprob == pytest.approx(logprob, abs=1e-5)
        assert got.top_ids == top_ids
        assert got.top_logprobs == pytest.approx(top_lps, abs=1e-5)


def test_the_argmax_token_has_exactly_the_top_value():
    """A client compares the two to decide "greedy" (lm-eval does): they must be equal, bit for bit."""
    torch.manual_seed(0)
    logits = torch.randn(16, VOCAB) * 5
    tokens = logits.argmax(-1)
    for got in decoded(logprobs_payload(logits, tokens, 1), tokens.tolist(), [1] * 16):
        assert got.rank == 1 and got.logprob == got.top_logprobs[0]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.lists(st.integers(-2, 2), min_size=6, max_size=6), min_size=1, max_size=5), st.integers(0, 6))
def test_greedy_payload_is_the_looked_up_one(rows, k):
    """Told that every token is its row's argmax, the payload takes the token's value and rank from
    the top-1 instead of looking them up: the same numbers, ties (small integers) included."""
    logits = torch.tensor(rows, dtype=torch.float32)
    tokens = logits.argmax(-1)
    looked_up = logprobs_payload(logits, tokens, k)
    assert torch.equal(logprobs_payload(logits, tokens, k, greedy=True), looked_up)
    out = Sampler(6).sample(logits, rows_of([SamplingParams(temperature=0, logprobs=k)] * len(rows)))
    assert torch.equal(out.tokens, tokens) and torch.equal(out.logprobs, looked_up)  # (the sampler's greedy path)


def test_a_padded_payload_decodes_as_the_narrow_one():
    torch.manual_seed(3)
    logits, tokens = torch.randn(3, VOCAB), torch.randint(0, VOCAB, (3,))
    payload = logprobs_payload(logits, tokens, 2)
    wide = pad_payload(payload, 5)
    assert wide.shape == (3, 2 + 2 * 5)
    assert decoded(wide, tokens.tolist(), [2] * 3) == decoded(payload, tokens.tolist(), [2] * 3)


def test_a_vocabulary_beyond_exact_float32_ids_is_refused():
    with pytest.raises(ValueError, match="vocabulary of at most"):
        logprobs_payload(torch.zeros(1, 1).expand(1, MAX_VOCAB + 1), torch.zeros(1, dtype=torch.long), 1)


def test_minus_inf_logits_and_padding():
    logits = torch.tensor([[0.0, float("-inf"), 1.0, float("-inf")]])
    payload = pad_payload(logprobs_payload(logits, torch.tensor([1]), 1), 3)
    assert payload.shape == (1, 2 + 2 * 3)
    got = decode_row(payload, 0, 1, 1)
    assert got.logprob == float("-inf") and got.rank == 3 and got.top_ids == [2]


def test_rows_with_and_without_logprobs_in_one_step():
    """Only the rows that asked get payload rows, in row order, each with the step's widest k."""
    torch.manual_seed(1)
    logits = torch.randn(4, VOCAB)
    params = [SamplingParams(temperature=0, logprobs=2), SamplingParams(temperature=0),
              SamplingParams(temperature=0.8, seed=3, logprobs=0), SamplingParams(temperature=0.8, seed=4)]
    out = Sampler(VOCAB).sample(logits, rows_of(params))
    assert out.logprobs.shape == (2, 2 + 2 * 2)
    tokens = out.tokens.tolist()
    assert tokens[0] == int(logits[0].argmax())
    for r, (row, k) in enumerate([(0, 2), (2, 0)]):
        got = decode_row(out.logprobs, r, tokens[row], k)
        logprob, rank, top_ids, _ = oracle(logits[row], tokens[row], k)
        assert got.logprob == pytest.approx(logprob, abs=1e-5) and got.rank == rank and got.top_ids == top_ids


def test_no_row_asks_no_payload_and_the_greedy_fast_path_stays():
    torch.manual_seed(2)
    logits = torch.randn(3, VOCAB)
    out = Sampler(VOCAB).sample(logits, rows_of([SamplingParams(temperature=0)] * 3))
    assert out.logprobs is None and torch.equal(out.tokens, logits.argmax(-1))


def test_seeded_draws_do_not_change_when_logprobs_are_asked():
    torch.manual_seed(3)
    logits = torch.randn(6, VOCAB)
    plain = [SamplingParams(temperature=1.0, top_p=0.9, seed=s) for s in range(6)]
    asking = [SamplingParams(temperature=1.0, top_p=0.9, seed=s, logprobs=5, logprobs_mode=m)
              for s, m in zip(range(6), ["raw", "processed"] * 3)]
    a = Sampler(VOCAB).sample(logits, rows_of(plain)).tokens
    b = Sampler(VOCAB).sample(logits, rows_of(asking)).tokens
    assert torch.equal(a, b)


def test_processed_mode_reports_the_distribution_drawn_from():
    """Temperature, then top-k: the processed logprobs are log_softmax(filter(logits / T)); a greedy
    row's are those of the logits it took the argmax of (here: after the bias)."""
    torch.manual_seed(4)
    logits = torch.randn(2, VOCAB)
    sampled = SamplingParams(temperature=0.5, top_k=3, seed=1, logprobs=4, logprobs_mode="processed")
    greedy = SamplingParams(temperature=0, logit_bias={7: 2.5}, logprobs=1, logprobs_mode="processed")
    out = Sampler(VOCAB).sample(logits, rows_of([sampled, greedy]))
    tokens = out.tokens.tolist()
    expected = apply_top_k_top_p_min_p(logits[:1] / 0.5, torch.tensor([3]), torch.tensor([1.0]), torch.tensor([0.0]))[0]
    got = decode_row(out.logprobs, 0, tokens[0], 4)
    assert got.logprob == pytest.approx(oracle(expected, tokens[0], 4)[0], abs=1e-5)
    assert got.top_logprobs[:3] == pytest.approx(oracle(expected, tokens[0], 3)[3], abs=1e-5)
    assert got.top_logprobs[3] == float("-inf")  # the 4th most likely token was filtered out
    biased = logits[1].clone()
    biased[7] += 2.5
    got = decode_row(out.logprobs, 1, tokens[1], 1)
    assert tokens[1] == int(biased.argmax())
    assert got.logprob == pytest.approx(oracle(biased, tokens[1], 1)[0], abs=1e-5)


def test_raw_mode_ignores_temperature_bias_and_filters():
    torch.manual_seed(5)
    logits = torch.randn(1, VOCAB)
    params = SamplingParams(temperature=0.3, top_k=2, seed=0, logit_bias={1: -3.0}, logprobs=3)
    out = Sampler(VOCAB).sample(logits, rows_of([params]))
    token = int(out.tokens[0])
    got = decode_row(out.logprobs, 0, token, 3)
    logprob, rank, top_ids, _ = oracle(logits[0], token, 3)
    assert got.logprob == pytest.approx(logprob, abs=1e-5) and got.rank == rank and got.top_ids == top_ids


def test_logit_bias_matches_a_plain_loop():
    torch.manual_seed(6)
    logits = torch.randn(3, VOCAB)
    params = [SamplingParams(logit_bias={0: 1.5, 9: -100}), SamplingParams(), SamplingParams(logit_bias={9: 100})]
    batch = SamplingBatch.build(params, [[]] * 3, [[]] * 3, [[]] * 3, [None] * 3, vocab_size=VOCAB)
    expected = logits.clone()
    for row, p in enumerate(params):
        for token, bias in (p.logit_bias or {}).items():
            expected[row, token] += bias
    assert torch.equal(apply_logit_bias(logits, batch.logit_bias), expected)


def test_logit_bias_steers_greedy_and_leaves_the_fast_path():
    torch.manual_seed(7)
    logits = torch.randn(2, VOCAB)
    params = [SamplingParams(temperature=0, logit_bias={11: 100}), SamplingParams(temperature=0)]
    tokens = Sampler(VOCAB).sample(logits, rows_of(params)).tokens.tolist()
    assert tokens == [11, int(logits[1].argmax())]


def test_a_ban_wins_over_a_bias():
    """min_tokens bans EOS until then: a +100 bias on it does not bring it back."""
    logits = torch.zeros(1, VOCAB)
    params = [SamplingParams(temperature=0, logit_bias={2: 100}, min_tokens=1)]
    tokens = Sampler(VOCAB).sample(logits, rows_of(params, banned={0: (2,)})).tokens.tolist()
    assert tokens != [2]


@pytest.mark.parametrize("kwargs, match", [
    (dict(logprobs=21), "logprobs must be an int in \\[0, 20\\]"),
    (dict(logprobs=-1), "logprobs must be"),
    (dict(logprobs=True), "logprobs must be"),
    (dict(prompt_logprobs=2.0), "prompt_logprobs must be"),
    (dict(logprobs_mode="softmax"), "logprobs_mode must be one of"),
    (dict(logit_bias=[1, 2]), "logit_bias must be a dict"),
    (dict(logit_bias={"5": 1.0}), "logit_bias keys must be token ids"),
    (dict(logit_bias={-1: 1.0}), "logit_bias keys must be token ids"),
    (dict(logit_bias={5: 100.5}), "logit_bias\\[5\\] must be a number in \\[-100, 100\\]"),
    (dict(logit_bias={5: float("nan")}), "logit_bias\\[5\\]"),
    (dict(max_tokens=0), "max_tokens must be an int >= 1 or None, got 0"),
    (dict(max_tokens=0, prompt_logprobs=0, n=2), "n=1"),
])
def test_bad_logprobs_and_bias_arguments_name_themselves(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_prompt_scoring_params_are_accepted():
    params = SamplingParams(max_tokens=0, prompt_logprobs=0)
    assert params.scores_prompt_only and params.logit_bias is None
    assert SamplingParams(logit_bias={}).logit_bias is None
