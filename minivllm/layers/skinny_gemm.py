"""Skinny GEMM: y = x W^T for a few rows of x, at the speed of reading W once.

**Why a few rows make a GEMM bandwidth bound.** A linear layer with x [M, K] and W [N, K] does
2 M N K FLOPs and must read W's N K values once: in bf16, M FLOPs per byte of weight. The H200
of benchmarks/RESULTS.md ran a bf16 matmul at 780 TFLOP/s and copied memory at ~4,200 GB/s,
about 190 FLOPs per byte; so with fewer rows than that the tensor cores wait for memory, and at
decode batch 1 a layer takes (weight bytes) / (memory bandwidth). Qwen3-0.6B's gate|up matrix is
12.6 MB: ~3 us.

**Why the library GEMM loses here.** A general GEMM (cuBLAS) is built to reuse every loaded tile
of W across many rows of x. With one row there is nothing to reuse; what matters is only to
keep enough weight bytes in flight on *every* SM. The batch-1 profile in
benchmarks/results/roofline_qwen3-0.6b_h200_profile_b1.txt shows cuBLAS at 12.1 us for gate|up,
~5 us for q|k|v and o_proj, and for down_proj a split-K GEMM (4.9 us) followed by a second kernel
that adds the split partial sums (1.7 us); SiLU-and-mul is one more kernel after gate|up.

**What this file does.** One Triton kernel for every projection of a decode step:

* **Tiles over N.** Program (n, m, s) owns output columns [n BLOCK_N, (n+1) BLOCK_N) for rows
  [16 m, 16 m + 16) and K slice s (all of K unless split), and streams its strip of W, BLOCK_K
  columns at a time, through a
  software pipeline (`num_stages` tiles loading while one is multiplied), so each SM keeps
  several loads in flight. x is tiny and stays in cache.
* **Tensor cores, with x padded to 16 rows.** `tl.dot` needs tiles of at least 16 rows, so rows
  past M are masked: loaded as zeros (no memory traffic), never stored. The wasted multiplies
  run on tensor cores that would be idle anyway, and the same code serves M = 1 and M = 16. The alternative, a
  reduction `tl.sum(x[None, :] * w, 1)` on the CUDA cores, is the natural GEMV for one row but
  needs a [M, BLOCK_N, BLOCK_K] product in registers for M rows; which of the two is faster at
  M = 1 has not been measured. Accumulation is fp32 either way.
* **Split-K when N alone cannot fill the GPU.** N = 1024 in tiles of 16 is 64 programs, half of
  an H100's 132 SMs. Then K is cut into `SPLIT_K` slices too, each program writes an fp32
  partial sum, and a second tiny kernel adds the slices in a fixed order, adds the bias and
  casts. A second kernel rather than fp32 atomics into a zeroed buffer: atomics would need a
  memset before and a cast after (three kernels, not two), and would add the slices in whatever
  order they finish, so the same input could give different outputs from one run to the next.
* **SwiGLU fused into gate|up.** `skinny_gate_up_silu` reads the merged [2I, K] weight (gate
  rows, then up rows): each program computes gate columns j and the matching up columns j,
  and writes only silu(gate) * up, so the [M, 2I] intermediate never goes to memory and the
  separate SiLU-and-mul kernel disappears.

**Launch configuration** (`choose_config`), from the shape only: BLOCK_N as wide as possible
(64, 32, 16) while there is still one program per SM; BLOCK_K so that a pipeline stage is
~16 KB (each weight row then reads at least 128 contiguous bytes per step); split K when even
BLOCK_N = 16 leaves SMs idle. It is a heuristic, not a measurement:
`benchmarks/skinny_gemm_bench.py --tune` times the alternatives on the GPU.

**One compilation per layer shape.** Triton compiles a kernel per *specialization* (argument
types, constexprs, ints equal to 1 or divisible by 16). The number of rows M changes from step
to step (CUDA-graph buckets 1, 2, 4, 8, ..., eager steps of any size), so M is listed in
`do_not_specialize` and the launch configuration never depends on it: a new batch size never
compiles a kernel again. The other ints (N, K, the strides, the slice length, a multiple of
BLOCK_K) stay specialized: their divisibility by 16 is what lets the compiler turn the weight
loads into 16-byte asynchronous copies (the tests check the PTX for it). Nothing in a launch reads a value back from the GPU, so the calls are
captured in the decode CUDA graphs like any other kernel.

**When it is used** (`use_skinny_gemm`): CUDA tensors with at most `SKINNY_MAX_M` rows, unless
`MINIVLLM_SKINNY_GEMM=0` (to measure what it brings). With more rows cuBLAS, which reuses
each weight tile across rows, should win again; the crossover per shape is what the benchmark
measures, and what SKINNY_MAX_M should be set from. On CPU the layers run PyTorch; the tests
run these kernels in the Triton interpreter (tests/models/test_skinny_gemm.py).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

SKINNY_MAX_M = 8  # most rows (tokens) a GEMM may have to use this kernel; see the benchmark
BLOCK_M = 16  # rows of x per program: tl.dot's smallest tile; the rows past M are masked
MAX_SPLIT_K = 16
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def use_skinny_gemm(x: torch.Tensor) -> bool:
    """Whether the GEMMs of input x [..., K] should run here rather than in cuBLAS: on CUDA, with
    1 to SKINNY_MAX_M rows, in a supported dtype, unless MINIVLLM_SKINNY_GEMM=0. Never on CPU.
    Looks at shapes and dtypes only, so deciding never waits for the GPU."""
    if not x.is_cuda or x.dim() == 0 or x.dtype not in DTYPES:
        return False
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return 1 <= rows <= SKINNY_MAX_M and os.environ.get("MINIVLLM_SKINNY_GEMM", "1") != "0"


# --------------------------------------------------------------------------------------------
# The kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _epilogue(acc, up, bias_ptr, cols, col_mask, N, HAS_BIAS: tl.constexpr, GATED: tl.constexpr,
              dtype: tl.constexpr):
    """Full fp32 sums -> the output tile: + bias, and for gate|up the SwiGLU product."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        if GATED:
            up += tl.load(bias_ptr + N + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if GATED:
        # Rounded where the unfused layers round: gate and up leave their GEMM in the model
        # dtype, and silu(gate) is rounded before the product (as fused_ops.silu_and_mul).
        gate = acc.to(dtype).to(tl.float32)
        up = up.to(dtype).to(tl.float32)
        acc = (gate * tl.sigmoid(gate)).to(dtype).to(tl.float32) * up
    return acc.to(dtype)


@triton.jit(do_not_specialize=["M"])
def _skinny_gemm_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr,
    M, N, K, k_per_split,
    stride_xm, stride_wn, stride_om, stride_os,
    HAS_BIAS: tl.constexpr, GATED: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Program (n, m, s): columns n of rows m over K slice s. GATED: columns j of gate (W rows j)
    and of up (W rows N + j). SPLIT: store the fp32 sums as slice s's partials (out_ptr is then
    the [M, SPLIT_K, width] partial buffer, stride_os its slice stride); else the finished tile."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_s = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_mask = rows < M
    col_mask = cols < N
    x_ptrs = x_ptr + rows[:, None] * stride_xm + ks[None, :]
    # 64-bit row offsets: a large weight (an LM head) can hold more than 2^31 elements.
    w_rows = cols.to(tl.int64)
    w_ptrs = w_ptr + w_rows[:, None] * stride_wn + ks[None, :]
    up_ptrs = w_ptr + (w_rows + N)[:, None] * stride_wn + ks[None, :]  # GATED only
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    k_start = pid_s * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    for k in range(k_start, k_end, BLOCK_K):
        k_mask = (k + ks) < K
        x = tl.load(x_ptrs + k, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptrs + k, mask=col_mask[:, None] & k_mask[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
        if GATED:
            w_up = tl.load(up_ptrs + k, mask=col_mask[:, None] & k_mask[None, :], other=0.0)
            acc_up = tl.dot(x, tl.trans(w_up), acc_up, input_precision=DOT_PRECISION)

    out_mask = row_mask[:, None] & col_mask[None, :]
    if SPLIT:
        partial = out_ptr + rows[:, None] * stride_om + pid_s * stride_os + cols[None, :]
        tl.store(partial, acc, mask=out_mask)
        if GATED:
            tl.store(partial + N, acc_up, mask=out_mask)
    else:
        y = _epilogue(acc, acc_up, bias_ptr, cols, col_mask, N, HAS_BIAS, GATED,
                      out_ptr.dtype.element_ty)
        tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], y, mask=out_mask)


@triton.jit
def _split_k_reduce_kernel(partial_ptr, bias_ptr, out_ptr, N, num_splits, stride_pm, stride_ps,
                           stride_om, HAS_BIAS: tl.constexpr, GATED: tl.constexpr,
                           BLOCK: tl.constexpr):
    """Program (row, column block): add the K slices' partials in order, then the epilogue."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    col_mask = cols < N
    acc = tl.zeros((1, BLOCK), dtype=tl.float32)
    acc_up = tl.zeros((1, BLOCK), dtype=tl.float32)
    for s in range(num_splits):
        partial = partial_ptr + row * stride_pm + s * stride_ps + cols[None, :]
        acc += tl.load(partial, mask=col_mask[None, :], other=0.0)
        if GATED:
            acc_up += tl.load(partial + N, mask=col_mask[None, :], other=0.0)
    y = _epilogue(acc, acc_up, bias_ptr, cols, col_mask, N, HAS_BIAS, GATED,
                  out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * stride_om + cols[None, :], y, mask=col_mask[None, :])


# --------------------------------------------------------------------------------------------
# Launch configuration
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SkinnyConfig:
    """How a skinny GEMM is cut: BLOCK_N output columns and BLOCK_K of K per step for each
    program, K cut into SPLIT_K slices, and the launch options."""

    BLOCK_N: int
    BLOCK_K: int
    SPLIT_K: int = 1
    num_warps: int = 4
    num_stages: int = 4

    def __post_init__(self):
        for name in ("BLOCK_N", "BLOCK_K"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two >= 16 (tl.dot), got {value}")
        if self.SPLIT_K < 1:
            raise ValueError(f"SPLIT_K must be >= 1, got {self.SPLIT_K}")


@functools.cache
def choose_config(N: int, K: int, dtype: torch.dtype, num_sms: int, gated: bool = False) -> SkinnyConfig:
    """The launch configuration for N output columns (for gate|up: N = I, and each program reads
    2 BLOCK_N weight rows) over K, on a GPU of `num_sms` SMs. Never depends on M."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    # 1. As wide a tile as still gives every SM a program (wider: less per-program overhead).
    block_n = next((b for b in (64, 32) if triton.cdiv(N, b) >= num_sms), 16)
    # 2. ~16 KB per pipeline stage (weight tile + x tile), and at least 128 contiguous bytes of
    #    each weight row per step; 4 stages keep 3 tiles in flight while one is multiplied.
    rows = block_n * (2 if gated else 1) + BLOCK_M
    block_k = _pow2_floor(16384 // (rows * itemsize))
    block_k = min(max(block_k, 128 // itemsize), 256, max(16, triton.next_power_of_2(K)))
    # 3. Too few column tiles: cut K too, keeping at least two BLOCK_K steps per slice.
    tiles, k_blocks = triton.cdiv(N, block_n), triton.cdiv(K, block_k)
    split = 1
    if tiles < num_sms:
        split = max(1, min(triton.cdiv(num_sms, tiles), k_blocks // 2, MAX_SPLIT_K))
    return SkinnyConfig(block_n, block_k, split, num_warps=4, num_stages=4)


def _pow2_floor(n: int) -> int:
    return 1 << (max(n, 1).bit_length() - 1)


@functools.cache
def _num_sms(device: torch.device) -> int:
    """SMs of the GPU; 1 on CPU (the interpreter runs one program at a time anyway)."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


# --------------------------------------------------------------------------------------------
# The ops
# --------------------------------------------------------------------------------------------
def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  config: SkinnyConfig | None = None) -> torch.Tensor:
    """y = x W^T (+ b) for x [..., K] with few rows, weight [N, K] (nn.Linear's layout), bias
    [N]: fp32 accumulation, y [..., N] in x's dtype. `config` overrides the launch
    configuration (benchmarks sweep it); by default `choose_config` picks it from the shape."""
    _check(x, weight, bias, gated=False)
    n = weight.shape[0]
    return _launch(x, weight, bias, n, gated=False, config=config)


def skinny_gate_up_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                        config: SkinnyConfig | None = None) -> torch.Tensor:
    """silu(x Wg^T + bg) * (x Wu^T + bu) in one kernel, for x [..., K] and the merged weight
    [2 I, K] = gate rows then up rows (as MergedColumnParallelLinear stores gate|up); bias, if
    any, [2 I] the same way. Returns [..., I] in x's dtype."""
    _check(x, weight, bias, gated=True)
    return _launch(x, weight, bias, weight.shape[0] // 2, gated=True, config=config)


def _launch(x, weight, bias, n, gated, config):
    k = x.shape[-1]
    rows = x.reshape(-1, k)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    m = rows.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out.view(*x.shape[:-1], n)
    cfg = config or choose_config(n, k, x.dtype, _num_sms(x.device), gated)
    k_per_split = triton.cdiv(triton.cdiv(k, cfg.SPLIT_K), cfg.BLOCK_K) * cfg.BLOCK_K
    num_splits = triton.cdiv(k, k_per_split)  # rounding up to BLOCK_K may leave fewer slices
    split = num_splits > 1
    if split:
        width = 2 * n if gated else n
        target = torch.empty(m, num_splits, width, dtype=torch.float32, device=x.device)
        stride_om, stride_os = target.stride(0), target.stride(1)
    else:
        target, stride_om, stride_os = out, out.stride(0), 0
    has_bias = bias is not None
    grid = (triton.cdiv(n, cfg.BLOCK_N), triton.cdiv(m, BLOCK_M), num_splits)
    _skinny_gemm_kernel[grid](
        rows, weight, bias if has_bias else weight, target,
        m, n, k, k_per_split,
        rows.stride(0), weight.stride(0), stride_om, stride_os,
        HAS_BIAS=has_bias, GATED=gated, SPLIT=split,
        BLOCK_M=BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if split:
        block = min(1024, triton.next_power_of_2(n))
        _split_k_reduce_kernel[(m, triton.cdiv(n, block))](
            target, bias if has_bias else weight, out, n, num_splits,
            target.stride(0), target.stride(1), out.stride(0),
            HAS_BIAS=has_bias, GATED=gated, BLOCK=block, num_warps=4,
        )
    return out.view(*x.shape[:-1], n)


def _check(x, weight, bias, gated: bool) -> None:
    """Errors that name the argument, before anything launches."""
    for name, t in (("x", x), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if x.dtype not in DTYPES:
        raise TypeError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if weight.dtype != x.dtype:
        raise TypeError(f"weight dtype {weight.dtype} differs from x dtype {x.dtype}")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must be [..., K] with K >= 1 features, got shape {tuple(x.shape)}")
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight must be [N, K] with K = x.shape[-1] = {x.shape[-1]}, "
                         f"got {tuple(weight.shape)}")
    if weight.stride(1) != 1:
        raise ValueError("weight must be contiguous along K (weight.stride(1) == 1)")
    if gated and weight.shape[0] % 2:
        raise ValueError(f"weight must stack gate and up rows: an even row count, got {weight.shape[0]}")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device}, x on {x.device}")
    if bias is not None:
        if bias.shape != (weight.shape[0],) or bias.dtype != x.dtype or bias.device != x.device:
            raise ValueError(f"bias must be [{weight.shape[0]}] of {x.dtype} on {x.device}, got "
                             f"{tuple(bias.shape)} of {bias.dtype} on {bias.device}")
        if bias.stride(0) != 1:
            raise ValueError("bias must be contiguous")
