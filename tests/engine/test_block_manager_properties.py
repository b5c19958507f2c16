"""A hypothesis state machine driving the BlockManager directly, in any order of operations:
new sequences (with prefix-cache lookups), growth by random amounts, forks at any point,
frees — on a tiny pool. A shadow KV cache (one value per slot, identifying a token *and its
prefix*) checks after every operation that each live sequence reads exactly its own context.
"""

from __future__ import annotations

from collections import Counter

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from minivllm.engine.block_manager import BlockManager
from minivllm.engine.sequence import Sequence
from minivllm.sampling_params import SamplingParams

from .sim import prefix_key

tokens = st.lists(st.integers(0, 2), min_size=1, max_size=10)


class BlockManagerMachine(RuleBasedStateMachine):
    @initialize(block_size=st.sampled_from([1, 2, 3, 4]), num_blocks=st.integers(1, 12),
                prefix_caching=st.booleans())
    def setup(self, block_size, num_blocks, prefix_caching):
        self.bm = BlockManager(num_blocks, block_size, prefix_caching)
        self.kv: list[int | None] = [None] * (num_blocks * block_size)
        self.live: list[Sequence] = []

    # --- helpers ---
    def _slot(self, seq, p):
        bs = self.bm.block_size
        return seq.block_table[p // bs] * bs + p % bs

    def _compute(self, seq, num_new, copies):
        """What the model runner does: block copies first, then write the new tokens' K/V."""
        bs = self.bm.block_size
        for src, dst in copies:
            self.kv[dst * bs : (dst + 1) * bs] = self.kv[src * bs : (src + 1) * bs]
        start = seq.num_computed_tokens
        for p in range(start, start + num_new):
            self.kv[self._slot(seq, p)] = prefix_key(seq.token_ids, p)
        seq.num_computed_tokens += num_new
        self.bm.cache_full_blocks(seq)

    # --- rules ---
    @rule(prompt=tokens)
    def add_sequence(self, prompt):
        seq = Sequence("r", prompt, SamplingParams())
        hits = self.bm.find_cached_prefix(seq)
        assert len(hits) * self.bm.block_size < len(prompt), "a hit must leave a token to compute"
        num_new = len(prompt) - len(hits) * self.bm.block_size
        copies = self.bm.allocate(seq, num_new, hits)
        if copies is None:
            assert self.bm.num_blocks_to_allocate(seq, num_new, hits) > self.bm.num_free_blocks
            return
        seq.num_computed_tokens = len(hits) * self.bm.block_size
        self._compute(seq, num_new, copies)
        self.live.append(seq)

    @precondition(lambda self: self.live)
    @rule(data=st.data(), new_tokens=tokens)
    def grow(self, data, new_tokens):
        seq = data.draw(st.sampled_from(self.live))
        seq.token_ids.extend(new_tokens)
        copies = self.bm.allocate(seq, len(new_tokens))
        if copies is None:
            del seq.token_ids[-len(new_tokens):]  # as if never scheduled
            return
        self._compute(seq, len(new_tokens), copies)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def fork(self, data):
        parent = data.draw(st.sampled_from(self.live))
        child = parent.fork(1)
        self.bm.fork(parent, child)
        self.live.append(child)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def free(self, data):
        seq = data.draw(st.sampled_from(self.live))
        self.bm.free(seq)
        self.live.remove(seq)

    # --- invariants ---
    @invariant()
    def ref_counts_match_tables(self):
        if not hasattr(self, "bm"):
            return
        holders = Counter(b for s in self.live for b in s.block_table)
        for b in range(self.bm.num_blocks):
            assert self.bm.ref_count(b) == holders[b]
        free = self.bm.free_block_ids()
        assert len(free) == len(set(free)) and set(free) == {b for b in range(self.bm.num_blocks) if not holders[b]}
        assert self.bm.num_cached_free_blocks == sum(1 for b in free if self.bm.is_cached(b))

    @invariant()
    def every_sequence_reads_its_own_context(self):
        for seq in getattr(self, "live", []):
            assert len(seq.block_table) == self.bm.blocks_for(seq.num_computed_tokens)
            for p in range(seq.num_computed_tokens):
                assert self.kv[self._slot(seq, p)] == prefix_key(seq.token_ids, p), (seq, p)


BlockManagerMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=30, deadline=None)
TestBlockManagerMachine = BlockManagerMachine.TestCase
