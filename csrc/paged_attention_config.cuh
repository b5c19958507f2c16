// The launch shapes of the attention kernels, in one place: csrc/paged_attention.cu launches
// these instantiations, and csrc/tests/instantiate.cu compiles the same ones without PyTorch to
// read their register counts and SASS. minivllm/kernels/cuda.py chooses the decode's split count (about
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

// Prefill: 4 warps = 64 (token, head) rows per CTA, 64-key K/V tiles, 2 stages. At D = 128:
// Q 16 KB + 2 x (K 16 KB + V 16 KB) = 80 KB of shared memory and ~240 registers a thread, so two
// CTAs share an SM, and while one waits at its barrier the other's MMAs run. Measured on an H200
// (benchmarks/cuda_mma_check.py, benchmarks/RESULTS.md): causal 4 x 2048 took 0.512 ms (1.69x
// dense SDPA) this way, and 0.538 ms (1.80x) with 8 warps = 128 rows and 3 stages, which halves
// the K/V bytes copied from L2 but fits one CTA per SM: the L2 copies were not the limit, the
// idle tensor cores during each CTA's softmax and barriers were.
constexpr int kPrefillWarps = 4;
constexpr int kPrefillStages = 2;

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
