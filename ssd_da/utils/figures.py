"""The plotting convention of the project: every plot is a bare ``matplotlib.figure.Figure``
(no pyplot, so no global state and no interactive backend: safe in scripts, tests, worker
processes and on headless machines), saved with :func:`save_figure`."""
from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

from matplotlib.figure import Figure

__all__ = ["save_figure"]


def save_figure(fig: Figure, path: str | Path | BinaryIO, dpi: float | None = None) -> Path | BinaryIO:
    """Write ``fig`` to ``path`` (format from the suffix; parent folders created) at ``dpi``
    (default: the figure's own, so a figure sized in inches has a known pixel size). No tight
    bounding box, for the same reason. Returns ``path``."""
    if isinstance(path, (str, Path)):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi or fig.dpi)
    return path
