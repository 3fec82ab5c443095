"""The attention modules as they were before issue 24, kept as the reference that the float64
equality tests (tests/test_models_attention_exact.py) and the "before" column of
``tools/benchmark.py modules --before`` compare the rewritten modules with.

A verbatim copy of ``ssd_da/models/attention.py`` (DA, SE, ECA, SGE, CBAM) and
``ssd_da/models/attention_ops.py`` at commit e331ba3; used only by the benchmarks and the tests.
The parameter names are the library's, so ``load_state_dict`` moves weights between the two.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

from ssd_da.models import attention
from ssd_da.models.attention import (ECA_RELEASED_KERNEL_SIZES, _check_channels, _check_positive_int,
                                     eca_kernel_size)


def _sum_to(grad: Tensor, shape: Sequence[int]) -> Tensor:
    """Sum ``grad`` over the dimensions where ``shape`` is 1 (undo broadcasting), keepdim."""
    dims = [d for d, (g, s) in enumerate(zip(grad.shape, shape)) if s == 1 and g != 1]
    return grad.sum(dim=dims, keepdim=True) if dims else grad


def _product(x: Tensor, masks: Sequence[Optional[Tensor]]) -> Tensor:
    out = x
    for mask in masks:
        if mask is not None:
            out = out * mask
    return out


class _MaskedProduct(torch.autograd.Function):
    """``x * s * c`` saving x, s, c (no full-size product)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, s: Optional[Tensor], c: Optional[Tensor]) -> Tensor:
        ctx.save_for_backward(x, s, c)
        return _product(x, (s, c))

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], ...]:
        x, s, c = ctx.saved_tensors
        dx = ds = dc = None
        if ctx.needs_input_grad[0]:
            dx = _product(grad, (s, c)).to(x.dtype)
        if s is not None and ctx.needs_input_grad[1]:
            ds = _sum_to(_product(grad, (x, c)), s.shape).to(s.dtype)
        if c is not None and ctx.needs_input_grad[2]:
            dc = _sum_to(_product(grad, (x, s)), c.shape).to(c.dtype)
        return dx, ds, dc


class _ScaledMean(torch.autograd.Function):
    """``(x * w).mean(dims, keepdim=True)`` saving x and w."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor, dims: tuple[int, ...]) -> Tensor:
        ctx.save_for_backward(x, w)
        ctx.dims = dims
        return (x * w).mean(dim=dims, keepdim=True)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], ...]:
        x, w = ctx.saved_tensors
        count = 1
        for d in ctx.dims:
            count *= x.shape[d]
        grad = grad / count
        dx = (grad * w).to(x.dtype) if ctx.needs_input_grad[0] else None
        dw = _sum_to(grad * x, w.shape).to(w.dtype) if ctx.needs_input_grad[1] else None
        return dx, dw, None


class _ScaledAmax(torch.autograd.Function):
    """``(x * w).amax(dim, keepdim=True)`` saving x, w and the (small) result; the gradient goes
    to the maxima, split evenly between ties, as ``torch.amax``'s does."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor, dim: int) -> Tensor:
        out = (x * w).amax(dim=dim, keepdim=True)
        ctx.save_for_backward(x, w, out)
        ctx.dim = dim
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], ...]:
        x, w, out = ctx.saved_tensors
        hit = (x * w == out).to(grad.dtype)
        share = hit * (grad / hit.sum(dim=ctx.dim, keepdim=True))
        dx = (share * w).to(x.dtype) if ctx.needs_input_grad[0] else None
        dw = _sum_to(share * x, w.shape).to(w.dtype) if ctx.needs_input_grad[1] else None
        return dx, dw, None


def masked_product(x: Tensor, spatial: Optional[Tensor] = None, channel: Optional[Tensor] = None) -> Tensor:
    """``x * spatial * channel`` (either mask may be None); backward keeps x and the masks only."""
    return _MaskedProduct.apply(x, spatial, channel)


def scaled_mean(x: Tensor, weight: Tensor, dims: tuple[int, ...]) -> Tensor:
    """``(x * weight).mean(dims, keepdim=True)`` without keeping the full-size product."""
    return _ScaledMean.apply(x, weight, tuple(dims))


def scaled_amax(x: Tensor, weight: Tensor, dim: int) -> Tensor:
    """``(x * weight).amax(dim, keepdim=True)`` without keeping the full-size product."""
    return _ScaledAmax.apply(x, weight, dim)


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


class EfficientChannelAttention(nn.Module):
    """Efficient Channel Attention (Wang et al., CVPR 2020), ``(B, C, H, W) -> same``.

    GAP -> Conv1d(1, 1, k, padding (k-1)//2, no bias) across the channel axis -> sigmoid ->
    x * mask. k parameters per block. Which k:

    * ``eca`` in a ResNet (:meth:`stage_options`): the k of the authors' released models, by
      stage, :data:`ECA_RELEASED_KERNEL_SIZES` (ResNet50 3, 5, 5, 7; ResNet101 3, 3, 5, 7), so
      their checkpoints fit; depths without an entry use the formula;
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


# The registry names of the modules kept here, with the DA order each name selects.
_DA_ORDERS = {"da": "sc", "da_cs": "cs", "da_par": "parallel", "da_s": "s", "da_c": "c"}
_OTHERS = {"se": SqueezeExcitation, "eca": EfficientChannelAttention, "sge": SpatialGroupEnhance,
           "cbam": CBAM}
LEGACY_NAMES = tuple(_DA_ORDERS) + tuple(_OTHERS)


def build_legacy(name: str, channels: int, **kw: Any) -> nn.Module:
    """The pre-issue-24 module registered as ``name`` in ``ssd_da.models.attention.ATTENTIONS``."""
    if name in _DA_ORDERS:
        return DualAttention(channels, order=_DA_ORDERS[name], **kw)
    if name not in _OTHERS:
        raise ValueError(f"no legacy module {name!r}; valid: {list(LEGACY_NAMES)}")
    return _OTHERS[name](channels, **kw)


@contextlib.contextmanager
def legacy_attention() -> Iterator[None]:
    """Inside, ``build_attention`` (and so ``build_ssd``, ``build_resnet``) builds the pre-issue
    modules for ``da``, ``se``, ``eca``, ``sge`` and ``cbam``: the "before" networks of
    ``tools/benchmark.py modules --step``. Same parameter names, so state dicts load."""
    saved = dict(attention.ATTENTIONS)
    attention.ATTENTIONS.update({"da": DualAttention, **_OTHERS})
    try:
        yield
    finally:
        attention.ATTENTIONS.clear()
        attention.ATTENTIONS.update(saved)
