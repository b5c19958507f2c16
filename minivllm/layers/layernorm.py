"""RMSNorm: the normalisation of the Llama family.

LayerNorm (used by OPT, straight from `torch.nn.LayerNorm`) centres a vector and scales it to unit
variance. RMSNorm skips the centring and only divides by the root mean square,
`x / sqrt(mean(x^2) + eps)`, then multiplies by a learned per-channel weight: one reduction
instead of two, and models train just as well with it.

The statistics are computed in float32 even for bf16/fp16 models (a sum of squares over thousands
of channels overflows or loses precision in 16 bits), and the result is cast back *before* the
weight multiplies it, in that order, because that is what the checkpoints were trained with.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minivllm.distributed import TensorParallel, all_reduce
from minivllm.layers import use_fused_ops


class RMSNorm(nn.Module):
    """Root-mean-square normalisation over the last dimension, with a learned scale."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """norm(x); or, given the residual stream, (norm(x + residual), x + residual).

        The second form is the pre-norm block's seam: add the sublayer's output to the residual
        stream and normalise the sum for the next sublayer. On CUDA it is one fused kernel that
        updates `residual` in place (fused_ops.rms_norm); here, plain PyTorch.
        """
        if use_fused_ops(x.device):
            from minivllm.layers.fused_ops import rms_norm

            out = rms_norm(x, self.weight, self.eps, residual)
            return out if residual is None else (out, residual)
        if residual is not None:
            residual = x + residual
            return self._norm(residual), residual
        return self._norm(x)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        # F.rms_norm is x32 * rsqrt(mean(x32^2) + eps) in one call (the same bits as those ops
        # spelled out); the weight multiplies after the cast back, as the checkpoints expect.
        normed = F.rms_norm(x.float(), self.weight.shape, eps=self.eps)
        return self.weight * normed.to(x.dtype)


def reduce_add_rms_norm(partial: torch.Tensor, residual: torch.Tensor, norm: RMSNorm,
                        tp: TensorParallel) -> tuple[torch.Tensor, torch.Tensor]:
    """The seam after a row-parallel layer that left its sum to the caller: h = residual + the sum
    over ranks of `partial`; returns (norm(h), h), `residual` updated in place where it can be.

    Through peer memory this is one kernel (distributed/peer_add_rms_norm.py); otherwise the
    all-reduce, then the add + RMSNorm above. With one rank, just the latter.
    """
    if tp.peer is not None and tp.peer.fits_norm(partial, residual):
        return tp.peer.add_rms_norm(partial, residual, norm.weight, norm.eps), residual
    return norm(all_reduce(partial, tp), residual)
