"""Reading image files as (H, W, 3) uint8 RGB: every PIL mode, 16-bit included, checked cheaply
before training, and shrunk at load time when they are far larger than SSD300 can use."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from struct import error as struct_error

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
    height, width, _ = inspect_image(path, decode)
    return height, width


def inspect_image(path: str | Path, decode: bool = False) -> tuple[int, int, int]:
    """:func:`check_image` and the EXIF orientation tag (1, upright, when there is none):
    ``(height, width, orientation)`` of the stored pixel grid."""
    try:
        with Image.open(path) as img:
            width, height = img.size
            try:
                orientation = int(img.getexif().get(EXIF_ORIENTATION, 1) or 1)
            except (ValueError, TypeError, SyntaxError, struct_error):  # a damaged EXIF block
                orientation = 1
            if decode:
                img.draft(img.mode, (max(1, width // 8), max(1, height // 8)))
                img.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise OSError(f"cannot read image {path}: {err}") from err
    return height, width, orientation


EXIF_ORIENTATION = 0x0112
# How a viewer turns the stored pixels for display, per EXIF orientation value.
_ORIENTATIONS = {2: "mirrored", 3: "rotated 180 degrees", 4: "mirrored vertically",
                 5: "mirrored and rotated", 6: "rotated 90 degrees clockwise",
                 7: "mirrored and rotated", 8: "rotated 90 degrees counter-clockwise"}


@dataclass
class ImageAudit:
    """What a dataset's image files say against their annotations, collected while the dataset
    is built and reported once (a warning per problem, with the count and the first files),
    not at every load of every image.

    Boxes refer to the STORED pixels: nothing here, in training or in evaluation, turns an
    image by its EXIF orientation, as the VOC devkit, PIL and torchvision's decoders read
    them. Labelling tools differ (some draw on the upright view a photo viewer shows, some on
    the stored pixels), so a file with an orientation tag is counted and named."""

    size_mismatch: list[str] = field(default_factory=list)
    rotated: list[str] = field(default_factory=list)

    def note(self, path: Path, file_hw: tuple[int, int], annotated_hw: tuple[int, int],
             orientation: int) -> None:
        if tuple(file_hw) != tuple(annotated_hw):
            self.size_mismatch.append(f"{Path(path).name}: file {file_hw[1]}x{file_hw[0]}, "
                                      f"annotation {annotated_hw[1]}x{annotated_hw[0]}")
        if orientation != 1:
            how = _ORIENTATIONS.get(orientation, "an unknown orientation")
            self.rotated.append(f"{Path(path).name}: tag {orientation}, shown {how}")

    def report(self, where: str, total: int) -> None:
        if self.size_mismatch:
            logger.warning("%s: %d of %d images differ in size from their annotation (e.g. %s); "
                           "the file is taken as the truth: boxes are clipped to it", where,
                           len(self.size_mismatch), total, "; ".join(self.size_mismatch[:3]))
        if self.rotated:
            logger.warning("%s: %d of %d images carry an EXIF orientation (e.g. %s); boxes are "
                           "read against the stored pixels, not the turned view a photo viewer "
                           "shows (docs/usage.md, Data): if they were drawn on that view, turn those "
                           "files and their boxes first", where, len(self.rotated), total,
                           "; ".join(self.rotated[:3]))
