"""Triton: paged attention for prefill, chunked prefill and decode, in one kernel family.

The batch is packed: `query` holds the new tokens of every sequence back to back, and each
sequence's K/V lives in the paged cache, found through its block table. The ideas, in the order
a reader meets them in the code:

* **Query tiles of (token, head) rows.** All the query heads that share one KV head (GQA group
  `G = Hq / Hkv`) are stacked into the rows of one tile, next to the tokens: row `r` is token
  `r // G`, head `r % G`. One program handles one tile against one KV head, so K/V are read once
  per KV head, not once per query head. Decode (1 token) gives a tile of just `G` useful rows.
* **Flattened tiles.** The first grid axis enumerates (query tile, KV head) pairs, heads fastest
  and the last tile first; a program finds its tile's sequence by a binary search over
  `cu_seqlens_q` (sequence `b` starts at tile `cu_seqlens_q[b] // BLOCK_Q + b`). The grid is
  sized from tensor *shapes* only, so launching never reads a value back from the GPU and the
  whole call can be captured in a CUDA graph.
* **Tiles over the paged cache.** Each step of the inner loop gathers `BLOCK_N` consecutive
  tokens' K and V through the block table (token `n` is in block `block_table[n // block_size]`,
  slot `n % block_size`) and updates an *online softmax* (running max `m`, running sum `l`,
  rescaled accumulator), so scores never go to memory.
* **Two gathers: by token, or by page.** Decode reads the table once per key (`_token_block_ids`)
  and is at the memory-bandwidth limit that way. Prefill is compute-bound, so every instruction
  of the loop counts: the page path (`PAGE_LOADS`) reads the table once per *page*
  (`_page_block_ids`: `BLOCK_N / block_size` entries a tile, both powers of two, so a tile is
  whole pages or a slice of one) and computes one base address per page, the rows of a page
  following at a constant stride (`_page_offsets`). It is not about coalescing: in this cache
  layout one key's D values of one head are already 2*D contiguous bytes, loaded as 16-byte
  vectors either way, and a page of one head is `block_size` such rows `Hkv * D` apart. What it
  saves is the per-key table reads (they went through shared memory in the pipeline) and index
  arithmetic. A reshape turns the [pages, slots] offsets into the tile's key order, and Triton
  3.6 loses through it the fact that rows start at multiples of 16 elements: without the
  `tl.multiple_of` hint (`ROW_ALIGN`, from the strides) it loads K and V one element at a time,
  synchronously, outside the `cp.async` pipeline (tests/kernels/test_prefill_paths.py reads the
  compiled PTX for this).
* **Softmax in fewer instructions.** The page path also folds the softmax scale into the exponent
  (`FOLD_SCALE`): the running max is taken over raw scores and scaled once per row (max commutes
  with a positive scale), and `exp2(s * scale - m)` is one fused multiply-add per score instead
  of a multiply and a subtract; the masked tiles compare each key with one limit per row,
  `min(query position, end - 1)`, instead of two comparisons; P @ V accumulates in place. With
  the page loads this is about a sixth fewer instructions in the compiled loop (Triton 3.6,
  sm_90a, 128 x 128 tiles); whether that is time saved is what `benchmarks/tune_attn.py`
  measures, both paths side by side (`MINIVLLM_PREFILL_PATH` or `config` picks one).
* **Why not TMA or warp specialization here.** Hopper's bulk-copy engine (TMA, Triton's tensor
  descriptors) copies one box from one base address: a K tile spans `BLOCK_N / block_size`
  pages anywhere in the cache, so it would take one copy per page (4 KB at block size 16), and
  Triton offers no way to lay several boxes side by side as one MMA operand; gathering rows
  with TMA is a Blackwell instruction. Triton's automatic warp specialization (`tl.range(...,
  warp_specialize=True)`) is Blackwell-only too. On Hopper the loop is pipelined with `cp.async`
  instead: `num_stages - 1` K/V tiles are in flight while one is used.
* **Causal skipping.** Queries sit at the end of their context. Keys before the tile's first query
  are visible to every row: those tiles run without a mask; only the last few tiles are masked,
  and keys past the tile's last query are never loaded.
* **Split-KV.** When the grid is too small to fill the GPU (decode of a few long sequences), each
  program takes one of `num_splits` slices of the context and writes an unnormalised partial
  result; the partials are then merged with their softmax statistics. In decode the merge
  happens in the same kernel: each program counts itself in on an atomic counter per (query
  tile, KV head), and the one that arrives last reads the others' partials and writes the
  output (`_merge_if_last`), one kernel per layer less than a separate merge
  (`MINIVLLM_FUSED_MERGE=0` keeps that, to measure it). Other batches use the merge kernel.
* **One compilation per model, not per step.** Triton compiles a kernel once per
  *specialization*: argument types, `tl.constexpr` values, launch options, and what it infers
  from runtime values: an int argument equal to 1 or divisible by 16, a pointer that is 16-byte
  aligned. The values that change from step to step (`num_seqs`, `num_tokens`, `num_splits`, the
  block-table row stride) are listed in `do_not_specialize`, so a new batch shape never compiles
  a kernel again; strides of the cache and of q/out stay specialized, because divisibility by 16
  is what lets the compiler issue 16-byte loads. Pointer alignment is part of the key too: the
  metadata pointers (`block_tables`, `seq_lens`, `cu_seqlens_q`), which an engine may pass as
  views at varying offsets of one buffer, are only read element by element, so they are left out
  of it (`do_not_specialize_on_alignment`), and so are the merge counters, for which a launch
  without them passes `seq_lens`; q, the caches and out are fresh allocations or fixed views.
  What remains per model (head dim, GQA group, block size, dtypes, cache size, and the prefill
  path) is a short list: the attention kernel has four variants, (DECODE_ONLY, SPLIT_KV) in
  {0, 1}^2, each with its own tile shape, and the merge kernel one. `warm_up` compiles all of
  them.
"""

from __future__ import annotations

import functools
import os

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
# How an fp8 cache's tiles widen to fp16 for the dots (see _widen_e4m3_to_fp16): "cast",
# `x.to(fp16)`, which Triton moves past the transpose of V, or "asm", by inline assembly in the
# layout they were loaded in (compiled kernels only: the interpreter runs no assembly). "asm"
# compiles to a third fewer instructions per tile, yet measured slower on an H200 (decode
# B=64/4k: 0.961x bf16's time against 0.777x for "cast", benchmarks/RESULTS.md): fewer
# instructions are not less time when the loop waits on memory. Read once at import.
FP8_WIDENS = ("asm", "cast")
FP8_WIDEN = os.environ.get("MINIVLLM_FP8_WIDEN", "cast")
if FP8_WIDEN not in FP8_WIDENS:
    raise ValueError(f"MINIVLLM_FP8_WIDEN must be one of {FP8_WIDENS}, got {FP8_WIDEN!r}")
WIDEN_IN_ASM = tl.constexpr(FP8_WIDEN == "asm")
# Which inner loop prefill, chunked prefill and mixed batches run (decode-only batches on a
# 16-bit cache always run the token path, which is at the bandwidth limit; on fp8, the page
# path: see _prefill_path): "tokens", the original gather, or "pages", page-granular
# block-table reads with the softmax scale folded into exp2 (see the module docstring). Read once at import, so one benchmark run can time both in two processes without
# editing code; `config={"PAGE_LOADS": ..., "FOLD_SCALE": ...}` picks either per call. The
# default is "pages": on the H200 it was faster on all three prefill cases of the tuning sweep
# (benchmarks/RESULTS.md, "Kernels, round 2").
PREFILL_PATHS = ("tokens", "pages")
PREFILL_PATH = os.environ.get("MINIVLLM_PREFILL_PATH", "pages")
if PREFILL_PATH not in PREFILL_PATHS:
    raise ValueError(f"MINIVLLM_PREFILL_PATH must be one of {PREFILL_PATHS}, got {PREFILL_PATH!r}")


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
    """Pointers to the key rows of a cache of 2^31 elements or more (INT64_OFFSETS), where
    32-bit element offsets would overflow. The 64-bit math is one multiply-add per row, on
    byte offsets: block id x block stride + offset in the block, both non-negative 32-bit
    values, zero-extended (sign extension would add the products of the high words); the D
    values of a row then take 32-bit offsets from this pointer, as on the 32-bit path."""
    elem = cache_ptr.dtype.element_ty.primitive_bitwidth // 8
    offset = (block_ids.to(tl.uint32).to(tl.int64) * (stride_b * elem).to(tl.uint32).to(tl.int64)
              + (in_block * elem).to(tl.uint32).to(tl.int64))
    return (cache_ptr.to(tl.pointer_type(tl.int8)) + offset).to(cache_ptr.dtype)


@triton.jit
def _widen_e4m3_to_fp16(x):
    """e4m3 -> fp16, four values per instance (two `cvt.f16x2.e4m3x2`), in the layout `x` was
    loaded in (FP8_WIDEN "asm"; compiled kernels only: the interpreter runs no assembly).

    What it changes is where the widening happens, not how. The value operand of P @ V is
    reduced over keys, but a cache row holds one key's D values side by side: feeding it to the
    tensor cores means transposing the tile. Written `v.to(fp16)`, Triton moves the conversion
    past the transpose (it hoists pure elementwise ops towards the load), so it transposes the
    *bytes*, one shared-memory load per value (`LDS.U8`), plus a multiply-add to pair them, and
    the fp8 operand layout makes the other operand's registers move too. Marked impure, the
    conversion stays put, and the transpose moves 16-bit values with `ldmatrix.trans`, as for a
    bf16 cache. Compiled decode loop, sm_90, Triton 3.6: 1,041 instructions a tile -> 690
    (benchmarks/sass_count.py). Yet it measured slower on an H200 (see FP8_WIDEN): the
    widened tile makes an extra round trip through shared memory, and fewer of the loads are
    asynchronous copies, so the loop waits longer on memory than it saves in issue."""
    return tl.inline_asm_elementwise(
        "{ .reg .b16 lo, hi; mov.b32 {lo, hi}, $2; cvt.rn.f16x2.e4m3x2 $0, lo; "
        "cvt.rn.f16x2.e4m3x2 $1, hi; }", "=r,=r,r", [x.to(tl.int8, bitcast=True)],
        dtype=tl.float16, is_pure=False, pack=4)


@triton.jit
def _attend_kv_tile(
    acc, m_i, l_i, q, qk_scale,
    k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, block_table_ptr, kv_head,
    start, kv_end, q_pos,
    stride_cb, stride_ct, stride_ch, stride_sb, stride_st, stride_sh,
    dims, dim_mask,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    INT64_OFFSETS: tl.constexpr, KV_FP8: tl.constexpr,
    PAGE_LOADS: tl.constexpr, PAGES: tl.constexpr, ROW_ALIGN: tl.constexpr,
    FOLD_SCALE: tl.constexpr, U32_OFFSETS: tl.constexpr,
):
    """One step of the online softmax over keys [start, start + BLOCK_N)."""
    kv_pos = start + tl.arange(0, BLOCK_N)
    in_range = kv_pos < kv_end
    # The gather: each key row sits at (block id, offset in block, kv head).
    if PAGE_LOADS:
        block_ids = _page_block_ids(block_table_ptr, start, kv_end, BLOCK_SIZE, PAGES, MASKED)
        row = tl.reshape(_page_offsets(block_ids, start, stride_cb, stride_ct, BLOCK_SIZE,
                                       BLOCK_N, PAGES), [BLOCK_N])  # pages x slots, in key order
        if ROW_ALIGN > 1:
            # Say what the reshape hides from the compiler (Triton 3.6 forgets it): every row
            # starts at a multiple of 16 elements, so each row's D values load as 16-byte
            # vectors, asynchronously (cp.async) into the software pipeline's buffers.
            row = tl.multiple_of(row, ROW_ALIGN)
        row = row + kv_head * stride_ch
    else:
        block_ids = _token_block_ids(block_table_ptr, kv_pos, in_range, BLOCK_SIZE, MASKED)
        row = block_ids * stride_cb + (kv_pos % BLOCK_SIZE) * stride_ct + kv_head * stride_ch
    if INT64_OFFSETS:  # `row` would overflow: a 64-bit pointer per row, then 32-bit offsets
        row_blocks = block_ids
        if PAGE_LOADS:  # each row's page, in key order
            row_blocks = tl.reshape(tl.broadcast_to(block_ids[:, None],
                                                    [PAGES, BLOCK_N // PAGES]), [BLOCK_N])
        in_block = (kv_pos % BLOCK_SIZE) * stride_ct + kv_head * stride_ch
        k_rows = _row_pointers(k_cache_ptr, row_blocks, in_block, stride_cb)
        v_rows = _row_pointers(v_cache_ptr, row_blocks, in_block, stride_cb)
        k_ptrs = k_rows[:, None] + dims[None, :]
        v_ptrs = v_rows[:, None] + dims[None, :]
    elif U32_OFFSETS:
        # A cache of 2^31 to 2^32 elements (opt-in, see paged_attention): the same offsets as
        # below, in unsigned 32-bit arithmetic (Triton zero-extends an unsigned offset when it
        # adds it to a pointer). Nothing 64-bit stays live, so the fp8 loop, at the register
        # limit, does not spill as it does with 64-bit row pointers (offline sm_90 compile,
        # Triton 3.6: no local-memory traffic in the loop, against 11 spill ops).
        row_blocks = block_ids
        if PAGE_LOADS:  # each row's page, in key order
            row_blocks = tl.reshape(tl.broadcast_to(block_ids[:, None],
                                                    [PAGES, BLOCK_N // PAGES]), [BLOCK_N])
        in_block = (kv_pos % BLOCK_SIZE) * stride_ct + kv_head * stride_ch
        urow = row_blocks.to(tl.uint32) * stride_cb.to(tl.uint32) + in_block.to(tl.uint32)
        kv_offsets = urow[:, None] + dims[None, :].to(tl.uint32)
        k_ptrs = k_cache_ptr + kv_offsets
        v_ptrs = v_cache_ptr + kv_offsets
    else:
        kv_offsets = row[:, None] + dims[None, :]
        k_ptrs = k_cache_ptr + kv_offsets
        v_ptrs = v_cache_ptr + kv_offsets
    if MASKED:
        kv_mask = in_range[:, None] & dim_mask[None, :]
    else:
        kv_mask = dim_mask[None, :]
    k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
    v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
    if KV_FP8:
        # Widening e4m3 to the dot's dtype (fp16, or fp32 for fp32 queries) is exact. The
        # scales (one per key of this KV head) multiply whole score columns and probability
        # columns below, which is the same as scaling K and V, with fewer multiplies. They sit
        # in their own [num_blocks, block_size, Hkv] tensor, found through the same block ids
        # (D times fewer elements than the cache: 32-bit offsets even under INT64_OFFSETS).
        if PAGE_LOADS:
            # Loaded [PAGES, SLOTS] (contiguous runs when the scales are head-major), then
            # reshaped as values: nothing for the compiler to lose.
            scale_offsets = _page_offsets(block_ids, start, stride_sb, stride_st, BLOCK_SIZE,
                                          BLOCK_N, PAGES) + kv_head * stride_sh
            slot_pos = (start + tl.arange(0, PAGES)[:, None] * (BLOCK_N // PAGES)
                        + tl.arange(0, BLOCK_N // PAGES)[None, :])
            scale_mask = slot_pos < kv_end
        else:
            scale_offsets = (block_ids * stride_sb + (kv_pos % BLOCK_SIZE) * stride_st
                             + kv_head * stride_sh)
            scale_mask = in_range
        if MASKED:
            k_scale = tl.load(k_scale_ptr + scale_offsets, mask=scale_mask, other=0.0)
            v_scale = tl.load(v_scale_ptr + scale_offsets, mask=scale_mask, other=0.0)
        else:
            k_scale = tl.load(k_scale_ptr + scale_offsets)
            v_scale = tl.load(v_scale_ptr + scale_offsets)
        if PAGE_LOADS:
            k_scale = tl.reshape(k_scale, [BLOCK_N])
            v_scale = tl.reshape(v_scale, [BLOCK_N])
        if WIDEN_IN_ASM and q.dtype == tl.float16:
            k = _widen_e4m3_to_fp16(k)
            v = _widen_e4m3_to_fp16(v)
        else:
            k = k.to(q.dtype)
            v = v.to(q.dtype)

    if FOLD_SCALE:
        # Raw scores; the softmax scale goes into the exponent's fused multiply-add below
        # (max commutes with a positive scale), one multiply per score fewer than scaling first.
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if KV_FP8:
            s = s * k_scale[None, :]
        if MASKED:
            # One comparison per score: key n is visible to row r iff n <= limit[r], where the
            # limit folds both the causal rule (n <= the query's position) and the end of the
            # range (n < kv_end) into one number per row.
            if CAUSAL:
                limit = tl.minimum(q_pos, kv_end - 1)
                s = tl.where(kv_pos[None, :] <= limit[:, None], s, float("-inf"))
            else:
                s = tl.where(in_range[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        if MASKED:
            m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s * qk_scale - m_new[:, None])  # one FMA + exp2 per score
    else:
        # qk_scale = scale * log2(e): these are base-2 logits, ready for exp2.
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if KV_FP8:  # the key's scale and qk_scale in one multiply per score
            s = s * (k_scale * qk_scale)[None, :]
        else:
            s = s * qk_scale
        if MASKED:
            visible = kv_pos[None, :] < kv_end
            if CAUSAL:
                visible = visible & (kv_pos[None, :] <= q_pos[:, None])
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if MASKED:
            # A row that has seen no visible key yet keeps m = -inf; subtract 0 instead of -inf
            # so that its probabilities are exp2(-inf) = 0 rather than NaN.
            m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    if KV_FP8:
        # p @ (v * v_scale) as (p * v_scale / v_max) @ v * v_max: the weights stay in [0, 1],
        # where fp16 keeps its precision (p * v_scale alone would sink into fp16's subnormals
        # for a layer whose values are small). After l_i: the sum of probabilities is unscaled.
        v_max = tl.maximum(tl.max(v_scale, 0), MIN_SCALE)
        p = p * (v_scale * (1.0 / v_max))[None, :]  # one division a tile, not one a key
        pv = tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        acc = acc * alpha[:, None] + pv * v_max
    elif FOLD_SCALE:  # accumulate in place: the MMA adds into the rescaled accumulator
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit(
    do_not_specialize=["num_seqs", "num_tokens", "num_splits", "stride_bt"],
    do_not_specialize_on_alignment=["block_tables_ptr", "seq_lens_ptr", "cu_seqlens_q_ptr",
                                    "counters_ptr"],
)
def _paged_attention_kernel(
    query_ptr, k_cache_ptr, v_cache_ptr, out_ptr,
    block_tables_ptr, seq_lens_ptr, cu_seqlens_q_ptr,
    partial_acc_ptr, partial_m_ptr, partial_l_ptr, k_scale_ptr, v_scale_ptr, counters_ptr,
    qk_scale, num_seqs, num_tokens, num_splits,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_cb, stride_ct, stride_ch, stride_bt, stride_sb, stride_st, stride_sh,
    NUM_Q_HEADS: tl.constexpr, GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr, SPLIT_KV: tl.constexpr,
    DECODE_ONLY: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    INT64_OFFSETS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, KV_FP8: tl.constexpr,
    DOT_FP16: tl.constexpr, PAGE_LOADS: tl.constexpr, PAGES: tl.constexpr,
    ROW_ALIGN: tl.constexpr, FOLD_SCALE: tl.constexpr, U32_OFFSETS: tl.constexpr,
    MERGE_SPLITS: tl.constexpr, GROUP_PAD: tl.constexpr, SPLITS_CHUNK: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    # Program order matters (measured, benchmarks/RESULTS.md): the KV heads of one tile run side
    # by side, so together they read whole contiguous rows of each cache block; and tiles are
    # taken last-first, so the long causal tiles at the end of each prompt start early and the
    # short ones fill the tail of the grid.
    pid = tl.program_id(0)
    kv_head = pid % NUM_KV_HEADS
    tile = tl.num_programs(0) // NUM_KV_HEADS - 1 - pid // NUM_KV_HEADS
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
    if DOT_FP16:  # fp8 cache, 16-bit query: the dots run in fp16 (see paged_attention)
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
    # Whole tiles below `unmasked_end` need no mask at all; the rest are masked.
    full_end = kv_lo + tl.maximum(tl.minimum(kv_hi, unmasked_end) - kv_lo, 0) // BLOCK_N * BLOCK_N

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, DIM_PAD], dtype=tl.float32)
    block_table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for start in range(kv_lo, full_end, BLOCK_N):
        acc, m_i, l_i = _attend_kv_tile(
            acc, m_i, l_i, q, qk_scale, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr,
            block_table, kv_head, start, kv_hi, q_pos, stride_cb, stride_ct, stride_ch,
            stride_sb, stride_st, stride_sh, dims, dim_mask, BLOCK_SIZE, BLOCK_N, False, CAUSAL,
            DOT_PRECISION, INT64_OFFSETS, KV_FP8, PAGE_LOADS, PAGES, ROW_ALIGN, FOLD_SCALE,
            U32_OFFSETS,
        )
    for start in range(full_end, kv_hi, BLOCK_N):
        acc, m_i, l_i = _attend_kv_tile(
            acc, m_i, l_i, q, qk_scale, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr,
            block_table, kv_head, start, kv_hi, q_pos, stride_cb, stride_ct, stride_ch,
            stride_sb, stride_st, stride_sh, dims, dim_mask, BLOCK_SIZE, BLOCK_N, True, CAUSAL,
            DOT_PRECISION, INT64_OFFSETS, KV_FP8, PAGE_LOADS, PAGES, ROW_ALIGN, FOLD_SCALE,
            U32_OFFSETS,
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
        if MERGE_SPLITS:  # decode: the last split of this (token, KV head) merges them all
            _merge_if_last(counters_ptr + pid, out_ptr, partial_acc_ptr, partial_m_ptr,
                           partial_l_ptr, q_start.to(tl.int64), kv_head, num_tokens, num_splits,
                           stride_ot, stride_oh, NUM_Q_HEADS, GROUP, GROUP_PAD, HEAD_DIM,
                           DIM_PAD, SPLITS_CHUNK)


@triton.jit
def _merge_if_last(counter_ptr, out_ptr, partial_acc_ptr, partial_m_ptr, partial_l_ptr, token,
                   kv_head, num_tokens, num_splits, stride_ot, stride_oh,
                   NUM_Q_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
                   HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr, SPLITS_CHUNK: tl.constexpr):
    """Count this split in; the program that arrives last merges the partials of the GROUP query
    heads of `token` and `kv_head` (the merge kernel's rule, SPLITS_CHUNK splits at a time) and
    resets the counter for the next launch.

    The barrier puts every thread's partial stores before the counter's release; the counter's
    acquire, in the last program, puts the other programs' stores before its loads, which skip
    the SM's L1 (`.cg`: another SM wrote them, and L1 is not coherent).
    """
    tl.debug_barrier()
    arrived = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
    if arrived == num_splits - 1:
        group = tl.arange(0, GROUP_PAD)
        heads = kv_head * GROUP + group
        dims = tl.arange(0, DIM_PAD)
        m_run = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
        numerator = tl.zeros([GROUP_PAD, DIM_PAD], dtype=tl.float32)
        denominator = tl.zeros([GROUP_PAD], dtype=tl.float32)
        for first in range(0, num_splits, SPLITS_CHUNK):
            splits = first + tl.arange(0, SPLITS_CHUNK)
            valid = (splits < num_splits)[:, None] & (group < GROUP)[None, :]  # [S, G]
            stat = (splits[:, None] * num_tokens + token) * NUM_Q_HEADS + heads[None, :]
            m = tl.load(partial_m_ptr + stat, mask=valid, other=float("-inf"),
                        cache_modifier=".cg")
            l = tl.load(partial_l_ptr + stat, mask=valid, other=0.0, cache_modifier=".cg")
            acc = tl.load(partial_acc_ptr + stat[:, :, None] * DIM_PAD + dims[None, None, :],
                          mask=valid[:, :, None], other=0.0, cache_modifier=".cg")
            m_new = tl.maximum(m_run, tl.max(m, 0))
            # Subtract 0 where no split has seen a key yet (a padded head): exp2(-inf) = 0.
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.math.exp2(m_run - shift)
            weight = tl.math.exp2(m - shift[None, :])
            numerator = numerator * alpha[:, None] + tl.sum(acc * weight[:, :, None], 0)
            denominator = denominator * alpha + tl.sum(l * weight, 0)
            m_run = m_new
        out = numerator / tl.where(group < GROUP, denominator, 1.0)[:, None]  # padded heads: 0/1
        tl.store(out_ptr + token * stride_ot + heads[:, None] * stride_oh + dims[None, :],
                 out.to(out_ptr.dtype.element_ty),
                 mask=(group < GROUP)[:, None] & (dims < HEAD_DIM)[None, :])
        tl.atomic_xchg(counter_ptr, 0)


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
                      block_n: int, max_splits: int = MAX_SPLITS) -> int:
    """How many slices to cut each context into, from the grid size alone.

    A program streams its whole context through one SM. When `num_programs` (query tiles x KV
    heads) cannot fill the GPU, the other SMs idle: splitting the context into `s` slices gives
    `s` times more programs at the cost of a small merge pass. We aim for about two programs per
    SM and never cut a context into slices shorter than a few key tiles.
    """
    target = 2 * num_sms
    if num_programs >= target:
        return 1
    splits = min(triton.cdiv(target, num_programs), max_splits)
    if max_seq_len is not None:
        splits = min(splits, max(1, max_seq_len // (4 * block_n)))
    return max(1, splits)


def _block_m(decode_only: bool, group: int, head_dim: int) -> int:
    """Rows of a query tile: 16 in decode (the smallest M tl.dot accepts; they hold the GQA
    group), 128 in prefill (64 for head_dim > 128 to stay in registers)."""
    if decode_only:
        return max(16, triton.next_power_of_2(group))
    return max(128 if head_dim <= 128 else 64, triton.next_power_of_2(group))


def _launch_config(decode_only: bool, block_m: int, head_dim: int, dtype: torch.dtype,
                   device: torch.device, split_kv: bool,
                   kv_dtype: torch.dtype | None = None) -> dict:
    """Tile sizes, warps and pipeline depth, from the sweep in benchmarks/tune_attn.py (H200).

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
      during each softmax. Measured on the H200 with the page path (`tune_attn.py --only prefill
      --quick`, benchmarks/RESULTS.md): 128x64/4 warps was the fastest tile of the sweep for
      causal prefill 4 x 2048 (0.362 ms against 0.387 ms for 128x128/8), chunked prefill
      (0.617 against 0.658 ms) and the mixed step (0.490 against 0.535 ms).
    * fp8 K/V keep 128-key tiles with 8 warps and two stages: the widened tiles are staged
      again for the MMA (benchmarks/fp8_tune.py, H100); the sweep above did not cover fp8.
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


def _prefill_path(cfg: dict, decode_only: bool, block_size: int,
                  kv_fp8: bool = False) -> tuple[bool, bool]:
    """(PAGE_LOADS, FOLD_SCALE) for this launch, popped from `cfg` where a caller set them.

    Decode-only batches on a 16-bit cache keep the token path (what was measured at the
    bandwidth limit); on an fp8 cache, which is short of instructions rather than bytes, they
    take the page path, which spends fewer on addresses: decode B=64 / 4k took 0.694x the bf16
    kernel's time against 0.770x on the token path, B=256 / 1k 0.727x against 0.808x (H200,
    fp8_tune.py --quick, benchmarks/RESULTS.md). The other variants follow PREFILL_PATH. Page
    loads need a power-of-two block size (a tile then holds whole pages, or a slice of one);
    any other block size keeps the token gather.
    """
    new_path = kv_fp8 if decode_only else PREFILL_PATH == "pages"
    asked = "PAGE_LOADS" in cfg
    page_loads = bool(cfg.pop("PAGE_LOADS", new_path))
    fold_scale = bool(cfg.pop("FOLD_SCALE", new_path))
    if page_loads and block_size & (block_size - 1):
        if asked:
            raise ValueError(f"config: PAGE_LOADS needs a power-of-two block size, got "
                             f"{block_size}")
        page_loads = False
    return page_loads, fold_scale


MERGE_COUNTERS = 1 << 16  # (query tile, KV head) pairs a fused merge can count at once
_counters: dict[torch.device, torch.Tensor] = {}


def _merge_counters(device: torch.device, num_pairs: int) -> torch.Tensor | None:
    """The per-device arrival counters of the fused split-KV merge, or None where the separate
    merge kernel runs: switched off (MINIVLLM_FUSED_MERGE=0), more pairs than counters, or
    the counters do not exist yet while a CUDA graph is being captured (a graph must not
    allocate what outlives it; the engine's warm-up creates them first).

    Each launch leaves every counter at zero (the last split resets its own), so one zeroed
    buffer serves every launch on the device, in a graph or not."""
    if os.environ.get("MINIVLLM_FUSED_MERGE", "1") == "0" or num_pairs > MERGE_COUNTERS:
        return None
    counters = _counters.get(device)
    if counters is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        counters = _counters[device] = torch.zeros(MERGE_COUNTERS, dtype=torch.int32, device=device)
    return counters


def splits_chunk(group_pad: int, dim_pad: int) -> int:
    """Splits the fused merge reads at once: a [splits, group, dim] float32 tile of at most 8,192
    values (32 KB), so that the merging program stays within its registers."""
    return max(1, min(SPLITS_TILE, 8192 // (group_pad * dim_pad)))


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


def paged_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    scale: float,
    causal: bool,
    out: torch.Tensor,
    max_seq_len: int | None = None,
    num_splits: int | None = None,
    config: dict | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same contract as `minivllm.kernels.paged_attention` (inputs already validated).

    `config` overrides the launch configuration (BLOCK_M, BLOCK_N, num_warps, num_stages) and
    the kernel's switches (PAGE_LOADS, FOLD_SCALE: the prefill path; INT64_OFFSETS, U32_OFFSETS;
    DOT_FP16);
    the benchmarks use it to sweep tile shapes and to time both prefill paths in one run.
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
    block_m = config.pop("BLOCK_M", None) or _block_m(decode_only, group, head_dim)
    block_q = 1 if decode_only else max(1, block_m // group)
    num_tiles = num_seqs if decode_only else num_tokens // block_q + num_seqs
    if num_splits is None:
        num_splits = choose_num_splits(num_tiles * num_kv_heads, _sm_count(query.device),
                                       max_seq_len, block_n=64)
    cfg = _launch_config(decode_only, block_m, head_dim, query.dtype, query.device,
                         split_kv=num_splits > 1, kv_dtype=k_cache.dtype)
    cfg.update(config)
    del cfg["BLOCK_M"]
    page_loads, fold_scale = _prefill_path(cfg, decode_only, block_size,
                                           kv_fp8=k_cache.dtype == torch.float8_e4m3fn)
    pages = max(1, cfg["BLOCK_N"] // block_size) if page_loads else 1
    # What Triton's own key already knows of the cache strides (divisible by 16 or not), passed
    # on as a hint the page path needs (see _attend_kv_tile); 1 (unused) on the token path.
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
    kv_fp8 = k_cache.dtype == torch.float8_e4m3fn
    int64_offsets, u32_offsets = _offset_switches(cfg, k_cache.numel())
    # fp8 cache with a bf16/fp16 query: e4m3 widens to fp16 in one instruction (to bf16 in
    # several), and fp16 keeps more mantissa; the query is clamped to fp16's range (+-65504).
    # Faster and more accurate than widening to bf16 on an H100 (docs/fp8_kv_cache.md);
    # `config` can force either, for benchmarks/fp8_tune.py.
    dot_fp16 = cfg.pop("DOT_FP16", kv_fp8 and query.dtype != torch.float32)
    grid = (num_tiles * num_kv_heads, num_splits)
    counters = _merge_counters(query.device, grid[0]) if decode_only and num_splits > 1 else None
    group_pad = triton.next_power_of_2(group)
    pdl = pdl_launch(query.device)
    _paged_attention_kernel[grid](
        query, k_cache, v_cache, out,
        block_tables, seq_lens, cu_seqlens_q,
        partial_acc, partial_m, partial_l,
        k_scale if kv_fp8 else out, v_scale if kv_fp8 else out,  # unused unless fp8
        counters if counters is not None else seq_lens,  # unused unless the merge is fused
        scale * LOG2E, num_seqs, num_tokens, num_splits,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        *(k_scale.stride() if kv_fp8 else (0, 0, 0)),
        NUM_Q_HEADS=num_q_heads, GROUP=group, HEAD_DIM=head_dim, DIM_PAD=dim_pad,
        BLOCK_SIZE=block_size, BLOCK_M=block_m, BLOCK_Q=block_q,
        SPLIT_KV=num_splits > 1, DECODE_ONLY=decode_only, CAUSAL=causal,
        DOT_PRECISION=dot_precision, INT64_OFFSETS=int64_offsets, U32_OFFSETS=u32_offsets,
        NUM_KV_HEADS=num_kv_heads,
        KV_FP8=kv_fp8, DOT_FP16=dot_fp16, PAGE_LOADS=page_loads, PAGES=pages,
        ROW_ALIGN=row_align, FOLD_SCALE=fold_scale, MERGE_SPLITS=counters is not None,
        GROUP_PAD=group_pad, SPLITS_CHUNK=splits_chunk(group_pad, dim_pad),
        **pdl, **cfg,
    )
    if num_splits > 1 and counters is None:
        _merge_splits_kernel[(num_tokens, num_q_heads)](
            out, partial_acc, partial_m, partial_l, num_tokens, num_splits,
            out.stride(0), out.stride(1),
            NUM_Q_HEADS=num_q_heads, HEAD_DIM=head_dim, DIM_PAD=dim_pad,
            SPLITS_TILE=SPLITS_TILE, num_warps=4 if query.device.type == "cuda" else 1, **pdl,
        )
    return out
