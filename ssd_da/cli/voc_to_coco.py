"""Convert a VOCdevkit folder to the COCO layout, or back with --reverse.

    python tools/voc_to_coco.py --voc-root datasets/bccd/VOCdevkit --coco-root data/bccd_coco \\
        --splits voc07_trainval,voc07_test --classes RBC,WBC,Platelets
    python tools/voc_to_coco.py --reverse --coco-root data/bccd_coco --voc-root data/bccd_voc \\
        --splits voc07_trainval,voc07_test

VOC to COCO writes COCO_ROOT/annotations/instances_<split>.json and copies the images into
COCO_ROOT/<split>/ (the layout --data-format coco reads; the split names stay the same, so
--train-split/--test-split do not change). Categories are --classes in that order (default: the
20 VOC classes if the XML names are all VOC classes, else the names found, sorted); give the
order your VOC runs use so that labels match. --reverse writes VOC_ROOT/VOC2007/ (or the folder of
a split named like voc12_trainval) with Annotations/, JPEGImages/ and ImageSets/Main/<split>.txt.
A VOC box becomes [xmin - 1, ymin - 1, xmax - xmin, ymax - ymin] and back; difficult <-> iscrowd.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ssd_da.data.convert import coco_split_to_voc, voc_class_names, voc_split_to_coco
from ssd_da.data.voc import AnnotationError
from ssd_da.utils.cli import parse_names, report_error, run_program


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, add_help=add_help,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--voc-root", required=True, help="VOCdevkit folder (read, or written with --reverse)")
    p.add_argument("--coco-root", required=True, help="COCO-layout folder (written, or read with --reverse)")
    p.add_argument("--splits", required=True,
                   help="comma-separated split names, e.g. voc07_trainval,voc07_test (or the COCO "
                        "split names with --reverse, e.g. train2017,val2017)")
    p.add_argument("--classes", help="a,b,c: the categories, in label order (VOC to COCO only)")
    p.add_argument("--reverse", action="store_true", help="convert COCO to VOC instead")
    p.add_argument("--year", default="2007",
                   help="with --reverse: VOC<year>/ for splits not named like a VOC split (default 2007)")
    p.add_argument("--link", action="store_true",
                   help="hard-link the images instead of copying them (where the file system allows)")
    return p


def run(args: argparse.Namespace) -> int:
    """0 when every split is converted, 2 for bad input (message on stderr)."""
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    try:
        if not splits:
            raise ValueError("--splits names no split")
        if args.reverse:
            if args.classes is not None:
                raise ValueError("--classes is for VOC to COCO; --reverse keeps the JSON's categories")
            for split in splits:
                counts = coco_split_to_voc(args.coco_root, split, args.voc_root, args.year, args.link)
                print(f"{split}: {counts['images']} images, {counts['objects']} objects -> {args.voc_root}")
            return 0
        classes = parse_names(args.classes, "--classes") or voc_class_names(args.voc_root, splits)
        if len(set(classes)) != len(classes):
            raise ValueError(f"--classes must be unique, got {classes}")
        for split in splits:
            counts = voc_split_to_coco(args.voc_root, split, classes, args.coco_root, args.link)
            print(f"{split}: {counts['images']} images, {counts['objects']} objects -> "
                  f"{Path(args.coco_root) / 'annotations' / f'instances_{split}.json'}")
        print(f"categories: {', '.join(classes)}")
    except (AnnotationError, ValueError, OSError) as exc:
        return report_error("voc_to_coco.py", exc)
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command line ``argv`` (default: ``sys.argv[1:]``) parsed and run; the exit status."""
    return run(get_args_parser().parse_args(argv))


def script() -> None:
    """The program (``tools/voc_to_coco.py``, ``python -m ssd_da.cli.voc_to_coco``): logging set up, then
    :func:`main` on the command line; exits with its status."""
    run_program(main)


if __name__ == "__main__":
    script()
