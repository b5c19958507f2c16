"""The draft model: a small model that guesses k tokens for the big one to verify.

It shares the target's vocabulary and runs in the same process, on the same device, inside the
target's step (model_runner.py):

1. **propose**: k one-token forwards for the sequences that speculate, each starting from the
   token the target computes first (a CUDA-graph replay per forward when graphs are on); the
   drafts go straight into the target's input rows on the device (`draft_dst`);
2. the target verifies them in one forward;
3. **mirror**: the draft runs the target's very batch (same tokens, positions, slots), with no
   LM head. So whatever the target computes, prompt chunks included, the draft computes too.

Its KV cache has as many blocks as the target's and is indexed by the *same* block tables: a
token's K/V sits at the same slot in both caches, so allocation, prefix caching, copy-on-write
and freeing are the block manager's as ever, once for both (the pool is sized by the bytes of
both caches per block). The proposing forwards write the draft K/V of positions start ..
start + k - 1, inside the blocks the scheduler allocated for the verification; the mirror then
writes positions start .. start + k over them with the same tokens. Rejected positions hold
junk in both caches until a later step writes them: nothing reads past a sequence's length.

For a sampled (not greedy) request the draft samples from its own distribution q, processed
with the request's settings, and keeps q for the rejection sampler.
"""

from __future__ import annotations

import torch

from minivllm.config import EngineConfig
from minivllm.kernels import KVCacheSpec, plan_attention
from minivllm.layers import onednn
from minivllm.layers.rejection_sampler import sampling_probs
from minivllm.layers.sampler import SamplingBatch, exponential_noise
from minivllm.step import ScheduledSeq
from minivllm.worker.block_table import BlockTables
from minivllm.worker.cuda_graph import DecodeGraphs, GraphStep, load_step
from minivllm.worker.input_batch import FieldViews
from minivllm.worker.kv_cache import allocate_kv_cache, kv_bytes_per_block
from minivllm.worker.step_buffers import StepBuffers


class DraftModel:
    def __init__(self, config: EngineConfig, device: torch.device, dtype: torch.dtype):
        from minivllm.models import load_model

        spec = config.speculative_config
        self.model = load_model(spec.model, dtype=dtype, device=device)
        if device.type == "cpu":
            onednn.pack_weights(self.model)  # as the target's (model_runner.py)
        self.num_speculative_tokens = spec.num_speculative_tokens
        self.device = device
        self.block_size = config.cache_config.block_size
        self.backend = config.model_config.attention_backend
        self.kv_caches: list = []
        self.kv_scales = None
        self.graphs: DecodeGraphs | None = None  # the proposing forwards' (one token each)
        self._buffers = StepBuffers(1024, device)  # the eager proposing forwards'
        self._views = FieldViews()

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    def bytes_per_block(self, spec: KVCacheSpec) -> int:
        return kv_bytes_per_block(self.model, self.block_size, spec)

    def allocate_cache(self, num_blocks: int, spec: KVCacheSpec) -> None:
        """Its own KV cache, as many blocks as the target's (the same block ids), in the target's
        cache format."""
        self.kv_caches, self.kv_scales = allocate_kv_cache(self.model, num_blocks, self.block_size,
                                                           spec, self.device)

    def capture_graphs(self, batch_sizes: list[int], block_table_width: int, max_seq_len: int, pool=None):
        """Graphs of the proposing forwards (one token per sequence); returns the memory pool."""
        self.graphs = DecodeGraphs([self.model], batch_sizes, max(batch_sizes), block_table_width,
                                   max_seq_len, self.device, self.backend)
        return self.graphs.capture(pool)

    @torch.inference_mode()
    def propose(self, seqs: list[ScheduledSeq], first_tokens: torch.Tensor, tables: BlockTables,
                batch: SamplingBatch | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """k drafts for each of `seqs` (each verifies k device drafts; batch order), starting
        from `first_tokens` [n] (their first new token, at position `start`), on the device.
        batch: their sampling settings, None when every one is greedy.

        Returns (drafts [n, k] int64, q [n, k, V] float32, or None when every row is greedy:
        then each draft is the draft model's argmax, a point mass).
        """
        n, k = len(seqs), self.num_speculative_tokens
        rows = tables.sync_all(seqs)
        graph_sets = [self.graphs] if self.graphs is not None else []
        drafts = torch.empty(n, k, dtype=torch.int64, device=self.device)
        probs = None if batch is None else torch.empty(n, k, self.vocab_size, device=self.device)
        tokens = first_tokens
        for i in range(k):
            # Forward i computes the token at position start + i and guesses the one after it.
            step = [ScheduledSeq(s.seq_id, s.start + i, [0], False, s.block_table, 1) for s in seqs]
            prepared, inputs, _ = load_step(step, n, rows, tables, self.block_size, {}, graph_sets,
                                            self._buffers, self._views, self.backend)
            inputs.input_ids[:n] = tokens
            if isinstance(prepared, GraphStep):
                hidden = prepared.graphs.replay(prepared)
            else:  # the attention plan once for every layer, as the target's step makes it
                meta = inputs.attn_metadata
                meta.plan = plan_attention(meta.block_tables, meta.seq_lens, meta.cu_seqlens_q,
                                           self.kv_caches[0][0], backend=self.backend)
                hidden = self.model(inputs.input_ids, inputs.positions, meta)
            logits = self.model.compute_logits(hidden[:n])
            if probs is None:
                tokens = logits.argmax(dim=-1)
            else:
                probs[:, i] = sampling_probs(logits[:, None], batch)[:, 0]
                noise = exponential_noise(probs[:, i].shape, batch.generators, self.device)
                tokens = (probs[:, i] / noise).argmax(dim=-1)
            drafts[:, i] = tokens
        return drafts, probs

    def mirror(self, prepared) -> None:
        """Run the target's batch through the draft (its K/V only: no LM head)."""
        if isinstance(prepared, GraphStep):
            prepared.graphs.replay(prepared, model=1)
        else:
            self.model(prepared.input_ids, prepared.positions, prepared.attn_metadata)
