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

**One host->device copy per step.** Seven small tensors copied one by one would cost seven
transfers (each a few microseconds of launch latency, and a sync each if the host memory is not
pinned). Instead every field is an int32 slice of ONE flat buffer, at offsets fixed by a
`StepLayout`; the step is written into a pinned host copy of that buffer with numpy and sent to
the GPU with a single asynchronous copy, after which each field is a *view* into the device
buffer. int32 is enough for all of them: token ids, positions, block ids, and slots (the runner
checks that the pool has fewer than 2^31 slots); the embedding, the RoPE lookup and the kernels
all accept int32 indices.

**Padding** (for CUDA graphs, see `cuda_graph.py`): `pack_step(..., pad_to=b)` appends dummy
decode rows until the batch has `b` sequences. A dummy row is a 1-token sequence with token 0 at
position 0, seq_len 1, a block table that starts with a valid block id, and slot -1, which the
cache writer skips: the kernels run on it without reading or writing anything that matters, and
its output row is simply never used.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence as SequenceType
from dataclasses import dataclass

import numpy as np
import torch

from minivllm.engine.scheduler import SchedulerOutput
from minivllm.layers.attention import AttentionMetadata

# Block-table padding. Kernels only read the blocks a sequence's seq_len covers, so the value is
# never used; 0 is a valid block id, so even a kernel that prefetches stays in bounds.
PAD_BLOCK_ID = 0
# The slot of a padding token: negative means "do not write this token's K/V".
PAD_SLOT = -1


@dataclass(frozen=True)
class StepSeq:
    """One scheduled sequence as plain data: its new tokens, where they start, its blocks."""

    new_token_ids: SequenceType[int]
    start: int  # position of the first new token (= tokens already in the KV cache)
    block_table: SequenceType[int]


@dataclass(frozen=True)
class StepLayout:
    """Where each field of a step lives in the flat int32 buffer, sized by capacities.

    [input_ids T | positions T | slot_mapping T | logits_indices S | seq_lens B | cu_seqlens_q B+1
     | block_tables B x W]

    T tokens, S sampled rows, B sequences, W = block-table width. The block tables come last
    so that a step using only the first b rows copies just `used_size(b)` elements.
    """

    max_tokens: int
    max_sampled: int
    max_seqs: int
    block_table_width: int

    def __post_init__(self) -> None:
        for name in ("max_tokens", "max_sampled", "max_seqs", "block_table_width"):
            if getattr(self, name) < 0:
                raise ValueError(f"StepLayout.{name} must be >= 0, got {getattr(self, name)}")

    @property
    def positions(self) -> int:
        return self.max_tokens

    @property
    def slot_mapping(self) -> int:
        return 2 * self.max_tokens

    @property
    def logits_indices(self) -> int:
        return 3 * self.max_tokens

    @property
    def seq_lens(self) -> int:
        return self.logits_indices + self.max_sampled

    @property
    def cu_seqlens_q(self) -> int:
        return self.seq_lens + self.max_seqs

    @property
    def block_tables(self) -> int:
        return self.cu_seqlens_q + self.max_seqs + 1

    @property
    def size(self) -> int:
        return self.used_size(self.max_seqs)

    def used_size(self, num_seqs: int) -> int:
        """Elements from the start of the buffer to the end of block-table row `num_seqs`."""
        return self.block_tables + num_seqs * self.block_table_width


@dataclass(frozen=True)
class PackedStep:
    """What `pack_step` wrote: the sizes of the (padded) batch and its longest context."""

    num_tokens: int  # incl. padding tokens
    num_seqs: int  # incl. padding sequences
    num_sampled: int
    max_seq_len: int  # a host-side bound for the kernels, so they never read seq_lens back
    copy_size: int  # leading buffer elements that hold this step


def exact_layout(seqs: SequenceType[StepSeq], num_sampled: int) -> StepLayout:
    """The smallest layout that holds these sequences (the eager path, no padding)."""
    return StepLayout(
        max_tokens=sum(len(s.new_token_ids) for s in seqs),
        max_sampled=num_sampled,
        max_seqs=len(seqs),
        block_table_width=max((len(s.block_table) for s in seqs), default=0),
    )


def pack_step(
    buf: np.ndarray,
    layout: StepLayout,
    seqs: SequenceType[StepSeq],
    sampled_seq_indices: SequenceType[int],
    block_size: int,
    pad_to: int | None = None,
) -> PackedStep:
    """Write one step into `buf` (int32, at least `layout.size` long) following `layout`.

    seqs: the scheduled sequences, in batch order. sampled_seq_indices: for each sampled row, the
    index in `seqs` whose last new token it reads (a forked child repeats its parent's index).
    pad_to: append dummy 1-token sequences until there are `pad_to` sequences (CUDA graphs).
    Pure numpy on the host: no tensors, no device, easy to test.
    """
    num_real = len(seqs)
    num_seqs = num_real if pad_to is None else pad_to
    if num_seqs < num_real:
        raise ValueError(f"pad_to={pad_to} is smaller than the {num_real} scheduled sequences")
    q_lens = np.fromiter((len(s.new_token_ids) for s in seqs), dtype=np.int64, count=num_real)
    if (q_lens < 1).any():
        raise ValueError("every scheduled sequence needs at least one new token")
    q_lens = np.concatenate([q_lens, np.ones(num_seqs - num_real, dtype=np.int64)])
    num_tokens = int(q_lens.sum())
    num_sampled = len(sampled_seq_indices)
    width = layout.block_table_width
    longest_table = max((len(s.block_table) for s in seqs), default=0)
    for what, need, have in (("tokens", num_tokens, layout.max_tokens),
                             ("sequences", num_seqs, layout.max_seqs),
                             ("sampled rows", num_sampled, layout.max_sampled),
                             ("block-table columns", max(longest_table, 1 if pad_to else 0), width)):
        if need > have:
            raise ValueError(f"the step has {need} {what} but the layout holds {have}")
    if buf.dtype != np.int32 or buf.ndim != 1 or buf.shape[0] < layout.size:
        raise ValueError(f"buf must be a 1-D int32 array of >= {layout.size} elements")

    # cu_seqlens_q: where each sequence's rows start; every other field is derived from it.
    cu = buf[layout.cu_seqlens_q: layout.cu_seqlens_q + num_seqs + 1]
    cu[0] = 0
    np.cumsum(q_lens, out=cu[1:])
    starts = np.fromiter((s.start for s in seqs), dtype=np.int64, count=num_real)
    starts = np.concatenate([starts, np.zeros(num_seqs - num_real, dtype=np.int64)])

    input_ids = buf[:num_tokens]
    input_ids[:] = 0  # padding tokens are token 0
    real_tokens = int(q_lens[:num_real].sum())
    input_ids[:real_tokens] = list(itertools.chain.from_iterable(s.new_token_ids for s in seqs))
    # Token i of sequence b sits at position start_b + (i - cu_b).
    row_seq = np.repeat(np.arange(num_seqs), q_lens)
    positions = np.arange(num_tokens) + (starts - cu[:-1])[row_seq]
    buf[layout.positions: layout.positions + num_tokens] = positions
    seq_lens = starts + q_lens
    buf[layout.seq_lens: layout.seq_lens + num_seqs] = seq_lens

    tables = buf[layout.block_tables: layout.block_tables + num_seqs * width].reshape(num_seqs, width)
    tables[:] = PAD_BLOCK_ID
    for row, seq in enumerate(seqs):
        tables[row, :len(seq.block_table)] = seq.block_table
    # Slot of token p of a sequence: block_table[p // block_size] * block_size + p % block_size.
    slots = buf[layout.slot_mapping: layout.slot_mapping + num_tokens]
    if num_tokens:
        slots[:] = tables[row_seq, positions // block_size] * block_size + positions % block_size
        slots[real_tokens:] = PAD_SLOT

    # The sampled rows read the hidden state of their sequence's last new token.
    indices = np.asarray(sampled_seq_indices, dtype=np.int64)
    buf[layout.logits_indices: layout.logits_indices + num_sampled] = cu[1:][indices] - 1
    return PackedStep(
        num_tokens=num_tokens,
        num_seqs=num_seqs,
        num_sampled=num_sampled,
        max_seq_len=int(seq_lens.max()) if num_seqs else 0,
        copy_size=layout.used_size(num_seqs),
    )


def step_seqs(output: SchedulerOutput) -> tuple[list[StepSeq], list[int]]:
    """The scheduled sequences of `output` as `StepSeq`s, and the sequence each sampled row reads."""
    seqs, index_of = [], {}
    for entry in output.scheduled:
        start = entry.seq.num_computed_tokens
        index_of[id(entry)] = len(seqs)
        seqs.append(StepSeq(entry.seq.token_ids[start:start + entry.num_new_tokens], start,
                            entry.seq.block_table))
    # A forked child reads its parent's row: same prompt, same next-token distribution.
    return seqs, [index_of[id(entry)] for _, entry in output.sampled_sequences]


class StepBuffers:
    """A flat int32 step buffer twice: pinned on the host (filled by numpy) and on the device.

    On CPU there is one buffer; `upload` does nothing. On CUDA `upload(n)` copies the first `n`
    elements with one asynchronous copy. Pinned (page-locked) memory is what lets that copy run
    asynchronously by DMA instead of through a staging copy that blocks the host.

    The host buffer is reused every step, so before writing into it we must be sure the GPU has
    finished reading the previous step's copy: `host()` waits on an event recorded after it
    (normally long done, so the wait costs nothing).
    """

    def __init__(self, size: int, device: torch.device, growable: bool = True):
        self.device_type = device.type
        self._device = device
        self.growable = growable
        self._copied = torch.cuda.Event() if device.type == "cuda" else None
        self._allocate(size)

    def _allocate(self, size: int) -> None:
        on_cuda = self.device_type == "cuda"
        self.host_tensor = torch.zeros(max(size, 1), dtype=torch.int32, pin_memory=on_cuda)
        self.device_tensor = (torch.zeros_like(self.host_tensor, device=self._device)
                              if on_cuda else self.host_tensor)

    @property
    def size(self) -> int:
        return self.host_tensor.shape[0]

    def host(self, size: int) -> np.ndarray:
        """The host buffer as numpy, at least `size` long, safe to overwrite now."""
        if self._copied is not None:
            self._copied.synchronize()
        if size > self.size:
            if not self.growable:
                raise ValueError(f"a step needs {size} buffer elements but this buffer has {self.size}")
            self._allocate(max(size, 2 * self.size))
        return self.host_tensor.numpy()

    def upload(self, size: int) -> None:
        """Send the first `size` elements to the device: one copy, no host wait."""
        if self._copied is None:
            return
        self.device_tensor[:size].copy_(self.host_tensor[:size], non_blocking=True)
        self._copied.record()


@dataclass
class InputBatch:
    input_ids: torch.Tensor  # [T] int32
    positions: torch.Tensor  # [T] int32, 0-based position of each token in its sequence
    attn_metadata: AttentionMetadata
    logits_indices: torch.Tensor  # [S] int32: hidden-state row that each sampled sequence reads

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]

    @classmethod
    def view(cls, buf: torch.Tensor, layout: StepLayout, packed: PackedStep, backend: str = "auto",
             max_seq_len: int | None = None) -> InputBatch:
        """Views of each field of a packed step inside `buf` (the device buffer): no copies.

        max_seq_len defaults to the step's own longest context; CUDA graphs pass a fixed bound.
        """
        t, b, width = packed.num_tokens, packed.num_seqs, layout.block_table_width
        meta = AttentionMetadata(
            slot_mapping=buf[layout.slot_mapping: layout.slot_mapping + t],
            block_tables=buf[layout.block_tables: layout.block_tables + b * width].view(b, width),
            seq_lens=buf[layout.seq_lens: layout.seq_lens + b],
            cu_seqlens_q=buf[layout.cu_seqlens_q: layout.cu_seqlens_q + b + 1],
            max_seq_len=max_seq_len or packed.max_seq_len or None,
            backend=backend,
        )
        return cls(
            input_ids=buf[:t],
            positions=buf[layout.positions: layout.positions + t],
            attn_metadata=meta,
            logits_indices=buf[layout.logits_indices: layout.logits_indices + packed.num_sampled],
        )


def build_input_batch(
    output: SchedulerOutput, block_size: int, device: torch.device, backend: str = "auto"
) -> InputBatch:
    """Pack `output.scheduled` into fresh tensors on `device` (one copy). The runner reuses its
    buffers instead; this stand-alone form is for tests and tools."""
    seqs, sampled = step_seqs(output)
    layout = exact_layout(seqs, len(sampled))
    buffers = StepBuffers(layout.size, device)
    packed = pack_step(buffers.host(layout.size), layout, seqs, sampled, block_size)
    buffers.upload(packed.copy_size)
    return InputBatch.view(buffers.device_tensor, layout, packed, backend)
