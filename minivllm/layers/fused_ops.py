"""Fused Triton kernels for the small ops of a decoder layer: add + RMSNorm, q/k norm + RoPE,
SiLU-and-mul.

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

They run on CUDA tensors only (on CPU the PyTorch versions are used; the tests run these under
TRITON_INTERPRET=1). `MINIVLLM_FUSED_OPS=0` turns them off, to measure what they bring; the
switch is `minivllm.layers.use_fused_ops`, which imports no Triton.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


# --------------------------------------------------------------------------------------------
# residual add + RMSNorm
# --------------------------------------------------------------------------------------------
@triton.jit
def _add_rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, stride_x, stride_r, stride_o,
                         n_cols, eps, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    """One row per program: h = x (+ residual); residual <- h; out = w * cast(h / rms(h))."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
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
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
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
            num_warps=4 if n <= 2048 else 8,
        )
    return out.view(x.shape)


# --------------------------------------------------------------------------------------------
# q/k per-head RMSNorm (Qwen3) + rotary embedding, in place
# --------------------------------------------------------------------------------------------
# `positions` may be a view at any offset of the step's packed metadata, and a pointer's 16-byte
# alignment is part of what Triton compiles for; it is read one element per program, so nothing
# is lost by leaving it out. The other arguments are fixed per model: no batch size reaches these
# kernels except through the grid, so a new batch shape never compiles them again.
@triton.jit(do_not_specialize_on_alignment=["positions_ptr"])
def _qk_norm_rope_kernel(q_ptr, k_ptr, positions_ptr, cos_ptr, sin_ptr, q_norm_ptr, k_norm_ptr,
                         stride_qt, stride_qh, stride_kt, stride_kh, stride_table,
                         num_q_heads, eps, HAS_NORM: tl.constexpr, HALF: tl.constexpr,
                         HALF_BLOCK: tl.constexpr):
    """Program (token, head) over the q heads then the k heads: load the head's two halves,
    (normalise them), rotate pair (x[j], x[j + D/2]) by the token's angles, store in place."""
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    if head < num_q_heads:
        base = q_ptr + token * stride_qt + head * stride_qh
        norm_ptr = q_norm_ptr
    else:
        base = k_ptr + token * stride_kt + (head - num_q_heads) * stride_kh
        norm_ptr = k_norm_ptr
    j = tl.arange(0, HALF_BLOCK)
    mask = j < HALF
    x1 = tl.load(base + j, mask=mask, other=0.0)
    x2 = tl.load(base + HALF + j, mask=mask, other=0.0)
    if HAS_NORM:
        a = x1.to(tl.float32)
        b = x2.to(tl.float32)
        inv_rms = tl.rsqrt((tl.sum(a * a, axis=0) + tl.sum(b * b, axis=0)) / (2 * HALF) + eps)
        w1 = tl.load(norm_ptr + j, mask=mask, other=0.0).to(tl.float32)
        w2 = tl.load(norm_ptr + HALF + j, mask=mask, other=0.0).to(tl.float32)
        x1 = ((a * inv_rms).to(x1.dtype).to(tl.float32) * w1).to(x1.dtype)
        x2 = ((b * inv_rms).to(x2.dtype).to(tl.float32) * w2).to(x2.dtype)
    pos = tl.load(positions_ptr + token).to(tl.int64)
    cos = tl.load(cos_ptr + pos * stride_table + j, mask=mask, other=1.0)
    sin = tl.load(sin_ptr + pos * stride_table + j, mask=mask, other=0.0)
    a = x1.to(tl.float32)
    b = x2.to(tl.float32)
    tl.store(base + j, (a * cos - b * sin).to(x1.dtype), mask=mask)
    tl.store(base + HALF + j, (b * cos + a * sin).to(x2.dtype), mask=mask)


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_table: torch.Tensor,
                 sin_table: torch.Tensor, q_norm_weight: torch.Tensor | None = None,
                 k_norm_weight: torch.Tensor | None = None, eps: float = 1e-6) -> None:
    """Rotate q [T, Hq, D] and k [T, Hkv, D] in place by the angles of `positions` [T] ("rotate
    half" pairing), normalising each head first when norm weights [D] are given (Qwen3).

    cos_table / sin_table: float32 [max_position, D/2], the RotaryEmbedding's tables. q and k may
    be strided views (slices of the fused qkv projection); only head_dim must be contiguous.
    """
    num_tokens, num_q_heads, head_dim = q.shape
    if num_tokens == 0:
        return
    has_norm = q_norm_weight is not None
    half = head_dim // 2
    _qk_norm_rope_kernel[(num_tokens, num_q_heads + k.shape[1])](
        q, k, positions, cos_table, sin_table,
        q_norm_weight if has_norm else cos_table, k_norm_weight if has_norm else cos_table,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_table.stride(0), num_q_heads, eps,
        HAS_NORM=has_norm, HALF=half, HALF_BLOCK=triton.next_power_of_2(half), num_warps=1,
    )


# --------------------------------------------------------------------------------------------
# SiLU-and-mul
# --------------------------------------------------------------------------------------------
@triton.jit
def _silu_and_mul_kernel(gate_up_ptr, out_ptr, stride_in, stride_out, n_cols, BLOCK: tl.constexpr):
    """out[t, j] = silu(gate[t, j]) * up[t, j], where gate_up[t] = gate | up."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
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
        )
    return out.view(*gate_up.shape[:-1], d)
