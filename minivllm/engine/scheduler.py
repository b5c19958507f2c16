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

3. **Parallel sampling**: a request with n > 1 forks its other samples when its prompt is done.

**Prompt log-probabilities.** A request with `prompt_logprobs` needs the logits at its prompt
positions: each chunk names the positions it must score (`PromptLogprobRows`), those not scored
yet, so a recompute after a preemption scores nothing twice. Until every prompt token is scored,
the request takes nothing from the prefix cache (a cached block has no logits). With
`max_tokens=0` it samples nothing and finishes, "length", when its prompt is computed.

`num_computed_tokens` advances here, when a step is *planned*: the GPU runs steps in order, so the
next plan can already count on this one's K/V. A decode's new token may be *pending*, sampled by
a step still on the GPU (overlap); a sequence whose pending token is bound to end it by length is
left out, since nothing after that token is ever needed.

With speculative decoding (`speculation.py`), a decoding sequence also computes the drafts a
proposer guessed for it: they take slots and budget like any token (after every running sequence
has its one token), and `update` keeps the accepted ones, moves `num_computed_tokens` back over
the rejected ones and returns the blocks that only held those (`BlockManager.trim`).

Pure Python, no tensors: it can be tested and drawn without a model. The model runner receives a
plain `SchedulerOutput` (minivllm/step.py); `update()` then folds the sampled tokens back in and
applies the stop rules of `stopping.py`.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from minivllm.config import SchedulerConfig
from minivllm.engine.block_manager import BlockManager
from minivllm.engine.sequence import Sequence, SequenceStatus
from minivllm.engine.speculation import Speculation, may_speculate
from minivllm.engine.stopping import StopChecker
from minivllm.step import PromptLogprobRows, SampleRow, ScheduledSeq, SchedulerOutput, StepLogprobs


@dataclass
class Preemption:
    seq_id: int
    request_id: str
    num_computed_tokens_lost: int
    reason: str


@dataclass
class ScheduledStep:
    """A planned step as the engine keeps it: the runner's plain `output`, and behind it the live
    sequences (`seqs` parallel to `output.seqs`, `sampled` parallel to `output.sample_rows`)."""

    output: SchedulerOutput
    seqs: list[Sequence]
    sampled: list[Sequence]
    num_prefill_seqs: int = 0
    num_decode_seqs: int = 0
    num_prefill_tokens: int = 0
    num_decode_tokens: int = 0
    num_prefix_hit_tokens: int = 0  # prompt tokens taken from the prefix cache by admissions
    num_draft_tokens: int = 0  # drafts planned for verification (part of num_decode_tokens)
    forks: list[Sequence] = field(default_factory=list)
    preemptions: list[Preemption] = field(default_factory=list)
    # The next plan needs this step's tokens on the host: it verifies drafts, or its sequences
    # may speculate next (the engine waits for it before planning, even with overlap on).
    speculative: bool = False
    # Some sampled row has penalties, which read its previous token: the next plan waits too.
    penalties: bool = False
    num_partial_prefills: int = 0  # scheduled sequences that sample nothing (a prompt chunk, not the last)
    # seq id -> (drafts, accepted) of each sequence that verified drafts, filled in by `update`.
    acceptance: dict[int, tuple[int, int]] = field(default_factory=dict)

    @property
    def is_empty(self) -> bool:
        return not self.seqs


class Scheduler:
    """Continuous batching with chunked prefill, prefix caching and preemption by recompute."""

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager,
                 stopping: StopChecker | None = None, speculation: Speculation | None = None):
        if not config.is_resolved:
            raise ValueError(
                "the SchedulerConfig needs max_model_len (EngineConfig fills it in from the model)"
            )
        self.config = config
        self.block_manager = block_manager
        self.stopping = stopping or StopChecker(config.max_model_len)
        self.speculation = speculation  # None: no speculative decoding
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the last is the newest
        # Told to the runner with the next step, so it can drop their per-sequence state.
        self._finished_ids: list[int] = []
        self._preempted_ids: list[int] = []

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

    def finish_sequence(self, seq: Sequence, status: SequenceStatus, stop_reason=None) -> None:
        """End `seq` (stop condition, abort or error) and give its blocks back."""
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
        self._finished_ids.append(seq.seq_id)
        if self.speculation is not None:
            self.speculation.release(seq.seq_id)

    def has_unfinished_sequences(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def running_width(self) -> int:
        """Sequences in flight, counting the not-yet-forked samples of running parents."""
        return sum(seq.width for seq in self.running)

    # ------------------------------------------------------------------------------------------
    # One step
    # ------------------------------------------------------------------------------------------
    def schedule(self) -> ScheduledStep:
        """Plan the next step: who computes which tokens; allocates their KV blocks."""
        budget = self.config.max_num_batched_tokens
        planned: list[tuple[Sequence, int, list[int], int]] = []  # seq, new tokens, draft ids, drafts
        copies: list[tuple[int, int]] = []
        preemptions: list[Preemption] = []
        speculate = self.speculation is not None and self.speculation.enabled(len(self.running))

        # 1. Running sequences, oldest first. Iterating by index because preemption removes
        #    sequences from the *end* of the list, which this loop has not reached yet.
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            i += 1
            # Nothing to compute: its last token ends it by length, or it only scores its prompt
            # and the prompt is all scheduled; either way it waits for its fold-in.
            uncomputed = seq.num_uncomputed_tokens
            if not uncomputed or self.stopping.ends_by_length(seq):
                continue
            num_new = 1 if uncomputed == 1 else self._num_new_tokens(uncomputed, budget)  # (budget > 0)
            seq_copies = None
            if speculate:  # drafts only from the budget left once every running sequence has its token
                drafts, num_drafts = self._plan_drafts(seq, budget - num_new - (len(self.running) - i))
                if num_drafts:
                    seq_copies = self.block_manager.allocate(seq, num_new + num_drafts)
            if seq_copies is None:  # no drafts, or no free block for them: no speculation
                drafts, num_drafts = [], 0
                seq_copies = self._allocate_or_preempt(seq, num_new, preemptions)  # what a decode needs
            if seq_copies is None:  # seq had to preempt itself: it was the newest
                break
            if seq_copies:
                copies += seq_copies
            planned.append((seq, num_new, drafts, num_drafts))
            budget -= num_new + num_drafts

        # 2. Waiting sequences, first come first served. Not after a preemption: memory is
        #    short right now, and admitting more would only cause more preemptions.
        hit_tokens = 0
        while not preemptions and self.waiting and budget > 0:
            admitted = self._try_admit(self.waiting[0], budget)
            if admitted is None:
                break
            num_new, seq_copies, num_cached = admitted
            planned.append((self.waiting.popleft(), num_new, [], 0))
            copies += seq_copies
            budget -= num_new
            hit_tokens += num_cached
        step = self._build_step(planned, copies, preemptions, hit_tokens)
        # The next plan waits for this step only if it may draft: counted after the admissions,
        # so a step that fills the batch past the threshold (the first of a large batch) keeps
        # the overlap, as it would without speculation.
        step.speculative = step.num_draft_tokens > 0 or (
            self.speculation is not None and self.speculation.enabled(len(self.running))
            and any(may_speculate(seq) for seq in step.sampled))
        return step

    def _plan_drafts(self, seq: Sequence, spare: int) -> tuple[list[int], int]:
        """The drafts `seq` verifies this step, (ids known on the host, number): none unless it
        computes just its newest token, that token is known, no fork is due, and the rule of
        `may_speculate` allows it."""
        if (spare < 1 or seq.num_uncomputed_tokens != 1 or seq.num_pending_tokens or seq.num_pending_forks
                or not may_speculate(seq)):
            return [], 0
        return self.speculation.plan_drafts(seq, spare)

    def _num_new_tokens(self, uncomputed: int, budget: int) -> int:
        """How many of a sequence's uncomputed tokens fit this step (chunking if it is allowed)."""
        num_new = min(uncomputed, budget)
        if self.config.prefill_chunk_size is not None:
            num_new = min(num_new, self.config.prefill_chunk_size)
        return num_new

    def _allocate_or_preempt(self, seq: Sequence, num_new: int, records: list[Preemption]):
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
            records.append(Preemption(victim.seq_id, victim.request_id, victim.num_computed_tokens, reason))
            self._preempt(victim)
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
        self._preempted_ids.append(seq.seq_id)

    def _try_admit(self, seq: Sequence, budget: int):
        """Admit the head of the queue if budgets and the pool allow: (num_new, copies, hits)."""
        if self.running_width + seq.width > self.config.max_num_seqs:
            return None
        # A cached block has K/V but no logits: prompt tokens still to score must be computed.
        cached_blocks = [] if seq.num_prompt_logprobs_owed else self.block_manager.find_cached_prefix(seq)
        num_cached = len(cached_blocks) * self.block_manager.block_size
        uncomputed = seq.num_tokens - num_cached
        if self.config.enable_chunked_prefill:
            num_new = self._num_new_tokens(uncomputed, budget)
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
        return num_new, copies, num_cached

    def _build_step(self, planned, copies, preemptions, hit_tokens) -> ScheduledStep:
        """Turn the plan into the runner's plain records; advance the computed counters.

        A sequence that computes all its tokens samples the next one, which is *pending* from
        now until `update` appends it. A parent about to sample its first token forks its
        siblings here, so that all n samples draw their first token from the same logits.
        `num_computed_tokens` counts the drafts too, until `update` takes back the rejected.
        """
        step = ScheduledStep(SchedulerOutput([], [], copies, self._finished_ids, self._preempted_ids),
                             seqs=[], sampled=[], num_prefix_hit_tokens=hit_tokens, preemptions=preemptions)
        self._finished_ids, self._preempted_ids = [], []
        for seq, num_new, drafts, num_drafts in planned:
            start = seq.num_computed_tokens
            pending = seq.num_pending_tokens > 0  # then this is a decode of that very token
            samples = ()
            if (start + num_new == seq.num_tokens + seq.num_pending_tokens
                    and not seq.sampling_params.scores_prompt_only):
                samples = (seq,)
                if seq.num_pending_forks:
                    children = self._fork(seq)
                    step.forks += children
                    samples += tuple(children)
            else:
                step.num_partial_prefills += 1
            is_decode = num_new == 1 and start >= seq.num_prompt_tokens  # one output token
            if is_decode:
                step.num_decode_seqs += 1
                step.num_decode_tokens += 1
            else:
                step.num_prefill_seqs += 1
                step.num_prefill_tokens += num_new
            prompt_rows = None
            if seq.prompt_logprobs is not None and seq.num_prompt_logprobs_owed:
                prompt_rows = self._prompt_logprob_rows(seq, start, num_new)
                step.output.scores_prompts |= prompt_rows is not None
            if num_drafts:
                step.num_decode_tokens += num_drafts  # (after a prompt's last token too)
                step.num_draft_tokens += num_drafts
            step.output.seqs.append(ScheduledSeq(
                seq.seq_id, start, seq.token_ids[start:start + num_new - pending], pending,
                seq.block_table, len(samples), is_decode, prompt_rows, drafts, num_drafts))
            step.seqs.append(seq)
            seq.num_computed_tokens = start + num_new + num_drafts
            if samples:
                self._add_samples(step, samples, seq.num_computed_tokens)
        return step

    def _add_samples(self, step: ScheduledStep, samples: tuple[Sequence, ...], num_computed: int) -> None:
        """Each of `samples` samples its next token in `step`: a sample row each, and the token
        counts as pending."""
        out = step.output
        for seq in samples:
            if seq.grammar is not None:
                out.structured_rows.append(len(out.sample_rows))
            row = seq.sample_row
            if row is None:
                row = self._sample_row(seq)
                step.penalties |= row.params.has_penalties
            out.sample_rows.append(row)
            step.sampled.append(seq)
            seq.num_computed_tokens = num_computed
            seq.num_pending_tokens += 1

    @staticmethod
    def _prompt_logprob_rows(seq: Sequence, start: int, num_new: int) -> PromptLogprobRows | None:
        """The positions of this chunk whose logits score a prompt token not scored yet: position
        p scores prompt token p + 1, so p runs up to the second to last prompt token."""
        first = max(start, len(seq.prompt_logprobs) - 1)
        end = min(start + num_new, seq.num_prompt_tokens - 1)
        if first >= end:
            return None
        return PromptLogprobRows(first, seq.token_ids[first + 1:end + 1], seq.sampling_params.prompt_logprobs)

    def _sample_row(self, seq: Sequence) -> SampleRow:
        """A new row for `seq` to sample with. Without penalties and once nothing is banned any
        more (min_tokens are out, for good), it is the same every step: kept as `seq.sample_row`."""
        params = seq.sampling_params
        if params.has_penalties:  # they read the tokens so far: a new row every step
            return SampleRow(seq.seq_id, params, seq.index, self.stopping.banned_tokens(seq),
                             seq.prompt_token_ids, seq.output_token_ids)
        row = SampleRow(seq.seq_id, params, seq.index, self.stopping.banned_tokens(seq))
        if not row.banned_token_ids:
            seq.sample_row = row
        return row

    def _fork(self, parent: Sequence) -> list[Sequence]:
        """Create the other n - 1 samples of parent's request, sharing its blocks."""
        children = []
        for index in range(1, parent.num_pending_forks + 1):
            child = parent.fork(index)
            self.block_manager.fork(parent, child)
            children.append(child)
        parent.num_pending_forks = 0
        self.running.extend(children)
        return children

    # ------------------------------------------------------------------------------------------
    # After the forward pass
    # ------------------------------------------------------------------------------------------
    def update(self, step: ScheduledStep, sampled_token_ids: list[int],
               logprobs: StepLogprobs | None = None) -> list[Sequence]:
        """Fold a step's sampled tokens (and the log-probabilities it computed) back in; returns
        the sequences that finished.

        sampled_token_ids: one entry per `step.sampled` sequence, in that order: its token, or,
        for a sequence that verified drafts, the list of tokens it gained (the accepted drafts,
        then the model's own token). They are appended one at a time, each checked by the stop
        rules, so a stop inside an accepted run ends the sequence there. A sequence that
        finished (or was aborted) after the step was planned drops its tokens.
        """
        if len(sampled_token_ids) != len(step.sampled):
            raise ValueError(
                f"expected {len(step.sampled)} sampled tokens (one per sampled sequence), "
                f"got {len(sampled_token_ids)}"
            )
        finished = []
        for seq, scheduled in zip(step.seqs, step.output.seqs):
            if seq.is_finished:
                continue
            self.block_manager.cache_full_blocks(seq)
            if logprobs is not None and scheduled.prompt_logprobs is not None:
                self._store_prompt_logprobs(seq, scheduled.prompt_logprobs.start, logprobs.prompt[seq.seq_id])
            if seq.sampling_params.scores_prompt_only and scheduled.start + scheduled.num_new_tokens == seq.num_tokens:
                self.finish_sequence(seq, SequenceStatus.FINISHED_LENGTH)
                finished.append(seq)
        drafts = ({s.seq_id: s.num_draft_tokens for s in step.output.seqs if s.num_draft_tokens}
                  if step.num_draft_tokens else None)
        now = time.perf_counter()
        for row, (seq, tokens) in enumerate(zip(step.sampled, sampled_token_ids)):
            if not isinstance(tokens, (list, tuple)):
                tokens = (tokens,)
            num_drafts = drafts.get(seq.seq_id, 0) if drafts else 0
            if num_drafts:
                step.acceptance[seq.seq_id] = (num_drafts, len(tokens) - 1)
            if seq.is_finished:
                continue
            for token_id in tokens:
                seq.append_token(int(token_id), now)
                if seq.output_logprobs is not None:  # never speculating (may_speculate)
                    seq.output_logprobs.append(logprobs.sampled[row])
                decision = self.stopping.check(seq)
                if decision is not None:
                    self.finish_sequence(seq, *decision)
                    finished.append(seq)
                    break
            else:
                if num_drafts:
                    self._reject_drafts(seq, num_drafts - (len(tokens) - 1))
        return finished

    @staticmethod
    def _store_prompt_logprobs(seq: Sequence, start: int, entries) -> None:
        """Entries for prompt tokens start + 1, ...; any already stored are not stored again."""
        have = len(seq.prompt_logprobs)
        seq.prompt_logprobs += entries[max(0, have - (start + 1)):]

    def _reject_drafts(self, seq: Sequence, num_rejected: int) -> None:
        """Forget the K/V of rejected drafts: their positions are computed again (with the
        right tokens) by later steps, and blocks that held nothing else go back to the pool."""
        seq.num_computed_tokens -= num_rejected
        self.block_manager.trim(seq)
