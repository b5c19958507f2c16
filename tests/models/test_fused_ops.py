"""The fused Triton kernels of minivllm/layers/fused_ops.py against the PyTorch layers they
replace. On CPU they run in the Triton interpreter (tests/conftest.py), on a GPU natively.

Tolerances: in float32 both sides round the same values once per op, so they agree to a few
float32 ulps. In half precision the fused kernels round once at the end where PyTorch rounds after
every op, so they may differ by one rounding step of the dtype.
"""

import pytest
import torch

from minivllm.layers import fused_ops
from minivllm.layers.activation import SiluAndMul
from minivllm.layers.layernorm import RMSNorm
from minivllm.layers.rotary import RotaryEmbedding, apply_rotary, inverse_frequencies
from tests.devices import DEVICE, ON_DEVICE
from tests.kernels.paged_inputs import rel_error

pytestmark = ON_DEVICE
TOL = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def randn(*shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [64, 96])  # 96: not a power of two, masked columns
def test_rms_norm_matches_torch(dtype, hidden):
    norm = RMSNorm(hidden, eps=1e-5).to(DEVICE)
    norm.weight.data = randn(hidden, dtype=torch.float32, seed=1).to(dtype)
    x = randn(5, hidden, dtype=dtype)
    assert rel_error(fused_ops.rms_norm(x, norm.weight, norm.eps), norm._norm(x)) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm_updates_the_residual_in_place(dtype):
    norm = RMSNorm(64, eps=1e-6).to(DEVICE).to(dtype)
    x, residual = randn(7, 64, dtype=dtype, seed=2), randn(7, 64, dtype=dtype, seed=3)
    expected_sum = x + residual  # the residual stream stays in the model dtype
    expected = norm._norm(expected_sum)
    out = fused_ops.rms_norm(x, norm.weight, norm.eps, residual=residual)
    if dtype == torch.bfloat16 and DEVICE == "cpu":
        # The interpreter converts float32 -> bf16 by truncation, not rounding: off by an ulp.
        assert rel_error(residual, expected_sum) < TOL[dtype]
    else:
        assert torch.equal(residual, expected_sum)
    assert rel_error(out, expected) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_norm", [False, True])
def test_qk_norm_rope_matches_torch(dtype, with_norm):
    """q and k as strided views of one fused qkv tensor, rotated in place; Qwen3 norms first."""
    tokens, hq, hkv, d = 6, 4, 2, 64
    qkv = randn(tokens, hq + 2 * hkv, d, dtype=dtype, seed=4)
    q, k = qkv[:, :hq], qkv[:, hq:hq + hkv]
    positions = torch.tensor([0, 1, 2, 7, 100, 3], device=DEVICE)
    rotary = RotaryEmbedding(d, 128, inverse_frequencies(d, {"rope_type": "default", "rope_theta": 10000.0}))
    rotary = rotary.to(DEVICE)
    q_norm, k_norm = RMSNorm(d).to(DEVICE).to(dtype), RMSNorm(d).to(DEVICE).to(dtype)
    q_norm.weight.data = randn(d, dtype=dtype, seed=5)
    k_norm.weight.data = randn(d, dtype=dtype, seed=6)
    cos, sin = rotary(positions, dtype)
    q_ref, k_ref = (q_norm._norm(q), k_norm._norm(k)) if with_norm else (q, k)
    q_ref, k_ref = apply_rotary(q_ref, cos, sin), apply_rotary(k_ref, cos, sin)
    v_before = qkv[:, hq + hkv:].clone()
    fused_ops.qk_norm_rope(q, k, positions, rotary.cos_cached, rotary.sin_cached,
                           q_norm.weight if with_norm else None, k_norm.weight if with_norm else None,
                           q_norm.eps)
    assert rel_error(q, q_ref) < TOL[dtype] and rel_error(k, k_ref) < TOL[dtype]
    assert torch.equal(qkv[:, hq + hkv:], v_before)  # v is not touched


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [48, 1500])  # a partial block; several column blocks
def test_silu_and_mul_matches_torch(dtype, d):
    gate_up = randn(3, 2 * d, dtype=dtype, seed=7)
    expected = SiluAndMul()(gate_up) if DEVICE == "cpu" else torch.nn.functional.silu(gate_up[:, :d]) * gate_up[:, d:]
    assert rel_error(fused_ops.silu_and_mul(gate_up), expected) < TOL[dtype]


def test_empty_inputs_launch_nothing():
    x = torch.empty(0, 64, device=DEVICE)
    assert fused_ops.rms_norm(x, torch.ones(64, device=DEVICE), 1e-6).shape == (0, 64)
    assert fused_ops.silu_and_mul(torch.empty(0, 32, device=DEVICE)).shape == (0, 16)


def test_the_switch(monkeypatch):
    from minivllm.layers import use_fused_ops

    assert not use_fused_ops(torch.device("cpu"))
    assert use_fused_ops(torch.device("cuda"))
    monkeypatch.setenv("MINIVLLM_FUSED_OPS", "0")
    assert not use_fused_ops(torch.device("cuda"))


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn])
@pytest.mark.parametrize("with_norm", [False, True])
def test_qk_norm_rope_writes_the_cache_as_write_kv_cache_does(cache_dtype, with_norm):
    """With `cache`, the rotation kernel stores rotated k and v at each token's slot (skipping
    negative slots) bit for bit as rotating and then calling write_kv_cache would; fp8 caches
    quantized with the same per-head scales. head_dim 48: half a head is 24, a masked block."""
    from minivllm.kernels import write_kv_cache
    from minivllm.kernels.fp8 import empty_scales
    from minivllm.layers.attention import KVCacheWrite

    fp8 = cache_dtype == torch.float8_e4m3fn
    dtype = torch.bfloat16 if fp8 else cache_dtype
    tokens, hq, hkv, d, num_blocks, block_size = 5, 4, 2, 48, 6, 3
    qkv = randn(tokens, hq + 2 * hkv, d, dtype=dtype, seed=11)
    positions = torch.tensor([4, 0, 9, 2, 5], device=DEVICE)
    slots = torch.tensor([7, -1, 0, 17, 3], device=DEVICE)  # -1: a padding token
    rotary = RotaryEmbedding(d, 16, inverse_frequencies(d, {"rope_type": "default", "rope_theta": 1e4}))
    rotary = rotary.to(DEVICE)
    norms = (randn(d, dtype=dtype, seed=12), randn(d, dtype=dtype, seed=13)) if with_norm else (None, None)

    def caches():
        k_cache = torch.zeros(num_blocks, block_size, hkv, d, device=DEVICE).to(cache_dtype)
        scales = empty_scales(k_cache) if fp8 else (None, None)
        for s in scales:
            if s is not None:
                s.fill_(-1.0)
        return k_cache, k_cache.clone(), *scales

    fused, separate = caches(), caches()
    qkv_fused, qkv_separate = qkv.clone(), qkv.clone()
    for t, cache in ((qkv_fused, fused), (qkv_separate, None)):
        q, k, v = t[:, :hq], t[:, hq:hq + hkv], t[:, hq + hkv:]
        target = KVCacheWrite(cache[0], cache[1], slots, cache[2], cache[3]) if cache else None
        fused_ops.qk_norm_rope(q, k, positions, rotary.cos_cached, rotary.sin_cached, *norms,
                               eps=1e-6, v=v, cache=target)
    q, k, v = qkv_separate[:, :hq], qkv_separate[:, hq:hq + hkv], qkv_separate[:, hq + hkv:]
    write_kv_cache(k, v, separate[0], separate[1], slots, backend="triton",
                   k_scale=separate[2], v_scale=separate[3])
    assert torch.equal(qkv_fused, qkv_separate)  # q and k rotated in place, v untouched
    for got, want in zip(fused, separate):
        if want is not None:
            assert torch.equal(got.view(torch.uint8) if fp8 and got.dtype == cache_dtype else got,
                               want.view(torch.uint8) if fp8 and want.dtype == cache_dtype else want)
    written = fused[0].flatten(0, 1)[slots[slots >= 0]].float()
    assert written.abs().sum() > 0  # the slots were written, the rest left as they were
    assert fused[0].flatten(0, 1).float().abs().sum() == written.abs().sum()
