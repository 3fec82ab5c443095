"""``tools/benchmark.py train``, ``eval`` and ``gpu-suite``: throughput tables (Markdown).

``gpu-suite`` is the whole GPU check of issues 12 and 20 in one command, sized to finish in
under 8 minutes on one H200: first a smoke test of every GPU path (``bench_smoke``), then
network-only training of plain ResNet50 and of every attention variant, torchvision's SSD class
on our trunk and ``ssd300_vgg16`` in the same process, end-to-end training from the bundled BCCD
JPEGs through the real loader, a VOC07-test-sized evaluation, and (time permitting)
torch.compile. A part is a list of units (a model, a family): a unit that raises is recorded as
FAILED and the next one runs; a part starts only if its share of the budget is left and stops
between units when its time is up; the section is written as each part ends. ``--dry-run`` runs
every part on the CPU at toy sizes. ``tools/benchmark.py`` checks the packages
(``bench_packages``) before it imports anything that needs them.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import sys
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

import bench_smoke
import bench_train as bt
from bench_env import environment_lines, shown_path
from bench_packages import SUITE_PACKAGES, check_suite_packages
from bench_smoke import Unit, UnitResult, run_units
from ssd_da.utils.cli import fail

TABLE_HEAD = ["| model | backbone | measured | settings | images/s | ms/batch | peak memory (MiB) |",
              "|---|---|---|---|---:|---:|---:|"]
EVAL_HEAD = ["| backbone | measured | images/s | time |", "|---|---|---:|---:|"]
# (module to import, package to install): everything the suite imports beyond torch.
SUITE_BUDGET_S = 420.0  # the parts' shares; start-up, imports and writing stay under 8 minutes
# The dry run checks that every part runs, not how long it takes: its shares are ten times the
# GPU's, so that a slow or busy CPU does not skip a part.
DRY_RUN_SCALE = 10.0
GPU_SUITE_COMMAND = "python tools/benchmark.py gpu-suite"


def _device(args: argparse.Namespace) -> torch.device:
    from ssd_da.utils.device import resolve_device

    device = resolve_device(args.device)
    if device.type == "cuda":  # fixed 300x300 input: let cuDNN pick the fastest kernels once
        torch.backends.cudnn.benchmark = True
    return device


def _check_data(args: argparse.Namespace, *splits: str) -> None:
    from ssd_da.data.voc import resolve_split

    for split in splits:
        try:
            resolve_split(Path(args.data_root), split)
        except (FileNotFoundError, ValueError) as exc:
            fail("benchmark.py", f"--data-root {args.data_root}, split {split!r}: {exc} (the bundled "
                 f"devkit is datasets/bccd/VOCdevkit)")


def _settings(args: argparse.Namespace, device: torch.device) -> str:
    from ssd_da.utils.device import runs_bf16

    precision = "bf16 autocast" if runs_bf16(device, args.amp) else "float32"
    return (f"batch {args.batch_size}, {precision}, {'channels_last' if args.channels_last else 'NCHW'}"
            f"{', torch.compile (ours)' if args.compile else ''}; images/s = median of 3 blocks of "
            f"{args.steps} steps (end to end: at least 4 batches per loader worker) after "
            f"{args.warmup} warm-up steps, each block timed between device syncs")


def _section(title: str, command: str, what: str, env: list[str], table: list[str]) -> str:
    return "\n".join([title, "", f"`tools/benchmark.py {command}`: {what}", "", *env, "", *table])


def _command(name: str) -> str:
    """The subcommand as it was typed (for the section), without machine-specific paths."""
    words = sys.argv[sys.argv.index(name) + 1:] if name in sys.argv else []
    return " ".join([name, *(shown_path(w) if Path(w).is_absolute() else w for w in words)])


def run_train(args: argparse.Namespace) -> str:
    device = _device(args)
    if "e2e" in args.modes.split(","):
        _check_data(args, args.split)
    env = environment_lines(str(device))
    rows = bt.train_rows(args, device)
    what = (f"{_settings(args, device)}. 'network only': one synthetic batch already on the device "
            f"(forward, loss, backward, SGD step); 'end to end': JPEG files of "
            f"`{shown_path(args.data_root)}` ({args.split}) through the real loader (full augmentation, "
            f"uint8 batches, pinned memory on CUDA); 'loader alone': the same loader with no model. "
            f"Same SGD for every model; torchvision's models take 0..1 images and normalise and "
            f"resize them in their own transform.")
    return _section(f"## train: SSD300 training throughput on {device.type.upper()}", _command("train"),
                    what, env, [*TABLE_HEAD, *(r.markdown() for r in rows), "", *overheads(rows)])


def run_eval(args: argparse.Namespace) -> str:
    device = _device(args)
    if args.eval_images:
        _check_data(args, args.eval_split)
    env = environment_lines(str(device))
    rows = bt.eval_rows(args, device)
    what = (f"{_settings(args, device)}. Network only = forward, decoding and NMS of a synthetic "
            f"batch on the device; whole evaluation = `evaluate_model` on `{shown_path(args.data_root)}` "
            f"({args.eval_split}) cycled to {args.eval_images} images: loader, inference, "
            f"post-processing, VOC07 metric, timed from start to mAP.")
    return _section(f"## eval: SSD300 inference and evaluation on {device.type.upper()}", _command("eval"),
                    what, env, [*EVAL_HEAD, *rows])


def check_packages(dry_run: bool = False) -> None:
    """Exit (status 2) naming every package the suite needs and this machine lacks, or the GPU
    (not for ``--dry-run``, which runs on the CPU). ``tools/benchmark.py`` checks the packages
    before its own imports already; this repeats it for callers that import the module."""
    check_suite_packages("benchmark.py", SUITE_PACKAGES)
    if not dry_run and not torch.cuda.is_available():
        fail("benchmark.py", "gpu-suite measures a CUDA GPU and none is visible here; `--dry-run` runs "
                             "every part on the CPU at toy sizes; for CPU figures use `tools/benchmark.py "
                             "train --device cpu` and `eval --device cpu`")


@dataclass(frozen=True)
class Part:
    """One part of the suite. ``seconds``: its share of the budget, the time it is expected to
    take on one H200 (the shares add up to the budget); it starts only if that much of the
    budget is left. ``overrides``: only the options the part is about; the command line's
    ``--amp``, ``--channels-last`` and ``--compile`` hold for everything else."""

    name: str
    seconds: float
    kind: str  # "smoke", "compile-smoke", "train" or "eval"
    overrides: dict[str, Any] = field(default_factory=dict)


# In order of importance: first whether every GPU path runs at all, then the measurements; the
# compiled units last, as compilation (tens of seconds a network) is the least predictable.
SUITE_PARTS: tuple[Part, ...] = (
    Part("smoke", 150, "smoke"),
    Part("ours vs torchvision, network only", 40, "train", dict(
        backbones="resnet50,da_resnet50", tv="tv-ssd-our-trunk,tv-ssd300-vgg16", modes="network")),
    Part("end to end from JPEG files", 40, "train", dict(backbones="da_resnet50", tv="tv-ssd-our-trunk",
                                                         modes="e2e")),
    Part("evaluation", 30, "eval", dict(backbones="da_resnet50")),
    Part("other attention modules", 30, "train", dict(
        backbones="se_resnet50,eca_resnet50,sge_resnet50,cbam_resnet50", tv="", modes="network")),
    Part("NCHW", 20, "train", dict(backbones="resnet50,da_resnet50", tv="", modes="network",
                                   channels_last=False)),
    Part("smoke: --amp --compile", 60, "compile-smoke"),
    Part("compiled", 50, "train", dict(backbones="resnet50,da_resnet50", tv="", modes="network", compile=True)),
)


def overheads(rows: list[bt.Row]) -> list[str]:
    """Markdown bullets: each attention variant against plain ResNet of the same depth, and ours
    against torchvision's SSD class on the same trunk, both as measured in the same run."""
    rate = {(r.subject, r.backbone, r.mode, r.settings): r.result.images_per_s for r in rows}
    lines = []
    for (subject, backbone, mode, settings), value in rate.items():
        if subject != "ours":
            continue
        depth = "resnet" + backbone.rsplit("resnet", 1)[-1]
        plain = rate.get(("ours", depth, mode, settings))
        if backbone != depth and plain:
            lines.append(f"- {backbone} over {depth} ({mode}, {settings}): {100 * (plain / value - 1):+.1f}% "
                         f"wall-clock per image (target for DA: at most +10%)")
        theirs = rate.get(("tv-ssd-our-trunk", backbone, mode, settings.replace(", compiled", "")))
        if theirs:
            lines.append(f"- ours / torchvision's SSD class on the {backbone} trunk ({mode}, {settings}): "
                         f"{value / theirs:.2f}x (target, end to end: at least 3.5x)")
    return lines


@dataclass
class SuiteReport:
    """What the suite has found so far: every unit's result, the measured rows, skipped parts."""

    units: list[UnitResult] = field(default_factory=list)
    rows: list[bt.Row] = field(default_factory=list)
    eval_rows: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def complete(self) -> bool:
        return not self.skipped and all(u.status == "PASS" for u in self.units)

    def status_table(self) -> list[str]:
        passed = sum(u.status == "PASS" for u in self.units)
        lines = [f"**{passed} of {len(self.units)} units passed**"
                 + (f"; parts skipped for time: {', '.join(self.skipped)}" if self.skipped else "") + ".",
                 "", "| part | unit | result | s | host syncs | detail |", "|---|---|---|---:|---:|---|"]
        return lines + [u.markdown() for u in self.units]


def _train_units(args: argparse.Namespace, device: torch.device, report: SuiteReport) -> list[Unit]:
    """One unit per model (and the loader alone for end to end), so that a part stops between
    models when its time is up."""
    def measure(backbones: str, tv: str) -> tuple[str, str]:
        rows = bt.train_rows(argparse.Namespace(**{**vars(args), "backbones": backbones, "tv": tv}), device,
                             loader=False)
        report.rows.extend(rows)
        return "", "; ".join(f"{r.mode}: {bt.figure(r.result.images_per_s)} images/s" for r in rows)

    def loader() -> tuple[str, str]:
        report.rows.append(bt.loader_row(args))
        return "", f"{bt.figure(report.rows[-1].result.images_per_s)} images/s"

    units: list[Unit] = [("loader alone", loader)] if "e2e" in args.modes.split(",") else []
    units += [(f"ours, {b}", partial(measure, b, "")) for b in args.backbones.split(",") if b]
    return units + [(t, partial(measure, "", t)) for t in args.tv.split(",") if t]


def _eval_units(args: argparse.Namespace, device: torch.device, report: SuiteReport) -> list[Unit]:
    names = [b for b in args.backbones.split(",") if b]

    def record(row: str) -> tuple[str, str]:
        report.eval_rows.append(row)
        return "", " / ".join(cell.strip() for cell in row.strip("|").split("|")[1:])

    units: list[Unit] = [(f"network only, {b}", lambda b=b: record(bt.eval_rows(argparse.Namespace(
        **{**vars(args), "backbones": b, "eval_images": 0}), device)[0])) for b in names]
    if args.eval_images:
        units.append((f"whole evaluation, {names[0]}",
                      lambda: record(bt.whole_evaluation_row(args, names[0], device))))
    return units


def _part_args(args: argparse.Namespace, part: Part) -> argparse.Namespace:
    values = {**vars(args), **part.overrides}
    if args.dry_run:  # toy sizes: the first of the part's trunks, and a ResNet18 for a ResNet50
        values["backbones"] = values["backbones"].split(",")[0]
        for key in ("backbones", "tv_backbone"):
            values[key] = values[key].replace("resnet50", "resnet18")
    return argparse.Namespace(**values)


def _run_part(part: Part, args: argparse.Namespace, device: torch.device, work: Path, deadline: float,
              report: SuiteReport) -> None:
    """The part's units, each recorded; an exception while setting the part up is the part's
    FAILED row, and the next part still runs."""
    try:
        if part.kind == "smoke":
            units = bench_smoke.smoke_units(args, device, work, deadline)
        elif part.kind == "compile-smoke":
            units = bench_smoke.compile_units(args, device)
        else:
            units = (_eval_units if part.kind == "eval" else _train_units)(args, device, report)
        smoke = part.kind.endswith("smoke")  # run under set_sync_debug_mode("warn")
        with bench_smoke.sync_debug(device) if smoke else contextlib.nullcontext():
            report.units += run_units(part.name, units, deadline)
    except Exception as exc:
        report.units.append(UnitResult(part.name, "(the part)", "FAILED", 0.0, "", f"{type(exc).__name__}: {exc}"))
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _suite_section(args: argparse.Namespace, device: torch.device, env: list[str], report: SuiteReport,
                   elapsed: float) -> str:
    from ssd_da.utils.device import runs_bf16

    what = (f"first the smoke parts (does every GPU path run: {bench_smoke.SMOKE_ITERS} training iterations "
            f"per attention family and mode through the trainer, batch {args.smoke_batch}; host syncs counted "
            f"in iterations 2-3 under `torch.cuda.set_sync_debug_mode(\"warn\")`; torchrun, evaluation, "
            f"Grad-CAM, detect), then the measurements: batch {args.batch_size}, "
            f"{'bf16 autocast' if runs_bf16(device, args.amp) else 'float32'}, "
            f"{'channels_last' if args.channels_last else 'NCHW'} unless the part says otherwise; images/s = "
            f"median of {args.repeats} blocks of {args.steps} steps (end to end: at least 4 batches per loader "
            f"worker) after {args.warmup} warm-up steps, timed between device syncs; end to end and evaluation on "
            f"the JPEGs of `{shown_path(args.data_root)}` ({args.split}; {args.eval_split} cycled to "
            f"{args.eval_images} images). Each part has a share of the {SUITE_BUDGET_S:.0f} s budget and "
            f"starts no unit past it; suite wall time {elapsed:.0f} s.")
    return "\n".join([
        "## gpu-suite: smoke test, training and evaluation on one GPU", "", *report.status_table(), "",
        f"`tools/benchmark.py {_command('gpu-suite')}`: {what}", "", *env, "",
        *TABLE_HEAD, *(r.markdown() for r in report.rows), "", *overheads(report.rows), "",
        *EVAL_HEAD, *report.eval_rows])


def _dry_run(args: argparse.Namespace, work: Path) -> None:
    """Every part on the CPU at toy sizes on a generated demo dataset; nothing is written."""
    from ssd_da.data.demo import ensure_demo_dataset

    ensure_demo_dataset(work / "demo", num_train=8, num_test=4, seed=0)
    vars(args).update(device="cpu", no_write=True, write_partial=None, batch_size=2, smoke_batch=2, steps=1,
                      warmup=0, repeats=1, eval_images=4, workers=0, data_root=str(work / "demo" / "VOCdevkit"),
                      split="voc07_trainval", eval_split="voc07_test", compile_backend="aot_eager",
                      smoke_backbones=args.smoke_backbones or ["da_resnet18"])


def run_gpu_suite(args: argparse.Namespace) -> str:
    """The smoke parts and the measurements (:data:`SUITE_PARTS`), each part's rows written as
    soon as it ends; ``args.exit_status`` is 1 unless every unit of every part passed. The dry
    run takes --amp's bf16 path on the CPU (``CPU_AMP``) while it runs."""
    import ssd_da.utils.device as device_utils

    check_packages(args.dry_run)
    args.smoke_backbones = args.smoke_backbones or (None if args.dry_run else list(bench_smoke.SMOKE_BACKBONES))
    cpu_amp = device_utils.CPU_AMP
    with tempfile.TemporaryDirectory(prefix="gpu_suite_") as tmp:
        try:
            if args.dry_run:
                _dry_run(args, Path(tmp))
                device_utils.CPU_AMP = True
            return _run_parts(args, Path(tmp))
        finally:
            device_utils.CPU_AMP = cpu_amp


def _run_parts(args: argparse.Namespace, work: Path) -> str:
    """Part after part, in order: one starts only if its share of the budget is left, and
    starts no unit after its end in the schedule of shares (or its own share from now, if
    later); a part skipped for time is named."""
    _check_data(args, args.split, args.eval_split)
    scale = DRY_RUN_SCALE if args.dry_run else 1.0
    start = time.perf_counter()
    device = _device(args)
    env = environment_lines(str(device))
    report, planned = SuiteReport(), start
    for part in SUITE_PARTS:
        planned += scale * part.seconds  # the part's end in the schedule of shares
        now = time.perf_counter()
        left = start + scale * SUITE_BUDGET_S - now
        if left < scale * part.seconds:
            report.skipped.append(part.name)
            print(f"gpu-suite: skipping '{part.name}' ({left:.0f} s of the budget left, its share is "
                  f"{scale * part.seconds:.0f} s)", flush=True)
            continue
        deadline = min(start + scale * SUITE_BUDGET_S, max(planned, now + scale * part.seconds))
        _run_part(part, _part_args(args, part), device, work, deadline, report)
        if getattr(args, "write_partial", None):  # each part's rows as soon as it ends
            args.write_partial(_suite_section(args, device, env, report, time.perf_counter() - start))
    args.exit_status = 0 if report.complete() else 1
    return _suite_section(args, device, env, report, time.perf_counter() - start)


def _common(p: argparse.ArgumentParser, root: Path) -> None:
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=10, help="steps per timed block (3 blocks)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=False, help="bf16 autocast (CUDA)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile our network")
    p.add_argument("--workers", type=int, default=-1,
                   help="loader workers (-1: one per CPU core, less one for the training loop)")
    p.add_argument("--data-root", default=str(root / "datasets" / "bccd" / "VOCdevkit"))
    p.add_argument("--split", default="voc07_trainval", help="training split for 'end to end'")


def _backbone_list(text: str) -> list[str]:
    from ssd_da.models.names import BACKBONE_NAMES

    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in BACKBONE_NAMES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown backbone(s) {', '.join(unknown) or '(none given)'}; "
                                         f"e.g. {', '.join(bench_smoke.SMOKE_BACKBONES)}")
    return names


def register(sub: Any, root: Path) -> None:
    p = sub.add_parser("train", help="training images/s: ours vs torchvision SSD, network only / end to end")
    _common(p, root)
    p.add_argument("--backbones", default="resnet50,da_resnet50")
    p.add_argument("--tv", default="tv-ssd-our-trunk,tv-ssd300-vgg16",
                   help="torchvision models to add, comma-separated ('' for none)")
    p.add_argument("--tv-backbone", default="resnet50", help="our trunk under torchvision's SSD class")
    p.add_argument("--modes", default="network,e2e", help="network and/or e2e, comma-separated")
    p.set_defaults(func=run_train)
    p = sub.add_parser("eval", help="inference images/s and a whole VOC07-test-sized evaluation")
    _common(p, root)
    p.add_argument("--backbones", default="da_resnet50")
    p.add_argument("--eval-split", default="voc07_test")
    p.add_argument("--eval-images", type=int, default=4952, help="0: network-only rows only")
    p.set_defaults(func=run_eval)
    p = sub.add_parser("gpu-suite", help="smoke test and the whole GPU measurement in one command "
                                         "(< 8 minutes); --dry-run: every part on the CPU, toy sizes")
    _common(p, root)
    p.add_argument("--eval-images", type=int, default=4952, help="images of the timed evaluation")
    p.add_argument("--dry-run", action="store_true",
                   help="every part on the CPU at toy sizes on a generated demo dataset, in minutes; "
                        "writes nothing; exit status 0 only if every part ran and passed")
    p.add_argument("--smoke-backbones", type=_backbone_list, default=None,
                   help="families of the smoke parts (default: all of "
                        f"{','.join(bench_smoke.SMOKE_BACKBONES)}; dry run: da_resnet18)")
    p.add_argument("--smoke-batch", type=int, default=8, help="batch of the smoke's training iterations")
    p.set_defaults(func=run_gpu_suite, amp=True, channels_last=True, tv="", tv_backbone="da_resnet50",
                   eval_split="voc07_test", modes="network", backbones="da_resnet50", repeats=3)
