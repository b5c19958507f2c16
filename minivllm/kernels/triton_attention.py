"""Triton: paged attention for prefill, chunked prefill and decode, in one kernel.

The batch is packed: `query` holds the new tokens of every sequence back to back, and each
sequence's keys and values live in the paged cache, found through its block table (token `n`
of a sequence is in block `block_table[n // block_size]`, slot `n % block_size`). The kernel is
flash attention over that cache, and this docstring reads in the order of the code.

**The inner loop** (`_attend_kv_tile`). A program holds a tile of queries in registers and
streams the keys of its sequence past it, `BLOCK_N` at a time: gather the K and V rows through
the block table, compute the scores `s = q @ k^T`, and fold them into an *online softmax*. With
`m` the running maximum of each row's scores and `l` the running sum of `exp(s - m)`, a new tile
raises the maximum to `m'`, rescales what came before by `alpha = exp(m - m')`, and adds its own:

    l' = l * alpha + sum(exp(s - m'))        acc' = acc * alpha + exp(s - m') @ v

and at the end `out = acc / l`. Scores never go to memory. The kernel works in base 2 (`exp2`,
with `log2(e)` folded into the softmax scale), which is what the hardware computes.

**A tile of (token, head) rows.** The query heads that share one KV head (the GQA group,
`G = Hq / Hkv`) are stacked into the rows of one tile: row `r` is token `r // G`, head `r % G`.
One program handles one tile against one KV head, so K/V are read once per KV head, not once
per query head, and decode (one token) still fills `G` rows of the tile.

**The grid.** Its first axis enumerates (query tile, KV head) pairs; a program finds its
tile's sequence by a binary search over `cu_seqlens_q` (sequence `b` starts at tile
`cu_seqlens_q[b] // BLOCK_Q + b`). The grid is sized from tensor shapes only, so a launch never
reads a value back from the GPU and a whole step can be captured in a CUDA graph. The KV heads
of one tile are neighbours in the grid, so together they read whole rows of each block, and the
last tiles run first, so the long causal tiles at the end of each prompt start early and the
short ones fill the tail of the grid.

**Causal tiles.** The queries of a sequence are the last tokens of its context. Keys before a
tile's first query are visible to all its rows: those tiles run without a mask; only the last
few are masked, and keys past the tile's last query are never loaded.

**Two ways to gather.** Decode reads the whole cache once per step and is bound by memory: its
loop gathers one table entry per key (`_token_block_ids`) and reaches the bandwidth (1.04 of the
copy bandwidth at B=64 / 4k, H200). Prefill is bound by compute, where every instruction of the
loop counts: its loop reads the table once per *page* (`_page_block_ids`; `BLOCK_N` and the
block size are powers of two, so a tile is whole pages or a slice of one) and computes one base
address per page, the rows of a page following at a constant stride (`_page_offsets`). It also
folds the softmax scale into the exponent: the maximum is taken over raw scores and scaled once
per row, and `exp2(s * scale - m)` is one fused multiply-add per score. Together with 128 x 64
tiles of 4 warps this took causal prefill 4 x 2048 from 0.4037 to 0.3618 ms (1.34x to 1.20x
dense SDPA, H200). The page loop also serves fp8 decode, which is short of instructions rather
than bytes (0.702x the bf16 kernel's time against 0.777x on the token loop, B=64 / 4k, H200); a
block size that is not a power of two keeps the token gather.

**Why not TMA or warp specialization.** Hopper's bulk-copy engine (TMA) copies one box from one
base address, but a K tile spans `BLOCK_N / block_size` pages anywhere in the cache, and Triton
cannot lay several boxes side by side as one MMA operand (gathering rows with TMA is a Blackwell
instruction, as is Triton's automatic warp specialization). The loop is pipelined with
`cp.async` instead: `num_stages - 1` K/V tiles are in flight while one is used.

**Split-KV.** When the grid cannot fill the GPU (decode of a few long sequences), each program
takes one of `num_splits` slices of the context and writes an unnormalised partial result with
its `m` and `l`, and a second, small kernel (`_merge_splits_kernel`) merges the partials with
the same rescaling. Decode of one sequence of 32k then reads at 0.79 of the copy bandwidth; a
grid that fills the GPU already only gets slower (B=64 / 4k: 0.2447 ms unsplit, 0.2519 ms in 2
slices, H200), so `choose_num_splits` splits small grids only.

**An fp8 cache** (fp8.py) holds e4m3 values with one float32 scale per token and KV head. The
loop loads the 8-bit tiles (half the bytes), widens them to fp16 in registers, and applies the
scales to whole columns: key scales to the scores, value scales to the probabilities, which
equals scaling K and V. The dots run in fp16 (e4m3 widens to it exactly, and it keeps more
mantissa than bf16), the query clamped to fp16's range.

**Offsets.** Element offsets are signed 32-bit while a layer's cache holds fewer than 2^31
elements, unsigned 32-bit below 2^32 (they keep the fp8 decode loop, at the register limit, from
spilling: 1.02x the signed offsets' time against 1.07x with 64-bit ones, H100), and a 64-bit
pointer per key row beyond that (`_offset_switches`).

**One compilation per model.** Triton compiles once per *specialization*: the `tl.constexpr`
values, the argument types, launch options, and what it infers from runtime values (an int equal
to 1 or divisible by 16, a pointer 16-byte aligned). What changes from step to step (`num_seqs`,
`num_tokens`, `num_splits`, the block-table row stride) is in `do_not_specialize`, and the
metadata pointers, which an engine may pass as views at any offset of one buffer, are left out
of the alignment key; the cache and q/out strides stay specialized, as divisibility by 16 is what
gives 16-byte loads. What is left per model is four variants, (DECODE_ONLY, SPLIT_KV) in
{0, 1}^2, and the merge kernel; `warm_up` compiles them all. A speculative verification adds
its small query tile (BLOCK_M 16 or 32, see `_block_m`), compiled when its CUDA graphs are
captured.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .fp8 import MIN_SCALE as _MIN_SCALE
from .pdl import pdl_launch, wait_and_release

LOG2E = 1.4426950408889634  # softmax runs on exp2: exp(x) = exp2(x * log2(e))
FP16_MAX = tl.constexpr(65504.0)
MIN_SCALE = tl.constexpr(_MIN_SCALE)
MAX_SPLITS = 64  # the most slices choose_num_splits cuts a context into
SPLITS_TILE = 64  # partials the merge kernel reads at once: MAX_SPLITS, though any count works
# What `paged_attention(config=...)` may set: the launch configuration and three switches.
CONFIG_KEYS = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages", "INT64_OFFSETS", "U32_OFFSETS",
               "DOT_FP16")


@triton.jit
def _find_sequence(cu_seqlens_q_ptr, tile, num_seqs, BLOCK_Q: tl.constexpr):
    """Index of the sequence that owns query tile `tile` (binary search over tile starts)."""
    lo: tl.int32 = 0
    hi: tl.int32 = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first_tile = tl.load(cu_seqlens_q_ptr + mid) // BLOCK_Q + mid
        if first_tile <= tile:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


# ------------------------------------------------------------------------------------------
# The gather: where a tile's keys live
# ------------------------------------------------------------------------------------------
@triton.jit
def _token_block_ids(block_table_ptr, kv_pos, in_range, BLOCK_SIZE: tl.constexpr,
                     MASKED: tl.constexpr):
    """Block id of each key `kv_pos`, token by token: one block-table read per key."""
    if MASKED:
        block_ids = tl.load(block_table_ptr + kv_pos // BLOCK_SIZE, mask=in_range, other=0)
    else:
        block_ids = tl.load(block_table_ptr + kv_pos // BLOCK_SIZE)
    return block_ids


@triton.jit
def _page_block_ids(block_table_ptr, start, kv_end, BLOCK_SIZE: tl.constexpr,
                    PAGES: tl.constexpr, MASKED: tl.constexpr):
    """Block ids of the PAGES pages under keys [start, start + BLOCK_N): one block-table read per
    page. `start` is a multiple of BLOCK_N and both are powers of two, so a tile is PAGES whole
    pages (BLOCK_N >= BLOCK_SIZE) or a slice of one page (PAGES == 1)."""
    pages = start // BLOCK_SIZE + tl.arange(0, PAGES)
    if MASKED:  # a page that starts past the end has no table entry to read
        block_ids = tl.load(block_table_ptr + pages, mask=pages * BLOCK_SIZE < kv_end, other=0)
    else:
        block_ids = tl.load(block_table_ptr + pages)
    return block_ids


@triton.jit
def _page_offsets(block_ids, start, stride_b, stride_t, BLOCK_SIZE: tl.constexpr,
                  BLOCK_N: tl.constexpr, PAGES: tl.constexpr):
    """[PAGES, SLOTS] offsets of the tile's keys in a [num_blocks, block_size, ...] tensor: one
    multiply per page for its base, then a constant stride between the slots of a page."""
    # start % BLOCK_SIZE is 0 unless the tile is a slice of one page (PAGES == 1).
    slots = start % BLOCK_SIZE + tl.arange(0, BLOCK_N // PAGES)
    return block_ids[:, None] * stride_b + slots[None, :] * stride_t


@triton.jit
def _row_pointers(cache_ptr, block_ids, in_block, stride_b):
    """Pointers to the key rows of a cache of 2^31 elements or more, where 32-bit element
    offsets would overflow: one 64-bit multiply-add per row, on byte offsets (block id x block
    stride + offset in the block, both non-negative 32-bit values, zero-extended: sign
    extension would add the products of the high words). The D values of a row then take
    32-bit offsets from this pointer."""
    elem = cache_ptr.dtype.element_ty.primitive_bitwidth // 8
    offset = (block_ids.to(tl.uint32).to(tl.int64) * (stride_b * elem).to(tl.uint32).to(tl.int64)
              + (in_block * elem).to(tl.uint32).to(tl.int64))
    return (cache_ptr.to(tl.pointer_type(tl.int8)) + offset).to(cache_ptr.dtype)


@triton.jit
def _kv_tile_pointers(
    k_cache_ptr, v_cache_ptr, block_table_ptr, kv_head, start, kv_pos, in_range, kv_end, dims,
    stride_cb, stride_ct, stride_ch,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
    PAGE_LOADS: tl.constexpr, PAGES: tl.constexpr, ROW_ALIGN: tl.constexpr,
    INT64_OFFSETS: tl.constexpr, U32_OFFSETS: tl.constexpr,
):
    """[BLOCK_N, DIM_PAD] pointers to the K and V values of keys [start, start + BLOCK_N) of
    `kv_head`, and the block ids they were found through (one per page, or one per key)."""
    if PAGE_LOADS:
        block_ids = _page_block_ids(block_table_ptr, start, kv_end, BLOCK_SIZE, PAGES, MASKED)
        row = tl.reshape(_page_offsets(block_ids, start, stride_cb, stride_ct, BLOCK_SIZE,
                                       BLOCK_N, PAGES), [BLOCK_N])  # pages x slots, in key order
        if ROW_ALIGN > 1:
            # The reshape hides from the compiler that every row starts at a multiple of 16
            # elements; without this hint it loads K and V one element at a time, outside the
            # cp.async pipeline (tests/kernels/test_prefill_paths.py reads the compiled PTX).
            row = tl.multiple_of(row, ROW_ALIGN)
        row = row + kv_head * stride_ch
    else:
        block_ids = _token_block_ids(block_table_ptr, kv_pos, in_range, BLOCK_SIZE, MASKED)
        row = block_ids * stride_cb + (kv_pos % BLOCK_SIZE) * stride_ct + kv_head * stride_ch
    if INT64_OFFSETS or U32_OFFSETS:  # `row` would overflow int32: recompute it wider
        row_blocks = block_ids
        if PAGE_LOADS:  # each row's page, in key order
            row_blocks = tl.reshape(tl.broadcast_to(block_ids[:, None],
                                                    [PAGES, BLOCK_N // PAGES]), [BLOCK_N])
        in_block = (kv_pos % BLOCK_SIZE) * stride_ct + kv_head * stride_ch
        if INT64_OFFSETS:  # a 64-bit pointer per row, then 32-bit offsets along it
            k_ptrs = _row_pointers(k_cache_ptr, row_blocks, in_block, stride_cb)[:, None] + dims[None, :]
            v_ptrs = _row_pointers(v_cache_ptr, row_blocks, in_block, stride_cb)[:, None] + dims[None, :]
        else:
            # Unsigned 32-bit offsets (Triton zero-extends them when it adds them to a pointer):
            # nothing 64-bit stays live, so the fp8 loop, at the register limit, does not spill.
            urow = row_blocks.to(tl.uint32) * stride_cb.to(tl.uint32) + in_block.to(tl.uint32)
            offsets = urow[:, None] + dims[None, :].to(tl.uint32)
            k_ptrs = k_cache_ptr + offsets
            v_ptrs = v_cache_ptr + offsets
    else:
        offsets = row[:, None] + dims[None, :]
        k_ptrs = k_cache_ptr + offsets
        v_ptrs = v_cache_ptr + offsets
    return k_ptrs, v_ptrs, block_ids


@triton.jit
def _kv_tile_scales(
    k_scale_ptr, v_scale_ptr, block_ids, kv_head, start, kv_pos, in_range, kv_end,
    stride_sb, stride_st, stride_sh,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
    PAGE_LOADS: tl.constexpr, PAGES: tl.constexpr,
):
    """The [BLOCK_N] scales of an fp8 tile's keys and values, found through the same block ids
    as the tile (D times fewer elements than the cache: 32-bit offsets always)."""
    if PAGE_LOADS:
        # Loaded [PAGES, SLOTS] (contiguous runs when the scales are head-major, as
        # fp8.empty_scales lays them out), then reshaped as values.
        offsets = _page_offsets(block_ids, start, stride_sb, stride_st, BLOCK_SIZE, BLOCK_N,
                                PAGES) + kv_head * stride_sh
        slot_pos = (start + tl.arange(0, PAGES)[:, None] * (BLOCK_N // PAGES)
                    + tl.arange(0, BLOCK_N // PAGES)[None, :])
        mask = slot_pos < kv_end
    else:
        offsets = block_ids * stride_sb + (kv_pos % BLOCK_SIZE) * stride_st + kv_head * stride_sh
        mask = in_range
    if MASKED:
        k_scale = tl.load(k_scale_ptr + offsets, mask=mask, other=0.0)
        v_scale = tl.load(v_scale_ptr + offsets, mask=mask, other=0.0)
    else:
        k_scale = tl.load(k_scale_ptr + offsets)
        v_scale = tl.load(v_scale_ptr + offsets)
    if PAGE_LOADS:
        k_scale = tl.reshape(k_scale, [BLOCK_N])
        v_scale = tl.reshape(v_scale, [BLOCK_N])
    return k_scale, v_scale


# ------------------------------------------------------------------------------------------
# The inner loop: one tile of keys
# ------------------------------------------------------------------------------------------
@triton.jit
def _attend_kv_tile(
    acc, m_i, l_i, q, qk_scale,
    k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, block_table_ptr, kv_head,
    start, kv_end, q_pos,
    stride_cb, stride_ct, stride_ch, stride_sb, stride_st, stride_sh,
    dims, dim_mask,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    INT64_OFFSETS: tl.constexpr, U32_OFFSETS: tl.constexpr, KV_FP8: tl.constexpr,
    PAGE_LOADS: tl.constexpr, PAGES: tl.constexpr, ROW_ALIGN: tl.constexpr,
    FOLD_SCALE: tl.constexpr,
):
    """One step of the online softmax over keys [start, start + BLOCK_N).

    qk_scale is the softmax scale times log2(e): scores times it are base-2 logits. MASKED
    tiles hide keys past `kv_end` and, if CAUSAL, past each row's query position `q_pos`.
    FOLD_SCALE: the compute-bound form of the softmax (see the module docstring)."""
    kv_pos = start + tl.arange(0, BLOCK_N)
    in_range = kv_pos < kv_end
    # -- load K and V -----------------------------------------------------------------------
    k_ptrs, v_ptrs, block_ids = _kv_tile_pointers(
        k_cache_ptr, v_cache_ptr, block_table_ptr, kv_head, start, kv_pos, in_range, kv_end,
        dims, stride_cb, stride_ct, stride_ch, BLOCK_SIZE, BLOCK_N, MASKED, PAGE_LOADS, PAGES,
        ROW_ALIGN, INT64_OFFSETS, U32_OFFSETS)
    if MASKED:
        kv_mask = in_range[:, None] & dim_mask[None, :]
    else:
        kv_mask = dim_mask[None, :]
    k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
    v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
    if KV_FP8:  # widening e4m3 to the dot's dtype is exact; the scales apply to columns below
        k_scale, v_scale = _kv_tile_scales(
            k_scale_ptr, v_scale_ptr, block_ids, kv_head, start, kv_pos, in_range, kv_end,
            stride_sb, stride_st, stride_sh, BLOCK_SIZE, BLOCK_N, MASKED, PAGE_LOADS, PAGES)
        k = k.to(q.dtype)
        v = v.to(q.dtype)

    # -- scores and the new running maximum ---------------------------------------------------
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    if FOLD_SCALE:
        # Raw scores; the scale goes into the exponent's multiply-add (max commutes with it).
        if KV_FP8:
            s = s * k_scale[None, :]
        if MASKED:
            if CAUSAL:  # key n is visible to row r iff n <= min(q_pos[r], kv_end - 1)
                limit = tl.minimum(q_pos, kv_end - 1)
                s = tl.where(kv_pos[None, :] <= limit[:, None], s, float("-inf"))
            else:
                s = tl.where(in_range[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    else:  # the decode loop of a 16-bit cache: scale first
        s = s * qk_scale
        if MASKED:
            visible = kv_pos[None, :] < kv_end
            if CAUSAL:
                visible = visible & (kv_pos[None, :] <= q_pos[:, None])
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
    if MASKED:
        # A row that has seen no visible key yet keeps m = -inf; subtract 0 instead of -inf,
        # so that its probabilities are exp2(-inf) = 0 rather than NaN.
        m_new = tl.where(m_new == float("-inf"), 0.0, m_new)

    # -- probabilities, and the accumulator rescaled -------------------------------------------
    if FOLD_SCALE:
        p = tl.math.exp2(s * qk_scale - m_new[:, None])  # one FMA + exp2 per score
    else:
        p = tl.math.exp2(s - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    if KV_FP8:
        # p @ (v * v_scale) as (p * v_scale / v_max) @ v * v_max: the weights stay in [0, 1],
        # where fp16 keeps its precision (p * v_scale alone would sink into fp16's subnormals
        # for a layer of small values). After l_i: the sum of probabilities is unscaled.
        v_max = tl.maximum(tl.max(v_scale, 0), MIN_SCALE)
        p = p * (v_scale * (1.0 / v_max))[None, :]  # one division a tile, not one a key
        pv = tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        acc = acc * alpha[:, None] + pv * v_max
    elif FOLD_SCALE:  # accumulate in place: the MMA adds into the rescaled accumulator
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


# ------------------------------------------------------------------------------------------
# The program: one query tile against one KV head (or one slice of its keys)
# ------------------------------------------------------------------------------------------
@triton.jit(
    do_not_specialize=["num_seqs", "num_tokens", "num_splits", "stride_bt"],
    do_not_specialize_on_alignment=["block_tables_ptr", "seq_lens_ptr", "cu_seqlens_q_ptr"],
)
def _paged_attention_kernel(
    query_ptr, k_cache_ptr, v_cache_ptr, out_ptr,
    block_tables_ptr, seq_lens_ptr, cu_seqlens_q_ptr,
    partial_acc_ptr, partial_m_ptr, partial_l_ptr, k_scale_ptr, v_scale_ptr,
    qk_scale, num_seqs, num_tokens, num_splits,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_cb, stride_ct, stride_ch, stride_bt, stride_sb, stride_st, stride_sh,
    NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr, SPLIT_KV: tl.constexpr,
    DECODE_ONLY: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    KV_FP8: tl.constexpr, DOT_FP16: tl.constexpr,
    PAGE_LOADS: tl.constexpr, PAGES: tl.constexpr, ROW_ALIGN: tl.constexpr,
    INT64_OFFSETS: tl.constexpr, U32_OFFSETS: tl.constexpr, FOLD_SCALE: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pid = tl.program_id(0)
    kv_head = pid % NUM_KV_HEADS  # the KV heads of a tile side by side
    tile = tl.num_programs(0) // NUM_KV_HEADS - 1 - pid // NUM_KV_HEADS  # the last tile first
    split = tl.program_id(1)

    # ---- which sequence, which of its queries -------------------------------------------
    if DECODE_ONLY:  # one query per sequence: tile i is sequence i
        seq = tile
        first_query = 0
    else:
        seq = _find_sequence(cu_seqlens_q_ptr, tile, num_seqs, BLOCK_Q)
        first_query = (tile - (tl.load(cu_seqlens_q_ptr + seq) // BLOCK_Q + seq)) * BLOCK_Q
    q_start = tl.load(cu_seqlens_q_ptr + seq)
    q_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + seq)
    # Up to here only the step's metadata was read; from here on the queries and the cache,
    # which the previous kernels wrote (programmatic dependent launch, pdl.py).
    wait_and_release(USE_PDL)
    if first_query >= q_len:  # a spare tile of the shape-sized grid
        return
    context_before = seq_len - q_len  # tokens cached before this step's queries

    rows = tl.arange(0, BLOCK_M)
    q_idx = first_query + rows // GROUP  # query index within the sequence
    q_head = kv_head * GROUP + rows % GROUP
    row_valid = (rows < BLOCK_Q * GROUP) & (q_idx < q_len)
    q_pos = context_before + q_idx  # absolute position of each row's query token
    dims = tl.arange(0, DIM_PAD)
    dim_mask = dims < HEAD_DIM

    token = (q_start + q_idx).to(tl.int64)
    q_offsets = token[:, None] * stride_qt + q_head[:, None] * stride_qh + dims[None, :]
    q = tl.load(query_ptr + q_offsets, mask=row_valid[:, None] & dim_mask[None, :], other=0.0)
    if DOT_FP16:  # fp8 cache, 16-bit query: the dots run in fp16, within its range
        q = tl.minimum(tl.maximum(q.to(tl.float32), -FP16_MAX), FP16_MAX).to(tl.float16)

    # ---- the key range of this program --------------------------------------------------
    last_q = tl.minimum(first_query + BLOCK_Q, q_len) - 1
    if CAUSAL:
        kv_end = context_before + last_q + 1  # keys past the tile's last query: never loaded
        unmasked_end = context_before + first_query + 1  # keys every row of the tile can see
    else:
        kv_end = seq_len
        unmasked_end = seq_len
    if SPLIT_KV:
        per_split = tl.cdiv(tl.cdiv(kv_end, num_splits), BLOCK_N) * BLOCK_N
        kv_lo = split * per_split
        kv_hi = tl.minimum(kv_lo + per_split, kv_end)
    else:
        kv_lo = 0
        kv_hi = kv_end
    # Whole tiles below `full_end` are seen by every row: no mask; the rest are masked.
    full_end = kv_lo + tl.maximum(tl.minimum(kv_hi, unmasked_end) - kv_lo, 0) // BLOCK_N * BLOCK_N

    # ---- the loop over key tiles --------------------------------------------------------
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, DIM_PAD], dtype=tl.float32)
    block_table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for masked in tl.static_range(2):  # unrolled: two loops, each compiled with its own MASKED
        lo = full_end if masked else kv_lo
        hi = kv_hi if masked else full_end
        for start in range(lo, hi, BLOCK_N):
            acc, m_i, l_i = _attend_kv_tile(
                acc, m_i, l_i, q, qk_scale, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr,
                block_table, kv_head, start, kv_hi, q_pos, stride_cb, stride_ct, stride_ch,
                stride_sb, stride_st, stride_sh, dims, dim_mask, BLOCK_SIZE, BLOCK_N, masked == 1,
                CAUSAL, DOT_PRECISION, INT64_OFFSETS, U32_OFFSETS, KV_FP8, PAGE_LOADS, PAGES,
                ROW_ALIGN, FOLD_SCALE,
            )

    # ---- write back ---------------------------------------------------------------------
    out_mask = row_valid[:, None] & dim_mask[None, :]
    if not SPLIT_KV:
        out = acc / l_i[:, None]
        out_offsets = token[:, None] * stride_ot + q_head[:, None] * stride_oh + dims[None, :]
        tl.store(out_ptr + out_offsets, out.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        # Partials are laid out [split, token, q_head, (dim)] in float32, contiguous.
        stat = (split * num_tokens + token) * NUM_Q_HEADS + q_head
        tl.store(partial_m_ptr + stat, m_i, mask=row_valid)
        tl.store(partial_l_ptr + stat, l_i, mask=row_valid)
        tl.store(partial_acc_ptr + stat[:, None] * DIM_PAD + dims[None, :], acc, mask=out_mask)


@triton.jit(do_not_specialize=["num_tokens", "num_splits"])
def _merge_splits_kernel(
    out_ptr, partial_acc_ptr, partial_m_ptr, partial_l_ptr,
    num_tokens, num_splits, stride_ot, stride_oh,
    NUM_Q_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr,
    SPLITS_TILE: tl.constexpr, USE_PDL: tl.constexpr,
):
    """out = sum_s w_s * acc_s / sum_s w_s * l_s with w_s = 2^(m_s - max_s m_s).

    The partials are read SPLITS_TILE splits at a time with the same online rescaling as the
    attention loop, so one compiled kernel serves every split count (one pass of the loop for
    the heuristic's counts).
    """
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    dims = tl.arange(0, DIM_PAD)
    wait_and_release(USE_PDL)
    m_run = tl.full([], float("-inf"), dtype=tl.float32)
    numerator = tl.zeros([DIM_PAD], dtype=tl.float32)
    denominator = tl.full([], 0.0, dtype=tl.float32)
    for first in range(0, num_splits, SPLITS_TILE):
        splits = first + tl.arange(0, SPLITS_TILE)
        split_mask = splits < num_splits
        stat = (splits * num_tokens + token) * NUM_Q_HEADS + head
        m = tl.load(partial_m_ptr + stat, mask=split_mask, other=float("-inf"))
        l = tl.load(partial_l_ptr + stat, mask=split_mask, other=0.0)
        acc = tl.load(partial_acc_ptr + stat[:, None] * DIM_PAD + dims[None, :],
                      mask=split_mask[:, None], other=0.0)
        m_new = tl.maximum(m_run, tl.max(m, 0))
        # A split that saw no key has m = -inf (and l = 0): weight 0, never exp2(-inf - -inf).
        alpha = tl.where(m_run == float("-inf"), 0.0, tl.math.exp2(m_run - m_new))
        weight = tl.where(m == float("-inf"), 0.0, tl.math.exp2(m - m_new))
        numerator = numerator * alpha + tl.sum(acc * weight[:, None], 0)
        denominator = denominator * alpha + tl.sum(l * weight, 0)
        m_run = m_new
    tl.store(out_ptr + token * stride_ot + head * stride_oh + dims,
             (numerator / denominator).to(out_ptr.dtype.element_ty), mask=dims < HEAD_DIM)


# ------------------------------------------------------------------------------------------
# Launch configuration
# ------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter on CPU: any small number exercises the same code paths
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


def choose_num_splits(num_programs: int, num_sms: int, max_seq_len: int | None,
                      min_slice: int, max_splits: int = MAX_SPLITS) -> int:
    """How many slices to cut each context into, from the grid size alone.

    A program streams its whole context through one SM. When `num_programs` (query tiles x KV
    heads) cannot fill the GPU, the other SMs idle: splitting the context into `s` slices gives
    `s` times more programs at the cost of a small merge pass. We aim for about two programs per
    SM and never cut a context into slices shorter than `min_slice` keys.
    """
    target = 2 * num_sms
    if num_programs >= target:
        return 1
    splits = min(triton.cdiv(target, num_programs), max_splits)
    if max_seq_len is not None:
        splits = min(splits, max(1, max_seq_len // min_slice))
    return max(1, splits)


def _min_slice(few_queries: bool, block_n: int) -> int:
    """The shortest slice of a context worth a program of its own: one K/V tile (`block_n`, the
    split launch's) when a query tile holds all of a sequence's queries (a decode, a
    verification), whose partials are few; otherwise 256 keys, where every query row of a
    prefill chunk adds partials to merge.

    Batch 1 over 1,024 keys (qwen3-0.6b heads, H100, results/attn_splits_decode_b1_1k_h100.json
    and attn_verify_q5_b1_1k_h100.json): decode in 8 slices of one 128-key tile took 0.75x the
    time of 4 slices of two; a verification of 5 queries in a 16-row tile, 0.53x in 8 slices and
    0.45x in 16 slices of one 64-key tile, against the 128-row tile in 4 slices.
    """
    return block_n if few_queries else 256


def _few_queries(decode_only: bool, max_query_len: int | None, group: int) -> bool:
    """Whether one small query tile (at most 32 rows) holds every query of a sequence: each
    sequence's queries times its GQA group, a decode's one or a verification's 1 + k."""
    return decode_only or (max_query_len is not None and max_query_len * group <= 32)


def _block_m(decode_only: bool, group: int, head_dim: int, max_query_len: int | None = None) -> int:
    """Rows of a query tile: 16 in decode (the smallest M tl.dot accepts; they hold the GQA
    group), as few as hold all of a sequence's queries when that is at most 32 rows (a
    verification of 1 + k tokens: 5 queries of a group of 2 in 16 rows took 0.74x the time of
    a 128-row tile, H100, results/attn_verify_q5_b1_1k_h100.json), else 128 in prefill (64 for
    head_dim > 128 to stay in registers)."""
    if decode_only:
        return max(16, triton.next_power_of_2(group))
    if _few_queries(decode_only, max_query_len, group):
        return max(16, triton.next_power_of_2(max_query_len * group))
    return max(128 if head_dim <= 128 else 64, triton.next_power_of_2(group))


def _launch_config(decode_only: bool, block_m: int, head_dim: int, dtype: torch.dtype,
                   device: torch.device, split_kv: bool,
                   kv_dtype: torch.dtype | None = None) -> dict:
    """Tile sizes, warps and pipeline depth, from the tile sweeps in benchmarks/RESULTS.md.

    Decode is memory-bound: the smallest M tile (16 rows hold the GQA group), K/V tiles of
    64 tokens and few warps, so many programs share an SM and keep loads in flight; with split-KV
    (few, long programs) wider 128-token tiles and 4 warps stream faster.

    Prefill is compute-bound, and each choice buys MMA time per byte or per instruction:
    * BLOCK_M = 128 rows: two warpgroups of 64-row Hopper MMAs, and 128 rows fed by every K/V
      tile (at D = 128, 128 FLOPs per byte of K/V brought from L2; 64 rows would halve that).
    * BLOCK_N = 64 keys, 4 warps, 3 stages: a program then needs 96 KB of shared memory, so two
      fit on one SM, and while one program runs its softmax (CUDA cores) the other's MMAs keep
      the tensor cores busy. The alternative, 128 keys and 8 warps (160 KB, one program per
      SM), amortises the per-step bookkeeping over more keys but leaves the tensor cores idle
      during each softmax. On the H200, causal prefill 4 x 2048 took 0.362 ms with 128x64/4
      warps against 0.387 ms with 128x128/8.
    * fp8 K/V keep 128-key tiles with 8 warps and two stages: the widened tiles are staged
      again for the MMA (the fp8 sweep, H100; the sweep above did not cover fp8).
    """
    if decode_only:
        cfg = (dict(BLOCK_M=block_m, BLOCK_N=128, num_warps=4, num_stages=2) if split_kv
               else dict(BLOCK_M=block_m, BLOCK_N=64, num_warps=2, num_stages=3))
    else:
        if kv_dtype == torch.float8_e4m3fn:
            cfg = dict(BLOCK_M=block_m, BLOCK_N=128, num_warps=8, num_stages=2)
        else:
            cfg = dict(BLOCK_M=block_m, BLOCK_N=64, num_warps=4, num_stages=3)
    if device.type != "cuda":
        return dict(cfg, num_warps=1, num_stages=1)
    # Keep the pipelined K/V tiles plus the Q tile inside shared memory (227 KB a block on
    # Hopper): fp32 or head_dim 256 get narrower K/V tiles.
    elem, kv_elem = dtype.itemsize, (kv_dtype or dtype).itemsize
    dim_pad = triton.next_power_of_2(head_dim)
    while (cfg["BLOCK_N"] > 16 and cfg["num_stages"] * 2 * cfg["BLOCK_N"] * dim_pad * kv_elem
           + cfg["BLOCK_M"] * dim_pad * elem > 227 * 1024):
        cfg["BLOCK_N"] //= 2
    return cfg


def _short_of_instructions(decode_only: bool, kv_fp8: bool) -> bool:
    """Whether the loop is bound by its instructions rather than by memory: every loop (prefill,
    chunked prefill, mixed batches, decode on an fp8 cache) but the decode loop of a 16-bit
    cache, which is at the bandwidth limit. Such a loop takes the folded softmax (FOLD_SCALE, see
    _attend_kv_tile) and gathers K/V page by page (`_page_loads`)."""
    return kv_fp8 or not decode_only


def _page_loads(decode_only: bool, kv_fp8: bool, block_size: int) -> bool:
    """Whether the loop gathers K/V page by page (PAGE_LOADS) rather than key by key: a loop
    short of instructions does (the decode loop of a 16-bit cache reads the table once per key
    at the bandwidth limit). Pages need a power-of-two block size: a tile is then whole pages,
    or a slice of one."""
    return _short_of_instructions(decode_only, kv_fp8) and block_size & (block_size - 1) == 0


def offset_kind(numel: int) -> str:
    """The offset arithmetic a cache of `numel` elements needs: "int32" below 2^31 elements,
    "uint32" below 2^32, "int64" from there."""
    return "int32" if numel < 2**31 else "uint32" if numel < 2**32 else "int64"


def _offset_switches(cfg: dict, numel: int) -> tuple[bool, bool]:
    """(INT64_OFFSETS, U32_OFFSETS) for a cache of `numel` elements, popped from `cfg` where a
    caller set them.

    32-bit offset arithmetic is the cheapest in the gather. A layer's cache of 2^31 elements or
    more (an fp8 pool on a large GPU: 138,909 blocks on an H200 are 2.28e9) no longer fits signed
    32-bit offsets. Below 2^32 unsigned ones still do, and they keep the fp8 decode loop from
    spilling the registers that 64-bit row pointers need: on an H100 fp8 decode at B=64 / 4096
    took 1.02x the signed 32-bit time with them and 1.07x with 64-bit offsets
    (benchmarks/results/u32_offsets_decode_h100.json). Only beyond 2^32 elements are 64-bit
    offsets used.
    """
    kind = offset_kind(numel)
    u32_offsets = bool(cfg.pop("U32_OFFSETS", kind == "uint32"))
    if u32_offsets and kind == "int64":
        raise ValueError(f"config: U32_OFFSETS addresses at most 2^32 elements, the cache has "
                         f"{numel}")
    int64_offsets = bool(cfg.pop("INT64_OFFSETS", kind == "int64"))
    return int64_offsets, u32_offsets and not int64_offsets


def paged_attention(query, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, scale, causal,
                    out, max_seq_len=None, num_splits=None, config=None, k_scale=None, v_scale=None,
                    max_query_len=None):
    """Same contract as `minivllm.kernels.paged_attention` (inputs already validated).

    `config` overrides the launch configuration (BLOCK_M, BLOCK_N, num_warps, num_stages) and
    the switches INT64_OFFSETS, U32_OFFSETS and DOT_FP16; the benchmarks sweep tiles with it.
    """
    num_tokens, num_q_heads, head_dim = query.shape
    num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    group = num_q_heads // num_kv_heads
    num_seqs = seq_lens.shape[0]
    if k_cache.stride() != v_cache.stride():
        raise ValueError("k_cache and v_cache must have the same strides")
    # Decode-only is known from shapes: T == B and every sequence has at least one query.
    decode_only = num_tokens == num_seqs
    # Query tiles: one token per tile in decode, else as many tokens as fit BLOCK_M // group rows.
    config = dict(config or {})
    unknown = sorted(set(config) - set(CONFIG_KEYS))
    if unknown:
        raise ValueError(f"config: unknown keys {unknown}; known: {CONFIG_KEYS}")
    block_m = config.pop("BLOCK_M", None) or _block_m(decode_only, group, head_dim, max_query_len)
    block_q = 1 if decode_only else max(1, block_m // group)
    num_tiles = num_seqs if decode_only else num_tokens // block_q + num_seqs
    if num_splits is None:
        split_tile = _launch_config(decode_only, block_m, head_dim, query.dtype, query.device,
                                    split_kv=True, kv_dtype=k_cache.dtype)["BLOCK_N"]
        min_slice = _min_slice(_few_queries(decode_only, max_query_len, group), split_tile)
        num_splits = choose_num_splits(num_tiles * num_kv_heads, _sm_count(query.device),
                                       max_seq_len, min_slice)
    cfg = _launch_config(decode_only, block_m, head_dim, query.dtype, query.device,
                         split_kv=num_splits > 1, kv_dtype=k_cache.dtype)
    cfg.update(config)
    del cfg["BLOCK_M"]
    kv_fp8 = k_cache.dtype == torch.float8_e4m3fn
    page_loads = _page_loads(decode_only, kv_fp8, block_size)
    pages = max(1, cfg["BLOCK_N"] // block_size) if page_loads else 1
    # What Triton's own key already knows of the cache strides (divisible by 16 or not), passed
    # on as a hint the page gather needs (see _kv_tile_pointers); 1 (unused) on the token path.
    row_align = 16 if page_loads and all(st % 16 == 0 for st in k_cache.stride()[:2]) else 1
    dim_pad = triton.next_power_of_2(head_dim)
    if num_splits > 1:
        partial_acc = torch.empty(num_splits, num_tokens, num_q_heads, dim_pad,
                                  dtype=torch.float32, device=query.device)
        partial_m = torch.empty(num_splits, num_tokens, num_q_heads, dtype=torch.float32,
                                device=query.device)
        partial_l = torch.empty_like(partial_m)
    else:
        partial_acc = partial_m = partial_l = out  # unused by the kernel
    dot_precision = "ieee" if query.dtype == torch.float32 else "tf32"
    int64_offsets, u32_offsets = _offset_switches(cfg, k_cache.numel())
    # fp8 cache with a bf16/fp16 query: the dots run in fp16, faster and 3x closer to the
    # reference than in bf16 (decode B=64 / 4k: 0.585x the bf16 kernel's time against 0.680x,
    # H100 sweep in docs/fp8_kv_cache.md).
    dot_fp16 = cfg.pop("DOT_FP16", kv_fp8 and query.dtype != torch.float32)
    grid = (num_tiles * num_kv_heads, num_splits)
    pdl = pdl_launch(query.device)
    _paged_attention_kernel[grid](
        query, k_cache, v_cache, out,
        block_tables, seq_lens, cu_seqlens_q,
        partial_acc, partial_m, partial_l,
        k_scale if kv_fp8 else out, v_scale if kv_fp8 else out,  # unused unless fp8
        scale * LOG2E, num_seqs, num_tokens, num_splits,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        *(k_scale.stride() if kv_fp8 else (0, 0, 0)),
        NUM_Q_HEADS=num_q_heads, NUM_KV_HEADS=num_kv_heads, GROUP=group, HEAD_DIM=head_dim,
        DIM_PAD=dim_pad, BLOCK_SIZE=block_size, BLOCK_M=block_m, BLOCK_Q=block_q,
        SPLIT_KV=num_splits > 1, DECODE_ONLY=decode_only, CAUSAL=causal,
        DOT_PRECISION=dot_precision, KV_FP8=kv_fp8, DOT_FP16=dot_fp16, PAGE_LOADS=page_loads,
        PAGES=pages, ROW_ALIGN=row_align, INT64_OFFSETS=int64_offsets, U32_OFFSETS=u32_offsets,
        FOLD_SCALE=_short_of_instructions(decode_only, kv_fp8), **pdl, **cfg,
    )
    if num_splits > 1:
        _merge_splits_kernel[(num_tokens, num_q_heads)](
            out, partial_acc, partial_m, partial_l, num_tokens, num_splits,
            out.stride(0), out.stride(1),
            NUM_Q_HEADS=num_q_heads, HEAD_DIM=head_dim, DIM_PAD=dim_pad,
            SPLITS_TILE=SPLITS_TILE, num_warps=4 if query.device.type == "cuda" else 1, **pdl,
        )
    return out
