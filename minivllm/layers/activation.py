"""Activation functions of the feed-forward blocks.

Llama-family MLPs are *gated* ("SwiGLU"): two projections of the same input, `gate` and `up`, and
the output is `silu(gate) * up`, the gate deciding per channel how much of `up` passes. The model
computes both projections with one matrix (`linear.MergedColumnParallelLinear`), so the activation receives
them side by side in one tensor, `[..., 2 * intermediate]`, and splits it.

OPT's MLP is the classic kind, one projection and a plain activation (ReLU), looked up by the name
the Hugging Face config gives it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from minivllm.layers import use_fused_ops


class SiluAndMul(nn.Module):
    """[..., 2 * d] holding (gate, up) -> silu(gate) * up, [..., d]."""

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        if use_fused_ops(gate_up.device):  # one kernel instead of three (fused_ops.py)
            from minivllm.layers.fused_ops import silu_and_mul

            return silu_and_mul(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up


# Names as Hugging Face configs spell them (`hidden_act`, `activation_function`).
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_new": functools.partial(F.gelu, approximate="tanh"),
    "gelu_pytorch_tanh": functools.partial(F.gelu, approximate="tanh"),
}


def get_activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation function a config names, or a ValueError listing the known ones."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(
            f"activation {name!r} is not supported; supported: {sorted(ACTIVATIONS)}"
        ) from None
