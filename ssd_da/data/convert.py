"""Convert detection datasets between a VOCdevkit folder and the COCO layout
(``DIR/annotations/instances_<split>.json``, images in ``DIR/<split>/``), both ways.

Coordinates: a VOC box (``xmin, ymin, xmax, ymax``, 1-based as written in the XML) becomes the
COCO ``bbox`` ``[xmin - 1, ymin - 1, xmax - xmin, ymax - ymin]`` and back, so a round trip gives
the XML's numbers again, and both formats give ssd_da the same boxes (xyxy ``XML - 1``, see
``ssd_da.data.voc`` and ``ssd_da.data.coco``). VOC's ``difficult`` becomes COCO's ``iscrowd``
(the one ignore flag COCO tools honour: such objects are neither trained on nor counted as
misses) and back. A VOC box with xmax < xmin has no COCO form: it is left out with a warning.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from xml.sax.saxutils import escape
from pathlib import Path
from typing import Any, Sequence

from PIL import Image

from ssd_da.data.coco import coco_paths, load_coco_json
from ssd_da.data.voc import SPLITS, VOC_CLASSES, AnnotationError, find_image, resolve_split
from ssd_da.data.voc_xml import XmlObject, read_voc_xml

logger = logging.getLogger(__name__)

_COORDS = ("xmin", "ymin", "xmax", "ymax")


def _num(value: float) -> int | float:
    """An int when the value is integral (tidy files), else the float itself."""
    return int(value) if float(value).is_integer() else float(value)


def _read_voc_xml(xml_path: Path) -> tuple[dict[str, Any], list[XmlObject]]:
    """``({"filename", "width", "height"}, objects)`` of a VOC XML file (``read_voc_xml``: the
    project's one reader), numbers as written (top-level objects only); width and height 0
    when ``<size>`` is missing or zero."""
    try:
        filename, size, objects = read_voc_xml(xml_path)
    except OSError as err:
        raise AnnotationError(f"{xml_path}: cannot read ({err})") from None
    height, width = size or (0, 0)
    return {"filename": filename, "width": width, "height": height}, objects


def _place(src: Path, dst: Path, link: bool) -> None:
    """Copy ``src`` to ``dst`` (a hard link when ``link`` and the file system allows it)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        dst.unlink()
    if link:
        try:
            os.link(src, dst)
            return
        except OSError:
            pass
    shutil.copy2(src, dst)


def voc_split_to_coco(voc_root: str | Path, split: str, class_names: Sequence[str],
                      coco_root: str | Path, link: bool = False) -> dict[str, int]:
    """Write ``coco_root/annotations/instances_<split>.json`` and ``coco_root/<split>/`` from
    a VOC split (e.g. ``voc07_trainval``); category k + 1 is ``class_names[k]``. Objects of other
    classes are left out with a warning. Returns counts of images and objects."""
    coco_root = Path(coco_root)
    cat_of = {name: k + 1 for k, name in enumerate(class_names)}
    images, anns, placed = [], [], {}
    other = 0
    samples = []  # every file read and checked before the first one is written
    for year_dir, image_id in resolve_split(voc_root, split):
        xml_path = Path(year_dir) / "Annotations" / f"{image_id}.xml"
        meta, objects = _read_voc_xml(xml_path)
        image_path = find_image(year_dir, image_id, meta["filename"])
        if image_path is None:
            raise FileNotFoundError(f"image for {xml_path} not found in "
                                    f"{Path(year_dir) / 'JPEGImages'}")
        if image_path.name in placed:
            raise ValueError(f"{image_path} and {placed[image_path.name]} would share the file "
                             f"name {image_path.name} in {coco_root / split}; nothing was written")
        placed[image_path.name] = image_path
        samples.append((xml_path, meta, objects, image_path))
    for xml_path, meta, objects, image_path in samples:
        if meta["width"] <= 0 or meta["height"] <= 0:
            with Image.open(image_path) as img:
                meta["width"], meta["height"] = img.size
        images.append({"id": len(images) + 1, "file_name": image_path.name,
                       "width": meta["width"], "height": meta["height"]})
        _place(image_path, coco_root / split / image_path.name, link)
        for obj in objects:
            if obj.name not in cat_of:
                other += 1
                continue
            x1, y1, x2, y2 = obj.box
            if x2 < x1 or y2 < y1:
                logger.warning("%s: object #%d (%s) has an inverted box %s, which has no COCO "
                               "form; left out", xml_path, obj.index, obj.name, tuple(obj.box))
                continue
            bbox = [_num(x1 - 1), _num(y1 - 1), _num(x2 - x1), _num(y2 - y1)]
            anns.append({"id": len(anns) + 1, "image_id": images[-1]["id"],
                         "category_id": cat_of[obj.name], "bbox": bbox,
                         "area": _num(bbox[2] * bbox[3]), "iscrowd": int(obj.difficult)})
    if other:
        logger.warning("%s: %d objects of classes not in %s left out", split, other,
                       list(class_names))
    data = {"info": {"description": f"{split} of {voc_root}, converted by ssd_da"},
            "images": images, "annotations": anns,
            "categories": [{"id": k, "name": n, "supercategory": "none"}
                           for n, k in cat_of.items()]}
    out = coco_root / "annotations" / f"instances_{split}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data))
    return {"images": len(images), "objects": len(anns)}


def voc_class_names(voc_root: str | Path, splits: Sequence[str]) -> list[str]:
    """The object names in the splits' XML files: VOC's 20 in their usual order when all names
    are VOC classes, else the names found, sorted."""
    names: set[str] = set()
    for split in splits:
        for year_dir, image_id in resolve_split(voc_root, split):
            _, objects = _read_voc_xml(Path(year_dir) / "Annotations" / f"{image_id}.xml")
            names.update(o.name for o in objects)
    return list(VOC_CLASSES) if names <= set(VOC_CLASSES) else sorted(names)


def _voc_xml(filename: str, width: int, height: int, objects: list[tuple[str, list, bool]]) -> str:
    parts = [f"<annotation><folder>JPEGImages</folder><filename>{escape(filename)}</filename>",
             f"<size><width>{width}</width><height>{height}</height><depth>3</depth></size>"]
    for name, box, difficult in objects:
        coords = "".join(f"<{t}>{_num(v)}</{t}>" for t, v in zip(_COORDS, box))
        parts.append(f"<object><name>{escape(name)}</name><difficult>{int(difficult)}</difficult>"
                     f"<bndbox>{coords}</bndbox></object>")
    parts.append("</annotation>\n")
    return "\n".join(parts)


def _check_coco_images(records: Sequence[dict], image_dir: Path, json_path: Path) -> None:
    """Every image of a COCO split exists and has its own VOC image id (its file name without
    extension: a.jpg and a.png would both be a); raised before anything is written."""
    seen: dict[str, str] = {}
    for record in records:
        src = image_dir / record["file_name"]
        if not src.is_file():
            raise FileNotFoundError(f"image {src} (id {record['id']}, listed in {json_path}) "
                                    f"not found; nothing was written")
        stem = Path(record["file_name"]).stem
        if stem in seen:
            raise ValueError(f"{json_path}: images {seen[stem]} and {record['file_name']} would "
                             f"share the VOC image id {stem}; rename one (nothing was written)")
        seen[stem] = record["file_name"]


def coco_split_to_voc(coco_root: str | Path, split: str, voc_root: str | Path,
                      year: str = "2007", link: bool = False) -> dict[str, int]:
    """Write a COCO split into ``voc_root``: ``VOC<year>/{Annotations,JPEGImages}`` and
    ``ImageSets/Main/<split>.txt``; a split named like a VOC split (``voc07_test``) goes to
    that split's folder and set file instead. Image ids are the file names without extension;
    ``iscrowd`` becomes ``difficult``. Returns counts of images and objects."""
    json_path, image_dir = coco_paths(coco_root, split)
    coco = load_coco_json(json_path)
    year_name, set_name = SPLITS.get(split, (f"VOC{year}", split))
    year_dir = Path(voc_root) / year_name
    _check_coco_images(coco.dataset["images"], image_dir, json_path)  # before any write
    (year_dir / "Annotations").mkdir(parents=True, exist_ok=True)
    ids = []
    count = 0
    for record in coco.dataset["images"]:
        src = image_dir / record["file_name"]
        stem = Path(record["file_name"]).stem
        objects = []
        for ann in coco.imgToAnns.get(record["id"], []):
            x, y, w, h = ann["bbox"]
            box = [x + 1, y + 1, x + w + 1, y + h + 1]
            name = coco.cats[ann["category_id"]]["name"]
            objects.append((name, box, bool(ann.get("iscrowd", 0))))
        name = stem + Path(record["file_name"]).suffix
        (year_dir / "Annotations" / f"{stem}.xml").write_text(
            _voc_xml(name, record.get("width", 0), record.get("height", 0), objects))
        _place(src, year_dir / "JPEGImages" / name, link)
        ids.append(stem)
        count += len(objects)
    set_file = year_dir / "ImageSets" / "Main" / f"{set_name}.txt"
    set_file.parent.mkdir(parents=True, exist_ok=True)
    set_file.write_text("".join(i + "\n" for i in ids))
    return {"images": len(ids), "objects": count}
