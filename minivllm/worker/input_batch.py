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
    block_tables  = [[A's blocks], [7, 2]]   rows of the persistent tables (block_table.py)
    logits_indices= [5, 6]             (the last new token of each sequence that samples)

Only rows in `logits_indices` go through the LM head: a 2000-token prefill needs one row of
logits, not 2000.

Every field is an int32 slice of one flat buffer (`StepBuffers`: one host->device copy per step)
at offsets fixed by a `StepLayout`. Each field starts on a 64-byte boundary: Triton specializes a
kernel on the alignment of its pointer arguments, so an offset that moved with the batch size
would compile the kernel again mid-run. Besides the forward's inputs the buffer carries:

* `rows`: the block-table row of each sequence; the step's tables are gathered from them on the
  device;
* `pending_dst` / `pending_src`: a decode whose token was sampled by the previous step, still on
  the device (overlap), gets it by a device copy: input_ids[dst] = last_sampled[src];
* `draft_dst`: the rows of draft tokens a draft model makes on the device this step (speculative
  decoding), filled in by the runner before the forward: input_ids[draft_dst] = drafts.

**Speculative decoding.** A sequence that verifies d drafts computes 1 + d tokens and takes
logits at every one of them: `logits_indices` lists its last 1 + d rows. In the example, if B
verified drafts 31 and 8 after its token b5, its rows would be [b5 31 8] at positions 5, 6, 7,
and logits_indices [.., 6, 7, 8].

**Padding** (for CUDA graphs, see `cuda_graph.py`): `pack_step(..., pad_to=b)` appends dummy
decode rows until the batch has `b` sequences: token 0 at position 0, seq_len 1, the all-zero
padding row of the block tables, and slot -1, which the cache writer skips. The kernels run on
it without reading or writing anything that matters, and its output row is never used.
`pack_step(..., query_len=q)` gives *every* sequence q query rows (verification graphs: 1 + k
tokens each): a sequence with fewer new tokens gets dummy rows after its real ones, with slot -1
and the position of its last real token, and its seq_len counts them. Queries sit at the end of
their context, so query j of a sequence sees keys `< seq_len - q + j + 1 = start + j + 1`: a real
query never sees the dummy rows' keys (which are not written anyway), and the dummy rows' outputs
are never read.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence as SequenceType
from dataclasses import dataclass

import numpy as np
import torch

from minivllm.layers.attention import AttentionMetadata
from minivllm.step import ScheduledSeq

ALIGN = 16  # int32 elements = 64 bytes
PAD_SLOT = -1  # the slot of a padding token: negative means "do not write this token's K/V"
FIELDS = ("input_ids", "positions", "slot_mapping", "seq_lens", "cu_seqlens_q", "logits_indices",
          "rows", "pending_dst", "pending_src", "draft_dst")


@dataclass(frozen=True)
class StepLayout:
    """Where each field of a step lives in the flat int32 buffer, sized by capacities.

    T tokens, B sequences, S rows of logits: input_ids, positions, slot_mapping, draft_dst hold
    T; seq_lens, rows, pending_dst, pending_src hold B; cu_seqlens_q B + 1; logits_indices S.
    """

    max_tokens: int
    max_sampled: int
    max_seqs: int

    def __post_init__(self) -> None:
        for name in ("max_tokens", "max_sampled", "max_seqs"):
            if getattr(self, name) < 0:
                raise ValueError(f"StepLayout.{name} must be >= 0, got {getattr(self, name)}")
        t, b = self.max_tokens, self.max_seqs
        sizes = (t, t, t, b, b + 1, self.max_sampled, b, b, b, t)
        offsets, at = {}, 0
        for name, size in zip(FIELDS, sizes):
            offsets[name] = at
            at += -(-size // ALIGN) * ALIGN
        object.__setattr__(self, "offsets", offsets)
        object.__setattr__(self, "size", at)

    def field(self, buf, name: str, length: int):
        """`buf[offset of name : + length]`, for a numpy array or a tensor alike."""
        start = self.offsets[name]
        return buf[start:start + length]


@dataclass(frozen=True)
class PackedStep:
    """What `pack_step` wrote: the sizes of the (padded) batch and its longest context."""

    num_tokens: int  # incl. padding tokens
    num_seqs: int  # incl. padding sequences
    num_sampled: int  # rows of logits
    num_pending: int
    max_seq_len: int  # a host-side bound for the kernels, so they never read seq_lens back
    num_device_drafts: int  # draft tokens the runner fills in (draft_dst)
    max_query_len: int = 1  # the most rows of one sequence (its query tile's size, for the kernel)
    # Where one run of consecutive rows starts, when a field is one (the runner then slices
    # instead of gathering, an op or two fewer a step; None: not a run): (pending_dst[0],
    # pending_src[0]) when both are runs (a decode batch that kept its order); logits_indices[0];
    # rows[0] (the block-table rows).
    pending_run: tuple[int, int] | None = None
    logits_start: int | None = None
    rows_start: int | None = None


@functools.lru_cache(maxsize=1024)
def exact_layout(num_tokens: int, num_sampled: int, num_seqs: int) -> StepLayout:
    """The smallest layout for a step of these sizes (the eager path, no padding): its tokens
    (`SchedulerOutput.num_batched_tokens`), rows of logits and sequences. Made once per sizes:
    a run of decode steps has the same ones step after step."""
    return StepLayout(max_tokens=num_tokens, max_sampled=num_sampled, max_seqs=num_seqs)


def pack_step(buf: np.ndarray, layout: StepLayout, seqs: SequenceType[ScheduledSeq],
              rows: SequenceType[int], tables: np.ndarray, block_size: int,
              last_sampled_row: dict[int, int], pad_to: int | None = None, pad_row: int = 0,
              query_len: int | None = None) -> PackedStep:
    """Write one step into `buf` (int32, at least `layout.size` long) following `layout`.

    seqs: the scheduled sequences in batch order; rows: each one's row in `tables`, the host
    mirror of the block tables. last_sampled_row: seq id -> its row in the previous step's
    sampled tokens, where a pending token is found. pad_to: append dummy sequences until there
    are `pad_to` sequences (CUDA graphs), whose table row is `pad_row`. query_len: give every
    sequence exactly this many query rows, dummy rows after the real ones (verification graphs).
    Pure numpy on the host: no tensors, no device, easy to test.

    It runs every step, for up to hundreds of sequences, while the GPU may wait for it. Python
    reads the few numbers of each sequence into one array in one pass, numpy does the rest on
    whole columns; a numpy call costs about a microsecond whatever the batch, so what the step
    does not have (drafts, dummy rows, a second row per sequence) costs no call at all. A batch
    of one short sequence (batch-1 decode and verification) has so few numbers that Python
    writes them itself (`_pack_one`).
    """
    num_real = len(seqs)
    num_seqs = num_real if pad_to is None else pad_to
    if num_seqs < num_real:
        raise ValueError(f"pad_to={pad_to} is smaller than the {num_real} scheduled sequences")
    if num_seqs == num_real == 1 and (query_len or seqs[0].num_new_tokens) <= ONE_SEQ_MAX_ROWS:
        return _pack_one(buf, layout, seqs[0], rows[0], tables, block_size, last_sampled_row, query_len)
    return _pack_columns(buf, layout, seqs, rows, tables, block_size, last_sampled_row, num_seqs, pad_row, query_len)


def _pack_columns(buf: np.ndarray, layout: StepLayout, seqs: SequenceType[ScheduledSeq], rows: SequenceType[int],
                  tables: np.ndarray, block_size: int, last_sampled_row: dict[int, int], num_seqs: int,
                  pad_row: int, query_len: int | None) -> PackedStep:
    """`pack_step` on whole columns with numpy, for any batch; num_seqs: incl. the dummy ones."""
    num_real = len(seqs)
    columns = _columns(seqs, num_seqs)
    starts, pending, num_known, num_drafts, counts, host_drafts = columns
    real_lens = pending + num_known + num_drafts  # the new tokens of each sequence
    if num_real and real_lens[:num_real].min() < 1:
        raise ValueError("every scheduled sequence needs at least one new token")
    real_lens[num_real:] = 1  # a dummy sequence: one token, at position 0
    num_pending, num_known_tokens, num_draft_tokens, num_sampled, num_host_drafts = columns[1:].sum(axis=1).tolist()
    num_real_tokens = num_pending + num_known_tokens + num_draft_tokens + num_seqs - num_real
    if query_len is None:
        q_lens, num_tokens = real_lens, num_real_tokens
    else:
        longest = int(real_lens.max()) if num_seqs else 0
        if longest > query_len:
            raise ValueError(f"query_len={query_len} is shorter than a sequence's {longest} new tokens")
        q_lens, num_tokens = np.full(num_seqs, query_len), num_seqs * query_len
    _check_fits(buf, layout, num_tokens, num_seqs, num_sampled)

    # cu_seqlens_q: where each sequence's rows start; every other field is derived from it.
    cu = layout.field(buf, "cu_seqlens_q", num_seqs + 1)
    one_row_each = num_tokens == num_seqs  # a decode step: row i is sequence i's
    if one_row_each:
        cu[:] = np.arange(num_seqs + 1)
    else:
        cu[0] = 0
        cu[1:] = q_lens.cumsum()
    first = cu[:-1]
    seq_lens = layout.field(buf, "seq_lens", num_seqs)
    seq_lens[:] = starts + q_lens
    table_rows = layout.field(buf, "rows", num_seqs)
    table_rows[:num_real] = rows
    table_rows[num_real:] = pad_row
    positions = layout.field(buf, "positions", num_tokens)
    slots = layout.field(buf, "slot_mapping", num_tokens)
    if one_row_each:
        positions[:] = starts
        token_rows = table_rows
    elif num_real_tokens == num_tokens:  # no dummy rows: sequence b's rows are positions start_b, start_b + 1, ...
        positions[:] = _runs(starts, q_lens)
        token_rows = table_rows.repeat(q_lens)
    else:  # row i of sequence b is its query j = i - cu_b, at position start_b + j
        row_seq = np.arange(num_seqs).repeat(q_lens)
        j = np.arange(num_tokens) - first[row_seq]
        # a dummy row (j >= its real length) repeats the position of the last real one
        positions[:] = starts[row_seq] + np.minimum(j, real_lens[row_seq] - 1)
        token_rows = table_rows[row_seq]
    # Slot of token p: block_table[p // block_size] * block_size + p % block_size.
    slots[:] = tables[token_rows, positions // block_size] * block_size + positions % block_size
    if num_real_tokens < num_tokens:  # dummy rows write nothing
        slots[(j >= real_lens[row_seq]) | (row_seq >= num_real)] = PAD_SLOT
    elif num_real < num_seqs:  # only dummy sequences, one row each, after the real rows
        slots[num_tokens - (num_seqs - num_real):] = PAD_SLOT
    last = first[:num_real] if one_row_each else first[:num_real] + real_lens[:num_real] - 1  # last real rows
    logits_rows = layout.field(buf, "logits_indices", num_sampled)
    logits_rows[:] = _logits_rows(last, counts[:num_real], num_drafts[:num_real] if num_draft_tokens else None)
    input_ids = layout.field(buf, "input_ids", num_tokens)
    if num_known_tokens + num_host_drafts == num_tokens:  # every row's token is known: they are in order
        input_ids[:] = [t for s in seqs for t in (*s.token_ids, *s.draft_token_ids)]
    else:
        _write_input_ids(input_ids, seqs, first + pending, num_known if num_known_tokens else None,
                         host_drafts if num_host_drafts else None)
    # The sequences whose first new token is still on the device: where it goes, where it is.
    src = [last_sampled_row[s.seq_id] for s in seqs if s.pending]
    layout.field(buf, "pending_src", num_pending)[:] = src
    pending_dst = layout.field(buf, "pending_dst", num_pending)
    pending_dst[:] = first[:num_real] if num_pending == num_real else first[pending > 0]
    # The drafts a draft model makes on the device: after the known tokens of their sequence.
    device_drafts = num_draft_tokens - num_host_drafts
    draft_dst = _runs(first + pending + num_known, num_drafts - host_drafts) if device_drafts else []
    layout.field(buf, "draft_dst", len(draft_dst))[:] = draft_dst
    return PackedStep(num_tokens=num_tokens, num_seqs=num_seqs, num_sampled=num_sampled,
                      num_pending=num_pending, max_seq_len=int(seq_lens.max()) if num_seqs else 0,
                      num_device_drafts=len(draft_dst), pending_run=_pending_run(pending_dst, src),
                      logits_start=_run_start(logits_rows), rows_start=_run_start(table_rows),
                      max_query_len=query_len or (int(q_lens.max()) if num_seqs else 1))


# A step of one sequence up to this many rows is packed by `_pack_one`: at 32 rows in half the
# column path's time, at 64 in 0.8x, at 128 in 1.3x (2-core CPU).
ONE_SEQ_MAX_ROWS = 32


def _pack_one(buf: np.ndarray, layout: StepLayout, s: ScheduledSeq, row: int, tables: np.ndarray,
              block_size: int, last_sampled_row: dict[int, int], query_len: int | None) -> PackedStep:
    """`pack_step` for a batch of one sequence, unpadded, with few rows (`ONE_SEQ_MAX_ROWS`).

    At batch 1 the host prepares every step while the GPU waits, and the column path's two dozen
    numpy operations cost about a microsecond each however few the numbers: here Python computes
    the few numbers of each field in lists and numpy only stores them, one slice a field (a
    verification of k drafts: 1 + k rows; query_len pads them with dummy rows as `pack_step`
    says)."""
    real = s.num_new_tokens
    if real < 1:
        raise ValueError("every scheduled sequence needs at least one new token")
    q = real if query_len is None else query_len
    if real > q:
        raise ValueError(f"query_len={query_len} is shorter than a sequence's {real} new tokens")
    num_sampled = s.num_logits_rows
    _check_fits(buf, layout, q, 1, num_sampled)
    start, pending, num_drafts = s.start, int(s.pending), s.num_draft_tokens
    after_known = pending + len(s.token_ids)  # the row of the first draft
    positions = [start + min(j, real - 1) for j in range(q)]  # a dummy row repeats the last real one
    table = tables[row]
    slots = [int(table[p // block_size]) * block_size + p % block_size for p in positions[:real]]
    device_drafts = num_drafts - len(s.draft_token_ids)  # a draft model's: placeholders, as a pending token
    last = real - 1
    logits_rows = list(range(last - num_drafts, last + 1)) if num_drafts else [last] * s.num_samples
    src = [last_sampled_row[s.seq_id]] if pending else []
    input_ids = [0] * pending + [*s.token_ids, *s.draft_token_ids] + [0] * (device_drafts + q - real)
    fields = (("input_ids", input_ids),
              ("positions", positions), ("slot_mapping", slots + [PAD_SLOT] * (q - real)),
              ("seq_lens", [start + q]), ("cu_seqlens_q", [0, q]), ("logits_indices", logits_rows),
              ("rows", [row]), ("pending_dst", [0] * pending), ("pending_src", src),
              ("draft_dst", list(range(after_known, after_known + device_drafts))))
    offsets = layout.offsets
    for name, values in fields:
        if values:
            at = offsets[name]
            buf[at:at + len(values)] = values
    logits_start = logits_rows[0] if num_drafts or len(logits_rows) == 1 else (None if logits_rows else 0)
    return PackedStep(num_tokens=q, num_seqs=1, num_sampled=num_sampled, num_pending=pending,
                      max_seq_len=start + q, num_device_drafts=device_drafts,
                      pending_run=(0, src[0]) if pending else (0, 0), logits_start=logits_start,
                      rows_start=row, max_query_len=q)


def _pending_run(dst: np.ndarray, src: list[int]) -> tuple[int, int] | None:
    """(dst[0], src[0]) when both are runs of rows ((0, 0) when empty), else None. dst rises
    strictly (one row per sequence, in batch order): it is a run when its ends are."""
    if not src:
        return 0, 0
    if dst[-1] - dst[0] == len(src) - 1 and src == list(range(src[0], src[0] + len(src))):
        return int(dst[0]), src[0]
    return None


def _columns(seqs, size: int) -> np.ndarray:
    """[6, size] int64: per sequence its start, pending (0/1), known new tokens, drafts, rows of
    logits and drafts whose ids the host knows; zeros after the real sequences (the dummy ones)
    up to `size`."""
    values = np.array([(s.start, s.pending, len(s.token_ids), s.num_draft_tokens, s.num_logits_rows,
                        len(s.draft_token_ids)) for s in seqs], dtype=np.int64).reshape(len(seqs), 6)
    if size > len(seqs):
        values = np.concatenate([values, np.zeros((size - len(seqs), 6), dtype=np.int64)])
    return values.T


def _check_fits(buf: np.ndarray, layout: StepLayout, num_tokens: int, num_seqs: int, num_sampled: int) -> None:
    for what, need, have in (("tokens", num_tokens, layout.max_tokens),
                             ("sequences", num_seqs, layout.max_seqs),
                             ("sampled rows", num_sampled, layout.max_sampled)):
        if need > have:
            raise ValueError(f"the step has {need} {what} but the layout holds {have}")
    if buf.dtype != np.int32 or buf.ndim != 1 or buf.shape[0] < layout.size:
        raise ValueError(f"buf must be a 1-D int32 array of >= {layout.size} elements")


def _logits_rows(last: np.ndarray, counts: np.ndarray, num_drafts: np.ndarray | None) -> np.ndarray:
    """The hidden-state row of each row of logits: a sequence's last row, once per sample; a
    sequence that verifies d drafts, its last 1 + d rows. num_drafts: None when none does."""
    if num_drafts is None:
        return last.repeat(counts)
    if (counts <= num_drafts + 1).all():  # no sequence samples its last row twice: one run each
        return _runs(last - num_drafts, counts)
    back = np.arange(int(counts.sum())) - (counts.cumsum() - 1).repeat(counts)  # -(count-1) .. 0
    return last.repeat(counts) + np.where((num_drafts > 0).repeat(counts), back, 0)


def _write_input_ids(input_ids: np.ndarray, seqs, after_pending: np.ndarray, num_known: np.ndarray | None,
                     host_drafts: np.ndarray | None) -> None:
    """The token ids the host knows, each sequence's after its pending token (if any), then the
    drafts it knows (an n-gram proposer's). A pending token, a draft model's drafts (made on the
    device) and the dummy rows stay placeholders 0. num_known / host_drafts: None when 0 for all."""
    input_ids[:] = 0
    if num_known is not None:
        input_ids[_runs(after_pending, num_known)] = [t for s in seqs for t in s.token_ids]
    if host_drafts is not None:
        after_known = after_pending if num_known is None else after_pending + num_known
        input_ids[_runs(after_known, host_drafts)] = [t for s in seqs for t in s.draft_token_ids]


def _run_start(values: np.ndarray) -> int | None:
    """v when `values` are v, v + 1, v + 2, ... (0 when empty), else None. Compared as lists:
    one numpy call, where a difference, a comparison and a reduction would be three."""
    if len(values) <= 1:
        return int(values[0]) if len(values) else 0
    listed = values.tolist()
    return listed[0] if listed == list(range(listed[0], listed[0] + len(listed))) else None


def _runs(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The indices start_b, start_b + 1, ..., start_b + length_b - 1 of every b, concatenated."""
    if len(starts) == 1:  # one run (a batch of one)
        return np.arange(starts[0], starts[0] + lengths[0])
    ends = lengths.cumsum()
    return (starts - ends + lengths).repeat(lengths) + np.arange(ends[-1] if len(ends) else 0)


@dataclass
class InputBatch:
    input_ids: torch.Tensor  # [T] int32
    positions: torch.Tensor  # [T] int32, 0-based position of each token in its sequence
    attn_metadata: AttentionMetadata
    logits_indices: torch.Tensor  # [S] int32: hidden-state row that each sampled row reads
    rows: torch.Tensor  # [B] int32: each sequence's row of the block tables
    pending_dst: torch.Tensor  # [P] int32: input_ids rows whose token is still on the device ...
    pending_src: torch.Tensor  # [P] int32: ... at these rows of the previous step's samples
    draft_dst: torch.Tensor  # [D] int32: input_ids rows of the drafts a draft model makes
    pending_run: tuple[int, int] | None = None  # see PackedStep
    logits_start: int | None = None
    rows_start: int | None = None

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]

    @classmethod
    def view(cls, buf: torch.Tensor, layout: StepLayout, packed: PackedStep,
             block_tables: torch.Tensor | None = None, backend: str = "auto",
             max_seq_len: int | None = None, views: FieldViews | None = None,
             max_query_len: int | None = None) -> InputBatch:
        """Views of each field of a packed step inside `buf` (the device buffer): no copies.

        block_tables: the step's [B, W] tables, gathered from the persistent ones by `rows`
        (the runner sets them after the gather when None). max_seq_len defaults to the step's
        own longest context, max_query_len its most rows of a sequence; CUDA graphs pass fixed
        bounds (max_model_len, their query_len). views: `buf`'s cache of field
        views, to slice them once per step shape instead of every step.
        """
        fields = field_views(buf, layout, packed) if views is None else views.get(buf, layout, packed)
        meta = AttentionMetadata(
            slot_mapping=fields["slot_mapping"],
            block_tables=block_tables,
            seq_lens=fields["seq_lens"],
            cu_seqlens_q=fields["cu_seqlens_q"],
            max_seq_len=max_seq_len or packed.max_seq_len or None,
            max_query_len=max_query_len or packed.max_query_len,
            backend=backend,
        )
        return cls(input_ids=fields["input_ids"], positions=fields["positions"], attn_metadata=meta,
                   logits_indices=fields["logits_indices"], rows=fields["rows"],
                   pending_dst=fields["pending_dst"], pending_src=fields["pending_src"],
                   draft_dst=fields["draft_dst"], pending_run=packed.pending_run,
                   logits_start=packed.logits_start, rows_start=packed.rows_start)


def field_views(buf: torch.Tensor, layout: StepLayout, packed: PackedStep) -> dict[str, torch.Tensor]:
    """Each field of a packed step as a view of `buf`, cut to the step's sizes."""
    t, b, p = packed.num_tokens, packed.num_seqs, packed.num_pending
    lengths = {"input_ids": t, "positions": t, "slot_mapping": t, "seq_lens": b, "cu_seqlens_q": b + 1,
               "logits_indices": packed.num_sampled, "rows": b, "pending_dst": p, "pending_src": p,
               "draft_dst": packed.num_device_drafts}
    return {name: layout.field(buf, name, n) for name, n in lengths.items()}


class FieldViews:
    """The field views of a step buffer, made once per step shape and then reused.

    Slicing ten tensors is ten eager torch ops on the host's critical path of every step, while
    a run of decode steps has the same shape step after step. A view aliases the buffer, so a
    reused one reads what this step's upload wrote; a buffer that was reallocated (it grew)
    starts afresh."""

    MAX_SHAPES = 1024  # prefill steps come in many shapes: forget them all past this many

    def __init__(self):
        self._buf: torch.Tensor | None = None
        self._views: dict[tuple, dict[str, torch.Tensor]] = {}

    def get(self, buf: torch.Tensor, layout: StepLayout, packed: PackedStep) -> dict[str, torch.Tensor]:
        if buf is not self._buf or len(self._views) >= self.MAX_SHAPES:
            self._buf, self._views = buf, {}
        key = (layout, packed.num_tokens, packed.num_seqs, packed.num_sampled, packed.num_pending,
               packed.num_device_drafts)
        fields = self._views.get(key)
        if fields is None:
            fields = self._views[key] = field_views(buf, layout, packed)
        return fields


def build_input_batch(output, block_size: int, device: torch.device, backend: str = "auto",
                      pending_tokens: dict[int, int] | None = None) -> InputBatch:
    """Pack a `SchedulerOutput` into fresh tensors on `device`, block tables included.

    The runner keeps persistent buffers and block tables instead; this stand-alone form is for
    tests, tools and tutorial 3. pending_tokens: seq id -> the token a pending decode computes.
    """
    from minivllm.worker.block_table import BlockTables
    from minivllm.worker.step_buffers import StepBuffers

    seqs = output.seqs
    width = max((len(s.block_table) for s in seqs), default=1)
    tables = BlockTables(max(len(seqs), 1), width, torch.device("cpu"))
    rows = tables.sync_all(seqs)
    pending = [s.seq_id for s in seqs if s.pending]
    layout = exact_layout(output.num_batched_tokens, output.num_logits_rows, len(seqs))
    buffers = StepBuffers(layout.size, device)
    packed = pack_step(buffers.host(layout.size), layout, seqs, rows, tables.host, block_size,
                       {seq_id: i for i, seq_id in enumerate(pending)})
    buffers.upload(layout.size)
    batch = InputBatch.view(buffers.device_tensor, layout, packed, backend=backend)
    batch.attn_metadata.block_tables = tables.device.to(device).index_select(0, batch.rows.to(device))
    if pending:
        known = torch.tensor([(pending_tokens or {})[seq_id] for seq_id in pending], dtype=torch.int32)
        batch.input_ids[batch.pending_dst] = known.to(device)[batch.pending_src]
    return batch
