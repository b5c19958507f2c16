"""Backend selection and the dispatch table (CPU): which implementation runs, and the fallback
from the CUDA extension with a warning that gives the reason."""

import warnings

import pytest
import torch

import minivllm.kernels as kernels
from minivllm.kernels import backends, paged_attention, write_kv_cache
from tests.kernels.paged_inputs import make_problem, rel_error


def test_public_names():
    assert kernels.BACKENDS == ("auto", "torch", "sdpa", "triton", "cuda")
    assert set(kernels.AUTO_PREFERS_CUDA) == set(backends.KERNELS)
    for name in kernels.__all__:
        assert hasattr(kernels, name)


def test_table_covers_every_op_and_backend():
    for op, impls in backends.KERNELS.items():
        assert set(impls) == set(kernels.BACKENDS) - {"auto"}, op
        assert op in backends.CUDA_DECLINES


def test_auto_on_cpu_is_sdpa():
    assert kernels.resolve_backend("auto", torch.device("cpu")) == "sdpa"
    assert {"torch", "sdpa"} <= set(kernels.available_backends("cpu"))


@pytest.fixture
def extension_declines(monkeypatch):
    """Pretend the extension is built and chosen, and that it declines every call."""
    monkeypatch.setattr(backends, "resolve_backend", lambda backend, device, op: "cuda")
    for op in backends.CUDA_DECLINES:
        monkeypatch.setitem(backends.CUDA_DECLINES, op, lambda **call: "a reason the test gave")
        monkeypatch.setitem(backends.KERNELS[op], "cuda", lambda **call: pytest.fail("ran cuda"))


def _problem():
    return make_problem([3, 1], [10, 20], 4, 2, 16, 4, generator=torch.Generator().manual_seed(0))


def test_explicit_cuda_falls_back_with_the_reason(extension_declines):
    p = _problem()
    with pytest.warns(UserWarning, match="paged_attention runs on .* for a reason the test gave") \
            as record:
        out = paged_attention(*p.args(), backend="cuda")
    assert record[0].filename == __file__  # the warning points at the caller of the public op
    assert rel_error(out, paged_attention(*p.args(), backend="torch")) < 1e-5
    key = torch.randn(2, 2, 16)
    with pytest.warns(UserWarning, match="write_kv_cache runs on"):
        write_kv_cache(key, key, p.k_cache, p.v_cache, torch.tensor([0, 5]), backend="cuda")
    assert torch.equal(p.k_cache[1, 1], key[1])  # slot 5 = block 1, offset 1


def test_auto_falls_back_silently(extension_declines):
    p = _problem()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        paged_attention(*p.args(), backend="auto")
