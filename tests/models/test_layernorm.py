"""RMSNorm (the PyTorch path, CPU) against Hugging Face's LlamaRMSNorm: the same bits, in float32
and bfloat16, alone and with the residual add before it."""

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from minivllm.layers.layernorm import RMSNorm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_equals_hf(dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(7, 96, generator=g) * torch.logspace(-3, 3, 7)[:, None]).to(dtype)
    residual = torch.randn(7, 96, generator=g).to(dtype)
    ours, hf = RMSNorm(96, eps=1e-5).to(dtype), LlamaRMSNorm(96, eps=1e-5).to(dtype)
    with torch.no_grad():
        ours.weight.copy_(torch.randn(96, generator=g))
        hf.weight.copy_(ours.weight)
        assert torch.equal(ours(x), hf(x))
        normed, stream = ours(x, residual)
        assert torch.equal(stream, x + residual)
        assert torch.equal(normed, hf(x + residual))
