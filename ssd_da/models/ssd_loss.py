"""SSD training targets and loss, vectorised over the batch.

The SSD paper (Liu et al. 2016, section 2.2 "Training") fixes three steps:
1. Matching: "we first match each ground truth box to the default box with the best jaccard
   overlap", then "match default boxes to any ground truth with jaccard overlap higher than a
   threshold (0.5)". torchvision's ``SSDMatcher`` implements exactly this per image;
   :func:`match_default_boxes` does the same for a whole padded batch at once, with the same
   tie-breaking (tested to give identical indices).
2. Localisation loss: smooth L1 on the encoded offsets (cx, cy, w, h with variances 0.1/0.2, i.e.
   ``BoxCoder`` weights (10, 10, 5, 5)) of positive default boxes, divided by the number of
   positives N.
3. Confidence loss: softmax cross-entropy over positives and the hardest negatives, at most 3 per
   positive ("hard negative mining", ratio 3:1), divided by N. N = 0 is guarded by clamping to 1,
   as torchvision does, so an all-background batch gives finite (zero) losses.

Box format everywhere here: (..., 4) float xyxy in the model input's pixels (300x300).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection._utils import BoxCoder
from torchvision.ops import box_iou

__all__ = ["check_targets", "pad_targets", "match_default_boxes", "ssd_loss"]


def check_targets(targets: list[dict[str, Tensor]], num_classes: int, batch_size: int) -> None:
    """Raise ``ValueError`` naming the image index and field for malformed training targets.

    Each target needs ``boxes`` (N, 4) float xyxy with x2 > x1 and y2 > y1 (finite), and
    ``labels`` (N,) int64 in 1..num_classes-1 (0 is background). N may be 0. Shapes and dtypes
    are always checked; values only for targets on the CPU, since reading values on a GPU
    would make every training step wait for the device (the trainer hands the loader's CPU
    targets to the model, so its batches are checked in full).
    """
    if len(targets) != batch_size:
        raise ValueError(f"targets: got {len(targets)} dicts for a batch of {batch_size} images")
    for i, target in enumerate(targets):
        if "boxes" not in target or "labels" not in target:
            raise ValueError(f"targets[{i}]: needs keys 'boxes' and 'labels', got {sorted(target)}")
        boxes, labels = target["boxes"], target["labels"]
        if boxes.dim() != 2 or boxes.shape[1] != 4 or not boxes.is_floating_point():
            raise ValueError(f"targets[{i}]['boxes']: expected a float (N, 4) tensor, got "
                             f"{tuple(boxes.shape)} {boxes.dtype}")
        if labels.shape != (boxes.shape[0],) or labels.dtype != torch.int64:
            raise ValueError(f"targets[{i}]['labels']: expected int64 ({boxes.shape[0]},), got "
                             f"{tuple(labels.shape)} {labels.dtype}")
        if boxes.numel() == 0 or boxes.device.type != "cpu" or labels.device.type != "cpu":
            continue
        if not torch.isfinite(boxes).all() or (boxes[:, 2:] <= boxes[:, :2]).any():
            raise ValueError(f"targets[{i}]['boxes']: every box must be finite xyxy with x2 > x1 "
                             f"and y2 > y1, got {boxes.tolist()}")
        if labels.min() < 1 or labels.max() >= num_classes:
            raise ValueError(f"targets[{i}]['labels']: must lie in 1..{num_classes - 1} "
                             f"(0 is background), got {labels.tolist()}")


def pad_targets(targets: list[dict[str, Tensor]],
                device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Stack variable-length targets into padded tensors on ``device``.

    Returns ``boxes`` (B, M, 4) float32 xyxy, ``labels`` (B, M) int64 and ``valid`` (B, M) bool,
    with M = max(1, max N_i) so that images without objects (and all-empty batches) need no
    special case. Padded rows are zero boxes with label 0 and ``valid`` False. Sizes come from
    shapes and rows are copied by slices, so nothing waits for the device; CPU targets are
    padded on the CPU and copied once (without blocking) to ``device``.
    """
    counts = [int(t["boxes"].shape[0]) for t in targets]
    num_max = max([1] + counts)
    source = targets[0]["boxes"].device if targets else torch.device("cpu")
    boxes = torch.zeros(len(targets), num_max, 4, device=source)
    labels = torch.zeros(len(targets), num_max, dtype=torch.int64, device=source)
    for i, (target, count) in enumerate(zip(targets, counts)):
        if count:
            boxes[i, :count] = target["boxes"]
            labels[i, :count] = target["labels"]
    valid = torch.arange(num_max)[None, :] < torch.tensor(counts, dtype=torch.int64).reshape(-1, 1)
    return tuple(t.to(device, non_blocking=True) for t in (boxes, labels, valid))  # type: ignore[return-value]


def match_default_boxes(gt_boxes: Tensor, gt_valid: Tensor, default_boxes: Tensor,
                        iou_thresh: float) -> Tensor:
    """Match default boxes to ground truths for a padded batch (SSD paper, section 2.2).

    Args:
        gt_boxes: (B, M, 4) xyxy, padded as by :func:`pad_targets`.
        gt_valid: (B, M) bool, False for padding rows.
        default_boxes: (A, 4) xyxy, shared by all images (fixed 300x300 input).
        iou_thresh: IoU at or above which a default box matches its best ground truth.

    Returns:
        (B, A) int64: index into M of the matched ground truth, or -1 for background.
        Identical to torchvision's ``SSDMatcher`` run per image (-1 for images without boxes),
        including its tie-breaking: the first best ground truth per default box, and where two
        ground truths force the same default box, the later one (torchvision's CPU ``index_put``
        keeps the last write; here ``amax`` over the ground-truth index makes it deterministic).
    """
    batch, num_gt = gt_valid.shape
    num_anchors = default_boxes.shape[0]
    # One IoU call for the whole batch: (B*M, A) -> (B, M, A); same arithmetic as per image.
    iou = box_iou(gt_boxes.reshape(-1, 4), default_boxes).view(batch, num_gt, num_anchors)
    # Padding rows get -1 so they never win a max (real IoUs are >= 0).
    iou = iou.masked_fill(~gt_valid[:, :, None], -1.0)

    best_iou, matches = iou.max(dim=1)  # best ground truth for each default box
    matches = matches.masked_fill(best_iou < iou_thresh, -1)

    # Force each ground truth's best default box positive, whatever its IoU.
    best_anchor = iou.argmax(dim=2)  # (B, M); torch returns the first maximum, like max()
    gt_index = torch.arange(num_gt, device=iou.device).expand(batch, num_gt)
    gt_index = gt_index.masked_fill(~gt_valid, -1)
    forced = torch.full((batch, num_anchors), -1, dtype=torch.int64, device=iou.device)
    forced.scatter_reduce_(1, best_anchor, gt_index, reduce="amax", include_self=True)
    return torch.where(forced >= 0, forced, matches)


def ssd_loss(cls_logits: Tensor, bbox_regression: Tensor, targets: list[dict[str, Tensor]],
             default_boxes: Tensor, box_coder: BoxCoder, iou_thresh: float = 0.5,
             neg_to_pos_ratio: float = 3.0) -> dict[str, Tensor]:
    """SSD multibox loss for a batch.

    Args:
        cls_logits: (B, A, num_classes) raw class scores; class 0 is background.
        bbox_regression: (B, A, 4) predicted offsets, encoded as ``box_coder`` encodes.
        targets: B dicts with ``boxes`` (N, 4) xyxy input pixels and ``labels`` (N,) int64; N >= 0.
        default_boxes: (A, 4) xyxy input pixels.
        box_coder: the coder whose ``encode_single`` gives regression targets.
        iou_thresh: matching threshold (0.5 in the SSD paper).
        neg_to_pos_ratio: hard negatives kept per positive (3 in the SSD paper).

    Returns:
        ``{"bbox_regression": scalar, "classification": scalar}``, each summed over the batch and
        divided by max(1, number of positive default boxes in the batch).
    """
    cls_logits = cls_logits.float()
    bbox_regression = bbox_regression.float()
    default_boxes = default_boxes.float()
    gt_boxes, gt_labels, gt_valid = pad_targets(targets, cls_logits.device)
    matches = match_default_boxes(gt_boxes, gt_valid, default_boxes, iou_thresh)
    positive = matches >= 0  # (B, A)
    safe = matches.clamp(min=0)
    cls_targets = torch.where(positive, gt_labels.gather(1, safe), torch.zeros_like(safe))
    num_pos = positive.sum()

    # Localisation of the positives. Every default box is encoded and the sum masked, rather
    # than indexing the positives out: a boolean index needs their number on the host, i.e. a
    # device sync every step. Non-positives get their own default box as target (offset 0),
    # so every target is finite.
    anchors = default_boxes[None].expand(positive.shape[0], -1, -1)
    matched_boxes = gt_boxes.gather(1, safe[:, :, None].expand(-1, -1, 4))
    matched_boxes = torch.where(positive[:, :, None], matched_boxes, anchors)
    reg_targets = box_coder.encode_single(matched_boxes.reshape(-1, 4), anchors.reshape(-1, 4))
    box_losses = F.smooth_l1_loss(bbox_regression, reg_targets.view_as(bbox_regression),
                                  reduction="none").sum(dim=-1)
    bbox_loss = torch.where(positive, box_losses, torch.zeros_like(box_losses)).sum()

    num_classes = cls_logits.shape[-1]
    cls_loss = F.cross_entropy(cls_logits.reshape(-1, num_classes), cls_targets.reshape(-1),
                               reduction="none").view_as(cls_targets)
    negative = _hard_negatives(cls_loss.detach(), positive, neg_to_pos_ratio)
    normaliser = num_pos.clamp(min=1).to(cls_loss.dtype)
    kept = torch.where(positive | negative, cls_loss, torch.zeros_like(cls_loss))
    return {
        "bbox_regression": bbox_loss / normaliser,
        "classification": kept.sum() / normaliser,
    }


def _hard_negatives(cls_loss: Tensor, positive: Tensor, neg_to_pos_ratio: float) -> Tensor:
    """(B, A) bool: per image, the ``ratio * num_pos`` background boxes with the highest loss.

    Ranks come from a double argsort, as in torchvision's SSD; positives are pushed to the end
    with -inf and excluded explicitly, so they are never counted twice even when an image has
    fewer negatives than ``ratio * num_pos``.
    """
    num_negative = neg_to_pos_ratio * positive.sum(dim=1, keepdim=True)
    negative_loss = cls_loss.masked_fill(positive, -float("inf"))
    _, order = negative_loss.sort(dim=1, descending=True)
    rank = order.sort(dim=1)[1]
    return (rank < num_negative) & ~positive
