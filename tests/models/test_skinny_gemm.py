"""The skinny-GEMM kernels (minivllm/layers/skinny_gemm.py) against PyTorch, their wiring into the
layers, and their benchmark. On CPU the kernels run in the Triton interpreter (tests/conftest.py),
on a GPU natively.

Tolerances, as ||out - ref|| / ||ref|| against an fp32 oracle computed from the same inputs:
float32 kernels add the same products in another order, a few ulps of float32 (1e-6). In bf16
the kernel accumulates in fp32 and rounds once at the end: the oracle rounded to bf16, off by at
most one rounding, 2^-8 relative to nearest (GPU) or 2^-7 truncating (the interpreter's casts).
The gated op rounds where the unfused layers round (gate and up out of the GEMM, silu(gate),
the product): four roundings.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from minivllm.layers import linear as linear_mod
from minivllm.layers import skinny_gemm as sg
from minivllm.layers.skinny_gemm import SkinnyConfig, skinny_gate_up_silu, skinny_linear
from tests.kernels.paged_inputs import rel_error

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
ROOT = Path(__file__).resolve().parents[2]
runs_triton = pytest.mark.skipif(not (ON_GPU or INTERPRETED),
                                 reason="Triton on CPU tensors needs TRITON_INTERPRET=1")
pytestmark = runs_triton

BF16_ROUNDING = 2.0**-7 if INTERPRETED else 2.0**-8  # the most one bf16 rounding is off, relative
TOL = {torch.float32: 1e-6, torch.bfloat16: BF16_ROUNDING}
GATED_TOL = {torch.float32: 1e-6, torch.bfloat16: 4 * BF16_ROUNDING}


def randn(*shape, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEVICE)


def linear_ref(x, w, b=None):
    """The exact answer for these (already rounded) inputs: fp32 math, no rounding after."""
    return F.linear(x.float(), w.float(), None if b is None else b.float())


def gated_ref(x, w, b=None):
    gate, up = linear_ref(x, w, b).chunk(2, dim=-1)
    return F.silu(gate) * up


def problem(m, n, k, dtype, bias, seed=0, rows=1):
    """x [m, k], w [rows * n, k] at a trained layer's scale (outputs O(1)), bias or None."""
    x = randn(m, k, dtype=dtype, seed=seed)
    w = randn(rows * n, k, dtype=dtype, seed=seed + 1, scale=k**-0.5)
    b = randn(rows * n, dtype=dtype, seed=seed + 2) if bias else None
    return x, w, b


class LaunchSpy:
    """Wraps a Triton kernel to record each launch's grid and keyword arguments."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((grid, kwargs))
            return self.kernel[grid](*args, **kwargs)
        return launch


# --------------------------------------------------------------------------------------------
# The kernels against PyTorch
# --------------------------------------------------------------------------------------------
# (N, K): N not a multiple of any BLOCK_N, K not a multiple of any BLOCK_K; and both multiples.
SHAPES = [(40, 72), (64, 128)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3, 8, 16])
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_skinny_linear_matches_f_linear(dtype, m, n, k, bias):
    x, w, b = problem(m, n, k, dtype, bias, seed=m)
    out = skinny_linear(x, w, b)
    assert out.dtype == dtype and out.shape == (m, n)
    assert rel_error(out, linear_ref(x, w, b)) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3, 8, 16])
@pytest.mark.parametrize("bias", [False, True])
def test_gate_up_silu_matches_the_unfused_mlp(dtype, m, bias):
    """One kernel for silu(x Wg^T) * (x Wu^T) with the merged [2I, K] weight, I = 40, K = 72."""
    x, w, b = problem(m, 40, 72, dtype, bias, seed=10 + m, rows=2)
    out = skinny_gate_up_silu(x, w, b)
    assert out.dtype == dtype and out.shape == (m, 40)
    assert rel_error(out, gated_ref(x, w, b)) < GATED_TOL[dtype]
    if dtype == torch.float32:  # the same math as the two layers it replaces, to float32 rounding
        from minivllm.layers.activation import SiluAndMul

        assert rel_error(out, SiluAndMul()(F.linear(x, w, b))) < GATED_TOL[dtype]


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_k_adds_the_slices_with_a_second_kernel(monkeypatch, gated, dtype):
    """K = 200 in slices of 64 (64, 64, 64, 8): partial sums, then the reduce kernel adds them,
    the bias and (gated) the activation. The same output as without a split."""
    reduce = LaunchSpy(sg._split_k_reduce_kernel)
    monkeypatch.setattr(sg, "_split_k_reduce_kernel", reduce)
    x, w, b = problem(5, 24, 200, dtype, bias=True, seed=3, rows=2 if gated else 1)
    op, ref = (skinny_gate_up_silu, gated_ref) if gated else (skinny_linear, linear_ref)
    split = op(x, w, b, config=SkinnyConfig(BLOCK_N=16, BLOCK_K=32, SPLIT_K=4))
    assert len(reduce.launches) == 1
    _, kwargs = reduce.launches[0]
    assert kwargs["GATED"] == gated and kwargs["HAS_BIAS"]
    assert rel_error(split, ref(x, w, b)) < (GATED_TOL if gated else TOL)[dtype]
    whole = op(x, w, b, config=SkinnyConfig(BLOCK_N=16, BLOCK_K=32, SPLIT_K=1))
    assert len(reduce.launches) == 1  # no split: no second kernel
    assert rel_error(split, whole) < (GATED_TOL if gated else TOL)[dtype]


def test_more_rows_than_one_tile_and_any_leading_shape():
    """M = 37 is three 16-row tiles (grid axis 1); x [..., K] comes back [..., N]."""
    x, w, b = problem(37, 24, 48, torch.float32, bias=True, seed=4)
    assert rel_error(skinny_linear(x, w, b), linear_ref(x, w, b)) < TOL[torch.float32]
    x3 = x[:36].reshape(4, 9, 48)
    out = skinny_linear(x3, w, b)
    assert out.shape == (4, 9, 24)
    assert rel_error(out, linear_ref(x3, w, b)) < TOL[torch.float32]


def test_strided_inputs():
    """Rows of x at a stride wider than K (a column slice), and x not contiguous along K."""
    wide = randn(6, 100, seed=5)
    w = randn(32, 64, seed=6, scale=0.125)
    x = wide[:, 10:74]
    assert x.stride() == (100, 1)
    assert rel_error(skinny_linear(x, w), linear_ref(x, w)) < TOL[torch.float32]
    xt = randn(64, 6, seed=7).t()
    assert xt.stride(-1) != 1
    assert rel_error(skinny_linear(xt, w), linear_ref(xt, w)) < TOL[torch.float32]


def test_no_rows_launch_nothing(monkeypatch):
    gemm = LaunchSpy(sg._skinny_gemm_kernel)
    monkeypatch.setattr(sg, "_skinny_gemm_kernel", gemm)
    w = randn(32, 64)
    assert skinny_linear(torch.empty(0, 64, device=DEVICE), w).shape == (0, 32)
    assert skinny_gate_up_silu(torch.empty(2, 0, 64, device=DEVICE), w).shape == (2, 0, 16)
    assert gemm.launches == []


@settings(max_examples=12, deadline=None)
@given(m=st.integers(1, 20), n=st.integers(1, 70), k=st.integers(1, 70), bias=st.booleans(),
       gated=st.booleans(), block_n=st.sampled_from([16, 32]), block_k=st.sampled_from([16, 32]),
       split=st.integers(1, 3), seed=st.integers(0, 1000))
def test_any_small_shape_and_configuration(m, n, k, bias, gated, block_n, block_k, split, seed):
    """Random shapes (ragged everywhere) and launch configurations, float32: always F.linear's
    answer (and, gated, silu(gate) * up)."""
    x, w, b = problem(m, n, k, torch.float32, bias, seed=seed, rows=2 if gated else 1)
    cfg = SkinnyConfig(BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split)
    if gated:
        out, ref = skinny_gate_up_silu(x, w, b, config=cfg), gated_ref(x, w, b)
    else:
        out, ref = skinny_linear(x, w, b, config=cfg), linear_ref(x, w, b)
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())


# --------------------------------------------------------------------------------------------
# Inputs checked at the door
# --------------------------------------------------------------------------------------------
def test_bad_inputs_name_the_argument():
    x, w = randn(2, 64), randn(32, 64)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        skinny_linear([[1.0]], w)
    with pytest.raises(TypeError, match="x must be float16, bfloat16 or float32"):
        skinny_linear(x.to(torch.int32), w)
    with pytest.raises(TypeError, match="weight dtype"):
        skinny_linear(x, w.to(torch.bfloat16))
    with pytest.raises(ValueError, match="x must be \\[..., K\\] with K >= 1"):
        skinny_linear(torch.empty(2, 0, device=DEVICE), randn(32, 0))
    with pytest.raises(ValueError, match="weight must be \\[N, K\\]"):
        skinny_linear(x, randn(32, 48))
    with pytest.raises(ValueError, match="weight must be contiguous along K"):
        skinny_linear(x, randn(64, 32).t())
    with pytest.raises(ValueError, match="bias must be \\[32\\]"):
        skinny_linear(x, w, randn(31))
    with pytest.raises(ValueError, match="even row count"):
        skinny_gate_up_silu(x, randn(33, 64))
    with pytest.raises(ValueError, match="BLOCK_N must be a power of two"):
        SkinnyConfig(BLOCK_N=24, BLOCK_K=32)
    with pytest.raises(ValueError, match="SPLIT_K must be >= 1"):
        SkinnyConfig(BLOCK_N=16, BLOCK_K=32, SPLIT_K=0)


# --------------------------------------------------------------------------------------------
# The launch configuration and the switch
# --------------------------------------------------------------------------------------------
def test_heuristic_splits_k_only_when_columns_leave_sms_idle():
    """On 132 SMs (H100/H200): Qwen3-0.6B's o_proj and down_proj (N = 1024, 64 tiles of 16) are
    split; q|k|v (N = 4096) and gate|up (I = 3072) have enough column tiles without."""
    bf16 = torch.bfloat16
    for n, k in [(1024, 2048), (1024, 3072)]:
        cfg = sg.choose_config(n, k, bf16, 132)
        assert cfg.SPLIT_K > 1 and (n // cfg.BLOCK_N) * cfg.SPLIT_K >= 132
    assert sg.choose_config(4096, 1024, bf16, 132).SPLIT_K == 1
    assert sg.choose_config(3072, 1024, bf16, 132, gated=True).SPLIT_K == 1
    assert sg.choose_config(14336, 4096, bf16, 132, gated=True).BLOCK_N == 64  # wide when N allows


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 200_000), k=st.integers(1, 20_000), num_sms=st.integers(1, 200),
       gated=st.booleans(), dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32]))
def test_heuristic_gives_valid_configurations(n, k, num_sms, gated, dtype):
    cfg = sg.choose_config(n, k, dtype, num_sms, gated)  # the constructor checks the powers of two
    itemsize = torch.empty((), dtype=dtype).element_size()
    assert 1 <= cfg.SPLIT_K <= sg.MAX_SPLIT_K
    assert cfg.SPLIT_K == 1 or -(-k // cfg.BLOCK_K) >= 2 * cfg.SPLIT_K  # two BLOCK_K steps per slice
    rows = cfg.BLOCK_N * (2 if gated else 1) + sg.BLOCK_M
    assert rows * cfg.BLOCK_K * itemsize * cfg.num_stages <= 128 * 1024  # fits shared memory


def test_use_skinny_gemm_rules(monkeypatch):
    """CUDA tensors (fake ones: shapes and device only) with 1..SKINNY_MAX_M rows; never CPU;
    MINIVLLM_SKINNY_GEMM=0 turns it off."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        def cuda(*shape, dtype=torch.bfloat16):
            return torch.empty(*shape, dtype=dtype, device="cuda")

        one, most, too_many = cuda(1, 64), cuda(sg.SKINNY_MAX_M, 64), cuda(sg.SKINNY_MAX_M + 1, 64)
        batched, empty, ints = cuda(2, 3, 64), cuda(0, 64), cuda(1, 64, dtype=torch.int32)
    monkeypatch.delenv("MINIVLLM_SKINNY_GEMM", raising=False)
    assert sg.use_skinny_gemm(one) and sg.use_skinny_gemm(most) and sg.use_skinny_gemm(batched)
    assert not sg.use_skinny_gemm(too_many)
    assert not sg.use_skinny_gemm(empty) and not sg.use_skinny_gemm(ints)
    assert not sg.use_skinny_gemm(torch.ones(1, 64))  # CPU: PyTorch
    monkeypatch.setattr(sg, "SKINNY_MAX_M", sg.SKINNY_MAX_M + 1)
    assert sg.use_skinny_gemm(too_many)
    monkeypatch.setenv("MINIVLLM_SKINNY_GEMM", "0")
    assert not sg.use_skinny_gemm(one)


def test_plain_cpu_never_asks(monkeypatch):
    """Without the interpreter a CPU tensor takes F.linear before skinny_gemm is even asked."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(sg, "use_skinny_gemm", lambda x: pytest.fail("asked on a plain CPU"))
    assert not linear_mod.skinny_gemm_applies(torch.ones(1, 8))


# --------------------------------------------------------------------------------------------
# The wiring: layers and models call the kernels when the switch says so
# --------------------------------------------------------------------------------------------
@pytest.fixture
def skinny_on_cpu(monkeypatch):
    """use_skinny_gemm as on a GPU (1..SKINNY_MAX_M rows) but for CPU tensors too, and spies on
    both ops. Returns the spies' call lists."""
    calls = {"linear": [], "gated": []}
    monkeypatch.setattr(sg, "use_skinny_gemm",
                        lambda x: 1 <= x.numel() // x.shape[-1] <= sg.SKINNY_MAX_M)
    for name, key in [("skinny_linear", "linear"), ("skinny_gate_up_silu", "gated")]:
        real = getattr(sg, name)

        def spy(x, weight, *args, _real=real, _key=key, **kwargs):
            calls[_key].append(tuple(weight.shape))
            return _real(x, weight, *args, **kwargs)

        monkeypatch.setattr(sg, name, spy)
    return calls


@pytest.mark.parametrize("bias", [False, True])
def test_parallel_linear_layers_use_the_kernel(skinny_on_cpu, bias):
    from minivllm.layers.linear import (
        ColumnParallelLinear,
        MergedColumnParallelLinear,
        RowParallelLinear,
    )

    torch.manual_seed(0)
    layers = [ColumnParallelLinear(48, 40, bias=bias), RowParallelLinear(48, 24, bias=bias),
              MergedColumnParallelLinear.split_evenly(48, {"gate": 16, "up": 16}, bias=bias)]
    x = randn(3, 48, seed=8)
    for layer in layers:
        layer = layer.to(DEVICE)
        expected = F.linear(x, layer.weight, layer.bias)
        with torch.no_grad():
            got = layer(x)
        assert skinny_on_cpu["linear"][-1] == tuple(layer.weight.shape)
        assert rel_error(got, expected) < TOL[torch.float32]
    assert len(skinny_on_cpu["linear"]) == 3
    with torch.no_grad():
        layers[0].to(DEVICE)(randn(sg.SKINNY_MAX_M + 1, 48))  # too many rows: cuBLAS
    assert len(skinny_on_cpu["linear"]) == 3


@pytest.mark.skipif(not INTERPRETED, reason="the test models run on the CPU; on a GPU the engine "
                    "tests cover this (MINIVLLM_TEST_DEVICE=cuda)")
@pytest.mark.parametrize("variant", ["qwen3", "opt", "llama-biases-tied-llama3-rope"])
def test_models_decode_through_the_kernels_and_match_hf(skinny_on_cpu, variant, our_model, hf_model):
    """Prefill (more rows than SKINNY_MAX_M: PyTorch), then decode steps of 2 and 1 sequences
    through the kernels: the logits still match Hugging Face's. Llama-family MLPs use the fused
    gate|up+SiLU kernel, OPT's biased fc1/fc2 the plain one."""
    from tests.models.model_harness import PagedRunner, assert_logits_close, hf_logits
    from tests.models.test_model_vs_hf import random_tokens

    model, hf = our_model(variant), hf_model(variant)
    vocab = model.config.vocab_size
    a, b = random_tokens(12, vocab, 31), random_tokens(10, vocab, 32)
    runner = PagedRunner(model, num_blocks=16, block_size=8, seed=9)
    first = runner.step([("a", a[:10]), ("b", b[:8])])
    assert skinny_on_cpu == {"linear": [], "gated": []}  # 18 rows: PyTorch
    second = runner.step([("a", a[10:11]), ("b", b[8:9])])
    third = runner.step([("a", a[11:12])])
    layers = model.config.num_hidden_layers
    if variant == "opt":  # q|k|v, out_proj, fc1, fc2
        assert len(skinny_on_cpu["linear"]) == 2 * 4 * layers and not skinny_on_cpu["gated"]
    else:  # q|k|v, o_proj, down_proj; gate|up fused
        assert len(skinny_on_cpu["linear"]) == 2 * 3 * layers
        assert len(skinny_on_cpu["gated"]) == 2 * layers
    assert_logits_close(torch.cat([first[0], second[0], third[0]]), hf_logits(hf, a), f"{variant} a")
    assert_logits_close(torch.cat([first[1], second[1]]), hf_logits(hf, b[:9]), f"{variant} b")


# --------------------------------------------------------------------------------------------
# Compilation: once per layer shape, and what the GPU compiler makes of it
# --------------------------------------------------------------------------------------------
@pytest.mark.skipif(not INTERPRETED, reason="the CPU stand-in needs the interpreter")
def test_row_counts_add_no_specialization():
    """Decode buckets and eager steps of any size reuse the kernels compiled for the first."""
    from tests._triton_interpreter import PredictedSpecializations

    x_all, w, b = problem(40, 24, 200, torch.float32, bias=True, seed=11)
    w2 = randn(48, 200, seed=12)
    split = SkinnyConfig(BLOCK_N=16, BLOCK_K=32, SPLIT_K=2)

    def run(m):
        x = x_all[:m].clone()  # a fresh allocation, as each step's activations are
        skinny_linear(x, w, b)
        skinny_linear(x, w, b, config=split)
        skinny_gate_up_silu(x, w2, config=split)

    with PredictedSpecializations() as keys:
        run(4)
        warm = keys.snapshot()
        assert {name: len(k) for name, k in warm.items()} == {
            "_skinny_gemm_kernel": 3, "_split_k_reduce_kernel": 2}
        for m in (1, 2, 3, 8, 16, 17, 32):
            run(m)
    assert keys.new_since(warm) == {}


@pytest.mark.gpu
def test_row_counts_compile_nothing_after_warm_up_on_gpu():
    """The real count on a GPU: after one row count, the others compile no kernel."""
    from minivllm.kernels import JitCounter

    x_all, w, b = problem(40, 1024, 2048, torch.bfloat16, bias=True, seed=13)
    w2 = randn(2 * 3072, 2048, dtype=torch.bfloat16, seed=14, scale=2048**-0.5)

    def run(m):
        x = x_all[:m].clone()
        skinny_linear(x, w, b)  # N = 1024 on a GPU of ~100+ SMs: the split-K path
        skinny_gate_up_silu(x, w2)

    run(4)
    with JitCounter() as jit:
        for m in (1, 2, 3, 8, 16, 17, 32):
            run(m)
    assert jit.count == 0, jit.summary()


@pytest.mark.gpu
def test_real_shapes_in_a_cuda_graph():
    """Qwen3-0.6B's four projections at decode sizes, captured in a CUDA graph and replayed on
    new inputs (as the engine's decode graphs do)."""
    shapes = [(4096, 1024, False), (1024, 2048, False), (3072, 1024, True), (1024, 3072, False)]
    for m in (1, 8):
        for n, k, gated in shapes:
            x, w, _ = problem(m, n, k, torch.bfloat16, bias=False, seed=n + k + m, rows=2 if gated else 1)
            op, ref = (skinny_gate_up_silu, gated_ref) if gated else (skinny_linear, linear_ref)
            op(x, w)  # compile outside the capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = op(x, w)
            x.copy_(randn(m, k, dtype=torch.bfloat16, seed=99))
            graph.replay()
            torch.cuda.synchronize()
            tol = (GATED_TOL if gated else TOL)[torch.bfloat16]
            assert rel_error(out, ref(x, w)) < tol, (m, n, k, gated)


@pytest.mark.skipif(ON_GPU, reason="on a GPU the kernels are compiled and run for real above")
def test_compiles_for_hopper_with_pipelined_16_byte_loads_and_tensor_cores():
    """Compile the bf16 kernels for sm_90 ahead of time, no GPU needed (a subprocess, without
    the interpreter), and read the PTX: the weight tiles must stream in through 16-byte
    asynchronous copies (cp.async.cg ..., 0x10: vectorized, software-pipelined), feeding mma
    instructions; no element-wise 2-byte global loads. Triton compiles that only if it can
    prove alignment and contiguity, which the argument specialization must keep giving it."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    script = textwrap.dedent("""
        import json, re, torch, triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from minivllm.layers import skinny_gemm as sg

        names = [p.name for p in sg._skinny_gemm_kernel.params]
        found = {}
        cases = [("qkv", 4096, 1024, False, False), ("gate_up", 3072, 1024, True, False),
                 ("o split", 1024, 2048, False, True)]
        for label, n, k, gated, split in cases:
            cfg = sg.choose_config(n, k, torch.bfloat16, 132, gated)
            types = dict(x_ptr="*bf16", w_ptr="*bf16", bias_ptr="*bf16",
                         out_ptr="*fp32" if split else "*bf16", M="i32")
            consts = dict(HAS_BIAS=False, GATED=gated, SPLIT=split, BLOCK_M=16, BLOCK_N=cfg.BLOCK_N,
                          BLOCK_K=cfg.BLOCK_K, DOT_PRECISION="tf32")
            signature = {p: "constexpr" if p in consts else types.get(p, "i32") for p in names}
            # What a launch specializes on, these shapes' ints all being multiples of 16: every
            # pointer and int 16-aligned, except the ints the kernel says not to specialize.
            aligned = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(sg._skinny_gemm_kernel.params)
                       if p.name not in consts and not p.do_not_specialize}
            src = ASTSource(sg._skinny_gemm_kernel, signature,
                            {(names.index(p),): v for p, v in consts.items()}, aligned)
            kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                    options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
            ptx = kernel.asm["ptx"]
            count = lambda pattern: len(re.findall(pattern, ptx))
            found[label] = dict(cp_async_16=count(r"cp\\.async\\.cg\\.shared\\.global[^;]*\\], 0x10\\b"),
                                mma=count(r"\\bmma\\.sync"),
                                scalar_b16_loads=count(r"ld\\.global(\\.[a-z0-9:_]+)*\\.b16\\b"))
        print(json.dumps(found))
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    for label, counts in found.items():
        assert counts["cp_async_16"] > 0, (label, counts)
        assert counts["mma"] > 0, (label, counts)
        assert counts["scalar_b16_loads"] == 0, (label, counts)


# --------------------------------------------------------------------------------------------
# The benchmark runs (CPU: tiny shapes, interpreter)
# --------------------------------------------------------------------------------------------
@pytest.mark.skipif(ON_GPU, reason="CPU smoke test; on a GPU run the benchmark itself")
def test_benchmark_smoke(tmp_path, capsys):
    from benchmarks import skinny_gemm_bench as bench

    out = tmp_path / "skinny.json"
    assert bench.main(["--m", "1,2", "--repeats", "1", "--out", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["meta"]["complete"] and saved["meta"]["device"].startswith("cpu")
    records = saved["records"]
    assert {(r["op"], r["impl"]) for r in records} == {
        (op, impl) for op in ("qkv", "o", "gate_up", "down") for impl in ("torch", "skinny")}
    assert all(r["correct"] and r["rel_error"] < 1e-5 for r in records)
    gate_up = next(r for r in records if r["op"] == "gate_up" and r["m"] == 1)
    # tiny qwen3: hidden 64, intermediate 128; float32: W [256, 64] + x [1, 64] + out [1, 128].
    assert (gate_up["n"], gate_up["k"], gate_up["bytes"]) == (256, 64, (256 * 64 + 64 + 128) * 4)
    assert gate_up["frac_copy_bw"] == pytest.approx(
        gate_up["bytes"] / (gate_up["us"] * 1e-6) / (saved["meta"]["copy_gbps"] * 1e9))
    assert set(saved["summary"]["tiny"]["crossover_m"]) == {"qkv", "o", "gate_up", "down"}
    printed = capsys.readouterr().out
    assert "suggested SKINNY_MAX_M" in printed and "first M where F.linear is faster" in printed
