"""Batched inference over a dataset and VOC evaluation of the result."""
from __future__ import annotations

import contextlib
import logging
import time
from typing import Any, Sequence

import numpy as np
import torch
from tqdm import tqdm

from ssd_da.engine import distributed as dist_utils
from ssd_da.engine.data import build_eval_loader

logger = logging.getLogger(__name__)


def autocast_context(device: torch.device, amp: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA when ``amp``; a no-op elsewhere (CPU runs stay float32)."""
    if amp and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def predict(model: torch.nn.Module, dataset: torch.utils.data.Dataset, device: torch.device,
            batch_size: int = 32, workers: int = 2, amp: bool = False,
            indices: Sequence[int] | None = None, progress: bool = True
            ) -> tuple[dict[int, dict[str, np.ndarray]], float]:
    """Detections for ``dataset[i]`` for each ``i`` in ``indices`` (default: all).

    Items must be ``(image (3, S, S) normalised, target with "orig_size" (h, w) and "index")``.
    Returns ``({index: {"boxes": (K, 4) xyxy 0-based pixels of the original image, "scores": (K,),
    "labels": (K,) 1..C}}, images per second)``; the rate counts the model and the transfer,
    not the data loading.
    """
    model.eval()
    indices = list(range(len(dataset))) if indices is None else list(indices)
    loader = build_eval_loader(dataset, indices, batch_size, workers, device.type == "cuda")
    out: dict[int, dict[str, np.ndarray]] = {}
    compute_time, count = 0.0, 0
    for images, targets in tqdm(loader, desc="inference", disable=not progress, leave=False):
        start = time.perf_counter()
        images = images.to(device, non_blocking=True)
        sizes = [tuple(int(v) for v in t["orig_size"]) for t in targets]
        with autocast_context(device, amp):
            dets = model(images, original_sizes=sizes)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        compute_time += time.perf_counter() - start
        count += len(targets)
        for t, d in zip(targets, dets):
            out[int(t["index"])] = {k: d[k].float().cpu().numpy() if k != "labels"
                                    else d[k].cpu().numpy() for k in ("boxes", "scores", "labels")}
    return out, count / max(compute_time, 1e-9)


def evaluate_model(model: torch.nn.Module, dataset: Any, class_names: Sequence[str],
                   device: torch.device, batch_size: int = 32, workers: int = 2,
                   amp: bool = False, metric: str = "voc07", progress: bool = True):
    """Predict on ``dataset`` (sharded over ranks under torchrun) and compute VOC AP.

    Returns ``(VOCResult, detections list aligned with the dataset, images/s)`` on every rank.
    """
    from ssd_da.evaluation.voc import evaluate_voc

    rank, world = dist_utils.get_rank(), dist_utils.get_world_size()
    mine, rate = predict(model, dataset, device, batch_size, workers, amp,
                         indices=range(rank, len(dataset), world), progress=progress)
    merged: dict[int, dict[str, np.ndarray]] = {}
    total_rate = 0.0
    for part, part_rate in dist_utils.all_gather_objects((mine, rate)):  # type: ignore[misc]
        merged.update(part)
        total_rate += part_rate  # the shards run in parallel: their rates add up
    detections = [merged[i] for i in range(len(dataset))]
    annotations = [dataset.get_annotation(i) for i in range(len(dataset))]
    gts = [{"boxes": a.boxes, "labels": a.labels, "difficult": a.difficult} if not isinstance(a, dict)
           else a for a in annotations]
    result = evaluate_voc(detections, gts, class_names, metric=metric)
    return result, detections, total_rate
