// Python bindings of the minivllm._C extension: the same two ops as minivllm.kernels.
//
// The Python entry point (minivllm/kernels/__init__.py) validates every argument and decides whether a
// call suits this extension (fp16/bf16, head_dim 64/128, GQA group 1/2/4/8, block size a power
// of two >= 8); what reaches here is already known to fit. The TORCH_CHECKs inside the ops only
// guard the raw pointers.
#include <torch/extension.h>

namespace minivllm {

void write_kv_cache(const at::Tensor& key, const at::Tensor& value, const at::Tensor& k_cache,
                    const at::Tensor& v_cache, const at::Tensor& slot_mapping);

void paged_attention(const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache,
                     const at::Tensor& block_tables, const at::Tensor& seq_lens,
                     const at::Tensor& cu_seqlens_q, double scale, bool causal,
                     const at::Tensor& out, int64_t num_splits);

}  // namespace minivllm

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "minivllm's optional CUDA kernels: paged attention on tensor cores and KV-cache writes";
  m.def("write_kv_cache", &minivllm::write_kv_cache, "Scatter K/V rows into the paged cache",
        py::arg("key"), py::arg("value"), py::arg("k_cache"), py::arg("v_cache"),
        py::arg("slot_mapping"));
  m.def("paged_attention", &minivllm::paged_attention,
        "Attention of packed queries (prefill, chunked prefill, decode, mixed) over the paged "
        "cache; writes `out`",
        py::arg("query"), py::arg("k_cache"), py::arg("v_cache"), py::arg("block_tables"),
        py::arg("seq_lens"), py::arg("cu_seqlens_q"), py::arg("scale"), py::arg("causal"),
        py::arg("out"), py::arg("num_splits") = 1);
}
