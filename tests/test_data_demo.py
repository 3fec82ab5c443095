"""The synthetic demo dataset: layout, determinism, VOC parsing, difficult objects, idempotence."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ssd_da.data.demo import DEMO_CLASSES, ensure_demo_dataset
from ssd_da.data.transforms import build_train_transform
from ssd_da.data.voc import VOCDetection, detection_collate


def _files(devkit: Path) -> dict[str, bytes]:
    voc = devkit / "VOC2007"
    return {str(p.relative_to(voc)): p.read_bytes() for p in sorted(voc.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default-size demo set (240 trainval + 80 test), generated once for this module."""
    return ensure_demo_dataset(tmp_path_factory.mktemp("demo"))


def test_default_layout_and_contents(full: Path) -> None:
    voc = full / "VOC2007"
    assert full.name == "VOCdevkit"
    trainval = (voc / "ImageSets/Main/trainval.txt").read_text().split()
    test = (voc / "ImageSets/Main/test.txt").read_text().split()
    assert len(trainval) == 240 and len(test) == 80 and not set(trainval) & set(test)
    assert trainval[0] == "000001" and test[-1] == "000320"
    assert len(list((voc / "JPEGImages").glob("*.jpg"))) == 320
    assert len(list((voc / "Annotations").glob("*.xml"))) == 320
    assert (voc / ".demo_complete").is_file() and not (voc / ".demo_incomplete").exists()
    xml = (voc / "Annotations/000001.xml").read_text()
    for tag in ("folder", "filename", "size", "width", "height", "depth", "object", "name", "pose",
                "truncated", "difficult", "bndbox", "xmin", "ymin", "xmax", "ymax"):
        assert f"<{tag}>" in xml, tag
    assert all(re.fullmatch(r"\d+", v) for v in re.findall(r"<[xy]m(?:in|ax)>(.*?)</", xml))


def test_tree_parses_with_voc_dataset(full: Path) -> None:
    total = difficult = 0
    per_class = np.zeros(len(DEMO_CLASSES), dtype=np.int64)
    for split in ("voc07_trainval", "voc07_test"):
        ds = VOCDetection(full, split, DEMO_CLASSES)
        assert ds.num_skipped == 0
        for i in range(len(ds)):
            ann = ds.get_annotation(i)
            with Image.open(ds.image_paths[i]) as img:
                assert img.size == (ann.width, ann.height) and img.mode == "RGB"
            assert 200 <= ann.width <= 320 and 200 <= ann.height <= 320
            assert len(ann.labels) >= 1
            assert (ann.boxes[:, 2] <= ann.width - 1).all() and (ann.boxes[:, 3] <= ann.height - 1).all()
            per_class += np.bincount(ann.labels, minlength=len(DEMO_CLASSES) + 1)[1:]
            total += len(ann.labels)
            difficult += int(ann.difficult.sum())
    # ~5% difficult (tiny or mostly hidden objects), every class well represented.
    assert 0.02 <= difficult / total <= 0.10, (difficult, total)
    assert per_class.min() >= 0.6 * per_class.mean(), per_class
    # Objects are large enough to learn: the median box side is at least 15% of the image side.
    ds = VOCDetection(full, "voc07_trainval", DEMO_CLASSES)
    rel = np.concatenate([(a.boxes[:, 2:] - a.boxes[:, :2]).max(1) / min(a.width, a.height) for a in ds.annotations])
    assert np.median(rel) >= 0.15


def test_training_batch_from_demo(full: Path) -> None:
    ds = VOCDetection(full, "voc07_trainval", DEMO_CLASSES, transform=build_train_transform(300, seed=0))
    images, targets = detection_collate([ds[i] for i in range(4)])
    assert images.shape == (4, 3, 300, 300)
    assert all(t["boxes"].shape[1] == 4 and len(t["boxes"]) == len(t["labels"]) for t in targets)


def test_deterministic_given_seed(tmp_path: Path) -> None:
    a = _files(ensure_demo_dataset(tmp_path / "a", num_train=6, num_test=3, seed=7))
    b = _files(ensure_demo_dataset(tmp_path / "b", num_train=6, num_test=3, seed=7))
    c = _files(ensure_demo_dataset(tmp_path / "c", num_train=6, num_test=3, seed=8))
    assert a == b
    assert a.keys() == c.keys() and a["JPEGImages/000001.jpg"] != c["JPEGImages/000001.jpg"]
    assert len([k for k in a if k.startswith("Annotations/")]) == 9


def test_regeneration_skipped_when_complete_and_redone_when_not(tmp_path: Path) -> None:
    devkit = ensure_demo_dataset(tmp_path, num_train=3, num_test=2, seed=0)
    voc = devkit / "VOC2007"
    xml = voc / "Annotations/000001.xml"
    xml.write_text("edited")  # a complete tree is left alone, so the edit survives
    assert ensure_demo_dataset(tmp_path, num_train=3, num_test=2, seed=0) == devkit
    assert xml.read_text() == "edited"
    assert json.loads((voc / ".demo_complete").read_text())["seed"] == 0
    # As if generation had been interrupted: the first-written sentinel is there, the marker not.
    (voc / ".demo_complete").unlink()
    (voc / ".demo_incomplete").write_text("")
    ensure_demo_dataset(tmp_path, num_train=3, num_test=2, seed=0)
    assert xml.read_text().startswith("<annotation>")
    ensure_demo_dataset(tmp_path, num_train=4, num_test=2, seed=0)  # other settings: regenerated
    assert len((voc / "ImageSets/Main/trainval.txt").read_text().split()) == 4


def test_refuses_to_overwrite_foreign_tree(tmp_path: Path) -> None:
    (tmp_path / "VOCdevkit/VOC2007/Annotations").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        ensure_demo_dataset(tmp_path, num_train=2, num_test=1)
    assert (tmp_path / "VOCdevkit/VOC2007/Annotations").is_dir()
    with pytest.raises(ValueError, match="num_train"):
        ensure_demo_dataset(tmp_path / "x", num_train=0, num_test=1)
