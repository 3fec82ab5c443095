"""CBAM's gating in few passes over memory, eager mode: what :mod:`ssd_da.models.fused_gates`
does for DA, SE and ECA, for CBAM's max-pooled masks.

CBAM (Woo et al., ECCV 2018) computes ``c = channel(avg_n x, max_n x)`` (B, C), then
``s = spatial([max_c (x * c), mean_c (x * c)])`` (B, 1, H, W), and returns ``x * c * s``. The
passes over the full-size tensor, and what each makes:

* forward: x (the two channel pools), x (``x * c`` in a cache-sized buffer, its max and mean
  over channels), x and y (``y = x * s * c``);
* backward: grad and x (the direct gradients of both masks, as for DA), x (the pooled maxima
  and means' share of the channel mask's gradient), grad and x and dx (every term of ``dx``).

The maxima get the gradient as ``torch.amax`` gives it, split evenly between ties. They are
found again in the backward by comparing ``x * c``, recomputed by the same eager multiplication
in the same dtype (an IEEE product rounds the same every time), with the forward's maxima. (Under
``torch.compile`` the module takes its ``attention_ops`` formula instead.)
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch.autograd.function import once_differentiable
from torch import Tensor

from ssd_da.models.fused_gates import (_grad_reductions, _mv, _net_grads, _samples, _scale,
                                       native_convs)

__all__ = ["cbam_gate"]

ChannelNet = Callable[[Tensor, Tensor], Tensor]  # (avg, max) (B, C) each -> mask (B, C)
SpatialNet = Callable[[Tensor], Tensor]  # [max, mean] (B, 2, H, W) -> mask (B, 1, H, W)


def _gated(rows: Tensor, c: Tensor, k: slice, tmp: Optional[Tensor]) -> Tensor:
    """``x * c`` for the samples ``k`` (k, C, N), into ``tmp`` when it has the shape (it has the
    dtype: every call of one loop makes the same product). The forward and the backward compute
    it with this same call, so the maxima compare equal."""
    if tmp is not None and tmp.shape == rows[k].shape:
        return torch.mul(rows[k], c[k].unsqueeze(2), out=tmp)
    return rows[k] * c[k].unsqueeze(2)


def _pools(rows: Tensor, c: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """Without ``c``: (mean over N, max over N) of x, (B, C) each. With ``c``: (max over C,
    mean over C) of x * c, (B, N) each. One sample at a time on the CPU (module docstring)."""
    b, ch, n = rows.shape
    first = rows.new_empty((b, ch) if c is None else (b, n), dtype=rows.dtype if c is None else
                           torch.promote_types(rows.dtype, c.dtype))
    second = torch.empty_like(first)
    tmp = None
    for k in _samples(rows):
        if c is None:
            first[k] = _mv(rows[k], rows.new_ones(rows[k].shape[0], n)) / n
            second[k] = rows[k].amax(dim=2)
        else:
            tmp = _gated(rows, c, k, tmp)
            first[k] = tmp.amax(dim=1)
            second[k] = _mv(tmp.transpose(1, 2), tmp.new_ones(tmp.shape[0], ch)) / ch
    return first, second


def _hits(a: Tensor, b: Tensor, buf: Optional[Tensor]) -> Tensor:
    """1.0 where ``a == b`` (broadcast), else 0.0, in ``a``'s dtype, into ``buf`` when it fits. A
    float result, not bool: every op that mixed a bool mask with floats would copy it to float
    first (about 5x the cost of the comparison, measured)."""
    if buf is None or buf.shape != a.shape or buf.dtype != a.dtype:
        buf = torch.empty_like(a)
    return torch.eq(a, b, out=buf)


def _pool_grads(rows: Tensor, c: Tensor, pmax: Tensor, dpmax: Tensor, dpmean: Tensor, mx: Tensor
                ) -> tuple[Tensor, Tensor, Tensor]:
    """The gradient that reaches c through the spatial pools, ``sum_n x (dpmean + hit dpmax /
    ties)`` (B, C); the tie counts of the spatial maxima (B, N) and of the channel maxima (B, C).
    ``dpmean`` already carries the mean's 1 / C."""
    b, ch, n = rows.shape
    dc, ties, ties_c = rows.new_empty(b, ch), torch.empty_like(pmax), rows.new_empty(b, ch)
    tmp = hit = hit_c = None
    for k in _samples(rows):
        tmp = _gated(rows, c, k, tmp)
        hit = _hits(tmp, pmax[k].unsqueeze(1), hit)
        ties[k] = _mv(hit.transpose(1, 2), hit.new_ones(hit.shape[:2]))
        picked = torch.mul(hit, rows[k], out=hit)  # x at the maxima, 0 elsewhere
        share = (dpmax[k] / ties[k]).to(rows.dtype)
        dc[k] = _mv(rows[k], dpmean[k].to(rows.dtype)) + _mv(picked.to(rows.dtype), share)
        hit_c = _hits(rows[k], mx[k].unsqueeze(2), hit_c)
        ties_c[k] = _mv(hit_c, hit_c.new_ones(hit_c.shape[0], n))
    return dc, ties, ties_c


def _product_dtype(*tensors: Tensor) -> torch.dtype:
    """The dtype of ``x * c * s`` (the masks may be float32 under autocast)."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


class _CBAMGate(torch.autograd.Function):
    """``y = x * c * s`` with CBAM's masks (module docstring); saves x and small tensors."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, channel: ChannelNet, spatial: SpatialNet,
                *params: Tensor) -> Tensor:
        b, ch, h, w = x.shape
        rows = x.detach().flatten(2)  # the nets' graphs start at their (detached) inputs
        avg, mx = _pools(rows, None)
        with torch.enable_grad(), native_convs():  # record the nets' graphs (fused_gates._Gate)
            leaves_c = [avg.detach().requires_grad_(), mx.detach().requires_grad_()]
            c = channel(*leaves_c)
        pmax, pmean = _pools(rows, c.detach())
        with torch.enable_grad(), native_convs():
            leaf_s = torch.stack([pmax, pmean], dim=1).view(b, 2, h, w).requires_grad_()
            s = spatial(leaf_s)
        ctx.save_for_backward(x)
        ctx.graph = (leaves_c, c, leaf_s, s, pmax, mx)
        ctx.params = params
        y = torch.empty_like(x, dtype=_product_dtype(x, c, s))
        return _scale(rows, s.detach().view(b, h * w), c.detach(), y.flatten(2)).view_as(y)

    @staticmethod
    @once_differentiable  # first derivatives only: the backward writes into buffers
    def backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], ...]:
        (x,), (leaves_c, c, leaf_s, s, pmax, mx), params = ctx.saved_tensors, ctx.graph, ctx.params
        b, ch, n = x.shape[0], x.shape[1], x[0, 0].numel()
        rows, g = x.flatten(2), grad.flatten(2)
        s_flat, c_flat = s.detach().view(b, n), c.detach()
        dc, ds = _grad_reductions(g, rows, s_flat, c_flat, True, True)
        param_grads: list[Optional[Tensor]] = [None] * len(params)
        dpooled = _net_grads(s, [leaf_s], ds.view_as(s), params, param_grads)[0].view(b, 2, n)
        dpmax, dpmean = dpooled[:, 0], dpooled[:, 1] / ch
        dc_pool, ties, ties_c = _pool_grads(rows, c_flat, pmax, dpmax, dpmean, mx)
        davg, dmx = _net_grads(c, leaves_c, dc + dc_pool, params, param_grads)
        dx = None
        if ctx.needs_input_grad[0]:
            dx = torch.empty_like(x)
            _cbam_dx(g, rows, s_flat, c_flat, (pmax, dpmax / ties, dpmean), (mx, dmx / ties_c, davg / n),
                     dx.flatten(2))
        return (dx, None, None, *param_grads)


def _cbam_dx(g: Tensor, rows: Tensor, s: Tensor, c: Tensor, spatial: tuple[Tensor, Tensor, Tensor],
             channel: tuple[Tensor, Tensor, Tensor], out: Tensor) -> Tensor:
    """``dx = c * (g * s + dpmean + hit_s * dpmax) + davg + hit_c * dmx``, one sample at a time,
    into ``out`` (B, C, N). ``spatial`` = (pmax, dpmax per tie, dpmean) (B, N) each; ``channel``
    = (mx, dmx per tie, davg) (B, C) each; hit_* mark the maxima."""
    (pmax, dpmax, dpmean), (mx, dmx, davg) = spatial, channel
    tmp = hit = None
    for k in _samples(rows):
        o = out[k]
        torch.addcmul(dpmean[k].unsqueeze(1), g[k], s[k].unsqueeze(1), out=o)
        tmp = _gated(rows, c, k, tmp)
        o.addcmul_(_hits(tmp, pmax[k].unsqueeze(1), tmp), dpmax[k].unsqueeze(1))
        o.mul_(c[k].unsqueeze(2)).add_(davg[k].unsqueeze(2))  # not addcmul: fused_gates._mul_add
        hit = _hits(rows[k], mx[k].unsqueeze(2), hit)
        o.addcmul_(hit, dmx[k].unsqueeze(2))
    return out


def cbam_gate(x: Tensor, channel: ChannelNet, spatial: SpatialNet, params: list[Tensor]) -> Tensor:
    """CBAM's ``x * c * s`` for ``x`` (B, C, H, W), eager mode (module docstring); (B, C, H, W).

    Args:
        channel: (avg, max) pools over positions, (B, C) each -> the channel mask (B, C).
        spatial: [max, mean] pools over channels of x * c (B, 2, H, W) -> the mask (B, 1, H, W).
        params: every parameter of the two nets (they get their gradients through this function).
    """
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params)):
        return _CBAMGate.apply(x, channel, spatial, *params)
    b, _, h, w = x.shape
    rows = x.flatten(2)
    with native_convs():
        c = channel(*_pools(rows, None))
        s = spatial(torch.stack(_pools(rows, c), dim=1).view(b, 2, h, w))
    y = torch.empty_like(x, dtype=_product_dtype(x, c, s))
    return _scale(rows, s.view(b, h * w), c, y.flatten(2)).view_as(y)
