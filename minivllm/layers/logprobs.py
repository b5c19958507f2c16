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
When the sampler says every token *is* its row's argmax (`greedy`), that is all there is to know:
its value is the top-1's, its rank 1, and neither is looked up (two passes over the logits fewer).

The payload of one row, float32, the values as computed and the ids and ranks exactly (below
2**24, which every vocabulary is; checked):

    [logprob, lp_1, ..., lp_k, rank, id_1, ..., id_k]     (two halves of 1 + k)

It is built in a handful of torch ops, each one a kernel launch and microseconds of host time at
every step of a server whose requests all ask. Rows asking for fewer than the step's widest k are
padded at the end of each half; the host trims them. A step's payload crosses in one asynchronous
copy, and becomes records in `decode_rows`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from minivllm.step import TokenLogprobs


MAX_VOCAB = 1 << 24  # ids and ranks up to here are exact in float32


def logprobs_payload(logits: torch.Tensor, token_ids: torch.Tensor, num_top: int,
                     greedy: bool = False) -> torch.Tensor:
    """[R, V] logits, [R] token ids -> [R, 2 + 2 * num_top] float32 payload (see the module doc).
    greedy: every token is its row's argmax of these logits."""
    if logits.shape[-1] > MAX_VOCAB:
        raise ValueError(f"log-probabilities need a vocabulary of at most {MAX_VOCAB} tokens, "
                         f"got {logits.shape[-1]}")
    logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    top_values, top_ids = logits.topk(max(num_top, 1) if greedy else num_top, dim=-1)
    if greedy:
        chosen, rank = top_values[:, :1], torch.ones_like(top_ids[:, :1])
        top_values, top_ids = top_values[:, :num_top], top_ids[:, :num_top]
    else:
        chosen = logits.gather(1, token_ids.long()[:, None])
        rank = (logits > chosen).sum(dim=-1, keepdim=True) + 1
    return torch.cat([torch.cat([chosen, top_values], dim=1) - lse, rank, top_ids], dim=1)  # (promoted to float32)


def pad_payload(payload: torch.Tensor, num_top: int) -> torch.Tensor:
    """Widen a payload to `num_top` pairs: each half padded at its end (never read)."""
    halves = payload.view(payload.shape[0], 2, -1)
    return F.pad(halves, (0, 1 + num_top - halves.shape[2])).flatten(1)


def decode_rows(payload: torch.Tensor, token_ids: list[int], num_tops: list[int]) -> list[TokenLogprobs]:
    """A payload on the host as one record per row (`TokenLogprobs`, plain tuples), row r keeping
    its own `num_tops[r]` pairs (`token_ids[r]`: the token it scored).

    A server's engine does this at every step, for every row, on the host's critical path, so each
    kind of column becomes Python numbers in one call for the whole step (through numpy, whose
    views and `tolist` cost less than torch's), the ids and ranks as ints; and when every row
    keeps all the pairs (a decode step whose rows asked for the same k, the usual case) the
    records are zipped together in C: about half the time of slicing each row (64 rows of k = 5,
    timeit on a 2-core CPU).
    """
    values, ids = payload.numpy().reshape(payload.shape[0], 2, -1).transpose(1, 0, 2)  # the halves
    ids = ids.astype(np.int64)
    logprobs, top_logprobs = values[:, 0].tolist(), values[:, 1:].tolist()
    ranks, top_ids = ids[:, 0].tolist(), ids[:, 1:].tolist()
    width = values.shape[1] - 1
    if all(k == width for k in num_tops):
        return list(zip(token_ids, logprobs, ranks, map(tuple, top_ids), map(tuple, top_logprobs)))
    columns = zip(token_ids, logprobs, ranks, top_ids, top_logprobs, num_tops)
    return [(token_id, logprob, rank, tuple(ids[:k]), tuple(values[:k]))
            for token_id, logprob, rank, ids, values, k in columns]
