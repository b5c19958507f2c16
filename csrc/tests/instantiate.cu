// Instantiates every attention kernel without PyTorch, so that one nvcc call (seconds, not the
// minutes the torch headers take) shows each kernel's registers, spills and SASS:
//
//     nvcc -arch=sm_90a -O3 --use_fast_math -std=c++17 -Xptxas -v -c csrc/tests/instantiate.cu \
//          -o /tmp/instantiate.o 2>&1 | grep -A2 "Compiling entry"
//     cuobjdump -sass /tmp/instantiate.o | grep -c HMMA
//
// The template arguments are the ones csrc/paged_attention.cu launches (kDecode*, kPrefill*).
#include "../paged_attention_config.cuh"

namespace minivllm {

template <typename scalar_t, int HEAD_DIM>
void instantiate_all() {
  const void* kernels[] = {
      reinterpret_cast<const void*>(decode_kernel<scalar_t, HEAD_DIM, 1>),
      reinterpret_cast<const void*>(decode_kernel<scalar_t, HEAD_DIM, 2>),
      reinterpret_cast<const void*>(decode_kernel<scalar_t, HEAD_DIM, 4>),
      reinterpret_cast<const void*>(decode_kernel<scalar_t, HEAD_DIM, 8>),
      reinterpret_cast<const void*>(&merge_splits_kernel<scalar_t, HEAD_DIM>),
      reinterpret_cast<const void*>(prefill_kernel<scalar_t, HEAD_DIM, 1>),
      reinterpret_cast<const void*>(prefill_kernel<scalar_t, HEAD_DIM, 2>),
      reinterpret_cast<const void*>(prefill_kernel<scalar_t, HEAD_DIM, 4>),
      reinterpret_cast<const void*>(prefill_kernel<scalar_t, HEAD_DIM, 8>),
  };
  (void)kernels;
}

}  // namespace minivllm

extern "C" void minivllm_instantiate() {
  minivllm::instantiate_all<__nv_bfloat16, 64>();
  minivllm::instantiate_all<__nv_bfloat16, 128>();
  minivllm::instantiate_all<__half, 64>();
  minivllm::instantiate_all<__half, 128>();
}
