"""A small synthetic VOC-layout dataset, so the whole pipeline runs without downloading VOC.

Each image has a cluttered background (colour gradient, pixel noise, distractor lines and soft
blobs that are not objects) and 1-4 objects of five shape classes, each with a preferred hue (a
colour cue that holds 75% of the time), a random texture (solid / stripes / noise), scale,
aspect and rotation. Objects occlude each other a little and may be cut by the image border.
Objects less than half visible, and a few tiny ones, are marked difficult (~5%), so the
evaluation's difficult handling is exercised. Boxes are the tight boxes of the visible pixels,
written as 1-based inclusive VOC coordinates.
"""

from __future__ import annotations

import colorsys
import json
import logging
import shutil
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

logger = logging.getLogger(__name__)

DEMO_CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "star", "ring")
# Preferred hue per class (degrees): a learnable but not decisive colour cue.
_CLASS_HUES = {"circle": 0.0, "square": 120.0, "triangle": 220.0, "star": 50.0, "ring": 290.0}
_GENERATOR_VERSION = 1
_MARKER = ".demo_complete"  # written last: its presence (with matching params) means "complete"
_SENTINEL = ".demo_incomplete"  # written first: marks a tree this module may delete and redo


@dataclass
class _Object:
    name: str
    box: tuple[int, int, int, int]  # 0-based inclusive pixel xyxy of the visible pixels
    truncated: bool
    difficult: bool


def _unit_outline(name: str, rng: np.random.Generator) -> list[np.ndarray]:
    """Outline polygons in [-1, 1]^2 (the second one, for the ring, is the hole)."""
    t = np.linspace(0.0, 2 * np.pi, 48, endpoint=False)
    circle = np.stack([np.cos(t), np.sin(t)], axis=1)
    if name == "circle":
        return [circle]
    if name == "ring":
        return [circle, circle * rng.uniform(0.45, 0.62)]
    if name == "square":
        return [np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=np.float64)]
    if name == "triangle":
        a = np.deg2rad([-90.0, 30.0, 150.0])
        return [np.stack([np.cos(a), np.sin(a)], axis=1)]
    a = np.deg2rad(-90.0 + 36.0 * np.arange(10))  # star: five points, inner radius 0.45
    r = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
    return [np.stack([r * np.cos(a), r * np.sin(a)], axis=1)]


def _shape_mask(name: str, centre: np.ndarray, half: np.ndarray, angle: float,
                rng: np.random.Generator) -> tuple[np.ndarray, int, int]:
    """Boolean mask of a scaled, rotated shape on its own canvas, and the canvas's top-left (x0, y0)."""
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    polys = [(p * half) @ rot.T + centre for p in _unit_outline(name, rng)]
    x0, y0 = np.floor(polys[0].min(axis=0)).astype(int) - 1
    x1, y1 = np.ceil(polys[0].max(axis=0)).astype(int) + 2
    canvas = Image.new("L", (int(x1 - x0), int(y1 - y0)), 0)
    draw = ImageDraw.Draw(canvas)
    for k, poly in enumerate(polys):
        draw.polygon([(float(x - x0), float(y - y0)) for x, y in poly], fill=0 if k else 255)
    return np.asarray(canvas) > 0, int(x0), int(y0)


def _random_colour(rng: np.random.Generator, hue: float | None, sat: tuple[float, float],
                   val: tuple[float, float]) -> np.ndarray:
    h = rng.uniform(0, 360) if hue is None else (hue + rng.uniform(-15, 15)) % 360
    rgb = colorsys.hsv_to_rgb(h / 360.0, rng.uniform(*sat), rng.uniform(*val))
    return np.array(rgb) * 255.0


def _texture(rng: np.random.Generator, shape: tuple[int, int], colour: np.ndarray) -> np.ndarray:
    """(h, w, 3) float fill: solid, stripes of two shades, or per-pixel noise around ``colour``."""
    h, w = shape
    kind = rng.integers(3)
    if kind == 0:
        return np.broadcast_to(colour, (h, w, 3))
    if kind == 1:
        yy, xx = np.mgrid[0:h, 0:w]
        phi = rng.uniform(0, np.pi)
        period = rng.uniform(5, 12)
        on = ((xx * np.cos(phi) + yy * np.sin(phi)) // (period / 2)) % 2 == 0
        return np.where(on[..., None], colour, colour * rng.uniform(0.35, 0.6))
    return colour + np.float32(96.0) * (rng.random((h, w, 3), dtype=np.float32) - np.float32(0.5))


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Low-saturation colour gradient plus noise, (H, W, 3) float32."""
    c0 = _random_colour(rng, None, (0.0, 0.35), (0.2, 0.95)).astype(np.float32)
    c1 = _random_colour(rng, None, (0.0, 0.35), (0.2, 0.95)).astype(np.float32)
    phi = rng.uniform(0, 2 * np.pi)
    t = (np.arange(width, dtype=np.float32)[None, :] * np.cos(phi)
         + np.arange(height, dtype=np.float32)[:, None] * np.sin(phi))
    t = ((t - t.min()) / max(float(np.ptp(t)), 1.0))[..., None]
    # Uniform noise (std = amplitude / sqrt(12)): several times cheaper to draw than Gaussian.
    noise = rng.random((height, width, 3), dtype=np.float32) - np.float32(0.5)
    return c0 + (c1 - c0) * t + noise * np.float32(rng.uniform(10, 48))


def _add_distractors(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """Lines and soft, semi-transparent blobs: clutter that is not an object. (H, W, 3) float32."""
    height, width = img.shape[:2]
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    for _ in range(rng.integers(2, 7)):
        pts = rng.uniform([0, 0], [width, height], size=(2, 2))
        colour = tuple(int(c) for c in _random_colour(rng, None, (0.0, 0.8), (0.1, 1.0)))
        draw.line([tuple(p) for p in pts], fill=colour, width=int(rng.integers(1, 4)))
    out = np.asarray(pil, dtype=np.float32).copy()
    for _ in range(rng.integers(1, 4)):
        # Drawn on a local canvas around the blob (radius <= 12% of the side, blur 5 px).
        radii = rng.uniform(0.04, 0.12, 7) * min(width, height)
        pad = int(radii.max()) + 12
        cx, cy = (int(v) for v in rng.uniform([0, 0], [width, height]))
        angles = np.sort(rng.uniform(0, 2 * np.pi, 7))
        blob = Image.new("L", (2 * pad, 2 * pad), 0)
        pts = [(float(pad + r * np.cos(a)), float(pad + r * np.sin(a))) for a, r in zip(angles, radii)]
        ImageDraw.Draw(blob).polygon(pts, fill=255)
        alpha = np.asarray(blob.filter(ImageFilter.GaussianBlur(5)), dtype=np.float32)[..., None]
        alpha *= np.float32(rng.uniform(0.25, 0.5) / 255.0)
        x0, y0 = max(cx - pad, 0), max(cy - pad, 0)
        x1, y1 = min(cx + pad, width), min(cy + pad, height)
        alpha = alpha[y0 - (cy - pad):y1 - (cy - pad), x0 - (cx - pad):x1 - (cx - pad)]
        colour = _random_colour(rng, None, (0.0, 0.6), (0.2, 1.0)).astype(np.float32)
        region = out[y0:y1, x0:x1]
        region += (colour - region) * alpha
    return out


def _too_close(box: np.ndarray, placed: list[np.ndarray]) -> bool:
    """Intersection over the smaller box > 0.5 with a placed object: would hide too much."""
    for other in placed:
        iw = min(box[2], other[2]) - max(box[0], other[0])
        ih = min(box[3], other[3]) - max(box[1], other[1])
        smaller = min((box[2] - box[0]) * (box[3] - box[1]), (other[2] - other[0]) * (other[3] - other[1]))
        if iw > 0 and ih > 0 and iw * ih > 0.5 * smaller:
            return True
    return False


def _sample_layout(rng: np.random.Generator, height: int, width: int) -> list[tuple[str, np.ndarray, np.ndarray, bool]]:
    """(class, centre, half-extent, tiny) per object: 1-4 regular objects plus, sometimes, a tiny one."""
    side = min(height, width)
    layout: list[tuple[str, np.ndarray, np.ndarray, bool]] = []
    placed: list[np.ndarray] = []
    sizes = [(0.10, 0.45, False)] * int(rng.integers(1, 5))
    if rng.random() < 0.12:
        sizes.append((0.05, 0.08, True))
    for low, high, tiny in sizes:
        name = DEMO_CLASSES[int(rng.integers(len(DEMO_CLASSES)))]
        size = side * np.exp(rng.uniform(np.log(low), np.log(high)))
        aspect = np.exp(rng.uniform(np.log(0.7), np.log(1.4)))
        half = np.array([size * np.sqrt(aspect), size / np.sqrt(aspect)]) / 2
        for _ in range(20):
            # Up to 20% of the object may fall outside the image (VOC "truncated").
            centre = rng.uniform(0.6 * half, np.array([width, height]) - 0.6 * half)
            box = np.concatenate([centre - half, centre + half])
            if not _too_close(box, placed):
                placed.append(box)
                layout.append((name, centre, half, tiny))
                break
    return layout


def _make_image(rng: np.random.Generator) -> tuple[np.ndarray, list[_Object]]:
    """One (H, W, 3) uint8 image and its objects, in drawing order."""
    width, height = (int(v) for v in rng.integers(200, 321, size=2))
    img = _add_distractors(rng, _background(rng, height, width))
    owner = np.full((height, width), -1, dtype=np.int64)  # index of the object seen at each pixel
    stats = []
    for k, (name, centre, half, tiny) in enumerate(_sample_layout(rng, height, width)):
        mask, x0, y0 = _shape_mask(name, centre, half, rng.uniform(0, 2 * np.pi), rng)
        ix0, iy0 = max(x0, 0), max(y0, 0)
        ix1, iy1 = min(x0 + mask.shape[1], width), min(y0 + mask.shape[0], height)
        sub = mask[iy0 - y0:iy1 - y0, ix0 - x0:ix1 - x0]
        hue = _CLASS_HUES[name] if rng.random() < 0.75 else None
        fill = _texture(rng, sub.shape, _random_colour(rng, hue, (0.55, 1.0), (0.5, 1.0)))
        img[iy0:iy1, ix0:ix1][sub] = fill[sub]
        owner[iy0:iy1, ix0:ix1][sub] = k
        stats.append((name, int(mask.sum()), int(sub.sum()), tiny))
    objects = []
    for k, (name, total, inside, tiny) in enumerate(stats):
        ys, xs = np.nonzero(owner == k)
        if len(xs) == 0:
            continue
        box = (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))
        # VOC marks hard-to-recognise objects difficult: here the tiny ones, those less than half
        # visible after occlusion, and slivers under 6 px.
        difficult = tiny or len(xs) < 0.5 * inside or min(box[2] - box[0], box[3] - box[1]) < 6
        objects.append(_Object(name, box, truncated=inside < 0.85 * total, difficult=difficult))
    return np.clip(img, 0, 255).astype(np.uint8), objects


def _annotation_xml(image_id: str, width: int, height: int, objects: list[_Object]) -> ET.ElementTree:
    """VOC XML in the standard layout, with 1-based inclusive integer coordinates."""
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = "VOC2007"
    ET.SubElement(root, "filename").text = f"{image_id}.jpg"
    ET.SubElement(ET.SubElement(root, "source"), "database").text = "ssd_da synthetic demo"
    size = ET.SubElement(root, "size")
    for tag, value in (("width", width), ("height", height), ("depth", 3)):
        ET.SubElement(size, tag).text = str(value)
    ET.SubElement(root, "segmented").text = "0"
    for obj in objects:
        node = ET.SubElement(root, "object")
        ET.SubElement(node, "name").text = obj.name
        ET.SubElement(node, "pose").text = "Unspecified"
        ET.SubElement(node, "truncated").text = str(int(obj.truncated))
        ET.SubElement(node, "difficult").text = str(int(obj.difficult))
        bndbox = ET.SubElement(node, "bndbox")
        for tag, value in zip(("xmin", "ymin", "xmax", "ymax"), obj.box):
            ET.SubElement(bndbox, tag).text = str(value + 1)
    tree = ET.ElementTree(root)
    ET.indent(tree, space="\t")
    return tree


def _generate(voc_dir: Path, num_train: int, num_test: int, seed: int) -> None:
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (voc_dir / sub).mkdir(parents=True, exist_ok=True)
    ids = [f"{i + 1:06d}" for i in range(num_train + num_test)]
    for i, image_id in enumerate(ids):
        # One generator per image, so image i does not depend on how many images come before it.
        image, objects = _make_image(np.random.default_rng([seed, i]))
        Image.fromarray(image).save(voc_dir / "JPEGImages" / f"{image_id}.jpg", quality=92)
        tree = _annotation_xml(image_id, image.shape[1], image.shape[0], objects)
        tree.write(voc_dir / "Annotations" / f"{image_id}.xml", encoding="utf-8")
    (voc_dir / "ImageSets/Main/trainval.txt").write_text("".join(f"{i}\n" for i in ids[:num_train]))
    (voc_dir / "ImageSets/Main/test.txt").write_text("".join(f"{i}\n" for i in ids[num_train:]))


def ensure_demo_dataset(root: str | Path = "data/demo", num_train: int = 240, num_test: int = 80,
                        seed: int = 0) -> Path:
    """Generate the demo dataset under ``root`` unless a complete copy with these settings exists.

    Writes ``root/VOCdevkit/VOC2007/{JPEGImages,Annotations,ImageSets/Main/{trainval,test}.txt}``
    (image ids 000001.. : the first ``num_train`` are trainval, the rest test). Deterministic
    given the arguments. Returns ``root/VOCdevkit``, to be used as ``--data-root`` with splits
    voc07_trainval / voc07_test and ``class_names=DEMO_CLASSES``. Not safe to call from several
    processes at once: let one process (rank 0) call it first.
    """
    if num_train < 1 or num_test < 1:
        raise ValueError(f"num_train and num_test must be >= 1, got {num_train} and {num_test}")
    devkit = Path(root) / "VOCdevkit"
    voc_dir = devkit / "VOC2007"
    params = {"version": _GENERATOR_VERSION, "num_train": num_train, "num_test": num_test, "seed": seed}
    marker = voc_dir / _MARKER
    if marker.is_file():
        try:
            if json.loads(marker.read_text()) == params:
                return devkit
        except json.JSONDecodeError:
            pass
    if voc_dir.exists():
        if not (marker.exists() or (voc_dir / _SENTINEL).exists()):
            raise FileExistsError(f"{voc_dir} exists but was not written by ensure_demo_dataset; "
                                  f"refusing to overwrite it (choose another root)")
        logger.info("demo dataset at %s is incomplete or has other settings; regenerating", voc_dir)
        shutil.rmtree(voc_dir)
    voc_dir.mkdir(parents=True)
    (voc_dir / _SENTINEL).write_text("generation in progress\n")
    logger.info("generating the demo dataset (%d trainval + %d test images) in %s", num_train, num_test, voc_dir)
    _generate(voc_dir, num_train, num_test, seed)
    tmp = voc_dir / (_MARKER + ".tmp")
    tmp.write_text(json.dumps(params))
    tmp.replace(marker)  # the marker appears atomically, and only after every other file
    (voc_dir / _SENTINEL).unlink()
    return devkit
