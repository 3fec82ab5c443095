"""Params and GFLOPs of backbones (DA paper Table II) or of the SSD300 detector built on them.

Two FLOP counts, side by side:

- "torchstat": torchstat's rules (``ssd_da/utils/flops.py``). The DA paper does not name its
  counter, but these rules reproduce 22 of Table II's 24 values exactly (the other two, the
  DA-ResNet18/34 GFLOPs, 0.0001 above the print): multiply-accumulates of convs and FCs plus
  BN/ReLU/pooling terms; matrix products and softmax count 0, so attention's cost (LGA, MHSA)
  is hidden there. Not comparable with thop / ptflops / fvcore (docs/method.md).
- "complete": PyTorch's ``FlopCounterMode``: 2 FLOPs per multiply-accumulate of every conv and
  matrix product, element-wise work 0 (about twice torchstat's count for a plain ResNet).

Examples::

    # Table II (ImageNet classifiers, 1000-way FC, 224x224, batch 1)
    python tools/complexity.py --classifier resnet18 se_resnet18 da_resnet18
    # the SSD300 detector (VOC: 20 classes + background) at 300x300
    python tools/complexity.py da_resnet50
    # raw integer counts
    python tools/complexity.py --classifier --csv resnet50 da_resnet50
    # the LGA paper's Table 4 set: one module at the end of ResNet18
    python tools/complexity.py --classifier resnet18 resnet18_mhsa resnet18_se resnet18_lga

Models are built on (or moved to) PyTorch's ``meta`` device (``ssd_da.models.complexity``);
``--no-meta`` measures on the CPU instead (the test suite checks both agree).
Exit status 2 with a message on stderr for bad input.
"""
from __future__ import annotations

import argparse
from typing import NoReturn, Sequence

from ssd_da.models.complexity import (CLASSIFIER_CLASSES, CLASSIFIER_SIZE, DETECTOR_SIZE,
                                      VOC_NUM_CLASSES, measure_backbone, measure_detector)
from ssd_da.models.names import BACKBONE_NAMES
from ssd_da.utils.cli import fail, run_program

# DA paper Table II, in its row order.
TABLE_II_BACKBONES = (
    "resnet18", "se_resnet18", "da_resnet18",
    "resnet34", "se_resnet34", "da_resnet34",
    "resnet50", "se_resnet50", "da_resnet50",
    "resnet101", "se_resnet101", "da_resnet101",
)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Params and GFLOPs (torchstat rules and the complete FlopCounterMode "
                    "count, batch 1) of backbones or SSD300.")
    parser.add_argument("backbones", nargs="*", metavar="BACKBONE",
                        help="backbone names, e.g. da_resnet50 (a module in every block) or "
                             "resnet18_lga (one module after layer4); default: the 12 of the "
                             "DA paper's Table II")
    parser.add_argument("--classifier", action="store_true",
                        help="measure the ImageNet classifier (1000 classes, 224x224) as in "
                             "Table II instead of the SSD300 detector (21 classes, 300x300)")
    parser.add_argument("--input-size", metavar="S|HxW",
                        help="input size, e.g. 512 or 384x512 (H x W); default 224 for "
                             "--classifier, 300 for the detector")
    parser.add_argument("--csv", action="store_true",
                        help="print 'backbone,params,flops,flops_complete' with raw integer "
                             "counts (flops: torchstat rules; flops_complete: FlopCounterMode)")
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
            meta: bool = True) -> tuple[int, int, int]:
    """(params, torchstat-rule flops, complete flops) of one backbone, classifier or SSD300
    form, at batch ``input_shape[0]``."""
    if classifier:
        params, flops = measure_backbone(name, input_shape, meta)
        return params, flops, measure_backbone(name, input_shape, meta, complete=True)[1]
    params, flops = measure_detector(name, VOC_NUM_CLASSES, tuple(input_shape), meta)
    return params, flops, measure_detector(name, VOC_NUM_CLASSES, tuple(input_shape), meta,
                                           complete=True)[1]


def format_table(rows: Sequence[tuple[str, int, int, int]]) -> str:
    """Markdown table: Backbone | Params (M) | GFLOPs (torchstat) | GFLOPs (complete), 4
    decimals (params / 1e6, flops / 1e9)."""
    cells = [(name, f"{params / 1e6:.4f}", f"{flops / 1e9:.4f}", f"{full / 1e9:.4f}")
             for name, params, flops, full in rows]
    header = ("Backbone", "Params (M)", "GFLOPs (torchstat)", "GFLOPs (complete)")
    widths = [max(len(r[i]) for r in cells + [header]) for i in range(4)]
    lines = ["| " + " | ".join(f"{h:<{w}}" if i == 0 else f"{h:>{w}}"
                               for i, (h, w) in enumerate(zip(header, widths))) + " |",
             f"|{'-' * (widths[0] + 2)}|" + "|".join("-" * (w + 1) + ":" for w in widths[1:]) + "|"]
    lines += ["| " + " | ".join(f"{c:<{w}}" if i == 0 else f"{c:>{w}}"
                                for i, (c, w) in enumerate(zip(row, widths))) + " |"
              for row in cells]
    return "\n".join(lines)


def format_csv(rows: Sequence[tuple[str, int, int, int]]) -> str:
    """CSV with header ``backbone,params,flops,flops_complete`` and raw integer counts."""
    return "\n".join(["backbone,params,flops,flops_complete"]
                     + [",".join(str(v) for v in row) for row in rows])


def run(args: argparse.Namespace) -> int:
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
    print(f"{form}, input {shape[2]}x{shape[3]}, batch 1. GFLOPs (torchstat): torchstat's rules "
          "(they reproduce the DA paper's Table II; matrix products and softmax count 0). "
          "GFLOPs (complete): PyTorch's FlopCounterMode, 2 per multiply-accumulate of every "
          "conv and matrix product.\n")
    print(format_table(rows))
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command line ``argv`` (default: ``sys.argv[1:]``) parsed and run; the exit status."""
    return run(get_args_parser().parse_args(argv))


def script() -> None:
    """The program (``tools/complexity.py``, ``python -m ssd_da.cli.complexity``): logging set up, then
    :func:`main` on the command line; exits with its status."""
    run_program(main)


if __name__ == "__main__":
    script()
