"""Which rows of a step's logits and inputs a speculative verification reads.

A sequence that verifies d drafts computes 1 + d query rows: its last known token, then the
drafts. Row i's logits are the model's distribution after that row's token, so they judge the
draft in row i + 1, and the last row's give the token after the last draft. The rejection
sampler wants them as [n, 1 + k] logits and [n, k] drafts per verifying sequence. In the usual
n-gram step every sequence verifies exactly k drafts and the step's rows already have that
shape: views, nothing gathered (`verification`). Any other step (fewer drafts, forks, rows that
verify nothing) is gathered by indices made on the host and sent in one copy
(`gathered_verification`); the two are tested equal on every kind of packed step. (A greedy
step whose drafts the host knows, the usual n-gram step, needs neither: the host accepts its
drafts from the argmax of every row, `rejection_sampler.greedy_accept`.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch


class Verification(NamedTuple):
    """A verification step's rows, as the rejection sampler takes them.

    The n sample rows that verify drafts (`verifying`, their indices in the step's sample rows)
    have their target logits [n, 1 + k, V], their draft ids [n, k] and their drafts each [n]
    (None: k each). The others (`plain`) are sampled as usual; on the device, `where` and
    `plain_where` say where both kinds go among the step's sample rows, `plain_rows` which rows
    of logits the plain ones read (all three None when every row verifies)."""

    target_logits: torch.Tensor
    draft_ids: torch.Tensor
    num_drafts: torch.Tensor | None
    verifying: Sequence[int]
    plain: Sequence[int] = ()
    where: torch.Tensor | None = None
    plain_where: torch.Tensor | None = None
    plain_rows: torch.Tensor | None = None


def verification(seqs, logits: torch.Tensor, input_ids: torch.Tensor, k: int, query_len: int | None) -> Verification:
    """The rows a verification step verifies (see `Verification`): its sequences `seqs`, its
    `logits`, its `input_ids` and query_len as `ModelRunner._verify` has them.

    A verifying sample row owns 1 + d consecutive rows of `logits`, and its d drafts are the
    last d of its sequence's input rows. In the usual n-gram step every sequence has one token
    then k drafts, in 1 + k input rows and as many rows of logits: both are [n, 1 + k] as they
    stand, and nothing is gathered. Any other shape is (`gathered_verification`)."""
    if all(s.num_draft_tokens == k and s.num_new_tokens == k + 1 and s.num_samples == 1 for s in seqs):
        n = len(seqs)
        return Verification(logits.view(n, k + 1, -1), input_ids[:n * (k + 1)].view(n, k + 1)[:, 1:], None, range(n))
    return gathered_verification(seqs, logits, input_ids, k, query_len)


def gathered_verification(seqs, logits: torch.Tensor, input_ids: torch.Tensor, k: int,
                          query_len: int | None) -> Verification:
    """`verification` of a step of any shape, gathered by indices made on the host and sent at
    once; a row with d < k drafts repeats its last row and its last draft up to k."""
    plain, verifying = [], []  # by kind: (sample row, first logits row, drafts, first draft's input row)
    logits_row = input_row = 0
    for s in seqs:
        kind = verifying if s.num_draft_tokens else plain
        for sample in range(s.num_samples):  # a sequence that verifies drafts samples once
            kind.append((len(plain) + len(verifying), logits_row + sample, s.num_draft_tokens,
                         input_row + s.num_new_tokens - s.num_draft_tokens))
        logits_row += s.num_logits_rows
        input_row += query_len or s.num_new_tokens
    first, drafts, draft_start = (np.array([v[c] for v in verifying], dtype=np.int64) for c in (1, 2, 3))
    steps = np.arange(k + 1)
    index = np.concatenate([
        (first[:, None] + np.minimum(steps, drafts[:, None])).ravel(),  # [n, 1 + k]
        (draft_start[:, None] + np.minimum(steps[:k], drafts[:, None] - 1)).ravel(),  # [n, k]: input rows
        drafts, *(np.array(column, dtype=np.int64) for column in (
            [i for i, *_ in verifying], [i for i, *_ in plain], [f for _, f, *_ in plain]))])
    index = torch.from_numpy(index).to(logits.device, non_blocking=True)
    n, m = len(verifying), len(plain)
    target_rows, draft_rows, d, where, plain_where, plain_rows = index.split([n * (k + 1), n * k, n, n, m, m])
    return Verification(logits[target_rows].view(n, k + 1, -1), input_ids[draft_rows].view(n, k), d,
                        [i for i, *_ in verifying], [i for i, *_ in plain], where, plain_where, plain_rows)
