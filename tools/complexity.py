"""Params and GFLOPs of backbones (DA paper Table II) or of the SSD300 detector built on them.

Counts follow torchstat's rules (``ssd_da/utils/flops.py``), which the paper used; the numbers
are not comparable with thop / ptflops / fvcore. Examples::

    # Table II (ImageNet classifiers, 1000-way FC, 224x224, batch 1)
    python tools/complexity.py --classifier resnet18 se_resnet18 da_resnet18
    # the SSD300 detector (VOC: 20 classes + background) at 300x300
    python tools/complexity.py da_resnet50
    # raw integer counts
    python tools/complexity.py --classifier --csv resnet50 da_resnet50

Models are built on (or moved to) PyTorch's ``meta`` device: no weight initialisation, no
arithmetic, since shapes alone decide the counts; a model whose forward does not run there is
measured on the CPU (``--no-meta`` forces the CPU; the test suite checks both agree).
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

if importlib.util.find_spec("ssd_da") is None:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ssd_da.utils.flops import count_flops, count_params  # noqa: E402

logger = logging.getLogger("complexity")

# DA paper Table II, in its row order.
TABLE_II_BACKBONES = (
    "resnet18", "se_resnet18", "da_resnet18",
    "resnet34", "se_resnet34", "da_resnet34",
    "resnet50", "se_resnet50", "da_resnet50",
    "resnet101", "se_resnet101", "da_resnet101",
)
CLASSIFIER_CLASSES = 1000  # Table II counts the ImageNet form, with its 1000-way FC
VOC_NUM_CLASSES = 21  # 20 VOC classes + background (design.md: num_classes counts background)
CLASSIFIER_SIZE = 224
DETECTOR_SIZE = 300
# Methods of the SSD model that return raw head outputs, tried in this order.
RAW_FORWARD_METHODS = ("forward_raw", "head_outputs")

ForwardFn = Callable[[nn.Module, torch.Tensor], object]


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Params and GFLOPs (torchstat rules, batch 1) of backbones or SSD300.")
    parser.add_argument("backbones", nargs="*", metavar="BACKBONE",
                        help="backbone names (default: the 12 of the DA paper's Table II)")
    parser.add_argument("--classifier", action="store_true",
                        help="measure the ImageNet classifier (1000 classes, 224x224) as in "
                             "Table II instead of the SSD300 detector (21 classes, 300x300)")
    parser.add_argument("--input-size", metavar="S|HxW",
                        help="input size, e.g. 512 or 384x512 (H x W); default 224 for "
                             "--classifier, 300 for the detector")
    parser.add_argument("--csv", action="store_true",
                        help="print 'backbone,params,flops' with raw integer counts")
    parser.add_argument("--no-meta", action="store_true",
                        help="build and run models on the CPU instead of the meta device")
    return parser


def _fail(message: str) -> None:
    """Report a usage error the way argparse does: message on stderr, exit status 2."""
    print(f"complexity.py: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _input_shape(args: argparse.Namespace) -> tuple[int, int, int, int]:
    if args.input_size is None:
        side = CLASSIFIER_SIZE if args.classifier else DETECTOR_SIZE
        return (1, 3, side, side)
    parts = args.input_size.lower().split("x")
    if len(parts) not in (1, 2) or not all(p.isdigit() and int(p) > 0 for p in parts):
        _fail(f"--input-size takes S or HxW with positive ints (e.g. 300, 384x512), "
              f"got {args.input_size!r}")
    height, width = int(parts[0]), int(parts[-1])
    return (1, 3, height, width)


def _check_names(names: Sequence[str]) -> None:
    """Exit with status 2 listing the valid names if any name is unknown (nothing built yet)."""
    try:
        from ssd_da.models.resnet import BACKBONE_NAMES
    except ImportError as exc:
        _fail(f"the backbones are not available yet (ssd_da.models.resnet: {exc})")
    unknown = [n for n in names if n not in BACKBONE_NAMES]
    if unknown:
        _fail(f"unknown backbone(s) {', '.join(unknown)}; valid names: "
              f"{', '.join(BACKBONE_NAMES)}")


def _build(name: str, classifier: bool) -> tuple[nn.Module, ForwardFn | None]:
    """The model to measure and, for the detector, how to run only its network (no postprocess)."""
    if classifier:
        from ssd_da.models.resnet import build_resnet
        return build_resnet(name, num_classes=CLASSIFIER_CLASSES), None
    try:
        from ssd_da.models.ssd import build_ssd
    except ImportError as exc:
        _fail(f"the SSD300 detector is not available yet (ssd_da.models.ssd: {exc}); "
              "use --classifier to measure the backbones as in Table II")
    try:
        model = build_ssd(name, num_classes=VOC_NUM_CLASSES)
    except ValueError as exc:
        _fail(str(exc))
    for method in RAW_FORWARD_METHODS:
        if callable(getattr(model, method, None)):
            # Backbone + extras + heads only; box decoding and NMS have no FLOPs under the rules
            # anyway, but skipping them keeps the meta device usable and the run short.
            return model, lambda m, x, _method=method: getattr(m, _method)(x)
    return model, None  # eval-mode forward; postprocessing contributes 0 FLOPs


def _build_meta(name: str, classifier: bool) -> tuple[nn.Module, ForwardFn | None]:
    """The model with its parameters and buffers on the meta device (shapes only)."""
    try:
        with torch.device("meta"):
            return _build(name, classifier)
    except (RuntimeError, TypeError) as exc:
        # Some constructors compute tensors on the CPU explicitly (torchvision's
        # DefaultBoxGenerator in SSD300 does); build there and move: counts need shapes only.
        logger.debug("%s: cannot be built on the meta device (%s); moving it there", name, exc)
        model, forward_fn = _build(name, classifier)
        return model.to("meta"), forward_fn


def measure(name: str, classifier: bool, input_shape: Sequence[int],
            meta: bool = True) -> tuple[int, int]:
    """(params, flops) of one backbone, classifier or SSD300 form, at batch ``input_shape[0]``."""
    if meta:
        model, forward_fn = _build_meta(name, classifier)
        try:
            return count_params(model), count_flops(model, input_shape, forward_fn)
        except (RuntimeError, TypeError) as exc:  # e.g. an op without a meta kernel
            logger.info("%s: meta device failed (%s); measuring on the CPU", name, exc)
    model, forward_fn = _build(name, classifier)
    return count_params(model), count_flops(model, input_shape, forward_fn)


def format_table(rows: Sequence[tuple[str, int, int]]) -> str:
    """Markdown table: Backbone | Params (M) | GFLOPs, 4 decimals (params / 1e6, flops / 1e9)."""
    cells = [(name, f"{params / 1e6:.4f}", f"{flops / 1e9:.4f}") for name, params, flops in rows]
    header = ("Backbone", "Params (M)", "GFLOPs")
    widths = [max(len(r[i]) for r in cells + [header]) for i in range(3)]
    lines = [f"| {header[0]:<{widths[0]}} | {header[1]:>{widths[1]}} | {header[2]:>{widths[2]}} |",
             f"|{'-' * (widths[0] + 2)}|{'-' * (widths[1] + 1)}:|{'-' * (widths[2] + 1)}:|"]
    lines += [f"| {a:<{widths[0]}} | {b:>{widths[1]}} | {c:>{widths[2]}} |" for a, b, c in cells]
    return "\n".join(lines)


def format_csv(rows: Sequence[tuple[str, int, int]]) -> str:
    """CSV with header ``backbone,params,flops`` and raw integer counts."""
    return "\n".join(["backbone,params,flops"] + [f"{n},{p},{f}" for n, p, f in rows])


def main(args: argparse.Namespace) -> None:
    names = list(args.backbones) or list(TABLE_II_BACKBONES)
    shape = _input_shape(args)
    _check_names(names)
    rows = []
    for name in names:
        try:
            rows.append((name, *measure(name, args.classifier, shape, meta=not args.no_meta)))
        except ValueError as exc:  # the model rejects the input, e.g. SSD300 at --input-size 512
            _fail(f"{name} at input {tuple(shape)}: {exc}")
    if args.csv:
        print(format_csv(rows))
        return
    form = (f"ImageNet classifier ({CLASSIFIER_CLASSES} classes)" if args.classifier
            else f"SSD300 detector ({VOC_NUM_CLASSES} classes incl. background)")
    print(f"{form}, input {shape[2]}x{shape[3]}, batch 1, torchstat FLOP rules\n")
    print(format_table(rows))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main(get_args_parser().parse_args())
