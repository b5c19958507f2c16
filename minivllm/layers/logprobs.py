"""Log-probabilities on the device, and back on the host as plain records.

A request that asks for `logprobs=k` wants, at each position, the log-probability of the token
there (chosen by the sampler, or given by the prompt), its rank, and the k most likely tokens
with theirs. All of it comes from the [rows, V] logits the step already holds on the device; only
the answer, [rows, 2 + 2k] numbers, crosses to the host, with the tokens' asynchronous copy.

    log p(t) = logit(t) - logsumexp(logits)        no [rows, V] log_softmax is written out
    rank(t)  = 1 + #{v : logit(v) > logit(t)}       1 = the most likely
    top-k    = topk(logits) - logsumexp(logits)

The chosen token's value and the top-k values are computed by the same subtraction from the same
logits, so a token that is the argmax has exactly (bit for bit) the top-1 value: a client that
tests "is this token the greedy one" by comparing the two (lm-eval does) gets the right answer.

The payload of one row, float64 so that token ids (< 2**53) and float32 values both fit exactly:

    [logprob, rank, lp_1, id_1, lp_2, id_2, ..., lp_k, id_k]

Rows asking for fewer than the step's widest k are padded on the right; the host trims them.
A step's payload crosses in one asynchronous copy, and becomes records in `decode_rows`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from minivllm.step import TokenLogprobs


def logprobs_payload(logits: torch.Tensor, token_ids: torch.Tensor, num_top: int) -> torch.Tensor:
    """[R, V] logits, [R] token ids -> [R, 2 + 2 * num_top] float64 payload (see the module doc)."""
    logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    chosen = logits.gather(1, token_ids.long()[:, None])
    rank = (logits > chosen).sum(dim=-1, keepdim=True) + 1
    top_values, top_ids = logits.topk(num_top, dim=-1)
    pairs = torch.stack([(top_values - lse).double(), top_ids.double()], dim=2).flatten(1)
    return torch.cat([(chosen - lse).double(), rank.double(), pairs], dim=1)


def pad_payload(payload: torch.Tensor, num_top: int) -> torch.Tensor:
    """Widen a payload to `num_top` pairs (the extra columns are never read)."""
    return F.pad(payload, (0, 2 + 2 * num_top - payload.shape[1]))


def decode_rows(payload: torch.Tensor, token_ids: list[int], num_tops: list[int]) -> list[TokenLogprobs]:
    """A payload on the host as one record per row (`TokenLogprobs`, plain tuples), row r keeping
    its own `num_tops[r]` pairs (`token_ids[r]`: the token it scored).

    A server's engine does this at every step, for every row, on the host's critical path, so each
    kind of column becomes Python numbers in one call for the whole step (through numpy, whose
    views and `tolist` cost less than torch's), the ids and ranks as ints; and when every row
    keeps all the pairs (a decode step whose rows asked for the same k, the usual case) the
    records are zipped together in C: ~50 us instead of ~90 us for 64 rows of k = 5 (2-core CPU).
    """
    rows = payload.numpy()
    logprobs, ranks = rows[:, 0].tolist(), rows[:, 1].astype(np.int64).tolist()
    top_logprobs, top_ids = rows[:, 2::2].tolist(), rows[:, 3::2].astype(np.int64).tolist()
    width = rows.shape[1] // 2 - 1
    if all(k == width for k in num_tops):
        return list(zip(token_ids, logprobs, ranks, map(tuple, top_ids), map(tuple, top_logprobs)))
    columns = zip(token_ids, logprobs, ranks, top_ids, top_logprobs, num_tops)
    return [(token_id, logprob, rank, tuple(ids[:k]), tuple(values[:k]))
            for token_id, logprob, rank, ids, values, k in columns]
