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

Precedence: Config defaults < --config YAML < trailing key=value overrides < explicit options
(with --resume and no --config, the checkpoint's saved config replaces the defaults).
Exit status: 0 done, 2 bad input (message on stderr), 3 non-finite loss.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from ssd_da.config import add_config_arguments, resolve_config
from ssd_da.engine.checkpoint import load_checkpoint
from ssd_da.engine.trainer import EXIT_NON_FINITE, NonFiniteLossError, train
from ssd_da.utils.cli import report_error


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, add_help=add_help,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resume", help="last.pth of an interrupted run; continues it exactly")
    add_config_arguments(p)
    return p


def main(args: argparse.Namespace) -> int:
    """0 when training finished, 2 for bad input, 3 for a non-finite loss (message on stderr)."""
    try:
        saved = load_checkpoint(args.resume).get("config", {}) if args.resume else None
        cfg = resolve_config(args, saved)
        summary = train(cfg, resume=args.resume)
    except NonFiniteLossError as exc:
        report_error("train.py", exc)
        return EXIT_NON_FINITE
    except (ValueError, OSError) as exc:  # CheckpointError is a ValueError
        return report_error("train.py", exc)
    if int(os.environ.get("RANK", "0")) == 0:
        best = summary["best_map"]
        print(f"\ndone: {summary['backbone']}, {summary['iterations']} iterations in "
              f"{summary['wall_time_s'] / 60:.1f} min; {summary['metric']} mAP final "
              f"{100 * summary['final_map']:.2f}% (last.pth: report this one), best "
              f"{100 * best:.2f}% (best.pth, selected on the test split {cfg.test_split})"
              + f"; backbone init {summary['backbone_init']}"
              + (f"; peak GPU memory {summary['peak_memory_mb']:.0f} MiB"
                 if summary["peak_memory_mb"] else "")
              + (f"; {summary['world_size']} processes x batch {cfg.batch_size} = global batch "
                 f"{summary['global_batch_size']}" if summary["world_size"] > 1 else "")
              + f"\noutputs in {summary['output_dir']}/ (last.pth, best.pth, log.jsonl, curves.png)")
    return 0


if __name__ == "__main__":
    # Under torchrun only rank 0 reports progress; the other ranks still print warnings and errors.
    logging.basicConfig(level=logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(main(get_args_parser().parse_args()))
