"""Sampler tests: greedy, the filters' support, penalties, bans, the grammar bitmask and seeded
reproducibility."""

import math

import pytest
import torch

from minivllm.layers.sampler import (
    Sampler,
    SamplingBatch,
    apply_penalties,
    apply_token_bitmask,
    apply_top_k_top_p_min_p,
)
from minivllm.sampling_params import SamplingParams
from minivllm.step import SampleRow

VOCAB = 8


def batch_for(params, prompts=None, outputs=None, banned=None, seeds=None):
    n = len(params)
    generators = []
    for i, p in enumerate(params):
        seed = (seeds or [None] * n)[i] if seeds else p.seed
        generators.append(None if seed is None else torch.Generator().manual_seed(seed))
    return SamplingBatch.build(
        params,
        prompts or [[] for _ in params],
        outputs or [[] for _ in params],
        banned or [[] for _ in params],
        generators,
        vocab_size=VOCAB,
    )


def log_probs(probs):
    return torch.tensor([[math.log(p) if p > 0 else -math.inf for p in probs]])


def support(logits, params, draws=400):
    """The set of tokens sampled over many draws of one row."""
    torch.manual_seed(0)
    sampler = Sampler()
    seen = set()
    gen_params = [params] * draws
    batch = batch_for(gen_params)
    tokens = sampler(logits.expand(draws, -1).clone(), batch)
    seen.update(tokens.tolist())
    return seen


def test_greedy_is_argmax_for_every_row():
    torch.manual_seed(0)
    logits = torch.randn(5, VOCAB)
    tokens = Sampler()(logits, batch_for([SamplingParams(temperature=0)] * 5))
    assert torch.equal(tokens, logits.argmax(-1))


def test_greedy_rows_stay_greedy_in_a_mixed_batch():
    torch.manual_seed(1)
    logits = torch.randn(6, VOCAB)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.5)] * 3
    tokens = Sampler()(logits, batch_for(params))
    assert torch.equal(tokens[0::2], logits[0::2].argmax(-1))


PROBS = [0.4, 0.25, 0.15, 0.1, 0.06, 0.04, 0.0, 0.0]


@pytest.mark.parametrize(
    "params, expected",
    [
        (SamplingParams(), {0, 1, 2, 3, 4, 5}),
        (SamplingParams(top_k=3), {0, 1, 2}),
        (SamplingParams(top_k=1), {0}),
        (SamplingParams(top_p=0.6), {0, 1}),  # 0.4 < 0.6 <= 0.65
        (SamplingParams(top_p=0.7), {0, 1, 2}),  # 0.65 < 0.7 <= 0.8
        (SamplingParams(min_p=0.3), {0, 1, 2}),  # >= 0.12
        (SamplingParams(min_p=0.5), {0, 1}),  # >= 0.2
        (SamplingParams(top_k=4, top_p=0.95, min_p=0.3), {0, 1, 2}),
        (SamplingParams(top_p=0.01), {0}),  # the top token always survives
    ],
)
def test_filters_keep_exactly_the_right_support(params, expected):
    logits = log_probs(PROBS)
    masked = apply_top_k_top_p_min_p(
        logits, torch.tensor([params.top_k if params.has_top_k else VOCAB]),
        torch.tensor([params.top_p]), torch.tensor([params.min_p]),
    )
    kept = set(torch.isfinite(masked[0]).nonzero().flatten().tolist())
    assert kept == expected
    assert torch.equal(masked[0][list(expected)], logits[0][list(expected)])  # survivors untouched
    assert support(logits, params) == expected  # and sampling draws from exactly that set


def test_filters_apply_per_row():
    logits = log_probs(PROBS).expand(2, -1)
    masked = apply_top_k_top_p_min_p(logits, torch.tensor([1, VOCAB]), torch.tensor([1.0, 1.0]),
                                     torch.tensor([0.0, 0.0]))
    assert torch.isfinite(masked[0]).sum() == 1 and torch.isfinite(masked[1]).sum() == 6


def test_sampling_frequencies_follow_the_temperature_scaled_distribution():
    probs = torch.tensor([0.5, 0.3, 0.2] + [0.0] * (VOCAB - 3))
    logits = probs.clamp_min(1e-30).log()[None]
    draws = 20000
    params = [SamplingParams(temperature=2.0)] * draws
    tokens = Sampler()(logits.expand(draws, -1).clone(), batch_for(params, seeds=list(range(draws))))
    freq = torch.bincount(tokens, minlength=VOCAB).float() / draws
    target = torch.softmax(logits[0] / 2.0, -1)
    # 4 standard errors of a binomial proportion: fails only if the sampler is biased.
    tolerance = 4 * torch.sqrt(target * (1 - target) / draws) + 1e-9
    assert torch.all((freq - target).abs() <= tolerance), (freq, target)


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits():
    logits = torch.tensor([[2.0, -2.0, 2.0, -2.0, 1.0, 1.0, 1.0, 1.0]])
    params = [SamplingParams(repetition_penalty=2.0)]
    out = apply_penalties(logits, batch_for(params, prompts=[[0]], outputs=[[1]]))
    assert out[0].tolist() == [1.0, -4.0, 2.0, -2.0, 1.0, 1.0, 1.0, 1.0]


def test_presence_and_frequency_penalties_count_output_tokens_only():
    logits = torch.zeros(1, VOCAB)
    params = [SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)]
    out = apply_penalties(logits, batch_for(params, prompts=[[5, 5]], outputs=[[1, 2, 2, 2]]))
    expected = [0.0] * VOCAB
    expected[1] = -(0.5 + 0.25 * 1)
    expected[2] = -(0.5 + 0.25 * 3)
    assert out[0].tolist() == pytest.approx(expected)


def test_penalties_change_the_greedy_choice():
    logits = torch.tensor([[3.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    plain = Sampler()(logits, batch_for([SamplingParams(temperature=0)]))
    penalized = Sampler()(
        logits, batch_for([SamplingParams(temperature=0, frequency_penalty=2.0)], outputs=[[0]])
    )
    assert plain.item() == 0 and penalized.item() == 1


def test_banned_tokens_are_never_picked():
    logits = torch.tensor([[6.0] + [0.0] * (VOCAB - 1)])
    many = logits.expand(200, -1).clone()
    free = Sampler()(many, batch_for([SamplingParams()] * 200))
    assert (free == 0).sum() > 100  # without the ban, token 0 dominates
    banned = Sampler()(many, batch_for([SamplingParams()] * 200, banned=[[0]] * 200))
    assert 0 not in banned.tolist()
    greedy = Sampler()(logits, batch_for([SamplingParams(temperature=0)], banned=[[0]]))
    assert greedy.item() != 0


def test_same_seed_same_tokens_and_different_seeds_differ():
    torch.manual_seed(3)
    logits = torch.randn(1, VOCAB)
    params = [SamplingParams(temperature=1.0, seed=7)]

    def run(seed):
        batch = batch_for(params, seeds=[seed])  # one generator, reused for 30 draws
        return [Sampler()(logits, batch).item() for _ in range(30)]

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_a_seeded_row_gives_the_same_tokens_whatever_the_batch():
    torch.manual_seed(4)
    logits = torch.randn(5, VOCAB) * 2
    seeded = SamplingParams(temperature=0.9, top_p=0.9, seed=123)

    def draw(rows, index):
        params = [seeded if i == index else SamplingParams(temperature=1.3, top_k=3) for i in range(len(rows))]
        gens = [torch.Generator().manual_seed(123) if i == index else None for i in range(len(rows))]
        out = []
        for _ in range(20):  # the generator persists across steps, as in the engine
            batch = SamplingBatch.build(params, [[]] * len(rows), [[]] * len(rows), [[]] * len(rows),
                                        gens, VOCAB)
            out.append(Sampler()(logits[rows], batch)[index].item())
        return out

    alone = draw([2], 0)
    assert draw([0, 1, 2, 3, 4], 2) == alone
    assert draw([4, 2], 1) == alone
    assert draw([2, 2, 0], 0) == alone


def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match="logits"):
        Sampler()(torch.zeros(VOCAB), batch_for([SamplingParams()]))
    with pytest.raises(ValueError, match="rows"):
        Sampler()(torch.zeros(2, VOCAB), batch_for([SamplingParams()]))


@pytest.mark.parametrize("vocab", [1, 31, 32, 33, 100, 129])
def test_token_bitmask_drops_exactly_the_forbidden_tokens(vocab):
    """`apply_token_bitmask` against a plain masked_fill whose mask is read bit by bit from the
    int32 words (bit t % 32 of word t // 32), the layout xgrammar fills."""
    g = torch.Generator().manual_seed(vocab)
    words = -(-vocab // 32)
    bitmask = torch.randint(-2**31, 2**31, (4, words), dtype=torch.int32, generator=g)
    bitmask[1] = -1  # everything allowed
    bitmask[2] = 0  # nothing allowed
    bitmask[3, 0] = -2**31  # only the sign bit: token 31 alone (where the vocabulary has it)
    logits = torch.randn(4, vocab, generator=g)
    allowed = torch.tensor([[(int(bitmask[r, t // 32]) >> (t % 32)) & 1 for t in range(vocab)] for r in range(4)])
    expected = logits.masked_fill(allowed == 0, float("-inf"))
    assert torch.equal(apply_token_bitmask(logits, bitmask), expected)
    assert torch.isfinite(apply_token_bitmask(logits, bitmask)[1]).all()


def test_the_bitmask_applies_before_sampling_and_greedy():
    """Greedy picks the best allowed token; sampled rows never draw a forbidden one."""
    torch.manual_seed(5)
    logits = torch.randn(3, 64)
    bitmask = torch.zeros(3, 2, dtype=torch.int32)
    bitmask[:, 1] = 0b1011  # tokens 32, 33 and 35
    rows = [SampleRow(i, SamplingParams(temperature=t)) for i, t in enumerate((0.0, 1.0, 5.0))]
    for _ in range(50):
        tokens = Sampler(64).sample(logits, rows, bitmask).tokens.tolist()
        assert set(tokens) <= {32, 33, 35}
        allowed = [32, 33, 35]
        assert tokens[0] == allowed[int(logits[0, allowed].argmax())]


def test_the_raw_logprobs_are_the_models_and_the_processed_ones_see_the_mask():
    """The mask is part of the processed distribution, never of the model's own."""
    from minivllm.layers.logprobs import decode_rows

    torch.manual_seed(6)
    logits = torch.randn(2, 64)
    bitmask = torch.zeros(2, 2, dtype=torch.int32)
    bitmask[:, 1] = 0b1011  # tokens 32, 33 and 35
    allowed = [32, 33, 35]
    rows = [SampleRow(0, SamplingParams(temperature=0, logprobs=2)),
            SampleRow(1, SamplingParams(temperature=0, logprobs=2, logprobs_mode="processed"))]
    out = Sampler(64).sample(logits, rows, bitmask)
    tokens = out.tokens.tolist()
    (_, raw, _, raw_top, _), (_, processed, rank, processed_top, _) = decode_rows(out.logprobs, tokens, [2, 2])
    assert tokens == [allowed[int(logits[r, allowed].argmax())] for r in range(2)]
    assert raw == pytest.approx(logits[0].log_softmax(-1)[tokens[0]].item(), abs=1e-6)
    assert list(raw_top) == logits[0].topk(2).indices.tolist()
    assert processed == pytest.approx(logits[1, allowed].log_softmax(-1).max().item(), abs=1e-6)
    assert rank == 1 and set(processed_top) <= set(allowed)
