"""KVCacheSpec: the format of a paged KV cache, chosen once and handed to everything below.

A layer's cache is one K and one V tensor, [num_blocks, block_size, Hkv, D]. The kernels read
two formats of it:

    16-bit (or float32)   K/V in the model's dtype, nothing else;
    fp8 (e4m3)            K/V in 8 bits, each (token, KV head) row divided by its own float32
                          scale, kept beside the page in k_scale / v_scale
                          [num_blocks, block_size, Hkv] (fp8.py).

A spec names one of them and answers what the rest of the engine asks of a format: what one
token of one KV head costs in bytes (which sizes the pool), how to allocate a layer's tensors in
the layout the kernels read fastest, whether a backend can read it on a device, and its name in
statistics. The engine resolves its `kv_cache_dtype` option into a spec once (EngineConfig), so
no other code compares dtypes or strings to find out which cache it holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from .backends import kv_cache_unsupported
from .fp8 import FP8_DTYPE, empty_scales

SCALE_BYTES = 4  # one float32 scale per (token, KV head) of an fp8 cache
DTYPES = (torch.float32, torch.float16, torch.bfloat16, FP8_DTYPE)


class LayerKVCache(NamedTuple):
    """One layer's cache tensors; the scales are None unless the spec is scaled."""

    k: torch.Tensor
    v: torch.Tensor
    k_scale: torch.Tensor | None
    v_scale: torch.Tensor | None


@dataclass(frozen=True)
class KVCacheSpec:
    """What a KV block holds. `dtype` is the storage dtype of K and V; an fp8 cache is also
    *scaled*: one float32 scale per token and KV head, for K and for V."""

    dtype: torch.dtype

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise TypeError(f"dtype: a KV cache is stored in one of {DTYPES}, got {self.dtype}")

    @property
    def scaled(self) -> bool:
        """Whether each (token, KV head) row comes with a scale (the fp8 cache)."""
        return self.dtype == FP8_DTYPE

    @property
    def name(self) -> str:
        """"fp8_e4m3", or the dtype's name ("bfloat16"): what statistics and traces show."""
        return "fp8_e4m3" if self.scaled else str(self.dtype).removeprefix("torch.")

    def bytes_per_token_head(self, head_dim: int) -> int:
        """Bytes of K (or of V) of one token and one KV head: D values, and its scale if any."""
        return head_dim * self.dtype.itemsize + SCALE_BYTES * self.scaled

    def allocate(self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 device: torch.device | str) -> LayerKVCache:
        """One layer's cache, zeroed; scales of 1, so that a block copied before it was ever
        written holds valid numbers."""
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        k = torch.zeros(shape, dtype=self.dtype, device=device)
        v = torch.zeros(shape, dtype=self.dtype, device=device)
        if not self.scaled:
            return LayerKVCache(k, v, None, None)
        k_scale, v_scale = empty_scales(k)
        return LayerKVCache(k, v, k_scale.fill_(1.0), v_scale.fill_(1.0))

    def unsupported_reason(self, backend: str, device: torch.device) -> str | None:
        """Why attention `backend` cannot read this cache on `device` (None: it can)."""
        return kv_cache_unsupported(self.dtype, backend, device)
