"""Triton: write the new K/V rows of a step into the paged cache through a slot mapping.

Every new token has one *slot*, `block_id * block_size + offset`, chosen by the block manager.
One program copies one token's [Hkv, D] key and value rows to that slot; a negative slot (a
padding token of a CUDA-graph batch) is skipped. The copy is tiny, so the kernel's only job is to
avoid the Python-level gather/scatter a framework would do with several launches.

Compiled once per model: the token count reaches the kernel only through the grid, and every
other argument is fixed by the cache and the model. Triton also keys a compilation on each
pointer's 16-byte alignment; `slot_mapping` may be a view at any offset of a step's packed
metadata and is read one element per program, so its alignment is left out of the key.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize_on_alignment=["slot_mapping_ptr"])
def _write_kv_cache_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cb, stride_ct, stride_ch,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    HEADS_PAD: tl.constexpr, DIM_PAD: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
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
    tl.store(k_cache_ptr + dst, tl.load(src_k, mask=mask), mask=mask)
    tl.store(v_cache_ptr + dst, tl.load(src_v, mask=mask), mask=mask)


def write_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Same contract as `minivllm.kernels.write_kv_cache` (inputs already validated)."""
    num_tokens, num_kv_heads, head_dim = key.shape
    if k_cache.stride() != v_cache.stride():
        raise ValueError("k_cache and v_cache must have the same strides")
    _write_kv_cache_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, BLOCK_SIZE=k_cache.shape[1],
        HEADS_PAD=triton.next_power_of_2(num_kv_heads), DIM_PAD=triton.next_power_of_2(head_dim),
    )
