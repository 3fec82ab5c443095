"""tools/eval_voc.py: detection files, outputs, and clear errors (no model needed)."""
from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import eval_voc  # noqa: E402

from ssd_da.data.demo import DEMO_CLASSES, ensure_demo_dataset  # noqa: E402


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
    return eval_voc.main(eval_voc.get_args_parser().parse_args(args))


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
    assert res["metric"] == "voc07_11point" and res["num_images"] == 12
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


def test_save_detections_round_trip(demo_root, tmp_path):
    ids = (demo_root / "VOC2007/ImageSets/Main/test.txt").read_text().split()
    rng = np.random.default_rng(0)
    dets = []
    for _ in ids:
        xy, wh = rng.uniform(0, 100, (3, 2)), rng.uniform(1, 50, (3, 2))
        dets.append({"boxes": np.concatenate([xy, xy + wh], axis=1), "scores": rng.uniform(size=3),
                     "labels": rng.integers(1, len(DEMO_CLASSES) + 1, 3)})
    recs = eval_voc.detections_to_records(dets, ids, DEMO_CLASSES)
    back = eval_voc.load_detection_file(_write(tmp_path, recs), ids, DEMO_CLASSES)
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
])
def test_bad_detection_files(demo_root, tmp_path, caplog, rec, message):
    ids = (demo_root / "VOC2007/ImageSets/Main/test.txt").read_text().split()
    if rec.get("image_id", "") is None:
        rec["image_id"] = ids[0]
    assert run(["--detections", str(_write(tmp_path, [rec])), *common(demo_root)]) == 2
    assert message in caplog.text and "d.json" in caplog.text


def test_classes_that_do_not_match_the_data(demo_root, tmp_path, caplog):
    path = _write(tmp_path, [])
    assert run(["--detections", str(path), "--data-root", str(demo_root), "--classes", "circle"]) == 2
    assert "does not know" in caplog.text and "circle" in caplog.text
