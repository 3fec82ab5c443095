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


def _group_sums(a: Tensor, b: Tensor, groups: int, tmp: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """(``sum_{c in g} a[:, c, n] b[:, c, n]`` (k, G, N), the product's buffer) for ``a``
    (k, C, N) and ``b`` (k, C, N) or (k, C, 1); the product goes into ``tmp`` when it fits."""
    fits = tmp is not None and tmp.shape == a.shape
    tmp = torch.mul(a, b, out=tmp) if fits else a * b
    return _groups(tmp, groups).sum(dim=2), tmp


def _gap(rows: Tensor) -> Tensor:
    """``mean_n x`` (k, C) of ``rows`` (k, C, N), as a matrix-vector product."""
    return _mv(rows, rows.new_ones(rows.shape[0], rows.shape[2])) / rows.shape[2]


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
    at layer1, 1/32 at layer4). On the CPU both directions go one sample at a time, from the
    GAP to the output (the similarity, the mask and their gradients stay in cache)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor, eps: float, groups: int) -> Tensor:
        rows = x.detach().flatten(2)
        w, b = (t.detach().flatten() for t in (weight, bias))
        y, p, z, std = _forward(rows, w, b, eps, groups)
        ctx.save_for_backward(x, p, z, std, weight, bias)
        ctx.eps, ctx.groups = eps, groups
        return y.view_as(x)

    @staticmethod
    @once_differentiable  # first derivatives only: the backward writes into buffers
    def backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], ...]:
        x, p, z, std, weight, bias = ctx.saved_tensors
        rows, g, groups, n = x.flatten(2), grad.flatten(2), ctx.groups, x[0, 0].numel()
        w, b = weight.flatten().to(z.dtype), bias.flatten().to(z.dtype)
        dx = torch.empty_like(x)
        dweight, dbias, tmp = torch.zeros_like(w), torch.zeros_like(b), None
        for k in _samples(rows):
            s = _sigmoid_affine(z[k], w, b)  # recomputed: cheaper to keep z than z and s
            ds, tmp = _group_sums(g[k], rows[k], groups, tmp)
            dsim, dw, db = _mask_grad(ds.to(z.dtype), s, z[k], std[k], w, ctx.eps)
            dweight += dw
            dbias += db
            dsim = dsim.to(rows.dtype)
            dp = _p_grad(rows[k], dsim, groups, tmp) / n
            _sge_dx(g[k], s, p[k], dsim, dp, dx.flatten(2)[k], groups)
        dx = dx if ctx.needs_input_grad[0] else None
        return dx, dweight.view_as(weight).to(weight.dtype), dbias.view_as(bias).to(bias.dtype), None, None


def _forward(rows: Tensor, w: Tensor, b: Tensor, eps: float, groups: int
             ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y (B, C, N), p (B, C), z (B, G, N), std (B, G, 1)) of SGE on ``rows`` (B, C, N), one
    sample at a time on the CPU."""
    bsz, ch, n = rows.shape
    p = rows.new_empty(bsz, ch)
    z = rows.new_empty(bsz, groups, n)
    std = rows.new_empty(bsz, groups, 1)
    y, tmp = None, None
    for k in _samples(rows):
        p[k] = _gap(rows[k])
        sim, tmp = _group_sums(rows[k], p[k].unsqueeze(2), groups, tmp)
        s, z[k], std[k] = _mask(sim, w.to(sim.dtype), b.to(sim.dtype), eps)
        if y is None:  # in x's memory format, in the dtype of x * s
            y = torch.empty_like(rows, dtype=torch.promote_types(rows.dtype, s.dtype))
        torch.mul(_groups(rows[k], groups), s.unsqueeze(2), out=_groups(y[k], groups))
    return y, p, z, std


def _p_grad(rows: Tensor, dsim: Tensor, groups: int, tmp: Optional[Tensor]) -> Tensor:
    """``sum_n x[c, n] dsim[g(c), n]`` (k, C): the gradient the similarity passes to p; the
    product goes into ``tmp`` (k, C, N) when it fits."""
    grouped = _groups(rows, groups)
    if tmp is not None and tmp.shape == rows.shape and tmp.dtype == rows.dtype:
        prod = torch.mul(grouped, dsim.unsqueeze(2), out=_groups(tmp, groups))
    else:
        prod = grouped * dsim.unsqueeze(2)
    return prod.sum(dim=3).flatten(1)


def _sge_dx(g: Tensor, s: Tensor, p: Tensor, dsim: Tensor, dp: Tensor, out: Tensor, groups: int) -> Tensor:
    """``dx = g * s + p * dsim + dp`` for one chunk (k, C, N) into ``out``: mask and dsim per
    group and position (k, G, N), p and dp per channel (k, C), dp already divided by N."""
    o = _groups(out, groups)
    # Not one addcmul with the per-channel dp as its input: a slow path (fused_gates._mul_add).
    torch.mul(_groups(g, groups), s.unsqueeze(2), out=o).add_(_groups(dp.unsqueeze(2), groups))
    return o.addcmul_(_groups(p.unsqueeze(2), groups), dsim.unsqueeze(2))


def sge_gate(x: Tensor, weight: Tensor, bias: Tensor, eps: float, groups: int) -> Tensor:
    """SGE's gating of ``x`` (B, C, H, W), eager mode (module docstring); returns (B, C, H, W).

    Args:
        weight, bias: the per-group scale and shift, G values each (any shape).
        eps: added to the std.
        groups: G, dividing C.
    """
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or bias.requires_grad):
        return _SGEGate.apply(x, weight, bias, eps, groups)
    return _forward(x.flatten(2), weight.flatten(), bias.flatten(), eps, groups)[0].view_as(x)
