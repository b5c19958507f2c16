"""Block tables that live on the device between steps, changed only where they changed.

A block table lists the KV blocks of one sequence. The attention kernels read it on the GPU, for
every sequence of every step. Uploading all of them each step would cost B x W entries (W =
max_model_len / block_size: 2,560 for a 40k-token model, so 2.6 MB at 256 sequences) while a
decode step changes about one entry in sixteen sequences. So each running sequence owns a *row*
of a persistent [rows, W] int32 tensor on the device, and a step sends only the entries that
changed since the last one (`sync` finds them, `commit` sends them with one copy and one scatter).
A host mirror of the same array lets the runner compute KV slots without reading the device.

The step itself then gathers its sequences' rows (`index_select`), a copy on the GPU of only the
rows it needs. The last row stays all zeros: padding sequences of a CUDA graph point at it.
"""

from __future__ import annotations

import numpy as np
import torch

from minivllm.worker.step_buffers import StepBuffers


class BlockTables:
    def __init__(self, max_seqs: int, width: int, device: torch.device):
        self.width = width
        self.pad_row = max_seqs  # one spare row of zeros (block 0 is always a valid block id)
        self.host = np.zeros((max_seqs + 1, width), dtype=np.int32)
        on_cuda = device.type == "cuda"
        # On CPU the "device" tensor *is* the host array: nothing to send.
        self.device = (torch.zeros(self.host.shape, dtype=torch.int32, device=device) if on_cuda
                       else torch.from_numpy(self.host))
        self._uploads = StepBuffers(1024, device) if on_cuda else None
        self._held: dict[int, tuple[int, list[int]]] = {}  # seq id -> (its row, the table it holds)
        self._free_rows = list(range(max_seqs - 1, -1, -1))
        self._changed: list[int] = []  # flat indices into the array ...
        self._values: list[int] = []  # ... and their new block ids, not yet on the device
        self.version = 0  # counts the rows changed: a copy of some rows is current while it stays

    def release(self, seq_ids) -> None:
        """Forget the rows of sequences that finished or lost their blocks."""
        for seq_id in seq_ids:
            held = self._held.pop(seq_id, None)
            if held is not None:
                self._free_rows.append(held[0])

    def sync_all(self, seqs) -> list[int]:
        """`sync` for each of a step's `ScheduledSeq`s; their rows, in order. A decode step
        changes few tables, so the common case is one dict lookup and one list comparison."""
        held = self._held
        rows = []
        for s in seqs:
            row, synced = held.get(s.seq_id, (None, None))
            rows.append(row if synced == s.block_table else self.sync(s.seq_id, s.block_table))
        return rows

    def sync(self, seq_id: int, table: list[int]) -> int:
        """Bring the row of `seq_id` up to `table` (in the host mirror; `commit` sends it);
        returns the row. Usually nothing changed, or one block was appended."""
        held = self._held.get(seq_id)
        if held is None:
            if not self._free_rows:
                raise RuntimeError(f"more than {self.pad_row} sequences hold block tables at once")
            held = self._held[seq_id] = (self._free_rows.pop(), [])
        row, synced = held
        if synced != table:
            if len(table) > self.width:
                raise ValueError(f"a block table of {len(table)} blocks exceeds the width {self.width}")
            first = 0  # the first entry that differs: copy-on-write changes one in the middle
            while first < len(synced) and first < len(table) and synced[first] == table[first]:
                first += 1
            new = table[first:]
            self.host[row, first:len(table)] = new
            if self._uploads is not None:
                self._changed.extend(range(row * self.width + first, row * self.width + len(table)))
                self._values.extend(new)
            self._held[seq_id] = (row, list(table))
            self.version += 1
        return row

    def commit(self) -> None:
        """Send the changed entries to the device: one host->device copy and one scatter."""
        if not self._changed:
            return
        n = len(self._changed)
        buf = self._uploads.host(2 * n)
        buf[:n] = self._changed
        buf[n:2 * n] = self._values
        self._uploads.upload(2 * n)
        sent = self._uploads.device_tensor
        self.device.view(-1)[sent[:n]] = sent[n:2 * n]
        self._changed, self._values = [], []
