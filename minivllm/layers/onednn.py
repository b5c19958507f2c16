"""Linear layers on a CPU: weights reordered once into oneDNN's blocked layout.

On a CPU nearly all of a step's time is the linear layers' matrix products, and at decode those
are skinny: a few rows of activations times a large weight. `F.linear` hands them to the BLAS
PyTorch was built with (MKL on x86). oneDNN, also inside PyTorch, multiplies by weights it has
first *reordered* into a blocked layout that matches its vector registers; the reorder costs a
copy, so it is done once, when the model is loaded, and the product is then cheaper for
decode-sized batches (measure it with benchmarks/throughput.py --device cpu --variants
"onednn:,dense:MINIVLLM_ONEDNN=0"). This is what `torch.compile`'s CPU inference path does
with frozen weights, without the compiler.

`pack_weights(model)` replaces the weight of every layer that says it can take one
(`ONEDNN_WEIGHT = True`: `linear.py`'s column- and row-parallel layers, `embedding.py`'s LM head)
by its reordered copy, an opaque oneDNN tensor; their forward sees that and calls oneDNN. (The
layers name themselves, so this module imports none of them: they import it.) A tied LM head gets a reordered copy
of its own: the embedding keeps the dense table it looks rows up in. Only float32 weights are
reordered (bf16 and fp16 products already go through oneDNN in PyTorch).

`MINIVLLM_ONEDNN=0` keeps the dense weights and `F.linear`, to measure what this brings.
"""

from __future__ import annotations

import os

import torch
from torch import nn


# oneDNN picks the blocked layout for a given number of rows: one layout serves every batch size,
# so this is a hint, not a limit (the benchmark in the module docstring measures the whole effect).
LAYOUT_BATCH_SIZE = 64


def available() -> bool:
    """Whether this PyTorch has oneDNN (MKL-DNN) and the switch is not off."""
    return torch.backends.mkldnn.is_available() and os.environ.get("MINIVLLM_ONEDNN", "1") != "0"


def pack_weights(model: nn.Module) -> int:
    """Reorder the float32 CPU weight of each of our linear layers for oneDNN, in place;
    returns how many were reordered (0 where oneDNN is not available or turned off)."""
    if not available():
        return 0
    count = 0
    for module in model.modules():
        if not getattr(module, "ONEDNN_WEIGHT", False):
            continue
        weight = module.weight
        if weight.dtype != torch.float32 or weight.device.type != "cpu" or weight.is_mkldnn:
            continue
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), LAYOUT_BATCH_SIZE)
        module.weight = nn.Parameter(packed, requires_grad=False)
        count += 1
    return count


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight^T + bias: oneDNN's product for a weight `pack_weights` reordered, else F.linear."""
    if weight.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return torch.nn.functional.linear(x, weight, bias)
