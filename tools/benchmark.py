#!/usr/bin/env python
"""Benchmarks of ssd_da, one subcommand each; results go to a section of docs/benchmarks.md.

    python tools/benchmark.py metric            # evaluate_voc on 5,000 images x 20 classes
    python tools/benchmark.py model --amp       # SSD300 train/inference images/s, peak memory
    python tools/benchmark.py loader            # CPU data pipeline images/s per core
    python tools/benchmark.py memory            # bytes saved for backward per attention module
    python tools/benchmark.py train             # training images/s: ours vs torchvision, e2e
    python tools/benchmark.py eval              # inference images/s, VOC07-test-sized evaluation
    python tools/benchmark.py gpu-suite         # the whole GPU measurement, under 8 minutes
    python tools/benchmark.py modules           # each attention module's cost per training step
    python tools/benchmark.py modules --stages --before --step   # against their floors (issue 24)

The tool itself: ssd_da/cli/benchmark.py (``--help`` shows everything).
"""
from ssd_da.cli.benchmark import script

if __name__ == "__main__":
    script()
