"""minivllm.kernels: paged attention over a block-table KV cache, importable on its own.

Two public ops, one signature for every backend (DESIGN §3):

    write_kv_cache(key, value, k_cache, v_cache, slot_mapping, backend="auto")
    paged_attention(query, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, ...)

Backends: "torch" (the reference in `reference.py`: CPU fallback and oracle), "triton" (the fast
GPU kernels; also runs on CPU under TRITON_INTERPRET=1 for testing) and "cuda" (the optional C++
extension of csrc/). "auto" picks Triton on a GPU (or the extension for the ops where it is built
and measured faster, AUTO_PREFERS_CUDA), else the reference.

Inputs are validated here, once, with errors that name the argument; the backends assume valid
input. Checks that would need a GPU→host copy (values inside `seq_lens`, `cu_seqlens_q`,
`block_tables`) run only for CPU tensors, or on the GPU when `check_inputs=True`: the fast path
never synchronises, so it can be captured in a CUDA graph.
"""

from __future__ import annotations

import math
import os
import warnings

import torch

from . import cuda as _cuda
from . import reference

__all__ = ["write_kv_cache", "paged_attention", "available_backends", "resolve_backend"]

BACKENDS = ("auto", "torch", "triton", "cuda")

# Where "auto" takes the C++ extension when it is built, rather than Triton: only for ops where
# it measured faster in the same run (benchmarks/RESULTS.md). Its decode kernel runs on CUDA
# cores and measured 1.7-2x slower than the Triton kernel, whose GQA tile uses tensor cores, so
# "auto" keeps Triton for attention; backend="cuda" still selects the extension.
AUTO_PREFERS_CUDA = {"paged_attention": False, "write_kv_cache": False}
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------
# Backend selection
# --------------------------------------------------------------------------------------------
def _triton_usable(device: torch.device) -> bool:
    """Triton runs natively on CUDA tensors, and on CPU tensors only in interpreter mode."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    if device.type == "cuda":
        return True
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """The backends that can run on tensors of `device`."""
    device = torch.device(device)
    names = ["torch"]
    if _triton_usable(device):
        names.append("triton")
    if device.type == "cuda" and _cuda.is_available():
        names.append("cuda")
    return names


def resolve_backend(backend: str, device: torch.device, op: str = "paged_attention") -> str:
    """Turn "auto" into a concrete backend and fail clearly for one that cannot run here."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cuda":
            if AUTO_PREFERS_CUDA.get(op, False) and _cuda.is_available() and _cuda.supports(op):
                return "cuda"
            if _triton_usable(device):
                return "triton"
        return "torch"
    if backend == "triton" and not _triton_usable(device):
        raise ValueError(
            "backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors) and the "
            f"triton package; got tensors on {device}"
        )
    if backend == "cuda":
        if device.type != "cuda":
            raise ValueError(f"backend='cuda' needs CUDA tensors; got tensors on {device}")
        if not _cuda.is_available():
            raise ValueError(f"backend='cuda' is not available: {_cuda.unavailable_reason()}")
    return backend


def _cuda_fallback(op: str, reason: str, requested: str, device: torch.device) -> str:
    """The extension does not cover this call: the backend that runs it instead (Triton, or the
    reference where Triton is missing). "auto" falls back silently; an explicit backend="cuda"
    is told, once per reason."""
    fallback = "triton" if _triton_usable(device) else "torch"
    if requested == "cuda":
        warnings.warn(f"backend='cuda': {op} runs on {fallback} for {reason}", stacklevel=3)
    return fallback


# --------------------------------------------------------------------------------------------
# Validation helpers: every message names the argument at fault.
# --------------------------------------------------------------------------------------------
def _check_tensor(name: str, t, ndim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")


def _check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension (head_dim)")


def _check_int32(name: str, t: torch.Tensor) -> None:
    if t.dtype != torch.int32:
        raise TypeError(f"{name} must be int32, got {t.dtype}")


def _check_same_device(device: torch.device, **tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but query is on {device}")


def _check_cache_pair(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    _check_tensor("k_cache", k_cache, 4)
    _check_tensor("v_cache", v_cache, 4)
    _check_float("k_cache", k_cache)
    _check_float("v_cache", v_cache)
    if k_cache.shape != v_cache.shape:
        raise ValueError(
            f"k_cache and v_cache must have the same shape, got {tuple(k_cache.shape)} and "
            f"{tuple(v_cache.shape)}"
        )
    if k_cache.dtype != v_cache.dtype:
        raise TypeError(f"k_cache is {k_cache.dtype} but v_cache is {v_cache.dtype}")


# --------------------------------------------------------------------------------------------
# write_kv_cache
# --------------------------------------------------------------------------------------------
def write_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    backend: str = "auto",
    check_inputs: bool = False,
) -> None:
    """Write `key`/`value` ([T, Hkv, D]) into the paged cache at the slots of `slot_mapping` ([T]).

    A slot is `block_id * block_size + offset`; a negative slot skips that token. Slots are
    checked against the cache size on CPU always and on the GPU when `check_inputs=True`.
    """
    _check_tensor("key", key, 3)
    _check_tensor("value", value, 3)
    _check_float("key", key)
    _check_float("value", value)
    _check_cache_pair(k_cache, v_cache)
    _check_tensor("slot_mapping", slot_mapping, 1)
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
    if key.dtype != k_cache.dtype or value.dtype != v_cache.dtype:
        raise TypeError(f"key/value are {key.dtype} but the cache is {k_cache.dtype}")
    if slot_mapping.shape[0] != key.shape[0]:
        raise ValueError(
            f"slot_mapping has {slot_mapping.shape[0]} entries but key has {key.shape[0]} tokens"
        )
    _check_same_device(key.device, value=value, k_cache=k_cache, v_cache=v_cache,
                       slot_mapping=slot_mapping)
    if (key.device.type == "cpu" or check_inputs) and slot_mapping.numel() > 0:
        num_slots = k_cache.shape[0] * k_cache.shape[1]
        if int(slot_mapping.max()) >= num_slots:
            raise ValueError(
                f"slot_mapping has slot {int(slot_mapping.max())} but the cache has only "
                f"{num_slots} slots ({k_cache.shape[0]} blocks x {k_cache.shape[1]})"
            )
    if key.shape[0] == 0:
        return
    requested = backend
    backend = resolve_backend(backend, key.device, op="write_kv_cache")
    if backend == "cuda":
        reason = _cuda.write_kv_unsupported(key, value, k_cache, v_cache)
        if reason is None:
            return _cuda.write_kv_cache(key, value, k_cache, v_cache, slot_mapping)
        backend = _cuda_fallback("write_kv_cache", reason, requested, key.device)
    if backend == "torch":
        reference.write_kv_cache(key, value, k_cache, v_cache, slot_mapping)
    else:
        from .triton_cache import write_kv_cache as triton_write

        triton_write(key, value, k_cache, v_cache, slot_mapping)


# --------------------------------------------------------------------------------------------
# paged_attention
# --------------------------------------------------------------------------------------------
def _check_attention_values(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    max_seq_len: int | None,
) -> None:
    """Checks on the *values* of the metadata tensors (each needs them on the host)."""
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
    if int(cu[-1]) != query.shape[0]:
        raise ValueError(
            f"cu_seqlens_q ends at {int(cu[-1])} but query has {query.shape[0]} tokens"
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
    # Only the block ids a sequence actually uses must be valid; the rest of a row is padding.
    blocks_used = (lens + block_size - 1) // block_size
    used = torch.arange(block_tables.shape[1])[None, :] < blocks_used[:, None]
    ids = block_tables.cpu()[used]
    if ids.numel() > 0 and (int(ids.min()) < 0 or int(ids.max()) >= k_cache.shape[0]):
        raise ValueError(
            f"block_tables holds block ids in [{int(ids.min())}, {int(ids.max())}] but the cache "
            f"has {k_cache.shape[0]} blocks"
        )


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
    num_splits: force the number of KV splits (Triton and cuda; None = heuristic).
    """
    _check_tensor("query", query, 3)
    _check_float("query", query)
    _check_cache_pair(k_cache, v_cache)
    _check_tensor("block_tables", block_tables, 2)
    _check_tensor("seq_lens", seq_lens, 1)
    _check_tensor("cu_seqlens_q", cu_seqlens_q, 1)
    _check_int32("block_tables", block_tables)
    _check_int32("seq_lens", seq_lens)
    _check_int32("cu_seqlens_q", cu_seqlens_q)
    if query.dtype != k_cache.dtype:
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
    if block_tables.shape[0] != batch:
        raise ValueError(f"block_tables has {block_tables.shape[0]} rows but seq_lens has {batch}")
    if cu_seqlens_q.shape[0] != batch + 1:
        raise ValueError(
            f"cu_seqlens_q must have len(seq_lens) + 1 = {batch + 1} entries, got "
            f"{cu_seqlens_q.shape[0]}"
        )
    if num_tokens < batch:
        raise ValueError(f"query has {num_tokens} tokens for {batch} sequences (at least 1 each)")
    _check_same_device(query.device, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables,
                       seq_lens=seq_lens, cu_seqlens_q=cu_seqlens_q)
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    elif not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite number, got {scale!r}")
    if max_seq_len is not None and (not isinstance(max_seq_len, int) or max_seq_len < 1):
        raise ValueError(f"max_seq_len must be a positive Python int or None, got {max_seq_len!r}")
    if num_splits is not None and (not isinstance(num_splits, int) or num_splits < 1):
        raise ValueError(f"num_splits must be a positive int or None, got {num_splits!r}")
    if out is not None:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
        if out.shape != query.shape or out.dtype != query.dtype or out.device != query.device:
            raise ValueError(
                f"out must match query ({tuple(query.shape)}, {query.dtype}, {query.device}), got "
                f"({tuple(out.shape)}, {out.dtype}, {out.device})"
            )
        if out.stride(-1) != 1:
            raise ValueError("out must be contiguous in its last dimension (head_dim)")
    if batch > 0 and (query.device.type == "cpu" or check_inputs):
        _check_attention_values(query, k_cache, block_tables, seq_lens, cu_seqlens_q, max_seq_len)

    if out is None:
        out = torch.empty_like(query)
    if batch == 0:
        return out
    requested = backend
    backend = resolve_backend(backend, query.device)
    if backend == "cuda":
        reason = _cuda.decode_unsupported(query, k_cache, v_cache, seq_lens, out)
        if reason is None:
            return _cuda.paged_attention(
                query, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, scale, causal, out,
                max_seq_len=max_seq_len, num_splits=num_splits,
            )
        backend = _cuda_fallback("paged_attention", reason, requested, query.device)
    if backend == "torch":
        return reference.paged_attention(
            query, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, scale, causal, out
        )
    if backend == "triton":
        from .triton_attention import paged_attention as triton_attention

        return triton_attention(
            query, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, scale, causal, out,
            max_seq_len=max_seq_len, num_splits=num_splits,
        )
    raise AssertionError(f"unhandled backend {backend!r}")  # resolve_backend returns only the above
