"""Image files read lazily: the size from the header, the pixels decoded on demand, JPEGs at a
reduced scale when the augmentation needs fewer pixels than the file holds.

libjpeg(-turbo) can decode a JPEG directly at 1/2, 1/4 or 1/8 of its size by scaling in the
DCT domain; that is several times faster and needs that many times less memory than a full
decode, which is what keeps an 8000x6000 photograph cheap when it is zoomed out and resized to
300x300 (see ``ssd_da.data.augment``).
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from ssd_da.data.images import load_rgb

__all__ = ["EncodedImage", "REDUCTIONS"]

# Reduction factor -> OpenCV flag for a DCT-scaled decode. IGNORE_ORIENTATION: VOC boxes refer to
# the stored pixel grid, which PIL (load_rgb) returns as well; OpenCV would otherwise rotate the
# pixels by the EXIF orientation tag and the boxes would no longer lie on their objects.
_CV2_FLAGS = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
              8: cv2.IMREAD_REDUCED_COLOR_8}
REDUCTIONS: tuple[int, ...] = tuple(sorted(_CV2_FLAGS))


@dataclass
class EncodedImage:
    """The bytes of one image file and its size, read from the header without decoding.

    Attributes:
        data: the file's bytes.
        height, width: the stored pixel grid's size (EXIF orientation is not applied).
        path: the file, for error messages.
        fast: True for RGB or greyscale JPEGs that end with the end-of-image marker, which
            OpenCV decodes (at any reduction) exactly as PIL does; other files (PNG, CMYK JPEG,
            palettes) go through ``load_rgb``, and so do JPEGs without the marker: OpenCV fills
            a truncated JPEG with grey where PIL raises (or decodes one with trailing bytes).
    """

    data: bytes
    height: int
    width: int
    path: str
    fast: bool

    @classmethod
    def from_file(cls, path: str | Path) -> "EncodedImage":
        """Read ``path``; OSError naming the file when it is missing or not an image."""
        try:
            with open(path, "rb") as fh:
                data = fh.read()
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
                fast = img.format == "JPEG" and img.mode in ("RGB", "L") and data.endswith(b"\xff\xd9")
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            raise OSError(f"cannot read image {path}: {err}") from err
        return cls(data, height, width, str(path), fast)

    def decode(self, reduction: int = 1) -> tuple[np.ndarray, bool]:
        """Pixels as ``(uint8 (ceil(H / r), ceil(W / r), 3), is_bgr)``.

        ``reduction`` r (1, 2, 4 or 8) applies to fast JPEGs only; other files decode at full
        size (r is then 1: check the returned shape). Pixel j of a reduced decode covers pixels
        ``[j * r, (j + 1) * r)`` of the full grid. OpenCV returns BGR, PIL RGB: callers that
        care read ``is_bgr`` instead of paying for a conversion.
        """
        if reduction not in _CV2_FLAGS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction}")
        if self.fast:
            flags = _CV2_FLAGS[reduction] | cv2.IMREAD_IGNORE_ORIENTATION
            pixels = cv2.imdecode(np.frombuffer(self.data, np.uint8), flags)
            if pixels is not None and pixels.ndim == 3 and pixels.shape[2] == 3:
                return pixels, True
        return load_rgb(self.path), False
