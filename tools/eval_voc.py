#!/usr/bin/env python
"""Evaluate on a VOC-layout or COCO-format test split: per-class AP, mAP (VOC07 11-point by
default), COCO AP (pycocotools).

    python tools/eval_voc.py --checkpoint runs/da_resnet50/best.pth --data-root data/VOCdevkit
    python tools/eval_voc.py --detections dets.json --data-root data/VOCdevkit --split voc07_test
    python tools/eval_voc.py --checkpoint best.pth --data-format coco --data-root data/coco \
        --split val2017

The tool itself: ssd_da/cli/eval_voc.py (``--help`` shows everything).
"""
from ssd_da.cli.eval_voc import script

if __name__ == "__main__":
    script()
