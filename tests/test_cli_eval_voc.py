"""tools/eval_voc.py (ssd_da/cli/eval_voc.py): detection files (VOC and COCO results), outputs,
checkpoint inference on both data formats, and clear errors."""
from __future__ import annotations

import json
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch

from ssd_da.cli import eval_voc, voc_to_coco
from ssd_da.data.demo import DEMO_CLASSES, ensure_demo_dataset
from ssd_da.engine.checkpoint import save_checkpoint
from ssd_da.evaluation.detection_file import detections_to_records, load_detection_file
from ssd_da.models.ssd import build_ssd
from test_data_coco import write_coco
from voc_tree import add_sample, write_set


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


# -------------------------------------------------------------- outputs and options
@pytest.fixture()
def small_tree(tmp_path) -> tuple[Path, Path]:
    """(VOCdevkit with test = c (dog), d (cat), a file of perfect detections)."""
    root = tmp_path / "VOCdevkit"
    add_sample(root, "c", [("dog", (10, 10, 40, 30))])
    add_sample(root, "d", [("cat", (10, 10, 40, 30))])
    write_set(root, "test", ["c", "d"])
    dets = tmp_path / "dets.json"
    dets.write_text(json.dumps([{"image_id": i, "label": n, "score": 0.9, "bbox": [10, 10, 40, 30]}
                                for i, n in (("c", "dog"), ("d", "cat"))]))
    return root, dets


def eval_cli(*argv: str) -> int:
    return run(list(argv))


def test_eval_json_metric_is_the_option_value(small_tree, tmp_path):
    root, dets = small_tree
    for metric in ("voc07", "area"):
        out = tmp_path / f"{metric}.json"
        assert eval_cli("--detections", str(dets), "--data-root", str(root), "--classes",
                        "dog,cat", "--metric", metric, "--no-coco", "--json", str(out)) == 0
        assert json.loads(out.read_text())["metric"] == metric


def test_eval_output_folder_that_is_a_file(small_tree, tmp_path, capsys):
    root, dets = small_tree
    plots = tmp_path / "plots"
    plots.write_text("")
    assert eval_cli("--detections", str(dets), "--data-root", str(root), "--classes", "dog,cat",
                    "--no-coco", "--plots", str(plots)) == 2
    assert f"--plots {plots}: {plots} exists and is not a folder" in capsys.readouterr().err
    assert eval_cli("--detections", str(dets), "--data-root", str(root), "--classes", "dog,cat",
                    "--no-coco", "--json", str(tmp_path)) == 2
    assert f"--json {tmp_path} is a folder" in capsys.readouterr().err


def test_eval_other_classes_left_out_on_request(small_tree, capsys):
    root, dets = small_tree
    add_sample(root, "d", [("cat", (10, 10, 40, 30)), ("person", (1, 1, 5, 5)),
                           ("person", (5, 5, 9, 9))])
    assert eval_cli("--detections", str(dets), "--data-root", str(root), "--classes", "dog,cat",
                    "--no-coco") == 2
    assert eval_cli("--detections", str(dets), "--data-root", str(root), "--classes", "dog,cat",
                    "--no-coco", "--ignore-other-classes") == 0
    out = capsys.readouterr().out
    assert "2 images; 2 objects of other classes left out (2 person)" in out
    assert "mAP" in out and "100.00" in out


def test_eval_workers_default_fits_the_machine():
    import os

    cores = len(os.sched_getaffinity(0))
    assert eval_voc.get_args_parser().parse_args(["--detections", "x"]).workers == min(4, cores)


# -------------------------------------------------------- --data-format coco
@pytest.fixture(scope="module")
def demo_both(tmp_path_factory) -> tuple[Path, Path]:
    """A small demo VOC tree and its COCO conversion (same split names)."""
    root = tmp_path_factory.mktemp("cocodemo")
    ensure_demo_dataset(root, num_train=6, num_test=8, seed=4)
    voc, coco = root / "VOCdevkit", root / "coco"
    assert voc_to_coco.main(
        ["--voc-root", str(voc), "--coco-root", str(coco), "--splits", "voc07_trainval,voc07_test",
         "--classes", ",".join(DEMO_CLASSES)]) == 0
    return voc, coco



def test_coco_results_file_with_a_crowd_region(tmp_path: Path, capsys) -> None:
    # One dog and one crowd region of dogs; a false positive (0.95), a detection on the crowd
    # (0.92) and one on the dog (0.90): FP, ignored, TP -> AP 0.5 in both metrics (the cases
    # are worked out in test_data_coco.test_crowd_regions_in_evaluation).
    write_coco(tmp_path, "val", [{"id": 4, "file_name": "a.jpg", "width": 60, "height": 40}],
               [{"image_id": 4, "category_id": 7, "bbox": [5, 6, 10, 8]},
                {"image_id": 4, "category_id": 7, "bbox": [20, 10, 15, 15], "iscrowd": 1}])
    results = [{"image_id": 4, "category_id": 7, "bbox": [40, 30, 3, 3], "score": 0.95},
               {"image_id": 4, "category_id": 7, "bbox": [20, 10, 15, 15], "score": 0.92},
               {"image_id": 4, "category_id": 7, "bbox": [5, 6, 10, 8], "score": 0.90}]
    dets, out = tmp_path / "results.json", tmp_path / "res.json"
    dets.write_text(json.dumps(results))
    assert run(["--data-format", "coco", "--data-root", str(tmp_path), "--split", "val",
                "--detections", str(dets), "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["ap"] == {"cat": None, "dog": pytest.approx(0.5)} and res["num_images"] == 1
    assert res["coco"]["AP"] == pytest.approx(0.5) and res["coco"]["AP75"] == pytest.approx(0.5)
    assert res["coco"]["AP_medium"] is None  # no medium object: pycocotools' -1
    assert "COCO (pycocotools on val's JSON): AP 50.00  AP50 50.00  AP75 50.00  APs 50.00" in \
        capsys.readouterr().out


@pytest.mark.parametrize("rec, message", [
    ({"image_id": 99, "category_id": 7, "bbox": [0, 0, 1, 1], "score": 0.5}, "image_id 99 is not an image"),
    ({"image_id": 4, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 0.5}, r"category_id 1 is not one of \[3, 7\]"),
    ({"image_id": 4, "category_id": 7, "bbox": [0, 0, -1, 1], "score": 0.5}, r"bbox must be \[x, y, w, h\]"),
    ({"image_id": 4, "bbox": [0, 0, 1, 1], "score": 0.5}, "must have image_id, category_id, bbox and score"),
])
def test_bad_coco_results(tmp_path: Path, capsys, rec: dict, message: str) -> None:
    write_coco(tmp_path, "val", [{"id": 4, "file_name": "a.jpg"}],
               [{"image_id": 4, "category_id": 7, "bbox": [5, 6, 10, 8]}])
    dets = tmp_path / "results.json"
    dets.write_text(json.dumps([rec]))
    assert run(["--data-format", "coco", "--data-root", str(tmp_path), "--split", "val",
                "--detections", str(dets)]) == 2
    err = capsys.readouterr().err
    assert "result #0" in err and re.search(message, err)


def test_checkpoint_gives_the_same_numbers_on_both_formats(demo_both, tmp_path: Path) -> None:
    voc, coco = demo_both
    torch.manual_seed(0)
    model = build_ssd("resnet18", num_classes=len(DEMO_CLASSES) + 1)
    ckpt = tmp_path / "r18.pth"
    save_checkpoint({"model": model.state_dict(), "backbone": "resnet18",
                     "class_names": list(DEMO_CLASSES), "config": {}, "iteration": 0}, ckpt)
    common = ["--checkpoint", str(ckpt), "--split", "voc07_test", "--device", "cpu",
              "--batch-size", "4", "--workers", "0"]
    assert run([*common, "--data-root", str(voc), "--json", str(tmp_path / "voc.json")]) == 0
    dets = tmp_path / "results.json"
    assert run([*common, "--data-format", "coco", "--data-root", str(coco), "--json",
                str(tmp_path / "coco.json"), "--save-detections", str(dets)]) == 0
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("voc", "coco"))
    assert b["num_images"] == a["num_images"] == 8
    assert b["map"] == a["map"] and b["ap"] == a["ap"]  # the same VOC metric, bit for bit
    records = json.loads(dets.read_text())
    assert records and set(records[0]) == {"image_id", "category_id", "bbox", "score"}
    # The saved COCO results evaluate, with no model, to the same figures.
    assert run(["--data-format", "coco", "--data-root", str(coco), "--split", "voc07_test",
                "--detections", str(dets), "--json", str(tmp_path / "again.json")]) == 0
    c = json.loads((tmp_path / "again.json").read_text())
    assert c["map"] == b["map"] and c["coco"] == b["coco"]


def test_checkpoint_classes_must_be_categories(demo_both, tmp_path: Path, capsys) -> None:
    _, coco = demo_both
    model = build_ssd("resnet18", num_classes=3)
    ckpt = tmp_path / "other.pth"
    save_checkpoint({"model": model.state_dict(), "backbone": "resnet18",
                     "class_names": ["cat", "dog"], "config": {}, "iteration": 0}, ckpt)
    assert run(["--checkpoint", str(ckpt), "--data-format", "coco", "--data-root", str(coco),
                "--split", "voc07_test", "--device", "cpu", "--workers", "0"]) == 2
    assert f"its categories: {', '.join(DEMO_CLASSES)}" in capsys.readouterr().err
