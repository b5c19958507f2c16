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

What it covers: `write_kv_cache`, and `paged_attention` for every kind of step the engine runs
(decode, prefill, chunked prefill, mixed batches) in fp16/bf16 with head_dim 64 or 128, a GQA
group of 1, 2, 4 or 8 query heads per KV head, a 16-bit cache (not fp8) and a block size that is
a power of two of at least 8. A batch of decodes (one query per sequence) runs the decode kernel,
with split-KV when the batch cannot fill the GPU (`decode_num_splits`); any other batch runs the
prefill kernel, in which a decode is a query tile of one token. Both are tensor-core kernels
(mma.sync, ldmatrix, cp.async); docs/cuda_extension.md explains them. Anything else is routed to
the Triton kernel by `minivllm.kernels`; `attention_unsupported` says why a call does not fit.
"""

from __future__ import annotations

import functools
import importlib
import os
from pathlib import Path

import torch

_EXTENSION_NAME = "minivllm._C"
JIT_ENV = "MINIVLLM_CUDA_JIT"
SOURCE_DIR = Path(__file__).resolve().parents[2] / "csrc"
NVCC_FLAGS = ("-O3", "--use_fast_math")

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
SUPPORTED_HEAD_DIMS = (64, 128)
SUPPORTED_GROUPS = (1, 2, 4, 8)
MIN_BLOCK_SIZE = 8  # a 16-key tile spans at most two pages

# Split-KV for the decode kernel (csrc/paged_decode_kernel.cuh). A CTA takes one (sequence,
# KV head, slice) and streams its slice through a 3-stage cp.async pipeline per warp: one such CTA
# per SM already keeps enough bytes in flight, and every extra slice costs a partial output for
# the merge kernel and a pipeline to fill. So the grid aims at DECODE_CTAS_PER_SM CTAs per SM, and
# never cuts a slice below DECODE_MIN_SLICE keys. Measured on an H200 (cuda_mma_check, every
# forced split count, benchmarks/RESULTS.md): B=64 / 4k (512 CTAs) was fastest unsplit, and
# B=1 / 32k (8 CTAs) at 16 slices (128 CTAs), where 4 waves' worth (64 slices) was 16 % slower.
DECODE_CTAS_PER_SM = 1
DECODE_MIN_SLICE = 512
MAX_SPLITS = 128

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


def attention_unsupported(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          seq_lens: torch.Tensor, out: torch.Tensor | None = None,
                          block_tables: torch.Tensor | None = None,
                          cu_seqlens_q: torch.Tensor | None = None, **_call) -> str | None:
    """Why this paged_attention call does not fit the extension's kernels (None: it fits).

    Only shapes, dtypes, strides and alignment are looked at: deciding never touches GPU values.
    The dispatcher passes the whole call; the arguments not named here do not matter.
    """
    num_q_heads, head_dim = query.shape[1:]
    if k_cache.dtype == torch.float8_e4m3fn:
        return "an fp8 KV cache (the extension has float16 and bfloat16 kernels)"
    if query.dtype not in SUPPORTED_DTYPES:
        return f"dtype {query.dtype} (the extension has float16 and bfloat16 kernels)"
    if head_dim not in SUPPORTED_HEAD_DIMS:
        return f"head_dim {head_dim} (the extension is compiled for {SUPPORTED_HEAD_DIMS})"
    group = num_q_heads // k_cache.shape[2]
    if group not in SUPPORTED_GROUPS:
        return f"GQA group of {group} query heads per KV head (compiled for {SUPPORTED_GROUPS})"
    block_size = k_cache.shape[1]
    if block_size < MIN_BLOCK_SIZE or block_size & (block_size - 1):
        return (f"block_size {block_size} (the extension's tiles need a power of two >= "
                f"{MIN_BLOCK_SIZE})")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        return "a non-contiguous KV cache"
    tensors = [query, k_cache, v_cache] + ([out] if out is not None else [])
    if any(t.data_ptr() % 16 for t in tensors) or query.stride(0) % 8 or query.stride(1) % 8:
        return "rows that are not 16-byte aligned (the kernels copy 16-byte vectors)"
    if out is not None and (out.stride(0) % 2 or out.stride(1) % 2):
        return "an output with odd strides (the kernels store pairs of values)"
    if k_cache.stride(0) * k_cache.element_size() >= 2**31:
        return "KV blocks of 2 GB or more"
    metadata = [seq_lens] + [t for t in (cu_seqlens_q,) if t is not None]
    if any(t.stride(0) != 1 for t in metadata) or (
            block_tables is not None and block_tables.stride(1) != 1):
        return "strided seq_lens, cu_seqlens_q or block-table rows (the kernels index them densely)"
    if seq_lens.shape[0] > 65535:
        return f"{seq_lens.shape[0]} sequences (a launch takes at most 65535)"
    return None


def decode_num_splits(num_seqs: int, num_kv_heads: int, head_dim: int, max_context: int,
                      num_sms: int) -> int:
    """How many slices the decode kernel cuts each context into, from shapes alone (so a launch
    can be captured in a CUDA graph): about DECODE_CTAS_PER_SM CTAs per SM, slices of at least
    DECODE_MIN_SLICE keys, at most MAX_SPLITS slices. (head_dim changes neither: a CTA's rate
    is what one SM streams, whatever the row width.)"""
    target = DECODE_CTAS_PER_SM * num_sms
    num_ctas = num_seqs * num_kv_heads
    if num_ctas >= target:
        return 1
    wanted = -(-target // num_ctas)
    by_length = max(1, max_context // DECODE_MIN_SLICE)
    return min(wanted, by_length, MAX_SPLITS)


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


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
                    out, max_seq_len=None, num_splits=None, k_scale=None, v_scale=None, max_query_len=None):
    """One launch (decode, or prefill for any other batch), plus a merge launch when a decode is
    split (`max_query_len` is the Triton kernel's hint, not used here). The split count comes from
    shapes and `max_seq_len` (the table's capacity when None), never from seq_lens' values."""
    if num_splits is None:
        num_splits = 1
        if query.shape[0] == seq_lens.shape[0]:  # one query per sequence: a decode batch
            max_context = max_seq_len or block_tables.shape[1] * k_cache.shape[1]
            num_splits = decode_num_splits(seq_lens.shape[0], k_cache.shape[2], query.shape[2],
                                           max_context, _num_sms(_device_index(query.device)))
    _load().paged_attention(
        query, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, float(scale), bool(causal),
        out, num_splits,
    )
    return out
