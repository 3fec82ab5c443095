"""--data-format coco in tools/eval_voc.py and tools/ablate.py: COCO results files, crowd regions
worked out by hand, the same numbers as the VOC form of the same data, clear errors."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from ssd_da.data.demo import DEMO_CLASSES, ensure_demo_dataset
from ssd_da.engine.checkpoint import save_checkpoint
from ssd_da.models.ssd import build_ssd
from test_coco_data import write_coco

ROOT = Path(__file__).resolve().parents[1]
from ssd_da.cli import ablate as ablate_tool
from ssd_da.cli import eval_voc
from ssd_da.cli import voc_to_coco


def run(args: list[str]) -> int:
    return eval_voc.main(args)


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
    # are worked out in test_coco_data.test_crowd_regions_in_evaluation).
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


@pytest.mark.slow
def test_ablate_on_coco_format(demo_both, tmp_path: Path) -> None:
    _, coco = demo_both
    out = tmp_path / "abl"
    argv = ["--data-format", "coco", "--data-root", str(coco), "--train-split", "voc07_trainval",
            "--test-split", "voc07_test", "--iters", "2", "--batch-size", "2", "--workers", "0",
            "--backbones", "resnet18", "--seeds", "1", "--output-dir", str(out), "pretrained=none",
            "eval_every=0"]
    assert ablate_tool.main(argv) == 0
    with open(out / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 1 and {f"ap_{c}" for c in DEMO_CLASSES} <= set(rows[0])  # from the categories
    assert f"under {coco} (COCO format)" in (out / "results.md").read_text()
    log = [json.loads(x) for x in (out / "resnet18/seed0/log.jsonl").read_text().splitlines()]
    assert set(log[-1]["coco"]) >= {"AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large"}
    assert np.isfinite(float(rows[0]["map"]))
