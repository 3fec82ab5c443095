"""``tools/benchmark.py train``, ``eval`` and ``model``: SSD300 training and inference
throughput tables (Markdown), ours against torchvision's SSD; their rows are also parts of the
gpu-suite (:mod:`ssd_da.bench.suite`)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from ssd_da.bench import throughput as bt
from ssd_da.bench.core import add_data_root, environment_lines, figure, shown_path, synthetic_batch, time_steps
from ssd_da.utils.cli import fail

TABLE_HEAD = ["| model | backbone | measured | settings | images/s | ms/batch | peak memory (MiB) |",
              "|---|---|---|---|---:|---:|---:|"]
EVAL_HEAD = ["| backbone | measured | images/s | time |", "|---|---|---:|---:|"]


def device_for(args: argparse.Namespace) -> torch.device:
    """``--device`` resolved; on CUDA, cuDNN autotuning on."""
    from ssd_da.utils.device import resolve_device

    device = resolve_device(args.device)
    if device.type == "cuda":  # fixed 300x300 input: let cuDNN pick the fastest kernels once
        torch.backends.cudnn.benchmark = True
    return device


def check_data(args: argparse.Namespace, *splits: str) -> None:
    """Exit with status 2 naming ``--data-root`` when one of ``splits`` is not there."""
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


def command_line(name: str) -> str:
    """The subcommand as it was typed (for the section), without machine-specific paths."""
    words = sys.argv[sys.argv.index(name) + 1:] if name in sys.argv else []
    return " ".join([name, *(shown_path(w) if Path(w).is_absolute() else w for w in words)])


def run_train(args: argparse.Namespace) -> str:
    device = device_for(args)
    if "e2e" in args.modes.split(","):
        check_data(args, args.split)
    env = environment_lines(str(device))
    rows = bt.train_rows(args, device)
    what = (f"{_settings(args, device)}. 'network only': one synthetic batch already on the device "
            f"(forward, loss, backward, SGD step); 'end to end': JPEG files of "
            f"`{shown_path(args.data_root)}` ({args.split}) through the real loader (full augmentation, "
            f"uint8 batches, pinned memory on CUDA); 'loader alone': the same loader with no model. "
            f"Same SGD for every model; torchvision's models take 0..1 images and normalise and "
            f"resize them in their own transform.")
    return _section(f"## train: SSD300 training throughput on {device.type.upper()}", command_line("train"),
                    what, env, [*TABLE_HEAD, *(r.markdown() for r in rows), "", *overheads(rows)])


def run_eval(args: argparse.Namespace) -> str:
    device = device_for(args)
    if args.eval_images:
        check_data(args, args.eval_split)
    env = environment_lines(str(device))
    rows = bt.eval_rows(args, device)
    what = (f"{_settings(args, device)}. Network only = forward, decoding and NMS of a synthetic "
            f"batch on the device; whole evaluation = `evaluate_model` on `{shown_path(args.data_root)}` "
            f"({args.eval_split}) cycled to {args.eval_images} images: loader, inference, "
            f"post-processing, VOC07 metric, timed from start to mAP.")
    return _section(f"## eval: SSD300 inference and evaluation on {device.type.upper()}", command_line("eval"),
                    what, env, [*EVAL_HEAD, *rows])


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


def add_common(p: argparse.ArgumentParser) -> None:
    """The options train, eval and gpu-suite share."""
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
    add_data_root(p)
    p.add_argument("--split", default="voc07_trainval", help="training split for 'end to end'")


def register(sub: Any) -> None:
    p = sub.add_parser("train", help="training images/s: ours vs torchvision SSD, network only / end to end")
    add_common(p)
    p.add_argument("--backbones", default="resnet50,da_resnet50")
    p.add_argument("--tv", default="tv-ssd-our-trunk,tv-ssd300-vgg16",
                   help="torchvision models to add, comma-separated ('' for none)")
    p.add_argument("--tv-backbone", default="resnet50", help="our trunk under torchvision's SSD class")
    p.add_argument("--modes", default="network,e2e", help="network and/or e2e, comma-separated")
    p.set_defaults(func=run_train)
    p = sub.add_parser("eval", help="inference images/s and a whole VOC07-test-sized evaluation")
    add_common(p)
    p.add_argument("--backbones", default="da_resnet50")
    p.add_argument("--eval-split", default="voc07_test")
    p.add_argument("--eval-images", type=int, default=4952, help="0: network-only rows only")
    p.set_defaults(func=run_eval)
    register_model(sub)


def run_model(args: argparse.Namespace) -> str:
    """SSD300 (ours) training-step and inference throughput on a synthetic 300x300 batch already
    on the device: the network-only rows of ``train`` and ``eval`` for each backbone."""
    device = device_for(args)
    env = environment_lines(str(device))
    rows = []
    for backbone in args.backbones.split(","):
        for mode, batch in (("train", args.batch_size), ("inference", args.eval_batch_size)):
            torch.manual_seed(0)
            model = bt.prepare(bt.build_subject("ours", backbone), "ours", device, args.channels_last, False)
            images, targets = synthetic_batch(batch, device)
            step = (bt.network_train_step(model, "ours", images, targets, device, args.amp, args.channels_last)
                    if mode == "train" else
                    bt.network_infer_step(model, "ours", images, device, args.amp, args.channels_last))
            r = time_steps(step, device, batch, args.steps, args.warmup)
            mem = f"{r.peak_mb:.0f}" if r.peak_mb is not None else "n/a"
            rows.append(f"| {backbone} | {mode} | {batch} | {figure(r.images_per_s)} | "
                        f"{figure(r.ms_per_batch)} | {mem} |")
            print(rows[-1], flush=True)
            del model
    return _section(
        f"## model: SSD300 throughput on {device.type.upper()}",
        f"model --backbones {args.backbones} --batch-size {args.batch_size}"
        f"{' --amp' if args.amp else ''}{' --channels-last' if args.channels_last else ''}",
        "synthetic 300x300 batches (uint8, normalised in the model), 21 classes, median of 3 blocks of "
        f"{args.steps} steps after {args.warmup} warm-up, each block timed between device syncs; train = "
        "forward, loss, backward and SGD step; inference = forward with decoding and NMS. Data loading "
        f"is not included. Precision: {'bf16 autocast' if args.amp and device.type == 'cuda' else 'float32'}.",
        env, ["| backbone | mode | batch | images/s | ms/batch | peak memory (MiB) |",
              "|---|---|---:|---:|---:|---:|", *rows])


def register_model(sub: Any) -> None:
    model = sub.add_parser("model", help="SSD300 train-step and inference images/s, peak memory")
    model.add_argument("--backbones", default="resnet50,da_resnet50")
    model.add_argument("--batch-size", type=int, default=32)
    model.add_argument("--eval-batch-size", type=int, default=32)
    model.add_argument("--steps", type=int, default=10)
    model.add_argument("--warmup", type=int, default=3)
    model.add_argument("--device", default="auto")
    model.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA)")
    model.add_argument("--channels-last", action="store_true")
    model.set_defaults(func=run_model)
