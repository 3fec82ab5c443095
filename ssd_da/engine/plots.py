"""Training curves from a run's JSONL log (matplotlib, Agg: works on headless machines)."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_log(path: str | Path) -> tuple[list[dict], list[dict]]:
    """Split a run's log.jsonl into (training records, evaluation records)."""
    train, evals = [], []
    path = Path(path)
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by a crash mid-write
            (evals if "map" in rec else train).append(rec)
    return train, evals


def plot_training_curves(log_path: str | Path, png_path: str | Path) -> Path:
    """Loss terms and learning rate against iteration, and mAP at each evaluation."""
    train, evals = read_log(log_path)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    if train:
        its = [r["iter"] for r in train]
        for key in ("loss", "classification", "bbox_regression"):
            if key in train[0]:
                axes[0].plot(its, [r[key] for r in train], label=key)
        axes[0].set_yscale("log")
        axes[1].plot(its, [r["lr"] for r in train])
    if evals:
        axes[2].plot([r["iter"] for r in evals], [100 * r["map"] for r in evals], marker="o")
    for ax, title in zip(axes, ("training loss", "learning rate", "test mAP (%)")):
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return Path(png_path)
