// Paged attention for decode on tensor cores: one new query token per sequence, its keys and
// values read from the paged KV cache through the sequence's block table.
//
// Decode does almost no arithmetic per byte: every cached K/V element is read once and used for a
// few multiply-adds. The kernel's job is to stream K/V at the memory's bandwidth while spending
// as few instructions as possible on each byte (an earlier version of this file did the dot
// products with scalar FMAs and warp shuffles, and was bound by instruction issue, not memory).
// Here the arithmetic of 16 keys is a handful of mma.sync instructions (mma_utils.cuh):
//
//   * The GQA group is the rows of the A tile. The GROUP (<= 8) query heads that share a KV head
//     are rows 0..GROUP-1 of a 16-row Q tile; the rest is padding. S = Q K^T for 16 keys is
//     2 MMAs per 16 dims of the head, with K as the B operand; O += P V is 2 MMAs per 16 dims of
//     the output, with P (the probabilities, in 16 bit) as A and V as B. Rows 8..15 of A are
//     always zero, so their results are dropped on the spot (mma_16816_top) and cost no
//     registers; rows GROUP..7 are computed and never written.
//   * Thread mapping: lane = 4g + t holds, for row (query head) g, the scores of keys 2t, 2t+1
//     and 8+2t, 8+2t+1 of each 16-key tile, and the output dims 8j+2t, 8j+2t+1 of every
//     8-dim slice j. The row max and sum of the online softmax are quad shuffles.
//   * One CTA = one (sequence, KV head, split): K/V of that head are read once for the whole
//     group. Its NUM_WARPS warps take the slice's 16-token tiles round robin (warp w: tiles w,
//     w + NUM_WARPS, ...), each with its own softmax state and its own STAGES-deep cp.async
//     pipeline in its own part of shared memory, so the main loop needs no block barrier, only
//     __syncwarp. At the end the warps' states are merged through shared memory.
//   * Pipeline, per warp: copies for tile i + STAGES - 1 are issued before tile i is used, so
//     STAGES - 1 tiles (8 KB each at D = 128: 16 keys x 256 bytes x K and V) are in flight while
//     the warp computes. That is what hides the memory latency; several CTAs per SM add more.
//   * Online softmax in base 2 (scores scaled by scale * log2(e), exp2): running max m, running
//     sum l (kept per lane and summed over the quad only at the end), accumulator rescaled by
//     exp2(m_old - m_new) once per tile.
//   * Split-KV: with few sequences (B x Hkv CTAs cannot fill the GPU) each context is cut into
//     num_splits slices, one CTA each (gridDim.z); each writes its normalised partial output and
//     its log2-sum-exp, and merge_splits_kernel combines them. The split count comes from shapes
//     and a host-side bound on the context only, never from seq_lens' values, so the launch can
//     be captured in a CUDA graph.
#pragma once

#include <cmath>
#include <cstdint>

#include "mma_utils.cuh"
#include "paged_tiles.cuh"
#include "vec_utils.cuh"

namespace minivllm {

constexpr int kDecodeTile = 16;  // keys per warp step: the K of one P x V MMA

// Shared memory of one decode CTA: per warp, STAGES K tiles and STAGES V tiles.
template <int HEAD_DIM, int NUM_WARPS, int STAGES>
constexpr int decode_smem_bytes() {
  return NUM_WARPS * STAGES * 2 * kDecodeTile * HEAD_DIM * 2;
}

template <typename scalar_t, int HEAD_DIM, int GROUP, int NUM_WARPS, int STAGES>
__global__ void __launch_bounds__(NUM_WARPS * mma::kWarpSize)
paged_decode_mma_kernel(const PagedAttentionParams p) {
  static_assert(GROUP <= 8, "the group fills rows 0..7 of the A tile");
  constexpr int TILE = kDecodeTile;
  constexpr int ROW_BYTES = HEAD_DIM * 2;
  constexpr int TILE_BYTES = TILE * ROW_BYTES;
  constexpr int K_STEPS = HEAD_DIM / 16;  // 16-dim slices of q.k
  constexpr int D_TILES = HEAD_DIM / 8;   // 8-dim slices of the output
  constexpr int CTA_TILE = TILE * NUM_WARPS;

  extern __shared__ __align__(128) unsigned char smem[];
  const int kv_head = blockIdx.x;
  const int seq = blockIdx.y;
  const int split = blockIdx.z;
  const int num_splits = gridDim.z;
  const int warp = threadIdx.x / mma::kWarpSize;
  const int lane = threadIdx.x % mma::kWarpSize;
  const int g = lane / 4;  // fragment row: the query head of the group
  const int t = lane % 4;  // fragment column pair

  // This split's slice of the context, in whole CTA tiles. Splits past the sequence's end see no
  // key and say so (m = -inf), which the merge kernel weighs as zero.
  const int seq_len = p.seq_lens[seq];
  const int per_split = (seq_len + num_splits - 1) / num_splits;
  const int slice = (per_split + CTA_TILE - 1) / CTA_TILE * CTA_TILE;
  const int begin = split * slice;
  const int end = min(seq_len, begin + slice);
  const int first_token = begin + warp * TILE;  // this warp's first tile, then every CTA_TILE
  const int num_tiles = first_token < end ? (end - first_token + CTA_TILE - 1) / CTA_TILE : 0;

  // Q as A fragments, loaded once: row g, dims 16k + 2t, +1 (a0) and 16k + 2t + 8, +9 (a2).
  // Rows 8..15 (a1, a3) are zero and never stored; rows GROUP..7 are zero padding.
  uint32_t q_frag[K_STEPS][2];
  {
    const auto* q = static_cast<const scalar_t*>(p.query) + seq * p.q_stride_t +
                    (kv_head * GROUP + min(g, GROUP - 1)) * p.q_stride_h;
#pragma unroll
    for (int k = 0; k < K_STEPS; ++k) {
      q_frag[k][0] = g < GROUP ? *reinterpret_cast<const uint32_t*>(q + 16 * k + 2 * t) : 0u;
      q_frag[k][1] = g < GROUP ? *reinterpret_cast<const uint32_t*>(q + 16 * k + 2 * t + 8) : 0u;
    }
  }

  // This warp's pipeline stages: stage s holds a K tile, then a V tile.
  const uint32_t warp_smem = mma::shared_address(smem) + warp * STAGES * 2 * TILE_BYTES;
  const int* table = p.block_tables + seq * p.block_table_stride;
  auto issue = [&](int i) {  // start copying tile i (an empty group past the end keeps counts even)
    if (i < num_tiles) {
      const uint32_t k_tile = warp_smem + (i % STAGES) * 2 * TILE_BYTES;
      copy_kv_tile<scalar_t, TILE, HEAD_DIM, mma::kWarpSize>(
          k_tile, k_tile + TILE_BYTES, p, table, kv_head, first_token + i * CTA_TILE, end, lane);
    }
    mma::cp_async_commit();
  };
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) issue(s);

  float o[D_TILES][2];  // O[g][8j + 2t], O[g][8j + 2t + 1]
#pragma unroll
  for (int j = 0; j < D_TILES; ++j) o[j][0] = o[j][1] = 0.f;
  float m = -INFINITY;  // running max of row g (base-2 scores)
  float l = 0.f;        // running sum of this lane's columns of row g

  for (int i = 0; i < num_tiles; ++i) {
    issue(i + STAGES - 1);
    mma::cp_async_wait<STAGES - 1>();  // tile i has landed (this lane's copies) ...
    __syncwarp();                      // ... and every lane's
    const uint32_t k_tile = warp_smem + (i % STAGES) * 2 * TILE_BYTES;
    const uint32_t v_tile = k_tile + TILE_BYTES;

    // S = Q K^T: s[n] = S[g][8n + 2t, +1], keys 0-7 (n = 0) and 8-15 (n = 1) of the tile.
    // One ldmatrix.x4 per 16 dims: matrices (keys 0-7, dims 16k..+7), (keys 0-7, dims 16k+8..+15),
    // (keys 8-15, dims 16k..), (keys 8-15, dims 16k+8..); lane l points at row l % 8 of matrix
    // l / 8, i.e. key (l / 16) * 8 + l % 8, 16-byte chunk 2k + (l / 8) % 2.
    float s[2][2] = {{0.f, 0.f}, {0.f, 0.f}};
    const int k_row = (lane / 16) * 8 + lane % 8;
#pragma unroll
    for (int k = 0; k < K_STEPS; ++k) {
      uint32_t b[4];
      mma::ldmatrix_x4(b, k_tile + mma::swizzled<ROW_BYTES>(k_row, 2 * k + (lane / 8) % 2));
      mma::mma_16816_top<scalar_t>(s[0], q_frag[k][0], q_frag[k][1], b[0], b[1]);
      mma::mma_16816_top<scalar_t>(s[1], q_frag[k][0], q_frag[k][1], b[2], b[3]);
    }

    // Online softmax for row g over this tile; keys past the slice's end are masked out. The
    // tile has at least one key before `end`, so the new max is finite.
    const int key0 = first_token + i * CTA_TILE + 2 * t;
    float tile_max = -INFINITY;
#pragma unroll
    for (int n = 0; n < 2; ++n) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        s[n][e] = key0 + 8 * n + e < end ? s[n][e] * p.scale_log2 : -INFINITY;
        tile_max = fmaxf(tile_max, s[n][e]);
      }
    }
    const float m_new = fmaxf(m, mma::quad_max(tile_max));
    const float alpha = exp2f(m - m_new);  // 0 on the first tile (m = -inf)
    m = m_new;
    l *= alpha;
#pragma unroll
    for (int n = 0; n < 2; ++n) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        s[n][e] = exp2f(s[n][e] - m_new);  // the unnormalised probability p
        l += s[n][e];
      }
    }
#pragma unroll
    for (int j = 0; j < D_TILES; ++j) {
      o[j][0] *= alpha;
      o[j][1] *= alpha;
    }

    // O += P V. P's A fragment is the score fragment itself (mma_utils.cuh): a0 = keys 2t, 2t+1,
    // a2 = keys 8+2t, 8+2t+1 of row g. V needs the transposed load: one ldmatrix.x4.trans per
    // 16 output dims gives (keys 0-7, dims 16j..), (keys 8-15, dims 16j..), (keys 0-7,
    // dims 16j+8..), (keys 8-15, dims 16j+8..): the b0, b1 of output slices 2j and 2j + 1.
    const uint32_t p0 = mma::pack2<scalar_t>(s[0][0], s[0][1]);
    const uint32_t p1 = mma::pack2<scalar_t>(s[1][0], s[1][1]);
    const int v_row = ((lane / 8) % 2) * 8 + lane % 8;
#pragma unroll
    for (int j = 0; j < D_TILES / 2; ++j) {
      uint32_t b[4];
      mma::ldmatrix_x4_trans(b, v_tile + mma::swizzled<ROW_BYTES>(v_row, 2 * j + lane / 16));
      mma::mma_16816_top<scalar_t>(o[2 * j], p0, p1, b[0], b[1]);
      mma::mma_16816_top<scalar_t>(o[2 * j + 1], p0, p1, b[2], b[3]);
    }
    __syncwarp();  // every lane has read this stage before the next issue() overwrites it
  }
  mma::cp_async_wait<0>();
  l = mma::quad_sum(l);

  // Merge the warps through shared memory (the pipeline buffers are free now).
  __syncthreads();
  float* warp_o = reinterpret_cast<float*>(smem);         // [NUM_WARPS][GROUP][HEAD_DIM]
  float* warp_m = warp_o + NUM_WARPS * GROUP * HEAD_DIM;  // [NUM_WARPS][GROUP]
  float* warp_l = warp_m + NUM_WARPS * GROUP;             // [NUM_WARPS][GROUP]
  if (g < GROUP) {
    float* row = warp_o + (warp * GROUP + g) * HEAD_DIM;
#pragma unroll
    for (int j = 0; j < D_TILES; ++j) {
      *reinterpret_cast<float2*>(row + 8 * j + 2 * t) = make_float2(o[j][0], o[j][1]);
    }
    if (t == 0) {
      warp_m[warp * GROUP + g] = m;
      warp_l[warp * GROUP + g] = l;
    }
  }
  __syncthreads();

  const int num_q_heads = p.num_kv_heads * GROUP;
  for (int i = threadIdx.x; i < GROUP * HEAD_DIM; i += NUM_WARPS * mma::kWarpSize) {
    const int h = i / HEAD_DIM;
    const int d = i % HEAD_DIM;
    float m_all = -INFINITY;
#pragma unroll
    for (int w = 0; w < NUM_WARPS; ++w) m_all = fmaxf(m_all, warp_m[w * GROUP + h]);
    float l_all = 0.f, acc = 0.f;
    if (m_all != -INFINITY) {
#pragma unroll
      for (int w = 0; w < NUM_WARPS; ++w) {
        const float weight = exp2f(warp_m[w * GROUP + h] - m_all);  // an empty warp weighs 0
        l_all += warp_l[w * GROUP + h] * weight;
        acc += warp_o[(w * GROUP + h) * HEAD_DIM + d] * weight;
      }
    }
    const float normalised = l_all > 0.f ? acc / l_all : 0.f;
    const int q_head = kv_head * GROUP + h;
    if (num_splits == 1) {
      static_cast<scalar_t*>(p.out)[seq * p.out_stride_t + q_head * p.out_stride_h + d] =
          from_float<scalar_t>(normalised);
    } else {
      const int64_t row = (static_cast<int64_t>(seq) * num_q_heads + q_head) * num_splits + split;
      p.part_out[row * HEAD_DIM + d] = normalised;
      if (d == 0) p.part_lse[row] = l_all > 0.f ? m_all + log2f(l_all) : -INFINITY;
    }
  }
}

// Combine the splits of one (sequence, query head): weights 2^(lse_s - max) over the slices.
template <typename scalar_t, int HEAD_DIM>
__global__ void __launch_bounds__(HEAD_DIM)
merge_splits_kernel(scalar_t* __restrict__ out, const int64_t out_stride_t,
                    const int64_t out_stride_h, const float* __restrict__ part_out,
                    const float* __restrict__ part_lse, const int num_splits) {
  const int q_head = blockIdx.x;
  const int seq = blockIdx.y;
  const int d = threadIdx.x;
  const int64_t row0 = (static_cast<int64_t>(seq) * gridDim.x + q_head) * num_splits;
  float lse_max = -INFINITY;
  for (int s = 0; s < num_splits; ++s) lse_max = fmaxf(lse_max, part_lse[row0 + s]);
  float total = 0.f, o = 0.f;
  if (lse_max != -INFINITY) {
    for (int s = 0; s < num_splits; ++s) {
      const float weight = exp2f(part_lse[row0 + s] - lse_max);  // empty slice: 0
      total += weight;
      o += weight * part_out[(row0 + s) * HEAD_DIM + d];
    }
  }
  out[seq * out_stride_t + q_head * out_stride_h + d] = from_float<scalar_t>(total > 0.f ? o / total : 0.f);
}

}  // namespace minivllm
