"""Small synthetic VOC trees for the fault and bad-input tests (imported by those test files)."""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

Objects = Sequence[tuple[str, tuple[int, int, int, int]]]  # (class name, 1-based xyxy)


def xml_text(objects: Objects, width: int, height: int) -> str:
    body = "".join(
        f"<object><name>{name}</name><difficult>0</difficult><bndbox><xmin>{b[0]}</xmin>"
        f"<ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
        for name, b in objects)
    return (f"<annotation><size><width>{width}</width><height>{height}</height><depth>3</depth>"
            f"</size>{body}</annotation>")


def jpeg_bytes(width: int = 64, height: int = 48, colour: tuple = (200, 60, 30),
               noise: bool = False) -> bytes:
    """A JPEG of one colour, or of random pixels (large: for cutting it short)."""
    if noise:
        pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
        image = Image.fromarray(pixels)
    else:
        image = Image.new("RGB", (width, height), colour)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def add_sample(devkit: Path, image_id: str, objects: Objects, image: bytes | None = None,
               size: tuple[int, int] = (64, 48), ext: str = ".jpg") -> None:
    """VOC2007/Annotations/<id>.xml and JPEGImages/<id><ext> (a plain JPEG unless ``image``)."""
    year = devkit / "VOC2007"
    (year / "Annotations").mkdir(parents=True, exist_ok=True)
    (year / "JPEGImages").mkdir(parents=True, exist_ok=True)
    (year / "Annotations" / f"{image_id}.xml").write_text(xml_text(objects, *size))
    data = jpeg_bytes(*size) if image is None else image
    (year / "JPEGImages" / f"{image_id}{ext}").write_bytes(data)


def write_set(devkit: Path, name: str, ids: Sequence[str], prefix: str = "") -> None:
    folder = devkit / "VOC2007" / "ImageSets" / "Main"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.txt").write_text(prefix + "".join(f"{i}\n" for i in ids), encoding="utf-8")


def png_bytes(pixels: np.ndarray, color_type: int, depth: int = 16) -> bytes:
    """A PNG written by hand (PIL cannot write 16-bit RGB/LA/RGBA): colour type 0 gray, 2 RGB,
    4 gray+alpha, 6 RGBA; ``pixels`` (H, W) or (H, W, C) of that depth, no filtering."""
    height, width = pixels.shape[:2]
    dtype = ">u2" if depth == 16 else "u1"
    raw = b"".join(b"\x00" + pixels[y].astype(dtype).tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
            + chunk(b"IEND", b""))
