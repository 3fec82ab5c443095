"""VOC evaluator: AP worked out by hand, devkit quirks, and agreement with a literal devkit loop."""
import logging
import math

import numpy as np
import pytest

from ssd_da.evaluation.voc import _pair_iou, evaluate_class, evaluate_voc, voc_ap

# A 10x10-pixel box under the devkit's inclusive convention (x2 - x1 + 1 = 10).
BOX = [0.0, 0.0, 9.0, 9.0]


def one_class(dets, gts, difficult=None, metric="voc07", image_ids=None, gt_image_ids=None,
              iou_rule="python"):
    """evaluate_class on one image; dets: list of (box, score), gts: list of boxes."""
    det_boxes = np.array([d[0] for d in dets], dtype=float).reshape(-1, 4)
    scores = np.array([d[1] for d in dets], dtype=float)
    gt_boxes = np.array(gts, dtype=float).reshape(-1, 4)
    difficult = np.zeros(len(gts), bool) if difficult is None else np.array(difficult)
    det_img = np.zeros(len(dets), int) if image_ids is None else np.array(image_ids)
    gt_img = np.zeros(len(gts), int) if gt_image_ids is None else np.array(gt_image_ids)
    return evaluate_class(det_img, det_boxes, scores, gt_img, gt_boxes, difficult, metric,
                          iou_rule=iou_rule)


def test_inclusive_pixel_iou():
    gt = np.array([BOX])
    # Inclusive: intersection x 5..9 -> 5 px wide, 10 high = 50; union 100 + 100 - 50 = 150.
    # (A continuous convention would give 4*9 / (81 + 81 - 36) = 0.2857.)
    iou = _pair_iou(np.array([[5.0, 0, 14, 9]]), gt)
    np.testing.assert_allclose(iou, [1 / 3], rtol=0, atol=1e-15)
    # A 2x2-pixel gt [0,0,1,1] (area 4) and a 3x2 det [0,0,2,1] (area 6): IoU 4/6 > 0.5 -> TP.
    # Continuous areas would be 1 and 2 -> IoU 0.5, not a match: the result would be AP 0.
    r = one_class([([0, 0, 2, 1], 0.9)], [[0, 0, 1, 1]])
    # The devkit adds p / 11 eleven times: 11 * (1/11) sums to 1.0000000000000002, kept as is.
    assert r.ap == 1.0000000000000002


def test_iou_exactly_half_is_not_a_match():
    # det A [0,0,9,4] (10x5 = 50 px inside the 100 px gt): IoU 50/100 = 0.5 exactly -> FP.
    # det B [0,0,9,5]: IoU 60/100 = 0.6 -> TP. Order A (0.9), B (0.8):
    # tp = [0, 1], fp = [1, 1] -> recall [0, 1], precision [0, 0.5];
    # every threshold t <= 1 is reached only at recall 1 -> p = 0.5 for all 11 -> AP 0.5.
    # (Were 0.5 a match: precision [1, 0.5] at recall 1 -> AP 1.)
    r = one_class([([0, 0, 9, 4], 0.9), ([0, 0, 9, 5], 0.8)], [BOX])
    np.testing.assert_array_equal(r.recall, [0.0, 1.0])
    np.testing.assert_array_equal(r.precision, [0.0, 0.5])
    assert r.ap == pytest.approx(0.5, abs=1e-15)


def test_iou_exactly_half_matches_under_the_matlab_rule():
    # The same two detections under VOCevaldet.m's rule (IoU >= 0.5): A (0.9, IoU exactly 0.5)
    # is now the TP and B (0.8), whose best gt is the one A took, a FP:
    # tp [1, 0], fp [0, 1] -> recall [1, 1], precision [1, 0.5] -> p = 1 at all 11 t -> AP 1.
    r = one_class([([0, 0, 9, 4], 0.9), ([0, 0, 9, 5], 0.8)], [BOX], iou_rule="matlab")
    np.testing.assert_array_equal(r.recall, [1.0, 1.0])
    np.testing.assert_array_equal(r.precision, [1.0, 0.5])
    assert r.ap == pytest.approx(1.0, abs=1e-15)


def test_iou_rule_on_a_10x20_detection_over_a_10x10_gt():
    # gt A = BOX (10x10 = 100 px), gt B [40,0,49,9]. d1 [0,0,9,19] (10x20 = 200 px) contains A:
    # IoU = 100 / (200 + 100 - 100) = 0.5 exactly. d2 = B exactly (IoU 1). Scores d1 0.9, d2 0.8.
    # python (IoU > 0.5): d1 FP, d2 TP -> recall [0, .5], precision [0, .5]; 11-point: t = 0, .1,
    #   .2, .3+, .4, .5 reach recall .5 with p = .5, t >= .6 get 0 -> AP = 6 * .5 / 11 = 3/11.
    # matlab (IoU >= 0.5): both TP -> recall [.5, 1], precision [1, 1] -> AP = 1.
    gts = [BOX, [40, 0, 49, 9]]
    dets = [([0, 0, 9, 19], 0.9), ([40, 0, 49, 9], 0.8)]
    np.testing.assert_array_equal(_pair_iou(np.array([[0.0, 0, 9, 19]]), np.array([BOX])), [0.5])
    python = one_class(dets, gts)
    np.testing.assert_array_equal(python.recall, [0.0, 0.5])
    np.testing.assert_array_equal(python.precision, [0.0, 0.5])
    assert python.ap == pytest.approx(3 / 11, abs=1e-15)
    matlab = one_class(dets, gts, iou_rule="matlab")
    np.testing.assert_array_equal(matlab.recall, [0.5, 1.0])
    np.testing.assert_array_equal(matlab.precision, [1.0, 1.0])
    assert matlab.ap == pytest.approx(1.0, abs=1e-15)
    # Through evaluate_voc: the same numbers, and the table names the rule.
    ann = [_img(gts, [1, 1])]
    det = [_img([d[0] for d in dets], [1, 1], scores=[d[1] for d in dets])]
    res = evaluate_voc(det, ann, ["a"])
    assert res.ap["a"] == pytest.approx(3 / 11, abs=1e-15) and "IoU > 0.5" in res.table()
    res = evaluate_voc(det, ann, ["a"], iou_rule="matlab")
    assert res.ap["a"] == pytest.approx(1.0, abs=1e-15) and res.iou_rule == "matlab"
    assert "IoU >= 0.5" in res.table()


def test_matlab_rule_never_matches_without_overlap():
    # VOCevaldet.m only considers ground truths with iw > 0 and ih > 0: at threshold 0 a
    # detection that touches nothing is still a FP (IoU 0 >= 0 would otherwise match).
    r = one_class([([50, 50, 59, 59], 0.9)], [BOX], iou_rule="matlab")
    assert r.ap == 0.0
    ann = [_img([BOX], [1])]
    det = [_img([[50, 50, 59, 59]], [1], scores=[0.9])]
    assert evaluate_voc(det, ann, ["a"], iou_threshold=0.0, iou_rule="matlab").ap["a"] == 0.0


def test_detection_on_difficult_is_neither_tp_nor_fp():
    # gt0 non-difficult BOX, gt1 difficult [20,20,29,29]. d1 (0.9) on gt1 is ignored,
    # d2 (0.8) on gt0 is a TP: cum tp [0, 1], fp [0, 0] -> precision [0/eps = 0, 1],
    # recall [0, 1] -> max precision at every threshold is 1 -> AP 1. npos = 1.
    # (Had d1 been a FP: precision [0, 0.5] -> AP 0.5.)
    r = one_class([([20, 20, 29, 29], 0.9), (BOX, 0.8)], [BOX, [20, 20, 29, 29]],
                  difficult=[False, True])
    assert r.npos == 1 and r.num_detections == 2
    np.testing.assert_array_equal(r.precision, [0.0, 1.0])
    assert r.ap == pytest.approx(1.0, abs=1e-15)


def test_best_match_difficult_no_fallback_to_regular_gt():
    # gt0 BOX (regular), gt1 [0,0,9,8] (difficult). The det [0,0,9,8] has IoU 1 with gt1 and
    # 90/100 = 0.9 with gt0: its best gt is the difficult one, so it is ignored even though gt0
    # is unused -> no TP at all: recall [0], precision [0] -> AP 0.
    r = one_class([([0, 0, 9, 8], 0.9)], [BOX, [0, 0, 9, 8]], difficult=[False, True])
    assert r.ap == 0.0
    np.testing.assert_array_equal(r.precision, [0.0])


def test_duplicate_is_fp_without_fallback_to_second_best():
    # gt0 BOX, gt1 [0,2,9,11]. d1 (0.9) = BOX -> gt0, TP.
    # d2 (0.8) = [0,0,9,10] (110 px): IoU gt0 = 100/110 = 0.909, gt1 = 90/(110+100-90) = 0.75.
    # Best is gt0, already used -> FP (no fallback to the unused gt1 at 0.75).
    # tp [1, 0], fp [0, 1] -> recall [0.5, 0.5], precision [1, 0.5].
    # 11-point: t = 0, .1, .2, .3+, .4, .5 reached (0.5 >= 0.5) with p = 1; t >= .6 -> 0.
    #   AP = 6/11.
    # area: mrec [0, .5, .5, 1], envelope [1, 1, .5, 0] -> 0.5 * 1 + 0.5 * 0 = 0.5.
    dets = [(BOX, 0.9), ([0, 0, 9, 10], 0.8)]
    gts = [BOX, [0, 2, 9, 11]]
    r = one_class(dets, gts)
    np.testing.assert_array_equal(r.recall, [0.5, 0.5])
    np.testing.assert_array_equal(r.precision, [1.0, 0.5])
    assert r.ap == pytest.approx(6 / 11, abs=1e-15)
    assert one_class(dets, gts, metric="area").ap == pytest.approx(0.5, abs=1e-15)


def test_recall_exactly_0_3_misses_threshold_0_30000000000000004():
    # 10 separate gts, 3 exact hits: recall 0.1, 0.2, 0.3 with precision 1.
    # np.arange gives t = 0.30000000000000004 > 0.3, so only t = 0, .1, .2 reach p = 1:
    # AP = 3/11 (with t = 0.3 exactly it would be 4/11).
    gts = [[20 * i, 0, 20 * i + 9, 9] for i in range(10)]
    r = one_class([(gts[i], 0.9 - 0.1 * i) for i in range(3)], gts)
    assert r.recall[-1] == 0.3
    assert r.ap == pytest.approx(3 / 11, abs=1e-15)


def test_eleven_point_and_area_on_the_same_curve():
    # Order TP, FP, TP, TP, FP with npos = 4:
    # cum tp 1,1,2,3,3; fp 0,1,1,1,2 -> recall .25,.25,.5,.75,.75; precision 1,.5,2/3,.75,.6.
    # 11-point: t = 0,.1,.2 -> 1; t = .3+,.4,.5,.6+,.7+ -> max(2/3,.75,.6) or max(.75,.6) = .75;
    #   t = .8,.9,1 -> 0.  AP = (3 * 1 + 5 * .75) / 11 = 6.75 / 11.
    # area: mrec 0,.25,.25,.5,.75,.75,1; envelope 1,1,.75,.75,.75,.6,0; recall changes at
    #   0->.25 (x1), .25->.5 (x.75), .5->.75 (x.75), .75->1 (x0): .25 + .1875 + .1875 = .625.
    recall = np.array([0.25, 0.25, 0.5, 0.75, 0.75])
    precision = np.array([1.0, 0.5, 2 / 3, 0.75, 0.6])
    assert voc_ap(recall, precision, "voc07") == pytest.approx(6.75 / 11, abs=1e-15)
    assert voc_ap(recall, precision, "area") == pytest.approx(0.625, abs=1e-15)
    # The same curve from boxes: 4 gts far apart, FPs are boxes hitting nothing.
    gts = [[30 * i, 0, 30 * i + 9, 9] for i in range(4)]
    miss = [200, 200, 209, 209]
    dets = [(gts[0], 0.9), (miss, 0.8), (gts[1], 0.7), (gts[2], 0.6), (miss, 0.5)]
    for metric, expected in (("voc07", 6.75 / 11), ("area", 0.625)):
        r = one_class(dets, gts, metric=metric)
        np.testing.assert_allclose(r.recall, recall, rtol=0, atol=0)
        np.testing.assert_allclose(r.precision, precision, rtol=0, atol=1e-15)
        assert r.ap == pytest.approx(expected, abs=1e-15)


def test_score_ties_keep_input_order():
    # A FP and a TP with the same score 0.7. Stable sort: the earlier image goes first.
    # FP first: precision [0, .5], recall [0, 1] -> AP 0.5. TP first: precision [1, .5] -> AP 1.
    fp, tp = ([50, 50, 59, 59], 0.7), (BOX, 0.7)
    r = one_class([fp, tp], [BOX], image_ids=[0, 1], gt_image_ids=[1])
    assert r.ap == pytest.approx(0.5, abs=1e-15)
    r = one_class([tp, fp], [BOX], image_ids=[0, 1], gt_image_ids=[0])
    assert r.ap == pytest.approx(1.0, abs=1e-15)
    # Same through evaluate_voc, and within one image (order of its detection arrays).
    ann = [{"boxes": np.array([BOX]), "labels": np.array([1]), "difficult": np.array([False])}]
    for order, expected in (([0, 1], 0.5), ([1, 0], 1.0)):
        boxes = np.array([fp[0], tp[0]], float)[order]
        det = [{"boxes": boxes, "scores": np.array([0.7, 0.7]), "labels": np.array([1, 1])}]
        for _ in range(3):  # deterministic
            assert evaluate_voc(det, ann, ["a"]).ap["a"] == pytest.approx(expected, abs=1e-15)


def test_many_score_ties_stable_where_quicksort_is_not():
    # 40 detections, scores 0.9, 0.5, 0.9, 0.5, ...; only index 1 (the first 0.5 one) hits the
    # gt. Stable order: the twenty 0.9 FPs, then index 1 -> TP at rank 21: precision 1/21 at
    # recall 1 for all 11 thresholds -> AP = 1/21. (np.argsort's default quicksort puts
    # index 1 at rank 30 here, which would give 1/30.)
    miss = [50, 50, 59, 59]
    dets = [(BOX if i == 1 else miss, 0.9 if i % 2 == 0 else 0.5) for i in range(40)]
    r = one_class(dets, [BOX])
    assert r.ap == pytest.approx(1 / 21, abs=1e-15)


def test_equal_iou_goes_to_first_gt_in_annotation_order():
    # det [0,0,19,9] (200 px) covers gt [0,0,14,9] and gt [5,0,19,9] (150 px each): IoU 0.75
    # with both. np.argmax -> the first in annotation order. Difficult first: the det is
    # ignored, no TP -> AP 0. Regular first: TP -> AP 1 (npos = 1 either way).
    det = [([0, 0, 19, 9], 0.9)]
    first_difficult = one_class(det, [[0, 0, 14, 9], [5, 0, 19, 9]], difficult=[True, False])
    assert first_difficult.ap == 0.0 and first_difficult.npos == 1
    first_regular = one_class(det, [[5, 0, 19, 9], [0, 0, 14, 9]], difficult=[False, True])
    assert first_regular.ap == pytest.approx(1.0, abs=1e-15)
    # Through evaluate_voc, with another class's gt in between (order within the class counts).
    ann = [_img([[0, 0, 14, 9], [100, 0, 109, 9], [5, 0, 19, 9]], [1, 2, 1],
                difficult=[True, False, False])]
    det = [_img([[0, 0, 19, 9]], [1], scores=[0.9])]
    assert evaluate_voc(det, ann, ["a", "b"]).ap["a"] == 0.0


def _img(boxes, labels, scores=None, difficult=None):
    d = {"boxes": np.array(boxes, float).reshape(-1, 4), "labels": np.array(labels, int)}
    if scores is not None:
        d["scores"] = np.array(scores, float)
    if difficult is not None:
        d["difficult"] = np.array(difficult, bool)
    return d


def test_no_detections_and_no_ground_truth_classes(caplog):
    # "a": one gt, exact hit -> AP 1. "b": one gt, no detection -> AP 0.
    # "c": no gt (only a difficult one) and one detection -> n/a, out of the mean.
    # mAP = (1 + 0) / 2 = 0.5.
    ann = [_img([BOX, [20, 20, 29, 29], [40, 40, 49, 49]], [1, 2, 3], difficult=[0, 0, 1])]
    det = [_img([BOX, [60, 60, 69, 69]], [1, 3], scores=[0.9, 0.8])]
    with caplog.at_level(logging.WARNING, logger="ssd_da.evaluation.voc"):
        res = evaluate_voc(det, ann, ["a", "b", "c"])
    assert res.ap["a"] == pytest.approx(1.0, abs=1e-15) and res.ap["b"] == 0.0
    assert math.isnan(res.ap["c"])
    assert res.map == pytest.approx(0.5, abs=1e-15)
    assert res.npos == {"a": 1, "b": 1, "c": 0}
    assert res.num_detections == {"a": 1, "b": 0, "c": 1}
    assert res.num_images == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(m.startswith("classes with no (non-difficult) ground truth") and m.endswith(": c")
               for m in warnings), warnings
    table = res.table()
    assert "n/a (no ground truth)" in table and "100.00" in table and "50.00" in table
    assert evaluate_voc(det, ann, ["a", "b", "c"], metric="area").map == pytest.approx(0.5)
    with caplog.at_level(logging.WARNING, logger="ssd_da.evaluation.voc"):
        empty = evaluate_voc([_img([], [], scores=[])], [_img([], [])], ["a"])
    assert math.isnan(empty.map) and "mAP is nan" in caplog.text


def test_bad_input_errors():
    ann = [_img([BOX], [1])]
    with pytest.raises(ValueError, match="metric must be one of"):
        evaluate_voc([_img([BOX], [1], [0.5])], ann, ["a"], metric="voc12")
    with pytest.raises(ValueError, match="metric must be one of"):
        voc_ap(np.zeros(1), np.zeros(1), "coco")
    with pytest.raises(ValueError, match=r"iou_rule must be one of \['python', 'matlab'\]"):
        evaluate_voc([_img([BOX], [1], [0.5])], ann, ["a"], iou_rule="devkit")
    with pytest.raises(ValueError, match=r"label 2 is out of range 1..1"):
        evaluate_voc([_img([BOX], [2], [0.5])], ann, ["a"])
    with pytest.raises(ValueError, match=r"label 0 is out of range"):
        evaluate_voc([_img([BOX], [1], [0.5])], [_img([BOX], [0])], ["a"])
    with pytest.raises(ValueError, match=r"detections\[0\]\['boxes'\] must have shape \(N, 4\)"):
        evaluate_voc([{"boxes": np.zeros((1, 5)), "scores": [0.5], "labels": [1]}], ann, ["a"])
    with pytest.raises(ValueError, match=r"detections\[0\]\['scores'\] has shape \(2,\)"):
        evaluate_voc([_img([BOX], [1], [0.5, 0.4])], ann, ["a"])
    with pytest.raises(ValueError, match="detections has 2 images but annotations has 1"):
        evaluate_voc([_img([], [], []), _img([], [], [])], ann, ["a"])
    with pytest.raises(ValueError, match=r"detections\[0\] has no 'scores'"):
        evaluate_voc([_img([BOX], [1])], ann, ["a"])
    with pytest.raises(ValueError, match="x2 >= x1"):
        evaluate_voc([_img([[5, 0, 4, 9]], [1], [0.5])], ann, ["a"])


# ---------------------------------------------------------------------------------------------
# Reference: the devkit's voc_eval loop, literally (one detection at a time).

def reference_class_ap(dets, anns, cls, metric, rule="python"):
    """Returns (ap, recall, precision) of class ``cls`` as voc_eval.py does (``rule="matlab"``:
    with VOCevaldet.m's ``ovmax >= minoverlap`` instead)."""
    class_recs, npos = {}, 0
    for i, a in enumerate(anns):
        keep = a["labels"] == cls
        class_recs[i] = {"bbox": a["boxes"][keep], "difficult": a["difficult"][keep],
                         "det": [False] * int(keep.sum())}
        npos += int((~a["difficult"][keep]).sum())
    image_ids, confidence, bbs = [], [], []
    for i, d in enumerate(dets):
        for box, score, label in zip(d["boxes"], d["scores"], d["labels"]):
            if label == cls:
                image_ids.append(i), confidence.append(score), bbs.append(box)
    sorted_ind = np.argsort(-np.array(confidence), kind="stable")  # our documented tie rule
    BB = np.array(bbs).reshape(-1, 4)[sorted_ind]
    image_ids = [image_ids[x] for x in sorted_ind]
    nd = len(image_ids)
    tp, fp = np.zeros(nd), np.zeros(nd)
    for d in range(nd):
        R, bb, ovmax = class_recs[image_ids[d]], BB[d], -np.inf
        BBGT = R["bbox"]
        if BBGT.size > 0:
            ixmin = np.maximum(BBGT[:, 0], bb[0])
            iymin = np.maximum(BBGT[:, 1], bb[1])
            ixmax = np.minimum(BBGT[:, 2], bb[2])
            iymax = np.minimum(BBGT[:, 3], bb[3])
            iw = np.maximum(ixmax - ixmin + 1.0, 0.0)
            ih = np.maximum(iymax - iymin + 1.0, 0.0)
            inters = iw * ih
            uni = ((bb[2] - bb[0] + 1.0) * (bb[3] - bb[1] + 1.0)
                   + (BBGT[:, 2] - BBGT[:, 0] + 1.0) * (BBGT[:, 3] - BBGT[:, 1] + 1.0) - inters)
            overlaps = inters / uni
            ovmax, jmax = np.max(overlaps), np.argmax(overlaps)
        if (ovmax >= 0.5 if rule == "matlab" else ovmax > 0.5):
            if not R["difficult"][jmax]:
                if not R["det"][jmax]:
                    tp[d], R["det"][jmax] = 1.0, True
                else:
                    fp[d] = 1.0
        else:
            fp[d] = 1.0
    fp, tp = np.cumsum(fp), np.cumsum(tp)
    rec = tp / float(npos)
    prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    if metric == "voc07":
        ap = 0.0
        for t in np.arange(0.0, 1.1, 0.1):
            p = 0 if np.sum(rec >= t) == 0 else np.max(prec[rec >= t])
            ap = ap + p / 11.0
        return ap, rec, prec
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    for i in range(mpre.size - 1, 0, -1):
        mpre[i - 1] = np.maximum(mpre[i - 1], mpre[i])
    i = np.where(mrec[1:] != mrec[:-1])[0]
    return np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]), rec, prec


def random_case(rng, num_images=300, num_classes=5):
    """Integer-pixel boxes (as in VOC), jittered detections, duplicates, tied scores."""
    dets, anns = [], []
    for _ in range(num_images):
        n = rng.integers(0, 6)
        xy = rng.integers(0, 300, size=(n, 2))
        wh = rng.integers(5, 120, size=(n, 2))
        gt = np.concatenate([xy, xy + wh], 1).astype(float)
        labels = rng.integers(1, num_classes + 1, n)
        anns.append({"boxes": gt, "labels": labels, "difficult": rng.random(n) < 0.2})
        hits = rng.integers(0, n, size=rng.integers(0, 4 * n + 1)) if n else np.zeros(0, int)
        jitter = rng.integers(-12, 13, size=(len(hits), 4))
        near = gt[hits] + jitter
        near[:, 2:] = np.maximum(near[:, 2:], near[:, :2])
        near_labels = np.where(rng.random(len(hits)) < 0.9, labels[hits],
                               rng.integers(1, num_classes + 1, len(hits)))
        k = rng.integers(0, 8)
        rxy = rng.integers(0, 350, size=(k, 2))
        rand = np.concatenate([rxy, rxy + rng.integers(3, 150, size=(k, 2))], 1).astype(float)
        boxes = np.concatenate([near, rand, near[:2]])  # the last ones: exact duplicates
        lab = np.concatenate([near_labels, rng.integers(1, num_classes + 1, k), near_labels[:2]])
        scores = np.round(rng.random(len(boxes)), 2)  # 2 decimals -> many exact ties
        dets.append({"boxes": boxes, "scores": scores, "labels": lab})
    return dets, anns


def with_exact_half_ious(dets, anns, rng):
    """Add, for about half of the ground truths, a detection of the gt's label twice as tall
    (same x extent, same top): intersection w*h, union 2*w*h, so IoU is exactly 0.5."""
    out = []
    for d, a in zip(dets, anns):
        pick = rng.random(len(a["boxes"])) < 0.5
        tall = a["boxes"][pick].copy()
        tall[:, 3] = tall[:, 1] + 2 * (tall[:, 3] - tall[:, 1] + 1) - 1
        out.append({"boxes": np.concatenate([d["boxes"], tall]),
                    "scores": np.concatenate([d["scores"], np.round(rng.random(len(tall)), 2)]),
                    "labels": np.concatenate([d["labels"], a["labels"][pick]])})
    return out


@pytest.mark.parametrize("metric, rule", [("voc07", "python"), ("area", "python"),
                                          ("voc07", "matlab"), ("area", "matlab")])
def test_agrees_with_literal_devkit_loop(metric, rule):
    rng = np.random.default_rng(7)
    dets, anns = random_case(rng)
    dets = with_exact_half_ious(dets, anns, rng)
    names = [f"c{i}" for i in range(1, 6)]
    res = evaluate_voc(dets, anns, names, metric=metric, iou_rule=rule)
    other = evaluate_voc(dets, anns, names, metric=metric,
                         iou_rule="matlab" if rule == "python" else "python")
    assert all(res.ap[n] != other.ap[n] for n in names)  # the exact ties matter in every class
    assert sum(res.num_detections.values()) > 2000  # a real test: thousands of detections
    for c, name in enumerate(names, start=1):
        expected, recall, precision = reference_class_ap(dets, anns, c, metric, rule)
        assert 0.05 < expected < 0.95  # neither trivial extreme
        assert abs(res.ap[name] - expected) <= 1e-9, (name, res.ap[name], expected)
        np.testing.assert_array_equal(res.recall[name], recall)  # the same curve, bit for bit
        np.testing.assert_array_equal(res.precision[name], precision)
    assert res.map == pytest.approx(np.mean([res.ap[n] for n in names]), abs=1e-15)


def test_pr_plots_write_pngs(tmp_path):
    from ssd_da.utils.plots import plot_ap_bars, plot_pr_curves

    ann = [_img([BOX, [20, 20, 29, 29]], [1, 2])]
    det = [_img([BOX, [50, 50, 59, 59]], [1, 3], scores=[0.9, 0.5])]
    res = evaluate_voc(det, ann, ["a", "potted plant", "c"])
    paths = plot_pr_curves(res, tmp_path / "pr")
    assert [p.name for p in paths] == ["pr_a.png", "pr_potted_plant.png"]  # "c" has no gt
    bars = plot_ap_bars(res, tmp_path / "ap.png")
    for p in paths + [bars]:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------
# COCO metrics through pycocotools.

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
