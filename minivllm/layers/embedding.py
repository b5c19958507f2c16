"""The token embedding and the LM head, split over tensor-parallel ranks by vocabulary rows.

Both are a [vocab, hidden] matrix, and at 128k-150k tokens of vocabulary a large one (1 GB in
bf16 for an 8B Llama). Rank r holds a contiguous block of rows (token ids), so the vocabulary is
split the same way in both, and a tied LM head can share the embedding's parameter on every rank.

* **Embedding** (`VocabParallelEmbedding`): each rank looks up the ids that fall in its block
  and writes zeros for the others; an all-reduce adds the N partial results, and since exactly
  one rank owns each id, the sum is the embedding. It costs one all-reduce of [tokens, hidden]
  per step, the size of each of the two per layer: 1 more than a 32-layer model's 64. Keeping
  the whole table on every rank instead would save that one all-reduce and cost every GPU the
  whole table's memory (0.5 GB more per GPU at 8B, taken from the KV cache).
* **LM head** (`ParallelLMHead`): each rank computes the logits of its block of the vocabulary
  (hidden x its rows^T) and an all-gather puts them side by side, on *every* rank. Every rank
  then runs the same sampler on the same logits and draws the same tokens (see
  worker/executor.py), so no token ever has to be sent from one rank to another.

A vocabulary rarely divides by N: each block is padded to ceil(vocab / N) rows so every rank
holds tensors of the same shape; the padding rows are zero, no id reaches them, and their
logits are cut off after the gather.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minivllm.distributed import SINGLE, TensorParallel, all_gather, all_reduce
from minivllm.layers import onednn
from minivllm.layers.linear import CheckpointSplit


class VocabParallelEmbedding(nn.Module):
    """Token ids [T] -> embeddings [T, dim], this rank holding rows `rows` of the table."""

    def __init__(self, vocab_size: int, dim: int, tp: TensorParallel = SINGLE):
        super().__init__()
        self.tp = tp
        self.rows, part = tp.padded_shard(vocab_size)  # padding rows stay zero
        self.weight = nn.Parameter(torch.zeros(part, dim))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.rows.start
        mine = (local >= 0) & (local < self.rows.size)
        out = F.embedding(torch.where(mine, local, 0), self.weight)
        out.masked_fill_(~mine.unsqueeze(-1), 0)  # ids of other ranks: they add their rows
        return all_reduce(out, self.tp)

    def checkpoint_split(self, kind: str, shard: str | None = None) -> CheckpointSplit:
        return 0, self.rows


class ParallelLMHead(VocabParallelEmbedding):
    """Hidden states [N, dim] -> logits over the whole vocabulary [N, vocab], on every rank."""

    ONEDNN_WEIGHT = True  # on a CPU, onednn.pack_weights may reorder the weight (a tied one: a copy)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # [N, rows of this rank (padded)]; oneDNN's product for a weight reordered for it (CPU)
        logits = onednn.linear(hidden, self.weight, None)
        if self.tp.size == 1:
            return logits
        return all_gather(logits, self.tp)[..., :self.rows.full]
