"""COCO-format detection data (as COCO 2017, CVAT, Label Studio and Roboflow export it):
``DIR/annotations/instances_<split>.json`` with the images in ``DIR/<split>/``.

Box convention: COCO's ``bbox`` is ``[x, y, w, h]`` in continuous pixel coordinates; the
dataset's boxes are ``(N, 4)`` float32 xyxy ``[x, y, x + w, y + h]`` in the same pixels, the
format the VOC data uses too (a VOC tree converted with ``ssd_da.data.convert`` therefore gives
identical boxes, labels and training losses). Labels are 1..C in the order of the class names:
by default the categories' names in the order of their ids (ids need not be contiguous).

Crowd objects (``iscrowd: 1``) are never training targets; in evaluation they are what COCO
makes of them: the VOC metric treats them as difficult (a detection matching one is neither a
true nor a false positive, and they are not counted as misses), and the COCO metric is
pycocotools' own, on the JSON file itself.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from pycocotools.coco import COCO

from ssd_da.data.images import ImageAudit, inspect_image
from ssd_da.data.voc import (Annotation, AnnotationError, Transform, UnknownClassError, VOCDetection,
                             describe_other_classes)

logger = logging.getLogger(__name__)

_REQUIRED = {"images": ("id", "file_name"),
             "annotations": ("id", "image_id", "category_id", "bbox"),
             "categories": ("id", "name")}


def coco_paths(data_root: str | Path, split: str) -> tuple[Path, Path]:
    """``(DIR/annotations/instances_<split>.json, DIR/<split>)``; FileNotFoundError naming the
    missing file and the splits that are there."""
    root = Path(data_root)
    json_path = root / "annotations" / f"instances_{split}.json"
    if not json_path.is_file():
        found = sorted(p.name[len("instances_"):-len(".json")]
                       for p in (root / "annotations").glob("instances_*.json"))
        raise FileNotFoundError(
            f"COCO split {split!r}: {json_path} not found; splits in {root / 'annotations'}: "
            f"{', '.join(found) if found else 'none'} (--data-format coco expects "
            f"DIR/annotations/instances_<split>.json and the images in DIR/<split>/)")
    return json_path, root / split


def _check_record(rec: Any, key: str, k: int, json_path: Path) -> None:
    if not isinstance(rec, dict):
        raise AnnotationError(f"{json_path}: {key}[{k}] is not an object: {rec!r}")
    missing = [f for f in _REQUIRED[key] if f not in rec]
    if missing:
        raise AnnotationError(f"{json_path}: {key}[{k}] lacks "
                              f"{', '.join(repr(m) for m in missing)}")


def load_coco_json(json_path: str | Path):
    """The file as a pycocotools ``COCO`` object, checked: ``images``, ``annotations`` and
    ``categories`` lists whose records have the fields COCO requires, unique ids, 4-number
    bboxes with w, h >= 0. ``iscrowd`` defaults to 0 and ``area`` to w * h (COCOeval needs
    both). Raises AnnotationError naming the file and the record."""
    json_path = Path(json_path)
    try:
        data = json.loads(json_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise AnnotationError(f"{json_path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise AnnotationError(f"{json_path}: expected a JSON object with images, annotations "
                              f"and categories")
    for key in _REQUIRED:
        if not isinstance(data.get(key), list):
            raise AnnotationError(f"{json_path}: {key!r} is missing or not a list")
        for k, rec in enumerate(data[key]):
            _check_record(rec, key, k, json_path)
        ids = [rec["id"] for rec in data[key]]
        if len(set(ids)) != len(ids):
            dup = sorted({i for i in ids if ids.count(i) > 1}, key=str)[:5]
            raise AnnotationError(f"{json_path}: {key} ids are not unique (e.g. {dup})")
    cat_ids = {c["id"] for c in data["categories"]}
    for k, ann in enumerate(data["annotations"]):
        if ann["category_id"] not in cat_ids:
            raise AnnotationError(f"{json_path}: annotations[{k}] (id {ann['id']}) has category_id "
                                  f"{ann['category_id']!r}, which is not in 'categories' "
                                  f"(ids {sorted(cat_ids, key=str)})")
        box = ann["bbox"]
        ok = isinstance(box, list) and len(box) == 4 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            for v in box)
        if not ok or box[2] < 0 or box[3] < 0:
            raise AnnotationError(f"{json_path}: annotations[{k}] (id {ann['id']}) bbox must be "
                                  f"[x, y, w, h], 4 finite numbers with w, h >= 0; got {box!r}")
        ann.setdefault("iscrowd", 0)
        ann.setdefault("area", float(box[2] * box[3]))
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress
        coco.createIndex()
    return coco


def category_names(coco) -> list[str]:
    """Category names in the order of their ids; ValueError if two share a name."""
    names = [coco.cats[i]["name"] for i in sorted(coco.cats)]
    if len(set(names)) != len(names):
        raise ValueError(f"categories share names: {names}; class names must be unique")
    return [str(n) for n in names]


def coco_class_names(data_root: str | Path, split: str) -> list[str]:
    """The category names of a COCO split (label k + 1 is name k)."""
    return category_names(load_coco_json(coco_paths(data_root, split)[0]))


def convert_image(record: dict, anns: Sequence[dict], label_of: dict[int, int],
                  size: tuple[int, int], where: str) -> Annotation:
    """One COCO image record and its annotations as an :class:`Annotation`.

    Training view (``boxes``/``labels``): non-crowd boxes of known categories, clipped to
    0..W-1 and 0..H-1 as VOC boxes are, zero-area ones dropped with a warning. Evaluation view
    (``ground_truth()``): every box of a known category as written, crowd ones flagged
    ``difficult``. Boxes are (N, 4) float32 xyxy pixels."""
    height, width = size
    boxes, labels, crowd, kept = [], [], [], []
    for ann in anns:
        if ann["category_id"] not in label_of:
            continue
        kept.append(ann)  # for warnings that name the record as the JSON has it
        x, y, w, h = (float(v) for v in ann["bbox"])
        boxes.append([x, y, x + w, y + h])
        labels.append(label_of[ann["category_id"]])
        crowd.append(bool(ann.get("iscrowd", 0)))
    raw = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    labels_a = np.asarray(labels, dtype=np.int64)
    crowd_a = np.asarray(crowd, dtype=np.bool_)
    clipped = raw.copy()
    # Clipped as the VOC data is, to the last pixel's coordinate (W - 1): a VOC tree converted
    # to COCO then trains on exactly the same targets.
    np.clip(clipped[:, 0::2], 0, width - 1, out=clipped[:, 0::2])
    np.clip(clipped[:, 1::2], 0, height - 1, out=clipped[:, 1::2])
    proper = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    for k in np.flatnonzero(~proper & ~crowd_a):
        logger.warning("%s: annotation id %s (category_id %s, bbox %s) has no area inside the "
                       "%dx%d image; left out of training (evaluation keeps it)", where,
                       kept[k].get("id"), kept[k]["category_id"], kept[k]["bbox"], width, height)
    train = proper & ~crowd_a
    return Annotation(boxes=clipped[train], labels=labels_a[train],
                      difficult=np.zeros(int(train.sum()), dtype=np.bool_), width=width,
                      height=height, filename=str(record["file_name"]), image_id=str(record["id"]),
                      devkit=(raw, labels_a, crowd_a))


class UnknownCategoryError(UnknownClassError):
    """Objects of categories not in the class list (``problem`` names them and an image each)."""

    ADVICE = "add those categories to --classes, or pass --ignore-other-classes to leave them out"


class CocoDetection(VOCDetection):
    """A COCO-format split as a detection dataset: same items, targets and ``Annotation`` s as
    :class:`~ssd_da.data.voc.VOCDetection` (whose image loading it shares); only where the
    annotations come from differs. Images are in the JSON's order; images without annotations
    are kept (all-background samples). ``coco`` is the split's pycocotools object,
    ``coco_ids[i]`` the COCO image id of sample i, ``cat_ids[k]`` the category id of label k+1.

    Args:
        data_root: DIR holding ``annotations/instances_<split>.json`` and ``<split>/``.
        split: e.g. "train2017".
        class_names: classes to use, all of them category names (default: every category, in
            id order). Objects of other categories raise :class:`UnknownCategoryError` unless
            ``ignore_other_classes`` (then they are left out and counted in ``other_class_counts``).
        transform, keep_difficult, max_side: as VOCDetection (crowd objects are never training
            targets, whatever ``keep_difficult`` says).
        skip_bad: skip images listed in the JSON but missing or unreadable on disk (warned,
            counted in ``num_skipped``) instead of raising OSError naming them.
    """

    def __init__(self, data_root: str | Path, split: str, class_names: Sequence[str] | None = None,
                 transform: Transform | None = None, keep_difficult: bool = False,
                 skip_bad: bool = False, ignore_other_classes: bool = False,
                 max_side: int | None = None) -> None:
        json_path, image_dir = coco_paths(data_root, split)
        self.coco = load_coco_json(json_path)
        categories = category_names(self.coco)
        names = list(categories if class_names is None else class_names)
        unknown = [n for n in names if n not in categories]
        if not names or len(set(names)) != len(names) or unknown:
            raise ValueError(f"class names {names} must be unique category names of {json_path}; "
                             f"its categories: {', '.join(categories)}")
        id_of = {self.coco.cats[i]["name"]: i for i in self.coco.cats}
        self.cat_ids = [id_of[n] for n in names]
        label_of = {cat: k + 1 for k, cat in enumerate(self.cat_ids)}
        self.data_root, self.split, self.class_names = Path(data_root), split, tuple(names)
        self.transform, self.keep_difficult = transform, keep_difficult
        self.skip_bad, self.max_side = skip_bad, max_side
        self.annotations: list[Annotation] = []
        self.image_paths: list[Path] = []
        self.coco_ids: list[int] = []
        self.skipped: list[str] = []
        self.audit = ImageAudit()
        for record in self.coco.dataset["images"]:
            path = image_dir / str(record["file_name"])
            try:
                size = self._image_size(record, path, json_path)
            except OSError as err:
                if not skip_bad:
                    raise
                self.skipped.append(str(err))
                logger.warning("skipping bad sample: %s", err)
                continue
            anns = self.coco.imgToAnns.get(record["id"], [])
            self.annotations.append(convert_image(record, anns, label_of, size,
                                                  f"{json_path} image {path.name}"))
            self.image_paths.append(path)
            self.coco_ids.append(record["id"])
        self._check_other_categories(json_path, set(label_of), ignore_other_classes)
        self._log_summary(json_path)

    def _image_size(self, record: dict, path: Path, json_path: Path) -> tuple[int, int]:
        """(height, width): the record's, else the file header's. The file must exist and its
        header read (under ``skip_bad`` it must decode too); OSError naming it otherwise."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"image {path} (id {record['id']}, listed in {json_path}) "
                                    f"not found")
        try:
            height, width, orientation = inspect_image(path, decode=self.skip_bad)
        except OSError as err:
            raise OSError(f"{err} (id {record['id']}, listed in {json_path})") from err
        w, h = record.get("width"), record.get("height")
        listed = (h, w) if isinstance(w, int) and isinstance(h, int) and w > 0 and h > 0 \
            else (height, width)
        self.audit.note(path, (height, width), listed, orientation)
        return listed

    def _check_other_categories(self, json_path: Path, used: set[int], ignore: bool) -> None:
        """Objects (of the kept images) whose category is not in the class list: an error naming
        them unless ``ignore``; counted in ``other_class_counts`` either way."""
        other: dict[str, list[str]] = {}
        for image_id, path in zip(self.coco_ids, self.image_paths):
            for ann in self.coco.imgToAnns.get(image_id, []):
                if ann["category_id"] not in used:
                    name = self.coco.cats[ann["category_id"]]["name"]
                    other.setdefault(name, []).append(path.name)
        self.other_class_counts = {name: len(files) for name, files in other.items()}
        if other and not ignore:
            raise UnknownCategoryError(
                f"{json_path} has objects of categories not in the class list "
                f"[{', '.join(self.class_names)}]: "
                f"{describe_other_classes(other, self.class_names)}",
                self.other_class_counts)
        if other:
            counts = self.other_class_counts
            logger.warning("%s: left out %d object(s) of categories not in the class list "
                           "(--ignore-other-classes): %s", json_path, sum(counts.values()),
                           ", ".join(f"{n} {k!r}" for k, n in sorted(counts.items())))

    def _log_summary(self, json_path: Path) -> None:
        image_ids = set(self.coco.imgs)
        orphans = sum(a["image_id"] not in image_ids for a in self.coco.dataset["annotations"])
        if orphans:
            logger.warning("%s: %d annotations refer to image ids not in 'images'; ignored",
                           json_path, orphans)
        listed = len(self.coco.dataset["images"])
        if self.num_skipped:
            logger.warning("%s: skipped %d bad samples of %d (--skip-bad)", json_path,
                           self.num_skipped, listed)
        if not self.annotations:
            raise ValueError(f"{json_path}: none of the {listed} listed images is usable "
                             f"({self.num_skipped} skipped as bad)")
        self.audit.report(f"{self.split} ({json_path})", len(self.annotations))
        crowd = sum(int(a.ground_truth()["difficult"].sum()) for a in self.annotations)
        objects = sum(len(a.labels) for a in self.annotations)
        logger.info("%s (%s): %d images, %d objects for training, %d crowd", self.split,
                    self.data_root, len(self.annotations), objects, crowd)
