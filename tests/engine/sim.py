"""A model-free simulation of the engine loop, for scheduler and block-manager tests.

`ShadowRunner` stands in for the model runner. It keeps a *shadow KV cache*: one Python value per
cache slot. When a step computes token p of a sequence it writes, at that token's slot, a key that
identifies the token *and its whole prefix* (the real K/V of a token depends on everything before
it). Before the step's writes, it does the block copies (copy-on-write); after them, it checks
that every scheduled sequence finds its own context in its blocks. That single check catches
leaked or shared-but-clobbered blocks, wrong prefix-cache hits, missed copy-on-writes and lost
recomputation after preemption, with no model at all.

The next token is a deterministic function of (prefix, sample index): a request's outputs must
then be the same however it was batched, chunked, preempted or served from the prefix cache.
"""

from __future__ import annotations

from collections import Counter

from minivllm.engine.scheduler import Scheduler, SchedulerOutput
from minivllm.engine.sequence import Sequence, SequenceStatus


def prefix_key(token_ids: list[int], position: int) -> int:
    return hash(tuple(token_ids[: position + 1]))


def next_token(seq: Sequence, vocab_size: int) -> int:
    return hash((tuple(seq.token_ids), seq.index)) % vocab_size


class ShadowRunner:
    def __init__(self, num_blocks: int, block_size: int, vocab_size: int = 5):
        self.block_size = block_size
        self.vocab_size = vocab_size
        self.kv: list[int | None] = [None] * (num_blocks * block_size)

    def slot(self, seq: Sequence, position: int) -> int:
        return seq.block_table[position // self.block_size] * self.block_size + position % self.block_size

    def execute(self, out: SchedulerOutput) -> list[int]:
        bs = self.block_size
        for src, dst in out.block_copies:
            self.kv[dst * bs : (dst + 1) * bs] = self.kv[src * bs : (src + 1) * bs]
        for entry in out.scheduled:
            seq, start = entry.seq, entry.seq.num_computed_tokens
            assert len(seq.block_table) * bs >= start + entry.num_new_tokens, "table too short"
            for p in range(start, start + entry.num_new_tokens):
                self.kv[self.slot(seq, p)] = prefix_key(seq.token_ids, p)
        for entry in out.scheduled:  # after all writes: nobody clobbered anybody's context
            seq = entry.seq
            for p in range(seq.num_computed_tokens + entry.num_new_tokens):
                assert self.kv[self.slot(seq, p)] == prefix_key(seq.token_ids, p), (
                    f"sequence {seq.seq_id} reads a wrong K/V at position {p}"
                )
        return [next_token(seq, self.vocab_size) for seq, _ in out.sampled_sequences]


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
    stats = bm.stats()
    assert stats.num_free_blocks + stats.num_used_blocks == bm.num_blocks
    assert stats.num_cached_free_blocks == sum(1 for b in free if bm.is_cached(b))
    assert stats.num_shared_blocks == sum(1 for b in holders if holders[b] > 1)
    assert 0 <= stats.fragmentation < 1


def check_step_budgets(scheduler: Scheduler, out: SchedulerOutput) -> None:
    config = scheduler.config
    assert out.num_batched_tokens <= config.max_num_batched_tokens
    assert len(out.sampled_sequences) <= config.max_num_seqs
    assert len(out.scheduled) <= config.max_num_seqs
    assert scheduler.running_width <= config.max_num_seqs
    for entry in out.scheduled:
        assert entry.num_new_tokens >= 1
        if config.prefill_chunk_size is not None:
            assert entry.num_new_tokens <= config.prefill_chunk_size
        if not config.enable_chunked_prefill:
            assert entry.sample, "without chunked prefill every scheduled sequence samples"
    assert out.record.num_batched_tokens == out.num_batched_tokens


def run_to_completion(scheduler, runner, arrivals, aborts=None, max_steps=10_000):
    """Drive the loop. arrivals: {step: [Sequence]}, aborts: {step: [request_id]}.

    Returns all sequences (forked children included) and the per-step outputs.
    """
    aborts = aborts or {}
    sequences: list[Sequence] = []
    outputs = []
    last_arrival = max(arrivals, default=0)
    for step in range(max_steps):
        for seq in arrivals.get(step, []):
            scheduler.add_sequence(seq)
            sequences.append(seq)
        for request_id in aborts.get(step, []):
            scheduler.abort(request_id)
        if not scheduler.has_unfinished_sequences():
            if step > last_arrival:
                return sequences, outputs
            continue
        out = scheduler.schedule()
        assert not out.is_empty, "unfinished sequences but nothing was scheduled: no progress"
        for entry in out.scheduled:
            sequences.extend(entry.forks)
        check_step_budgets(scheduler, out)
        tokens = runner.execute(out)
        scheduler.update(out, tokens)
        outputs.append(out)
        check_block_invariants(scheduler, sequences)
    raise AssertionError(f"not finished after {max_steps} steps")
