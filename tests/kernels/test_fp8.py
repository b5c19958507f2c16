"""The fp8 (e4m3) KV cache: the quantization rule, both backends against each other and against
the unquantized reference, the argument checks, and the backends that cannot do it.

On CPU the Triton kernels run in the interpreter, whose own fp32 -> e4m3 rounding is not the
GPU's: tests/_triton_interpreter.py replaces that one cast by `e4m3_bits`, the GPU's rounding
written out in numpy (checked here against hand-computed values), independent of torch's cast,
which the reference uses. Loads of e4m3 and the widening casts are the interpreter's own.
"""

import functools
import math
import warnings

import numpy as np
import pytest
import torch

from minivllm.kernels import available_backends, backends, fp8, paged_attention, write_kv_cache
from minivllm.kernels import cuda as cuda_ext
from tests._triton_interpreter import e4m3_bits, patch_fp8_rounding
from tests.devices import DEVICE, ON_DEVICE
from tests.kernels.paged_inputs import TOLERANCE, make_problem, rel_error

pytestmark = ON_DEVICE
HAS_TRITON = "triton" in available_backends(DEVICE)
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="Triton cannot run here")
if DEVICE == "cpu" and HAS_TRITON:
    patch_fp8_rounding()

E4M3_ULP = 2.0 ** -3  # spacing of e4m3 normals relative to their binade: 3 mantissa bits


def fp8_caches(k_cache: torch.Tensor, layout: str = "token-major"):
    """Empty fp8 caches shaped like a 16-bit cache, and their scales: contiguous
    [num_blocks, block_size, Hkv], or the head-major layout of fp8.empty_scales."""
    k8 = torch.zeros(k_cache.shape, dtype=fp8.FP8_DTYPE, device=k_cache.device)
    if layout == "head-major":
        k_scale, v_scale = fp8.empty_scales(k8)
        return k8, torch.zeros_like(k8), k_scale.zero_(), v_scale.zero_()
    scale = torch.zeros(k_cache.shape[:3], dtype=torch.float32, device=k_cache.device)
    return k8, torch.zeros_like(k8), scale, torch.zeros_like(scale)


def quantized_problem(query_lens, seq_lens, hq, hkv, head_dim, block_size, dtype, seed,
                      backend="torch", layout="token-major", k_gain=1.0, v_gain=1.0):
    """A paged problem whose whole cache is also written into an fp8 cache by `backend`
    (K and V multiplied by k_gain / v_gain first)."""
    g = torch.Generator().manual_seed(seed)
    p = make_problem(query_lens, seq_lens, hq, hkv, head_dim, block_size, dtype, DEVICE,
                     generator=g)
    p.k_cache.mul_(k_gain)
    p.v_cache.mul_(v_gain)
    k8, v8, k_scale, v_scale = fp8_caches(p.k_cache, layout)
    slots = torch.arange(p.k_cache.shape[0] * block_size, device=DEVICE)
    rows = (-1, hkv, head_dim)
    write_kv_cache(p.k_cache.view(rows), p.v_cache.view(rows), k8, v8, slots, backend=backend,
                   k_scale=k_scale, v_scale=v_scale)
    return p, (k8, v8, k_scale, v_scale)


# --------------------------------------------------------------------------------------------
# The rule
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_bounds(dtype):
    """|x - dequant(quant(x))| <= half an e4m3 step: 2^-4 |x| for normals, 2^-10 scale below."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, 128, generator=g) * torch.logspace(-6, 6, 64)[:, None, None]
    x[0, 0] = 0.0  # a zero row
    x[1, 1, 5] = 3e38  # near float32's max: the scale must not overflow
    x[2, 2] = 1e-30  # a tiny row
    x = x.to(dtype).float()
    q, scale = fp8.quantize(x)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == x.shape[:-1]
    assert torch.isfinite(scale).all() and (scale > 0).all()
    back = fp8.dequantize(q, scale)
    assert torch.isfinite(back).all()
    scaled = x.abs() / scale[..., None]
    assert float(scaled.max()) <= fp8.E4M3_MAX * (1 + 1e-6)
    err = (back - x).abs()
    normal = scaled >= 2.0 ** -6  # e4m3's smallest normal
    assert (err[normal] <= 2.0 ** -4 * x.abs()[normal] * (1 + 1e-6)).all()
    subnormal_bound = (2.0 ** -10 * scale[..., None]).expand_as(x)
    assert (err[~normal] <= subnormal_bound[~normal] * (1 + 1e-6)).all()
    # The largest value of each row lands on 448 exactly (up to float32 rounding of the scale).
    top = (back.abs().amax(-1) / x.abs().amax(-1).clamp(min=1e-38))[x.abs().amax(-1) > 0]
    assert torch.allclose(top, torch.ones_like(top), atol=1e-6)
    assert torch.equal(back[0, 0], torch.zeros(128))


# e4m3 as a GPU rounds to it (cvt.rn.satfinite), worked out by hand: 3 mantissa bits, so a step
# of 2^(e-3) in the binade [2^e, 2^(e+1)) and 2^-9 below 2^-6 (subnormals); ties to even.
E4M3_CASES = [
    (1.0, 0x38, 1.0),  # exponent field 7 (the bias), mantissa 0
    (-1.0, 0xB8, -1.0),
    (0.0, 0x00, 0.0),
    (-0.0, 0x80, -0.0),
    (7.75, 0x50, 8.0),  # a tie between 7.5 (mantissa 111) and 8: even wins, with the carry
    (200.0, 0x74, 192.0),  # a tie between 192 (100) and 208 (101): even
    (201.0, 0x75, 208.0),  # past the tie: up
    (448.0, 0x7E, 448.0),  # the largest finite value
    (470.0, 0x7E, 448.0),  # above it: saturated, never NaN
    (float("inf"), 0x7E, 448.0),
    (2.0 ** -9, 0x01, 2.0 ** -9),  # the smallest subnormal, kept
    (2.0 ** -10, 0x00, 0.0),  # half of it: a tie with 0, even
    (3 * 2.0 ** -10, 0x02, 2.0 ** -8),  # 1.5 steps: a tie between 1 and 2, even
    (7 * 2.0 ** -9, 0x07, 7 * 2.0 ** -9),  # the largest subnormal
    (15 * 2.0 ** -10, 0x08, 2.0 ** -6),  # rounds up into the smallest normal
]


@pytest.mark.parametrize("value,bits,decoded", E4M3_CASES)
def test_the_interpreters_e4m3_rounding_is_the_gpus(value, bits, decoded):
    """The rounding the CPU tests give Triton's fp32 -> e4m3 cast, against values worked out by
    hand, and decoded back by torch."""
    got = e4m3_bits(np.array([value], dtype=np.float32))
    assert got.dtype == np.uint8 and int(got[0]) == bits
    back = torch.from_numpy(got).view(torch.float8_e4m3fn).float().item()
    assert back == decoded and math.copysign(1, back) == math.copysign(1, decoded)
    assert int(e4m3_bits(np.array([float("nan")], dtype=np.float32))[0]) & 0x7F == 0x7F


def test_the_interpreters_e4m3_rounding_agrees_with_torch_everywhere_in_range():
    """Two independent roundings (numpy's here, torch's in the reference) agree on every float16
    value of e4m3's range and on a million float32 values across 40 binades."""
    every_half = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16).view(torch.float16).float()
    g = torch.Generator().manual_seed(0)
    spread = (torch.randn(1_000_000, generator=g) * torch.logspace(-12, 2.6, 1_000_000)).clamp(-448, 448)
    for x in (every_half[every_half.abs() <= fp8.E4M3_MAX], spread):
        ours = e4m3_bits(x.numpy())
        torchs = x.to(fp8.FP8_DTYPE).view(torch.uint8).numpy()
        assert np.array_equal(ours, torchs), x[torch.from_numpy(ours != torchs)][:5]


# --------------------------------------------------------------------------------------------
# Triton against the reference
# --------------------------------------------------------------------------------------------
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_write_matches_reference(dtype):
    """Same e4m3 bits and scales (CPU: bit for bit; GPU: within one e4m3 step), padding skipped."""
    g = torch.Generator().manual_seed(1)
    num_blocks, block_size, heads, head_dim = 6, 8, 3, 80  # 80: masked lanes in the tile
    key = (torch.randn(10, heads, head_dim, generator=g) * 5).to(dtype).to(DEVICE)
    value = torch.randn(10, heads, head_dim, generator=g).to(dtype).to(DEVICE)
    key[3, 1] = 0.0  # a zero row: scale floor, zeros stored
    slots = torch.randperm(num_blocks * block_size, generator=g)[:10]
    slots[[2, 7]] = -1  # padding tokens: skipped
    slots = slots.to(DEVICE)
    written = {}
    for backend in ("torch", "triton"):
        caches = fp8_caches(torch.empty(num_blocks, block_size, heads, head_dim, device=DEVICE))
        write_kv_cache(key, value, caches[0], caches[1], slots, backend=backend,
                       k_scale=caches[2], v_scale=caches[3])
        written[backend] = caches
    (k_ref, v_ref, ks_ref, vs_ref), (k_tri, v_tri, ks_tri, vs_tri) = written.values()
    torch.testing.assert_close(ks_tri, ks_ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(vs_tri, vs_ref, rtol=1e-6, atol=0)
    for ref, tri in ((k_ref, k_tri), (v_ref, v_tri)):
        if DEVICE == "cpu":
            assert torch.equal(ref.view(torch.uint8), tri.view(torch.uint8))
        else:
            a, b = ref.float(), tri.float()
            assert ((a - b).abs() <= E4M3_ULP * a.abs().maximum(b.abs()) + 2.0 ** -9).all()
    assert int((ks_tri != 0).sum()) == 8 * heads  # exactly the 8 real tokens got scales
    flat = fp8.dequantize(k_tri, ks_tri).view(-1, heads, head_dim)
    slot = int(slots[0])
    assert rel_error(flat[slot], key[0].float()) < 2.0 ** -4


# One mixed batch per case: decodes (context 1, a block boundary), a full prefill, a chunk over a
# cached context. (dtype of the queries, (Hq, Hkv), head_dim, block_size, num_splits, layout of
# the scales)
CASES = [
    (torch.bfloat16, (8, 2), 64, 16, None, "token-major"),
    (torch.float16, (8, 1), 64, 8, None, "head-major"),
    (torch.float32, (4, 4), 80, 16, None, "token-major"),
    (torch.bfloat16, (8, 2), 128, 16, 3, "head-major"),
]


@needs_triton
@pytest.mark.parametrize("dtype,gqa,head_dim,block_size,num_splits,layout", CASES)
def test_triton_attention_on_fp8_matches_reference(dtype, gqa, head_dim, block_size, num_splits,
                                                   layout):
    query_lens = [1, 1, 2 * block_size, 13]
    seq_lens = [1, 2 * block_size, 2 * block_size, 3 * block_size + 5]
    p, (k8, v8, k_scale, v_scale) = quantized_problem(query_lens, seq_lens, *gqa, head_dim,
                                                      block_size, dtype, seed=head_dim,
                                                      layout=layout)
    args = (p.query, k8, v8, *p.args()[3:])
    ref = paged_attention(*args, backend="torch", k_scale=k_scale, v_scale=v_scale)
    out = paged_attention(*args, backend="triton", k_scale=k_scale, v_scale=v_scale,
                          num_splits=num_splits)
    assert out.dtype == dtype
    # The kernel reads the same e4m3 values and scales as the reference: only its own rounding
    # (probabilities to the query dtype before P @ V) is left, as for a 16-bit cache.
    assert rel_error(out, ref) < TOLERANCE[dtype]
    # Against attention on the unquantized cache: fp8 keeps 3 mantissa bits (<= 6.25 % per
    # value); on these Gaussian K/V the output lands within 6 %.
    exact = paged_attention(*p.args(), backend="torch")
    assert rel_error(out, exact) < 0.06


@needs_triton
@pytest.mark.parametrize("q_gain,v_gain", [(1.0, 1e-4), (300.0, 1.0)])
def test_fp16_dots_keep_small_values_and_large_queries(q_gain, v_gain):
    """A bf16 query on an fp8 cache runs its dots in fp16. Values of 1e-4 (scales ~1e-6) would
    sink into fp16's subnormals if the probabilities were multiplied by the scales directly (10 %
    error, measured in the interpreter); a query of a few hundred makes logits of thousands.
    Both must match the reference."""
    p, (k8, v8, k_scale, v_scale) = quantized_problem([1, 1, 9], [40, 7, 30], 8, 2, 64, 16,
                                                      torch.bfloat16, seed=21, v_gain=v_gain)
    query = (p.query.float() * q_gain).bfloat16()
    args = (query, k8, v8, *p.args()[3:])
    ref = paged_attention(*args, backend="torch", k_scale=k_scale, v_scale=v_scale)
    out = paged_attention(*args, backend="triton", k_scale=k_scale, v_scale=v_scale)
    assert rel_error(out, ref) < TOLERANCE[torch.bfloat16]


@needs_triton
def test_decode_split_kv_on_fp8():
    """Decode batches with the context cut into slices, some of which see no key."""
    p, (k8, v8, k_scale, v_scale) = quantized_problem([1] * 4, [1, 16, 17, 200], 8, 2, 64, 16,
                                                      torch.bfloat16, seed=3)
    args = (p.query, k8, v8, *p.args()[3:])
    ref = paged_attention(*args, backend="torch", k_scale=k_scale, v_scale=v_scale)
    for num_splits in (1, 5):
        out = paged_attention(*args, backend="triton", k_scale=k_scale, v_scale=v_scale,
                              num_splits=num_splits)
        assert rel_error(out, ref) < TOLERANCE[torch.bfloat16]


# The offset arithmetic of caches of 2^31 elements or more (unsigned 32-bit offsets below
# 2^32, a 64-bit pointer per key row above), as config keys.
OFFSETS = {
    "int32": {},
    "int64": dict(INT64_OFFSETS=True),
    "u32": dict(U32_OFFSETS=True),
}


@needs_triton
@pytest.mark.parametrize("offsets", OFFSETS)
@pytest.mark.parametrize("kv", ["bf16", "fp8"])
@pytest.mark.parametrize("batch", ["decode", "mixed"])
@pytest.mark.parametrize("block_size", [16, 24])
def test_each_loop_matches_reference(offsets, kv, batch, block_size):
    """Every inner loop the kernel runs: the key-by-key gather (16-bit decode, and any block size
    that is not a power of two) and the page-by-page one, on decode-only and mixed batches, on a
    16-bit and an fp8 cache, with each offset arithmetic, against the reference. U32_OFFSETS and
    INT64_OFFSETS are forced here (the kernel takes them by itself only for caches of 2^31 and
    2^32 elements, too large for a test). Contexts end mid-page and mid-tile; unused table
    entries are -1 (make_problem)."""
    from minivllm.kernels import triton_attention

    query_lens = [1, 1, 1] if batch == "decode" else [1, 37, 1]
    seq_lens = [70, 16, 1] if batch == "decode" else [70, 37 + 19, 33]
    p, (k8, v8, k_scale, v_scale) = quantized_problem(query_lens, seq_lens, 8, 2, 64,
                                                      block_size, torch.bfloat16, seed=7,
                                                      layout="head-major")
    k, v, scales = (k8, v8, dict(k_scale=k_scale, v_scale=v_scale)) if kv == "fp8" else (
        p.k_cache, p.v_cache, {})
    args = (p.query, k, v, *p.args()[3:])
    ref = paged_attention(*args, backend="torch", **scales)
    out = torch.empty_like(p.query)
    triton_attention.paged_attention(*args, 64 ** -0.5, True, out, num_splits=2,
                                     config=dict(OFFSETS[offsets], BLOCK_N=32), **scales)
    assert rel_error(out, ref) < TOLERANCE[torch.bfloat16]


def test_compiled_decode_loop_with_64_bit_offsets():
    """Compile the bf16 decode loop for sm_90 (no GPU needed: Triton ships ptxas and nvdisasm;
    tests/kernels/hopper_compile.py) and read its machine code: the 64-bit offsets of a large cache
    add at most a quarter to it (measured 1.19x on Triton 3.6; 1.31x before they became one
    64-bit pointer per key row). Run on the GPU machine too: it checks that machine's Triton."""
    import json
    import os
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    pytest.importorskip("triton.backends.nvidia.compiler")
    root = Path(__file__).resolve().parents[2]
    script = textwrap.dedent("""
        import json
        from tests.kernels import hopper_compile as h
        found = {}
        for name, config in (("bf16", {}), ("bf16 int64", {"INT64_OFFSETS": True})):
            report = h.static_report(h.compile_launch(h.attention_call(1, 4096, config=config)))
            found[name] = report["loop_instructions"][0]
        print(json.dumps(found))
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET",)}
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=root, capture_output=True,
                          text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["bf16 int64"] <= 1.25 * found["bf16"], found


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="a CUDA graph needs a GPU")
def test_fp8_write_and_attention_replay_from_a_cuda_graph():
    """Scales are computed inside the write kernel: the whole fp8 step captures and replays."""
    p, (k8, v8, k_scale, v_scale) = quantized_problem([1, 1], [700, 50], 16, 4, 128, 16,
                                                      torch.bfloat16, seed=12, backend="triton")
    key = torch.randn(2, 4, 128, device=DEVICE, dtype=torch.bfloat16)
    value = torch.randn_like(key)
    slots = torch.tensor([3, 40], device=DEVICE)
    out = torch.empty_like(p.query)

    def step():
        write_kv_cache(key, value, k8, v8, slots, backend="triton", k_scale=k_scale,
                       v_scale=v_scale)
        paged_attention(p.query, k8, v8, *p.args()[3:], backend="triton", out=out,
                        max_seq_len=4096, k_scale=k_scale, v_scale=v_scale)

    step()  # warm-up: compiles outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    key.mul_(7.0)  # new values, same addresses: the scales must follow
    graph.replay()
    torch.testing.assert_close(fp8.dequantize(k8, k_scale).view(-1, 4, 128)[40],
                               key[1].float(), rtol=2.0 ** -4, atol=0)
    ref = paged_attention(p.query, k8, v8, *p.args()[3:], backend="torch", k_scale=k_scale,
                          v_scale=v_scale)
    assert rel_error(out, ref) < TOLERANCE[torch.bfloat16]


# --------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------
def _cpu_problem():
    p = make_problem([3, 1], [10, 20], 8, 2, 16, 4, generator=torch.Generator().manual_seed(0))
    return p, fp8_caches(p.k_cache)


@pytest.mark.parametrize("make,error,words", [
    (lambda c: dict(k_scale=None), ValueError, "k_cache is float8_e4m3fn: pass its scales"),
    (lambda c: dict(v_scale=None), ValueError, "v_scale is missing"),
    (lambda c: dict(k_scale=c[2].double()), TypeError, "k_scale must be float32"),
    (lambda c: dict(v_scale=c[3][:-1]), ValueError, r"v_scale must be \[num_blocks"),
    (lambda c: dict(k_scale=c[2][..., None]), ValueError, "k_scale must have 3 dimensions"),
    (lambda c: dict(k_scale=c[2].transpose(1, 2).contiguous().transpose(1, 2)), ValueError,
     "v_scale must be laid out like k_scale"),
    (lambda c: dict(v_cache=c[1].float()), TypeError, "k_cache is torch.float8_e4m3fn but v_cache"),
    (lambda c: dict(k_cache=c[0].view(torch.float8_e5m2), v_cache=c[1].view(torch.float8_e5m2)),
     TypeError, "k_cache must be float32, float16, bfloat16 or float8_e4m3fn"),
])
def test_fp8_arguments_are_named(make, error, words):
    p, caches = _cpu_problem()
    args = dict(k_cache=caches[0], v_cache=caches[1], k_scale=caches[2], v_scale=caches[3])
    args.update(make(caches))
    with pytest.raises(error, match=words):
        paged_attention(p.query, args["k_cache"], args["v_cache"], *p.args()[3:],
                        backend="torch", k_scale=args["k_scale"], v_scale=args["v_scale"])
    key = torch.randn(2, 2, 16)
    with pytest.raises(error, match=words):
        write_kv_cache(key, key, args["k_cache"], args["v_cache"], torch.tensor([0, 1]),
                       backend="torch", k_scale=args["k_scale"], v_scale=args["v_scale"])


def test_scales_without_an_fp8_cache_are_refused():
    p, caches = _cpu_problem()
    with pytest.raises(ValueError, match="k_scale and v_scale are for an fp8"):
        paged_attention(*p.args(), backend="torch", k_scale=caches[2], v_scale=caches[3])


def test_write_takes_any_float_dtype_into_fp8():
    p, (k8, v8, k_scale, v_scale) = _cpu_problem()
    key = torch.randn(2, 2, 16, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="key is torch.bfloat16 but value is torch.float32"):
        write_kv_cache(key, key.float(), k8, v8, torch.tensor([0, 1]), k_scale=k_scale,
                       v_scale=v_scale)
    write_kv_cache(key, key, k8, v8, torch.tensor([0, 1]), k_scale=k_scale, v_scale=v_scale)
    assert rel_error(fp8.dequantize(k8, k_scale)[0, :2], key.float()) < 2.0 ** -4


# --------------------------------------------------------------------------------------------
# Backends that cannot do it
# --------------------------------------------------------------------------------------------
def test_the_cuda_extension_declines_fp8():
    query = torch.zeros(2, 8, 128, dtype=torch.bfloat16)
    cache = torch.zeros(4, 16, 2, 128, dtype=fp8.FP8_DTYPE)
    seq_lens = torch.ones(2, dtype=torch.int32)
    assert "fp8" in cuda_ext.attention_unsupported(query, cache, cache, seq_lens)
    assert "fp8" in cuda_ext.write_kv_unsupported(query[:, :2], query[:, :2], cache, cache)


def test_explicit_cuda_backend_on_fp8_falls_back_with_the_reason(monkeypatch):
    """As if the extension were built: an fp8 call runs elsewhere, and the warning says why."""
    monkeypatch.setattr(backends, "resolve_backend", lambda backend, device, op: "cuda")
    for op in backends.KERNELS:
        monkeypatch.setitem(backends.KERNELS[op], "cuda", lambda **call: pytest.fail("ran cuda"))
    p, (k8, v8, k_scale, v_scale) = _cpu_problem()
    key = torch.randn(2, 2, 16)
    with pytest.warns(UserWarning, match="write_kv_cache runs on .* for an fp8 KV cache"):
        write_kv_cache(key, key, k8, v8, torch.tensor([0, 5]), backend="cuda", k_scale=k_scale,
                       v_scale=v_scale)
    with pytest.warns(UserWarning, match="paged_attention runs on .* for an fp8 KV cache"):
        out = paged_attention(p.query, k8, v8, *p.args()[3:], backend="cuda", k_scale=k_scale,
                              v_scale=v_scale)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = paged_attention(p.query, k8, v8, *p.args()[3:], backend="torch", k_scale=k_scale,
                              v_scale=v_scale)
    assert rel_error(out, ref) < 1e-5


def test_triton_fp8_on_an_older_gpu_is_a_clear_error(monkeypatch):
    """Triton's e4m3 needs compute capability 8.9 (Ada, Hopper); an A100 is 8.0."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(backends, "resolve_backend", lambda backend, device, op: "triton")
    fp8_unsupported = functools.partial(backends.kv_cache_unsupported, fp8.FP8_DTYPE, "triton")
    assert "8.9" in fp8_unsupported(torch.device("cuda", 0))
    assert fp8_unsupported(torch.device("cpu")) is None
    assert backends.kv_cache_unsupported(torch.bfloat16, "triton", torch.device("cuda", 0)) is None
    assert "16-bit" in backends.kv_cache_unsupported(fp8.FP8_DTYPE, "cuda", torch.device("cuda", 0))
    p, (k8, v8, k_scale, v_scale) = _cpu_problem()
    with pytest.raises(ValueError, match="k_cache is float8_e4m3fn .* compute capability 8.9"):
        backends.dispatch("paged_attention", "triton", torch.device("cuda", 0), query=p.query,
                          k_cache=k8, v_cache=v8, k_scale=k_scale, v_scale=v_scale)


def test_the_offset_arithmetic_follows_the_cache_size():
    """32-bit signed offsets while they fit; unsigned 32-bit up to 2^32 elements (the H200's
    fp8 pool, 2.28e9 a layer, lands here); beyond, only 64-bit row pointers. Asking for unsigned
    32-bit offsets on a cache too large is an error; asking for 64-bit ones always works."""
    from minivllm.kernels.triton_attention import _offset_switches, offset_kind

    assert offset_kind(2**31 - 1) == "int32"
    h200_fp8_pool = 138_909 * 16 * 8 * 128  # one layer's cache, elements
    assert offset_kind(2**31) == offset_kind(h200_fp8_pool) == offset_kind(2**32 - 1) == "uint32"
    assert offset_kind(2**32) == "int64"

    assert _offset_switches({}, 2**31 - 1) == (False, False)
    assert _offset_switches({}, 2**31) == (False, True)
    assert _offset_switches({}, 2**32 - 1) == (False, True)
    assert _offset_switches({}, 2**32) == (True, False)
    assert _offset_switches({"INT64_OFFSETS": True}, 2**31) == (True, False)
    assert _offset_switches({"INT64_OFFSETS": True}, 2**20) == (True, False)
    with pytest.raises(ValueError, match=r"U32_OFFSETS addresses at most 2\^32 elements"):
        _offset_switches({"U32_OFFSETS": True}, 2**32)
