"""PASCAL VOC annotation XML: one file parsed into boxes, labels and difficult flags.

Box convention (docs/design.md): ``(N, 4)`` float32 xyxy in absolute pixels, 0-based, i.e. the
XML's 1-based inclusive coordinates minus 1 for all four values (as amdegroot/ssd.pytorch and
lufficc/SSD do). Labels are 1..C in the order of ``class_names``; 0 is background.
"""
from __future__ import annotations

import logging
import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

logger = logging.getLogger(__name__)

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
    other_names: class names of the top-level objects left out because they are not in
    ``class_names``, one entry per object.
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
    other_names: tuple[str, ...] = ()

    def ground_truth(self) -> dict[str, np.ndarray]:
        """Evaluation ground truth, as the VOC devkit counts it: every top-level object of a
        known class with its box as written (minus 1), neither clipped nor dropped. A box with
        xmin == xmax is one pixel wide in the devkit's inclusive convention and counts as an
        object there, so dropping it (as training must) would change AP. Returns ``{"boxes":
        (M, 4) float32 xyxy 0-based, "labels": (M,) int64, "difficult": (M,) bool}``."""
        boxes, labels, difficult = self.devkit if self.devkit is not None else (
            self.boxes, self.labels, self.difficult)
        return {"boxes": boxes, "labels": labels, "difficult": difficult}


def drop_namespaces(root: ET.Element) -> None:
    """``<annotation xmlns="...">`` (some labelling tools and converters write one) puts every
    tag in that namespace ("{uri}object"), and ``find("object")`` would then find nothing: read
    the tags without it. Plain VOC files skip the walk."""
    if not root.tag.startswith("{") and not any(c.tag.startswith("{") for c in root):
        return
    for elem in root.iter():
        if isinstance(elem.tag, str) and elem.tag.startswith("{"):
            elem.tag = elem.tag.split("}", 1)[1]


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


def read_size(root: ET.Element, xml_path: Path) -> tuple[int, int] | None:
    """(height, width) from ``<size>``; None when it is missing or zero."""
    size = root.find("size")
    if size is not None and size.find("width") is not None and size.find("height") is not None:
        width = int(_number(size.find("width"), "<size><width>", xml_path))
        height = int(_number(size.find("height"), "<size><height>", xml_path))
        if width > 0 and height > 0:
            return height, width
    return None


def _image_size(root: ET.Element, xml_path: Path, image_size: tuple[int, int] | None) -> tuple[int, int]:
    """(height, width) from ``<size>``; falls back to ``image_size`` when it is missing or zero."""
    size = read_size(root, xml_path)
    if size is not None:
        return size
    if image_size is None:
        raise MissingSizeError(f"{xml_path}: <size> is missing or zero and no image_size was given")
    return int(image_size[0]), int(image_size[1])


@dataclass
class XmlObject:
    """One top-level ``<object>`` as written: ``box`` [xmin, ymin, xmax, ymax] in the XML's
    1-based coordinates, ``index`` its 1-based position among the file's objects."""
    name: str
    box: list[float]
    difficult: bool
    index: int


def read_root(xml_path: Path) -> ET.Element:
    """The parsed XML without namespaces; AnnotationError when it does not parse."""
    try:
        root = ET.parse(xml_path).getroot()
    except ET.ParseError as err:
        raise AnnotationError(f"{xml_path}: malformed XML ({err})") from None
    drop_namespaces(root)
    return root


def read_objects(root: ET.Element, xml_path: Path) -> list[XmlObject]:
    """Every top-level object, whatever its class, checked (a name, a bndbox of four finite
    numbers, a numeric difficult flag); AnnotationError naming the object otherwise."""
    objects = []
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
        objects.append(XmlObject(name, box, is_difficult, k))
    return objects


def read_voc_xml(xml_path: str | Path) -> tuple[str, tuple[int, int] | None, list[XmlObject]]:
    """A VOC XML file as written: (``<filename>``, (height, width) of ``<size>`` or None when
    missing or zero, every top-level object). The one reader of VOC XML (``parse_annotation``
    and ``ssd_da.data.convert`` use it)."""
    xml_path = Path(xml_path)
    root = read_root(xml_path)
    filename_elem = root.find("filename")
    filename = filename_elem.text.strip() if filename_elem is not None and filename_elem.text else ""
    return filename, read_size(root, xml_path), read_objects(root, xml_path)


def _parse_objects(
    root: ET.Element, xml_path: Path, class_to_label: dict[str, int]
) -> tuple[list[list[float]], list[int], list[bool], list[bool], list[str], list[str]]:
    """Top-level objects of a known class in XML (1-based) coordinates: (boxes, labels,
    difficult, proper, other, where), proper False for a zero-area or inverted box (left out of
    training), other the names of the objects whose class is not in ``class_to_label``, where
    "object #k (name)" for messages (k 1-based among all the file's objects)."""
    boxes: list[list[float]] = []
    labels: list[int] = []
    difficult: list[bool] = []
    proper: list[bool] = []
    other: list[str] = []
    where: list[str] = []
    for obj in read_objects(root, xml_path):
        k, name, box = obj.index, obj.name, obj.box
        if name not in class_to_label:
            other.append(name)  # VOCDetection decides: an error, or left out and counted
            continue
        proper.append(box[2] > box[0] and box[3] > box[1])
        if not proper[-1]:
            logger.warning("%s: object #%d (%s) has a zero-area or inverted box %s; left out of "
                           "training (evaluation keeps it, as the VOC devkit does)",
                           xml_path, k, name, tuple(box))
        boxes.append(box)
        labels.append(class_to_label[name])
        difficult.append(obj.difficult)
        where.append(f"object #{k} ({name})")
    return boxes, labels, difficult, proper, other, where


def clip_boxes(boxes: np.ndarray, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, 4) xyxy 0-based pixels -> (a clipped copy inside (0..width-1, 0..height-1), (N,) bool
    keep mask of the boxes with positive area after clipping). A box lying entirely outside the
    image collapses to zero area and is not kept; inverted and zero-area boxes neither."""
    boxes = boxes.copy()
    np.clip(boxes[:, 0::2], 0, width - 1, out=boxes[:, 0::2])
    np.clip(boxes[:, 1::2], 0, height - 1, out=boxes[:, 1::2])
    return boxes, (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])


def parse_annotation(
    xml_path: str | Path,
    class_names: Sequence[str],
    image_size: tuple[int, int] | None = None,
) -> Annotation:
    """Parse one VOC XML file.

    Args:
        xml_path: the Annotations/<id>.xml file.
        class_names: object classes; label k+1 is class_names[k]. Objects of other classes are
            left out and their names listed in ``Annotation.other_names``.
        image_size: (height, width) of the real image, used only when ``<size>`` is missing or zero.

    Returns:
        Annotation with boxes (N, 4) float32 xyxy 0-based pixels clipped to (0..w-1, 0..h-1),
        and the unclipped, undropped devkit ground truth (``Annotation.ground_truth()``).

    Raises:
        AnnotationError: unparsable XML, missing/non-numeric bndbox coordinate, missing name.
    """
    xml_path = Path(xml_path)
    root = read_root(xml_path)
    height, width = _image_size(root, xml_path, image_size)
    class_to_label = {name: i + 1 for i, name in enumerate(class_names)}
    boxes_l, labels_l, difficult_l, proper_l, other, where = _parse_objects(root, xml_path,
                                                                           class_to_label)
    raw = np.asarray(boxes_l, dtype=np.float32).reshape(-1, 4) - 1.0
    labels = np.asarray(labels_l, dtype=np.int64)
    difficult = np.asarray(difficult_l, dtype=np.bool_)
    boxes, keep = clip_boxes(raw, width, height)
    for k in np.flatnonzero(~keep & np.asarray(proper_l, dtype=np.bool_)):
        logger.warning("%s: %s lies outside the %dx%d image; left out of training",
                       xml_path, where[k], width, height)
    devkit = None if keep.all() and np.array_equal(raw, boxes) else (raw, labels, difficult)
    filename_elem = root.find("filename")
    filename = filename_elem.text.strip() if filename_elem is not None and filename_elem.text else ""
    return Annotation(boxes=boxes[keep], labels=labels[keep], difficult=difficult[keep],
                      width=width, height=height, filename=filename, image_id=xml_path.stem,
                      devkit=devkit, other_names=tuple(other))
