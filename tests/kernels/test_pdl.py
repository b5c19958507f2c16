"""Programmatic dependent launch (minivllm/kernels/pdl.py): when it is on, and what every kernel
of the decode step compiles to with it.

The interpreter runs no `griddepcontrol`, so the tests compile the kernels ahead of time for
sm_90 with the installed Triton (which ships ptxas; no GPU needed) and read the PTX: each kernel
waits for its predecessor before it stores anything, signals its dependents right after, and the
small-batch linear kernel issues its weight loads before the wait (the point of it). Built for
sm_80, the same kernels carry none of it. The compiling runs in a subprocess without
TRITON_INTERPRET (under it, `triton.jit` makes interpreted functions, which do not compile).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minivllm.kernels import pdl

ROOT = Path(__file__).resolve().parents[2]
WAIT, RELEASE = "griddepcontrol.wait", "griddepcontrol.launch_dependents"


def test_on_only_for_cuda_hopper_and_not_interpreting(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(pdl, "_capability", lambda index: (9, 0))
    cuda = torch.device("cuda", 0)
    assert pdl.use_pdl(cuda) and pdl.pdl_launch(cuda) == {"USE_PDL": True, "launch_pdl": True}
    assert not pdl.use_pdl(torch.device("cpu"))
    monkeypatch.setenv("MINIVLLM_PDL", "0")
    assert not pdl.use_pdl(cuda)
    monkeypatch.delenv("MINIVLLM_PDL")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not pdl.use_pdl(cuda)
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setattr(pdl, "_capability", lambda index: (8, 0))  # an A100: no griddepcontrol
    assert pdl.pdl_launch(cuda) == {"USE_PDL": False, "launch_pdl": False}


def _compile(fn, consts, floats=(), ints=None, arch=90, **pointer_types):
    """`fn` for sm_<arch>, every `*_ptr` argument bf16 unless named, ints = 64."""
    from benchmarks.sass_count import compile_kernel

    pointers = {p.name: pointer_types.get(p.name, "*bf16") for p in fn.params
                if p.name.endswith("_ptr")}
    ints = {p.name: 64 for p in fn.params} | (ints or {})
    return compile_kernel(fn, dict(consts, USE_PDL=arch >= 90), pointers, ints,
                          dict(num_warps=4), arch, floats=floats)


def _kernels():
    """name -> (arch -> compiled kernel), each as the decode step launches it."""
    from benchmarks.sass_count import compile_decode
    from minivllm.kernels import triton_cache
    from minivllm.layers import fused_linear, fused_ops

    linear = dict(NORM=True, ADD_RESIDUAL=True, SWIGLU=True, HAS_BIAS=True, DOT=False,
                  DOT_PRECISION="tf32", BLOCK_M=1, BLOCK_N=8, BLOCK_K=1024)
    rope = dict(HAS_NORM=True, HALF=64, HALF_BLOCK=64, BLOCK_SIZE=16, WRITE_CACHE=True,
                KV_FP8=False)
    cache = dict(NUM_KV_HEADS=8, HEAD_DIM=128, BLOCK_SIZE=16, HEADS_PAD=8, DIM_PAD=128,
                 KV_FP8=False)
    scales = dict(k_scale_ptr="*fp32", v_scale_ptr="*fp32", slot_mapping_ptr="*i32")
    return {
        "fused_linear": lambda arch: _compile(fused_linear._fused_linear_kernel, linear,
                                              ("eps",), dict(K=1024), arch),
        "add_rms_norm": lambda arch: _compile(fused_ops._add_rms_norm_kernel,
                                              dict(HAS_RESIDUAL=True, BLOCK=1024), ("eps",),
                                              arch=arch),
        "qk_norm_rope+cache write": lambda arch: _compile(
            fused_ops._qk_norm_rope_kernel, rope, ("eps",), arch=arch, positions_ptr="*i64",
            cos_ptr="*fp32", sin_ptr="*fp32", **scales),
        "silu_and_mul": lambda arch: _compile(fused_ops._silu_and_mul_kernel, dict(BLOCK=1024),
                                              arch=arch),
        "write_kv_cache": lambda arch: _compile(triton_cache._write_kv_cache_kernel, cache,
                                                arch=arch, **scales),
        "attention (decode, split-KV merged)": lambda arch: compile_decode(
            "bf16", {}, split_kv=True, arch=arch)[0],
    }


def _linear_variants():
    """Every variant of the small-batch linear kernel the model launches: one row or tl.dot,
    q|k|v (norm, residual, bias), gate|up (SwiGLU), o_proj/down_proj (plain)."""
    from minivllm.layers import fused_linear

    variants = {}
    for rows in (1, 16):
        block_m = fused_linear.block_rows(rows)
        for name, (n, k, swiglu, norm) in {"qkv": (4096, 1024, False, True),
                                          "gate_up": (3072, 1024, True, True),
                                          "down": (1024, 3072, False, False)}.items():
            cfg = fused_linear.choose_config(n, k, block_m, swiglu)
            consts = dict(NORM=norm, ADD_RESIDUAL=norm, SWIGLU=swiglu, HAS_BIAS=name == "qkv",
                          DOT=block_m > 1, DOT_PRECISION="tf32", BLOCK_M=block_m,
                          BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K)
            variants[f"fused_linear {name} M={rows}"] = (fused_linear._fused_linear_kernel, consts,
                                                        dict(N=n, K=k), cfg)
    return variants


def compiled_ptx() -> dict[str, str]:
    """name -> PTX for sm_90, and "name sm_80" for two of them (run by the fixture below)."""
    from benchmarks.sass_count import compile_kernel

    kernels = _kernels()
    ptx = {name: build(90).asm["ptx"] for name, build in kernels.items()}
    for name, (fn, consts, ints, cfg) in _linear_variants().items():
        pointers = {p.name: "*bf16" for p in fn.params if p.name.endswith("_ptr")}
        ptx[name] = compile_kernel(fn, dict(consts, USE_PDL=True), pointers,
                                   {p.name: 64 for p in fn.params} | ints,
                                   dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
                                   floats=("eps",)).asm["ptx"]
    ptx.update({f"{name} sm_80": kernels[name](80).asm["ptx"]
                for name in ("fused_linear", "write_kv_cache")})
    return ptx


NAMES = ["fused_linear", "add_rms_norm", "qk_norm_rope+cache write", "silu_and_mul",
         "write_kv_cache", "attention (decode, split-KV merged)",
         *(f"fused_linear {name} M={rows}" for rows in (1, 16) for name in ("qkv", "gate_up", "down"))]


@pytest.fixture(scope="module")
def ptx():
    pytest.importorskip("triton.backends.nvidia.compiler")
    script = ("import json; from tests.kernels.test_pdl import compiled_ptx; "
              "print(json.dumps(compiled_ptx()))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _lines(ptx: str, pattern: str) -> list[int]:
    return [i for i, line in enumerate(ptx.splitlines()) if re.search(pattern, line)]


@pytest.mark.parametrize("name", NAMES)
def test_each_kernel_waits_before_it_writes_and_releases_after(name, ptx):
    ptx = ptx[name]
    waits, releases = _lines(ptx, WAIT), _lines(ptx, RELEASE)
    assert len(waits) == 1 and len(releases) == 1, (waits, releases)
    assert waits[0] < releases[0]
    stores = _lines(ptx, r"\b(st|red|atom)\.global")
    assert stores and min(stores) > waits[0], "a store before the wait races the previous kernel"


def test_the_linear_kernel_loads_its_weights_before_the_wait(ptx):
    ptx = ptx["fused_linear"]
    loads = _lines(ptx, r"\bld\.global")
    waits = _lines(ptx, WAIT)
    before = [i for i in loads if i < waits[0]]
    # BLOCK_N = 8 rows of gate and 8 of up, 1024 columns each, 4 warps: 16-byte loads.
    assert len(before) >= 2 * 8 * 1024 * 2 // 16 // 128, len(before)
    assert all(re.search(r"\.v4\.b32", ptx.splitlines()[i]) for i in before)


@pytest.mark.parametrize("name", ["fused_linear", "write_kv_cache"])
def test_without_hopper_nothing_is_compiled_in(name, ptx):
    ptx = ptx[f"{name} sm_80"]
    assert WAIT not in ptx and RELEASE not in ptx


@pytest.mark.gpu
def test_pdl_changes_no_bit_of_the_output(tmp_path, monkeypatch):
    """PDL only changes when kernels start, never what they compute: greedy tokens through CUDA
    graphs (bfloat16, so every small-batch fusion is on) are identical with it and without it.
    A kernel that read its predecessor's output before its wait would make them differ."""
    import random

    from minivllm import LLM
    from minivllm.models import make_random_model

    model = make_random_model(tmp_path / "m", arch="qwen3", size="small", seed=3)
    rng = random.Random(0)
    prompts = [[rng.randrange(4, 1024) for _ in range(rng.randint(3, 60))] for _ in range(11)]
    outputs = {}
    for pdl_on in ("1", "0"):
        monkeypatch.setenv("MINIVLLM_PDL", pdl_on)
        llm = LLM(str(model), device="cuda", dtype="bfloat16", max_num_seqs=8, max_model_len=512,
                  num_kv_blocks=256, block_size=16, enable_prefix_caching=False)
        assert llm.engine.model_runner.graphs is not None
        outs = llm.generate(prompts, temperature=0.0, max_tokens=40, ignore_eos=True,
                            use_tqdm=False)
        outputs[pdl_on] = [o.token_ids for o in outs]
        del llm
        torch.cuda.empty_cache()
    assert outputs["1"] == outputs["0"]
