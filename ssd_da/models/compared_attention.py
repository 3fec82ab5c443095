"""The published attention modules DA is compared with: SE, ECA, SGE and CBAM (the DA paper's
Tables II and III; CBAM from the LGA paper), and the LGA paper's other comparison modules (its
Tables 3-5), MHSA and Shuffle Attention. LGA itself: :mod:`ssd_da.models.lga`; DA and the
registry: :mod:`ssd_da.models.attention`.

All follow the attention zoo's interface (:mod:`ssd_da.models.attention`):
``Module(channels, **kw)``, ``(B, C, H, W) -> (B, C, H, W)``.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ssd_da.models.attention_ops import masked_product, scaled_amax, scaled_mean
from ssd_da.models.fused_cbam import cbam_gate
from ssd_da.models.fused_gates import gate
from ssd_da.models.fused_sge import sge_gate

__all__ = ["SqueezeExcitation", "EfficientChannelAttention", "EfficientChannelAttentionAdaptive",
           "ECA_RELEASED_KERNEL_SIZES", "eca_kernel_size", "SpatialGroupEnhance", "CBAM",
           "MultiHeadSelfAttention", "ShuffleAttention", "sa_default_groups"]


def _check_positive_int(value: int, option: str, module: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{module}: {option} must be a positive int, got {value!r}")


def _check_channels(channels: int, module: str) -> None:
    _check_positive_int(channels, "channels", module)


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
        if torch.compiler.is_compiling():  # inductor plans the passes itself
            return x * self.mask(x.mean(dim=(2, 3), keepdim=True))
        return gate(x, "c", channel=self.mask, params=list(self.parameters()))  # fused_gates

    def mask(self, pooled: Tensor) -> Tensor:
        """The channel mask (B, C, 1, 1) from the spatial mean ``pooled`` (B, C, 1, 1)."""
        return torch.sigmoid(self.fc2(self.relu(self.fc1(pooled))))


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
        if torch.compiler.is_compiling():  # inductor plans the passes itself
            return x * self.mask(x.mean(dim=(2, 3), keepdim=True))
        return gate(x, "c", channel=self.mask, params=list(self.parameters()))  # fused_gates

    def mask(self, pooled: Tensor) -> Tensor:
        """The channel mask (B, C, 1, 1) from the spatial mean ``pooled`` (B, C, 1, 1)."""
        b, c = pooled.shape[:2]
        s = pooled.view(b, 1, c)  # channels become the 1-D sequence
        return torch.sigmoid(self.conv(s)).view(b, c, 1, 1)


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
        if not torch.compiler.is_compiling():  # eager: the gating as one function (fused_sge)
            return sge_gate(x, self.weight, self.bias, self.eps, self.groups)
        b, c, h, w = x.shape
        g = x.reshape(b * self.groups, c // self.groups, h, w)
        sim = (g * g.mean(dim=(2, 3), keepdim=True)).sum(dim=1).reshape(b, self.groups, h * w)
        gate = self.mask(sim).reshape(b * self.groups, 1, h, w)
        return (g * gate).reshape(b, c, h, w)

    def mask(self, sim: Tensor) -> Tensor:
        """The gate (B, G, N) from each position's similarity with its group's GAP (B, G, N)."""
        n = sim.shape[2]
        sim = sim - sim.mean(dim=2, keepdim=True)
        std = sim.std(dim=2, keepdim=True, correction=1 if n > 1 else 0) + self.eps
        return torch.sigmoid(sim / std * self.weight.view(1, -1, 1) + self.bias.view(1, -1, 1))


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

    def channel_mask(self, avg: Tensor, mx: Tensor) -> Tensor:
        """The channel gate (B, C) from the average- and the max-pooled x, (B, C) each."""
        return torch.sigmoid(self.mlp(avg) + self.mlp(mx))

    def spatial_mask(self, pooled: Tensor) -> Tensor:
        """The spatial gate (B, 1, H, W) from [max, mean] over channels (B, 2, H, W)."""
        return torch.sigmoid(self.spatial_bn(self.spatial_conv(pooled)))

    def forward(self, x: Tensor) -> Tensor:
        if self.memory_efficient and not torch.compiler.is_compiling():  # eager: fused_cbam
            return cbam_gate(x, self.channel_mask, self.spatial_mask, list(self.parameters()))
        avg = self.mlp(x.mean(dim=(2, 3)))
        mx = self.mlp(x.amax(dim=(2, 3)))
        gate = torch.sigmoid(avg + mx)[:, :, None, None]
        if self.memory_efficient:  # compiled: pool x * gate without keeping it
            pooled = torch.cat([scaled_amax(x, gate, 1), scaled_mean(x, gate, (1,))], dim=1)
            return masked_product(x, torch.sigmoid(self.spatial_bn(self.spatial_conv(pooled))), gate)
        x = x * gate
        pooled = torch.cat([x.amax(dim=1, keepdim=True), x.mean(dim=1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.spatial_bn(self.spatial_conv(pooled)))


def _positive_int(value: object, option: str, module: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{module}: {option} must be a positive int, got {value!r}")
    return value


class MultiHeadSelfAttention(nn.Module):
    """BoTNet-style multi-head self-attention over the H*W positions (Srinivas et al., CVPR
    2021; the MHSA of the LGA paper's comparison), ``(B, C, H, W) -> (B, C, H, W)``.

    q, k, v are 1x1 convs C -> C (with bias); each of the ``heads`` heads attends over all
    N = H*W positions with its C / heads channels: ``softmax(q^T k / sqrt(C / heads)) v``, an
    N x N attention per head. No residual, as in BoTNet, where the module replaces a 3x3 conv,
    and in the LGA authors' configs, where it sits after the last stage. Two choices where the
    LGA authors' copy differs: the energy is scaled by ``(C / heads) ** -0.5`` (Vaswani et al.;
    that copy leaves it unscaled), and there are no relative-position terms (that copy's
    comparison configs switch them off). Parameters: 3 (C^2 + C).

    Args:
        channels: C, divisible by ``heads``.
        heads: attention heads (4, as in BoTNet and the LGA comparison, at every width).
    """

    def __init__(self, channels: int, heads: int = 4) -> None:
        super().__init__()
        _positive_int(channels, "channels", "MultiHeadSelfAttention")
        _positive_int(heads, "heads", "MultiHeadSelfAttention")
        if channels % heads:
            raise ValueError(f"MultiHeadSelfAttention: channels={channels} is not divisible by "
                             f"heads={heads}")
        self.heads = heads
        self.scale = (channels // heads) ** -0.5
        self.query = nn.Conv2d(channels, channels, 1)
        self.key = nn.Conv2d(channels, channels, 1)
        self.value = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape

        def split(t: Tensor) -> Tensor:  # (B, C, H, W) -> (B, heads, C / heads, N)
            return t.reshape(b, self.heads, c // self.heads, h * w)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        energy = torch.matmul(q.transpose(-1, -2), k) * self.scale  # (B, heads, N, N)
        out = torch.matmul(v, energy.softmax(dim=-1).transpose(-1, -2))  # (B, heads, C/h, N)
        return out.reshape(b, c, h, w)


def sa_default_groups(channels: int) -> int:
    """SA-Net's 64 groups, or ``channels // 2`` below 128 channels (one channel per half-group):
    64 -> 32, 128 and wider -> 64. SA-Net uses 64 in ResNet50/101 (256 to 2048 channels)."""
    _positive_int(channels, "channels", "sa_default_groups")
    return max(1, min(64, channels // 2))


class ShuffleAttention(nn.Module):
    """Shuffle Attention (SA-Net, Zhang & Yang, ICASSP 2021), ``(B, C, H, W) -> same``.

    The channels split into G groups, each group into two halves of C / (2G) channels:
    * channel half: ``x * sigmoid(cweight * GAP(x) + cbias)``;
    * spatial half: ``x * sigmoid(sweight * GN(x) + sbias)``, GN a GroupNorm with one channel per
      group (so it normalises each channel over H x W; affine);
    then the halves are concatenated back in group order and the channels shuffled with 2
    groups (channel j of the output is channel ``(j % 2) * C/2 + j // 2`` before the shuffle).
    ``cweight``/``sweight`` start at 0 and ``cbias``/``sbias`` at 1, as in the SA-Net authors'
    code, so every gate starts at sigmoid(1). Parameters: 6 * C / (2G) = 3C / G (24 at C = 512,
    96 at C = 2048 with G = 64).

    Args:
        channels: C, a multiple of 2G.
        groups: G; ``None``: :func:`sa_default_groups` (64 from 128 channels on).
    """

    def __init__(self, channels: int, groups: int | None = None) -> None:
        super().__init__()
        _positive_int(channels, "channels", "ShuffleAttention")
        groups = sa_default_groups(channels) if groups is None else groups
        _positive_int(groups, "groups", "ShuffleAttention")
        if channels % (2 * groups):
            valid = [g for g in range(1, channels // 2 + 1) if channels % (2 * g) == 0]
            raise ValueError(f"ShuffleAttention: channels={channels} is not divisible by "
                             f"2 * groups={2 * groups}; valid groups for {channels} channels: "
                             f"{valid}")
        self.groups = groups
        half = channels // (2 * groups)
        self.cweight = nn.Parameter(torch.zeros(1, half, 1, 1))
        self.cbias = nn.Parameter(torch.ones(1, half, 1, 1))
        self.sweight = nn.Parameter(torch.zeros(1, half, 1, 1))
        self.sbias = nn.Parameter(torch.ones(1, half, 1, 1))
        self.gn = nn.GroupNorm(half, half)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        channel_half, spatial_half = x.reshape(b * self.groups, c // self.groups, h, w).chunk(2, 1)
        gate_c = torch.sigmoid(self.cweight * channel_half.mean(dim=(2, 3), keepdim=True)
                               + self.cbias)
        gate_s = torch.sigmoid(self.sweight * self.gn(spatial_half) + self.sbias)
        out = torch.cat([channel_half * gate_c, spatial_half * gate_s], dim=1)
        # Channel shuffle with 2 groups: (B, 2, C/2, H, W) -> (B, C/2, 2, H, W).
        return out.reshape(b, 2, c // 2, h, w).transpose(1, 2).reshape(b, c, h, w)
