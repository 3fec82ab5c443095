"""Messages that say what is wrong before any work (issue 21, points 10-20). Each test failed on
the code before the fix: the messages were missing, misleading, or came after writing."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from PIL import Image

from ssd_da.cli import detect as detect_tool
from ssd_da.cli import eval_voc as eval_tool
from ssd_da.cli import gradcam as gradcam_tool
from ssd_da.cli import train as train_tool
from ssd_da.cli import voc_to_coco
from voc_tree import add_sample, jpeg_bytes, write_set, xml_text

from ssd_da.config import Config, load_config
from ssd_da.data.voc import parse_annotation, resolve_split
from ssd_da.engine.loaders import build_datasets
from ssd_da.models.names import parse_backbone_name


def detect(capsys, *argv: str) -> tuple[int, str]:
    code = detect_tool.main(list(argv))
    return code, capsys.readouterr().err


@pytest.fixture()
def images(tmp_path) -> list[Path]:
    """a.jpg, a broken.jpg (its header reads, its pixels are cut short), c.jpg."""
    paths = [tmp_path / n for n in ("a.jpg", "broken.jpg", "c.jpg")]
    for path in paths:
        path.write_bytes(jpeg_bytes(64, 48, noise=True))
    data = paths[1].read_bytes()
    paths[1].write_bytes(data[: len(data) // 3])
    return paths


# ---------------------------------------------------------------- 10: a bad image among good ones
def test_detect_unreadable_image_stops_before_writing(images, tmp_path, capsys,
                                                      untrained_checkpoint, tiny_classes):
    images[1].write_bytes(b"not an image")
    ckpt = untrained_checkpoint("resnet18", tiny_classes)
    code, err = detect(capsys, *map(str, images), "--checkpoint", str(ckpt), "--out",
                       str(tmp_path / "out"), "--device", "cpu")
    assert code == 2 and "1 of 3 images cannot be read, nothing was written" in err
    assert str(images[1]) in err and not (tmp_path / "out").exists()


def test_detect_undecodable_image_is_left_out_and_the_rest_written(images, tmp_path, capsys,
                                                                   untrained_checkpoint,
                                                                   tiny_classes):
    """Before: a.png written, then exit 2 with no detections.json."""
    ckpt = untrained_checkpoint("resnet18", tiny_classes)
    out = tmp_path / "out"
    code, err = detect(capsys, *map(str, images), "--checkpoint", str(ckpt), "--out", str(out),
                       "--device", "cpu", "--score", "0")
    assert code == 2 and "1 of 3 images could not be decoded" in err and "broken.jpg" in err
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "c.png", "detections.json"]
    written = {r["image"] for r in json.loads((out / "detections.json").read_text())}
    assert written == {str(images[0]), str(images[2])}


# ---------------------------------------------------------------- 11: one split for both
def test_the_same_split_for_training_and_testing_warns(tiny_devkit, tiny_classes, caplog):
    cfg = Config(data_root=str(tiny_devkit), classes=list(tiny_classes),
                 train_split="voc07_test", test_split="voc07_test")
    with caplog.at_level(logging.WARNING):
        build_datasets(cfg)
    (line,) = [r.getMessage() for r in caplog.records if "also training images" in r.getMessage()]
    assert line.startswith("!!! 4 of 4 test images (voc07_test) are also training images")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        build_datasets(Config(data_root=str(tiny_devkit), classes=list(tiny_classes),
                              train_split="voc07_trainval", test_split="voc07_test"))
    assert "also training images" not in caplog.text


# ---------------------------------------------------------------- 12: --classes ""
def test_empty_classes_is_an_error_not_the_voc_classes(tmp_path, capsys):
    """Before: --classes "" (an unset shell variable) meant the 20 VOC classes."""
    with pytest.raises(ValueError, match="'classes' is empty"):
        load_config(None, ["classes="])
    code = train_tool.main(["--classes", "", "--output-dir",
                                                  str(tmp_path / "r")])
    assert code == 2 and "'classes' is empty (an unset shell variable?)" in capsys.readouterr().err
    args = eval_tool.get_args_parser().parse_args(["--detections", "d.json", "--classes", " , "])
    assert eval_tool.run(args) == 2
    assert "--classes ' , ' names nothing" in capsys.readouterr().err
    assert load_config(None, ["classes=voc"]).classes is None  # the explicit word still works


# ---------------------------------------------------------------- 13: an id with a space
def test_an_image_id_with_a_space_names_the_split_file_line(tmp_path):
    devkit = tmp_path / "VOCdevkit"
    add_sample(devkit, "a", [("dog", (1, 1, 9, 9))])
    write_set(devkit, "trainval", ["a", "img 2"])
    with pytest.raises(ValueError) as info:
        resolve_split(devkit, "voc07_trainval")
    assert "trainval.txt:2: 'img 2' is not one image id: ids cannot contain spaces" in str(info.value)
    write_set(devkit, "dog_trainval", ["a  1"])  # a class set file's -1/0/1 column is fine
    (devkit / "VOC2007/ImageSets/Main/dog_trainval.txt").rename(
        devkit / "VOC2007/ImageSets/Main/val.txt")
    assert resolve_split(devkit, "voc07_val") == [(devkit / "VOC2007", "a")]


# ---------------------------------------------------------------- 14: a key given twice
def test_a_key_given_twice_in_a_config_names_it(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 0.01\niters: 100\nlr: 0.001\n")
    with pytest.raises(ValueError, match=r"key 'lr' is given twice \(lines 1 and 3\)"):
        load_config(path)


# ---------------------------------------------------------------- 15: a misspelled backbone
def test_a_misspelled_backbone_gets_a_suggestion():
    with pytest.raises(ValueError, match=r"unknown backbone 'da_resnt50' \(did you mean "
                                         r"'da_resnet50'"):
        parse_backbone_name("da_resnt50")


# ---------------------------------------------------------------- 16, 17: folders and files
def test_a_folder_given_as_a_file_is_called_a_folder(tmp_path, capsys, untrained_checkpoint,
                                                     tiny_classes):
    ckpt = untrained_checkpoint("resnet18", tiny_classes)
    code, err = detect(capsys, str(tmp_path), "--checkpoint", str(ckpt), "--out", str(tmp_path / "o"))
    assert code == 2 and f"image {tmp_path} is a folder" in err
    with pytest.raises(ValueError, match=f"config file {tmp_path} is a folder"):
        load_config(tmp_path)


def test_detect_out_naming_a_file_fails_before_the_model_loads(images, tmp_path, capsys,
                                                               monkeypatch, untrained_checkpoint,
                                                               tiny_classes):
    """Before: a raw "[Errno 17] File exists" after the model had loaded."""
    out = tmp_path / "taken"
    out.write_text("x")

    def never(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(detect_tool, "load_detector", never)
    code, err = detect(capsys, str(images[0]), "--checkpoint",
                       str(untrained_checkpoint("resnet18", tiny_classes)), "--out", str(out))
    assert code == 2 and f"--out {out}: {out} exists and is not a folder" in err


# ---------------------------------------------------------------- 18: one style for box warnings
def test_box_warnings_name_file_object_number_and_class(tmp_path, caplog):
    """Before: "box 1 (label 2)" (0-based, a label number) beside "object #1 (dog)"."""
    path = tmp_path / "a.xml"
    path.write_text(xml_text([("dog", (5, 5, 5, 9)), ("bird", (1, 1, 9, 9)),
                              ("cat", (70, 50, 90, 60))], 64, 48))
    with caplog.at_level(logging.WARNING):
        parse_annotation(path, ["dog", "cat"])
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0].startswith(f"{path}: object #1 (dog) has a zero-area or inverted box")
    assert messages[1] == f"{path}: object #3 (cat) lies outside the 64x48 image; left out of training"


# ---------------------------------------------------------------- 19: gradcam --out name
def test_gradcam_out_without_extension_names_the_file_written(images, tmp_path, caplog,
                                                              untrained_checkpoint, tiny_classes):
    ckpt = untrained_checkpoint("resnet18", tiny_classes)
    parse = gradcam_tool.get_args_parser().parse_args
    with caplog.at_level(logging.INFO):
        code = gradcam_tool.run(parse([str(images[0]), "--checkpoint", str(ckpt), "--out",
                                        str(tmp_path / "name"), "--device", "cpu"]))
    assert code == 0 and (tmp_path / "name.png").is_file()
    assert f"wrote {tmp_path / 'name.png'} " in caplog.text
    assert gradcam_tool.run(parse([str(images[0]), "--checkpoint", str(ckpt), "--out",
                                    str(tmp_path / "g.xyz")])) == 2


# ---------------------------------------------------------------- 20: --reverse checks first
def test_reverse_with_two_images_of_one_base_name_writes_nothing(tmp_path, capsys):
    """Before: the first image was copied into the VOC tree, then the error came."""
    root = tmp_path / "coco"
    (root / "val").mkdir(parents=True)
    for name in ("a.jpg", "a.png"):
        Image.new("RGB", (40, 30)).save(root / "val" / name)
    (root / "annotations").mkdir()
    (root / "annotations" / "instances_val.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.jpg", "width": 40, "height": 30},
                   {"id": 2, "file_name": "a.png", "width": 40, "height": 30}],
        "annotations": [], "categories": [{"id": 1, "name": "dog"}]}))
    voc = tmp_path / "voc"
    code = voc_to_coco.main(
        ["--reverse", "--coco-root", str(root), "--voc-root", str(voc), "--splits", "val"])
    assert code == 2 and "would share the VOC image id a" in capsys.readouterr().err
    assert not voc.exists()
