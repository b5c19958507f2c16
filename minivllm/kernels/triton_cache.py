"""Triton: write the new K/V rows of a step into the paged cache through a slot mapping.

Every new token has one *slot*, `block_id * block_size + offset`, chosen by the block manager.
One program copies one token's [Hkv, D] key and value rows to that slot; a negative slot (a
padding token of a CUDA-graph batch) is skipped. The copy is tiny, so the kernel's only job is to
avoid the Python-level gather/scatter a framework would do with several launches.

An fp8 cache is written quantized: the kernel already holds the token's [Hkv, D] rows in
registers, so each head's scale (max |x| / 448, fp8.py) costs one reduction, and the scaled row is
clamped to +-448 and rounded to e4m3 on the way out, its scale stored at the same slot of
`k_scale`/`v_scale`. Nothing leaves the GPU, so the write stays inside a CUDA graph.

Compiled once per model: the token count reaches the kernel only through the grid, and every
other argument is fixed by the cache and the model. Triton also keys a compilation on each
pointer's 16-byte alignment; `slot_mapping` may be a view at any offset of a step's packed
metadata and is read one element per program, so its alignment is left out of the key.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .fp8 import E4M3_MAX as _E4M3_MAX
from .fp8 import FP8_DTYPE
from .fp8 import MIN_SCALE as _MIN_SCALE
from .pdl import pdl_launch, wait_and_release

E4M3_MAX = tl.constexpr(_E4M3_MAX)
MIN_SCALE = tl.constexpr(_MIN_SCALE)


@triton.jit
def _store_row(cache_ptr, scale_ptr, x, dst, scale_dst, mask, heads,
               NUM_KV_HEADS: tl.constexpr, KV_FP8: tl.constexpr):
    """Store one token's rows x [HEADS_PAD, DIM_PAD] at `dst`; quantized for an fp8 cache."""
    if KV_FP8:
        x = x.to(tl.float32)
        scale = tl.maximum(tl.max(tl.abs(x), axis=1) / E4M3_MAX, MIN_SCALE)  # per head
        x = tl.minimum(tl.maximum(x / scale[:, None], -E4M3_MAX), E4M3_MAX)
        tl.store(scale_ptr + scale_dst, scale[:, None], mask=heads < NUM_KV_HEADS)
    tl.store(cache_ptr + dst, x.to(cache_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize_on_alignment=["slot_mapping_ptr"])
def _write_kv_cache_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr, k_scale_ptr, v_scale_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cb, stride_ct, stride_ch, stride_sb, stride_st, stride_sh,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    HEADS_PAD: tl.constexpr, DIM_PAD: tl.constexpr, KV_FP8: tl.constexpr, USE_PDL: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)  # step metadata: before the wait
    wait_and_release(USE_PDL)  # programmatic dependent launch (pdl.py)
    if slot < 0:
        return
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    heads = tl.arange(0, HEADS_PAD)[:, None]
    dims = tl.arange(0, DIM_PAD)[None, :]
    # Padding lanes (head_dim 80 -> 128, say) are masked off, so any head count or dim works.
    mask = (heads < NUM_KV_HEADS) & (dims < HEAD_DIM)
    src_k = key_ptr + token.to(tl.int64) * stride_kt + heads * stride_kh + dims
    src_v = value_ptr + token.to(tl.int64) * stride_vt + heads * stride_vh + dims
    dst = block * stride_cb + offset * stride_ct + heads * stride_ch + dims
    scale_dst = block * stride_sb + offset * stride_st + heads * stride_sh  # [HEADS_PAD, 1]
    k = tl.load(src_k, mask=mask, other=0.0)
    v = tl.load(src_v, mask=mask, other=0.0)
    _store_row(k_cache_ptr, k_scale_ptr, k, dst, scale_dst, mask, heads, NUM_KV_HEADS, KV_FP8)
    _store_row(v_cache_ptr, v_scale_ptr, v, dst, scale_dst, mask, heads, NUM_KV_HEADS, KV_FP8)


def write_kv_cache(key, value, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None) -> None:
    """Same contract as `minivllm.kernels.write_kv_cache` (inputs already validated)."""
    num_tokens, num_kv_heads, head_dim = key.shape
    if k_cache.stride() != v_cache.stride():
        raise ValueError("k_cache and v_cache must have the same strides")
    kv_fp8 = k_cache.dtype == FP8_DTYPE
    _write_kv_cache_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping,
        k_scale if kv_fp8 else k_cache, v_scale if kv_fp8 else v_cache,  # unused unless fp8
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        *(k_scale.stride() if kv_fp8 else (0, 0, 0)),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, BLOCK_SIZE=k_cache.shape[1],
        HEADS_PAD=triton.next_power_of_2(num_kv_heads), DIM_PAD=triton.next_power_of_2(head_dim),
        KV_FP8=kv_fp8, **pdl_launch(key.device),
    )
