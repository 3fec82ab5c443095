#!/usr/bin/env python
"""Params and GFLOPs of backbones (DA paper Table II) or of the SSD300 detector built on them.

Two FLOP counts, side by side:

- "torchstat": torchstat's rules (``ssd_da/utils/flops.py``). The DA paper does not name its
  counter, but these rules reproduce 22 of Table II's 24 values exactly (the other two, the
  DA-ResNet18/34 GFLOPs, 0.0001 above the print): multiply-accumulates of convs and FCs plus
  BN/ReLU/pooling terms; matrix products and softmax count 0, so attention's cost (LGA, MHSA)
  is hidden there. Not comparable with thop / ptflops / fvcore (docs/method.md).
- "complete": PyTorch's ``FlopCounterMode``: 2 FLOPs per multiply-accumulate of every conv and
  matrix product, element-wise work 0 (about twice torchstat's count for a plain ResNet).

Examples::

    # Table II (ImageNet classifiers, 1000-way FC, 224x224, batch 1)
    python tools/complexity.py --classifier resnet18 se_resnet18 da_resnet18
    # the SSD300 detector (VOC: 20 classes + background) at 300x300
    python tools/complexity.py da_resnet50
    # raw integer counts
    python tools/complexity.py --classifier --csv resnet50 da_resnet50
    # the LGA paper's Table 4 set: one module at the end of ResNet18
    python tools/complexity.py --classifier resnet18 resnet18_mhsa resnet18_se resnet18_lga

The tool itself: ssd_da/cli/complexity.py (``--help`` shows everything).
"""
from ssd_da.cli.complexity import script

if __name__ == "__main__":
    script()
