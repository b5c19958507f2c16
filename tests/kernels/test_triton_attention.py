"""The Triton kernels against the reference: dtypes fp32/fp16/bf16, GQA groups 1, 4 and 8, head
dims 64, 128 and 80 (not a power of two), block sizes 8, 16 and 32, split-KV.

On CPU these run in the Triton interpreter (small shapes); on a GPU, natively. Every case uses
shuffled, non-contiguous block tables and a batch that mixes full prefills, chunked prefills
(queries over an existing context) and decodes, with lengths of 1, on block boundaries and long.
"""

import itertools

import pytest
import torch

from minivllm.kernels import available_backends, paged_attention, write_kv_cache
from tests._triton_interpreter import LaunchLog
from tests.devices import DEVICE, ON_DEVICE
from tests.kernels.paged_inputs import TOLERANCE, make_problem, rel_error

pytestmark = [*ON_DEVICE,
              pytest.mark.skipif("triton" not in available_backends(DEVICE), reason="Triton cannot run here")]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
GQA = [(4, 4), (8, 2), (8, 1)]  # (Hq, Hkv): group size 1, 4 and 8
HEAD_DIMS = [64, 128, 80]  # 80: not a power of two, handled by masking
BLOCK_SIZES = [8, 16, 32]


def _check(problem, dtype, **kwargs):
    ref = paged_attention(*problem.args(), backend="torch", **kwargs)
    out = paged_attention(*problem.args(), backend="triton", **kwargs)
    err = rel_error(out, ref)
    assert err < TOLERANCE[dtype], f"relative error {err:.2e}"


# One mixed batch per (dtype, GQA, head_dim), block size rotating, so the full product of the
# matrix's axes is covered pairwise without 81 interpreter runs.
MATRIX = [
    (dtype, gqa, head_dim, BLOCK_SIZES[i % 3], i)
    for i, (dtype, gqa, head_dim) in enumerate(itertools.product(DTYPES, GQA, HEAD_DIMS))
]


@pytest.mark.parametrize("dtype,gqa,head_dim,block_size,seed", MATRIX)
def test_mixed_batch_matches_reference(dtype, gqa, head_dim, block_size, seed):
    g = torch.Generator().manual_seed(seed)
    # decode (1 of 1, 1 of 2*bs), a prefill ending on a block boundary, a chunk over a context,
    # and a prefill of length 1.
    query_lens = [1, 1, 2 * block_size, 13, 1]
    seq_lens = [1, 2 * block_size, 2 * block_size, 3 * block_size + 5, 1]
    p = make_problem(query_lens, seq_lens, *gqa, head_dim, block_size, dtype, DEVICE, generator=g)
    _check(p, dtype)


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("num_splits", [1, 3, 8])
def test_decode_split_kv_matches_reference(block_size, num_splits):
    """Decode batches with the context cut into slices, including slices that see no key."""
    g = torch.Generator().manual_seed(block_size * 10 + num_splits)
    seq_lens = [1, block_size, block_size + 1, 7 * block_size - 3, 260]
    p = make_problem([1] * 5, seq_lens, 8, 2, 64, block_size, torch.float16, DEVICE, generator=g)
    _check(p, torch.float16, num_splits=num_splits)


@pytest.mark.parametrize("num_splits", [17, 40])
def test_more_splits_than_the_merge_tile(num_splits, monkeypatch):
    """The merge kernel reads the partials SPLITS_TILE splits at a time, rescaling as it goes:
    with a tile of 16, 17 splits take 2 tiles (the last with one split) and 40 take 3."""
    from minivllm.kernels import triton_attention

    monkeypatch.setattr(triton_attention, "SPLITS_TILE", 16)
    g = torch.Generator().manual_seed(num_splits)
    p = make_problem([1, 1], [700, 33], 4, 1, 64, 16, torch.float32, DEVICE, generator=g)
    _check(p, torch.float32, num_splits=num_splits)


@pytest.mark.parametrize("gqa,head_dim", [((12, 4), 80), ((8, 1), 64)])
def test_decode_split_kv_merge_kernel(gqa, head_dim):
    """Decode cut into 6 slices: the attention kernel writes partials and the merge kernel
    combines them; it agrees with the reference for a group of 3 with a padded head dim, and a
    group of 8."""
    g = torch.Generator().manual_seed(head_dim)
    p = make_problem([1] * 3, [1, 45, 130], *gqa, head_dim, 8, torch.float32, DEVICE, generator=g)
    with LaunchLog() as names:
        _check(p, torch.float32, num_splits=6)
    if DEVICE == "cpu":
        assert names.count("_merge_splits_kernel") == 1


@pytest.mark.parametrize("num_splits", [None, 2, 5])
def test_chunked_prefill_split_kv_matches_reference(num_splits):
    g = torch.Generator().manual_seed(7)
    p = make_problem([40, 1, 17], [300, 90, 17], 8, 2, 64, 16, torch.bfloat16, DEVICE, generator=g)
    _check(p, torch.bfloat16, num_splits=num_splits)


def test_long_context_default_heuristic():
    g = torch.Generator().manual_seed(3)
    p = make_problem([1, 1], [1500, 999], 4, 1, 64, 16, torch.float32, DEVICE, generator=g)
    _check(p, torch.float32, max_seq_len=1500)


@pytest.mark.parametrize("gqa,max_query_len", [((8, 4), 5), ((12, 4), 5), ((8, 2), 8)])
def test_verification_with_a_small_query_tile(gqa, max_query_len):
    """A verification step (1 + k queries per sequence, some with fewer) told its bound takes a
    query tile of at most 32 rows and shorter context slices; it agrees with the reference, for
    groups of 2, 3 (rows not a power of two) and 4."""
    from minivllm.kernels.triton_attention import _block_m

    group = gqa[0] // gqa[1]
    assert _block_m(False, group, 64, max_query_len) == max(16, 1 << (max_query_len * group - 1).bit_length())
    g = torch.Generator().manual_seed(max_query_len * group)
    query_lens = [max_query_len, 2, max_query_len]
    p = make_problem(query_lens, [40, 130, max_query_len], *gqa, 64, 16, torch.float32, DEVICE, generator=g)
    _check(p, torch.float32, max_query_len=max_query_len, max_seq_len=130)


def test_split_and_tile_rules():
    """Decode and verification (every query of a sequence in one small tile) cut a context into
    slices as short as one K/V tile; a prefill chunk keeps slices of 256 keys, and a tile of 128
    query rows."""
    from minivllm.kernels.triton_attention import _block_m, _few_queries, _min_slice, choose_num_splits

    assert _few_queries(True, None, 8) and _few_queries(False, 5, 4) and not _few_queries(False, 9, 4)
    assert not _few_queries(False, None, 2)  # no bound given: a prefill's tile
    assert _block_m(False, 2, 128, None) == 128 and _block_m(False, 4, 128, 9) == 128
    assert _block_m(False, 2, 128, 5) == 16 and _block_m(False, 4, 128, 5) == 32
    assert _min_slice(True, 128) == 128 and _min_slice(False, 64) == 256
    assert choose_num_splits(8, 132, 1024, _min_slice(True, 128)) == 8  # batch-1 decode over 1k keys
    assert choose_num_splits(8, 132, 1024, _min_slice(True, 64)) == 16  # a batch-1 verification
    assert choose_num_splits(8, 132, 1024, _min_slice(False, 64)) == 4  # a prefill chunk
    assert choose_num_splits(8, 132, 40960, _min_slice(True, 128)) == 33  # two programs an SM


@pytest.mark.parametrize("causal", [False])
def test_non_causal_matches_reference(causal):
    g = torch.Generator().manual_seed(11)
    p = make_problem([5, 1, 20], [5, 40, 50], 8, 2, 64, 16, torch.float32, DEVICE, generator=g)
    _check(p, torch.float32, causal=causal)


def test_group_not_dividing_the_tile():
    """GQA group of 3 (12 query heads over 4 KV heads) leaves unused rows in every tile."""
    g = torch.Generator().manual_seed(5)
    p = make_problem([9, 1], [30, 70], 12, 4, 64, 16, torch.float32, DEVICE, generator=g)
    _check(p, torch.float32)


def test_out_is_written_in_place_and_fully():
    g = torch.Generator().manual_seed(2)
    p = make_problem([6, 1, 1], [6, 33, 100], 8, 2, 64, 16, torch.float16, DEVICE, generator=g)
    out = torch.full_like(p.query, float("nan"))  # poison: every element must be overwritten
    ret = paged_attention(*p.args(), backend="triton", out=out)
    assert ret.data_ptr() == out.data_ptr()
    assert not out.isnan().any()
    ref = paged_attention(*p.args(), backend="torch")
    assert rel_error(out, ref) < TOLERANCE[torch.float16]


def test_strided_query_view():
    """q sliced out of a fused qkv projection: token stride larger than Hq * D."""
    g = torch.Generator().manual_seed(4)
    p = make_problem([4, 1], [20, 9], 4, 2, 64, 8, torch.float32, DEVICE, generator=g)
    qkv = torch.randn(p.query.shape[0], 8, 64, device=DEVICE)
    qkv[:, :4] = p.query
    q_view = qkv[:, :4]
    assert not q_view.is_contiguous()
    args = (q_view, *p.args()[1:])
    ref = paged_attention(*args, backend="torch")
    assert rel_error(paged_attention(*args, backend="triton"), ref) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 80])
def test_write_kv_cache_matches_reference(dtype, head_dim):
    g = torch.Generator().manual_seed(0)
    num_blocks, block_size, heads = 6, 8, 3
    key = torch.randn(10, heads, head_dim, generator=g).to(dtype).to(DEVICE)
    value = torch.randn(10, heads, head_dim, generator=g).to(dtype).to(DEVICE)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:10]
    slots[[2, 7]] = -1  # padding tokens: skipped
    slots = slots.to(DEVICE)
    caches = []
    for backend in ("torch", "triton"):
        k_cache = torch.zeros(num_blocks, block_size, heads, head_dim, dtype=dtype, device=DEVICE)
        v_cache = torch.zeros_like(k_cache)
        write_kv_cache(key, value, k_cache, v_cache, slots, backend=backend)
        caches.append((k_cache, v_cache))
    assert torch.equal(caches[0][0], caches[1][0]) and torch.equal(caches[0][1], caches[1][1])
    flat = caches[1][0].view(-1, heads, head_dim)
    assert torch.equal(flat[slots[0].long()], key[0])
    assert int((flat != 0).any(-1).any(-1).sum()) == 8  # exactly the 8 real tokens were written
