"""Params and GFLOPs of backbones (DA paper Table II) or of the SSD300 detector built on them.

Counts follow torchstat's rules (``ssd_da/utils/flops.py``): the paper does not name its
counter, but these rules reproduce 22 of Table II's 24 values exactly (the other two, the
DA-ResNet18/34 GFLOPs, 0.0001 above the print); the numbers are not comparable with thop /
ptflops / fvcore (docs/method.md). Examples::

    # Table II (ImageNet classifiers, 1000-way FC, 224x224, batch 1)
    python tools/complexity.py --classifier resnet18 se_resnet18 da_resnet18
    # the SSD300 detector (VOC: 20 classes + background) at 300x300
    python tools/complexity.py da_resnet50
    # raw integer counts
    python tools/complexity.py --classifier --csv resnet50 da_resnet50

Models are built on (or moved to) PyTorch's ``meta`` device (``ssd_da.models.complexity``);
``--no-meta`` measures on the CPU instead (the test suite checks both agree).
Exit status 2 with a message on stderr for bad input.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import NoReturn, Sequence

from ssd_da.models.complexity import (CLASSIFIER_CLASSES, CLASSIFIER_SIZE, DETECTOR_SIZE,
                                      VOC_NUM_CLASSES, measure_backbone, measure_detector)
from ssd_da.models.names import BACKBONE_NAMES
from ssd_da.utils.cli import fail

# DA paper Table II, in its row order.
TABLE_II_BACKBONES = (
    "resnet18", "se_resnet18", "da_resnet18",
    "resnet34", "se_resnet34", "da_resnet34",
    "resnet50", "se_resnet50", "da_resnet50",
    "resnet101", "se_resnet101", "da_resnet101",
)


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


def _fail(message: str) -> NoReturn:
    fail("complexity.py", message)


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
    unknown = [n for n in names if n not in BACKBONE_NAMES]
    if unknown:
        _fail(f"unknown backbone(s) {', '.join(unknown)}; valid names: "
              f"{', '.join(BACKBONE_NAMES)}")


def measure(name: str, classifier: bool, input_shape: Sequence[int],
            meta: bool = True) -> tuple[int, int]:
    """(params, flops) of one backbone, classifier or SSD300 form, at batch ``input_shape[0]``."""
    if classifier:
        return measure_backbone(name, input_shape, meta)
    return measure_detector(name, VOC_NUM_CLASSES, tuple(input_shape), meta)


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


def main(args: argparse.Namespace) -> int:
    """0 after printing the table; exits with status 2 (message on stderr) for bad input."""
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
        return 0
    form = (f"ImageNet classifier ({CLASSIFIER_CLASSES} classes)" if args.classifier
            else f"SSD300 detector ({VOC_NUM_CLASSES} classes incl. background)")
    print(f"{form}, input {shape[2]}x{shape[3]}, batch 1, torchstat FLOP rules\n")
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main(get_args_parser().parse_args()))
