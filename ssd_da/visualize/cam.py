"""Grad-CAM for SSD300 detections: which image regions raised a detection's class score.

The DA paper (section III, Figure 5: rows of original | ResNet50 | DA-ResNet50) compares
backbones by Grad-CAM heatmaps at "layer4 2", the last residual block of ResNet50's layer4
(``backbone.layer4.2`` here; for any depth :func:`default_layer` gives ``backbone.layer4[-1]``,
or ``backbone.end_attn`` for a backbone with a module after layer4, e.g. ``resnet18_lga``).
The heatmaps come from the grad-cam package (``pytorch_grad_cam``): it calls ``model(input)``
and back-propagates the sum of target callables applied to each image's output. We wrap the
detector so that its output is the per-default-box class logits ``(B, 8732, C + 1)``, and every
target below is a set of (default box, class) pairs. Grad-CAM back-propagates the sum of their
scores' log-odds, ``log(p / (1 - p))`` with p the softmax score that ``SSD300.postprocess``
reports as the detection score: like p it contrasts the class with background and the other
classes (a raw logit would not), and unlike p it does not saturate near 1 (see
:class:`AnchorScoreTarget`).

Targets (:class:`CamTarget`):

- ``top``: the highest-scoring detection. Per-class NMS always keeps the best box of each class,
  so this is the (default box, class >= 1) pair with the largest softmax score in the image:
  the first detection ``model(...)`` returns.
- ``class`` c: every detection of class c (after NMS, as ``model(...)`` returns them) with score
  >= ``score_thresh``; if there is none, the single best-scoring default box of class c.
- ``box`` (x1, y1, x2, y2 in original-image pixels): the detection of any class with score >=
  ``score_thresh`` whose box has the highest IoU with it; if no such detection overlaps it, the
  default box whose decoded box overlaps it most, with that box's most likely object class.

Each detection carries the index of the default box it was decoded from
(``SSD300.postprocess``'s ``default_box``), and the (default box, class) pairs are scored with
the same ``SSD300.decode`` that postprocessing uses.

Limit of layer4 on SSD: the 38x38 and 19x19 maps are read from layer2 and layer3, before layer4,
so boxes predicted there (objects below ~100 px of the 300 px input) have no gradient at layer4
and give an empty map; a warning names the maps then (:func:`anchor_map_sizes`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus
from torch import Tensor, nn
from torchvision.ops import box_iou

from ssd_da.data.transforms import preprocess
from ssd_da.models.ssd import SSD300_FEATURE_SIZES

__all__ = ["METHODS", "TARGET_KINDS", "CamTarget", "ResolvedTarget", "CamResult", "get_method",
           "block_paths", "default_layer", "resolve_layer", "anchor_map_sizes", "explain",
           "AnchorScoreTarget"]

logger = logging.getLogger(__name__)

# CAM methods by CLI name. EigenCAM (first principal component of the layer's activations)
# ignores the target: its map is the same for every target of an image.
METHODS: dict[str, type] = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "eigencam": EigenCAM}
TARGET_KINDS: tuple[str, ...] = ("top", "class", "box")


def get_method(name: str) -> type:
    """CAM class for ``name`` (a key of :data:`METHODS`); ValueError listing the valid names."""
    if name not in METHODS:
        raise ValueError(f"method: unknown CAM method {name!r}; valid names: {sorted(METHODS)}")
    return METHODS[name]


@dataclass(frozen=True)
class CamTarget:
    """What a heatmap explains: ``kind`` "top", "class" (with ``label`` in 1..C) or "box" (with
    ``box`` xyxy in original-image pixels, 0-based). See the module docstring for the rules."""

    kind: str = "top"
    label: Optional[int] = None
    box: Optional[tuple[float, float, float, float]] = None

    def __post_init__(self) -> None:
        if self.kind not in TARGET_KINDS:
            raise ValueError(f"target: unknown kind {self.kind!r}; "
                             f"valid kinds: {list(TARGET_KINDS)}")
        if self.kind == "class" and (self.label is None or int(self.label) < 1):
            raise ValueError(f"target: kind 'class' needs a label >= 1 (0 is background), "
                             f"got {self.label!r}")
        if self.kind == "box":
            box = self.box
            if box is None or len(box) != 4 or not all(np.isfinite(box)) \
                    or box[2] <= box[0] or box[3] <= box[1]:
                raise ValueError(f"target: kind 'box' needs finite x1,y1,x2,y2 with x2 > x1 "
                                 f"and y2 > y1, got {box!r}")


@dataclass
class ResolvedTarget:
    """The (default box, class) pairs a target resolved to in one image.

    anchors: (K,) int64 default-box indices into ``model.default_boxes`` (0..8731).
    labels: (K,) int64 classes in 1..C. scores: (K,) float softmax scores of those pairs.
    boxes: (K, 4) float xyxy decoded boxes in original-image pixels, 0-based, clipped.
    description: short text for figure titles, e.g. "top: dog 0.91".
    """

    anchors: np.ndarray
    labels: np.ndarray
    scores: np.ndarray
    boxes: np.ndarray
    description: str


@dataclass
class CamResult:
    """cam: (H, W) float32 in [0, 1] at the original image size; target: the resolved target;
    detections: the model's detections of the image (as ``model(...)`` returns them, all scores
    >= the model's own threshold) as numpy: ``boxes`` (K, 4) xyxy original pixels 0-based,
    ``scores`` (K,), ``labels`` (K,) in 1..C, ``default_box`` (K,) default-box indices."""

    cam: np.ndarray
    target: ResolvedTarget
    detections: dict[str, np.ndarray]


def block_paths(model: nn.Module) -> list[str]:
    """Paths of the backbone's residual blocks: ``backbone.layer1.0`` ... ``backbone.layer4.N``."""
    return [f"backbone.layer{i}.{j}" for i in range(1, 5)
            for j in range(len(getattr(model.backbone, f"layer{i}")))]


def default_layer(model: nn.Module) -> str:
    """Layer4's map as SSD reads it: the last residual block of layer4 (the DA paper's
    "layer4 2" for ResNet50, section III; a per-block module such as DA sits inside it), or
    ``backbone.end_attn`` when an end-of-backbone module (``resnet18_lga``...) follows layer4,
    so the heatmap includes what that module does to the map."""
    if getattr(model.backbone, "end_attention", "none") != "none":
        return "backbone.end_attn"
    return f"backbone.layer4.{len(model.backbone.layer4) - 1}"


def resolve_layer(model: nn.Module, path: str) -> nn.Module:
    """The module at ``path`` (``model.get_submodule``); it must lie under ``backbone.`` or
    ``extras.`` (the feature maps). ValueError listing the residual-block paths otherwise."""
    module = None
    if path.startswith(("backbone.", "extras.")):
        try:
            module = model.get_submodule(path)
        except AttributeError:
            module = None
    if module is None:
        raise ValueError(f"layer: {path!r} is not a feature layer of this model; valid residual "
                         f"blocks: {', '.join(block_paths(model))} (or another module path under "
                         f"backbone. / extras., e.g. backbone.layer4 or extras.0)")
    return module


class _LogitModel(nn.Module):
    """(B, 3, 300, 300) -> (B, 8732, C + 1) per-default-box class logits, differentiable."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, images: Tensor) -> Tensor:
        return self.detector.head_outputs(images)["cls_logits"].float()


class AnchorScoreTarget:
    """grad-cam target for one image's (8732, C + 1) logits: the sum over (default box a,
    class c) pairs of the log-odds of the detection score p = softmax(z_a)[c],
    ``log(p / (1 - p)) = z_a[c] - logsumexp_{j != c} z_a[j]``.

    The log-odds is monotone in the score, so it explains the same quantity, but it does not
    saturate: at p = 0.9999 the softmax's gradient is ~1e-4 of its value and Grad-CAM's maps
    (whose min-max scaling adds 1e-7) degrade to noise, while the log-odds' gradient stays O(1).
    """

    def __init__(self, anchors: Sequence[int], labels: Sequence[int]) -> None:
        self.anchors = torch.as_tensor(np.asarray(anchors), dtype=torch.long)
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)

    def __call__(self, output: Tensor) -> Tensor:
        logits = output[self.anchors.to(output.device)]  # (K, C + 1)
        labels = self.labels.to(output.device)
        own = logits.gather(1, labels[:, None])[:, 0]
        is_own = F.one_hot(labels, logits.shape[1]).bool()
        others = logits.masked_fill(is_own, float("-inf")).logsumexp(dim=1)
        return (own - others).sum()


@dataclass
class _Decoded:
    """One image's head outputs, decoded by ``SSD300.decode``: probs (A, C+1); boxes300 (A, 4)
    xyxy input pixels, clipped; dets: ``model.postprocess`` output at the original size, with
    ``boxes300``, the detections' boxes in input pixels, added."""

    probs: Tensor
    boxes300: Tensor
    dets: dict[str, Tensor]


def _decode(model: nn.Module, head: dict[str, Tensor], original_size: tuple[int, int]) -> _Decoded:
    """Softmax, decoded boxes and detections of a batch of one."""
    probs, boxes300 = model.decode(head)
    dets = model.postprocess(head, [original_size])[0]
    dets["boxes300"] = boxes300[0, dets["default_box"]]
    return _Decoded(probs[0], boxes300[0], dets)


def _name(label: int, class_names: Optional[Sequence[str]]) -> str:
    if class_names and 1 <= label <= len(class_names):
        return class_names[label - 1]
    return f"class {label}"


def _resolve_box(model: nn.Module, dec: _Decoded, box: Sequence[float],
                 original_size: tuple[int, int], score_thresh: float) -> tuple[Tensor, Tensor, str]:
    """(anchors, labels, note) for a "box" target; IoU is computed in 300-px input coordinates,
    which scales both axes and so leaves IoU unchanged."""
    height, width = original_size
    size = model.image_size
    query = torch.tensor([box], dtype=torch.float32, device=dec.probs.device)
    query = query * query.new_tensor([size / width, size / height, size / width, size / height])
    keep = dec.dets["scores"] >= score_thresh
    if keep.any():
        ious = box_iou(query, dec.dets["boxes300"][keep])[0]
        best = int(ious.argmax())
        if ious[best] > 0:
            pick = slice(best, best + 1)
            return (dec.dets["default_box"][keep][pick], dec.dets["labels"][keep][pick],
                    f"IoU {float(ious[best]):.2f}")
    ious = box_iou(query, dec.boxes300)[0]
    anchor = ious.argmax().reshape(1)
    label = dec.probs[anchor, 1:].argmax(dim=1) + 1
    return anchor, label, f"default box IoU {float(ious[anchor]):.2f}"


def _resolve(model: nn.Module, dec: _Decoded, target: CamTarget, original_size: tuple[int, int],
             score_thresh: float, class_names: Optional[Sequence[str]]) -> ResolvedTarget:
    num_classes = dec.probs.shape[1]
    if target.kind == "top":
        flat = int(dec.probs[:, 1:].argmax())
        anchors = torch.tensor([flat // (num_classes - 1)], device=dec.probs.device)
        labels = torch.tensor([flat % (num_classes - 1) + 1], device=dec.probs.device)
        note = "top"
    elif target.kind == "class":
        if target.label >= num_classes:
            raise ValueError(f"target: label {target.label} out of range 1..{num_classes - 1}")
        mask = (dec.dets["labels"] == target.label) & (dec.dets["scores"] >= score_thresh)
        if mask.any():
            anchors, labels = dec.dets["default_box"][mask], dec.dets["labels"][mask]
            note = f"{int(mask.sum())} box(es) >= {score_thresh:g}"
        else:
            anchors = dec.probs[:, target.label].argmax().reshape(1)
            labels = torch.tensor([target.label], device=dec.probs.device)
            note = f"best box, none >= {score_thresh:g}"
            logger.warning("no detection of %s has score >= %g; explaining its best-scoring "
                           "default box instead (score %.3f)", _name(target.label, class_names),
                           score_thresh, float(dec.probs[anchors[0], target.label]))
    else:
        anchors, labels, note = _resolve_box(model, dec, target.box, original_size, score_thresh)
    scores = dec.probs[anchors, labels]
    boxes = model.rescale_boxes(dec.boxes300[anchors], original_size)
    best = int(scores.argmax())
    text = f"{_name(int(labels[best]), class_names)} {float(scores[best]):.2f} ({note})"
    return ResolvedTarget(anchors.cpu().numpy(), labels.cpu().numpy(), scores.cpu().numpy(),
                          boxes.cpu().numpy(), text)


def anchor_map_sizes(model: nn.Module, anchors: Sequence[int]) -> list[int]:
    """Side S of the feature map (38, 19, 10, 5, 3, 1) each default box comes from: the 8732
    boxes are laid out map by map, S * S * (boxes per location) each (see ssd.py)."""
    per_map = [s * s * n for s, n in zip(SSD300_FEATURE_SIZES,
                                         model.anchor_generator.num_anchors_per_location())]
    ends = np.cumsum(per_map)
    return [SSD300_FEATURE_SIZES[int(np.searchsorted(ends, int(a), side="right"))] for a in anchors]


def _run_cam(method: str, model: nn.Module, layer: str, x: Tensor,
             target: ResolvedTarget) -> np.ndarray:
    """(S, S) float32 map in [0, 1] from the grad-cam package at the input's size."""
    cam = get_method(method)(model=_LogitModel(model), target_layers=[resolve_layer(model, layer)])
    try:
        with torch.enable_grad():  # callers may hold no_grad; Grad-CAM needs the backward pass
            maps = cam(input_tensor=x, targets=[AnchorScoreTarget(target.anchors, target.labels)])
        grads = cam.activations_and_grads.gradients
        no_gradient = cam.uses_gradients and all(not bool(g.any()) for g in grads)
    finally:
        cam.activations_and_grads.release()  # remove the hooks from the detector
        model.zero_grad(set_to_none=True)
    if no_gradient:
        # SSD reads its 38x38 and 19x19 maps from layer2 and layer3, before layer4: boxes there
        # do not depend on layer4 at all (small objects, below ~100 px of the 300 px input).
        sizes = sorted(set(anchor_map_sizes(model, target.anchors)), reverse=True)
        earlier = "backbone.layer2" if sizes[0] == SSD300_FEATURE_SIZES[0] else "backbone.layer3"
        logger.warning("%s: the target %r comes from the %s feature map(s), which do not depend "
                       "on %s; the map is empty. Use an earlier layer (e.g. %s) or another "
                       "target", method, target.description, ", ".join(f"{s}x{s}" for s in sizes),
                       layer, earlier)
    elif not maps[0].max() > 0:
        # Grad-CAM keeps only positive evidence (ReLU of the weighted activations).
        logger.warning("%s: the map for %r is zero everywhere at %s (only negative evidence "
                       "there); try another layer or method", method, target.description, layer)
    return maps[0]


def explain(model: nn.Module, image: np.ndarray, target: CamTarget = CamTarget(),
            layer: Optional[str] = None, method: str = "gradcam", score_thresh: float = 0.3,
            class_names: Optional[Sequence[str]] = None) -> CamResult:
    """Heatmap of ``target`` for one image, plus the resolved target and the detections.

    Args:
        model: an :class:`~ssd_da.models.ssd.SSD300` (put in eval mode here).
        image: (H, W, 3) uint8 RGB.
        target: what to explain (see :class:`CamTarget`).
        layer: module path of the target layer (default: :func:`default_layer`).
        method: a key of :data:`METHODS`.
        score_thresh: minimum detection score for "class" and "box" targets.
        class_names: the C object-class names, for the description only.
    """
    get_method(method)
    if not 0.0 <= score_thresh <= 1.0:
        raise ValueError(f"score_thresh: must lie in [0, 1], got {score_thresh}")
    layer = layer or default_layer(model)
    resolve_layer(model, layer)  # fail before any computation
    model.eval()
    x = preprocess(image, model.image_size).to(model.default_boxes.device)
    original_size = (int(image.shape[0]), int(image.shape[1]))
    with torch.no_grad():
        dec = _decode(model, model.head_outputs(x), original_size)
    resolved = _resolve(model, dec, target, original_size, score_thresh, class_names)
    heat = torch.from_numpy(np.ascontiguousarray(_run_cam(method, model, layer, x, resolved)))
    # Back to the original size; bilinear interpolation is a convex combination, so [0, 1] holds.
    heat = F.interpolate(heat[None, None].float(), size=original_size, mode="bilinear",
                         align_corners=False)
    cam = heat[0, 0].clamp_(0.0, 1.0).numpy()
    detections = {k: dec.dets[k].cpu().numpy()
                  for k in ("boxes", "scores", "labels", "default_box")}
    return CamResult(cam, resolved, detections)
