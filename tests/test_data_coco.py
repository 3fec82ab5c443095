"""COCO-format datasets (ssd_da/data/coco.py) on trees built here: boxes, class names from
categories, crowd and empty images, missing images, malformed JSON, and evaluation with crowd
regions worked out by hand (VOC 11-point and pycocotools)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ssd_da.config import load_config
from ssd_da.data.coco import CocoDetection, UnknownCategoryError, coco_class_names
from ssd_da.data.voc import AnnotationError
from ssd_da.engine.loaders import build_datasets, class_names_from_config
from ssd_da.engine.inference import coco_metrics_of, format_coco
from ssd_da.evaluation.voc import evaluate_voc

# Category ids out of order and not contiguous, as exported datasets often have them.
CATEGORIES = [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}]


def write_coco(root: Path, split: str, images: list[dict], anns: list[dict],
               categories: list[dict] = CATEGORIES, missing: tuple[str, ...] = ()) -> Path:
    """DIR/annotations/instances_<split>.json and an image file per record (but ``missing``)."""
    (root / split).mkdir(parents=True, exist_ok=True)
    for rec in images:
        if rec["file_name"] not in missing:
            Image.new("RGB", (rec.get("width", 40), rec.get("height", 30)), (90, 120, 60)).save(
                root / split / rec["file_name"])
    for k, ann in enumerate(anns, start=1):
        ann.setdefault("id", k)
    path = root / "annotations" / f"instances_{split}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": categories}))
    return path


def _sample_tree(root: Path, missing: tuple[str, ...] = ()) -> Path:
    images = [{"id": 10, "file_name": "a.jpg", "width": 40, "height": 30},
              {"id": 11, "file_name": "b.png", "width": 40, "height": 30},   # no annotations
              {"id": 12, "file_name": "c.jpg", "width": 40, "height": 30}]
    anns = [{"image_id": 10, "category_id": 7, "bbox": [5, 6, 10, 8]},
            {"image_id": 10, "category_id": 3, "bbox": [0, 0, 20, 20], "iscrowd": 1},
            {"image_id": 10, "category_id": 7, "bbox": [35, 25, 10, 10]},     # past the edge
            {"image_id": 10, "category_id": 3, "bbox": [3, 3, 0, 5]},         # zero width
            {"image_id": 12, "category_id": 3, "bbox": [1.5, 2, 4, 4.25]}]
    return write_coco(root, "val", images, anns, missing=missing)


def test_boxes_labels_crowd_and_empty_images(tmp_path: Path,
                                             caplog: pytest.LogCaptureFixture) -> None:
    _sample_tree(tmp_path)
    with caplog.at_level("WARNING", logger="ssd_da.data.coco"):
        ds = CocoDetection(tmp_path, "val")
    # The one non-crowd box without area is named as the JSON writes it (record id 4, x y w h).
    warned = [r.getMessage() for r in caplog.records if "no area" in r.getMessage()]
    assert len(warned) == 1 and "annotation id 4 (category_id 3, bbox [3, 3, 0, 5])" in warned[0]
    assert ds.class_names == ("cat", "dog")  # the categories' names in id order (3, 7)
    assert ds.cat_ids == [3, 7] and ds.coco_ids == [10, 11, 12] and len(ds) == 3
    a = ds.get_annotation(0)
    # Training view: [x, y, x + w, y + h], clipped to 0..W-1 / 0..H-1; crowd and zero-area out.
    np.testing.assert_array_equal(a.boxes, [[5, 6, 15, 14], [35, 25, 39, 29]])
    np.testing.assert_array_equal(a.labels, [2, 2])
    # Evaluation view: every box as written; the crowd one flagged (ignored like VOC difficult).
    gt = a.ground_truth()
    np.testing.assert_array_equal(gt["boxes"], [[5, 6, 15, 14], [0, 0, 20, 20], [35, 25, 45, 35], [3, 3, 3, 8]])
    np.testing.assert_array_equal(gt["labels"], [2, 1, 2, 1])
    np.testing.assert_array_equal(gt["difficult"], [False, True, False, False])
    # The empty image is kept: a background-only sample.
    image, target = ds[1]
    assert image.shape == (3, 30, 40) and target["boxes"].shape == (0, 4) and target["image_id"] == "11"
    _, target = ds[2]
    np.testing.assert_allclose(target["boxes"].numpy(), [[1.5, 2, 5.5, 6.25]])
    assert target["labels"].tolist() == [1]


def test_class_list_selects_categories(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    json_path = _sample_tree(tmp_path)
    # The other category's objects are an error unless left out on purpose (as for VOC).
    with pytest.raises(UnknownCategoryError, match=rf"{json_path} has objects of categories not in "
                                                   r"the class list \[dog\]: 'cat' x3 \(e.g. a.jpg\)"):
        CocoDetection(tmp_path, "val", class_names=["dog"])
    ds = CocoDetection(tmp_path, "val", class_names=["dog"], ignore_other_classes=True)
    assert ds.cat_ids == [7] and [len(a.labels) for a in ds.annotations] == [2, 0, 0]
    assert ds.other_class_counts == {"cat": 3} and "left out 3 object(s)" in caplog.text
    with pytest.raises(ValueError, match=r"categories: cat, dog"):
        CocoDetection(tmp_path, "val", class_names=["dog", "horse"])
    assert coco_class_names(tmp_path, "val") == ["cat", "dog"]


def test_missing_image_is_an_error_or_skipped(tmp_path: Path) -> None:
    json_path = _sample_tree(tmp_path, missing=("c.jpg",))
    with pytest.raises(FileNotFoundError, match=rf"c.jpg \(id 12, listed in {json_path}\) not found"):
        CocoDetection(tmp_path, "val")
    ds = CocoDetection(tmp_path, "val", skip_bad=True)
    assert ds.coco_ids == [10, 11] and ds.num_skipped == 1


def test_missing_split_lists_the_splits(tmp_path: Path) -> None:
    _sample_tree(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"instances_train2017.json not found; splits in .*: val"):
        CocoDetection(tmp_path, "train2017")


@pytest.mark.parametrize("change, message", [
    (lambda d: d["annotations"][0].pop("bbox"), r"annotations\[0\] lacks 'bbox'"),
    (lambda d: d["annotations"][0].update(bbox=[1, 2, -3, 4]), r"annotations\[0\] \(id 1\) bbox must be"),
    (lambda d: d["annotations"][0].update(category_id=99), r"category_id 99, which is not in 'categories'"),
    (lambda d: d["images"].append(dict(d["images"][0])), r"images ids are not unique \(e.g. \[10\]\)"),
    (lambda d: d.pop("categories"), r"'categories' is missing or not a list"),
])
def test_malformed_json_names_the_record(tmp_path: Path, change, message: str) -> None:
    path = _sample_tree(tmp_path)
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    with pytest.raises(AnnotationError, match=message):
        CocoDetection(tmp_path, "val")
    path.write_text("{not json")
    with pytest.raises(AnnotationError, match="not valid JSON"):
        CocoDetection(tmp_path, "val")


def _crowd_case(root: Path) -> CocoDetection:
    """One 60x40 image: a dog [5, 6, 10, 8] (xywh) and a crowd region of dogs [20, 10, 15, 15]."""
    write_coco(root, "val", [{"id": 1, "file_name": "a.jpg", "width": 60, "height": 40}],
               [{"image_id": 1, "category_id": 7, "bbox": [5, 6, 10, 8]},
                {"image_id": 1, "category_id": 7, "bbox": [20, 10, 15, 15], "iscrowd": 1}])
    return CocoDetection(root, "val")


def test_crowd_regions_in_evaluation(tmp_path: Path) -> None:
    ds = _crowd_case(tmp_path)
    # Scores: far-away false positive 0.95, a detection on the crowd 0.92, the dog 0.90.
    dets = [{"boxes": np.array([[40, 30, 43, 33], [20, 10, 35, 25], [5, 6, 15, 14]], np.float64),
             "scores": np.array([0.95, 0.92, 0.90]), "labels": np.array([2, 2, 2])}]
    # VOC 11-point: the crowd detection is neither TP nor FP and the crowd is no miss, so the
    # ranked list is FP, TP: recall 1 at precision 1/2 -> AP 0.5. (Were the crowd an FP,
    # precision would be 1/3; were it a missed object, recall would stop at 1/2: AP 6/11 * 1/2.)
    voc = evaluate_voc(dets, [ds.get_annotation(0).ground_truth()], list(ds.class_names))
    assert voc.ap["dog"] == pytest.approx(0.5) and math.isnan(voc.ap["cat"])
    # pycocotools on the JSON itself: the crowd match is ignored at every IoU threshold; the
    # same FP, TP list gives precision 1/2 at all 101 recall points; only small objects exist.
    coco = coco_metrics_of(ds, dets)
    for key in ("AP", "AP50", "AP75", "AP_small"):
        assert coco[key] == pytest.approx(0.5)
    assert math.isnan(coco["AP_medium"]) and math.isnan(coco["AP_large"])
    assert format_coco(coco).startswith("AP 50.00  AP50 50.00  AP75 50.00  APs 50.00  APm nan")


def test_config_reads_coco_class_names_and_datasets(tmp_path: Path) -> None:
    _sample_tree(tmp_path)
    cfg = load_config(None, ["data_format=coco", f"data_root={tmp_path}", "train_split=val",
                             "test_split=val"])
    assert class_names_from_config(cfg) == ["cat", "dog"]
    train, test = build_datasets(cfg)
    assert isinstance(train, CocoDetection) and len(train) == len(test) == 3
    image, target = train[0]
    assert image.shape == (3, 300, 300)
    with pytest.raises(ValueError, match="data_format 'yolo' is not one of: voc, coco"):
        build_datasets(load_config(None, ["data_format=yolo"]))
