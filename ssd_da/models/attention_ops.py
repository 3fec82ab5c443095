"""Autograd functions that let attention modules keep one full-size tensor for backward.

An attention module multiplies a block's output ``x`` (B, C, H, W) by masks computed from
reductions of ``x`` (or of ``x`` times another mask). Written with plain tensor operations,
autograd saves every full-size intermediate a product or reduction reads: DA's ``y = x * s``
then ``y * c(y)`` keeps ``x`` and ``x * s``, two tensors of the block output's size (about
95 MB each for one ResNet50 layer2 block at batch 32, fp32). The functions below save only
``x`` and the small masks, and recompute products from them in backward. The masks' own small
networks (DA's 3x3 convs, CBAM's MLP, ...) stay ordinary autograd code, so parameters get
gradients the usual way and ``torch.compile`` traces everything (it fuses the recomputation
with the rest of the backward pass).

Shapes: ``x`` (B, C, H, W); a spatial mask (B, 1, H, W); a channel mask (B, C, 1, 1).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import Tensor

__all__ = ["masked_product", "scaled_mean", "scaled_amax"]


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
    """``(x * w).amax(dim, keepdim=True)`` saving x, w and the (small) maxima; the gradient goes
    to the maxima, split evenly between ties, as ``torch.amax``'s does.

    The products are formed in at least float32, in forward and in backward: backward finds the
    maxima by equality with the saved ones, which holds only if both computed the same numbers.
    With bf16 inputs a compiler may keep ``x * w`` in float32 where eager rounds it to bf16
    (inductor does), and the rounded maximum then equals no product: every gradient became
    0/0 = NaN (issue 20). A product of two bf16 (or fp16) numbers is exact in float32, so the
    maxima are the same whoever computes them; the output, rounded to the inputs' type, equals
    the eager bf16 result (rounding is monotonic: the max of rounded products is the rounded
    max). Ties are those of the exact products."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor, dim: int) -> Tensor:
        wide = torch.promote_types(torch.promote_types(x.dtype, w.dtype), torch.float32)
        out = (x.to(wide) * w.to(wide)).amax(dim=dim, keepdim=True)
        ctx.save_for_backward(x, w, out)
        ctx.dim = dim
        return out.to(torch.promote_types(x.dtype, w.dtype))

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], ...]:
        x, w, out = ctx.saved_tensors
        hit = (x.to(out.dtype) * w.to(out.dtype) == out).to(grad.dtype)
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
