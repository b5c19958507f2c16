// The tensor-core building blocks of the attention kernels: cp.async copies into shared memory,
// an XOR swizzle that keeps shared memory free of bank conflicts, ldmatrix, and mma.sync.
//
// Everything here is a thin wrapper over one PTX instruction (sm_80 and newer, so sm_90 too).
// The kernels are written against the layouts described below; read this once and the kernels'
// index arithmetic follows.
//
// ------------------------------------------------------------------------------------------------
// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32:  D = A x B + C
// ------------------------------------------------------------------------------------------------
// One instruction of one warp multiplies a 16 x 16 tile A (M x K, 16-bit) by a 16 x 8 tile B
// (K x N, 16-bit) and adds a 16 x 8 tile C (fp32). No thread owns a whole row or column: each of
// the 32 lanes holds a few elements of every operand in its registers, at positions fixed by the
// lane number. Write the lane as
//
//     g = lane / 4   ("group", 0..7)      t = lane % 4   ("thread in group", 0..3)
//
// A, 4 registers of two 16-bit values each (the lower column in the lower half):
//     a0 = A[g    ][2t, 2t+1]        a2 = A[g    ][2t+8, 2t+9]
//     a1 = A[g + 8][2t, 2t+1]        a3 = A[g + 8][2t+8, 2t+9]
// B, 2 registers (two consecutive K values of one column n = g):
//     b0 = B[2t, 2t+1][g]            b1 = B[2t+8, 2t+9][g]
// C and D, 4 fp32 registers:
//     c0, c1 = C[g    ][2t, 2t+1]    c2, c3 = C[g + 8][2t, 2t+1]
//
// So a quad of lanes (same g) holds one row of C: lane t has its columns 2t and 2t+1. A row-wise
// reduction over C (the softmax max and sum) is two shuffles within the quad (xor 1, xor 2).
//
// The layout of C is the layout of A, column pairs for column pairs. That is what lets attention
// chain its two products without moving data: the scores S = Q K^T come out as C tiles of 8 keys
// each, and two neighbouring ones (keys 0-7 and 8-15), converted to 16 bit, are exactly the A
// registers of P for the next product O += P V over those 16 keys:
//     a0 = S-tile 0 (c0, c1)   a1 = S-tile 0 (c2, c3)   a2 = S-tile 1 (c0, c1)   a3 = S-tile 1 (c2, c3)
//
// ------------------------------------------------------------------------------------------------
// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: four 8 x 8 tiles from shared memory
// ------------------------------------------------------------------------------------------------
// Each lane gives the shared-memory address of one 16-byte row: lanes 8i .. 8i+7 give rows 0..7
// of matrix i. Lane `lane` then receives, in register i, two elements of matrix i:
//     plain:   M_i[g][2t, 2t+1]       (row g, two neighbouring columns)
//     .trans:  M_i[2t, 2t+1][g]       (two neighbouring rows, column g)
// Compare with the fragments above. K stored row by row ([token][dim]) is B = K^T for S = Q K^T
// in "col" layout: a plain ldmatrix of the 8 x 8 tile (tokens n0..n0+7, dims k0..k0+7) gives
// b0 = B[2t,2t+1][g] = K[g][2t,2t+1]. V stored the same way ([token][dim]) is B = V itself for
// O = P V (K = tokens, N = dims), so it needs the transposed load: .trans of (tokens k0..k0+7,
// dims n0..n0+7) gives V[2t,2t+1][g] = b0. One x4 load fills the B registers of two MMAs.
//
// ------------------------------------------------------------------------------------------------
// Shared memory: rows of 16-byte chunks, XOR-swizzled
// ------------------------------------------------------------------------------------------------
// Shared memory has 32 banks of 4 bytes; a request is served in one pass when its 32 lanes touch
// distinct banks (or the same word). ldmatrix reads its 8 rows of a matrix as 8 x 16 bytes in one
// pass, so those 8 chunks must cover all 32 banks, i.e. sit at 8 different offsets modulo 128
// bytes. A K/V tile row is one token's head_dim values: 256 bytes (D = 128) or 128 bytes (D = 64),
// a multiple of 128, so in a plain layout chunk c of 8 consecutive rows would all sit in the same
// 4 banks: an 8-way conflict. The swizzle stores chunk c of row r at chunk position
//
//     c ^ (r % 8)
//
// which permutes the chunks within each aligned group of 8 (128 bytes). Eight consecutive rows
// then put their chunk c at 8 different positions: conflict-free ldmatrix, plain or transposed.
// The cp.async writes stay conflict-free too: 8 lanes write 8 different chunks of one row, and
// the XOR only permutes them. No padding, so no wasted bytes and 16-byte alignment everywhere.
//
// ------------------------------------------------------------------------------------------------
// cp.async.cg.shared.global: global -> shared without passing through registers
// ------------------------------------------------------------------------------------------------
// A 16-byte copy that the thread issues and forgets: it does not wait for the data, so a warp can
// have many tiles in flight while it computes on an earlier one. Copies are grouped
// (commit_group) and waited for by group (wait_group N: until at most N groups are pending).
// Completion is per thread, so after the wait a __syncwarp / __syncthreads makes the other
// lanes' copies visible. With a source size of 0 the 16 bytes are zero-filled instead of read:
// keys past the end of a context become zeros, never stale data (a stale NaN in V times a zero
// probability would still be NaN). ".cg" caches in L2 only: K/V are streamed, L1 would not help.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace minivllm {
namespace mma {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kChunkBytes = 16;  // one cp.async, one ldmatrix row
constexpr int kChunkElems = 8;   // 16-bit elements in a chunk

__device__ __forceinline__ uint32_t shared_address(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}

// Byte offset of chunk `chunk` of row `row` in a swizzled tile with `ROW_BYTES` bytes per row.
template <int ROW_BYTES>
__device__ __forceinline__ uint32_t swizzled(int row, int chunk) {
  static_assert(ROW_BYTES % 128 == 0, "the swizzle permutes chunks within 128-byte groups");
  return row * ROW_BYTES + ((chunk ^ (row & 7)) * kChunkBytes);
}

// 16 bytes global -> shared; `valid == false` writes 16 zero bytes and reads nothing.
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool valid) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

// Wait until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address));
}

// d = a x b + d on a 16 x 8 x 16 tile (fragments as described at the top of this file).
template <typename scalar_t>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1);

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                         uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                  uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// The same MMA when rows 8..15 of A are known to be zero (decode: the GQA group has at most 8
// query heads, so rows g + 8 are always padding). Only rows 0..7 of D are kept: d0, d1 are
// accumulated, and the rows-8..15 results go to scratch registers that die at once, so the
// accumulators of the padding rows cost no registers.
template <typename scalar_t>
__device__ __forceinline__ void mma_16816_top(float (&d)[2], uint32_t a0, uint32_t a2, uint32_t b0,
                                              uint32_t b1);

template <>
__device__ __forceinline__ void mma_16816_top<__nv_bfloat16>(float (&d)[2], uint32_t a0, uint32_t a2,
                                                             uint32_t b0, uint32_t b1) {
  [[maybe_unused]] float unused0, unused1;
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %10, %11};\n"
      : "+f"(d[0]), "+f"(d[1]), "=f"(unused0), "=f"(unused1)
      : "r"(a0), "r"(0u), "r"(a2), "r"(0u), "r"(b0), "r"(b1), "f"(0.f), "f"(0.f));
}

template <>
__device__ __forceinline__ void mma_16816_top<__half>(float (&d)[2], uint32_t a0, uint32_t a2,
                                                      uint32_t b0, uint32_t b1) {
  [[maybe_unused]] float unused0, unused1;
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %10, %11};\n"
      : "+f"(d[0]), "+f"(d[1]), "=f"(unused0), "=f"(unused1)
      : "r"(a0), "r"(0u), "r"(a2), "r"(0u), "r"(b0), "r"(b1), "f"(0.f), "f"(0.f));
}

// Two fp32 values -> one register of two 16-bit values, the first in the lower half (the lower
// column of an A fragment pair).
template <typename scalar_t>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);

template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// Row-wise reductions over a C fragment: the 4 lanes of a quad hold one row.
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(kFullMask, x, 1));
  return fmaxf(x, __shfl_xor_sync(kFullMask, x, 2));
}

__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(kFullMask, x, 1);
  return x + __shfl_xor_sync(kFullMask, x, 2);
}

}  // namespace mma
}  // namespace minivllm
