"""The optional C++/CUDA extension (csrc/) against the reference, and its routing rules.

The kernel tests are GPU tests (marker `gpu`): on a GPU machine they build the extension just in
time and run; elsewhere they are skipped with the reason. They cover both tensor-core kernels: decode
(with and without split-KV) and prefill (full, chunked, mixed with decodes, non-causal), on
awkward shapes (head_dim 64/128, GQA groups 1-8, block sizes 8-64, contexts ending mid-block,
garbage in unused block-table entries) and under CUDA-graph capture. The routing tests (which
calls the extension takes, why it declines the others, how many KV splits a decode gets) look
only at shapes and dtypes, so they run on CPU too.
"""

import itertools
import os
import warnings

import pytest
import torch

from minivllm.kernels import cuda as cuda_ext
from minivllm.kernels import paged_attention, write_kv_cache
from tests.kernels.paged_inputs import TOLERANCE, make_problem, rel_error

HAVE_EXTENSION = cuda_ext.is_available()
# On a GPU machine the tests build the extension just in time (tests/conftest.py sets
# MINIVLLM_CUDA_JIT=1 there unless it is 0): a build that fails fails the kernel tests, with the
# compiler's message. Only MINIVLLM_CUDA_JIT=0 without an ahead-of-time build skips them.
BUILD_WANTED = os.environ.get(cuda_ext.JIT_ENV) == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def needs_extension(test):
    """A kernel test: a GPU test (skipped without CUDA) that runs the extension."""
    skip = pytest.mark.skipif(not (HAVE_EXTENSION or BUILD_WANTED),
                              reason=f"the CUDA extension cannot run here: {cuda_ext.unavailable_reason()}")
    return pytest.mark.gpu(skip(test))

DTYPES = [torch.float16, torch.bfloat16]
GQA = [(4, 4), (8, 4), (8, 2), (16, 2)]  # groups 1, 2, 4 and 8
HEAD_DIMS = [64, 128]
BLOCK_SIZES = [8, 16, 32, 64]


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
MATRIX = [  # block sizes rotate so that each head_dim meets each block size (in one dtype or the other)
    (dtype, gqa, head_dim, BLOCK_SIZES[(i + i // 8) % len(BLOCK_SIZES)], i)
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
@pytest.mark.parametrize("dtype,gqa,head_dim,block_size,seed", MATRIX)
def test_prefill_matches_reference(dtype, gqa, head_dim, block_size, seed):
    """Whole prompts (query length = context), one shorter and one longer than a query tile, with
    lengths that end mid-block and mid-tile."""
    g = torch.Generator().manual_seed(100 + seed)
    lens = [1, 5, 2 * block_size + 3, 77, 300]
    p = make_problem(lens, lens, *gqa, head_dim, block_size, dtype, DEVICE, generator=g)
    _check(p, dtype)


@needs_extension
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("gqa,head_dim", [((8, 8), 128), ((16, 4), 64), ((16, 2), 128)])
def test_chunked_prefill_matches_reference(gqa, head_dim, block_size):
    """Queries at the end of a longer cached context: the causal diagonal sits mid-context."""
    g = torch.Generator().manual_seed(block_size + head_dim)
    query_lens = [1, 17, 64, 200]
    seq_lens = [40, 17 + 3 * block_size + 5, 1000, 1200]
    p = make_problem(query_lens, seq_lens, *gqa, head_dim, block_size, torch.bfloat16, DEVICE,
                     generator=g)
    _check(p, torch.bfloat16)


@needs_extension
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gqa", GQA)
def test_mixed_batch_matches_reference(dtype, gqa):
    """The engine's mixed step: decodes and prefill chunks in one call (the prefill kernel)."""
    g = torch.Generator().manual_seed(len(str(gqa)))
    query_lens = [1, 1, 130, 1, 9, 1]
    seq_lens = [500, 1, 900, 33, 9, 2048]
    p = make_problem(query_lens, seq_lens, *gqa, 128, 16, dtype, DEVICE, generator=g)
    _check(p, dtype)


@needs_extension
def test_non_causal_prefill_matches_reference():
    g = torch.Generator().manual_seed(3)
    p = make_problem([30, 7, 100], [90, 7, 100], 8, 2, 64, 16, torch.float16, DEVICE, generator=g)
    _check(p, torch.float16, causal=False)


@needs_extension
@pytest.mark.parametrize("kind", ["prefill", "chunked", "mixed"])
def test_prefill_captured_in_a_cuda_graph(kind):
    """The prefill grid comes from tensor shapes only: one graph replays correctly for new query
    lengths, contexts and block tables with the same token count."""
    g = torch.Generator().manual_seed(21)
    shapes = {  # (query lengths, contexts) at capture, then at replay (same total tokens)
        "prefill": (([100, 60], [100, 60]), ([30, 130], [30, 130])),
        "chunked": (([64, 64], [700, 64]), ([1, 127], [1500, 900])),
        "mixed": (([1, 1, 98], [300, 20, 98]), ([1, 1, 98], [2000, 1, 500])),
    }[kind]
    (q0, s0), (q1, s1) = shapes
    p = make_problem(q0, s0, 16, 4, 128, 16, torch.bfloat16, DEVICE, generator=g)
    p1 = make_problem(q1, s1, 16, 4, 128, 16, torch.bfloat16, DEVICE, generator=g)
    assert p1.block_tables.shape[1] <= 2048 // 16
    tables = torch.full((len(q0), 2048 // 16), -1, dtype=torch.int32, device=DEVICE)
    cache_k = torch.cat([p.k_cache, p1.k_cache])
    cache_v = torch.cat([p.v_cache, p1.v_cache])
    tables[:, :p.block_tables.shape[1]] = p.block_tables
    out = torch.empty_like(p.query)
    args = (p.query, cache_k, cache_v, tables, p.seq_lens, p.cu_seqlens_q)
    paged_attention(*args, backend="cuda", out=out)  # warm-up
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        paged_attention(*args, backend="cuda", out=out)
    # New values at the same addresses: the second problem's blocks sit after the first's.
    p.query.copy_(p1.query)
    tables.fill_(-1)
    used = p1.block_tables >= 0
    tables[:, :p1.block_tables.shape[1]] = torch.where(used, p1.block_tables + p.k_cache.shape[0],
                                                       p1.block_tables)
    p.seq_lens.copy_(p1.seq_lens)
    p.cu_seqlens_q.copy_(p1.cu_seqlens_q)
    out.fill_(float("nan"))
    graph.replay()
    ref = paged_attention(*args, backend="torch")
    assert rel_error(out, ref) < TOLERANCE[torch.bfloat16]


@needs_extension
@pytest.mark.parametrize("dtype,head_dim,block_size,reason", [
    (torch.float32, 64, 16, "dtype"), (torch.float16, 80, 16, "head_dim"),
    (torch.float16, 64, 12, "block_size 12"), (torch.bfloat16, 128, 4, "block_size 4"),
])
def test_unsupported_call_falls_back_with_its_reason(dtype, head_dim, block_size, reason):
    g = torch.Generator().manual_seed(8)
    p = make_problem([1, 3], [40, 17], 4, 2, head_dim, block_size, dtype, DEVICE, generator=g)
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


def test_decode_and_prefill_batches_fit():
    assert cuda_ext.attention_unsupported(*_decode_tensors()) is None
    assert cuda_ext.attention_unsupported(*_decode_tensors(num_tokens=300)) is None  # prefill


@pytest.mark.parametrize("block_size,fits", [(4, False), (8, True), (12, False), (16, True),
                                             (24, False), (64, True), (256, True)])
def test_block_size_must_be_a_power_of_two_of_at_least_8(block_size, fits):
    query, _, _, seq_lens = _decode_tensors()
    cache = torch.zeros(4, block_size, 2, 128, dtype=torch.bfloat16)
    reason = cuda_ext.attention_unsupported(query, cache, cache, seq_lens)
    assert (reason is None) == fits
    if not fits:
        assert f"block_size {block_size}" in reason


@pytest.mark.parametrize("kwargs,reason", [
    ({"dtype": torch.float32}, "dtype"),
    ({"head_dim": 96}, "head_dim 96"),
    ({"hq": 12, "hkv": 4}, "group of 3"),
    ({"hq": 32, "hkv": 2}, "group of 16"),
])
def test_attention_unsupported_names_the_reason(kwargs, reason):
    assert reason in cuda_ext.attention_unsupported(*_decode_tensors(**kwargs))


def test_attention_unsupported_sees_layout():
    query, k_cache, v_cache, seq_lens = _decode_tensors()
    strided = torch.zeros(16, 16, 2, 128, dtype=torch.bfloat16).transpose(0, 1)  # axes swapped
    assert "non-contiguous" in cuda_ext.attention_unsupported(query, strided, strided, seq_lens)
    misaligned = torch.zeros(2 * 8 * 128 + 1, dtype=torch.bfloat16)[1:].view(2, 8, 128)
    assert "16-byte" in cuda_ext.attention_unsupported(misaligned, k_cache, v_cache, seq_lens)
    odd_out = torch.zeros(2, 8, 129, dtype=torch.bfloat16)[:, :, :128]  # head stride 129
    assert "odd strides" in cuda_ext.attention_unsupported(query, k_cache, v_cache, seq_lens,
                                                           odd_out)


def test_attention_unsupported_sees_strided_metadata():
    query, k_cache, v_cache, _ = _decode_tensors()
    seq_lens = torch.ones(4, dtype=torch.int32)[::2]
    assert "strided" in cuda_ext.attention_unsupported(query, k_cache, v_cache, seq_lens)
    seq_lens = torch.ones(2, dtype=torch.int32)
    table = torch.zeros(8, 2, dtype=torch.int32).t()  # [2, 8] with entries of a row 2 apart
    assert "strided" in cuda_ext.attention_unsupported(query, k_cache, v_cache, seq_lens,
                                                       block_tables=table)
    table = torch.zeros(2, 8, dtype=torch.int32)[:, :5]  # a row view of a wider table is fine
    assert cuda_ext.attention_unsupported(query, k_cache, v_cache, seq_lens,
                                          block_tables=table) is None


# H100 / H200: 132 SMs, and the rule aims at one CTA per SM (measured best, minivllm/kernels/cuda.py).
@pytest.mark.parametrize("num_seqs,max_context,splits", [
    (64, 4096, 1),     # 512 CTAs: more than the SMs already
    (256, 1024, 1),    # 2048 CTAs
    (4, 32768, 5),     # 32 CTAs want ceil(132 / 32) = 5 slices
    (1, 32768, 17),    # 8 CTAs want 17 slices (measured best: 16 or 32, not 64)
    (1, 4096, 8),      # ... but a slice keeps >= 512 keys: 8
    (1, 100, 1),       # too short to cut
])
def test_decode_num_splits(num_seqs, max_context, splits):
    assert cuda_ext.decode_num_splits(num_seqs, 8, 128, max_context, num_sms=132) == splits


def test_decode_num_splits_never_exceeds_max_splits():
    assert cuda_ext.decode_num_splits(1, 1, 64, 10**7, num_sms=1000) == cuda_ext.MAX_SPLITS


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
