"""The KV block map: which sequence owns which physical block, as text and as a picture.

`BlockManager.render_block_map()` shows the pool by *reference count* ('#' held once, '2' shared
by two, 'c' cached). This module shows it by *owner*, which is what makes paging visible: a
sequence's blocks are scattered over the pool, shared prompt blocks belong to several sequences,
and the last block of each sequence is only partly filled (internal fragmentation).

Both views start from a *snapshot*, plain data that a trace can store for every step:

    {"num_blocks": 16, "block_size": 4,
     "tables": {"3": [0, 5, 2]},          # seq id -> block table (JSON keys are strings)
     "requests": {"3": "req-0"},          # seq id -> request id
     "filled": {"3": 10},                 # seq id -> slots holding its tokens
     "cached": [7, 8]}                    # free blocks still holding a reusable prefix
"""

from __future__ import annotations

import string

# One letter per sequence in the text map (the 53rd sequence and later share '@').
_SEQ_LETTERS = string.ascii_uppercase + string.ascii_lowercase
FREE, CACHED, SHARED = ".", "c", "*"
# Above this many blocks a cell per block is unreadable and slow to draw: one pixel per block.
MAX_DRAWN_BLOCKS = 1024


def snapshot_blocks(block_manager, seqs, new_tokens: dict[int, int] | None = None) -> dict:
    """A JSON-ready snapshot of the pool's ownership.

    seqs: the sequences holding blocks (the scheduler's running list).
    new_tokens: seq id -> tokens scheduled but not computed yet (inside a step, their slots are
        already reserved); between steps leave it out.
    """
    new_tokens = new_tokens or {}
    bm = block_manager
    return {
        "num_blocks": bm.num_blocks,
        "block_size": bm.block_size,
        "tables": {str(s.seq_id): list(s.block_table) for s in seqs if s.block_table},
        "requests": {str(s.seq_id): s.request_id for s in seqs if s.block_table},
        "filled": {
            str(s.seq_id): s.num_computed_tokens + new_tokens.get(s.seq_id, 0) for s in seqs if s.block_table
        },
        "cached": [b for b in bm.free_block_ids() if bm.is_cached(b)],
    }


def kv_cache_stats(block_manager, seqs) -> dict:
    """The pool right now: used, free, cached and shared blocks, and the slots wasted inside
    partly filled blocks (internal fragmentation). A pass over the held blocks only (the block
    tables of `seqs`), never over the whole pool: a GPU pool has tens of thousands of blocks, and
    a benchmark samples this while the engine runs."""
    bm, bs = block_manager, block_manager.block_size
    fill: dict[int, int] = {}
    holders: dict[int, int] = {}
    for seq in seqs:
        tokens = seq.num_computed_tokens
        for i, block in enumerate(seq.block_table):
            fill[block] = max(fill.get(block, 0), min(bs, max(0, tokens - i * bs)))
            holders[block] = holders.get(block, 0) + 1
    allocated = len(fill) * bs
    used_slots = sum(fill.values())
    return {
        "num_blocks": bm.num_blocks,
        "block_size": bs,
        "num_free_blocks": bm.num_free_blocks,
        "num_used_blocks": bm.num_used_blocks,
        "num_cached_free_blocks": bm.num_cached_free_blocks,
        "num_shared_blocks": sum(1 for n in holders.values() if n > 1),
        "utilization": bm.num_used_blocks / bm.num_blocks,
        "allocated_slots": allocated,
        "used_slots": used_slots,
        "fragmentation": (allocated - used_slots) / allocated if allocated else 0.0,
        "num_evictions": bm.num_evictions,
    }


def _check_snapshot(snapshot: dict) -> None:
    if not isinstance(snapshot, dict):
        raise TypeError(f"snapshot must be a dict (see snapshot_blocks), got {type(snapshot).__name__}")
    missing = {"num_blocks", "block_size", "tables"} - set(snapshot)
    if missing:
        raise ValueError(f"snapshot lacks {sorted(missing)}")


def block_owners(snapshot: dict) -> list[list[str]]:
    """For each physical block, the seq ids (as strings) whose tables hold it, in seq-id order."""
    _check_snapshot(snapshot)
    owners: list[list[str]] = [[] for _ in range(snapshot["num_blocks"])]
    for seq_id in sorted(snapshot["tables"], key=int):
        for block in snapshot["tables"][seq_id]:
            owners[block].append(seq_id)
    return owners


def block_fill(snapshot: dict) -> list[int]:
    """Slots in use in each block: full blocks hold block_size tokens, the last one fewer.

    A shared block counts the most any of its holders put there.
    """
    bs = snapshot["block_size"]
    fill = [0] * snapshot["num_blocks"]
    filled = snapshot.get("filled", {})
    for seq_id, table in snapshot["tables"].items():
        tokens = filled.get(seq_id, len(table) * bs)
        for i, block in enumerate(table):
            fill[block] = max(fill[block], min(bs, max(0, tokens - i * bs)))
    return fill


def seq_letters(snapshot: dict) -> dict[str, str]:
    """The letter standing for each sequence in the text map, by ascending seq id."""
    ids = sorted(snapshot["tables"], key=int)
    return {seq_id: _SEQ_LETTERS[i] if i < len(_SEQ_LETTERS) else "@" for i, seq_id in enumerate(ids)}


def text_block_map(snapshot: dict, blocks_per_row: int = 32) -> str:
    """The pool as rows of characters: a letter per owning sequence, '*' shared, 'c' cached, '.' free.

    Below the grid, a legend maps each letter to its sequence, request and block table.
    """
    _check_snapshot(snapshot)
    if isinstance(blocks_per_row, bool) or not isinstance(blocks_per_row, int) or blocks_per_row < 1:
        raise ValueError(f"blocks_per_row must be an int >= 1, got {blocks_per_row!r}")
    letters = seq_letters(snapshot)
    cached = set(snapshot.get("cached", ()))
    cells = []
    for block, owners in enumerate(block_owners(snapshot)):
        if len(owners) > 1:
            cells.append(SHARED)
        elif owners:
            cells.append(letters[owners[0]])
        else:
            cells.append(CACHED if block in cached else FREE)
    n = snapshot["num_blocks"]
    lines = [(f"{n} blocks x {snapshot['block_size']} slots   "
              f"(letter = owning sequence, {SHARED} shared, {CACHED} free but cached, {FREE} free)")]
    idle_from = None  # runs of all-free rows are folded into one line, so big pools stay short
    for row in range(0, n, blocks_per_row):
        text = "".join(cells[row:row + blocks_per_row])
        if set(text) == {FREE} and row + blocks_per_row < n:
            idle_from = row if idle_from is None else idle_from
            continue
        if idle_from is not None:
            lines.append(f"{idle_from:>6} | ... blocks {idle_from}-{row - 1} free")
            idle_from = None
        lines.append(f"{row:>6} | {text}")
    fill = block_fill(snapshot)
    requests = snapshot.get("requests", {})
    for seq_id, letter in letters.items():
        table = snapshot["tables"][seq_id]
        last = fill[table[-1]]
        lines.append(f"  {letter} = seq {seq_id} (request {requests.get(seq_id, '?')}): blocks {table}, "
                     f"last block {last}/{snapshot['block_size']} full")
    return "\n".join(lines)


def plot_block_map(snapshot: dict, path, title: str = "KV cache block map", blocks_per_row: int | None = None):
    """Draw the pool as a grid of cells, coloured by owning sequence; save a PNG at `path`.

    The filled part of each cell is drawn solid and the empty slots pale, so the waste inside the
    last block of each sequence is visible. Shared blocks are hatched and labelled with their
    number of holders; cached free blocks are grey.
    """
    from matplotlib.patches import Patch, Rectangle

    from minivllm.observe.figures import new_figure, save_figure

    _check_snapshot(snapshot)
    if snapshot["num_blocks"] > MAX_DRAWN_BLOCKS:
        return _plot_large_block_map(snapshot, path, title)
    n, bs = snapshot["num_blocks"], snapshot["block_size"]
    cols = blocks_per_row or min(n, 16 if n <= 128 else 32)
    rows = -(-n // cols)
    owners, fill = block_owners(snapshot), block_fill(snapshot)
    cached = set(snapshot.get("cached", ()))
    ids = sorted(snapshot["tables"], key=int)
    # tab10's colours are the most distinct; tab20 (pairs of shades) only when there are more.
    cmap, k = (matplotlib_colormap("tab10"), 10) if len(ids) <= 10 else (matplotlib_colormap("tab20"), 20)
    colour = {seq_id: cmap(i % k) for i, seq_id in enumerate(ids)}

    fig = new_figure(figsize=(min(14, 1.0 + 0.55 * cols), 1.6 + 0.55 * rows))
    ax = fig.add_subplot()
    for block in range(n):
        x, y = block % cols, rows - 1 - block // cols
        who = owners[block]
        if who:
            face = colour[who[0]]
            frac = fill[block] / bs
            ax.add_patch(Rectangle((x, y), 1, 1, facecolor=face, alpha=0.25, edgecolor="none"))
            ax.add_patch(Rectangle((x, y), frac, 1, facecolor=face, edgecolor="none",
                                   hatch="///" if len(who) > 1 else None))
            label = f"x{len(who)}" if len(who) > 1 else str(block)
        else:
            ax.add_patch(Rectangle((x, y), 1, 1, facecolor="0.75" if block in cached else "white",
                                   edgecolor="none"))
            label = str(block)
        ax.add_patch(Rectangle((x, y), 1, 1, fill=False, edgecolor="0.3", linewidth=0.8))
        if n <= 512:
            ax.text(x + 0.5, y + 0.5, label, ha="center", va="center", fontsize=7 if n <= 128 else 5,
                    bbox={"boxstyle": "round,pad=0.1", "facecolor": "white", "alpha": 0.7, "linewidth": 0} if who else None)
    ax.set_xlim(0, cols)
    ax.set_ylim(0, rows)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([r + 0.5 for r in range(rows)])
    ax.set_yticklabels([str((rows - 1 - r) * cols) for r in range(rows)], fontsize=7)
    ax.set_ylabel("first block id of the row")
    ax.set_xlabel("physical blocks, in id order (solid part = slots holding tokens)")

    requests = snapshot.get("requests", {})
    handles = [Patch(facecolor=colour[s], label=f"seq {s} (req {requests.get(s, '?')})") for s in ids[:12]]
    if len(ids) > 12:
        handles.append(Patch(facecolor="white", edgecolor="none", label=f"... {len(ids) - 12} more"))
    handles += [Patch(facecolor="white", edgecolor="0.3", hatch="///", label="shared (xN holders)"),
                Patch(facecolor="0.75", label="free, cached prefix"),
                Patch(facecolor="white", edgecolor="0.3", label="free")]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    used = sum(1 for o in owners if o)
    allocated = used * bs
    waste = (allocated - sum(fill)) / allocated if allocated else 0.0
    ax.set_title(f"{title}\n{used}/{n} blocks used ({used / n:.0%}), {len(cached)} cached free, "
                 f"internal fragmentation {waste:.0%}", fontsize=10)
    return save_figure(fig, path)


def _plot_large_block_map(snapshot: dict, path, title: str):
    """A big pool as an image, one pixel per block (owner colour, grey cached, white free)."""
    import numpy as np
    from matplotlib.patches import Patch

    from minivllm.observe.figures import new_figure, save_figure

    n = snapshot["num_blocks"]
    cols = 128
    rows = -(-n // cols)
    owners = block_owners(snapshot)
    cached = set(snapshot.get("cached", ()))
    ids = sorted(snapshot["tables"], key=int)
    cmap = matplotlib_colormap("tab20")
    colour = {seq_id: cmap(i % 20)[:3] for i, seq_id in enumerate(ids)}
    image = np.ones((rows * cols, 3))
    for block, who in enumerate(owners):
        if who:
            image[block] = np.array(colour[who[0]]) * (0.6 if len(who) > 1 else 1.0)  # shared: darker
        elif block in cached:
            image[block] = 0.75
    image[n:] = 0.5  # past the end of the pool
    fig = new_figure(figsize=(10, 1.5 + min(6.0, rows * 0.06)))
    ax = fig.add_subplot()
    ax.imshow(image.reshape(rows, cols, 3), aspect="auto", interpolation="nearest")
    ax.set_xlabel(f"block id mod {cols}")
    ax.set_ylabel(f"block id // {cols}")
    used = sum(1 for o in owners if o)
    ax.set_title(f"{title}\n{used}/{n} blocks used by {len(ids)} sequences, {len(cached)} cached free "
                 "(one pixel per block; darker = shared)", fontsize=10)
    ax.legend(handles=[Patch(facecolor="0.75", label="free, cached prefix"),
                       Patch(facecolor="white", edgecolor="0.3", label="free")],
              loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    return save_figure(fig, path)


def matplotlib_colormap(name: str):
    import matplotlib

    return matplotlib.colormaps[name]
