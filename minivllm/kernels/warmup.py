"""Compile every kernel variant a model will use, before serving starts.

Triton compiles on first use, a second or more per variant on a GPU. The kernels are written so
that batch shapes never make a new variant (see "One compilation per model" in
triton_attention.py); what is left is a short list per model, and `warm_up` runs each entry once
on tiny batches:

    paged attention    decode-only / mixed batch  x  one KV slice / split-KV  (4 variants)
    split-KV merge     1 variant
    cache write        1 variant

It works on the live cache of a layer: the cache write skips its one token (slot -1), and the
attention reads block 0, whatever it holds, into a scratch output. Warm each distinct cache
(dtype, shape, and whether it has 2^31 elements or more) once.
"""

from __future__ import annotations

import torch


def warm_up(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    num_q_heads: int,
    dtype: torch.dtype | None = None,
    backend: str = "auto",
    slot_dtype: torch.dtype = torch.int32,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Run each kernel variant once for caches of this kind, queries of `dtype` (default: the
    cache dtype; required for an fp8 cache, which also needs its k_scale/v_scale) with
    `num_q_heads` heads, and slot mappings of `slot_dtype` (pass the dtype your engine uses: a
    pointer's element type is part of what Triton compiles for)."""
    from . import paged_attention, write_kv_cache

    device = k_cache.device
    if dtype is None and k_cache.dtype == torch.float8_e4m3fn:
        raise ValueError("dtype: an fp8 cache holds no query dtype; pass the model's dtype")
    dtype = dtype or k_cache.dtype
    scales = dict(k_scale=k_scale, v_scale=v_scale)
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]

    def tensor(*values):
        return torch.tensor(values, dtype=torch.int32, device=device)

    key = torch.zeros(1, num_kv_heads, head_dim, dtype=dtype, device=device)
    write_kv_cache(key, key, k_cache, v_cache, torch.full((1,), -1, dtype=slot_dtype,
                                                          device=device), backend=backend,
                   **scales)
    # Every table entry is block 0; two entries hold the 2-token context even at block size 1.
    batches = [  # (query lengths, context lengths): a decode batch, then a mixed one
        ((1,), (1,)),
        ((2, 1), (2, 1)),
    ]
    for query_lens, seq_lens in batches:
        query = torch.zeros(sum(query_lens), num_q_heads, head_dim, dtype=dtype, device=device)
        cu = [0]
        for n in query_lens:
            cu.append(cu[-1] + n)
        block_tables = torch.zeros(len(seq_lens), 2, dtype=torch.int32, device=device)
        for num_splits in (1, 2):
            paged_attention(query, k_cache, v_cache, block_tables, tensor(*seq_lens), tensor(*cu),
                            backend=backend, num_splits=num_splits, **scales)
