"""SSD300 on an (attention-)ResNet backbone, built from torchvision's detection blocks.

The DA paper (section III.A) trains "SSD [9] ... on the VOC data set" at 300x300 with the
attention-ResNets as backbone, and shows Grad-CAM at "layer4 2", so the backbone keeps layer4.
Six source maps (docs/method.md, "The detector"):

====  =================================  =====  =====================  ============
map   source                             size   default boxes / loc.   scales (s_k)
====  =================================  =====  =====================  ============
0     layer2                             38x38  4 (ratios 1, 2)        0.10
1     layer3                             19x19  6 (ratios 1, 2, 3)     0.20
2     layer4                             10x10  6                      0.37
3     extra 0 (3x3 s2 p1)                5x5    6                      0.54
4     extra 1 (3x3 s2 p1)                3x3    4                      0.71
5     extra 2 (3x3 s1 p0)                1x1    4                      0.88
====  =================================  =====  =====================  ============

38*38*4 + 19*19*6 + 10*10*6 + 5*5*6 + 3*3*4 + 1*4 = 8732 default boxes, the SSD300 count.
The scales are the SSD paper's VOC sizes (min 30, 60, 111, 162, 213, 264 px, max 60 ... 315 px;
the extra ratio-1 box per location has scale sqrt(s_k * s_{k+1})), as in ssd.pytorch's and
lufficc's VOC configs, with the steps 8, 16, 32, 64, 100, 300 of the original Caffe model.
torchvision's ``ssd300_vgg16`` uses the same steps but COCO's scales (0.07, 0.15, 0.33, ...,
i.e. 21 ... 315 px), not these.

Default-box clipping. We follow torchvision (``DefaultBoxGenerator(clip=True)``): widths and
heights are clamped to [0, 1] of the image in (cx, cy, w, h) space before conversion to xyxy,
and the centres are NOT moved, so a clamped box may still reach past the border (e.g. the 1x1
map's ratio-2 box is 300 x 186.7 px centred at (150, 150)). ssd.pytorch's and lufficc's PriorBox
clamp all four of (cx, cy, w, h) instead. The two differ where a centre lies outside the image:
only on the 10x10 map, whose step 32 puts its last row and column of centres at 9.5 * 32 = 304
px (ssd.pytorch moves them to 300). That is 19 locations x 6 = 114 of the 8732 boxes, shifted
by 4 px in x and/or y (``tests/test_models_ssd.py`` checks the count against a re-derivation).
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.ssd import SSDHead
from torchvision.ops import batched_nms, clip_boxes_to_image

from ssd_da.models.pretrained import PIXEL_OFFSET, PIXEL_SCALE, load_pretrained
from ssd_da.models.resnet import backbone_features, build_resnet
from ssd_da.models.ssd_loss import check_targets, ssd_loss

__all__ = ["SSD300", "build_ssd", "IMAGE_SIZE", "SSD300_ASPECT_RATIOS", "SSD300_SCALES", "SSD300_STEPS",
           "SSD300_FEATURE_SIZES", "DEFAULT_EXTRA_CHANNELS"]

logger = logging.getLogger(__name__)

IMAGE_SIZE = 300  # SSD300: the default boxes and the six map sizes below are defined for it
SSD300_ASPECT_RATIOS: list[list[int]] = [[2], [2, 3], [2, 3], [2, 3], [2], [2]]
SSD300_SCALES: list[float] = [0.1, 0.2, 0.37, 0.54, 0.71, 0.88, 1.05]
SSD300_STEPS: list[int] = [8, 16, 32, 64, 100, 300]
SSD300_FEATURE_SIZES: tuple[int, ...] = (38, 19, 10, 5, 3, 1)
# (reduce, out) channels of the three extra blocks: the SSD paper's conv8_2..conv10_2 pattern
# (Fig. 2: 1x1 reduction, then 3x3; outputs 512, 256, 256).
DEFAULT_EXTRA_CHANNELS: tuple[tuple[int, int], ...] = ((256, 512), (128, 256), (128, 256))
# Variances 0.1 (centre) and 0.2 (size) of the SSD paper, as torchvision's weights 1/variance.
BOX_CODER_WEIGHTS: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)
_BACKBONE_LAYERS = ("layer2", "layer3", "layer4")


def _extra_block(in_channels: int, reduce: int, out: int, stride: int,
                 padding: int) -> nn.Sequential:
    """1x1 reduce -> BN -> ReLU -> 3x3 (stride, padding) -> BN -> ReLU.

    The SSD paper's extra layers (1x1 then 3x3 stride 2) with BatchNorm after every conv, as in
    ResNet-based SSDs (NVIDIA DeepLearningExamples' SSD300 ResNet-50; DSSD, Fu et al. 2017), so
    the extras train like the BN backbone they sit on. Convs before BN carry no bias.
    """
    return nn.Sequential(
        nn.Conv2d(in_channels, reduce, kernel_size=1, bias=False),
        nn.BatchNorm2d(reduce),
        nn.ReLU(inplace=True),
        nn.Conv2d(reduce, out, kernel_size=3, stride=stride, padding=padding, bias=False),
        nn.BatchNorm2d(out),
        nn.ReLU(inplace=True),
    )


def _backbone_channels(backbone: nn.Module) -> list[int]:
    """Channels of layer2/3/4: ``backbone.out_channels`` if it is such a dict, else measured."""
    for name in ("conv1", "bn1", "relu", "maxpool") + ("layer1",) + _BACKBONE_LAYERS:
        if not hasattr(backbone, name):
            raise ValueError(f"backbone: needs torchvision ResNet attributes conv1, bn1, relu, "
                             f"maxpool, layer1..layer4; missing {name!r}")
    fc = getattr(backbone, "fc", None)
    if isinstance(fc, nn.Module) and any(True for _ in fc.parameters()):
        raise ValueError("backbone: has a classifier 'fc' that SSD would never use (unused "
                         "parameters break DDP); build it with num_classes=None")
    out_channels = getattr(backbone, "out_channels", None)
    if isinstance(out_channels, dict) and all(k in out_channels for k in _BACKBONE_LAYERS):
        return [int(out_channels[k]) for k in _BACKBONE_LAYERS]
    was_training = backbone.training
    device = next(backbone.parameters()).device
    backbone.eval()  # eval: the probe must not touch BatchNorm running statistics
    with torch.no_grad():
        feats = backbone_features(backbone, torch.zeros(1, 3, 64, 64, device=device))
    backbone.train(was_training)
    return [f.shape[1] for f in feats.values()]


def _ssd300_default_boxes(generator: DefaultBoxGenerator, image_size: int) -> Tensor:
    """(8732, 4) xyxy default boxes in input pixels, through the generator's public forward."""
    image = ImageList(torch.zeros(1, 3, image_size, image_size), [(image_size, image_size)])
    maps = [torch.zeros(1, 1, s, s) for s in SSD300_FEATURE_SIZES]
    return generator(image, maps)[0]


class SSD300(nn.Module):
    """SSD300 detector: ResNet layer2/3/4 + three extra blocks, torchvision ``SSDHead``.

    Args:
        backbone: a ResNet without classifier (``build_resnet(name, num_classes=None)``), or
            any module with torchvision ResNet's layout (see ``backbone_features``).
        num_classes: number of classes including background (VOC: 21).
        extra_channels: (reduce, out) channels of the three extra blocks (5x5, 3x3, 1x1 maps).
        score_thresh: minimum class score of a detection (SSD paper: 0.01).
        nms_thresh: IoU threshold of the per-class NMS (SSD paper: 0.45).
        detections_per_img: detections kept per image after NMS (SSD paper: 200).
        topk_candidates: best-scoring boxes kept per class before NMS (torchvision: 400).
        iou_thresh: default box / ground-truth matching threshold (SSD paper: 0.5).
        neg_to_pos_ratio: hard negatives per positive in the confidence loss (SSD paper: 3).
        image_size: input side; the default-box recipe is SSD300's, so only 300 is accepted.

    Training needs at least 2 images per batch (per device): the last extra block's BatchNorm
    sees a 1x1 map, and BatchNorm cannot normalise a single value per channel.
    """

    def __init__(self, backbone: nn.Module, num_classes: int,
                 extra_channels: Sequence[Sequence[int]] = DEFAULT_EXTRA_CHANNELS,
                 score_thresh: float = 0.01, nms_thresh: float = 0.45,
                 detections_per_img: int = 200, topk_candidates: int = 400,
                 iou_thresh: float = 0.5, neg_to_pos_ratio: float = 3.0,
                 image_size: int = 300) -> None:
        super().__init__()
        _check_args(num_classes, extra_channels, image_size,
                    {"score_thresh": score_thresh, "nms_thresh": nms_thresh,
                     "iou_thresh": iou_thresh},
                    {"detections_per_img": detections_per_img, "topk_candidates": topk_candidates})
        if neg_to_pos_ratio <= 0:
            raise ValueError(f"neg_to_pos_ratio: must be > 0, got {neg_to_pos_ratio}")
        self.backbone = backbone
        self.num_classes = num_classes
        self.image_size = image_size
        self.score_thresh, self.nms_thresh, self.iou_thresh = score_thresh, nms_thresh, iou_thresh
        self.detections_per_img, self.topk_candidates = detections_per_img, topk_candidates
        self.neg_to_pos_ratio = float(neg_to_pos_ratio)

        channels = _backbone_channels(backbone)
        in_ch, blocks = channels[-1], []
        # 10 -> 5 and 5 -> 3 with k3 s2 p1; 3 -> 1 with k3 s1 p0 (as the SSD paper's conv11_2).
        for (reduce, out), (stride, padding) in zip(extra_channels, ((2, 1), (2, 1), (1, 0))):
            blocks.append(_extra_block(in_ch, int(reduce), int(out), stride, padding))
            in_ch = int(out)
        self.extras = nn.ModuleList(blocks)
        self._init_extras()
        self.out_channels: list[int] = channels + [int(out) for _, out in extra_channels]

        self.anchor_generator = DefaultBoxGenerator(SSD300_ASPECT_RATIOS, scales=SSD300_SCALES,
                                                    steps=SSD300_STEPS, clip=True)
        num_anchors = self.anchor_generator.num_anchors_per_location()
        # SSDHead: one 3x3 conv per map for classes and one for offsets, xavier-initialised.
        self.head = SSDHead(self.out_channels, num_anchors, num_classes)
        self.box_coder = BoxCoder(weights=BOX_CODER_WEIGHTS)
        # Fixed 300x300 input, so the default boxes are computed once; not saved in checkpoints.
        boxes = _ssd300_default_boxes(self.anchor_generator, image_size)
        self.register_buffer("default_boxes", boxes, persistent=False)
        # uint8 batches are normalised here, on the device, as x * scale - offset per channel:
        # the loader then moves a quarter of float32's bytes (ssd_da.data.augment, "uint8").
        for name, values in (("pixel_scale", PIXEL_SCALE), ("pixel_offset", PIXEL_OFFSET)):
            self.register_buffer(name, torch.tensor(values).view(1, 3, 1, 1), persistent=False)
        self._network = self._run_network  # replaced by compile_network()

    def _init_extras(self) -> None:
        """He init for the extra convs (they feed ReLU), as torchvision inits ResNet convs."""
        for module in self.extras.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def feature_maps(self, images: Tensor) -> list[Tensor]:
        """(B, 3, 300, 300) -> six maps (B, C_k, S_k, S_k), S_k = 38, 19, 10, 5, 3, 1."""
        features = list(backbone_features(self.backbone, images).values())
        x = features[-1]
        for block in self.extras:
            x = block(x)
            features.append(x)
        return features

    def head_outputs(self, images: Tensor) -> dict[str, Tensor]:
        """Raw differentiable outputs: ``cls_logits`` (B, 8732, num_classes) and
        ``bbox_regression`` (B, 8732, 4) offsets relative to ``default_boxes`` (BoxCoder
        weights 10, 10, 5, 5). Used by forward, Grad-CAM and the FLOP counter."""
        self._check_images(images)
        outputs = self._network(images)
        if outputs["cls_logits"].shape[1] != self.default_boxes.shape[0]:
            raise RuntimeError(f"head produced {outputs['cls_logits'].shape[1]} boxes per image, "
                               f"expected {self.default_boxes.shape[0]}: backbone strides differ "
                               f"from ResNet's (maps must be {SSD300_FEATURE_SIZES})")
        return outputs

    def _run_network(self, images: Tensor) -> dict[str, Tensor]:
        if images.dtype == torch.uint8:
            images = images.float() * self.pixel_scale - self.pixel_offset
        return self.head(self.feature_maps(images))

    def compile_network(self, **options) -> None:
        """``torch.compile`` the network (uint8 normalisation, backbone, extras, head) with
        ``options`` (default ``dynamic=False``); the loss and post-processing stay eager (their
        shapes vary with the targets and the detections). Parameter names and checkpoints are
        unchanged.

        One graph for training and one for evaluation, each of one fixed batch size: the
        training loader drops its last incomplete batch, and an evaluation batch smaller than
        the largest one seen is padded with zero images up to it (:meth:`_run_compiled`)
        instead of compiled again (issue 20: the last batch of a split cost a third compile).
        Padding rather than a dynamic batch dimension keeps every shape static, which gives
        the fastest kernels (and allows CUDA graphs); it costs one batch's compute at most per
        evaluation."""
        options.setdefault("dynamic", False)
        self._compiled = torch.compile(self._run_network, **options)
        self._eval_batch = 0
        self._network = self._run_compiled

    def _run_compiled(self, images: Tensor) -> dict[str, Tensor]:
        """The compiled network on ``images`` (B, 3, S, S); in eval mode a batch smaller than
        the largest seen runs padded to that size and its outputs are cut back to B. BatchNorm
        in eval mode uses its running statistics, so the zero images change no other output."""
        count = images.shape[0]
        if self.training or count >= self._eval_batch:
            if not self.training:
                self._eval_batch = count
            return self._compiled(images)
        outputs = self._compiled(_pad_batch(images, self._eval_batch))
        return {key: value[:count] for key, value in outputs.items()}

    def forward(self, images: Tensor, targets: Optional[list[dict[str, Tensor]]] = None,
                original_sizes: Optional[list[tuple[int, int]]] = None
                ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        """Losses in training mode, detections in eval mode (as torchvision's detectors).

        Args:
            images: (B, 3, 300, 300) float, ImageNet-normalised, or uint8 RGB pixels
                (normalised here, on the images' device).
            targets: training mode only, and required there: B dicts, ``boxes`` (N, 4) float
                xyxy in the 300x300 input's pixels and ``labels`` (N,) int64 in
                1..num_classes-1; N may be 0. Ignored in eval mode.
            original_sizes: eval mode: optional B (height, width) pairs to rescale detections to.

        Returns:
            training: ``{"bbox_regression": scalar, "classification": scalar}``;
            eval: see :meth:`postprocess`.

        Raises:
            ValueError: training mode without targets (a silent detection pass would update the
                BatchNorm running statistics), or malformed targets; both before the network runs.
        """
        if self.training:
            if targets is None:
                raise ValueError("targets: SSD300 in training mode computes losses and needs "
                                 "targets; call model.eval() for detections")
            check_targets(targets, self.num_classes, images.shape[0])
            return self.compute_loss(self.head_outputs(images), targets)
        return self.postprocess(self.head_outputs(images), original_sizes)

    def compute_loss(self, head_outputs: dict[str, Tensor],
                     targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """SSD multibox loss of :meth:`head_outputs` (see :mod:`ssd_da.models.ssd_loss`); the one
        loss path, which ``forward`` takes in training mode. Targets as in :meth:`forward`,
        already checked (``check_targets``)."""
        return ssd_loss(head_outputs["cls_logits"], head_outputs["bbox_regression"], targets,
                        self.default_boxes, self.box_coder, self.iou_thresh, self.neg_to_pos_ratio)

    def decode(self, head_outputs: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Class probabilities and boxes of every default box: ``(scores (B, A, num_classes)``
        softmax over all classes, background in column 0; ``boxes (B, A, 4)`` xyxy in the
        300x300 input's pixels, clipped to it). A = 8732. Used by :meth:`postprocess` and by
        Grad-CAM, so both see the same numbers."""
        cls_logits, regression = head_outputs["cls_logits"], head_outputs["bbox_regression"]
        batch, num_anchors, _ = cls_logits.shape
        scores = F.softmax(cls_logits.float(), dim=-1)
        anchors = self.default_boxes.float().repeat(batch, 1)
        boxes = self.box_coder.decode_single(regression.float().reshape(-1, 4), anchors)
        size = (self.image_size, self.image_size)
        return scores, clip_boxes_to_image(boxes, size).view(batch, num_anchors, 4)

    @torch.no_grad()
    def postprocess(self, head_outputs: dict[str, Tensor],
                    original_sizes: Optional[list[tuple[int, int]]] = None
                    ) -> list[dict[str, Tensor]]:
        """Decode, threshold, per-class top-k and NMS (SSD paper section 3 / torchvision SSD).

        Returns B dicts: ``boxes`` (K, 4) float xyxy, ``scores`` (K,) descending, ``labels`` (K,)
        int64 in 1..num_classes-1, ``default_box`` (K,) int64 index into :attr:`default_boxes`
        of the box each detection was decoded from; K <= detections_per_img. Boxes are in the
        300x300 input's pixels clipped to [0, 300], or, with ``original_sizes`` [(h, w), ...],
        as :meth:`rescale_boxes` maps them.
        """
        if original_sizes is not None and len(original_sizes) != len(head_outputs["cls_logits"]):
            raise ValueError(f"original_sizes: got {len(original_sizes)} sizes for "
                             f"{len(head_outputs['cls_logits'])} images")
        scores, boxes = self.decode(head_outputs)
        scores = scores[:, :, 1:]  # background column dropped: labels are column + 1
        # Top-k per class over the anchors, then the score threshold: the same set torchvision
        # keeps by thresholding first (top-k of those above threshold).
        top_scores, top_idx = scores.topk(min(self.topk_candidates, scores.shape[1]), dim=1)
        detections = []
        for b in range(len(scores)):
            keep = top_scores[b] > self.score_thresh  # (k, C-1)
            cand_scores = top_scores[b][keep]
            cand_anchors = top_idx[b][keep]
            cand_labels = keep.nonzero()[:, 1] + 1
            cand_boxes = boxes[b, cand_anchors]
            kept = batched_nms(cand_boxes, cand_scores, cand_labels, self.nms_thresh)
            kept = kept[: self.detections_per_img]
            det = {"boxes": cand_boxes[kept], "scores": cand_scores[kept],
                   "labels": cand_labels[kept], "default_box": cand_anchors[kept]}
            if original_sizes is not None:
                det["boxes"] = self.rescale_boxes(det["boxes"], original_sizes[b], b)
            detections.append(det)
        return detections

    def rescale_boxes(self, boxes: Tensor, original_size: tuple[int, int], index: int = 0) -> Tensor:
        """(K, 4) xyxy in input pixels -> xyxy in an (h, w) original image: scaled by
        (w/300, h/300) and clipped to [0, w] x [0, h]. ``index`` names the image in errors."""
        height, width = (int(v) for v in original_size)
        if height <= 0 or width <= 0:
            raise ValueError(f"original_sizes[{index}]: expected positive (height, width), "
                             f"got {tuple(original_size)}")
        scale = boxes.new_tensor([width, height, width, height]) / self.image_size
        return clip_boxes_to_image(boxes * scale, (height, width))

    def _check_images(self, images: Tensor) -> None:
        size = self.image_size
        if images.dim() != 4 or images.shape[1] != 3 or tuple(images.shape[2:]) != (size, size):
            raise ValueError(f"images: expected a (B, 3, {size}, {size}) tensor, got "
                             f"{tuple(images.shape)}")
        if not (images.is_floating_point() or images.dtype == torch.uint8):
            raise ValueError(f"images: expected float (ImageNet-normalised) or uint8 pixels, got "
                             f"{images.dtype}")


def _pad_batch(images: Tensor, size: int) -> Tensor:
    """(B, 3, S, S) -> (size, 3, S, S): the images, then zeros; same dtype, device and memory
    format (a compiled graph is specialised to its input's strides too)."""
    padded = images.new_zeros((size, *images.shape[1:]))
    if images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous():
        padded = padded.contiguous(memory_format=torch.channels_last)
    padded[: images.shape[0]] = images
    return padded


def _check_args(num_classes: int, extra_channels: Sequence[Sequence[int]], image_size: int,
                unit_interval: dict[str, float], positive: dict[str, int]) -> None:
    """ValueError naming the first invalid SSD300 constructor argument."""
    if num_classes < 2:
        raise ValueError(f"num_classes: counts background, so must be >= 2, got {num_classes}")
    if image_size != 300:
        raise ValueError(f"image_size: SSD300's default boxes (steps {SSD300_STEPS}) are defined "
                         f"for 300 only, got {image_size}")
    if len(extra_channels) != 3 or any(len(p) != 2 or min(p) < 1 for p in extra_channels):
        raise ValueError(f"extra_channels: expected three (reduce, out) pairs of positive ints, "
                         f"got {extra_channels}")
    for name, value in unit_interval.items():
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name}: must lie in [0, 1], got {value}")
    for name, value in positive.items():
        if value < 1:
            raise ValueError(f"{name}: must be >= 1, got {value}")


def build_ssd(backbone: str, num_classes: int, pretrained: Optional[str] = None,
              attention_init: str = "default", **kwargs) -> SSD300:
    """SSD300 on ``build_resnet(backbone, num_classes=None)``.

    Args:
        backbone: a name known to ``ssd_da.models.resnet`` (e.g. "resnet50", "da_resnet50");
            unknown names raise ``ValueError`` listing the valid ones.
        num_classes: classes including background (VOC: 21).
        pretrained: ImageNet weights for the backbone, passed to ``load_pretrained``.
        attention_init: "default" (each attention module's own init) or "identity" (every
            module starts as an exact identity; see ``ssd_da.models.attention.IdentityStart``).
        **kwargs: further :class:`SSD300` arguments (thresholds, extra_channels, ...).
    """
    resnet = build_resnet(backbone, num_classes=None, attention_init=attention_init)
    if pretrained is not None:
        report = load_pretrained(resnet, pretrained)
        logger.info("loaded backbone weights %s into %s (not loaded: %d attention keys missing, "
                    "%d file keys unused)", pretrained, backbone, len(report.missing),
                    len(report.unexpected))
    return SSD300(resnet, num_classes, **kwargs)
