"""The layers of the models: attention over the paged cache, norms, RoPE, MLP pieces, sampler."""

import os

import torch


def use_fused_ops(device: torch.device) -> bool:
    """Whether the layers run the fused Triton kernels of `fused_ops.py` for tensors on `device`:
    on CUDA, unless MINIVLLM_FUSED_OPS=0 (to measure what they bring). On CPU the PyTorch ops run."""
    return device.type == "cuda" and os.environ.get("MINIVLLM_FUSED_OPS", "1") != "0"
