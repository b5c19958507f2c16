"""The all-reduce of a row-parallel layer, the residual add and the RMSNorm after it, in one kernel.

Under tensor parallelism every sublayer ends in an all-reduce, and the next thing the model does
with the sum is the pre-norm seam: add it to the residual stream, normalise the result for the
next sublayer. Unfused that is two kernels per seam, 2 x layers per step, each a launch with its
own ramp and tail, and each rereading the row the other just wrote:

    [sum through peer memory]  [residual += sum; out = RMSNorm(residual)]

Here one Triton program per group of rows does all of it, reading the ranks' partial sums straight
from their symmetric buffers (peer_all_reduce.py explains the mapping):

    1. copy this rank's partial row into its own symmetric buffer;
    2. barrier: every rank has copied its row in;
    3. add the N ranks' rows, in rank order, in float32, and round once to the model dtype
       (the same numbers added in the same order on every rank: every rank gets the same bits,
       which it must, since each samples the next token from its own copy of the logits);
    4. barrier: every rank has read this row, so the buffers may be written again;
    5. residual += sum (rounded to the model dtype, as the unfused model keeps its stream);
       out = weight * cast(h / rms(h)): exactly the arithmetic of layers/fused_ops.py's kernel.

**The barrier.** Each rank has a small array of flags in symmetric memory, a slot per (program,
rank). To pass a barrier, program p of rank r sets slot [p, r] on every rank from 0 to 1
(compare-and-swap, with release semantics at system scope, so its writes before it are visible
to the other GPUs first), then waits until slot [p, s] of its own array has been set by every
rank s, and puts it back to 0 (compare-and-swap 1 -> 0, acquire). A set that finds its slot
still 1 (the peer has not yet consumed the previous signal) spins until it can, so the two
barriers of a row, and the rows of the next call, can reuse the same slots. A call leaves every
flag at 0. Only the rows of program p wait for the rows of program p on the other GPUs, never the
whole grid, and no program waits for one with a higher index, so a grid larger than the GPU
can hold at once still makes progress (the lowest programs are placed first everywhere).

The flags are this module's own symmetric allocation, not PyTorch's signal pad, so no PyTorch
kernel that uses the pad can see a flag of ours half-way through. The flag protocol runs in the
Triton interpreter too (real atomics on host memory): tests/distributed/test_peer_add_rms_norm.py
runs two ranks as two processes on shared CPU memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Programs (row groups) per call: slots per rank are MAX_PROGRAMS x the ranks. At most the SMs of
# the GPU, so all of them usually run at once.
MAX_PROGRAMS = 128


@triton.jit
def _flip(slots, old: tl.constexpr, new: tl.constexpr, SEM: tl.constexpr):
    """Compare-and-swap every slot from `old` to `new`, retrying each until it held `old`. A slot
    already flipped compares with 2, which no slot ever holds: a read, no write."""
    pending = tl.full(slots.shape, 1, tl.int32)
    while tl.sum(pending, axis=0) > 0:
        seen = tl.atomic_cas(slots, tl.where(pending > 0, old, 2), tl.where(pending > 0, new, 2),
                             sem=SEM, scope="sys")
        pending = tl.where(seen == old, 0, pending)


@triton.jit
def _barrier(flag_ptrs, slot, rank, WORLD: tl.constexpr):
    """Program `slot` of every rank meets here (see the module docstring)."""
    ranks = tl.arange(0, WORLD)
    everyones = tl.load(flag_ptrs + ranks).to(tl.pointer_type(tl.int32))  # each rank's flags, mapped here
    mine = tl.load(flag_ptrs + rank).to(tl.pointer_type(tl.int32))
    tl.debug_barrier()  # every thread of this program has written what the signal announces
    _flip(everyones + slot * WORLD + rank, 0, 1, "release")
    _flip(mine + slot * WORLD + ranks, 1, 0, "acquire")
    tl.debug_barrier()  # no thread reads before the signals are in


@triton.jit
def _peer_add_rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, buffer_ptrs, flag_ptrs, rows, n_cols,
                              eps, rank, WORLD: tl.constexpr, BLOCK: tl.constexpr):
    """Rows pid, pid + programs, ...: sum the ranks' x; residual += sum; out = RMSNorm(residual)."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dtype = x_ptr.dtype.element_ty
    # Symmetric allocations are 16-byte aligned: saying so lets the rows load 16 bytes at a time.
    mine = tl.multiple_of(tl.load(buffer_ptrs + rank).to(tl.pointer_type(dtype)), 16)
    for row in range(pid, rows, tl.num_programs(0)):
        offsets = row * n_cols + cols  # within the buffer's size (MAX_BYTES): int32 suffices
        tl.store(mine + offsets, tl.load(x_ptr + offsets, mask=mask), mask=mask)
        _barrier(flag_ptrs, pid, rank, WORLD)
        total = tl.zeros([BLOCK], tl.float32)
        for r in tl.static_range(WORLD):  # rank order on every rank: the same sum everywhere
            theirs = tl.multiple_of(tl.load(buffer_ptrs + r).to(tl.pointer_type(dtype)), 16)
            total += tl.load(theirs + offsets, mask=mask, other=0.0, cache_modifier=".cg").to(tl.float32)
        _barrier(flag_ptrs, pid, rank, WORLD)
        # From here on the arithmetic of fused_ops._add_rms_norm_kernel, on the rounded sum.
        res = tl.load(residual_ptr + offsets, mask=mask, other=0.0)
        h = (total.to(dtype).to(tl.float32) + res.to(tl.float32)).to(res.dtype)
        tl.store(residual_ptr + offsets, h, mask=mask)
        h32 = h.to(tl.float32)
        inv_rms = tl.rsqrt(tl.sum(h32 * h32, axis=0) / n_cols + eps)
        normed = (h32 * inv_rms).to(h.dtype).to(tl.float32)
        tl.store(out_ptr + offsets, (normed * w).to(out_ptr.dtype.element_ty), mask=mask)


def peer_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                      buffer_ptrs: torch.Tensor, flag_ptrs: torch.Tensor, rank: int,
                      max_programs: int = MAX_PROGRAMS) -> torch.Tensor:
    """norm(sum over ranks of x + residual), `residual` updated in place to that sum; collective:
    every rank calls it with its own x [rows, n] and the same shapes.

    buffer_ptrs, flag_ptrs: int64 tensors on x's device, the address of every rank's symmetric
        data buffer (at least x's size, x's dtype) and flag array (at least max_programs x ranks
        int32 zeros), as mapped in this process, in rank order.
    """
    n = x.shape[-1]
    rows = x.reshape(-1, n)
    out = torch.empty_like(rows)
    if rows.shape[0] > 0:
        grid = (min(rows.shape[0], max_programs),)
        _peer_add_rms_norm_kernel[grid](
            rows, residual.view(-1, n), weight, out, buffer_ptrs, flag_ptrs, rows.shape[0], n, eps, rank,
            WORLD=buffer_ptrs.numel(), BLOCK=triton.next_power_of_2(n), num_warps=4 if n <= 2048 else 8,
        )
    return out.view(x.shape)
