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

import torch
from torch import Tensor, nn

from ssd_da.models.compared_attention import (  # noqa: F401 (public here too)
    CBAM, ECA_RELEASED_KERNEL_SIZES, EfficientChannelAttention, EfficientChannelAttentionAdaptive,
    MultiHeadSelfAttention, ShuffleAttention, SpatialGroupEnhance, SqueezeExcitation,
    _check_channels, _check_positive_int, eca_kernel_size,
)
from ssd_da.models.attention_ops import masked_product, scaled_mean
from ssd_da.models.fused_gates import conv_taps, gate
from ssd_da.models.lga import GlobalAttention, LocalAttention, LocalGlobalAttention
from ssd_da.models.names import ATTENTION_INITS

__all__ = [
    "ATTENTIONS", "build_attention", "eca_kernel_size", "NoAttention", "DualAttention",
    "DualAttentionCS", "DualAttentionParallel", "DualAttentionSpatial", "DualAttentionChannel",
    "SqueezeExcitation", "EfficientChannelAttention", "EfficientChannelAttentionAdaptive",
    "ECA_RELEASED_KERNEL_SIZES", "attention_stage_options", "SpatialGroupEnhance", "CBAM",
    "ATTENTION_INITS", "IdentityStart",
]


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
        conv = conv_taps if torch.compiler.is_compiling() else (lambda t, layer: layer(t))
        both = torch.cat([conv(m, self.conv), conv(m, self.conv_dilated)], dim=1)
        return torch.sigmoid(conv(both, self.fuse))


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
        if self.memory_efficient and torch.compiler.is_compiling():
            return self._forward_efficient(x)  # inductor plans the passes itself
        if self.memory_efficient:  # eager: the whole gating as one function (fused_gates)
            return gate(x, self.order, self.spatial.from_mean if self.spatial is not None else None,
                        self.channel.from_pooled if self.channel is not None else None,
                        list(self.parameters()))
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
    # 3-5; ssd_da/models/lga.py and compared_attention.py). The paper places them once, after the
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
