"""The oracle is checked too: the paged reference against dense attention computed another way.

Each sequence's K/V start out *contiguous*; we scatter them into a shuffled paged cache with
`write_kv_cache`, run the paged reference, and compare with PyTorch's
`scaled_dot_product_attention` on the original contiguous K/V with an explicit mask.
"""

import pytest
import torch
import torch.nn.functional as F

from minivllm.kernels import paged_attention, write_kv_cache
from minivllm.kernels.reference import causal_mask


def _dense_attention(q, k, v, causal):
    """SDPA over contiguous [L, H, D] tensors; queries are the last q_len positions."""
    q_len, seq_len = q.shape[0], k.shape[0]
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    mask = None
    if causal:
        # Bottom-right aligned: query j may see keys <= seq_len - q_len + j.
        mask = torch.ones(q_len, seq_len, dtype=torch.bool).tril(diagonal=seq_len - q_len)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).double(), k.transpose(0, 1).double(), v.transpose(0, 1).double(),
        attn_mask=mask,
    )
    return out.transpose(0, 1)


@pytest.mark.parametrize("num_q_heads,num_kv_heads", [(4, 4), (8, 2), (8, 1)])
@pytest.mark.parametrize("block_size", [1, 5, 16])
@pytest.mark.parametrize("causal", [True, False])
def test_reference_matches_dense_sdpa(num_q_heads, num_kv_heads, block_size, causal):
    g = torch.Generator().manual_seed(0)
    head_dim = 24  # any head_dim, not only powers of two
    query_lens, seq_lens = [1, 9, 4, 30], [1, 9, 23, 45]
    num_blocks = sum((s + block_size - 1) // block_size for s in seq_lens) + 4
    k_cache = torch.zeros(num_blocks, block_size, num_kv_heads, head_dim)
    v_cache = torch.zeros_like(k_cache)
    free = torch.randperm(num_blocks, generator=g).tolist()
    tables, queries, expected = [], [], []
    max_blocks = max((s + block_size - 1) // block_size for s in seq_lens)
    for q_len, seq_len in zip(query_lens, seq_lens):
        n = (seq_len + block_size - 1) // block_size
        table = [free.pop() for _ in range(n)]
        tables.append(table + [0] * (max_blocks - n))
        k = torch.randn(seq_len, num_kv_heads, head_dim, generator=g)
        v = torch.randn(seq_len, num_kv_heads, head_dim, generator=g)
        pos = torch.arange(seq_len)
        slots = torch.tensor(table)[pos // block_size] * block_size + pos % block_size
        write_kv_cache(k, v, k_cache, v_cache, slots, backend="torch")
        q = torch.randn(q_len, num_q_heads, head_dim, generator=g)
        queries.append(q)
        expected.append(_dense_attention(q, k, v, causal))
    cu = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32)
    out = paged_attention(
        torch.cat(queries), k_cache, v_cache, torch.tensor(tables, dtype=torch.int32),
        torch.tensor(seq_lens, dtype=torch.int32), cu, causal=causal, backend="torch",
    )
    torch.testing.assert_close(out.double(), torch.cat(expected), rtol=1e-5, atol=1e-5)


def test_causal_mask_puts_queries_at_the_end():
    mask = causal_mask(query_len=2, seq_len=4, device=torch.device("cpu"))
    assert mask.tolist() == [[True, True, True, False], [True, True, True, True]]


def _token(cache: torch.Tensor, table: torch.Tensor, i: int) -> torch.Tensor:
    """Token i of a sequence, found by the paging rule itself: block table[i // block_size],
    offset i % block_size."""
    block_size = cache.shape[1]
    return cache[int(table[i // block_size]), i % block_size]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reference_half_precision_close_to_float64(dtype):
    """Half-precision inputs: the reference upcasts to fp32, so only the rounding of its output
    to the dtype remains, against float64 SDPA on the same (rounded) inputs."""
    from tests.kernels.paged_inputs import make_problem, rel_error

    query_lens, seq_lens = [3, 1], [20, 7]
    p = make_problem(query_lens, seq_lens, 8, 2, 32, 4, dtype=dtype, generator=torch.Generator().manual_seed(1))
    out = paged_attention(*p.args(), backend="torch")
    expected, start = [], 0
    for b, (q_len, seq_len) in enumerate(zip(query_lens, seq_lens)):
        k = torch.stack([_token(p.k_cache, p.block_tables[b], i) for i in range(seq_len)])
        v = torch.stack([_token(p.v_cache, p.block_tables[b], i) for i in range(seq_len)])
        expected.append(_dense_attention(p.query[start:start + q_len], k, v, causal=True))
        start += q_len
    assert out.dtype == dtype
    # Rounding the result to the output dtype: ~2^-11 relative for fp16, ~2^-8 for bf16.
    assert rel_error(out, torch.cat(expected)) < {torch.float16: 1e-3, torch.bfloat16: 6e-3}[dtype]
