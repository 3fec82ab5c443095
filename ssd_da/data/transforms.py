"""Pipelines for SSD300: the training recipe of Liu et al. 2016 and the eval resize.

``build_train_transform`` / ``build_eval_transform`` return the fast implementation
(``ssd_da.data.augment``) by default; ``backend="albumentations"`` returns the albumentations
pipeline defined here, the reference the fast one is tested against.

Boxes travel as albumentations "pascal_voc" (absolute pixel xyxy), which is our 0-based pixel
xyxy convention (docs/design.md); labels travel in the "labels" field and follow their boxes.
albumentations (2.x) has no SSD zoom-out or min-IoU crop, so ``ZoomOut`` and ``MinIoURandomCrop``
below implement them as DualTransforms. Inside a transform, albumentations hands boxes over
normalised to the current image (x / W, y / H) with extra columns (encoded labels) after the
first four; the transforms keep those columns and may drop rows.
"""

from __future__ import annotations

import functools
import random
from typing import Any, Sequence

import albumentations as A
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2

from ssd_da.data.augment import ResizeNormalize, SSDAugment
from ssd_da.data.sampling import (  # noqa: F401 (the box helpers: public here too)
    MEAN_PIXEL, OUTPUTS, SSD_MIN_IOUS, AugmentSettings, box_centres_inside, box_iou_with_rect,
    box_iou_with_rects, sample_min_iou_crop, sample_zoom_out,
)
from ssd_da.models.pretrained import IMAGENET_MEAN, IMAGENET_STD  # noqa: F401 (public here too)

def _to_pixels(bboxes: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Normalised albumentations boxes (N, 4+) -> (N, 4) float64 absolute pixels.

    Rounded to 1e-3 px: albumentations keeps normalised boxes in float32 (relative error
    ~6e-8, so 0.9 * 100 = 89.999998), and a box centre that lies exactly on a crop edge must be
    outside it (the strict test of ``box_centres_inside``) whatever the rounding."""
    height, width = shape[:2]
    return np.round(bboxes[:, :4].astype(np.float64) * np.array([width, height, width, height]), 3)


class ZoomOut(A.DualTransform):
    """SSD's "zoom out" (expand): paste the image at a random place on a canvas up to
    ``max_ratio`` times larger, filled with ``fill`` (SSD sec 3.6: creates small objects).

    Boxes shift by the integer paste offset, as in ssd.pytorch's Expand. Output image shape:
    (int(H * r), int(W * r), C) with r ~ U[1, max_ratio].
    """

    def __init__(self, max_ratio: float = 4.0, fill: Sequence[float] = MEAN_PIXEL, p: float = 0.5) -> None:
        super().__init__(p=p)
        if max_ratio < 1.0:
            raise ValueError(f"ZoomOut max_ratio must be >= 1, got {max_ratio}")
        self.max_ratio = float(max_ratio)
        self.fill_value = tuple(float(f) for f in fill)

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        height, width = params["shape"][:2]
        left, top, out_w, out_h = sample_zoom_out(self.py_random, height, width, self.max_ratio)
        return {"left": left, "top": top, "out_h": out_h, "out_w": out_w}

    def apply(self, img: np.ndarray, left: int, top: int, out_h: int, out_w: int, **params: Any) -> np.ndarray:
        fill = np.asarray(self.fill_value[: img.shape[2] if img.ndim == 3 else 1])
        if np.issubdtype(img.dtype, np.integer):
            fill = np.round(fill)
        canvas = np.empty((out_h, out_w) + img.shape[2:], dtype=img.dtype)
        canvas[...] = fill.astype(img.dtype)
        canvas[top:top + img.shape[0], left:left + img.shape[1]] = img
        return canvas

    def apply_to_bboxes(self, bboxes: np.ndarray, left: int, top: int, out_h: int, out_w: int,
                        **params: Any) -> np.ndarray:
        if not bboxes.size:
            return bboxes
        pixels = _to_pixels(bboxes, params["shape"]) + np.array([left, top, left, top])
        out = bboxes.copy()
        out[:, :4] = pixels / np.array([out_w, out_h, out_w, out_h])
        return out

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("max_ratio", "fill_value")


class MinIoURandomCrop(A.DualTransform):
    """SSD's patch sampling (Liu et al. 2016 sec 2.2; ssd.pytorch RandomSampleCrop).

    Per call, pick one option of ``min_ious``: None keeps the whole image; a threshold t samples
    up to ``max_trials`` patches with sides in [min_scale, 1] of the image's and aspect h/w in
    [1/max_aspect, max_aspect], and accepts the first whose IoU with every ground-truth box is
    >= t and that contains at least one box centre. Boxes whose centres fall outside the patch
    are dropped (with their labels); the rest are clipped to it. If no trial succeeds the image
    is left as it is (Caffe's SSD keeps the original image then). Unlike ssd.pytorch, whose test
    ``min < t and max_iou < max`` never rejects when max_iou is inf, the threshold is enforced.

    ``require_all=False`` (default) demands the threshold of at least one box, as the original
    Caffe SSD (SatisfySampleConstraint) and torchvision's RandomIoUCrop do; ``require_all=True``
    of every box (ssd.pytorch's intent, mmdetection). With two separated objects, thresholds >= 0.5 are rarely
    satisfiable under ``require_all=True``, so those options then mostly keep the whole image.
    """

    def __init__(self, min_ious: Sequence[float | None] = SSD_MIN_IOUS, min_scale: float = 0.3,
                 max_aspect: float = 2.0, max_trials: int = 50, require_all: bool = False,
                 p: float = 1.0) -> None:
        super().__init__(p=p)
        if len(min_ious) == 0:
            raise ValueError("MinIoURandomCrop min_ious must hold at least one option (None or a float)")
        if not 0.0 < min_scale <= 1.0 or max_aspect < 1.0 or max_trials < 1:
            raise ValueError(f"MinIoURandomCrop needs 0 < min_scale <= 1, max_aspect >= 1, max_trials >= 1; "
                             f"got {min_scale}, {max_aspect}, {max_trials}")
        self.min_ious = tuple(min_ious)
        self.min_scale = float(min_scale)
        self.max_aspect = float(max_aspect)
        self.max_trials = int(max_trials)
        self.require_all = bool(require_all)

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        height, width = params["shape"][:2]
        bboxes = np.asarray(data.get("bboxes", np.zeros((0, 4))))
        boxes = _to_pixels(bboxes.reshape(len(bboxes), -1), params["shape"]) if bboxes.size else np.zeros((0, 4))
        crop = sample_min_iou_crop(self.py_random, height, width, boxes, self.min_ious, self.min_scale,
                                   self.max_aspect, self.max_trials, self.require_all)
        return {"crop": crop}

    def apply(self, img: np.ndarray, crop: tuple[int, int, int, int], **params: Any) -> np.ndarray:
        x1, y1, x2, y2 = crop
        return img[y1:y2, x1:x2]

    def apply_to_bboxes(self, bboxes: np.ndarray, crop: tuple[int, int, int, int], **params: Any) -> np.ndarray:
        height, width = params["shape"][:2]
        if not bboxes.size or tuple(crop) == (0, 0, width, height):
            return bboxes
        boxes = _to_pixels(bboxes, params["shape"])
        keep = box_centres_inside(boxes, crop)
        x1, y1, x2, y2 = crop
        clipped = np.clip(boxes[keep], [x1, y1, x1, y1], [x2, y2, x2, y2]) - np.array([x1, y1, x1, y1])
        out = bboxes[keep].copy()
        out[:, :4] = clipped / np.array([x2 - x1, y2 - y1, x2 - x1, y2 - y1])
        return out

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("min_ious", "min_scale", "max_aspect", "max_trials", "require_all")


def _photometric_distortion(channel_swap_p: float) -> list[A.BasicTransform]:
    """The Caffe SSD "distort_param": brightness delta 32, contrast [0.5, 1.5], saturation
    [0.5, 1.5], hue delta 18 degrees, each with p = 0.5; contrast either before or after the
    colour changes (as in ssd.pytorch's PhotometricDistort). Then, if ``channel_swap_p`` > 0, a
    random channel order with that probability (a uniform permutation of the 3 channels, the
    identity included): ``channel_swap_p=0.5`` is ssd.pytorch's/lufficc's RandomLightingNoise.
    Our default is 0 (see :func:`build_train_transform`)."""

    def contrast() -> A.BasicTransform:
        # alpha = 1 + U(-0.5, 0.5), beta = 0: a pure multiplication, as Caffe's contrast.
        return A.RandomBrightnessContrast(brightness_limit=(0.0, 0.0), contrast_limit=(-0.5, 0.5), p=0.5)

    def colour() -> list[A.BasicTransform]:
        # ColorJitter's hue factor is a fraction of the colour circle: 18 / 360 = 0.05.
        return [A.ColorJitter(brightness=(1.0, 1.0), contrast=(1.0, 1.0), saturation=(0.5, 1.5),
                              hue=(0.0, 0.0), p=0.5),
                A.ColorJitter(brightness=(1.0, 1.0), contrast=(1.0, 1.0), saturation=(1.0, 1.0),
                              hue=(-0.05, 0.05), p=0.5)]

    transforms: list[A.BasicTransform] = [
        # beta = U(-32, 32) / 255 * 255: an additive brightness change of up to 32 grey levels.
        A.RandomBrightnessContrast(brightness_limit=(-32 / 255, 32 / 255), contrast_limit=(0.0, 0.0), p=0.5),
        A.OneOf([A.Sequential([contrast(), *colour()], p=1.0),
                 A.Sequential([*colour(), contrast()], p=1.0)], p=1.0),
    ]
    if channel_swap_p > 0:
        transforms.append(A.ChannelShuffle(p=channel_swap_p))
    return transforms


def seed_transform(transform: A.BaseCompose, seed: int) -> None:
    """Make ``transform`` reproducible: one numpy and one Python generator, seeded with ``seed``,
    shared by every child transform.

    Use this rather than ``A.Compose(seed=...)``: in albumentations 2.0.x that gives every child
    its own generator with the same seed, so e.g. the zoom-out and flip coin tosses coincide.
    """
    transform.set_random_state(np.random.default_rng(seed), random.Random(seed))


def _bbox_params() -> A.BboxParams:
    return A.BboxParams(format="pascal_voc", label_fields=["labels"])


def _check_size(size: int) -> None:
    if not isinstance(size, int) or size <= 0:
        raise ValueError(f"transform size must be a positive int (e.g. 300 for SSD300), got {size!r}")


# "fast": ssd_da.data.augment (the default: same draws, rendered straight into the output, see
# docs/benchmarks.md); "albumentations": the reference pipeline below, kept to check the fast
# one against (tests/test_data_augment.py) and to measure it.
BACKENDS: tuple[str, ...] = ("fast", "albumentations")


def _check_backend(backend: str, output: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"transform backend {backend!r} is not one of {list(BACKENDS)}")
    if output not in OUTPUTS:
        raise ValueError(f"transform output must be 'float' (normalised) or 'uint8', got {output!r}")


def reference_train_transforms(size: int = 300, settings: AugmentSettings = AugmentSettings(),
                               output: str = "float") -> list[A.BasicTransform]:
    """The albumentations steps of the training augmentation, in order (see build_train_transform)."""
    s = settings
    transforms: list[A.BasicTransform] = _photometric_distortion(s.channel_swap_p) if s.photometric else []
    transforms += [
        ZoomOut(max_ratio=s.max_zoom_out, fill=MEAN_PIXEL, p=s.zoom_out_p),
        MinIoURandomCrop(min_ious=s.min_ious, require_all=s.crop_require_all, p=1.0),
        A.HorizontalFlip(p=s.flip_p),
        A.Resize(size, size),
    ]
    if output == "float":
        transforms.append(A.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD, max_pixel_value=255.0))
    return transforms + [ToTensorV2()]


def build_train_transform(size: int = 300, settings: AugmentSettings = AugmentSettings(),
                          seed: int | None = None, backend: str = "fast", output: str = "float") -> Any:
    """SSD training augmentation (Liu et al. 2016 sec 2.2 and 3.6, ssd.pytorch SSDAugmentation):
    photometric distortion, zoom-out up to 4x onto the mean pixel, min-IoU crop, horizontal
    flip, resize to size x size, then a (3, size, size) tensor: ImageNet-normalised float32
    (``output="float"``) or the uint8 RGB pixels (``"uint8"``, normalised later on the device).

    One deliberate difference: ssd.pytorch and lufficc end the photometric distortion with a
    random channel swap (p 0.5, a uniform permutation of the 3 channels, identity included); ours
    is off by default (``AugmentSettings.channel_swap_p=0.0``): the backbones start from torchvision's ImageNet
    weights, trained on RGB images without channel swaps, and a swap feeds conv1's
    colour-specific filters inputs they never saw. This is a choice, not a measured improvement;
    ``channel_swap_p=0.5`` matches the two code bases (both backends draw the swap that way).

    Call as ``t(image=uint8 (H, W, 3), bboxes=(N, 4) xyxy pixels, labels=(N,))``; the returned
    "bboxes" are xyxy pixels of the size x size image, "labels" the labels of the kept boxes.
    ``seed`` (optional) makes the sequence of augmentations reproducible (see seed_transform).
    ``backend``: "fast" (``ssd_da.data.augment.SSDAugment``) or "albumentations" (an A.Compose).
    ``settings``: what the augmentation draws from (:class:`~ssd_da.data.sampling.AugmentSettings`).
    """
    _check_size(size)
    _check_backend(backend, output)
    if backend == "fast":
        return SSDAugment(size, settings, seed=seed, output=output)
    compose = A.Compose(reference_train_transforms(size, settings, output), bbox_params=_bbox_params())
    if seed is not None:
        seed_transform(compose, seed)
    return compose


def build_eval_transform(size: int = 300, backend: str = "fast", output: str = "float") -> Any:
    """Resize to size x size (bilinear), then a tensor as in build_train_transform; boxes
    scaled by (size/W, size/H). Both backends give the same pixels."""
    _check_size(size)
    _check_backend(backend, output)
    if backend == "fast":
        return ResizeNormalize(size, output)
    steps: list[A.BasicTransform] = [A.Resize(size, size)]
    if output == "float":
        steps.append(A.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD, max_pixel_value=255.0))
    return A.Compose(steps + [ToTensorV2()], bbox_params=_bbox_params())


@functools.lru_cache(maxsize=4)
def _eval_transform(size: int) -> Any:
    return build_eval_transform(size)


def preprocess(image: np.ndarray, size: int = 300) -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> (1, 3, size, size) float32, resized and ImageNet-normalised by
    the evaluation pipeline (:func:`build_eval_transform`), so CAMs and pictures see what
    evaluation sees."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 \
            or image.shape[2] != 3 or min(image.shape[:2]) < 1:
        desc = f"{image.dtype} array of shape {image.shape}" if isinstance(image, np.ndarray) \
            else type(image).__name__
        raise ValueError(f"image: expected an (H, W, 3) uint8 RGB array, got {desc}")
    out = _eval_transform(size)(image=image, bboxes=np.zeros((0, 4), np.float32),
                                labels=np.zeros((0,), np.int64))
    return out["image"].unsqueeze(0).float()
