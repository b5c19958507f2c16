"""CPU weights reordered for oneDNN (layers/onednn.py): the same products as `F.linear`, for
every layer kind we pack, and a tied LM head that leaves its embedding dense."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from minivllm.layers import onednn
from minivllm.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from minivllm.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear

pytestmark = pytest.mark.skipif(not onednn.available(), reason="this PyTorch has no oneDNN")


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Module()
    model.embed = VocabParallelEmbedding(50, 24)
    model.qkv = QKVParallelLinear(24, 8, 3, 1, bias=True)
    model.up = ColumnParallelLinear(24, 40, bias=False)
    model.down = RowParallelLinear(40, 24, bias=True)
    model.head = ParallelLMHead(50, 24)
    for p in model.parameters():
        nn.init.normal_(p)
    model.head.weight = model.embed.weight  # tied
    return model


@pytest.mark.parametrize("rows", [1, 3, 64, 100])
def test_packed_layers_compute_what_f_linear_does(rows):
    model = _model()
    dense = {name: (m.weight.detach().clone(), None if getattr(m, "bias", None) is None else m.bias.detach())
             for name, m in model.named_children() if name != "embed"}
    assert onednn.pack_weights(model) == 4
    assert onednn.pack_weights(model) == 0  # already packed: nothing to do
    x = torch.randn(rows, 24)
    for name, (weight, bias) in dense.items():
        module = getattr(model, name)
        assert module.weight.is_mkldnn
        inp = torch.randn(rows, 40) if name == "down" else x
        torch.testing.assert_close(module(inp), F.linear(inp, weight, bias), rtol=1e-5, atol=1e-5)
    # The embedding keeps its dense table (the head got a packed copy of its own).
    assert not model.embed.weight.is_mkldnn
    assert torch.equal(model.embed(torch.tensor([3])), dense["head"][0][3:4])


def test_switched_off_or_not_float32_nothing_is_packed(monkeypatch):
    model = _model().to(torch.bfloat16)
    assert onednn.pack_weights(model) == 0
    monkeypatch.setenv("MINIVLLM_ONEDNN", "0")
    assert onednn.pack_weights(_model()) == 0
