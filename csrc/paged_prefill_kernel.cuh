// Paged attention for prefill, chunked prefill and mixed batches, on tensor cores: the same
// building blocks as the decode kernel (mma_utils.cuh, paged_tiles.cuh), arranged the way flash
// attention arranges them for many queries.
//
//   * Query tiles of (token, head) rows. One CTA takes BLOCK_M = 16 x NUM_WARPS rows of one
//     sequence and one KV head: row r is query token r / GROUP, query head r % GROUP, so the
//     GROUP heads that share a KV head share every K/V tile the CTA loads. Warp w owns rows
//     16w .. 16w + 15, i.e. one 16-row A tile of S = Q K^T and of O += P V. A decode in a mixed
//     batch is a tile with one token: only its first warp has real rows, and the other warps
//     skip the arithmetic (they still help copy K/V).
//   * Finding the work from shapes alone: sequence b's query tiles start at tile
//     cu_seqlens_q[b] / TOKENS + b, so num_tokens / TOKENS + num_seqs tiles always suffice; a CTA
//     finds its sequence by binary search over cu_seqlens_q, and spare tiles exit at once. No
//     value is read on the host, so the launch can be captured in a CUDA graph. The grid is
//     (tile, KV head), tiles fastest and backwards: under the causal mask later tiles see more
//     keys, and starting the longest first leaves short ones to fill the tail; neighbouring CTAs
//     then read the same KV head of the same sequence, which L2 serves once.
//   * K/V tiles of BLOCK_N = 64 keys go through a STAGES-deep cp.async pipeline shared by the
//     CTA: while all warps compute on tile i, the copies of tiles i + 1 .. i + STAGES - 1 are in
//     flight. One __syncthreads per tile does two jobs: tile i is visible to every warp, and
//     every warp is done with the buffer that the next copy overwrites.
//   * Thread mapping inside a warp, for a K/V tile: lane = 4g + t holds rows g and g + 8 of the
//     warp's 16 rows; of S, the keys 8n + 2t, 8n + 2t + 1 of each 8-key slice n (8 slices: 32
//     fp32 registers); of O, the dims 8j + 2t, 8j + 2t + 1 of each 8-dim slice j (64 registers at
//     D = 128). Q stays in registers as A fragments for the whole loop (32 registers at D = 128).
//   * Causal masking only where it can bite: queries are the last q_len tokens of the context,
//     so key tiles entirely at or before the tile's first query position are visible to every
//     row and run without any comparison; only the last (diagonal) tiles are masked, and keys
//     past the tile's last query are never loaded.
//   * Online softmax in base 2 with the scale folded into the exponent: the running max is kept
//     over raw scores (max commutes with a positive scale), and p = exp2(s * c - m * c) is one
//     FFMA and one MUFU per score.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "mma_utils.cuh"
#include "paged_tiles.cuh"

namespace minivllm {

constexpr int kPrefillKeys = 64;  // BLOCK_N: keys per K/V tile

template <int HEAD_DIM, int NUM_WARPS, int STAGES>
constexpr int prefill_smem_bytes() {
  return (16 * NUM_WARPS + STAGES * 2 * kPrefillKeys) * HEAD_DIM * 2;  // Q tile + K/V stages
}

// Which sequence owns query tile `tile`: the last b with cu_seqlens_q[b] / tokens + b <= tile.
__device__ __forceinline__ int find_sequence(const int* cu_seqlens_q, int num_seqs, int tile,
                                             int tokens) {
  int lo = 0, hi = num_seqs;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (cu_seqlens_q[mid] / tokens + mid <= tile) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo - 1;
}

template <typename scalar_t, int HEAD_DIM, int GROUP, int NUM_WARPS, int STAGES>
__global__ void __launch_bounds__(NUM_WARPS * mma::kWarpSize)
paged_prefill_mma_kernel(const PagedAttentionParams p) {
  constexpr int THREADS = NUM_WARPS * mma::kWarpSize;
  constexpr int BLOCK_M = 16 * NUM_WARPS;       // (token, head) rows of the CTA
  constexpr int TOKENS = BLOCK_M / GROUP;        // query tokens of the CTA
  constexpr int BLOCK_N = kPrefillKeys;
  constexpr int ROW_BYTES = HEAD_DIM * 2;
  constexpr int KV_TILE_BYTES = BLOCK_N * ROW_BYTES;
  constexpr int K_STEPS = HEAD_DIM / 16;         // 16-dim slices of q.k
  constexpr int N_TILES = BLOCK_N / 8;           // 8-key slices of S
  constexpr int D_TILES = HEAD_DIM / 8;          // 8-dim slices of O
  constexpr int CHUNKS = HEAD_DIM / mma::kChunkElems;
  static_assert(BLOCK_M % GROUP == 0, "whole tokens per tile");
  static_assert(STAGES >= 2, "one tile in use, at least one in flight");

  extern __shared__ __align__(128) unsigned char smem[];
  const int tile = gridDim.x - 1 - blockIdx.x;  // longest (latest) tiles first
  const int kv_head = blockIdx.y;
  const int warp = threadIdx.x / mma::kWarpSize;
  const int lane = threadIdx.x % mma::kWarpSize;
  const int g = lane / 4;
  const int t = lane % 4;

  // Which sequence and which of its query tokens.
  const int seq = find_sequence(p.cu_seqlens_q, p.num_seqs, tile, TOKENS);
  const int q_start = p.cu_seqlens_q[seq];
  const int q_len = p.cu_seqlens_q[seq + 1] - q_start;
  const int first_query = (tile - (q_start / TOKENS + seq)) * TOKENS;
  if (first_query >= q_len) return;  // a spare tile of the shape-sized grid (the whole CTA)
  const int seq_len = p.seq_lens[seq];
  const int tile_tokens = min(TOKENS, q_len - first_query);
  const int context_start = seq_len - q_len;            // position of the sequence's query 0
  const int first_pos = context_start + first_query;    // position of the tile's first query
  const int last_pos = first_pos + tile_tokens - 1;
  const int kv_end = p.causal ? last_pos + 1 : seq_len;  // keys any row of the tile can see
  const int num_kv_tiles = (kv_end + BLOCK_N - 1) / BLOCK_N;
  // Tiles every row sees in full: no mask at all.
  const int num_full_tiles = p.causal ? (first_pos + 1) / BLOCK_N : seq_len / BLOCK_N;

  const uint32_t q_tile = mma::shared_address(smem);
  const uint32_t kv_smem = q_tile + BLOCK_M * ROW_BYTES;
  const int* table = p.block_tables + seq * p.block_table_stride;

  // Q tile: row r = (token r / GROUP, head r % GROUP), rows past the sequence's queries zeroed.
  {
    const auto* query = static_cast<const scalar_t*>(p.query);
    const int chunk = threadIdx.x % CHUNKS;
#pragma unroll
    for (int i = 0; i < BLOCK_M * CHUNKS / THREADS; ++i) {
      const int row = threadIdx.x / CHUNKS + i * (THREADS / CHUNKS);
      const int token = row / GROUP;
      const bool valid = token < tile_tokens;
      const int64_t at = valid ? (q_start + first_query + token) * p.q_stride_t +
                                     (kv_head * GROUP + row % GROUP) * p.q_stride_h +
                                     chunk * mma::kChunkElems
                               : 0;
      mma::cp_async_16(q_tile + mma::swizzled<ROW_BYTES>(row, chunk), query + at, valid);
    }
    mma::cp_async_commit();
  }
  auto issue = [&](int i) {  // start copying K/V tile i (an empty group past the end)
    if (i < num_kv_tiles) {
      const uint32_t k_tile = kv_smem + (i % STAGES) * 2 * KV_TILE_BYTES;
      copy_kv_tile<scalar_t, BLOCK_N, HEAD_DIM, THREADS>(k_tile, k_tile + KV_TILE_BYTES, p, table,
                                                        kv_head, i * BLOCK_N, kv_end, threadIdx.x);
    }
    mma::cp_async_commit();
  };
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) issue(s);

  // Q as A fragments (ldmatrix.x4 per 16 dims: matrices (rows 0-7, dims 16k..+7), (rows 8-15,
  // same dims), (rows 0-7, dims 16k+8..), (rows 8-15, dims 16k+8..) = a0, a1, a2, a3; lane l
  // points at row l % 8 + 8 * ((l / 8) % 2) of the warp's 16, chunk 2k + l / 16).
  mma::cp_async_wait<STAGES - 1>();  // the Q group (committed first) has landed
  __syncthreads();
  uint32_t q_frag[K_STEPS][4];
  {
    const int row = 16 * warp + lane % 8 + 8 * ((lane / 8) % 2);
#pragma unroll
    for (int k = 0; k < K_STEPS; ++k) {
      mma::ldmatrix_x4(q_frag[k], q_tile + mma::swizzled<ROW_BYTES>(row, 2 * k + lane / 16));
    }
  }
  // Warps whose 16 rows are all past the tile's tokens (a short last tile, a decode) skip the
  // arithmetic; they still copy and meet at the barriers.
  const bool warp_has_rows = (16 * warp) / GROUP < tile_tokens;
  // Query positions of this lane's two rows, for the causal mask.
  const int pos_lo = first_pos + (16 * warp + g) / GROUP;
  const int pos_hi = first_pos + (16 * warp + g + 8) / GROUP;

  float o[D_TILES][4];
#pragma unroll
  for (int j = 0; j < D_TILES; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
  float m_lo = -INFINITY, m_hi = -INFINITY;  // running max of raw scores, rows g and g + 8
  float l_lo = 0.f, l_hi = 0.f;              // running sums of this lane's columns
  const float c = p.scale_log2;

  // The largest key each of this lane's rows may see (a padding row past the tile's tokens has
  // a position past kv_end: the context's end bounds it).
  const int limit_lo = p.causal ? min(pos_lo, kv_end - 1) : kv_end - 1;
  const int limit_hi = p.causal ? min(pos_hi, kv_end - 1) : kv_end - 1;

  // One K/V tile: the loop body, compiled twice (MASKED or not), so the tiles every row sees in
  // full carry no masking instruction at all.
  auto attend = [&](int i, auto masked) {
    mma::cp_async_wait<STAGES - 2>();  // tile i has landed (this thread's copies) ...
    __syncthreads();                   // ... everyone's, and tile i - 1's buffer is free
    issue(i + STAGES - 1);
    if (!warp_has_rows) return;
    const uint32_t k_tile = kv_smem + (i % STAGES) * 2 * KV_TILE_BYTES;
    const uint32_t v_tile = k_tile + KV_TILE_BYTES;

    // S = Q K^T over 64 keys: s[n] = S[g][8n + 2t, +1] (s[n][0..1]) and S[g + 8][...] (s[n][2..3]).
    float s[N_TILES][4];
#pragma unroll
    for (int n = 0; n < N_TILES; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
    const int k_row = (lane / 16) * 8 + lane % 8;  // as in the decode kernel, per 16 keys
#pragma unroll
    for (int k = 0; k < K_STEPS; ++k) {
#pragma unroll
      for (int n = 0; n < N_TILES; n += 2) {
        uint32_t b[4];
        mma::ldmatrix_x4(b, k_tile + mma::swizzled<ROW_BYTES>(8 * n + k_row, 2 * k + (lane / 8) % 2));
        mma::mma_16816<scalar_t>(s[n], q_frag[k], b[0], b[1]);
        mma::mma_16816<scalar_t>(s[n + 1], q_frag[k], b[2], b[3]);
      }
    }

    // Mask the diagonal tiles: key j is visible to a row iff j <= its limit.
    if constexpr (decltype(masked)::value) {
      const int key0 = i * BLOCK_N + 2 * t;
#pragma unroll
      for (int n = 0; n < N_TILES; ++n) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int key = key0 + 8 * n + e;
          if (key > limit_lo) s[n][e] = -INFINITY;
          if (key > limit_hi) s[n][2 + e] = -INFINITY;
        }
      }
    }

    // Online softmax, rows g and g + 8. Every row sees key 0 in tile 0, so m is finite from
    // then on and a fully masked row of a later tile just adds zeros.
    float max_lo = m_lo, max_hi = m_hi;
#pragma unroll
    for (int n = 0; n < N_TILES; ++n) {
      max_lo = fmaxf(max_lo, fmaxf(s[n][0], s[n][1]));
      max_hi = fmaxf(max_hi, fmaxf(s[n][2], s[n][3]));
    }
    max_lo = mma::quad_max(max_lo);
    max_hi = mma::quad_max(max_hi);
    const float alpha_lo = exp2f((m_lo - max_lo) * c);  // 0 on the first tile
    const float alpha_hi = exp2f((m_hi - max_hi) * c);
    m_lo = max_lo;
    m_hi = max_hi;
    const float shift_lo = max_lo * c, shift_hi = max_hi * c;
    l_lo *= alpha_lo;
    l_hi *= alpha_hi;
#pragma unroll
    for (int n = 0; n < N_TILES; ++n) {
      s[n][0] = exp2f(fmaf(s[n][0], c, -shift_lo));
      s[n][1] = exp2f(fmaf(s[n][1], c, -shift_lo));
      s[n][2] = exp2f(fmaf(s[n][2], c, -shift_hi));
      s[n][3] = exp2f(fmaf(s[n][3], c, -shift_hi));
      l_lo += s[n][0] + s[n][1];
      l_hi += s[n][2] + s[n][3];
    }
#pragma unroll
    for (int j = 0; j < D_TILES; ++j) {
      o[j][0] *= alpha_lo;
      o[j][1] *= alpha_lo;
      o[j][2] *= alpha_hi;
      o[j][3] *= alpha_hi;
    }

    // O += P V, 16 keys at a time: P's A fragment is two neighbouring S slices in 16 bit
    // (mma_utils.cuh), V's B fragments come from ldmatrix.x4.trans as in the decode kernel.
    const int v_row = ((lane / 8) % 2) * 8 + lane % 8;
#pragma unroll
    for (int kk = 0; kk < BLOCK_N / 16; ++kk) {
      const uint32_t a[4] = {
          mma::pack2<scalar_t>(s[2 * kk][0], s[2 * kk][1]),
          mma::pack2<scalar_t>(s[2 * kk][2], s[2 * kk][3]),
          mma::pack2<scalar_t>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
          mma::pack2<scalar_t>(s[2 * kk + 1][2], s[2 * kk + 1][3]),
      };
#pragma unroll
      for (int j = 0; j < D_TILES / 2; ++j) {
        uint32_t b[4];
        mma::ldmatrix_x4_trans(b, v_tile + mma::swizzled<ROW_BYTES>(16 * kk + v_row, 2 * j + lane / 16));
        mma::mma_16816<scalar_t>(o[2 * j], a, b[0], b[1]);
        mma::mma_16816<scalar_t>(o[2 * j + 1], a, b[2], b[3]);
      }
    }
  };
  int i = 0;
  for (; i < min(num_full_tiles, num_kv_tiles); ++i) attend(i, std::false_type{});
  for (; i < num_kv_tiles; ++i) attend(i, std::true_type{});
  mma::cp_async_wait<0>();
  if (!warp_has_rows) return;

  // Normalise and write this lane's two rows (pairs of neighbouring dims: 4-byte stores).
  l_lo = mma::quad_sum(l_lo);
  l_hi = mma::quad_sum(l_hi);
  auto* out = static_cast<scalar_t*>(p.out);
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int row = 16 * warp + g + 8 * half;
    const int token = row / GROUP;
    if (token >= tile_tokens) continue;
    const float inv_l = 1.f / (half ? l_hi : l_lo);
    scalar_t* dst = out + (q_start + first_query + token) * p.out_stride_t +
                    (kv_head * GROUP + row % GROUP) * p.out_stride_h + 2 * t;
#pragma unroll
    for (int j = 0; j < D_TILES; ++j) {
      *reinterpret_cast<uint32_t*>(dst + 8 * j) =
          mma::pack2<scalar_t>(o[j][2 * half] * inv_l, o[j][2 * half + 1] * inv_l);
    }
  }
}

}  // namespace minivllm
