"""Training curves of a run: loss terms, learning rate and test mAP against iteration."""
from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from ssd_da.engine.runlog import read_run_log
from ssd_da.utils.figures import save_figure


def plot_training_curves(log_path: str | Path, png_path: str | Path) -> Path:
    """Loss terms (log scale) and learning rate of the training records of ``log.jsonl``, and
    mAP (%) at each evaluation record; one PNG of three panels."""
    records = read_run_log(log_path)
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
