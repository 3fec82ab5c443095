"""PASCAL VOC data: split resolution, the detection dataset and its collate function (the XML
parsing is in ``voc_xml.py``, image reading in ``images.py``).

Box convention (docs/design.md): ``(N, 4)`` float32 xyxy in absolute pixels, 0-based, i.e. the
XML's 1-based inclusive coordinates minus 1 for all four values (as amdegroot/ssd.pytorch and
lufficc/SSD do). Labels are 1..C in the order of ``class_names``; 0 is background.
"""

from __future__ import annotations

import difflib
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ssd_da.data.decode import EncodedImage
from ssd_da.data.images import (ImageAudit, check_image, inspect_image,  # noqa: F401
                                load_rgb, read_image)
from ssd_da.data.voc_xml import (Annotation, AnnotationError, MissingSizeError,  # noqa: F401
                                 clip_boxes, parse_annotation)

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
def resolve_split(data_root: str | Path, split: str) -> list[tuple[Path, str]]:
    """(year folder, image id) pairs of a split such as "voc07_trainval+voc12_trainval".

    Args:
        data_root: a VOCdevkit folder holding VOC2007/ and/or VOC2012/.
        split: one name of ``SPLITS`` or several joined with '+', concatenated in order.

    Raises:
        ValueError: unknown split name (the message lists the valid ones); an image set file
            that lists no image; an image id listed more than once (evaluation would count
            that image's objects once per copy but match its detections only once).
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
    set_files: list[Path] = []
    for name in names:
        year, image_set = SPLITS[name]
        year_dir = data_root / year
        if not year_dir.is_dir():
            raise FileNotFoundError(f"split {name} needs {year_dir}, which does not exist")
        set_file = year_dir / "ImageSets" / "Main" / f"{image_set}.txt"
        if not set_file.is_file():
            raise FileNotFoundError(f"split {name} needs the image set file {set_file}, which does not exist")
        ids = _read_set_file(set_file)
        if not ids:
            raise ValueError(f"split {name}: the image set file {set_file} lists no images")
        items.extend((year_dir, image_id) for image_id in ids)
        set_files.append(set_file)
    _check_unique(items, split, set_files)
    return items


def _read_set_file(set_file: Path) -> list[str]:
    """The image ids of an ImageSets/Main file, one per line. A class set file
    (``dog_trainval.txt``) adds a -1/0/1 column, which is dropped; any other second word is an
    id with a space, which would be cut at it: an error naming the line."""
    ids = []
    # utf-8-sig: an editor's byte-order mark must not become part of the first image id.
    for number, line in enumerate(set_file.read_text(encoding="utf-8-sig").splitlines(), 1):
        words = line.split()
        if len(words) > 2 or (len(words) == 2 and words[1] not in ("-1", "0", "1")):
            raise ValueError(f"{set_file}:{number}: {line.strip()!r} is not one image id: ids "
                             f"cannot contain spaces (each names Annotations/<id>.xml and "
                             f"JPEGImages/<id>.jpg); rename those files without spaces")
        if words:
            ids.append(words[0])
    return ids


def _check_unique(items: Sequence[tuple[Path, str]], split: str, set_files: Sequence[Path]) -> None:
    """ValueError naming the image ids that occur more than once in a split."""
    counts = Counter(image_id for _, image_id in items)
    repeated = [f"{image_id} ({n}x)" for image_id, n in counts.items() if n > 1]
    if repeated:
        raise ValueError(
            f"split {split} lists {len(repeated)} image id(s) more than once: "
            f"{', '.join(repeated[:10])}{' ...' if len(repeated) > 10 else ''} (image set "
            f"file(s) {', '.join(str(f) for f in set_files)}); an image must appear once, or "
            f"evaluation would count its objects once per copy: remove the repeated lines")


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


Transform = Callable[..., dict[str, Any]]


class UnknownClassError(ValueError):
    """Objects whose class is not in the dataset's class list (a typo, another capitalisation,
    or a class left out without saying so). ``problem``: what was found, without advice;
    ``counts``: {name: number of objects}."""

    ADVICE = ("correct the names in those Annotations/*.xml files, add the classes to --classes, "
              "or pass --ignore-other-classes to leave such objects out")

    def __init__(self, problem: str, counts: dict[str, int]) -> None:
        super().__init__(f"{problem}; {self.ADVICE}")
        self.problem, self.counts = problem, counts


def describe_other_classes(other: dict[str, list[str]], class_names: Sequence[str]) -> str:
    """'kat' x3 (e.g. 000001.xml; did you mean 'cat'?), ... for objects of unlisted classes."""
    parts = []
    for name, files in sorted(other.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        close = difflib.get_close_matches(name.lower(), [c.lower() for c in class_names], n=1)
        hint = ""
        if close:
            hint = "; did you mean " + repr(next(c for c in class_names if c.lower() == close[0])) + "?"
        parts.append(f"{name!r} x{len(files)} (e.g. {files[0]}{hint})")
    return ", ".join(parts)


class VOCDetection(torch.utils.data.Dataset):
    """PASCAL VOC detection dataset (any VOC-layout folder, e.g. BCCD or the synthetic demo).

    All annotations are parsed, and every image's header read, at construction (so a missing or
    unreadable file fails before any work); pixels are decoded lazily. ``__getitem__(i)``
    returns ``(image, target)``:

    - image: (3, H, W) float32 tensor; with ``transform=None`` the RGB pixels scaled to 0..1 at
      the original size, otherwise whatever the transform's "image" is (normalised 300x300).
    - target: ``boxes`` (N, 4) float32 xyxy in the output image's pixels (0-based),
      ``labels`` (N,) int64 in 1..C, ``image_id`` str, ``orig_size`` (h, w) of the original
      image, ``index`` int. Difficult objects are left out unless ``keep_difficult``.

    ``transform`` is called as ``transform(image=uint8 (H, W, 3), bboxes=float32 (N, 4) xyxy
    pixels, labels=int64 (N,))`` and returns a dict with "image", "bboxes" and "labels", as an
    albumentations Compose with ``BboxParams(format="pascal_voc", label_fields=["labels"])`` does.
    A transform with ``reads_encoded = True`` gets an undecoded ``EncodedImage`` instead and
    decodes it at the scale it needs (``ssd_da.data.augment``; ``max_side`` does not apply).

    Objects of classes not in ``class_names`` raise :class:`UnknownClassError` naming them and
    their files, unless ``ignore_other_classes`` (then they are left out, counted per class in
    one warning and in ``other_class_counts``). ``skip_bad`` skips samples whose XML is
    malformed or whose image is missing or does not decode (every image is decoded once here,
    a JPEG at 1/8 scale), with a warning naming each and the count in ``num_skipped``.
    ``max_side`` shrinks images whose longer side exceeds it at load time, boxes with them
    (training: augmentation memory grows with the image; see ``engine/loaders.py``).
    """

    def __init__(
        self,
        data_root: str | Path,
        split: str,
        class_names: Sequence[str] = VOC_CLASSES,
        transform: Transform | None = None,
        keep_difficult: bool = False,
        skip_bad: bool = False,
        ignore_other_classes: bool = False,
        max_side: int | None = None,
    ) -> None:
        if len(class_names) == 0 or len(set(class_names)) != len(class_names):
            raise ValueError(f"class_names must be non-empty and unique, got {list(class_names)}")
        self.data_root = Path(data_root)
        self.split = split
        self.class_names = tuple(class_names)
        self.transform = transform
        self.keep_difficult = keep_difficult
        self.skip_bad = skip_bad
        self.max_side = max_side
        self.annotations: list[Annotation] = []
        self.image_paths: list[Path] = []
        self.skipped: list[str] = []  # one message per skipped sample, naming its file
        self.audit = ImageAudit()  # sizes that disagree, EXIF orientations: reported once
        other: dict[str, list[str]] = {}
        items = resolve_split(self.data_root, split)
        for year_dir, image_id in items:
            try:
                ann, image_path = self._load_one(year_dir, image_id)
            except (AnnotationError, OSError) as err:  # OSError: missing or unreadable file
                if not skip_bad:
                    raise
                self.skipped.append(str(err))
                logger.warning("skipping bad sample: %s", err)
                continue
            for name in ann.other_names:
                other.setdefault(name, []).append(f"{image_id}.xml")
            self.annotations.append(ann)
            self.image_paths.append(image_path)
        self.other_class_counts = {name: len(files) for name, files in other.items()}
        self._report(len(items), other, ignore_other_classes)

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def _report(self, num_listed: int, other: dict[str, list[str]], ignore_other: bool) -> None:
        """Raise for unlisted classes (unless ignored) and an empty result; log the counts."""
        where = f"{self.split} ({self.data_root})"
        if other and not ignore_other:
            raise UnknownClassError(
                f"{where} has objects of classes not in the class list "
                f"[{', '.join(self.class_names)}]: {describe_other_classes(other, self.class_names)}",
                self.other_class_counts)
        if other:
            logger.warning("%s: left out %s object(s) of classes not in the class list "
                           "(--ignore-other-classes): %s", where, sum(self.other_class_counts.values()),
                           ", ".join(f"{n} {k!r}" for k, n in sorted(self.other_class_counts.items())))
        if self.num_skipped:
            logger.warning("%s: skipped %d bad samples of %d (--skip-bad)", where,
                           self.num_skipped, num_listed)
        if not self.annotations:
            raise ValueError(f"{where}: none of the {num_listed} listed images is usable "
                             f"({self.num_skipped} skipped as bad)")
        self._warn_empty()
        self.audit.report(where, len(self.annotations))
        num_objects = sum(len(a.labels) for a in self.annotations)
        num_difficult = sum(int(a.difficult.sum()) for a in self.annotations)
        logger.info("%s: %d images, %d objects (%d difficult)", where,
                    len(self.annotations), num_objects, num_difficult)

    def _warn_empty(self) -> None:
        """One warning for the images whose XML holds no object at all: legal (negative
        images), but also what a file the parser cannot read looks like."""
        empty = [f"{a.image_id}.xml" for a in self.annotations
                 if len(a.ground_truth()["labels"]) == 0 and not a.other_names]
        if empty:
            logger.warning("%s (%s): %d of %d images have no <object> in their XML (e.g. %s); "
                           "fine for negative images, otherwise check those files", self.split,
                           self.data_root, len(empty), len(self.annotations), ", ".join(empty[:3]))

    def _load_one(self, year_dir: Path, image_id: str) -> tuple[Annotation, Path]:
        """Parse one XML, locate its image and read its header (under ``skip_bad`` decode it);
        raises naming the file that is missing or bad."""
        xml_path = os.path.join(year_dir, "Annotations", image_id + ".xml")
        if not os.path.isfile(xml_path):
            raise FileNotFoundError(f"annotation file {xml_path} not found")
        try:
            ann = parse_annotation(xml_path, self.class_names)
            image_path = find_image(year_dir, image_id, ann.filename)
            size = None
        except MissingSizeError:
            # No usable <size>: read the real size from the image header (no pixel decoding).
            image_path = find_image(year_dir, image_id)
            size = None if image_path is None else self._check(
                image_path, f"needed for the size that {xml_path} lacks")
            if size is not None:
                ann = parse_annotation(xml_path, self.class_names, image_size=size[:2])
        if image_path is None:
            raise FileNotFoundError(f"image for {xml_path} not found: expected "
                                    f"{os.path.join(year_dir, 'JPEGImages', image_id + '.jpg')}")
        if size is None:
            size = self._check(image_path, f"the image of {xml_path}")
        self.audit.note(image_path, size[:2], (ann.height, ann.width), size[2])
        return ann, image_path

    def _check(self, image_path: Path, why: str) -> tuple[int, int, int]:
        """(height, width, EXIF orientation) of the image from its header; OSError naming it
        and ``why`` otherwise."""
        try:
            return inspect_image(image_path, decode=self.skip_bad)
        except OSError as err:
            raise OSError(f"cannot read image {image_path} ({why}): {err.__cause__ or err}") from err

    def __len__(self) -> int:
        return len(self.annotations)

    def get_annotation(self, index: int) -> Annotation:
        """Full parsed annotation of sample ``index`` (difficult objects included), no image read."""
        return self.annotations[index]

    def _read(self, index: int) -> tuple[np.ndarray | EncodedImage, tuple[int, int]]:
        """(image, (H, W) of the file); the image is shrunk to ``max_side`` when set, or left
        encoded for a transform that decodes itself."""
        try:
            if getattr(self.transform, "reads_encoded", False):
                encoded = EncodedImage.from_file(self.image_paths[index])
                return encoded, (encoded.height, encoded.width)
            return read_image(self.image_paths[index], self.max_side)
        except OSError as err:
            raise _unreadable(err) from err

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        ann = self.annotations[index]
        image, (height, width) = self._read(index)
        boxes, labels = ann.boxes, ann.labels
        if not self.keep_difficult:
            boxes, labels = boxes[~ann.difficult], labels[~ann.difficult]
        if (height, width) != (ann.height, ann.width):
            # The annotation's size disagrees with the file (said once, when the dataset was
            # built: ImageAudit); keep the boxes inside the real image.
            boxes, keep = clip_boxes(boxes, width, height)
            boxes, labels = boxes[keep], labels[keep]
        if isinstance(image, np.ndarray) and image.shape[:2] != (height, width):
            # Shrunk to max_side: scale the boxes with it.
            scale = np.array([image.shape[1] / width, image.shape[0] / height] * 2, np.float32)
            boxes = boxes * scale
        if self.transform is None:
            image_t = torch.from_numpy(image).permute(2, 0, 1).float().div_(255.0)
            boxes_t = torch.from_numpy(boxes.copy())
            labels_t = torch.from_numpy(labels.copy())
        else:
            try:  # a transform that reads encoded images decodes them here
                out = self.transform(image=image, bboxes=boxes, labels=labels)
            except OSError as err:
                raise _unreadable(err) from err
            image_t = out["image"]
            boxes_t = torch.as_tensor(np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4))
            labels_t = torch.as_tensor(np.asarray(out["labels"], dtype=np.int64).reshape(-1))
        target = {"boxes": boxes_t, "labels": labels_t, "image_id": ann.image_id,
                  "orig_size": (height, width), "index": index}
        return image_t, target


def _unreadable(err: OSError) -> OSError:
    return OSError(f"{err}; the file changed after the dataset checked it, or it does not "
                   f"decode: pass --skip-bad to leave undecodable images out")


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
