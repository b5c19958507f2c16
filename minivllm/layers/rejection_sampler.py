"""Rejection sampling: which draft tokens to keep, so that speculation changes nothing but speed.

A sequence verifies drafts x_1..x_d after its last token. One forward of the model gives its
distribution at every one of those d + 1 positions: p_1 (after the last token), p_2 (after
x_1), ..., p_{d+1} (after x_d). A proposer drew x_i from its own distribution q_i (a draft
model's; an n-gram proposer's is a point mass on x_i). Position by position:

    accept x_i with probability min(1, p_i(x_i) / q_i(x_i));
    at the first rejection, draw the token from norm(max(p_i - q_i, 0)) and stop;
    if all d are accepted, draw one more token from p_{d+1}.

The token at each position is then distributed exactly as p_i (Leviathan et al., 2023; Chen et
al., 2023): P(x) = q(x) min(1, p(x)/q(x)) + (1 - sum_y min(p(y), q(y))) * max(p(x) - q(x), 0)
/ Z = min(p(x), q(x)) + max(p(x) - q(x), 0) = p(x), since Z equals that same rejected mass. So a
step gains between 1 and d + 1 tokens and the output follows the model's distribution;
tests/engine/test_rejection_sampler.py checks it with a chi-square test.

p is the distribution the plain sampler draws from: logit_bias, temperature, top-k, top-p,
min-p applied; for a greedy request it is a point mass on the (biased) argmax. (Penalties and
min_tokens bans depend on the tokens before each position: such requests do not speculate,
engine/speculation.py.) Then a draft is accepted exactly when it
is the argmax, and the token drawn at the first rejection is the argmax: greedy output is the
model's own, token for token.

Everything is batched on the device: [S, d + 1, V] probabilities for S sequences, padded to the
step's most drafts; no per-token Python loop, nothing read back until the tokens are copied.
"""

from __future__ import annotations

import torch

from minivllm.layers.sampler import SamplingBatch, apply_logit_bias, apply_top_k_top_p_min_p, exponential_noise

NO_TOKEN = -1  # marks the positions of an output row after its last token


def biased_logits(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """[S, P, V] logits -> [S * P, V] float32, each row's logit_bias added at every position."""
    num_rows, positions, vocab = logits.shape
    flat = logits.reshape(num_rows * positions, vocab).float()
    if batch.logit_bias is None:
        return flat
    rows, token_ids, biases = batch.logit_bias
    at = torch.arange(positions, device=flat.device)
    return apply_logit_bias(flat, ((rows[:, None] * positions + at).ravel(), token_ids.repeat_interleave(positions),
                                   biases.repeat_interleave(positions)))


def sampling_probs(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """The distribution the sampler draws from at each position: [S, P, V] logits of S rows
    (P positions each, settings per row in `batch`) -> probabilities, float32. logit_bias, then
    temperature, then top-k / top-p / min-p, then softmax; a greedy row is a point mass on its
    argmax."""
    num_rows, positions, vocab = logits.shape
    flat = biased_logits(logits, batch)

    def per_position(column: torch.Tensor) -> torch.Tensor:
        return column.repeat_interleave(positions)

    is_greedy = per_position(batch.temperature == 0)
    temperature = per_position(torch.where(batch.temperature == 0, 1.0, batch.temperature))
    flat = flat / temperature[:, None]
    if batch.any_filters:
        flat = apply_top_k_top_p_min_p(flat, per_position(batch.top_k), per_position(batch.top_p),
                                       per_position(batch.min_p))
    probs = flat.softmax(dim=-1)
    if is_greedy.any():
        one_hot = torch.zeros_like(probs).scatter_(-1, flat.argmax(-1, keepdim=True), 1.0)
        probs = torch.where(is_greedy[:, None], one_hot, probs)
    return probs.view(num_rows, positions, vocab)


def _uniform(shape, generators: list[torch.Generator | None], device) -> torch.Tensor:
    """U[0, 1) draws per row; a row with a generator draws from it alone (reproducible)."""
    u = torch.empty(shape, dtype=torch.float32, device=device)
    seeded = [i for i, g in enumerate(generators) if g is not None]
    if len(seeded) < len(generators):
        u.uniform_()
    for i in seeded:
        u[i].uniform_(generator=generators[i])
    return u


def greedy_verify(target_ids: torch.Tensor, draft_ids: torch.Tensor,
                  num_drafts: torch.Tensor | None = None) -> torch.Tensor:
    """Greedy rows only: keep drafts while they equal the model's argmax, then the argmax.

    target_ids [S, K + 1]: the model's argmax after the last token and after each draft;
    draft_ids [S, K]; num_drafts [S] (None: every row has K). Returns [S, K + 1] tokens, NO_TOKEN
    after each row's last. An accepted draft *is* the argmax at its position, so a row's tokens
    are its target_ids up to its first mismatch, included: no drafts to gather.
    """
    num_accepted = _num_accepted(draft_ids == target_ids[:, :-1], num_drafts)
    position = torch.arange(target_ids.shape[1], device=target_ids.device)
    return torch.where(position <= num_accepted[:, None], target_ids, NO_TOKEN)


def greedy_accept(target_ids: list[int], drafts: list[list[int]]) -> list[list[int]]:
    """`greedy_verify` on the host, for drafts the host knows (an n-gram proposer's).

    target_ids: the model's argmax at every row of logits of the step, a sample row's 1 + d rows
    in a run (d = 0: a plain greedy sample); drafts: each sample row's d drafts. Returns each
    sample row's tokens: its argmaxes up to its first mismatch, included. The argmaxes come back
    to the host anyway, so deciding here costs a few comparisons in Python where the device
    would run a handful of ops (each a launch) to compare, count and mask.
    """
    out, row = [], 0
    for row_drafts in drafts:
        accepted = 0
        while accepted < len(row_drafts) and row_drafts[accepted] == target_ids[row + accepted]:
            accepted += 1
        out.append(target_ids[row:row + accepted + 1])
        row += 1 + len(row_drafts)
    return out


def rejection_sample(target_logits: torch.Tensor, draft_ids: torch.Tensor, num_drafts: torch.Tensor | None,
                     batch: SamplingBatch, draft_probs: torch.Tensor | None = None) -> torch.Tensor:
    """Verify S rows of drafts; returns [S, K + 1] tokens: the accepted drafts, then one token
    drawn by the rule above, then NO_TOKEN.

    target_logits [S, K + 1, V]: the model's logits after the last token and after each draft
    (rows past a row's num_drafts + 1 are ignored); draft_ids [S, K] int64; num_drafts [S] (None:
    every row has K);
    batch: the S rows' sampling settings and generators; draft_probs [S, K, V]: the proposer's
    q, or None for a point mass on each draft (n-gram).
    """
    if batch.all_greedy:  # p and q are point masses: no draws at all
        target_ids = biased_logits(target_logits, batch).argmax(dim=-1).view(target_logits.shape[:2])
        return greedy_verify(target_ids, draft_ids, num_drafts)
    num_rows, positions, _ = target_logits.shape
    probs = sampling_probs(target_logits, batch)
    rows = torch.arange(num_rows, device=probs.device)
    p_draft = probs[:, :-1].gather(-1, draft_ids[..., None]).squeeze(-1)  # p_i(x_i), [S, K]
    q_draft = 1.0 if draft_probs is None else draft_probs.gather(-1, draft_ids[..., None]).squeeze(-1)
    u = _uniform(p_draft.shape, batch.generators, probs.device)
    num_accepted = _num_accepted(u * q_draft < p_draft, num_drafts)  # u < p / q, q > 0
    # Where the row stops: its first rejection, or one past its last draft (then q counts as 0).
    p_stop = probs[rows, num_accepted]
    rejected = num_accepted < (draft_ids.shape[1] if num_drafts is None else num_drafts)
    if draft_probs is None:
        stop_draft = draft_ids.gather(1, num_accepted.clamp(max=positions - 2)[:, None])
        q_stop = torch.zeros_like(p_stop).scatter_(-1, stop_draft, rejected[:, None].float())
    else:
        q_stop = draft_probs[rows, num_accepted.clamp(max=positions - 2)] * rejected[:, None]
    residual = (p_stop - q_stop).clamp_(min=0.0)
    # p == q exactly leaves nothing, but then the draft was accepted with probability 1.
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_stop)
    noise = exponential_noise(residual.shape, batch.generators, probs.device)
    last = (residual / noise).argmax(dim=-1)  # a draw from norm(residual): the exponential race
    return _assemble(draft_ids, num_accepted, last)


def _num_accepted(accept: torch.Tensor, num_drafts: torch.Tensor | None) -> torch.Tensor:
    """Leading accepted drafts per row ([S, K] flags, only the first num_drafts count; None: all K)."""
    if num_drafts is not None:
        accept = accept & (torch.arange(accept.shape[1], device=accept.device) < num_drafts[:, None])
    return accept.cumprod(dim=1).sum(dim=1)  # a bool cumprod counts in int64


def _assemble(draft_ids: torch.Tensor, num_accepted: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """[S, K + 1]: accepted drafts, then `last`, then NO_TOKEN."""
    num_rows, k = draft_ids.shape
    index = torch.arange(k + 1, device=draft_ids.device)[None, :]
    padded = torch.cat([draft_ids, draft_ids.new_zeros(num_rows, 1)], dim=1)
    out = torch.where(index < num_accepted[:, None], padded, NO_TOKEN)
    return torch.where(index == num_accepted[:, None], last[:, None], out)
