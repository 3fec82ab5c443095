#!/usr/bin/env python
"""Grad-CAM heatmaps of SSD300 detections, one column per checkpoint (the DA paper's Figure 5).

    python tools/gradcam.py img1.jpg img2.jpg --checkpoint runs/resnet50/best.pth \\
        --checkpoint runs/da_resnet50/best.pth --out gradcam.png
    python tools/gradcam.py img.jpg --checkpoint best.pth --class dog --score 0.3 --draw-boxes
    python tools/gradcam.py img.jpg --checkpoint best.pth --box 48,240,195,371 --method gradcam++

The tool itself: ssd_da/cli/gradcam.py (``--help`` shows everything).
"""
from ssd_da.cli.gradcam import script

if __name__ == "__main__":
    script()
