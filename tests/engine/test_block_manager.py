"""BlockManager unit tests: allocation, prefix caching (hits, chaining, LRU eviction), fork, COW."""

import pytest

from minivllm.engine.block_manager import BlockManager
from minivllm.engine.sequence import Sequence
from minivllm.observe.block_map import kv_cache_stats
from minivllm.sampling_params import SamplingParams


def make_seq(tokens, request_id="r"):
    return Sequence(request_id, list(tokens), SamplingParams())


def compute(bm, seq, num_tokens, cached=()):
    """Allocate like the scheduler does, then mark the tokens computed like update() does."""
    cached = list(cached)
    copies = bm.allocate(seq, num_tokens, cached)
    assert copies is not None
    seq.num_computed_tokens += len(cached) * bm.block_size + num_tokens
    bm.cache_full_blocks(seq)
    return copies


def test_allocation_grows_with_the_sequence_and_free_returns_everything():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    seq = make_seq(range(10))
    compute(bm, seq, 10)
    assert len(seq.block_table) == 3 and bm.num_free_blocks == 5
    stats = kv_cache_stats(bm, [seq])
    assert stats["allocated_slots"] == 12 and stats["used_slots"] == 10
    assert stats["fragmentation"] == pytest.approx(2 / 12)
    assert stats["utilization"] == pytest.approx(3 / 8)
    seq.token_ids += [1, 2, 3]
    compute(bm, seq, 3)  # 13 tokens -> 4 blocks
    assert len(seq.block_table) == 4 and len(set(seq.block_table)) == 4
    bm.free(seq)
    assert bm.num_free_blocks == 8 and seq.block_table == []
    assert all(bm.ref_count(b) == 0 for b in range(8))


def test_allocation_refuses_without_changing_anything():
    bm = BlockManager(num_blocks=2, block_size=4)
    seq = make_seq(range(12))
    assert bm.allocate(seq, 12) is None
    assert seq.block_table == [] and bm.num_free_blocks == 2


def test_double_free_is_detected():
    bm = BlockManager(num_blocks=4, block_size=4)
    seq = make_seq(range(5))
    compute(bm, seq, 5)
    table = list(seq.block_table)
    bm.free(seq)
    seq.block_table = table
    with pytest.raises(RuntimeError, match="double free"):
        bm.free(seq)


def test_prefix_hit_reuses_full_blocks_and_leaves_a_token_to_compute():
    bm = BlockManager(num_blocks=16, block_size=4)
    first = make_seq(range(10))  # blocks [0..3], [4..7] full; [8, 9] partial
    compute(bm, first, 10)
    second = make_seq(list(range(8)) + [42, 43, 44])
    hits = bm.find_cached_prefix(second)
    assert hits == first.block_table[:2]
    compute(bm, second, 3, cached=hits)
    assert second.block_table[:2] == first.block_table[:2]
    assert [bm.ref_count(b) for b in hits] == [2, 2]
    assert kv_cache_stats(bm, [first, second])["num_shared_blocks"] == 2
    # An identical 8-token prompt may reuse only the first block: its last token must be computed.
    same = make_seq(range(8))
    assert bm.find_cached_prefix(same) == first.block_table[:1]


def test_hashes_chain_the_prefix():
    bm = BlockManager(num_blocks=16, block_size=2)
    compute(bm, make_seq([1, 2, 3, 4, 5]), 5)
    # Same second block [3, 4] but after a different first block: no hit at all.
    assert bm.find_cached_prefix(make_seq([9, 9, 3, 4, 5])) == []
    assert len(bm.find_cached_prefix(make_seq([1, 2, 3, 4, 7]))) == 2


def test_freed_cached_blocks_stay_findable_until_evicted_least_recently_used_first():
    bm = BlockManager(num_blocks=6, block_size=2)
    old = make_seq([1, 2, 3, 4, 5])  # full blocks [1,2] [3,4]
    compute(bm, old, 5)
    bm.free(old)
    new = make_seq([7, 8, 9, 10, 11])
    compute(bm, new, 5)
    bm.free(new)
    assert bm.num_free_blocks == 6
    assert len(bm.find_cached_prefix(make_seq([1, 2, 3, 4, 0]))) == 2  # still cached after free
    # The free list is ordered by time of freeing; taking 3 blocks takes the 3 freed first.
    order = bm.free_block_ids()
    filler = make_seq([0] * 5)
    compute(bm, filler, 5)
    assert filler.block_table == order[:3]
    # `old` was freed before `new`, so its blocks were the first to be evicted.
    assert bm.find_cached_prefix(make_seq([1, 2, 3, 4, 0])) == []
    assert len(bm.find_cached_prefix(make_seq([7, 8, 9, 10, 0]))) == 2
    assert bm.num_evictions >= 1


def test_a_sequence_is_freed_back_to_front():
    bm = BlockManager(num_blocks=3, block_size=2)
    seq = make_seq([1, 2, 3, 4, 5])
    compute(bm, seq, 5)
    table = list(seq.block_table)
    bm.free(seq)
    # Its last block is evicted first, its first block (the likeliest shared prefix) last.
    assert bm.free_block_ids() == table[::-1]


def test_reusing_a_free_cached_block_takes_it_off_the_free_list():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = make_seq([1, 2, 3])
    compute(bm, a, 3)
    bm.free(a)
    b = make_seq([1, 2, 5])
    hits = bm.find_cached_prefix(b)
    assert bm.num_blocks_to_allocate(b, 1, hits) == 2  # 1 revived cached block + 1 new one
    compute(bm, b, 1, cached=hits)
    assert bm.ref_count(hits[0]) == 1 and hits[0] not in bm.free_block_ids()


def test_fork_shares_blocks_and_copy_on_write_splits_the_partial_last_block():
    bm = BlockManager(num_blocks=8, block_size=4)
    parent = make_seq(range(6))  # block 0 full, block 1 holds 2 of 4 slots
    compute(bm, parent, 6)
    child = parent.fork(1)
    bm.fork(parent, child)
    child.num_computed_tokens = parent.num_computed_tokens
    assert child.block_table == parent.block_table
    assert [bm.ref_count(b) for b in parent.block_table] == [2, 2]
    full, partial = parent.block_table
    child.token_ids.append(99)
    copies = compute(bm, child, 1)
    assert len(copies) == 1 and copies[0][0] == partial
    dst = copies[0][1]
    assert child.block_table == [full, dst] and dst not in (full, partial)
    assert bm.ref_count(full) == 2 and bm.ref_count(partial) == 1 and bm.ref_count(dst) == 1
    # The parent is now the only holder of its block: it writes without a copy.
    parent.token_ids.append(7)
    assert compute(bm, parent, 1) == []


def test_fork_at_a_block_boundary_needs_no_copy():
    bm = BlockManager(num_blocks=8, block_size=4)
    parent = make_seq(range(8))
    compute(bm, parent, 8)
    child = parent.fork(1)
    bm.fork(parent, child)
    child.num_computed_tokens = 8
    child.token_ids.append(1)
    assert compute(bm, child, 1) == []
    assert child.block_table[:2] == parent.block_table and len(child.block_table) == 3


def test_constructor_validation():
    with pytest.raises(ValueError, match="num_blocks"):
        BlockManager(0, 16)
    with pytest.raises(ValueError, match="block_size"):
        BlockManager(4, 0)
