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


def _calls(arch: int) -> dict:
    """name -> the kernel and the launch its wrapper makes for Qwen3-0.6B's decode shapes
    (CPU tensors: nothing runs), recorded as on sm_<arch>."""
    from minivllm.kernels import triton_attention, triton_cache
    from minivllm.layers import fused_linear, fused_ops
    from minivllm.layers.attention import KVCacheWrite
    from tests.kernels.hopper_compile import attention_call, record, record_launch

    pdl = arch >= 90
    bf16 = dict(dtype=torch.bfloat16)
    hidden, hq, hkv, d, inter = 1024, 16, 8, 128, 3072
    x, norm = torch.zeros(1, hidden, **bf16), torch.ones(hidden, **bf16)
    qkv = torch.zeros(1, hq + 2 * hkv, d, **bf16)
    q, k, v = qkv[:, :hq], qkv[:, hq:hq + hkv], qkv[:, hq + hkv:]
    cache = torch.zeros(4, 16, hkv, d, **bf16)
    slots, positions = torch.zeros(1, dtype=torch.int32), torch.zeros(1, dtype=torch.int64)
    angles = torch.zeros(64, d // 2)
    calls = {
        "add_rms_norm": (fused_ops, "_add_rms_norm_kernel",
                         lambda: fused_ops.rms_norm(x, norm, 1e-6, x.clone())),
        "qk_norm_rope+cache write": (fused_ops, "_qk_norm_rope_kernel", lambda: fused_ops.qk_norm_rope(
            q, k, positions, angles, angles, norm[:d], norm[:d], 1e-6, v=v,
            cache=KVCacheWrite(cache, cache.clone(), slots))),
        "silu_and_mul": (fused_ops, "_silu_and_mul_kernel",
                         lambda: fused_ops.silu_and_mul(torch.zeros(1, 2 * inter, **bf16))),
        "write_kv_cache": (triton_cache, "_write_kv_cache_kernel",
                           lambda: triton_cache.write_kv_cache(k, v, cache, cache.clone(), slots)),
    }
    calls["fused_linear qkv"] = (fused_linear, "_fused_linear_kernel", (
        lambda: fused_linear.norm_linear(
            x, x.clone(), norm, 1e-6, torch.zeros((hq + 2 * hkv) * d, hidden, **bf16),
            torch.zeros((hq + 2 * hkv) * d, **bf16))))
    calls["fused_linear gate_up"] = (fused_linear, "_fused_linear_kernel", (
        lambda: fused_linear.norm_linear(x, x.clone(), norm, 1e-6,
                                         torch.zeros(2 * inter, hidden, **bf16), swiglu=True)))
    calls["fused_linear down"] = (fused_linear, "_fused_linear_kernel", (
        lambda: fused_linear.linear(torch.zeros(1, inter, **bf16),
                                    torch.zeros(hidden, inter, **bf16))))
    recorded = {name: (getattr(module, kernel), *record(module, kernel, call, pdl))
                for name, (module, kernel, call) in calls.items()}
    split_decode = attention_call(1, 1024, num_splits=4)
    recorded["attention (decode, split-KV)"] = (
        triton_attention._paged_attention_kernel, *record_launch(split_decode, pdl))
    args, kwargs = record_launch(split_decode, pdl, kernel="_merge_splits_kernel")
    recorded["split-KV merge"] = (triton_attention._merge_splits_kernel, args,
                                  dict(kwargs, num_warps=4))  # the wrapper's warps on a GPU
    return recorded


def compiled_ptx() -> dict[str, str]:
    """name -> PTX for sm_90, and "name sm_80" for two of them (run by the fixture below)."""
    from tests.kernels.hopper_compile import compile_kernel

    ptx = {name: compile_kernel(fn, args, kwargs).asm["ptx"]
           for name, (fn, args, kwargs) in _calls(90).items()}
    ampere = _calls(80)
    for name in ("fused_linear down", "write_kv_cache"):
        fn, args, kwargs = ampere[name]
        ptx[f"{name} sm_80"] = compile_kernel(fn, args, kwargs, arch=80).asm["ptx"]
    return ptx


NAMES = ["add_rms_norm", "qk_norm_rope+cache write", "silu_and_mul", "write_kv_cache",
         "attention (decode, split-KV)", "split-KV merge",
         *(f"fused_linear {name}" for name in ("qkv", "gate_up", "down"))]


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
    """One row of gate|up: BLOCK_N = 8 rows of gate and 8 of up, all 1,024 columns, 4 warps:
    every thread's share of the 32 KB in 16-byte loads, all issued before the wait."""
    ptx = ptx["fused_linear gate_up"]
    loads = _lines(ptx, r"\bld\.global")
    waits = _lines(ptx, WAIT)
    before = [i for i in loads if i < waits[0]]
    assert len(before) >= 2 * 8 * 1024 * 2 // 16 // 128, len(before)
    assert all(re.search(r"\.v4\.b32", ptx.splitlines()[i]) for i in before)


@pytest.mark.parametrize("name", ["fused_linear down", "write_kv_cache"])
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
        assert llm.engine.executor.runner.graphs is not None
        outs = llm.generate(prompts, temperature=0.0, max_tokens=40, ignore_eos=True,
                            use_tqdm=False)
        outputs[pdl_on] = [o.token_ids for o in outs]
        del llm
        torch.cuda.empty_cache()
    assert outputs["1"] == outputs["0"]
