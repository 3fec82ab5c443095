"""VOC parsing, splits and the VOCDetection dataset, on small synthetic trees and on BCCD."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ssd_da.data.transforms import build_eval_transform, build_train_transform
from ssd_da.data.voc import (
    SPLITS, VOC_CLASSES, AnnotationError, MissingSizeError, VOCDetection, detection_collate,
    parse_annotation, resolve_split,
)

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("cat", "dog", "person")


def _obj(name: str, box: tuple, difficult: int | None = 0, extra: str = "") -> str:
    diff = "" if difficult is None else f"<difficult>{difficult}</difficult>"
    coords = "".join(f"<{t}>{v}</{t}>" for t, v in zip(("xmin", "ymin", "xmax", "ymax"), box))
    return f"<object><name>{name}</name><pose>Left</pose>{diff}<bndbox>{coords}</bndbox>{extra}</object>"


def _xml(objects: list[str], width: int | None = 40, height: int | None = 30, filename: str = "") -> str:
    size = "" if width is None else f"<size><width>{width}</width><height>{height}</height><depth>3</depth></size>"
    return f"<annotation><filename>{filename}</filename>{size}{''.join(objects)}</annotation>"


def _write_sample(year_dir: Path, image_id: str, xml: str, image: Image.Image | None, ext: str = ".jpg") -> None:
    (year_dir / "Annotations").mkdir(parents=True, exist_ok=True)
    (year_dir / "JPEGImages").mkdir(parents=True, exist_ok=True)
    (year_dir / "Annotations" / f"{image_id}.xml").write_text(xml)
    if image is not None:
        image.save(year_dir / "JPEGImages" / f"{image_id}{ext}")


def _write_set(year_dir: Path, name: str, ids: list[str]) -> None:
    (year_dir / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    (year_dir / "ImageSets" / "Main" / f"{name}.txt").write_text("".join(i + "\n" for i in ids))


def _rgb(width: int = 40, height: int = 30, colour: tuple = (10, 200, 30)) -> Image.Image:
    return Image.new("RGB", (width, height), colour)


# ---------------------------------------------------------------- parse_annotation

def test_parse_hand_values_parts_difficult_unknown_and_clipping(tmp_path: Path) -> None:
    head = "<part><name>head</name><bndbox><xmin>3</xmin><ymin>3</ymin><xmax>5</xmax><ymax>5</ymax></bndbox></part>"
    xml = _xml([
        _obj("person", (11, 6, 21, 26), 0, extra=head),  # the <part> must not become an object
        _obj("dog", (1, 1, 40, 30), 1),                  # the whole image, difficult
        _obj("cat", (31, 21, 55, 45), None),             # no <difficult> tag -> 0; clipped to the image
        _obj("unicorn", (2, 2, 9, 9), 0),                # class not in class_names -> skipped
    ], filename="a.jpg")
    path = tmp_path / "000001.xml"
    path.write_text(xml)
    ann = parse_annotation(path, CLASSES)
    # 0-based = XML - 1; the cat's (55, 45) clips to (w - 1, h - 1) = (39, 29).
    np.testing.assert_array_equal(ann.boxes, np.array(
        [[10, 5, 20, 25], [0, 0, 39, 29], [30, 20, 39, 29]], dtype=np.float32))
    assert ann.boxes.dtype == np.float32
    np.testing.assert_array_equal(ann.labels, [3, 2, 1])  # person, dog, cat in CLASSES order, 1-based
    assert ann.labels.dtype == np.int64
    np.testing.assert_array_equal(ann.difficult, [False, True, False])
    assert ann.difficult.dtype == np.bool_
    assert (ann.width, ann.height, ann.filename, ann.image_id) == (40, 30, "a.jpg", "000001")


def test_degenerate_boxes_dropped_with_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "degen.xml"
    path.write_text(_xml([_obj("cat", (5, 5, 5, 9)), _obj("dog", (9, 5, 4, 9)), _obj("dog", (2, 2, 8, 8))]))
    with caplog.at_level(logging.WARNING, logger="ssd_da.data.voc"):
        ann = parse_annotation(path, CLASSES)
    np.testing.assert_array_equal(ann.boxes, [[1, 1, 7, 7]])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert all(str(path) in w for w in warnings)
    assert "object #1 (cat)" in warnings[0] and "object #2 (dog)" in warnings[1]
    # Evaluation sees every object as written, as the devkit does: (5, 5, 5, 9) is a 1-pixel-wide
    # box in the devkit's inclusive convention, and the inverted dog is an object it cannot match.
    gt = ann.ground_truth()
    np.testing.assert_array_equal(gt["boxes"], [[4, 4, 4, 8], [8, 4, 3, 8], [1, 1, 7, 7]])
    np.testing.assert_array_equal(gt["labels"], [1, 2, 2])
    np.testing.assert_array_equal(gt["difficult"], [False, False, False])
    # The inverted dog counts as a dog nobody can find: an exact detection of the other dog
    # reaches recall 1/2 at precision 1, so 11-point AP = 6/11 (t = 0, 0.1, ..., 0.5).
    from ssd_da.evaluation.voc import evaluate_voc

    # The second detection overlaps the real dog at IoU 24 / 65 < 0.5 and nothing else: an FP.
    dets = [{"boxes": np.array([[1, 1, 7, 7], [2, 4, 9, 8]], np.float32),
             "scores": np.array([0.9, 0.8]), "labels": np.array([2, 2])}]
    assert evaluate_voc(dets, [gt], CLASSES).ap["dog"] == pytest.approx(6 / 11)


def test_devkit_ground_truth_changes_ap_like_the_devkit(tmp_path: Path) -> None:
    from ssd_da.evaluation.voc import evaluate_voc

    path = tmp_path / "thin.xml"
    path.write_text(_xml([_obj("cat", (5, 5, 5, 9)), _obj("cat", (12, 2, 30, 28))]))
    ann = parse_annotation(path, CLASSES)
    assert len(ann.boxes) == 1  # training drops the zero-area box
    dets = [{"boxes": np.array([[4, 4, 4, 8], [11, 1, 29, 27]], np.float32),
             "scores": np.array([0.9, 0.8]), "labels": np.array([1, 1])}]
    # Both detections match exactly: the devkit's AP is 1; with the 1-pixel box dropped the first
    # detection would be a false positive (precision 1/2 at full recall, 11-point AP 0.5).
    assert evaluate_voc(dets, [ann.ground_truth()], CLASSES).ap["cat"] == pytest.approx(1.0)
    training_view = {"boxes": ann.boxes, "labels": ann.labels, "difficult": ann.difficult}
    assert evaluate_voc(dets, [training_view], CLASSES).ap["cat"] == pytest.approx(0.5)


def test_box_outside_image_is_dropped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "out.xml"
    path.write_text(_xml([_obj("cat", (45, 5, 60, 9)), _obj("cat", (2, 2, 8, 8))]))  # image is 40 wide
    with caplog.at_level(logging.WARNING, logger="ssd_da.data.voc"):
        ann = parse_annotation(path, CLASSES)
    np.testing.assert_array_equal(ann.boxes, [[1, 1, 7, 7]])
    assert any("outside" in r.getMessage() and str(path) in r.getMessage() for r in caplog.records)
    # The devkit neither clips nor drops: evaluation keeps the box as written.
    np.testing.assert_array_equal(ann.ground_truth()["boxes"], [[44, 4, 59, 8], [1, 1, 7, 7]])
    clean = tmp_path / "clean.xml"
    clean.write_text(_xml([_obj("cat", (2, 2, 8, 8))]))
    assert parse_annotation(clean, CLASSES).devkit is None  # no second copy when nothing changed


@pytest.mark.parametrize("xml, fragment", [
    ("<annotation><object><name>cat</name>", "malformed XML"),
    (_xml([_obj("cat", (1, 2, 3, 4)).replace("<xmax>3</xmax>", "")]), "<xmax>"),
    (_xml([_obj("cat", (1, "abc", 3, 4))]), "not a number: 'abc'"),
    (_xml(["<object><name>cat</name></object>"]), "no <bndbox>"),
])
def test_malformed_xml_raises_naming_file(tmp_path: Path, xml: str, fragment: str) -> None:
    path = tmp_path / "bad.xml"
    path.write_text(xml)
    with pytest.raises(AnnotationError) as info:
        parse_annotation(path, CLASSES)
    assert str(path) in str(info.value) and fragment in str(info.value)
    assert isinstance(info.value, ValueError)


def test_missing_size_needs_image_size(tmp_path: Path) -> None:
    path = tmp_path / "nosize.xml"
    path.write_text(_xml([_obj("cat", (2, 2, 50, 50))], width=0, height=0))
    with pytest.raises(MissingSizeError, match="nosize.xml"):
        parse_annotation(path, CLASSES)
    ann = parse_annotation(path, CLASSES, image_size=(20, 25))  # (height, width)
    np.testing.assert_array_equal(ann.boxes, [[1, 1, 24, 19]])
    assert (ann.height, ann.width) == (20, 25)


# ---------------------------------------------------------------- splits

@pytest.fixture()
def devkit(tmp_path: Path) -> Path:
    """VOC2007 trainval (3 ids, one with a difficult object) + test (1), VOC2012 trainval (2)."""
    root = tmp_path / "VOCdevkit"
    v07, v12 = root / "VOC2007", root / "VOC2012"
    _write_sample(v07, "07_a", _xml([_obj("cat", (1, 1, 10, 10)), _obj("dog", (5, 5, 20, 20), 1)]), _rgb())
    _write_sample(v07, "07_b", _xml([_obj("person", (2, 3, 30, 25))]), _rgb())
    _write_sample(v07, "07_c", _xml([_obj("dog", (3, 3, 8, 8))]), _rgb())
    _write_sample(v07, "07_t", _xml([_obj("cat", (3, 3, 8, 8))]), _rgb())
    _write_sample(v12, "12_a", _xml([_obj("cat", (1, 1, 10, 10))]), _rgb())
    _write_sample(v12, "12_b", _xml([_obj("cat", (1, 1, 12, 10))]), _rgb())
    _write_set(v07, "trainval", ["07_a", "07_b", "07_c"])
    _write_set(v07, "test", ["07_t"])
    _write_set(v12, "trainval", ["12_a", "12_b"])
    return root


def test_split_union_concatenates_in_order(devkit: Path) -> None:
    items = resolve_split(devkit, "voc07_trainval+voc12_trainval")
    assert items == [(devkit / "VOC2007", "07_a"), (devkit / "VOC2007", "07_b"), (devkit / "VOC2007", "07_c"),
                     (devkit / "VOC2012", "12_a"), (devkit / "VOC2012", "12_b")]
    ds = VOCDetection(devkit, "voc07_trainval+voc12_trainval", CLASSES)
    assert [ds.get_annotation(i).image_id for i in range(len(ds))] == ["07_a", "07_b", "07_c", "12_a", "12_b"]


def test_split_errors(devkit: Path) -> None:
    with pytest.raises(ValueError) as info:
        resolve_split(devkit, "voc07_trainval+voc2012")
    assert "'voc2012'" in str(info.value) and all(name in str(info.value) for name in SPLITS)
    with pytest.raises(FileNotFoundError, match=re.escape(str(devkit / "VOC2012" / "ImageSets/Main/val.txt"))):
        resolve_split(devkit, "voc12_val")
    (devkit / "VOC2012" / "ImageSets/Main/trainval.txt").rename(devkit / "elsewhere.txt")
    with pytest.raises(FileNotFoundError, match="trainval.txt"):
        resolve_split(devkit, "voc12_trainval")
    with pytest.raises(FileNotFoundError, match=re.escape(str(devkit / "VOC2012" / "VOC2007"))):
        resolve_split(devkit / "VOC2012", "voc07_test")  # a year folder is not a VOCdevkit


# ---------------------------------------------------------------- dataset

def test_difficult_kept_for_eval_dropped_from_training(devkit: Path) -> None:
    ds = VOCDetection(devkit, "voc07_trainval", CLASSES)
    image, target = ds[0]
    np.testing.assert_array_equal(target["labels"].numpy(), [1])  # the difficult dog is left out
    torch.testing.assert_close(target["boxes"], torch.tensor([[0.0, 0.0, 9.0, 9.0]]))
    ann = ds.get_annotation(0)
    np.testing.assert_array_equal(ann.labels, [1, 2])
    np.testing.assert_array_equal(ann.difficult, [False, True])
    _, target = VOCDetection(devkit, "voc07_trainval", CLASSES, keep_difficult=True)[0]
    np.testing.assert_array_equal(target["labels"].numpy(), [1, 2])


def test_item_without_transform(devkit: Path) -> None:
    ds = VOCDetection(devkit, "voc07_trainval", CLASSES)
    assert len(ds) == 3
    image, target = ds[1]
    assert image.shape == (3, 30, 40) and image.dtype == torch.float32
    # A solid (10, 200, 30) JPEG decodes to within a few levels of that colour.
    torch.testing.assert_close(image[:, 15, 20], torch.tensor([10, 200, 30]) / 255.0, atol=4 / 255, rtol=0)
    assert target["image_id"] == "07_b" and target["orig_size"] == (30, 40) and target["index"] == 1
    assert target["boxes"].dtype == torch.float32 and target["labels"].dtype == torch.int64
    torch.testing.assert_close(target["boxes"], torch.tensor([[1.0, 2.0, 29.0, 24.0]]))


def test_item_with_eval_transform_scales_boxes(devkit: Path) -> None:
    ds = VOCDetection(devkit, "voc07_trainval", CLASSES, transform=build_eval_transform(300))
    image, target = ds[1]
    assert image.shape == (3, 300, 300)
    # 40x30 -> 300x300: x * 7.5, y * 10.
    torch.testing.assert_close(target["boxes"], torch.tensor([[7.5, 20.0, 217.5, 240.0]]))
    assert target["orig_size"] == (30, 40)


@pytest.mark.parametrize("mode, ext", [("L", ".jpg"), ("CMYK", ".jpg"), ("P", ".png"), ("RGBA", ".png")])
def test_image_modes_load_as_rgb(tmp_path: Path, mode: str, ext: str) -> None:
    year = tmp_path / "VOCdevkit" / "VOC2007"
    if mode == "L":
        image, expected = Image.new("L", (16, 12), 90), (90, 90, 90)
    elif mode == "CMYK":
        image, expected = Image.new("CMYK", (16, 12), (0, 255, 255, 0)), (255, 0, 0)
    elif mode == "P":
        image = Image.new("P", (16, 12), 1)
        image.putpalette([0, 0, 0, 20, 120, 220] + [0] * 762)
        image.info["transparency"] = 0
        expected = (20, 120, 220)
    else:
        image, expected = Image.new("RGBA", (16, 12), (200, 100, 50, 128)), (200, 100, 50)
    _write_sample(year, "x", _xml([_obj("cat", (2, 2, 8, 8))], 16, 12, filename=f"x{ext}"), image, ext=ext)
    _write_set(year, "test", ["x"])
    image_t, target = VOCDetection(tmp_path / "VOCdevkit", "voc07_test", CLASSES)[0]
    assert image_t.shape == (3, 12, 16)
    atol = 6 / 255 if ext == ".jpg" else 0.0  # JPEG is lossy, PNG exact
    torch.testing.assert_close(image_t[:, 6, 8], torch.tensor(expected) / 255.0, atol=atol, rtol=0)


def test_missing_size_reads_real_image_size(tmp_path: Path) -> None:
    year = tmp_path / "VOCdevkit" / "VOC2007"
    _write_sample(year, "s", _xml([_obj("cat", (2, 2, 99, 99))], width=None), _rgb(25, 20))
    _write_set(year, "test", ["s"])
    ds = VOCDetection(tmp_path / "VOCdevkit", "voc07_test", CLASSES)
    np.testing.assert_array_equal(ds.get_annotation(0).boxes, [[1, 1, 24, 19]])


def test_unreadable_image_needed_for_size(tmp_path: Path) -> None:
    year = tmp_path / "VOCdevkit" / "VOC2007"
    _write_sample(year, "ok", _xml([_obj("cat", (2, 2, 8, 8))]), _rgb())
    _write_sample(year, "bad", _xml([_obj("cat", (2, 2, 8, 8))], width=None), None)
    (year / "JPEGImages" / "bad.jpg").write_bytes(b"not a jpeg")
    _write_set(year, "test", ["ok", "bad"])
    with pytest.raises(OSError, match=r"cannot read image .*bad\.jpg .*bad\.xml lacks"):
        VOCDetection(tmp_path / "VOCdevkit", "voc07_test", CLASSES)
    ds = VOCDetection(tmp_path / "VOCdevkit", "voc07_test", CLASSES, skip_bad=True)
    assert ds.num_skipped == 1 and [a.image_id for a in ds.annotations] == ["ok"]


def test_missing_image_and_bad_xml_raise_or_are_skipped(devkit: Path, caplog: pytest.LogCaptureFixture) -> None:
    v07 = devkit / "VOC2007"
    (v07 / "JPEGImages" / "07_b.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(v07 / "JPEGImages" / "07_b.jpg"))):
        VOCDetection(devkit, "voc07_trainval", CLASSES)
    (v07 / "Annotations" / "07_c.xml").write_text("<annotation><object>")
    with caplog.at_level(logging.WARNING, logger="ssd_da.data.voc"):
        ds = VOCDetection(devkit, "voc07_trainval", CLASSES, skip_bad=True)
    assert ds.num_skipped == 2 and len(ds) == 1 and ds.get_annotation(0).image_id == "07_a"
    messages = [r.getMessage() for r in caplog.records]
    assert any("07_b.jpg" in m for m in messages) and any("07_c.xml" in m for m in messages)
    assert any("skipped 2 bad samples of 3" in m for m in messages)
    _rgb().save(v07 / "JPEGImages" / "07_b.jpg")  # restore the image: only the bad XML remains
    with pytest.raises(AnnotationError, match="07_c.xml"):
        VOCDetection(devkit, "voc07_trainval", CLASSES)


def test_detection_collate(devkit: Path) -> None:
    ds = VOCDetection(devkit, "voc07_trainval+voc12_trainval", CLASSES, transform=build_eval_transform(64))
    images, targets = detection_collate([ds[0], ds[4]])
    assert images.shape == (2, 3, 64, 64)
    assert [t["image_id"] for t in targets] == ["07_a", "12_b"]
    raw = VOCDetection(devkit, "voc07_trainval", CLASSES)
    with pytest.raises(ValueError, match="share one shape"):
        detection_collate([raw[0], (torch.zeros(3, 5, 5), {})])


def test_training_loader_augments_per_sample_whatever_the_workers(tmp_path: Path) -> None:
    """The same image twice in one batch gets two different augmentations (each sample has its
    own seed, so forked workers do not repeat each other), and 0 or 2 workers give the same
    batch (the seeds depend on the sample, not on the worker)."""
    from ssd_da.config import load_config
    from ssd_da.engine.loaders import build_train_loader

    year = tmp_path / "VOCdevkit" / "VOC2007"
    noise = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    for image_id in ("n1", "n2"):  # the same picture twice: worker 0 gets item 0, worker 1 item 1
        _write_sample(year, image_id, _xml([_obj("cat", (5, 5, 30, 30))], 50, 40), Image.fromarray(noise),
                      ext=".png")
    _write_set(year, "trainval", ["n1", "n2"])
    ds = VOCDetection(tmp_path / "VOCdevkit", "voc07_trainval", CLASSES, transform=build_train_transform(32))

    def first_batch(workers: int) -> torch.Tensor:
        cfg = load_config(None, ["batch_size=2", "iters=1", f"workers={workers}"])
        return next(iter(build_train_loader(ds, cfg, 0, 0, 1, pin_memory=False)))[0]

    two = first_batch(2)
    assert not torch.equal(two[0], two[1])
    torch.testing.assert_close(first_batch(0), two, rtol=0, atol=0)


# ---------------------------------------------------------------- BCCD (real LabelImg XML)

def _bccd_root() -> Path:
    """The BCCD copy bundled in the repository (datasets/bccd); a missing copy is a failure."""
    devkit = REPO / "datasets" / "bccd" / "VOCdevkit"
    assert (devkit / "VOC2007" / "Annotations").is_dir(), f"bundled BCCD data missing at {devkit}"
    return devkit


def _regex_counts(devkit: Path, set_name: str, classes: tuple[str, ...]) -> np.ndarray:
    """Per-class object counts by regex, independent of ElementTree: <name> per <object> block,
    leaving out boxes with xmax <= xmin or ymax <= ymin."""
    counts = np.zeros(len(classes), dtype=np.int64)
    ids = (devkit / "VOC2007/ImageSets/Main" / f"{set_name}.txt").read_text().split()
    for image_id in ids:
        text = (devkit / "VOC2007/Annotations" / f"{image_id}.xml").read_text()
        for block in re.findall(r"<object>(.*?)</object>", text, flags=re.S):
            name = re.search(r"<name>\s*(.*?)\s*</name>", block).group(1)
            x1, y1, x2, y2 = (float(re.search(fr"<{t}>\s*([-\d.]+)\s*</{t}>", block).group(1))
                              for t in ("xmin", "ymin", "xmax", "ymax"))
            if x2 > x1 and y2 > y1:
                counts[classes.index(name)] += 1
    return counts


def test_bccd_counts_and_zero_area_boxes(caplog: pytest.LogCaptureFixture) -> None:
    devkit = _bccd_root()
    classes = ("RBC", "WBC", "Platelets")
    totals = np.zeros(3, dtype=np.int64)
    # Objects per class (RBC, WBC, Platelets) used for training (an independent regex count over the
    # XML text, _regex_counts, agrees; the per-split sums add up to the README's 4,888 - 2). The
    # two zero-area boxes are both RBCs in trainval, and evaluation keeps them (3350 RBCs).
    expected = {"trainval": [3348, 301, 292], "test": [805, 71, 69]}
    for split, set_name, size in (("voc07_trainval", "trainval", 292), ("voc07_test", "test", 72)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="ssd_da.data.voc"):
            ds = VOCDetection(devkit, split, classes, keep_difficult=True)
        assert len(ds) == size and ds.num_skipped == 0
        labels = np.concatenate([ds.get_annotation(i).labels for i in range(len(ds))])
        counts = np.bincount(labels, minlength=4)[1:]
        np.testing.assert_array_equal(counts, expected[set_name])
        np.testing.assert_array_equal(counts, _regex_counts(devkit, set_name, classes))
        totals += counts
        warned = sorted(r.getMessage().split("/")[-1].split(":")[0] for r in caplog.records)
        # Both zero-area boxes (00338: 504,337,504,337; 00343: 181,329,181,329) are in trainval.
        assert warned == (["BloodImage_00338.xml", "BloodImage_00343.xml"] if set_name == "trainval" else [])
        gt_total = sum(len(ds.get_annotation(i).ground_truth()["labels"]) for i in range(len(ds)))
        assert gt_total == len(labels) + len(warned)  # evaluation keeps them, as the devkit does
    # The BCCD README counts 4,888 boxes in all 364 images; two of them have zero area.
    assert totals.sum() == 4888 - 2
