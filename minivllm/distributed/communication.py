"""The collectives tensor parallelism needs, as thin wrappers over `torch.distributed`.

Two tensor ops are enough for a Megatron-style split of a transformer:

* `all_reduce` (sum): a row-parallel layer gives each rank a *partial* sum of the output (its
  slice of the input times its slice of the weight); adding the N partials gives the full
  output, on every rank. Two per decoder layer (attention output, MLP output) plus one for the
  vocabulary-parallel embedding.
* `all_gather`: the LM head gives each rank the logits of its slice of the vocabulary; the
  sampler needs all of them, on every rank (each rank samples the same tokens itself).

With one rank both are the identity and cost one attribute test. Both run on the current CUDA
stream's order (NCCL) without a host sync, so a CUDA graph can capture the all-reduces of a
decode step like any other kernel (see docs/tensor_parallel.md for what must hold).

Two host-side helpers run over the gloo group: `min_over_ranks` (the ranks agree on a number,
e.g. how many KV blocks every rank can hold) and `barrier`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from minivllm.distributed.parallel_state import TensorParallel

# torch 2.13 renamed all_gather_into_tensor; the GPU machine's torch 2.11 only has the old name.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def all_reduce(x: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    """Sum `x` over the ranks; returns the sum (x itself, summed in place, or a new tensor).

    Small tensors (a decode step's) go through peer GPU memory in one kernel when the ranks have
    set that up (`tp.peer`, see peer_all_reduce.py); everything else through the process group.
    """
    if tp.size == 1:
        return x
    if tp.peer is not None and tp.peer.fits(x):
        return tp.peer(x)
    dist.all_reduce(x, group=tp.group)
    return x


def all_gather(x: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    """Concatenate every rank's `x` [..., n] along the last dimension: [..., size * n], rank order."""
    if tp.size == 1:
        return x
    x = x.contiguous()
    # The ranks' tensors one after the other along dim 0 (the layout both NCCL and gloo accept) ...
    gathered = torch.empty((tp.size * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    _all_gather_single(gathered, x, group=tp.group)
    # ... then side by side along the last dimension: [size, ..., n] -> [..., size * n].
    per_rank = gathered.view(tp.size, *x.shape)
    return per_rank.movedim(0, -2).reshape(*x.shape[:-1], tp.size * x.shape[-1])


def min_over_ranks(value: int, tp: TensorParallel) -> int:
    """The smallest of every rank's `value` (a host integer), on every rank."""
    if tp.size == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=tp.cpu_group)
    return int(t.item())


def barrier(tp: TensorParallel) -> None:
    """Wait until every rank gets here (over gloo: a rank that died makes it raise, not hang)."""
    if tp.size > 1:
        dist.barrier(group=tp.cpu_group)
