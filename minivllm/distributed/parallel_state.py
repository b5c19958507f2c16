"""Tensor-parallel state: which rank this process is, of how many, and the groups to talk over.

Tensor parallelism (Megatron-style) splits every layer of one model over N processes, one per GPU.
Process r ("rank r") holds slice r of each weight matrix and of the KV cache, and the ranks
exchange partial results with collectives (`communication.py`). What a process needs to know is
small, and it is all in one object passed down explicitly to every layer that is split:

    tp = TensorParallel(rank=1, size=2, group=...)       # rank 1 of 2
    tp.shard(4096)   -> Shard(full=4096, start=2048, size=2048)   # my half of a dimension

`SINGLE` (rank 0 of 1, no group) is the default everywhere: with one process nothing is
initialized, no collective runs, and every model behaves exactly as it did before tensor
parallelism existed.

`init_tensor_parallel` joins a process group through `torch.distributed` (NCCL between GPUs,
gloo between CPU processes) and `destroy_tensor_parallel` leaves it. One process holds at most
one group at a time: `torch.distributed` keeps its default group per process.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

# How long a collective (or the rendezvous) may wait for a rank that does not come. A dead rank
# is noticed much sooner by the executor's liveness checks; this bounds what they cannot see,
# e.g. a rank stuck in a different collective. Start-up (weights, graph capture) fits well within.
TIMEOUT = datetime.timedelta(minutes=10)


@dataclass(frozen=True)
class Shard:
    """One rank's part of a dimension of extent `full`: indices [start, start + size)."""

    full: int
    start: int
    size: int


@dataclass(frozen=True)
class TensorParallel:
    """Rank `rank` of `size`, and the groups its collectives run on.

    group: the layers' all-reduce and all-gather (NCCL on GPUs, gloo on CPU).
    cpu_group: gloo, for host-side agreement between ranks (the KV pool size, start-up barriers).
    Both are None when size == 1.
    peer: a `PeerAllReduce` (peer_all_reduce.py) that small all-reduces take instead of `group`,
    or None (see `attach_peer_all_reduce`).
    """

    rank: int = 0
    size: int = 1
    group: Any = None
    cpu_group: Any = None
    peer: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.size:
            raise ValueError(f"rank must be in [0, {self.size}), got {self.rank}")

    def shard(self, full: int, what: str = "dimension") -> Shard:
        """An even split of `full` over the ranks; `what` names it when it does not divide."""
        if full % self.size:
            raise ValueError(f"tensor_parallel_size={self.size} does not divide the {what} ({full})")
        size = full // self.size
        return Shard(full, self.rank * size, size)

    def padded_shard(self, full: int) -> tuple[Shard, int]:
        """A split of `full` into `size` equal parts of ceil(full / size), the last one short.

        Returns (the real rows of this rank, the padded part size). A vocabulary rarely divides
        by the number of GPUs; padding each rank's part to the same size keeps every rank's
        tensors the same shape, which the all-gather of logits needs.
        """
        part = -(-full // self.size)
        start = min(self.rank * part, full)
        return Shard(full, start, min(part, full - start)), part

    def local_device(self, device: torch.device) -> torch.device:
        """The device of this rank: GPU `rank` on CUDA (one GPU per rank), the CPU otherwise."""
        if device.type == "cuda" and self.size > 1:
            return torch.device("cuda", self.rank)
        return device


SINGLE = TensorParallel()


def init_tensor_parallel(rank: int, size: int, store: dist.Store, device: torch.device) -> TensorParallel:
    """Join the group of `size` ranks as `rank` and return this process's `TensorParallel`.

    store: the rendezvous (a `torch.distributed.TCPStore` that rank 0 serves); every rank must
    call this with the same size, and each call returns once all of them have joined.
    device: "cuda" (NCCL, GPU `rank`) or "cpu" (gloo).
    """
    if dist.is_initialized():
        raise RuntimeError(
            "torch.distributed is already initialized in this process: one tensor-parallel LLM "
            "per process at a time (close the other one first: LLM.close())")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, store=store, rank=rank, world_size=size, timeout=TIMEOUT)
    # NCCL talks GPU to GPU; host integers and barriers go over a gloo group of the same ranks.
    cpu_group = dist.new_group(backend="gloo", timeout=TIMEOUT) if backend == "nccl" else dist.group.WORLD
    return TensorParallel(rank, size, dist.group.WORLD, cpu_group)


def destroy_tensor_parallel() -> None:
    """Leave the process group (if any), so that another one can be made in this process."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
