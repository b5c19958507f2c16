"""MergedLinear: several projections of the same input computed by one matrix multiply.

Attention projects each hidden state three times (q, k, v) and a gated MLP twice (gate, up).
Those projections all read the same input, so stacking their weight matrices row-wise gives one
`[sum of outputs, in]` matrix: one GEMM instead of three (or two), which on a GPU means one kernel
launch and one pass over the input instead of several. The output is the concatenation of the
individual outputs, and slicing it recovers them.

Checkpoints still store the projections separately (`q_proj`, `k_proj`, ...). `shard()` gives the
rows of the stacked weight (or bias) that belong to one of them, so the loader can copy each
checkpoint tensor into its place.
"""

from __future__ import annotations

import torch
from torch import nn


class MergedLinear(nn.Linear):
    """A linear layer whose output is the concatenation of named shards, e.g. q | k | v."""

    def __init__(self, in_features: int, shard_sizes: dict[str, int], bias: bool):
        if not shard_sizes or any(size <= 0 for size in shard_sizes.values()):
            raise ValueError(f"shard sizes must be positive, got {shard_sizes}")
        super().__init__(in_features, sum(shard_sizes.values()), bias=bias)
        self.shard_sizes = dict(shard_sizes)
        self.shard_offsets: dict[str, int] = {}
        offset = 0
        for name, size in self.shard_sizes.items():
            self.shard_offsets[name] = offset
            offset += size

    def shard(self, tensor: torch.Tensor, name: str) -> torch.Tensor:
        """The rows of `tensor` (this layer's weight or bias) that hold shard `name`, as a view."""
        if name not in self.shard_sizes:
            raise ValueError(f"unknown shard {name!r}; this layer has {list(self.shard_sizes)}")
        return tensor.narrow(0, self.shard_offsets[name], self.shard_sizes[name])

    def forward_split(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Apply the layer and return the shard outputs separately (views into one result)."""
        return self(x).split(list(self.shard_sizes.values()), dim=-1)
