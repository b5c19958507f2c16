"""The Scheduler: which sequences compute how many tokens in the next step.

This is *continuous batching*: every step the batch is rebuilt from whatever is in flight, so a
finished sequence's place is taken at once by a waiting one instead of idling until the whole
batch is done. Each step has two budgets:

* tokens: `max_num_batched_tokens`, the prefill and decode tokens of one forward pass together;
* sequences: `max_num_seqs` in flight at once.

One step, in order:

1. **Running sequences first**, oldest first: a decoding one computes its 1 pending token, one in
   the middle of a chunked prefill computes its next chunk. If the KV pool has no block for it,
   the *most recently admitted* running sequence is preempted: its blocks are freed and it goes
   back to the front of the waiting queue, to be recomputed (prompt + outputs) later. Preempting
   the newest loses the least work and lets the oldest requests finish first.
2. **Then waiting sequences**, first come first served, while both budgets and the pool allow.
   A prompt longer than what is left of the token budget is split into chunks when chunked
   prefill is on (otherwise it waits for a step with room for all of it). With prefix caching,
   blocks already holding the prompt's prefix are reused and those tokens are skipped.

Pure Python, no tensors: it can be tested and drawn without a model. The model runner turns a
`SchedulerOutput` into tensors; `update()` then folds the sampled tokens back in.
"""

from __future__ import annotations

import functools

import time
from collections import deque
from dataclasses import asdict, dataclass, field

from minivllm.config import SchedulerConfig
from minivllm.engine.block_manager import BlockManager
from minivllm.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledSequence:
    """One sequence's share of a step.

    num_new_tokens: tokens whose K/V this step computes (from seq.num_computed_tokens on).
    sample: whether a token is sampled from the output at its last new token; true exactly when
        the step computes all the sequence's known tokens.
    forks: parallel-sampling children created this step; they share this sequence's blocks and
        each samples its own first token from the same logits.
    is_prefill: computes prompt tokens (or recomputes after a preemption) rather than one decode.
    """

    seq: Sequence
    num_new_tokens: int
    sample: bool
    is_prefill: bool
    forks: list[Sequence] = field(default_factory=list)


@dataclass
class PreemptionRecord:
    seq_id: int
    request_id: str
    num_computed_tokens_lost: int
    reason: str


# The host-side phases of one engine step, in order (see StepTimings).
STEP_PHASES = ("schedule", "prepare", "forward", "sample", "update")


@dataclass
class StepTimings:
    """Where one step's host time went, in seconds of `time.perf_counter()`; filled as it runs.

    On a GPU the host only *launches* work, so read these as host time, not GPU time:

    * schedule: `Scheduler.schedule()` (engine);
    * prepare: copy-on-write block copies, packing the step metadata, its one upload (runner);
    * forward: launching the forward pass or replaying its CUDA graph; asynchronous on a GPU, so
      this is launch cost only: ~400 kernel launches eagerly, one call for a graph (runner);
    * sample: LM head, argmax or sampler, and the `.tolist()` that waits for the GPU: on a GPU
      this phase absorbs the time the GPU still needed to finish the step (runner);
    * update: `Scheduler.update()`, stop strings, outputs of finished requests (engine).

    `step` is the whole `LLMEngine.step()`, so `step - sum(phases)` is the engine's own
    bookkeeping. `graph_batch_size` is the bucket whose CUDA graph ran the forward (None: eager);
    `graph_miss` says why a runner that has graphs ran this step eagerly (None otherwise).
    """

    schedule: float = 0.0
    prepare: float = 0.0
    forward: float = 0.0
    sample: float = 0.0
    update: float = 0.0
    step: float = 0.0
    graph_batch_size: int | None = None
    graph_miss: str | None = None

    @property
    def cuda_graph(self) -> bool:
        """Did the forward replay a CUDA graph (of bucket `graph_batch_size`)?"""
        return self.graph_batch_size is not None

    def phases(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in STEP_PHASES}


@dataclass
class StepRecord:
    """What one step did, for stats, traces and plots (observe/)."""

    step: int
    time: float
    num_scheduled_seqs: int
    num_prefill_seqs: int
    num_decode_seqs: int
    num_prefill_tokens: int
    num_decode_tokens: int
    token_budget: int
    num_running: int
    num_waiting: int
    num_used_blocks: int
    num_free_blocks: int
    num_cached_free_blocks: int
    num_block_copies: int
    num_prefix_hit_tokens: int  # tokens taken from the prefix cache by admissions of this step
    preemptions: list[PreemptionRecord] = field(default_factory=list)
    execute_time: float = 0.0  # seconds in the model runner (filled in by the engine)
    timings: StepTimings = field(default_factory=StepTimings)  # filled by the engine and runner

    @property
    def num_batched_tokens(self) -> int:
        return self.num_prefill_tokens + self.num_decode_tokens

    def to_dict(self) -> dict:
        return {**asdict(self), "num_batched_tokens": self.num_batched_tokens}


@dataclass
class SchedulerOutput:
    """The plan of one step."""

    scheduled: list[ScheduledSequence]
    preempted: list[Sequence]
    block_copies: list[tuple[int, int]]  # (src, dst) KV blocks to copy before the forward
    record: StepRecord

    @property
    def is_empty(self) -> bool:
        return not self.scheduled

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @functools.cached_property
    def sampled_sequences(self) -> list[tuple[Sequence, ScheduledSequence]]:
        """Sequences that get a new token this step, each with the entry whose logits it uses.

        This order is the order of the sampled tokens handed to `Scheduler.update`. Computed once
        (the engine, the runner and `update` all ask): the forks are final when `schedule` returns.
        """
        rows = []
        for entry in self.scheduled:
            if entry.sample:
                rows.append((entry.seq, entry))
                rows.extend((child, entry) for child in entry.forks)
        return rows


class Scheduler:
    """Continuous batching with chunked prefill, prefix caching and preemption by recompute."""

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        if not config.is_resolved:
            raise ValueError(
                "the SchedulerConfig needs max_model_len (EngineConfig fills it in from the model)"
            )
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the last is the newest
        self._live: dict[str, list[Sequence]] = {}  # request id -> its unfinished sequences
        self.history: deque[StepRecord] = deque(maxlen=config.history_size)
        self.num_steps = 0
        self.totals = {
            "prefill_tokens": 0, "decode_tokens": 0, "scheduled_seqs": 0, "preemptions": 0,
            "partial_prefills": 0, "block_copies": 0, "budget_tokens": 0,
        }

    # ------------------------------------------------------------------------------------------
    # Requests in and out
    # ------------------------------------------------------------------------------------------
    def check_request(self, num_prompt_tokens: int, params) -> None:
        """Raise ValueError for a request this scheduler could never finish.

        A request fits if its prompt leaves room for an output within max_model_len, its n
        samples fit max_num_seqs, and its longest possible sequence fits the KV pool on its own
        (then preempting everything newer always lets it make progress).
        """
        max_len = self.config.max_model_len
        if num_prompt_tokens < 1:
            raise ValueError("the prompt must not be empty")
        if num_prompt_tokens >= max_len:
            raise ValueError(
                f"the prompt has {num_prompt_tokens} tokens but max_model_len is {max_len}: it "
                "must be shorter, to leave room for at least one generated token"
            )
        if params.n > self.config.max_num_seqs:
            raise ValueError(f"n ({params.n}) is larger than max_num_seqs ({self.config.max_num_seqs})")
        longest = max_len if params.max_tokens is None else min(max_len, num_prompt_tokens + params.max_tokens)
        # The last token is only sampled, never fed back, so its K/V is never stored.
        blocks = self.block_manager.blocks_for(longest - 1)
        if blocks > self.block_manager.num_blocks:
            raise ValueError(
                f"the request can grow to {longest} tokens (prompt {num_prompt_tokens} + max_tokens "
                f"{params.max_tokens}), which needs {blocks} KV blocks, but the pool only has "
                f"{self.block_manager.num_blocks} blocks of {self.block_manager.block_size} tokens; "
                "lower max_tokens or give the KV cache more memory"
            )

    def add_sequence(self, seq: Sequence) -> None:
        """Queue a new request's sequence (checked by `check_request` first)."""
        if seq.status is not SequenceStatus.WAITING or seq.num_computed_tokens:
            raise ValueError(f"only a fresh WAITING sequence can be added, got {seq!r}")
        self.check_request(seq.num_prompt_tokens, seq.sampling_params)
        self.waiting.append(seq)
        self._live.setdefault(seq.request_id, []).append(seq)

    def abort(self, request_id: str) -> list[Sequence]:
        """Abort every unfinished sequence of `request_id`; returns them (empty if none)."""
        seqs = list(self._live.get(request_id, ()))
        for seq in seqs:
            self.finish_sequence(seq, SequenceStatus.FINISHED_ABORTED)
        return seqs

    def finish_sequence(self, seq: Sequence, status: SequenceStatus, stop_reason=None) -> None:
        """End `seq` (stop condition or abort) and give its blocks back."""
        if seq.is_finished:
            return
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.stop_reason = stop_reason
        seq.num_pending_forks = 0
        seq.finish(status)
        live = self._live[seq.request_id]
        live.remove(seq)
        if not live:
            del self._live[seq.request_id]

    def has_unfinished_sequences(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_unfinished_requests(self) -> int:
        return len(self._live)

    @property
    def running_width(self) -> int:
        """Sequences in flight, counting the not-yet-forked samples of running parents."""
        return sum(seq.width for seq in self.running)

    # ------------------------------------------------------------------------------------------
    # One step
    # ------------------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        """Decide this step's batch (and allocate its KV blocks)."""
        self.num_steps += 1
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledSequence] = []
        copies: list[tuple[int, int]] = []
        preemptions: list[PreemptionRecord] = []
        preempted: list[Sequence] = []

        # 1. Running sequences, oldest first. Iterating by index because preemption removes
        #    sequences from the *end* of the list, which this loop has not reached yet.
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = self._num_new_tokens(seq, seq.num_uncomputed_tokens, budget)
            seq_copies = self._allocate_or_preempt(seq, num_new, preempted, preemptions)
            if seq_copies is None:  # seq had to preempt itself: it was the newest
                break
            copies += seq_copies
            scheduled.append(self._entry(seq, num_new))
            budget -= num_new
            i += 1

        # 2. Waiting sequences, first come first served. Not after a preemption: memory is
        #    short right now, and admitting more would only cause more preemptions.
        hit_tokens = 0
        if not preempted:
            while self.waiting and budget > 0:
                admitted = self._try_admit(self.waiting[0], budget)
                if admitted is None:
                    break
                entry, seq_copies, num_cached = admitted
                self.waiting.popleft()
                scheduled.append(entry)
                copies += seq_copies
                budget -= entry.num_new_tokens
                hit_tokens += num_cached

        # 3. Parallel sampling: a parent about to sample its first token forks its siblings now,
        #    so that all n samples draw their first token from the same prompt logits.
        for entry in scheduled:
            if entry.sample and entry.seq.num_pending_forks:
                entry.forks = self._fork(entry.seq)

        record = self._record(scheduled, copies, preemptions, hit_tokens)
        return SchedulerOutput(scheduled=scheduled, preempted=preempted, block_copies=copies, record=record)

    def _num_new_tokens(self, seq: Sequence, uncomputed: int, budget: int) -> int:
        """How many of seq's uncomputed tokens fit this step (chunking if it is allowed)."""
        num_new = min(uncomputed, budget)
        if self.config.prefill_chunk_size is not None:
            num_new = min(num_new, self.config.prefill_chunk_size)
        return num_new

    def _entry(self, seq: Sequence, num_new: int) -> ScheduledSequence:
        is_decode = num_new == 1 and seq.num_uncomputed_tokens == 1 and seq.num_output_tokens > 0
        return ScheduledSequence(
            seq=seq,
            num_new_tokens=num_new,
            sample=seq.num_computed_tokens + num_new == seq.num_tokens,
            is_prefill=not is_decode,
        )

    def _allocate_or_preempt(
        self, seq: Sequence, num_new: int, preempted: list[Sequence], records: list[PreemptionRecord]
    ) -> list[tuple[int, int]] | None:
        """Allocate seq's blocks, preempting the newest running sequences until they fit.

        Returns the block copies, or None if `seq` itself was the newest and got preempted.
        """
        while True:
            copies = self.block_manager.allocate(seq, num_new)
            if copies is not None:
                return copies
            victim = self.running[-1]
            reason = (
                f"no free KV block for sequence {seq.seq_id} "
                f"({self.block_manager.num_blocks_to_allocate(seq, num_new)} needed, "
                f"{self.block_manager.num_free_blocks} free)"
            )
            records.append(PreemptionRecord(victim.seq_id, victim.request_id, victim.num_computed_tokens, reason))
            self._preempt(victim)
            preempted.append(victim)
            if victim is seq:
                return None

    def _preempt(self, seq: Sequence) -> None:
        """Free seq's blocks and put it at the front of the queue, to be recomputed later.

        (vLLM can also *swap* the blocks to CPU memory instead; recomputing is simpler, and with
        prefix caching the freed full blocks often are still there when the sequence returns.)
        """
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.reset_for_recompute()
        self.waiting.appendleft(seq)

    def _try_admit(self, seq: Sequence, budget: int):
        """Admit the head of the queue if budgets and the pool allow: (entry, copies, hits) or None."""
        if self.running_width + seq.width > self.config.max_num_seqs:
            return None
        cached_blocks = self.block_manager.find_cached_prefix(seq)
        num_cached = len(cached_blocks) * self.block_manager.block_size
        uncomputed = seq.num_tokens - num_cached
        if self.config.enable_chunked_prefill:
            num_new = self._num_new_tokens(seq, uncomputed, budget)
        elif uncomputed > budget:
            return None  # the whole prompt must go in one step; wait for a step with room
        else:
            num_new = uncomputed
        copies = self.block_manager.allocate(seq, num_new, cached_blocks)
        if copies is None:
            return None
        seq.status = SequenceStatus.RUNNING
        seq.num_computed_tokens = num_cached
        if seq.first_scheduled_time is None:
            seq.first_scheduled_time = time.perf_counter()
            seq.num_cached_tokens = num_cached
        self.running.append(seq)
        return self._entry(seq, num_new), copies, num_cached

    def _fork(self, parent: Sequence) -> list[Sequence]:
        """Create the other n - 1 samples of parent's request, sharing its blocks."""
        children = []
        for index in range(1, parent.num_pending_forks + 1):
            child = parent.fork(index)
            self.block_manager.fork(parent, child)
            children.append(child)
        parent.num_pending_forks = 0
        self.running.extend(children)
        self._live[parent.request_id].extend(children)
        return children

    def _record(self, scheduled, copies, preemptions, hit_tokens) -> StepRecord:
        prefill = [s for s in scheduled if s.is_prefill]
        decode = [s for s in scheduled if not s.is_prefill]
        bm = self.block_manager
        record = StepRecord(
            step=self.num_steps,
            time=time.perf_counter(),
            num_scheduled_seqs=len(scheduled),
            num_prefill_seqs=len(prefill),
            num_decode_seqs=len(decode),
            num_prefill_tokens=sum(s.num_new_tokens for s in prefill),
            num_decode_tokens=sum(s.num_new_tokens for s in decode),
            token_budget=self.config.max_num_batched_tokens,
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            num_used_blocks=bm.num_used_blocks,
            num_free_blocks=bm.num_free_blocks,
            num_cached_free_blocks=bm.num_cached_free_blocks,
            num_block_copies=len(copies),
            num_prefix_hit_tokens=hit_tokens,
            preemptions=preemptions,
        )
        self.history.append(record)
        t = self.totals
        t["prefill_tokens"] += record.num_prefill_tokens
        t["decode_tokens"] += record.num_decode_tokens
        t["scheduled_seqs"] += record.num_scheduled_seqs
        t["preemptions"] += len(preemptions)
        t["partial_prefills"] += sum(1 for s in prefill if not s.sample)
        t["block_copies"] += len(copies)
        t["budget_tokens"] += record.token_budget
        return record

    # ------------------------------------------------------------------------------------------
    # After the forward pass
    # ------------------------------------------------------------------------------------------
    def update(self, output: SchedulerOutput, sampled_token_ids: list[int]) -> list[Sequence]:
        """Fold a step's results back in; returns the sequences that finished.

        sampled_token_ids: one token per entry of `output.sampled_sequences`, in that order.
        """
        rows = output.sampled_sequences
        if len(sampled_token_ids) != len(rows):
            raise ValueError(
                f"expected {len(rows)} sampled tokens (one per sampled sequence), got {len(sampled_token_ids)}"
            )
        for entry in output.scheduled:
            seq = entry.seq
            if seq.is_finished:  # aborted after it was scheduled
                continue
            seq.num_computed_tokens += entry.num_new_tokens
            for child in entry.forks:
                child.num_computed_tokens = seq.num_computed_tokens
            self.block_manager.cache_full_blocks(seq)

        now = time.perf_counter()
        finished = []
        for (seq, _), token_id in zip(rows, sampled_token_ids):
            if seq.is_finished:
                continue
            seq.append_token(int(token_id), now)
            stop = self._stop_condition(seq)
            if stop is not None:
                status, reason = stop
                self.finish_sequence(seq, status, reason)
                finished.append(seq)
        return finished

    def _stop_condition(self, seq: Sequence):
        """(status, stop_reason) if seq's newest token ends it, else None.

        Token-level stops only; stop *strings* need the tokenizer and are checked by the engine.
        """
        params = seq.sampling_params
        token = seq.last_token_id
        if seq.num_output_tokens >= params.min_tokens:
            if not params.ignore_eos and token in seq.eos_token_ids:
                return SequenceStatus.FINISHED_STOPPED, None
            if token in params.stop_token_ids:
                return SequenceStatus.FINISHED_STOPPED, token
        if params.max_tokens is not None and seq.num_output_tokens >= params.max_tokens:
            return SequenceStatus.FINISHED_LENGTH, None
        if seq.num_tokens >= self.config.max_model_len:
            return SequenceStatus.FINISHED_LENGTH, None
        return None

    # ------------------------------------------------------------------------------------------
    # Statistics
    # ------------------------------------------------------------------------------------------
    def stats(self) -> dict:
        """Totals since start: token counts, average batch, budget use, preemptions, chunks."""
        t = self.totals
        steps = self.num_steps
        batched = t["prefill_tokens"] + t["decode_tokens"]
        return {
            "num_steps": steps,
            "num_waiting": len(self.waiting),
            "num_running": len(self.running),
            "num_prefill_tokens": t["prefill_tokens"],
            "num_decode_tokens": t["decode_tokens"],
            "num_preemptions": t["preemptions"],
            "num_partial_prefills": t["partial_prefills"],
            "num_block_copies": t["block_copies"],
            "avg_batch_size": t["scheduled_seqs"] / steps if steps else 0.0,
            "avg_batched_tokens": batched / steps if steps else 0.0,
            "budget_utilization": batched / t["budget_tokens"] if t["budget_tokens"] else 0.0,
        }
