"""The attention layer of every model: write the new K/V into the paged cache, then attend.

A model never sees blocks or slots. It computes q, k, v for the packed tokens of a step and
hands them to `PagedAttention`, which:

1. scatters the new k/v rows into this layer's `k_cache`/`v_cache` at `slot_mapping`
   (one slot per token, computed by the model runner from each sequence's block table), and
2. runs `paged_attention` of the new queries over everything the sequences have cached so far.

Step 1 can be done by the kernel that computes the keys instead: on CUDA the q/k norm + RoPE
kernel holds each rotated key in registers and stores it, with its value, straight into the
cache (layers/fused_ops.py); the model then asks `fused_write_target` where to write and calls
the layer with `kv_written=True`.

The caches are bound by the model runner after it has sized the KV pool (`bind_kv_cache`); before
that (e.g. a warm-up pass that measures activation memory) the layer is unbound and refuses to run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from minivllm.kernels import paged_attention, write_kv_cache
from minivllm.kernels.backends import kv_cache_unsupported


@dataclass
class AttentionMetadata:
    """Everything the kernels need to know about one step's batch, shared by all layers.

    slot_mapping [T]: cache slot of each new token (negative = padding, not written).
    block_tables [B, max_blocks] int32, seq_lens [B] int32 (context incl. new tokens),
    cu_seqlens_q [B+1] int32 (where each sequence's new tokens start in the packed batch).
    max_seq_len: a host-side bound on seq_lens (lets the GPU kernel plan without a sync);
    max_query_len: one on each sequence's new tokens (a verification's 1 + k: a small query tile).
    backend: which kernel backend to use ("auto", "torch", "sdpa", "triton", "cuda").
    plan: what the backend works out from this metadata once for all layers
    (`kernels.plan_attention`; None for the backends that need none).
    """

    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    cu_seqlens_q: torch.Tensor
    max_seq_len: int | None = None
    max_query_len: int | None = None
    backend: str = "auto"
    plan: object | None = None


class KVCacheWrite(NamedTuple):
    """Where a kernel that computes the keys writes them, and the values: one layer's paged
    cache [num_blocks, block_size, Hkv, D], the slot of each token (negative: skip), and for an
    fp8 cache its float32 scales [num_blocks, block_size, Hkv] (see kernels/fp8.py)."""

    k_cache: torch.Tensor
    v_cache: torch.Tensor
    slot_mapping: torch.Tensor
    k_scale: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None


class PagedAttention(nn.Module):
    """Multi-head attention (MHA/GQA/MQA) over this layer's slice of the paged KV cache."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float):
        super().__init__()
        if num_heads % num_kv_heads != 0:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None
        self.k_scale: torch.Tensor | None = None  # float32 [num_blocks, block_size, Hkv], fp8 only
        self.v_scale: torch.Tensor | None = None

    def bind_kv_cache(self, k_cache: torch.Tensor | None, v_cache: torch.Tensor | None,
                      k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> None:
        """Give the layer its [num_blocks, block_size, num_kv_heads, head_dim] cache tensors (and
        their scales, for an fp8 cache); None unbinds them."""
        expected = (self.num_kv_heads, self.head_dim)
        if k_cache is not None and (tuple(k_cache.shape[2:]) != expected or k_cache.shape != v_cache.shape):
            raise ValueError(
                f"KV cache of shape {tuple(k_cache.shape)} does not fit a layer with "
                f"{self.num_kv_heads} KV heads of dim {self.head_dim}"
            )
        self.k_cache, self.v_cache, self.k_scale, self.v_scale = k_cache, v_cache, k_scale, v_scale

    def fused_write_target(self, meta: AttentionMetadata) -> KVCacheWrite | None:
        """This step's cache write for a Triton kernel that does it itself, or None where the
        layer must write (no cache bound yet, or an fp8 cache Triton cannot write on this GPU:
        `forward` then raises the clear error)."""
        if self.k_cache is None:
            return None
        if kv_cache_unsupported(self.k_cache.dtype, "triton", self.k_cache.device):
            return None
        return KVCacheWrite(self.k_cache, self.v_cache, meta.slot_mapping, self.k_scale, self.v_scale)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata,
        kv_written: bool = False,
    ) -> torch.Tensor:
        """q [T, Hq*D] or [T, Hq, D]; k, v [T, Hkv*D] or [T, Hkv, D] -> [T, Hq*D].
        kv_written: k and v are in the cache already (`fused_write_target`)."""
        if self.k_cache is None:
            raise RuntimeError("PagedAttention has no KV cache bound; call bind_kv_cache first")
        num_tokens = q.shape[0]
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        if not kv_written:
            k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
            v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
            write_kv_cache(k, v, self.k_cache, self.v_cache, meta.slot_mapping,
                           backend=meta.backend, k_scale=self.k_scale, v_scale=self.v_scale)
        out = paged_attention(
            q, self.k_cache, self.v_cache, meta.block_tables, meta.seq_lens, meta.cu_seqlens_q,
            scale=self.scale, backend=meta.backend, max_seq_len=meta.max_seq_len,
            max_query_len=meta.max_query_len, k_scale=self.k_scale, v_scale=self.v_scale, plan=meta.plan,
        )
        return out.view(num_tokens, self.num_heads * self.head_dim)
