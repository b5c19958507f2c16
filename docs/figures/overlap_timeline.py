"""Draws docs/figures/overlap_timeline.png: the engine loop with overlap off and on (a schematic).

    python docs/figures/overlap_timeline.py

Bar lengths are illustrative, not measured (the measured numbers are in benchmarks/RESULTS.md):
per step the host plans, packs and launches (2 units) and folds the tokens in (1 unit); the GPU
computes for 8 units. With overlap one step is in flight while the host plans the next.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

PLAN, FOLD, GPU, STEPS = 2.0, 1.0, 8.0, 4
COLOURS = {"host": "tab:blue", "gpu": "tab:orange", "wait": "0.85"}


def timeline(overlap: bool):
    """(lane, start, length, kind, label) bars of STEPS steps, as LLMEngine.step() orders them."""
    bars, t, gpu_free, done = [], 0.0, 0.0, []

    def fold(n):  # wait for step n's tokens, then fold them in
        nonlocal t
        if done[n] > t:
            bars.append(("host", t, done[n] - t, "wait", "wait"))
            t = done[n]
        bars.append(("host", t, FOLD, "host", f"fold {n}"))
        t += FOLD

    for n in range(STEPS):
        bars.append(("host", t, PLAN, "host", f"plan {n}"))
        t += PLAN
        start = max(t, gpu_free)
        bars.append(("gpu", start, GPU, "gpu", f"step {n}"))
        gpu_free = start + GPU
        done.append(gpu_free)
        if overlap and n > 0:
            fold(n - 1)  # the previous step, while step n runs
        elif not overlap:
            fold(n)
    if overlap:
        fold(STEPS - 1)
    return bars, t


def main(out: Path = Path(__file__).with_name("overlap_timeline.png")) -> Path:
    fig = Figure(figsize=(10, 3.2))
    axes = fig.subplots(2, 1, sharex=True)
    for ax, overlap in zip(axes, (False, True)):
        bars, end = timeline(overlap)
        for lane, start, length, kind, label in bars:
            y = 1 if lane == "host" else 0
            ax.broken_barh([(start, length)], (y - 0.35, 0.7), color=COLOURS[kind], edgecolor="white")
            ax.text(start + length / 2, y, label, ha="center", va="center", fontsize=7)
        ax.set_yticks([0, 1], ["GPU", "host"])
        ax.set_title(("overlap on (async_scheduling=True): step n+1 is planned and launched before step n "
                      "is folded in" if overlap else "overlap off: the GPU idles while the host plans and folds in"),
                     fontsize=9)
        ax.axvline(end, color="k", linestyle=":", linewidth=1)
    axes[-1].set_xlabel("time (schematic units)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return out


if __name__ == "__main__":
    print(main())
