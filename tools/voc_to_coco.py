#!/usr/bin/env python
"""Convert a VOCdevkit folder to the COCO layout, or back with --reverse.

    python tools/voc_to_coco.py --voc-root datasets/bccd/VOCdevkit --coco-root data/bccd_coco \\
        --splits voc07_trainval,voc07_test --classes RBC,WBC,Platelets
    python tools/voc_to_coco.py --reverse --coco-root data/bccd_coco --voc-root data/bccd_voc \\
        --splits voc07_trainval,voc07_test

The tool itself: ssd_da/cli/voc_to_coco.py (``--help`` shows everything).
"""
from ssd_da.cli.voc_to_coco import script

if __name__ == "__main__":
    script()
