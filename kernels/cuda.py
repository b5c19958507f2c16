"""Loader for the optional C++/CUDA extension built from csrc/.

The extension is opt-in: a plain install never builds it, and its absence is not an error. The
other backends are used instead, and only an explicit `backend="cuda"` reports why it is missing.
There are two ways to get it, both needing nvcc and a CUDA build of PyTorch:

* ahead of time, into the package: `MINIVLLM_BUILD_CUDA=1 pip install --no-build-isolation -e .`
  (setup.py then compiles `minivllm._C`; `--no-build-isolation` builds against the installed
  torch instead of downloading another one);
* just in time, from a source checkout: set `MINIVLLM_CUDA_JIT=1` and the first use compiles
  csrc/ with `torch.utils.cpp_extension.load` (about a minute), cached on disk under
  `TORCH_EXTENSIONS_DIR` (default ~/.cache/torch_extensions), so later processes load it at once.

What it covers: `write_kv_cache`, and `paged_attention` for decode batches (one query per
sequence) in fp16/bf16 with head_dim 64 or 128 and a GQA group of 1, 2, 4 or 8 query heads per KV
head, with a 16-bit cache (not fp8). Anything else is routed to the Triton kernel by
`minivllm.kernels`; `decode_unsupported` says why a call does not fit.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import torch

_EXTENSION_NAME = "minivllm._C"
JIT_ENV = "MINIVLLM_CUDA_JIT"
SOURCE_DIR = Path(__file__).resolve().parent.parent / "csrc"
NVCC_FLAGS = ("-O3", "--use_fast_math")

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
SUPPORTED_HEAD_DIMS = (64, 128)
SUPPORTED_GROUPS = (1, 2, 4, 8)

_module = None
_error: str | None = None


def _build_hint() -> str:
    return (
        "build it with `MINIVLLM_BUILD_CUDA=1 pip install --no-build-isolation -e .`, or set "
        f"{JIT_ENV}=1 to compile it on first use (needs nvcc; see README)"
    )


def jit_build(verbose: bool = False):
    """Compile csrc/ now (or load the cached build) with torch.utils.cpp_extension.load."""
    from torch.utils.cpp_extension import load

    sources = sorted(SOURCE_DIR.glob("*.cpp")) + sorted(SOURCE_DIR.glob("*.cu"))  # as setup.py
    if not sources:
        raise FileNotFoundError(
            f"no CUDA sources in {SOURCE_DIR}: a JIT build needs a source checkout of minivllm"
        )
    return load(
        name="minivllm_C",
        sources=[str(s) for s in sources],
        extra_cuda_cflags=list(NVCC_FLAGS),
        extra_cflags=["-O3"],
        verbose=verbose,
    )


def _load():
    global _module, _error
    if _module is not None or _error is not None:
        return _module
    try:
        _module = importlib.import_module(_EXTENSION_NAME)
        return _module
    except ImportError as exc:
        _error = f"the C++/CUDA extension {_EXTENSION_NAME} is not built ({exc}); {_build_hint()}"
    if os.environ.get(JIT_ENV) == "1" and torch.cuda.is_available():
        try:
            _module, _error = jit_build(), None
        except Exception as exc:  # noqa: BLE001 - any build failure means "not available", said why
            _error = f"the JIT build of csrc/ failed: {type(exc).__name__}: {exc}"
    return _module


def is_available() -> bool:
    """True when the extension is importable and a CUDA device is present."""
    return torch.cuda.is_available() and _load() is not None


def unavailable_reason() -> str:
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    _load()
    return _error or "available"


def supports(op: str) -> bool:
    """Whether the built extension implements `op`."""
    module = _load()
    return module is not None and hasattr(module, op)


def decode_unsupported(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       seq_lens: torch.Tensor, out: torch.Tensor | None = None,
                       **_call) -> str | None:
    """Why this paged_attention call does not fit the extension's decode kernel (None: it fits).

    Only shapes, dtypes, strides and alignment are looked at: deciding never touches GPU values.
    The dispatcher passes the whole call; the arguments not named here do not matter.
    """
    num_tokens, num_q_heads, head_dim = query.shape
    if k_cache.dtype == torch.float8_e4m3fn:
        return "an fp8 KV cache (the extension has float16 and bfloat16 kernels)"
    if num_tokens != seq_lens.shape[0]:
        return (f"it is not a decode batch ({num_tokens} queries for {seq_lens.shape[0]} sequences); "
                "prefill runs on the Triton kernel")
    if query.dtype not in SUPPORTED_DTYPES:
        return f"dtype {query.dtype} (the extension has float16 and bfloat16 kernels)"
    if head_dim not in SUPPORTED_HEAD_DIMS:
        return f"head_dim {head_dim} (the extension is compiled for {SUPPORTED_HEAD_DIMS})"
    group = num_q_heads // k_cache.shape[2]
    if group not in SUPPORTED_GROUPS:
        return f"GQA group of {group} query heads per KV head (compiled for {SUPPORTED_GROUPS})"
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        return "a non-contiguous KV cache"
    tensors = [query, k_cache, v_cache] + ([out] if out is not None else [])
    if any(t.data_ptr() % 16 for t in tensors) or query.stride(0) % 8 or query.stride(1) % 8:
        return "rows that are not 16-byte aligned (the kernel loads 16-byte vectors)"
    if seq_lens.shape[0] > 65535:
        return f"{seq_lens.shape[0]} sequences (a launch takes at most 65535)"
    return None


def write_kv_unsupported(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                         v_cache: torch.Tensor, **_call) -> str | None:
    """Why this write_kv_cache call does not fit the extension's copy kernel (None: it fits)."""
    if k_cache.dtype == torch.float8_e4m3fn:
        return "an fp8 KV cache (the extension copies, it does not quantize)"
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        return "a non-contiguous KV cache"
    element = key.element_size()
    strides = (key.stride(0), key.stride(1), value.stride(0), value.stride(1))
    if (key.shape[2] * element) % 16 or any((s * element) % 16 for s in strides) \
            or key.data_ptr() % 16 or value.data_ptr() % 16:
        return "rows that are not 16-byte aligned (the kernel copies 16-byte vectors)"
    return None


# k_scale / v_scale belong to fp8 caches, which the extension declines before it is called.
def write_kv_cache(key, value, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None) -> None:
    _load().write_kv_cache(key, value, k_cache, v_cache, slot_mapping)


def paged_attention(query, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, scale, causal,
                    out, max_seq_len=None, num_splits=None, k_scale=None, v_scale=None):
    _load().paged_attention(
        query, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, float(scale), bool(causal),
        out, max_seq_len, num_splits or 0,
    )
    return out
