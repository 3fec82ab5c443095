"""Params and FLOPs of a backbone's ImageNet classifier (the DA paper's Table II form) or of the
SSD300 detector on it, counted under torchstat's rules (:mod:`ssd_da.utils.flops`; the rules and
why they are the paper's are in docs/method.md).

Models are built on PyTorch's ``meta`` device: shapes decide the counts, so no weight is
initialised and no arithmetic is done. A model whose construction or forward does not run there
is measured on the CPU instead (``meta=False`` forces that; a test checks both agree).
"""
from __future__ import annotations

import functools
import logging
from typing import Callable, Sequence

import torch
from torch import nn

from ssd_da.models.resnet import build_resnet
from ssd_da.models.ssd import build_ssd
from ssd_da.utils.flops import ForwardFn, count_flops, count_params

logger = logging.getLogger(__name__)

__all__ = ["CLASSIFIER_CLASSES", "VOC_NUM_CLASSES", "CLASSIFIER_SIZE", "DETECTOR_SIZE",
           "measure_backbone", "measure_detector"]

CLASSIFIER_CLASSES = 1000  # Table II counts the ImageNet form, with its 1000-way FC
VOC_NUM_CLASSES = 21  # 20 VOC classes + background
CLASSIFIER_SIZE = 224
DETECTOR_SIZE = 300


def _head_outputs(model: nn.Module, x: torch.Tensor) -> object:
    # Backbone, extras and heads only: decoding and NMS cost 0 under torchstat's rules anyway
    # (no module does them), and skipping them keeps the meta device usable.
    return model.head_outputs(x)


def _measure(build: Callable[[], nn.Module], forward_fn: ForwardFn | None,
             input_shape: Sequence[int], meta: bool, name: str) -> tuple[int, int]:
    """(params, flops) of ``build()`` at ``input_shape``, on the meta device when possible."""
    if meta:
        try:
            try:
                with torch.device("meta"):
                    model = build()
            except (RuntimeError, TypeError) as exc:
                # Some constructors compute tensors on the CPU explicitly (torchvision's
                # DefaultBoxGenerator in SSD300 does): build there and move.
                logger.debug("%s: cannot be built on the meta device (%s); moving it", name, exc)
                model = build().to("meta")
            return count_params(model), count_flops(model, input_shape, forward_fn)
        except (RuntimeError, NotImplementedError, TypeError) as exc:  # an op without meta kernel
            logger.info("%s: meta device failed (%s); measuring on the CPU", name, exc)
    model = build()
    return count_params(model), count_flops(model, input_shape, forward_fn)


def measure_backbone(name: str,
                     input_shape: Sequence[int] = (1, 3, CLASSIFIER_SIZE, CLASSIFIER_SIZE),
                     meta: bool = True) -> tuple[int, int]:
    """(params, FLOPs) of backbone ``name`` as an ImageNet classifier (1000-way FC), the form
    the DA paper's Table II counts. ValueError for an unknown name (listing the valid ones)."""
    return _measure(lambda: build_resnet(name, num_classes=CLASSIFIER_CLASSES), None,
                    input_shape, meta, name)


@functools.lru_cache(maxsize=None)
def measure_detector(name: str, num_classes: int = VOC_NUM_CLASSES,
                     input_shape: tuple[int, ...] = (1, 3, DETECTOR_SIZE, DETECTOR_SIZE),
                     meta: bool = True) -> tuple[int, int]:
    """(params, FLOPs) of SSD300 on backbone ``name`` with ``num_classes`` (background
    included), network only (``head_outputs``). Cached: the ablation report asks once per run."""
    return _measure(lambda: build_ssd(name, num_classes=num_classes), _head_outputs,
                    tuple(input_shape), meta, name)
