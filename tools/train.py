#!/usr/bin/env python
"""Train SSD300 on PASCAL VOC (or any VOC-layout or COCO-format dataset) with an
attention-ResNet backbone.

    python tools/train.py --backbone da_resnet50                 # ssd.pytorch VOC0712 recipe
    python tools/train.py --config configs/demo.yaml             # synthetic demo, CPU, minutes
    python tools/train.py --data-format coco --data-root data/coco --train-split train2017 \
        --test-split val2017                                     # COCO layout, its categories
    torchrun --nproc_per_node 4 tools/train.py --backbone da_resnet50 --batch-size 8 --sync-bn
                                                  # --batch-size is per process: global 32
    python tools/train.py --resume runs/da_resnet50/last.pth     # continue exactly

The tool itself: ssd_da/cli/train.py (``--help`` shows everything).
"""
from ssd_da.cli.train import script

if __name__ == "__main__":
    script()
