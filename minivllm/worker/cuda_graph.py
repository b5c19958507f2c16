"""CUDA graphs for decode steps: launch a whole forward pass with one call.

A decode step of a small model is mostly *launch overhead*: Qwen3-0.6B has 28 layers of about
fifteen kernels each, so one forward is ~400 kernel launches of a few microseconds of Python and
driver work apiece, while each kernel runs for only microseconds on the GPU. The GPU waits on the
host. A CUDA graph records the launches of one forward once ("capture") and replays all of them
with a single call: the host cost of a step drops from milliseconds to tens of microseconds.

What a graph needs, and how this file provides it:

* **Fixed shapes.** A graph replays exactly the kernels it recorded, for exactly the tensor sizes
  it recorded. Decode batches change size every step, so we capture one graph per *bucket* of
  batch sizes (1, 2, 4, 8, 16, 32, 48, ...) and pad each step's batch up to the next bucket
  with dummy sequences (see `input_batch.pack_step(pad_to=...)`). Only decode-only steps are
  graphed: every sequence has one new token, so "batch size" is the only shape that varies.
  Steps with prefill chunks run eagerly; they are big enough that launches do not dominate.
  Speculative decoding adds a second set for *verification* steps, where a sequence computes its
  token and up to k drafts: every sequence gets exactly `query_len = 1 + k` query rows, those
  with fewer drafts padded by dummy rows that write nothing and that no real query sees
  (`pack_step(query_len=...)`). A set may hold graphs of several models over the same inputs:
  a draft model mirrors every forward of the target to keep its own KV cache in step.
* **Fixed addresses.** Replay reads its inputs from the memory it read during capture. The
  inputs therefore live in one static device buffer (`StepBuffers` with a fixed `StepLayout`)
  plus a static block-table tensor, and each step writes its metadata *into* them (one
  host->device copy, and a gather of block-table rows when they changed) before replaying.
  Outputs come back in the tensor captured as the graph's output.
* **No host syncs.** Anything that reads a GPU value on the host (`.item()`, `.tolist()`,
  printing, a data-dependent Python branch) cannot be captured. The model checks shapes only,
  the Triton kernels size their grids from shapes, and the split-KV count is planned from a
  host-side bound, `max_seq_len`, fixed at capture to `max_model_len` (a split that finds no keys
  of a short context simply contributes nothing).
* **Warm kernels.** The first call of a Triton kernel compiles it; that must not happen during
  capture, so each bucket runs once eagerly right before it is captured.

Graphs are captured largest first and share one memory pool: a smaller graph's temporaries fit
inside the larger one's, and since graphs replay one at a time they can share the memory.
"""

from __future__ import annotations

import bisect
from typing import NamedTuple

import torch

from minivllm.worker.block_table import BlockTables
from minivllm.worker.input_batch import FieldViews, InputBatch, PackedStep, StepLayout, exact_layout, pack_step
from minivllm.worker.step_buffers import StepBuffers


def graph_batch_sizes(max_batch_size: int) -> list[int]:
    """The buckets: 1, 2, 4, 8, then every multiple of 16, up to and including `max_batch_size`.

    Small batches get fine buckets (padding 7 rows onto 1 would double the work); from 16 on,
    a step pads at most 15 rows, under 10 % of the batch beyond 160 sequences.
    """
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    sizes = [s for s in (1, 2, 4, 8) if s <= max_batch_size]
    sizes += list(range(16, max_batch_size + 1, 16))
    if sizes[-1] != max_batch_size:
        sizes.append(max_batch_size)
    return sizes


def bucket_for(num_seqs: int, sizes: list[int]) -> int | None:
    """The smallest bucket that holds `num_seqs` sequences, or None if none does. `sizes` sorted."""
    if num_seqs < 1:
        return None
    i = bisect.bisect_left(sizes, num_seqs)
    return sizes[i] if i < len(sizes) else None


def graph_miss_reason(seqs, num_sampled: int, batch_sizes: list[int], layout: StepLayout,
                      query_len: int = 1) -> str | None:
    """Why a step cannot replay a graph of `query_len` tokens per sequence, or None when it can.

    seqs: the step's `ScheduledSeq`s; num_sampled: its rows of logits; batch_sizes: the captured
    buckets, sorted; layout: the static buffer's capacities. A pure function of plain data, so
    every reason can be tested without a GPU. The conditions, in the order they are checked:
    """
    # 1. Graphs are captured for query_len new tokens per sequence (1: decode; 1 + k: verify);
    #    a longer prefill chunk changes the shapes.
    longer = sum(1 for s in seqs if s.num_new_tokens > query_len)
    if longer:
        what = "one token" if query_len == 1 else f"{query_len} tokens"
        return f"not decode-only: {longer} of {len(seqs)} sequences compute more than {what}"
    # 2. A bucket must hold the batch: more sequences than the largest bucket run eagerly.
    if bucket_for(len(seqs), batch_sizes) is None:
        return f"no bucket for {len(seqs)} sequences (buckets {batch_sizes[0]}..{batch_sizes[-1]})"
    # 3. Forked children sample from their parent's row, so sampled rows can outnumber sequences.
    if num_sampled > layout.max_sampled:
        return f"{num_sampled} sampled rows exceed the static buffer's {layout.max_sampled}"
    return None


class GraphStep(NamedTuple):
    """A step loaded into the static buffers of `graphs`, ready to replay: its bucket and inputs."""

    batch_size: int
    inputs: InputBatch
    graphs: DecodeGraphs


class DecodeGraphs:
    """One captured forward pass per batch-size bucket (and model), replayed for steps in which
    every sequence computes at most `query_len` tokens.

    models: the models whose forwards run on these inputs (`forward(input_ids, positions, meta)`
    -> hidden [T, H]): the engine's model, and a draft model that mirrors it, if any.
    batch_sizes: the buckets; max_sampled: most rows of logits a step can have.
    block_table_width: blocks of the longest sequence the graphs may see.
    max_seq_len: the host-side bound on seq_lens baked into the graphs (max_model_len, plus the
    padded query rows of a verification).
    query_len: query rows per sequence: 1 for decode steps, 1 + k for verification steps.
    """

    def __init__(self, models, batch_sizes: list[int], max_sampled: int, block_table_width: int,
                 max_seq_len: int, device: torch.device, backend: str = "auto", query_len: int = 1):
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {device}")
        self.models = list(models)
        self.batch_sizes = sorted(batch_sizes)
        self.max_seq_len = max_seq_len
        self.backend = backend
        self.query_len = query_len
        largest = self.batch_sizes[-1]
        tokens = largest * query_len
        self.layout = StepLayout(max_tokens=tokens, max_sampled=max(max_sampled, tokens), max_seqs=largest)
        # Never reallocated: the graphs hold pointers into them.
        self.buffers = StepBuffers(self.layout.size, device, growable=False)
        self.block_tables = torch.zeros(largest, block_table_width, dtype=torch.int32, device=device)
        self._bucket_tables = {b: self.block_tables[:b] for b in self.batch_sizes}
        self._gathered = None  # (bucket, rows, tables version) that block_tables holds
        self._views = FieldViews()
        self._graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}  # (model, bucket) -> graph
        self._outputs: dict[tuple[int, int], torch.Tensor] = {}

    @property
    def max_batch_size(self) -> int:
        return self.batch_sizes[-1]

    def _static_inputs(self, packed: PackedStep) -> InputBatch:
        """The inputs of a bucket: fixed views into the static buffers, sliced once per shape."""
        return InputBatch.view(self.buffers.device_tensor, self.layout, packed, self._bucket_tables[packed.num_seqs],
                               self.backend, max_seq_len=self.max_seq_len, views=self._views,
                               max_query_len=self.query_len)

    def _pack(self, seqs, rows, tables, block_size, last_sampled_row, pad_to, pad_row) -> PackedStep:
        buf = self.buffers.host(self.layout.size)
        packed = pack_step(buf, self.layout, seqs, rows, tables, block_size, last_sampled_row,
                           pad_to=pad_to, pad_row=pad_row, query_len=self.query_len)
        self.buffers.upload(self.layout.size)
        return packed

    @torch.inference_mode()
    def capture(self, pool=None):
        """Capture every bucket of every model, largest first. Call once, after the KV caches are
        bound. pool: a memory pool to share (another set's); returns the pool."""
        for batch_size in reversed(self.batch_sizes):
            # An all-padding batch: valid for the kernels, writes nothing into the KV cache.
            packed = self._pack([], [], self.block_tables.new_zeros(1, 1).cpu().numpy(), 1, {},
                                pad_to=batch_size, pad_row=0)
            inputs = self._static_inputs(packed)
            for index, model in enumerate(self.models):
                model(inputs.input_ids, inputs.positions, inputs.attn_metadata)  # warm-up: compiles
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    output = model(inputs.input_ids, inputs.positions, inputs.attn_metadata)
                pool = graph.pool()
                self._graphs[index, batch_size] = graph
                self._outputs[index, batch_size] = output
        torch.cuda.synchronize()
        return pool

    def bucket(self, num_seqs: int) -> int | None:
        return bucket_for(num_seqs, self.batch_sizes)

    def why_not(self, seqs, num_sampled: int) -> str | None:
        """Which condition keeps this step from replaying a graph (None: it can replay)."""
        return graph_miss_reason(seqs, num_sampled, self.batch_sizes, self.layout, self.query_len)

    def load(self, seqs, rows, tables, block_size: int, last_sampled_row, pad_row: int) -> GraphStep:
        """Pack a step into the static buffer, padded to its bucket (and to `query_len` rows per
        sequence), and upload it.

        The caller checked `why_not`; the block tables and pending tokens are filled on the
        device by the caller (they are the same for the eager path).
        """
        batch_size = self.bucket(len(seqs))
        packed = self._pack(seqs, rows, tables, block_size, last_sampled_row, batch_size, pad_row)
        return GraphStep(batch_size, self._static_inputs(packed), self)

    def gather_block_tables(self, step: GraphStep, rows: list[int], tables: BlockTables) -> None:
        """Copy the step's rows of the persistent tables into the static tensor, unless it holds
        them already: the same bucket and rows, and no row changed since (a decode step appends
        a block once in block_size steps, so most steps skip this copy). Called after `commit`."""
        held = (step.batch_size, tuple(rows), tables.version)
        if held != self._gathered:
            torch.index_select(tables.device, 0, step.inputs.rows, out=step.inputs.attn_metadata.block_tables)
            self._gathered = held

    def replay(self, step: GraphStep, model: int = 0) -> torch.Tensor:
        """Replay the bucket's graph of `models[model]` on the loaded step: one launch for the
        whole forward. Returns the hidden states [bucket x query_len, H]; rows past the real
        tokens are padding.
        """
        self._graphs[model, step.batch_size].replay()
        return self._outputs[model, step.batch_size]


def choose_graphs(graph_sets: list[DecodeGraphs], seqs, num_sampled: int) -> tuple[DecodeGraphs | None, str | None]:
    """The first set (fewest tokens per sequence first) that can replay the step, or None and
    why the last one cannot (None too when there are no sets)."""
    miss = None
    for graphs in graph_sets:
        miss = graphs.why_not(seqs, num_sampled)
        if miss is None:
            return graphs, None
    return None, miss


def load_step(seqs, num_sampled: int, rows, tables: BlockTables, block_size: int, last_sampled_row,
              graph_sets: list[DecodeGraphs], eager: StepBuffers, eager_views: FieldViews, backend: str):
    """Load a step into the first graph set that can replay it, else into `eager`'s buffer for an
    eager forward (its field views cached in `eager_views`); then send the changed block-table
    entries and gather the step's rows. num_sampled: the step's rows of logits.

    An eager step whose rows are consecutive reads them from the persistent tables in place:
    they change only by a later step's `commit`, which the device runs after this step's
    kernels (stream order; on a CPU, after this step's forward has returned).

    Returns (the GraphStep or the eager InputBatch, its InputBatch, why no graph set could run
    it: None if one does, or if there are none).
    """
    graphs, miss = choose_graphs(graph_sets, seqs, num_sampled)
    if graphs is not None:
        prepared = graphs.load(seqs, rows, tables.host, block_size, last_sampled_row, tables.pad_row)
        batch = prepared.inputs
    else:
        layout = exact_layout(sum(s.num_new_tokens for s in seqs), num_sampled, len(seqs))
        packed = pack_step(eager.host(layout.size), layout, seqs, rows, tables.host, block_size, last_sampled_row)
        eager.upload(layout.size)
        prepared = batch = InputBatch.view(eager.device_tensor, layout, packed, backend=backend, views=eager_views)
    tables.commit()
    meta = batch.attn_metadata
    if graphs is not None:
        graphs.gather_block_tables(prepared, rows, tables)
    elif batch.rows_start is not None:  # consecutive rows (always, at batch 1): a view will do
        meta.block_tables = tables.device[batch.rows_start:batch.rows_start + batch.rows.shape[0]]
    else:
        meta.block_tables = tables.device.index_select(0, batch.rows)
    return prepared, batch, miss
