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

3. **Fork and copy-on-write.** Parallel sampling (n > 1) forks a sequence: the child's table
   points at the parent's blocks, whose ref counts go up; nothing is copied. The first time a
   sequence must write into a shared block (the partly filled last block of the prompt), it gets
   a fresh block and a (src, dst) copy order that the model runner carries out before the forward.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict, dataclass
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


@dataclass
class BlockManagerStats:
    """A snapshot of the pool. Slots are token positions; a block has block_size of them."""

    num_blocks: int
    block_size: int
    num_free_blocks: int  # ref_count 0 (includes cached blocks that are free to evict)
    num_used_blocks: int  # ref_count > 0
    num_cached_blocks: int  # registered in the prefix cache (used or free)
    num_cached_free_blocks: int  # free, but still findable by the prefix cache
    num_shared_blocks: int  # ref_count > 1
    utilization: float  # used blocks / all blocks
    allocated_slots: int  # slots in used blocks
    used_slots: int  # slots holding (or about to hold) a token
    fragmentation: float  # (allocated - used) / allocated: waste inside partly filled blocks
    prefix_cache_queried_tokens: int
    prefix_cache_hit_tokens: int
    prefix_cache_hit_rate: float
    num_evictions: int  # cached blocks reused for other content
    num_cow_copies: int

    def to_dict(self) -> dict:
        return asdict(self)


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
        # Sequences that hold blocks, and how many token slots each has reserved.
        self._holders: dict[int, Sequence] = {}
        self._reserved_tokens: dict[int, int] = {}
        self._num_registered: dict[int, int] = {}  # seq_id -> full blocks already offered to cache
        self._queried_tokens = 0
        self._hit_tokens = 0
        self._evictions = 0
        self._cow_copies = 0

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

    def cached_block_ids(self) -> list[int]:
        return sorted(self._cache.values())

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
        return all(self.blocks[table[i]].ref_count == 1 for i in range(start // self.block_size, len(table)))

    def can_allocate(self, seq: Sequence, num_new_tokens: int, cached_blocks: Iterable[int] = ()) -> bool:
        return self.num_blocks_to_allocate(seq, num_new_tokens, cached_blocks) <= self.num_free_blocks

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
        cached_blocks = list(cached_blocks)
        if not cached_blocks and self._fits_in_own_blocks(seq, num_new_tokens):
            # The common case of a decode step: the token lands in a block the sequence already
            # holds alone, so there is nothing to take and nothing to copy. (Checked first
            # because the scheduler asks this of every running sequence, every step.)
            self._reserved_tokens[seq.seq_id] = seq.num_computed_tokens + num_new_tokens
            return []
        if cached_blocks and (seq.block_table or seq.num_computed_tokens):
            raise ValueError("cached_blocks can only start the table of a sequence holding no blocks")
        if not self.can_allocate(seq, num_new_tokens, cached_blocks):
            return None
        start, end = self._write_range(seq, num_new_tokens, len(cached_blocks))
        if not seq.block_table and self.enable_prefix_caching:
            self._queried_tokens += seq.num_tokens
            self._hit_tokens += len(cached_blocks) * self.block_size
        for block_id in cached_blocks:
            self._take(block_id)
            seq.block_table.append(block_id)
        copies = [self._copy_on_write(seq, i) for i in self._shared_blocks_written(seq, start)]
        while len(seq.block_table) < self.blocks_for(end):
            seq.block_table.append(self._pop_free_block())
        self._holders[seq.seq_id] = seq
        self._reserved_tokens[seq.seq_id] = end
        return copies

    def _copy_on_write(self, seq: Sequence, table_index: int) -> tuple[int, int]:
        """Give `seq` a private copy of a shared block; return (src, dst) for the runner."""
        src = seq.block_table[table_index]
        dst = self._pop_free_block()
        self.blocks[src].ref_count -= 1  # was > 1, so it stays held by someone else
        seq.block_table[table_index] = dst
        self._cow_copies += 1
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
            self._evictions += 1
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
        num_full = min(seq.num_computed_tokens // bs, len(seq.block_table))
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
            block = self.blocks[block_id]
            if block.ref_count <= 0:
                raise RuntimeError(f"double free of block {block_id} by sequence {seq.seq_id}")
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block_id] = None
                self._num_cached_free += block.hash is not None
        seq.block_table = []
        self._holders.pop(seq.seq_id, None)
        self._reserved_tokens.pop(seq.seq_id, None)
        self._num_registered.pop(seq.seq_id, None)

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Make `child` share every block of `parent` (no copy; ref counts go up)."""
        if child.block_table:
            raise ValueError(f"the child sequence {child.seq_id} already holds blocks")
        for block_id in parent.block_table:
            self.blocks[block_id].ref_count += 1
        child.block_table = list(parent.block_table)
        self._holders[child.seq_id] = child
        self._reserved_tokens[child.seq_id] = self._reserved_tokens.get(parent.seq_id, 0)
        self._num_registered[child.seq_id] = self._num_registered.get(parent.seq_id, 0)

    # ------------------------------------------------------------------------------------------
    # Statistics and pictures
    # ------------------------------------------------------------------------------------------
    def _used_slots_per_block(self) -> dict[int, int]:
        """For each held block, how many of its slots hold (or are reserved for) a token."""
        bs = self.block_size
        filled: dict[int, int] = {}
        for seq_id, seq in self._holders.items():
            reserved = self._reserved_tokens.get(seq_id, 0)
            for i, block_id in enumerate(seq.block_table):
                n = min(bs, max(0, reserved - i * bs))
                filled[block_id] = max(filled.get(block_id, 0), n)
        return filled

    def stats(self) -> BlockManagerStats:
        """Full statistics. Costs a pass over the held blocks: the per-step record uses the O(1)
        counters (num_free_blocks, num_used_blocks, num_cached_free_blocks) instead."""
        filled = self._used_slots_per_block()
        allocated_slots = self.num_used_blocks * self.block_size
        used_slots = sum(filled.values())
        return BlockManagerStats(
            num_blocks=self.num_blocks,
            block_size=self.block_size,
            num_free_blocks=self.num_free_blocks,
            num_used_blocks=self.num_used_blocks,
            num_cached_blocks=len(self._cache),
            num_cached_free_blocks=self.num_cached_free_blocks,
            num_shared_blocks=sum(1 for b in filled if self.blocks[b].ref_count > 1),
            utilization=self.num_used_blocks / self.num_blocks,
            allocated_slots=allocated_slots,
            used_slots=used_slots,
            fragmentation=(allocated_slots - used_slots) / allocated_slots if allocated_slots else 0.0,
            prefix_cache_queried_tokens=self._queried_tokens,
            prefix_cache_hit_tokens=self._hit_tokens,
            prefix_cache_hit_rate=self._hit_tokens / self._queried_tokens if self._queried_tokens else 0.0,
            num_evictions=self._evictions,
            num_cow_copies=self._cow_copies,
        )

    def render_block_map(self, blocks_per_row: int = 32) -> str:
        """A text picture of the pool, then each sequence's block table.

        One character per block:  '.' free  'c' free but cached (reusable prefix)
        '#' held by one sequence  '2'..'9' held by that many ('+' for more).
        Whole rows of free blocks are folded into one line, so big pools stay readable.
        """
        cells = []
        for block in self.blocks:
            if block.ref_count == 0:
                cells.append("c" if block.hash is not None else ".")
            elif block.ref_count == 1:
                cells.append("#")
            else:
                cells.append(str(block.ref_count) if block.ref_count < 10 else "+")
        s = self.stats()
        lines = [
            f"KV pool: {self.num_blocks} blocks x {self.block_size} slots | used {s.num_used_blocks} "
            f"(shared {s.num_shared_blocks}) | free {s.num_free_blocks} (cached {s.num_cached_free_blocks})"
            f" | utilization {s.utilization:.0%} | fragmentation {s.fragmentation:.0%}",
        ]
        # Rows of never-used blocks say nothing: a run of them is folded into one line.
        idle_from = None
        for row in range(0, self.num_blocks + blocks_per_row, blocks_per_row):
            text = "".join(cells[row:row + blocks_per_row])
            if text and set(text) == {"."}:
                idle_from = row if idle_from is None else idle_from
                continue
            if idle_from is not None:
                lines.append(f"  {idle_from:>5} | ... blocks {idle_from}-{min(row, self.num_blocks) - 1} free")
                idle_from = None
            if text:
                lines.append(f"  {row:>5} | {text}")
        for seq in sorted(self._holders.values(), key=lambda q: q.seq_id):
            shared = [b for b in seq.block_table if self.blocks[b].ref_count > 1]
            note = f"  shared: {shared}" if shared else ""
            lines.append(
                f"  seq {seq.seq_id} (request {seq.request_id}, {self._reserved_tokens.get(seq.seq_id, 0)} "
                f"slots): {seq.block_table}{note}"
            )
        return "\n".join(lines)
