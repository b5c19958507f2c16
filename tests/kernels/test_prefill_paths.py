"""The two inner loops of the Triton kernel's prefill path, each against the reference.

"tokens" gathers K/V with one block-table read per key; "pages" reads the table once per page and
folds the softmax scale into exp2 (minivllm/kernels/triton_attention.py). Both serve prefill, chunked
prefill and mixed batches, so every case below runs both, through `config`, on batches whose
lengths end mid-page and mid-tile, with -1 in the unused block-table entries (make_problem).
Tiles narrower than a page (a tile is a slice of one page), as wide as one, and spanning several
are all reached by forcing BLOCK_N. Decode-only batches keep the token path whatever is chosen.

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

PATHS = {
    "tokens": dict(PAGE_LOADS=False, FOLD_SCALE=False),
    "pages": dict(PAGE_LOADS=True, FOLD_SCALE=True),
}


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


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype,gqa,head_dim,block_size,block_n", CASES)
def test_mixed_batch_matches_reference(path, dtype, gqa, head_dim, block_size, block_n):
    """A prefill longer than a tile ending mid-page, a chunk over a context that ends mid-page,
    a one-token prefill, and decodes, in one call."""
    g = torch.Generator().manual_seed(block_size * 7 + head_dim)
    query_lens = [150, 19, 1, 1, 1]
    seq_lens = [150, 19 + 5 * block_size + 3, 1, 37, 2 * block_size]
    p = make_problem(query_lens, seq_lens, *gqa, head_dim, block_size, dtype, DEVICE, generator=g)
    config = dict(PATHS[path], **({"BLOCK_N": block_n} if block_n else {}))
    ref = paged_attention(*p.args(), backend="torch")
    err = rel_error(_triton(p, config), ref)
    assert err < TOLERANCE[dtype], f"{path}: relative error {err:.2e}"


@pytest.mark.parametrize("flag", ["PAGE_LOADS", "FOLD_SCALE"])
def test_each_change_alone_matches_reference(flag):
    """The page loads and the folded scale are independent switches (attn_bench.py --configs times each)."""
    g = torch.Generator().manual_seed(1)
    p = make_problem([70, 9, 1], [70, 9 + 77, 40], 8, 2, 64, 16, torch.bfloat16, DEVICE,
                     generator=g)
    config = {"PAGE_LOADS": False, "FOLD_SCALE": False, flag: True, "BLOCK_N": 32}
    ref = paged_attention(*p.args(), backend="torch")
    assert rel_error(_triton(p, config), ref) < TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("num_splits,causal", [(3, True), (None, False)])
def test_split_kv_and_non_causal_match_reference(path, num_splits, causal):
    """Split-KV slices start at multiples of BLOCK_N, so at page boundaries too; non-causal
    masks only the end of the context."""
    g = torch.Generator().manual_seed(5)
    p = make_problem([33, 1, 12], [200, 90, 12], 8, 2, 64, 16, torch.float32, DEVICE,
                     generator=g)
    config = dict(PATHS[path], BLOCK_N=32)
    ref = paged_attention(*p.args(), backend="torch", causal=causal)
    out = _triton(p, config, num_splits=num_splits, causal=causal)
    assert rel_error(out, ref) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("layout", ["token-major", "head-major"])
def test_fp8_cache_matches_reference(path, layout):
    """fp8 K/V with their scales beside the page: the page path reads the scales page by page
    (contiguous runs in the head-major layout) through the same block ids."""
    from tests.kernels.test_fp8 import quantized_problem

    p, (k8, v8, k_scale, v_scale) = quantized_problem(
        [40, 7, 1], [40, 7 + 50, 29], 8, 2, 64, 16, torch.bfloat16, seed=3, layout=layout)
    scales = dict(k_scale=k_scale, v_scale=v_scale)
    ref = paged_attention(p.query, k8, v8, *p.args()[3:], backend="torch", **scales)
    out = _triton(p, dict(PATHS[path], BLOCK_N=32), scales=scales, cache=(k8, v8))
    assert rel_error(out, ref) < TOLERANCE[torch.bfloat16]


def test_block_size_not_a_power_of_two(monkeypatch):
    """Pages of 24 tokens cannot be split into power-of-two tiles: the page path falls back to
    the token gather by itself (keeping the folded scale), and refuses when asked explicitly."""
    monkeypatch.setattr(triton_attention, "PREFILL_PATH", "pages")
    g = torch.Generator().manual_seed(9)
    p = make_problem([30, 1], [30 + 20, 49], 4, 2, 64, 24, torch.float32, DEVICE, generator=g)
    ref = paged_attention(*p.args(), backend="torch")
    assert rel_error(_triton(p, {}), ref) < TOLERANCE[torch.float32]
    with pytest.raises(ValueError, match="config: PAGE_LOADS needs a power-of-two block size"):
        _triton(p, {"PAGE_LOADS": True})


def test_decode_keeps_the_token_path(monkeypatch):
    """PREFILL_PATH picks the loop of prefill, chunked and mixed batches only: decode-only
    launches are what was measured at the bandwidth limit, and stay so."""
    monkeypatch.setattr(triton_attention, "PREFILL_PATH", "pages")
    assert triton_attention._prefill_path({}, decode_only=True, block_size=16) == (False, False)
    # An fp8 cache's decode takes the page path (measured faster there; bf16 decode does not).
    path = triton_attention._prefill_path
    assert path({}, decode_only=True, block_size=16, kv_fp8=True) == (True, True)
    assert path({}, decode_only=True, block_size=24, kv_fp8=True) == (False, True)
    assert triton_attention._prefill_path({}, decode_only=False, block_size=16) == (True, True)
    assert triton_attention._prefill_path({}, decode_only=False, block_size=24) == (False, True)
    monkeypatch.setattr(triton_attention, "PREFILL_PATH", "tokens")
    assert triton_attention._prefill_path({}, decode_only=False, block_size=16) == (False, False)
    cfg = {"PAGE_LOADS": True, "BLOCK_N": 64}
    assert triton_attention._prefill_path(cfg, decode_only=True, block_size=16) == (True, False)
    assert cfg == {"BLOCK_N": 64}  # the switches are taken out of the launch options


@pytest.mark.parametrize("variable,value,message", [
    ("MINIVLLM_PREFILL_PATH", "page", "must be one of ('tokens', 'pages'), got 'page'"),
    ("MINIVLLM_FP8_WIDEN", "ptx", "must be one of ('asm', 'cast'), got 'ptx'"),
])
def test_environment_variables_are_checked_at_import(variable, value, message):
    env = dict(os.environ, **{variable: value})
    run = subprocess.run([sys.executable, "-c", "import minivllm.kernels.triton_attention"],
                         env=env, capture_output=True, text=True, check=False)
    assert run.returncode != 0
    assert f"{variable} {message}" in run.stderr


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="the CPU stand-in for the compilation counter needs the interpreter")
def test_page_path_adds_no_specialization_after_warm_up(monkeypatch):
    """With the page path on, warm_up still compiles the 4 attention variants, the mixed ones
    with PAGE_LOADS set, and batches of other shapes add none (the GPU counterpart is
    tests/kernels/test_jit_specialization.py)."""
    from tests._triton_interpreter import PredictedSpecializations

    monkeypatch.setattr(triton_attention, "PREFILL_PATH", "pages")
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
                                                   "FOLD_SCALE", "ROW_ALIGN")))
    # The cache's strides (128, 32, 16) are multiples of 16: the page path gets the hint.
    assert variants == {(True, False, False, False, 1), (True, True, False, False, 1),
                        (False, False, True, True, 16), (False, True, True, True, 16)}
    assert keys.new_since(warm) == {}


def test_compiles_for_hopper_with_pipelined_16_byte_loads():
    """Compile the prefill variant of both paths for sm_90 ahead of time (no GPU needed:
    tests/kernels/hopper_compile.py) and read what came out: K and V must stream in through 16-byte
    asynchronous copies (`cp.async ... 0x10`: vectorized and software-pipelined) feeding Hopper's
    wgmma, with no 1- or 2-byte global loads (what Triton 3.6 compiles the page path to without
    its ROW_ALIGN hint), and the page path's tile loops must be the shorter ones, as the kernel's
    docstring says. Run on the GPU machine too: it checks that machine's Triton."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    script = textwrap.dedent("""
        import json
        from tests.kernels import hopper_compile as h
        found = {}
        for name, query_len, context, kv in (("prefill", 2048, 2048, "bf16"), ("chunked_fp8", 512, 8192, "fp8")):
            for path, config in (("tokens", dict(PAGE_LOADS=False, FOLD_SCALE=False)), ("pages", {})):
                call = h.attention_call(query_len, context, batch=4, kv=kv, config=config)
                found[f"{name} {path}"] = h.static_report(h.compile_launch(call))
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
    for case in ("prefill", "chunked_fp8"):
        tokens, pages = found[f"{case} tokens"], found[f"{case} pages"]
        if tokens["loop_instructions"]:  # nvdisasm shipped with this Triton
            assert len(pages["loop_instructions"]) == 2, pages  # unmasked, then masked tiles
            assert all(p < t for p, t in zip(pages["loop_instructions"],
                                             tokens["loop_instructions"])), (tokens, pages)
