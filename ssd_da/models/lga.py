"""Local-Global Attention (LGA; Shao, "Local-Global Attention: An Adaptive Mechanism for
Multi-Scale Feature Integration", section 3) and its LA / GA ablations (the paper's Tables 3-5).

Every module maps ``(B, D, H, W)`` to the same shape and is built as ``Module(channels, **kw)``,
like the rest of the attention zoo (:mod:`ssd_da.models.attention`). The forward pass, with
``h`` heads, ``head_dim = D / h`` and ``scale = head_dim ** -0.5`` (section 3.2, eqs. 1-2):

1. multi-scale features (3.3, eqs. 3-4): ``Y_i = f_i(X) + X``, i = 1..3, ``f_i`` a depthwise 3x3
   conv with stride ``2**(i-1)``, then a 1x1 conv, brought back to H x W by nearest upsampling
   (the stride and the upsampling are the authors' public code; the text only says "multi-scale");
2. scale weights (3.5, eqs. 5-6): ``alpha = softmax over scales of conv1x1_{D->4}(X)``,
   ``X_w = alpha_0 X + sum_i alpha_i Y_i``;
3. positional encoding (3.4): a learned ``(1, D, 14, 14)`` tensor (size and N(0, 1) init of the
   public code) resized (nearest) to H x W: ``Z = X_w + PE``;
4. local attention (3.6.1, eqs. 7-11): for k in (3, 5, 7), ``Q_k, K_k, V_k = f_k(Z)`` with
   ``f_k`` a depthwise k x k conv then a 1x1 conv D -> 3D grouped by heads;
   ``local_k = softmax(Q_k K_k^T * scale) V_k + X``; ``local = mean_k local_k``;
5. global attention (3.6.2, eqs. 12-13): the same with one kernel of 11;
6. fusion (3.7, eq. 14): ``out = a_local * local + a_global * global``, learnable scalars
   initialised to 0.5;
7. output (3.8, eq. 15): a 1x1 conv D -> D.

Which axis the attention runs over is not in the text. Like the public code, Q, K and V of a head
are ``(head_dim, H*W)`` matrices and the energy ``Q K^T`` is ``head_dim x head_dim``: attention
across the head's channels, with a cost linear in H*W. Two differences from that code, both
documented in ``docs/lga.md`` and shown by ``tests/test_models_lga.py``:

* **The attention is applied.** The public code's second product,
  ``einsum('bhqk,bhvd->bhqd', attention, value)``, sums the attention over ``k`` and the values
  over ``v`` separately; every attention row sums to 1, so its output is the sum of V over the
  head's channels whatever Q and K are, and Q and K receive no gradient. Here the product
  contracts the shared index, ``out[q, n] = sum_k attention[q, k] V[k, n]`` (eqs. 10 and 13).
* **Each head's Q, K, V come from that head's channels.** The public code splits the output of
  its grouped 1x1 conv into thirds (Q, K, V), so Q is computed from the first third of the
  channel groups, K from the middle and V from the last. Here the grouped conv's output group g
  holds ``(q_g, k_g, v_g)``, all from input group g: the same parameter count, wired per head.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LGA_HEAD_DIM", "LGA_AUTHORS_HEAD_DIM", "lga_default_heads", "lga_heads",
           "channel_attention", "LocalGlobalAttention", "LocalAttention", "GlobalAttention"]

# Our default head width: 64 channels per head, so 8 heads at the 512 channels of ResNet18/34
# after layer4 (1,674,246 LGA parameters there). Our choice: the paper leaves the head count
# symbolic (section 3.2, eq. 1). The authors' ResNet18 config (ResNet18+LGA.yaml in their
# repository's history) is `LocalGlobalAttention, [128, 8]` at YOLOv8's width multiplier 0.25:
# 128 channels at P5 in 8 heads of 16 (148,230 parameters); their MobileNetV3 config, [24, 6],
# has heads of 4 (14,358 parameters). SSD300 reads ResNet18's full 512-channel layer4, so their
# width does not carry over; their head width does: ``head_dim=LGA_AUTHORS_HEAD_DIM`` (32 heads
# at 512 channels, 1,379,334 parameters).
LGA_HEAD_DIM = 64
LGA_AUTHORS_HEAD_DIM = 16
PE_SIZE = 14  # the public code's learned positional encoding is 14 x 14


def _positive_int(value: object, option: str, module: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{module}: {option} must be a positive int, got {value!r}")
    return value


def lga_default_heads(channels: int) -> int:
    """Heads when none are given: one per 64 channels, at least one.

    ResNet widths: 64 -> 1, 128 -> 2, 256 -> 4, 512 -> 8 (ResNet18/34 after layer4), 1024 -> 16,
    2048 -> 32 (ResNet50/101 after layer4); 64 channels per head throughout.

    Raises:
        ValueError: ``channels`` is not a multiple of the resulting head count (pass ``heads``).
    """
    _positive_int(channels, "channels", "lga_default_heads")
    heads = max(1, channels // LGA_HEAD_DIM)
    if channels % heads:
        raise ValueError(f"LGA: no default head count for {channels} channels "
                         f"({channels} // {LGA_HEAD_DIM} = {heads} does not divide it); "
                         f"pass heads=, a divisor of {channels}")
    return heads


def lga_heads(channels: int, heads: int | None = None, head_dim: int | None = None,
              module: str = "LGA") -> int:
    """The head count from at most one of ``heads`` and ``head_dim`` (channels per head);
    neither: :func:`lga_default_heads`. E.g. ``(512, head_dim=16) -> 32``.

    Raises:
        ValueError: both given, a non-positive value, or a ``head_dim`` that does not divide
            ``channels`` (the message names the divisors' head widths).
    """
    _positive_int(channels, "channels", module)
    if heads is not None and head_dim is not None:
        raise ValueError(f"{module}: give heads or head_dim, not both (got {heads} and {head_dim})")
    if heads is not None:
        return _positive_int(heads, "heads", module)
    if head_dim is None:
        return lga_default_heads(channels)
    if channels % _positive_int(head_dim, "head_dim", module):
        widths = [d for d in range(1, channels + 1) if channels % d == 0]
        raise ValueError(f"{module}: head_dim={head_dim} does not divide channels={channels}; "
                         f"valid head_dim: {widths}")
    return channels // head_dim


def channel_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """``softmax(q k^T * scale) v`` per head over the channel axis (LGA eqs. 8-10).

    Args:
        q, k, v: ``(B, h, d, N)``: h heads of d channels at N = H*W positions.
        scale: multiplies the energy (``d ** -0.5`` in LGA, eq. 2).

    Returns:
        ``(B, h, d, N)``: ``out[b, h, i, n] = sum_j softmax_j(E)[i, j] * v[b, h, j, n]`` with
        ``E = q k^T * scale`` of shape ``(B, h, d, d)``.
    """
    energy = torch.matmul(q, k.transpose(-1, -2)) * scale
    return torch.matmul(energy.softmax(dim=-1), v)


class _MultiScale(nn.Module):
    """One scale of LGA section 3.3: ``(B, D, H, W) -> (B, D, ceil(H/s), ceil(W/s))``, a
    depthwise 3x3 conv with stride s followed by a 1x1 conv (both with bias, as published)."""

    def __init__(self, channels: int, stride: int) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(channels, channels, 3, stride=stride, padding=1, groups=channels)
        self.pointwise = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.pointwise(self.depthwise(x))


class _QKV(nn.Module):
    """``f_attn^(k)`` of LGA eqs. 7 and 12: depthwise k x k conv, then a 1x1 conv D -> 3D in
    ``heads`` groups. ``(B, D, H, W) -> q, k, v`` each ``(B, heads, D / heads, H*W)``; output
    group g of the 1x1 conv is ``(q_g, k_g, v_g)``, computed from input channel group g only."""

    def __init__(self, channels: int, heads: int, kernel_size: int) -> None:
        super().__init__()
        self.heads = heads
        self.depthwise = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2,
                                   groups=channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1, groups=heads)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, c, h, w = z.shape
        out = self.qkv(self.depthwise(z)).reshape(b, self.heads, 3, c // self.heads, h * w)
        q, k, v = out.unbind(dim=2)
        return q, k, v


class LocalGlobalAttention(nn.Module):
    """Local-Global Attention (LGA paper, section 3), ``(B, D, H, W) -> (B, D, H, W)``.

    Args:
        channels: D.
        heads: attention heads h (D must be divisible by h); ``None``: from ``head_dim``, or
            without it one per 64 channels (:func:`lga_default_heads`: 8 at 512 channels, 32 at
            2048; our choice, see :data:`LGA_HEAD_DIM`).
        local_kernels: kernels of the local branches (paper: 3, 5, 7); empty: no local branch.
        global_kernel: kernel of the global branch (public code: 11); ``None``: no global branch.
        num_scales: multi-scale convs with strides 1, 2, 4, ... (paper: 3).
        pe_size: side of the learned positional encoding before resizing (public code: 14).
        head_dim: channels per head instead of ``heads`` (:func:`lga_heads`), e.g.
            :data:`LGA_AUTHORS_HEAD_DIM` (16), the authors' ResNet18 head width.

    Parameters (all convs with bias, as published), with ``K`` the branch kernels:
    ``num_scales * (D^2 + 11 D)`` (multi-scale) ``+ (num_scales + 1) (D + 1)`` (scale weights)
    ``+ pe_size^2 D`` ``+ sum_K (k^2 D + D + 3 D^2 / h + 3 D)`` ``+ branches`` (alphas)
    ``+ D^2 + D`` (output conv): 1,674,246 at D = 512, h = 8 (ours); 1,379,334 at D = 512,
    h = 32 (head_dim 16); 148,230 at D = 128, h = 8 and 14,358 at D = 24, h = 6 (the authors'
    ResNet18 and MobileNetV3 configs).
    """

    def __init__(self, channels: int, heads: int | None = None,
                 local_kernels: Sequence[int] = (3, 5, 7), global_kernel: int | None = 11,
                 num_scales: int = 3, pe_size: int = PE_SIZE, *,
                 head_dim: int | None = None) -> None:
        super().__init__()
        name = type(self).__name__
        heads = lga_heads(channels, heads, head_dim, name)
        if channels % heads:
            raise ValueError(f"{name}: channels={channels} is not divisible by heads={heads}")
        local_kernels = tuple(local_kernels)
        for k in local_kernels + (() if global_kernel is None else (global_kernel,)):
            if _positive_int(k, "kernel sizes", name) % 2 == 0:
                raise ValueError(f"{name}: kernel sizes must be odd, got {k}")
        if not local_kernels and global_kernel is None:
            raise ValueError(f"{name}: needs a local or a global branch (both are off)")
        _positive_int(num_scales, "num_scales", name)
        _positive_int(pe_size, "pe_size", name)
        self.heads = heads
        self.scale = (channels // heads) ** -0.5
        self.scales = nn.ModuleList(_MultiScale(channels, 2 ** i) for i in range(num_scales))
        self.scale_weights = nn.Conv2d(channels, num_scales + 1, 1)
        self.pos = nn.Parameter(torch.randn(1, channels, pe_size, pe_size))
        self.local_branches = nn.ModuleList(_QKV(channels, heads, k) for k in local_kernels)
        self.global_branch = None if global_kernel is None else _QKV(channels, heads, global_kernel)
        if local_kernels:
            self.alpha_local = nn.Parameter(torch.tensor(0.5))
        if global_kernel is not None:
            self.alpha_global = nn.Parameter(torch.tensor(0.5))
        self.out = nn.Conv2d(channels, channels, 1)

    def positional_encoding(self, height: int, width: int) -> Tensor:
        """The learned encoding resized (nearest) to the map: ``(1, D, height, width)``."""
        return F.interpolate(self.pos, size=(height, width), mode="nearest")

    def weighted_features(self, x: Tensor) -> Tensor:
        """``X_w`` (eqs. 3-6): the scale-weighted sum of X and the Y_i, ``(B, D, H, W)``."""
        size = x.shape[-2:]
        feats = [x] + [F.interpolate(conv(x), size=size, mode="nearest") + x for conv in self.scales]
        alpha = self.scale_weights(x).softmax(dim=1)  # (B, num_scales + 1, H, W)
        return sum(alpha[:, i:i + 1] * f for i, f in enumerate(feats))

    def _branch(self, qkv: _QKV, z: Tensor, x: Tensor) -> Tensor:
        """``softmax(Q K^T * scale) V + X`` (eqs. 10 and 13) for one kernel, ``(B, D, H, W)``."""
        q, k, v = qkv(z)
        return channel_attention(q, k, v, self.scale).reshape(x.shape) + x

    def forward(self, x: Tensor) -> Tensor:
        z = self.weighted_features(x) + self.positional_encoding(*x.shape[-2:])
        out = 0.0
        if len(self.local_branches):
            local = sum(self._branch(qkv, z, x) for qkv in self.local_branches)
            out = self.alpha_local * (local / len(self.local_branches))
        if self.global_branch is not None:
            out = out + self.alpha_global * self._branch(self.global_branch, z, x)
        return self.out(out)


class LocalAttention(LocalGlobalAttention):
    """LA, the local-only ablation of the LGA paper (Tables 3-5): LGA without the global branch
    (and its alpha); ``out = conv1x1(a_local * local)``. Options as :class:`LocalGlobalAttention`."""

    def __init__(self, channels: int, heads: int | None = None,
                 local_kernels: Sequence[int] = (3, 5, 7), num_scales: int = 3,
                 pe_size: int = PE_SIZE, *, head_dim: int | None = None) -> None:
        super().__init__(channels, heads, local_kernels, None, num_scales, pe_size,
                         head_dim=head_dim)


class GlobalAttention(LocalGlobalAttention):
    """GA, the global-only ablation of the LGA paper (Tables 3-5): LGA without the local
    branches (and their alpha); ``out = conv1x1(a_global * global)``."""

    def __init__(self, channels: int, heads: int | None = None, global_kernel: int = 11,
                 num_scales: int = 3, pe_size: int = PE_SIZE, *,
                 head_dim: int | None = None) -> None:
        super().__init__(channels, heads, (), global_kernel, num_scales, pe_size,
                         head_dim=head_dim)

