"""Linear layers split over tensor-parallel ranks, and the merged q|k|v and gate|up projections.

A linear layer y = x W^T (W is [out, in]) can be split over N ranks in two ways (Megatron-LM):

* **column-parallel**: rank r holds rows r of W, i.e. a slice of the *output* features. Every
  rank reads the whole input and computes its slice of y; no communication. q/k/v, gate/up and
  OPT's fc1 are split so, which hands each rank whole attention heads and whole MLP channels.
* **row-parallel**: rank r holds columns r of W, a slice of the *input* features, so it needs
  only slice r of x: exactly what a column-parallel layer left it. Its product is a partial sum
  of y; an all-reduce adds the N partials. The attention output projection and the MLP's down
  projection (OPT's fc2) are split so.

A transformer block is therefore column -> (per-head or per-channel work) -> row + all-reduce,
twice per layer: two all-reduces of [tokens, hidden] per layer, nothing else.

**Merged projections.** Attention projects each hidden state three times (q, k, v) and a gated
MLP twice (gate, up). They read the same input, so their (per-rank) weight matrices are stacked
row-wise into one: one GEMM instead of three, one kernel launch and one pass over the input.
The output is the concatenation of the individual outputs; slicing it recovers them.

**Loading.** Checkpoints store the unsplit, unmerged tensors (`q_proj.weight` [Hq*D, hidden],
...). Each layer says which slice of such a tensor this rank keeps (`checkpoint_split`:
dimension and `Shard`), and a merged layer where in its own weight each projection goes
(`shard`); the loader then reads just that slice from the file (models/loader.py).

With one rank every layer is the plain `nn.Linear` it replaces: same parameters, same forward.
For a batch of 1 to 4 rows (decode at small batch) on CUDA the product runs as fused_linear.py's
kernel instead of cuBLAS (`linear` below), so that the step's chain of Triton kernels is not
broken (kernels/pdl.py).
On a CPU the model runner reorders the float32 weights for oneDNN once (onednn.py); `linear`
then multiplies through it.
"""

from __future__ import annotations

import torch
from torch import nn

from minivllm.distributed import SINGLE, Shard, TensorParallel, all_reduce
from minivllm.layers import onednn, use_fused_linear

# (dimension of the checkpoint tensor that is split, this rank's part), or None: all of it.
CheckpointSplit = tuple[int, Shard] | None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear; for 1 to 4 rows on CUDA, fused_linear.py's kernel (`use_fused_linear`); oneDNN's
    product for a weight reordered for it (onednn.pack_weights, CPU only)."""
    if x.dim() == 2 and use_fused_linear(x):
        from minivllm.layers import fused_linear  # imports Triton: only where it runs

        return fused_linear.linear(x, weight, bias)
    return onednn.linear(x, weight, bias)


class ColumnParallelLinear(nn.Linear):
    """y[:, slice r] = x W[slice r]^T (+ b[slice r]): this rank's slice of the output features.

    The output stays split; the row-parallel layer after it expects exactly that.
    """

    ONEDNN_WEIGHT = True  # on a CPU, onednn.pack_weights may reorder the weight (see `linear`)

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TensorParallel = SINGLE,
                 what: str = "output features"):
        out_shard = tp.shard(out_features, what)
        super().__init__(in_features, out_shard.size, bias=bias)
        self.tp = tp
        self.out_shard = out_shard

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)

    def checkpoint_split(self, kind: str, shard: str | None = None) -> CheckpointSplit:
        """Weight rows and bias entries alike: this rank's slice of dimension 0."""
        return 0, self.out_shard


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of the same input in one matrix, e.g. gate | up.

    shards: name -> this rank's `Shard` of that projection's output features (its full size,
    where this rank's slice starts, how long it is). The weight stacks this rank's slices in
    the order given.
    """

    def __init__(self, in_features: int, shards: dict[str, Shard], bias: bool, tp: TensorParallel = SINGLE):
        if not shards or any(s.size <= 0 for s in shards.values()):
            raise ValueError(f"shard sizes must be positive, got {shards}")
        nn.Linear.__init__(self, in_features, sum(s.size for s in shards.values()), bias=bias)
        self.tp = tp
        self.checkpoint_shards = dict(shards)
        self.shard_sizes = {name: s.size for name, s in shards.items()}
        self.shard_offsets: dict[str, int] = {}
        offset = 0
        for name, size in self.shard_sizes.items():
            self.shard_offsets[name] = offset
            offset += size

    @classmethod
    def split_evenly(cls, in_features: int, sizes: dict[str, int], bias: bool,
                     tp: TensorParallel = SINGLE) -> MergedColumnParallelLinear:
        """Each projection of full size `sizes[name]` split evenly over the ranks."""
        return cls(in_features, {name: tp.shard(size, f"{name} projection size") for name, size in sizes.items()},
                   bias, tp)

    def shard(self, tensor: torch.Tensor, name: str) -> torch.Tensor:
        """The rows of `tensor` (this layer's weight or bias) that hold projection `name`, as a view."""
        if name not in self.shard_sizes:
            raise ValueError(f"unknown shard {name!r}; this layer has {list(self.shard_sizes)}")
        return tensor.narrow(0, self.shard_offsets[name], self.shard_sizes[name])

    def checkpoint_split(self, kind: str, shard: str | None = None) -> CheckpointSplit:
        return 0, self.checkpoint_shards[shard]

    def forward_split(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Apply the layer and return the projections' outputs separately (views into one result)."""
        return self.split_output(self(x))

    def split_output(self, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """This layer's output [..., out] cut into the projections' outputs (views)."""
        return y.split(list(self.shard_sizes.values()), dim=-1)


class QKVParallelLinear(MergedColumnParallelLinear):
    """q | k | v of attention, split over the ranks by whole heads.

    Rank r gets query heads [r Hq/N, (r+1) Hq/N) and the KV heads they attend with. Normally
    that is Hkv/N KV heads; with fewer KV heads than ranks (Hkv < N, e.g. 8 KV heads over 16
    GPUs, or multi-query attention) each rank keeps the *one* KV head its query heads share,
    so a KV head is replicated on N/Hkv ranks. Either way the grouping of grouped-query
    attention holds inside each rank. `num_heads` / `num_kv_heads` are this rank's counts.
    """

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool,
                 tp: TensorParallel = SINGLE):
        q_heads = tp.shard(num_heads, "number of attention heads")
        kv_heads = kv_heads_of_rank(num_kv_heads, tp)
        shards = {"q": _times(q_heads, head_dim), "k": _times(kv_heads, head_dim),
                       "v": _times(kv_heads, head_dim)}
        super().__init__(hidden_size, shards, bias, tp)
        self.num_heads = q_heads.size
        self.num_kv_heads = kv_heads.size


def kv_heads_of_rank(num_kv_heads: int, tp: TensorParallel) -> Shard:
    """The KV heads rank r holds: Hkv/N of them, or the one its query heads share when Hkv < N."""
    if num_kv_heads >= tp.size:
        return tp.shard(num_kv_heads, "number of KV heads")
    if tp.size % num_kv_heads:
        raise ValueError(f"tensor_parallel_size={tp.size} is neither a divisor nor a multiple of the "
                         f"number of KV heads ({num_kv_heads})")
    return Shard(num_kv_heads, tp.rank * num_kv_heads // tp.size, 1)


def _times(heads: Shard, head_dim: int) -> Shard:
    """A range of heads as a range of features."""
    return Shard(heads.full * head_dim, heads.start * head_dim, heads.size * head_dim)


class RowParallelLinear(nn.Linear):
    """y = sum over ranks of x[:, slice r] W[:, slice r]^T, + b: the input arrives split.

    Each rank multiplies its slice of the input by its columns of W, a partial sum of y; one
    all-reduce adds them, on every rank. The bias is added once, by rank 0, before the sum.
    With `reduce=False` the layer returns its rank's partial sum, and the caller adds the ranks'
    together with what it does next (layernorm.reduce_add_rms_norm).
    """

    ONEDNN_WEIGHT = True  # on a CPU, onednn.pack_weights may reorder the weight (see `linear`)

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TensorParallel = SINGLE,
                 what: str = "input features", reduce: bool = True):
        in_shard = tp.shard(in_features, what)
        super().__init__(in_shard.size, out_features, bias=bias)
        self.tp = tp
        self.in_shard = in_shard
        self.reduce = reduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return linear(x, self.weight, self.bias)
        partial = linear(x, self.weight, self.bias if self.tp.rank == 0 else None)
        return all_reduce(partial, self.tp) if self.reduce else partial

    def checkpoint_split(self, kind: str, shard: str | None = None) -> CheckpointSplit:
        """The weight's columns are split; the bias is whole on every rank."""
        return (1, self.in_shard) if kind == "weight" else None
