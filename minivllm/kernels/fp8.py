"""The fp8 KV cache: K and V in 8 bits (e4m3), one float32 scale per token and KV head.

Decode reads the whole KV cache every step, so its time is the cache's bytes over the memory
bandwidth; storing K/V in 8 bits instead of 16 halves both the bytes and the memory per token.
An e4m3 number (`torch.float8_e4m3fn`, Triton's `float8e4nv`) has 3 mantissa bits and a range of
+-448, so each value is stored divided by a *scale* that brings its group into that range:

    scale = max(|x| over the group) / 448         (never 0: at least the smallest normal float32)
    q     = e4m3(clamp(x / scale, -448, 448))     (the clamp: nothing ever overflows)
    x    ~= float(q) * scale

The group is one token's head: the D values of one (token, KV head) share a scale, computed when
the token is written (so no calibration, and nothing to capture in a CUDA graph but the write
kernel itself) and stored beside the page in `k_scale` / `v_scale`, float32
[num_blocks, block_size, Hkv] (any strides; `empty_scales` allocates the layout the kernel reads
fastest): 4 bytes per D bytes, 3 % more at head_dim 128. Per-tensor and per-head scales cost
nothing but need a calibration and were 2x less accurate on keys with outlier channels; the
measurement is in docs/fp8_kv_cache.md (`benchmarks/agreement.py scales`).

The kernels dequantize in registers and never materialise a wider copy: the scores of a key
column are multiplied by its scale after q @ k^T, and the probabilities by the value's scale
before p @ v, which equals scaling K and V. Scores and softmax stay in float32.

This module is the rule in PyTorch: the reference backend uses it, and the Triton kernels compute
the same thing in their registers.
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
E4M3_MAX = 448.0  # the largest finite e4m3 value
MIN_SCALE = torch.finfo(torch.float32).tiny  # a row of zeros still gets a usable scale


def is_fp8(t: torch.Tensor) -> bool:
    return t.dtype == FP8_DTYPE


def empty_scales(k_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """k_scale, v_scale for an fp8 cache [num_blocks, block_size, Hkv, D]: float32
    [num_blocks, block_size, Hkv], laid out head-major (each head's block_size scales side by
    side, a transposed view of [num_blocks, Hkv, block_size]): the kernel then reads a key
    tile's scales from a few contiguous runs; faster for prefill on an H100 (docs/fp8_kv_cache.md)."""
    num_blocks, block_size, num_kv_heads = k_cache.shape[:3]

    def empty():
        return torch.empty(num_blocks, num_kv_heads, block_size, dtype=torch.float32,
                           device=k_cache.device).transpose(1, 2)

    return empty(), empty()


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] (any float dtype) -> (e4m3 values [..., D], float32 scales [...])."""
    x = x.float()
    scale = (x.abs().amax(dim=-1) / E4M3_MAX).clamp(min=MIN_SCALE)
    q = (x / scale[..., None]).clamp(-E4M3_MAX, E4M3_MAX).to(FP8_DTYPE)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """e4m3 values [..., D] and their scales [...] -> float32 [..., D]."""
    return q.float() * scale[..., None]
