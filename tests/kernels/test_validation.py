"""Bad input gets a clear error that names the argument, before any kernel runs."""

import pytest
import torch

from minivllm.kernels import paged_attention, resolve_backend, write_kv_cache
from tests.kernels.paged_inputs import make_problem


@pytest.fixture
def problem():
    return make_problem([3, 1], [10, 20], 8, 2, 16, 4, generator=torch.Generator().manual_seed(0))


def _call(p, **overrides):
    args = dict(query=p.query, k_cache=p.k_cache, v_cache=p.v_cache, block_tables=p.block_tables,
                seq_lens=p.seq_lens, cu_seqlens_q=p.cu_seqlens_q, backend="torch")
    args.update(overrides)
    return paged_attention(**args)


def test_valid_problem_runs(problem):
    assert _call(problem).shape == problem.query.shape


@pytest.mark.parametrize("name,make,error,words", [
    ("query rank", lambda p: dict(query=p.query[0]), ValueError, "query must have 3"),
    ("query type", lambda p: dict(query=p.query.numpy()), TypeError, "query must be a torch.Tensor"),
    ("query dtype", lambda p: dict(query=p.query.double()), TypeError, "query must be float32"),
    ("cache dtype", lambda p: dict(query=p.query.half()), TypeError, "k_cache"),
    ("cache rank", lambda p: dict(k_cache=p.k_cache[0]), ValueError, "k_cache must have 4"),
    ("cache pair", lambda p: dict(v_cache=p.v_cache[:-1]), ValueError, "same shape"),
    ("head dim", lambda p: dict(query=p.query[..., :8]), ValueError, "head_dim"),
    ("gqa", lambda p: dict(query=p.query[:, :7]), ValueError, "multiple of k_cache's KV heads"),
    ("table dtype", lambda p: dict(block_tables=p.block_tables.long()), TypeError,
     "block_tables must be int32"),
    ("seq_lens dtype", lambda p: dict(seq_lens=p.seq_lens.long()), TypeError,
     "seq_lens must be int32"),
    ("cu dtype", lambda p: dict(cu_seqlens_q=p.cu_seqlens_q.long()), TypeError,
     "cu_seqlens_q must be int32"),
    ("table rows", lambda p: dict(block_tables=p.block_tables[:1]), ValueError, "block_tables has 1"),
    ("cu length", lambda p: dict(cu_seqlens_q=p.cu_seqlens_q[:2]), ValueError,
     "cu_seqlens_q must have"),
    ("cu start", lambda p: dict(cu_seqlens_q=p.cu_seqlens_q + 1), ValueError, "start at 0"),
    ("cu order", lambda p: dict(cu_seqlens_q=torch.tensor([0, 4, 4], dtype=torch.int32)),
     ValueError, "strictly increasing"),
    ("cu end", lambda p: dict(cu_seqlens_q=torch.tensor([0, 1, 3], dtype=torch.int32)),
     ValueError, "cu_seqlens_q ends at 3 but query has 4"),
    ("query too long", lambda p: dict(seq_lens=torch.tensor([2, 20], dtype=torch.int32)),
     ValueError, r"queries but seq_lens\[0\] = 2"),
    ("table too short", lambda p: dict(seq_lens=torch.tensor([10, 99], dtype=torch.int32)),
     ValueError, "block_tables has room"),
    ("block id", lambda p: dict(block_tables=p.block_tables.clone().fill_(99)), ValueError,
     "block ids"),
    ("scale", lambda p: dict(scale=-1.0), ValueError, "scale"),
    ("max_seq_len", lambda p: dict(max_seq_len=5), ValueError, "max_seq_len"),
    ("max_query_len", lambda p: dict(max_query_len=0), ValueError, "max_query_len must be a positive"),
    ("max_query_len bound", lambda p: dict(max_query_len=2), ValueError, "max_query_len=2 is below"),
    ("num_splits", lambda p: dict(num_splits=0), ValueError, "num_splits"),
    ("out shape", lambda p: dict(out=torch.empty(3, 8, 16)), ValueError, "out must match"),
    ("backend", lambda p: dict(backend="tpu"), ValueError, "backend must be one of"),
])
def test_bad_input_is_named(problem, name, make, error, words):
    with pytest.raises(error, match=words):
        _call(problem, **make(problem))


def test_cuda_backend_without_extension_says_how_to_build():
    with pytest.raises(ValueError, match="cuda"):
        resolve_backend("cuda", torch.device("cpu"))


def test_write_kv_cache_checks(problem):
    p = problem
    key = torch.randn(4, 2, 16)
    slots = torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError, match="slot_mapping has 3 entries"):
        write_kv_cache(key, key, p.k_cache, p.v_cache, slots[:3], backend="torch")
    with pytest.raises(ValueError, match="cache has only"):
        write_kv_cache(key, key, p.k_cache, p.v_cache, slots + 10_000, backend="torch")
    with pytest.raises(TypeError, match="slot_mapping must be int32 or int64"):
        write_kv_cache(key, key, p.k_cache, p.v_cache, slots.float(), backend="torch")
    with pytest.raises(ValueError, match="key is"):
        write_kv_cache(key[:, :1], key[:, :1], p.k_cache, p.v_cache, slots, backend="torch")
    with pytest.raises(TypeError, match="key/value are"):
        write_kv_cache(key.half(), key.half(), p.k_cache, p.v_cache, slots, backend="torch")
