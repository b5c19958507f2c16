"""The small-batch fused linear kernels (minivllm/layers/fused_linear.py) against the unfused
layers, the decoder layer built from them against the PyTorch path, and that more rows than the
switch allows take cuBLAS (the PyTorch path).

On CPU the kernels run in the Triton interpreter (tests/conftest.py), on a GPU natively. Sizes
that are not powers of two leave masked columns in every tile; a forced narrow BLOCK_K walks K
in several tiles. float32 agrees to float32 rounding; half precision to the dtype's rounding (the
interpreter converts float32 -> bfloat16 by truncation, not rounding, so bfloat16 gets a wider
bound on CPU than on a GPU).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from minivllm.layers import fused_linear
from minivllm.layers.fused_linear import LinearConfig
from tests._triton_interpreter import LaunchLog
from tests.devices import DEVICE, ON_DEVICE
from tests.kernels.paged_inputs import rel_error

pytestmark = ON_DEVICE
BF16_TOL = 1e-2 if DEVICE == "cuda" else 4e-2  # interpreter: truncating bf16 casts
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: BF16_TOL}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
NARROW = LinearConfig(BLOCK_N=8, BLOCK_K=32, num_warps=4, num_stages=2)  # K in several tiles


def randn(*shape, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEVICE)


def reference_norm(h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as the layers round it (layernorm.py), computed in float32 where they do."""
    h32 = h.float()
    normed = (h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)
    return (normed.float() * weight.float()).to(h.dtype)


def reference_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The GEMM in float32 from the same (rounded) operands, rounded once."""
    return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config", [None, NARROW], ids=["default", "narrow"])
@pytest.mark.parametrize("rows", [1, 3, 4])
def test_linear_matches_f_linear(dtype, config, rows):
    n, k = 72, 200  # neither a power of two
    x = randn(rows, k, dtype=dtype, seed=rows)
    weight = randn(n, k, dtype=dtype, seed=100, scale=k ** -0.5)
    bias = randn(n, dtype=dtype, seed=101)
    out = fused_linear.linear(x, weight, bias, config=config)
    assert out.shape == (rows, n) and out.dtype == dtype
    assert rel_error(out, reference_linear(x, weight, bias)) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("swiglu", [False, True], ids=["qkv", "gate_up"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["first_layer", "add"])
@pytest.mark.parametrize("rows", [1, 3])
def test_norm_linear_matches_the_unfused_layers(dtype, swiglu, with_residual, rows):
    n, k, eps = 40, 48, 1e-6
    x = randn(rows, k, dtype=dtype, seed=rows)
    residual = randn(rows, k, dtype=dtype, seed=50 + rows) if with_residual else None
    residual_before = residual.clone() if with_residual else None
    norm_weight = randn(k, dtype=dtype, seed=7, scale=0.1) + 1
    weight = randn(2 * n if swiglu else n, k, dtype=dtype, seed=8, scale=k ** -0.5)
    bias = randn(weight.shape[0], dtype=dtype, seed=9)

    out, new_residual = fused_linear.norm_linear(x, residual, norm_weight, eps, weight, bias,
                                                 swiglu=swiglu)

    h = x if residual is None else (x.float() + residual.float()).to(dtype)
    expected = reference_linear(reference_norm(h, norm_weight, eps), weight, bias)
    if swiglu:
        expected = F.silu(expected[:, :n].float()).to(dtype).float() * expected[:, n:].float()
    assert out.shape == (rows, n)
    assert rel_error(out, expected) < TOL[dtype]
    if with_residual:
        assert rel_error(new_residual, h) < TOL[dtype] / 4  # one rounding of one sum
        assert torch.equal(residual, residual_before)  # read only: programs read it concurrently
    else:
        assert new_residual is x


def test_norm_linear_over_several_k_tiles_and_column_blocks():
    """K = 200 in tiles of 32 (the norm's first pass and the product both loop), N = 72 in
    blocks of 8 (a partial last block), 3 rows of 4 (a masked row): every program, every tile."""
    dtype, rows, eps = torch.float32, 3, 1e-5
    x, residual = randn(rows, 200, dtype=dtype, seed=1), randn(rows, 200, dtype=dtype, seed=2)
    norm_weight = randn(200, dtype=dtype, seed=3)
    weight = randn(144, 200, dtype=dtype, seed=4)
    out, new_residual = fused_linear.norm_linear(x, residual, norm_weight, eps, weight,
                                                 swiglu=True, config=NARROW)
    gate_up = F.linear(reference_norm(x + residual, norm_weight, eps), weight)
    assert rel_error(out, F.silu(gate_up[:, :72]) * gate_up[:, 72:]) < TOL[dtype]
    assert torch.equal(new_residual, x + residual)


def test_choose_config_depends_on_the_shape_only():
    """The launch shape keeps the whole of K in one tile (loaded before the wait) for the
    Qwen3-0.6B projections of one row, keeps the products a program holds within its budget at
    every row count, and never gives N = 1024 fewer than 128 programs."""
    for n, k, swiglu in [(4096, 1024, False), (3072, 1024, True), (1024, 2048, False)]:
        assert fused_linear.choose_config(n, k, swiglu).BLOCK_K >= k
        for rows in (1, 2, 3, 4):
            cfg = fused_linear.choose_config(n, k, swiglu, rows)
            held = cfg.BLOCK_N * cfg.BLOCK_K * (2 if swiglu else 1) * fused_linear.tile_rows(rows)
            assert held <= fused_linear.TILE_ELEMENTS
    for rows in (1, 4):
        assert -(-1024 // fused_linear.choose_config(1024, 3072, False, rows).BLOCK_N) >= 128


def test_bad_rows_are_refused():
    weight = torch.zeros(8, 16, device=DEVICE)
    for rows in (0, 5):
        with pytest.raises(ValueError, match="1 to 4 rows, got"):
            fused_linear.linear(torch.zeros(rows, 16, device=DEVICE), weight)
    with pytest.raises(ValueError, match="contiguous"):
        fused_linear.linear(torch.zeros(16, 2, device=DEVICE)[:, :1].t(), weight)  # stride 2


def test_the_switch(monkeypatch):
    from minivllm.layers import FUSED_LINEAR_ROWS, use_fused_linear

    def rows(n, dtype=torch.bfloat16):
        return torch.empty(n, 8, dtype=dtype, device="meta")

    monkeypatch.setattr("minivllm.layers.triton_device", lambda device: True)
    default = range(1, FUSED_LINEAR_ROWS + 1)
    assert all(use_fused_linear(rows(n)) for n in default) and use_fused_linear(rows(1, torch.float16))
    # Beyond, cuBLAS's tiles beat the fused kernels (fused_linear.py's docstring).
    assert not any(use_fused_linear(rows(n)) for n in (0, FUSED_LINEAR_ROWS + 1, 16))
    assert not use_fused_linear(rows(1, torch.float32))  # float32 keeps cuBLAS (exact HF match)
    monkeypatch.setenv("MINIVLLM_FUSED_LINEAR", "16")  # never more rows than the kernels take
    assert use_fused_linear(rows(FUSED_LINEAR_ROWS)) and not use_fused_linear(rows(FUSED_LINEAR_ROWS + 1))
    monkeypatch.setenv("MINIVLLM_FUSED_LINEAR", "1")
    assert use_fused_linear(rows(1)) and not use_fused_linear(rows(2))
    monkeypatch.setenv("MINIVLLM_FUSED_LINEAR", "0")
    assert not use_fused_linear(rows(1))
    monkeypatch.setenv("MINIVLLM_FUSED_LINEAR", "on")
    with pytest.raises(ValueError, match="MINIVLLM_FUSED_LINEAR must be a number of rows"):
        use_fused_linear(rows(1))
    monkeypatch.setenv("MINIVLLM_FUSED_LINEAR", "1")
    monkeypatch.setenv("MINIVLLM_FUSED_OPS", "0")  # the fused ops' switch turns every fusion off
    assert not use_fused_linear(rows(1))
    monkeypatch.setattr("minivllm.layers.triton_device", lambda device: device.type == "cuda")
    monkeypatch.delenv("MINIVLLM_FUSED_OPS")
    assert not use_fused_linear(torch.empty(1, 8, dtype=torch.bfloat16))  # CPU


# --------------------------------------------------------------------------------------------
# The decoder layers on the fused path
# --------------------------------------------------------------------------------------------
def _run_model(model_dir, fused: bool, monkeypatch, steps, dtype=torch.float16):
    """Logits of `steps` (PagedRunner chunks) through the model, the fused kernels on (on CPU:
    run by the interpreter) or off (PyTorch), and the Triton kernels each step ran (CPU only)."""
    from minivllm.models import load_model
    from tests.models.model_harness import PagedRunner

    if DEVICE == "cpu":
        monkeypatch.setattr("minivllm.layers.triton_device",
                            (lambda device: True) if fused else (lambda device: False))
    else:
        monkeypatch.setenv("MINIVLLM_FUSED_OPS", "1" if fused else "0")
    model = load_model(model_dir, dtype=dtype, device=DEVICE)
    runner = PagedRunner(model, num_blocks=16, block_size=8, seed=1)
    logits, kernels = [], []
    for chunks in steps:
        with LaunchLog() as log:
            logits.append(torch.cat(runner.step(chunks, backend="triton")))
        kernels.append(list(log))
    return logits, kernels


@pytest.mark.parametrize("variant", ["qwen3", "llama-biases-tied-llama3-rope", "opt"])
def test_fused_decode_layers_match_the_pytorch_path(variant, model_dir, monkeypatch):
    """A prefill of 17 tokens (more rows than the fused kernels take: cuBLAS and the fused ops),
    a prefill of 4, a decode step of 2 sequences, then of 1 (the fused linear kernels): the
    logits agree with the unfused model to float16 rounding, and (in the interpreter, where
    launches can be listed) a decode layer is the six kernels of the fused path: no separate
    norm, cache write or SiLU kernel."""
    a, b = list(range(3, 20)), list(range(30, 34))
    steps = [[("a", a)], [("b", b)], [("a", [7]), ("b", [8])], [("b", [9])], [("b", [10])]]
    ref, _ = _run_model(model_dir(variant), False, monkeypatch, steps)
    got, kernels = _run_model(model_dir(variant), True, monkeypatch, steps)
    for step, (x, y) in enumerate(zip(got, ref)):
        assert rel_error(x, y) < 1e-2, f"step {step}"
        assert torch.equal(x.argmax(-1), y.argmax(-1)), f"step {step}"
    if DEVICE != "cpu":
        return
    assert "_fused_linear_kernel" not in kernels[0]  # 17 rows: cuBLAS
    projections = 4 * 2  # q|k|v, o, gate|up (fc1), down (fc2); two layers
    assert kernels[1].count("_fused_linear_kernel") == projections  # a prefill of 4 rows
    if variant == "opt":  # only its linear layers take the fused kernel
        assert all(step.count("_fused_linear_kernel") == projections for step in kernels[2:])
        return
    layer = ["_fused_linear_kernel", "_qk_norm_rope_kernel", "_paged_attention_kernel",
             "_fused_linear_kernel", "_fused_linear_kernel", "_fused_linear_kernel"]
    for step in kernels[2:]:  # decode steps of 2 rows and of 1
        assert step == layer * 2 + ["_add_rms_norm_kernel"]  # two layers, the final norm
    assert "_write_kv_cache_kernel" not in kernels[2]  # the cache write stays fused
