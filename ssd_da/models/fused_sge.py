"""SGE's gating in few passes over memory, eager mode: what :mod:`ssd_da.models.fused_gates`
does for DA, SE and ECA, for Spatial Group-wise Enhance's per-group spatial mask.

SGE (Li, Hu & Yang, 2019) splits the C channels into G groups of C / G; in each group the
similarity ``sim[g, n] = sum_{c in g} x[c, n] p[c]`` of every position with the group's GAP
vector ``p = mean_n x`` goes through a small net (normalisation over positions, affine, sigmoid)
to a mask ``s[g, n]`` that gates the group's channels: ``y[c, n] = x[c, n] s[g(c), n]``. The
passes over the full-size tensor, and what each makes:

* forward: x (``p``, a gemv), x (``x * p`` in a cache-sized buffer, summed per group), x and y;
* backward: grad and x (``sum_{c in g} grad x``, the mask's direct gradient), x (the gradient
  of ``p`` from the similarity's), grad and dx (every term of ``dx``).

Shapes: ``x`` viewed as (B, C, N) and per sample as (G, C / G, N); the mask and the similarity
(B, G, N); ``p`` (B, C).
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch.autograd.function import once_differentiable
from torch import Tensor

from ssd_da.models.fused_gates import _mv, _samples

__all__ = ["sge_gate"]

def _groups(t: Tensor, groups: int) -> Tensor:
    """(k, C, N) -> (k, G, C / G, N), a view in either memory format."""
    return t.unflatten(1, (groups, t.shape[1] // groups))


def _group_sums(a: Tensor, b: Tensor, groups: int) -> Tensor:
    """``sum_{c in g} a[:, c, n] b[:, c, n]`` (B, G, N), for ``a`` (B, C, N) and ``b`` (B, C, N)
    or (B, C, 1); one sample at a time on the CPU, the product in a reused buffer."""
    out = a.new_empty(a.shape[0], groups, a.shape[2])
    tmp = None
    for k in _samples(a):
        fits = tmp is not None and tmp.shape == a[k].shape
        tmp = torch.mul(a[k], b[k], out=tmp) if fits else a[k] * b[k]
        torch.sum(_groups(tmp, groups), dim=2, out=out[k])
    return out


def _similarity(rows: Tensor, groups: int) -> tuple[Tensor, Tensor]:
    """(p (B, C), sim (B, G, N)): the GAP vector and every position's similarity with it."""
    n = rows.shape[2]
    p = rows.new_empty(rows.shape[:2])
    for k in _samples(rows):
        p[k] = _mv(rows[k], rows.new_ones(rows[k].shape[0], n)) / n
    return p, _group_sums(rows, p.unsqueeze(2), groups)


def _apply(rows: Tensor, s: Tensor, out: Tensor, groups: int) -> Tensor:
    """``out[c, n] = x[c, n] s[g(c), n]``, into ``out`` (B, C, N)."""
    for k in _samples(rows):
        torch.mul(_groups(rows[k], groups), s[k].unsqueeze(2), out=_groups(out[k], groups))
    return out


def _mask(sim: Tensor, weight: Tensor, bias: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """SGE's net on ``sim`` (B, G, N): (mask s, normalised z, std (B, G, 1), before adding eps).
    As the module's ``mask``: centre over positions, divide by the (Bessel-corrected, except for
    one position) std plus eps, scale and shift per group, sigmoid. Written out here, with its
    backward in :func:`_mask_grad`: at layer1 the similarity is a quarter of x's size, and
    autograd's dozen passes over it (``std`` alone costs as much as a pass over x) would cost as
    much as the rest of the gating."""
    n = sim.shape[2]
    z = sim - sim.mean(dim=2, keepdim=True)
    std = torch.linalg.vector_norm(z, dim=2, keepdim=True).div_(math.sqrt(max(n - 1, 1)))
    z.div_(std + eps)
    return _sigmoid_affine(z, weight, bias), z, std


def _sigmoid_affine(z: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """``sigmoid(z * weight + bias)``, weight and bias per group (G,), z (B, G, N)."""
    return torch.addcmul(bias.view(1, -1, 1), z, weight.view(1, -1, 1)).sigmoid_()


def _mask_grad(ds: Tensor, s: Tensor, z: Tensor, std: Tensor, weight: Tensor, eps: float
               ) -> tuple[Tensor, Tensor, Tensor]:
    """(dsim (B, G, N), dweight (G,), dbias (G,)) from the mask's gradient ``ds``: the chain rule
    of :func:`_mask`. With c = sim - mean(sim), std = |c| / sqrt(n - 1), z = c / (std + eps):
    dc = (dz - z k) / (std + eps) with k = sum(dz z) (std + eps) / ((n - 1) std), and
    dsim = dc - mean(dc). Where std is 0 its gradient is taken as 0, as torch.std's is."""
    n = z.shape[2]
    dt = ds * s
    dt.addcmul_(dt, s, value=-1.0)  # ds * s * (1 - s), the sigmoid's derivative
    dweight, dbias = (dt * z).sum(dim=(0, 2)), dt.sum(dim=(0, 2))
    dz = dt.mul_(weight.view(1, -1, 1))
    if n == 1:  # one position: the centred value is 0 whatever sim is
        return dz.zero_(), dweight, dbias
    scale = std + eps
    k = (dz * z).sum(dim=2, keepdim=True).mul_(scale).div_(std * (n - 1))
    k.masked_fill_(std == 0, 0.0)
    dc = dz.addcmul_(z, k, value=-1.0).div_(scale)
    return dc.sub_(dc.mean(dim=2, keepdim=True)), dweight, dbias


class _SGEGate(torch.autograd.Function):
    """SGE's ``y = x * s`` (module docstring); saves x and small tensors (z is a quarter of x
    at layer1, 1/32 at layer4)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor, eps: float, groups: int) -> Tensor:
        rows = x.detach().flatten(2)
        p, sim = _similarity(rows, groups)
        w, b = (t.detach().flatten().to(sim.dtype) for t in (weight, bias))
        s, z, std = _mask(sim, w, b, eps)
        ctx.save_for_backward(x, p, z, std, weight, bias)
        ctx.eps, ctx.groups = eps, groups
        y = torch.empty_like(x, dtype=torch.promote_types(x.dtype, s.dtype))
        _apply(rows, s, y.flatten(2), groups)
        return y

    @staticmethod
    @once_differentiable  # first derivatives only: the backward writes into buffers
    def backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], ...]:
        x, p, z, std, weight, bias = ctx.saved_tensors
        rows, g, groups = x.flatten(2), grad.flatten(2), ctx.groups
        w, b = weight.flatten().to(z.dtype), bias.flatten().to(z.dtype)
        s = _sigmoid_affine(z, w, b)  # recomputed: cheaper to keep z than z and s
        ds = _group_sums(g, rows, groups)
        dsim, dweight, dbias = _mask_grad(ds.to(z.dtype), s, z, std, w, ctx.eps)
        dx = None
        if ctx.needs_input_grad[0]:
            dsim = dsim.to(rows.dtype)
            dx = torch.empty_like(x)
            _sge_dx(g, s, p, dsim, _p_grad(rows, dsim, groups) / rows.shape[2], dx.flatten(2), groups)
        return dx, dweight.view_as(weight).to(weight.dtype), dbias.view_as(bias).to(bias.dtype), None, None


def _p_grad(rows: Tensor, dsim: Tensor, groups: int) -> Tensor:
    """``sum_n x[c, n] dsim[g(c), n]`` (B, C): the gradient the similarity passes to p."""
    dp = rows.new_empty(rows.shape[:2])
    tmp = None
    for k in _samples(rows):
        grouped = _groups(rows[k], groups)
        fits = tmp is not None and tmp.shape == grouped.shape
        tmp = torch.mul(grouped, dsim[k].unsqueeze(2), out=tmp) if fits else grouped * dsim[k].unsqueeze(2)
        dp[k] = tmp.sum(dim=3).flatten(1)
    return dp


def _sge_dx(g: Tensor, s: Tensor, p: Tensor, dsim: Tensor, dp: Tensor, out: Tensor, groups: int) -> Tensor:
    """``dx = g * s + p * dsim + dp`` (mask and dsim per group and position, p and dp per
    channel, dp already divided by N), one sample at a time, into ``out`` (B, C, N)."""
    for k in _samples(g):
        o = _groups(out[k], groups)
        torch.addcmul(_groups(dp[k].unsqueeze(2), groups), _groups(g[k], groups), s[k].unsqueeze(2), out=o)
        o.addcmul_(_groups(p[k].unsqueeze(2), groups), dsim[k].unsqueeze(2))
    return out


def sge_gate(x: Tensor, weight: Tensor, bias: Tensor, eps: float, groups: int) -> Tensor:
    """SGE's gating of ``x`` (B, C, H, W), eager mode (module docstring); returns (B, C, H, W).

    Args:
        weight, bias: the per-group scale and shift, G values each (any shape).
        eps: added to the std.
        groups: G, dividing C.
    """
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or bias.requires_grad):
        return _SGEGate.apply(x, weight, bias, eps, groups)
    rows = x.flatten(2)
    sim = _similarity(rows, groups)[1]
    s = _mask(sim, weight.flatten().to(sim.dtype), bias.flatten().to(sim.dtype), eps)[0]
    y = torch.empty_like(x, dtype=torch.promote_types(x.dtype, s.dtype))
    _apply(rows, s, y.flatten(2), groups)
    return y
