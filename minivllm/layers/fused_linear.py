"""Linear layers for batches of one to four rows (decode at small batch), fused with the ops
around them.

**The problem.** A decode step at batch 1 multiplies one row by every weight matrix of the model:
bandwidth bound, and at Qwen3-0.6B's size a matrix takes 1-4 us to read at full speed. Done as
it is written (add + RMSNorm, GEMM, SiLU-and-mul, GEMM...), each op is a kernel, and each kernel
pays a fixed price however little it reads: launch, ramp up to full bandwidth, drain. At batch 1
that fixed price was most of the step (benchmarks/RESULTS.md), and a faster GEMM alone did not
help: a Triton GEMM at the speed of cuBLAS removed nothing from the chain.

**The fix: fewer, fuller kernels.** The ops next to a GEMM are per row and cheap, and with a few
rows every program can afford to redo them:

* *norm in the prologue.* The input of the q|k|v and gate|up projections is RMSNorm(x + residual).
  Each program needs all K columns of the row anyway, so it adds the residual, computes the
  row's root mean square (a first pass over x, which is a few KB and stays in cache) and
  normalises each tile of x as it goes into the product. Program 0 also writes the updated
  residual stream (to a new tensor: the other programs are still reading the old one).
* *SwiGLU in the epilogue.* A program of the gate|up projection computes output columns j of
  gate (weight rows j) *and* of up (rows I + j), so it can write silu(gate) * up itself: the
  [1, 2I] intermediate and the SiLU-and-mul kernel disappear.

A Llama-family layer is then six kernels: [add + norm + q|k|v], [q/k norm + RoPE + cache write],
[attention], [o_proj], [add + norm + gate|up + SwiGLU], [down_proj] (fused_ops.py has the second;
a split-KV decode adds its merge kernel after attention).

**Reading the weights before the previous kernel ends.** Weights are never written during a
step, so a program may load them before it waits for the previous kernel (programmatic dependent
launch, kernels/pdl.py). Each program reads its BLOCK_N weight rows in tiles of BLOCK_K columns;
the shapes are chosen so that one tile is the whole strip for small models (BLOCK_N x K within a
register budget), and that first tile is loaded *before* the wait: the weight stream of one
kernel overlaps the tail of the previous one, and with every kernel of a layer in Triton the
chain of overlaps is unbroken (a cuBLAS GEMM in between would break it: it never signals early).

**Tiles.** Program n owns output columns [n BLOCK_N, (n+1) BLOCK_N) of every row; BLOCK_N is as
small as 4 so that even N = 1024 makes 256 programs, enough to keep every SM reading. The
product is a reduction over K on the CUDA cores, every thread busy; each weight is read once and
multiplied by every row (the rows padded to a power of two, masked). Accumulation is float32;
each rounding to the model dtype happens where the unfused layers round (the residual sum, the
normalised input, gate and up, silu), so the results agree with them to the order of summation.

**When it runs** (`minivllm.layers.use_fused_linear`): CUDA, float16/bfloat16, 1 to
FUSED_LINEAR_ROWS = 4 rows, unless MINIVLLM_FUSED_LINEAR says fewer (0: never; MINIVLLM_FUSED_OPS=0
also turns it off); otherwise cuBLAS and the separate kernels. In decode that is the CUDA graphs
of batch 1, 2 and 4 (and a prefill or a verification step of at most 4 tokens). Why up to four:
there the GEMM is a GEMV or nearly, which cuBLAS serves with a generic kernel, while this one
reads the weights once with every thread busy and folds the norm and SwiGLU in. Whole Qwen3-0.6B
decode steps against the same code on cuBLAS (H100, benchmarks/RESULTS.md): 0.70x the time at
batch 1, 0.78x at batch 2, 0.90x at batch 4, but 1.29x at batch 8 (with a quarter of the
one-row tile, so that eight rows' share fits the registers): from there cuBLAS's tensor-core
tiles win. A version on `tl.dot` lost from two rows on. The tests run these kernels in the interpreter
against the unfused layers (tests/models/test_fused_linear.py).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from minivllm.kernels.pdl import pdl_launch, wait_and_release
from minivllm.layers import FUSED_LINEAR_ROWS as MAX_ROWS

TILE_ELEMENTS = 16384  # products a program holds in registers at once (weights x rows)


# --------------------------------------------------------------------------------------------
# The kernel
# --------------------------------------------------------------------------------------------
# The rows are a [ROWS, BLOCK_K] tile and a program's weights a [1, BLOCK_N, BLOCK_K] one: loaded
# with the rows' axis in front, the weights are already in the layout of their product with the
# rows (a [BLOCK_N, BLOCK_K] tile would be moved there through shared memory), and each weight,
# read once, is multiplied by every row.
@triton.jit
def _residual_sum(x_ptr, residual_ptr, rows, ks, mask, stride_x, K, ADD_RESIDUAL: tl.constexpr):
    """x, or x + residual rounded to the model dtype (the residual stream is kept in it); rows
    [ROWS, 1], ks [1, BLOCK_K]. The residual is contiguous: row stride K."""
    h = tl.load(x_ptr + rows * stride_x + ks, mask=mask, other=0.0)
    if ADD_RESIDUAL:
        r = tl.load(residual_ptr + rows * K + ks, mask=mask, other=0.0)
        h = (h.to(tl.float32) + r.to(tl.float32)).to(r.dtype)
    return h


@triton.jit
def _inverse_rms(x_ptr, residual_ptr, rows, row_mask, stride_x, K, eps,
                 ADD_RESIDUAL: tl.constexpr, ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    """1 / rms of each row of x (+ residual), [ROWS]: the first pass over the (small, cached)
    input."""
    sum_sq = tl.zeros([ROWS], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)[None, :]
        h = _residual_sum(x_ptr, residual_ptr, rows, ks, row_mask & (ks < K), stride_x, K,
                          ADD_RESIDUAL).to(tl.float32)
        sum_sq += tl.sum(h * h, axis=1)
    return tl.rsqrt(sum_sq / K + eps)


@triton.jit
def _input_tile(x_ptr, residual_ptr, residual_out_ptr, norm_ptr, rows, row_mask, stride_x, k0, K,
                inv_rms, residual_cols, NORM: tl.constexpr, ADD_RESIDUAL: tl.constexpr,
                BLOCK_K: tl.constexpr):
    """Columns [k0, k0 + BLOCK_K) of the GEMM's input, [ROWS, BLOCK_K]: x, or
    RMSNorm(x + residual), rounded as fused_ops.rms_norm rounds; its columns below
    `residual_cols` of x + residual are stored as the new residual (all K in one program, none
    in the others)."""
    ks = k0 + tl.arange(0, BLOCK_K)[None, :]
    mask = row_mask & (ks < K)
    h = _residual_sum(x_ptr, residual_ptr, rows, ks, mask, stride_x, K, ADD_RESIDUAL)
    if ADD_RESIDUAL:
        tl.store(residual_out_ptr + rows * K + ks, h, mask=row_mask & (ks < residual_cols))
    if NORM:
        w = tl.load(norm_ptr + ks, mask=ks < K, other=0.0).to(tl.float32)
        h = ((h.to(tl.float32) * inv_rms[:, None]).to(h.dtype).to(tl.float32) * w).to(h.dtype)
    return h


@triton.jit
def _weight_tile(w_rows, k0, ks, col_mask, K):
    """Columns [k0, k0 + BLOCK_K) of this program's weight rows, [1, BLOCK_N, BLOCK_K]."""
    mask = col_mask[:, None] & ((k0 + ks) < K)[None, :]
    return tl.load((w_rows + k0 + ks[None, :])[None, :, :], mask=mask[None, :, :], other=0.0)


@triton.jit
def _times_weights(a, w, acc):
    """acc [ROWS, BLOCK_N] + a [ROWS, BLOCK_K] @ w^T: every row times every weight row, reduced
    along K on the CUDA cores in float32."""
    return acc + tl.sum(a.to(tl.float32)[:, None, :] * w.to(tl.float32), axis=2)


@triton.jit
def _fused_linear_kernel(
    x_ptr, residual_ptr, residual_out_ptr, norm_ptr, w_ptr, bias_ptr, out_ptr,
    M, N, K, stride_x, stride_wn, eps,
    NORM: tl.constexpr, ADD_RESIDUAL: tl.constexpr, SWIGLU: tl.constexpr, HAS_BIAS: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr,
):
    """Program n: out[:, cols] = input @ W[cols]^T (+ b), cols = [n BLOCK_N, (n+1) BLOCK_N), where
    input is the M (<= ROWS) rows of x or RMSNorm(x + residual). SWIGLU: W stacks gate rows then
    up rows (N each), and out[:, cols] = silu(gate[:, cols]) * up[:, cols]."""
    pid = tl.program_id(0)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    rows = tl.arange(0, ROWS)[:, None]
    row_mask = rows < M
    ks = tl.arange(0, BLOCK_K)
    # 64-bit row offsets: a weight (an LM head) may hold 2^31 elements or more.
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_wn
    u_rows = w_rows + N * stride_wn  # SWIGLU: the up rows
    # Prologue: the first weight tile (often all of this program's weights) does not depend on
    # the previous kernel, so it is in flight before the wait.
    w = _weight_tile(w_rows, 0, ks, col_mask, K)
    if SWIGLU:
        u = _weight_tile(u_rows, 0, ks, col_mask, K)
    wait_and_release(USE_PDL)

    residual_cols = tl.where(pid == 0, K, 0)  # program 0 writes the new residual stream
    inv_rms = tl.full([ROWS], 1.0, dtype=tl.float32)
    if NORM:
        inv_rms = _inverse_rms(x_ptr, residual_ptr, rows, row_mask, stride_x, K, eps,
                               ADD_RESIDUAL, ROWS, BLOCK_K)
    acc = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
    a = _input_tile(x_ptr, residual_ptr, residual_out_ptr, norm_ptr, rows, row_mask, stride_x, 0, K,
                    inv_rms, residual_cols, NORM, ADD_RESIDUAL, BLOCK_K)
    acc = _times_weights(a, w, acc)
    if SWIGLU:
        acc_up = _times_weights(a, u, acc_up)
    for k0 in range(BLOCK_K, K, BLOCK_K):  # the rest of K, when the strip is wider than a tile
        w = _weight_tile(w_rows, k0, ks, col_mask, K)
        a = _input_tile(x_ptr, residual_ptr, residual_out_ptr, norm_ptr, rows, row_mask, stride_x,
                        k0, K, inv_rms, residual_cols, NORM, ADD_RESIDUAL, BLOCK_K)
        acc = _times_weights(a, w, acc)
        if SWIGLU:
            u = _weight_tile(u_rows, k0, ks, col_mask, K)
            acc_up = _times_weights(a, u, acc_up)

    dtype = out_ptr.dtype.element_ty
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        if SWIGLU:
            acc_up += tl.load(bias_ptr + N + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if SWIGLU:
        # gate and up leave their GEMM in the model dtype, silu(gate) is rounded before the
        # product: the roundings of fused_ops.silu_and_mul after a gate|up GEMM.
        gate = acc.to(dtype).to(tl.float32)
        acc = (gate * tl.sigmoid(gate)).to(dtype).to(tl.float32) * acc_up.to(dtype).to(tl.float32)
    tl.store(out_ptr + rows * N + cols[None, :], acc.to(dtype), mask=row_mask & col_mask[None, :])


# --------------------------------------------------------------------------------------------
# Launch configuration
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LinearConfig:
    """How the work is cut: BLOCK_N output columns per program, read BLOCK_K at a time, and the
    launch options."""

    BLOCK_N: int
    BLOCK_K: int
    num_warps: int = 8
    num_stages: int = 1

    def __post_init__(self):
        for name in ("BLOCK_N", "BLOCK_K"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two, got {value}")


@functools.cache
def choose_config(n: int, k: int, swiglu: bool, rows: int = 1) -> LinearConfig:
    """From the shape only. A program holds at most TILE_ELEMENTS weights times `tile_rows`
    (SwiGLU programs read gate and up rows: half as many columns), as few columns as 4 so that
    N = 1024 still gives every SM of an H100 one or two programs, and as many as fit with the
    whole of K in one tile, which is then loaded before the wait.
    """
    per_column = 2 if swiglu else 1
    k_pad = triton.next_power_of_2(k)
    budget = TILE_ELEMENTS // (per_column * tile_rows(rows))
    block_n = min(64, max(4, _pow2_floor(budget // k_pad)))
    # Warps: every program of the grid resident at once, at Qwen3-0.6B's shapes on an H100
    # (registers of the sm_90 code, Triton 3.6): 8 warps for one weight tile (q|k|v: 122
    # registers, 2 programs an SM, 256 programs), 4 for SwiGLU's two (gate|up: 168 registers,
    # 3 an SM, 384 programs in 396 places; with 8 warps they would take 1.45 waves).
    return LinearConfig(block_n, min(k_pad, max(16, _pow2_floor(budget // block_n))),
                        num_warps=4 if swiglu else 8)


def tile_rows(rows: int) -> int:
    """The weight tile shrinks as rows are added: each thread also holds its share of the input
    rows. Two rows keep the one-row tile (q|k|v: 128 registers, sm_90 code, Triton 3.6); four
    take half of it (126; the whole tile would take 210 and halve the programs an SM holds)."""
    return max(1, triton.next_power_of_2(rows) // 2)


def _pow2_floor(n: int) -> int:
    return 1 << (max(n, 1).bit_length() - 1)


# --------------------------------------------------------------------------------------------
# The ops
# --------------------------------------------------------------------------------------------
def norm_linear(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                weight: torch.Tensor, bias: torch.Tensor | None = None, swiglu: bool = False,
                config: LinearConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(linear(RMSNorm(h)), h) with h = x + residual (or x, when residual is None): the pre-norm
    block's "add the sublayer output, normalise, project" in one kernel. x, residual [M, K] with
    M <= MAX_ROWS; weight [N, K] (nn.Linear's layout); swiglu: weight is gate rows then up rows
    [2I, K] and the result silu(gate) * up [M, I]. The residual is not changed; the returned h
    is a new tensor (or x itself)."""
    new_residual = x
    if residual is not None:
        residual = residual.contiguous()
        new_residual = torch.empty_like(residual)
    out = _launch(x, weight, bias, swiglu, config, residual=residual, residual_out=new_residual,
                  norm_weight=norm_weight, eps=eps)
    return out, new_residual


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           config: LinearConfig | None = None) -> torch.Tensor:
    """x [M, K] @ weight [N, K]^T (+ bias [N]), M <= MAX_ROWS: F.linear in one fused-path kernel."""
    return _launch(x, weight, bias, False, config)


def _launch(x, weight, bias, swiglu, config, residual=None, residual_out=None, norm_weight=None,
            eps=0.0):
    m, k = x.shape
    if not 1 <= m <= MAX_ROWS:
        raise ValueError(f"x: the fused linear kernels take 1 to {MAX_ROWS} rows, got {m}")
    if x.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError("x and weight must be contiguous along the features (stride 1)")
    n = weight.shape[0] // (2 if swiglu else 1)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    cfg = config or choose_config(n, k, swiglu, m)
    add = residual is not None
    _fused_linear_kernel[(triton.cdiv(n, cfg.BLOCK_N),)](
        x, residual if add else x, residual_out if add else x,
        norm_weight if norm_weight is not None else weight, weight,
        bias if bias is not None else weight, out, m, n, k, x.stride(0), weight.stride(0), eps,
        NORM=norm_weight is not None, ADD_RESIDUAL=add, SWIGLU=swiglu, HAS_BIAS=bias is not None,
        ROWS=triton.next_power_of_2(m), BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl_launch(x.device),
    )
    return out
