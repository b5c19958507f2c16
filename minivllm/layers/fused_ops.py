"""Fused Triton kernels for the small ops of a decoder layer: add + RMSNorm, q/k norm + RoPE
(+ the KV-cache write), SiLU-and-mul.

Why bother: in PyTorch each of these is several kernels. RMSNorm alone is eight (cast up, square,
mean, add eps, rsqrt, multiply, cast down, multiply by the weight), RoPE on q and k about twenty.
A Qwen3-0.6B decode step ran ~1,700 kernels, and even replayed from a CUDA graph each costs
~1-2 us of GPU time however little it computes: at batch 1 that was 3.3 ms of a step whose
weights take 0.3 ms to read (benchmarks/RESULTS.md). Each op below is one kernel that reads its
inputs once, keeps every intermediate in registers and writes its outputs once.

Each kernel computes in float32 and rounds once at the end, where PyTorch rounds after every op
in bf16; the results agree to bf16 rounding and, in float32, to float32 rounding (checked
against the PyTorch versions in tests/models/test_fused_ops.py, and against Hugging Face end to
end by the engine tests on the GPU).

The rotation kernel can also write the rotated keys and the values into the paged KV cache
(`cache=`): the program that holds a token's rotated key head in registers stores it, and that
head's value row, at the token's slot, quantizing for an fp8 cache exactly as
kernels/triton_cache.py does. That is one kernel per layer less than rotating and then writing
(`MINIVLLM_FUSED_KV_WRITE=0` keeps the separate write, to measure it).

They run on CUDA tensors only (on CPU the PyTorch versions are used; the tests run these under
TRITON_INTERPRET=1). `MINIVLLM_FUSED_OPS=0` turns them off, to measure what they bring; the
switch is `minivllm.layers.use_fused_ops`, which imports no Triton. Every kernel launches with
programmatic dependent launch on Hopper (kernels/pdl.py): the loads that do not depend on the
previous kernel (norm weights, positions, rotary tables, slots) come before its wait.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from minivllm.kernels.fp8 import E4M3_MAX as _E4M3_MAX
from minivllm.kernels.fp8 import FP8_DTYPE
from minivllm.kernels.fp8 import MIN_SCALE as _MIN_SCALE
from minivllm.kernels.pdl import pdl_launch, wait_and_release
from minivllm.layers.attention import KVCacheWrite

E4M3_MAX = tl.constexpr(_E4M3_MAX)
MIN_SCALE = tl.constexpr(_MIN_SCALE)


# --------------------------------------------------------------------------------------------
# residual add + RMSNorm
# --------------------------------------------------------------------------------------------
@triton.jit
def _add_rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, stride_x, stride_r, stride_o,
                         n_cols, eps, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
                         USE_PDL: tl.constexpr):
    """One row per program: h = x (+ residual); residual <- h; out = w * cast(h / rms(h))."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    wait_and_release(USE_PDL)
    h = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        # The residual stream is kept in the model dtype, as in the unfused model: round the sum.
        r = tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0)
        h = (h.to(tl.float32) + r.to(tl.float32)).to(r.dtype)
        tl.store(residual_ptr + row * stride_r + cols, h, mask=mask)
    h32 = h.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(h32 * h32, axis=0) / n_cols + eps)
    # Cast back before the weight multiplies, as the checkpoints were trained (layernorm.py).
    normed = (h32 * inv_rms).to(h.dtype).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (normed * w).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> torch.Tensor:
    """RMSNorm of x [rows, n] (any leading dims); with `residual`, first `residual += x` in place
    and normalise that sum: the pre-norm block's "add the sublayer output, normalise for the next
    sublayer" in one pass."""
    n = x.shape[-1]
    rows = x.reshape(-1, n)
    out = torch.empty_like(rows)
    res = residual.view(-1, n) if residual is not None else rows
    if rows.shape[0] > 0:
        _add_rms_norm_kernel[(rows.shape[0],)](
            rows, res, weight, out, rows.stride(0), res.stride(0), out.stride(0), n, eps,
            HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(n),
            num_warps=4 if n <= 2048 else 8, **pdl_launch(x.device),
        )
    return out.view(x.shape)


# --------------------------------------------------------------------------------------------
# q/k per-head RMSNorm (Qwen3) + rotary embedding, in place
# --------------------------------------------------------------------------------------------
@triton.jit
def _store_head(cache_ptr, scale_ptr, x1, x2, dst, scale_dst, j, mask, HALF: tl.constexpr,
                KV_FP8: tl.constexpr):
    """Store one head's two halves at `dst` of a cache; for fp8, divided by the head's scale
    (max |x| / 448, the rule of kernels/fp8.py) and clamped, the scale at `scale_dst`."""
    if KV_FP8:
        a = x1.to(tl.float32)
        b = x2.to(tl.float32)
        amax = tl.maximum(tl.max(tl.abs(a), axis=0), tl.max(tl.abs(b), axis=0))
        scale = tl.maximum(amax / E4M3_MAX, MIN_SCALE)
        x1 = tl.minimum(tl.maximum(a / scale, -E4M3_MAX), E4M3_MAX)
        x2 = tl.minimum(tl.maximum(b / scale, -E4M3_MAX), E4M3_MAX)
        tl.store(scale_ptr + scale_dst, scale)
    tl.store(cache_ptr + dst + j, x1.to(cache_ptr.dtype.element_ty), mask=mask)
    tl.store(cache_ptr + dst + HALF + j, x2.to(cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _write_head(k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, slot_mapping_ptr, v_ptr,
                k1, k2, token, kv_head, j, mask, stride_vt, stride_vh,
                stride_cb, stride_ct, stride_ch, stride_sb, stride_st, stride_sh,
                HALF: tl.constexpr, BLOCK_SIZE: tl.constexpr, KV_FP8: tl.constexpr):
    """Store a token's rotated key head (k1 | k2) and the same head's value row at its slot."""
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot >= 0:  # negative: a padding token of a CUDA-graph batch
        block = slot // BLOCK_SIZE
        offset = slot % BLOCK_SIZE
        dst = block * stride_cb + offset * stride_ct + kv_head * stride_ch
        scale_dst = block * stride_sb + offset * stride_st + kv_head * stride_sh
        _store_head(k_cache_ptr, k_scale_ptr, k1, k2, dst, scale_dst, j, mask, HALF, KV_FP8)
        v = v_ptr + token * stride_vt + kv_head * stride_vh
        v1 = tl.load(v + j, mask=mask, other=0.0)
        v2 = tl.load(v + HALF + j, mask=mask, other=0.0)
        _store_head(v_cache_ptr, v_scale_ptr, v1, v2, dst, scale_dst, j, mask, HALF, KV_FP8)


# `positions` and `slot_mapping` may be views at any offset of the step's packed metadata, and a
# pointer's 16-byte alignment is part of what Triton compiles for; each is read one element per
# program, so nothing is lost by leaving them out. The other arguments are fixed per model: no
# batch size reaches these kernels except through the grid, so a new batch shape never compiles
# them again.
@triton.jit(do_not_specialize_on_alignment=["positions_ptr", "slot_mapping_ptr"])
def _qk_norm_rope_kernel(q_ptr, k_ptr, v_ptr, positions_ptr, cos_ptr, sin_ptr, q_norm_ptr, k_norm_ptr,
                         k_cache_ptr, v_cache_ptr, slot_mapping_ptr, k_scale_ptr, v_scale_ptr,
                         stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                         stride_table, stride_cb, stride_ct, stride_ch, stride_sb, stride_st,
                         stride_sh, num_q_heads, eps,
                         HAS_NORM: tl.constexpr, HALF: tl.constexpr, HALF_BLOCK: tl.constexpr,
                         BLOCK_SIZE: tl.constexpr, WRITE_CACHE: tl.constexpr,
                         KV_FP8: tl.constexpr, USE_PDL: tl.constexpr):
    """Program (token, head) over the q heads then the k heads: load the head's two halves,
    (normalise them), rotate pair (x[j], x[j + D/2]) by the token's angles, store in place.
    WRITE_CACHE: a k-head program also stores its rotated key, and the same head's value row,
    at the token's cache slot."""
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    is_q = head < num_q_heads
    if is_q:
        base = q_ptr + token * stride_qt + head * stride_qh
        norm_ptr = q_norm_ptr
    else:
        base = k_ptr + token * stride_kt + (head - num_q_heads) * stride_kh
        norm_ptr = k_norm_ptr
    j = tl.arange(0, HALF_BLOCK)
    mask = j < HALF
    # Prologue: what no kernel of the step writes (norm weights, angles, the slot).
    if HAS_NORM:
        w1 = tl.load(norm_ptr + j, mask=mask, other=0.0).to(tl.float32)
        w2 = tl.load(norm_ptr + HALF + j, mask=mask, other=0.0).to(tl.float32)
    pos = tl.load(positions_ptr + token).to(tl.int64)
    cos = tl.load(cos_ptr + pos * stride_table + j, mask=mask, other=1.0)
    sin = tl.load(sin_ptr + pos * stride_table + j, mask=mask, other=0.0)
    wait_and_release(USE_PDL)
    x1 = tl.load(base + j, mask=mask, other=0.0)
    x2 = tl.load(base + HALF + j, mask=mask, other=0.0)
    if HAS_NORM:
        a = x1.to(tl.float32)
        b = x2.to(tl.float32)
        inv_rms = tl.rsqrt((tl.sum(a * a, axis=0) + tl.sum(b * b, axis=0)) / (2 * HALF) + eps)
        x1 = ((a * inv_rms).to(x1.dtype).to(tl.float32) * w1).to(x1.dtype)
        x2 = ((b * inv_rms).to(x2.dtype).to(tl.float32) * w2).to(x2.dtype)
    a = x1.to(tl.float32)
    b = x2.to(tl.float32)
    # Rounded to the model dtype before anything else reads them, as the unfused path stores them.
    y1 = (a * cos - b * sin).to(x1.dtype)
    y2 = (b * cos + a * sin).to(x2.dtype)
    tl.store(base + j, y1, mask=mask)
    tl.store(base + HALF + j, y2, mask=mask)
    if WRITE_CACHE:
        if not is_q:
            _write_head(k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, slot_mapping_ptr,
                        v_ptr, y1, y2, token, head - num_q_heads, j, mask,
                        stride_vt, stride_vh, stride_cb, stride_ct, stride_ch,
                        stride_sb, stride_st, stride_sh, HALF, BLOCK_SIZE, KV_FP8)


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_table: torch.Tensor,
                 sin_table: torch.Tensor, q_norm_weight: torch.Tensor | None = None,
                 k_norm_weight: torch.Tensor | None = None, eps: float = 1e-6,
                 v: torch.Tensor | None = None, cache: KVCacheWrite | None = None) -> None:
    """Rotate q [T, Hq, D] and k [T, Hkv, D] in place by the angles of `positions` [T] ("rotate
    half" pairing), normalising each head first when norm weights [D] are given (Qwen3).

    cos_table / sin_table: float32 [max_position, D/2], the RotaryEmbedding's tables. q and k may
    be strided views (slices of the fused qkv projection); only head_dim must be contiguous.
    With `cache` (and v [T, Hkv, D]), also write the rotated k and v into the paged cache at
    `cache.slot_mapping`: `write_kv_cache(k, v, ...)` done by the same kernel.
    """
    num_tokens, num_q_heads, head_dim = q.shape
    if num_tokens == 0:
        return
    has_norm = q_norm_weight is not None
    half = head_dim // 2
    write = cache is not None
    if write and v is None:
        raise ValueError("v: writing the cache needs the values too")
    kv_fp8 = write and cache.k_cache.dtype == FP8_DTYPE
    k_cache = cache.k_cache if write else q
    if write and cache.k_cache.stride() != cache.v_cache.stride():
        raise ValueError("cache: k_cache and v_cache must have the same strides")
    unused = cos_table  # a pointer the kernel never reads
    _qk_norm_rope_kernel[(num_tokens, num_q_heads + k.shape[1])](
        q, k, v if write else q, positions, cos_table, sin_table,
        q_norm_weight if has_norm else unused, k_norm_weight if has_norm else unused,
        k_cache, cache.v_cache if write else q, cache.slot_mapping if write else positions,
        cache.k_scale if kv_fp8 else unused, cache.v_scale if kv_fp8 else unused,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        *(v.stride()[:2] if write else (0, 0)), cos_table.stride(0),
        *(k_cache.stride()[:3] if write else (0, 0, 0)),
        *(cache.k_scale.stride() if kv_fp8 else (0, 0, 0)), num_q_heads, eps,
        HAS_NORM=has_norm, HALF=half, HALF_BLOCK=triton.next_power_of_2(half),
        BLOCK_SIZE=k_cache.shape[1] if write else 1, WRITE_CACHE=write, KV_FP8=kv_fp8,
        num_warps=1, **pdl_launch(q.device),
    )


# --------------------------------------------------------------------------------------------
# SiLU-and-mul
# --------------------------------------------------------------------------------------------
@triton.jit
def _silu_and_mul_kernel(gate_up_ptr, out_ptr, stride_in, stride_out, n_cols, BLOCK: tl.constexpr,
                         USE_PDL: tl.constexpr):
    """out[t, j] = silu(gate[t, j]) * up[t, j], where gate_up[t] = gate | up."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    wait_and_release(USE_PDL)
    gate = tl.load(gate_up_ptr + row * stride_in + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + row * stride_in + n_cols + cols, mask=mask, other=0.0)
    # silu rounds to the model dtype before the product, as F.silu(gate) * up does.
    silu = (gate * tl.sigmoid(gate)).to(up.dtype).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (silu * up.to(tl.float32)).to(out_ptr.dtype.element_ty),
             mask=mask)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[..., 2d] holding (gate, up) -> silu(gate) * up, [..., d]."""
    d = gate_up.shape[-1] // 2
    rows = gate_up.reshape(-1, 2 * d)
    out = torch.empty(rows.shape[0], d, dtype=gate_up.dtype, device=gate_up.device)
    if rows.shape[0] > 0:
        block = min(1024, triton.next_power_of_2(d))
        _silu_and_mul_kernel[(rows.shape[0], triton.cdiv(d, block))](
            rows, out, rows.stride(0), out.stride(0), d, BLOCK=block, num_warps=4,
            **pdl_launch(gate_up.device),
        )
    return out.view(*gate_up.shape[:-1], d)
