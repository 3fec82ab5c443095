"""The fast SSD augmentation against the albumentations reference: same draws (by sampling), same
pixels and boxes for the same draw, bounded memory on huge images, decoding as PIL does."""
from __future__ import annotations

import io
import tracemalloc

import albumentations as A
import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from ssd_da.data import augment as aug_mod
from ssd_da.data.augment import (
    GeometryParams, PhotometricParams, SSDAugment, apply_photometric, render, transform_boxes,
)
from ssd_da.data.decode import EncodedImage
from ssd_da.data.images import load_rgb
from ssd_da.data.sampling import AugmentSettings
from ssd_da.data.transforms import (
    IMAGENET_MEAN, IMAGENET_STD, _bbox_params, build_eval_transform, reference_train_transforms,
    seed_transform,
)

BOXES = np.array([[20, 20, 79, 69], [110, 30, 179, 99], [40, 100, 129, 149]], dtype=np.float64)
LABELS = np.array([1, 2, 3])
HEIGHT, WIDTH = 160, 200


def _image(seed: int = 0) -> np.ndarray:
    """Smooth colour gradients plus noise: every photometric step changes it visibly."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    base = np.stack([x * 255 / WIDTH, y * 255 / HEIGHT, (x + y) * 127 / (WIDTH + HEIGHT) + 64], -1)
    return np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)


def _find(node: dict, name: str) -> list[dict]:
    found = [node] if node["__class_fullname__"].split(".")[-1] == name else []
    for child in node.get("transforms", []):
        found += _find(child, name)
    return found


def _reference_draw(replay: dict) -> tuple[PhotometricParams, GeometryParams]:
    """The draw of one albumentations ReplayCompose call, in the fast pipeline's terms."""
    top = replay["transforms"]
    brightness = top[0]["params"]["beta"] if top[0]["applied"] else None
    branches = top[1]["transforms"]  # OneOf: [contrast, colour...] or [colour..., contrast]
    branch = branches[0] if branches[0]["applied"] else branches[1]
    steps = {t["__class_fullname__"].split(".")[-1] + str(i): t for i, t in enumerate(branch["transforms"])}
    contrast = next(t for k, t in steps.items() if k.startswith("RandomBrightnessContrast"))
    saturation, hue = [t for k, t in steps.items() if k.startswith("ColorJitter")]
    photo = PhotometricParams(
        brightness, contrast["params"]["alpha"] if contrast["applied"] else None, branches[0]["applied"],
        saturation["params"]["saturation"] if saturation["applied"] else None,
        hue["params"]["hue"] if hue["applied"] else None)
    zoom = _find(replay, "ZoomOut")[0]
    canvas = ((zoom["params"]["left"], zoom["params"]["top"], zoom["params"]["out_w"], zoom["params"]["out_h"])
              if zoom["applied"] else (0, 0, WIDTH, HEIGHT))
    crop = tuple(_find(replay, "MinIoURandomCrop")[0]["params"]["crop"])
    return photo, GeometryParams(canvas, crop, _find(replay, "HorizontalFlip")[0]["applied"])


def _reference_draws(n: int, seed: int) -> list[tuple[PhotometricParams, GeometryParams]]:
    replay = A.ReplayCompose(reference_train_transforms(300)[:-3], bbox_params=_bbox_params())
    seed_transform(replay, seed)
    image = _image()
    return [_reference_draw(replay(image=image, bboxes=BOXES, labels=LABELS)["replay"]) for _ in range(n)]


def _ks_differs(a: list[float], b: list[float]) -> bool:
    """Two-sample Kolmogorov-Smirnov test at level 0.001: D > 1.95 sqrt((n + m) / (n m))."""
    a, b = np.sort(a), np.sort(b)
    grid = np.concatenate([a, b])
    d = np.abs(np.searchsorted(a, grid, side="right") / len(a) - np.searchsorted(b, grid, side="right") / len(b))
    return bool(d.max() > 1.95 * np.sqrt((len(a) + len(b)) / (len(a) * len(b))))


def _rate_differs(a: list[bool], b: list[bool]) -> bool:
    """Two-proportion z-test, |z| > 3.3 (level 0.001)."""
    pa, pb, pooled = np.mean(a), np.mean(b), np.mean(list(a) + list(b))
    se = np.sqrt(pooled * (1 - pooled) * (1 / len(a) + 1 / len(b)))
    return bool(se > 0 and abs(pa - pb) / se > 3.3) or (se == 0 and pa != pb)


def _summaries(draws: list[tuple[PhotometricParams, GeometryParams]]) -> dict[str, list]:
    """Every decision and drawn value of a list of draws, as flags and (conditional) values."""
    out: dict[str, list] = {}
    for photo, geom in draws:
        left, top, cw, ch = geom.canvas
        x1, y1, x2, y2 = geom.crop
        whole = geom.crop == (0, 0, cw, ch)
        kept = int(transform_boxes(BOXES, geom, 300)[1].sum())
        for name, value in [("brightness", photo.brightness), ("contrast", photo.contrast),
                            ("saturation", photo.saturation), ("hue", photo.hue)]:
            out.setdefault(f"{name} applied", []).append(value is not None)
            if value is not None:
                out.setdefault(f"{name} value", []).append(value)
        values = [("contrast first", photo.contrast_first), ("zoomed", cw != WIDTH or ch != HEIGHT),
                  ("whole canvas", whole), ("flipped", geom.flip), ("boxes kept", kept)]
        if cw != WIDTH or ch != HEIGHT:
            values += [("zoom ratio", cw / WIDTH), ("paste x", left / max(cw - WIDTH, 1))]
        if not whole:
            values += [("crop area", (x2 - x1) * (y2 - y1) / (cw * ch)), ("crop aspect", (y2 - y1) / (x2 - x1)),
                       ("crop centre x", (x1 + x2) / 2 / cw)]
        for name, value in values:
            out.setdefault(name, []).append(value)
    return out


def _differences(ours: dict[str, list], ref: dict[str, list]) -> list[str]:
    bad = []
    for name in ref:
        test = _rate_differs if isinstance(ref[name][0], (bool, np.bool_)) else _ks_differs
        if test(ours[name], ref[name]):
            bad.append(name)
    return bad


def test_parameter_distribution_matches_reference() -> None:
    n = 1500
    ref = _summaries(_reference_draws(n, seed=0))
    fast = SSDAugment(300, seed=1)
    ours = _summaries([fast.sample(HEIGHT, WIDTH, BOXES) for _ in range(n)])
    assert set(ours) == set(ref)
    assert _differences(ours, ref) == []
    # The test can fail: a zoom-out of p 0.6 instead of 0.5, or ratios up to 3 instead of 4, or
    # a flip of p 0.6, is detected by the same sample sizes.
    for changed in (dict(zoom_out_p=0.6), dict(max_zoom_out=3.0), dict(flip_p=0.6)):
        other = SSDAugment(300, AugmentSettings(**changed), seed=1)
        assert _differences(_summaries([other.sample(HEIGHT, WIDTH, BOXES) for _ in range(n)]), ref)


def test_same_draw_gives_the_reference_pixels_and_boxes() -> None:
    image = _image(1)
    replay = A.ReplayCompose(reference_train_transforms(300, output="uint8")[:-1], bbox_params=_bbox_params())
    seed_transform(replay, 3)
    diffs = []
    for _ in range(80):
        ref = replay(image=image, bboxes=BOXES, labels=LABELS)
        photo, geom = _reference_draw(ref["replay"])
        ours = render(image, False, 1, (HEIGHT, WIDTH), geom, photo, 300)
        diff = np.abs(ours.astype(int) - ref["image"].astype(int))
        # Same arithmetic, but warpAffine quantises positions to 1/32 pixel where resize does not.
        assert diff.max() <= 3, geom
        diffs.append(diff.mean())
        boxes, keep = transform_boxes(BOXES, geom, 300)
        np.testing.assert_allclose(boxes, np.asarray(ref["bboxes"]).reshape(-1, 4), atol=1e-3)
        assert LABELS[keep].tolist() == list(ref["labels"])
    assert np.mean(diffs) < 0.1


def test_photometric_steps_by_hand() -> None:
    img = np.array([[[100, 150, 200], [0, 255, 30]]], dtype=np.uint8)
    # Brightness +20.7, then contrast x1.5: floor(clip((v + 20.7)) ...) then floor(clip(v * 1.5)).
    out = apply_photometric(img, PhotometricParams(brightness=20.7, contrast=1.5, contrast_first=True))
    np.testing.assert_array_equal(out, [[[180, 255, 255], [30, 255, 75]]])
    # Saturation 0: the grey image (0.299 R + 0.587 G + 0.114 B), in every channel.
    grey = apply_photometric(img, PhotometricParams(saturation=0.0))
    np.testing.assert_array_equal(grey[0, 0], [141, 141, 141])
    # BGR input gives the BGR of the RGB result, for every step (the channel swap included).
    params = PhotometricParams(brightness=-7.0, contrast=0.8, contrast_first=False, saturation=1.3,
                               hue=0.03, channel_order=(2, 0, 1))
    rgb = _image(2)
    np.testing.assert_array_equal(apply_photometric(rgb[:, :, ::-1].copy(), params, bgr=True)[:, :, ::-1],
                                  apply_photometric(rgb, params))
    # The channel swap: output channel i is input channel order[i].
    swapped = apply_photometric(img, PhotometricParams(channel_order=(2, 0, 1)))
    np.testing.assert_array_equal(swapped[0, 0], [200, 100, 150])


def test_zoomed_crop_by_hand() -> None:
    # A 4x2 image on a 3x canvas at (4, 2); the crop (4, 2, 8, 4) is exactly the image, so the
    # output is the image resized, and the crop (2, 2, 10, 4) shows 2 px of fill on each side.
    image = np.arange(24, dtype=np.uint8).reshape(2, 4, 3) * 10
    exact = render(image, False, 1, (2, 4), GeometryParams((4, 2, 12, 6), (4, 2, 8, 4), False), None, 8)
    np.testing.assert_array_equal(exact, cv2.resize(image, (8, 8), interpolation=cv2.INTER_LINEAR))
    wide = render(image, False, 1, (2, 4), GeometryParams((4, 2, 12, 6), (2, 2, 10, 4), True), None, 8)
    fill = np.array(aug_mod.FILL_RGB, dtype=np.uint8)
    # Output column X samples canvas x = 2 + (X + 0.5): columns 0 and 7 are pure fill, columns
    # 2..5 the image's 4 columns mirrored (exact samples at pixel centres).
    assert (wide[:, 0] == fill).all() and (wide[:, 7] == fill).all()
    np.testing.assert_array_equal(wide[0, 2:6], image[0, ::-1])
    boxes, keep = transform_boxes(np.array([[0.0, 0.0, 2.0, 2.0]]), GeometryParams((4, 2, 12, 6), (2, 2, 10, 4),
                                                                                   True), 8)
    # Canvas (4, 2, 6, 4) -> crop (2, 0, 4, 2) -> x * 8 / 8, y * 8 / 2 -> mirrored in x.
    np.testing.assert_allclose(boxes, [[4.0, 0.0, 6.0, 8.0]])
    assert keep.tolist() == [True]


def test_uint8_output_normalises_to_the_float_output() -> None:
    image = _image(3)
    as_float = SSDAugment(300, seed=5)(image=image, bboxes=BOXES, labels=LABELS)
    as_uint8 = SSDAugment(300, seed=5, output="uint8")(image=image, bboxes=BOXES, labels=LABELS)
    assert as_uint8["image"].dtype == torch.uint8 and as_uint8["image"].shape == (3, 300, 300)
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    torch.testing.assert_close((as_uint8["image"].float() / 255 - mean) / std, as_float["image"])
    np.testing.assert_array_equal(as_uint8["bboxes"], as_float["bboxes"])


def test_eval_transform_backends_agree_and_decoding_matches_pil(tmp_path) -> None:
    image = _image(4)
    path = tmp_path / "a.jpg"
    Image.fromarray(image).save(path, quality=90)
    encoded = EncodedImage.from_file(path)
    pixels, bgr = encoded.decode(1)
    assert bgr and encoded.fast and (encoded.height, encoded.width) == (HEIGHT, WIDTH)
    np.testing.assert_array_equal(pixels[:, :, ::-1], load_rgb(path))
    ref = build_eval_transform(300, backend="albumentations")(image=load_rgb(path), bboxes=BOXES, labels=LABELS)
    fast = build_eval_transform(300)(image=encoded, bboxes=BOXES, labels=LABELS)
    torch.testing.assert_close(fast["image"], ref["image"])
    np.testing.assert_allclose(fast["bboxes"], ref["bboxes"], atol=1e-4)


def test_exif_orientation_is_ignored_like_pil(tmp_path) -> None:
    # Orientation 6 asks viewers to rotate; VOC boxes refer to the stored grid, as PIL loads it.
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    Image.fromarray(_image(5)).save(path, quality=95, exif=exif)
    pixels, _ = EncodedImage.from_file(path).decode(1)
    assert pixels.shape == (HEIGHT, WIDTH, 3)
    np.testing.assert_array_equal(pixels[:, :, ::-1], load_rgb(path))


def test_non_jpeg_files_decode_through_pil(tmp_path) -> None:
    rgba = np.dstack([_image(6), np.full((HEIGHT, WIDTH), 128, np.uint8)])
    path = tmp_path / "a.png"
    Image.fromarray(rgba, "RGBA").save(path)
    encoded = EncodedImage.from_file(path)
    pixels, bgr = encoded.decode(4)  # no reduced decode for PNG: full size, RGB
    assert not encoded.fast and not bgr and pixels.shape == (HEIGHT, WIDTH, 3)
    np.testing.assert_array_equal(pixels, load_rgb(path))
    out = SSDAugment(300, seed=0)(image=encoded, bboxes=BOXES, labels=LABELS)
    assert out["image"].shape == (3, 300, 300)
    with pytest.raises(OSError, match="cannot read image"):
        EncodedImage.from_file(tmp_path / "missing.jpg")


def test_truncated_jpeg_fails_as_with_pil(tmp_path) -> None:
    path = tmp_path / "t.jpg"
    Image.fromarray(_image(8)).save(path, quality=95)
    path.write_bytes(path.read_bytes()[:-300])  # OpenCV would fill the missing rows with grey
    encoded = EncodedImage.from_file(path)
    assert not encoded.fast
    with pytest.raises(OSError, match="t.jpg"):
        encoded.decode(1)


def test_huge_image_memory_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    # 8000x6000, zoomed out 4x and cropped to the whole canvas: the reference builds a
    # 32000x24000 canvas (2.3 GB); the fast path decodes at 1/8 scale (1000x750, 2.3 MB).
    y, x = np.mgrid[0:6000:8, 0:8000:8]
    small = np.stack([x % 256, y % 256, (x + y) % 256], -1).astype(np.uint8)
    big = cv2.resize(small, (8000, 6000), interpolation=cv2.INTER_NEAREST)
    data = cv2.imencode(".jpg", big, [cv2.IMWRITE_JPEG_QUALITY, 80])[1].tobytes()
    del big, small
    encoded = EncodedImage(data, 6000, 8000, "<huge>.jpg", fast=True)
    geom = GeometryParams((12000, 9000, 32000, 24000), (0, 0, 32000, 24000), False)
    monkeypatch.setattr(SSDAugment, "sample", lambda self, h, w, b: (PhotometricParams(hue=0.02), geom))
    for reduced, limit_mb in ((True, 20), (False, 100)):
        tracemalloc.start()
        out = SSDAugment(300, reduced_decode=reduced)(image=encoded, bboxes=np.array([[0, 0, 8000, 6000]]),
                                                      labels=[1])
        peak_mb = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
        # Full decode: 8000 * 6000 * 3 bytes = 137 MiB at least; 1/8: 2.1 MiB plus the distortion.
        assert (peak_mb < limit_mb) == reduced, peak_mb
        np.testing.assert_allclose(out["bboxes"], [[112.5, 112.5, 187.5, 187.5]])
        assert out["image"].shape == (3, 300, 300)


def test_set_random_state_makes_draws_reproducible() -> None:
    import random

    a, b = SSDAugment(300), SSDAugment(300)
    a.set_random_state(np.random.default_rng(7), random.Random(7))
    b.set_random_state(np.random.default_rng(7), random.Random(7))
    image = _image(7)
    for _ in range(5):
        oa, ob = a(image=image, bboxes=BOXES, labels=LABELS), b(image=image, bboxes=BOXES, labels=LABELS)
        torch.testing.assert_close(oa["image"], ob["image"])
        assert a.last_params == b.last_params


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="output"):
        SSDAugment(300, output="half")
    with pytest.raises(ValueError, match="backend"):
        build_eval_transform(300, backend="torchvision")
    with pytest.raises(ValueError, match="uint8 RGB array"):
        SSDAugment(300)(image=np.zeros((4, 4), np.uint8), bboxes=np.zeros((0, 4)), labels=[])
    with pytest.raises(ValueError, match="reduction"):
        EncodedImage(b"", 1, 1, "x", True).decode(3)
