"""SSD300 detector: default boxes, matching, loss, postprocessing and a one-batch overfit (CPU)."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.models import resnet18 as tv_resnet18
from torchvision.models.detection._utils import BoxCoder, SSDMatcher
from torchvision.models.detection.ssd import SSD
from torchvision.ops import box_iou

from ssd_da.models.ssd import SSD300, build_ssd
from ssd_da.models.ssd_loss import match_default_boxes, pad_targets, ssd_loss

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
# Default boxes per map: 38*38*4, 19*19*6, 10*10*6, 5*5*6, 3*3*4, 1*1*4.
MAP_COUNTS = [5776, 2166, 600, 150, 36, 4]


@pytest.fixture(scope="module")
def ssd18() -> SSD300:
    torch.manual_seed(0)
    return build_ssd("resnet18", 21).eval()


def _target(boxes, labels):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64)}


@pytest.mark.parametrize("name, channels", [("resnet18", [128, 256, 512, 512, 256, 256]),
                                            ("resnet50", [512, 1024, 2048, 512, 256, 256])])
def test_feature_maps_and_8732_default_boxes(name, channels):
    model = build_ssd(name, 21).eval()
    assert model.default_boxes.shape == (8732, 4) and sum(MAP_COUNTS) == 8732
    images = torch.randn(1, 3, 300, 300)
    maps = model.feature_maps(images)
    sizes = (38, 19, 10, 5, 3, 1)
    assert [tuple(f.shape[1:]) for f in maps] == [(c, s, s) for c, s in zip(channels, sizes)]
    out = model.head_outputs(images)
    assert out["cls_logits"].shape == (1, 8732, 21) and out["bbox_regression"].shape == (1, 8732, 4)
    # Grad-CAM needs gradients from the raw outputs down to layer4.
    out["cls_logits"][0, :, 5].sum().backward()
    assert model.backbone.layer4[-1].conv1.weight.grad.abs().sum() > 0
    assert "default_boxes" not in model.state_dict()  # persistent=False: not in checkpoints


def test_default_boxes_by_hand(ssd18):
    boxes = ssd18.default_boxes
    # Last map (1x1, step 300, scales 0.88 / 1.05, ratio 2), centre (150, 150):
    # 264 x 264; sqrt(264*315) square; 264*sqrt2 = 373.4 wide -> clipped to 1.0 (300) in
    # (cx, cy, w, h) space x 264/sqrt2 = 186.68 high; and its transpose.
    s_prime = math.sqrt(264.0 * 315.0) / 2
    half_h = 264.0 / math.sqrt(2) / 2
    expected_last = torch.tensor([
        [150 - 132, 150 - 132, 150 + 132, 150 + 132],
        [150 - s_prime, 150 - s_prime, 150 + s_prime, 150 + s_prime],
        [0.0, 150 - half_h, 300.0, 150 + half_h],
        [150 - half_h, 0.0, 150 + half_h, 300.0]])
    torch.testing.assert_close(boxes[-4:], expected_last, rtol=0, atol=1e-3)
    # First map (38x38, step 8, scale 0.1 = 30 px): location (0, 0) is centred at (4, 4) and is
    # not moved into the image; location (row 0, column 1) is centred at (12, 4).
    s_prime = math.sqrt(30.0 * 60.0) / 2
    w2, h2 = 30 * math.sqrt(2) / 2, 30 / math.sqrt(2) / 2
    expected_first = torch.tensor([
        [4 - 15, 4 - 15, 4 + 15, 4 + 15],
        [4 - s_prime, 4 - s_prime, 4 + s_prime, 4 + s_prime],
        [4 - w2, 4 - h2, 4 + w2, 4 + h2],
        [4 - h2, 4 - w2, 4 + h2, 4 + w2],
        [12 - 15, 4 - 15, 12 + 15, 4 + 15]])
    torch.testing.assert_close(boxes[:5], expected_first, rtol=0, atol=1e-3)
    # The 3x3 map (step 100) starts at index 8732 - 4 - 36, centre (50, 50), side 0.71 * 300 = 213.
    torch.testing.assert_close(boxes[8692], torch.tensor([-56.5, -56.5, 156.5, 156.5]))


def _centre_clamped_default_boxes() -> torch.Tensor:
    """(8732, 4) xyxy pixels, generated as ssd.pytorch's / lufficc's PriorBox does: (cx, cy, w, h)
    in image units, all four clamped to [0, 1] (so centres past the border move onto it)."""
    mins, maxs = [30, 60, 111, 162, 213, 264], [60, 111, 162, 213, 264, 315]
    ratios, steps = [[2], [2, 3], [2, 3], [2, 3], [2], [2]], [8, 16, 32, 64, 100, 300]
    rows = []
    for k, f in enumerate((38, 19, 10, 5, 3, 1)):
        for i in range(f):
            for j in range(f):
                cx, cy, s = (j + 0.5) * steps[k] / 300, (i + 0.5) * steps[k] / 300, mins[k] / 300
                big = math.sqrt(s * maxs[k] / 300)
                rows += [[cx, cy, s, s], [cx, cy, big, big]]
                for a in ratios[k]:
                    rows += [[cx, cy, s * math.sqrt(a), s / math.sqrt(a)],
                             [cx, cy, s / math.sqrt(a), s * math.sqrt(a)]]
    p = torch.tensor(rows, dtype=torch.float64).clamp(0, 1)
    return torch.cat([p[:, :2] - p[:, 2:] / 2, p[:, :2] + p[:, 2:] / 2], dim=1) * 300


def test_default_box_clipping_differs_from_ssd_pytorch_on_114_boxes(ssd18):
    # The 10x10 map has step 32: its last row/column of centres lies at 9.5 * 32 = 304 px.
    # torchvision (ours) clamps only w and h, ssd.pytorch/lufficc clamp cx, cy too (304 -> 300).
    # 19 edge locations x 6 boxes = 114 boxes differ, by exactly 4 px in x and/or y. E.g. the
    # bottom-right location (index 5776 + 2166 + 99 * 6 = 8536), first box (side 111 px):
    # ours centred at (304, 304), ssd.pytorch's at (300, 300).
    ours = ssd18.default_boxes.double()
    torch.testing.assert_close(ours[8536], torch.tensor([248.5, 248.5, 359.5, 359.5],
                                                        dtype=torch.float64), rtol=0, atol=1e-3)
    ref = _centre_clamped_default_boxes()
    torch.testing.assert_close(ref[8536], torch.tensor([244.5, 244.5, 355.5, 355.5],
                                                       dtype=torch.float64), rtol=0, atol=1e-9)
    diff = (ours - ref).abs().amax(dim=1)
    differ = torch.nonzero(diff > 1e-3).flatten()
    assert len(differ) == 114 and diff.max().item() == pytest.approx(4.0, abs=1e-3)
    start = MAP_COUNTS[0] + MAP_COUNTS[1]  # the 10x10 map's boxes are start .. start + 599
    loc = (differ - start) // 6
    assert bool(((loc >= 0) & (loc < 100)).all())
    assert bool(((loc // 10 == 9) | (loc % 10 == 9)).all())  # last row or last column


def _random_boxes(gen: torch.Generator, n: int) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=gen) * 250
    wh = 2 + torch.rand(n, 2, generator=gen) * 200
    return torch.cat([xy, (xy + wh).clamp(max=300)], dim=1)


def test_batched_matching_equals_torchvision_ssdmatcher(ssd18):
    anchors = ssd18.default_boxes
    gen = torch.Generator().manual_seed(1)
    matcher = SSDMatcher(0.5)
    for trial in range(5):
        counts = [int(c) for c in torch.randint(0, 9, (4,), generator=gen)] + [0]
        boxes = [_random_boxes(gen, n) for n in counts]
        if trial == 0:  # duplicated ground truths force the same default box twice
            boxes[1] = (torch.cat([boxes[1], boxes[1][:1], boxes[1][:1]]) if counts[1]
                        else anchors[[8728, 8728]])
        targets = [{"boxes": b, "labels": torch.ones(len(b), dtype=torch.int64)} for b in boxes]
        gt, _, valid = pad_targets(targets, torch.device("cpu"))
        matched = match_default_boxes(gt, valid, anchors, 0.5)
        assert matched.shape == (len(targets), 8732)
        for i, b in enumerate(boxes):
            expected = (matcher(box_iou(b, anchors)) if len(b)
                        else torch.full((8732,), -1, dtype=torch.int64))
            assert torch.equal(matched[i], expected), (trial, i)
    # An all-empty batch matches nothing.
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}] * 2
    gt, _, valid = pad_targets(empty, torch.device("cpu"))
    assert (match_default_boxes(gt, valid, anchors, 0.5) == -1).all()


def test_loss_equals_torchvision_compute_loss(ssd18):
    gen = torch.Generator().manual_seed(2)
    targets = [_target(_random_boxes(gen, 3).tolist(), [1, 5, 20]), _target([], []),
               _target(_random_boxes(gen, 1).tolist(), [7])]
    head = {"cls_logits": torch.randn(3, 8732, 21, generator=gen),
            "bbox_regression": torch.randn(3, 8732, 4, generator=gen)}
    ours = ssd18.compute_loss(head, targets)
    anchors = [ssd18.default_boxes] * 3
    matched = [SSDMatcher(0.5)(box_iou(t["boxes"], a)) if len(t["boxes"])
               else torch.full((8732,), -1, dtype=torch.int64) for t, a in zip(targets, anchors)]
    fake_ssd = SimpleNamespace(box_coder=BoxCoder((10.0, 10.0, 5.0, 5.0)), neg_to_pos_ratio=3.0)
    theirs = SSD.compute_loss(fake_ssd, targets, head, anchors, matched)
    for key in ("bbox_regression", "classification"):
        torch.testing.assert_close(ours[key], theirs[key])


def test_loss_by_hand_and_without_objects(ssd18):
    anchors = ssd18.default_boxes
    targets = [_target([[40.0, 60.0, 120.0, 200.0]], [3]), _target([], [])]
    # Zero logits: every cross-entropy is log(21); P positives and 3P hard negatives give
    # (P + 3P) * log(21) / P = 4 log(21).
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    cls_logits = torch.zeros(2, 8732, 21)
    reg = torch.zeros(2, 8732, 4)
    gt, _, valid = pad_targets(targets, torch.device("cpu"))
    pos = match_default_boxes(gt, valid, anchors, 0.5)[0] >= 0
    reg[0, pos] = coder.encode_single(targets[0]["boxes"].expand(int(pos.sum()), 4), anchors[pos])
    losses = ssd_loss(cls_logits, reg, targets, anchors, coder)
    assert pos.sum() >= 2
    torch.testing.assert_close(losses["classification"], torch.tensor(4 * math.log(21)))
    torch.testing.assert_close(losses["bbox_regression"], torch.tensor(0.0))
    reg[0, pos, 0] += 0.5  # smooth L1 of 0.5 is 0.5 * 0.5^2 = 0.125 per positive, / P
    losses = ssd_loss(cls_logits, reg, targets, anchors, coder)
    torch.testing.assert_close(losses["bbox_regression"], torch.tensor(0.125))
    # No objects anywhere: finite, and zero (no positives, so no hard negatives either).
    model = build_ssd("resnet18", 21).train()
    losses = model(torch.randn(2, 3, 300, 300), [_target([], []), _target([], [])])
    assert set(losses) == {"bbox_regression", "classification"}
    assert all(v.dim() == 0 and torch.isfinite(v) and v.item() == 0.0 for v in losses.values())


def _synthetic_batch():
    """Two 300x300 noise images with 3 and 2 solid rectangles; colour encodes the class."""
    colours = {1: (1.0, 0.1, 0.1), 2: (0.1, 1.0, 0.1), 3: (0.1, 0.1, 1.0)}
    objects = [[((30, 40, 130, 160), 1), ((170, 60, 270, 140), 2), ((80, 200, 220, 280), 3)],
               [((20, 20, 110, 110), 2), ((150, 130, 280, 270), 1)]]
    images = torch.rand(2, 3, 300, 300, generator=torch.Generator().manual_seed(0)) * 0.5
    targets = []
    for i, objs in enumerate(objects):
        for (x1, y1, x2, y2), c in objs:
            images[i, :, y1:y2, x1:x2] = torch.tensor(colours[c])[:, None, None]
        targets.append(_target([b for b, _ in objs], [c for _, c in objs]))
    return (images - IMAGENET_MEAN) / IMAGENET_STD, targets


def _voc07_ap(detections, targets, cls: int) -> float:
    """11-point VOC07 AP of one class: greedy matching by score, IoU > 0.5, no difficult boxes."""
    records = []  # (score, is_tp)
    npos = 0
    for det, tgt in zip(detections, targets):
        gt = tgt["boxes"][tgt["labels"] == cls]
        npos += len(gt)
        sel = det["labels"] == cls
        boxes, scores = det["boxes"][sel], det["scores"][sel]
        order = scores.argsort(descending=True)
        used = torch.zeros(len(gt), dtype=torch.bool)
        for j in order.tolist():
            iou = box_iou(boxes[j:j + 1], gt)[0] if len(gt) else torch.zeros(0)
            best = int(iou.argmax()) if len(gt) else -1
            tp = best >= 0 and iou[best] > 0.5 and not used[best]
            if tp:
                used[best] = True
            records.append((float(scores[j]), tp))
    records.sort(key=lambda r: -r[0])
    tp = np.cumsum([r[1] for r in records])
    fp = np.cumsum([not r[1] for r in records])
    recall, precision = tp / npos, tp / np.maximum(tp + fp, 1e-12)
    return float(np.mean([precision[recall >= t].max() if (recall >= t).any() else 0.0
                          for t in np.arange(0.0, 1.1, 0.1)]))


def test_voc07_ap_helper_by_hand():
    targets = [_target([[0, 0, 10, 10], [20, 20, 30, 30]], [1, 1])]
    # TP (0.9), FP (0.8, duplicate of the used box), TP (0.7): P/R = 1/.5, .5/.5, .67/1.
    dets = [{"boxes": torch.tensor([[0, 0, 10, 10], [0, 0, 10, 10], [20, 20, 30, 30.]]),
             "scores": torch.tensor([0.9, 0.8, 0.7]), "labels": torch.tensor([1, 1, 1])}]
    assert _voc07_ap(dets, targets, 1) == pytest.approx((6 * 1.0 + 5 * 2 / 3) / 11)


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["resnet18", "resnet18_lga"])  # + the LGA paper's placement
def test_overfit_one_batch_then_detect(backbone):
    torch.manual_seed(0)
    images, targets = _synthetic_batch()
    model = build_ssd(backbone, 4).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    totals = []
    for _ in range(30):  # 20 already suffice (AP 1.0 for model seeds 0, 1, 2)
        losses = model(images, targets)
        total = losses["bbox_regression"] + losses["classification"]
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        totals.append(total.item())
    assert all(math.isfinite(t) for t in totals)
    assert totals[-1] < 0.1 * totals[0], totals  # ~32 -> ~0.06 in practice
    # Batch 2 in train mode normalises with batch statistics; re-estimate the running statistics
    # on this batch (cumulative average) so eval mode sees (nearly) the same normalisation.
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None
    with torch.no_grad():
        model.head_outputs(images)
    model.eval()
    detections = model(images)
    aps = [_voc07_ap(detections, targets, c) for c in (1, 2, 3)]
    assert min(aps) > 0.9, aps


def test_eval_output_format(ssd18):
    images = torch.randn(2, 3, 300, 300)
    with torch.no_grad():
        head = ssd18.head_outputs(images)
    for det in ssd18.postprocess(head):  # untrained: ~1/21 scores everywhere, so the cap bites
        assert len(det["boxes"]) == 200 and det["labels"].dtype == torch.int64
        assert (det["scores"] > 0.01).all() and (det["scores"][:-1] >= det["scores"][1:]).all()
        assert det["labels"].min() >= 1 and det["labels"].max() <= 20
        b = det["boxes"]
        assert (b >= 0).all() and (b <= 300).all() and (b[:, 2:] >= b[:, :2]).all()
    ssd18.topk_candidates, ssd18.score_thresh = 1, 0.0
    try:  # one candidate per class, so at most one detection per label
        for det in ssd18.postprocess(head):
            assert len(det["labels"].unique()) == len(det["labels"]) <= 20
    finally:
        ssd18.topk_candidates, ssd18.score_thresh = 400, 0.01


def test_postprocess_by_hand(ssd18):
    # All anchors background except: 8728 (18, 18, 282, 282) and 8729 (its 288-px neighbour,
    # IoU 264^2 / 288.37^2 = 0.84 > 0.45) for class 2, anchor 0 (-11, -11, 19, 19) for class 5.
    logits = torch.full((1, 8732, 21), -10.0)
    logits[..., 0] = 10.0
    logits[0, 8728, 2], logits[0, 8729, 2], logits[0, 0, 5] = 20.0, 19.0, 19.8
    logits[0, 8729, 7] = 19.5  # same box, other class: survives the per-class NMS
    head = {"cls_logits": logits, "bbox_regression": torch.zeros(1, 8732, 4)}
    det = ssd18.postprocess(head)[0]
    assert det["labels"].tolist() == [2, 5, 7]
    assert det["default_box"].tolist() == [8728, 0, 8729]  # where each detection came from
    # Softmax against background at 10 (the other classes at -10 add < 1e-12).
    expected_scores = [1 / (1 + math.exp(-10)), 1 / (1 + math.exp(-9.8)),
                       1 / (1 + math.exp(-0.5) + math.exp(-9.5))]
    torch.testing.assert_close(det["scores"], torch.tensor(expected_scores))
    s_prime = math.sqrt(264.0 * 315.0) / 2
    expected = torch.tensor([[18.0, 18, 282, 282], [0, 0, 19, 19],
                             [150 - s_prime, 150 - s_prime, 150 + s_prime, 150 + s_prime]])
    torch.testing.assert_close(det["boxes"], expected, rtol=0, atol=1e-3)
    # To a 600 (h) x 450 (w) original: x * 1.5, y * 2, then clipped to [0, 450] x [0, 600].
    det = ssd18.postprocess(head, original_sizes=[(600, 450)])[0]
    expected = torch.tensor([[27.0, 36, 423, 564], [0, 0, 28.5, 38]])
    torch.testing.assert_close(det["boxes"][:2], expected)


def test_torchvision_resnet_backbone_and_bad_arguments(ssd18):
    backbone = tv_resnet18()
    with pytest.raises(ValueError, match="num_classes=None"):
        SSD300(backbone, 21)
    backbone.fc = nn.Identity()  # no out_channels attribute: channels are measured
    assert SSD300(backbone, 21).out_channels == [128, 256, 512, 512, 256, 256]
    with pytest.raises(ValueError, match="valid names.*resnet50"):
        build_ssd("nonexistent", 21)
    with pytest.raises(ValueError, match="image_size"):
        build_ssd("resnet18", 21, image_size=512)
    with pytest.raises(ValueError, match="num_classes"):
        build_ssd("resnet18", 1)
    with pytest.raises(ValueError, match=r"images: expected a \(B, 3, 300, 300\)"):
        ssd18(torch.zeros(1, 3, 320, 320))
    ssd18.train()
    try:
        images = torch.zeros(1, 3, 300, 300)
        # Training mode computes losses: without targets it is an error, raised before the
        # network runs (a detection pass in training mode would move BatchNorm's statistics).
        before = ssd18.backbone.bn1.running_mean.clone()
        with pytest.raises(ValueError, match=r"training mode .* needs targets.*model\.eval\(\)"):
            ssd18(images)
        assert torch.equal(ssd18.backbone.bn1.running_mean, before)
        with pytest.raises(ValueError, match=r"targets\[0\]\['labels'\]: must lie in 1..20"):
            ssd18(images, [_target([[0, 0, 10, 10]], [21])])
        with pytest.raises(ValueError, match=r"targets\[0\]\['boxes'\]: every box"):
            ssd18(images, [_target([[5, 0, 5, 10]], [1])])
    finally:
        ssd18.eval()


def test_build_ssd_loads_backbone_weights(tmp_path):
    source = tv_resnet18()  # torchvision parameter names, as the ImageNet files have
    torch.save(source.state_dict(), tmp_path / "r18.pth")
    model = build_ssd("da_resnet18", 21, pretrained=str(tmp_path / "r18.pth"))
    assert torch.equal(model.backbone.conv1.weight, source.conv1.weight)
    assert torch.equal(model.backbone.layer4[1].bn2.running_var, source.layer4[1].bn2.running_var)

