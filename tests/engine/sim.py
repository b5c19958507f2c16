"""A model-free simulation of the engine loop, for scheduler and block-manager tests.

`ShadowRunner` stands in for the model runner and sees only what the real one sees: the plain
`SchedulerOutput`. It keeps a *shadow KV cache*: one Python value per cache slot. When a step
computes token p of a sequence it writes, at that token's slot, a key that identifies the token
*and its whole prefix* (the real K/V of a token depends on everything before it). Before the
step's writes, it does the block copies (copy-on-write); after them, it checks that every
scheduled sequence finds its own context in its blocks. That single check catches leaked or
shared-but-clobbered blocks, wrong prefix-cache hits, missed copy-on-writes and lost
recomputation after preemption, with no model at all.

Like the real runner it remembers the tokens it sampled, because with overlap a decode's token is
*pending*: the scheduler does not know it yet when it plans the next step.

The next token is a deterministic function of (prefix, sample index): a request's outputs must
then be the same however it was batched, chunked, preempted, overlapped or served from the
prefix cache, or sped up by speculation. A sequence that verifies drafts keeps those equal to
that function's tokens, then adds one of its own (as greedy verification does); drafts a draft
model would make on the device are guessed here, right about two times in three.
"""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from collections import Counter
from functools import cache
from pathlib import Path

from minivllm.config import SpeculativeConfig
from minivllm.engine.scheduler import Scheduler, ScheduledStep
from minivllm.engine.sequence import Sequence, SequenceStatus
from minivllm.observe.block_map import kv_cache_stats


def prefix_key(token_ids: list[int], position: int) -> int:
    """The shadow K/V of token `position`: it stands for the token and everything before it."""
    return hash(tuple(token_ids[: position + 1]))


def next_token(prefix: list[int], seed_offset: int, vocab_size: int) -> int:
    """The shadow model: the token after `prefix`, for sample `seed_offset`."""
    return hash((tuple(prefix), seed_offset)) % vocab_size


@cache
def draft_model_dir() -> str:
    """A directory that passes for a draft model's (config.json only): the scheduler never loads it."""
    path = Path(tempfile.mkdtemp(prefix="shadow-draft-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    (path / "config.json").write_text(json.dumps({"vocab_size": 5}))
    return str(path)


def speculative_config(method: str, k: int, **extra) -> SpeculativeConfig:
    if method == "draft":
        extra["model"] = draft_model_dir()
    return SpeculativeConfig(method, k, **extra)


class ShadowRunner:
    def __init__(self, num_blocks: int, block_size: int, vocab_size: int = 5):
        self.block_size = block_size
        self.vocab_size = vocab_size
        self.kv: list[int | None] = [None] * (num_blocks * block_size)
        self.last: dict[int, int] = {}  # seq id -> the token it sampled last (maybe still pending)

    def slot(self, table: list[int], position: int) -> int:
        return table[position // self.block_size] * self.block_size + position % self.block_size

    def execute(self, step: ScheduledStep) -> list[int | list[int]]:
        out, bs = step.output, self.block_size
        for src, dst in out.block_copies:
            self.kv[dst * bs: (dst + 1) * bs] = self.kv[src * bs: (src + 1) * bs]
        contexts = []
        for s, seq in zip(out.seqs, step.seqs):
            # The prefix is known on the host (test-only knowledge: a real runner needs none of
            # it, its K/V is cached); a pending token is the one this runner sampled last.
            new = [self.last[s.seq_id]] if s.pending else list(s.token_ids)
            new += s.draft_token_ids or self._guess(seq.token_ids[: s.start] + new, s.num_draft_tokens)
            tokens = seq.token_ids[: s.start] + new
            assert len(new) == s.num_new_tokens and len(s.block_table) * bs >= len(tokens), s
            for p in range(s.start, len(tokens)):
                self.kv[self.slot(s.block_table, p)] = prefix_key(tokens, p)
            contexts.append((s, tokens))
        for s, tokens in contexts:  # after all writes: nobody clobbered anybody's context
            for p in range(len(tokens)):
                assert self.kv[self.slot(s.block_table, p)] == prefix_key(tokens, p), (
                    f"sequence {s.seq_id} reads a wrong K/V at position {p}")
        sampled = []
        rows = iter(out.sample_rows)
        for s, tokens in contexts:
            for _ in range(s.num_samples):
                row = next(rows)
                if s.num_draft_tokens:
                    gained = self._verify(tokens, s.num_draft_tokens, row.seed_offset)
                    sampled.append(gained)
                else:
                    gained = [next_token(tokens, row.seed_offset, self.vocab_size)]
                    sampled.append(gained[0])
                self.last[row.seq_id] = gained[-1]
        return sampled

    def _verify(self, tokens: list[int], num_drafts: int, seed_offset: int) -> list[int]:
        """Keep the drafts (the last `num_drafts` of `tokens`) that the shadow model agrees
        with, then add its own next token."""
        known = tokens[: len(tokens) - num_drafts]
        for draft in tokens[len(known):]:
            if draft != next_token(known, seed_offset, self.vocab_size):
                break
            known = known + [draft]
        return tokens[len(tokens) - num_drafts: len(known)] + [next_token(known, seed_offset, self.vocab_size)]

    def _guess(self, prefix: list[int], num_drafts: int) -> list[int]:
        """A draft model's drafts: the shadow model's tokens (sample 0), each wrong when its
        prefix hashes to 0 mod 3."""
        guesses = []
        for _ in range(num_drafts):
            token = next_token(prefix, 0, self.vocab_size)
            if hash(tuple(prefix)) % 3 == 0:
                token = (token + 1) % self.vocab_size
            guesses.append(token)
            prefix = prefix + [token]
        return guesses


def abort(scheduler: Scheduler, sequences: list[Sequence], request_id: str) -> list[Sequence]:
    """What the engine does on abort: finish every unfinished sequence of the request."""
    seqs = [s for s in sequences if s.request_id == request_id and not s.is_finished]
    for seq in seqs:
        scheduler.finish_sequence(seq, SequenceStatus.FINISHED_ABORTED)
    return seqs


def check_block_invariants(scheduler: Scheduler, sequences: list[Sequence]) -> None:
    """Ref counts equal table membership; the free list holds exactly the unreferenced blocks."""
    bm = scheduler.block_manager
    live = [s for s in sequences if not s.is_finished]
    holders = Counter(b for s in live for b in s.block_table)
    for s in sequences:
        if s.is_finished or s.status is SequenceStatus.WAITING:
            assert s.block_table == [], f"{s} holds blocks while {s.status.name}"
        else:
            assert len(s.block_table) == bm.blocks_for(s.num_computed_tokens), s
            assert len(set(s.block_table)) == len(s.block_table), f"{s} lists a block twice"
    for block_id in range(bm.num_blocks):
        assert bm.ref_count(block_id) == holders[block_id], (
            f"block {block_id}: ref_count {bm.ref_count(block_id)} but {holders[block_id]} tables hold it"
        )
    free = bm.free_block_ids()
    assert len(free) == len(set(free)), "a block is twice in the free list"
    assert set(free) == {b for b in range(bm.num_blocks) if holders[b] == 0}
    stats = kv_cache_stats(bm, scheduler.running)
    assert stats["num_free_blocks"] + stats["num_used_blocks"] == bm.num_blocks
    assert stats["num_cached_free_blocks"] == sum(1 for b in free if bm.is_cached(b))
    assert stats["num_shared_blocks"] == sum(1 for b in holders if holders[b] > 1)
    assert 0 <= stats["fragmentation"] < 1


def check_step_budgets(scheduler: Scheduler, step: ScheduledStep) -> None:
    config, out = scheduler.config, step.output
    assert out.num_batched_tokens <= config.max_num_batched_tokens
    assert len(out.sample_rows) <= config.max_num_seqs
    assert len(out.seqs) <= config.max_num_seqs
    assert scheduler.running_width <= config.max_num_seqs
    assert step.num_prefill_tokens + step.num_decode_tokens == out.num_batched_tokens
    for s in out.seqs:
        assert s.num_new_tokens >= 1
        assert not s.pending or s.num_new_tokens == 1, "a pending token is only ever a decode"
        if config.prefill_chunk_size is not None:  # caps prompt chunks, not drafts
            assert s.num_new_tokens - s.num_draft_tokens <= config.prefill_chunk_size
        if not config.enable_chunked_prefill:
            assert s.num_samples, "without chunked prefill every scheduled sequence samples"


def run_to_completion(scheduler, runner, arrivals, aborts=None, max_steps=10_000, overlap=False):
    """Drive the loop. arrivals: {step: [Sequence]}, aborts: {step: [request_id]}.

    overlap: plan step n+1 before folding in step n's tokens, as the engine does by default.
    Returns all sequences (forked children included) and the planned steps.
    """
    aborts = aborts or {}
    sequences: list[Sequence] = []
    steps = []
    inflight = None
    last_arrival = max(arrivals, default=0)
    for n in range(max_steps):
        for seq in arrivals.get(n, []):
            scheduler.add_sequence(seq)
            sequences.append(seq)
        for request_id in aborts.get(n, []):
            abort(scheduler, sequences, request_id)
        if not scheduler.has_unfinished_sequences() and inflight is None:
            if n > last_arrival:
                return sequences, steps
            continue
        step = scheduler.schedule() if scheduler.has_unfinished_sequences() else None
        if step is not None:
            assert not step.is_empty or inflight is not None, "unfinished sequences but no progress"
            sequences.extend(step.forks)
            check_step_budgets(scheduler, step)
            step = (step, runner.execute(step))
            steps.append(step[0])
        if inflight is not None:
            scheduler.update(*inflight)
            inflight = None
        if step is not None:
            if overlap and not step[0].speculative:  # the engine waits for a speculative step
                inflight = step
            else:
                scheduler.update(*step)
        check_block_invariants(scheduler, sequences)
    raise AssertionError(f"not finished after {max_steps} steps")
