"""How a model is split over ranks, checked in one process (no process group needed to build
and load a rank's shard): the arithmetic of the splits, and that rank r of N loads exactly its
slice of every checkpoint tensor, reading no more of the file than that slice.
"""

from __future__ import annotations

import pytest
import torch

from minivllm.distributed import Shard, TensorParallel
from minivllm.layers.linear import kv_heads_of_rank
from minivllm.models import load_model
from minivllm.models import loader as loader_module


def test_even_split_and_its_error_names_tensor_parallel_size():
    assert [TensorParallel(r, 4).shard(64) for r in range(4)] == [Shard(64, 16 * r, 16) for r in range(4)]
    with pytest.raises(ValueError, match=r"tensor_parallel_size=3 does not divide the number of heads \(8\)"):
        TensorParallel(0, 3).shard(8, "number of heads")
    with pytest.raises(ValueError, match="rank must be in"):
        TensorParallel(2, 2)


def test_padded_split_covers_the_vocabulary_once():
    for vocab, size in [(509, 2), (509, 4), (512, 4), (10, 4)]:
        parts = [TensorParallel(r, size).padded_shard(vocab) for r in range(size)]
        rows = [i for shard, _ in parts for i in range(shard.start, shard.start + shard.size)]
        assert rows == list(range(vocab))  # every token id on exactly one rank, in rank order
        assert len({padded for _, padded in parts}) == 1 and parts[0][1] * size >= vocab


@pytest.mark.parametrize("num_heads,num_kv_heads,size", [(32, 8, 2), (32, 8, 8), (32, 8, 16), (8, 1, 4), (4, 2, 2)])
def test_each_rank_holds_the_kv_heads_its_query_heads_use(num_heads, num_kv_heads, size):
    group = num_heads // num_kv_heads  # query heads per KV head (grouped-query attention)
    for rank in range(size):
        tp = TensorParallel(rank, size)
        q, kv = tp.shard(num_heads), kv_heads_of_rank(num_kv_heads, tp)
        local_group = q.size // kv.size
        for i in range(q.size):  # the kernel pairs local q head i with local KV head i // local_group
            assert kv.start + i // local_group == (q.start + i) // group
    if num_kv_heads < size:  # replicated: every KV head on size / num_kv_heads ranks
        owners = [kv_heads_of_rank(num_kv_heads, TensorParallel(r, size)).start for r in range(size)]
        assert sorted(owners) == [h for h in range(num_kv_heads) for _ in range(size // num_kv_heads)]


def test_kv_heads_that_neither_divide_nor_are_divided_by_the_ranks_are_refused():
    with pytest.raises(ValueError, match="tensor_parallel_size=4 is neither a divisor nor a multiple"):
        kv_heads_of_rank(3, TensorParallel(0, 4))


def _rank_model(model_dir, variant, rank, size):
    return load_model(model_dir(variant), dtype=torch.float32, tp=TensorParallel(rank, size))


@pytest.mark.parametrize("variant", ["llama", "qwen2", "opt", "llama-mqa"])
def test_rank_shards_are_the_slices_of_the_whole_model(model_dir, variant):
    whole = load_model(model_dir(variant), dtype=torch.float32)
    size = 2
    full = dict(whole.named_parameters())
    decoder = "model.decoder." if variant == "opt" else "model."
    attn = decoder + "layers.1.self_attn."
    out_proj = attn + ("out_proj" if variant == "opt" else "o_proj") + ".weight"
    head_dim = whole.head_dim
    whole_qkv = whole.get_submodule(attn + "qkv_proj")
    for rank in range(size):
        model = _rank_model(model_dir, variant, rank, size)
        params = dict(model.named_parameters())
        assert params.keys() == full.keys()
        qkv = model.get_submodule(attn + "qkv_proj")
        heads = model.attention_layers()[1]
        q_rows = heads.num_heads * head_dim
        for name in ("weight", "bias") if qkv.bias is not None else ("weight",):
            mine, all_of = getattr(qkv, name), getattr(whole_qkv, name)
            q = whole_qkv.shard(all_of, "q")
            assert torch.equal(qkv.shard(mine, "q"), q[rank * q_rows:(rank + 1) * q_rows])
            kv_start = kv_heads_of_rank(whole.num_kv_heads, TensorParallel(rank, size)).start * head_dim
            for part in ("k", "v"):
                expected = whole_qkv.shard(all_of, part)[kv_start:kv_start + heads.num_kv_heads * head_dim]
                assert torch.equal(qkv.shard(mine, part), expected)
        cols = full[out_proj].shape[1] // size
        assert torch.equal(params[out_proj], full[out_proj][:, rank * cols:(rank + 1) * cols])
        embed = decoder + "embed_tokens.weight"
        shard, padded = TensorParallel(rank, size).padded_shard(whole.config.vocab_size)
        assert params[embed].shape[0] == padded
        assert torch.equal(params[embed][:shard.size], full[embed][shard.start:shard.start + shard.size])
        assert not params[embed][shard.size:].any()  # padding rows stay zero
        norm = decoder + ("final_layer_norm.weight" if variant == "opt" else "norm.weight")
        assert torch.equal(params[norm], full[norm])  # replicated


def test_a_rank_reads_only_its_slices_of_the_checkpoint(model_dir, monkeypatch):
    """No rank materializes the whole model: what rank 1 of 2 reads from the file is its own
    parameters' worth of elements (the padding rows excepted), half the model or so."""
    read = []
    original = loader_module.CheckpointTensor.read

    def spy(self, split=None):
        tensor = original(self, split)
        read.append((self.name, split is not None, tensor.numel()))
        return tensor

    monkeypatch.setattr(loader_module.CheckpointTensor, "read", spy)
    model = _rank_model(model_dir, "llama-mqa", rank=1, size=2)
    vocab = model.config.vocab_size
    shard, padded = TensorParallel(1, 2).padded_shard(vocab)
    padding = sum((padded - shard.size) * p.shape[1] for n, p in model.named_parameters()
                  if n.endswith(("embed_tokens.weight", "lm_head.weight")))
    held = sum(p.numel() for p in model.parameters()) - padding
    assert sum(n for _, _, n in read) == held
    whole = sum(p.numel() for p in load_model(model_dir("llama-mqa"), dtype=torch.float32).parameters())
    assert held < 0.6 * whole
    # Every matrix is read as a slice; only replicated tensors (norms, biases of row-parallel layers) whole.
    assert {name for name, sliced, _ in read if not sliced} == {
        n for n, p in model.named_parameters() if p.dim() == 1 and "norm" in n}
