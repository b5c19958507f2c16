"""A one-shot all-reduce through peer GPU memory, for the small sums of a decode step.

Under tensor parallelism every decoder layer ends its attention and its MLP with an all-reduce
of a [tokens, hidden] activation. In a decode step that tensor is small (64 tokens x 4096 x 2
bytes = 512 KB), so what an all-reduce costs is not bandwidth but latency: NCCL's ring sends the
data in several hops, each with its own handshake, and measured 10-14 us per call on two
NVLink-connected H200s, 65 calls per step of an 8B model (benchmarks/RESULTS.md).

GPUs of one host that see each other over NVLink can read each other's memory directly. PyTorch's
*symmetric memory* (`torch.distributed._symmetric_memory`) allocates one buffer per rank, maps
every rank's buffer into every other rank's address space, and ships kernels that use the
mapping. Its one-shot all-reduce is the simplest possible algorithm:

    1. each rank copies its partial sum into its own symmetric buffer;
    2. a barrier (flags in a small "signal pad", also mapped everywhere) says all buffers are full;
    3. every rank reads *all* N buffers, adds them, and writes the sum to its output;
    4. a second barrier says everyone has finished reading, so the buffers may be reused.

One kernel, one hop (step 1 included, where PyTorch offers the kernel that copies the rank's
tensor in itself, `_copy_in_kernel`): each rank reads (N - 1) x the tensor over NVLink, which
for a few hundred KB is far cheaper than NCCL's round trips. For large tensors (prefill) the ring's bandwidth wins
again, so only tensors up to `max_bytes` take this path; the rest go through
`torch.distributed.all_reduce` as before. The kernels capture into CUDA graphs like NCCL's.

Every rank must compute a bit-identical sum, because every rank samples the next token itself
from its own copy of the logits. With two ranks that holds for any order of the addition
(a + b == b + a in floating point); with more, ranks that add in different orders could round
differently. So `"auto"` uses this path only for two ranks.
"""

from __future__ import annotations

import os

import torch

# Tensors up to this size take the one-shot path: a decode step of 256 sequences at hidden 8192
# in bf16 is 4 MB. Larger ones (prefill) use the process group's all-reduce.
MAX_BYTES = 4 * 1024 * 1024
# The dtypes PyTorch's one-shot kernel adds (it has no fp16 version); others use the group.
DTYPES = (torch.bfloat16, torch.float32)
# The widest row the fused sum + add + RMSNorm holds in one program (hidden sizes of 8B-70B models).
MAX_NORM_WIDTH = 16384


def _copy_in_kernel(x: torch.Tensor) -> bool:
    """Whether step 1 runs inside the one-shot kernel (`one_shot_all_reduce_copy_out`): one
    kernel per sum instead of a copy and then the sum. Where this PyTorch has it, for x aligned
    like the buffer (16 bytes, which the kernel requires of both), unless
    MINIVLLM_PEER_COPY_IN_KERNEL=0 (to measure it).

    In a decode step of 1-4 rows the residual add and RMSNorm after the sum are fused into the
    next GEMM's prologue (layers/fused_linear.py), so a layer boundary is three kernels:
    [o_proj] [this sum] [add + norm + GEMM]. With more rows the sum, the add and the norm are
    one kernel instead (`add_rms_norm`): [o_proj] [sum + add + norm] [GEMM]."""
    return (os.environ.get("MINIVLLM_PEER_COPY_IN_KERNEL", "1") != "0"
            and x.data_ptr() % 16 == 0 and x.numel() * x.element_size() % 16 == 0
            and hasattr(torch.ops.symm_mem, "one_shot_all_reduce_copy_out"))


def unavailable_reason(size: int, device: torch.device) -> str | None:
    """Why the one-shot path cannot run here (None when it can), for `size` ranks on `device`."""
    if device.type != "cuda":
        return f"it needs CUDA GPUs, not {device.type}"
    if size < 2:
        return "there is only one rank"
    try:
        from torch.distributed import _symmetric_memory  # noqa: F401
        torch.ops.symm_mem.one_shot_all_reduce_out  # noqa: B018 - registered by CUDA builds only
    except (ImportError, AttributeError, RuntimeError):
        return "this PyTorch build has no symmetric-memory one-shot all-reduce"
    if torch.cuda.device_count() < size:
        return f"it needs {size} visible GPUs, torch sees {torch.cuda.device_count()}"
    for a in range(size):
        for b in range(size):
            if a != b and not torch.cuda.can_device_access_peer(a, b):
                return f"GPU {a} cannot access GPU {b}'s memory (no peer-to-peer link)"
    return None


class PeerAllReduce:
    """One symmetric buffer of `max_bytes` per rank of `group`, and the one-shot sum through it.

    Constructing it is collective: every rank of the group must build one, in the same order
    (the buffers are exchanged in a rendezvous).
    """

    def __init__(self, group, device: torch.device, dtype: torch.dtype, max_bytes: int = MAX_BYTES):
        from torch.distributed import _symmetric_memory as symm_mem

        from minivllm.distributed.peer_add_rms_norm import MAX_PROGRAMS

        if dtype not in DTYPES:
            raise ValueError(f"the one-shot all-reduce adds {DTYPES}, not {dtype}")
        self.group_name = group.group_name
        self.dtype = dtype
        self.max_numel = max_bytes // dtype.itemsize
        self.buffer = symm_mem.empty(self.max_numel, dtype=dtype, device=device)
        buffers = symm_mem.rendezvous(self.buffer, self.group_name)  # collective: map every rank's buffer
        # The fused sum + add + RMSNorm (peer_add_rms_norm.py) reads the same buffers through a
        # table of their addresses here, and meets the other ranks on flags of its own, zero
        # everywhere before any rank can set one (the rendezvous waits for every rank).
        self.rank, self.world_size = buffers.rank, buffers.world_size
        self.flags = symm_mem.empty(MAX_PROGRAMS * self.world_size, dtype=torch.int32, device=device).zero_()
        torch.cuda.synchronize(device)
        flags = symm_mem.rendezvous(self.flags, self.group_name)
        self.buffer_ptrs = torch.tensor(buffers.buffer_ptrs, dtype=torch.int64, device=device)
        self.flag_ptrs = torch.tensor(flags.buffer_ptrs, dtype=torch.int64, device=device)

    def fits(self, x: torch.Tensor) -> bool:
        """Whether `x` takes the one-shot path (small enough, the buffer's dtype, contiguous)."""
        return x.dtype == self.dtype and x.numel() <= self.max_numel and x.is_contiguous()

    def fits_norm(self, x: torch.Tensor, residual: torch.Tensor) -> bool:
        """Whether the sum of `x` and the add + RMSNorm after it can be one kernel (`add_rms_norm`):
        x fits, the residual is alike, a row fits one program, the ranks are a power of two (the
        kernel's vector of ranks), unless MINIVLLM_PEER_ADD_NORM=0 (to measure it)."""
        return (os.environ.get("MINIVLLM_PEER_ADD_NORM", "1") != "0" and self.fits(x)
                and residual.shape == x.shape and residual.dtype == x.dtype and residual.is_contiguous()
                and x.shape[-1] <= MAX_NORM_WIDTH and self.world_size & (self.world_size - 1) == 0)

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> torch.Tensor:
        """RMSNorm(residual + the sum of every rank's `x`), `residual` updated in place to that sum."""
        from minivllm.distributed.peer_add_rms_norm import peer_add_rms_norm

        return peer_add_rms_norm(x, residual, weight, eps, self.buffer_ptrs, self.flag_ptrs, self.rank)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of every rank's `x`, as a new tensor of x's shape (x itself is left as it was)."""
        n = x.numel()
        staged = self.buffer[:n]
        out = torch.empty_like(x)
        if _copy_in_kernel(x):  # all four steps in one kernel, which copies x in itself
            torch.ops.symm_mem.one_shot_all_reduce_copy_out(staged, x.view(-1), "sum",
                                                             self.group_name, out.view(-1))
            return out
        staged.copy_(x.view(-1))  # step 1: into this rank's symmetric buffer
        # Steps 2-4 in one kernel: barrier, read and add all N buffers, barrier.
        torch.ops.symm_mem.one_shot_all_reduce_out(staged, "sum", self.group_name, out.view(-1))
        return out


ALL_REDUCE_CHOICES = ("auto", "dist", "peer")


def attach_peer_all_reduce(tp, mode: str, dtype: torch.dtype, device: torch.device):
    """`tp` with a `PeerAllReduce` attached when `mode` asks for it and it can run, else `tp`.

    mode: "dist" never attaches (every sum goes through `torch.distributed.all_reduce`); "peer"
    attaches or raises; "auto" attaches for two ranks on peer-linked GPUs (see the module
    docstring for why not more), and silently keeps "dist" otherwise. Collective: the ranks first
    agree (over gloo) that every one of them can, so that none waits in a rendezvous alone.
    """
    import dataclasses

    from minivllm.distributed.communication import min_over_ranks

    if mode not in ALL_REDUCE_CHOICES:
        raise ValueError(f"all_reduce must be one of {ALL_REDUCE_CHOICES}, got {mode!r}")
    if tp.size == 1 or mode == "dist":
        return tp
    reason = unavailable_reason(tp.size, device)
    if reason is None and dtype not in DTYPES:
        reason = f"the one-shot kernel adds {', '.join(map(str, DTYPES))}, not {dtype}"
    if reason is None and mode == "auto" and tp.size != 2:
        reason = "with more than two ranks the ranks could round the sum differently"
    everyone = min_over_ranks(int(reason is None), tp)  # all ranks, or none
    if not everyone:
        if mode == "peer":
            raise ValueError(f"all_reduce='peer' cannot run: {reason or 'another rank cannot'}")
        return tp
    return dataclasses.replace(tp, peer=PeerAllReduce(tp.group, device, dtype))
