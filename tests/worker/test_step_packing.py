"""pack_step / StepLayout / StepBuffers: the one-copy step buffer, checked by hand (CPU)."""

import numpy as np
import pytest
import torch

from minivllm.worker.input_batch import (
    PAD_BLOCK_ID,
    PAD_SLOT,
    InputBatch,
    StepBuffers,
    StepLayout,
    StepSeq,
    exact_layout,
    pack_step,
)

BS = 4  # block size


def fields(buf, layout, packed):
    batch = InputBatch.view(torch.from_numpy(buf), layout, packed)
    m = batch.attn_metadata
    return {"ids": batch.input_ids.tolist(), "pos": batch.positions.tolist(), "slots": m.slot_mapping.tolist(),
                "seq_lens": m.seq_lens.tolist(), "cu": m.cu_seqlens_q.tolist(), "tables": m.block_tables.tolist(),
                "logits": batch.logits_indices.tolist(), "max_seq_len": m.max_seq_len}


def test_layout_offsets_are_contiguous_and_block_tables_last():
    layout = StepLayout(max_tokens=10, max_sampled=3, max_seqs=4, block_table_width=5)
    assert (layout.positions, layout.slot_mapping, layout.logits_indices) == (10, 20, 30)
    assert (layout.seq_lens, layout.cu_seqlens_q, layout.block_tables) == (33, 37, 42)
    assert layout.size == 42 + 4 * 5 and layout.used_size(2) == 42 + 2 * 5
    with pytest.raises(ValueError, match="max_seqs"):
        StepLayout(1, 1, -1, 1)


def test_mixed_prefill_and_decode_step():
    a = StepSeq([11, 12, 13, 14, 15, 16], 0, [7, 2])  # prefill 6 prompt tokens
    b = StepSeq([99], 5, [3, 8])  # decode at position 5: block 8, offset 1
    layout = exact_layout([a, b], 3)
    buf = np.full(layout.size, 12345, dtype=np.int32)  # stale garbage must not leak through
    packed = pack_step(buf, layout, [a, b], [0, 1, 1], BS)  # b forked: two rows read b
    f = fields(buf, layout, packed)
    assert f["ids"] == [11, 12, 13, 14, 15, 16, 99]
    assert f["pos"] == [0, 1, 2, 3, 4, 5, 5]
    assert f["slots"] == [28, 29, 30, 31, 8, 9, 33]
    assert f["seq_lens"] == [6, 6] and f["cu"] == [0, 6, 7]
    assert f["tables"] == [[7, 2], [3, 8]]
    assert f["logits"] == [5, 6, 6] and f["max_seq_len"] == 6
    assert packed.copy_size == layout.size and packed.num_tokens == 7


def test_padding_rows_are_harmless_dummy_decodes():
    seqs = [StepSeq([5], 9, [4, 6, 1]), StepSeq([6], 0, [2])]
    layout = StepLayout(max_tokens=8, max_sampled=8, max_seqs=8, block_table_width=6)
    buf = np.full(layout.size, 777, dtype=np.int32)
    packed = pack_step(buf, layout, seqs, [0, 1], BS, pad_to=4)
    f = fields(buf, layout, packed)
    assert packed.num_seqs == packed.num_tokens == 4 and packed.copy_size == layout.used_size(4)
    assert f["ids"] == [5, 6, 0, 0] and f["pos"] == [9, 0, 0, 0]
    assert f["slots"] == [1 * BS + 1, 2 * BS, PAD_SLOT, PAD_SLOT]  # position 9: block [4, 6, 1][2]
    assert f["seq_lens"] == [10, 1, 1, 1] and f["cu"] == [0, 1, 2, 3, 4]
    assert f["tables"][0] == [4, 6, 1, PAD_BLOCK_ID, PAD_BLOCK_ID, PAD_BLOCK_ID]
    assert f["tables"][2] == [PAD_BLOCK_ID] * 6  # a valid block id for the kernel to look at
    assert f["logits"] == [0, 1]


def test_an_all_padding_batch_is_valid_for_the_reference_kernel():
    """What graph capture runs: every row a dummy. The kernels must accept it and write nothing."""
    from minivllm.kernels import paged_attention, write_kv_cache

    layout = StepLayout(max_tokens=4, max_sampled=4, max_seqs=4, block_table_width=2)
    buf = np.zeros(layout.size, dtype=np.int32)
    packed = pack_step(buf, layout, [], [], BS, pad_to=4)
    m = InputBatch.view(torch.from_numpy(buf), layout, packed).attn_metadata
    k_cache = torch.zeros(3, BS, 2, 8)
    v_cache = torch.zeros_like(k_cache)
    q, k = torch.randn(4, 4, 8), torch.randn(4, 2, 8)
    write_kv_cache(k, k, k_cache, v_cache, m.slot_mapping, backend="torch")
    assert not k_cache.any()
    out = paged_attention(q, k_cache, v_cache, m.block_tables, m.seq_lens, m.cu_seqlens_q, backend="torch")
    assert out.shape == q.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("bad, match", [
    ({"pad_to": 1}, "pad_to=1 is smaller"),
    ({"layout": StepLayout(1, 2, 2, 2)}, "tokens"),
    ({"layout": StepLayout(8, 2, 2, 1)}, "block-table columns"),
    ({"sampled": [0, 1, 1]}, "sampled rows"),
])
def test_a_step_that_does_not_fit_names_what_overflows(bad, match):
    seqs = [StepSeq([1], 3, [0]), StepSeq([2, 3], 0, [1, 2])]
    layout = bad.get("layout", StepLayout(8, 2, 2, 2))
    buf = np.zeros(max(layout.size, 64), dtype=np.int32)
    with pytest.raises(ValueError, match=match):
        pack_step(buf, layout, seqs, bad.get("sampled", [0, 1]), BS, pad_to=bad.get("pad_to"))


def test_step_buffers_grow_on_cpu_and_refuse_to_when_fixed():
    buffers = StepBuffers(8, torch.device("cpu"))
    assert buffers.device_tensor is buffers.host_tensor  # on CPU there is nothing to copy
    assert buffers.host(100).shape[0] >= 100
    fixed = StepBuffers(8, torch.device("cpu"), growable=False)
    with pytest.raises(ValueError, match="buffer elements"):
        fixed.host(9)


def test_padding_leaves_the_real_rows_of_a_forward_unchanged(tmp_path):
    """The padded batch a graph replays gives the real sequences the same hidden states (CPU)."""
    from minivllm.config import EngineConfig
    from minivllm.models import make_random_model
    from minivllm.worker.model_runner import ModelRunner

    model = make_random_model(tmp_path / "m", arch="qwen3", size="tiny")
    runner = ModelRunner(EngineConfig.from_dict({"model": str(model), "device": "cpu", "num_kv_blocks": 16,
                                                 "block_size": 4, "max_model_len": 64,
                                                 "attention_backend": "torch"}))
    for k, v in runner.kv_caches:
        k.normal_()
        v.normal_()
    seqs = [StepSeq([7], 5, [3, 9]), StepSeq([8], 0, [1]), StepSeq([9], 11, [2, 4, 6])]
    hidden = {}
    for pad_to in (None, 8):
        layout = StepLayout(max_tokens=8, max_sampled=8, max_seqs=8, block_table_width=4)
        buf = np.zeros(layout.size, dtype=np.int32)
        packed = pack_step(buf, layout, seqs, [0, 1, 2], 4, pad_to=pad_to)
        batch = InputBatch.view(torch.from_numpy(buf), layout, packed, backend="torch", max_seq_len=64)
        before = [k.clone() for k, _ in runner.kv_caches]
        with torch.inference_mode():
            hidden[pad_to] = runner.model(batch.input_ids, batch.positions, batch.attn_metadata)
        if pad_to:  # padding wrote nothing: only the real tokens' slots were (re)written
            for b, (k, _) in zip(before, runner.kv_caches):
                torch.testing.assert_close(k, b)
    assert hidden[8].shape[0] == 8
    torch.testing.assert_close(hidden[8][:3], hidden[None])
