"""The LGA paper's other comparison modules (its Tables 3-5): MHSA and Shuffle Attention.

Both follow the attention zoo's interface (:mod:`ssd_da.models.attention`):
``Module(channels, **kw)``, ``(B, C, H, W) -> (B, C, H, W)``.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["MultiHeadSelfAttention", "ShuffleAttention", "sa_default_groups"]


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
