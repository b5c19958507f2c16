// Small helpers shared by the kernels: 16-byte vectors of half-precision values.
//
// A GPU thread can load at most 16 bytes in one instruction (LDG.E.128). For fp16/bf16 that is 8
// values, so every kernel here moves K, V and Q as `uint4`s of 8 elements and converts them to
// fp32 in registers: memory traffic stays in the narrow type, arithmetic happens in fp32.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace minivllm {

constexpr int kVecElems = 8;  // half-precision elements in one 16-byte vector

template <typename scalar_t>
__device__ __forceinline__ void unpack8(const uint4& raw, float (&out)[kVecElems]);

template <>
__device__ __forceinline__ void unpack8<__half>(const uint4& raw, float (&out)[kVecElems]) {
  const __half2* pairs = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
  for (int i = 0; i < kVecElems / 2; ++i) {
    const float2 f = __half22float2(pairs[i]);
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}

template <>
__device__ __forceinline__ void unpack8<__nv_bfloat16>(const uint4& raw, float (&out)[kVecElems]) {
  const __nv_bfloat162* pairs = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
  for (int i = 0; i < kVecElems / 2; ++i) {
    const float2 f = __bfloat1622float2(pairs[i]);
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}

template <typename scalar_t>
__device__ __forceinline__ scalar_t from_float(float x);

template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}

template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

}  // namespace minivllm
