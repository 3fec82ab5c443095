"""Train SSD300 on PASCAL VOC (or any VOC-layout or COCO-format dataset) with an
attention-ResNet backbone.

    python tools/train.py --backbone da_resnet50                 # ssd.pytorch VOC0712 recipe
    python tools/train.py --config configs/demo.yaml             # synthetic demo, CPU, minutes
    python tools/train.py --data-format coco --data-root data/coco --train-split train2017 \
        --test-split val2017                                     # COCO layout, its categories
    torchrun --nproc_per_node 4 tools/train.py --backbone da_resnet50 --batch-size 8 --sync-bn
                                                  # --batch-size is per process: global 32
    python tools/train.py --resume runs/da_resnet50/last.pth     # continue exactly

Precedence: Config defaults < --config YAML < key=value overrides < explicit options (with
--resume and no --config, the checkpoint's saved config replaces the defaults). key=value
overrides may stand anywhere among the options.
A folder that already holds a run is never silently reused: continue it with --resume
<folder>/last.pth or replace it with --overwrite. --resume writes next to the checkpoint it is
given, unless --output-dir (or output_dir=) says otherwise.
Exit status: 0 done, 2 bad input (message on stderr), 3 non-finite loss or weights, 74 a
checkpoint could not be written (no space, quota, file-size limit; the previous one is intact),
75 stopped by SIGTERM, SIGINT or SIGUSR1 after saving last.pth (the message gives the --resume
command), 130 a second Ctrl-C (stopped at once, without saving).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import sys
from pathlib import Path

from ssd_da.config import Config, add_config_arguments, parse_key_values, resolve_config
from ssd_da.engine.checkpoint import CheckpointWriteError, load_checkpoint
from ssd_da.engine.interrupt import Interrupted
from ssd_da.engine.step import NonFiniteLossError
from ssd_da.engine.trainer import train
from ssd_da.utils.cli import (EXIT_INTERRUPTED, EXIT_NON_FINITE, EXIT_STOPPED_AT_ONCE,
                              EXIT_WRITE_FAILED, report_error, run_program)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, add_help=add_help,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resume", help="last.pth of an interrupted run; continues it exactly, "
                                     "in the checkpoint's folder unless --output-dir is given")
    p.add_argument("--overwrite", action="store_true",
                   help="delete the run already in the output folder and start again")
    add_config_arguments(p)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; key=value overrides may come before, between or after the options."""
    return get_args_parser().parse_intermixed_args(argv)


def resume_output_dir(args: argparse.Namespace, cfg: Config) -> Config:
    """``--resume CKPT`` continues where CKPT lies (a copied or moved run folder included), not
    in the folder named by the config saved inside it, unless the output folder is given on
    this command line."""
    if not args.resume or args.output_dir is not None \
            or "output_dir" in parse_key_values(args.overrides):
        return cfg
    folder = str(Path(args.resume).parent)  # braces doubled: output_dir is a format string
    return dataclasses.replace(cfg, output_dir=folder.replace("{", "{{").replace("}", "}}"))


def run(args: argparse.Namespace) -> int:
    """0 when training finished, 2 for bad input, 3 for a non-finite loss or weights, 74 when a
    checkpoint could not be written, 75 when a signal stopped it after saving, 130 for a second
    Ctrl-C (message on stderr; module docstring)."""
    try:
        saved = load_checkpoint(args.resume).get("config", {}) if args.resume else None
        cfg = resume_output_dir(args, resolve_config(args, saved))
        summary = train(cfg, resume=args.resume, overwrite=args.overwrite)
    except NonFiniteLossError as exc:
        report_error("train.py", exc)
        return EXIT_NON_FINITE
    except Interrupted as exc:
        print(f"train.py: {exc}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except CheckpointWriteError as exc:  # no space / file too large: not the input's fault
        report_error("train.py", exc)
        return EXIT_WRITE_FAILED
    except KeyboardInterrupt as exc:
        print(f"train.py: {str(exc) or 'interrupted'}; the last checkpoint on disk is intact",
              file=sys.stderr)
        return EXIT_STOPPED_AT_ONCE
    except (ValueError, OSError) as exc:  # CheckpointError is a ValueError
        return report_error("train.py", exc)
    if int(os.environ.get("RANK", "0")) == 0:
        print(report(summary, cfg))
    return 0


def _percent(value: float) -> str:
    return f"{100 * value:.2f}%" if math.isfinite(value) and value >= 0 else "n/a"


def report(summary: dict, cfg: Config) -> str:
    """The closing lines: what the run did, and only the files it actually holds."""
    skipped = summary["skipped_samples"]
    out = Path(summary["output_dir"])
    files = [n for n in ("last.pth", "best.pth", "log.jsonl", "curves.png", "summary.json")
             if (out / n).exists()]
    return (f"\ndone: {summary['backbone']}, {summary['iterations']} iterations in "
            f"{summary['wall_time_s'] / 60:.1f} min; {summary['metric']} mAP final "
            f"{_percent(summary['final_map'])}"
            + (" (last.pth: report this one)" if "last.pth" in files else "")
            + f", best {_percent(summary['best_map'])}"
            + (f" (best.pth, selected on the test split {cfg.test_split})"
               if "best.pth" in files else "")
            + f"; backbone init {summary['backbone_init']}"
            + (f"; peak GPU memory {summary['peak_memory_mb']:.0f} MiB"
               if summary["peak_memory_mb"] else "")
            + (f"; {summary['world_size']} processes x batch {cfg.batch_size} = global batch "
               f"{summary['global_batch_size']}" if summary["world_size"] > 1 else "")
            + (f"; skipped {sum(skipped.values())} bad samples ({skipped['train']} training, "
               f"{skipped['test']} test; --skip-bad)" if any(skipped.values()) else "")
            + f"\noutputs in {out}/ ({', '.join(files)})")


def main(argv: list[str] | None = None) -> int:
    """The command line ``argv`` (default: ``sys.argv[1:]``) parsed and run; the exit status."""
    return run(parse_args(argv))


def script() -> None:
    """The program (``tools/train.py``, ``python -m ssd_da.cli.train``): logging set up, then
    :func:`main` on the command line; exits with its status."""
    # Under torchrun only rank 0 reports progress; the other ranks still print warnings and errors.
    run_program(main, timestamps=True,
                level=logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING)


if __name__ == "__main__":
    script()
