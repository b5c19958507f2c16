"""Input checks for the public ops: every bad argument gets an error that names it.

The ops in `minivllm.kernels` run these once, at the door, so the backends can assume valid input.
Checks that need a GPU value on the host (the values inside `seq_lens`, `cu_seqlens_q`,
`block_tables`, `slot_mapping`) run only for CPU tensors, or on the GPU when the caller passes
`check_inputs=True`: the fast path never synchronises, so it can be captured in a CUDA graph.
"""

from __future__ import annotations

import math

import torch

from .fp8 import FP8_DTYPE

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensor(name: str, t, ndim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")


def check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension (head_dim)")


def check_int32(name: str, t: torch.Tensor) -> None:
    if t.dtype != torch.int32:
        raise TypeError(f"{name} must be int32, got {t.dtype}")


def check_same_device(device: torch.device, first: str, **tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but {first} is on {device}")


def check_cache_pair(k_cache: torch.Tensor, v_cache: torch.Tensor, k_scale, v_scale) -> None:
    """The two caches, and the scales that come with an fp8 cache (and only with one)."""
    check_tensor("k_cache", k_cache, 4)
    check_tensor("v_cache", v_cache, 4)
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if cache.dtype not in FLOAT_DTYPES + (FP8_DTYPE,):
            raise TypeError(
                f"{name} must be float32, float16, bfloat16 or float8_e4m3fn, got {cache.dtype}")
        if cache.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension (head_dim)")
    if k_cache.shape != v_cache.shape:
        raise ValueError(
            f"k_cache and v_cache must have the same shape, got {tuple(k_cache.shape)} and "
            f"{tuple(v_cache.shape)}"
        )
    if k_cache.dtype != v_cache.dtype:
        raise TypeError(f"k_cache is {k_cache.dtype} but v_cache is {v_cache.dtype}")
    if k_cache.dtype != FP8_DTYPE:
        if k_scale is not None or v_scale is not None:
            raise ValueError(
                f"k_scale and v_scale are for an fp8 (float8_e4m3fn) cache; k_cache is "
                f"{k_cache.dtype}: pass k_scale=None, v_scale=None")
        return
    shape = tuple(k_cache.shape[:3])
    for name, scale in (("k_scale", k_scale), ("v_scale", v_scale)):
        if scale is None:
            raise ValueError(
                f"k_cache is float8_e4m3fn: pass its scales as k_scale and v_scale, float32 "
                f"[num_blocks, block_size, Hkv] = {list(shape)}; {name} is missing")
        check_tensor(name, scale, 3)
        if scale.dtype != torch.float32:
            raise TypeError(f"{name} must be float32, got {scale.dtype}")
        if tuple(scale.shape) != shape:
            raise ValueError(
                f"{name} must be [num_blocks, block_size, Hkv] = {list(shape)} like k_cache, "
                f"got {list(scale.shape)}")
        if scale.device != k_cache.device:
            raise ValueError(f"{name} is on {scale.device} but k_cache is on {k_cache.device}")
    if k_scale.stride() != v_scale.stride():
        raise ValueError(f"v_scale must be laid out like k_scale (strides {k_scale.stride()}), "
                         f"got strides {v_scale.stride()}")


# --------------------------------------------------------------------------------------------
# write_kv_cache
# --------------------------------------------------------------------------------------------
def check_write_kv_cache(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale,
                         check_inputs: bool) -> None:
    """All checks of `write_kv_cache`; raises TypeError/ValueError naming the argument."""
    check_tensor("key", key, 3)
    check_tensor("value", value, 3)
    check_float("key", key)
    check_float("value", value)
    check_cache_pair(k_cache, v_cache, k_scale, v_scale)
    check_tensor("slot_mapping", slot_mapping, 1)
    if slot_mapping.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"slot_mapping must be int32 or int64, got {slot_mapping.dtype}")
    if key.shape != value.shape:
        raise ValueError(
            f"key and value must have the same shape, got {tuple(key.shape)} and {tuple(value.shape)}"
        )
    if key.shape[1:] != k_cache.shape[2:]:
        raise ValueError(
            f"key is [T, Hkv, D] = {tuple(key.shape)} but k_cache holds [.., .., Hkv, D] = "
            f"{tuple(k_cache.shape)}"
        )
    if key.dtype != value.dtype:
        raise TypeError(f"key is {key.dtype} but value is {value.dtype}")
    if key.dtype != k_cache.dtype and k_cache.dtype != FP8_DTYPE:  # fp8: quantized on the way in
        raise TypeError(f"key/value are {key.dtype} but the cache is {k_cache.dtype}")
    if slot_mapping.shape[0] != key.shape[0]:
        raise ValueError(
            f"slot_mapping has {slot_mapping.shape[0]} entries but key has {key.shape[0]} tokens"
        )
    check_same_device(key.device, "key", value=value, k_cache=k_cache, v_cache=v_cache,
                      slot_mapping=slot_mapping)
    if (key.device.type == "cpu" or check_inputs) and slot_mapping.numel() > 0:
        num_slots = k_cache.shape[0] * k_cache.shape[1]
        if int(slot_mapping.max()) >= num_slots:
            raise ValueError(
                f"slot_mapping has slot {int(slot_mapping.max())} but the cache has only "
                f"{num_slots} slots ({k_cache.shape[0]} blocks x {k_cache.shape[1]})"
            )


# --------------------------------------------------------------------------------------------
# paged_attention
# --------------------------------------------------------------------------------------------
def check_paged_attention(query, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, scale,
                          out, max_seq_len, num_splits, k_scale, v_scale,
                          check_inputs: bool, plan=None, causal: bool = True,
                          max_query_len: int | None = None) -> float:
    """All checks of `paged_attention`; returns the softmax scale (default 1/sqrt(head_dim)).

    With a plan, the metadata's values were checked when it was made (`check_plan_inputs`):
    only that it is the plan of these tensors is checked here."""
    check_tensor("query", query, 3)
    check_float("query", query)
    check_cache_pair(k_cache, v_cache, k_scale, v_scale)
    check_metadata(block_tables, seq_lens, cu_seqlens_q)
    if query.dtype != k_cache.dtype and k_cache.dtype != FP8_DTYPE:  # fp8: dequantized inside
        raise TypeError(f"query is {query.dtype} but k_cache is {k_cache.dtype}")
    num_tokens, num_q_heads, head_dim = query.shape
    num_kv_heads = k_cache.shape[2]
    if k_cache.shape[3] != head_dim:
        raise ValueError(f"query has head_dim {head_dim} but k_cache has {k_cache.shape[3]}")
    if num_q_heads % num_kv_heads != 0:
        raise ValueError(
            f"query heads ({num_q_heads}) must be a multiple of k_cache's KV heads ({num_kv_heads})"
        )
    batch = seq_lens.shape[0]
    if num_tokens < batch:
        raise ValueError(f"query has {num_tokens} tokens for {batch} sequences (at least 1 each)")
    check_same_device(query.device, "query", k_cache=k_cache, v_cache=v_cache,
                      block_tables=block_tables, seq_lens=seq_lens, cu_seqlens_q=cu_seqlens_q)
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    elif not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite number, got {scale!r}")
    for name, bound in (("max_seq_len", max_seq_len), ("max_query_len", max_query_len)):
        if bound is not None and (not isinstance(bound, int) or bound < 1):
            raise ValueError(f"{name} must be a positive Python int or None, got {bound!r}")
    if num_splits is not None and (not isinstance(num_splits, int) or num_splits < 1):
        raise ValueError(f"num_splits must be a positive int or None, got {num_splits!r}")
    if out is not None:
        check_out(out, query)
    if plan is not None:
        check_plan(plan, query, k_cache, block_tables, seq_lens, cu_seqlens_q, causal)
    elif batch > 0 and (query.device.type == "cpu" or check_inputs):
        check_attention_values(query.shape[0], k_cache, block_tables, seq_lens, cu_seqlens_q,
                               max_seq_len, max_query_len)
    return scale


def check_metadata(block_tables, seq_lens, cu_seqlens_q) -> None:
    """The shapes and dtypes of the three metadata tensors, and that they agree on the batch."""
    check_tensor("block_tables", block_tables, 2)
    check_tensor("seq_lens", seq_lens, 1)
    check_tensor("cu_seqlens_q", cu_seqlens_q, 1)
    check_int32("block_tables", block_tables)
    check_int32("seq_lens", seq_lens)
    check_int32("cu_seqlens_q", cu_seqlens_q)
    batch = seq_lens.shape[0]
    if block_tables.shape[0] != batch:
        raise ValueError(f"block_tables has {block_tables.shape[0]} rows but seq_lens has {batch}")
    if cu_seqlens_q.shape[0] != batch + 1:
        raise ValueError(
            f"cu_seqlens_q must have len(seq_lens) + 1 = {batch + 1} entries, got "
            f"{cu_seqlens_q.shape[0]}"
        )


def check_plan_inputs(k_cache, block_tables, seq_lens, cu_seqlens_q) -> None:
    """All checks of `plan_attention`: those of `paged_attention` on the metadata, values
    included (a plan reads them anyway), except the ones that need the query."""
    check_tensor("k_cache", k_cache, 4)
    check_metadata(block_tables, seq_lens, cu_seqlens_q)
    check_same_device(k_cache.device, "k_cache", block_tables=block_tables, seq_lens=seq_lens,
                      cu_seqlens_q=cu_seqlens_q)
    if seq_lens.shape[0] > 0:
        check_attention_values(None, k_cache, block_tables, seq_lens, cu_seqlens_q, None)


def check_plan(plan, query, k_cache, block_tables, seq_lens, cu_seqlens_q, causal: bool) -> None:
    """A plan serves the call it was made for: the same metadata tensors, cache geometry and
    causality, and a query with the tokens it counted."""
    same = (plan.block_tables is block_tables and plan.seq_lens is seq_lens
            and plan.cu_seqlens_q is cu_seqlens_q)
    if not same:
        raise ValueError("plan was made from other block_tables / seq_lens / cu_seqlens_q tensors "
                         "than this call's: make one per step with plan_attention")
    if plan.num_tokens != query.shape[0]:
        raise ValueError(f"plan counts {plan.num_tokens} query tokens but query has {query.shape[0]}")
    if plan.block_size != k_cache.shape[1]:
        raise ValueError(f"plan was made for block size {plan.block_size}, k_cache has {k_cache.shape[1]}")
    if plan.causal != causal:
        raise ValueError(f"plan was made with causal={plan.causal}, this call has causal={causal}")


def check_out(out, query: torch.Tensor) -> None:
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
    if out.shape != query.shape or out.dtype != query.dtype or out.device != query.device:
        raise ValueError(
            f"out must match query ({tuple(query.shape)}, {query.dtype}, {query.device}), got "
            f"({tuple(out.shape)}, {out.dtype}, {out.device})"
        )
    if out.stride(-1) != 1:
        raise ValueError("out must be contiguous in its last dimension (head_dim)")


def check_attention_values(
    num_tokens: int | None,
    k_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    max_seq_len: int | None,
    max_query_len: int | None = None,
) -> None:
    """Checks on the *values* of the metadata tensors (each needs them on the host).
    num_tokens: the query's, which cu_seqlens_q must end at (None: not known yet)."""
    cu = cu_seqlens_q.cpu()
    lens = seq_lens.cpu()
    if int(cu[0]) != 0:
        raise ValueError(f"cu_seqlens_q must start at 0, got {int(cu[0])}")
    q_lens = cu[1:] - cu[:-1]
    if bool((q_lens <= 0).any()):
        raise ValueError(
            "cu_seqlens_q must be strictly increasing (every sequence has at least one query), "
            f"got {cu.tolist()}"
        )
    if num_tokens is not None and int(cu[-1]) != num_tokens:
        raise ValueError(
            f"cu_seqlens_q ends at {int(cu[-1])} but query has {num_tokens} tokens"
        )
    too_long = (q_lens > lens).nonzero()
    if too_long.numel() > 0:
        b = int(too_long[0])
        raise ValueError(
            f"sequence {b} has {int(q_lens[b])} queries but seq_lens[{b}] = {int(lens[b])}: "
            "the queries are part of the context, so query length <= seq_len"
        )
    block_size = k_cache.shape[1]
    capacity = block_tables.shape[1] * block_size
    if int(lens.max()) > capacity:
        raise ValueError(
            f"seq_lens has {int(lens.max())} tokens but block_tables has room for {capacity} "
            f"({block_tables.shape[1]} blocks x {block_size})"
        )
    if max_seq_len is not None and int(lens.max()) > max_seq_len:
        raise ValueError(f"max_seq_len={max_seq_len} is below the longest seq_len {int(lens.max())}")
    if max_query_len is not None and int(q_lens.max()) > max_query_len:
        raise ValueError(f"max_query_len={max_query_len} is below the most queries of a sequence, "
                         f"{int(q_lens.max())}")
    # Only the block ids a sequence actually uses must be valid; the rest of a row is padding.
    blocks_used = (lens + block_size - 1) // block_size
    used = torch.arange(block_tables.shape[1])[None, :] < blocks_used[:, None]
    ids = block_tables.cpu()[used]
    if ids.numel() > 0 and (int(ids.min()) < 0 or int(ids.max()) >= k_cache.shape[0]):
        raise ValueError(
            f"block_tables holds block ids in [{int(ids.min())}, {int(ids.max())}] but the cache "
            f"has {k_cache.shape[0]} blocks"
        )
