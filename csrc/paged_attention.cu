// Host side of paged attention: checks on the raw pointers, the launch shapes, and the dispatch
// over (dtype, head_dim, GQA group). The kernels themselves are in paged_decode_kernel.cuh and
// paged_prefill_kernel.cuh, which include nothing from PyTorch (csrc/tests/instantiate.cu
// compiles them alone).
//
// One entry point serves the engine's whole step, like the Triton kernel: a batch with one query
// per sequence runs the decode kernel (with split-KV when the batch is small); any other batch
// (prefill, chunked prefill, and mixed batches of prefill chunks and decodes) runs the prefill
// kernel, in which a decode is just a query tile with one token.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>

#include "paged_attention_config.cuh"

namespace minivllm {

namespace {

// Kernels with more than 48 KB of dynamic shared memory must say so before their launch. This is
// a property of the function, not a stream operation, so it is safe during graph capture.
void allow_shared_memory(const void* kernel, int bytes) {
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
}

PagedAttentionParams make_params(const at::Tensor& query, const at::Tensor& k_cache,
                                 const at::Tensor& v_cache, const at::Tensor& block_tables,
                                 const at::Tensor& seq_lens, const at::Tensor& cu_seqlens_q,
                                 double scale, bool causal, const at::Tensor& out) {
  PagedAttentionParams p{};
  p.out = out.data_ptr();
  p.out_stride_t = out.stride(0);
  p.out_stride_h = out.stride(1);
  p.query = query.data_ptr();
  p.q_stride_t = query.stride(0);
  p.q_stride_h = query.stride(1);
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.block_bytes = static_cast<int>(k_cache.stride(0) * k_cache.element_size());
  p.token_bytes = static_cast<int>(k_cache.stride(1) * k_cache.element_size());
  p.block_tables = block_tables.data_ptr<int>();
  p.block_table_stride = block_tables.stride(0);
  p.seq_lens = seq_lens.data_ptr<int>();
  p.cu_seqlens_q = cu_seqlens_q.data_ptr<int>();
  p.num_seqs = static_cast<int>(seq_lens.size(0));
  p.num_kv_heads = static_cast<int>(k_cache.size(2));
  p.block_shift = __builtin_ctz(static_cast<unsigned>(k_cache.size(1)));  // a power of two
  p.scale_log2 = static_cast<float>(scale * M_LOG2E);
  p.causal = causal;
  return p;
}

// Decode, its context cut into `splits` slices (minivllm/kernels/cuda.py chooses the count from shapes).
template <typename scalar_t, int HEAD_DIM, int GROUP>
void launch_decode(PagedAttentionParams p, const at::Tensor& query, int splits) {
  const auto kernel = decode_kernel<scalar_t, HEAD_DIM, GROUP>;
  constexpr int threads = kDecodeWarps * mma::kWarpSize;
  constexpr int smem = decode_smem<HEAD_DIM>();
  allow_shared_memory(reinterpret_cast<const void*>(kernel), smem);
  const int batch = p.num_seqs;
  const int num_q_heads = p.num_kv_heads * GROUP;

  at::Tensor part_out, part_lse;
  if (splits > 1) {  // from PyTorch's caching allocator: cheap, and safe inside graph capture
    const auto opts = query.options().dtype(at::kFloat);
    part_out = at::empty({batch, num_q_heads, splits, HEAD_DIM}, opts);
    part_lse = at::empty({batch, num_q_heads, splits}, opts);
    p.part_out = part_out.data_ptr<float>();
    p.part_lse = part_lse.data_ptr<float>();
  }
  auto stream = c10::cuda::getCurrentCUDAStream();
  kernel<<<dim3(p.num_kv_heads, batch, splits), threads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (splits > 1) {
    merge_splits_kernel<scalar_t, HEAD_DIM><<<dim3(num_q_heads, batch), HEAD_DIM, 0, stream>>>(
        static_cast<scalar_t*>(p.out), p.out_stride_t, p.out_stride_h, p.part_out, p.part_lse,
        splits);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename scalar_t, int HEAD_DIM, int GROUP>
void launch_prefill(const PagedAttentionParams& p, const at::Tensor& query) {
  const auto kernel = prefill_kernel<scalar_t, HEAD_DIM, GROUP>;
  constexpr int threads = kPrefillWarps * mma::kWarpSize;
  constexpr int smem = prefill_smem<HEAD_DIM>();
  allow_shared_memory(reinterpret_cast<const void*>(kernel), smem);
  // Query tiles of kPrefillTokens<GROUP> tokens x GROUP heads. Sequence b's tiles start at tile
  // cu_seqlens_q[b] / tokens + b, so num_tokens / tokens + num_seqs tiles cover every sequence
  // whatever its length: the grid comes from shapes only (spare tiles exit at once).
  constexpr int tokens = prefill_tile_tokens<GROUP>();
  const int64_t num_tiles = query.size(0) / tokens + p.num_seqs;
  auto stream = c10::cuda::getCurrentCUDAStream();
  kernel<<<dim3(static_cast<unsigned>(num_tiles), p.num_kv_heads), threads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, int HEAD_DIM, int GROUP>
void launch(const PagedAttentionParams& p, const at::Tensor& query, int splits) {
  if (query.size(0) == p.num_seqs) {  // every sequence has at least one query: all decodes
    launch_decode<scalar_t, HEAD_DIM, GROUP>(p, query, splits);
  } else {
    launch_prefill<scalar_t, HEAD_DIM, GROUP>(p, query);
  }
}

template <typename scalar_t, int HEAD_DIM>
void dispatch_group(int group, const PagedAttentionParams& p, const at::Tensor& query, int splits) {
  switch (group) {
    case 1: return launch<scalar_t, HEAD_DIM, 1>(p, query, splits);
    case 2: return launch<scalar_t, HEAD_DIM, 2>(p, query, splits);
    case 4: return launch<scalar_t, HEAD_DIM, 4>(p, query, splits);
    case 8: return launch<scalar_t, HEAD_DIM, 8>(p, query, splits);
    default: TORCH_CHECK(false, "paged_attention (cuda): GQA group size must be 1, 2, 4 or 8, got ", group);
  }
}

template <typename scalar_t>
void dispatch_head_dim(int head_dim, int group, const PagedAttentionParams& p,
                       const at::Tensor& query, int splits) {
  switch (head_dim) {
    case 64: return dispatch_group<scalar_t, 64>(group, p, query, splits);
    case 128: return dispatch_group<scalar_t, 128>(group, p, query, splits);
    default: TORCH_CHECK(false, "paged_attention (cuda): head_dim must be 64 or 128, got ", head_dim);
  }
}

bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

}  // namespace

void paged_attention(const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache,
                     const at::Tensor& block_tables, const at::Tensor& seq_lens,
                     const at::Tensor& cu_seqlens_q, double scale, bool causal,
                     const at::Tensor& out, int64_t num_splits) {
  // The Python entry point validated shapes and values; these checks guard the raw pointers.
  TORCH_CHECK(query.is_cuda(), "paged_attention (cuda): query must be a CUDA tensor");
  const auto dtype = query.scalar_type();
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16,
              "paged_attention (cuda): query must be float16 or bfloat16, got ", dtype);
  TORCH_CHECK(k_cache.scalar_type() == dtype && v_cache.scalar_type() == dtype && out.scalar_type() == dtype,
              "paged_attention (cuda): query, caches and out must share a dtype");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.strides() == v_cache.strides(),
              "paged_attention (cuda): k_cache and v_cache must be contiguous");
  const int64_t block_size = k_cache.size(1);
  TORCH_CHECK(block_size >= 8 && (block_size & (block_size - 1)) == 0,
              "paged_attention (cuda): block_size must be a power of two >= 8, got ", block_size);
  TORCH_CHECK(k_cache.stride(0) * k_cache.element_size() < (int64_t{1} << 31),
              "paged_attention (cuda): one KV block must be smaller than 2 GB");
  TORCH_CHECK(query.stride(2) == 1 && out.stride(2) == 1 && query.stride(0) % kVecElems == 0 &&
                  query.stride(1) % kVecElems == 0 && out.stride(0) % 2 == 0 &&
                  out.stride(1) % 2 == 0 && aligned16(query) && aligned16(k_cache) &&
                  aligned16(v_cache) && aligned16(out),
              "paged_attention (cuda): query, out and the caches need 16-byte aligned rows");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && seq_lens.scalar_type() == at::kInt &&
                  cu_seqlens_q.scalar_type() == at::kInt,
              "paged_attention (cuda): block_tables, seq_lens and cu_seqlens_q must be int32");
  TORCH_CHECK(seq_lens.size(0) <= 65535,
              "paged_attention (cuda): at most 65535 sequences per call, got ", seq_lens.size(0));
  const int64_t num_kv_heads = k_cache.size(2);
  TORCH_CHECK(query.size(1) % num_kv_heads == 0, "paged_attention (cuda): Hq % Hkv != 0");
  const int group = static_cast<int>(query.size(1) / num_kv_heads);
  TORCH_CHECK(num_splits >= 1 && num_splits <= 65535,
              "paged_attention (cuda): num_splits must be in [1, 65535], got ", num_splits);
  const c10::cuda::CUDAGuard guard(query.device());
  if (seq_lens.size(0) == 0) return;
  const int splits = static_cast<int>(num_splits);
  const PagedAttentionParams p =
      make_params(query, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, scale, causal, out);
  if (dtype == at::kHalf) {
    dispatch_head_dim<__half>(static_cast<int>(query.size(2)), group, p, query, splits);
  } else {
    dispatch_head_dim<__nv_bfloat16>(static_cast<int>(query.size(2)), group, p, query, splits);
  }
}

}  // namespace minivllm
