"""COCO metrics of VOC-style data through pycocotools (ssd_da/evaluation/coco.py), worked out by
hand. COCO-format datasets and results files: test_data_coco.py, test_cli_eval_voc.py."""
import math

import pytest
from test_evaluation_voc import _img


def test_coco_metrics_perfect_empty_and_partial():
    from ssd_da.evaluation.coco import coco_metrics

    gt_boxes = [[0, 0, 100, 100], [200, 200, 300, 260], [10, 150, 60, 200]]
    ann = [_img(gt_boxes, [1, 2, 1], difficult=[0, 0, 1])]
    perfect = [_img(gt_boxes[:2] + [[400, 400, 450, 450]], [1, 2, 1], scores=[0.9, 0.8, 0.1])]
    m = coco_metrics(perfect, ann, ["a", "b"])
    # Both regular gts hit exactly before the FP: precision 1 at every recall -> AP 1.
    assert m["AP"] == pytest.approx(1.0) and m["AP50"] == pytest.approx(1.0)
    # A detection on the difficult (iscrowd) gt is ignored, not a FP.
    on_difficult = [_img(gt_boxes, [1, 2, 1], scores=[0.9, 0.8, 0.95])]
    assert coco_metrics(on_difficult, ann, ["a", "b"])["AP"] == pytest.approx(1.0)
    empty = coco_metrics([_img([], [], scores=[])], ann, ["a", "b"])
    assert empty["AP"] == 0.0 and empty["AP50"] == 0.0
    # One gt [0,0,100,100], det [0,0,100,72]: IoU 7200/10000 = 0.72 (continuous convention).
    # A TP at thresholds .50,.55,.60,.65,.70 (5 of 10), missed at .75..95 -> AP 0.5, AP50 1.
    m = coco_metrics([_img([[0, 0, 100, 72]], [1], scores=[0.9])], [_img([[0, 0, 100, 100]], [1])],
                     ["a"])
    assert m["AP"] == pytest.approx(0.5) and m["AP50"] == pytest.approx(1.0)
    assert m["AP75"] == pytest.approx(0.0) and math.isnan(m["AP_small"])  # no small objects
