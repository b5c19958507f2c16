"""Which implementation runs a call: backend selection and the one dispatch table.

    "torch"   the reference in `reference.py`: the oracle every other backend is tested against;
    "sdpa"    `sdpa.py`: the CPU path, PyTorch's fused attention over K/V gathered once per
              layer, with the step's gather indices and masks planned once (`PLANNERS`);
    "triton"  the fast GPU kernels (`triton_attention.py`, `triton_cache.py`); they also run on
              CPU tensors under TRITON_INTERPRET=1, which is how the CPU tests run them;
    "cuda"    the optional C++ extension built from csrc/ (`cuda.py`): tensor-core kernels for
              decode, prefill, chunked prefill and mixed batches (fp16/bf16, head_dim 64/128);
    "auto"    Triton on a GPU (or the extension, for the ops listed in AUTO_PREFERS_CUDA),
              else "sdpa".

`KERNELS` maps op -> backend -> function; every function of one op takes the same keyword
arguments. Every backend but the extension reads and writes fp8 caches (on a GPU, Triton's fp8
needs compute capability 8.9 or newer). The extension covers only part of each op, so before it
runs a call it is asked why it might not fit (`CUDA_DECLINES`); a call it declines runs on Triton
instead, with a warning that gives the reason when the caller asked for backend="cuda"
explicitly.
"""

from __future__ import annotations

import importlib
import os
import warnings

import torch

from . import cuda as _cuda
from . import reference, sdpa
from .fp8 import FP8_DTYPE

BACKENDS = ("auto", "torch", "sdpa", "triton", "cuda")

# Where "auto" takes the C++ extension when it is built, rather than Triton: only for ops where
# it measured faster in the same run. Its tensor-core attention (mma.sync) matches Triton in
# decode (0.99x) and is slower in prefill (1.42x causal 4 x 2048, H200; benchmarks/RESULTS.md,
# `attn_bench.py --backends triton,cuda`), so "auto" keeps Triton; backend="cuda" selects it.
AUTO_PREFERS_CUDA = {"paged_attention": False, "write_kv_cache": False}


def _triton(module: str, name: str):
    """A Triton implementation, imported on first use: `import minivllm.kernels` needs no triton."""

    fn = None

    def call(**args):
        nonlocal fn
        if fn is None:
            fn = getattr(importlib.import_module(f"{__package__}.{module}"), name)
        return fn(**args)

    call.__name__ = f"{module}.{name}"
    return call


# op -> backend -> implementation.
KERNELS = {
    "write_kv_cache": {
        "torch": reference.write_kv_cache,
        "sdpa": sdpa.write_kv_cache,
        "triton": _triton("triton_cache", "write_kv_cache"),
        "cuda": _cuda.write_kv_cache,
    },
    "paged_attention": {
        "torch": reference.paged_attention,
        "sdpa": sdpa.paged_attention,
        "triton": _triton("triton_attention", "paged_attention"),
        "cuda": _cuda.paged_attention,
    },
}
# backend -> what turns a step's attention metadata into its plan (`plan_attention`); a backend
# that is not listed needs none.
PLANNERS = {"sdpa": sdpa.make_plan}
# op -> why the extension cannot run this call (None: it can). Looks at shapes, dtypes, strides
# and alignment only, so deciding never reads a value back from the GPU.
CUDA_DECLINES = {
    "write_kv_cache": _cuda.write_kv_unsupported,
    "paged_attention": _cuda.attention_unsupported,
}


def _triton_usable(device: torch.device) -> bool:
    """Triton runs natively on CUDA tensors, and on CPU tensors only in interpreter mode."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    if device.type == "cuda":
        return True
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """The backends that can run on tensors of `device`."""
    device = torch.device(device)
    names = ["torch", "sdpa"]
    if _triton_usable(device):
        names.append("triton")
    if device.type == "cuda" and _cuda.is_available():
        names.append("cuda")
    return names


def resolve_backend(backend: str, device: torch.device, op: str = "paged_attention") -> str:
    """Turn "auto" into a concrete backend and fail clearly for one that cannot run here."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cuda":
            if AUTO_PREFERS_CUDA.get(op, False) and _cuda.is_available() and _cuda.supports(op):
                return "cuda"
            if _triton_usable(device):
                return "triton"
        return "sdpa"
    if backend == "triton" and not _triton_usable(device):
        raise ValueError(
            "backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors) and the "
            f"triton package; got tensors on {device}"
        )
    if backend == "cuda":
        if device.type != "cuda":
            raise ValueError(f"backend='cuda' needs CUDA tensors; got tensors on {device}")
        if not _cuda.is_available():
            raise ValueError(f"backend='cuda' is not available: {_cuda.unavailable_reason()}")
    return backend


def kv_cache_unsupported(dtype: torch.dtype, backend: str, device: torch.device) -> str | None:
    """Why `backend` ("auto" as `resolve_backend` resolves it) cannot read a cache stored in
    `dtype` on `device` (None: it can). Every backend reads 16-bit and float32 caches. fp8: the
    reference and sdpa anywhere; Triton where it has e4m3 (float8e4nv): NVIDIA compute capability 8.9
    and newer (Ada, Hopper), and in the interpreter on CPU; the extension never."""
    if dtype != FP8_DTYPE:
        return None
    name = resolve_backend(backend, device, "paged_attention") if backend == "auto" else backend
    if name == "cuda":
        return "the CUDA extension reads 16-bit caches only"
    if name == "triton" and device.type == "cuda":
        capability = torch.cuda.get_device_capability(device)
        if capability < (8, 9):
            return (f"the Triton kernels need compute capability 8.9 or newer for "
                    f"float8_e4m3fn and this GPU has {capability[0]}.{capability[1]}")
    return None


def dispatch(op: str, backend: str, device: torch.device, **args):
    """Run `op` on the backend that `backend` resolves to; `args` are already validated.

    A call the extension declines runs on Triton (or on sdpa where Triton cannot run).
    "auto" falls back silently; an explicit backend="cuda" is told why, once per reason (the
    warning points at the caller of the public op).
    """
    name = resolve_backend(backend, device, op)
    if name == "cuda":
        reason = CUDA_DECLINES[op](**args)
        if reason is not None:
            fallback = "triton" if _triton_usable(device) else "sdpa"
            if backend == "cuda":
                warnings.warn(f"backend='cuda': {op} runs on {fallback} for {reason}", stacklevel=3)
            name = fallback
    if name == "triton":
        reason = kv_cache_unsupported(args["k_cache"].dtype, name, device)
        if reason is not None:
            raise ValueError(f"k_cache is float8_e4m3fn (an fp8 KV cache), but {reason}; use a "
                             "bfloat16 or float16 cache here")
    return KERNELS[op][name](**args)
