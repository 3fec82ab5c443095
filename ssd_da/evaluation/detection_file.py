"""The detection file format of ``tools/eval_voc.py --detections / --save-detections``.

A JSON list of ``{"image_id": "000001", "label": "dog", "score": 0.93, "bbox": [x1, y1, x2, y2]}``
with boxes in the annotation XML's 1-based pixel coordinates (the model and the data pipeline use
0-based pixels, docs/design.md: 1 is added on writing and subtracted on reading). Scores are
written at full precision, so evaluating a saved file gives the same mAP as the run that wrote it.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

__all__ = ["DetectionFileError", "load_detection_file", "detections_to_records",
           "write_detection_file"]


class DetectionFileError(ValueError):
    """A malformed detection file (the message names the file, the record and the field)."""


def _is_number(value: Any) -> bool:
    """A JSON number (true/false are not numbers here, although Python's bool is an int)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _parse_record(rec: Any, where: str, index: dict[str, int], label_of: dict[str, int],
                  image_ids: Sequence[str], class_names: Sequence[str]) -> tuple[int, tuple]:
    """(image index, (x1, y1, x2, y2 0-based, score, label)) of one record, or an error."""
    if not isinstance(rec, dict) or not {"image_id", "label", "score", "bbox"} <= set(rec):
        raise DetectionFileError(f"{where} must have image_id, label, score and bbox; got {rec!r}")
    img, label, box, score = str(rec["image_id"]), rec["label"], rec["bbox"], rec["score"]
    if img not in index:
        raise DetectionFileError(f"{where}: image_id {img!r} is not in the split "
                                 f"({len(image_ids)} images, e.g. {', '.join(image_ids[:3])})")
    if not isinstance(label, str) or label not in label_of:
        raise DetectionFileError(f"{where}: unknown label {label!r}; valid: {', '.join(class_names)}")
    ok = isinstance(box, list) and len(box) == 4 and all(
        _is_number(v) and math.isfinite(v) for v in box)
    if not ok or box[2] < box[0] or box[3] < box[1]:
        raise DetectionFileError(f"{where}: bbox must be 4 finite numbers [x1, y1, x2, y2] with "
                                 f"x2 >= x1 and y2 >= y1; got {box!r}")
    if not _is_number(score) or not math.isfinite(score):
        raise DetectionFileError(f"{where}: score must be a finite number; got {score!r}")
    return index[img], (*[v - 1.0 for v in box], float(score), label_of[label])


def load_detection_file(path: str | Path, image_ids: Sequence[str], class_names: Sequence[str]
                        ) -> list[dict[str, np.ndarray]]:
    """Per-image detections aligned with ``image_ids``: ``boxes`` (K, 4) float64 xyxy 0-based,
    ``scores`` (K,), ``labels`` (K,) int64 in 1..C (label k is ``class_names[k - 1]``)."""
    path = Path(path)
    try:
        records = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DetectionFileError(f"{path}: cannot read detections: {exc}") from exc
    if not isinstance(records, list):
        raise DetectionFileError(f"{path}: expected a JSON list of detections")
    index = {img: i for i, img in enumerate(image_ids)}
    label_of = {c: i + 1 for i, c in enumerate(class_names)}
    per_image: list[list[tuple]] = [[] for _ in image_ids]
    for n, rec in enumerate(records):
        i, row = _parse_record(rec, f"{path}: detection #{n}", index, label_of, image_ids,
                               class_names)
        per_image[i].append(row)
    out = []
    for dets in per_image:
        arr = np.asarray(dets, dtype=np.float64).reshape(-1, 6)
        out.append({"boxes": arr[:, :4], "scores": arr[:, 4], "labels": arr[:, 5].astype(np.int64)})
    return out


def detections_to_records(detections: Sequence[dict[str, np.ndarray]], image_ids: Sequence[str],
                          class_names: Sequence[str]) -> list[dict[str, Any]]:
    """The inverse of :func:`load_detection_file`: XML (1-based) coordinates, class names."""
    records = []
    for img, det in zip(image_ids, detections):
        for box, score, label in zip(det["boxes"], det["scores"], det["labels"]):
            records.append({"image_id": img, "label": class_names[int(label) - 1],
                            "score": float(score), "bbox": [float(v) + 1.0 for v in box]})
    return records


def write_detection_file(path: str | Path, detections: Sequence[dict[str, np.ndarray]],
                         image_ids: Sequence[str], class_names: Sequence[str]) -> int:
    """Write ``detections`` in the format above; returns the number of records."""
    records = detections_to_records(detections, image_ids, class_names)
    Path(path).write_text(json.dumps(records))
    return len(records)
