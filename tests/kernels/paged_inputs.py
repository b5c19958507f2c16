"""Random paged-attention problems for the kernel tests and the benchmark's correctness check.

A problem is a batch of sequences, each with a number of new queries and a context length. Its
KV cache is random, and each sequence's block table is a random, shuffled, non-contiguous set of
physical blocks, so any kernel that assumed contiguous blocks would fail.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PagedProblem:
    query: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    cu_seqlens_q: torch.Tensor

    def args(self):
        return (self.query, self.k_cache, self.v_cache, self.block_tables, self.seq_lens,
                self.cu_seqlens_q)


def make_problem(
    query_lens: list[int],
    seq_lens: list[int],
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    spare_blocks: int = 3,
    generator: torch.Generator | None = None,
) -> PagedProblem:
    if len(query_lens) != len(seq_lens):
        raise ValueError("query_lens and seq_lens must have the same length")
    batch = len(seq_lens)
    blocks_per_seq = max((s + block_size - 1) // block_size for s in seq_lens)
    num_blocks = batch * blocks_per_seq + spare_blocks
    g = generator

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float32).to(dtype).to(device)

    k_cache = randn(num_blocks, block_size, num_kv_heads, head_dim)
    v_cache = randn(num_blocks, block_size, num_kv_heads, head_dim)
    # Shuffled physical blocks; table entries past a sequence's length are left as -1 garbage
    # would be in a real engine's padded table: kernels must never read them.
    perm = torch.randperm(num_blocks, generator=g)[: batch * blocks_per_seq]
    block_tables = perm.view(batch, blocks_per_seq).to(torch.int32)
    for b, s in enumerate(seq_lens):
        block_tables[b, (s + block_size - 1) // block_size:] = -1
    query = randn(sum(query_lens), num_q_heads, head_dim)
    cu = torch.zeros(batch + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(query_lens).cumsum(0)
    return PagedProblem(
        query, k_cache, v_cache, block_tables.to(device),
        torch.tensor(seq_lens, dtype=torch.int32, device=device), cu.to(device),
    )


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (NaN if anything is NaN: it never passes).

    Detached first: a reference computed by a module with trainable parameters (RMSNorm's weight
    in test_fused_ops) carries an autograd graph, and a comparison needs none of it.
    """
    out, ref = out.detach().double(), ref.detach().double()
    return float((out - ref).norm() / ref.norm())


# What the error of a correct kernel looks like, per dtype (see METHOD: fp32 arithmetic lands far
# under 1e-3; half-precision operands with fp32 accumulation between 1e-3 and 1e-2). The
# reference computes in fp32 from the same rounded inputs, so the remaining gap is the kernel's
# own rounding of the probabilities to the input dtype before the P@V product.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}
