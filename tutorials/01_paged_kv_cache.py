"""Tutorial 1: the paged KV cache — blocks, block tables, slots, reference counts, prefix sharing.

    python tutorials/01_paged_kv_cache.py [--out DIR] [--smoke]

A transformer must keep the keys and values (K/V) of every token it has seen. A naive engine gives
each sequence one contiguous buffer of max_model_len tokens and wastes most of it. PagedAttention
cuts the cache into fixed-size *blocks* (pages) and gives each sequence a *block table*: the list
of physical blocks holding its tokens, in order. Memory is then allocated a block at a time, and
blocks can be shared between sequences, like pages between processes in an operating system.

Part 1 drives the real `BlockManager` by hand (no model: it is pure bookkeeping).
Part 2 runs the real engine and finds a token's K vector in the real cache tensor.
"""

from __future__ import annotations

import torch
from common import heading, parse_args, tiny_model

from minivllm import LLM, SamplingParams
from minivllm.engine.block_manager import BlockManager
from minivllm.engine.sequence import Sequence
from minivllm.observe import kv_cache_stats, plot_block_map, snapshot_blocks, text_block_map

BLOCK_SIZE = 4


def show(bm: BlockManager, seqs: list[Sequence], what: str) -> None:
    print(f"\n-- {what}")
    print(text_block_map(snapshot_blocks(bm, seqs)))


def part1_bookkeeping(out) -> None:
    heading("Part 1: the BlockManager, by hand (block_size = 4 tokens)")
    bm = BlockManager(num_blocks=16, block_size=BLOCK_SIZE, enable_prefix_caching=True)
    params = SamplingParams(max_tokens=8)

    # A 10-token prompt needs ceil(10 / 4) = 3 blocks; the last one holds 2 tokens, 2 slots idle.
    a = Sequence("A", list(range(100, 110)), params)
    bm.allocate(a, a.num_tokens)
    a.num_computed_tokens = a.num_tokens  # pretend the forward pass wrote the K/V
    bm.cache_full_blocks(a)  # full blocks become findable by their content (prefix caching)
    show(bm, [a], "sequence A: a 10-token prompt gets 3 blocks")
    print(f"   token 9 of A lives in block {a.block_table[9 // BLOCK_SIZE]}, offset {9 % BLOCK_SIZE}: "
          f"flat slot {a.block_table[9 // BLOCK_SIZE] * BLOCK_SIZE + 9 % BLOCK_SIZE}")
    stats = kv_cache_stats(bm, [a])
    print(f"   {stats['allocated_slots']} slots allocated, {stats['used_slots']} used: internal fragmentation "
          f"{stats['fragmentation']:.0%} — the waste is at most block_size - 1 slots per sequence")

    # Sequence B starts with the same 8 tokens (a shared system prompt, say): its first two blocks
    # are found in the prefix cache and *shared*, so their K/V is neither recomputed nor stored twice.
    b = Sequence("B", list(range(100, 108)) + [7, 7, 7], params)
    cached = bm.find_cached_prefix(b)
    bm.allocate(b, b.num_tokens - len(cached) * BLOCK_SIZE, cached)
    b.num_computed_tokens = b.num_tokens
    show(bm, [a, b], f"sequence B shares A's first {len(cached)} blocks (prefix cache hit)")
    print(f"   reference counts of B's blocks: {[bm.ref_count(x) for x in b.block_table]}  "
          "(2 = shared, read-only)")

    # Forking for parallel sampling (n > 1): the child points at the same blocks, nothing copied.
    c = b.fork(1)
    bm.fork(b, c)
    show(bm, [a, b, c], "C = a fork of B (another sample of the same request)")
    plot_block_map(snapshot_blocks(bm, [a, b, c]), out / "block_map_by_hand.png",
                   title="Tutorial 1: A, B sharing a prefix, C forked from B")

    # C samples token 42. Its K/V is not in the cache yet: the next step computes it and writes it
    # into C's last block, which is shared and partly filled, so C first gets its own copy.
    c.append_token(42)
    copies = bm.allocate(c, 1)  # the slot for the one token the next step computes
    print(f"\n-- C samples a token; the step that writes its K/V needs a private last block: "
          f"copy-on-write, copies (src, dst) = {copies}")

    for seq in (a, b, c):
        bm.free(seq)
    show(bm, [], "everything freed: full blocks stay cached ('c') until the pool needs them")


def part2_real_cache(out, model: str) -> None:
    heading("Part 2: the same thing inside the real engine")
    # async_scheduling=False: each engine.step() runs one step start to finish, so what we print
    # between steps is that step's complete result (the engine's default overlaps steps).
    llm = LLM(model, device="cpu", block_size=BLOCK_SIZE, num_kv_blocks=32, max_num_seqs=4, max_model_len=64,
              async_scheduling=False)
    engine = llm.engine
    prompt = list(range(10, 23))  # 13 token ids
    engine.add_request(prompt, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    engine.add_request(prompt[:8] + [5, 6, 7], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    engine.step()  # one step: both prompts prefilled, each samples its first token
    print(f"   after step 1, prefix-cache hits: {engine.get_stats()['kv_cache']['prefix_cache_hit_tokens']} tokens "
          "(both prompts were prefilled in the same step, so neither could reuse the other)")
    # A request arriving now finds the first two blocks of the first prompt in the cache.
    engine.add_request(prompt[:8] + [9, 9], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    engine.step()
    print(f"   after step 2, prefix-cache hits: {engine.get_stats()['kv_cache']['prefix_cache_hit_tokens']} tokens "
          "(the third prompt reused 2 blocks = 8 tokens of the first)")
    seqs = list(engine.scheduler.running)
    # A step samples a token from the model's output at the last position, so the token it sampled
    # has not been through the model yet: its K/V is written by the *next* step, which takes it as
    # input. The cache therefore holds num_computed_tokens = num_tokens - 1 tokens of a decoding
    # sequence, and that is what the block map counts.
    print("   (the newest token of each sequence was just sampled: its K/V is written by the next step)")
    for seq in seqs:
        print(f"   seq {seq.seq_id}: {seq.num_tokens} tokens, {seq.num_computed_tokens} of them in the cache, "
              f"block table {seq.block_table}")
    snap = snapshot_blocks(engine.block_manager, seqs)
    print(text_block_map(snap))
    plot_block_map(snap, out / "block_map_engine.png", title="Tutorial 1: the engine's pool after two steps")

    # Where does token 5 of the first sequence keep its key? Layer 0's K cache, at its slot.
    seq = seqs[0]
    block, offset = seq.block_table[5 // BLOCK_SIZE], 5 % BLOCK_SIZE
    k_cache, _ = engine.executor.runner.kv_caches[0]
    print(f"\n   k_cache of layer 0 has shape {tuple(k_cache.shape)} = [blocks, block_size, kv_heads, head_dim]")
    print(f"   token 5 -> block {block}, offset {offset}; its key (head 0, first 6 dims):")
    print("  ", k_cache[block, offset, 0, :6])
    untouched = [b for b in range(engine.block_manager.num_blocks)
                 if all(b not in s.block_table for s in seqs) and torch.count_nonzero(k_cache[b]) == 0]
    print(f"   blocks no sequence has touched are still all zeros: {len(untouched)} of them")
    while engine.has_unfinished_requests():
        engine.step()


def main() -> None:
    args = parse_args(__doc__.split("\n")[0], "01_paged_kv_cache")
    part1_bookkeeping(args.out)
    part2_real_cache(args.out, tiny_model(args.model))
    print(f"\nFigures written to {args.out}")


if __name__ == "__main__":
    main()
