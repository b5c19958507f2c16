// The launch shapes of the attention kernels, in one place: csrc/paged_attention.cu launches
// these instantiations, and csrc/tests/instantiate.cu compiles the same ones without PyTorch to
// read their register counts and SASS. kernels/cuda.py chooses the decode's split count (about
// one CTA per SM, whatever these shapes: measured best on an H200).
#pragma once

#include "paged_decode_kernel.cuh"
#include "paged_prefill_kernel.cuh"

namespace minivllm {

// Decode: 4 warps per CTA, each with a 3-stage pipeline of 16-key tiles. At D = 128 that is
// 4 x 3 x 8 KB = 96 KB of shared memory, so two CTAs (8 warps, up to 16 tiles = 128 KB in flight)
// fit on an SM: far more than the ~30 KB per SM that Little's law asks for at ~4.8 TB/s and
// ~1 us of latency, so one CTA of a pair waiting at a barrier costs nothing.
constexpr int kDecodeWarps = 4;
constexpr int kDecodeStages = 3;

// Prefill: 8 warps = 128 (token, head) rows per CTA, 64-key K/V tiles, 3 stages. Every K/V byte a
// CTA copies serves 128 rows: with GQA group 4 that is 32 tokens x 4 heads, and at 4 x 2048 causal
// the CTAs copy about 1.1 GB from L2 in all (64 rows would copy twice that). A thread needs ~240
// registers at D = 128 (O 64, S 32, Q 32), so one CTA of 8 warps fills an SM's register file; the
// third stage keeps two tiles in flight while its warps compute. Shared memory at D = 128:
// Q 32 KB + 3 x (K 16 KB + V 16 KB) = 128 KB.
constexpr int kPrefillWarps = 8;
constexpr int kPrefillStages = 3;

template <typename scalar_t, int HEAD_DIM, int GROUP>
constexpr auto decode_kernel =
    &paged_decode_mma_kernel<scalar_t, HEAD_DIM, GROUP, kDecodeWarps, kDecodeStages>;

template <typename scalar_t, int HEAD_DIM, int GROUP>
constexpr auto prefill_kernel =
    &paged_prefill_mma_kernel<scalar_t, HEAD_DIM, GROUP, kPrefillWarps, kPrefillStages>;

template <int HEAD_DIM>
constexpr int decode_smem() {
  return decode_smem_bytes<HEAD_DIM, kDecodeWarps, kDecodeStages>();
}

template <int HEAD_DIM>
constexpr int prefill_smem() {
  return prefill_smem_bytes<HEAD_DIM, kPrefillWarps, kPrefillStages>();
}

// Query tokens in one prefill CTA: its 16 x kPrefillWarps rows hold GROUP heads per token.
template <int GROUP>
constexpr int prefill_tile_tokens() {
  return 16 * kPrefillWarps / GROUP;
}

}  // namespace minivllm
