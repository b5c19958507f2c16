"""minivllm.kernels: paged attention over a block-table KV cache, importable on its own.

Two public ops, one signature for every backend:

    write_kv_cache(key, value, k_cache, v_cache, slot_mapping, backend="auto")
        key/value [T, Hkv, D] into k_cache/v_cache [num_blocks, block_size, Hkv, D];
        slot_mapping [T] int: `block_id * block_size + offset` of each token (negative = skip).
    out = paged_attention(query, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, ...)
        query [T, Hq, D]: all new query tokens of the batch, packed; block_tables [B, max_blocks]
        int32; seq_lens [B] int32 (context incl. the new tokens); cu_seqlens_q [B+1] int32
        (where each sequence's queries start in `query`). Returns [T, Hq, D].

The cache may be fp8 (float8_e4m3fn, half the bytes of bf16): both ops then take `k_scale` and
`v_scale`, float32 [num_blocks, block_size, Hkv], one scale per token and KV head (fp8.py).
`KVCacheSpec` names a cache format, allocates a layer's tensors in it, and says whether a
backend can read it (kv_cache_spec.py).

One call serves prefill, chunked prefill and decode (decode is query length 1), so a mixed batch
is one launch; GQA/MQA when Hq is a multiple of Hkv. The queries of a sequence are the *last*
tokens of its context: query j of a chunk of length q attends to keys `< seq_len - q + j + 1`.

Every layer of a model step calls `paged_attention` with the same metadata. A backend that
would redo the same work from it in every call (the CPU's "sdpa": gather indices and masks)
does it once instead:

    plan = plan_attention(block_tables, seq_lens, cu_seqlens_q, k_cache)   # once per step
    out = paged_attention(..., plan=plan)                                  # every layer

`plan_attention` returns None for the backends that need no plan (Triton, CUDA), so a caller
can always pass its result on.

Layout of the package: `validation.py` checks the inputs once, at the door, with errors that name
the argument; `backends.py` picks the implementation ("auto" | "torch" | "sdpa" | "triton" | "cuda")
from one dispatch table; `reference.py`, `sdpa.py`, `triton_attention.py`, `triton_cache.py` and
`cuda.py` are the implementations; `fp8.py` is the fp8 format and its scales, `kv_cache_spec.py` the
two cache formats as one small type; `warmup.py` compiles every Triton variant a model uses before
serving, and `jit_counter.py` counts Triton compilations, to check that serving compiles nothing.
"""

from __future__ import annotations

import torch

from . import validation
from .backends import (AUTO_PREFERS_CUDA, BACKENDS, PLANNERS, available_backends, dispatch,
                       resolve_backend)
from .jit_counter import JitCounter
from .kv_cache_spec import KVCacheSpec, LayerKVCache
from .warmup import warm_up

__all__ = [
    "write_kv_cache", "paged_attention", "plan_attention", "available_backends", "resolve_backend",
    "BACKENDS", "AUTO_PREFERS_CUDA", "JitCounter", "KVCacheSpec", "LayerKVCache", "warm_up",
]


def write_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    backend: str = "auto",
    check_inputs: bool = False,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Write `key`/`value` ([T, Hkv, D]) into the paged cache at the slots of `slot_mapping` ([T]).

    A slot is `block_id * block_size + offset`; a negative slot skips that token. Slots are
    checked against the cache size on CPU always and on the GPU when `check_inputs=True`.
    An fp8 cache (float8_e4m3fn) is written quantized, and each row's scale goes to k_scale /
    v_scale, float32 [num_blocks, block_size, Hkv], at the same slot (see fp8.py).
    """
    validation.check_write_kv_cache(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale,
                                    check_inputs)
    if key.shape[0] == 0:
        return
    dispatch("write_kv_cache", backend, key.device, key=key, value=value, k_cache=k_cache,
             v_cache=v_cache, slot_mapping=slot_mapping, k_scale=k_scale, v_scale=v_scale)


def paged_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    scale: float | None = None,
    causal: bool = True,
    backend: str = "auto",
    out: torch.Tensor | None = None,
    max_seq_len: int | None = None,
    num_splits: int | None = None,
    check_inputs: bool = False,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    plan=None,
    max_query_len: int | None = None,
) -> torch.Tensor:
    """Attention of packed new queries over the paged KV cache; returns [T, Hq, D].

    query [T, Hq, D]: the new query tokens of all B sequences, packed; sequence b owns rows
        cu_seqlens_q[b]:cu_seqlens_q[b+1], and those are the *last* tokens of its context.
    k_cache, v_cache [num_blocks, block_size, Hkv, D]; Hq % Hkv == 0 (GQA/MQA).
    block_tables [B, max_blocks] int32; seq_lens [B] int32 (context incl. new tokens);
    cu_seqlens_q [B+1] int32.
    scale: softmax scale, default 1/sqrt(D). causal: mask future keys (default True).
    out: optional [T, Hq, D] tensor written in place. max_seq_len: optional Python int bound on
    seq_lens, lets a GPU backend size its split-KV work without reading seq_lens.
    max_query_len: optional Python int bound on each sequence's queries; with a few (a
        speculative verification's 1 + k) the Triton kernel takes a query tile sized for them.
    num_splits: force the number of KV splits (Triton and cuda; None = heuristic).
    k_scale, v_scale: the scales of an fp8 cache, float32 [num_blocks, block_size, Hkv], as
    write_kv_cache wrote them; the query (and out) stay float32/float16/bfloat16.
    plan: `plan_attention`'s result for these block_tables, seq_lens and cu_seqlens_q (None:
    none, or the backend needs none). Their values were checked when it was made.
    """
    scale = validation.check_paged_attention(
        query, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, scale, out, max_seq_len,
        num_splits, k_scale, v_scale, check_inputs, plan, causal, max_query_len,
    )
    if out is None:
        out = torch.empty_like(query)
    if seq_lens.shape[0] == 0:
        return out
    planned = {} if plan is None else {"plan": plan}
    if plan is not None and (name := resolve_backend(backend, query.device)) != plan.backend:
        raise ValueError(f"plan was made for backend {plan.backend!r}, but backend={backend!r} "
                         f"resolves to {name!r} here")
    return dispatch(
        "paged_attention", backend, query.device, query=query, k_cache=k_cache, v_cache=v_cache,
        block_tables=block_tables, seq_lens=seq_lens, cu_seqlens_q=cu_seqlens_q, scale=scale,
        causal=causal, out=out, max_seq_len=max_seq_len, num_splits=num_splits, k_scale=k_scale,
        v_scale=v_scale, max_query_len=max_query_len, **planned,
    )


def plan_attention(
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    k_cache: torch.Tensor,
    causal: bool = True,
    backend: str = "auto",
):
    """What every `paged_attention` call of one step would work out from its metadata, worked
    out once; None where `backend` needs no plan (it resolves to "sdpa" on a CPU: a plan).

    The arguments are those of `paged_attention` (k_cache: any layer's, for its block size and
    device); they are checked here, values included, so calls given the plan check them no more.
    The plan is good for those tensors, as long as their values do not change.
    """
    planner = PLANNERS.get(resolve_backend(backend, k_cache.device))
    if planner is None:  # before any check: the GPU backends' metadata is never read back here
        return None
    validation.check_plan_inputs(k_cache, block_tables, seq_lens, cu_seqlens_q)
    if seq_lens.shape[0] == 0:
        return None
    return planner(block_tables, seq_lens, cu_seqlens_q, k_cache.shape[1], causal, k_cache.dtype)
