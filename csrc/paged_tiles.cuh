// What the attention kernels share: their arguments, and the copy of a K/V tile out of the paged
// cache into shared memory.
//
// The cache is [num_blocks, block_size, Hkv, D]: one token of one KV head is D contiguous 16-bit
// values (one "row", 128 or 256 bytes), and the tokens of a sequence live in the blocks ("pages")
// its block table lists, in order. A tile is ROWS consecutive tokens of one sequence and one KV
// head, starting at a multiple of ROWS. With power-of-two block sizes of at least 8, a tile is
// either a slice of one page (block_size >= ROWS) or ROWS / block_size whole pages, so:
//
//   * the block table is read once per page of the tile, not once per token: lane j of the warp
//     reads the entry of the tile's page j, and a row finds its page's entry with one shuffle
//     from lane (row / block_size);
//   * within a page the rows follow at a constant stride, so a row's address is
//     page_base + (token % block_size) * stride_token, a shift and a mask away.
//
// Each thread copies fixed 16-byte chunks: with CHUNKS = D / 8 chunks per row, thread `tid`
// copies chunk tid % CHUNKS of rows tid / CHUNKS, + THREADS / CHUNKS, ... so consecutive lanes
// read consecutive 16 bytes of a row (coalesced) and write the swizzled positions of mma_utils.cuh.
#pragma once

#include <cstdint>

#include "mma_utils.cuh"

namespace minivllm {

// The arguments of both attention kernels (a struct keeps the launches short). Strides are in
// elements, except the caches' (bytes); the caches are contiguous, so K and V share theirs.
struct PagedAttentionParams {
  void* out;
  int64_t out_stride_t, out_stride_h;
  const void* query;
  int64_t q_stride_t, q_stride_h;
  const void* k_cache;
  const void* v_cache;
  int block_bytes, token_bytes;  // the caches' strides, in bytes (the same for K and V)
  const int* block_tables;  // [num_seqs, max_blocks]
  int64_t block_table_stride;
  const int* seq_lens;      // [num_seqs]: context length, new tokens included
  const int* cu_seqlens_q;  // [num_seqs + 1]: where each sequence's queries start (prefill)
  float* part_out;          // split-KV partial outputs [num_seqs, Hq, num_splits, D] (decode)
  float* part_lse;          // and their log2-sum-exp [num_seqs, Hq, num_splits]
  int num_seqs;
  int num_kv_heads;
  int block_shift;          // log2(block_size)
  float scale_log2;         // softmax scale * log2(e): scores in base 2, for exp2
  bool causal;
};

// Copy rows [t0, t0 + ROWS) of one KV head's K and V into two swizzled shared tiles, with
// cp.async (the caller commits and waits). Rows at or past `end` are zero-filled, and their page
// is never looked up: table entries past a context may be garbage. All lanes of each warp of the
// THREADS copying threads must call it (it shuffles).
template <typename scalar_t, int ROWS, int HEAD_DIM, int THREADS>
__device__ __forceinline__ void copy_kv_tile(uint32_t k_tile, uint32_t v_tile,
                                             const PagedAttentionParams& p, const int* table,
                                             int kv_head, int t0, int end, int tid) {
  constexpr int CHUNKS = HEAD_DIM / mma::kChunkElems;  // 16-byte chunks per row
  constexpr int ROWS_PER_PASS = THREADS / CHUNKS;
  constexpr int PASSES = ROWS / ROWS_PER_PASS;
  constexpr int MAX_PAGES = ROWS / 8;  // block_size >= 8
  static_assert(THREADS % CHUNKS == 0 && ROWS % ROWS_PER_PASS == 0, "tile / thread mismatch");
  static_assert(MAX_PAGES <= mma::kWarpSize, "one page entry per lane");
  const int lane = tid % mma::kWarpSize;
  const int chunk = tid % CHUNKS;
  const int row0 = tid / CHUNKS;
  const int block_mask = (1 << p.block_shift) - 1;

  // Lane j holds the physical block of the tile's page j (0 for pages past `end`: the rows there
  // are zero-filled, and block 0 keeps their unused address inside the cache).
  const int first_page = t0 >> p.block_shift;
  const int last_page = (end - 1) >> p.block_shift;
  int page_entry = 0;
  if (lane < MAX_PAGES && first_page + lane <= last_page) page_entry = table[first_page + lane];

  // Byte addresses: the caches share their layout, so one offset serves K and V. A block is at
  // most 2 GB (checked on the host), so block * block_bytes is one 32 x 32 -> 64-bit multiply.
  const int64_t head_bytes = (static_cast<int64_t>(kv_head) * HEAD_DIM + chunk * mma::kChunkElems) * 2;
  const char* k_base = static_cast<const char*>(p.k_cache) + head_bytes;
  const char* v_base = static_cast<const char*>(p.v_cache) + head_bytes;
#pragma unroll
  for (int i = 0; i < PASSES; ++i) {
    const int row = row0 + i * ROWS_PER_PASS;
    const int token = t0 + row;
    const int block = __shfl_sync(mma::kFullMask, page_entry, row >> p.block_shift);
    const int64_t at = static_cast<int64_t>(block) * p.block_bytes + (token & block_mask) * p.token_bytes;
    const uint32_t dst = mma::swizzled<HEAD_DIM * 2>(row, chunk);
    mma::cp_async_16(k_tile + dst, k_base + at, token < end);
    mma::cp_async_16(v_tile + dst, v_base + at, token < end);
  }
}

}  // namespace minivllm
