"""Evaluate on a VOC-layout or COCO-format test split: per-class AP, mAP (VOC07 11-point by
default), COCO AP (pycocotools).

    python tools/eval_voc.py --checkpoint runs/da_resnet50/best.pth --data-root data/VOCdevkit
    python tools/eval_voc.py --detections dets.json --data-root data/VOCdevkit --split voc07_test
    python tools/eval_voc.py --checkpoint best.pth --data-format coco --data-root data/coco \
        --split val2017

VOC detection files are a JSON list of {"image_id": "000001", "label": "dog", "score": 0.93,
"bbox": [x1, y1, x2, y2]} with boxes in the annotation XML's (1-based) pixel coordinates; with
--data-format coco they are COCO results, [{"image_id": 42, "category_id": 18, "bbox": [x, y,
w, h], "score": 0.93}], and the COCO figures are pycocotools' own evaluation on the JSON
(both formats: ssd_da/evaluation/detection_file.py, ssd_da/evaluation/coco.py). Exit status 2
with a message on stderr for bad input.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

import torch

from ssd_da.data.coco import CocoDetection
from ssd_da.data.voc import UnknownClassError, VOCDetection
from ssd_da.engine.checkpoint import load_detector
from ssd_da.engine.inference import coco_metrics_of, evaluate_model, format_coco
from ssd_da.engine.loaders import default_eval_workers, make_test_set, resolve_workers
from ssd_da.engine.runlog import to_json
from ssd_da.evaluation.coco import coco_results, load_coco_results
from ssd_da.evaluation.detection_file import load_detection_file, write_detection_file
from ssd_da.utils.plots import plot_ap_bars, plot_pr_curves
from ssd_da.evaluation.voc import VOCResult, evaluate_voc
from ssd_da.utils.cli import parse_names, report_error, run_program
from ssd_da.utils.device import resolve_device
from ssd_da.utils.paths import ensure_dir, ensure_file_parent


class EvalInputError(ValueError):
    """A class list or checkpoint that does not fit the dataset (message says which)."""


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, add_help=add_help,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a detector checkpoint (best.pth / last.pth)")
    src.add_argument("--detections", help="a detection JSON file to evaluate without a model")
    p.add_argument("--data-format", default="voc", choices=["voc", "coco"],
                   help="voc: --data-root is a VOCdevkit folder; coco: it holds "
                        "annotations/instances_<split>.json and <split>/")
    p.add_argument("--data-root", default="data/VOCdevkit", help="VOCdevkit (or COCO) folder")
    p.add_argument("--split", default="voc07_test",
                   help="e.g. voc07_test (default); with --data-format coco e.g. val2017")
    p.add_argument("--classes", help="a,b,c (default: the checkpoint's, else the 20 VOC classes "
                                     "or the COCO categories)")
    p.add_argument("--metric", default="voc07", choices=["voc07", "area"],
                   help="voc07: 11-point (VOC2007, default); area: VOC2010+ integral")
    p.add_argument("--iou-rule", default="python", choices=["python", "matlab"],
                   help="python: a match needs IoU > 0.5, as py-faster-rcnn's voc_eval.py behind "
                        "the published VOC07 numbers of ssd.pytorch, lufficc and mmdet (default); "
                        "matlab: IoU >= 0.5, as the MATLAB devkit's VOCevaldet.m")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=default_eval_workers(),
                   help="data loader processes (default: min(4, CPU cores available), "
                        f"{default_eval_workers()} here; -1: the cores less one, as training)")
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", action="store_true", help="bf16 autocast on GPU")
    p.add_argument("--skip-bad", action="store_true",
                   help="leave out samples whose XML is malformed or whose image is missing or "
                        "does not decode (each named in a warning; the count is printed)")
    p.add_argument("--ignore-other-classes", action="store_true", default=None,
                   help="leave out objects of classes not in the class list (counted per class); "
                        "without it they are an error. With --checkpoint the default is the "
                        "choice the checkpoint was trained with, so the mAP equals training's")
    p.add_argument("--no-coco", action="store_true", help="skip the pycocotools AP@[.5:.95] line")
    p.add_argument("--save-detections", help="write the detections as JSON (format above)")
    p.add_argument("--json", help="write {metric, iou_rule, map, ap, num_images} as JSON (and "
                                  "coco: the pycocotools figures, with --data-format coco)")
    p.add_argument("--plots", help="folder for per-class PR curves and a per-class AP bar chart")
    return p


def parse_classes(text: str | None) -> list[str] | None:
    return parse_names(text, "--classes")


def run_model(args: argparse.Namespace, class_names: list[str] | None):
    """The checkpoint evaluated on the split as training evaluates (the same dataset, uint8
    preprocessing and ``evaluate_model``); returns (dataset, class names, dets, VOC result,
    img/s)."""

    device = resolve_device(args.device)
    model, ckpt = load_detector(args.checkpoint, device)
    trained = list(ckpt["class_names"])
    if class_names is not None and class_names != trained:
        raise EvalInputError(f"--classes {','.join(class_names)} differ from the classes "
                             f"{args.checkpoint} was trained on: {','.join(trained)}")
    saved = ckpt.get("config") or {}
    ignore = args.ignore_other_classes
    if ignore is None:  # training's rule for objects of other classes, so the mAPs agree
        ignore = bool(saved.get("ignore_other_classes", False))
    dataset = load_split(args, trained, True, ignore,
                         f"{args.checkpoint} was trained on these classes: evaluate it on data "
                         f"of them, or pass --ignore-other-classes to leave the others out")
    with torch.inference_mode():
        result, dets, images_per_s = evaluate_model(model, dataset, trained, device, args.batch_size,
                                            resolve_workers(args.workers), args.amp, args.metric,
                                            iou_rule=args.iou_rule)
    return dataset, trained, dets, result, images_per_s


def load_split(args: argparse.Namespace, class_names: Sequence[str] | None, with_images: bool,
               ignore_other_classes: bool, advice: str | None = None
               ) -> VOCDetection | CocoDetection:
    """The split as training's evaluation reads it (``make_test_set``; ``class_names`` None:
    the COCO categories). Objects of classes the model does not know are an error unless
    ignored: otherwise their APs would silently be missing."""
    try:
        return make_test_set(args.data_format, args.data_root, args.split, class_names,
                             skip_bad=args.skip_bad, ignore_other_classes=ignore_other_classes,
                             with_images=with_images)
    except UnknownClassError as exc:
        if advice is None:
            raise EvalInputError(str(exc)) from None
        raise EvalInputError(f"{exc.problem}; {advice}") from None


def report(result: VOCResult, coco: dict[str, float] | None,
           dataset: VOCDetection | CocoDetection, images_per_s: float | None) -> None:
    print(result.table())
    if coco is not None and hasattr(dataset, "coco"):
        print(f"COCO (pycocotools on {dataset.split}'s JSON): {format_coco(coco)}")
    elif coco is not None:
        print(f"COCO-style (pycocotools): AP@[.5:.95] {100 * coco['AP']:.2f}  "
              f"AP50 {100 * coco['AP50']:.2f}")
    line = f"{len(dataset)} images"
    if dataset.num_skipped:
        line += f" ({dataset.num_skipped} more skipped as unreadable by --skip-bad)"
    left_out = dataset.other_class_counts
    if left_out:
        line += (f"; {sum(left_out.values())} objects of other classes left out ("
                 + ", ".join(f"{n} {k}" for k, n in sorted(left_out.items())) + ")")
    if images_per_s is not None:
        line += f"; inference {images_per_s:.1f} images/s (model and transfer, batch included)"
    print(line)


def check_outputs(args: argparse.Namespace) -> None:
    """Output paths that cannot be written fail before the inference, naming the option."""
    for option, path in (("--save-detections", args.save_detections), ("--json", args.json)):
        if path:
            ensure_file_parent(path, option)
    if args.plots:
        ensure_dir(args.plots, "--plots")


def read_detections(args: argparse.Namespace, class_names: list[str] | None):
    """--detections over the split: (dataset, class names, detections aligned with it)."""
    dataset = load_split(args, class_names, False, bool(args.ignore_other_classes))
    if args.data_format == "coco":
        detections = load_coco_results(args.detections, dataset.coco_ids, dataset.cat_ids)
    else:
        ids = [dataset.get_annotation(i).image_id for i in range(len(dataset))]
        detections = load_detection_file(args.detections, ids, dataset.class_names)
    return dataset, list(dataset.class_names), detections


def coco_figures(args: argparse.Namespace, dataset, detections) -> dict[str, float] | None:
    """pycocotools' figures: on a COCO split's own JSON, else on the VOC training view."""
    return None if args.no_coco else coco_metrics_of(dataset, detections)


def run(args: argparse.Namespace) -> int:
    """0 after printing the AP table, 2 for bad input (message on stderr)."""
    try:
        check_outputs(args)
        class_names = parse_classes(args.classes)
        images_per_s = None
        if args.checkpoint:
            dataset, class_names, detections, result, images_per_s = run_model(args, class_names)
        else:
            dataset, class_names, detections = read_detections(args, class_names)
            gts = [dataset.get_annotation(i).ground_truth() for i in range(len(dataset))]
            result = evaluate_voc(detections, gts, class_names, metric=args.metric,
                                  iou_rule=args.iou_rule)
        coco = coco_figures(args, dataset, detections)
        report(result, coco, dataset, images_per_s)
        image_ids = [dataset.get_annotation(i).image_id for i in range(len(dataset))]
        write_outputs(args, result, detections, image_ids, class_names, dataset, coco)
    except (ValueError, OSError) as exc:  # EvalInputError, CheckpointError, DetectionFileError
        return report_error("eval_voc.py", exc)
    return 0


def write_outputs(args, result, detections, image_ids, class_names, dataset=None,
                  coco: dict[str, float] | None = None) -> None:
    """--save-detections (COCO results for a COCO-format ``dataset``), --json, --plots."""
    is_coco = hasattr(dataset, "coco")
    if args.save_detections:
        if is_coco:
            recs = coco_results(detections, dataset.coco_ids, dataset.cat_ids)
            Path(args.save_detections).write_text(json.dumps(recs))
            count = len(recs)
        else:
            count = write_detection_file(args.save_detections, detections, image_ids, class_names)
        print(f"wrote {count} detections to {args.save_detections}")
    if args.json:
        # JSON has no NaN: a class without ground truth (AP undefined) and the mAP of a split
        # with no ground truth at all are written as null (as in log.jsonl: runlog.to_json).
        payload = {"metric": args.metric,  # the --metric value: one name for one thing
                   "iou_rule": result.iou_rule, "map": float(result.map),
                   "ap": {c: float(v) for c, v in result.ap.items()}, "num_images": len(image_ids)}
        if is_coco and coco is not None:
            payload["coco"] = coco
        Path(args.json).write_text(json.dumps(to_json(payload), indent=2, allow_nan=False))
    if args.plots:
        out = Path(args.plots)
        out.mkdir(parents=True, exist_ok=True)
        paths = plot_pr_curves(result, out)
        plot_ap_bars(result, out / "ap_per_class.png")
        print(f"wrote {len(paths) + 1} plots to {out}/")


def main(argv: list[str] | None = None) -> int:
    """The command line ``argv`` (default: ``sys.argv[1:]``) parsed and run; the exit status."""
    return run(get_args_parser().parse_args(argv))


def script() -> None:
    """The program (``tools/eval_voc.py``, ``python -m ssd_da.cli.eval_voc``): logging set up, then
    :func:`main` on the command line; exits with its status."""
    run_program(main)


if __name__ == "__main__":
    script()
