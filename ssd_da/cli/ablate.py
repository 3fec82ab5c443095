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
    # on a SLURM cluster: one job per run (one GPU each), waits and writes the tables
    python tools/ablate.py --suite attention --seeds 5 --output-dir runs/table2 \\
        --launcher slurm --partition gpu --time-limit 240 --account myproj
    # submit and return; then ask where the runs stand (the tables once all are done)
    python tools/ablate.py --suite order --seeds 5 --output-dir runs/table1 --launcher slurm \\
        --no-wait
    python tools/ablate.py --status --output-dir runs/table1

Every tools/train.py option (--config, --iters, --lr, key=value, ...) is passed to every run.
The runner owns --backbone, --seed and --resume; --output-dir DIR gets one folder per run,
DIR/<backbone>/seed<k>/, and results.csv, results.md (with the seeds each difference needs),
map_vs_params.png and power_curves.png at its top. Rerunning
the same command skips finished runs and resumes interrupted ones; with --launcher slurm it
also leaves queued and running jobs alone and resubmits failed ones (job ids in DIR/slurm/).
Exit status: 0 every run finished (--no-wait: submitted); 1 some did not; 2 bad input (or
sbatch / squeue refused, message on stderr);
4 (--status) some runs are still queued or running (the tables come once none is); 74 a
checkpoint could not be written (no space); 75 stopped by SIGTERM, SIGINT or SIGUSR1 (the
current run saved its last.pth: rerun the same command); 130 a second Ctrl-C.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import NoReturn

from ssd_da.config import add_config_arguments, parse_key_values, resolve_config
from ssd_da.engine.checkpoint import CheckpointWriteError
from ssd_da.engine.folder_lock import hold_folder_lock
from ssd_da.engine.interrupt import Interrupted, stop_on_signals
from ssd_da.engine.loaders import class_names_from_config
from ssd_da.experiments.ablate import (SUITES, check_gpus, plan_runs, run_state, run_suite,
                                       suite_backbones)
from ssd_da.experiments.results import write_reports
from ssd_da.experiments.slurm import (SlurmOptions, SlurmUnavailable, format_status,
                                      outcomes_of, read_jobs, submit_runs, suite_status,
                                      wait_for_runs)
from ssd_da.utils.cli import (EXIT_INTERRUPTED, EXIT_STOPPED_AT_ONCE, EXIT_WRITE_FAILED, fail,
                              report_error, run_program)

logger = logging.getLogger("ablate")
# Config keys the runner sets per run; giving them as key=value would be silently replaced.
OWNED_KEYS = ("backbone", "seed", "output_dir")
# Exit status of --status while some runs are still queued or running.
EXIT_PENDING = 4


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
    g.add_argument("--level", type=float, default=0.95,
                   help="confidence level of the intervals (the power test's alpha is 1 - level)")
    g.add_argument("--min-effect", type=float, default=0.3, metavar="PP",
                   help="the difference in points of mAP that results.md's seeds-needed column "
                        "plans for, next to the observed one (default 0.3)")
    g.add_argument("--report-only", action="store_true",
                   help="write the tables from the runs on disk; train nothing")
    _add_slurm_arguments(p)
    return p


def _sbatch_option(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not key.strip() or key.startswith("-"):
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE or NAME (an sbatch option without "
                                         f"its dashes, e.g. mem=64G or exclusive), got {text!r}")
    return key.strip(), value if sep else True


def _add_slurm_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("launcher (docs/cluster.md)")
    g.add_argument("--launcher", choices=("local", "slurm"), default="local",
                   help="local: runs on this machine (default; --gpus for one per GPU); slurm: "
                        "one SLURM job per run, submitted through submitit")
    g.add_argument("--no-wait", action="store_true",
                   help="slurm: return after submitting (see --status)")
    g.add_argument("--status", action="store_true",
                   help="slurm: with --output-dir only: each run's state (done, queued, running, "
                        "failed) and log; writes the tables once every run is done")
    g.add_argument("--partition", help="slurm: partition (default: the cluster's)")
    g.add_argument("--time-limit", type=int, default=240, metavar="MIN",
                   help="slurm: time limit per job in minutes (default 240); a run that needs "
                        "longer is requeued and resumes")
    g.add_argument("--gpus-per-job", type=int, default=1, metavar="N",
                   help="slurm: GPUs per run (default 1; more runs torchrun inside the job, "
                        "--batch-size per GPU; 0 for CPU clusters)")
    g.add_argument("--cpus-per-job", type=int, metavar="N",
                   help="slurm: CPU cores per run (data loading; default: the cluster's)")
    g.add_argument("--account", help="slurm: account to charge")
    g.add_argument("--qos", help="slurm: quality of service")
    g.add_argument("--sbatch", type=_sbatch_option, action="append", default=[],
                   metavar="NAME=VALUE",
                   help="slurm: any other sbatch option, without its dashes; repeatable, e.g. "
                        "--sbatch mem=64G --sbatch constraint=a100 --sbatch exclusive")
    g.add_argument("--signal-before", type=int, default=120, metavar="S",
                   help="slurm: SIGUSR1 this many seconds before the time limit: the run "
                        "writes last.pth and the job requeues itself (default 120)")
    g.add_argument("--poll", type=float, default=30.0, metavar="S",
                   help="slurm: seconds between looks at the queue while waiting (default 30)")


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
    if not args.min_effect > 0.0:
        _fail(f"--min-effect must be > 0 points of mAP, got {args.min_effect}")
    try:
        backbones = suite_backbones(args.suite, args.depths) if args.suite else args.backbones
    except ValueError as exc:
        _fail(str(exc))
    seeds = args.seed_list if args.seed_list is not None else list(range(args.seeds or 3))
    return backbones, seeds


def _check_launcher(args: argparse.Namespace) -> None:
    """Options of one launcher given to the other are refused, not ignored."""
    if args.launcher == "slurm":
        if args.gpus:
            _fail("--gpus names GPUs of this machine (--launcher local); with --launcher slurm "
                  "use --gpus-per-job N")
        return
    given = [f"--{k.replace('_', '-')}" for k in ("no_wait", "status", "partition", "account",
                                                  "qos", "cpus_per_job", "sbatch")
             if getattr(args, k)]
    given += [f"--{k.replace('_', '-')}" for k, default in
              (("time_limit", 240), ("gpus_per_job", 1), ("signal_before", 120), ("poll", 30.0))
              if getattr(args, k) != default]
    if given:
        _fail(f"{', '.join(given)}: for --launcher slurm (the launcher is local)")


def _slurm_options(args: argparse.Namespace) -> SlurmOptions:
    return SlurmOptions(args.partition, args.time_limit, args.gpus_per_job, args.cpus_per_job,
                        args.account, args.qos, dict(args.sbatch), args.signal_before)


def _submitted_suite(args: argparse.Namespace) -> argparse.Namespace:
    """--status: the options the suite in --output-dir was submitted with."""
    parser = get_args_parser()
    plain = parser.parse_args(["--status", "--output-dir", str(args.output_dir)]) \
        if args.output_dir else None
    if plain is None or vars(args) != vars(plain):
        _fail("--status takes only --output-dir DIR (the suite's other options were saved "
              "when it was submitted)")
    saved = read_jobs(Path(args.output_dir))["options"]
    if saved is None:
        _fail(f"--status: no SLURM suite was submitted into {args.output_dir} (no "
              f"{Path(args.output_dir) / 'slurm' / 'jobs.json'})")
    saved["sbatch"] = [tuple(x) for x in saved.get("sbatch", [])]
    return argparse.Namespace(**{**vars(plain), **saved, "status": True, "no_wait": False})


def _run_on_slurm(args: argparse.Namespace, specs: list) -> list | None:
    """Submit (unless --status), wait (unless --no-wait); the outcomes once no run is queued or
    running, else None."""
    root = Path(args.output_dir)
    done_before = [s.name for s in specs if run_state(s)[0] == "done"]
    if not args.status:
        options = {k: v for k, v in vars(args).items() if k not in ("status", "no_wait")}
        submit_runs(specs, root, _slurm_options(args), options)
    if args.status or args.no_wait:
        statuses = suite_status(specs, root)
    else:
        statuses = wait_for_runs(specs, root, args.poll)
    print(format_status(statuses))
    if any(s.state in ("queued", "running") for s in statuses):
        return None
    return outcomes_of(statuses, done_before)


def run(args: argparse.Namespace) -> int:
    """Plan, train (unless --report-only) and report. 0: every run finished (--no-wait: all
    submitted); 1: some did not; 2: bad input (message on stderr); 4 (--status): some runs are
    still queued or running (no tables yet); 74: a checkpoint could not be written; 75: stopped
    by a signal; 130: by a second Ctrl-C."""
    try:
        with stop_on_signals():
            return _run_suite(args)
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


def _run_suite(args: argparse.Namespace) -> int:
    """:func:`main` without the signal handling."""
    if args.status:
        args = _submitted_suite(args)
    _check_owned(args)
    backbones, seeds = _backbones_and_seeds(args)
    _check_launcher(args)
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
        if args.report_only:
            outcomes = []
        elif args.launcher == "slurm":
            _slurm_options(args).check()
            outcomes = _run_on_slurm(args, specs)
            if outcomes is None:
                return 0 if args.no_wait else EXIT_PENDING
        # One local suite per folder at a time (--report-only only reads the runs, and SLURM
        # jobs lock their own run folders: no lock, so partial results can be tabulated).
        with hold_folder_lock(root, "--output-dir",
                              enabled=not args.report_only and args.launcher != "slurm"):
            if not args.report_only and args.launcher != "slurm":
                outcomes = run_suite(specs, args.gpus)
            paths = write_reports(specs, outcomes, root, class_names_from_config(base),
                                  args.suite if args.suite in ("order", "lga") else "attention",
                                  args.level, min_effect=args.min_effect)
    except (ValueError, FileNotFoundError, SlurmUnavailable) as exc:
        return report_error("ablate.py", exc)
    stopped = [o.spec.name for o in outcomes if o.status == "interrupted"]
    if stopped:
        raise Interrupted(f"stopped by a signal; {len(stopped)} run(s) not finished "
                          f"({', '.join(stopped[:4])}{' ...' if len(stopped) > 4 else ''})",
                          "signal")
    return _closing(specs, outcomes, paths)


def _closing(specs: list, outcomes: list, paths: dict) -> int:
    bad = [o for o in outcomes if o.status in ("diverged", "failed")]
    for o in bad:
        logger.error("%s %s: %s", o.spec.name, o.status, o.message)
    counts = ", ".join(f"{sum(o.status == k for o in outcomes)} {k}"
                       for k in ("skipped", "trained", "diverged", "failed"))
    print(f"\n{len(specs)} runs ({counts if outcomes else 'report only'}); tables in "
          f"{paths['md']}, {paths['csv']}, {paths['png']}, {paths['power']}")
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    """The command line ``argv`` (default: ``sys.argv[1:]``) parsed and run; the exit status."""
    return run(get_args_parser().parse_intermixed_args(argv))  # key=value anywhere


def script() -> None:
    """The program (``tools/ablate.py``, ``python -m ssd_da.cli.ablate``): logging set up, then
    :func:`main` on the command line; exits with its status."""
    run_program(main, timestamps=True)


if __name__ == "__main__":
    script()
