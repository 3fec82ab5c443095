"""PASCAL VOC data: XML parsing, split resolution, the detection dataset and its collate function.

Box convention (docs/design.md): ``(N, 4)`` float32 xyxy in absolute pixels, 0-based, i.e. the
XML's 1-based inclusive coordinates minus 1 for all four values (as amdegroot/ssd.pytorch and
lufficc/SSD do). Labels are 1..C in the order of ``class_names``; 0 is background.
"""

from __future__ import annotations

import logging
import math
import os
import random
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

logger = logging.getLogger(__name__)

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)

# Split name -> (year folder, ImageSets/Main set). VOC2012 test has no public annotations.
SPLITS: dict[str, tuple[str, str]] = {
    "voc07_trainval": ("VOC2007", "trainval"),
    "voc07_train": ("VOC2007", "train"),
    "voc07_val": ("VOC2007", "val"),
    "voc07_test": ("VOC2007", "test"),
    "voc12_trainval": ("VOC2012", "trainval"),
    "voc12_train": ("VOC2012", "train"),
    "voc12_val": ("VOC2012", "val"),
}

_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
_COORD_TAGS = ("xmin", "ymin", "xmax", "ymax")


class AnnotationError(ValueError):
    """A VOC XML file is malformed (unparsable, missing or non-numeric fields)."""


class MissingSizeError(AnnotationError):
    """The XML has no usable ``<size>`` and no ``image_size`` was given to replace it."""


@dataclass
class Annotation:
    """One parsed VOC annotation.

    boxes: (N, 4) float32 xyxy, 0-based absolute pixels, clipped to the image, zero-area and
    inverted boxes dropped (the training targets). labels: (N,) int64 in 1..C.
    difficult: (N,) bool. width/height: image size in pixels.
    devkit: None when the above are also the evaluation ground truth; otherwise (boxes, labels,
    difficult) of every object as the VOC devkit reads it (see :meth:`ground_truth`).
    """

    boxes: np.ndarray
    labels: np.ndarray
    difficult: np.ndarray
    width: int
    height: int
    filename: str
    image_id: str
    devkit: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def ground_truth(self) -> dict[str, np.ndarray]:
        """Evaluation ground truth, as the VOC devkit counts it: every top-level object of a
        known class with its box as written (minus 1), neither clipped nor dropped. A box with
        xmin == xmax is one pixel wide in the devkit's inclusive convention and counts as an
        object there, so dropping it (as training must) would change AP. Returns ``{"boxes":
        (M, 4) float32 xyxy 0-based, "labels": (M,) int64, "difficult": (M,) bool}``."""
        boxes, labels, difficult = self.devkit if self.devkit is not None else (
            self.boxes, self.labels, self.difficult)
        return {"boxes": boxes, "labels": labels, "difficult": difficult}


def _number(elem: ET.Element | None, what: str, xml_path: Path) -> float:
    """Float value of ``elem``'s text; AnnotationError naming the file and field otherwise."""
    if elem is None or elem.text is None or not elem.text.strip():
        raise AnnotationError(f"{xml_path}: missing {what}")
    try:
        value = float(elem.text)
    except ValueError:
        raise AnnotationError(f"{xml_path}: {what} is not a number: {elem.text.strip()!r}") from None
    if not math.isfinite(value):
        raise AnnotationError(f"{xml_path}: {what} is not finite: {elem.text.strip()!r}")
    return value


def _box(bndbox: ET.Element, xml_path: Path, k: int, name: str) -> list[float]:
    """The four <bndbox> numbers; the fast path skips building error messages (16k files)."""
    try:
        box = [float(bndbox.findtext(t)) for t in _COORD_TAGS]  # type: ignore[arg-type]
        if all(math.isfinite(v) for v in box):
            return box
    except (TypeError, ValueError):
        pass
    return [_number(bndbox.find(t), f"object #{k} ({name}) <bndbox><{t}>", xml_path) for t in _COORD_TAGS]


def _image_size(root: ET.Element, xml_path: Path, image_size: tuple[int, int] | None) -> tuple[int, int]:
    """(height, width) from ``<size>``; falls back to ``image_size`` when it is missing or zero."""
    size = root.find("size")
    if size is not None and size.find("width") is not None and size.find("height") is not None:
        width = int(_number(size.find("width"), "<size><width>", xml_path))
        height = int(_number(size.find("height"), "<size><height>", xml_path))
        if width > 0 and height > 0:
            return height, width
    if image_size is None:
        raise MissingSizeError(f"{xml_path}: <size> is missing or zero and no image_size was given")
    return int(image_size[0]), int(image_size[1])


def _parse_objects(
    root: ET.Element, xml_path: Path, class_to_label: dict[str, int]
) -> tuple[list[list[float]], list[int], list[bool], list[bool]]:
    """Top-level objects of a known class in XML (1-based) coordinates: (boxes, labels,
    difficult, proper), proper False for a zero-area or inverted box (left out of training)."""
    boxes: list[list[float]] = []
    labels: list[int] = []
    difficult: list[bool] = []
    proper: list[bool] = []
    # findall("object") only returns direct children, so nested <part> boxes are never read
    # (VOC person objects carry head/hand/foot parts with bndboxes of their own).
    for k, obj in enumerate(root.findall("object"), start=1):
        name_elem = obj.find("name")
        if name_elem is None or name_elem.text is None or not name_elem.text.strip():
            raise AnnotationError(f"{xml_path}: object #{k} has no <name>")
        name = name_elem.text.strip()
        bndbox = obj.find("bndbox")
        if bndbox is None:
            raise AnnotationError(f"{xml_path}: object #{k} ({name}) has no <bndbox>")
        box = _box(bndbox, xml_path, k, name)
        diff_elem = obj.find("difficult")
        is_difficult = False
        if diff_elem is not None and diff_elem.text is not None and diff_elem.text.strip():
            is_difficult = bool(int(_number(diff_elem, f"object #{k} ({name}) <difficult>", xml_path)))
        if name not in class_to_label:
            logger.debug("%s: object #%d has class %r not in class_names; skipped", xml_path, k, name)
            continue
        proper.append(box[2] > box[0] and box[3] > box[1])
        if not proper[-1]:
            logger.warning("%s: object #%d (%s) has a zero-area or inverted box %s; left out of "
                           "training (evaluation keeps it, as the VOC devkit does)",
                           xml_path, k, name, tuple(box))
        boxes.append(box)
        labels.append(class_to_label[name])
        difficult.append(is_difficult)
    return boxes, labels, difficult, proper


def parse_annotation(
    xml_path: str | Path,
    class_names: Sequence[str],
    image_size: tuple[int, int] | None = None,
) -> Annotation:
    """Parse one VOC XML file.

    Args:
        xml_path: the Annotations/<id>.xml file.
        class_names: object classes; label k+1 is class_names[k]. Other classes are skipped.
        image_size: (height, width) of the real image, used only when ``<size>`` is missing or zero.

    Returns:
        Annotation with boxes (N, 4) float32 xyxy 0-based pixels clipped to (0..w-1, 0..h-1),
        and the unclipped, undropped devkit ground truth (``Annotation.ground_truth()``).

    Raises:
        AnnotationError: unparsable XML, missing/non-numeric bndbox coordinate, missing name.
    """
    xml_path = Path(xml_path)
    try:
        root = ET.parse(xml_path).getroot()
    except ET.ParseError as err:
        raise AnnotationError(f"{xml_path}: malformed XML ({err})") from None
    height, width = _image_size(root, xml_path, image_size)
    class_to_label = {name: i + 1 for i, name in enumerate(class_names)}
    boxes_l, labels_l, difficult_l, proper_l = _parse_objects(root, xml_path, class_to_label)
    raw = np.asarray(boxes_l, dtype=np.float32).reshape(-1, 4) - 1.0
    labels = np.asarray(labels_l, dtype=np.int64)
    difficult = np.asarray(difficult_l, dtype=np.bool_)
    boxes = raw.copy()
    np.clip(boxes[:, 0::2], 0, width - 1, out=boxes[:, 0::2])
    np.clip(boxes[:, 1::2], 0, height - 1, out=boxes[:, 1::2])
    # A box lying entirely outside the image collapses to zero area once clipped.
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    for k in np.flatnonzero(~keep & np.asarray(proper_l, dtype=np.bool_)):
        logger.warning("%s: box %d (label %d) lies outside the %dx%d image; left out of training",
                       xml_path, int(k), int(labels[k]), width, height)
    devkit = None if keep.all() and np.array_equal(raw, boxes) else (raw, labels, difficult)
    filename_elem = root.find("filename")
    filename = filename_elem.text.strip() if filename_elem is not None and filename_elem.text else ""
    return Annotation(boxes=boxes[keep], labels=labels[keep], difficult=difficult[keep],
                      width=width, height=height, filename=filename, image_id=xml_path.stem,
                      devkit=devkit)


def resolve_split(data_root: str | Path, split: str) -> list[tuple[Path, str]]:
    """(year folder, image id) pairs of a split such as "voc07_trainval+voc12_trainval".

    Args:
        data_root: a VOCdevkit folder holding VOC2007/ and/or VOC2012/.
        split: one name of ``SPLITS`` or several joined with '+', concatenated in order.

    Raises:
        ValueError: unknown split name (the message lists the valid ones).
        FileNotFoundError: missing data root, year folder or ImageSets/Main/<set>.txt.
    """
    data_root = Path(data_root)
    names = [s.strip() for s in split.split("+")]
    unknown = [s for s in names if s not in SPLITS]
    if unknown:
        raise ValueError(f"unknown split {unknown[0]!r} in {split!r}; valid names: "
                         f"{', '.join(SPLITS)} (join several with '+')")
    if not data_root.is_dir():
        where = "" if data_root.is_absolute() else (
            f" under the current directory {Path.cwd()}; relative paths, like those in configs/, "
            f"are read from where the tool runs: run it from the repository root")
        raise FileNotFoundError(f"data root {data_root} not found{where} (expected a VOCdevkit "
                                f"folder with VOC2007/ and/or VOC2012/)")
    items: list[tuple[Path, str]] = []
    for name in names:
        year, image_set = SPLITS[name]
        year_dir = data_root / year
        if not year_dir.is_dir():
            raise FileNotFoundError(f"split {name} needs {year_dir}, which does not exist")
        set_file = year_dir / "ImageSets" / "Main" / f"{image_set}.txt"
        if not set_file.is_file():
            raise FileNotFoundError(f"split {name} needs the image set file {set_file}, which does not exist")
        ids = [line.split()[0] for line in set_file.read_text().splitlines() if line.strip()]
        items.extend((year_dir, image_id) for image_id in ids)
    return items


def find_image(year_dir: str | Path, image_id: str, filename: str = "") -> Path | None:
    """JPEGImages/<id>.jpg, else the XML's <filename>, else <id> with another image extension."""
    image_dir = os.path.join(year_dir, "JPEGImages")
    first = os.path.join(image_dir, image_id + ".jpg")  # string paths: this runs for every image
    if os.path.exists(first):
        return Path(first)
    names = ([filename] if filename else []) + [image_id + ext for ext in _IMAGE_EXTENSIONS[1:]]
    for name in names:
        path = os.path.join(image_dir, name)
        if os.path.exists(path):
            return Path(path)
    return None


def load_rgb(path: str | Path) -> np.ndarray:
    """Read an image file as (H, W, 3) uint8 RGB, whatever its mode (L, P, RGBA, CMYK, ...)."""
    try:
        with Image.open(path) as img:
            if img.mode == "P" and "transparency" in img.info:
                img = img.convert("RGBA")  # PIL warns when palette transparency goes straight to RGB
            return np.array(img.convert("RGB"), dtype=np.uint8)  # a writable copy
    except (OSError, ValueError) as err:
        raise OSError(f"cannot read image {path}: {err}") from err


Transform = Callable[..., dict[str, Any]]


class VOCDetection(torch.utils.data.Dataset):
    """PASCAL VOC detection dataset (any VOC-layout folder, e.g. BCCD or the synthetic demo).

    All annotations are parsed at construction and kept in memory (images are decoded lazily).
    ``__getitem__(i)`` returns ``(image, target)``:

    - image: (3, H, W) float32 tensor; with ``transform=None`` the RGB pixels scaled to 0..1 at
      the original size, otherwise whatever the transform's "image" is (normalised 300x300).
    - target: ``boxes`` (N, 4) float32 xyxy in the output image's pixels (0-based),
      ``labels`` (N,) int64 in 1..C, ``image_id`` str, ``orig_size`` (h, w) of the original
      image, ``index`` int. Difficult objects are left out unless ``keep_difficult``.

    ``transform`` is called as ``transform(image=uint8 (H, W, 3), bboxes=float32 (N, 4) xyxy
    pixels, labels=int64 (N,))`` and returns a dict with "image", "bboxes" and "labels", as an
    albumentations Compose with ``BboxParams(format="pascal_voc", label_fields=["labels"])`` does.
    """

    def __init__(
        self,
        data_root: str | Path,
        split: str,
        class_names: Sequence[str] = VOC_CLASSES,
        transform: Transform | None = None,
        keep_difficult: bool = False,
        skip_bad: bool = False,
    ) -> None:
        if len(class_names) == 0 or len(set(class_names)) != len(class_names):
            raise ValueError(f"class_names must be non-empty and unique, got {list(class_names)}")
        self.data_root = Path(data_root)
        self.split = split
        self.class_names = tuple(class_names)
        self.transform = transform
        self.keep_difficult = keep_difficult
        self.annotations: list[Annotation] = []
        self.image_paths: list[Path] = []
        self.num_skipped = 0
        for year_dir, image_id in resolve_split(self.data_root, split):
            try:
                ann, image_path = self._load_one(year_dir, image_id)
            except (AnnotationError, OSError) as err:  # OSError: missing or unreadable file
                if not skip_bad:
                    raise
                self.num_skipped += 1
                logger.warning("skipping bad sample: %s", err)
                continue
            self.annotations.append(ann)
            self.image_paths.append(image_path)
        if self.num_skipped:
            logger.warning("%s: skipped %d bad samples of %d", split, self.num_skipped,
                           self.num_skipped + len(self.annotations))
        num_objects = sum(len(a.labels) for a in self.annotations)
        num_difficult = sum(int(a.difficult.sum()) for a in self.annotations)
        logger.info("%s (%s): %d images, %d objects (%d difficult)", split, self.data_root,
                    len(self.annotations), num_objects, num_difficult)

    def _load_one(self, year_dir: Path, image_id: str) -> tuple[Annotation, Path]:
        """Parse one XML and locate its image; raises naming the file that is missing or bad."""
        xml_path = os.path.join(year_dir, "Annotations", image_id + ".xml")
        if not os.path.isfile(xml_path):
            raise FileNotFoundError(f"annotation file {xml_path} not found")
        try:
            ann = parse_annotation(xml_path, self.class_names)
            image_path = find_image(year_dir, image_id, ann.filename)
        except MissingSizeError:
            # No usable <size>: read the real size from the image header (no pixel decoding).
            image_path = find_image(year_dir, image_id)
            if image_path is not None:
                try:
                    with Image.open(image_path) as img:
                        width, height = img.size
                except OSError as err:
                    raise OSError(f"cannot read image {image_path} (needed for the size that "
                                  f"{xml_path} lacks): {err}") from err
                ann = parse_annotation(xml_path, self.class_names, image_size=(height, width))
        if image_path is None:
            raise FileNotFoundError(f"image for {xml_path} not found: expected "
                                    f"{os.path.join(year_dir, 'JPEGImages', image_id + '.jpg')}")
        return ann, image_path

    def __len__(self) -> int:
        return len(self.annotations)

    def get_annotation(self, index: int) -> Annotation:
        """Full parsed annotation of sample ``index`` (difficult objects included), no image read."""
        return self.annotations[index]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        ann = self.annotations[index]
        image = load_rgb(self.image_paths[index])
        height, width = image.shape[:2]
        boxes, labels = ann.boxes, ann.labels
        if not self.keep_difficult:
            boxes, labels = boxes[~ann.difficult], labels[~ann.difficult]
        if (height, width) != (ann.height, ann.width):
            # The XML's <size> disagrees with the file; keep the boxes inside the real image.
            logger.warning("%s is %dx%d but its annotation says %dx%d; clipping boxes to the image",
                           self.image_paths[index], width, height, ann.width, ann.height)
            boxes = boxes.copy()
            np.clip(boxes[:, 0::2], 0, width - 1, out=boxes[:, 0::2])
            np.clip(boxes[:, 1::2], 0, height - 1, out=boxes[:, 1::2])
            keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            boxes, labels = boxes[keep], labels[keep]
        if self.transform is None:
            image_t = torch.from_numpy(image).permute(2, 0, 1).float().div_(255.0)
            boxes_t = torch.from_numpy(boxes.copy())
            labels_t = torch.from_numpy(labels.copy())
        else:
            out = self.transform(image=image, bboxes=boxes, labels=labels)
            image_t = out["image"]
            boxes_t = torch.as_tensor(np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4))
            labels_t = torch.as_tensor(np.asarray(out["labels"], dtype=np.int64).reshape(-1))
        target = {"boxes": boxes_t, "labels": labels_t, "image_id": ann.image_id,
                  "orig_size": (height, width), "index": index}
        return image_t, target


def detection_collate(
    batch: Sequence[tuple[torch.Tensor, dict[str, Any]]],
) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """Stack images (B, 3, H, W) and keep the per-image targets as a list of dicts."""
    images = [img for img, _ in batch]
    shapes = {tuple(img.shape) for img in images}
    if len(shapes) > 1:
        raise ValueError(f"images in a batch must share one shape to be stacked, got {sorted(shapes)}; "
                         f"use a transform that resizes (build_train_transform / build_eval_transform)")
    return torch.stack(images, dim=0), [target for _, target in batch]


def worker_init_fn(worker_id: int) -> None:
    """DataLoader ``worker_init_fn`` giving each worker (and each epoch) its own augmentation stream.

    albumentations transforms keep private generators; forked workers would otherwise inherit
    identical copies and draw the same augmentations. ``torch.initial_seed()`` in a worker is the
    loader's per-epoch base seed + worker_id, so it differs across workers and epochs.
    """
    info = torch.utils.data.get_worker_info()
    dataset = info.dataset if info is not None else None
    while dataset is not None and not hasattr(dataset, "transform") and hasattr(dataset, "dataset"):
        dataset = dataset.dataset  # torch.utils.data.Subset and similar wrappers
    transform = getattr(dataset, "transform", None)
    if transform is not None and hasattr(transform, "set_random_state"):
        seed = torch.initial_seed() % 2**32
        transform.set_random_state(np.random.default_rng(seed), random.Random(seed))
