"""Data problems are said once and clearly (issue 21, points 4, 8, 9, 11, 13): namespaced VOC
XML, <size> that disagrees with the image, EXIF-rotated photos, one split for training and
testing, an image id with a space. Each test failed on the code before the fix."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
from voc_tree import add_sample, write_set, xml_text

from ssd_da.data.voc import VOCDetection, parse_annotation

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
