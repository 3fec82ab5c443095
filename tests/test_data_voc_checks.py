"""Data problems are said once and clearly (issue 21, points 4, 8, 9, 11, 13): namespaced VOC
XML, <size> that disagrees with the image, EXIF-rotated photos, one split for training and
testing, an image id with a space. Each test failed on the code before the fix."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
from voc_tree import add_sample, write_set, xml_text

from ssd_da.data.voc import VOCDetection, parse_annotation, resolve_split

CLASSES = ["dog", "cat"]


# ---------------------------------------------------------------- 4: a default namespace
def test_namespaced_voc_xml_keeps_its_objects(tmp_path):
    """Before: find("object") found nothing under <annotation xmlns=...>: zero objects, no word."""
    plain = xml_text([("dog", (5, 6, 30, 40)), ("cat", (10, 10, 20, 20))], 64, 48)
    path = tmp_path / "a.xml"
    path.write_text(plain.replace("<annotation>", '<annotation xmlns="http://example.com/voc">'))
    ann = parse_annotation(path, CLASSES)
    assert ann.labels.tolist() == [1, 2]
    assert ann.boxes.tolist() == [[4, 5, 29, 39], [9, 9, 19, 19]]  # 1-based minus one
    assert (ann.width, ann.height) == (64, 48)


def test_images_without_objects_are_counted_in_one_warning(tmp_path, caplog):
    devkit = tmp_path / "VOCdevkit"
    add_sample(devkit, "a", [("dog", (5, 6, 30, 40))])
    add_sample(devkit, "b", [])
    add_sample(devkit, "c", [])
    write_set(devkit, "trainval", ["a", "b", "c"])
    with caplog.at_level(logging.WARNING):
        VOCDetection(devkit, "voc07_trainval", CLASSES)
    lines = [r.getMessage() for r in caplog.records if "no <object>" in r.getMessage()]
    assert len(lines) == 1 and "2 of 3 images have no <object> in their XML (e.g. b.xml, c.xml)" \
        in lines[0]


# ---------------------------------------------------------------- 8: <size> against the file
def sized_tree(root: Path) -> Path:
    """4 images of 64x48; the XMLs of b and d say 100x80."""
    devkit = root / "VOCdevkit"
    for name in "abcd":
        add_sample(devkit, name, [("dog", (5, 6, 60, 40))])
    for name in "bd":
        xml = devkit / "VOC2007" / "Annotations" / f"{name}.xml"
        xml.write_text(xml_text([("dog", (5, 6, 90, 70))], 100, 80))
    write_set(devkit, "trainval", list("abcd"))
    return devkit


def warnings_about(caplog, words: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno >= logging.WARNING and words in r.getMessage()]


def test_size_disagreements_are_said_once_not_at_every_load(tmp_path, caplog):
    """Before: a warning at every load of b and d (millions in a real run), no summary."""
    with caplog.at_level(logging.WARNING):
        dataset = VOCDetection(sized_tree(tmp_path), "voc07_trainval", CLASSES)
        for _ in range(3):
            for i in range(len(dataset)):
                _, target = dataset[i]
                assert target["boxes"][:, 2].max() <= 63  # clipped to the real 64x48 image
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1
    assert "2 of 4 images differ in size from their annotation (e.g. b.jpg: file 64x48, " \
           "annotation 100x80; d.jpg: file 64x48, annotation 100x80)" in lines[0]
    assert "boxes are clipped to it" in lines[0]


def test_coco_width_height_disagreement_is_said_once(tmp_path, caplog):
    import json

    from PIL import Image

    from ssd_da.data.coco import CocoDetection

    (tmp_path / "val").mkdir()
    images = [{"id": i, "file_name": f"{i}.jpg", "width": 40, "height": 30} for i in (1, 2)]
    Image.new("RGB", (40, 30)).save(tmp_path / "val" / "1.jpg")
    Image.new("RGB", (50, 30)).save(tmp_path / "val" / "2.jpg")
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_val.json").write_text(json.dumps({
        "images": images, "categories": [{"id": 1, "name": "dog"}],
        "annotations": [{"id": 1, "image_id": 2, "category_id": 1, "bbox": [1, 1, 20, 20],
                         "area": 400, "iscrowd": 0}]}))
    with caplog.at_level(logging.WARNING):
        dataset = CocoDetection(tmp_path, "val")
        dataset[1], dataset[1]
    (line,) = warnings_about(caplog, "differ in size")
    assert "1 of 2 images differ in size from their annotation (e.g. 2.jpg: file 50x30, " \
           "annotation 40x30)" in line


# ---------------------------------------------------------------- 9: EXIF orientation
def exif_jpeg(orientation: int, size: tuple[int, int] = (64, 48)) -> bytes:
    import io

    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buf, "JPEG", exif=exif.tobytes())
    return buf.getvalue()


def test_exif_rotated_images_are_counted_once_and_read_as_stored(tmp_path, caplog):
    """Before: tag 3 (180 degrees) passed without a word; boxes refer to the stored pixels."""
    devkit = tmp_path / "VOCdevkit"
    add_sample(devkit, "up", [("dog", (5, 6, 30, 40))])
    add_sample(devkit, "r3", [("dog", (5, 6, 30, 40))], image=exif_jpeg(3))
    add_sample(devkit, "r6", [("dog", (5, 6, 30, 40))], image=exif_jpeg(6))
    write_set(devkit, "trainval", ["up", "r3", "r6"])
    with caplog.at_level(logging.WARNING):
        dataset = VOCDetection(devkit, "voc07_trainval", CLASSES)
        image, target = dataset[2]
    (line,) = warnings_about(caplog, "EXIF orientation")
    assert "2 of 3 images carry an EXIF orientation (e.g. r3.jpg: tag 3, shown rotated 180 " \
           "degrees; r6.jpg: tag 6, shown rotated 90 degrees clockwise)" in line
    assert "against the stored pixels" in line
    assert tuple(image.shape) == (3, 48, 64)  # the stored 64x48 grid, not the upright 48x64
    assert target["boxes"].tolist() == [[4.0, 5.0, 29.0, 39.0]]


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
