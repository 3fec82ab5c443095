"""The SSD augmentation's random draws and settings, shared by both implementations (the
albumentations pipeline of :mod:`ssd_da.data.transforms` and the fast one of
:mod:`ssd_da.data.augment`), so neither imports the other for them: :class:`AugmentSettings`,
the zoom-out and min-IoU crop draws, and the box geometry they use."""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ssd_da.models.pretrained import IMAGENET_MEAN

__all__ = ["AugmentSettings", "MEAN_PIXEL", "SSD_MIN_IOUS", "OUTPUTS", "box_iou_with_rects",
           "box_iou_with_rect", "box_centres_inside", "sample_zoom_out", "sample_min_iou_crop"]

# The zoom-out canvas is filled with the mean pixel, so it normalises to (about) zero.
MEAN_PIXEL: tuple[float, float, float] = tuple(255.0 * m for m in IMAGENET_MEAN)  # type: ignore[assignment]

# SSD sec 2.2 "Data augmentation": use the whole image (None), or a patch whose minimum IoU with
# the objects is 0.1/0.3/0.5/0.7/0.9, or a random patch (0.0: no IoU constraint).
SSD_MIN_IOUS: tuple[float | None, ...] = (None, 0.1, 0.3, 0.5, 0.7, 0.9, 0.0)


def box_iou_with_rects(boxes: np.ndarray, rects: np.ndarray) -> np.ndarray:
    """IoU of (N, 4) xyxy boxes with (T, 4) xyxy rectangles, continuous areas (no +1). Returns (T, N)."""
    boxes, rects = boxes[None, :, :4], np.asarray(rects, dtype=np.float64)[:, None, :]
    iw = np.clip(np.minimum(boxes[..., 2], rects[..., 2]) - np.maximum(boxes[..., 0], rects[..., 0]), 0, None)
    ih = np.clip(np.minimum(boxes[..., 3], rects[..., 3]) - np.maximum(boxes[..., 1], rects[..., 1]), 0, None)
    inter = iw * ih
    area_b = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
    area_r = (rects[..., 2] - rects[..., 0]) * (rects[..., 3] - rects[..., 1])
    return inter / (area_b + area_r - inter)


def box_iou_with_rect(boxes: np.ndarray, rect: Sequence[float]) -> np.ndarray:
    """IoU of (N, 4) xyxy boxes with one xyxy rectangle, continuous areas (no +1). Returns (N,)."""
    return box_iou_with_rects(boxes, np.asarray([rect]))[0]


def box_centres_inside(boxes: np.ndarray, rect: Sequence[float]) -> np.ndarray:
    """(N,) bool: box centre strictly inside the xyxy rectangle (ssd.pytorch's keep rule)."""
    cx = (boxes[:, 0] + boxes[:, 2]) / 2
    cy = (boxes[:, 1] + boxes[:, 3]) / 2
    return (rect[0] < cx) & (cx < rect[2]) & (rect[1] < cy) & (cy < rect[3])


OUTPUTS: tuple[str, ...] = ("float", "uint8")


@dataclass(frozen=True)
class AugmentSettings:
    """What the SSD training augmentation draws from (Liu et al. 2016 sec 2.2 and 3.6; see
    ``ssd_da.data.transforms.build_train_transform``): photometric distortion on or off and its
    channel-swap probability, the zoom-out probability and largest ratio, the crop's min-IoU
    options and whether every box must meet the drawn one, the flip probability. The defaults
    are the SSD recipe (the channel swap off: our choice)."""
    photometric: bool = True
    channel_swap_p: float = 0.0
    zoom_out_p: float = 0.5
    max_zoom_out: float = 4.0
    min_ious: Sequence[float | None] = SSD_MIN_IOUS
    crop_require_all: bool = False
    flip_p: float = 0.5

    def __post_init__(self) -> None:
        object.__setattr__(self, "min_ious", tuple(self.min_ious))  # frozen: hashable too


def sample_zoom_out(rng: random.Random, height: int, width: int, max_ratio: float
                    ) -> tuple[int, int, int, int]:
    """Zoom-out draw (ssd.pytorch's Expand): ratio r ~ U[1, max_ratio], then an integer paste
    offset. Returns ``(left, top, canvas_w, canvas_h)``; the canvas always holds the image."""
    ratio = rng.uniform(1.0, max_ratio)
    left = int(rng.uniform(0.0, width * ratio - width))
    top = int(rng.uniform(0.0, height * ratio - height))
    # The canvas must hold the image even when int() rounds width * ratio down.
    return left, top, max(int(width * ratio), left + width), max(int(height * ratio), top + height)


def sample_min_iou_crop(rng: random.Random, height: int, width: int, boxes: np.ndarray,
                        min_ious: Sequence[float | None] = SSD_MIN_IOUS, min_scale: float = 0.3,
                        max_aspect: float = 2.0, max_trials: int = 50, require_all: bool = False
                        ) -> tuple[int, int, int, int]:
    """SSD's patch draw on a ``height x width`` image with (N, 4) xyxy pixel ``boxes``; see
    :class:`MinIoURandomCrop`. Returns the patch ``(x1, y1, x2, y2)`` in integer pixels, the
    whole image when the drawn option is None, there are no boxes or no trial succeeds."""
    whole = (0, 0, width, height)
    min_iou = min_ious[rng.randrange(len(min_ious))]
    if min_iou is None or boxes.size == 0:
        return whole
    # All trials are drawn at once (w, h, left, top uniforms each) and tested together. The
    # first trial that passes is the patch, as in a loop over trials that stops there: the
    # draws are independent, so the distribution of the patch is the loop's.
    u = np.array([rng.random() for _ in range(4 * max_trials)]).reshape(max_trials, 4)
    w = width * (min_scale + (1.0 - min_scale) * u[:, 0])
    h = height * (min_scale + (1.0 - min_scale) * u[:, 1])
    left, top = (width - w) * u[:, 2], (height - h) * u[:, 3]
    rects = np.stack([left, top, left + w, top + h], axis=1).astype(np.int64)  # int(): all >= 0
    ok = (h / w >= 1.0 / max_aspect) & (h / w <= max_aspect)
    ok &= (rects[:, 2] > rects[:, 0]) & (rects[:, 3] > rects[:, 1])
    ious = box_iou_with_rects(boxes, rects)
    ok &= (ious.min(axis=1) if require_all else ious.max(axis=1)) >= min_iou
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    ok &= ((rects[:, 0:1] < cx) & (cx < rects[:, 2:3]) & (rects[:, 1:2] < cy) & (cy < rects[:, 3:4])).any(axis=1)
    first = np.flatnonzero(ok)
    return tuple(int(v) for v in rects[first[0]]) if first.size else whole  # type: ignore[return-value]
