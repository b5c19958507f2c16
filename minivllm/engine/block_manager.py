"""The BlockManager: who owns which KV block, and which blocks hold a reusable prefix.

The KV cache is one big pool of fixed-size blocks (pages). A sequence's *block table* lists the
blocks that hold its tokens in order: token i lives in block `block_table[i // block_size]`, at
slot `i % block_size`. This class only does the bookkeeping (pure Python, no tensors); the model
runner turns block tables into slots and the kernels read and write the actual K/V.

Three ideas live here:

1. **Reference counts.** A block may be in several block tables at once (shared). It returns to
   the free list when its last holder lets go. A block with ref_count > 1 is read-only.

2. **Prefix caching.** When a block is *full* of computed tokens, its content is identified by a
   hash chaining the previous block's hash with its own token ids, so equal hashes mean "the same
   tokens after the same prefix", hence the same K/V. A new sequence looks up the hashes of its
   full blocks in order and reuses the longest run found: those tokens need no computing. A freed
   block keeps its hash and stays findable until the pool needs it for something else; the free
   list is LRU ordered, so the blocks evicted first are the ones unused the longest.

3. **Speculative decoding** computes draft tokens into slots like any token's; when drafts are
   rejected, `trim` returns the blocks past the sequence's computed tokens, which held only
   them. They were never hashed: only blocks full of known (accepted) tokens enter the cache.

4. **Fork and copy-on-write.** Parallel sampling (n > 1) forks a sequence: the child's table
   points at the parent's blocks, whose ref counts go up; nothing is copied. The first time a
   sequence must write into a shared block (the partly filled last block of the prompt), it gets
   a fresh block and a (src, dst) copy order that the model runner carries out before the forward.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Iterable

from minivllm.engine.sequence import Sequence

# The "previous block hash" of a sequence's first block.
_ROOT_HASH = hash("minivllm-prefix-root")


class KVBlock:
    """Bookkeeping for one physical block of the KV pool."""

    __slots__ = ("block_id", "ref_count", "hash", "parent_hash", "token_ids")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        # Set only while the block is registered in the prefix cache.
        self.hash: int | None = None
        self.parent_hash: int | None = None
        self.token_ids: tuple[int, ...] | None = None

    def __repr__(self) -> str:
        return f"KVBlock({self.block_id}, ref={self.ref_count}, cached={self.hash is not None})"


def hash_block(parent_hash: int, token_ids: tuple[int, ...]) -> int:
    """The prefix-cache key of a full block: its tokens *and* everything before them.

    Chaining the parent's hash makes two blocks with equal tokens but different prefixes
    different (their K/V differ, since attention saw different contexts).
    Python's 64-bit tuple hash is fine for a single-user engine; a server exposed to adversarial
    prompts would use a cryptographic hash so nobody can forge a collision.
    """
    return hash((parent_hash, token_ids))


class BlockManager:
    """Free list, reference counts and prefix cache of a pool of `num_blocks` KV blocks."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"num_blocks must be an int >= 1, got {num_blocks!r}")
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        # Free blocks in eviction order: the front is the least recently used.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._cache: dict[int, int] = {}  # block hash -> block id
        self._num_cached_free = 0  # free blocks still in the prefix cache (kept up to date: O(1))
        self._num_registered: dict[int, int] = {}  # seq_id -> full blocks already offered to cache
        # Cached blocks handed out for other content. Only this class can see an eviction happen,
        # so it counts them (on the eviction path, never on a decode's fast path).
        self.num_evictions = 0

    # ------------------------------------------------------------------------------------------
    # Small queries
    # ------------------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def num_cached_free_blocks(self) -> int:
        """Free blocks that still hold a findable prefix (evicted only when the pool needs them)."""
        return self._num_cached_free

    def ref_count(self, block_id: int) -> int:
        return self.blocks[block_id].ref_count

    def free_block_ids(self) -> list[int]:
        """Free blocks, least recently used first (the order they will be handed out)."""
        return list(self._free)

    def is_cached(self, block_id: int) -> bool:
        return self.blocks[block_id].hash is not None

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold `num_tokens` tokens."""
        return -(-num_tokens // self.block_size)

    # ------------------------------------------------------------------------------------------
    # Prefix cache lookup
    # ------------------------------------------------------------------------------------------
    def _update_block_hashes(self, seq: Sequence) -> None:
        """Extend seq.block_hashes to cover every full block of its known tokens."""
        bs = self.block_size
        for i in range(len(seq.block_hashes), seq.num_tokens // bs):
            parent = seq.block_hashes[i - 1] if i > 0 else _ROOT_HASH
            seq.block_hashes.append(hash_block(parent, tuple(seq.token_ids[i * bs : (i + 1) * bs])))

    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        """Block ids holding the longest cached prefix of `seq`'s tokens (possibly none).

        At most `num_tokens - 1` tokens are taken from the cache: the last token must be computed
        anyway, because its output is what gives the next token.
        """
        if not self.enable_prefix_caching:
            return []
        self._update_block_hashes(seq)
        bs = self.block_size
        max_blocks = (seq.num_tokens - 1) // bs
        found: list[int] = []
        for i in range(max_blocks):
            block_id = self._cache.get(seq.block_hashes[i])
            if block_id is None:
                break
            block = self.blocks[block_id]
            parent = seq.block_hashes[i - 1] if i > 0 else _ROOT_HASH
            # Compare the content too, so a hash collision can never serve a wrong prefix.
            if block.parent_hash != parent or block.token_ids != tuple(seq.token_ids[i * bs : (i + 1) * bs]):
                break
            found.append(block_id)
        return found

    # ------------------------------------------------------------------------------------------
    # Allocation
    # ------------------------------------------------------------------------------------------
    def _write_range(self, seq: Sequence, num_new_tokens: int, num_cached_blocks: int) -> tuple[int, int]:
        """First and one-past-last token position `seq` will write in this step."""
        start = seq.num_computed_tokens + num_cached_blocks * self.block_size
        return start, start + num_new_tokens

    def _shared_blocks_written(self, seq: Sequence, start: int) -> list[int]:
        """Indices in seq's table of shared blocks that a write from `start` on would touch."""
        first = start // self.block_size
        return [i for i in range(first, len(seq.block_table)) if self.blocks[seq.block_table[i]].ref_count > 1]

    def num_blocks_to_allocate(
        self, seq: Sequence, num_new_tokens: int, cached_blocks: Iterable[int] = ()
    ) -> int:
        """Free blocks that `allocate(seq, num_new_tokens, cached_blocks)` would consume."""
        cached_blocks = list(cached_blocks)
        start, end = self._write_range(seq, num_new_tokens, len(cached_blocks))
        have = len(seq.block_table) + len(cached_blocks)
        new_blocks = max(0, self.blocks_for(end) - have)
        cow_blocks = len(self._shared_blocks_written(seq, start))
        # A cached block nobody holds sits in the free list: taking it uses up a free block too.
        revived = sum(1 for b in cached_blocks if self.blocks[b].ref_count == 0)
        return new_blocks + cow_blocks + revived

    def _fits_in_own_blocks(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Do the next tokens fit in blocks `seq` already holds, none of them shared?"""
        table = seq.block_table
        start = seq.num_computed_tokens
        if not table or start + num_new_tokens > len(table) * self.block_size:
            return False
        blocks = self.blocks
        for i in range(start // self.block_size, len(table)):  # usually one block: the last
            if blocks[table[i]].ref_count != 1:
                return False
        return True

    def allocate(
        self, seq: Sequence, num_new_tokens: int, cached_blocks: Iterable[int] = ()
    ) -> list[tuple[int, int]] | None:
        """Make room in the cache for the next `num_new_tokens` tokens of `seq`.

        `cached_blocks` (from `find_cached_prefix`) is only for a sequence that holds no blocks
        yet: they become the start of its table, and the new tokens come after them.
        Returns the (src, dst) block copies to do before the forward (copy-on-write of shared
        blocks about to be written), or None, changing nothing, if the pool is too small now.
        """
        if num_new_tokens < 1:
            raise ValueError(f"num_new_tokens must be >= 1, got {num_new_tokens}")
        if not cached_blocks and self._fits_in_own_blocks(seq, num_new_tokens):
            # The common case of a decode step: the token lands in a block the sequence already
            # holds alone, so there is nothing to take and nothing to copy. (Checked first
            # because the scheduler asks this of every running sequence, every step.)
            return []
        cached_blocks = list(cached_blocks)
        if cached_blocks and (seq.block_table or seq.num_computed_tokens):
            raise ValueError("cached_blocks can only start the table of a sequence holding no blocks")
        if self.num_blocks_to_allocate(seq, num_new_tokens, cached_blocks) > self.num_free_blocks:
            return None
        start, end = self._write_range(seq, num_new_tokens, len(cached_blocks))
        for block_id in cached_blocks:
            self._take(block_id)
            seq.block_table.append(block_id)
        copies = [self._copy_on_write(seq, i) for i in self._shared_blocks_written(seq, start)]
        while len(seq.block_table) < self.blocks_for(end):
            seq.block_table.append(self._pop_free_block())
        return copies

    def _copy_on_write(self, seq: Sequence, table_index: int) -> tuple[int, int]:
        """Give `seq` a private copy of a shared block; return (src, dst) for the runner."""
        src = seq.block_table[table_index]
        dst = self._pop_free_block()
        self.blocks[src].ref_count -= 1  # was > 1, so it stays held by someone else
        seq.block_table[table_index] = dst
        return src, dst

    def _take(self, block_id: int) -> None:
        """Add a reference to a (cached) block, reviving it from the free list if needed."""
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self._free[block_id]
            self._num_cached_free -= 1  # only cached blocks are taken this way
        block.ref_count += 1

    def _pop_free_block(self) -> int:
        """The least recently used free block, evicted from the prefix cache if it was in it."""
        block_id, _ = self._free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None:
            if self._cache.get(block.hash) == block_id:
                del self._cache[block.hash]
            block.hash = block.parent_hash = block.token_ids = None
            self._num_cached_free -= 1
            self.num_evictions += 1
        block.ref_count = 1
        return block_id

    # ------------------------------------------------------------------------------------------
    # Prefix cache registration
    # ------------------------------------------------------------------------------------------
    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register the blocks of `seq` that are now full of computed tokens.

        Called after each step. If the same content is already cached in another block (two
        sequences computed the same prefix at the same time), the first one stays the cached copy.
        """
        if not self.enable_prefix_caching:
            return
        self._update_block_hashes(seq)
        bs = self.block_size
        # Full of tokens that are known (a pending token is not) and computed or being computed.
        num_full = min(min(seq.num_computed_tokens, seq.num_tokens) // bs, len(seq.block_table))
        for i in range(self._num_registered.get(seq.seq_id, 0), num_full):
            block = self.blocks[seq.block_table[i]]
            if block.hash is not None or seq.block_hashes[i] in self._cache:
                continue
            block.hash = seq.block_hashes[i]
            block.parent_hash = seq.block_hashes[i - 1] if i > 0 else _ROOT_HASH
            block.token_ids = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            self._cache[block.hash] = block.block_id
        self._num_registered[seq.seq_id] = max(num_full, self._num_registered.get(seq.seq_id, 0))

    # ------------------------------------------------------------------------------------------
    # Freeing and forking
    # ------------------------------------------------------------------------------------------
    def free(self, seq: Sequence) -> None:
        """Drop `seq`'s references to its blocks; blocks nobody holds go back to the free list.

        The table is released back to front, so a sequence's *last* blocks are evicted first and
        its first blocks (the prefix most likely to be shared) stay cached the longest.
        """
        for block_id in reversed(seq.block_table):
            self._release(block_id, seq)
        seq.block_table = []
        self._num_registered.pop(seq.seq_id, None)

    def trim(self, seq: Sequence) -> None:
        """Release the blocks at the end of `seq`'s table past its computed tokens (they held
        only rejected drafts), back to front, as `free` would."""
        keep = self.blocks_for(seq.num_computed_tokens)
        for block_id in reversed(seq.block_table[keep:]):
            self._release(block_id, seq)
        del seq.block_table[keep:]

    def _release(self, block_id: int, seq: Sequence) -> None:
        """Drop one reference; a block nobody holds goes back to the free list (and stays
        findable in the prefix cache, if it was in it, until it is handed out again)."""
        block = self.blocks[block_id]
        if block.ref_count <= 0:
            raise RuntimeError(f"double free of block {block_id} by sequence {seq.seq_id}")
        block.ref_count -= 1
        if block.ref_count == 0:
            self._free[block_id] = None
            self._num_cached_free += block.hash is not None

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Make `child` share every block of `parent` (no copy; ref counts go up)."""
        if child.block_table:
            raise ValueError(f"the child sequence {child.seq_id} already holds blocks")
        for block_id in parent.block_table:
            self.blocks[block_id].ref_count += 1
        child.block_table = list(parent.block_table)
        self._num_registered[child.seq_id] = self._num_registered.get(parent.seq_id, 0)
