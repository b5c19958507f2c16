"""The ModelRunner: owns the model, the KV cache tensors and the sampler; runs one step.

It knows nothing about queues or policies. Given a plain `SchedulerOutput` (minivllm/step.py):

1. it copies the KV blocks the block manager asked for (copy-on-write of shared blocks),
2. packs all scheduled sequences into one batch (`input_batch.py`),
3. runs ONE forward pass for all of them — prefill chunks and decodes together,
4. computes logits only at the rows that sample, and samples one token per row (a step with
   structured output samples in a second call, `sample(bitmask)`, once the engine has filled the
   grammar bitmask),
5. for the rows and prompt chunks that asked, computes log-probabilities from the same logits,

and returns at once: the tokens come back as `SampledTokens`, a handle whose `wait()` gives them
when the GPU is done (and `logprobs()` the log-probabilities, which came with them). With
speculative decoding (speculative_decoding.md), a sequence that verifies drafts takes logits at
each of them and the rejection sampler keeps the accepted ones (greedy drafts the host knows:
the host keeps them, from the argmaxes, when the tokens arrive); a draft model (`draft_model.py`)
makes its drafts here, before the forward, and mirrors the forward after it. Nothing in between
waits for the GPU, so the engine can plan and launch the next step while this one runs
(overlap); the next step's decodes take their pending tokens from `last_sampled` on the device.

On CUDA a step is kept lean, because at decode the GPU is fast enough to wait on the host; each
choice is named and can be turned off to measure it:

* the step's metadata goes to the GPU in ONE asynchronous copy (`step_buffers.py`), and block
  tables stay on the device, updated only where they changed (`block_table.py`);
* decode-only steps replay a CUDA graph per batch-size bucket (`cuda_graph.py`), so ~400 kernel
  launches become one; so do verification steps, in a second set of 1 + k tokens per sequence;
  `enforce_eager=True` turns this off;
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
from minivllm.kernels import plan_attention, resolve_backend, warm_up
from minivllm.layers import onednn
from minivllm.layers.logprobs import decode_rows, logprobs_payload, pad_payload
from minivllm.layers.rejection_sampler import NO_TOKEN, greedy_accept, greedy_verify, rejection_sample
from minivllm.layers.sampler import Sampler, SamplingBatch, plain_greedy
from minivllm.observe.records import StepTimings
from minivllm.step import SchedulerOutput, StepLogprobs
from minivllm.worker.block_table import BlockTables
from minivllm.worker.cuda_graph import DecodeGraphs, GraphStep, graph_batch_sizes, load_step
from minivllm.worker.draft_model import DraftModel
from minivllm.worker.input_batch import FieldViews, InputBatch
from minivllm.worker.kv_cache import allocate_kv_cache, kv_bytes_per_block, num_kv_blocks
from minivllm.worker.step_buffers import StepBuffers
from minivllm.worker.verification import verification


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
    only, no GPU sync), and the CUDA graph that ran it, if one did.

    drafts: in a greedy verification of drafts the host knows, each sample row's drafts; the
    tokens are then the argmax of every row of logits, and `wait` accepts the drafts (see
    `greedy_accept`)."""

    def __init__(self, tokens: torch.Tensor, timings: StepTimings, logprobs: torch.Tensor | None = None,
                 layout: LogprobsLayout | None = None, drafts: list[list[int]] | None = None):
        self.timings = timings
        self._event = None
        self._layout = layout
        self._drafts = drafts
        self._host, self._host_logprobs = tokens, logprobs
        if tokens.is_cuda:  # asynchronous copies into pinned memory, and one event to wait on
            self._host = _to_pinned(tokens)
            self._host_logprobs = None if logprobs is None else _to_pinned(logprobs)
            self._event = torch.cuda.Event()
            self._event.record()

    def done(self) -> bool:
        """Whether the tokens are on the host already (`wait` would not block)."""
        return self._event is None or self._event.query()

    def wait(self) -> list[int] | list[list[int]]:
        """Block until the step is done; one token id per sample row, or, in a step that
        verified drafts, the list of tokens each sample row gained."""
        if self._event is not None:
            self._event.synchronize()
        if self._drafts is not None:
            return greedy_accept(self._host.tolist(), self._drafts)
        if self._host.dim() == 2:
            return [[t for t in row if t != NO_TOKEN] for row in self._host.tolist()]
        return self._host.tolist()

    def logprobs(self) -> StepLogprobs | None:
        """After `wait`: the log-probabilities of the rows and chunks that asked (None: none did)."""
        if self._host_logprobs is None:
            return None
        tokens, layout = self._host.tolist(), self._layout
        if self._host.dim() == 2:  # a step that verified drafts: a row that asked sampled one token
            tokens = [row[0] for row in tokens]
        token_ids = [tokens[row] for row, _ in layout.sampled]
        num_tops = [k for _, k in layout.sampled]
        for _, targets, k in layout.prompt:
            token_ids += targets
            num_tops += [k] * len(targets)
        records = decode_rows(self._host_logprobs, token_ids, num_tops)
        out = StepLogprobs(dict(zip([row for row, _ in layout.sampled], records)))
        r = len(layout.sampled)
        for seq_id, targets, _ in layout.prompt:
            out.prompt[seq_id] = records[r:r + len(targets)]
            r += len(targets)
        return out


def _hidden_for_logits(hidden: torch.Tensor, batch: InputBatch) -> torch.Tensor:
    """The hidden states of the rows that take logits: a slice when they are one run of rows (a
    decode step, a verification at batch 1), else a gather."""
    start = batch.logits_start
    if start is None:
        return hidden.index_select(0, batch.logits_indices)
    return _run(hidden, start, batch.logits_indices.shape[0])


def _run(tensor: torch.Tensor, start: int, length: int) -> torch.Tensor:
    """tensor[start:start + length]; the tensor itself when that is all of it (a batch that
    fills its graph bucket), which saves the slice op."""
    return tensor if start == 0 and length == tensor.shape[0] else tensor[start:start + length]


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
        if self.device.type == "cpu":
            onednn.pack_weights(self.model)  # once: every product of every step runs faster
        barrier(tp)  # every rank holds its weights: one that failed to load stops the others here
        self.hf_config = self.model.config
        self.vocab_size = self.hf_config.vocab_size
        self.sampler = Sampler(self.vocab_size, self.device)
        spec = config.speculative_config
        self.num_speculative_tokens = spec.num_speculative_tokens if spec is not None else 0
        self.draft = (DraftModel(config, self.device, self.dtype)
                      if spec is not None and spec.method == "draft" else None)
        self.kv_bytes_per_block = kv_bytes_per_block(self.model, self.block_size, config.kv_cache_spec)
        if self.draft is not None:  # a block holds the draft's K/V too
            self.kv_bytes_per_block += self.draft.bytes_per_block(config.kv_cache_spec)
        self.num_kv_blocks = num_kv_blocks(config, self.model, self.device, tp, self.kv_bytes_per_block)
        # kv_scales: per layer (k_scale, v_scale) of an fp8 cache, else None.
        self.kv_caches, self.kv_scales = allocate_kv_cache(self.model, self.num_kv_blocks, self.block_size,
                                                           config.kv_cache_spec, self.device)
        if self.draft is not None:
            self.draft.allocate_cache(self.num_kv_blocks, config.kv_cache_spec)
        sched = config.scheduler_config
        # A verification graph's dummy rows may reach k positions past max_model_len.
        width = -(-(sched.max_model_len + self.num_speculative_tokens) // self.block_size)
        self.block_tables = BlockTables(sched.max_num_seqs, width, self.device)
        self._step_buffers = StepBuffers(4096, self.device)  # the eager path's; grows when needed
        self._step_views = FieldViews()  # ... and its fields' views, per step shape
        # The previous step's sampled tokens, on the device, and which row holds whose token.
        self.last_sampled = torch.zeros(0, dtype=torch.int64, device=self.device)
        self._last_sampled_row: dict[int, int] = {}
        self._draft_probs: torch.Tensor | None = None  # the draft model's q of this step's drafts
        self._draft_settings: SamplingBatch | None = None  # and the settings it sampled them with
        self._host_drafts: list[list[int]] | None = None  # see SampledTokens: set by _verify
        # (output, prepared step, its batch, hidden states, logits, graph query_len, timings) of
        # the step launched last, until `sample`
        self._unsampled = None
        if self.device.type == "cuda":  # compile every kernel variant now, not mid-serving
            for model, caches, scales in self._kv_models():
                k_scale, v_scale = scales[0] if scales else (None, None)
                warm_up(*caches[0], model.attention_layers()[0].num_heads, dtype=self.dtype,
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

        The PyTorch backends ("torch", "sdpa") read sequence lengths back to the host, which a
        graph cannot capture, so they always run eagerly."""
        if self.device.type != "cuda":
            return f"CUDA graphs need a CUDA device, this runner is on {self.device}"
        if self.config.model_config.enforce_eager:
            return "enforce_eager=True"
        backend = resolve_backend(self.backend, self.device)
        if backend in ("torch", "sdpa"):
            return f"attention backend {self.backend!r} resolves to {backend!r}, which graphs cannot capture"
        return None

    def _kv_models(self):
        """(model, its KV caches, its fp8 scales) of the target and of the draft model, if any."""
        yield self.model, self.kv_caches, self.kv_scales
        if self.draft is not None:
            yield self.draft.model, self.draft.kv_caches, self.draft.kv_scales

    def _capture_graphs(self) -> list[DecodeGraphs] | None:
        """Capture the graphs (CUDA only, unless enforce_eager), after the KV pool exists: the
        decode set, and with speculation the verification set (1 + k tokens per sequence, up to
        the batch size where speculation turns off) and the draft model's proposing forwards.
        Returns the sets, fewest tokens per sequence first."""
        if self.graphs_off_reason is not None:
            return None
        sched, spec = self.config.scheduler_config, self.config.speculative_config
        models = [self.model] + ([self.draft.model] if self.draft is not None else [])
        width = self.block_tables.width
        sets = [DecodeGraphs(models, graph_batch_sizes(sched.max_num_seqs), max_sampled=sched.max_num_seqs,
                             block_table_width=width, max_seq_len=sched.max_model_len, device=self.device,
                             backend=self.backend)]
        if spec is not None:
            k = self.num_speculative_tokens
            speculating = min(sched.max_num_seqs, spec.disable_by_batch_size or sched.max_num_seqs)
            sets.append(DecodeGraphs(models, graph_batch_sizes(speculating), max_sampled=sched.max_num_seqs,
                                     block_table_width=width, max_seq_len=sched.max_model_len + k,
                                     device=self.device, backend=self.backend, query_len=1 + k))
        pool = None
        for graphs in sets:
            pool = graphs.capture(pool)
        if self.draft is not None:
            self.draft.capture_graphs(graph_batch_sizes(speculating), width, sched.max_model_len + k, pool)
        return sets

    # ------------------------------------------------------------------------------------------
    # One step
    # ------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, output: SchedulerOutput) -> SampledTokens | None:
        """Launch the step; returns its sampled tokens (one per `output.sample_rows` entry),
        still on their way: `wait()` for them. Nothing here waits for the GPU.

        A step with `structured_rows` launches only the forward pass and the LM head, and returns
        None: its tokens come from `sample(bitmask)`, once the engine has filled the grammar
        bitmask (which needs the previous step's tokens) while the GPU computes them.
        """
        timings = StepTimings()
        start = time.perf_counter()
        self.sampler.release(output.finished_seq_ids)
        self.block_tables.release(output.finished_seq_ids)
        self.block_tables.release(output.preempted_seq_ids)
        if output.is_empty:  # nothing to compute (every sequence awaits a pending last token)
            return SampledTokens(torch.zeros(0, dtype=torch.int64, device=self.device), timings)
        self._copy_blocks(output.block_copies)
        prepared, batch = self._prepare(output, timings)
        if batch.draft_dst.numel():
            self._propose(output, batch)
        launch = time.perf_counter()
        hidden = self._forward(prepared, batch)
        # Logits at the sampled rows only (none when only partial prefill chunks ran).
        logits = self.model.compute_logits(_hidden_for_logits(hidden, batch)) if output.sample_rows else None
        launched = time.perf_counter()
        query_len = prepared.graphs.query_len if isinstance(prepared, GraphStep) else None
        timings.prepare, timings.forward = launch - start, launched - launch
        self._unsampled = (output, prepared, batch, hidden, logits, query_len, timings)
        if output.structured_rows:
            return None
        return self.sample()

    @torch.inference_mode()
    def sample(self, bitmask: torch.Tensor | None = None) -> SampledTokens:
        """Sample the step `execute` launched; returns its tokens, on their way to the host.

        bitmask: the grammar bitmask of a step with `structured_rows` ([rows, ceil(V / 32)] int32
        on the host, one row per sample row; -1 rows allow everything), sent with one copy.
        """
        output, prepared, batch, hidden, logits, query_len, timings = self._unsampled
        self._unsampled = None
        start = time.perf_counter()
        if bitmask is not None:
            # From pinned memory the copy is queued behind the forward; from pageable memory (a
            # tensor-parallel worker's, unpickled) it would wait for the forward to end.
            if self.device.type == "cuda" and not bitmask.is_pinned():
                bitmask = bitmask.pin_memory()
            bitmask = bitmask.to(self.device, non_blocking=True)
        tokens, logprobs, layout = self._sample(output, hidden, logits, batch, query_len, bitmask)
        drafts, self._host_drafts = self._host_drafts, None
        if self.draft is not None:  # after the tokens' copy is queued, which need not wait for it
            self.draft.mirror(prepared)
        timings.sample = time.perf_counter() - start
        return SampledTokens(tokens, timings, logprobs, layout, drafts)

    def _prepare(self, output: SchedulerOutput, timings: StepTimings) -> tuple[GraphStep | InputBatch, InputBatch]:
        """Pack the step into a graph set's static buffers when one fits, else eagerly; then
        finish it on the device: block tables gathered, pending tokens filled in."""
        seqs = output.seqs
        rows = self.block_tables.sync_all(seqs)
        prepared, batch, timings.graph_miss = load_step(
            seqs, output.num_logits_rows, rows, self.block_tables, self.block_size, self._last_sampled_row,
            self.graphs or [], self._step_buffers, self._step_views, self.backend)
        if isinstance(prepared, GraphStep):
            timings.graph_batch_size = prepared.batch_size
        self._fill_pending(batch)
        return prepared, batch

    def _fill_pending(self, batch: InputBatch) -> None:
        """The decodes whose token the previous step sampled take it on the device:
        input_ids[pending_dst] = last_sampled[pending_src]. Usually the batch kept its order and
        both are runs of rows: then it is one copy between two slices (int64 to int32 on the
        way) instead of a gather, a conversion and a scatter."""
        n = batch.pending_dst.numel()
        if not n:
            return
        if batch.pending_run is not None:
            dst, src = batch.pending_run
            _run(batch.input_ids, dst, n).copy_(_run(self.last_sampled, src, n))
        else:
            tokens = self.last_sampled.index_select(0, batch.pending_src).to(torch.int32)
            batch.input_ids.index_put_((batch.pending_dst,), tokens)

    def _forward(self, prepared: GraphStep | InputBatch, batch: InputBatch) -> torch.Tensor:
        """The forward pass: its CUDA graph replayed, or run eagerly. Eagerly, the attention plan
        comes first, once for every layer (on a CPU it turns the metadata into gather indices;
        the GPU kernels need none): attention work, so it counts as forward time, not prepare."""
        if isinstance(prepared, GraphStep):
            return prepared.graphs.replay(prepared)
        meta = batch.attn_metadata
        meta.plan = plan_attention(meta.block_tables, meta.seq_lens, meta.cu_seqlens_q,
                                   self.kv_caches[0][0], backend=self.backend)
        return self.model(batch.input_ids, batch.positions, meta)

    def _propose(self, output: SchedulerOutput, batch: InputBatch) -> None:
        """The draft model's drafts for the sequences that verify device drafts, written into
        their input rows; its q is kept for the rejection sampler."""
        seqs = [s for s in output.seqs if s.num_draft_tokens and not s.draft_token_ids]
        ids = {s.seq_id for s in seqs}
        rows = [row for row in output.sample_rows if row.seq_id in ids]
        dst = batch.draft_dst.view(len(seqs), self.num_speculative_tokens)
        first_tokens = batch.input_ids[dst[:, 0] - 1]  # each one's token before its drafts
        settings = None if all(row.params.is_greedy for row in rows) else self.sampler.batch(rows)
        drafts, self._draft_probs = self.draft.propose(seqs, first_tokens, self.block_tables, settings)
        self._draft_settings = settings  # the same rows verify: the rejection sampler reuses them
        batch.input_ids[batch.draft_dst] = drafts.view(-1).to(torch.int32)

    def _sample(self, output: SchedulerOutput, hidden: torch.Tensor, logits: torch.Tensor | None, batch: InputBatch,
                query_len: int | None, bitmask: torch.Tensor | None):
        """One token per sampled row (or, verifying drafts, the tokens each row gained),
        remembered for the next step; and the log-probabilities that were asked for: (tokens,
        logprobs payload or None, its layout)."""
        rows = output.sample_rows
        sampled_logprobs = None
        self._last_sampled_row = {}
        if not rows:  # only partial prefill chunks this step: nothing to sample yet
            self.last_sampled = tokens = torch.zeros(0, dtype=torch.int64, device=self.device)
        elif any(s.num_draft_tokens for s in output.seqs):
            # No token of a verification stays for the next step to take on the device: the
            # engine folds the step in before it plans the next one (how many drafts a sequence
            # accepted decides where its next step starts), whose tokens are then all known.
            tokens, sampled_logprobs = self._verify(output, logits, batch, bitmask, query_len)
        else:
            sampled = self.sampler.sample(logits, rows, bitmask)
            self.last_sampled, sampled_logprobs = sampled.tokens, sampled.logprobs
            tokens = self.last_sampled
            self._last_sampled_row = {row.seq_id: i for i, row in enumerate(rows)}
        if sampled_logprobs is None and not output.scores_prompts:  # most steps: nothing more to do
            return tokens, None, None
        layout = LogprobsLayout([], [])
        payloads = []
        if sampled_logprobs is not None:
            layout.sampled = [(i, row.params.logprobs) for i, row in enumerate(rows) if row.params.logprobs is not None]
            payloads.append(sampled_logprobs)
        payloads += self._prompt_logprobs(output, hidden, layout, query_len)
        if len(payloads) == 1:  # a decode step's: already as wide as its widest row
            return tokens, payloads[0], layout
        width = max([k for _, k in layout.sampled] + [k for *_, k in layout.prompt])
        return tokens, torch.cat([pad_payload(p, width) for p in payloads]), layout

    def _prompt_logprobs(self, output: SchedulerOutput, hidden: torch.Tensor, layout: LogprobsLayout,
                         query_len: int | None):
        """Payloads of the prompt positions that chunks asked to score (none in most steps).
        query_len: the rows each sequence has in `hidden` when a verification graph padded them
        (a short prompt chunk fits one), None when each has its new tokens' alone.

        Their logits are computed `max_num_seqs` rows at a time: never more at once than the
        sampled rows of a full step, which the start-up memory profile accounts for."""
        if not output.scores_prompts:
            return []
        rows, targets = [], []
        offset = 0
        for s in output.seqs:
            asked = s.prompt_logprobs
            if asked is not None:
                first = offset + asked.start - s.start
                rows += range(first, first + len(asked.target_ids))
                targets += asked.target_ids
                layout.prompt.append((s.seq_id, asked.target_ids, asked.num_logprobs))
            offset += query_len or s.num_new_tokens
        if not rows:
            return []
        num_top = max(k for *_, k in layout.prompt)
        rows_t = torch.tensor(rows, device=self.device)
        targets_t = torch.tensor(targets, device=self.device)
        size = self.config.scheduler_config.max_num_seqs
        return [logprobs_payload(self.model.compute_logits(hidden[rows_t[i:i + size]]), targets_t[i:i + size], num_top)
                for i in range(0, len(rows), size)]

    def _verify(self, output: SchedulerOutput, logits: torch.Tensor, batch: InputBatch,
                bitmask: torch.Tensor | None, query_len: int | None):
        """[S, 1 + k] tokens of a step in which some rows verify drafts: those through the
        rejection sampler, the others (forks, penalties, no drafts found) through the sampler;
        and the plain rows' logprobs payload (a row that verifies drafts never asks for one).
        query_len: each sequence's input rows when a verification graph padded them (None: its
        new tokens').

        The usual n-gram step is greedy, and its drafts are on the host: then the tokens are the
        argmax of every row of logits, one op as in a greedy decode step, and the host accepts
        the drafts when they arrive (`greedy_accept`; `_host_drafts` says whose are whose)."""
        k, rows = self.num_speculative_tokens, output.sample_rows
        if (bitmask is None and all(len(s.draft_token_ids) == s.num_draft_tokens for s in output.seqs)
                and all(plain_greedy(row) and row.params.logprobs is None for row in rows)):
            self._host_drafts = [s.draft_token_ids for s in output.seqs for _ in range(s.num_samples)]
            return logits.argmax(dim=-1), None
        v = verification(output.seqs, logits, batch.input_ids, k, query_len)
        settings = [rows[i] for i in v.verifying]
        if all(row.params.is_greedy and not row.params.logit_bias for row in settings):
            verified = greedy_verify(v.target_logits.argmax(dim=-1), v.draft_ids, v.num_drafts)
        else:
            drafted = self._draft_settings  # the draft model's sampling of these rows, or None
            verified = rejection_sample(v.target_logits, v.draft_ids.long(), v.num_drafts,
                                        drafted if drafted is not None else self.sampler.batch(settings),
                                        self._draft_probs)
        self._draft_probs = self._draft_settings = None
        if not v.plain:  # every row verified drafts
            return verified, None
        tokens = torch.full((len(rows), 1 + k), NO_TOKEN, dtype=torch.int64, device=self.device)
        tokens[v.where] = verified
        plain_mask = None if bitmask is None else bitmask[v.plain_where]  # a grammar's rows never speculate
        sampled = self.sampler.sample(logits[v.plain_rows], [rows[i] for i in v.plain], plain_mask)
        tokens[v.plain_where, 0] = sampled.tokens
        return tokens, sampled.logprobs

    def _copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write: duplicate whole KV blocks (every layer) before anyone writes to them.

        Done one pair at a time, in order, so a block freed and reused within the step is always
        read before it is overwritten. An fp8 cache's scales are copied with their values.
        """
        if not copies:
            return
        tensors = [t for _, caches, scales in self._kv_models() for pair in caches + (scales or []) for t in pair]
        for src, dst in copies:
            for t in tensors:
                t[dst].copy_(t[src])
