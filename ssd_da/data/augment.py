"""The SSD300 training augmentation rendered straight into the 300x300 output (fast path).

Same random draws as the albumentations pipeline (``build_train_transform(...,
backend="albumentations")``; Liu et al. 2016 sec 2.2 and 3.6): photometric distortion, zoom-out
onto the mean pixel, min-IoU crop, horizontal flip, resize. What differs is how the pixels are
made, and none of it changes the distribution of augmentations:

- every parameter is drawn first, from the image size and boxes alone, with the same
  distributions and the same order of decisions (``sample_zoom_out``/``sample_min_iou_crop``
  are shared with the albumentations transforms);
- the zoom-out canvas is virtual: the crop is a rectangle on it, and only the part of the image
  the crop shows is touched (an 8000x6000 photo zoomed out 4x no longer builds a 2.3 GB canvas);
- the photometric steps run on that part alone: they act pixel by pixel, so distorting a patch
  gives the patch of the distorted image (the fill stays the undistorted mean pixel, as before);
- crop, flip and resize are one OpenCV call: ``cv2.resize`` of a view when the crop lies in the
  image, else ``cv2.warpAffine`` over the patch padded with one pixel of fill, whose
  interpolation next to the image matches resizing the real canvas;
- a JPEG given as an ``EncodedImage`` decodes at 1/2, 1/4 or 1/8 scale (in libjpeg's DCT)
  when the crop maps at least that many source pixels to one output pixel, so the reduced
  image still has at least one pixel per output pixel. This is the one change of pixels:
  DCT scaling averages where bilinear resizing of the full image samples (it aliases less).
  ``reduced_decode=False`` turns it off.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import torch

from ssd_da.data.decode import REDUCTIONS, EncodedImage
from ssd_da.data.sampling import (
    MEAN_PIXEL, OUTPUTS, AugmentSettings, box_centres_inside, sample_min_iou_crop, sample_zoom_out,
)
from ssd_da.models.pretrained import PIXEL_OFFSET, PIXEL_SCALE

__all__ = ["PhotometricParams", "GeometryParams", "SSDAugment", "ResizeNormalize",
           "sample_photometric", "apply_photometric", "to_tensor"]

# The zoom-out fill, rounded for a uint8 canvas as the albumentations ZoomOut does: (124, 116, 104).
FILL_RGB: tuple[int, int, int] = tuple(int(round(v)) for v in MEAN_PIXEL)  # type: ignore[assignment]
_SCALE = np.array(PIXEL_SCALE, dtype=np.float32)
_OFFSET = np.array(PIXEL_OFFSET, dtype=np.float32)


@dataclass(frozen=True)
class PhotometricParams:
    """One draw of the Caffe SSD "distort_param" (see ``transforms._photometric_distortion``).

    brightness: grey levels added, U(-32, 32), or None. contrast: factor U(0.5, 1.5), or None;
    ``contrast_first`` puts it before the colour steps, else after. saturation: factor
    U(0.5, 1.5), or None. hue: shift as a fraction of the colour circle, U(-0.05, 0.05), or None.
    channel_order: a permutation of the RGB channels, or None.
    """

    brightness: float | None = None
    contrast: float | None = None
    contrast_first: bool = True
    saturation: float | None = None
    hue: float | None = None
    channel_order: tuple[int, int, int] | None = None


@dataclass(frozen=True)
class GeometryParams:
    """canvas: ``(left, top, canvas_w, canvas_h)``, the image's place on the (virtual) zoom-out
    canvas, ``(0, 0, W, H)`` without zoom-out. crop: ``(x1, y1, x2, y2)`` integer pixels of the
    canvas. flip: mirror the crop left-right."""

    canvas: tuple[int, int, int, int]
    crop: tuple[int, int, int, int]
    flip: bool


def sample_photometric(rng: random.Random, channel_swap_p: float = 0.0) -> PhotometricParams:
    """Draw as the albumentations pipeline does: brightness (p 0.5), then one of the two orders
    with equal odds, each step of it with p 0.5, then the channel swap (p ``channel_swap_p``)."""
    brightness = rng.uniform(-32.0, 32.0) if rng.random() < 0.5 else None
    contrast_first = rng.random() < 0.5
    contrast = rng.uniform(0.5, 1.5) if rng.random() < 0.5 else None
    saturation = rng.uniform(0.5, 1.5) if rng.random() < 0.5 else None
    hue = rng.uniform(-0.05, 0.05) if rng.random() < 0.5 else None
    order = None
    if channel_swap_p > 0 and rng.random() < channel_swap_p:
        order = tuple(rng.sample(range(3), 3))
    return PhotometricParams(brightness, contrast, contrast_first, saturation, hue, order)  # type: ignore[arg-type]


def _lut(scale: float, shift: float) -> np.ndarray:
    """uint8 lookup table of ``clip(v * scale + shift)``, truncated as albumentations' uint8 path."""
    return np.clip(np.arange(256, dtype=np.float32) * scale + shift, 0, 255).astype(np.uint8)


def apply_photometric(img: np.ndarray, p: PhotometricParams, bgr: bool = False) -> np.ndarray:
    """(H, W, 3) uint8 RGB (or BGR with ``bgr``) -> distorted copy of the same shape.

    Every step maps a pixel to a pixel, so this commutes with cropping. Saturation blends with
    the grey image (ITU-R 601 weights), hue rotates OpenCV's 0..179 hue channel, as
    albumentations' ColorJitter does on uint8 images.
    """
    lut = _lut(1.0, p.brightness) if p.brightness is not None else None
    if p.contrast is not None and p.contrast_first:
        contrast = _lut(p.contrast, 0.0)
        lut = contrast if lut is None else contrast[lut]  # brightness, then contrast
    if lut is not None:
        img = cv2.LUT(img, lut)
    if p.saturation is not None:
        grey = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY if bgr else cv2.COLOR_RGB2GRAY)
        grey = cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR)
        img = cv2.addWeighted(img, p.saturation, grey, 1.0 - p.saturation, 0.0)
    if p.hue is not None:
        hsv = cv2.cvtColor(img, cv2.COLOR_BGR2HSV if bgr else cv2.COLOR_RGB2HSV)
        shift = np.mod(np.arange(256, dtype=np.float64) + 180.0 * p.hue, 180.0).astype(np.uint8)
        hsv[:, :, 0] = cv2.LUT(hsv[:, :, 0], shift)
        img = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR if bgr else cv2.COLOR_HSV2RGB)
    if p.contrast is not None and not p.contrast_first:
        img = cv2.LUT(img, _lut(p.contrast, 0.0))
    if p.channel_order is not None:
        order = [2 - p.channel_order[2 - k] for k in range(3)] if bgr else list(p.channel_order)
        img = np.ascontiguousarray(img[:, :, order])
    return img


def to_tensor(img: np.ndarray, bgr: bool, output: str) -> torch.Tensor:
    """(S, S, 3) uint8 -> (3, S, S) RGB tensor: ImageNet-normalised float32 (``output="float"``,
    what ``A.Normalize`` + ``ToTensorV2`` give) or the uint8 pixels (``"uint8"``)."""
    if output == "uint8":
        rgb = img[:, :, ::-1] if bgr else img
        return torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))
    planes = cv2.split(img)
    out = np.empty((3,) + img.shape[:2], dtype=np.float32)
    for c in range(3):  # per contiguous plane, in place: no float temporaries
        np.multiply(planes[2 - c if bgr else c], _SCALE[c], out=out[c])
        out[c] -= _OFFSET[c]
    return torch.from_numpy(out)


def _check_output(output: str) -> str:
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {list(OUTPUTS)} ('float': normalised), got {output!r}")
    return output


class SSDAugment:
    """SSD training augmentation; a drop-in for the albumentations Compose of
    ``build_train_transform`` (same settings and call, same output contract).

    Call as ``t(image=..., bboxes=(N, 4) xyxy pixels, labels=(N,))`` with ``image`` an
    (H, W, 3) uint8 RGB array or an :class:`EncodedImage` (``VOCDetection`` passes one, since
    ``reads_encoded`` is True). Returns ``{"image": (3, size, size) tensor, "bboxes": (M, 4)
    float32 xyxy pixels of the output, "labels": (M,)}``, M <= N (boxes whose centre the crop
    leaves out are dropped). ``last_params`` holds the draw of the last call.
    """

    reads_encoded = True

    def __init__(self, size: int = 300, settings: AugmentSettings = AugmentSettings(),
                 seed: int | None = None, output: str = "float", reduced_decode: bool = True) -> None:
        if settings.max_zoom_out < 1.0 or len(settings.min_ious) == 0:
            raise ValueError(f"SSDAugment needs max_zoom_out >= 1 and at least one min_ious option; "
                             f"got {settings.max_zoom_out}, {list(settings.min_ious)}")
        self.size, self.settings = size, settings
        self.output, self.reduced_decode = _check_output(output), reduced_decode
        self.rng = random.Random(seed)
        self.last_params: tuple[PhotometricParams | None, GeometryParams] | None = None

    def set_random_state(self, random_generator: Any, py_random: random.Random) -> None:
        """The albumentations protocol (used by SeededDataset): draws use ``py_random``."""
        self.rng = py_random

    def sample(self, height: int, width: int, boxes: np.ndarray
               ) -> tuple[PhotometricParams | None, GeometryParams]:
        """Draw one augmentation for a ``height x width`` image with (N, 4) xyxy pixel boxes."""
        rng, s = self.rng, self.settings
        photo = sample_photometric(rng, s.channel_swap_p) if s.photometric else None
        canvas = (0, 0, width, height)
        if s.zoom_out_p > 0 and rng.random() < s.zoom_out_p:
            canvas = sample_zoom_out(rng, height, width, s.max_zoom_out)
        left, top, canvas_w, canvas_h = canvas
        shifted = boxes + np.array([left, top, left, top], dtype=np.float64)
        crop = sample_min_iou_crop(rng, canvas_h, canvas_w, shifted, s.min_ious,
                                   require_all=s.crop_require_all)
        flip = s.flip_p > 0 and rng.random() < s.flip_p
        return photo, GeometryParams(canvas, crop, flip)

    def __call__(self, *, image: np.ndarray | EncodedImage, bboxes: Any, labels: Any) -> dict[str, Any]:
        if isinstance(image, EncodedImage):
            height, width = image.height, image.width
        else:
            if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 \
                    or image.shape[2] != 3:
                raise ValueError(f"image: expected an (H, W, 3) uint8 RGB array or an EncodedImage, "
                                 f"got {getattr(image, 'dtype', type(image))} {getattr(image, 'shape', '')}")
            height, width = image.shape[:2]
        boxes = np.asarray(bboxes, dtype=np.float64).reshape(-1, 4)
        labels = np.asarray(labels).reshape(-1)
        photo, geom = self.sample(height, width, boxes)
        self.last_params = (photo, geom)
        reduction = 1
        if isinstance(image, EncodedImage):
            reduction = self._reduction(geom) if self.reduced_decode else 1
            pixels, bgr = image.decode(reduction)
            reduction = _check_decoded(pixels, image, reduction)
        else:
            pixels, bgr = image, False
        out = render(pixels, bgr, reduction, (height, width), geom, photo, self.size)
        out_boxes, keep = transform_boxes(boxes, geom, self.size)
        return {"image": to_tensor(out, bgr, self.output), "bboxes": out_boxes.astype(np.float32),
                "labels": labels[keep]}

    def _reduction(self, geom: GeometryParams) -> int:
        """Largest DCT reduction that keeps at least one decoded pixel per output pixel."""
        x1, y1, x2, y2 = geom.crop
        per_output_pixel = min(x2 - x1, y2 - y1) / self.size
        return max(r for r in REDUCTIONS if r <= max(per_output_pixel, 1.0))


def _check_decoded(pixels: np.ndarray, image: EncodedImage, reduction: int) -> int:
    """The reduction the decoder applied (1 when it could not reduce); OSError on a size that
    matches neither (a file whose pixels disagree with its own header)."""
    height, width = image.height, image.width
    if pixels.shape[:2] == (-(-height // reduction), -(-width // reduction)):
        return reduction
    if pixels.shape[:2] == (height, width):
        return 1
    raise OSError(f"{image.path}: decoded {pixels.shape[1]}x{pixels.shape[0]} pixels, but its "
                  f"header says {width}x{height}")


def render(pixels: np.ndarray, bgr: bool, r: int, full_size: tuple[int, int], geom: GeometryParams,
           photo: PhotometricParams | None, size: int) -> np.ndarray:
    """The (size, size, 3) uint8 output of one draw; channels in the order of ``pixels``.

    ``pixels`` is the image decoded at 1/r of ``full_size`` (height, width), r = 1, 2, 4 or 8;
    its pixel j covers full pixels [j r, (j + 1) r).
    """
    height, width = full_size
    left, top, _, _ = geom.canvas
    x1, y1, x2, y2 = geom.crop
    fill = np.array(FILL_RGB[::-1] if bgr else FILL_RGB, dtype=np.uint8)
    # The part of the image the crop shows, in full-size pixels, then in decoded pixels.
    ix1, iy1 = max(x1 - left, 0), max(y1 - top, 0)
    ix2, iy2 = min(x2 - left, width), min(y2 - top, height)
    if ix2 <= ix1 or iy2 <= iy1:
        return np.broadcast_to(fill, (size, size, 3)).copy()
    rx1, ry1 = ix1 // r, iy1 // r
    rx2, ry2 = min(-(-ix2 // r), pixels.shape[1]), min(-(-iy2 // r), pixels.shape[0])
    patch = pixels[ry1:ry2, rx1:rx2]
    if photo is not None:
        patch = apply_photometric(patch, photo, bgr)
    inside = x1 >= left and y1 >= top and x2 <= left + width and y2 <= top + height
    if inside and r == 1:
        out = cv2.resize(patch, (size, size), interpolation=cv2.INTER_LINEAR)
        return cv2.flip(out, 1) if geom.flip else out
    # Pad with one pixel of fill where the crop reaches past the image: with BORDER_REPLICATE
    # the output is fill beyond it and interpolates image and fill at its edge, as resizing
    # the real canvas does, and clamps at the crop's own edges, as cv2.resize of the crop does.
    pad = (int(y1 < top), int(y2 > top + height), int(x1 < left), int(x2 > left + width))
    if any(pad):
        patch = cv2.copyMakeBorder(patch, *pad, cv2.BORDER_CONSTANT, value=fill.tolist())
    # Output pixel X samples the canvas at u = x1 + (X + 0.5) * (x2 - x1) / size (mirrored:
    # (size - X - 0.5)); u - left in image pixels is (u - left) / r - rx1 + pad - 0.5 as an
    # index of the padded patch.
    matrix = np.zeros((2, 3), dtype=np.float64)
    for axis, (lo, hi, origin, first, before) in enumerate(((x1, x2, left, rx1, pad[2]),
                                                            (y1, y2, top, ry1, pad[0]))):
        step = (hi - lo) / size / r
        base = (lo - origin) / r - first + before - 0.5
        if axis == 0 and geom.flip:
            matrix[0, 0], matrix[0, 2] = -step, base + (size - 0.5) * step
        else:
            matrix[axis, axis], matrix[axis, 2] = step, base + 0.5 * step
    return cv2.warpAffine(patch, matrix, (size, size), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_REPLICATE)


def transform_boxes(boxes: np.ndarray, geom: GeometryParams, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, 4) xyxy image pixels -> ((M, 4) float64 xyxy output pixels, (N,) bool kept).

    As the albumentations pipeline: shift by the paste offset; unless the crop is the whole
    canvas, drop boxes whose centre is not strictly inside it and clip the rest; scale to
    size x size; mirror x when flipped.
    """
    left, top, canvas_w, canvas_h = geom.canvas
    x1, y1, x2, y2 = geom.crop
    shifted = boxes + np.array([left, top, left, top], dtype=np.float64)
    keep = np.ones(len(boxes), dtype=bool)
    if geom.crop != (0, 0, canvas_w, canvas_h) and len(boxes):
        keep = box_centres_inside(shifted, geom.crop)
        shifted = np.clip(shifted[keep], [x1, y1, x1, y1], [x2, y2, x2, y2])
    scale = np.array([size / (x2 - x1), size / (y2 - y1)] * 2)
    out = (shifted - np.array([x1, y1, x1, y1])) * scale
    if geom.flip:
        out = np.stack([size - out[:, 2], out[:, 1], size - out[:, 0], out[:, 3]], axis=1)
    return out.reshape(-1, 4), keep


class ResizeNormalize:
    """Evaluation transform: resize to size x size (bilinear), ImageNet normalisation, tensor;
    boxes scaled by (size / W, size / H). The albumentations eval pipeline's output, decoded
    with OpenCV and without its per-call overhead. Same call and output as ``SSDAugment``."""

    reads_encoded = True

    def __init__(self, size: int = 300, output: str = "float") -> None:
        self.size, self.output = size, _check_output(output)

    def __call__(self, *, image: np.ndarray | EncodedImage, bboxes: Any, labels: Any) -> dict[str, Any]:
        if isinstance(image, EncodedImage):
            pixels, bgr = image.decode(1)  # full size: evaluation sees exactly what it always saw
        else:
            pixels, bgr = image, False
        height, width = pixels.shape[:2]
        out = cv2.resize(pixels, (self.size, self.size), interpolation=cv2.INTER_LINEAR)
        boxes = np.asarray(bboxes, dtype=np.float64).reshape(-1, 4)
        scale = np.array([self.size / width, self.size / height] * 2)
        return {"image": to_tensor(out, bgr, self.output), "bboxes": (boxes * scale).astype(np.float32),
                "labels": np.asarray(labels).reshape(-1)}
