"""The CPU backend ("sdpa") against the reference: random batches of decodes, prompts and chunks
of prompts, GQA, block sizes, fp8 caches; and the plan that one step's layers share."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minivllm.kernels import fp8, paged_attention, plan_attention, write_kv_cache
from tests.kernels.paged_inputs import make_problem, rel_error


@st.composite
def batches(draw):
    """(query_lens, seq_lens): each sequence a decode (1 query), a whole prompt, or a chunk."""
    query_lens, seq_lens = [], []
    for _ in range(draw(st.integers(1, 5))):
        seq_len = draw(st.integers(1, 40))
        kind = draw(st.sampled_from(["decode", "prompt", "chunk"]))
        query_len = {"decode": 1, "prompt": seq_len,
                     "chunk": draw(st.integers(1, seq_len))}[kind]
        query_lens.append(query_len)
        seq_lens.append(seq_len)
    return query_lens, seq_lens


@settings(max_examples=40, deadline=None)
@given(batch=batches(), heads=st.sampled_from([(4, 4), (4, 2), (6, 1)]),
       block_size=st.sampled_from([1, 4, 16]), causal=st.booleans(), seed=st.integers(0, 2**16))
def test_sdpa_matches_the_reference(batch, heads, block_size, causal, seed):
    query_lens, seq_lens = batch
    p = make_problem(query_lens, seq_lens, *heads, 16, block_size,
                     generator=torch.Generator().manual_seed(seed))
    ref = paged_attention(*p.args(), backend="torch", causal=causal)
    out = paged_attention(*p.args(), backend="sdpa", causal=causal)
    assert rel_error(out, ref) < 1e-5


def test_padding_never_reads_a_slot_nobody_wrote():
    """Decodes of different lengths are padded to the longest: the padding must not read cache
    rows outside the sequences (NaN here, as uninitialised memory may be)."""
    p = make_problem([1, 1], [3, 14], 2, 2, 8, 4, generator=torch.Generator().manual_seed(6))
    # One more block, 0, that no sequence owns: the tables move up by one.
    tables = torch.where(p.block_tables >= 0, p.block_tables + 1, p.block_tables)
    shape = (p.k_cache.shape[0] + 1, *p.k_cache.shape[1:])
    nan_k, nan_v = torch.full(shape, float("nan")), torch.full(shape, float("nan"))
    for b, seq_len in enumerate(p.seq_lens.tolist()):
        for pos in range(seq_len):
            block, offset = int(p.block_tables[b, pos // 4]), pos % 4
            nan_k[block + 1, offset] = p.k_cache[block, offset]
            nan_v[block + 1, offset] = p.v_cache[block, offset]
    args = (p.query, nan_k, nan_v, tables, p.seq_lens, p.cu_seqlens_q)
    out = paged_attention(*args, backend="sdpa")
    assert rel_error(out, paged_attention(*args, backend="torch")) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_close_to_the_reference(dtype):
    p = make_problem([1, 5, 1, 9], [30, 12, 3, 20], 4, 2, 32, 4, dtype=dtype,
                     generator=torch.Generator().manual_seed(1))
    out = paged_attention(*p.args(), backend="sdpa")
    assert out.dtype == dtype
    assert rel_error(out, paged_attention(*p.args(), backend="torch")) < 1e-2


def test_fp8_cache_matches_the_reference():
    p = make_problem([1, 4, 1], [17, 9, 5], 4, 2, 16, 4, generator=torch.Generator().manual_seed(2))
    k8 = torch.zeros(p.k_cache.shape, dtype=fp8.FP8_DTYPE)
    v8 = torch.zeros_like(k8)
    k_scale = torch.zeros(p.k_cache.shape[:3])
    v_scale = torch.zeros_like(k_scale)
    rows = (-1, *p.k_cache.shape[2:])
    slots = torch.arange(p.k_cache.shape[0] * p.k_cache.shape[1])
    write_kv_cache(p.k_cache.view(rows), p.v_cache.view(rows), k8, v8, slots, backend="sdpa",
                   k_scale=k_scale, v_scale=v_scale)
    args = (p.query, k8, v8, p.block_tables, p.seq_lens, p.cu_seqlens_q)
    ref = paged_attention(*args, backend="torch", k_scale=k_scale, v_scale=v_scale)
    out = paged_attention(*args, backend="sdpa", k_scale=k_scale, v_scale=v_scale)
    assert rel_error(out, ref) < 1e-5


@pytest.mark.parametrize("slots", [[5, 0, 9], [5, -1, 9]], ids=["all-real", "with-padding"])
def test_write_kv_cache_equals_the_reference(slots):
    g = torch.Generator().manual_seed(3)
    key, value = torch.randn(3, 2, 8, generator=g), torch.randn(3, 2, 8, generator=g)
    caches = {b: (torch.zeros(3, 4, 2, 8), torch.zeros(3, 4, 2, 8)) for b in ("torch", "sdpa")}
    for backend, (k_cache, v_cache) in caches.items():
        write_kv_cache(key, value, k_cache, v_cache, torch.tensor(slots), backend=backend)
    assert all(torch.equal(a, b) for a, b in zip(caches["torch"], caches["sdpa"]))


def test_one_plan_serves_every_layer():
    """Two layers (two caches) of one step, with the step's plan: each as without it."""
    g = torch.Generator().manual_seed(4)
    layers = [make_problem([1, 6, 1], [11, 6, 4], 4, 2, 16, 4, generator=torch.Generator().manual_seed(5))
              for _ in range(2)]
    first = layers[0]
    meta = (first.block_tables, first.seq_lens, first.cu_seqlens_q)
    plan = plan_attention(*meta, first.k_cache)
    assert plan is not None and plan.num_tokens == 8
    for p in layers:
        query = torch.randn(p.query.shape, generator=g)
        planned = paged_attention(query, p.k_cache, p.v_cache, *meta, backend="sdpa", plan=plan)
        assert torch.equal(planned, paged_attention(query, p.k_cache, p.v_cache, *meta, backend="sdpa"))


def test_backends_without_a_plan_get_none():
    p = make_problem([1], [5], 2, 2, 8, 4)
    assert plan_attention(p.block_tables, p.seq_lens, p.cu_seqlens_q, p.k_cache, backend="torch") is None


def test_a_plan_of_other_tensors_is_refused():
    p = make_problem([1, 3], [5, 3], 2, 2, 8, 4)
    plan = plan_attention(p.block_tables, p.seq_lens, p.cu_seqlens_q, p.k_cache)
    with pytest.raises(ValueError, match="plan was made from other"):
        paged_attention(p.query, p.k_cache, p.v_cache, p.block_tables.clone(), p.seq_lens,
                        p.cu_seqlens_q, plan=plan)
    with pytest.raises(ValueError, match="plan was made for backend 'sdpa'"):
        paged_attention(*p.args(), backend="torch", plan=plan)
    with pytest.raises(ValueError, match="causal"):
        paged_attention(*p.args(), causal=False, plan=plan)


def test_plan_checks_the_metadata_values():
    p = make_problem([1, 3], [5, 3], 2, 2, 8, 4)
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        plan_attention(p.block_tables, p.seq_lens, torch.tensor([0, 2, 1], dtype=torch.int32), p.k_cache)
