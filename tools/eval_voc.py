#!/usr/bin/env python
"""Evaluate on a VOC-layout test split: per-class AP, mAP (VOC07 11-point by default), COCO AP.

    python tools/eval_voc.py --checkpoint runs/da_resnet50/best.pth --data-root data/VOCdevkit
    python tools/eval_voc.py --detections dets.json --data-root data/VOCdevkit --split voc07_test

Detection files are a JSON list of {"image_id": "000001", "label": "dog", "score": 0.93,
"bbox": [x1, y1, x2, y2]} with boxes in the annotation XML's (1-based) pixel coordinates.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

logger = logging.getLogger("eval_voc")


class EvalInputError(ValueError):
    """A bad detection file, class list or checkpoint/dataset mismatch (message says which)."""


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, add_help=add_help,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a detector checkpoint (best.pth / last.pth)")
    src.add_argument("--detections", help="a detection JSON file to evaluate without a model")
    p.add_argument("--data-root", default="data/VOCdevkit", help="VOCdevkit folder")
    p.add_argument("--split", default="voc07_test", help="e.g. voc07_test (default)")
    p.add_argument("--classes", help="a,b,c (default: the checkpoint's, else the 20 VOC classes)")
    p.add_argument("--metric", default="voc07", choices=["voc07", "area"],
                   help="voc07: 11-point (VOC2007, default); area: VOC2010+ integral")
    p.add_argument("--iou-rule", default="python", choices=["python", "matlab"],
                   help="python: a match needs IoU > 0.5, as py-faster-rcnn's voc_eval.py behind "
                        "the published VOC07 numbers of ssd.pytorch, lufficc and mmdet (default); "
                        "matlab: IoU >= 0.5, as the MATLAB devkit's VOCevaldet.m")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", action="store_true", help="bf16 autocast on GPU")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable samples with a warning")
    p.add_argument("--no-coco", action="store_true", help="skip the pycocotools AP@[.5:.95] line")
    p.add_argument("--save-detections", help="write the detections as JSON (format above)")
    p.add_argument("--json", help="write {metric, iou_rule, map, ap, num_images} as JSON")
    p.add_argument("--plots", help="folder for per-class PR curves and a per-class AP bar chart")
    return p


def parse_classes(text: str | None) -> list[str] | None:
    return [c.strip() for c in text.split(",") if c.strip()] if text else None


def _is_number(value: Any) -> bool:
    """A JSON number (true/false are not numbers here, although Python's bool is an int)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def load_detection_file(path: str | Path, image_ids: Sequence[str], class_names: Sequence[str]
                        ) -> list[dict[str, np.ndarray]]:
    """Read the JSON format above into per-image arrays (0-based boxes, labels 1..C)."""
    path = Path(path)
    try:
        records = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise EvalInputError(f"{path}: cannot read detections: {exc}") from exc
    if not isinstance(records, list):
        raise EvalInputError(f"{path}: expected a JSON list of detections")
    index = {img: i for i, img in enumerate(image_ids)}
    label_of = {c: i + 1 for i, c in enumerate(class_names)}
    per_image: list[list[tuple]] = [[] for _ in image_ids]
    for n, rec in enumerate(records):
        where = f"{path}: detection #{n}"
        if not isinstance(rec, dict) or not {"image_id", "label", "score", "bbox"} <= set(rec):
            raise EvalInputError(f"{where} must have image_id, label, score and bbox; got {rec!r}")
        img, label, box = str(rec["image_id"]), rec["label"], rec["bbox"]
        if img not in index:
            raise EvalInputError(f"{where}: image_id {img!r} is not in the split "
                                 f"({len(image_ids)} images, e.g. {', '.join(image_ids[:3])})")
        if not isinstance(label, str) or label not in label_of:
            raise EvalInputError(f"{where}: unknown label {label!r}; valid: {', '.join(class_names)}")
        ok = isinstance(box, list) and len(box) == 4 and all(
            _is_number(v) and math.isfinite(v) for v in box)
        if not ok or box[2] < box[0] or box[3] < box[1]:
            raise EvalInputError(f"{where}: bbox must be 4 finite numbers [x1, y1, x2, y2] with "
                                 f"x2 >= x1 and y2 >= y1; got {box!r}")
        score = rec["score"]
        if not _is_number(score) or not math.isfinite(score):
            raise EvalInputError(f"{where}: score must be a finite number; got {score!r}")
        per_image[index[img]].append((*[v - 1.0 for v in box], float(score), label_of[label]))
    out = []
    for dets in per_image:
        arr = np.asarray(dets, dtype=np.float64).reshape(-1, 6)
        out.append({"boxes": arr[:, :4], "scores": arr[:, 4], "labels": arr[:, 5].astype(np.int64)})
    return out


def detections_to_records(detections: Sequence[dict[str, np.ndarray]], image_ids: Sequence[str],
                          class_names: Sequence[str]) -> list[dict[str, Any]]:
    """The inverse of load_detection_file: XML (1-based) coordinates, class names."""
    records = []
    for img, det in zip(image_ids, detections):
        for box, score, label in zip(det["boxes"], det["scores"], det["labels"]):
            records.append({"image_id": img, "label": class_names[int(label) - 1],
                            "score": float(score),  # full precision: re-evaluating a saved
                            "bbox": [float(v) + 1.0 for v in box]})  # file gives the same mAP
    return records


def run_model(args: argparse.Namespace, class_names: list[str] | None):
    """Inference with the checkpoint over the split; returns (dataset, class names, dets, img/s)."""
    import torch

    from ssd_da.data.transforms import build_eval_transform
    from ssd_da.data.voc import VOCDetection
    from ssd_da.engine.checkpoint import load_detector
    from ssd_da.engine.inference import predict
    from ssd_da.engine.inference import resolve_device

    device = resolve_device(args.device)
    model, ckpt = load_detector(args.checkpoint, device)
    trained = list(ckpt["class_names"])
    if class_names is not None and class_names != trained:
        raise EvalInputError(f"--classes {','.join(class_names)} differ from the classes "
                             f"{args.checkpoint} was trained on: {','.join(trained)}")
    check_classes_match(args.data_root, args.split, trained, args.checkpoint,  # before inference
                        hint="evaluate it on a split of the data it was trained for")
    size = int(ckpt.get("config", {}).get("image_size", 300))
    dataset = VOCDetection(args.data_root, args.split, class_names=trained,
                           transform=build_eval_transform(size), keep_difficult=True,
                           skip_bad=args.skip_bad)
    with torch.inference_mode():
        dets, rate = predict(model, dataset, device, args.batch_size, args.workers, args.amp)
    return dataset, trained, [dets[i] for i in range(len(dataset))], rate


def names_in_split(data_root: str, split: str) -> set[str]:
    """Object class names present in the split's XML files (top-level objects only)."""
    import xml.etree.ElementTree as ET

    from ssd_da.data.voc import resolve_split

    names: set[str] = set()
    for year_dir, image_id in resolve_split(data_root, split):
        try:
            root = ET.parse(Path(year_dir) / "Annotations" / f"{image_id}.xml").getroot()
        except (OSError, ET.ParseError):
            continue  # the dataset itself reports unreadable files
        names.update((o.findtext("name") or "").strip() for o in root.findall("object"))
    return names


def check_classes_match(data_root: str, split: str, class_names: Sequence[str], source: str,
                        hint: str = "pass --classes matching the data") -> None:
    """A model's classes must cover the dataset's: otherwise every AP would silently be n/a."""
    found = names_in_split(data_root, split)
    unknown = sorted(found - set(class_names))
    if unknown:
        raise EvalInputError(
            f"{data_root} split {split} has classes {', '.join(unknown)} that {source} does not "
            f"know (its classes: {', '.join(class_names)}); {hint}")


def report(result, coco: dict[str, float] | None, num_images: int, rate: float | None) -> None:
    print(result.table())
    if coco is not None:
        print(f"COCO-style (pycocotools): AP@[.5:.95] {100 * coco['AP']:.2f}  "
              f"AP50 {100 * coco['AP50']:.2f}")
    line = f"{num_images} images"
    if rate is not None:
        line += f"; inference {rate:.1f} images/s (model and transfer, batch included)"
    print(line)


def main(args: argparse.Namespace) -> int:
    from ssd_da.data.voc import VOC_CLASSES, VOCDetection
    from ssd_da.engine.checkpoint import CheckpointError
    from ssd_da.evaluation.voc import evaluate_voc

    try:
        class_names = parse_classes(args.classes)
        rate = None
        if args.checkpoint:
            dataset, class_names, detections, rate = run_model(args, class_names)
        else:
            class_names = class_names or list(VOC_CLASSES)
            dataset = VOCDetection(args.data_root, args.split, class_names=class_names,
                                   transform=None, keep_difficult=True, skip_bad=args.skip_bad)
            check_classes_match(args.data_root, args.split, class_names, "--classes")
            ids = [dataset.get_annotation(i).image_id for i in range(len(dataset))]
            detections = load_detection_file(args.detections, ids, class_names)
        annotations = [dataset.get_annotation(i) for i in range(len(dataset))]
        gts = [a.ground_truth() for a in annotations]
        result = evaluate_voc(detections, gts, class_names, metric=args.metric,
                              iou_rule=args.iou_rule)
        coco = None
        if not args.no_coco:
            from ssd_da.evaluation.coco import coco_metrics

            # COCO's continuous coordinates give a zero-width box zero area: it could never be
            # matched there, so COCO sees the training view (clipped, degenerate boxes dropped).
            coco = coco_metrics(detections, [{"boxes": a.boxes, "labels": a.labels,
                                              "difficult": a.difficult} for a in annotations],
                                class_names)
        report(result, coco, len(dataset), rate)
        write_outputs(args, result, detections, [a.image_id for a in annotations], class_names)
    except (EvalInputError, CheckpointError, ValueError, OSError) as exc:
        logger.error("%s", exc)
        return 2
    return 0


def write_outputs(args, result, detections, image_ids, class_names) -> None:
    if args.save_detections:
        recs = detections_to_records(detections, image_ids, class_names)
        Path(args.save_detections).write_text(json.dumps(recs))
        print(f"wrote {len(recs)} detections to {args.save_detections}")
    if args.json:
        # JSON has no NaN: a class without ground truth (AP undefined) and the mAP of a split
        # with no ground truth at all are written as null.
        ap = {c: (None if math.isnan(v) else float(v)) for c, v in result.ap.items()}
        payload = {"metric": "voc07_11point" if args.metric == "voc07" else "voc_area",
                   "iou_rule": result.iou_rule,
                   "map": None if math.isnan(result.map) else float(result.map), "ap": ap,
                   "num_images": len(image_ids)}
        Path(args.json).write_text(json.dumps(payload, indent=2, allow_nan=False))
    if args.plots:
        from ssd_da.evaluation.plots import plot_ap_bars, plot_pr_curves

        out = Path(args.plots)
        out.mkdir(parents=True, exist_ok=True)
        paths = plot_pr_curves(result, out)
        plot_ap_bars(result, out / "ap_per_class.png")
        print(f"wrote {len(paths) + 1} plots to {out}/")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main(get_args_parser().parse_args()))
