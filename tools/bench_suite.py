"""``tools/benchmark.py train``, ``eval`` and ``gpu-suite``: throughput tables (Markdown).

``gpu-suite`` is the whole GPU measurement of issue 12 in one command, sized to finish in under
8 minutes on one H200: network-only training of plain ResNet50 and of every attention variant,
torchvision's SSD class on our trunk and ``ssd300_vgg16`` in the same process, end-to-end
training from the bundled BCCD JPEGs through the real loader, a VOC07-test-sized evaluation, and
(time permitting) torch.compile. It stops at once, naming the package, when one is missing, and
skips a part rather than run past its time budget.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path
from typing import Any

import torch

import bench_train as bt
from bench_env import environment_lines, shown_path
from ssd_da.utils.cli import fail

TABLE_HEAD = ["| model | backbone | measured | settings | images/s | ms/batch | peak memory (MiB) |",
              "|---|---|---|---|---:|---:|---:|"]
EVAL_HEAD = ["| backbone | measured | images/s | time |", "|---|---|---:|---:|"]
# (module to import, package to install): everything the suite imports beyond torch.
SUITE_PACKAGES = (("torchvision", "torchvision"), ("numpy", "numpy"), ("cv2", "opencv-python-headless"),
                  ("PIL", "pillow"), ("albumentations", "albumentations"), ("pycocotools", "pycocotools"),
                  ("yaml", "pyyaml"), ("tqdm", "tqdm"))
SUITE_BUDGET_S = 420.0  # measurement time; start-up, imports and writing stay under 8 minutes
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
    precision = "bf16 autocast" if args.amp and device.type == "cuda" else "float32"
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


def check_packages() -> None:
    """Exit (status 2) naming every package the suite needs and this machine lacks, or the GPU."""
    missing = []
    for module, package in SUITE_PACKAGES:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            missing.append(f"{package} ({exc})")
    if missing:
        fail("benchmark.py", f"gpu-suite needs {', '.join(missing)}; install them (`pip install -r "
                             f"requirements.txt`; offline, see docs/benchmarks.md, 'gpu-suite') and run again")
    if not torch.cuda.is_available():
        fail("benchmark.py", "gpu-suite measures a CUDA GPU and none is visible here; for CPU figures "
                             "use `tools/benchmark.py train --device cpu` and `eval --device cpu`")


# The suite's parts in order of importance, each with the seconds it is expected to need on an
# H200: a part starts only if that much of the budget is left. Eval comes before torch.compile,
# whose compilation time (about a minute per network) is the least predictable.
SUITE_PARTS: tuple[tuple[str, float, dict[str, Any]], ...] = (
    ("ours vs torchvision, network only", 60, dict(
        backbones="resnet50,da_resnet50", tv="tv-ssd-our-trunk,tv-ssd300-vgg16", modes="network",
        channels_last=True, compile=False)),
    ("end to end from JPEG files", 60, dict(
        backbones="da_resnet50", tv="tv-ssd-our-trunk", modes="e2e", channels_last=True, compile=False)),
    ("evaluation", 40, dict(backbones="da_resnet50", channels_last=True, compile=False)),
    ("attention modules against their floor", 90, "modules_floor_part"),  # a function: below
    ("other attention modules", 40, dict(
        backbones="se_resnet50,eca_resnet50,sge_resnet50,cbam_resnet50", tv="", modes="network",
        channels_last=True, compile=False)),
    ("NCHW", 25, dict(backbones="resnet50,da_resnet50", tv="", modes="network", channels_last=False,
                      compile=False)),
    ("compiled resnet50", 120, dict(backbones="resnet50", tv="", modes="network", channels_last=True,
                                    compile=True)),
    ("compiled da_resnet50", 120, dict(backbones="da_resnet50", tv="", modes="network",
                                       channels_last=True, compile=True)),
)


def modules_floor_part(args: argparse.Namespace, device: torch.device) -> list[str]:
    """Issue 24's module table on the GPU: every attention module at ResNet50's four SSD300
    stages, before and after, eager, in the suite's precision (bf16 autocast), against its floor;
    then DA, SE and CBAM compiled at layer1 (compilation is the slow part). Markdown lines."""
    import bench_floors

    common = {**vars(args), "clock": "wall", "repeats": 10, "before": True, "compile": False,
              "modules": ",".join(bench_floors.MODULES), "stage_names": ",".join(bench_floors.STAGES)}
    eager, notes = bench_floors.stage_rows(argparse.Namespace(**common), device)
    compiled, _ = bench_floors.stage_rows(argparse.Namespace(**{
        **common, "before": False, "compile": True, "modules": "none,se,da,cbam", "stage_names": "layer1"}),
        device)
    precision = "bf16 autocast" if args.amp else "float32"
    return ["", f"### Attention modules against their memory-traffic floor (issue 24; batch {args.batch_size}, "
            f"{precision}; `tools/benchmark.py modules --stages`, tools/bench_floors.py)", "",
            *bench_floors.TABLE_HEAD, *eager, *compiled, "", *notes]


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


def run_gpu_suite(args: argparse.Namespace) -> str:
    check_packages()
    _check_data(args, args.split, args.eval_split)
    start = time.perf_counter()
    device = _device(args)
    env = environment_lines(str(device))
    rows: list[bt.Row] = []
    eval_table: list[str] = []
    extra_sections: list[str] = []
    skipped = []
    for name, needs, overrides in SUITE_PARTS:
        left = SUITE_BUDGET_S - (time.perf_counter() - start)
        if left < needs:
            skipped.append(name)
            print(f"gpu-suite: skipping '{name}' ({left:.0f} s of the budget left, needs ~{needs:.0f})",
                  flush=True)
            continue
        if isinstance(overrides, str):  # a part of its own: a function of this file
            extra_sections += globals()[overrides](args, device)
            continue
        part = argparse.Namespace(**{**vars(args), **overrides})
        if name == "evaluation":
            eval_table = bt.eval_rows(part, device)
        else:
            rows += bt.train_rows(part, device)
    what = (f"batch {args.batch_size}, bf16 autocast; images/s = median of 3 blocks of {args.steps} steps "
            f"(end to end: at least 4 batches per loader worker) after {args.warmup} warm-up steps, "
            f"timed between device syncs; end to end and evaluation on the JPEGs of "
            f"`{shown_path(args.data_root)}` ({args.split}; {args.eval_split} cycled to "
            f"{args.eval_images} images); 'compiled': torch.compile of our network. Suite wall time "
            f"{time.perf_counter() - start:.0f} s{'; skipped for time: ' + ', '.join(skipped) if skipped else ''}.")
    return "\n".join([
        _section("## gpu-suite: training and evaluation on one GPU", "gpu-suite", what, env,
                 [*TABLE_HEAD, *(r.markdown() for r in rows)]),
        "", *overheads(rows), "", *EVAL_HEAD, *eval_table, *extra_sections])


def _common(p: argparse.ArgumentParser, root: Path) -> None:
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=10, help="steps per timed block (3 blocks)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile our network")
    p.add_argument("--workers", type=int, default=-1,
                   help="loader workers (-1: one per CPU core, less one for the training loop)")
    p.add_argument("--data-root", default=str(root / "datasets" / "bccd" / "VOCdevkit"))
    p.add_argument("--split", default="voc07_trainval", help="training split for 'end to end'")


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
    p = sub.add_parser("gpu-suite", help="the whole GPU measurement in one command (< 8 minutes)")
    _common(p, root)
    p.add_argument("--eval-images", type=int, default=4952, help="images of the timed evaluation")
    p.set_defaults(func=run_gpu_suite, amp=True, tv="", tv_backbone="da_resnet50", eval_split="voc07_test",
                   modes="network", backbones="da_resnet50")
