"""tools/voc_to_coco.py and ssd_da/data/convert.py: a VOC tree converted to COCO and back gives
the same boxes; the COCO form gives the same samples, and (slow) the same training losses."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ssd_da.cli import voc_to_coco
from ssd_da.data.coco import CocoDetection
from ssd_da.data.voc import VOCDetection, parse_annotation

REPO = Path(__file__).resolve().parents[1]

CLASSES = ["dog", "cat", "person"]  # not alphabetical: the label order must survive


def _obj(name: str, box: tuple, difficult: int = 0) -> str:
    coords = "".join(f"<{t}>{v}</{t}>" for t, v in zip(("xmin", "ymin", "xmax", "ymax"), box))
    return f"<object><name>{name}</name><difficult>{difficult}</difficult><bndbox>{coords}</bndbox></object>"


def make_voc(root: Path) -> Path:
    """VOC2007 with trainval (2 images, one PNG) and test (1 image): a difficult object, a
    zero-width box, half-pixel coordinates, a box past the image edge, an image with no object."""
    year = root / "VOCdevkit" / "VOC2007"
    samples = {
        "000001": (".jpg", [_obj("dog", (3, 4, 20, 18)), _obj("cat", (10, 2, 10, 9)),
                            _obj("person", (25, 5, 45, 29), difficult=1)]),
        "000002": (".png", [_obj("cat", (1.5, 2.5, 30.5, 20)), _obj("dog", (30, 10, 52, 35))]),
        "000003": (".jpg", []),
    }
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (year / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for image_id, (ext, objects) in samples.items():
        Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(year / "JPEGImages" / f"{image_id}{ext}")
        (year / "Annotations" / f"{image_id}.xml").write_text(
            f"<annotation><filename>{image_id}{ext}</filename><size><width>40</width><height>30</height>"
            f"<depth>3</depth></size>{''.join(objects)}</annotation>")
    (year / "ImageSets/Main/trainval.txt").write_text("000001\n000002\n")
    (year / "ImageSets/Main/test.txt").write_text("000003\n")
    return root / "VOCdevkit"


def _run(*argv: str) -> int:
    return voc_to_coco.main(list(argv))


def test_voc_to_coco_and_back_gives_the_same_boxes(tmp_path: Path) -> None:
    voc = make_voc(tmp_path / "voc")
    coco, back = tmp_path / "coco", tmp_path / "back" / "VOCdevkit"
    splits = "voc07_trainval,voc07_test"
    assert _run("--voc-root", str(voc), "--coco-root", str(coco), "--splits", splits,
                "--classes", ",".join(CLASSES)) == 0
    data = json.loads((coco / "annotations" / "instances_voc07_trainval.json").read_text())
    assert [c["name"] for c in data["categories"]] == CLASSES
    # [xmin - 1, ymin - 1, xmax - xmin, ymax - ymin]; difficult -> iscrowd.
    assert [(a["bbox"], a["iscrowd"]) for a in data["annotations"]] == [
        ([2, 3, 17, 14], 0), ([9, 1, 0, 7], 0), ([24, 4, 20, 24], 1),
        ([0.5, 1.5, 29, 17.5], 0), ([29, 9, 22, 25], 0)]
    assert (coco / "voc07_trainval" / "000002.png").read_bytes() == (voc / "VOC2007/JPEGImages/000002.png").read_bytes()
    assert _run("--reverse", "--coco-root", str(coco), "--voc-root", str(back), "--splits", splits) == 0
    for image_id in ("000001", "000002", "000003"):
        a = parse_annotation(voc / "VOC2007/Annotations" / f"{image_id}.xml", CLASSES)
        b = parse_annotation(back / "VOC2007/Annotations" / f"{image_id}.xml", CLASSES)
        for key in ("boxes", "labels", "difficult"):
            np.testing.assert_array_equal(a.ground_truth()[key], b.ground_truth()[key])
            np.testing.assert_array_equal(getattr(a, key), getattr(b, key))
    assert (back / "VOC2007/ImageSets/Main/trainval.txt").read_text() == "000001\n000002\n"


def test_coco_form_gives_the_same_samples(tmp_path: Path) -> None:
    voc = make_voc(tmp_path / "voc")
    coco = tmp_path / "coco"
    assert _run("--voc-root", str(voc), "--coco-root", str(coco), "--splits", "voc07_trainval",
                "--classes", ",".join(CLASSES)) == 0
    v = VOCDetection(voc, "voc07_trainval", CLASSES)
    c = CocoDetection(coco, "voc07_trainval")
    assert c.class_names == tuple(CLASSES) and len(v) == len(c) == 2
    for i in range(2):
        va, ca = v.get_annotation(i), c.get_annotation(i)
        for key in ("boxes", "labels", "difficult"):
            np.testing.assert_array_equal(va.ground_truth()[key], ca.ground_truth()[key])
        (vi, vt), (ci, ct) = v[i], c[i]  # difficult (crowd) objects out, boxes clipped alike
        assert np.array_equal(vi.numpy(), ci.numpy())
        np.testing.assert_array_equal(vt["boxes"].numpy(), ct["boxes"].numpy())
        np.testing.assert_array_equal(vt["labels"].numpy(), ct["labels"].numpy())


def test_default_classes_and_errors(tmp_path: Path, capsys) -> None:
    voc = make_voc(tmp_path / "voc")
    assert _run("--voc-root", str(voc), "--coco-root", str(tmp_path / "c"), "--splits", "voc07_trainval") == 0
    # All names are VOC classes: the 20 VOC categories in their usual order.
    data = json.loads((tmp_path / "c/annotations/instances_voc07_trainval.json").read_text())
    assert len(data["categories"]) == 20 and data["categories"][7]["name"] == "cat"
    assert "categories: aeroplane, bicycle" in capsys.readouterr().out
    assert _run("--voc-root", str(voc), "--coco-root", str(tmp_path / "c"), "--splits", "voc07_val") == 2
    assert "ImageSets/Main/val.txt, which does not exist" in capsys.readouterr().err
    assert _run("--reverse", "--voc-root", str(tmp_path / "v"), "--coco-root", str(tmp_path / "c"),
                "--splits", "train2017") == 2
    assert "instances_train2017.json not found; splits in" in capsys.readouterr().err


@pytest.mark.slow
def test_training_on_either_format_gives_identical_losses(tmp_path: Path) -> None:
    from ssd_da.config import load_config
    from ssd_da.data.demo import DEMO_CLASSES, ensure_demo_dataset
    from ssd_da.engine.trainer import train

    ensure_demo_dataset(tmp_path / "demo", num_train=8, num_test=4, seed=1)
    voc = tmp_path / "demo" / "VOCdevkit"
    coco = tmp_path / "coco"
    assert _run("--voc-root", str(voc), "--coco-root", str(coco), "--splits",
                "voc07_trainval,voc07_test", "--classes", ",".join(DEMO_CLASSES)) == 0
    runs = {}
    for fmt, root in (("voc", voc), ("coco", coco)):
        items = {"data_format": fmt, "data_root": str(root), "train_split": "voc07_trainval",
                 "test_split": "voc07_test", "backbone": "resnet18", "pretrained": "none",
                 "batch_size": 2, "iters": 3, "lr": 0.01, "lr_steps": [2], "warmup_iters": 1,
                 "eval_every": 0, "ckpt_every": 3, "log_every": 1, "workers": 0,
                 "eval_batch_size": 4, "output_dir": str(tmp_path / f"run_{fmt}"), "seed": 3}
        if fmt == "voc":
            items["classes"] = list(DEMO_CLASSES)  # COCO takes them from its categories
        summary = train(load_config(None, [f"{k}={json.dumps(v)}" for k, v in items.items()]))
        logs = [json.loads(line) for line in (tmp_path / f"run_{fmt}" / "log.jsonl").read_text().splitlines()]
        runs[fmt] = ([(r["iter"], r["loss"]) for r in logs if "loss" in r], summary["final_map"], logs[-1])
    assert len(runs["voc"][0]) == 3
    assert runs["voc"][0] == runs["coco"][0]  # bit-identical losses, iteration by iteration
    assert runs["voc"][1] == runs["coco"][1]
    # pycocotools' metrics at the final evaluation for both (VOC data: its training view)
    assert "coco" in runs["coco"][2] and "coco" in runs["voc"][2]
