"""Checks and packing of :func:`ssd_da.evaluation.voc.evaluate_voc`'s inputs: per-image dicts of
``boxes`` (N, 4) xyxy and (N,) ``scores`` / ``labels`` / ``difficult``, concatenated into flat
arrays with the image index of each row, every value checked with a message naming the image."""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

__all__ = ["as_boxes", "as_labels", "check_boxes", "concat"]


def as_boxes(value: object, what: str) -> np.ndarray:
    boxes = np.asarray(value, dtype=np.float64)
    if boxes.size == 0:
        return boxes.reshape(0, 4)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{what} must have shape (N, 4) (xyxy), got {boxes.shape}")
    return boxes


def check_boxes(boxes: np.ndarray, owner: np.ndarray, what: str,
                 allow_inverted: bool = False) -> None:
    """Finite, and x2 >= x1, y2 >= y1 unless ``allow_inverted`` (ground truth: the devkit
    counts an inverted box as an object no detection can match); ``owner`` (N,) gives the
    image index for the error message."""
    bad = ~np.isfinite(boxes).all(axis=1)
    if not allow_inverted:
        bad |= (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
    if bad.any():
        k = int(np.argmax(bad))
        rule = "" if allow_inverted else " with x2 >= x1 and y2 >= y1"
        raise ValueError(f"{what} of image {int(owner[k])}: box {boxes[k].tolist()} is not finite "
                         f"xyxy{rule}")


def as_labels(value: object, num_classes: int, owner: np.ndarray, what: str) -> np.ndarray:
    labels = np.asarray(value)
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        if not (np.issubdtype(labels.dtype, np.floating) and np.all(labels == np.round(labels))):
            raise ValueError(f"{what} must be integers in 1..{num_classes}, "
                             f"got dtype {labels.dtype}")
    labels = labels.astype(np.int64)
    bad = (labels < 1) | (labels > num_classes)
    if bad.any():
        k = int(np.argmax(bad))
        raise ValueError(f"{what} of image {int(owner[k])}: label {int(labels[k])} is out of range "
                         f"1..{num_classes} (0 is background; label i is class_names[i-1])")
    return labels


def _missing(item: Mapping, key: str, index: int, what: str) -> ValueError:
    return ValueError(f"{what}[{index}] has no {key!r} (keys: {sorted(item)})")


def concat(items: Sequence[Mapping], keys: Sequence[str], what: str
            ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Concatenate per-image dicts; returns (image index per row, {key: concatenated}).

    Checks shapes per image (``boxes`` (N, 4), each of ``keys`` (N,)); values are checked
    vectorised by the caller. A missing ``difficult`` means none difficult.
    """
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("boxes", *keys)}
    sizes = np.zeros(len(items), dtype=np.int64)
    for i, item in enumerate(items):
        if not isinstance(item, dict) and not isinstance(item, Mapping):  # dict: fast path
            raise ValueError(f"{what}[{i}] must be a dict, got {type(item).__name__}")
        if "boxes" not in item:
            raise _missing(item, "boxes", i, what)
        boxes = as_boxes(item["boxes"], f"{what}[{i}]['boxes']")
        sizes[i] = n = len(boxes)
        parts["boxes"].append(boxes)
        for key in keys:
            if key in item:
                value = np.asarray(item[key])
            elif key == "difficult":
                value = np.zeros(n, dtype=bool)
            else:
                raise _missing(item, key, i, what)
            if value.shape != (n,) and not (n == 0 and value.size == 0):
                raise ValueError(f"{what}[{i}][{key!r}] has shape {value.shape}, but 'boxes' "
                                 f"has {n} rows: expected ({n},)")
            parts[key].append(value.reshape(n))
    image = np.repeat(np.arange(len(items)), sizes)
    if not items:
        return image, {"boxes": np.zeros((0, 4)), **{k: np.zeros(0) for k in keys}}
    return image, {k: np.concatenate(v) for k, v in parts.items()}
