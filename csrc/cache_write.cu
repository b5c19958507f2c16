// write_kv_cache: scatter the new tokens' K and V rows into their slots of the paged cache.
//
// slot_mapping[t] = physical_block * block_size + offset says where token t goes; -1 (any
// negative slot) means "do not store" (padding rows of a CUDA-graph batch). The cache is
// [num_blocks, block_size, num_kv_heads, head_dim], so slot s is simply row s of a
// [num_blocks * block_size, num_kv_heads * head_dim] matrix: one contiguous row per token.
//
// One thread block per token; its threads copy that token's K and V rows 16 bytes at a time.
// The copy is byte-for-byte, so one kernel serves every dtype. The source rows may be strided
// views (K and V are usually slices of one fused QKV projection output).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include "vec_utils.cuh"

namespace minivllm {

template <typename slot_t>
__global__ void write_kv_cache_kernel(const char* __restrict__ key, const char* __restrict__ value,
                                      const int64_t key_stride_t, const int64_t key_stride_h,
                                      const int64_t value_stride_t, const int64_t value_stride_h,
                                      char* __restrict__ k_cache, char* __restrict__ v_cache,
                                      const slot_t* __restrict__ slot_mapping,
                                      const int num_heads, const int head_bytes) {
  const int token = blockIdx.x;
  const int64_t slot = slot_mapping[token];
  if (slot < 0) return;  // a padding token: nothing to store
  const int vecs_per_head = head_bytes / 16;
  const int64_t row_bytes = static_cast<int64_t>(num_heads) * head_bytes;
  for (int i = threadIdx.x; i < num_heads * vecs_per_head; i += blockDim.x) {
    const int head = i / vecs_per_head;
    const int byte = (i % vecs_per_head) * 16;
    const int64_t dst = slot * row_bytes + static_cast<int64_t>(head) * head_bytes + byte;
    *reinterpret_cast<uint4*>(k_cache + dst) =
        *reinterpret_cast<const uint4*>(key + token * key_stride_t + head * key_stride_h + byte);
    *reinterpret_cast<uint4*>(v_cache + dst) =
        *reinterpret_cast<const uint4*>(value + token * value_stride_t + head * value_stride_h + byte);
  }
}

void write_kv_cache(const at::Tensor& key, const at::Tensor& value, const at::Tensor& k_cache,
                    const at::Tensor& v_cache, const at::Tensor& slot_mapping) {
  TORCH_CHECK(key.is_cuda(), "write_kv_cache (cuda): key must be a CUDA tensor");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(),
              "write_kv_cache (cuda): the caches must be contiguous");
  TORCH_CHECK(key.stride(2) == 1 && value.stride(2) == 1,
              "write_kv_cache (cuda): key and value must be contiguous in head_dim");
  const int64_t elem = key.element_size();
  const int64_t head_bytes = key.size(2) * elem;
  const bool rows_aligned = head_bytes % 16 == 0 && (key.stride(0) * elem) % 16 == 0 &&
                            (key.stride(1) * elem) % 16 == 0 && (value.stride(0) * elem) % 16 == 0 &&
                            (value.stride(1) * elem) % 16 == 0 &&
                            reinterpret_cast<uintptr_t>(key.data_ptr()) % 16 == 0 &&
                            reinterpret_cast<uintptr_t>(value.data_ptr()) % 16 == 0;
  TORCH_CHECK(rows_aligned, "write_kv_cache (cuda): rows must be 16-byte aligned");
  const int num_tokens = static_cast<int>(key.size(0));
  if (num_tokens == 0) return;
  const c10::cuda::CUDAGuard guard(key.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int num_heads = static_cast<int>(key.size(1));
  const int threads = 128;
  auto launch = [&](auto* slots) {
    using slot_t = std::remove_const_t<std::remove_pointer_t<decltype(slots)>>;
    write_kv_cache_kernel<slot_t><<<num_tokens, threads, 0, stream>>>(
        static_cast<const char*>(key.data_ptr()), static_cast<const char*>(value.data_ptr()),
        key.stride(0) * elem, key.stride(1) * elem, value.stride(0) * elem, value.stride(1) * elem,
        static_cast<char*>(k_cache.data_ptr()), static_cast<char*>(v_cache.data_ptr()), slots,
        num_heads, static_cast<int>(head_bytes));
  };
  if (slot_mapping.scalar_type() == at::kLong) {
    launch(slot_mapping.data_ptr<int64_t>());
  } else {
    TORCH_CHECK(slot_mapping.scalar_type() == at::kInt,
                "write_kv_cache (cuda): slot_mapping must be int32 or int64");
    launch(slot_mapping.data_ptr<int>());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace minivllm
