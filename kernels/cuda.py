"""Loader for the optional C++/CUDA extension built from csrc/.

The extension is opt-in: a plain install never builds it, and its absence is not an error. The
other backends are used instead, and only an explicit `backend="cuda"` reports why it is missing.
"""

from __future__ import annotations

import importlib

import torch

_EXTENSION_NAME = "minivllm._C"
_module = None
_error: str | None = None


def _load():
    global _module, _error
    if _module is not None or _error is not None:
        return _module
    try:
        _module = importlib.import_module(_EXTENSION_NAME)
    except ImportError as exc:
        _error = (
            f"the C++/CUDA extension {_EXTENSION_NAME} is not built ({exc}); build it with "
            "`MINIVLLM_BUILD_CUDA=1 pip install -e .` on a machine with nvcc (see README)"
        )
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
    """Whether the built extension implements `op` (it may cover only a subset of the API)."""
    module = _load()
    return module is not None and hasattr(module, op)


def write_kv_cache(key, value, k_cache, v_cache, slot_mapping) -> None:
    _load().write_kv_cache(key, value, k_cache, v_cache, slot_mapping)


def paged_attention(query, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, scale, causal,
                    out, max_seq_len=None):
    return _load().paged_attention(
        query, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, scale, causal, out,
        max_seq_len,
    )
