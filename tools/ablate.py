#!/usr/bin/env python
"""The DA paper's ablations and attention comparisons over several seeds, with tables that show
how sure each difference is (mean ± std, paired difference to the plain ResNet with a 95% t
interval).

    # Table I: orders of the spatial and channel branches (ResNet50), 3 seeds
    python tools/ablate.py --suite order --seeds 3 --output-dir runs/table1
    # Tables II/III: plain, SE, SGE, ECA, DA, CBAM at four depths, one run per GPU
    python tools/ablate.py --suite attention --depths 18,34,50,101 --gpus 0,1,2,3 \\
        --output-dir runs/table2
    # the LGA paper's Table 4: ResNet18 plain and with one module at the end of the backbone
    python tools/ablate.py --suite lga --seeds 3 --output-dir runs/lga_table4
    # any backbones, on the demo data, CPU
    python tools/ablate.py --config configs/demo.yaml --backbones resnet18,da_resnet18 \\
        --seed-list 0,5,9 --output-dir runs/demo_ablation iters=100 lr_steps=[67,83]

Every tools/train.py option (--config, --iters, --lr, key=value, ...) is passed to every run.
The runner owns --backbone, --seed and --resume; --output-dir DIR gets one folder per run,
DIR/<backbone>/seed<k>/, and results.csv, results.md, map_vs_params.png at its top. Rerunning
the same command skips finished runs and resumes interrupted ones.
Exit status: 0 every run finished, 1 some did not, 2 bad input, 74 a checkpoint could not be
written (no space), 75 stopped by SIGTERM, SIGINT or SIGUSR1 (the current run saved its
last.pth: rerun the same command), 130 a second Ctrl-C.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import NoReturn

from ssd_da.config import add_config_arguments, parse_key_values, resolve_config
from ssd_da.engine.checkpoint import EXIT_WRITE_FAILED, CheckpointWriteError
from ssd_da.engine.data import class_names_from_config
from ssd_da.engine.folder_lock import hold_folder_lock
from ssd_da.engine.interrupt import (EXIT_INTERRUPTED, EXIT_STOPPED_AT_ONCE, Interrupted,
                                     stop_on_signals)
from ssd_da.experiments.ablate import (SUITES, check_gpus, plan_runs, run_suite,
                                       suite_backbones, write_reports)
from ssd_da.utils.cli import fail, report_error

logger = logging.getLogger("ablate")
# The training tool each subprocess of --gpus runs (its sibling in tools/).
TRAIN_SCRIPT = Path(__file__).resolve().parent / "train.py"
# Config keys the runner sets per run; giving them as key=value would be silently replaced.
OWNED_KEYS = ("backbone", "seed", "output_dir")


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")


def _str_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p)  # the options of tools/train.py, passed to every run
    p.add_argument("--resume", help=argparse.SUPPRESS)  # accepted only to say why it is refused
    g = p.add_argument_group("ablation")
    g.add_argument("--suite", choices=SUITES,
                   help="order: Table I (resnet, da, da_cs, da_par, da_s, da_c); attention: "
                        "Tables II/III (resnet, se, sge, eca, da, cbam) at each of --depths; "
                        "lga: the LGA paper's Table 4 (resnet, then one mhsa, se, eca, cbam, "
                        "sa, la, ga or lga module at the end of the backbone)")
    g.add_argument("--depths", type=_int_list,
                   help="depths for --suite, e.g. 18,34,50,101 (default: 50 for order, "
                        "18,34,50,101 for attention, 18 for lga)")
    g.add_argument("--backbones", type=_str_list,
                   help="explicit list, e.g. resnet50,da_resnet50 (a module in every block) or "
                        "resnet18,resnet18_lga (one module after layer4)")
    g.add_argument("--seeds", type=int, help="run seeds 0..N-1 (default 3)")
    g.add_argument("--seed-list", dest="seed_list", type=_int_list, help="explicit seeds, e.g. 0,5,9")
    g.add_argument("--gpus", type=_str_list,
                   help="one tools/train.py subprocess per GPU id, e.g. 0,1,2,3 (default: "
                        "runs one after another in this process)")
    g.add_argument("--level", type=float, default=0.95, help="confidence level of the intervals")
    g.add_argument("--report-only", action="store_true",
                   help="write the tables from the runs on disk; train nothing")
    return p


def _fail(message: str) -> NoReturn:
    fail("ablate.py", message)


def _check_owned(args: argparse.Namespace) -> None:
    for option, instead in (("backbone", "--backbones or --suite"),
                            ("seed", "--seeds or --seed-list"),
                            ("resume", "nothing: rerunning the command resumes interrupted runs")):
        if getattr(args, option) is not None:
            _fail(f"--{option} is set by the runner for each run; use {instead}")
    if args.output_dir is None:
        _fail("--output-dir DIR is required (runs go to DIR/<backbone>/seed<k>/)")
    try:
        keys = {k.replace("-", "_") for k in parse_key_values(args.overrides)}
    except ValueError as exc:
        _fail(str(exc))
    owned = sorted(keys & set(OWNED_KEYS))
    if owned:
        _fail(f"override(s) {', '.join(owned)} are set by the runner; use --backbones/--suite, "
              "--seeds/--seed-list and --output-dir")


def _backbones_and_seeds(args: argparse.Namespace) -> tuple[list[str], list[int]]:
    if (args.suite is None) == (args.backbones is None):
        _fail(f"give exactly one of --suite {{{','.join(SUITES)}}} and --backbones a,b,c")
    if args.depths and args.suite is None:
        _fail("--depths goes with --suite; list the backbones in --backbones instead")
    if args.seeds is not None and args.seed_list is not None:
        _fail("give either --seeds N or --seed-list a,b,c, not both")
    if args.seeds is not None and args.seeds < 1:
        _fail(f"--seeds must be >= 1, got {args.seeds}")
    if not 0.0 < args.level < 1.0:
        _fail(f"--level must lie strictly between 0 and 1, got {args.level}")
    try:
        backbones = suite_backbones(args.suite, args.depths) if args.suite else args.backbones
    except ValueError as exc:
        _fail(str(exc))
    seeds = args.seed_list if args.seed_list is not None else list(range(args.seeds or 3))
    return backbones, seeds


def main(args: argparse.Namespace) -> int:
    """Plan, train (unless --report-only) and report. 0: every run finished; 1: some did not;
    2: bad input (message on stderr); 75: stopped by a signal, 130: by a second Ctrl-C."""
    try:
        with stop_on_signals():
            return run(args)
    except Interrupted as exc:
        print(f"ablate.py: {exc}; rerun the same command to continue the suite (finished runs "
              f"are skipped, interrupted ones resume)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt as exc:
        print(f"ablate.py: {str(exc) or 'interrupted'}; the runs' last checkpoints on disk are "
              f"intact", file=sys.stderr)
        return EXIT_STOPPED_AT_ONCE
    except CheckpointWriteError as exc:
        report_error("ablate.py", exc)
        return EXIT_WRITE_FAILED


def run(args: argparse.Namespace) -> int:
    """:func:`main` without the signal handling."""
    _check_owned(args)
    backbones, seeds = _backbones_and_seeds(args)
    if args.gpus and not args.report_only:
        try:
            check_gpus(args.gpus)
        except ValueError as exc:
            _fail(str(exc))
    root = Path(args.output_dir)
    run_args = argparse.Namespace(**{**vars(args), "output_dir": None})
    try:
        base = resolve_config(run_args)
        specs = plan_runs(base, backbones, seeds, root)
        # One suite per folder at a time (--report-only only reads the runs: no lock, so a
        # running suite's partial results can be tabulated).
        with hold_folder_lock(root, "--output-dir", enabled=not args.report_only):
            outcomes = [] if args.report_only else run_suite(specs, args.gpus,
                                                             train_script=TRAIN_SCRIPT)
            paths = write_reports(specs, outcomes, root, class_names_from_config(base),
                                  args.suite if args.suite in ("order", "lga") else "attention",
                                  args.level)
    except (ValueError, FileNotFoundError) as exc:
        return report_error("ablate.py", exc)
    stopped = [o.spec.name for o in outcomes if o.status == "interrupted"]
    if stopped:
        raise Interrupted(f"stopped by a signal; {len(stopped)} run(s) not finished "
                          f"({', '.join(stopped[:4])}{' ...' if len(stopped) > 4 else ''})",
                          "signal")
    bad = [o for o in outcomes if o.status in ("diverged", "failed")]
    for o in bad:
        logger.error("%s %s: %s", o.spec.name, o.status, o.message)
    counts = ", ".join(f"{sum(o.status == k for o in outcomes)} {k}"
                       for k in ("skipped", "trained", "diverged", "failed"))
    print(f"\n{len(specs)} runs ({counts if outcomes else 'report only'}); tables in "
          f"{paths['md']}, {paths['csv']}, {paths['png']}")
    return 1 if bad else 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(main(get_args_parser().parse_intermixed_args()))  # key=value anywhere
