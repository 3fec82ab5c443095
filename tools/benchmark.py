"""Benchmarks of ssd_da, one subcommand each; results go to a section of docs/benchmarks.md.

    python tools/benchmark.py metric            # evaluate_voc on 5,000 images x 20 classes
    python tools/benchmark.py model --amp       # SSD300 train/inference images/s, peak memory
    python tools/benchmark.py loader            # CPU data pipeline images/s per core
    python tools/benchmark.py memory            # bytes saved for backward per attention module
    python tools/benchmark.py train             # training images/s: ours vs torchvision, e2e
    python tools/benchmark.py eval              # inference images/s, VOC07-test-sized evaluation
    python tools/benchmark.py gpu-suite         # the whole GPU measurement, under 8 minutes
    python tools/benchmark.py modules           # each attention module's cost per training step

To add a benchmark: write ``run_<name>(args) -> str`` returning the Markdown body of its
section (use :func:`environment_lines` for the device lines), register it in
:func:`get_args_parser` with ``set_defaults(func=run_<name>)``; :func:`main` writes the section
between ``<!-- benchmark:<name> -->`` markers, replacing that section's previous result.
"""
from __future__ import annotations

import argparse
import cProfile
import datetime
import os
import platform
import pstats
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench_packages import check_suite_packages  # standard library only, beside this file

if __name__ == "__main__" and "gpu-suite" in sys.argv[1:]:
    # Before the imports below, which need some of them: a bare GPU machine is told every
    # package it lacks, not shown the traceback of the first one (issue 20).
    check_suite_packages("benchmark.py")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402

from ssd_da.data.voc import VOC_CLASSES  # noqa: E402
from ssd_da.evaluation.voc import evaluate_voc  # noqa: E402
from ssd_da.models.attention import build_attention  # noqa: E402
from ssd_da.models.ssd import build_ssd  # noqa: E402
from ssd_da.utils.cli import fail  # noqa: E402
from ssd_da.utils.device import autocast_context, resolve_device  # noqa: E402
from ssd_da.utils.flops import count_flops, count_flops_complete  # noqa: E402

from bench_env import cpu_model  # noqa: E402 (tools/bench_env.py, beside this file)

ROOT = Path(__file__).resolve().parents[1]


def environment_lines() -> list[str]:
    """Markdown bullet lines describing where and when a benchmark ran."""
    today = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    return [f"- date (UTC): {today}",
            f"- device: {cpu_model()} ({os.cpu_count()} logical CPUs on the machine)",
            f"- python {platform.python_version()}, numpy {np.__version__}"]


def pin_to_one_core() -> str:
    """Restrict this process and its BLAS/OpenMP pools to one core; returns what was done."""
    done = []
    if hasattr(os, "sched_setaffinity"):
        core = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {core})
        done.append(f"affinity to CPU {core}")
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)
        done.append("threadpoolctl limits 1")
    except ImportError:  # numpy's element-wise ops are single-threaded anyway
        done.append("threadpoolctl not installed")
    return ", ".join(done)


def synthetic_voc(num_images: int, num_classes: int, dets_per_image: int, seed: int
                  ) -> tuple[list[dict], list[dict]]:
    """A realistic evaluation workload: 1-4 gts per image (10 % difficult) in a 500x375 image,
    10 jittered detections per gt (90 % with the right label) and random boxes to fill up
    ``dets_per_image`` (as an SSD's post-NMS top-k output with a low score threshold)."""
    rng = np.random.default_rng(seed)
    n_gt = rng.integers(1, 5, num_images)
    total = int(n_gt.sum())
    wh = rng.uniform(20, 300, (total, 2))
    xy = rng.uniform(0, 1, (total, 2)) * (np.array([500.0, 375.0]) - wh)
    gt_boxes = np.round(np.concatenate([xy, xy + wh], 1))
    gt_labels = rng.integers(1, num_classes + 1, total)
    difficult = rng.random(total) < 0.1
    hit = np.repeat(np.arange(total), 10)
    size = np.tile(gt_boxes[hit, 2:] - gt_boxes[hit, :2], 2)
    near = gt_boxes[hit] + rng.normal(0, 0.12, (len(hit), 4)) * size
    near[:, 2:] = np.maximum(near[:, 2:], near[:, :2])
    near_labels = np.where(rng.random(len(hit)) < 0.9, gt_labels[hit],
                           rng.integers(1, num_classes + 1, len(hit)))
    near_scores = rng.beta(4, 2, len(hit))
    n_rand = dets_per_image * num_images - len(hit)
    rxy = rng.uniform(0, 400, (n_rand, 2))
    rand = np.concatenate([rxy, rxy + rng.uniform(10, 200, (n_rand, 2))], 1)
    rand_labels = rng.integers(1, num_classes + 1, n_rand)
    rand_scores = rng.beta(1, 6, n_rand)
    gt_end, rand_end = np.cumsum(n_gt), np.cumsum(dets_per_image - 10 * n_gt)
    detections, annotations = [], []
    for i in range(num_images):
        g = slice(gt_end[i] - n_gt[i], gt_end[i])
        d = slice(10 * g.start, 10 * g.stop)
        r = slice(rand_end[i] - (dets_per_image - 10 * n_gt[i]), rand_end[i])
        annotations.append({"boxes": gt_boxes[g], "labels": gt_labels[g],
                            "difficult": difficult[g]})
        detections.append({"boxes": np.concatenate([near[d], rand[r]]),
                           "scores": np.concatenate([near_scores[d], rand_scores[r]]),
                           "labels": np.concatenate([near_labels[d], rand_labels[r]])})
    return detections, annotations


def run_metric(args: argparse.Namespace) -> str:
    """Time evaluate_voc (VOC07 11-point) on one core: median of ``--repeats`` runs."""
    if args.dets_per_image < 40 or args.images < 1 or args.repeats < 1:
        fail("benchmark.py", "metric needs --dets-per-image >= 40 (10 per gt, up to 4 gts), "
             f"--images >= 1 and --repeats >= 1; got {args.dets_per_image}, {args.images}, "
             f"{args.repeats}")
    pinned = pin_to_one_core()
    names = [VOC_CLASSES[i % 20] + ("" if i < 20 else str(i)) for i in range(args.classes)]
    dets, anns = synthetic_voc(args.images, args.classes, args.dets_per_image, args.seed)
    evaluate_voc(dets, anns, names)  # warm-up (imports, page faults)
    times, cpu_times, result = [], [], None
    for _ in range(args.repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        result = evaluate_voc(dets, anns, names)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    if args.profile:
        profiler = cProfile.Profile()
        profiler.runcall(evaluate_voc, dets, anns, names)
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(15)
    num_dets = sum(len(d["scores"]) for d in dets)
    num_gts = sum(len(a["labels"]) for a in anns)
    median, cpu_median = statistics.median(times), statistics.median(cpu_times)
    print(f"evaluate_voc: median {median:.3f} s wall, {cpu_median:.3f} s CPU, of {args.repeats} "
          f"({', '.join(f'{t:.3f}' for t in times)}); mAP {100 * result.map:.2f}")
    return "\n".join([
        "## metric: `evaluate_voc` (VOC07 11-point), CPU, one core",
        "",
        f"Synthetic workload (`tools/benchmark.py metric`, seed {args.seed}): {args.images} "
        f"images, {args.classes} classes, {num_dets} detections ({args.dets_per_image} per "
        f"image: 10 jittered per gt, the rest random), {num_gts} ground truths (1-4 per image, "
        f"10 % difficult); its mAP is {100 * result.map:.2f}.",
        "",
        *environment_lines(),
        f"- one core: {pinned}",
        f"- **median {median:.3f} s** wall-clock of {args.repeats} runs "
        f"({', '.join(f'{t:.3f}' for t in times)} s; process CPU time median "
        f"{cpu_median:.3f} s), after one warm-up run; input validation and concatenation "
        f"of the per-image dicts included",
        f"- load average when it ran: {', '.join(f'{x:.2f}' for x in os.getloadavg())} "
        f"(other processes on the machine inflate wall-clock time)",
    ])


# ---------------------------------------------------------------- model throughput
@dataclass
class SpeedResult:
    mode: str  # "train" or "inference"
    images_per_s: float
    ms_per_batch: float
    peak_memory_mb: float | None  # CUDA only


def synthetic_batch(batch: int, num_classes: int, device: torch.device, seed: int = 0
                    ) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    """Random (B, 3, 300, 300) images and 1-5 random xyxy boxes per image in 300-px space."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, 300, 300, generator=g)
    targets = []
    for _ in range(batch):
        n = int(torch.randint(1, 6, (1,), generator=g))
        xy = torch.rand(n, 2, generator=g) * 200
        wh = 20 + torch.rand(n, 2, generator=g) * 80
        targets.append({"boxes": torch.cat([xy, xy + wh], 1).to(device),
                        "labels": torch.randint(1, num_classes, (n,), generator=g).to(device)})
    return images.to(device), targets


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(model: torch.nn.Module, mode: str, batch: int, device: torch.device, steps: int,
            warmup: int, amp: bool = False, channels_last: bool = False) -> SpeedResult:
    """Median time per batch over ``steps`` after ``warmup`` (SGD step included in train mode)."""
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    images, targets = synthetic_batch(batch, model.num_classes, device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    model.train(mode == "train")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(warmup + steps):
        _sync(device)
        start = time.perf_counter()
        if mode == "train":
            with autocast_context(device, amp):
                loss = sum(model(images, targets).values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        else:
            with torch.inference_mode(), autocast_context(device, amp):
                model(images)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    times.sort()
    median = times[len(times) // 2]
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return SpeedResult(mode, batch / median, 1000 * median, peak)


def run_model(args: argparse.Namespace) -> str:
    """SSD300 training-step and inference throughput on synthetic 300x300 batches."""
    device = resolve_device(args.device)
    rows = []
    for backbone in args.backbones.split(","):
        for mode, batch in (("train", args.batch_size), ("inference", args.eval_batch_size)):
            torch.manual_seed(0)
            model = build_ssd(backbone, num_classes=21)
            r = measure(model, mode, batch, device, args.steps, args.warmup, args.amp,
                        args.channels_last)
            mem = f"{r.peak_memory_mb:.0f}" if r.peak_memory_mb is not None else "n/a"
            rows.append(f"| {backbone} | {mode} | {batch} | {r.images_per_s:.1f} | "
                        f"{r.ms_per_batch:.1f} | {mem} |")
            print(rows[-1], flush=True)
            del model
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    return "\n".join([
        f"## model: SSD300 throughput on {device.type.upper()}",
        "",
        f"`tools/benchmark.py model --backbones {args.backbones} --batch-size {args.batch_size}"
        f"{' --amp' if args.amp else ''}{' --channels-last' if args.channels_last else ''}`: "
        f"synthetic 300x300 batches, 21 classes, median of {args.steps} steps after "
        f"{args.warmup} warm-up; train = forward, loss, backward and SGD step; inference = "
        "forward with decoding and NMS. Data loading is not included.",
        "",
        f"- date (UTC): {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d}",
        f"- device: {name}; torch {torch.__version__}, torchvision {torchvision.__version__}, "
        f"python {platform.python_version()}, {torch.get_num_threads()} CPU threads",
        f"- precision: {'bf16 autocast' if args.amp and device.type == 'cuda' else 'float32'}",
        "",
        "| backbone | mode | batch | images/s | ms/batch | peak memory (MiB) |",
        "|---|---|---:|---:|---:|---:|",
        *rows,
    ])


def time_forward_backward(module: torch.nn.Module, x: torch.Tensor) -> float:
    """Seconds for one forward and backward pass of ``module`` on ``x`` (B, C, H, W): the time
    the module adds to a training step (its gradient reaches the input, as inside a network)."""
    module.zero_grad(set_to_none=True)
    x.grad = None
    start = time.perf_counter()
    module(x).sum().backward()
    return time.perf_counter() - start


def run_modules(args: argparse.Namespace) -> str:
    """Each attention module alone, forward + backward on SSD300's layer4 map, interleaved."""
    names = [n.strip() for n in args.modules.split(",") if n.strip()]
    shape = (args.batch_size, args.channels, args.size, args.size)
    torch.manual_seed(0)
    modules = {n: build_attention(n, args.channels).train() for n in names}
    x = torch.randn(shape, requires_grad=True)
    times: dict[str, list[float]] = {n: [] for n in names}
    load_before = os.getloadavg()[0]
    for rnd in range(args.warmup + args.repeats):  # interleaved: load changes hit every module
        for n in names[rnd % len(names):] + names[:rnd % len(names)]:
            t = time_forward_backward(modules[n], x)
            if rnd >= args.warmup:
                times[n].append(t)
    load_after = os.getloadavg()[0]
    rows = []
    for n, m in modules.items():
        params = sum(p.numel() for p in m.parameters())
        one = (1, *shape[1:])  # GFLOPs per image, as tools/complexity.py counts them
        stat, full = count_flops(m, one), count_flops_complete(m, one)
        rows.append(f"| {n} | {params:,} | {stat / 1e9:.4f} | {full / 1e9:.4f} | "
                    f"{1000 * min(times[n]):.1f} | {1000 * statistics.median(times[n]):.1f} |")
        print(rows[-1], flush=True)
    return "\n".join([
        "## modules: attention modules' cost per training step",
        "",
        f"`tools/benchmark.py modules --modules {args.modules} --batch-size {args.batch_size} "
        f"--channels {args.channels} --size {args.size} --repeats {args.repeats}`: each module "
        f"alone in train mode, forward and backward on a {'x'.join(map(str, shape))} input (the "
        "layer4 map SSD300 on ResNet18/34 sees at 300x300, batch 16): the time one module adds "
        "to a training step. Modules run interleaved, round by round, so a change in machine "
        f"load hits all of them; min and median of {args.repeats} rounds after {args.warmup} "
        "warm-up. GFLOPs of the module's forward per image (batch 1, as tools/complexity.py): "
        "torchstat's rules (matrix products count 0) and complete (FlopCounterMode, 2 per "
        "multiply-accumulate).",
        "",
        f"- date (UTC): {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d}",
        f"- device: {cpu_model()}; torch {torch.__version__}, python "
        f"{platform.python_version()}, {torch.get_num_threads()} CPU threads, float32",
        f"- 1-minute load average {load_before:.1f} before, {load_after:.1f} after "
        f"({os.cpu_count()} logical CPUs)"
        + (": above the CPU count, other jobs shared the cores and the min is the better estimate"
           if max(load_before, load_after) > (os.cpu_count() or 1) else ": a quiet machine"),
        "",
        "| module | params | GFLOPs (torchstat) | GFLOPs (complete) | ms min | ms median |",
        "|---|---:|---:|---:|---:|---:|",
        *rows,
    ])


def write_section(doc: Path, name: str, body: str) -> None:
    """Replace (or append) the section of benchmark ``name`` in the Markdown file ``doc``."""
    begin, end = f"<!-- benchmark:{name} -->", f"<!-- /benchmark:{name} -->"
    block = f"{begin}\n{body.strip()}\n{end}"
    text = doc.read_text() if doc.exists() else (
        "# Benchmarks\n\nWritten by `tools/benchmark.py <name>`; each section holds the latest "
        "run of one benchmark. Re-run a benchmark to update its section.\n")
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "benchmarks.md",
                        help="Markdown file to write the result section to")
    parser.add_argument("--no-write", action="store_true", help="print only, leave --doc alone")
    sub = parser.add_subparsers(dest="name", required=True, metavar="BENCHMARK")
    metric = sub.add_parser("metric", help="time evaluate_voc on a synthetic VOC-sized set")
    metric.add_argument("--images", type=int, default=5000)
    metric.add_argument("--classes", type=int, default=20)
    metric.add_argument("--dets-per-image", type=int, default=100,
                        help="detections per image (at least 40: 10 per gt, up to 4 gts)")
    metric.add_argument("--repeats", type=int, default=3)
    metric.add_argument("--seed", type=int, default=0)
    metric.add_argument("--profile", action="store_true", help="print a cProfile summary")
    metric.set_defaults(func=run_metric)
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
    # The data-pipeline and memory benchmarks live beside this file (tools/bench_*.py).
    import bench_loader
    import bench_memory
    import bench_suite

    bench_loader.register(sub, ROOT)
    bench_memory.register(sub)
    bench_suite.register(sub, ROOT)
    mods = sub.add_parser("modules", help="attention modules alone: forward + backward time "
                                          "per training step, params, GFLOPs")
    mods.add_argument("--modules", default="se,eca,cbam,sa,mhsa,la,ga,lga",
                      help="comma-separated keys of ssd_da.models.attention.ATTENTIONS")
    mods.add_argument("--batch-size", type=int, default=16)
    mods.add_argument("--channels", type=int, default=512)
    mods.add_argument("--size", type=int, default=10, help="map side (10: SSD300's layer4)")
    mods.add_argument("--repeats", type=int, default=20)
    mods.add_argument("--warmup", type=int, default=2)
    mods.set_defaults(func=run_modules)
    return parser


def main(args: argparse.Namespace) -> int:
    """Run the benchmark and write (or, with --no-write, print) its section. Returns the exit
    status: 0, or what the benchmark set in ``args.exit_status`` (gpu-suite: 1 unless every part
    ran and passed). A benchmark with parts may write its section as each ends, through
    ``args.write_partial``."""
    args.write_partial = None if args.no_write else (lambda body: write_section(args.doc, args.name, body))
    try:
        body = args.func(args)
    except ModuleNotFoundError as exc:  # a bare GPU machine: name the package, no traceback
        fail("benchmark.py", f"{args.name} needs the package {exc.name!r}, not installed here "
                             f"(`pip install -r requirements.txt`)")
    if args.no_write:
        print(body)
    else:
        write_section(args.doc, args.name, body)
        print(f"wrote section {args.name!r} of {args.doc}")
    return getattr(args, "exit_status", 0)


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
