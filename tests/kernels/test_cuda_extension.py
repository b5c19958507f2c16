"""The optional C++/CUDA extension (csrc/) against the reference, and its routing rules.

The kernel tests need a GPU and the built extension (`MINIVLLM_CUDA_JIT=1` builds it on first
use); elsewhere they are skipped with the reason. The routing tests (which calls the extension
takes, and why it declines the others) look only at shapes and dtypes, so they run on CPU too.
"""

import itertools
import warnings

import pytest
import torch

from minivllm.kernels import cuda as cuda_ext
from minivllm.kernels import paged_attention, write_kv_cache
from tests.kernels.paged_inputs import TOLERANCE, make_problem, rel_error

HAVE_EXTENSION = cuda_ext.is_available()
needs_extension = pytest.mark.skipif(
    not HAVE_EXTENSION, reason=f"the CUDA extension cannot run here: {cuda_ext.unavailable_reason()}"
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

DTYPES = [torch.float16, torch.bfloat16]
GQA = [(4, 4), (8, 4), (8, 2), (16, 2)]  # groups 1, 2, 4 and 8
HEAD_DIMS = [64, 128]
BLOCK_SIZES = [8, 16, 32]


def _check(problem, dtype, **kwargs):
    ref = paged_attention(*problem.args(), backend="torch", **kwargs)
    out = torch.full_like(problem.query, float("nan"))  # poison: every element must be written
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a silent fallback to Triton would not test the extension
        ret = paged_attention(*problem.args(), backend="cuda", out=out, **kwargs)
    assert ret.data_ptr() == out.data_ptr()
    err = rel_error(out, ref)
    assert err < TOLERANCE[dtype], f"relative error {err:.2e}"


# --------------------------------------------------------------------------------------------
# Kernel correctness (GPU)
# --------------------------------------------------------------------------------------------
MATRIX = [
    (dtype, gqa, head_dim, BLOCK_SIZES[i % 3], i)
    for i, (dtype, gqa, head_dim) in enumerate(itertools.product(DTYPES, GQA, HEAD_DIMS))
]


@needs_extension
@pytest.mark.parametrize("dtype,gqa,head_dim,block_size,seed", MATRIX)
def test_decode_matches_reference(dtype, gqa, head_dim, block_size, seed):
    g = torch.Generator().manual_seed(seed)
    # a context of 1, on a block boundary, one past it, odd, and long enough for many tiles
    seq_lens = [1, block_size, block_size + 1, 7 * block_size - 3, 260, 1000]
    p = make_problem([1] * len(seq_lens), seq_lens, *gqa, head_dim, block_size, dtype, DEVICE,
                     generator=g)
    _check(p, dtype)


@needs_extension
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("num_splits", [1, 3, 8, 40])
def test_split_kv_matches_reference(block_size, num_splits):
    """Contexts cut into slices, including slices that see no key at all."""
    g = torch.Generator().manual_seed(block_size * 100 + num_splits)
    seq_lens = [1, block_size, block_size + 1, 7 * block_size - 3, 260, 2000]
    p = make_problem([1] * len(seq_lens), seq_lens, 8, 2, 128, block_size, torch.bfloat16, DEVICE,
                     generator=g)
    _check(p, torch.bfloat16, num_splits=num_splits)


@needs_extension
@pytest.mark.parametrize("max_seq_len", [None, 20000])
def test_long_context_default_heuristic(max_seq_len):
    """One long sequence: the heuristic splits it across the GPU."""
    g = torch.Generator().manual_seed(9)
    p = make_problem([1, 1], [20000, 333], 32, 8, 128, 16, torch.bfloat16, DEVICE, generator=g)
    _check(p, torch.bfloat16, max_seq_len=max_seq_len)


@needs_extension
def test_strided_query_view_and_scale():
    """q sliced out of a fused qkv projection (token stride > Hq * D), and a custom scale."""
    g = torch.Generator().manual_seed(4)
    p = make_problem([1, 1, 1], [20, 9, 300], 8, 2, 128, 16, torch.float16, DEVICE, generator=g)
    qkv = torch.randn(3, 12, 128, device=DEVICE, dtype=torch.float16)
    qkv[:, :8] = p.query
    q_view = qkv[:, :8]
    assert not q_view.is_contiguous()
    args = (q_view, *p.args()[1:])
    ref = paged_attention(*args, backend="torch", scale=0.3)
    out = paged_attention(*args, backend="cuda", scale=0.3)
    assert rel_error(out, ref) < TOLERANCE[torch.float16]


@needs_extension
def test_captured_in_a_cuda_graph():
    """The split count comes from shapes only, so a launch replays correctly from a graph."""
    g = torch.Generator().manual_seed(12)
    p = make_problem([1, 1], [700, 50], 16, 4, 128, 16, torch.bfloat16, DEVICE, generator=g)
    out = torch.empty_like(p.query)
    paged_attention(*p.args(), backend="cuda", out=out, max_seq_len=4096)  # warm-up
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        paged_attention(*p.args(), backend="cuda", out=out, max_seq_len=4096)
    p.seq_lens.copy_(torch.tensor([333, 49], dtype=torch.int32))  # new values, same addresses
    out.fill_(float("nan"))
    graph.replay()
    ref = paged_attention(*p.args(), backend="torch")
    assert rel_error(out, ref) < TOLERANCE[torch.bfloat16]


@needs_extension
@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_write_kv_cache_matches_reference(dtype, slot_dtype):
    g = torch.Generator().manual_seed(0)
    num_blocks, block_size, heads, head_dim = 6, 8, 3, 64
    # key/value as strided views of one fused tensor, as the model produces them
    kv = torch.randn(10, 2 * heads + 1, head_dim, generator=g).to(dtype).to(DEVICE)
    key, value = kv[:, :heads], kv[:, heads:2 * heads]
    slots = torch.randperm(num_blocks * block_size, generator=g)[:10]
    slots[[2, 7]] = -1  # padding tokens: skipped
    slots = slots.to(slot_dtype).to(DEVICE)
    caches = []
    for backend in ("torch", "cuda"):
        k_cache = torch.zeros(num_blocks, block_size, heads, head_dim, dtype=dtype, device=DEVICE)
        v_cache = torch.zeros_like(k_cache)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            write_kv_cache(key, value, k_cache, v_cache, slots, backend=backend)
        caches.append((k_cache, v_cache))
    assert torch.equal(caches[0][0], caches[1][0]) and torch.equal(caches[0][1], caches[1][1])
    assert int((caches[1][0].view(-1, heads, head_dim) != 0).any(-1).any(-1).sum()) == 8


@needs_extension
def test_prefill_falls_back_to_triton_with_a_warning():
    g = torch.Generator().manual_seed(6)
    p = make_problem([5, 1], [40, 17], 8, 2, 128, 16, torch.bfloat16, DEVICE, generator=g)
    with pytest.warns(UserWarning, match="not a decode batch"):
        out = paged_attention(*p.args(), backend="cuda")
    ref = paged_attention(*p.args(), backend="torch")
    assert rel_error(out, ref) < TOLERANCE[torch.bfloat16]


@needs_extension
@pytest.mark.parametrize("dtype,head_dim,reason", [
    (torch.float32, 64, "dtype"), (torch.float16, 80, "head_dim"),
])
def test_unsupported_decode_falls_back_with_its_reason(dtype, head_dim, reason):
    g = torch.Generator().manual_seed(8)
    p = make_problem([1, 1], [40, 17], 4, 2, head_dim, 16, dtype, DEVICE, generator=g)
    with pytest.warns(UserWarning, match=reason):
        out = paged_attention(*p.args(), backend="cuda")
    ref = paged_attention(*p.args(), backend="torch")
    assert rel_error(out, ref) < TOLERANCE[dtype]


# --------------------------------------------------------------------------------------------
# Routing (CPU too): which calls the extension takes, and the reason it gives for the others
# --------------------------------------------------------------------------------------------
def _decode_tensors(num_tokens=2, num_seqs=2, hq=8, hkv=2, head_dim=128, dtype=torch.bfloat16):
    query = torch.zeros(num_tokens, hq, head_dim, dtype=dtype)
    cache = torch.zeros(4, 16, hkv, head_dim, dtype=dtype)
    return query, cache, cache.clone(), torch.ones(num_seqs, dtype=torch.int32)


def test_a_plain_decode_batch_fits():
    assert cuda_ext.decode_unsupported(*_decode_tensors()) is None


@pytest.mark.parametrize("kwargs,reason", [
    ({"num_tokens": 5}, "not a decode batch"),
    ({"dtype": torch.float32}, "dtype"),
    ({"head_dim": 96}, "head_dim 96"),
    ({"hq": 12, "hkv": 4}, "group of 3"),
    ({"hq": 32, "hkv": 2}, "group of 16"),
])
def test_decode_unsupported_names_the_reason(kwargs, reason):
    assert reason in cuda_ext.decode_unsupported(*_decode_tensors(**kwargs))


def test_decode_unsupported_sees_layout():
    query, k_cache, v_cache, seq_lens = _decode_tensors()
    strided = k_cache.transpose(0, 1)  # same data, block and token axes swapped
    assert "non-contiguous" in cuda_ext.decode_unsupported(query, strided, strided, seq_lens)
    misaligned = torch.zeros(2 * 8 * 128 + 1, dtype=torch.bfloat16)[1:].view(2, 8, 128)
    assert "16-byte" in cuda_ext.decode_unsupported(misaligned, k_cache, v_cache, seq_lens)


def test_write_kv_unsupported_sees_alignment():
    key = torch.zeros(3, 2, 64, dtype=torch.float16)
    cache = torch.zeros(4, 8, 2, 64, dtype=torch.float16)
    assert cuda_ext.write_kv_unsupported(key, key, cache, cache) is None
    odd = torch.zeros(3, 2, 36, dtype=torch.float16)[:, :, :12]  # 24-byte rows
    odd_cache = torch.zeros(4, 8, 2, 12, dtype=torch.float16)
    assert "16-byte" in cuda_ext.write_kv_unsupported(odd, odd, odd_cache, odd_cache)


@pytest.mark.skipif(HAVE_EXTENSION, reason="the extension is built here")
def test_missing_extension_says_how_to_build():
    from minivllm.kernels import resolve_backend

    if DEVICE == "cpu":
        assert cuda_ext.unavailable_reason() == "no CUDA device is available"
    else:
        assert "MINIVLLM_BUILD_CUDA=1" in cuda_ext.unavailable_reason()
        with pytest.raises(ValueError, match="MINIVLLM_BUILD_CUDA=1"):
            resolve_backend("cuda", torch.device("cuda"))
