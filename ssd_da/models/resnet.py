"""ResNet18/34/50/101 with one attention slot per residual block (the DA paper, section II).

The layout and parameter names are torchvision's (``conv1, bn1, relu, maxpool, layer1..layer4``,
blocks ``conv1/bn1/conv2/bn2[/conv3/bn3]``, ``downsample.0/.1``, ``avgpool, fc``), so torchvision
ImageNet state dicts load with only the attention keys (``*.attn.*``) missing. Each block gets one
module named ``attn`` from :mod:`ssd_da.models.attention`, applied on the residual branch after the
block's last BatchNorm and before the shortcut addition -- the SE-ResNet placement, which the DA
paper's parameter counts (Table II) fit (docs/method.md). Backbone names are parsed in
:mod:`ssd_da.models.names`.
"""
from __future__ import annotations

import logging

from torch import Tensor, nn

from ssd_da.models.attention import ATTENTIONS, attention_stage_options, build_attention
from ssd_da.models.names import backbone_name, parse_backbone_name

logger = logging.getLogger(__name__)

__all__ = ["BasicBlock", "Bottleneck", "ResNet", "build_resnet", "backbone_features", "STAGES"]


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet18/34), ``(B, inplanes, H, W) -> (B, planes, H/stride, W/stride)``.

    ``out = relu(attn(bn2(conv2(relu(bn1(conv1(x)))))) + shortcut(x))``. The single ``relu``
    module is called twice, as in torchvision (the torchstat-style FLOP counter relies on it).
    """

    expansion = 1
    convs = 2  # weighted layers per block, for the depth: 2 * blocks + 2

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None, attention: str = "none",
                 attn_kwargs: dict | None = None, attention_init: str = "default") -> None:
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.attn = build_attention(attention, planes, init=attention_init, **(attn_kwargs or {}))
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.attn(self.bn2(self.conv2(out)))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride here, torchvision's "v1.5") -> 1x1 (ResNet50/101),
    ``(B, inplanes, H, W) -> (B, 4 * planes, H/stride, W/stride)``; attention after ``bn3``.
    """

    expansion = 4
    convs = 3

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None, attention: str = "none",
                 attn_kwargs: dict | None = None, attention_init: str = "default") -> None:
        super().__init__()
        width = planes
        self.conv1 = _conv1x1(inplanes, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = _conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.attn = build_attention(attention, planes * self.expansion, init=attention_init,
                                    **(attn_kwargs or {}))
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.attn(self.bn3(self.conv3(out)))
        return self.relu(out + identity)


# depth -> (block, blocks per stage), as in He et al. 2016, Table 1 (names.DEPTHS lists the same).
STAGES: dict[int, tuple[type[nn.Module], tuple[int, int, int, int]]] = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
}


class ResNet(nn.Module):
    """ResNet with an attention module in every residual block of layer1..layer4 and/or one
    after layer4.

    The second slot, ``end_attn``, is the LGA paper's placement (one module at the end of the
    backbone, before the neck; docs/lga.md). :meth:`forward_features` returns layer4's map after
    it, so SSD300's 10x10 source map and the classifier's pooling see the attended map. Its keys
    (``end_attn.*``) are, with the per-block ``*.attn.*``, the only ones torchvision's ImageNet
    weights lack.

    Args:
        block: :class:`BasicBlock` or :class:`Bottleneck`.
        layers: number of blocks in layer1..layer4, e.g. ``(3, 4, 6, 3)``.
        attention: a key of :data:`ssd_da.models.attention.ATTENTIONS` (``"none"``: plain ResNet).
        num_classes: size of the classifier; ``None`` builds the detector form, without
            ``avgpool`` and ``fc`` (use :meth:`forward_features`).
        attn_kwargs: options passed to every attention module (e.g. ``{"channel_affine": True}``);
            they override the module's own per-stage options (ECA's released kernel sizes, see
            :func:`~ssd_da.models.attention.attention_stage_options`).
        end_attention: a key of ``ATTENTIONS`` for the module after layer4, ``end_attn``
            (``"none"``: an identity, no parameters).
        end_attn_kwargs: options of that module (e.g. ``{"heads": 8}`` for ``"lga"``).
        attention_init: ``"default"`` (each module's own initialisation) or ``"identity"``
            (every attention module, per-block and ``end_attn``, wrapped in
            :class:`~ssd_da.models.attention.IdentityStart`: the network starts as the plain
            ResNet, one extra parameter per wrapped module).

    Attributes:
        depth: 18, 34, 50, 101, ... (weighted layers: ``convs * sum(layers) + 2``).
        attention: the per-block attention name.
        end_attention: the end-of-backbone attention name.
        layers: blocks per stage.
        out_channels: ``{"layer1": .., "layer2": .., "layer3": .., "layer4": ..}``, e.g.
            ``layer2: 512`` for ResNet50, ``128`` for ResNet18.
    """

    def __init__(self, block: type[nn.Module], layers: tuple[int, ...] | list[int],
                 attention: str = "none", num_classes: int | None = 1000,
                 attn_kwargs: dict | None = None, end_attention: str = "none",
                 end_attn_kwargs: dict | None = None, attention_init: str = "default") -> None:
        super().__init__()
        if block not in (BasicBlock, Bottleneck):
            raise ValueError(f"ResNet: block must be BasicBlock or Bottleneck, got {block!r}")
        if len(layers) != 4 or any(isinstance(n, bool) or not isinstance(n, int) or n < 1
                                   for n in layers):
            raise ValueError(f"ResNet: layers must be 4 positive ints, got {layers!r}")
        for option, value in (("attention", attention), ("end_attention", end_attention)):
            if value not in ATTENTIONS:
                raise ValueError(f"ResNet: unknown {option} {value!r}; "
                                 f"valid names: {sorted(ATTENTIONS)}")
        if num_classes is not None and (isinstance(num_classes, bool)
                                        or not isinstance(num_classes, int) or num_classes < 1):
            raise ValueError(f"ResNet: num_classes must be a positive int or None, "
                             f"got {num_classes!r}")
        self.block = block
        self.layers = tuple(layers)
        self.attention = attention
        self.end_attention = end_attention
        self.depth = block.convs * sum(layers) + 2
        self.num_classes = num_classes
        self._attn_kwargs = dict(attn_kwargs or {})
        self.attention_init = attention_init
        self.inplanes = 64

        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.out_channels: dict[str, int] = {}
        stage_options = attention_stage_options(attention, self.depth)
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), layers), start=1):
            kwargs = {**stage_options[i - 1], **self._attn_kwargs}
            setattr(self, f"layer{i}", self._make_layer(planes, n, 1 if i == 1 else 2, kwargs))
            self.out_channels[f"layer{i}"] = planes * block.expansion
        self.end_attn = build_attention(end_attention, self.out_channels["layer4"],
                                        init=attention_init, **(end_attn_kwargs or {}))
        if num_classes is not None:
            self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
            self.fc = nn.Linear(512 * block.expansion, num_classes)
        self._init_weights()

    @property
    def name(self) -> str:
        """Backbone name as :func:`build_resnet` takes it, e.g. ``"da_resnet50"``."""
        return backbone_name(self.attention, self.depth)

    def _make_layer(self, planes: int, blocks: int, stride: int,
                    attn_kwargs: dict) -> nn.Sequential:
        downsample = None
        out = planes * self.block.expansion
        if stride != 1 or self.inplanes != out:
            downsample = nn.Sequential(_conv1x1(self.inplanes, out, stride), nn.BatchNorm2d(out))
        kw = dict(attention=self.attention, attn_kwargs=attn_kwargs,
                  attention_init=self.attention_init)
        mods = [self.block(self.inplanes, planes, stride, downsample, **kw)]
        self.inplanes = out
        mods += [self.block(self.inplanes, planes, **kw) for _ in range(1, blocks)]
        return nn.Sequential(*mods)

    def _init_weights(self) -> None:
        # torchvision's init (Kaiming normal, fan_out, for convs; BN weight 1, bias 0; Linear keeps
        # PyTorch's default). Attention modules keep their own init (e.g. SGE's weight 0 / bias 1,
        # the DA convs' PyTorch default; LGA's and MHSA's convs PyTorch's default, as in the LGA
        # authors' code), so everything inside an `attn` or `end_attn` slot is skipped.
        for name, m in self.named_modules():
            if {"attn", "end_attn"} & set(name.split(".")):
                continue
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def forward_features(self, x: Tensor) -> dict[str, Tensor]:
        """Feature maps for SSD: ``(B, 3, H, W) -> {"layer2": (B, C2, H/8, W/8),
        "layer3": (B, C3, H/16, W/16), "layer4": (B, C4, H/32, W/32)}`` (sizes rounded up; at
        300x300: 38, 19, 10), with C from :attr:`out_channels`; "layer4" is taken after
        ``end_attn``.
        """
        features = _stages(self, x)
        features["layer4"] = self.end_attn(features["layer4"])
        return features

    def forward(self, x: Tensor) -> Tensor:
        """Classifier: ``(B, 3, H, W) -> (B, num_classes)`` logits."""
        if self.num_classes is None:
            raise RuntimeError(f"{self.name} was built without a classifier (num_classes=None); "
                               "use forward_features(x)")
        return self.fc(self.avgpool(self.forward_features(x)["layer4"]).flatten(1))


def _stages(resnet: nn.Module, x: Tensor) -> dict[str, Tensor]:
    """Stem, then layer1..layer4 of any module with torchvision ResNet's attribute names;
    returns the layer2/3/4 outputs (see :meth:`ResNet.forward_features`)."""
    x = resnet.maxpool(resnet.relu(resnet.bn1(resnet.conv1(x))))
    c2 = resnet.layer2(resnet.layer1(x))
    c3 = resnet.layer3(c2)
    return {"layer2": c2, "layer3": c3, "layer4": resnet.layer4(c3)}


def backbone_features(backbone: nn.Module, x: Tensor) -> dict[str, Tensor]:
    """``backbone.forward_features(x)`` for our :class:`ResNet`; for another module with
    torchvision ResNet's layout (e.g. ``torchvision.models.resnet18()``), the same stages
    called directly, layer4 through its ``end_attn`` if it has one. ``{"layer2", "layer3",
    "layer4"}`` maps, as forward_features."""
    if isinstance(backbone, ResNet):
        return backbone.forward_features(x)
    features = _stages(backbone, x)
    end = getattr(backbone, "end_attn", None)
    if end is not None:
        features["layer4"] = end(features["layer4"])
    return features


def build_resnet(name: str, num_classes: int | None = 1000, attention_init: str = "default",
                 **attn_kw) -> ResNet:
    """Build backbone ``name`` (one of ``ssd_da.models.names.BACKBONE_NAMES``), e.g.
    ``"da_resnet50"``.

    Args:
        name: ``resnet{18,34,50,101}`` or ``{attention}_resnet{18,34,50,101}``.
        num_classes: classifier size (1000: ImageNet form, the one Table II counts);
            ``None``: detector form without ``avgpool``/``fc``.
        attention_init: ``"default"`` or ``"identity"`` (see :class:`ResNet`).
        **attn_kw: options for the attention modules (e.g. ``channel_affine=True`` for ``da``).
    """
    attention, depth = parse_backbone_name(name)
    block, layers = STAGES[depth]
    model = ResNet(block, layers, attention=attention, num_classes=num_classes, attn_kwargs=attn_kw,
                   attention_init=attention_init)
    logger.debug("built %s: %d parameters", name, sum(p.numel() for p in model.parameters()))
    return model
