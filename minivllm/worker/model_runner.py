"""The ModelRunner: owns the model, the KV cache tensors and the sampler; runs one step.

It knows nothing about queues or policies. Given a `SchedulerOutput` it:

1. copies the KV blocks the block manager asked for (copy-on-write of shared blocks),
2. packs all scheduled sequences into one batch (`input_batch.py`),
3. runs ONE forward pass for all of them — prefill chunks and decodes together,
4. computes logits only at the rows that sample, and samples one token per sampled sequence.

At start-up it also decides how many KV blocks there are: on CPU from a configured byte budget,
on CUDA from what is left of `gpu_memory_utilization` x the GPU's memory after the weights and a
profiled forward pass at the largest batch the scheduler can send.

On CUDA a step is kept lean, because at decode the GPU is fast enough to wait on the host:

* the step's metadata goes to the GPU in ONE asynchronous copy from a pinned buffer
  (`input_batch.StepBuffers`), not one copy per tensor;
* decode-only steps replay a CUDA graph captured per batch-size bucket (`cuda_graph.py`), so
  ~400 kernel launches become one; `enforce_eager=True` turns this off;
* nothing inside the forward reads a GPU value back: the kernels get `max_seq_len` as a Python
  int. The one sync of a step is reading the sampled tokens at its very end;
* an all-greedy batch without penalties or bans is sampled with one argmax, skipping the
  sampler's per-row tensors.

Whether a step really replayed a graph, and where its host time went, is written into the step's
record (`output.record.timings`, a `StepTimings`): `benchmarks/roofline.py` reads it.
"""

from __future__ import annotations

import itertools
import time
import warnings

import torch

from minivllm.config import EngineConfig
from minivllm.engine.scheduler import SchedulerOutput, StepTimings
from minivllm.engine.sequence import Sequence
from minivllm.kernels import resolve_backend
from minivllm.layers.attention import AttentionMetadata
from minivllm.layers.sampler import Sampler, SamplingBatch
from minivllm.sampling_params import SamplingParams
from minivllm.worker.cuda_graph import DecodeGraphs, GraphStep, graph_batch_sizes
from minivllm.worker.input_batch import (
    InputBatch,
    StepBuffers,
    exact_layout,
    pack_step,
    step_seqs,
)


class ModelRunner:
    def __init__(self, config: EngineConfig):
        from minivllm.models import load_model

        self.config = config
        model_config = config.model_config
        self.device = model_config.torch_device
        self.dtype = model_config.torch_dtype
        self.block_size = config.cache_config.block_size
        self.backend = model_config.attention_backend
        torch.manual_seed(model_config.seed)  # for requests that bring no seed of their own
        self.model = load_model(model_config.model, dtype=self.dtype, device=self.device)
        self.hf_config = self.model.config
        self.vocab_size = self.hf_config.vocab_size
        self.sampler = Sampler()
        self.num_kv_blocks = self._decide_num_kv_blocks()
        self.kv_caches = self._allocate_kv_cache(self.num_kv_blocks)
        if self.num_kv_blocks * self.block_size >= 2**31:
            raise ValueError(f"{self.num_kv_blocks} KV blocks of {self.block_size} tokens exceed 2^31 "
                             "slots; slots are int32 in the step buffer: use fewer or larger blocks")
        self._generators: dict[int, torch.Generator] = {}  # seq_id -> its seeded RNG
        # The eager path's step buffer; it grows if a step ever needs more room.
        self._step_buffers = StepBuffers(4096, self.device)
        self.graphs = self._capture_graphs()

    # ------------------------------------------------------------------------------------------
    # KV cache sizing and allocation
    # ------------------------------------------------------------------------------------------
    @property
    def kv_bytes_per_block(self) -> int:
        """K and V, every layer: 2 x layers x block_size x kv_heads x head_dim x element size."""
        m = self.model
        element = torch.empty((), dtype=self.dtype).element_size()
        return 2 * m.num_layers * self.block_size * m.num_kv_heads * m.head_dim * element

    def _decide_num_kv_blocks(self) -> int:
        num_blocks = self._num_kv_blocks_from_config()
        max_len = self.config.scheduler_config.max_model_len
        if num_blocks * self.block_size < max_len:
            warnings.warn(
                f"the KV pool ({num_blocks} blocks x {self.block_size} tokens) cannot hold one "
                f"sequence of max_model_len={max_len} tokens; requests that could grow longer than "
                "the pool will be refused",
                stacklevel=3,
            )
        return num_blocks

    def _num_kv_blocks_from_config(self) -> int:
        """An explicit num_kv_blocks, else the memory budget divided by the size of a block."""
        cache = self.config.cache_config
        if cache.num_kv_blocks is not None:
            return cache.num_kv_blocks
        if self.device.type == "cuda":
            budget = self._gpu_kv_budget_bytes()
            source = f"gpu_memory_utilization={cache.gpu_memory_utilization}"
        else:
            budget = cache.kv_cache_memory_bytes
            source = f"kv_cache_memory_bytes={cache.kv_cache_memory_bytes}"
        num_blocks = budget // self.kv_bytes_per_block
        if num_blocks < 1:
            raise ValueError(
                f"{source} leaves room for no KV block ({self.kv_bytes_per_block} bytes each); "
                "give the KV cache more memory"
            )
        return num_blocks

    @torch.inference_mode()
    def _gpu_kv_budget_bytes(self) -> int:
        """Bytes left for the KV cache under gpu_memory_utilization, after a profiling pass.

        Everything the engine needs besides the cache is measured, not guessed: the weights are
        already loaded, then a forward pass with the largest token batch the scheduler may send
        records the peak of activation memory. Memory used outside PyTorch's allocator (CUDA
        context, other processes) is counted too.
        """
        sched = self.config.scheduler_config
        num_tokens = sched.max_num_batched_tokens
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        scratch_bytes = self._profile_forward(num_tokens, min(sched.max_num_seqs, num_tokens))
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - scratch_bytes
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        outside_torch = (total - free) - torch.cuda.memory_reserved(self.device)
        return int(total * self.config.cache_config.gpu_memory_utilization) - peak - max(outside_torch, 0)

    def _profile_forward(self, num_tokens: int, num_logit_rows: int) -> int:
        """One dummy forward of `num_tokens` tokens; returns the bytes of its scratch KV cache."""
        max_len = self.config.scheduler_config.max_model_len
        lengths = [min(max_len, num_tokens - start) for start in range(0, num_tokens, max_len)]
        blocks_per_seq = [-(-n // self.block_size) for n in lengths]
        num_blocks = sum(blocks_per_seq)
        m = self.model
        shape = (num_blocks, self.block_size, m.num_kv_heads, m.head_dim)
        scratch = [(torch.zeros(shape, dtype=self.dtype, device=self.device),
                    torch.zeros(shape, dtype=self.dtype, device=self.device)) for _ in range(m.num_layers)]
        for layer, (k, v) in zip(m.attention_layers(), scratch):
            layer.bind_kv_cache(k, v)
        tables, first = [], 0
        for n in blocks_per_seq:
            tables.append(list(range(first, first + n)) + [0] * (max(blocks_per_seq) - n))
            first += n
        positions = torch.cat([torch.arange(n) for n in lengths]).to(self.device)
        meta = AttentionMetadata(
            slot_mapping=torch.full((num_tokens,), -1, dtype=torch.int64, device=self.device),
            block_tables=torch.tensor(tables, dtype=torch.int32, device=self.device),
            seq_lens=torch.tensor(lengths, dtype=torch.int32, device=self.device),
            cu_seqlens_q=torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=self.device),
            max_seq_len=max(lengths),
            backend=self.backend,
        )
        input_ids = torch.zeros(num_tokens, dtype=torch.int64, device=self.device)
        hidden = m(input_ids, positions, meta)
        # The sampler's sorts and softmaxes over [rows, vocab] count too, with every option on.
        logits = m.compute_logits(hidden[:num_logit_rows])
        params = SamplingParams(temperature=1.0, top_k=50, top_p=0.9, min_p=0.05, repetition_penalty=1.1)
        rows = [[0]] * num_logit_rows
        self.sampler(logits, SamplingBatch.build([params] * num_logit_rows, rows, rows, rows,
                                                 [None] * num_logit_rows, self.vocab_size, self.device))
        scratch_bytes = sum(k.numel() * k.element_size() * 2 for k, _ in scratch)
        for layer in m.attention_layers():  # unbind, so the scratch cache can be freed
            layer.k_cache = layer.v_cache = None
        return scratch_bytes

    def _allocate_kv_cache(self, num_blocks: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One K and one V tensor per layer, [num_blocks, block_size, kv_heads, head_dim]."""
        m = self.model
        shape = (num_blocks, self.block_size, m.num_kv_heads, m.head_dim)
        caches = []
        for layer in m.attention_layers():
            k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
            v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
            layer.bind_kv_cache(k_cache, v_cache)
            caches.append((k_cache, v_cache))
        return caches

    # ------------------------------------------------------------------------------------------
    # CUDA graphs
    # ------------------------------------------------------------------------------------------
    @property
    def uses_cuda_graphs(self) -> bool:
        return self.graphs is not None

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
        graphs = DecodeGraphs(
            self.model,
            graph_batch_sizes(sched.max_num_seqs),
            max_sampled=sched.max_num_seqs,
            block_table_width=-(-sched.max_model_len // self.block_size),
            max_seq_len=sched.max_model_len,
            device=self.device,
            backend=self.backend,
        )
        graphs.capture()
        return graphs

    # ------------------------------------------------------------------------------------------
    # One step
    # ------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, output: SchedulerOutput) -> list[int]:
        """Run the step; returns one token per `output.sampled_sequences` row, in that order.

        Fills `output.record.timings` (prepare, forward, sample; graph or eager) as it goes: plain
        host clock reads, no GPU synchronisation added.
        """
        if output.is_empty:
            return []
        timings = output.record.timings
        start = time.perf_counter()
        self._copy_blocks(output.block_copies)
        seqs, sampled = step_seqs(output)
        prepared = self._prepare(seqs, sampled, timings)
        launch = time.perf_counter()
        hidden, logits_indices = self._forward(prepared)
        launched = time.perf_counter()
        tokens = self._sample(output, hidden, logits_indices)
        timings.prepare = launch - start
        timings.forward = launched - launch
        timings.sample = time.perf_counter() - launched
        return tokens

    def _prepare(self, seqs, sampled, timings: StepTimings) -> GraphStep | InputBatch:
        """Load the step into the graphs' static buffer when a graph fits, else pack it eagerly.

        Notes in `timings` which one it was, and why a runner with graphs could not use them."""
        if self.graphs is not None:
            timings.graph_miss = self.graphs.why_not(seqs, len(sampled))
            if timings.graph_miss is None:
                step = self.graphs.load(seqs, sampled, self.block_size)
                timings.graph_batch_size = step.batch_size
                return step
        return self.prepare_eager(seqs, sampled)

    def _forward(self, prepared: GraphStep | InputBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states of the step and the rows to sample: one graph replay, or the eager model."""
        if isinstance(prepared, GraphStep):
            return self.graphs.replay(prepared)
        hidden = self.model(prepared.input_ids, prepared.positions, prepared.attn_metadata)
        return hidden, prepared.logits_indices

    def _sample(self, output: SchedulerOutput, hidden: torch.Tensor, logits_indices: torch.Tensor) -> list[int]:
        """Logits at the sampled rows only, one token each, read back to the host."""
        rows = output.sampled_sequences
        if not rows:  # only partial prefill chunks this step: nothing to sample yet
            return []
        logits = self.model.compute_logits(hidden[logits_indices])
        seqs_sampled = [seq for seq, _ in rows]
        if self._all_plain_greedy(seqs_sampled):
            tokens = logits.argmax(dim=-1)
        else:
            tokens = self.sampler(logits, self._sampling_batch(seqs_sampled))
        return tokens.tolist()  # the step's one device->host sync

    def prepare_eager(self, seqs, sampled) -> InputBatch:
        """Pack the step compactly into the eager buffer, copy it once, return views of it."""
        layout = exact_layout(seqs, len(sampled))
        buf = self._step_buffers.host(layout.size)
        packed = pack_step(buf, layout, seqs, sampled, self.block_size)
        self._step_buffers.upload(packed.copy_size)
        return InputBatch.view(self._step_buffers.device_tensor, layout, packed, self.backend)

    def _all_plain_greedy(self, seqs: list[Sequence]) -> bool:
        """Greedy, no penalties, nothing banned: the sampler would reduce to an argmax."""
        return all(s.sampling_params.is_greedy and not s.sampling_params.has_penalties
                   and not self._banned_tokens(s) for s in seqs)

    def _copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write: duplicate whole KV blocks (every layer) before anyone writes to them.

        Done one pair at a time, in order, so a block freed and reused within the step is always
        read before it is overwritten.
        """
        for src, dst in copies:
            for k_cache, v_cache in self.kv_caches:
                k_cache[dst].copy_(k_cache[src])
                v_cache[dst].copy_(v_cache[src])

    def _sampling_batch(self, seqs: list[Sequence]) -> SamplingBatch:
        params = [seq.sampling_params for seq in seqs]
        return SamplingBatch.build(
            params,
            prompt_token_ids=[s.prompt_token_ids if p.has_penalties else [] for s, p in zip(seqs, params)],
            output_token_ids=[s.output_token_ids if p.has_penalties else [] for s, p in zip(seqs, params)],
            banned_token_ids=[self._banned_tokens(s) for s in seqs],
            generators=[self._generator(s) for s in seqs],
            vocab_size=self.vocab_size,
            device=self.device,
        )

    @staticmethod
    def _banned_tokens(seq: Sequence) -> list[int]:
        """Until min_tokens are out, the tokens that would stop the sequence are not allowed."""
        params = seq.sampling_params
        if seq.num_output_tokens >= params.min_tokens:
            return []
        banned = set(params.stop_token_ids)
        if not params.ignore_eos:
            banned |= seq.eos_token_ids
        return sorted(banned)

    def _generator(self, seq: Sequence) -> torch.Generator | None:
        """The seeded RNG of a sequence; sample i of a request uses seed + i, so samples differ."""
        seed = seq.sampling_params.seed
        if seed is None:
            return None
        if seq.seq_id not in self._generators:
            self._generators[seq.seq_id] = torch.Generator(device=self.device).manual_seed(seed + seq.index)
        return self._generators[seq.seq_id]

    def release(self, seqs: list[Sequence]) -> None:
        """Forget per-sequence state (the seeded RNGs) of finished sequences."""
        for seq in seqs:
            self._generators.pop(seq.seq_id, None)
