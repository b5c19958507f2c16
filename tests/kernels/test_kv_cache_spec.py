"""KVCacheSpec: the two cache formats, their bytes, their tensors, and who can read them."""

import pytest
import torch

from minivllm.kernels import KVCacheSpec, fp8, paged_attention, write_kv_cache
from minivllm.kernels.kv_cache_spec import DTYPES
from tests.kernels.paged_inputs import make_problem, rel_error


@pytest.mark.parametrize("dtype,name,per_head", [
    (torch.bfloat16, "bfloat16", 2 * 64), (torch.float32, "float32", 4 * 64),
    (fp8.FP8_DTYPE, "fp8_e4m3", 64 + 4),  # e4m3 values and one float32 scale
])
def test_name_and_bytes(dtype, name, per_head):
    spec = KVCacheSpec(dtype)
    assert spec.name == name and spec.bytes_per_token_head(64) == per_head
    assert spec.scaled == (dtype == fp8.FP8_DTYPE)


def test_a_dtype_no_kernel_stores_is_refused():
    with pytest.raises(TypeError, match=r"dtype: a KV cache is stored in one of .*float8_e5m2"):
        KVCacheSpec(torch.float8_e5m2)
    assert len(DTYPES) == 4


@pytest.mark.parametrize("dtype", [torch.float32, fp8.FP8_DTYPE])
def test_allocated_layer_is_what_the_kernels_read(dtype):
    """The tensors `allocate` returns take a write and an attention call as they are, and hold
    as many bytes per token and head as the spec says."""
    spec = KVCacheSpec(dtype)
    p = make_problem([3, 1], [9, 13], 4, 2, 16, 4, generator=torch.Generator().manual_seed(0))
    num_blocks, block_size, num_kv_heads, head_dim = p.k_cache.shape
    k, v, k_scale, v_scale = spec.allocate(num_blocks, block_size, num_kv_heads, head_dim, "cpu")
    assert k.shape == v.shape == p.k_cache.shape and k.dtype == v.dtype == dtype
    scales = [t for t in (k_scale, v_scale) if t is not None]
    assert len(scales) == (2 if spec.scaled else 0)
    assert all(t.shape == k.shape[:3] and bool((t == 1).all()) for t in scales)
    assert k[0, 0, 0].nbytes + sum(t[0, 0, 0].nbytes for t in scales[:1]) == spec.bytes_per_token_head(16)
    rows = (-1, num_kv_heads, head_dim)
    write_kv_cache(p.k_cache.view(rows), p.v_cache.view(rows), k, v, torch.arange(num_blocks * block_size),
                   k_scale=k_scale, v_scale=v_scale)
    out = paged_attention(p.query, k, v, *p.args()[3:], k_scale=k_scale, v_scale=v_scale)
    # fp8: e4m3's rounding of Gaussian values (docs/fp8_kv_cache.md measures 3.7e-2).
    assert rel_error(out, paged_attention(*p.args())) < (6e-2 if spec.scaled else 1e-6)


def test_who_can_read_it():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert KVCacheSpec(torch.bfloat16).unsupported_reason("cuda", gpu) is None
    assert KVCacheSpec(fp8.FP8_DTYPE).unsupported_reason("torch", cpu) is None
    assert "16-bit caches only" in KVCacheSpec(fp8.FP8_DTYPE).unsupported_reason("cuda", gpu)
