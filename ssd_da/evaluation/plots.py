"""Precision-recall curves and per-class AP bars of a :class:`~ssd_da.evaluation.voc.VOCResult`.

Figures are bare ``matplotlib.figure.Figure`` objects saved with
:func:`ssd_da.utils.figures.save_figure` (no pyplot state).
"""
from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from ssd_da.evaluation.voc import VOC07_RECALL_THRESHOLDS, VOCResult
from ssd_da.utils.figures import save_figure

logger = logging.getLogger(__name__)


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
                      for t in VOC07_RECALL_THRESHOLDS]
            ax.plot(VOC07_RECALL_THRESHOLDS, points, "o", color="C3", markersize=4,
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
