// Paged attention for decode: one new query token per sequence, its keys and values read from
// the paged KV cache through the sequence's block table.
//
// Decode attention does almost no arithmetic per byte: every cached K and V element is read once
// and used for a handful of multiply-adds. The kernel's whole job is therefore to stream K/V at
// the memory's bandwidth, which takes three things:
//
//   1. Read each K/V byte once. All GROUP query heads that share a KV head (GQA) are handled by
//      the same thread block, so a KV head's cache is read once, not GROUP times.
//   2. Wide, coalesced loads. The cache is [num_blocks, block_size, num_kv_heads, head_dim]: one
//      token of one KV head is head_dim contiguous values (256 bytes for D=128, bf16). A group of
//      D/8 lanes reads that row as 16-byte vectors, one per lane; a warp reads 32/(D/8) tokens
//      side by side. Which physical block a token lives in comes from the block table, so the
//      tokens of a sequence can sit anywhere in the pool.
//   3. Many bytes in flight. Each lane issues the K and V loads of UNROLL tokens before it uses
//      any of them, so a warp has UNROLL x 2 x 512 bytes outstanding (D=128) and the memory
//      latency (~1 us) is hidden by the loads behind it rather than by waiting.
//
// Thread mapping, for D = 128 (LANES_PER_TOKEN = 16, TOKENS_PER_STEP = 2):
//
//     lane:   0 .. 15            16 .. 31
//     token:  t                  t + 1          (then t+2, t+3, ... for u = 1 .. UNROLL-1)
//     dims:   8*(lane%16) .. +8  (the same dims for the other token)
//
// A lane holds the same 8 dimensions of q (for every head of its group), of every K/V row it
// reads, and of its output accumulators. A score q.k is the sum over the 16 lanes of a token
// group: a 4-step butterfly of warp shuffles.
//
// Online softmax: scores are never stored. Each token group keeps, per query head, a running
// maximum m, a running sum l of exp(score - m) and the running weighted sum of V rows acc. When a
// new tile raises the maximum, l and acc are rescaled by exp(m_old - m_new). At the end the
// partial states of the token groups of a warp, then of the warps of the block, are merged the
// same way. Everything is in base 2: q is pre-multiplied by scale * log2(e), so exp2 is used.
//
// Split-KV: with few sequences (B x num_kv_heads blocks cannot fill 132 SMs) the context of each
// sequence is cut into num_splits slices, one thread block each (gridDim.z). Each writes its
// normalised partial output and its log-sum-exp, and a second small kernel merges the slices.
// The slice count comes from shapes and a host-side bound on the context only, never from the
// values in seq_lens, so the launch can be captured in a CUDA graph.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <cmath>

#include "vec_utils.cuh"

namespace minivllm {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// Merge two online-softmax states (m, l, acc) into the first. An empty state has m = -inf.
template <int GROUP>
__device__ __forceinline__ void merge_state(float (&m)[GROUP], float (&l)[GROUP],
                                            float (&acc)[GROUP][kVecElems], int h, float m_other,
                                            float l_other, const float (&acc_other)[kVecElems]) {
  const float m_new = fmaxf(m[h], m_other);
  if (m_new == -INFINITY) return;  // both empty
  const float a = exp2f(m[h] - m_new);      // exp2(-inf) = 0: an empty side weighs nothing
  const float b = exp2f(m_other - m_new);
  l[h] = l[h] * a + l_other * b;
#pragma unroll
  for (int j = 0; j < kVecElems; ++j) acc[h][j] = acc[h][j] * a + acc_other[j] * b;
  m[h] = m_new;
}

template <typename scalar_t, int HEAD_DIM, int GROUP, int NUM_WARPS, int UNROLL>
__global__ void __launch_bounds__(NUM_WARPS * kWarpSize)
paged_decode_kernel(scalar_t* __restrict__ out, const int64_t out_stride_t,
                    const int64_t out_stride_h,
                    float* __restrict__ part_out,  // [B, Hq, num_splits, D], when split
                    float* __restrict__ part_lse,  // [B, Hq, num_splits], log2 domain
                    const scalar_t* __restrict__ query, const int64_t q_stride_t,
                    const int64_t q_stride_h, const scalar_t* __restrict__ k_cache,
                    const scalar_t* __restrict__ v_cache, const int64_t cache_stride_block,
                    const int64_t cache_stride_token, const int* __restrict__ block_tables,
                    const int64_t block_table_stride, const int* __restrict__ seq_lens,
                    const int block_size, const float scale_log2) {
  constexpr int LANES_PER_TOKEN = HEAD_DIM / kVecElems;
  constexpr int TOKENS_PER_STEP = kWarpSize / LANES_PER_TOKEN;
  constexpr int WARP_TILE = TOKENS_PER_STEP * UNROLL;  // tokens a warp handles per iteration
  constexpr int BLOCK_TILE = WARP_TILE * NUM_WARPS;    // tokens the block handles per iteration

  const int kv_head = blockIdx.x;
  const int seq = blockIdx.y;
  const int split = blockIdx.z;
  const int num_splits = gridDim.z;
  const int num_q_heads = gridDim.x * GROUP;
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int token_slot = lane / LANES_PER_TOKEN;          // which side-by-side token
  const int dim0 = (lane % LANES_PER_TOKEN) * kVecElems;  // this lane's first dimension

  // This split's slice of the context, in whole block tiles so no iteration is half empty.
  // Using the sequence's own length (not the bound the grid was sized from) spreads a short
  // sequence over all its splits too; splits past its end see no token and say so (m = -inf).
  const int seq_len = seq_lens[seq];
  const int per_split = (seq_len + num_splits - 1) / num_splits;
  const int slice = (per_split + BLOCK_TILE - 1) / BLOCK_TILE * BLOCK_TILE;
  const int begin = split * slice;
  const int end = min(seq_len, begin + slice);

  // q for every head of the group, this lane's 8 dims, scaled so that scores are in log2 units.
  float q[GROUP][kVecElems];
#pragma unroll
  for (int h = 0; h < GROUP; ++h) {
    const scalar_t* q_ptr = query + seq * q_stride_t + (kv_head * GROUP + h) * q_stride_h + dim0;
    unpack8<scalar_t>(*reinterpret_cast<const uint4*>(q_ptr), q[h]);
#pragma unroll
    for (int j = 0; j < kVecElems; ++j) q[h][j] *= scale_log2;
  }

  float m[GROUP], l[GROUP], acc[GROUP][kVecElems];
#pragma unroll
  for (int h = 0; h < GROUP; ++h) {
    m[h] = -INFINITY;
    l[h] = 0.f;
#pragma unroll
    for (int j = 0; j < kVecElems; ++j) acc[h][j] = 0.f;
  }

  const int* table = block_tables + seq * block_table_stride;
  const int64_t head_offset = static_cast<int64_t>(kv_head) * HEAD_DIM + dim0;

  // The loop bound depends only on the warp, so all 32 lanes run the same iterations and the
  // full-mask shuffles below are safe.
  for (int tile = begin + warp * WARP_TILE; tile < end; tile += BLOCK_TILE) {
    // Issue every load of the tile first: UNROLL K rows and UNROLL V rows in flight at once.
    uint4 k_raw[UNROLL], v_raw[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int token = tile + u * TOKENS_PER_STEP + token_slot;
      if (token < end) {
        const int logical_block = token / block_size;
        const int physical_block = table[logical_block];  // the indirection of PagedAttention
        const int offset = token - logical_block * block_size;
        const int64_t at = physical_block * cache_stride_block + offset * cache_stride_token + head_offset;
        k_raw[u] = *reinterpret_cast<const uint4*>(k_cache + at);
        v_raw[u] = *reinterpret_cast<const uint4*>(v_cache + at);
      } else {
        k_raw[u] = make_uint4(0, 0, 0, 0);
        v_raw[u] = make_uint4(0, 0, 0, 0);
      }
    }

    // Scores: partial dot products over this lane's dims, summed across the token's lanes.
    float s[UNROLL][GROUP];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      float k[kVecElems];
      unpack8<scalar_t>(k_raw[u], k);
#pragma unroll
      for (int h = 0; h < GROUP; ++h) {
        float dot = 0.f;
#pragma unroll
        for (int j = 0; j < kVecElems; ++j) dot = fmaf(q[h][j], k[j], dot);
        s[u][h] = dot;
      }
    }
#pragma unroll
    for (int offset = LANES_PER_TOKEN / 2; offset > 0; offset /= 2) {
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) {
#pragma unroll
        for (int h = 0; h < GROUP; ++h) s[u][h] += __shfl_xor_sync(kFullMask, s[u][h], offset);
      }
    }

    // Online softmax update, once per tile (not per token): one rescale of acc per tile.
#pragma unroll
    for (int h = 0; h < GROUP; ++h) {
      float tile_max = -INFINITY;
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) {
        if (tile + u * TOKENS_PER_STEP + token_slot >= end) s[u][h] = -INFINITY;
        tile_max = fmaxf(tile_max, s[u][h]);
      }
      const float m_new = fmaxf(m[h], tile_max);
      // A token group whose tokens are all past the end stays empty (m = -inf); subtracting 0
      // instead of -inf keeps exp2(-inf - m) = 0 rather than NaN.
      const float m_ref = (m_new == -INFINITY) ? 0.f : m_new;
      const float alpha = exp2f(m[h] - m_ref);
      l[h] *= alpha;
#pragma unroll
      for (int j = 0; j < kVecElems; ++j) acc[h][j] *= alpha;
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) {
        s[u][h] = exp2f(s[u][h] - m_ref);  // now the unnormalised probability p
        l[h] += s[u][h];
      }
      m[h] = m_new;
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      float v[kVecElems];
      unpack8<scalar_t>(v_raw[u], v);
#pragma unroll
      for (int h = 0; h < GROUP; ++h) {
#pragma unroll
        for (int j = 0; j < kVecElems; ++j) acc[h][j] = fmaf(s[u][h], v[j], acc[h][j]);
      }
    }
  }

  // Merge the token groups of the warp: lanes `LANES_PER_TOKEN` apart hold the same dims.
#pragma unroll
  for (int offset = LANES_PER_TOKEN; offset < kWarpSize; offset *= 2) {
#pragma unroll
    for (int h = 0; h < GROUP; ++h) {
      const float m_other = __shfl_xor_sync(kFullMask, m[h], offset);
      const float l_other = __shfl_xor_sync(kFullMask, l[h], offset);
      float acc_other[kVecElems];
#pragma unroll
      for (int j = 0; j < kVecElems; ++j) acc_other[j] = __shfl_xor_sync(kFullMask, acc[h][j], offset);
      merge_state<GROUP>(m, l, acc, h, m_other, l_other, acc_other);
    }
  }

  // Merge the warps through shared memory, then write: the output directly when the context is
  // not split, else this split's normalised partial output and its log-sum-exp.
  __shared__ float warp_m[NUM_WARPS][GROUP];
  __shared__ float warp_l[NUM_WARPS][GROUP];
  __shared__ float warp_acc[NUM_WARPS][GROUP][HEAD_DIM];
  if (lane < LANES_PER_TOKEN) {
#pragma unroll
    for (int h = 0; h < GROUP; ++h) {
#pragma unroll
      for (int j = 0; j < kVecElems; ++j) warp_acc[warp][h][dim0 + j] = acc[h][j];
      if (lane == 0) {
        warp_m[warp][h] = m[h];
        warp_l[warp][h] = l[h];
      }
    }
  }
  __syncthreads();

  for (int i = threadIdx.x; i < GROUP * HEAD_DIM; i += NUM_WARPS * kWarpSize) {
    const int h = i / HEAD_DIM;
    const int d = i % HEAD_DIM;
    float m_all = -INFINITY;
#pragma unroll
    for (int w = 0; w < NUM_WARPS; ++w) m_all = fmaxf(m_all, warp_m[w][h]);
    float l_all = 0.f, o = 0.f;
    if (m_all != -INFINITY) {
#pragma unroll
      for (int w = 0; w < NUM_WARPS; ++w) {
        const float weight = exp2f(warp_m[w][h] - m_all);
        l_all += warp_l[w][h] * weight;
        o += warp_acc[w][h][d] * weight;
      }
    }
    const float normalised = l_all > 0.f ? o / l_all : 0.f;
    const int q_head = kv_head * GROUP + h;
    if (num_splits == 1) {
      out[seq * out_stride_t + q_head * out_stride_h + d] = from_float<scalar_t>(normalised);
    } else {
      const int64_t row = (static_cast<int64_t>(seq) * num_q_heads + q_head) * num_splits + split;
      part_out[row * HEAD_DIM + d] = normalised;
      if (d == 0) part_lse[row] = l_all > 0.f ? m_all + log2f(l_all) : -INFINITY;
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

// ------------------------------------------------------------------------------------------------
// Host side: checks, the split count, and the dispatch over (dtype, head_dim, group).
// ------------------------------------------------------------------------------------------------
constexpr int kNumWarps = 4;

// Tokens per loop iteration of one thread block: a split shorter than this is pure overhead.
constexpr int block_tile(int head_dim, int unroll) {
  return kWarpSize / (head_dim / kVecElems) * unroll * kNumWarps;
}

// Fewer tokens per lane when the group is large: q and acc then take GROUP x 8 registers each.
constexpr int unroll_for(int group) { return group <= 4 ? 8 : 4; }

// How many slices to cut each context into. Measured on the H200 (benchmarks/tune_attn.py
// --only cuda): more, shorter thread blocks than fit at once beat one wave of long ones, since
// blocks that finish early are replaced and the last wave is short, so the grid aims at about
// 32 blocks per SM. But every slice adds a partial result for the merge kernel to read, so a
// slice never gets shorter than 16 block tiles (1,024 tokens for D = 128).
int choose_num_splits(int num_blocks, int num_sms, int64_t max_context, int tile) {
  constexpr int kBlocksPerSm = 32;
  constexpr int kMinTilesPerSlice = 16;
  const int target = kBlocksPerSm * num_sms;
  if (num_blocks >= target) return 1;
  const int64_t wanted = (target + num_blocks - 1) / num_blocks;
  const int64_t by_length = std::max<int64_t>(1, max_context / (kMinTilesPerSlice * tile));
  return static_cast<int>(std::min(wanted, by_length));
}

int multiprocessor_count(int device) {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count;
}

template <typename scalar_t, int HEAD_DIM, int GROUP>
void launch_decode(const at::Tensor& out, const at::Tensor& query, const at::Tensor& k_cache,
                   const at::Tensor& v_cache, const at::Tensor& block_tables,
                   const at::Tensor& seq_lens, double scale, int64_t max_context,
                   int64_t num_splits) {
  constexpr int UNROLL = unroll_for(GROUP);
  const int batch = static_cast<int>(seq_lens.size(0));
  const int num_kv_heads = static_cast<int>(k_cache.size(2));
  const int num_q_heads = num_kv_heads * GROUP;
  const int block_size = static_cast<int>(k_cache.size(1));
  const int num_sms = multiprocessor_count(query.get_device());
  const int splits = num_splits > 0
                         ? static_cast<int>(num_splits)
                         : choose_num_splits(batch * num_kv_heads, num_sms, max_context,
                                             block_tile(HEAD_DIM, UNROLL));
  TORCH_CHECK(batch <= 65535, "paged_attention (cuda): at most 65535 sequences per call, got ", batch);
  TORCH_CHECK(splits <= 65535, "paged_attention (cuda): num_splits must be <= 65535, got ", splits);

  at::Tensor part_out, part_lse;
  float* part_out_ptr = nullptr;
  float* part_lse_ptr = nullptr;
  if (splits > 1) {  // from PyTorch's caching allocator: cheap, and safe inside graph capture
    const auto opts = query.options().dtype(at::kFloat);
    part_out = at::empty({batch, num_q_heads, splits, HEAD_DIM}, opts);
    part_lse = at::empty({batch, num_q_heads, splits}, opts);
    part_out_ptr = part_out.data_ptr<float>();
    part_lse_ptr = part_lse.data_ptr<float>();
  }

  using T = scalar_t;
  const float scale_log2 = static_cast<float>(scale * M_LOG2E);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(num_kv_heads, batch, splits);
  paged_decode_kernel<T, HEAD_DIM, GROUP, kNumWarps, UNROLL><<<grid, kNumWarps * kWarpSize, 0, stream>>>(
      reinterpret_cast<T*>(out.data_ptr()), out.stride(0), out.stride(1), part_out_ptr, part_lse_ptr,
      reinterpret_cast<const T*>(query.data_ptr()), query.stride(0), query.stride(1),
      reinterpret_cast<const T*>(k_cache.data_ptr()), reinterpret_cast<const T*>(v_cache.data_ptr()),
      k_cache.stride(0), k_cache.stride(1), block_tables.data_ptr<int>(), block_tables.stride(0),
      seq_lens.data_ptr<int>(), block_size, scale_log2);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (splits > 1) {
    merge_splits_kernel<T, HEAD_DIM><<<dim3(num_q_heads, batch), HEAD_DIM, 0, stream>>>(
        reinterpret_cast<T*>(out.data_ptr()), out.stride(0), out.stride(1), part_out_ptr,
        part_lse_ptr, splits);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename scalar_t, int HEAD_DIM>
void dispatch_group(int group, const at::Tensor& out, const at::Tensor& query,
                    const at::Tensor& k_cache, const at::Tensor& v_cache,
                    const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale,
                    int64_t max_context, int64_t num_splits) {
  switch (group) {
    case 1: return launch_decode<scalar_t, HEAD_DIM, 1>(out, query, k_cache, v_cache, block_tables, seq_lens, scale, max_context, num_splits);
    case 2: return launch_decode<scalar_t, HEAD_DIM, 2>(out, query, k_cache, v_cache, block_tables, seq_lens, scale, max_context, num_splits);
    case 4: return launch_decode<scalar_t, HEAD_DIM, 4>(out, query, k_cache, v_cache, block_tables, seq_lens, scale, max_context, num_splits);
    case 8: return launch_decode<scalar_t, HEAD_DIM, 8>(out, query, k_cache, v_cache, block_tables, seq_lens, scale, max_context, num_splits);
    default: TORCH_CHECK(false, "paged_attention (cuda): GQA group size must be 1, 2, 4 or 8, got ", group);
  }
}

template <typename scalar_t>
void dispatch_head_dim(int head_dim, int group, const at::Tensor& out, const at::Tensor& query,
                       const at::Tensor& k_cache, const at::Tensor& v_cache,
                       const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale,
                       int64_t max_context, int64_t num_splits) {
  switch (head_dim) {
    case 64: return dispatch_group<scalar_t, 64>(group, out, query, k_cache, v_cache, block_tables, seq_lens, scale, max_context, num_splits);
    case 128: return dispatch_group<scalar_t, 128>(group, out, query, k_cache, v_cache, block_tables, seq_lens, scale, max_context, num_splits);
    default: TORCH_CHECK(false, "paged_attention (cuda): head_dim must be 64 or 128, got ", head_dim);
  }
}

bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

void paged_attention_decode(const at::Tensor& query, const at::Tensor& k_cache,
                            const at::Tensor& v_cache, const at::Tensor& block_tables,
                            const at::Tensor& seq_lens, const at::Tensor& cu_seqlens_q,
                            double scale, bool causal, const at::Tensor& out,
                            c10::optional<int64_t> max_seq_len, int64_t num_splits) {
  // The Python entry point validated shapes and values; these checks guard the raw pointers.
  TORCH_CHECK(query.is_cuda(), "paged_attention (cuda): query must be a CUDA tensor");
  const auto dtype = query.scalar_type();
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16,
              "paged_attention (cuda): query must be float16 or bfloat16, got ", dtype);
  TORCH_CHECK(k_cache.scalar_type() == dtype && v_cache.scalar_type() == dtype && out.scalar_type() == dtype,
              "paged_attention (cuda): query, caches and out must share a dtype");
  TORCH_CHECK(query.size(0) == seq_lens.size(0),
              "paged_attention (cuda): decode only (one query per sequence); got ", query.size(0),
              " queries for ", seq_lens.size(0), " sequences");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.strides() == v_cache.strides(),
              "paged_attention (cuda): k_cache and v_cache must be contiguous");
  TORCH_CHECK(query.stride(2) == 1 && out.stride(2) == 1 && query.stride(0) % kVecElems == 0 &&
                  query.stride(1) % kVecElems == 0 && aligned16(query) && aligned16(k_cache) &&
                  aligned16(v_cache),
              "paged_attention (cuda): query and the caches need 16-byte aligned rows");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && seq_lens.scalar_type() == at::kInt,
              "paged_attention (cuda): block_tables and seq_lens must be int32");
  (void)cu_seqlens_q;  // decode: sequence b owns query row b
  (void)causal;        // one query at the end of its context sees every key either way
  const int64_t num_kv_heads = k_cache.size(2);
  TORCH_CHECK(query.size(1) % num_kv_heads == 0, "paged_attention (cuda): Hq % Hkv != 0");
  const int group = static_cast<int>(query.size(1) / num_kv_heads);
  const int64_t max_context =
      max_seq_len.has_value() ? *max_seq_len : block_tables.size(1) * k_cache.size(1);
  const c10::cuda::CUDAGuard guard(query.device());
  if (seq_lens.size(0) == 0) return;
  if (dtype == at::kHalf) {
    dispatch_head_dim<__half>(static_cast<int>(query.size(2)), group, out, query, k_cache, v_cache,
                              block_tables, seq_lens, scale, max_context, num_splits);
  } else {
    dispatch_head_dim<__nv_bfloat16>(static_cast<int>(query.size(2)), group, out, query, k_cache,
                                     v_cache, block_tables, seq_lens, scale, max_context, num_splits);
  }
}

}  // namespace minivllm
