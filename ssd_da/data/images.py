"""Reading image files as (H, W, 3) uint8 RGB: every PIL mode, 16-bit included, checked cheaply
before training, and shrunk at load time when they are far larger than SSD300 can use."""
from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)


def _to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """One channel of a 16-bit ("I;16*"), 32-bit integer ("I") or float ("F") image as uint8.

    16-bit values keep their high byte (v >> 8), as PIL does for 16-bit RGB and RGBA PNGs, so a
    16-bit grayscale file and its 16-bit RGB twin read the same. "I" does not say its depth (old
    Pillow opens 16-bit PNGs as "I"): values above 255 are taken as 16-bit, others as 8-bit.
    "F" values in [0, 1] are scaled by 255, others clipped to [0, 255].
    """
    if mode == "F":
        values = values.astype(np.float64)
        finite = values[np.isfinite(values)]
        if finite.size and finite.min() >= 0.0 and finite.max() <= 1.0:
            values = values * 255.0
        return np.clip(np.nan_to_num(values), 0, 255).round().astype(np.uint8)
    values = np.clip(values.astype(np.int64), 0, 65535)
    if mode.startswith("I;16") or values.max(initial=0) > 255:
        values = values >> 8
    return values.astype(np.uint8)


def pil_to_rgb(img: Image.Image) -> np.ndarray:
    """A decoded PIL image as a writable (H, W, 3) uint8 RGB array, whatever its mode (L, P, LA,
    RGBA, CMYK, 16-bit grayscale, ...). Alpha is dropped (the colour under it is kept)."""
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        # PIL's convert("RGB") clips these to 255: a 16-bit grayscale picture would turn white.
        gray = _to_uint8(np.asarray(img), img.mode)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # PIL warns when palette transparency goes straight to RGB
    return np.array(img.convert("RGB"), dtype=np.uint8)  # a writable copy


def shrunk_size(width: int, height: int, max_side: int | None) -> tuple[int, int]:
    """(width, height) scaled so that the longer side is at most ``max_side`` (aspect kept)."""
    if not max_side or max(width, height) <= max_side:
        return width, height
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def read_image(path: str | Path, max_side: int | None = None) -> tuple[np.ndarray, tuple[int, int]]:
    """Read ``path`` as RGB. Returns ``(image (h, w, 3) uint8, (H, W) of the file)``.

    With ``max_side``, an image whose longer side exceeds it comes back shrunk to fit (aspect
    kept, area interpolation), so (h, w) may be smaller than (H, W); a JPEG is then decoded at a
    reduced scale (PIL's draft mode), so the full-size pixels are never held in memory.

    Raises:
        OSError: a missing, unidentifiable, truncated or otherwise undecodable file (the message
            names it).
    """
    try:
        with Image.open(path) as img:
            width, height = img.size
            target = shrunk_size(width, height, max_side)
            if target != (width, height):
                img.draft("RGB", target)  # JPEG only; a no-op for other formats
            image = pil_to_rgb(img)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise OSError(f"cannot read image {path}: {err}") from err
    if (image.shape[1], image.shape[0]) != target:
        image = cv2.resize(image, target, interpolation=cv2.INTER_AREA)
    return image, (height, width)


def load_rgb(path: str | Path) -> np.ndarray:
    """Read an image file as (H, W, 3) uint8 RGB, whatever its mode (see :func:`pil_to_rgb`)."""
    return read_image(path)[0]


def check_image(path: str | Path, decode: bool = False) -> tuple[int, int]:
    """(height, width) of an image file from its header, without decoding the pixels; with
    ``decode`` the pixels are decoded too (a JPEG at 1/8 scale, which still reads every byte),
    so a truncated or corrupt file fails here rather than in the middle of a run.

    Raises:
        OSError: the file cannot be read (the message names it).
    """
    try:
        with Image.open(path) as img:
            width, height = img.size
            if decode:
                img.draft(img.mode, (max(1, width // 8), max(1, height // 8)))
                img.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise OSError(f"cannot read image {path}: {err}") from err
    return height, width
