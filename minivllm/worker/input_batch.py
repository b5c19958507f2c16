"""InputBatch: one step's SchedulerOutput as the tensors a forward pass needs.

All scheduled sequences go into *one* packed batch, prefill chunks and decodes alike: their new
tokens are concatenated into a single [T] row, and per-sequence metadata says where each one
starts. A worked example with block_size 4 — sequence A computes prompt tokens 0..5, sequence B
(block table [7, 2]) decodes its token at position 5:

    input_ids     = [a0 a1 a2 a3 a4 a5 | b5]
    positions     = [ 0  1  2  3  4  5 |  5]
    slot_mapping  = [where each new token's K/V goes: block_table[p // 4] * 4 + p % 4]
                                         B: block 2, offset 1 -> slot 9
    cu_seqlens_q  = [0, 6, 7]          (A's queries are rows 0..5, B's row 6)
    seq_lens      = [6, 6]             (context incl. the new tokens)
    block_tables  = [[A's blocks], [7, 2]]   padded to the longest table
    logits_indices= [5, 6]             (the last new token of each sequence that samples)

Only rows in `logits_indices` go through the LM head: a 2000-token prefill needs one row of
logits, not 2000.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from minivllm.engine.scheduler import SchedulerOutput
from minivllm.layers.attention import AttentionMetadata

# Block-table padding. Kernels only read the blocks a sequence's seq_len covers, so the value is
# never used; 0 is a valid block id, so even a kernel that prefetches stays in bounds.
PAD_BLOCK_ID = 0


@dataclass
class InputBatch:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64, 0-based position of each token in its sequence
    attn_metadata: AttentionMetadata
    logits_indices: torch.Tensor  # [S] int64: hidden-state row that each sampled sequence reads

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]


def build_input_batch(
    output: SchedulerOutput, block_size: int, device: torch.device, backend: str = "auto"
) -> InputBatch:
    """Pack `output.scheduled` into tensors on `device` (built on the CPU, copied once)."""
    input_ids: list[int] = []
    positions: list[int] = []
    seq_lens: list[int] = []
    cu_seqlens_q = [0]
    entry_last_row: dict[int, int] = {}
    for entry in output.scheduled:
        seq = entry.seq
        start = seq.num_computed_tokens
        end = start + entry.num_new_tokens
        input_ids.extend(seq.token_ids[start:end])
        positions.extend(range(start, end))
        seq_lens.append(end)
        cu_seqlens_q.append(cu_seqlens_q[-1] + entry.num_new_tokens)
        entry_last_row[id(entry)] = cu_seqlens_q[-1] - 1
    # A forked child reads its parent's row: same prompt, same next-token distribution.
    logits_indices = [entry_last_row[id(entry)] for _, entry in output.sampled_sequences]

    max_blocks = max((len(e.seq.block_table) for e in output.scheduled), default=0)
    block_tables = torch.tensor(
        [e.seq.block_table + [PAD_BLOCK_ID] * (max_blocks - len(e.seq.block_table)) for e in output.scheduled],
        dtype=torch.int32,
    ).reshape(len(output.scheduled), max_blocks)
    positions_t = torch.tensor(positions, dtype=torch.int64)
    # Slot of token p of a sequence: block_table[p // block_size] * block_size + p % block_size.
    rows = torch.repeat_interleave(
        torch.arange(len(output.scheduled)), torch.tensor([e.num_new_tokens for e in output.scheduled])
    )
    slot_mapping = block_tables[rows, positions_t // block_size].long() * block_size + positions_t % block_size

    def to_device(t: torch.Tensor) -> torch.Tensor:
        if device.type == "cuda":
            return t.pin_memory().to(device, non_blocking=True)
        return t

    meta = AttentionMetadata(
        slot_mapping=to_device(slot_mapping),
        block_tables=to_device(block_tables),
        seq_lens=to_device(torch.tensor(seq_lens, dtype=torch.int32)),
        cu_seqlens_q=to_device(torch.tensor(cu_seqlens_q, dtype=torch.int32)),
        max_seq_len=max(seq_lens, default=0) or None,
        backend=backend,
    )
    return InputBatch(
        input_ids=to_device(torch.tensor(input_ids, dtype=torch.int64)),
        positions=to_device(positions_t),
        attn_metadata=meta,
        logits_indices=to_device(torch.tensor(logits_indices, dtype=torch.int64)),
    )
