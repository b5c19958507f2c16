"""Serving compiles nothing: after a warm-up, batches of other shapes reuse the compiled kernels.

Triton compiles a kernel once per specialization (argument types, constexpr values, ints equal to
1 or divisible by 16, 16-byte-aligned pointers). A value that varies from step to step and takes
part in that key recompiles a kernel in the middle of serving. On a GPU the compilations are
counted (`minivllm.kernels.JitCounter`); in the CPU interpreter, which compiles nothing, the same
check runs on the keys Triton's own binder computes for each launch (`PredictedSpecializations`).

GPU: python -m pytest -q -m gpu tests/kernels/test_jit_specialization.py
"""

import os

import pytest
import torch
import torch.nn.functional as F

from minivllm.kernels import JitCounter, paged_attention, warm_up, write_kv_cache
from tests.kernels.paged_inputs import make_problem

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
needs_gpu = pytest.mark.skipif(not ON_GPU, reason="counts real compilations: needs a CUDA device")
interpreter = pytest.mark.skipif(not INTERPRETED, reason="the CPU stand-in needs the interpreter")

# A model's shape (GPU: the benchmark's; CPU: small enough for the interpreter).
HQ, HKV, D, BLOCK = (32, 8, 128, 16) if ON_GPU else (4, 2, 16, 4)
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
NUM_BLOCKS = 1200 if ON_GPU else 100  # enough for every batch below
SCALE = 64 if ON_GPU else 1  # longer contexts on the GPU

# (query lengths, context lengths, max_seq_len, num_splits): decode batches of other sizes
# (1 is special to Triton, 16 and 64 divisible by 16), mixed prefill/decode, chunked prefill, one
# prefill token (decode-only by shape), and split counts from the heuristic and forced, past the
# merge kernel's tile of 16.
BATCHES = [
    ([1], [5 * SCALE], None, None),
    ([1] * 3, [7, 3 * SCALE, 40], None, 3),
    ([1] * 16, list(range(1, 17)), 4096, None),
    ([1] * 17, [s * SCALE for s in range(1, 18)], None, None),
    ([9, 1], [9, 4 * SCALE], None, None),
    ([16, 1, 3, 1], [16 * SCALE, 90, 3, 2 * SCALE], None, 2),
    ([4 * SCALE, 1], [5 * SCALE, 9], 9 * SCALE, None),
    ([1, 1], [16 * SCALE, 33], None, 17),
] + ([([1], [16 * SCALE], None, 40)] if ON_GPU else [])  # 3 merge tiles; slow in the interpreter


def _metadata_at(offset: int, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """Copies of int32 tensors laid out back to back in one flat buffer from element `offset`, as
    an engine packs a step's metadata: views whose pointers are only 4-byte aligned."""
    flat = torch.zeros(offset + sum(t.numel() for t in tensors) + 16, dtype=torch.int32,
                       device=DEVICE)
    views, start = [], offset
    for t in tensors:
        view = flat[start:start + t.numel()].view(t.shape)
        view.copy_(t)
        views.append(view)
        start += t.numel()
    return views


def _serve(k_cache, v_cache, scales, generator, batches=BATCHES):
    """Run the batches and cache writes of several sizes, metadata at odd offsets."""
    for i, (query_lens, seq_lens, max_seq_len, num_splits) in enumerate(batches):
        p = make_problem(query_lens, seq_lens, HQ, HKV, D, BLOCK, DTYPE, DEVICE,
                         generator=generator)
        block_tables, lens, cu = _metadata_at(i, p.block_tables.clamp(min=0), p.seq_lens,
                                              p.cu_seqlens_q)
        paged_attention(p.query, k_cache, v_cache, block_tables, lens, cu, backend="triton",
                        max_seq_len=max_seq_len, num_splits=num_splits, **scales)
    for i, num_tokens in enumerate([1, 3, 16, 17]):
        key = torch.randn(num_tokens, HKV, D, generator=generator).to(DTYPE).to(DEVICE)
        slots = torch.randperm(k_cache.shape[0] * BLOCK, generator=generator)[:num_tokens]
        (slots,) = _metadata_at(i + 1, slots.to(torch.int32).to(DEVICE))
        write_kv_cache(key, key, k_cache, v_cache, slots, backend="triton", **scales)


def _caches(kv: str):
    """Caches of the model dtype, or fp8 ones with their scales."""
    dtype = torch.float8_e4m3fn if kv == "fp8" else DTYPE
    k_cache = torch.zeros(NUM_BLOCKS, BLOCK, HKV, D, dtype=dtype, device=DEVICE)
    scales = {}
    if kv == "fp8":
        scale = torch.ones(NUM_BLOCKS, BLOCK, HKV, device=DEVICE)
        scales = dict(k_scale=scale, v_scale=scale.clone())
    return k_cache, torch.zeros_like(k_cache), scales


# --------------------------------------------------------------------------------------------
# GPU: real compilations
# --------------------------------------------------------------------------------------------
@needs_gpu
@pytest.mark.gpu
def test_counter_counts_new_specializations():
    """The counter is not blind: a fresh kernel compiles once per new specialization."""
    import triton
    import triton.language as tl

    @triton.jit
    def _counter_probe(x_ptr, n):
        tl.store(x_ptr + tl.arange(0, 16), tl.full([16], n, tl.int32))

    x = torch.zeros(16, dtype=torch.int32, device=DEVICE)
    with JitCounter() as jit:
        _counter_probe[(1,)](x, 17)
        _counter_probe[(1,)](x, 19)  # same key: i32, not divisible by 16
        _counter_probe[(1,)](x, 32)  # divisible by 16: a new specialization
        _counter_probe[(1,)](x, 1)  # == 1: another
    assert jit.count == 3, jit.summary()
    assert [name.split(".")[-1] for name in jit.by_kernel()] == ["_counter_probe"]
    assert "n:i32/16" in jit.compilations[1].specialization, jit.summary()
    assert "n=1" in jit.compilations[2].specialization, jit.summary()


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("kv", ["model dtype", "fp8"])
def test_serving_shapes_compile_nothing_after_warm_up(kv):
    k_cache, v_cache, scales = _caches(kv)
    warm_up(k_cache, v_cache, HQ, dtype=DTYPE, backend="triton", **scales)
    with JitCounter() as jit:
        _serve(k_cache, v_cache, scales, torch.Generator().manual_seed(0))
    assert jit.count == 0, jit.summary()


@needs_gpu
@pytest.mark.gpu
def test_fused_ops_compile_once():
    with JitCounter() as warm:
        _run_fused_ops([4], offset=0)
    assert warm.count <= 3, warm.summary()  # one kernel each on first use (fewer: run before)
    with JitCounter() as jit:
        _run_fused_ops([1, 2, 16, 17, 33], offset=1)
    assert jit.count == 0, jit.summary()


# --------------------------------------------------------------------------------------------
# CPU: the keys a GPU would compile, from Triton's own binder
# --------------------------------------------------------------------------------------------
def test_counter_says_it_cannot_count_in_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    jit = JitCounter()
    assert not jit.available and "interpreter" in jit.reason
    with jit:
        pass
    with pytest.raises(RuntimeError, match="cannot be counted"):
        jit.count
    assert jit.summary().startswith("unavailable")


@interpreter
def test_predicted_keys_see_a_new_specialization():
    """The stand-in is not blind either: ints equal to 1, divisible by 16, or neither."""
    import triton
    import triton.language as tl

    from tests._triton_interpreter import PredictedSpecializations

    @triton.jit
    def _probe(x_ptr, n):
        tl.store(x_ptr + tl.arange(0, 16), tl.full([16], n, tl.int32))

    x = torch.zeros(16, dtype=torch.int32)
    with PredictedSpecializations() as keys:
        for n in (17, 19, 32, 1):
            _probe[(1,)](x, n)
    assert keys.count() == 3


@interpreter
@pytest.mark.parametrize("kv", ["model dtype", "fp8"])
def test_serving_shapes_add_no_specialization_after_warm_up(kv):
    from tests._triton_interpreter import PredictedSpecializations, patch_fp8_rounding

    patch_fp8_rounding()
    k_cache, v_cache, scales = _caches(kv)
    with PredictedSpecializations() as keys:
        warm_up(k_cache, v_cache, HQ, dtype=DTYPE, backend="triton", **scales)
        warm = keys.snapshot()
        assert {name: len(k) for name, k in warm.items()} == {
            "_write_kv_cache_kernel": 1, "_paged_attention_kernel": 4, "_merge_splits_kernel": 1}
        # fp8 adds a flag and two pointers to the same kernels: a few batches show it holds.
        _serve(k_cache, v_cache, scales, torch.Generator().manual_seed(0),
               BATCHES if kv != "fp8" else BATCHES[::3])
    assert keys.new_since(warm) == {}


@interpreter
def test_fused_ops_add_no_specialization():
    from tests._triton_interpreter import PredictedSpecializations

    with PredictedSpecializations() as keys:
        _run_fused_ops([4], offset=0)
        warm = keys.snapshot()
        assert len(warm) == 3
        _run_fused_ops([1, 2, 16, 17], offset=1)
    assert keys.new_since(warm) == {}


def _run_fused_ops(token_counts, offset):
    """The three fused ops of a Llama-family layer at several token counts, positions as views at
    `offset` of a flat int32 buffer (as the engine packs them)."""
    from minivllm.layers import fused_ops

    hidden, hq, hkv, d, inter = 64, 4, 2, 16, 96
    weight = torch.ones(hidden, dtype=DTYPE, device=DEVICE)
    norm_weight = torch.ones(d, dtype=DTYPE, device=DEVICE)
    angles = torch.randn(64, d // 2, device=DEVICE)
    cos, sin = angles.cos(), angles.sin()
    for t in token_counts:
        x = torch.randn(t, hidden, device=DEVICE).to(DTYPE)
        residual = torch.randn(t, hidden, device=DEVICE).to(DTYPE)
        fused_ops.rms_norm(x, weight, 1e-6, residual=residual)
        qkv = torch.randn(t, hq + 2 * hkv, d, device=DEVICE).to(DTYPE)
        (positions,) = _metadata_at(offset, torch.arange(t, dtype=torch.int32, device=DEVICE))
        fused_ops.qk_norm_rope(qkv[:, :hq], qkv[:, hq:hq + hkv], positions, cos, sin,
                               norm_weight, norm_weight, 1e-6)
        fused_ops.silu_and_mul(torch.randn(t, 2 * inter, device=DEVICE).to(DTYPE))


@interpreter
def test_fused_decode_kernels_add_no_specialization_after_the_graph_buckets():
    """The small-batch kernels (q/k norm + RoPE writing the cache, and up to FUSED_LINEAR_ROWS
    rows fused_linear.py): once the CUDA-graph buckets 1, 2, 4, 8, 16 have run, no row count up
    to 16 and no offset of the step's metadata compiles anything new (the linear kernels'
    row count is padded to a power of two, as the buckets are)."""
    from tests._triton_interpreter import PredictedSpecializations

    with PredictedSpecializations() as keys:
        _run_fused_decode([1, 2, 4, 8, 16], offset=0)
        warm = keys.snapshot()
        _run_fused_decode([1, 3, 5, 8, 11], offset=1)
    assert keys.new_since(warm) == {}


def _run_fused_decode(token_counts, offset):
    """The decode layer's Triton kernels for each count of tokens: the fused linear ones up to
    FUSED_LINEAR_ROWS tokens, as the model runs them (`use_fused_linear`)."""
    from minivllm.layers import FUSED_LINEAR_ROWS, fused_linear, fused_ops
    from minivllm.layers.attention import KVCacheWrite

    hidden, hq, hkv, d, inter = 64, 4, 2, 16, 48
    norm = torch.ones(hidden, dtype=DTYPE, device=DEVICE)
    qkv_weight = torch.randn((hq + 2 * hkv) * d, hidden, device=DEVICE).to(DTYPE)
    gate_up = torch.randn(2 * inter, hidden, device=DEVICE).to(DTYPE)
    k_cache = torch.zeros(8, BLOCK, hkv, d, dtype=DTYPE, device=DEVICE)
    angles = torch.randn(64, d // 2, device=DEVICE)
    for t in token_counts:
        x = torch.randn(t, hidden, device=DEVICE).to(DTYPE)
        residual = torch.randn(t, hidden, device=DEVICE).to(DTYPE)
        fused = t <= FUSED_LINEAR_ROWS
        if fused:
            qkv, residual = fused_linear.norm_linear(x, residual, norm, 1e-6, qkv_weight)
        else:  # PyTorch's GEMM beyond: nothing of fused_linear.py runs
            qkv = F.linear(x, qkv_weight)
        qkv = qkv.view(t, hq + 2 * hkv, d)
        positions, slots = _metadata_at(offset, torch.arange(t, dtype=torch.int32, device=DEVICE),
                                        torch.arange(t, dtype=torch.int32, device=DEVICE))
        fused_ops.qk_norm_rope(qkv[:, :hq], qkv[:, hq:hq + hkv], positions, angles.cos(),
                               angles.sin(), v=qkv[:, hq + hkv:],
                               cache=KVCacheWrite(k_cache, k_cache.clone(), slots))
        if fused:
            act, _ = fused_linear.norm_linear(x, residual, norm, 1e-6, gate_up, swiglu=True)
            fused_linear.linear(act, qkv_weight[:hidden, :inter])
