#!/usr/bin/env python
"""Run a detector checkpoint on images: one picture per image and a JSON of the detections.

    python tools/detect.py img1.jpg img2.png --checkpoint runs/da_resnet50/best.pth --out dets/

The tool itself: ssd_da/cli/detect.py (``--help`` shows everything).
"""
from ssd_da.cli.detect import script

if __name__ == "__main__":
    script()
