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
from tests.kernels.paged_inputs import rel_error

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
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
