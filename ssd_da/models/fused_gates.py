"""Attention gates in few passes over memory: one autograd function per gating, eager mode.

An attention module multiplies a block's output ``x`` (B, C, H, W) by a spatial mask ``s``
(B, 1, H, W) and/or a channel mask ``c`` (B, C, 1, 1), both computed by small networks from
reductions of ``x``. Written as tensor operations, eager PyTorch makes a full-size pass (and on
the CPU a fresh full-size allocation, whose page faults cost several times the pass itself) for
every broadcast product, every product that a reduction then sums, and every term autograd adds
to the input's gradient. :class:`_Gate` computes the whole gating instead, with the passes a
gating needs (issue 24 counts them; docs/benchmarks.md, "modules"):

* forward: one read of ``x`` per reduction (as a matrix-vector product: ``GAP(x * s)`` is
  ``X @ s``, never a materialised ``x * s``), one read of ``x`` and one write of ``y``;
* backward: one read of ``grad`` and ``x`` for the gradients of both masks, a read of ``x`` for
  the reduction that depends on a mask (DA's ``GAP(x * s)``), one read of ``grad`` and one
  write of ``dx`` that holds every term of the input gradient.

It saves only ``x`` (plus the masks' small inputs) for backward, as ``attention_ops`` does.
The mask networks (convs, MLPs) stay ordinary autograd code: their graph is built inside the
forward, from detached copies of the pooled tensors, and differentiated in the backward with
``torch.autograd.grad``; their parameters are inputs of the function, so they get gradients the
usual way. ``torch.compile`` cannot trace that, so modules call this only in eager mode and keep
their ``attention_ops`` formulas for inductor, which fuses the passes itself.

On the CPU the full-size work goes sample by sample: temporaries are one sample's size, reused
and cache-resident, and every reduction is a BLAS matrix-vector product (measured about 7x faster
than ``bmm`` or a strided ``sum`` on 8 x 256 x 75 x 75). On other devices it goes in one piece.

Shapes in this file: ``X`` is ``x`` viewed as (B, C, N), N = H * W; a spatial mask as (B, N), a
channel mask as (B, C).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch.autograd.function import once_differentiable
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["gate", "GATE_ORDERS", "native_convs", "conv_taps"]

# "sc": s from x, then c from x * s (DA's default); "cs": c from x, then s from x * c;
# "parallel": both from x; "s" / "c": one mask only. y = x * s * c in every order.
GATE_ORDERS = ("sc", "cs", "parallel", "s", "c")
MaskNet = Callable[[Tensor], Tensor]


@contextlib.contextmanager
def native_convs() -> Iterator[None]:
    """oneDNN off while the mask nets run forward and backward: their convs (one output channel,
    or tiny 1x1 ones on pooled vectors) then take PyTorch's native CPU kernels (im2col + GEMM).
    oneDNN's backward for one output channel is 4-6x slower at 8 x 1 x 75 x 75 and 8 x 2 x 75 x 75
    (measured, one thread) and 20-100x slower with two threads on a loaded machine: DA's and
    CBAM's spatial masks in every layer1 block. No effect on other devices."""
    previous = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = previous


def _samples(x: Tensor) -> Iterator[slice]:
    """CPU: one sample at a time (temporaries stay in cache); elsewhere the whole batch."""
    if x.device.type == "cpu":
        return (slice(b, b + 1) for b in range(x.shape[0]))
    return iter((slice(None),))


def _mv(mat: Tensor, vec: Tensor) -> Tensor:
    """(k, R, K) @ (k, K) -> (k, R): a BLAS gemv for one sample, bmm for more."""
    if mat.shape[0] == 1:
        return torch.mv(mat[0], vec[0]).unsqueeze(0)
    return torch.bmm(mat, vec.unsqueeze(2)).squeeze(2)


def _reduce(rows: Tensor, weight: Tensor, over: str) -> Tensor:
    """``over="n"``: sum_n rows[b, c, n] w[b, n] -> (B, C); ``over="c"``: sum_c w[b, c]
    rows[b, c, n] -> (B, N). ``rows`` (B, C, N), any strides."""
    weight = weight.to(rows.dtype)
    mat = rows if over == "n" else rows.transpose(1, 2)
    out = rows.new_empty(mat.shape[:2])
    for k in _samples(rows):
        out[k] = _mv(mat[k], weight[k])
    return out


def _ones(rows: Tensor, dim: int) -> Tensor:
    """Weights 1 for :func:`_reduce`: (B, C) for ``dim=1``, (B, N) for ``dim=2``."""
    return rows.new_ones(rows.shape[0], rows.shape[dim])


@dataclass
class _Masks:
    """The gating's masks as computed in the forward (graph attached), and their inputs."""
    m: Optional[Tensor] = None  # spatial net input (B, 1, H, W), a leaf
    s: Optional[Tensor] = None  # spatial mask (B, 1, H, W)
    p: Optional[Tensor] = None  # channel net input (B, C, 1, 1), a leaf
    c: Optional[Tensor] = None  # channel mask (B, C, 1, 1)

    def flat(self, b: int) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """The masks detached, as (B, N) and (B, C)."""
        s = None if self.s is None else self.s.detach().reshape(b, -1)
        c = None if self.c is None else self.c.detach().reshape(b, -1)
        return s, c


def _run_net(net: MaskNet, pooled: Tensor, shape: Sequence[int]) -> tuple[Tensor, Tensor]:
    """(leaf input, mask): ``net`` on a detached copy of ``pooled``; with grad mode on, the
    leaf requires grad, so the net's graph is recorded from it."""
    leaf = pooled.detach().reshape(shape).requires_grad_(torch.is_grad_enabled())
    return leaf, net(leaf)


def _masks(rows: Tensor, hw: tuple[int, int], order: str, spatial: Optional[MaskNet],
           channel: Optional[MaskNet]) -> _Masks:
    """Pool ``rows`` (B, C, N) and run the mask nets in ``order`` (the forward's reductions)."""
    b, ch, n = rows.shape
    out = _Masks()
    if order in ("cs", "parallel", "c"):  # channel net on GAP(x)
        out.p, out.c = _run_net(channel, _reduce(rows, _ones(rows, 2), "n") / n, (b, ch, 1, 1))
    if spatial is not None:  # spatial net on the channel mean of x (or of x * c)
        weight = out.c.detach().reshape(b, ch) if order == "cs" else _ones(rows, 1)
        out.m, out.s = _run_net(spatial, _reduce(rows, weight, "c") / ch, (b, 1, *hw))
    if order == "sc":  # channel net on GAP(x * s)
        s = out.s.detach().reshape(b, n)
        out.p, out.c = _run_net(channel, _reduce(rows, s, "n") / n, (b, ch, 1, 1))
    return out


def _scale(rows: Tensor, s: Optional[Tensor], c: Optional[Tensor], out: Tensor) -> Tensor:
    """``out = rows * s * c`` (masks (B, N) / (B, C) or None), into ``out`` (B, C, N)."""
    for k in _samples(rows):
        o = out[k]
        if s is not None and c is not None:
            torch.mul(rows[k], s[k].unsqueeze(1), out=o)
            o.mul_(c[k].unsqueeze(2))  # the sample just written is still in cache
        else:
            torch.mul(rows[k], (s[k].unsqueeze(1) if s is not None else c[k].unsqueeze(2)), out=o)
    return out


def _grad_reductions(g: Tensor, rows: Tensor, s: Optional[Tensor], c: Optional[Tensor],
                     need_c: bool, need_s: bool) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """From one read of ``g`` and ``rows`` (B, C, N): ``sum_n g x s`` (B, C) and ``sum_c g x c``
    (B, N), the direct gradients of y = x * s * c with respect to c and s."""
    b, ch, n = rows.shape
    dc = rows.new_empty(b, ch) if need_c else None
    ds = rows.new_empty(b, n) if need_s else None
    ws = s.to(rows.dtype) if s is not None else rows.new_ones(b, n)
    wc = c.to(rows.dtype) if c is not None else rows.new_ones(b, ch)
    tmp = None
    for k in _samples(rows):
        # g * x of this sample (CPU: one buffer, reused while it is in cache), summed twice.
        tmp = g[k] * rows[k] if tmp is None or tmp.shape != rows[k].shape \
            else torch.mul(g[k], rows[k], out=tmp)
        if need_c:
            dc[k] = _mv(tmp, ws[k])
        if need_s:
            ds[k] = _mv(tmp.transpose(1, 2), wc[k])
    return dc, ds


def _mul_add(out: Tensor, a: Tensor, b: Tensor, add: Optional[Tensor]) -> Tensor:
    """``out = a * b + add`` (``add`` may be None). One ``addcmul`` when ``add`` varies along
    the last (position) axis; a product and an in-place add when it is per channel: ``addcmul``
    with a per-channel ``add`` takes a slow path on the CPU (2-5x, measured)."""
    if add is None:
        return torch.mul(a, b, out=out)
    if add.shape[-1] > 1:
        return torch.addcmul(add, a, b, out=out)
    return torch.mul(a, b, out=out).add_(add)


def _combine(g: Tensor, out: Tensor, beta: Optional[Tensor], u: Optional[Tensor],
             alpha: Optional[Tensor], v: Optional[Tensor], w: Optional[Tensor]) -> Tensor:
    """``out = ((g * beta + u) * alpha + v) + w``, one sample at a time (a missing factor is
    1, a missing term 0). Each of beta, u, alpha, v, w is (B, C, 1) or (B, 1, N)."""
    pick = lambda t, k: None if t is None else t[k]  # noqa: E731
    for k in _samples(g):
        o = _mul_add(out[k], g[k], beta[k], pick(u, k))
        if alpha is not None:
            _mul_add(o, o, alpha[k], pick(v, k))
        elif v is not None:
            o.add_(v[k])
        if w is not None:
            o.add_(w[k])
    return out


def _net_grads(mask: Tensor, leaves: Sequence[Tensor], dmask: Tensor, params: Sequence[Tensor],
               param_grads: list[Optional[Tensor]]) -> list[Tensor]:
    """Backpropagate ``dmask`` through the mask net from ``leaves`` (its inputs) to ``mask``:
    returns the leaves' gradients; adds the parameters' gradients into ``param_grads`` (same
    order as ``params``)."""
    wanted = [i for i, p in enumerate(params) if p.requires_grad]
    with native_convs():
        grads = torch.autograd.grad(mask, [*leaves, *(params[i] for i in wanted)],
                                    dmask.to(mask.dtype), allow_unused=True)
    for i, g in zip(wanted, grads[len(leaves):]):
        if g is not None:
            param_grads[i] = g if param_grads[i] is None else param_grads[i] + g
    return [g if g is not None else torch.zeros_like(leaf) for leaf, g in zip(leaves, grads)]


class _Gate(torch.autograd.Function):
    """``y = x * s * c`` with the masks from ``spatial`` / ``channel`` nets (module docstring)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, order: str, spatial: Optional[MaskNet],
                channel: Optional[MaskNet], *params: Tensor) -> Tensor:
        with torch.enable_grad(), native_convs():  # record the mask nets' graphs for the backward
            masks = _masks(x.detach().flatten(2), x.shape[2:], order, spatial, channel)
        ctx.save_for_backward(x)
        ctx.order, ctx.masks, ctx.params = order, masks, params
        return _product(x, masks)

    @staticmethod
    @once_differentiable  # first derivatives only: the backward writes into buffers
    def backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], ...]:
        (x,), order, masks, params = ctx.saved_tensors, ctx.order, ctx.masks, ctx.params
        b, ch, n = x.shape[0], x.shape[1], x[0, 0].numel()
        rows, g = x.flatten(2), grad.flatten(2)
        s, c = masks.flat(b)
        dc, ds = _grad_reductions(g, rows, s, c, c is not None, s is not None)
        param_grads: list[Optional[Tensor]] = [None] * len(params)
        dm = dp = None
        # The nets' input gradients, divided by the reductions' counts: dm / C (B, N), dp / N (B, C).
        spatial = lambda d: _net_grads(masks.s, [masks.m], d.view_as(masks.m), params, param_grads)[0]  # noqa: E731
        channel = lambda d: _net_grads(masks.c, [masks.p], d.view_as(masks.p), params, param_grads)[0]  # noqa: E731
        if order == "cs":  # s came from x * c: its gradient reaches c through the channel mean
            dm = spatial(ds).reshape(b, n) / ch
            dc = dc + _reduce(rows, dm, "n")
        if c is not None:
            dp = channel(dc).reshape(b, ch) / n
        if order == "sc":  # c came from x * s: its gradient reaches s through the GAP
            ds = ds + _reduce(rows, dp, "c")
        if s is not None and dm is None:
            dm = spatial(ds).reshape(b, n) / ch
        dx = None
        if ctx.needs_input_grad[0]:
            dx = torch.empty_like(x)
            _combine(g, dx.flatten(2), *_dx_terms(order, s, c, dm, dp))
        return (dx, None, None, None, *param_grads)


def _dx_terms(order: str, s: Optional[Tensor], c: Optional[Tensor], dm: Optional[Tensor],
              dp: Optional[Tensor]) -> tuple[Optional[Tensor], ...]:
    """(beta, u, alpha, v, w) of ``dx = ((g * beta + u) * alpha + v) + w``: the direct term
    g * s * c plus the reductions' terms, dm / C (B, 1, N) and dp / N (B, C, 1), where the
    reduced tensor was x (scaled by c or s in "cs" / "sc")."""
    s = None if s is None else s.unsqueeze(1)
    c = None if c is None else c.unsqueeze(2)
    dm = None if dm is None else dm.unsqueeze(1)
    dp = None if dp is None else dp.unsqueeze(2)
    if order == "sc":  # s * (g * c + dp / N) + dm / C
        return c, dp, s, dm, None
    if order == "cs":  # c * (g * s + dm / C) + dp / N
        return s, dm, c, dp, None
    if order == "parallel":  # g * c * s + dm / C + dp / N
        return c, None, s, dm, dp
    if order == "s":
        return s, dm, None, None, None
    return c, dp, None, None, None


def _product(x: Tensor, masks: _Masks) -> Tensor:
    """``x * s * c`` in the dtype the plain product would have (masks may be float32 under
    autocast), in ``x``'s memory format."""
    s, c = masks.flat(x.shape[0])
    dtype = x.dtype
    for mask in (s, c):
        if mask is not None:
            dtype = torch.promote_types(dtype, mask.dtype)
    y = torch.empty_like(x, dtype=dtype)
    _scale(x.flatten(2), s, c, y.flatten(2))
    return y


def gate(x: Tensor, order: str, spatial: Optional[MaskNet] = None,
         channel: Optional[MaskNet] = None, params: Sequence[Tensor] = ()) -> Tensor:
    """``x * s * c`` for ``x`` (B, C, H, W), in eager mode (module docstring); returns (B, C, H, W).

    Args:
        order: one of :data:`GATE_ORDERS`; says which mask is computed from what.
        spatial: the spatial mask net, channel mean (B, 1, H, W) -> mask (B, 1, H, W).
        channel: the channel mask net, GAP (B, C, 1, 1) -> mask (B, C, 1, 1).
        params: every parameter the two nets use (they receive gradients through this function).
    """
    if order not in GATE_ORDERS:
        raise ValueError(f"gate: unknown order {order!r}; valid: {list(GATE_ORDERS)}")
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params)):
        return _Gate.apply(x, order, spatial, channel, *params)
    with torch.no_grad(), native_convs():
        return _product(x, _masks(x.flatten(2), x.shape[2:], order, spatial, channel))


def conv_taps(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """``conv(x)`` for a mask net's conv with one output channel (stride 1, no bias, no groups):
    (B, Cin, H, W) -> (B, 1, H', W'), as a sum of its k * k * Cin shifted, scaled copies of the
    zero-padded input. For torch.compile: inductor fuses the taps (and their backward) into a
    few loops, where the conv would stay an external kernel, on the CPU oneDNN's, whose backward
    for one output channel is several times slower (``native_convs``)."""
    (kh, kw), (dh, dw), (ph, pw) = conv.kernel_size, conv.dilation, conv.padding
    h = x.shape[2] + 2 * ph - dh * (kh - 1)
    w = x.shape[3] + 2 * pw - dw * (kw - 1)
    padded = F.pad(x, (pw, pw, ph, ph))
    weight = conv.weight.to(x.dtype)
    out = None
    for c in range(x.shape[1]):
        for i in range(kh):
            for j in range(kw):
                tap = padded[:, c:c + 1, i * dh:i * dh + h, j * dw:j * dw + w] * weight[0, c, i, j]
                out = tap if out is None else out + tap
    return out
