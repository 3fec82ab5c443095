"""Attention modules that fit the one attention slot of a residual block.

Every module here is built as ``Module(channels, **options)`` and maps a feature map
``(B, C, H, W)`` to a tensor of the same shape, so ``ssd_da.models.resnet`` can place any of them
after the block's last BatchNorm and before the shortcut addition (the SE-ResNet placement, which
the DA paper follows; see docs/method.md, "Placement").

Variants come from the plain dict :data:`ATTENTIONS`; :func:`build_attention` looks a name up and
checks the options against the module's constructor.
"""
from __future__ import annotations

import inspect
import math

import torch
from torch import Tensor, nn

from ssd_da.models.attention_extra import MultiHeadSelfAttention, ShuffleAttention
from ssd_da.models.attention_ops import masked_product, scaled_amax, scaled_mean
from ssd_da.models.lga import GlobalAttention, LocalAttention, LocalGlobalAttention
from ssd_da.models.names import ATTENTION_INITS

__all__ = [
    "ATTENTIONS", "build_attention", "eca_kernel_size", "NoAttention", "DualAttention",
    "DualAttentionCS", "DualAttentionParallel", "DualAttentionSpatial", "DualAttentionChannel",
    "SqueezeExcitation", "EfficientChannelAttention", "EfficientChannelAttentionAdaptive",
    "ECA_RELEASED_KERNEL_SIZES", "attention_stage_options", "SpatialGroupEnhance", "CBAM",
    "ATTENTION_INITS", "IdentityStart",
]


def _check_positive_int(value: int, option: str, module: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{module}: {option} must be a positive int, got {value!r}")


def _check_channels(channels: int, module: str) -> None:
    _check_positive_int(channels, "channels", module)


class NoAttention(nn.Identity):
    """Identity: the plain ResNet block. Has no parameters, so state-dict keys stay torchvision's.

    Args:
        channels: accepted for the common interface and otherwise ignored.
    """

    def __init__(self, channels: int) -> None:
        _check_channels(channels, "none")
        super().__init__()


# --------------------------------------------------------------------------------------------
# DA: the paper's dual attention (section II)
# --------------------------------------------------------------------------------------------
class _SpatialMask(nn.Module):
    """DA spatial branch (paper section II.A, Fig. 2): the mask, ``(B, C, H, W) -> (B, 1, H, W)``.

    Mean over channels, then a 3x3 conv and a 3x3 conv with dilation ("expansion rate") 3 in
    parallel, concatenated to ``(B, 2, H, W)``, fused by a 1x1 conv, sigmoid. All three convs are
    bias-free: 9 + 9 + 2 = 20 parameters, the only budget Table II leaves per block.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, kernel_size=3, padding=1, bias=False)
        # Same output size as the plain conv: padding = dilation * (k - 1) / 2 = 3.
        self.conv_dilated = nn.Conv2d(1, 1, kernel_size=3, padding=3, dilation=3, bias=False)
        self.fuse = nn.Conv2d(2, 1, kernel_size=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.from_mean(x.mean(dim=1, keepdim=True))

    def from_mean(self, m: Tensor) -> Tensor:
        """The mask from the channel mean ``m`` (B, 1, H, W)."""
        both = torch.cat([self.conv(m), self.conv_dilated(m)], dim=1)
        return torch.sigmoid(self.fuse(both))


class _ChannelMask(nn.Module):
    """DA channel branch (paper section II.B, Fig. 3): the mask, ``(B, C, H, W) -> (B, C, 1, 1)``.

    ``sigmoid(GAP(x))``: the paper's "parameterized weighting" must be parameter-free for Table
    II's counts to hold (docs/method.md, "Why 20 parameters per block"). With ``affine=True`` a
    learnable scalar scale and shift (initialised 1 and 0, so the mask starts equal to the
    default) act before the sigmoid:
    ``sigmoid(a * GAP(x) + b)``, 2 parameters -- an ablation, not the paper's count.
    """

    def __init__(self, affine: bool = False) -> None:
        super().__init__()
        self.affine = affine
        if affine:
            self.scale = nn.Parameter(torch.ones(1))
            self.shift = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor) -> Tensor:
        return self.from_pooled(x.mean(dim=(2, 3), keepdim=True))

    def from_pooled(self, pooled: Tensor) -> Tensor:
        """The mask from the spatial mean ``pooled`` (B, C, 1, 1)."""
        if self.affine:
            pooled = pooled * self.scale + self.shift
        return torch.sigmoid(pooled)


class DualAttention(nn.Module):
    """DA attention (the DA paper, section II and Fig. 1), ``(B, C, H, W) -> same``.

    ``order`` selects the Table I arrangement:
      * ``"sc"`` (default, best in Table I: 77.0 mAP): ``y = x * ms(x)``, then ``y * mc(y)``;
      * ``"cs"`` (76.8): ``y = x * mc(x)``, then ``y * ms(y)``;
      * ``"parallel"`` (76.6): both masks from the same input, ``x * ms(x) * mc(x)``;
      * ``"s"`` / ``"c"``: one branch only (spatial: 20 parameters; channel: none).
    ``ms`` is the spatial mask (B, 1, H, W), ``mc`` the channel mask (B, C, 1, 1).

    Args:
        channels: C; DA's parameter count does not depend on it (20 per block, 0 for ``"c"``).
        order: one of ``"sc"``, ``"cs"``, ``"parallel"``, ``"s"``, ``"c"``.
        channel_affine: add the 2-parameter scale/shift before the channel sigmoid (ablation).
        memory_efficient: compute the same function with ``attention_ops``, which keep only
            ``x`` and the masks for backward (one tensor of the block output's size instead of
            two); False runs the plain formulas above (the reference the tests compare with).
    """

    ORDERS = ("c", "cs", "parallel", "s", "sc")

    def __init__(self, channels: int, order: str = "sc", channel_affine: bool = False,
                 memory_efficient: bool = True) -> None:
        super().__init__()
        _check_channels(channels, "DualAttention")
        if order not in self.ORDERS:
            raise ValueError(f"DualAttention: unknown order {order!r}; valid: {list(self.ORDERS)}")
        if order == "s" and channel_affine:
            raise ValueError("DualAttention: channel_affine needs a channel branch (order != 's')")
        self.order = order
        self.memory_efficient = bool(memory_efficient)
        self.spatial = _SpatialMask() if order != "c" else None
        self.channel = _ChannelMask(channel_affine) if order != "s" else None

    def forward(self, x: Tensor) -> Tensor:
        if self.memory_efficient:
            return self._forward_efficient(x)
        if self.order == "sc":
            x = x * self.spatial(x)
            return x * self.channel(x)
        if self.order == "cs":
            x = x * self.channel(x)
            return x * self.spatial(x)
        if self.order == "parallel":
            return x * self.spatial(x) * self.channel(x)
        if self.order == "s":
            return x * self.spatial(x)
        return x * self.channel(x)

    def _forward_efficient(self, x: Tensor) -> Tensor:
        """The same masks and product; reductions of masked x go through scaled_mean."""
        s = c = None
        if self.order == "sc":
            s = self.spatial.from_mean(x.mean(dim=1, keepdim=True))
            c = self.channel.from_pooled(scaled_mean(x, s, (2, 3)))  # GAP of x * s
        elif self.order == "cs":
            c = self.channel.from_pooled(x.mean(dim=(2, 3), keepdim=True))
            s = self.spatial.from_mean(scaled_mean(x, c, (1,)))  # channel mean of x * c
        else:  # parallel, s, c: both masks from x itself
            s = self.spatial.from_mean(x.mean(dim=1, keepdim=True)) if self.spatial is not None else None
            c = self.channel.from_pooled(x.mean(dim=(2, 3), keepdim=True)) if self.channel is not None else None
        return masked_product(x, s, c)


class DualAttentionCS(DualAttention):
    """DA, channel first then spatial (DA paper Table I, 76.8 mAP); see :class:`DualAttention`."""

    def __init__(self, channels: int, channel_affine: bool = False, memory_efficient: bool = True) -> None:
        super().__init__(channels, order="cs", channel_affine=channel_affine,
                         memory_efficient=memory_efficient)


class DualAttentionParallel(DualAttention):
    """DA with both masks from the same input, ``x * ms * mc`` (DA paper Table I, 76.6 mAP)."""

    def __init__(self, channels: int, channel_affine: bool = False, memory_efficient: bool = True) -> None:
        super().__init__(channels, order="parallel", channel_affine=channel_affine,
                         memory_efficient=memory_efficient)


class DualAttentionSpatial(DualAttention):
    """DA's spatial branch alone (DA paper section II.A): 20 parameters."""

    def __init__(self, channels: int, memory_efficient: bool = True) -> None:
        super().__init__(channels, order="s", memory_efficient=memory_efficient)


class DualAttentionChannel(DualAttention):
    """DA's channel branch alone (DA paper section II.B): parameter-free by default."""

    def __init__(self, channels: int, channel_affine: bool = False, memory_efficient: bool = True) -> None:
        super().__init__(channels, order="c", channel_affine=channel_affine,
                         memory_efficient=memory_efficient)


# --------------------------------------------------------------------------------------------
# Comparison modules (DA paper Tables II and III; CBAM from the LGA paper)
# --------------------------------------------------------------------------------------------
class SqueezeExcitation(nn.Module):
    """Squeeze-and-Excitation (Hu et al., CVPR 2018), ``(B, C, H, W) -> same``.

    GAP -> FC C->h -> ReLU -> FC h->C -> sigmoid -> x * mask, with h = max(1, C // reduction).
    The FCs are bias-free 1x1 convs: that gives SE-ResNet50 28,071,976 parameters, the DA paper's
    28.0720M (Table II); with biases it would be 28,088,024.

    Args:
        channels: C.
        reduction: the squeeze ratio r (16 in SE and in the DA paper's comparison).
    """

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        _check_channels(channels, "SqueezeExcitation")
        _check_positive_int(reduction, "reduction", "SqueezeExcitation")
        hidden = max(1, channels // reduction)
        self.fc1 = nn.Conv2d(channels, hidden, kernel_size=1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, channels, kernel_size=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        s = x.mean(dim=(2, 3), keepdim=True)
        return x * torch.sigmoid(self.fc2(self.relu(self.fc1(s))))


def eca_kernel_size(channels: int, gamma: int = 2, b: int = 1) -> int:
    """ECA's adaptive 1-D kernel size (Wang et al., CVPR 2020: k = psi(C)).

    ``t = int(|(log2(C) + b) / gamma|)``; ``k = t`` if t is odd else ``t + 1``; at least 3 (as in
    timm's EcaModule; the floor only matters below 8 channels). E.g. C=64 -> 3, 128..1024 -> 5,
    2048 -> 7.
    """
    _check_channels(channels, "eca_kernel_size")
    t = int(abs((math.log2(channels) + b) / gamma))
    k = t if t % 2 == 1 else t + 1
    return max(3, k)


# k_size by stage (layer1..layer4) of the ECA authors' released ImageNet models, as their names in
# the authors' README (BangguWu/ECANet) spell them: eca_resnet18_k3577, eca_resnet34_k3357,
# eca_resnet50_k3557, eca_resnet101_k3357.
ECA_RELEASED_KERNEL_SIZES: dict[int, tuple[int, int, int, int]] = {
    18: (3, 5, 7, 7), 34: (3, 3, 5, 7), 50: (3, 5, 5, 7), 101: (3, 3, 5, 7)}


class EfficientChannelAttention(nn.Module):
    """Efficient Channel Attention (Wang et al., CVPR 2020), ``(B, C, H, W) -> same``.

    GAP -> Conv1d(1, 1, k, padding (k-1)//2, no bias) across the channel axis -> sigmoid ->
    x * mask. k parameters per block. Which k:

    * ``eca`` in a ResNet (:meth:`stage_options`): the k of the authors' released models, by
      stage, :data:`ECA_RELEASED_KERNEL_SIZES` (ResNet18 3, 5, 7, 7; ResNet34 3, 3, 5, 7;
      ResNet50 3, 5, 5, 7; ResNet101 3, 3, 5, 7), so their checkpoints fit; depths without an
      entry use the formula;
    * ``eca_adaptive``: the paper's formula, :func:`eca_kernel_size` (gamma 2, b 1) of each
      block's C (ResNet50 by stage: 5, 5, 5, 7);
    * built alone, with only C known: the formula; ``kernel_size`` overrides all of these.

    Args:
        channels: C.
        kernel_size: odd 1-D kernel size; ``None`` picks the adaptive size.
    """

    @classmethod
    def stage_options(cls, depth: int) -> list[dict] | None:
        """Options per stage (layer1..layer4) of a ResNet of ``depth``, or None for none."""
        sizes = ECA_RELEASED_KERNEL_SIZES.get(depth)
        return None if sizes is None else [{"kernel_size": k} for k in sizes]

    def __init__(self, channels: int, kernel_size: int | None = None) -> None:
        super().__init__()
        _check_channels(channels, "EfficientChannelAttention")
        k = eca_kernel_size(channels) if kernel_size is None else kernel_size
        if isinstance(k, bool) or not isinstance(k, int) or k < 1 or k % 2 == 0:
            raise ValueError(f"EfficientChannelAttention: kernel_size must be an odd positive int "
                             f"or None, got {kernel_size!r}")
        self.conv = nn.Conv1d(1, 1, kernel_size=k, padding=(k - 1) // 2, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        b, c = x.shape[:2]
        s = x.mean(dim=(2, 3)).view(b, 1, c)  # channels become the 1-D sequence
        return x * torch.sigmoid(self.conv(s)).view(b, c, 1, 1)


class EfficientChannelAttentionAdaptive(EfficientChannelAttention):
    """ECA with the paper's adaptive k = psi(C) in every block (``eca_adaptive``), rather than
    the released models' per-stage k; see :class:`EfficientChannelAttention`."""

    @classmethod
    def stage_options(cls, depth: int) -> list[dict] | None:
        return None


class SpatialGroupEnhance(nn.Module):
    """Spatial Group-wise Enhance (Li, Hu & Yang, arXiv:1905.09646, 2019), ``(B, C, H, W) -> same``.

    Channels split into G groups; per group, the similarity of each position's feature with the
    group's GAP vector is normalised over positions (zero mean, unit std), scaled and shifted by
    per-group ``weight``/``bias`` (shape (1, G, 1, 1), initialised 0 and 1 as in SGE, so every
    position starts with the same gate sigmoid(1)), and gates the group. 2G parameters (128 at
    G=64). ``channels`` must be divisible by ``groups`` (a ``ValueError`` otherwise; every ResNet
    width is a multiple of 64). The std is Bessel-corrected as in SGE's code, except on 1x1 maps,
    where the centred value is 0 and the uncorrected std avoids a 0/0.

    Args:
        channels: C, a multiple of ``groups``.
        groups: G (64 in SGE and in the DA paper's Table III).
        eps: added to the std before dividing.
    """

    def __init__(self, channels: int, groups: int = 64, eps: float = 1e-5) -> None:
        super().__init__()
        _check_channels(channels, "SpatialGroupEnhance")
        _check_positive_int(groups, "groups", "SpatialGroupEnhance")
        if channels % groups != 0:
            valid = [g for g in range(1, channels + 1) if channels % g == 0]
            raise ValueError(f"SpatialGroupEnhance: channels={channels} is not divisible by "
                             f"groups={groups}; valid groups for {channels} channels: {valid}")
        self.groups = groups
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(1, groups, 1, 1))
        self.bias = nn.Parameter(torch.ones(1, groups, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        g = x.reshape(b * self.groups, c // self.groups, h, w)
        sim = (g * g.mean(dim=(2, 3), keepdim=True)).sum(dim=1).reshape(b * self.groups, h * w)
        sim = sim - sim.mean(dim=1, keepdim=True)
        std = sim.std(dim=1, keepdim=True, correction=1 if h * w > 1 else 0) + self.eps
        t = (sim / std).reshape(b, self.groups, h, w) * self.weight + self.bias
        gate = torch.sigmoid(t).reshape(b * self.groups, 1, h, w)
        return (g * gate).reshape(b, c, h, w)


class CBAM(nn.Module):
    """Convolutional Block Attention Module (Woo et al., ECCV 2018), ``(B, C, H, W) -> same``.

    Channel gate: a shared MLP C->h->C (ReLU, h = max(1, C // reduction)) on the avg- and the
    max-pooled vectors, summed, sigmoid. Then spatial gate: [max, mean] over channels
    (B, 2, H, W) -> 7x7 conv (no bias, BN follows) -> BN -> sigmoid. The MLP has biases and the
    BN uses ``eps=1e-5, momentum=0.01``, as in the authors' released code (Jongchan/
    attention-module). Parameters: 2*C*h + h + C (MLP) + 98 (conv) + 2 (BN).

    Initialisation, also as that code's ResNet does it (:meth:`reset_parameters`): the spatial
    conv Kaiming-normal with fan-out (std sqrt(2 / (k*k)) for its one output channel), the
    spatial BN's weight 0, and every bias 0 (the MLP's and the BN's); the MLP weights keep
    PyTorch's default. The spatial gate therefore starts at sigmoid(0) = 0.5 at every position.

    Args:
        channels: C.
        reduction: MLP ratio r (16 in CBAM).
        kernel_size: odd spatial kernel size (7 in CBAM).
        memory_efficient: keep only x and the masks for backward (``attention_ops``) rather
            than x and the channel-gated x; False runs the plain formulas.
    """

    def __init__(self, channels: int, reduction: int = 16, kernel_size: int = 7,
                 memory_efficient: bool = True) -> None:
        super().__init__()
        _check_channels(channels, "CBAM")
        _check_positive_int(reduction, "reduction", "CBAM")
        _check_positive_int(kernel_size, "kernel_size", "CBAM")
        if kernel_size % 2 == 0:
            raise ValueError(f"CBAM: kernel_size must be odd, got {kernel_size}")
        hidden = max(1, channels // reduction)
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True),
                                 nn.Linear(hidden, channels))
        self.spatial_conv = nn.Conv2d(2, 1, kernel_size, padding=(kernel_size - 1) // 2, bias=False)
        self.spatial_bn = nn.BatchNorm2d(1, eps=1e-5, momentum=0.01)
        self.memory_efficient = bool(memory_efficient)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The released code's init (class docstring). Its ResNet applies it by key name after
        building the model; here the module does it itself, since our ResNet leaves the
        attention slot's init to the module."""
        nn.init.kaiming_normal_(self.spatial_conv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.spatial_bn.weight)
        nn.init.zeros_(self.spatial_bn.bias)
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor) -> Tensor:
        avg = self.mlp(x.mean(dim=(2, 3)))
        mx = self.mlp(x.amax(dim=(2, 3)))
        gate = torch.sigmoid(avg + mx)[:, :, None, None]
        if self.memory_efficient:  # pool x * gate without keeping it
            pooled = torch.cat([scaled_amax(x, gate, 1), scaled_mean(x, gate, (1,))], dim=1)
            return masked_product(x, torch.sigmoid(self.spatial_bn(self.spatial_conv(pooled))), gate)
        x = x * gate
        pooled = torch.cat([x.amax(dim=1, keepdim=True), x.mean(dim=1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.spatial_bn(self.spatial_conv(pooled)))


ATTENTIONS: dict[str, type[nn.Module]] = {
    "none": NoAttention,
    "da": DualAttention,
    "da_cs": DualAttentionCS,
    "da_par": DualAttentionParallel,
    "da_s": DualAttentionSpatial,
    "da_c": DualAttentionChannel,
    "se": SqueezeExcitation,
    "eca": EfficientChannelAttention,
    "eca_adaptive": EfficientChannelAttentionAdaptive,
    "sge": SpatialGroupEnhance,
    "cbam": CBAM,
    # The LGA paper's module, its LA/GA ablations and its other comparison modules (Tables
    # 3-5; ssd_da/models/lga.py and attention_extra.py). The paper places them once, after the
    # last stage: see the end-of-backbone slot in ssd_da/models/resnet.py.
    "lga": LocalGlobalAttention,
    "la": LocalAttention,
    "ga": GlobalAttention,
    "mhsa": MultiHeadSelfAttention,
    "sa": ShuffleAttention,
}


class IdentityStart(nn.Module):
    """``y = x + gate * (module(x) - x)`` with one scalar ``gate`` initialised to 0,
    ``(B, C, H, W) -> same``: an exact identity at the start, the wrapped module at gate 1.

    For fair starts from ImageNet weights, which exist only for the plain ResNets: with every
    attention slot an identity, an attention ResNet computes exactly what the plain one does
    until training moves the gates (the ReZero / SkipInit idea of a zero-initialised residual
    scalar, applied to the attention step). The gate is one extra parameter per wrapped module.
    At gate 0 only the gate receives a gradient, ``sum(dL/dy * (module(x) - x))``; the module's
    parameters start learning once the gate has moved.

    Args:
        module: any attention module mapping ``(B, C, H, W)`` to the same shape.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module
        self.gate = nn.Parameter(torch.zeros(()))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.gate * (self.module(x) - x)


def build_attention(name: str, channels: int, init: str = "default", **kw) -> nn.Module:
    """Build attention ``name`` for ``channels`` channels; ``kw`` are the module's options.

    ``init="identity"`` wraps the module in :class:`IdentityStart` (one extra parameter; the
    identity ``"none"`` stays unwrapped); ``"default"`` keeps the module's own initialisation.

    Raises:
        ValueError: unknown name (the message lists the valid names), unknown ``init``, or an
            option the module does not take (the message lists the options it does take).
    """
    if name not in ATTENTIONS:
        raise ValueError(f"unknown attention {name!r}; valid names: {sorted(ATTENTIONS)}")
    if init not in ATTENTION_INITS:
        raise ValueError(f"unknown attention init {init!r}; valid: {list(ATTENTION_INITS)}")
    cls = ATTENTIONS[name]
    params = inspect.signature(cls.__init__).parameters
    accepted = [p for p in params if p not in ("self", "channels")]
    unknown = sorted(set(kw) - set(accepted))
    if unknown:
        raise ValueError(f"attention {name!r} takes no option(s) {unknown}; "
                         f"valid options: {accepted if accepted else 'none'}")
    module = cls(channels, **kw)
    return IdentityStart(module) if init == "identity" and name != "none" else module


def attention_stage_options(name: str, depth: int) -> list[dict]:
    """Per-stage options (layer1..layer4) that attention ``name`` takes in a ResNet of ``depth``:
    four dicts, empty unless the module defines ``stage_options`` (ECA's released k sizes).

    Raises:
        ValueError: unknown name (the message lists the valid names).
    """
    if name not in ATTENTIONS:
        raise ValueError(f"unknown attention {name!r}; valid names: {sorted(ATTENTIONS)}")
    hook = getattr(ATTENTIONS[name], "stage_options", None)
    options = hook(depth) if hook is not None else None
    return [dict(o) for o in options] if options is not None else [{} for _ in range(4)]
