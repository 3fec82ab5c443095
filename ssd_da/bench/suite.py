"""``tools/benchmark.py gpu-suite``: the smoke test and the throughput tables (Markdown) on one GPU.

``gpu-suite`` is the whole GPU check of issues 12 and 20 in one command, sized to finish in
under 8 minutes on one H200: first a smoke test of every GPU path (:mod:`ssd_da.bench.smoke`), then
network-only training of plain ResNet50 and of every attention variant, torchvision's SSD class
on our trunk and ``ssd300_vgg16`` in the same process, end-to-end training from the bundled BCCD
JPEGs through the real loader, a VOC07-test-sized evaluation, and (time permitting)
torch.compile. A part is a list of units (a model, a family): a unit that raises is recorded as
FAILED and the next one runs; a part starts only if its share of the budget is left and stops
between units when its time is up; the section is written as each part ends. ``--dry-run`` runs
every part on the CPU at toy sizes. ``tools/benchmark.py`` checks the packages
(:mod:`ssd_da.bench.packages`) before it imports anything that needs them.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from ssd_da.bench import floors
from ssd_da.bench import smoke as bench_smoke
from ssd_da.bench import throughput as bt
from ssd_da.bench import train_eval as te
from ssd_da.bench.core import environment_lines, shown_path
from ssd_da.bench.packages import SUITE_PACKAGES, check_suite_packages
from ssd_da.bench.smoke import Unit, UnitResult, run_units
from ssd_da.utils.cli import fail

SUITE_BUDGET_S = 450.0  # the parts' shares; start-up, imports and writing stay under 8 minutes
# The dry run checks that every part runs, not how long it takes: its shares are ten times the
# GPU's, so that a slow or busy CPU does not skip a part.
DRY_RUN_SCALE = 10.0
GPU_SUITE_COMMAND = "python tools/benchmark.py gpu-suite"


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
    kind: str  # "smoke", "compile-smoke", "train", "eval" or "modules"
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
    Part("attention modules against their floor", 30, "modules"),  # issue 24: modules_floor_units
)


@dataclass
class SuiteReport:
    """What the suite has found so far: every unit's result, the measured rows, skipped parts."""

    units: list[UnitResult] = field(default_factory=list)
    rows: list[bt.Row] = field(default_factory=list)
    eval_rows: list[str] = field(default_factory=list)
    module_rows: list[str] = field(default_factory=list)  # the "modules" part's table rows
    module_notes: list[str] = field(default_factory=list)  # and the ratios under it
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


def modules_floor_units(args: argparse.Namespace, device: torch.device, report: SuiteReport) -> list[Unit]:
    """Issue 24's module table on the GPU (``tools/benchmark.py modules --stages``): every
    attention module at each of ResNet50's SSD300 stages, before and after, eager, in the
    suite's precision, against its floor; then SE, DA and CBAM compiled at layer1. One unit per
    stage (the dry run: layer4 alone), so the part stops between stages when its time is up."""
    common = {**vars(args), "clock": "wall", "stat": "median", "repeats": 2 if args.dry_run else 10,
              "before": True, "compile": False, "modules": ",".join(floors.MODULES)}

    def measure(stage: str, compiled: bool) -> tuple[str, str]:
        options = {**common, "stage_names": stage}
        if compiled:
            options.update(before=False, compile=True, modules="none,se,da,cbam")
        rows, notes = floors.stage_rows(argparse.Namespace(**options), device)
        report.module_rows += rows
        report.module_notes += [] if compiled else notes
        return "", "; ".join(f"{r.split('|')[2].strip()} {r.split('|')[4].strip()} ms" for r in rows)

    stages = ["layer4"] if args.dry_run else list(floors.STAGES)
    units: list[Unit] = [(f"eager, {s}", partial(measure, s, False)) for s in stages]
    return units + [(f"compiled, {stages[0]}", partial(measure, stages[0], True))]


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
        elif part.kind == "modules":
            units = modules_floor_units(args, device, report)
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
        f"`tools/benchmark.py {te.command_line('gpu-suite')}`: {what}", "", *env, "",
        *te.TABLE_HEAD, *(r.markdown() for r in report.rows), "", *te.overheads(report.rows), "",
        *te.EVAL_HEAD, *report.eval_rows, *_module_table(args, device, report)])


def _module_table(args: argparse.Namespace, device: torch.device, report: SuiteReport) -> list[str]:
    """The "modules" part's Markdown: heading, table, ratios (nothing if the part did not run)."""
    if not report.module_rows:
        return []
    from ssd_da.utils.device import runs_bf16

    precision = "bf16 autocast" if runs_bf16(device, args.amp) else "float32"
    return ["", f"Attention modules against their memory-traffic floor (issue 24; batch {args.batch_size}, "
            f"{precision}; `tools/benchmark.py modules --stages`, tools/floors.py):", "",
            *floors.TABLE_HEAD, *report.module_rows, "", *report.module_notes]


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
    te.check_data(args, args.split, args.eval_split)
    scale = DRY_RUN_SCALE if args.dry_run else 1.0
    start = time.perf_counter()
    device = te.device_for(args)
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


def _backbone_list(text: str) -> list[str]:
    from ssd_da.models.names import BACKBONE_NAMES

    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in BACKBONE_NAMES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown backbone(s) {', '.join(unknown) or '(none given)'}; "
                                         f"e.g. {', '.join(bench_smoke.SMOKE_BACKBONES)}")
    return names


def register(sub: Any) -> None:
    p = sub.add_parser("gpu-suite", help="smoke test and the whole GPU measurement in one command "
                                         "(< 8 minutes); --dry-run: every part on the CPU, toy sizes")
    te.add_common(p)
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
