"""The layers of the models: attention over the paged cache, norms, RoPE, MLP pieces, sampler.

The fused Triton kernels of the layers are switched here, without importing Triton. Each has its
own environment variable, read at every call, so that a benchmark can run the same code with one
technique on and off side by side; all of them need the fused ops on:

    MINIVLLM_FUSED_OPS=0       PyTorch ops instead of fused_ops.py (add+RMSNorm, q/k norm+RoPE,
                               SiLU-and-mul), and none of the fusions below
    MINIVLLM_FUSED_KV_WRITE=0  the KV-cache write as its own kernel, not inside q/k norm+RoPE
    MINIVLLM_FUSED_LINEAR=N    fused_linear.py's kernels for batches of 1 to N rows (default
                               and most: FUSED_LINEAR_ROWS); 0: cuBLAS and separate norm and
                               SiLU kernels at every row count

(`MINIVLLM_PDL`, programmatic dependent launch of every Triton kernel, is the kernels' own
switch: minivllm/kernels/pdl.py.)
"""

import os

import torch

FUSED_LINEAR_DTYPES = (torch.float16, torch.bfloat16)
FUSED_LINEAR_ROWS = 4  # the most rows fused_linear.py's kernels take: beyond, cuBLAS wins


def triton_device(device: torch.device) -> bool:
    """Where the fused kernels run natively: CUDA. (The tests patch this to run them on the CPU
    under TRITON_INTERPRET=1.)"""
    return device.type == "cuda"


def _on(name: str) -> bool:
    return os.environ.get(name, "1") != "0"


def use_fused_ops(device: torch.device) -> bool:
    """Whether the layers run the fused Triton kernels of `fused_ops.py` for tensors on `device`:
    on CUDA, unless MINIVLLM_FUSED_OPS=0 (to measure what they bring). On CPU the PyTorch ops run."""
    return triton_device(device) and _on("MINIVLLM_FUSED_OPS")


def use_fused_kv_write(device: torch.device) -> bool:
    """Whether q/k norm + RoPE also writes the new keys and values into the paged cache."""
    return use_fused_ops(device) and _on("MINIVLLM_FUSED_KV_WRITE")


def use_fused_linear(x: torch.Tensor) -> bool:
    """Whether the projections of x [rows, features] run as fused_linear.py's kernels: fused ops
    on, float16/bfloat16, 1 to FUSED_LINEAR_ROWS rows (from there on cuBLAS's tiles are faster:
    fused_linear.py says by how much), or fewer if MINIVLLM_FUSED_LINEAR says so. Looks at shapes
    and dtypes only, so deciding never waits for the GPU."""
    return (x.dtype in FUSED_LINEAR_DTYPES and 1 <= x.shape[0] <= _fused_linear_rows()
            and use_fused_ops(x.device))


def _fused_linear_rows() -> int:
    value = os.environ.get("MINIVLLM_FUSED_LINEAR", str(FUSED_LINEAR_ROWS))
    if not value.isdigit():
        raise ValueError(f"MINIVLLM_FUSED_LINEAR must be a number of rows (0: off), got {value!r}")
    return min(int(value), FUSED_LINEAR_ROWS)
