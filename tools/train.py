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

Precedence: Config defaults < --config YAML < trailing key=value overrides < explicit options.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ssd_da.config import Config, apply_overrides, load_config, parse_key_values  # noqa: E402

logger = logging.getLogger("train")

# Options that map one-to-one onto Config fields (None: not given, keep the config's value).
FIELD_OPTIONS = {
    "backbone": str, "data_format": str, "data_root": str, "train_split": str, "test_split": str,
    "classes": str, "iters": int, "batch_size": int, "lr": float, "workers": int, "eval_every": int,
    "output_dir": str, "pretrained": str, "device": str, "seed": int, "metric": str,
}


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, add_help=add_help,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML file of Config overrides, e.g. configs/demo.yaml")
    for name, typ in FIELD_OPTIONS.items():
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=typ, default=None,
                       help=f"Config.{name} (default: {getattr(Config(), name)!r})")
    p.add_argument("--resume", help="last.pth of an interrupted run; continues it exactly")
    p.add_argument("--amp", action="store_true", default=None, help="bf16 autocast on GPU")
    p.add_argument("--sync-bn", dest="sync_bn", action="store_true", default=None,
                   help="SyncBatchNorm across processes under torchrun")
    p.add_argument("--skip-bad", dest="skip_bad", action="store_true", default=None,
                   help="skip samples with a malformed XML or a missing, unreadable or "
                        "undecodable image (each named in a warning, and counted)")
    p.add_argument("--ignore-other-classes", dest="ignore_other_classes", action="store_true",
                   default=None, help="leave out objects of classes not in the class list "
                                      "(counted per class); without it they stop the run")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="any Config field, e.g. lr_steps=[80000,100000] warmup_iters=1000")
    return p


def resolve_config(args: argparse.Namespace) -> Config:
    """Defaults, YAML, key=value, then explicit options. Resuming without --config starts from
    the checkpoint's own saved config so the run continues with the same recipe."""
    if args.resume and not args.config:
        from ssd_da.engine.checkpoint import load_checkpoint

        saved = load_checkpoint(args.resume).get("config", {})
        cfg = apply_overrides(Config(), saved, f"config saved in {args.resume}")
        cfg = apply_overrides(cfg, parse_key_values(args.overrides), "command line")
    else:
        cfg = load_config(args.config, args.overrides)
    explicit = {k: getattr(args, k) for k in (*FIELD_OPTIONS, "amp", "sync_bn", "skip_bad",
                                              "ignore_other_classes")
                if getattr(args, k) is not None}
    return apply_overrides(cfg, explicit, "command-line options")


def main(args: argparse.Namespace) -> int:
    from ssd_da.engine.checkpoint import CheckpointError
    from ssd_da.engine.trainer import NonFiniteLossError, train

    try:
        cfg = resolve_config(args)
        summary = train(cfg, resume=args.resume)
    except NonFiniteLossError as exc:
        logger.error("%s", exc)
        return 3
    except (ValueError, OSError, CheckpointError) as exc:
        logger.error("%s", exc)
        return 2
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
