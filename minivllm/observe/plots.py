"""Pictures of a run: the schedule timeline, throughput and KV usage over time, the block map.

All of them take *step events* (see `trace.py`; `events_from_history` makes them from the
scheduler's records when no trace was on), so the same code draws a live engine and a trace file.

Figures are built with `matplotlib.figure.Figure` and saved through the Agg canvas directly:
pyplot is never imported, so no window ever opens and a user's own pyplot state is left alone.
"""

from __future__ import annotations

from pathlib import Path

from minivllm.observe.figures import new_figure, save_figure

PREFILL_COLOUR, DECODE_COLOUR, PREEMPT_COLOUR = "tab:blue", "tab:orange", "tab:red"


def _check_events(events) -> list[dict]:
    events = list(events)
    if not events:
        raise ValueError("no step events to draw (run some steps first)")
    return events


def _moving_average(values: list[float], window: int) -> list[float]:
    """Mean over the last `window` values at each point: per-step rates are noisy."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


# ---------------------------------------------------------------------------------------------
# Schedule timeline
# ---------------------------------------------------------------------------------------------
def plot_timeline(events, path, title: str = "Schedule timeline") -> Path:
    """Per step: prefill and decode tokens stacked; below, running and waiting sequences.

    Preemptions are marked in red on both panels: the moment memory ran out and a sequence was
    sent back to the queue.
    """
    events = _check_events(events)
    steps = [e["step"] for e in events]
    prefill = [e["num_prefill_tokens"] for e in events]
    decode = [e["num_decode_tokens"] for e in events]
    preempt = [(e["step"], len(e["preemptions"])) for e in events if e["preemptions"]]

    fig = new_figure(figsize=(10, 6))
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    width = 1.0 if len(steps) > 60 else 0.8
    top.bar(steps, prefill, width=width, color=PREFILL_COLOUR, label="prefill tokens")
    top.bar(steps, decode, width=width, bottom=prefill, color=DECODE_COLOUR, label="decode tokens")
    budget = events[-1]["token_budget"]
    peak = max(p + d for p, d in zip(prefill, decode))
    if peak >= 0.3 * budget:  # otherwise the budget line would flatten every bar
        top.axhline(budget, color="0.3", linestyle="--", linewidth=1, label=f"token budget ({budget})")
    if preempt:
        top.scatter([s for s, _ in preempt], [peak * 1.05] * len(preempt), marker="v", s=40,
                    color=PREEMPT_COLOUR, zorder=3, label="preemption")
    top.set_ylim(0, max(peak, budget if peak >= 0.3 * budget else 0) * 1.4)  # headroom for the legend
    top.set_ylabel("tokens in the step")
    top.set_title(f"{title}: {len(events)} steps, {sum(prefill)} prefill + {sum(decode)} decode tokens, "
                  f"{sum(n for _, n in preempt)} preemptions", fontsize=10)
    top.legend(loc="upper left", fontsize=8, ncol=4)

    bottom.step(steps, [e["num_running"] for e in events], where="mid", label="running", color="tab:green")
    bottom.step(steps, [e["num_waiting"] for e in events], where="mid", label="waiting", color="tab:purple")
    for step, _ in preempt:
        bottom.axvline(step, color=PREEMPT_COLOUR, alpha=0.4, linewidth=1)
    bottom.set_xlabel("engine step")
    bottom.set_ylabel("sequences")
    bottom.legend(loc="upper right", fontsize=8)
    return save_figure(fig, path)


# ---------------------------------------------------------------------------------------------
# Throughput and KV usage over time
# ---------------------------------------------------------------------------------------------
def fragmentation_of(event: dict) -> float | None:
    """Internal fragmentation of the pool at a step, from its block snapshot (None without one)."""
    from minivllm.observe.block_map import block_fill

    snap = event.get("blocks")
    if not snap:
        return None
    fill = block_fill(snap)
    held = {b for table in snap["tables"].values() for b in table}
    allocated = len(held) * snap["block_size"]
    return (allocated - sum(fill[b] for b in held)) / allocated if allocated else 0.0


def plot_throughput(events, path, num_blocks: int | None = None, title: str = "Throughput and KV usage") -> Path:
    """Top: tokens per second over time (computed and generated). Bottom: KV pool use over time."""
    events = _check_events(events)
    t = [e["t"] for e in events]
    times = [max(e.get("step_time") or 0.0, 1e-9) for e in events]
    window = max(1, len(events) // 30)
    computed = _moving_average([e["num_batched_tokens"] / dt for e, dt in zip(events, times)], window)

    fig = new_figure(figsize=(10, 6))
    top, bottom = fig.subplots(2, 1, sharex=True)
    top.plot(t, computed, color=PREFILL_COLOUR, label="tokens computed / s (prefill + decode)")
    if all("num_sampled" in e for e in events):  # (accepted drafts too, in traces that have them)
        generated = _moving_average([e.get("num_generated_tokens", e["num_sampled"]) / dt
                                     for e, dt in zip(events, times)], window)
        top.plot(t, generated, color=DECODE_COLOUR, label="tokens generated / s")
    top.set_ylabel("tokens / s")
    note = f" (moving average over {window} steps)" if window > 1 else ""
    top.set_title(f"{title}{note}", fontsize=10)
    top.legend(loc="upper right", fontsize=8)

    total = num_blocks or (events[-1]["num_used_blocks"] + events[-1]["num_free_blocks"])
    used = [100 * e["num_used_blocks"] / total for e in events]
    cached = [100 * e["num_cached_free_blocks"] / total for e in events]
    bottom.stackplot(t, used, cached, colors=["tab:green", "0.75"],
                     labels=["blocks in use", "free blocks holding a cached prefix"])
    frag = [fragmentation_of(e) for e in events]
    if all(f is not None for f in frag):
        bottom.plot(t, [100 * f for f in frag], color="black", linewidth=1,
                    label="internal fragmentation (% of allocated slots)")
    bottom.set_ylim(0, 100)
    bottom.set_xlabel("time since the first step (s)")
    bottom.set_ylabel(f"% of the {total} KV blocks")
    bottom.legend(loc="upper right", fontsize=8)
    return save_figure(fig, path)


# ---------------------------------------------------------------------------------------------
# Everything at once
# ---------------------------------------------------------------------------------------------
def busiest_snapshot(events) -> dict | None:
    """The block snapshot of the step holding the most blocks (the most telling block map)."""
    with_blocks = [e for e in events if e.get("blocks")]
    if not with_blocks:
        return None
    return max(with_blocks, key=lambda e: e["num_used_blocks"])["blocks"]


def visualize(events, out_dir, snapshot: dict | None = None, num_blocks: int | None = None) -> dict[str, Path]:
    """Write timeline.png, throughput.png and (given a snapshot, or one in the events)
    block_map.png + block_map.txt into `out_dir`; returns {name: path}."""
    from minivllm.observe.block_map import plot_block_map, text_block_map

    events = _check_events(events)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "timeline": plot_timeline(events, out / "timeline.png"),
        "throughput": plot_throughput(events, out / "throughput.png", num_blocks=num_blocks),
    }
    step = None
    if snapshot is None:
        snapshot = busiest_snapshot(events)
        step = max((e for e in events if e.get("blocks")), key=lambda e: e["num_used_blocks"],
                   default={}).get("step")
    if snapshot is not None:
        where = f" at step {step} (the fullest)" if step is not None else ""
        paths["block_map"] = plot_block_map(snapshot, out / "block_map.png", title=f"KV cache block map{where}")
        text_path = out / "block_map.txt"
        text_path.write_text(text_block_map(snapshot) + "\n")
        paths["block_map_text"] = text_path
    return paths
