"""``tools/benchmark.py metric``: ``evaluate_voc`` (VOC07 11-point) on one CPU core, on a
synthetic VOC-sized detection set."""
from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time
from typing import Any

import numpy as np

from ssd_da.bench.core import environment_lines, load_average, one_core
from ssd_da.data.voc import VOC_CLASSES
from ssd_da.evaluation.voc import evaluate_voc
from ssd_da.utils.cli import fail


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
    names = [VOC_CLASSES[i % 20] + ("" if i < 20 else str(i)) for i in range(args.classes)]
    dets, anns = synthetic_voc(args.images, args.classes, args.dets_per_image, args.seed)
    with one_core() as pinned:
        env = environment_lines("cpu")
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
        *env,
        f"- one core: {pinned}",
        f"- **median {median:.3f} s** wall-clock of {args.repeats} runs "
        f"({', '.join(f'{t:.3f}' for t in times)} s; process CPU time median "
        f"{cpu_median:.3f} s), after one warm-up run; input validation and concatenation "
        f"of the per-image dicts included",
        f"- load average at the end: {load_average()}",
    ])


def register(sub: Any) -> None:
    metric = sub.add_parser("metric", help="time evaluate_voc on a synthetic VOC-sized set")
    metric.add_argument("--images", type=int, default=5000)
    metric.add_argument("--classes", type=int, default=20)
    metric.add_argument("--dets-per-image", type=int, default=100,
                        help="detections per image (at least 40: 10 per gt, up to 4 gts)")
    metric.add_argument("--repeats", type=int, default=3)
    metric.add_argument("--seed", type=int, default=0)
    metric.add_argument("--profile", action="store_true", help="print a cProfile summary")
    metric.set_defaults(func=run_metric)
