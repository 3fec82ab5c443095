"""Run a detector checkpoint on images: one picture per image and a JSON of the detections.

    python tools/detect.py img1.jpg img2.png --checkpoint runs/da_resnet50/best.pth --out dets/

Writes DIR/<image name without extension>.png (the image with boxes, class names and scores)
for each image, and DIR/detections.json: a list, in image order and by descending score within
an image, of {"image": the path as given, "label": class name, "score": float,
"bbox": [x1, y1, x2, y2]}. Boxes are in the image's pixels, 0-BASED, exactly as the model
returns them (docs/design.md); add 1 to all four numbers for the VOC XML's 1-based convention.
Only detections with score >= --score (default 0.5) are drawn and written. Every image header is
read before the model loads (an unreadable one stops the run, nothing written); an image whose
pixels then fail to decode is left out, named, and the others are still written (exit 2).
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from PIL import Image

from ssd_da.data.voc import check_image, load_rgb
from ssd_da.engine.checkpoint import load_detector
from ssd_da.engine.inference import predict_image
from ssd_da.utils.cli import report_error, run_program
from ssd_da.utils.device import resolve_device
from ssd_da.utils.paths import check_dir, check_input_file
from ssd_da.visualize.draw import draw_detections

logger = logging.getLogger("detect")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, add_help=add_help,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+", help="image files (any format PIL reads)")
    p.add_argument("--checkpoint", required=True,
                   help="a detector checkpoint (best.pth / last.pth)")
    p.add_argument("--out", required=True, help="output folder (created if needed)")
    p.add_argument("--score", type=float, default=0.5, help="minimum score to keep (default 0.5)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1")
    return p


def output_names(images: list[str]) -> list[str]:
    """<stem>.png per image; ValueError if two images would overwrite each other's picture."""
    names, seen = [], {}
    for path in images:
        name = Path(path).stem + ".png"
        if name in seen:
            raise ValueError(f"images {seen[name]} and {path} would both be written to {name}; "
                             "rename one or run them separately")
        seen[name] = path
        names.append(name)
    return names


def check_inputs(args: argparse.Namespace) -> list[str]:
    """Fail before loading the model or writing anything: every image present and its header
    readable, the checkpoint a file, --out a folder (or creatable as one). Returns the output
    picture names."""
    bad = []
    for path in args.images:
        check_input_file(path, "image")
        try:
            check_image(path)
        except OSError as exc:
            bad.append(str(exc))
    if bad:
        raise ValueError(f"{len(bad)} of {len(args.images)} images cannot be read, nothing was "
                         f"written: {'; '.join(bad[:5])}")
    check_input_file(args.checkpoint, "checkpoint")
    if not 0.0 <= args.score <= 1.0:
        raise ValueError(f"--score: must lie in [0, 1], got {args.score}")
    check_dir(args.out, "--out")
    return output_names(args.images)


def detect_one(model: Any, path: str, class_names: list[str],
               score: float) -> tuple[Any, list[dict]]:
    """(picture (H, W, 3) uint8, JSON records) for one image file."""
    image = load_rgb(path)
    det = predict_image(model, image)
    keep = det["scores"] >= score
    boxes, scores, labels = det["boxes"][keep], det["scores"][keep], det["labels"][keep]
    records = [{"image": path, "label": class_names[int(l) - 1], "score": float(s),
                "bbox": [float(v) for v in b]} for b, s, l in zip(boxes, scores, labels)]
    return draw_detections(image, boxes, labels, scores, class_names), records


def run(args: argparse.Namespace) -> int:
    """Exit code 0 on success, 2 on bad input (message on stderr)."""
    try:
        names = check_inputs(args)
        model, ckpt = load_detector(args.checkpoint, resolve_device(args.device))
        class_names = list(ckpt["class_names"])
        out_dir = Path(args.out)
        out_dir.mkdir(parents=True, exist_ok=True)
        records: list[dict] = []
        failed: list[str] = []
        for path, name in zip(args.images, names):
            try:
                picture, recs = detect_one(model, path, class_names, args.score)
            except OSError as exc:  # a header that reads, pixels that do not (truncated)
                failed.append(str(exc))
                logger.error("%s", exc)
                continue
            Image.fromarray(picture).save(out_dir / name)
            records += recs
            logger.info("%s: %d detections >= %g -> %s", path, len(recs), args.score,
                        out_dir / name)
        (out_dir / "detections.json").write_text(json.dumps(records, indent=1))
        if failed:  # the others are written; say which were not, and exit 2
            raise ValueError(f"{len(failed)} of {len(args.images)} images could not be decoded "
                             f"and are not in {out_dir / 'detections.json'}: {'; '.join(failed[:5])}")
    except (ValueError, OSError) as exc:
        # Bad input (CheckpointError is a ValueError, FileNotFoundError an OSError): exit code 2.
        return report_error("detect.py", exc)
    logger.info("wrote %d detections to %s", len(records), out_dir / "detections.json")
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command line ``argv`` (default: ``sys.argv[1:]``) parsed and run; the exit status."""
    return run(get_args_parser().parse_args(argv))


def script() -> None:
    """The program (``tools/detect.py``, ``python -m ssd_da.cli.detect``): logging set up, then
    :func:`main` on the command line; exits with its status."""
    run_program(main)


if __name__ == "__main__":
    script()
