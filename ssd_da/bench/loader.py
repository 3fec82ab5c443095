"""CPU data-pipeline throughput, one core: ssd_da's augmentation before (albumentations) and now,
torchvision's transforms.v2 version of the same SSD recipe, and the decode + resize floor.

``tools/benchmark.py loader``; every pipeline reads the same JPEG files, one image at a
time, as one DataLoader worker does.
"""
from __future__ import annotations

import random
import shutil
import statistics
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np
import torch

from ssd_da.bench.core import add_data_root, environment_lines, load_average, one_core, shown_path
from ssd_da.data.transforms import IMAGENET_MEAN, IMAGENET_STD, MEAN_PIXEL, build_train_transform
from ssd_da.data.voc import VOCDetection, resolve_split
from ssd_da.data.voc_xml import parse_annotation


@dataclass
class LoaderRow:
    name: str
    what: str
    cpu_rate: float  # images per second of process CPU time (median of repeats)
    wall_rate: float  # images per second of wall-clock time (median of repeats)


def split_classes(data_root: Path, split: str) -> list[str]:
    """The object class names that the split's annotations use, sorted."""
    names: set[str] = set()
    for year_dir, image_id in resolve_split(data_root, split):  # no known classes: all "other"
        names.update(parse_annotation(year_dir / "Annotations" / f"{image_id}.xml", ()).other_names)
    return sorted(names)


def resized_copy(data_root: Path, split: str, size: tuple[int, int], limit: int, quality: int = 90,
                 noise: float = 12.0) -> Path:
    """A temporary VOC tree (VOC2007, split 'trainval') with the first ``limit`` images of
    ``split`` resized to ``size`` (width, height) and boxes scaled; the caller removes it.

    Gaussian pixel noise (sigma ``noise`` grey levels) gives smooth images the entropy of
    photographs: BCCD's 500x375 JPEGs grow from ~27 KB to ~70 KB, near VOC2007's ~85 KB, and
    decode as slowly (decoding time grows with the compressed size)."""
    rng = np.random.default_rng(0)
    out = Path(tempfile.mkdtemp(prefix="ssd_da_loader_")) / "VOC2007"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (out / sub).mkdir(parents=True)
    ids = []
    for year_dir, image_id in resolve_split(data_root, split)[:limit]:
        image = cv2.imread(str(year_dir / "JPEGImages" / f"{image_id}.jpg"), cv2.IMREAD_COLOR)
        sx, sy = size[0] / image.shape[1], size[1] / image.shape[0]
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        image = np.clip(image + rng.normal(0.0, noise, image.shape), 0, 255).astype(np.uint8)
        cv2.imwrite(str(out / "JPEGImages" / f"{image_id}.jpg"), image, [cv2.IMWRITE_JPEG_QUALITY, quality])
        tree = ET.parse(year_dir / "Annotations" / f"{image_id}.xml")
        tree.getroot().find("size/width").text, tree.getroot().find("size/height").text = map(str, size)
        for box in tree.getroot().iter("bndbox"):
            for tag, scale in (("xmin", sx), ("xmax", sx), ("ymin", sy), ("ymax", sy)):
                box.find(tag).text = str(max(1, round(float(box.find(tag).text) * scale)))
        tree.write(out / "Annotations" / f"{image_id}.xml")
        ids.append(image_id)
    (out / "ImageSets" / "Main" / "trainval.txt").write_text("\n".join(ids) + "\n")
    return out.parent


def _time(fn: Callable[[int], Any], count: int, repeats: int) -> tuple[float, float]:
    """Median (CPU, wall) images/s of ``fn(i)`` for i < count, after one warm-up item."""
    fn(0)
    cpu, wall = [], []
    for _ in range(repeats):
        c0, w0 = time.process_time(), time.perf_counter()
        for i in range(count):
            fn(i)
        cpu.append(count / max(time.process_time() - c0, 1e-9))
        wall.append(count / max(time.perf_counter() - w0, 1e-9))
    return statistics.median(cpu), statistics.median(wall)


def _torchvision_v2(dataset: VOCDetection) -> Callable[[int], Any]:
    """torchvision's references/detection "ssd" training recipe on transforms.v2 (photometric
    distortion, zoom-out, IoU crop, flip), plus the resize to 300x300 and normalisation that
    our pipeline includes, on images decoded by PIL (as torchvision's references load them)."""
    from PIL import Image
    from torchvision import tv_tensors
    from torchvision.transforms import v2

    transform = v2.Compose([
        v2.RandomPhotometricDistort(), v2.RandomZoomOut(fill={tv_tensors.Image: list(MEAN_PIXEL), "others": 0}),
        v2.RandomIoUCrop(), v2.RandomHorizontalFlip(p=0.5), v2.Resize((300, 300), antialias=True),
        v2.SanitizeBoundingBoxes(), v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD))])

    def item(i: int) -> Any:
        ann = dataset.get_annotation(i)
        with Image.open(dataset.image_paths[i]) as pil:
            image = v2.functional.pil_to_tensor(pil.convert("RGB"))
        target = {"boxes": tv_tensors.BoundingBoxes(torch.from_numpy(ann.boxes), format="XYXY",
                                                    canvas_size=tuple(image.shape[-2:])),
                  "labels": torch.from_numpy(ann.labels)}
        return transform(tv_tensors.Image(image), target)
    return item


def _decode_floor(dataset: VOCDetection) -> Callable[[int], Any]:
    def item(i: int) -> np.ndarray:
        data = np.fromfile(dataset.image_paths[i], dtype=np.uint8)
        return cv2.resize(cv2.imdecode(data, cv2.IMREAD_COLOR), (300, 300), interpolation=cv2.INTER_LINEAR)
    return item


def measure_loaders(data_root: Path, split: str, repeats: int, pipelines: list[str]) -> list[LoaderRow]:
    """One row per pipeline name (``PIPELINES``), each over every image of the split."""
    classes = split_classes(data_root, split)
    rows = []
    for name in pipelines:
        what, make = PIPELINES[name]
        dataset = VOCDetection(data_root, split, classes)
        if make is None:  # an ssd_da pipeline: the real dataset path, seeded per item
            dataset = VOCDetection(data_root, split, classes, transform=_ssd_da_transform(name))
            dataset.transform.set_random_state(np.random.default_rng(0), random.Random(0))
            fn = dataset.__getitem__
        else:
            torch.manual_seed(0)
            fn = make(dataset)
        cpu, wall = _time(fn, len(dataset), repeats)
        rows.append(LoaderRow(name, what, cpu, wall))
    return rows


def _ssd_da_transform(name: str) -> Any:
    backend = "albumentations" if name == "albumentations" else "fast"
    return build_train_transform(300, backend=backend, output="uint8" if name == "fast-uint8" else "float")


PIPELINES: dict[str, tuple[str, Any]] = {
    "albumentations": ("ssd_da before: PIL decode, albumentations pipeline (4x canvas), normalised float", None),
    "fast": ("ssd_da now: OpenCV (DCT-scaled) decode, virtual canvas, one warp, normalised float", None),
    "fast-uint8": ("ssd_da now, uint8 output (normalised on the device)", None),
    "torchvision-v2": ("torchvision transforms.v2 SSD recipe + resize 300 + normalise, PIL decode",
                       _torchvision_v2),
    "decode-floor": ("JPEG decode (OpenCV) + resize to 300x300 only", _decode_floor),
}


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def run(args: Any) -> str:
    """``tools/benchmark.py loader``: the CPU loader table (Markdown)."""
    root, split, made = Path(args.data_root), args.split, None
    if args.resize:
        width, height = (int(v) for v in args.resize.lower().split("x"))
        made = resized_copy(root, split, (width, height), args.images)
        root, split = made, "voc07_trainval"
    try:
        with one_core() as core:
            env = environment_lines("cpu")
            rows = measure_loaders(root, split, args.repeats, args.pipelines.split(","))
        count = len(resolve_split(root, split))
    finally:
        if made is not None:
            remove_tree(made)
    for r in rows:
        print(f"{r.name:16s} {r.cpu_rate:8.1f} images/s per core (CPU time), {r.wall_rate:8.1f} (wall)")
    shown = shown_path(args.data_root)
    source = (f"{args.images} images of `{shown}` ({args.split}) resized to {args.resize}, JPEG "
              f"quality 90, pixel noise sigma 12 (VOC-like file sizes)" if args.resize
              else f"`{shown}` ({args.split}), {count} images")
    return "\n".join([
        "## loader: training data pipeline, CPU, one core", "",
        f"`tools/benchmark.py loader{' --resize ' + args.resize if args.resize else ''}`: {source}; "
        f"every pipeline reads the JPEG files and produces one augmented 300x300 sample per image, "
        f"as one DataLoader worker does. Median of {args.repeats} passes after one warm-up image; "
        f"images/s per core from the process CPU time (robust to other processes on a shared "
        f"machine), and from wall-clock time.", "",
        *env, f"- pinned to {core}; load average at the end: {load_average()}", "",
        "| pipeline | what it does | images/s per core (CPU time) | images/s (wall) |",
        "|---|---|---:|---:|",
        *[f"| {r.name} | {r.what} | {r.cpu_rate:.0f} | {r.wall_rate:.0f} |" for r in rows],
    ])


def register(sub: Any) -> None:
    p = sub.add_parser("loader", help="CPU data pipeline images/s per core: before/after, torchvision v2, decode floor")
    add_data_root(p)
    p.add_argument("--split", default="voc07_trainval")
    p.add_argument("--resize", default="500x375", help="WxH copy (VOC-sized); '' to use the files as they are")
    p.add_argument("--images", type=int, default=200, help="images in the resized copy")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--pipelines", default=",".join(PIPELINES), help=f"comma-separated, of {list(PIPELINES)}")
    p.set_defaults(func=run)
