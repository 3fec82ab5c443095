"""tools/eval_voc.py: detection files, outputs, and clear errors (no model needed)."""
from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from ssd_da.cli import eval_voc

from ssd_da.data.demo import DEMO_CLASSES, ensure_demo_dataset
from ssd_da.evaluation.detection_file import detections_to_records, load_detection_file


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("evaldemo")
    ensure_demo_dataset(root, num_train=4, num_test=12, seed=5)
    return root / "VOCdevkit"


def gt_records(devkit: Path) -> list[dict]:
    """Every test-split object as a perfect detection, in XML (1-based) coordinates."""
    ids = (devkit / "VOC2007/ImageSets/Main/test.txt").read_text().split()
    recs = []
    for img in ids:
        root = ET.parse(devkit / f"VOC2007/Annotations/{img}.xml").getroot()
        for obj in root.findall("object"):
            bb = obj.find("bndbox")
            box = [float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")]
            recs.append({"image_id": img, "label": obj.findtext("name"), "score": 0.9,
                         "bbox": box, "difficult": obj.findtext("difficult") == "1"})
    return recs


def run(args: list[str]) -> int:
    return eval_voc.main(args)


def common(devkit: Path) -> list[str]:
    return ["--data-root", str(devkit), "--split", "voc07_test", "--classes", ",".join(DEMO_CLASSES)]


def test_perfect_detections_then_one_missing(demo_root, tmp_path, capsys):
    recs = gt_records(demo_root)
    dets = tmp_path / "dets.json"
    dets.write_text(json.dumps([{k: r[k] for k in ("image_id", "label", "score", "bbox")} for r in recs]))
    out_json = tmp_path / "res.json"
    assert run(["--detections", str(dets), *common(demo_root), "--json", str(out_json),
                "--plots", str(tmp_path / "plots")]) == 0
    res = json.loads(out_json.read_text())
    assert res["metric"] == "voc07" and res["num_images"] == 12
    present = {r["label"] for r in recs if not r["difficult"]}
    for cls in present:
        assert res["ap"][cls] == pytest.approx(1.0)
    assert res["map"] == pytest.approx(1.0)
    assert (tmp_path / "plots/ap_per_class.png").exists()
    # Drop one non-difficult detection of a class with n ground truths: recall tops at (n-1)/n
    # with precision 1, so the 11-point AP counts the thresholds t <= (n-1)/n.
    cls = max(present, key=lambda c: sum(r["label"] == c and not r["difficult"] for r in recs))
    n = sum(r["label"] == cls and not r["difficult"] for r in recs)
    drop = next(i for i, r in enumerate(recs) if r["label"] == cls and not r["difficult"])
    kept = [{k: r[k] for k in ("image_id", "label", "score", "bbox")} for i, r in enumerate(recs) if i != drop]
    dets.write_text(json.dumps(kept))
    assert run(["--detections", str(dets), *common(demo_root), "--json", str(out_json)]) == 0
    expected = sum(t <= (n - 1) / n for t in np.arange(0.0, 1.1, 0.1)) / 11
    assert json.loads(out_json.read_text())["ap"][cls] == pytest.approx(expected)


def test_iou_rule_matlab_counts_an_exact_half_overlap(demo_root, tmp_path):
    # Perfect detections (score 0.9), except that one non-difficult object of the busiest class
    # is found only by a box twice its height (same x extent and top): inclusive areas w*h and
    # 2*w*h, so IoU = w*h / (2*w*h) = 0.5 exactly, scored 0.5 so it comes last.
    # python (IoU > 0.5): a FP after n-1 TPs -> recall tops at (n-1)/n with precision 1;
    # matlab (IoU >= 0.5): a TP -> recall 1 with precision 1 -> AP 1.
    recs = gt_records(demo_root)
    present = {r["label"] for r in recs if not r["difficult"]}
    cls = max(present, key=lambda c: sum(r["label"] == c and not r["difficult"] for r in recs))
    n = sum(r["label"] == cls and not r["difficult"] for r in recs)

    def alone(r):  # no other object of the class in its image the tall box could prefer
        return sum(o["label"] == cls and o["image_id"] == r["image_id"] for o in recs) == 1
    k = next(i for i, r in enumerate(recs) if r["label"] == cls and not r["difficult"] and alone(r))
    x1, y1, x2, y2 = recs[k]["bbox"]
    tall = {"image_id": recs[k]["image_id"], "label": cls, "score": 0.5,
            "bbox": [x1, y1, x2, y1 + 2 * (y2 - y1 + 1) - 1]}
    kept = [{f: r[f] for f in ("image_id", "label", "score", "bbox")}
            for i, r in enumerate(recs) if i != k]
    dets, out = tmp_path / "dets.json", tmp_path / "res.json"
    dets.write_text(json.dumps(kept + [tall]))
    args = ["--detections", str(dets), *common(demo_root), "--json", str(out), "--no-coco"]
    assert run(args) == 0
    res = json.loads(out.read_text())
    expected = sum(t <= (n - 1) / n for t in np.arange(0.0, 1.1, 0.1)) / 11
    assert res["iou_rule"] == "python" and res["ap"][cls] == pytest.approx(expected)
    assert expected < 1.0
    assert run([*args, "--iou-rule", "matlab"]) == 0
    res = json.loads(out.read_text())
    assert res["iou_rule"] == "matlab" and res["ap"][cls] == pytest.approx(1.0)


def test_save_detections_round_trip(demo_root, tmp_path):
    ids = (demo_root / "VOC2007/ImageSets/Main/test.txt").read_text().split()
    rng = np.random.default_rng(0)
    dets = []
    for _ in ids:
        xy, wh = rng.uniform(0, 100, (3, 2)), rng.uniform(1, 50, (3, 2))
        dets.append({"boxes": np.concatenate([xy, xy + wh], axis=1), "scores": rng.uniform(size=3),
                     "labels": rng.integers(1, len(DEMO_CLASSES) + 1, 3)})
    recs = detections_to_records(dets, ids, DEMO_CLASSES)
    back = load_detection_file(_write(tmp_path, recs), ids, DEMO_CLASSES)
    for a, b in zip(dets, back):
        np.testing.assert_allclose(b["boxes"], a["boxes"], rtol=0, atol=1e-9)
        np.testing.assert_array_equal(b["scores"], a["scores"])  # no rounding on the way
        np.testing.assert_array_equal(b["labels"], a["labels"])


def _write(tmp_path: Path, recs) -> Path:
    path = tmp_path / "d.json"
    path.write_text(json.dumps(recs))
    return path


@pytest.mark.parametrize("rec, message", [
    ({"image_id": "nope", "label": "circle", "score": 0.5, "bbox": [1, 1, 5, 5]}, "image_id 'nope'"),
    ({"image_id": None, "label": "dog", "score": 0.5, "bbox": [1, 1, 5, 5]}, "unknown label 'dog'"),
    ({"image_id": None, "label": "circle", "score": 0.5, "bbox": [5, 1, 1, 5]}, "x2 >= x1"),
    ({"image_id": None, "label": "circle", "score": 0.5, "bbox": [1, 1, 5]}, "4 finite numbers"),
    ({"image_id": None, "label": "circle", "bbox": [1, 1, 5, 5]}, "must have image_id, label"),
    ({"image_id": None, "label": ["circle"], "score": 0.5, "bbox": [1, 1, 5, 5]}, "unknown label ['circle']"),
    ({"image_id": None, "label": "circle", "score": True, "bbox": [1, 1, 5, 5]}, "score must be a finite"),
    ({"image_id": None, "label": "circle", "score": 0.5, "bbox": [1, 1, True, 5]}, "4 finite numbers"),
    ({"image_id": None, "label": "circle", "score": 0.5, "bbox": [1, 1, "5", 5]}, "4 finite numbers"),
])
def test_bad_detection_files(demo_root, tmp_path, capsys, rec, message):
    ids = (demo_root / "VOC2007/ImageSets/Main/test.txt").read_text().split()
    if rec.get("image_id", "") is None:
        rec["image_id"] = ids[0]
    assert run(["--detections", str(_write(tmp_path, [rec])), *common(demo_root)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("eval_voc.py: error: ") and message in err and "d.json" in err


def test_classes_that_do_not_match_the_data(demo_root, tmp_path, capsys):
    path = _write(tmp_path, [])
    assert run(["--detections", str(path), "--data-root", str(demo_root), "--classes", "circle"]) == 2
    err = capsys.readouterr().err
    assert "not in the class list [circle]" in err and "'ring' x12" in err


@pytest.fixture(scope="module")
def checkpoint(untrained_checkpoint) -> Path:
    """An untrained ResNet18 detector for the demo classes."""
    return untrained_checkpoint("resnet18", DEMO_CLASSES, 0)


def test_checkpoint_inference_and_saved_detections(demo_root, checkpoint, tmp_path, capsys):
    dets, res = tmp_path / "dets.json", tmp_path / "res.json"
    args = ["--checkpoint", str(checkpoint), "--data-root", str(demo_root), "--split", "voc07_test",
            "--device", "cpu", "--batch-size", "5", "--workers", "0", "--no-coco"]
    assert run([*args, "--save-detections", str(dets), "--json", str(res)]) == 0
    out = capsys.readouterr().out
    assert "12 images; inference" in out and "images/s" in out
    first = json.loads(res.read_text())
    assert first["num_images"] == 12 and set(first["ap"]) == set(DEMO_CLASSES)
    records = json.loads(dets.read_text())
    assert records and {r["label"] for r in records} <= set(DEMO_CLASSES)
    assert all(0.01 <= r["score"] <= 1 for r in records)  # the test-time score threshold
    per_image = {}
    for r in records:
        per_image[r["image_id"]] = per_image.get(r["image_id"], 0) + 1
    assert max(per_image.values()) <= 200  # at most 200 detections per image
    # The saved file evaluates, with no model, to the same numbers.
    assert run(["--detections", str(dets), *common(demo_root), "--json", str(res), "--no-coco"]) == 0
    second = json.loads(res.read_text())
    assert second["map"] == pytest.approx(first["map"], abs=1e-12)
    assert second["ap"] == pytest.approx(first["ap"], abs=1e-12)


def test_checkpoint_classes_must_match(demo_root, checkpoint, tmp_path, capsys):
    args = ["--checkpoint", str(checkpoint), "--data-root", str(demo_root), "--device", "cpu"]
    assert run([*args, "--classes", "circle,square"]) == 2
    err = capsys.readouterr().err
    assert "differ from the classes" in err and str(checkpoint) in err
    import torch

    state = torch.load(checkpoint, weights_only=False)
    state["class_names"] = list(DEMO_CLASSES[:-1]) + ["zebra"]
    other = tmp_path / "other.pth"
    torch.save(state, other)
    assert run(["--checkpoint", str(other), "--data-root", str(demo_root), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "not in the class list" in err and repr(DEMO_CLASSES[-1]) in err
    assert "--classes" not in err.split("not in the class list")[1]  # no hint it cannot follow


def test_json_without_any_ground_truth_is_valid_json(tmp_path):
    import argparse

    from ssd_da.evaluation.voc import evaluate_voc

    empty = {"boxes": np.zeros((0, 4)), "labels": np.zeros(0, np.int64)}
    result = evaluate_voc([{**empty, "scores": np.zeros(0)}], [{**empty, "difficult": np.zeros(0, bool)}],
                          ["a", "b"])
    path = tmp_path / "r.json"
    args = argparse.Namespace(save_detections=None, json=str(path), plots=None, metric="voc07")
    eval_voc.write_outputs(args, result, [], ["x"], ["a", "b"])
    assert json.loads(path.read_text()) == {"metric": "voc07", "iou_rule": "python", "map": None,
                                            "ap": {"a": None, "b": None}, "num_images": 1}
