"""The block map on small hand-made pools: text exactly as expected, PNGs non-empty."""

from __future__ import annotations

import pytest

from minivllm.engine.block_manager import BlockManager
from minivllm.engine.sequence import Sequence
from minivllm.observe import plot_block_map, snapshot_blocks, text_block_map
from minivllm.sampling_params import SamplingParams


def _computed(bm: BlockManager, seq: Sequence) -> Sequence:
    bm.allocate(seq, seq.num_tokens - seq.num_computed_tokens)
    seq.num_computed_tokens = seq.num_tokens
    bm.cache_full_blocks(seq)
    return seq


def test_text_block_map_of_a_hand_made_pool():
    bm = BlockManager(num_blocks=10, block_size=4, enable_prefix_caching=True)
    params = SamplingParams(max_tokens=4)
    a = _computed(bm, Sequence("ra", list(range(10, 20)), params))  # 10 tokens: blocks 0,1,2 (2/4)
    b = _computed(bm, Sequence("rb", [7] * 5, params))  # 5 tokens: blocks 3, 4 (1/4)
    c = b.fork(1)
    bm.fork(b, c)  # c shares 3 and 4
    gone = _computed(bm, Sequence("rg", [9] * 4, params))  # one full block (5), cached when freed
    bm.free(gone)
    text = text_block_map(snapshot_blocks(bm, [a, b, c]), blocks_per_row=5)
    a_id, b_id, c_id = a.seq_id, b.seq_id, c.seq_id
    assert text.splitlines() == [
        "10 blocks x 4 slots   (letter = owning sequence, * shared, c free but cached, . free)",
        "     0 | AAA**",
        "     5 | c....",
        f"  A = seq {a_id} (request ra): blocks [0, 1, 2], last block 2/4 full",
        f"  B = seq {b_id} (request rb): blocks [3, 4], last block 1/4 full",
        f"  C = seq {c_id} (request rb): blocks [3, 4], last block 1/4 full",
    ]


def test_text_block_map_rejects_bad_input():
    with pytest.raises(TypeError):
        text_block_map([1, 2])
    with pytest.raises(ValueError, match="lacks"):
        text_block_map({"num_blocks": 4})
    with pytest.raises(ValueError, match="blocks_per_row"):
        text_block_map({"num_blocks": 1, "block_size": 1, "tables": {}}, blocks_per_row=0)


def test_block_map_png(tmp_path):
    bm = BlockManager(num_blocks=40, block_size=8)
    seqs = [_computed(bm, Sequence(str(i), list(range(4, 4 + 3 * i + 5)), SamplingParams())) for i in range(5)]
    path = plot_block_map(snapshot_blocks(bm, seqs), tmp_path / "map.png")
    assert path.stat().st_size > 5_000
