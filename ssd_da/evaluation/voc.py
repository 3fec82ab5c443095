"""PASCAL VOC detection AP as py-faster-rcnn's ``voc_eval.py`` computes it (numpy, vectorised).

The DA paper reports SSD300 mAP "on the VOC data set" with the 11-point interpolation (section
III); it names neither the test split nor the IoU threshold ("the set IoU threshold"). We follow
the VOC convention: VOC2007 test at IoU 0.5. The published VOC07 numbers of ssd.pytorch, lufficc/SSD and mmdetection come
from ``voc_eval.py`` of py-faster-rcnn (Bharath Hariharan's Python port of the devkit), and this
module reproduces that algorithm to the last bit (docs/method.md, "The VOC evaluator"):

* IoU uses the inclusive pixel convention: ``w = x2 - x1 + 1`` (shift-invariant, so 0-based
  boxes, as the data pipeline produces them, give the reference numbers).
* Each detection is compared with the ground truth of its image that has the highest IoU (the
  first such ground truth in annotation order on an exact IoU tie). If that IoU is > threshold
  (strictly): a difficult ground truth makes the detection neither TP nor FP; an unused one
  makes it a TP and marks it used; a used one makes it a FP -- there is NO fallback to the
  second-best ground truth. Otherwise the detection is a FP.
* 11-point AP uses the thresholds exactly as ``np.arange(0., 1.1, 0.1)`` yields them, so a
  recall of exactly 0.3 does not reach t = 0.30000000000000004.
* "area" AP is the VOC2010+ integral of the monotone precision envelope over recall.

IoU rule. The official MATLAB devkit (``VOCevaldet.m``) accepts a match at IoU >= threshold
(``ovmax >= VOCopts.minoverlap``), where ``voc_eval.py`` needs IoU > threshold. The two differ
only for a detection whose best IoU is exactly the threshold (e.g. a 10x10 ground truth and a
10x20 detection over it: IoU 100 / 200 = 0.5). ``iou_rule="python"`` (default) is
``voc_eval.py``'s, ``iou_rule="matlab"`` the devkit's; the MATLAB devkit also considers only
ground truths that overlap the detection, so IoU 0 never matches under either rule. Everything
else (the 11-point thresholds included) stays as above.

Score ties. ``voc_eval.py`` sorts with ``np.argsort(-confidence)`` (quicksort, not stable), so
its order among equal scores is an accident of the sort implementation. We sort with a STABLE
sort on ``-score``: detections with equal scores keep their input order, i.e. earlier image (in
the order of ``annotations``) first, and within an image the order of its detection arrays. This
makes every result deterministic and matches the reference whenever scores are distinct.

Vectorisation. Because there is no fallback to the second-best match, the reference's greedy
loop is equivalent to: for every detection take its best ground truth g; among the detections of
the class whose best g is non-difficult with an IoU that passes the rule, the first one in score
order is the TP and the others are FP. All IoUs between a detection and the same-class ground
truths of its own image are computed at once as a flat list of (detection, ground truth) pairs.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from ssd_da.evaluation.voc_inputs import as_boxes, as_labels, check_boxes, concat

logger = logging.getLogger(__name__)

METRICS = ("voc07", "area")
# "python": IoU > threshold (py-faster-rcnn voc_eval.py); "matlab": IoU >= threshold (VOCevaldet.m).
IOU_RULES = ("python", "matlab")
# Exactly what the Python evaluators behind published VOC07 results iterate over; note
# 0.30000000000000004, 0.6000000000000001 and 0.7000000000000001 (docs/method.md).
VOC07_RECALL_THRESHOLDS = np.arange(0.0, 1.1, 0.1)


@dataclass
class ClassResult:
    """Evaluation of one class.

    ``recall`` and ``precision`` have one entry per detection of the class, in descending score
    order (voc_eval.py's arrays, including entries for ignored detections on difficult ground
    truth). ``ap`` is nan and ``recall`` all-nan when the class has no non-difficult ground truth.
    """

    ap: float
    npos: int
    num_detections: int
    recall: np.ndarray
    precision: np.ndarray


@dataclass
class VOCResult:
    """Result of :func:`evaluate_voc`. Per-class dicts are keyed by class name, in class order.

    ``map`` is the mean AP over classes with at least one non-difficult ground truth (nan when
    no class has one); ``ap[name]`` is nan for the others.
    """

    metric: str
    iou_threshold: float
    map: float
    ap: dict[str, float]
    npos: dict[str, int]
    num_detections: dict[str, int]
    precision: dict[str, np.ndarray] = field(repr=False)
    recall: dict[str, np.ndarray] = field(repr=False)
    num_images: int
    iou_rule: str = "python"

    def table(self) -> str:
        """Per-class AP in percent (2 decimals) with ground-truth and detection counts, and mAP."""
        width = max([len("mAP")] + [len(n) for n in self.ap])
        op = ">=" if self.iou_rule == "matlab" else ">"
        title = (f"VOC {self.metric} AP @ IoU {op} {self.iou_threshold:g} "
                 f"on {self.num_images} images")
        lines = [title, f"{'class':<{width}}  {'AP (%)':>8}  {'gt':>7}  {'dets':>8}"]
        for name, ap in self.ap.items():
            value = "n/a (no ground truth)" if math.isnan(ap) else f"{100.0 * ap:8.2f}"
            lines.append(f"{name:<{width}}  {value:>8}  {self.npos[name]:>7d}  "
                         f"{self.num_detections[name]:>8d}")
        value = "n/a (no ground truth)" if math.isnan(self.map) else f"{100.0 * self.map:8.2f}"
        lines.append(f"{'mAP':<{width}}  {value:>8}")
        return "\n".join(lines)


def voc_ap(recall: np.ndarray, precision: np.ndarray, metric: str = "voc07") -> float:
    """Average precision from a precision/recall curve, as ``voc_ap`` of voc_eval.py.

    Args:
        recall: (K,) recall after each detection in descending score order (non-decreasing).
        precision: (K,) precision after each detection.
        metric: "voc07" (11-point interpolation) or "area" (VOC2010+ envelope integral).
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {list(METRICS)}, got {metric!r}")
    recall = np.asarray(recall, dtype=np.float64)
    precision = np.asarray(precision, dtype=np.float64)
    if recall.ndim != 1 or recall.shape != precision.shape:
        raise ValueError(f"recall and precision must be 1-D arrays of equal length, got shapes "
                         f"{recall.shape} and {precision.shape}")
    if metric == "voc07":
        reached = recall[None, :] >= VOC07_RECALL_THRESHOLDS[:, None]  # (11, K)
        best = np.max(np.broadcast_to(precision, reached.shape), axis=1, where=reached,
                      initial=-np.inf)
        best[~reached.any(axis=1)] = 0.0
        ap = 0.0
        for p in best:  # 11 terms, summed in voc_eval.py's order so the result is bit-identical
            ap = ap + p / 11.0
        return float(ap)
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([0.0], precision, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # monotone (non-increasing) envelope
    changes = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[changes + 1] - mrec[changes]) * mpre[changes + 1]))


def _pair_iou(det: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Devkit IoU of paired boxes: det (P, 4), gt (P, 4) xyxy, inclusive pixels -> (P,).

    The operations are in voc_eval.py's order so the values are bitwise those of the reference.
    """
    iw = np.maximum(np.minimum(gt[:, 2], det[:, 2]) - np.maximum(gt[:, 0], det[:, 0]) + 1.0, 0.0)
    ih = np.maximum(np.minimum(gt[:, 3], det[:, 3]) - np.maximum(gt[:, 1], det[:, 1]) + 1.0, 0.0)
    inters = iw * ih
    union = ((det[:, 2] - det[:, 0] + 1.0) * (det[:, 3] - det[:, 1] + 1.0)
             + (gt[:, 2] - gt[:, 0] + 1.0) * (gt[:, 3] - gt[:, 1] + 1.0) - inters)
    # An inverted ground truth (x2 < x1, kept because the devkit counts it) never intersects:
    # IoU 0, where voc_eval.py's 0 / union could be 0 / 0 = nan for a box of the same size.
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(inters > 0.0, inters / union, 0.0)


def _best_gt(det_img: np.ndarray, det_boxes: np.ndarray, gt_img: np.ndarray,
             gt_boxes: np.ndarray, num_images: int) -> tuple[np.ndarray, np.ndarray]:
    """Best-IoU ground truth of each detection among those of its own image.

    Image indices are in 0..num_images-1; ``gt_img`` must be sorted (ground truths grouped by
    image, annotation order within one). Returns (best_iou (K,), -inf where the image has no
    ground truth; best_gt (K,) index into the ground-truth arrays, -1 where none). Exact IoU
    ties go to the first ground truth, as voc_eval.py's np.argmax does.
    """
    per_image = np.bincount(gt_img, minlength=num_images)
    count = per_image[det_img]
    start = (np.cumsum(per_image) - per_image)[det_img]
    best_iou = np.full(len(det_img), -np.inf)
    best_gt = np.full(len(det_img), -1, dtype=np.int64)
    num_pairs = int(count.sum())
    if num_pairs == 0:
        return best_iou, best_gt
    # Flat (detection, ground truth) pairs: detection k pairs with gts start[k] + 0..count[k]-1.
    pair_det = np.repeat(np.arange(len(det_img)), count)
    first_pair = np.cumsum(count) - count
    pair_gt = np.repeat(start - first_pair, count) + np.arange(num_pairs)
    iou = _pair_iou(det_boxes[pair_det], gt_boxes[pair_gt])
    has_gt = count > 0
    best_iou[has_gt] = np.maximum.reduceat(iou, first_pair[has_gt])
    # First pair of each detection reaching its maximum = voc_eval.py's np.argmax.
    at_max = np.flatnonzero(iou == best_iou[pair_det])
    first = np.ones(len(at_max), dtype=bool)
    first[1:] = pair_det[at_max[1:]] != pair_det[at_max[:-1]]
    best_gt[pair_det[at_max[first]]] = pair_gt[at_max[first]]
    return best_iou, best_gt


def _passes(best_iou: np.ndarray, iou_threshold: float, iou_rule: str) -> np.ndarray:
    """(K,) bool: does each detection's best IoU make it a match under ``iou_rule``?"""
    if iou_rule == "matlab":
        # VOCevaldet.m: ovmax >= minoverlap, where ovmax only ever comes from overlapping
        # ground truths (iw > 0 and ih > 0), so IoU 0 never matches, even at threshold 0.
        return (best_iou >= iou_threshold) & (best_iou > 0.0)
    return best_iou > iou_threshold  # voc_eval.py: strictly, IoU exactly 0.5 is not a match


def _evaluate_sorted(det_img: np.ndarray, det_boxes: np.ndarray, gt_img: np.ndarray,
                     gt_boxes: np.ndarray, gt_difficult: np.ndarray, num_images: int,
                     metric: str, iou_threshold: float, iou_rule: str = "python") -> ClassResult:
    """One class, with detections in descending score order and gts grouped by image.

    Image indices are in 0..num_images-1.
    """
    best_iou, best_gt = _best_gt(det_img, det_boxes, gt_img, gt_boxes, num_images)
    matched = _passes(best_iou, iou_threshold, iou_rule)
    ignored = np.zeros(len(det_img), dtype=bool)
    ignored[matched] = gt_difficult[best_gt[matched]]
    claims = np.flatnonzero(matched & ~ignored)
    # The first detection (in score order) claiming a ground truth is the TP, later ones are FP.
    _, first_claim = np.unique(best_gt[claims], return_index=True)
    tp = np.zeros(len(det_img), dtype=bool)
    tp[claims[first_claim]] = True
    fp = ~tp & ~ignored
    npos = int(np.count_nonzero(~gt_difficult))
    tp_cum = np.cumsum(tp, dtype=np.float64)
    fp_cum = np.cumsum(fp, dtype=np.float64)
    precision = tp_cum / np.maximum(tp_cum + fp_cum, np.finfo(np.float64).eps)
    if npos == 0:
        return ClassResult(math.nan, 0, len(det_img), np.full(len(det_img), np.nan), precision)
    recall = tp_cum / float(npos)
    return ClassResult(voc_ap(recall, precision, metric), npos, len(det_img), recall, precision)


def _check_metric_threshold(metric: str, iou_threshold: float, iou_rule: str = "python") -> None:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {list(METRICS)}, got {metric!r}")
    if iou_rule not in IOU_RULES:
        raise ValueError(f"iou_rule must be one of {list(IOU_RULES)} (python: IoU > threshold "
                         f"as voc_eval.py; matlab: IoU >= threshold as VOCevaldet.m), "
                         f"got {iou_rule!r}")
    if not 0.0 <= iou_threshold < 1.0:
        raise ValueError(f"iou_threshold must be in [0, 1), got {iou_threshold!r}")


def evaluate_class(det_image_ids: np.ndarray, det_boxes: np.ndarray, det_scores: np.ndarray,
                   gt_image_ids: np.ndarray, gt_boxes: np.ndarray, gt_difficult: np.ndarray,
                   metric: str = "voc07", iou_threshold: float = 0.5,
                   iou_rule: str = "python") -> ClassResult:
    """Evaluate the detections of one class (``voc_eval.py``'s ``voc_eval`` for one class file).

    Args:
        det_image_ids: (K,) int image id of each detection (any integers; only equality matters).
        det_boxes: (K, 4) float xyxy, pixels. det_scores: (K,) float.
        gt_image_ids: (N,) int image id of each ground truth of this class.
        gt_boxes: (N, 4) float xyxy, pixels. gt_difficult: (N,) bool.
        metric: "voc07" or "area". iou_threshold: the match threshold (0.5).
        iou_rule: "python" (IoU > threshold, voc_eval.py) or "matlab" (IoU >= threshold,
            VOCevaldet.m).
    Returns:
        ClassResult; ties in score keep input order (stable sort, see the module docstring).
    """
    _check_metric_threshold(metric, iou_threshold, iou_rule)
    det_boxes = as_boxes(det_boxes, "det_boxes")
    gt_boxes = as_boxes(gt_boxes, "gt_boxes")
    det_img = np.asarray(det_image_ids, dtype=np.int64).reshape(-1)
    gt_img = np.asarray(gt_image_ids, dtype=np.int64).reshape(-1)
    scores = np.asarray(det_scores, dtype=np.float64).reshape(-1)
    difficult = np.asarray(gt_difficult, dtype=bool).reshape(-1)
    if not len(det_img) == len(scores) == len(det_boxes):
        raise ValueError(f"det_image_ids, det_scores and det_boxes lengths differ: "
                         f"{len(det_img)}, {len(scores)}, {len(det_boxes)}")
    if not len(gt_img) == len(difficult) == len(gt_boxes):
        raise ValueError(f"gt_image_ids, gt_difficult and gt_boxes lengths differ: "
                         f"{len(gt_img)}, {len(difficult)}, {len(gt_boxes)}")
    if not np.isfinite(scores).all():
        raise ValueError("det_scores must be finite")
    check_boxes(det_boxes, det_img, "det_boxes")
    check_boxes(gt_boxes, gt_img, "gt_boxes", allow_inverted=True)
    # Image ids -> 0..n-1 (only equality matters), then the stable tie rule of the module doc.
    ids, index = np.unique(np.concatenate([det_img, gt_img]), return_inverse=True)
    det_img, gt_img = index[:len(det_img)], index[len(det_img):]
    order = np.argsort(-scores, kind="stable")
    gt_order = np.argsort(gt_img, kind="stable")
    return _evaluate_sorted(det_img[order], det_boxes[order], gt_img[gt_order],
                            gt_boxes[gt_order], difficult[gt_order], len(ids), metric,
                            iou_threshold, iou_rule)


def evaluate_voc(detections: Sequence[Mapping], annotations: Sequence[Mapping],
                 class_names: Sequence[str], metric: str = "voc07",
                 iou_threshold: float = 0.5, iou_rule: str = "python") -> VOCResult:
    """VOC mAP of a detection set.

    Args:
        detections: one dict per image, in the order of ``annotations``, with numpy arrays
            ``boxes`` (K, 4) float xyxy pixels, ``scores`` (K,) and ``labels`` (K,) int in 1..C.
        annotations: one dict per image with ``boxes`` (N, 4) float xyxy pixels (same
            convention as the detections), ``labels`` (N,) int in 1..C and ``difficult`` (N,)
            bool (optional; missing means none difficult).
        class_names: the C class names; label i is ``class_names[i - 1]``.
        metric: "voc07" (11-point, the paper's protocol) or "area" (VOC2010+).
        iou_threshold: the match threshold (0.5 in the paper).
        iou_rule: "python" (default): a match needs IoU > threshold, as py-faster-rcnn's
            voc_eval.py behind published VOC07 numbers; "matlab": IoU >= threshold, as the
            MATLAB devkit's VOCevaldet.m. They differ only on exact ties.
    Returns:
        VOCResult with per-class AP, npos, detection counts and PR arrays, and the mAP.
    """
    _check_metric_threshold(metric, iou_threshold, iou_rule)
    names = [str(n) for n in class_names]
    if not names or len(set(names)) != len(names):
        raise ValueError(f"class_names must be non-empty and unique, got {names}")
    for what, items in (("detections", detections), ("annotations", annotations)):
        if not isinstance(items, Sequence):
            raise ValueError(f"{what} must be a list with one dict per image, "
                             f"got {type(items).__name__}")
    if len(detections) != len(annotations):
        raise ValueError(f"detections has {len(detections)} images but annotations has "
                         f"{len(annotations)}; give one dict per image, in the same order")
    det_img, det = concat(detections, ("scores", "labels"), "detections")
    gt_img, gt = concat(annotations, ("labels", "difficult"), "annotations")
    det_labels = as_labels(det["labels"], len(names), det_img, "detections labels")
    gt_labels = as_labels(gt["labels"], len(names), gt_img, "annotations labels")
    scores = det["scores"].astype(np.float64)
    if not np.isfinite(scores).all():
        k = int(np.argmax(~np.isfinite(scores)))
        raise ValueError(f"detections[{int(det_img[k])}]['scores'] has a non-finite value")
    check_boxes(det["boxes"], det_img, "detections boxes")
    check_boxes(gt["boxes"], gt_img, "annotations boxes", allow_inverted=True)
    # Group by class with a stable sort (detections keep input order within a class), then
    # each class by descending score, stable: ties keep input order (module docstring).
    # Ground truths by class, then image (stable: annotation order within an image).
    by_label = np.argsort(det_labels, kind="stable")
    det_bounds = np.searchsorted(det_labels[by_label], np.arange(1, len(names) + 2))
    gt_order = np.lexsort((gt_img, gt_labels))
    gt_bounds = np.searchsorted(gt_labels[gt_order], np.arange(1, len(names) + 2))
    gt_img, gt_boxes = gt_img[gt_order], gt["boxes"][gt_order]
    gt_difficult = gt["difficult"].astype(bool)[gt_order]
    results = {}
    for c, name in enumerate(names):
        d = by_label[det_bounds[c]:det_bounds[c + 1]]
        d = d[np.argsort(-scores[d], kind="stable")]
        g = slice(gt_bounds[c], gt_bounds[c + 1])
        results[name] = _evaluate_sorted(det_img[d], det["boxes"][d], gt_img[g], gt_boxes[g],
                                         gt_difficult[g], len(annotations), metric,
                                         iou_threshold, iou_rule)
    return _summarise(results, metric, iou_threshold, len(annotations), iou_rule)


def _summarise(results: dict[str, ClassResult], metric: str, iou_threshold: float,
               num_images: int, iou_rule: str) -> VOCResult:
    missing = [name for name, r in results.items() if r.npos == 0]
    if missing:
        logger.warning("classes with no (non-difficult) ground truth, reported as n/a and left "
                       "out of the mAP: %s", ", ".join(missing))
    aps = [r.ap for r in results.values() if r.npos > 0]
    if aps:
        mean_ap = float(np.mean(aps))
    else:
        logger.warning("no class has non-difficult ground truth; mAP is nan")
        mean_ap = math.nan
    return VOCResult(
        metric=metric, iou_threshold=iou_threshold, map=mean_ap,
        ap={n: r.ap for n, r in results.items()}, npos={n: r.npos for n, r in results.items()},
        num_detections={n: r.num_detections for n, r in results.items()},
        precision={n: r.precision for n, r in results.items()},
        recall={n: r.recall for n, r in results.items()}, num_images=num_images,
        iou_rule=iou_rule)
