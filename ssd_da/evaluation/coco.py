"""COCO-style AP@[.5:.95] and AP50 of a VOC detection set, through pycocotools; and the
official COCO evaluation of a COCO-format dataset against its own JSON (``coco_metrics_on_gt``).

An extra to the DA paper's metric (section III reports only the 11-point mAP). The LGA paper's
mAP50 / mAP50-95 come from YOLOv8's validator, which matches and caps detections its own way, so
these pycocotools figures are not directly comparable with them either. The COCO
objects are built in memory (no temporary files, no rounding through text) and pycocotools'
printing is suppressed.

Conventions of ``coco_metrics`` (VOC data), which make these numbers NOT comparable to
:mod:`ssd_da.evaluation.voc`:
* pycocotools uses continuous coordinates: boxes are converted from xyxy to xywh with
  ``w = x2 - x1`` (no +1), and IoU and ``area`` are computed from those.
* Difficult ground truths become ``iscrowd=1``. That is the only ignore mechanism COCOeval
  honours (``evaluate`` overwrites any ``ignore`` field with ``iscrowd``). Detections matched to
  them are ignored, as in VOC, but crowd IoU is intersection over DETECTION area, and a
  detection prefers a regular ground truth over a crowd one when both pass the threshold.
* At most 100 detections per image (the highest scoring) count, pycocotools' default.
* Matching uses IoU >= t (VOC uses IoU > 0.5), and AP interpolates precision at 101 recalls.
A metric that pycocotools cannot compute (it returns -1, e.g. no small objects for
"AP_small", or no ground truth at all) is returned as nan, with a warning.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

logger = logging.getLogger(__name__)

# Order of COCOeval.stats for iouType="bbox" (pycocotools' summarize()).
STAT_NAMES = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large",
              "AR1", "AR10", "AR100", "AR_small", "AR_medium", "AR_large")


def _xywh(boxes: np.ndarray) -> np.ndarray:
    """(N, 4) xyxy -> (N, 4) xywh with pycocotools' continuous width ``x2 - x1``."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)


def _annotations(items: Sequence[Mapping], with_scores: bool) -> list[dict]:
    """COCO annotation dicts (ids from 1: COCOeval treats id 0 as "unmatched")."""
    anns = []
    what = "detections" if with_scores else "annotations"
    required = ("boxes", "labels", "scores") if with_scores else ("boxes", "labels")
    for image_id, item in enumerate(items):
        missing = [k for k in required if k not in item]
        if missing:
            raise ValueError(f"{what}[{image_id}] lacks {missing} (needs {list(required)})")
        boxes = np.asarray(item["boxes"], dtype=np.float64)
        if boxes.size and (boxes.ndim != 2 or boxes.shape[1] != 4):
            raise ValueError(f"{what}[{image_id}]['boxes'] must have shape (N, 4), "
                             f"got {boxes.shape}")
        boxes = _xywh(boxes)
        labels = np.asarray(item["labels"]).reshape(-1)
        if len(labels) != len(boxes):
            raise ValueError(f"{what}[{image_id}]: 'labels' has {len(labels)} entries, "
                             f"'boxes' has {len(boxes)}")
        if with_scores:
            extra = np.asarray(item["scores"], dtype=np.float64).reshape(-1)
            key = "score"
        else:
            extra = np.asarray(item.get("difficult", np.zeros(len(boxes), dtype=bool)),
                               dtype=bool).reshape(-1)
            key = "iscrowd"
        if len(extra) != len(boxes):
            source = "scores" if with_scores else "difficult"
            raise ValueError(f"{what}[{image_id}]: {source!r} has {len(extra)} entries, "
                             f"'boxes' has {len(boxes)}")
        for box, label, value in zip(boxes.tolist(), labels.tolist(), extra.tolist()):
            ann = {"id": len(anns) + 1, "image_id": image_id, "category_id": int(label),
                   "bbox": box, "area": box[2] * box[3]}
            ann[key] = float(value) if with_scores else int(value)
            anns.append(ann)
    return anns


def _coco(images: list[dict], categories: list[dict], anns: list[dict]) -> COCO:
    coco = COCO()
    coco.dataset = {"images": images, "categories": categories, "annotations": anns}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def coco_metrics(detections: Sequence[Mapping], annotations: Sequence[Mapping],
                 class_names: Sequence[str]) -> dict[str, float]:
    """COCO box metrics of a detection set (same inputs as ``evaluate_voc``).

    Args:
        detections: one dict per image: ``boxes`` (K, 4) float xyxy pixels, ``scores`` (K,),
            ``labels`` (K,) int in 1..C.
        annotations: one dict per image: ``boxes`` (N, 4) xyxy, ``labels`` (N,), optional
            ``difficult`` (N,) bool (mapped to ``iscrowd``).
        class_names: the C class names; label i is ``class_names[i - 1]``.
    Returns:
        {"AP": AP@[.5:.95], "AP50": ..., and the other names of ``STAT_NAMES``}, in [0, 1],
        nan where pycocotools has nothing to average (it reports -1).
    """
    if len(detections) != len(annotations):
        raise ValueError(f"detections has {len(detections)} images but annotations has "
                         f"{len(annotations)}; give one dict per image, in the same order")
    images = [{"id": i} for i in range(len(annotations))]
    categories = [{"id": i + 1, "name": str(n)} for i, n in enumerate(class_names)]
    gt_anns = _annotations(annotations, with_scores=False)
    dt_anns = _annotations(detections, with_scores=True)
    for ann in gt_anns + dt_anns:
        if not 1 <= ann["category_id"] <= len(categories):
            raise ValueError(f"image {ann['image_id']}: label {ann['category_id']} is out of "
                             f"range 1..{len(categories)}")
    coco_gt = _coco(images, categories, gt_anns)
    # Built like COCO.loadRes would, without its crash on an empty result list.
    coco_dt = _coco(images, categories, dt_anns)
    return _run_cocoeval(coco_gt, coco_dt)


def coco_results(detections: Sequence[Mapping], image_ids: Sequence[int],
                 cat_ids: Sequence[int]) -> list[dict]:
    """Detections as a COCO results list ``[{"image_id", "category_id", "bbox": [x, y, w, h],
    "score"}]``, the format COCO's evaluation server and ``COCO.loadRes`` take.

    Args:
        detections: one dict per image: ``boxes`` (K, 4) xyxy pixels, ``scores`` (K,),
            ``labels`` (K,) int in 1..C.
        image_ids: the COCO image id of each entry of ``detections``.
        cat_ids: the category id of label k + 1 at position k.
    """
    if len(detections) != len(image_ids):
        raise ValueError(f"{len(detections)} detection entries but {len(image_ids)} image ids")
    out = []
    for image_id, det in zip(image_ids, detections):
        boxes = _xywh(det["boxes"]).tolist()
        scores, labels = np.asarray(det["scores"]).tolist(), np.asarray(det["labels"]).tolist()
        for box, score, label in zip(boxes, scores, labels):
            out.append({"image_id": image_id, "category_id": cat_ids[int(label) - 1],
                        "bbox": box, "score": float(score)})
    return out


def coco_metrics_on_gt(coco_gt, results: Sequence[Mapping], image_ids: Sequence[int],
                       cat_ids: Sequence[int]) -> dict[str, float]:
    """COCO box metrics of a results list (:func:`coco_results`) against a dataset's own
    pycocotools ground truth, restricted to ``image_ids`` and ``cat_ids``: the official COCO
    evaluation (crowd regions, the JSON's ``area`` for the size ranges). Returns the names of
    ``STAT_NAMES``, in [0, 1], nan where pycocotools reports -1."""
    images = [coco_gt.imgs[i] for i in image_ids]
    categories = list(coco_gt.dataset["categories"])
    anns = []
    for k, rec in enumerate(results, start=1):  # as COCO.loadRes builds them, empty lists too
        w, h = rec["bbox"][2], rec["bbox"][3]
        anns.append({**rec, "id": k, "area": w * h, "iscrowd": 0})
    coco_dt = _coco(images, categories, anns)
    return _run_cocoeval(coco_gt, coco_dt, image_ids, cat_ids)


def _run_cocoeval(coco_gt, coco_dt, image_ids: Sequence[int] | None = None,
                  cat_ids: Sequence[int] | None = None) -> dict[str, float]:
    evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
    if image_ids is not None:
        evaluator.params.imgIds = list(image_ids)
    if cat_ids is not None:
        evaluator.params.catIds = list(cat_ids)
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = {}
    for name, value in zip(STAT_NAMES, evaluator.stats.tolist()):
        stats[name] = math.nan if value < 0 else float(value)
    undefined = [n for n, v in stats.items() if math.isnan(v)]
    if undefined:
        logger.warning("pycocotools could not compute %s (nothing to average); reported as nan",
                       ", ".join(undefined))
    return stats


_RESULT_KEYS = {"image_id", "category_id", "bbox", "score"}


def load_coco_results(path: str | Path, image_ids: Sequence[int], cat_ids: Sequence[int]
                      ) -> list[dict[str, np.ndarray]]:
    """Read a COCO results file (the format of :func:`coco_results`) into one dict per entry
    of ``image_ids``: ``boxes`` (K, 4) float64 xyxy ``[x, y, x + w, y + h]``, ``scores`` (K,),
    ``labels`` (K,) int64 in 1..C (label k + 1 for ``cat_ids[k]``).

    Raises:
        ValueError: unreadable file or a bad record (named by its index), an image id not in
            ``image_ids`` or a category id not in ``cat_ids``.
    """
    path = Path(path)
    try:
        records = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: cannot read detections: {exc}") from exc
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of COCO results")
    index = {img: i for i, img in enumerate(image_ids)}
    label_of = {cat: k + 1 for k, cat in enumerate(cat_ids)}
    rows: list[list[tuple]] = [[] for _ in image_ids]
    for n, rec in enumerate(records):
        where = f"{path}: result #{n}"
        if not isinstance(rec, dict) or not _RESULT_KEYS <= set(rec):
            raise ValueError(f"{where} must have image_id, category_id, bbox and score; "
                             f"got {rec!r}")
        if rec["image_id"] not in index:
            raise ValueError(f"{where}: image_id {rec['image_id']!r} is not an image of the split")
        if rec["category_id"] not in label_of:
            raise ValueError(f"{where}: category_id {rec['category_id']!r} is not one of "
                             f"{list(cat_ids)}")
        box, score = rec["bbox"], rec["score"]
        numbers = [*box, score] if isinstance(box, list) and len(box) == 4 else []
        finite = all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                     for v in numbers)
        if not numbers or not finite or box[2] < 0 or box[3] < 0:
            raise ValueError(f"{where}: bbox must be [x, y, w, h] with w, h >= 0 and score a "
                             f"finite number; got bbox {box!r}, score {score!r}")
        x, y, w, h = (float(v) for v in box)
        label = label_of[rec["category_id"]]
        rows[index[rec["image_id"]]].append((x, y, x + w, y + h, float(score), label))
    out = []
    for dets in rows:
        arr = np.asarray(dets, dtype=np.float64).reshape(-1, 6)
        out.append({"boxes": arr[:, :4], "scores": arr[:, 4], "labels": arr[:, 5].astype(np.int64)})
    return out
