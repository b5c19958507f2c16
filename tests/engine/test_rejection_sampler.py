"""The rejection sampler keeps the target distribution: a chi-square test on a vocabulary of 8.

Each test verifies N independent rows at once (one batched call) against fixed target logits:
the first output token of every row must be distributed as p_1, and, among the rows that accepted
the first draft, the second token as p_2. The same statistic, with the same N, rejects two wrong
rules (always accept; resample from p instead of the residual), so the test can fail.
"""

from __future__ import annotations

import pytest
import torch

from minivllm.layers.rejection_sampler import NO_TOKEN, greedy_accept, greedy_verify, rejection_sample, sampling_probs
from minivllm.layers.sampler import SamplingBatch
from minivllm.sampling_params import SamplingParams

V, K, N = 8, 2, 40_000
P_THRESHOLD = 1e-3


def batch_of(n: int, **params) -> SamplingBatch:
    p = SamplingParams(**params)
    return SamplingBatch.build([p] * n, [[]] * n, [[]] * n, [[]] * n, [None] * n, V)


def chi_square_p_value(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    """P(chi2 >= observed) for token counts against `probs` (cells with p > 0)."""
    counts = torch.bincount(tokens, minlength=V).double()
    expected = probs.double() * tokens.numel()
    assert counts[expected == 0].sum() == 0, "drew a token of probability 0"
    cells = expected > 0
    stat = ((counts[cells] - expected[cells]) ** 2 / expected[cells]).sum()
    dof = int(cells.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64), stat / 2))


@pytest.fixture(scope="module")
def target_logits():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(K + 1, V, generator=gen) * 1.5  # one distribution per position


def check_distribution(out: torch.Tensor, target_probs: torch.Tensor, drafts: torch.Tensor) -> list[float]:
    """p-values of the first token against p_1, and of the second against p_2 where the first
    draft was accepted."""
    first_ok = out[:, 0] == drafts[:, 0]
    return [chi_square_p_value(out[:, 0], target_probs[0]),
            chi_square_p_value(out[first_ok, 1], target_probs[1])]


@pytest.mark.parametrize("settings", [dict(temperature=1.0), dict(temperature=0.7, top_k=5, top_p=0.9)])
def test_ngram_drafts_keep_the_target_distribution(target_logits, settings):
    torch.manual_seed(1)
    batch = batch_of(N, **settings)
    logits = target_logits.expand(N, K + 1, V)
    probs = sampling_probs(target_logits[None], batch_of(1, **settings))[0]
    drafts = torch.tensor([[2, 5]]).expand(N, K)  # a point mass, as n-gram proposes
    out = rejection_sample(logits, drafts, torch.full((N,), K), batch)
    assert all(p > P_THRESHOLD for p in check_distribution(out, probs, drafts))
    # Tokens after the first non-accepted position are NO_TOKEN; a row gains 1..K+1 tokens.
    gained = (out != NO_TOKEN).sum(1)
    assert gained.min() >= 1 and gained.max() <= K + 1
    assert (out[:, 0] == 2).float().mean() == pytest.approx(probs[0, 2].item(), abs=0.01)


def test_draft_model_distributions_keep_the_target_distribution(target_logits):
    torch.manual_seed(2)
    batch = batch_of(N, temperature=1.0)
    gen = torch.Generator().manual_seed(3)
    q = torch.softmax(torch.randn(K, V, generator=gen), -1)
    drafts = torch.stack([torch.multinomial(q[i], N, replacement=True) for i in range(K)], dim=1)
    out = rejection_sample(target_logits.expand(N, K + 1, V), drafts, torch.full((N,), K), batch,
                           draft_probs=q.expand(N, K, V))
    probs = torch.softmax(target_logits, -1)
    assert all(p > P_THRESHOLD for p in check_distribution(out, probs, drafts))


def test_logit_bias_is_part_of_the_target_distribution(target_logits):
    """p is softmax(logits + bias): sampled rows follow it, greedy rows keep the biased argmax."""
    torch.manual_seed(5)
    bias = {2: 1.5, 5: -2.0, 6: 1.0}
    vector = torch.zeros(V)
    vector[list(bias)] = torch.tensor(list(bias.values()))
    drafts = torch.tensor([[2, 5]]).expand(N, K)
    out = rejection_sample(target_logits.expand(N, K + 1, V), drafts, torch.full((N,), K),
                           batch_of(N, temperature=1.0, logit_bias=bias))
    assert all(p > P_THRESHOLD for p in check_distribution(out, torch.softmax(target_logits + vector, -1), drafts))
    # Greedy: a bias that moves the argmax at every position moves the kept tokens with it.
    top = target_logits.argmax(-1)
    flip = {int(t): -100.0 for t in top.unique()}
    greedy = rejection_sample(target_logits[None], top[None, :K], torch.tensor([K]),
                              batch_of(1, temperature=0.0, logit_bias=flip))
    biased_first = target_logits[0] + torch.tensor([flip.get(i, 0.0) for i in range(V)])
    assert greedy[0, 0].item() == biased_first.argmax().item()
    assert greedy[0, 1].item() == NO_TOKEN


def test_the_test_rejects_wrong_rules(target_logits):
    """With the same N, always accepting, or resampling from p on a rejection, fails."""
    torch.manual_seed(4)
    probs = torch.softmax(target_logits, -1)
    drafts = torch.tensor([[2, 5]]).expand(N, K)
    always = drafts[:, 0]
    assert chi_square_p_value(always, probs[0]) < P_THRESHOLD
    # Accept with p(x) (right), but on a rejection draw from p itself (wrong: x is drawn twice).
    accept = torch.rand(N) < probs[0, 2]
    resampled = torch.where(accept, 2, torch.multinomial(probs[0], N, replacement=True))
    assert chi_square_p_value(resampled, probs[0]) < P_THRESHOLD


def test_fewer_drafts_than_the_padding_and_greedy_rows():
    """Rows verify 0, 1 or 2 drafts; greedy keeps drafts exactly while they are the argmax."""
    logits = torch.full((3, K + 1, V), -5.0)
    argmax = torch.tensor([[3, 4, 6], [3, 1, 1], [7, 7, 7]])
    logits.scatter_(-1, argmax[..., None], 5.0)
    drafts = torch.tensor([[3, 4], [3, 2], [0, 0]])
    num_drafts = torch.tensor([2, 2, 0])
    expected = [[3, 4, 6], [3, 1, NO_TOKEN], [7, NO_TOKEN, NO_TOKEN]]
    assert greedy_verify(argmax, drafts, num_drafts).tolist() == expected
    # The general path with greedy settings agrees (a greedy row is a point mass).
    batch = batch_of(3, temperature=0.0)
    batch.all_greedy = False
    assert rejection_sample(logits, drafts, num_drafts, batch).tolist() == expected
    one_draft = torch.tensor([1, 1, 1])
    assert greedy_verify(argmax, drafts, one_draft).tolist() == [[3, 4, NO_TOKEN], [3, 1, NO_TOKEN],
                                                                 [7, NO_TOKEN, NO_TOKEN]]


def test_greedy_accept_on_the_host_keeps_what_greedy_verify_keeps():
    """Host drafts: the argmax of every row of logits (a row's 1 + d in a run, d = 0 for a plain
    sample) and the drafts give each row the tokens `greedy_verify` gives on the device."""
    gen = torch.Generator().manual_seed(3)
    for _ in range(50):
        rows = int(torch.randint(1, 6, (1,), generator=gen))
        num_drafts = torch.randint(0, K + 1, (rows,), generator=gen)
        argmax = torch.randint(0, 3, (rows, K + 1), generator=gen)  # 3 tokens: drafts often agree
        drafts = torch.randint(0, 3, (rows, K), generator=gen)
        flat = [t for row, d in zip(argmax.tolist(), num_drafts.tolist()) for t in row[:1 + d]]
        host = greedy_accept(flat, [row[:d] for row, d in zip(drafts.tolist(), num_drafts.tolist())])
        device = greedy_verify(argmax, drafts, num_drafts).tolist()
        assert host == [[t for t in row if t != NO_TOKEN] for row in device]


def test_seeded_rows_draw_the_same_tokens_twice(target_logits):
    def run():
        gens = [torch.Generator().manual_seed(7 + i) for i in range(64)]
        p = SamplingParams(temperature=1.0, seed=7)
        batch = SamplingBatch.build([p] * 64, [[]] * 64, [[]] * 64, [[]] * 64, gens, V)
        return rejection_sample(target_logits.expand(64, K + 1, V), torch.tensor([[2, 5]]).expand(64, K),
                                torch.full((64,), K), batch)

    torch.manual_seed(0)
    first = run()
    torch.manual_seed(99)  # the global RNG does not matter to seeded rows
    assert torch.equal(first, run())


def test_no_draft_counts_means_k_drafts_each(target_logits):
    """num_drafts=None (every row verifies K drafts: the runner's usual n-gram step) draws the
    same tokens as the counts spelled out, seed for seed."""
    batch = batch_of(64, temperature=1.0)
    logits = target_logits.expand(64, K + 1, V)
    drafts = torch.tensor([[2, 5]]).expand(64, K)
    torch.manual_seed(3)
    spelled_out = rejection_sample(logits, drafts, torch.full((64,), K), batch)
    torch.manual_seed(3)
    assert torch.equal(rejection_sample(logits, drafts, None, batch), spelled_out)
