"""Grad-CAM heatmaps of SSD300 detections, one column per checkpoint (the DA paper's Figure 5).

    python tools/gradcam.py img1.jpg img2.jpg --checkpoint runs/resnet50/best.pth \\
        --checkpoint runs/da_resnet50/best.pth --out gradcam.png
    python tools/gradcam.py img.jpg --checkpoint best.pth --class dog --score 0.3 --draw-boxes
    python tools/gradcam.py img.jpg --checkpoint best.pth --box 48,240,195,371 --method gradcam++

The figure has one row per image: the original, then one heatmap overlay per checkpoint, titled
with the backbone (e.g. "DA-ResNet50-SSD"), the method, the layer and the target. Targets:
  --target top (default)  the highest-scoring detection;
  --class NAME            every detection of NAME with score >= --score, together (if none
                          reaches --score: NAME's best-scoring default box, with a warning);
  --box x1,y1,x2,y2       the detection (any class, score >= --score) overlapping that box most,
                          in the image's pixels (0-based); the box must overlap every image.
eigencam is class-agnostic (the first principal component of the layer's activations): it
explains no target, so it cannot be combined with --class or --box.
The default layer is the last residual block of layer4 (backbone.layer4.2 of a ResNet50, the
paper's "layer4 2"), or backbone.end_attn when a module follows layer4 (resnet18_lga, ...: the
map SSD reads); --layer takes another module path, e.g. backbone.layer3.5. Detections
from the 38x38 / 19x19 maps (small objects) do not depend on layer4: their maps come out empty,
with a warning.
Figure size: columns x 3.0 by rows x 3.25 inches at --dpi (default 100: 300 x 325 px a panel).
"""
from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path
from typing import Any, Sequence

from ssd_da.data.images import check_image
from ssd_da.data.voc import load_rgb
from ssd_da.engine.checkpoint import load_detector
from ssd_da.models.names import display_name
from ssd_da.utils.cli import report_error, run_program
from ssd_da.utils.device import resolve_device
from ssd_da.utils.plots import save_figure
from ssd_da.utils.paths import ensure_file_parent
from ssd_da.visualize.cam import METHODS, CamTarget, default_layer, explain, resolve_layer
from ssd_da.visualize.draw import cam_figure, draw_detections, overlay_heatmap

logger = logging.getLogger("gradcam")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, add_help=add_help,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+", help="image files (any format PIL reads)")
    p.add_argument("--checkpoint", action="append", required=True,
                   help="a detector checkpoint; repeat for one column per checkpoint")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--target", choices=["top"], default="top",
                        help="top: the highest-scoring detection (default)")
    target.add_argument("--class", dest="class_name", metavar="NAME",
                        help="explain every detection of this class with score >= --score")
    target.add_argument("--box", metavar="X1,Y1,X2,Y2",
                        help="explain the detection overlapping this box (image pixels) most")
    p.add_argument("--layer", help="target module path (default: backbone.layer4.<last block>, or "
                   "backbone.end_attn for a resnet<depth>_<module> backbone)")
    p.add_argument("--method", default="gradcam", choices=sorted(METHODS),
                   help="CAM method (eigencam is class-agnostic: not with --class or --box)")
    p.add_argument("--score", type=float, default=0.3,
                   help="minimum detection score for --class, --box and --draw-boxes (default 0.3)")
    p.add_argument("--draw-boxes", action="store_true",
                   help="draw the detections with score >= --score on the overlays")
    p.add_argument("--out", default="gradcam.png", help="output PNG (default gradcam.png)")
    p.add_argument("--dpi", type=int, default=100, help="figure resolution (default 100)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1")
    return p


def parse_box(text: str) -> tuple[float, float, float, float]:
    """"x1,y1,x2,y2" -> four floats with x2 > x1 and y2 > y1 (ValueError naming --box otherwise)."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 4 or not all(math.isfinite(v) for v in values) \
            or values[2] <= values[0] or values[3] <= values[1]:
        raise ValueError(f"--box: expected x1,y1,x2,y2 with x2 > x1 and y2 > y1 (image pixels), "
                         f"got {text!r}")
    return values  # type: ignore[return-value]


def _check_file(path: str, what: str) -> None:
    if Path(path).is_dir():
        raise ValueError(f"{what} {path} is a folder; give {what} files (e.g. {path}/*.jpg)")
    if not Path(path).is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")


def check_inputs(args: argparse.Namespace) -> None:
    """Fail before loading any model: missing or unreadable files, bad numbers, a --box outside
    an image, eigencam with a target it would ignore, an --out that cannot be written."""
    for path in args.checkpoint:
        _check_file(path, "checkpoint")
    if not 0.0 <= args.score <= 1.0:
        raise ValueError(f"--score: must lie in [0, 1], got {args.score}")
    if args.dpi < 10:
        raise ValueError(f"--dpi: must be >= 10, got {args.dpi}")
    if args.method == "eigencam" and (args.box is not None or args.class_name is not None):
        raise ValueError(f"--method eigencam is class-agnostic and ignores "
                         f"{'--box' if args.box is not None else '--class'}; use --method "
                         f"gradcam or gradcam++ to explain one target, or drop the option")
    box = parse_box(args.box) if args.box is not None else None
    for path in args.images:
        _check_file(path, "image")
        height, width = check_image(path)
        if box is not None and not (box[0] < width and box[1] < height and box[2] > 0 and box[3] > 0):
            raise ValueError(f"--box {args.box} lies entirely outside image {path} "
                             f"({width}x{height}: x in [0, {width}), y in [0, {height}))")
    args.out = str(figure_path(args.out))
    ensure_file_parent(args.out, "--out")


def figure_path(out: str) -> Path:
    """The file the figure is written to: ``--out name`` without an extension gets ".png" (as
    matplotlib would add it; now the log names the real file), an extension matplotlib cannot
    write is refused before any work."""
    from matplotlib.backend_bases import FigureCanvasBase

    path = Path(out)
    if not path.suffix:
        return path.with_name(path.name + ".png")
    formats = FigureCanvasBase.get_supported_filetypes()
    if path.suffix[1:].lower() not in formats:
        raise ValueError(f"--out {out}: matplotlib cannot write {path.suffix!r} files; use one "
                         f"of {', '.join('.' + f for f in sorted(formats))}")
    return path


def load_models(args: argparse.Namespace, device: Any) -> list[tuple[Any, dict, str]]:
    """[(model, checkpoint, layer path)], checking --class and --layer against each checkpoint."""
    models = []
    for path in args.checkpoint:
        model, ckpt = load_detector(path, device)
        names = list(ckpt["class_names"])
        if args.class_name is not None and args.class_name not in names:
            raise ValueError(f"--class: {args.class_name!r} is not a class of checkpoint {path}; "
                             f"its classes: {names}")
        layer = args.layer or default_layer(model)
        try:
            resolve_layer(model, layer)
        except ValueError as exc:
            raise ValueError(f"--layer (checkpoint {path}, {ckpt['backbone']}): {exc}") from exc
        models.append((model, ckpt, layer))
    return models


def make_target(args: argparse.Namespace, class_names: Sequence[str]):
    if args.class_name is not None:
        return CamTarget("class", label=list(class_names).index(args.class_name) + 1)
    if args.box is not None:
        return CamTarget("box", box=parse_box(args.box))
    return CamTarget("top")


def panel(image: Any, model: Any, ckpt: dict, layer: str,
          args: argparse.Namespace) -> tuple[Any, str]:
    """(overlay image, title) of one image under one checkpoint."""
    names = list(ckpt["class_names"])
    result = explain(model, image, make_target(args, names), layer=layer, method=args.method,
                     score_thresh=args.score, class_names=names)
    overlay = overlay_heatmap(image, result.cam)
    if args.draw_boxes:
        det = result.detections
        keep = det["scores"] >= args.score
        overlay = draw_detections(overlay, det["boxes"][keep], det["labels"][keep],
                                  det["scores"][keep], names)
    target_text = "class-agnostic" if args.method == "eigencam" else result.target.description
    logger.info("%s: %s %s at %s -> %s", ckpt["backbone"], args.method, target_text, layer,
                ", ".join(f"{names[l - 1]} {s:.2f}" for l, s in
                          zip(result.target.labels.tolist(), result.target.scores.tolist())))
    where = layer.removeprefix("backbone.")
    title = f"{display_name(ckpt['backbone'], detector=True)}\n{args.method} {where}: {target_text}"
    return overlay, title


def run(args: argparse.Namespace) -> int:
    """Exit code 0 on success, 2 on bad input (message on stderr)."""
    try:
        check_inputs(args)
        models = load_models(args, resolve_device(args.device))
        rows = []
        for path in args.images:
            image = load_rgb(path)
            rows.append([(image, Path(path).name)] + [panel(image, m, c, layer, args)
                                                      for m, c, layer in models])
        save_figure(cam_figure(rows, dpi=args.dpi), args.out)
    except (ValueError, OSError) as exc:
        # Bad input (CheckpointError is a ValueError, FileNotFoundError an OSError): exit code 2.
        return report_error("gradcam.py", exc)
    logger.info("wrote %s (%d rows x %d columns)", args.out, len(rows), 1 + len(models))
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command line ``argv`` (default: ``sys.argv[1:]``) parsed and run; the exit status."""
    return run(get_args_parser().parse_args(argv))


def script() -> None:
    """The program (``tools/gradcam.py``, ``python -m ssd_da.cli.gradcam``): logging set up, then
    :func:`main` on the command line; exits with its status."""
    run_program(main)


if __name__ == "__main__":
    script()
