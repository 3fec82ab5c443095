"""Parameter and FLOP counting with torchstat's rules (the DA paper's Table II).

The DA paper (Table II, section III) prints Params and GFLOPs for ResNet18/34/50/101 with and
without SE and DA attention. Its eq. (1) counts a convolution as 2*H*W*(C_in*K^2 + 1)*C_out (2
per multiply-accumulate), but Table II prints about half of that (ResNet18: 1.8214 G); we match
the table, not the formula. The table's GFLOPs were produced with torchstat's rules (Swall0w/torchstat,
``torchstat/compute_flops.py``); this module reimplements those rules, which reproduce 22 of
Table II's 24 values exactly and the other two (DA-ResNet18/34 GFLOPs) 0.0001 above the print
(see ``docs/complexity.md``). The rules, per LEAF module (a module
without children), all including the batch dimension B:

==============================================  ===============================================
module type                                     FLOPs
==============================================  ===============================================
Conv2d / Conv3d                                 k_h*k_w[*k_t] * C_in * (C_out // groups)
                                                * B * H_out * W_out [* T_out]
                                                + C_out * B * H_out * W_out [* T_out] with bias
                                                (C_in is the full input channel count, also for
                                                grouped convolutions, as in torchstat)
BatchNorm2d / BatchNorm3d                       input elements, x2 if ``affine``
ReLU, ReLU6, PReLU, ELU, LeakyReLU              input elements
MaxPool2d, AvgPool2d, MaxPool3d, AvgPool3d      input elements
Linear                                          B * in_features * out_features (bias is free)
Upsample (and its subclasses)                   B * H_out * W_out (torchstat drops channels)
anything else                                   0 (adaptive pooling, Sigmoid, Conv1d,
                                                BatchNorm1d, SyncBatchNorm, FrozenBatchNorm2d,
                                                ConvTranspose2d, SiLU, GELU, Identity, ...)
==============================================  ===============================================

Tensor operations outside modules (``x + y``, ``x * mask``, ``x.mean(1)``, ``torch.cat``) are not
seen and cost 0. QUIRK kept on purpose: torchstat stores one result per module object and
overwrites it on every call, so a module object called several times in one forward (torchvision's
shared ``relu`` in a residual block, CBAM's shared MLP) is counted ONCE, at the size of its LAST
call. The paper's GFLOPs are ``count_flops(model, (1, 3, 224, 224)) / 1e9``.

Other counters give other numbers and must not be compared with the paper: thop and fvcore count
multiply-accumulates (no BN/ReLU/pool terms, every call counted), ptflops counts MACs plus
element-wise terms per call. Parameters are exact: ``count_params`` sums ``numel`` over the
model's (deduplicated) parameters, including those held by non-leaf modules, which torchstat's
own "Total params" would miss.
"""
from __future__ import annotations

import logging
import math
from collections import OrderedDict
from typing import Callable, Sequence

import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["count_params", "count_flops", "count_flops_per_module", "module_flops",
           "count_flops_complete"]

ForwardFn = Callable[[nn.Module, torch.Tensor], object]


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Exact number of parameters of ``model`` (each shared parameter once).

    Args:
        model: any module.
        trainable_only: count only parameters with ``requires_grad``.
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _numel(t: torch.Tensor) -> int:
    return math.prod(t.shape)


def _conv_flops(module: nn.Module, inp: torch.Tensor, out: torch.Tensor) -> int:
    # torchstat: k * C_in * (C_out // groups) per output position, batch included; C_in is the
    # full input channel count (not C_in // groups), kept because torchstat's rules are the ones
    # that reproduce Table II (the paper does not name its counter).
    spatial_dims = len(module.kernel_size)
    kernel = math.prod(module.kernel_size)
    out_c = out.shape[-spatial_dims - 1]
    # Leading dims before (C, *spatial): the batch, or none for unbatched input (counted as 1).
    positions = math.prod(out.shape[:-spatial_dims - 1]) * math.prod(out.shape[-spatial_dims:])
    flops = kernel * module.in_channels * (out_c // module.groups) * positions
    if module.bias is not None:
        flops += out_c * positions
    return flops


def _batchnorm_flops(module: nn.Module, inp: torch.Tensor, out: torch.Tensor) -> int:
    # Normalise (1 op per element), then scale-and-shift counted as 1 more when affine.
    return _numel(inp) * (2 if module.affine else 1)


def _elementwise_flops(module: nn.Module, inp: torch.Tensor, out: torch.Tensor) -> int:
    # Activations and (non-adaptive) pooling: one op per INPUT element.
    return _numel(inp)


def _linear_flops(module: nn.Module, inp: torch.Tensor, out: torch.Tensor) -> int:
    # torchstat: batch * in * out, no bias term. It asserts 2-D input; here all leading
    # dimensions count as the batch, which agrees with it on 2-D input.
    rows = math.prod(inp.shape[:-1])
    return rows * module.in_features * module.out_features


def _upsample_flops(module: nn.Module, inp: torch.Tensor, out: torch.Tensor) -> int:
    # torchstat takes out[0] (the first sample, shape (C, H, W)) and multiplies the batch by its
    # shape[1:], i.e. B * H_out * W_out: the channel count is dropped. Kept as printed.
    return inp.shape[0] * math.prod(out.shape[2:])


Rule = Callable[[nn.Module, torch.Tensor, torch.Tensor], int]

# Checked in order with isinstance, like torchstat's if/elif chain; first match wins.
FLOP_RULES: tuple[tuple[tuple[type, ...], Rule], ...] = (
    ((nn.Conv2d, nn.Conv3d), _conv_flops),
    ((nn.BatchNorm2d, nn.BatchNorm3d), _batchnorm_flops),
    ((nn.AvgPool2d, nn.MaxPool2d, nn.AvgPool3d, nn.MaxPool3d), _elementwise_flops),
    ((nn.ReLU, nn.ReLU6, nn.PReLU, nn.ELU, nn.LeakyReLU), _elementwise_flops),
    ((nn.Upsample,), _upsample_flops),
    ((nn.Linear,), _linear_flops),
)


def module_flops(module: nn.Module, inp: object, out: object) -> int:
    """FLOPs of one call of a leaf ``module`` under torchstat's rules (0 for unlisted types).

    Args:
        module: the leaf module.
        inp: its first positional input (a tensor), or None if it had none.
        out: its output (a tensor for every type that has a rule).
    """
    if not isinstance(inp, torch.Tensor):
        return 0  # torchstat: no positional input -> 0
    for types, rule in FLOP_RULES:
        if isinstance(module, types):
            if not isinstance(out, torch.Tensor):
                raise TypeError(f"{type(module).__name__} returned {type(out).__name__}, "
                                "expected a tensor")
            return int(rule(module, inp, out))
    return 0


def _check_input_size(input_size: Sequence[int]) -> tuple[int, ...]:
    size = tuple(input_size)
    if not size or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0
                           for s in size):
        raise ValueError(f"input_size must be a non-empty sequence of positive ints such as "
                         f"(1, 3, 224, 224), got {input_size!r}")
    return size


def _model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def count_flops_per_module(model: nn.Module, input_size: Sequence[int] = (1, 3, 224, 224),
                           forward_fn: ForwardFn | None = None) -> "OrderedDict[str, int]":
    """Per-leaf-module FLOPs under torchstat's rules, for one forward pass.

    The model runs once in eval mode under ``torch.no_grad()`` on a zero tensor of shape
    ``input_size`` (e.g. (B, 3, H, W)), created on the device of the model's first parameter
    (a model on the ``meta`` device works and costs no arithmetic). Its training flag is restored
    afterwards. Each module object keeps the FLOPs of its LAST call only (torchstat's quirk).

    Args:
        model: the network.
        input_size: shape of the input tensor, batch first; FLOPs scale with the batch.
        forward_fn: how to run the model, ``forward_fn(model, x)``; default ``model(x)``. Use it to
            call a raw-output method (e.g. a detector's head outputs without postprocessing).

    Returns:
        ``OrderedDict`` mapping each leaf module's name (from ``named_modules``, so a shared module
        appears once, under its first name; the model itself is named by its class when it is a
        leaf) to its FLOPs, in registration order. Leaves never called map to 0.
    """
    size = _check_input_size(input_size)
    leaves = [(name or type(m).__name__, m) for name, m in model.named_modules()
              if next(m.children(), None) is None]
    last_call: dict[nn.Module, int] = {}

    def hook(module: nn.Module, args: tuple, out: object) -> None:
        last_call[module] = module_flops(module, args[0] if args else None, out)

    handles = [m.register_forward_hook(hook) for _, m in leaves]
    was_training = model.training
    try:
        model.eval()
        x = torch.zeros(size, device=_model_device(model))
        with torch.no_grad():
            if forward_fn is None:
                model(x)
            else:
                forward_fn(model, x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return OrderedDict((name, last_call.get(m, 0)) for name, m in leaves)


def count_flops(model: nn.Module, input_size: Sequence[int] = (1, 3, 224, 224),
                forward_fn: ForwardFn | None = None) -> int:
    """Total FLOPs of one forward pass under torchstat's rules (see the module docstring).

    Args:
        model: the network.
        input_size: input shape, batch first, e.g. (1, 3, 224, 224), with which Table II's
            values are reproduced (the paper states no input size or batch).
        forward_fn: optional ``forward_fn(model, x)`` replacing ``model(x)``.

    Returns:
        The FLOP count as an int; the paper's GFLOPs are this / 1e9.
    """
    total = sum(count_flops_per_module(model, input_size, forward_fn).values())
    logger.debug("%s at %s: %d FLOPs", type(model).__name__, tuple(input_size), total)
    return total


def count_flops_complete(model: nn.Module, input_size: Sequence[int] = (1, 3, 224, 224),
                         forward_fn: ForwardFn | None = None) -> int:
    """FLOPs of every convolution and matrix product of one forward pass, as PyTorch's
    ``torch.utils.flop_counter.FlopCounterMode`` counts them: 2 per multiply-accumulate
    (``2 * k_h * k_w * C_in/groups * C_out * H_out * W_out`` for a conv, ``2 * m * n * k`` for a
    matmul), for every call, inside modules or not (``torch.matmul``, ``einsum``).
    Element-wise work (BatchNorm, ReLU, pooling, softmax, additions) counts 0.

    The torchstat rules of :func:`count_flops` reproduce the DA paper's Table II but see only
    leaf modules, so attention's matrix products (LGA, MHSA) cost nothing there; this count sees
    them. It is about twice the torchstat count for a plain ResNet (multiply and add counted
    separately): ResNet18 at 224x224 gives 3.63 here and 1.82 there.

    Args and model handling (eval mode, no_grad, zero input on the model's device, the meta
    device works) as :func:`count_flops`.
    """
    from torch.utils.flop_counter import FlopCounterMode

    size = _check_input_size(input_size)
    was_training = model.training
    try:
        model.eval()
        x = torch.zeros(size, device=_model_device(model))
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            if forward_fn is None:
                model(x)
            else:
                forward_fn(model, x)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())
