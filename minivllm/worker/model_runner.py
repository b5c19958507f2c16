"""The ModelRunner: owns the model, the KV cache tensors and the sampler; runs one step.

It knows nothing about queues or policies. Given a plain `SchedulerOutput` (minivllm/step.py):

1. it copies the KV blocks the block manager asked for (copy-on-write of shared blocks),
2. packs all scheduled sequences into one batch (`input_batch.py`),
3. runs ONE forward pass for all of them — prefill chunks and decodes together,
4. computes logits only at the rows that sample, and samples one token per row,
5. for the rows and prompt chunks that asked, computes log-probabilities from the same logits,

and returns at once: the tokens come back as `SampledTokens`, a handle whose `wait()` gives them
when the GPU is done (and `logprobs()` the log-probabilities, which came with them). Nothing in
between waits for the GPU, so the engine can plan and launch the next step while this one runs
(overlap); the next step's decodes take their pending tokens from `last_sampled` on the device.

On CUDA a step is kept lean, because at decode the GPU is fast enough to wait on the host; each
choice is named and can be turned off to measure it:

* the step's metadata goes to the GPU in ONE asynchronous copy (`step_buffers.py`), and block
  tables stay on the device, updated only where they changed (`block_table.py`);
* decode-only steps replay a CUDA graph per batch-size bucket (`cuda_graph.py`), so ~400 kernel
  launches become one; `enforce_eager=True` turns this off;
* nothing inside the forward reads a GPU value back: the kernels get `max_seq_len` as a Python
  int; the sampled tokens come back by an asynchronous copy;
* an all-greedy batch without penalties or bans is sampled with one argmax (`Sampler.sample`).

Under tensor parallelism there is one ModelRunner per rank, each in its own process with its own
GPU (`tp`, see worker/executor.py): it holds that rank's shard of the model and of the KV cache,
and runs the same `execute` on the same SchedulerOutput as every other rank. The logits come back
whole on every rank (the LM head gathers them), and the sampler, seeded alike everywhere, draws
the same tokens on every rank, so `last_sampled` is the same everywhere too.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from minivllm.config import EngineConfig
from minivllm.distributed import SINGLE, TensorParallel, barrier
from minivllm.distributed.peer_all_reduce import attach_peer_all_reduce
from minivllm.kernels import resolve_backend, warm_up
from minivllm.layers.logprobs import decode_row, logprobs_payload, pad_payload
from minivllm.layers.sampler import Sampler
from minivllm.observe.records import StepTimings
from minivllm.step import SchedulerOutput, StepLogprobs
from minivllm.worker.block_table import BlockTables
from minivllm.worker.cuda_graph import DecodeGraphs, GraphStep, graph_batch_sizes
from minivllm.worker.input_batch import InputBatch, exact_layout, pack_step
from minivllm.worker.kv_cache import allocate_kv_cache, kv_bytes_per_block, num_kv_blocks
from minivllm.worker.step_buffers import StepBuffers


@dataclass
class LogprobsLayout:
    """Whose rows a step's logprobs payload holds, in order: first the sample rows that asked
    (`sampled`: (sample row index, its k)), then each chunk's prompt positions (`prompt`:
    (seq id, the prompt tokens scored, k))."""

    sampled: list[tuple[int, int]]
    prompt: list[tuple[int, list[int], int]]


class SampledTokens:
    """The sampled tokens of a launched step (and its logprobs payload), on their way to the host,
    and the step's timings so far: the runner's phases (prepare, forward, sample; clock reads
    only, no GPU sync), and the CUDA graph that ran it, if one did."""

    def __init__(self, tokens: torch.Tensor, timings: StepTimings, logprobs: torch.Tensor | None = None,
                 layout: LogprobsLayout | None = None):
        self.timings = timings
        self._event = None
        self._layout = layout
        self._host, self._host_logprobs = tokens, logprobs
        if tokens.is_cuda:  # asynchronous copies into pinned memory, and one event to wait on
            self._host = _to_pinned(tokens)
            self._host_logprobs = None if logprobs is None else _to_pinned(logprobs)
            self._event = torch.cuda.Event()
            self._event.record()

    def done(self) -> bool:
        """Whether the tokens are on the host already (`wait` would not block)."""
        return self._event is None or self._event.query()

    def wait(self) -> list[int]:
        """Block until the step is done; one token id per sample row."""
        if self._event is not None:
            self._event.synchronize()
        return self._host.tolist()

    def logprobs(self) -> StepLogprobs | None:
        """After `wait`: the log-probabilities of the rows and chunks that asked (None: none did)."""
        if self._host_logprobs is None:
            return None
        rows, tokens, layout = self._host_logprobs.tolist(), self._host.tolist(), self._layout
        out = StepLogprobs()
        for r, (sample_row, k) in enumerate(layout.sampled):
            out.sampled[sample_row] = decode_row(rows[r], tokens[sample_row], k)
        r = len(layout.sampled)
        for seq_id, targets, k in layout.prompt:
            out.prompt[seq_id] = [decode_row(rows[r + i], t, k) for i, t in enumerate(targets)]
            r += len(targets)
        return out


def _to_pinned(tensor: torch.Tensor) -> torch.Tensor:
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    return host


class ModelRunner:
    def __init__(self, config: EngineConfig, tp: TensorParallel = SINGLE):
        """tp: this runner's rank of the tensor-parallel group (one rank: the default)."""
        from minivllm.models import load_model

        self.config = config
        model_config = config.model_config
        self.device = tp.local_device(model_config.torch_device)
        self.dtype = model_config.torch_dtype
        # Before the layers are built, so that they all hold the same `tp` (and its peer buffer).
        self.tp = tp = attach_peer_all_reduce(tp, model_config.all_reduce, self.dtype, self.device)
        self.block_size = config.cache_config.block_size
        self.backend = model_config.attention_backend
        self.model = load_model(model_config.model, dtype=self.dtype, device=self.device, tp=tp)
        barrier(tp)  # every rank holds its weights: one that failed to load stops the others here
        self.hf_config = self.model.config
        self.vocab_size = self.hf_config.vocab_size
        self.sampler = Sampler(self.vocab_size, self.device)
        self.num_kv_blocks = num_kv_blocks(config, self.model, self.device, tp)
        self.kv_bytes_per_block = kv_bytes_per_block(self.model, self.block_size, config.kv_cache_spec)
        # kv_scales: per layer (k_scale, v_scale) of an fp8 cache, else None.
        self.kv_caches, self.kv_scales = allocate_kv_cache(self.model, self.num_kv_blocks, self.block_size,
                                                           config.kv_cache_spec, self.device)
        sched = config.scheduler_config
        self.block_tables = BlockTables(sched.max_num_seqs, -(-sched.max_model_len // self.block_size),
                                        self.device)
        self._step_buffers = StepBuffers(4096, self.device)  # the eager path's; grows when needed
        # The previous step's sampled tokens, on the device, and which row holds whose token.
        self.last_sampled = torch.zeros(0, dtype=torch.int64, device=self.device)
        self._last_sampled_row: dict[int, int] = {}
        if self.device.type == "cuda":  # compile every kernel variant now, not mid-serving
            k_cache, v_cache = self.kv_caches[0]
            k_scale, v_scale = self.kv_scales[0] if self.kv_scales else (None, None)
            warm_up(k_cache, v_cache, self.model.attention_layers()[0].num_heads, dtype=self.dtype,
                    backend=self.backend, k_scale=k_scale, v_scale=v_scale)
        self.graphs = self._capture_graphs()
        # For requests that bring no seed of their own. Seeded last, after everything that might
        # draw random numbers at start-up, so every rank of a tensor-parallel group starts
        # sampling from the same state, and draws the same tokens.
        torch.manual_seed(model_config.seed)

    # ------------------------------------------------------------------------------------------
    # CUDA graphs
    # ------------------------------------------------------------------------------------------
    @property
    def graphs_off_reason(self) -> str | None:
        """Why this runner captures no decode graphs (None: it does, or will at start-up).

        The reference attention backend ("torch") reads sequence lengths back to the host, which a
        graph cannot capture, so it always runs eagerly."""
        if self.device.type != "cuda":
            return f"CUDA graphs need a CUDA device, this runner is on {self.device}"
        if self.config.model_config.enforce_eager:
            return "enforce_eager=True"
        if resolve_backend(self.backend, self.device) == "torch":
            return f"attention backend {self.backend!r} resolves to 'torch', which graphs cannot capture"
        return None

    def _capture_graphs(self) -> DecodeGraphs | None:
        """Capture the decode graphs (CUDA only, unless enforce_eager), after the KV pool exists."""
        if self.graphs_off_reason is not None:
            return None
        sched = self.config.scheduler_config
        graphs = DecodeGraphs(self.model, graph_batch_sizes(sched.max_num_seqs),
                              max_sampled=sched.max_num_seqs, block_table_width=self.block_tables.width,
                              max_seq_len=sched.max_model_len, device=self.device, backend=self.backend)
        graphs.capture()
        return graphs

    # ------------------------------------------------------------------------------------------
    # One step
    # ------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, output: SchedulerOutput) -> SampledTokens:
        """Launch the step; returns its sampled tokens (one per `output.sample_rows` entry),
        still on their way: `wait()` for them. Nothing here waits for the GPU."""
        timings = StepTimings()
        start = time.perf_counter()
        self.sampler.release(output.finished_seq_ids)
        self.block_tables.release(output.finished_seq_ids)
        self.block_tables.release(output.preempted_seq_ids)
        if output.is_empty:  # nothing to compute (every sequence awaits a pending last token)
            return SampledTokens(torch.zeros(0, dtype=torch.int64, device=self.device), timings)
        self._copy_blocks(output.block_copies)
        prepared = self._prepare(output, timings)
        launch = time.perf_counter()
        if isinstance(prepared, GraphStep):
            hidden, batch = self.graphs.replay(prepared), prepared.inputs
        else:
            hidden, batch = self.model(prepared.input_ids, prepared.positions, prepared.attn_metadata), prepared
        launched = time.perf_counter()
        tokens, logprobs, layout = self._sample(output, hidden, batch.logits_indices)
        timings.prepare, timings.forward = launch - start, launched - launch
        timings.sample = time.perf_counter() - launched
        return SampledTokens(tokens, timings, logprobs, layout)

    def _prepare(self, output: SchedulerOutput, timings: StepTimings) -> GraphStep | InputBatch:
        """Pack the step into the graphs' static buffers when a graph fits, else eagerly; then
        finish it on the device: block tables gathered, pending tokens filled in."""
        seqs = output.seqs
        rows = [self.block_tables.sync(s.seq_id, s.block_table) for s in seqs]
        tables, bs, last = self.block_tables.host, self.block_size, self._last_sampled_row
        if self.graphs is not None:
            timings.graph_miss = self.graphs.why_not(seqs, len(output.sample_rows))
        if self.graphs is not None and timings.graph_miss is None:
            prepared = self.graphs.load(seqs, rows, tables, bs, last, self.block_tables.pad_row)
            timings.graph_batch_size = prepared.batch_size
            batch = prepared.inputs
        else:
            layout = exact_layout(seqs, len(output.sample_rows))
            packed = pack_step(self._step_buffers.host(layout.size), layout, seqs, rows, tables, bs, last)
            self._step_buffers.upload(layout.size)
            prepared = batch = InputBatch.view(self._step_buffers.device_tensor, layout, packed,
                                               backend=self.backend)
        self.block_tables.commit()
        meta = batch.attn_metadata
        if meta.block_tables is None:
            meta.block_tables = self.block_tables.device.index_select(0, batch.rows)
        else:  # the graph's static tensor
            torch.index_select(self.block_tables.device, 0, batch.rows, out=meta.block_tables)
        if batch.pending_dst.numel():
            batch.input_ids[batch.pending_dst] = self.last_sampled[batch.pending_src].to(torch.int32)
        return prepared

    def _sample(self, output: SchedulerOutput, hidden: torch.Tensor, logits_indices: torch.Tensor):
        """Logits at the sampled rows only, one token each (remembered for the next step); and the
        log-probabilities that were asked for: (tokens, logprobs payload or None, its layout)."""
        rows = output.sample_rows
        sampled_logprobs = None
        if rows:  # else only partial prefill chunks this step: nothing to sample yet
            logits = self.model.compute_logits(hidden[logits_indices])
            sampled = self.sampler.sample(logits, rows)
            self.last_sampled, sampled_logprobs = sampled.tokens, sampled.logprobs
        else:
            self.last_sampled = torch.zeros(0, dtype=torch.int64, device=self.device)
        self._last_sampled_row = {row.seq_id: i for i, row in enumerate(rows)}
        if sampled_logprobs is None and not output.scores_prompts:  # most steps: nothing more to do
            return self.last_sampled, None, None
        layout = LogprobsLayout([], [])
        payloads = []
        if sampled_logprobs is not None:
            layout.sampled = [(i, row.params.logprobs) for i, row in enumerate(rows) if row.params.logprobs is not None]
            payloads.append(sampled_logprobs)
        payloads += self._prompt_logprobs(output, hidden, layout)
        width = max([k for _, k in layout.sampled] + [k for *_, k in layout.prompt])
        return self.last_sampled, torch.cat([pad_payload(p, width) for p in payloads]), layout

    def _prompt_logprobs(self, output: SchedulerOutput, hidden: torch.Tensor, layout: LogprobsLayout):
        """Payloads of the prompt positions that chunks asked to score (none in most steps).

        Their logits are computed `max_num_seqs` rows at a time: never more at once than the
        sampled rows of a full step, which the start-up memory profile accounts for."""
        rows, targets = [], []
        offset = 0
        for s in output.seqs:
            asked = s.prompt_logprobs
            if asked is not None:
                first = offset + asked.start - s.start
                rows += range(first, first + len(asked.target_ids))
                targets += asked.target_ids
                layout.prompt.append((s.seq_id, asked.target_ids, asked.num_logprobs))
            offset += s.num_new_tokens
        if not rows:
            return []
        num_top = max(k for *_, k in layout.prompt)
        rows_t = torch.tensor(rows, device=self.device)
        targets_t = torch.tensor(targets, device=self.device)
        size = self.config.scheduler_config.max_num_seqs
        return [logprobs_payload(self.model.compute_logits(hidden[rows_t[i:i + size]]), targets_t[i:i + size], num_top)
                for i in range(0, len(rows), size)]

    def _copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write: duplicate whole KV blocks (every layer) before anyone writes to them.

        Done one pair at a time, in order, so a block freed and reused within the step is always
        read before it is overwritten. An fp8 cache's scales are copied with their values.
        """
        tensors = [t for pair in self.kv_caches + (self.kv_scales or []) for t in pair]
        for src, dst in copies:
            for t in tensors:
                t[dst].copy_(t[src])
