"""Bad data, found before the work (issue 10): repeated image ids, unknown class names,
unreadable and undecodable images, 16-bit and odd image modes, split files with a byte-order
mark or no lines, huge images. Each test failed before the fix it covers."""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ssd_da.cli import eval_voc
from voc_tree import add_sample, jpeg_bytes, png_bytes, write_set

from ssd_da.config import load_config
from ssd_da.data import voc
from ssd_da.data.voc import VOCDetection, load_rgb, resolve_split
from ssd_da.engine.loaders import build_datasets

CLASSES = ["dog", "cat"]


def eval_cli(*argv: str) -> int:
    return eval_voc.main(list(argv))


def cfg_for(devkit: Path, **kw):
    items = {"data_root": str(devkit), "train_split": "voc07_trainval", "test_split": "voc07_test",
             "classes": CLASSES, "pretrained": "none", **kw}
    return load_config(None, [f"{k}={json.dumps(v)}" for k, v in items.items()])


@pytest.fixture()
def devkit(tmp_path: Path) -> Path:
    """Four 64x48 images, one dog or cat each; trainval = a, b; test = c, d."""
    root = tmp_path / "VOCdevkit"
    for image_id, name in (("a", "dog"), ("b", "cat"), ("c", "dog"), ("d", "cat")):
        add_sample(root, image_id, [(name, (10, 10, 40, 30))])
    write_set(root, "trainval", ["a", "b"])
    write_set(root, "test", ["c", "d"])
    return root


# ---------------------------------------------------------------- 4: repeated image ids
def test_repeated_image_id_is_an_error_naming_it(devkit, tmp_path, capsys):
    write_set(devkit, "test", ["c", "d", "c"])
    with pytest.raises(ValueError, match=r"more than once: c \(2x\)"):
        resolve_split(devkit, "voc07_test")
    # eval_voc used to count c's dog twice but match its detection once: mAP 75.00, exit 0.
    dets = [{"image_id": i, "label": n, "score": 0.9, "bbox": [10, 10, 40, 30]}
            for i, n in (("c", "dog"), ("d", "cat"))]
    path = tmp_path / "dets.json"
    path.write_text(json.dumps(dets))
    assert eval_cli("--detections", str(path), "--data-root", str(devkit), "--classes", "dog,cat",
                    "--no-coco") == 2
    assert "c (2x)" in capsys.readouterr().err


# ---------------------------------------------------------------- 5 and 13: class names
def test_unknown_class_names_stop_training_naming_them(devkit):
    add_sample(devkit, "e", [("Dog", (5, 5, 20, 20)), ("kat", (20, 5, 40, 20)), ("Dog", (1, 1, 9, 9))])
    write_set(devkit, "trainval", ["a", "b", "e"])
    with pytest.raises(ValueError) as info:
        build_datasets(cfg_for(devkit))
    text = str(info.value)
    assert "'Dog' x2 (e.g. e.xml; did you mean 'dog'?)" in text
    assert "'kat' x1 (e.g. e.xml; did you mean 'cat'?)" in text
    assert "--ignore-other-classes" in text
    assert isinstance(info.value, voc.UnknownClassError) and info.value.counts == {"Dog": 2, "kat": 1}


def test_other_classes_left_out_on_request_are_counted_per_class(devkit, caplog):
    add_sample(devkit, "e", [("person", (5, 5, 20, 20)), ("dog", (20, 5, 40, 20)),
                             ("person", (1, 1, 9, 9)), ("car", (1, 1, 9, 9))])
    write_set(devkit, "trainval", ["a", "b", "e"])
    with caplog.at_level(logging.WARNING):
        ds = VOCDetection(devkit, "voc07_trainval", CLASSES, ignore_other_classes=True)
    assert ds.other_class_counts == {"person": 2, "car": 1}
    assert [len(a.labels) for a in ds.annotations] == [1, 1, 1]  # e keeps only its dog
    warnings = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
    assert len(warnings) == 1 and "3 object(s)" in warnings[0]
    assert "1 'car', 2 'person'" in warnings[0]


def test_training_set_without_objects_is_an_error(devkit):
    for image_id in ("a", "b"):
        add_sample(devkit, image_id, [])
    with pytest.raises(ValueError, match="no non-difficult object .*nothing to learn"):
        build_datasets(cfg_for(devkit))


# ---------------------------------------------------------------- 6 and 7: unreadable images
def _bad_images(devkit: Path) -> None:
    """test = c (good), z (zero bytes), t (a JPEG cut in half: its header still reads)."""
    add_sample(devkit, "z", [("dog", (10, 10, 40, 30))], image=b"")
    add_sample(devkit, "t", [("cat", (10, 10, 40, 30))], image=jpeg_bytes(640, 480, noise=True)[:5000],
               size=(640, 480))
    write_set(devkit, "test", ["c", "z", "t"])


def test_unreadable_test_image_fails_before_training(devkit):
    _bad_images(devkit)
    with pytest.raises(OSError, match=r"cannot read image .*z\.jpg"):
        build_datasets(cfg_for(devkit))  # the header check, before any model is built


def test_skip_bad_skips_undecodable_images_with_a_count(devkit, caplog):
    _bad_images(devkit)
    with caplog.at_level(logging.WARNING):
        _, test_set = build_datasets(cfg_for(devkit, skip_bad=True))
    assert [a.image_id for a in test_set.annotations] == ["c"]
    assert test_set.num_skipped == 2
    text = caplog.text
    assert "z.jpg" in text and "t.jpg" in text and "skipped 2 bad samples of 3" in text
    # Without --skip-bad the truncated file passes the header check and fails when decoded,
    # with advice.
    write_set(devkit, "test", ["c", "t"])
    ds = VOCDetection(devkit, "voc07_test", CLASSES)
    with pytest.raises(OSError, match=r"t\.jpg.*--skip-bad"):
        ds[1]


def test_eval_checkpoint_skip_bad_reports_the_count(devkit, tmp_path, capsys):
    from ssd_da.engine.checkpoint import save_checkpoint
    from ssd_da.models.ssd import build_ssd

    _bad_images(devkit)
    torch.manual_seed(0)
    ckpt = tmp_path / "r18.pth"
    save_checkpoint({"model": build_ssd("resnet18", num_classes=3).state_dict(),
                     "backbone": "resnet18", "class_names": CLASSES, "config": {}}, ckpt)
    assert eval_cli("--checkpoint", str(ckpt), "--data-root", str(devkit), "--skip-bad",
                    "--device", "cpu", "--workers", "0", "--no-coco") == 0
    assert "1 images (2 more skipped as unreadable by --skip-bad)" in capsys.readouterr().out


# ---------------------------------------------------------------- 8: image modes
GRAY16 = np.full((3, 4), 51400, np.uint16)  # 51400 = 200 * 257: 200 whether v >> 8 or v / 257


@pytest.mark.parametrize("pixels, color_type, expected", [
    (GRAY16, 0, (200, 200, 200)),                                                  # gray 16-bit
    (np.dstack([GRAY16, GRAY16 // 2, GRAY16 // 4]), 2, (200, 100, 50)),            # RGB 16-bit
    (np.dstack([GRAY16, np.zeros_like(GRAY16)]), 4, (200, 200, 200)),              # LA 16-bit
    (np.dstack([GRAY16, GRAY16 // 2, GRAY16 // 4, GRAY16]), 6, (200, 100, 50)),    # RGBA 16-bit
])
def test_16_bit_images_scale_to_8_bits(tmp_path, pixels, color_type, expected):
    path = tmp_path / "x.png"
    path.write_bytes(png_bytes(pixels, color_type))
    image = load_rgb(path)
    assert image.dtype == np.uint8 and image.shape == (3, 4, 3)
    assert (image == np.array(expected, np.uint8)).all()


def test_palette_la_and_rgba_images(tmp_path):
    palette = Image.new("P", (4, 3), 1)
    palette.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    palette.info["transparency"] = 0
    la = Image.fromarray(np.dstack([np.full((3, 4), 77, np.uint8), np.zeros((3, 4), np.uint8)]), "LA")
    rgba = Image.new("RGBA", (4, 3), (5, 6, 7, 0))
    for name, img, expected in (("p.png", palette, (10, 20, 30)), ("la.png", la, (77, 77, 77)),
                                ("rgba.png", rgba, (5, 6, 7))):
        img.save(tmp_path / name)
        assert (load_rgb(tmp_path / name) == np.array(expected, np.uint8)).all(), name


# ---------------------------------------------------------------- 11: split files
def test_split_file_with_byte_order_mark(devkit):
    write_set(devkit, "test", ["c", "d"], prefix="\ufeff")
    ds = VOCDetection(devkit, "voc07_test", CLASSES)
    assert [a.image_id for a in ds.annotations] == ["c", "d"]


def test_empty_training_split_says_so(devkit):
    write_set(devkit, "trainval", [])
    with pytest.raises(ValueError, match=r"split voc07_trainval: the image set file .*trainval\.txt "
                                         r"lists no images"):
        build_datasets(cfg_for(devkit))


# ---------------------------------------------------------------- huge images
def test_huge_training_image_is_shrunk_at_load_time(devkit):
    add_sample(devkit, "h", [("dog", (301, 601, 1501, 1201))], image=jpeg_bytes(3000, 2000),
               size=(3000, 2000))
    write_set(devkit, "trainval", ["h"])
    train_set, test_set = build_datasets(cfg_for(devkit))
    seen = []

    def spy(image, bboxes, labels):
        seen.append((image.shape, np.asarray(bboxes, np.float64)))
        return {"image": torch.zeros(3, 300, 300), "bboxes": bboxes, "labels": labels}

    train_set.transform = spy
    _, target = train_set[0]
    shape, boxes = seen[0]
    # Longer side 1000 (the zoom-out canvas of a 3000x2000 photo would be 12000x8000): scale
    # 1/3, so the 0-based box (300, 600, 1500, 1200) becomes (100, 200, 500, 400).
    assert shape == (667, 1000, 3)
    np.testing.assert_allclose(boxes, [[100, 200.1, 500, 400.2]], atol=0.2)
    assert target["orig_size"] == (2000, 3000)
    assert test_set.max_side is None  # evaluation resizes the original straight to 300x300


# ---------------------------------------------------------------- 13: training and eval agree
@pytest.mark.slow
def test_training_and_eval_voc_agree_on_classes_left_out(tmp_path, capsys, monkeypatch):
    from ssd_da.engine.trainer import train
    from ssd_da.models.ssd import SSD300

    devkit = tmp_path / "VOCdevkit"
    whole = (1, 1, 64, 48)  # every object fills its 64x48 image
    for image_id, names in (("a", ["dog"]), ("b", ["cat", "person"]), ("c", ["dog"]),
                            ("d", ["cat"]), ("e", ["dog", "person"]), ("f", ["cat"])):
        add_sample(devkit, image_id, [(n, whole) for n in names])
    write_set(devkit, "trainval", ["a", "b"])
    write_set(devkit, "test", ["c", "d", "e", "f"])
    real_forward = SSD300.forward

    def whole_image_detections(self, images, targets=None, original_sizes=None):
        """In evaluation: a dog and a cat box over the whole image, scores 0.9 and 0.8."""
        if self.training:
            return real_forward(self, images, targets, original_sizes)
        return [{"boxes": torch.tensor([[0.0, 0.0, w - 1.0, h - 1.0]] * 2),
                 "scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([1, 2])}
                for h, w in original_sizes]

    monkeypatch.setattr(SSD300, "forward", whole_image_detections)
    cfg = cfg_for(devkit, backbone="resnet18", batch_size=2, iters=1, lr=0.01, lr_steps=[],
                  warmup_iters=0, eval_every=0, ckpt_every=1, workers=0, eval_batch_size=4,
                  output_dir=str(tmp_path / "run"))
    with pytest.raises(ValueError, match="'person' x1 .*--ignore-other-classes"):
        train(cfg)  # person objects, not asked to be left out
    summary = train(dataclasses.replace(cfg, ignore_other_classes=True))
    out = tmp_path / "eval.json"
    assert eval_cli("--checkpoint", str(tmp_path / "run/last.pth"), "--data-root", str(devkit),
                    "--workers", "0", "--device", "cpu", "--no-coco", "--json", str(out)) == 0
    assert "1 objects of other classes left out (1 person)" in capsys.readouterr().out
    # dog: detections on c, d, e, f in image order (equal scores), TP at c and e: precision 1
    # up to recall 0.5, 2/3 up to 1: 11-point AP (6 * 1 + 5 * 2/3) / 11; cat the same shifted.
    dog = (6 + 5 * 2 / 3) / 11
    cat = (6 * 1 / 2 + 5 * 2 / 4) / 11  # TP at d (rank 2) and f (rank 4)
    result = json.loads(out.read_text())
    assert result["ap"] == pytest.approx({"dog": dog, "cat": cat}, abs=1e-12)
    assert summary["final_map"] == pytest.approx((dog + cat) / 2, abs=1e-12)
    assert result["map"] == pytest.approx(summary["final_map"], abs=1e-12)
