"""Paged attention in plain PyTorch: the CPU fallback and the correctness oracle.

Everything here is written to be read, never to be fast. Each sequence is handled on its own:

1. *gather* its K/V blocks through its block table into one contiguous [seq_len, Hkv, D] tensor,
2. build the causal *mask* (its queries sit at the end of its context),
3. *softmax* in float32 and weight the values.

An fp8 cache (`fp8.py`) is quantized here on the way in, one scale per token and KV head, and
dequantized right after the gather: the attention itself always runs on float32 K/V.

Every other backend (Triton, CUDA) is tested against these two functions. The inputs are assumed
valid: `minivllm.kernels.paged_attention` validates them once before dispatching here.
"""

from __future__ import annotations

import torch

from . import fp8


def write_kv_cache(key, value, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None) -> None:
    """Same contract as `minivllm.kernels.write_kv_cache` (inputs already validated): each
    token's K/V row goes to its flat slot, `block_id * block_size + offset`, and a negative slot
    (padding in a CUDA-graph batch, for example) skips the token. An fp8 cache gets each row
    quantized, and its scale at the same slot of k_scale/v_scale."""
    num_blocks, block_size = k_cache.shape[:2]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    # Viewing the cache as [num_blocks * block_size, Hkv, D] turns a slot into a plain row index.
    for new, cache, scales in ((key[keep], k_cache, k_scale), (value[keep], v_cache, v_scale)):
        if fp8.is_fp8(cache):
            new, scale = fp8.quantize(new)
            scales[slots // block_size, slots % block_size] = scale  # any layout of the scales
        cache.view(num_blocks * block_size, *cache.shape[2:])[slots] = new


def gather_kv(
    cache: torch.Tensor, block_table: torch.Tensor, seq_len: int
) -> torch.Tensor:
    """Read the first `seq_len` tokens of one sequence out of the paged cache.

    Token i lives in block `block_table[i // block_size]` at offset `i % block_size`, so taking the
    sequence's blocks in table order and flattening them gives its tokens in order.
    Returns [seq_len, Hkv, D] for a cache, [seq_len, Hkv] for an fp8 cache's scales.
    """
    block_size = cache.shape[1]
    num_blocks_used = (seq_len + block_size - 1) // block_size
    blocks = cache[block_table[:num_blocks_used].long()]  # [n, block_size, Hkv, D]
    return blocks.reshape(-1, *cache.shape[2:])[:seq_len]


def causal_mask(query_len: int, seq_len: int, device: torch.device) -> torch.Tensor:
    """[query_len, seq_len] boolean mask, True where a query may attend to a key.

    The queries are the *last* `query_len` tokens of the context, so query j (0-based) sits at
    position `seq_len - query_len + j` and sees every key up to and including that position.
    This one rule covers prefill (query_len == seq_len), chunked prefill and decode (query_len 1).
    """
    query_pos = torch.arange(seq_len - query_len, seq_len, device=device)[:, None]
    key_pos = torch.arange(seq_len, device=device)[None, :]
    return key_pos <= query_pos


def paged_attention(query, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, scale, causal=True,
                    out=None, max_seq_len=None, num_splits=None, k_scale=None, v_scale=None,
                    max_query_len=None) -> torch.Tensor:
    """Same contract as `minivllm.kernels.paged_attention` (inputs already validated).
    `max_seq_len`, `max_query_len` and `num_splits` plan the GPU kernels' work; the reference
    takes them only to share the signature, and needs none of them."""
    num_q_heads = query.shape[1]
    num_kv_heads = k_cache.shape[2]
    group = num_q_heads // num_kv_heads  # query heads that share one KV head (GQA/MQA)
    if out is None:
        out = torch.empty_like(query)
    # One small host read per call: this backend is for clarity, not for CUDA graphs.
    seq_lens_host = seq_lens.tolist()
    cu_host = cu_seqlens_q.tolist()
    for b, seq_len in enumerate(seq_lens_host):
        q_start, q_end = cu_host[b], cu_host[b + 1]
        q = query[q_start:q_end].float()  # [q_len, Hq, D]
        k = gather_kv(k_cache, block_tables[b], seq_len).float()  # [seq_len, Hkv, D]
        v = gather_kv(v_cache, block_tables[b], seq_len).float()
        if fp8.is_fp8(k_cache):  # the scales are paged like the cache: gather them the same way
            k = k * gather_kv(k_scale, block_tables[b], seq_len)[..., None]
            v = v * gather_kv(v_scale, block_tables[b], seq_len)[..., None]
        # GQA: query head h reads KV head h // group.
        k = k.repeat_interleave(group, dim=1)  # [seq_len, Hq, D]
        v = v.repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale  # [Hq, q_len, seq_len]
        if causal:
            mask = causal_mask(q_end - q_start, seq_len, query.device)
            scores = scores.masked_fill(~mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[q_start:q_end] = torch.einsum("hqk,khd->qhd", probs, v).to(out.dtype)
    return out
