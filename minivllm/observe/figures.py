"""Figures without pyplot: built with `matplotlib.figure.Figure`, saved through the Agg canvas.

pyplot is never imported, so no window ever opens and a user's own pyplot state is left alone.
"""

from __future__ import annotations

from pathlib import Path


def new_figure(figsize):
    from matplotlib.figure import Figure

    return Figure(figsize=figsize)


def save_figure(fig, path) -> Path:
    """Lay out and write a PNG (creating the folder); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
