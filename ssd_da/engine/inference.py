"""Inference: batched over a dataset (with VOC evaluation of the result) and on one image array."""
from __future__ import annotations

import logging
import time
from typing import Any, Sequence

import numpy as np
import torch
from tqdm import tqdm

from ssd_da.data.transforms import preprocess
from ssd_da.engine import distributed as dist_utils
from ssd_da.engine.loaders import make_eval_loader
from ssd_da.evaluation.coco import coco_metrics, coco_metrics_on_gt, coco_results
from ssd_da.evaluation.voc import VOCResult, evaluate_voc
from ssd_da.utils.device import autocast_context

logger = logging.getLogger(__name__)


@torch.no_grad()
def predict(model: torch.nn.Module, dataset: torch.utils.data.Dataset, device: torch.device,
            batch_size: int = 32, workers: int = 2, amp: bool = False,
            indices: Sequence[int] | None = None, progress: bool = True, channels_last: bool = False
            ) -> tuple[dict[int, dict[str, np.ndarray]], float]:
    """Detections for ``dataset[i]`` for each ``i`` in ``indices`` (default: all).

    Items must be ``(image (3, S, S) normalised float or uint8 pixels, target with "orig_size"
    (h, w) and "index")``. Returns ``({index: {"boxes": (K, 4) xyxy 0-based pixels of the
    original image, "scores": (K,), "labels": (K,) 1..C}}, images per second)``; the rate
    counts the model, the transfers and the post-processing, not the data loading.
    """
    model.eval()
    indices = list(range(len(dataset))) if indices is None else list(indices)
    loader = make_eval_loader(dataset, indices, batch_size, workers, device.type == "cuda")
    out: dict[int, dict[str, np.ndarray]] = {}
    compute_time, count = 0.0, 0
    for images, targets in tqdm(loader, desc="inference", disable=not progress, leave=False):
        start = time.perf_counter()
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        sizes = [tuple(int(v) for v in t["orig_size"]) for t in targets]
        with autocast_context(device, amp):
            dets = model(images, original_sizes=sizes)
        for t, d in zip(targets, _to_host(dets)):  # one device-to-host copy per batch
            out[int(t["index"])] = d
        compute_time += time.perf_counter() - start
        count += len(targets)
    return out, count / max(compute_time, 1e-9)


def _to_host(dets: list[dict[str, torch.Tensor]]) -> list[dict[str, np.ndarray]]:
    """The boxes, scores and labels of a batch's detections as numpy, in one copy (one wait
    for the device instead of three per image)."""
    counts = [len(d["scores"]) for d in dets]
    flat = torch.cat([torch.cat([d["boxes"].float(), d["scores"].float()[:, None],
                                 d["labels"].float()[:, None]], dim=1) for d in dets]).cpu().numpy()
    parts = np.split(flat, np.cumsum(counts)[:-1])
    return [{"boxes": p[:, :4], "scores": p[:, 4], "labels": p[:, 5].astype(np.int64)} for p in parts]


def evaluate_model(model: torch.nn.Module, dataset: Any, class_names: Sequence[str],
                   device: torch.device, batch_size: int = 32, workers: int = 2,
                   amp: bool = False, metric: str = "voc07", progress: bool = True,
                   channels_last: bool = False, iou_rule: str = "python"
                   ) -> tuple[VOCResult, list[dict[str, np.ndarray]], float]:
    """Predict on ``dataset`` (sharded over ranks under torchrun) and compute VOC AP: the one
    evaluation of a model, for training and ``tools/eval_voc.py`` alike.

    Returns ``(VOCResult, detections list aligned with the dataset, images/s)`` on every rank.
    """
    rank, world = dist_utils.get_rank(), dist_utils.get_world_size()
    mine, images_per_s = predict(model, dataset, device, batch_size, workers, amp,
                         indices=range(rank, len(dataset), world), progress=progress,
                         channels_last=channels_last)
    merged: dict[int, dict[str, np.ndarray]] = {}
    total = 0.0
    for part, part_images_per_s in dist_utils.all_gather_objects((mine, images_per_s)):  # type: ignore[misc]
        merged.update(part)
        total += part_images_per_s  # the shards run in parallel: their speeds add up
    detections = [merged[i] for i in range(len(dataset))]
    annotations = [dataset.get_annotation(i) for i in range(len(dataset))]
    gts = [a.ground_truth() if not isinstance(a, dict) else a for a in annotations]
    result = evaluate_voc(detections, gts, class_names, metric=metric, iou_rule=iou_rule)
    return result, detections, total


def coco_metrics_of(dataset: Any, detections: Sequence[dict[str, np.ndarray]]) -> dict[str, float]:
    """pycocotools' metrics (``ssd_da.evaluation.coco.STAT_NAMES``: AP@[.5:.95], AP50, ...) of
    detections aligned with ``dataset``: for a COCO-format dataset
    (``ssd_da.data.coco.CocoDetection``) the official ones, against its own JSON; for VOC data
    against the training view of its annotations (COCO's continuous coordinates give a zero-width
    box zero area, so it could never be matched: boxes clipped, degenerate ones dropped)."""
    if not hasattr(dataset, "coco"):
        annotations = [dataset.get_annotation(i) for i in range(len(dataset))]
        return coco_metrics(detections, [{"boxes": a.boxes, "labels": a.labels,
                                          "difficult": a.difficult} for a in annotations],
                            list(dataset.class_names))
    results = coco_results(detections, dataset.coco_ids, dataset.cat_ids)
    return coco_metrics_on_gt(dataset.coco, results, dataset.coco_ids, dataset.cat_ids)


def format_coco(stats: dict[str, float]) -> str:
    """'AP 41.20  AP50 60.10  AP75 ...  APs ...  APm ...  APl ...' in percent (pycocotools' six
    AP figures)."""
    names = {"AP": "AP", "AP50": "AP50", "AP75": "AP75", "AP_small": "APs", "AP_medium": "APm",
             "AP_large": "APl"}
    return "  ".join(f"{short} {100 * stats[key]:.2f}" for key, short in names.items())


@torch.no_grad()
def predict_image(model: torch.nn.Module, image: np.ndarray) -> dict[str, np.ndarray]:
    """Detections of one (H, W, 3) uint8 image,
    ``model(preprocess(image), original_sizes=[(H, W)])`` as numpy: ``boxes`` (K, 4) xyxy in
    original pixels, 0-based; ``scores`` (K,) descending; ``labels`` (K,) in 1..C.
    Puts the model in eval mode."""
    model.eval()
    x = preprocess(image, model.image_size).to(model.default_boxes.device)
    det = model(x, original_sizes=[tuple(image.shape[:2])])[0]
    return {k: v.cpu().numpy() for k, v in det.items()}
