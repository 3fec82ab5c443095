"""The project's plots and its plotting convention: every plot is a bare
``matplotlib.figure.Figure`` (no pyplot, so no global state and no interactive backend: safe in
scripts, tests, worker processes and on headless machines), saved with :func:`save_figure`.
Here: the training curves of a run, and the precision-recall curves and per-class AP bars of a
:class:`~ssd_da.evaluation.voc.VOCResult` (the ablation's and Grad-CAM's figures live with
them: ``ssd_da/experiments``, ``ssd_da/visualize``). Imports nothing else of the package."""
from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Sequence

import numpy as np
from matplotlib.figure import Figure

if TYPE_CHECKING:
    from ssd_da.evaluation.voc import VOCResult

__all__ = ["save_figure", "plot_training_curves", "plot_pr_curves", "plot_ap_bars"]

logger = logging.getLogger(__name__)
# The 11 recall points the VOC07 AP averages (ssd_da.evaluation.voc.VOC07_RECALL_THRESHOLDS).
VOC07_RECALL_POINTS = np.arange(0.0, 1.1, 0.1)


def save_figure(fig: Figure, path: str | Path | BinaryIO, dpi: float | None = None) -> Path | BinaryIO:
    """Write ``fig`` to ``path`` (format from the suffix; parent folders created) at ``dpi``
    (default: the figure's own, so a figure sized in inches has a known pixel size). No tight
    bounding box, for the same reason. Returns ``path``."""
    if isinstance(path, (str, Path)):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi or fig.dpi)
    return path


def plot_training_curves(records: Sequence[dict[str, Any]], png_path: str | Path) -> Path:
    """Loss terms (log scale) and learning rate of the training records of a run's log
    (``ssd_da.engine.runlog.read_run_log``), and mAP (%) at each evaluation record; one PNG of
    three panels."""
    train = [r for r in records if "map" not in r]
    evals = [r for r in records if "map" in r]
    fig = Figure(figsize=(15, 4))
    axes = fig.subplots(1, 3)
    if train:
        its = [r["iter"] for r in train]
        for key in ("loss", "classification", "bbox_regression"):
            if key in train[0]:
                axes[0].plot(its, [r[key] for r in train], label=key)
        axes[0].set_yscale("log")
        axes[0].legend()
        axes[1].plot(its, [r["lr"] for r in train])
    if evals:
        axes[2].plot([r["iter"] for r in evals], [100 * r["map"] for r in evals], marker="o")
    for ax, title in zip(axes, ("training loss", "learning rate", "test mAP (%)")):
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, png_path, dpi=100)


def _safe_name(name: str) -> str:
    """A file-name-safe version of a class name ("potted plant" -> "potted_plant")."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "class"


def plot_pr_curves(result: VOCResult, out_dir: str | Path) -> list[Path]:
    """Write one precision-recall PNG per class with ground truth to ``out_dir``.

    The raw curve (one point per detection, in score order) is drawn with its monotone
    envelope; for the "voc07" metric the 11 interpolated points that are averaged are marked.
    Classes without non-difficult ground truth have no recall and are skipped (logged).
    Returns the written paths, in class order (``pr_<class>.png``).
    """
    out_dir = Path(out_dir)
    paths = []
    for name, ap in result.ap.items():
        if math.isnan(ap):
            logger.info("no PR curve for %r: no ground truth", name)
            continue
        recall, precision = result.recall[name], result.precision[name]
        fig = Figure(figsize=(5, 4))
        ax = fig.add_subplot(1, 1, 1)
        ax.plot(recall, precision, color="0.6", linewidth=1, label="precision")
        if len(recall):
            envelope = np.maximum.accumulate(precision[::-1])[::-1]
            ax.step(recall, envelope, where="post", color="C0", label="envelope")
        if result.metric == "voc07":
            points = [precision[recall >= t].max() if (recall >= t).any() else 0.0
                      for t in VOC07_RECALL_POINTS]
            ax.plot(VOC07_RECALL_POINTS, points, "o", color="C3", markersize=4,
                    label="11-point")
        ax.set_xlim(0.0, 1.0)
        ax.set_ylim(0.0, 1.05)
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        ax.set_title(f"{name}: AP {100.0 * ap:.2f} ({result.metric}), "
                     f"{result.npos[name]} gt, {result.num_detections[name]} dets", fontsize=9)
        ax.legend(loc="lower left", fontsize=8)
        paths.append(save_figure(fig, out_dir / f"pr_{_safe_name(name)}.png", dpi=100))
    return paths


def plot_ap_bars(result: VOCResult, path: str | Path) -> Path:
    """Write a bar chart of per-class AP (percent) with the mAP as a horizontal line.

    Classes without ground truth are shown as empty slots labelled "n/a".
    """
    names = list(result.ap)
    values = [0.0 if math.isnan(result.ap[n]) else 100.0 * result.ap[n] for n in names]
    fig = Figure(figsize=(max(4.0, 0.45 * len(names) + 1.5), 4))
    ax = fig.add_subplot(1, 1, 1)
    positions = np.arange(len(names))
    ax.bar(positions, values, color="C0")
    for x, n in zip(positions, names):
        if math.isnan(result.ap[n]):
            ax.text(x, 1.0, "n/a", ha="center", va="bottom", fontsize=7, rotation=90)
    if not math.isnan(result.map):
        ax.axhline(100.0 * result.map, color="C3", linestyle="--",
                   label=f"mAP {100.0 * result.map:.2f}")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_xticks(positions)
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=8)
    ax.set_ylim(0.0, 100.0)
    ax.set_ylabel(f"AP (%), {result.metric}")
    fig.tight_layout()
    return save_figure(fig, Path(path), dpi=100)
