"""The Triton kernel's prefill loop against the reference, and which loop each batch takes.

Prefill, chunked prefill and mixed batches read the block table once per page and fold the
softmax scale into exp2 (minivllm/kernels/triton_attention.py). Every case below runs on batches
whose lengths end mid-page and mid-tile, with -1 in the unused block-table entries
(make_problem). Tiles narrower than a page (a tile is a slice of one page), as wide as one, and
spanning several are all reached by forcing BLOCK_N. Decode-only batches of a 16-bit cache, and
block sizes that are not powers of two, gather key by key.

On CPU these run in the Triton interpreter; on a GPU, natively.
"""

import inspect
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from minivllm.kernels import available_backends, paged_attention, triton_attention, warm_up

from tests.devices import DEVICE, ON_DEVICE
from tests.kernels.paged_inputs import TOLERANCE, make_problem, rel_error

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [*ON_DEVICE,
              pytest.mark.skipif("triton" not in available_backends(DEVICE), reason="Triton cannot run here")]

def _triton(p, config, num_splits=None, causal=True, scales=None, cache=None):
    """The Triton kernel with a forced launch configuration (what attn_bench.py --tune sweeps)."""
    scales = scales or {}
    k_cache, v_cache = cache or (p.k_cache, p.v_cache)
    out = torch.empty_like(p.query)
    triton_attention.paged_attention(
        p.query, k_cache, v_cache, p.block_tables, p.seq_lens, p.cu_seqlens_q,
        p.query.shape[-1] ** -0.5, causal, out, num_splits=num_splits, config=dict(config),
        **scales)
    return out


# (dtype, (Hq, Hkv), head_dim, block_size, BLOCK_N or None for the default): GQA groups 1, 4
# and 8; tiles of several pages, of one page, of half a page; one-token pages (the transformers
# integration's cache).
CASES = [
    (torch.bfloat16, (4, 4), 64, 16, None),   # default tile: 8 pages of 16
    (torch.float16, (8, 2), 128, 32, 32),     # one page per tile
    (torch.float32, (8, 1), 64, 8, 64),       # 8 pages per tile, group 8
    (torch.bfloat16, (8, 2), 64, 32, 16),     # half a page per tile
    (torch.float32, (4, 2), 64, 1, 16),       # 16 one-token pages per tile
]


@pytest.mark.parametrize("dtype,gqa,head_dim,block_size,block_n", CASES)
def test_mixed_batch_matches_reference(dtype, gqa, head_dim, block_size, block_n):
    """A prefill longer than a tile ending mid-page, a chunk over a context that ends mid-page,
    a one-token prefill, and decodes, in one call."""
    g = torch.Generator().manual_seed(block_size * 7 + head_dim)
    query_lens = [150, 19, 1, 1, 1]
    seq_lens = [150, 19 + 5 * block_size + 3, 1, 37, 2 * block_size]
    p = make_problem(query_lens, seq_lens, *gqa, head_dim, block_size, dtype, DEVICE, generator=g)
    config = {"BLOCK_N": block_n} if block_n else {}
    ref = paged_attention(*p.args(), backend="torch")
    err = rel_error(_triton(p, config), ref)
    assert err < TOLERANCE[dtype], f"relative error {err:.2e}"


@pytest.mark.parametrize("num_splits,causal", [(3, True), (None, False)])
def test_split_kv_and_non_causal_match_reference(num_splits, causal):
    """Split-KV slices start at multiples of BLOCK_N, so at page boundaries too; non-causal
    masks only the end of the context."""
    g = torch.Generator().manual_seed(5)
    p = make_problem([33, 1, 12], [200, 90, 12], 8, 2, 64, 16, torch.float32, DEVICE,
                     generator=g)
    config = dict(BLOCK_N=32)
    ref = paged_attention(*p.args(), backend="torch", causal=causal)
    out = _triton(p, config, num_splits=num_splits, causal=causal)
    assert rel_error(out, ref) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("layout", ["token-major", "head-major"])
def test_fp8_cache_matches_reference(layout):
    """fp8 K/V with their scales beside the page: the page gather reads the scales page by page
    (contiguous runs in the head-major layout) through the same block ids."""
    from tests.kernels.test_fp8 import quantized_problem

    p, (k8, v8, k_scale, v_scale) = quantized_problem(
        [40, 7, 1], [40, 7 + 50, 29], 8, 2, 64, 16, torch.bfloat16, seed=3, layout=layout)
    scales = dict(k_scale=k_scale, v_scale=v_scale)
    ref = paged_attention(p.query, k8, v8, *p.args()[3:], backend="torch", **scales)
    out = _triton(p, dict(BLOCK_N=32), scales=scales, cache=(k8, v8))
    assert rel_error(out, ref) < TOLERANCE[torch.bfloat16]


def test_block_size_not_a_power_of_two():
    """Pages of 24 tokens cannot be split into power-of-two tiles: prefill then gathers key by
    key (keeping the folded scale)."""
    g = torch.Generator().manual_seed(9)
    p = make_problem([30, 1], [30 + 20, 49], 4, 2, 64, 24, torch.float32, DEVICE, generator=g)
    ref = paged_attention(*p.args(), backend="torch")
    assert rel_error(_triton(p, {}), ref) < TOLERANCE[torch.float32]


def test_which_batches_gather_by_page():
    """Every loop short of instructions gathers by page; the decode loop of a 16-bit cache, at
    the bandwidth limit, key by key; so does any loop over pages of a size that is not a power
    of two."""
    page_loads = triton_attention._page_loads
    assert not page_loads(decode_only=True, kv_fp8=False, block_size=16)
    assert page_loads(decode_only=True, kv_fp8=True, block_size=16)
    assert page_loads(decode_only=False, kv_fp8=False, block_size=16)
    assert page_loads(decode_only=False, kv_fp8=True, block_size=1)
    assert not page_loads(decode_only=False, kv_fp8=False, block_size=24)
    assert not page_loads(decode_only=True, kv_fp8=True, block_size=24)


def test_unknown_config_keys_are_refused():
    p = make_problem([3, 1], [3, 9], 4, 2, 16, 4, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"config: unknown keys \['PAGE_LOADS'\]"):
        _triton(p, {"PAGE_LOADS": True})


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="the CPU stand-in for the compilation counter needs the interpreter")
def test_page_gather_adds_no_specialization_after_warm_up():
    """warm_up compiles the 4 attention variants, the mixed ones with PAGE_LOADS set, and
    batches of other shapes add none (the GPU counterpart is
    tests/kernels/test_jit_specialization.py)."""
    from tests._triton_interpreter import PredictedSpecializations

    hq, hkv, d, block = 4, 2, 16, 4
    k_cache = torch.zeros(100, block, hkv, d)
    v_cache = torch.zeros_like(k_cache)
    g = torch.Generator().manual_seed(0)
    with PredictedSpecializations() as keys:
        warm_up(k_cache, v_cache, hq, backend="triton")
        warm = keys.snapshot()
        batches = [([9, 1], [9, 70], None), ([16, 1, 3], [60, 90, 3], 2),
                   ([1] * 5, [7, 3, 40, 1, 66], None)]
        for query_lens, seq_lens, num_splits in batches:
            p = make_problem(query_lens, seq_lens, hq, hkv, d, block, generator=g)
            paged_attention(p.query, k_cache, v_cache, p.block_tables.clamp(min=0), p.seq_lens,
                            p.cu_seqlens_q, backend="triton", num_splits=num_splits)
    names = list(inspect.signature(triton_attention._paged_attention_kernel.fn).parameters)
    variants = set()
    for specialization, _ in warm["_paged_attention_kernel"]:
        constexprs = {name: value for name, (kind, value) in zip(names, specialization)
                      if kind == "constexpr"}
        variants.add(tuple(constexprs[n] for n in ("DECODE_ONLY", "SPLIT_KV", "PAGE_LOADS",
                                                   "ROW_ALIGN")))
    # The cache's strides (128, 32, 16) are multiples of 16: the page gather gets the hint.
    assert variants == {(True, False, False, 1), (True, True, False, 1),
                        (False, False, True, 16), (False, True, True, 16)}
    assert keys.new_since(warm) == {}


def test_compiles_for_hopper_with_pipelined_16_byte_loads():
    """Compile the prefill variant for sm_90 ahead of time (no GPU needed:
    tests/kernels/hopper_compile.py) and read what came out: K and V must stream in through 16-byte asynchronous copies
    (`cp.async ... 0x10`: vectorized and software-pipelined) feeding Hopper's wgmma, with no 1-
    or 2-byte global loads (what Triton 3.6 compiles the page gather to without its ROW_ALIGN
    hint), and one loop for the unmasked tiles, one for the masked. Run on the GPU machine too:
    it checks that machine's Triton."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    script = textwrap.dedent("""
        import json
        from tests.kernels import hopper_compile as h
        found = {}
        for name, query_len, context, kv in (("prefill", 2048, 2048, "bf16"), ("chunked_fp8", 512, 8192, "fp8")):
            call = h.attention_call(query_len, context, batch=4, kv=kv)
            found[name] = h.static_report(h.compile_launch(call))
        print(json.dumps(found))
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    for label, report in found.items():
        assert report["cp_async_16"] >= 16, (label, report)  # >= 8 per K and V tile a thread
        assert report["wgmma"] > 0, (label, report)
        assert report["narrow_loads"] == 0, (label, report)
        if report["loop_instructions"]:  # nvdisasm shipped with this Triton
            assert len(report["loop_instructions"]) == 2, (label, report)
