"""build_input_batch: the packed tensors of one step, checked against the block tables by hand."""

import torch

from minivllm.config import SchedulerConfig
from minivllm.engine.block_manager import BlockManager
from minivllm.engine.scheduler import Scheduler
from minivllm.engine.sequence import Sequence
from minivllm.sampling_params import SamplingParams
from minivllm.worker.input_batch import build_input_batch


def test_mixed_prefill_decode_and_fork_batch():
    bs = 4
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=64),
                      BlockManager(32, bs, enable_prefix_caching=False))
    a = Sequence("a", [11, 12, 13, 14, 15, 16], SamplingParams(max_tokens=4))
    sched.add_sequence(a)
    sched.update(sched.schedule(), [17])  # a: 6 prompt tokens computed, token 17 pending
    b = Sequence("b", [21, 22, 23], SamplingParams(n=2, max_tokens=4))
    sched.add_sequence(b)
    step = sched.schedule()  # a decodes 1 token, b prefills 3 and forks
    batch = build_input_batch(step.output, bs, torch.device("cpu"))

    assert batch.input_ids.tolist() == [17, 21, 22, 23]
    assert batch.positions.tolist() == [6, 0, 1, 2]
    meta = batch.attn_metadata
    expected_slots = [a.block_table[6 // bs] * bs + 6 % bs] + [b.block_table[0] * bs + p for p in range(3)]
    assert meta.slot_mapping.tolist() == expected_slots
    assert meta.seq_lens.tolist() == [7, 3] and meta.cu_seqlens_q.tolist() == [0, 1, 4]
    assert meta.block_tables.dtype == torch.int32 and meta.block_tables.shape == (2, 2)
    assert meta.block_tables[0].tolist() == a.block_table
    assert meta.block_tables[1, 0].item() == b.block_table[0]
    assert meta.max_seq_len == 7
    # a samples from row 0; b and its forked sibling both sample from b's last row.
    assert batch.logits_indices.tolist() == [0, 3, 3]
    assert len(step.sampled) == 3


def test_a_pending_decode_gets_its_token_from_the_previous_samples():
    bs = 4
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=64),
                      BlockManager(32, bs, enable_prefix_caching=False))
    a = Sequence("a", [11, 12, 13, 14, 15], SamplingParams(max_tokens=4))
    sched.add_sequence(a)
    sched.schedule()  # a's prompt; its first token is now pending (not updated yet)
    step = sched.schedule()
    (s,) = step.output.seqs
    assert s.pending and s.token_ids == []
    batch = build_input_batch(step.output, bs, torch.device("cpu"), pending_tokens={a.seq_id: 77})
    assert batch.input_ids.tolist() == [77] and batch.positions.tolist() == [5]
