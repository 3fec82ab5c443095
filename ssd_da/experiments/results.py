"""The reports of a suite of runs (ssd_da/experiments/ablate.py): each finished run's record
(its mAP at the last iteration, from ``log.jsonl``), the shared settings, and results.csv,
results.md, map_vs_params.png and power_curves.png."""
from __future__ import annotations

import logging
import math
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Sequence

from ssd_da.config import Config, resolve_attention_init
from ssd_da.data.voc import VOC_CLASSES
from ssd_da.experiments.ablate import (RunOutcome, RunSpec, _check_saved_config, _read_json,
                                       final_evaluation)
from ssd_da.experiments.power import power_report
from ssd_da.experiments.report import (RunRecord, format_markdown, plot_map_vs_params, summarize,
                                       table_label, write_results_csv)
from ssd_da.models.complexity import measure_detector

logger = logging.getLogger(__name__)


def collect_records(specs: Sequence[RunSpec], num_classes: int,
                    measure: Callable[[str, int], tuple[int, int]] = measure_detector,
                    ) -> tuple[list[RunRecord], dict[str, str]]:
    """RunRecords of the finished runs, and {run name: why it is missing} for the others.

    Raises:
        ValueError: a run folder's config.yaml differs from the planned recipe.
    """
    records, missing, cache = [], {}, {}
    for spec in specs:
        _check_saved_config(spec)  # never report a folder trained with another recipe
        summary = _read_json(spec.out_dir / "summary.json")
        iters = spec.cfg.iters
        ev = final_evaluation(spec.out_dir, iters) if summary else None
        if summary is None or int(summary.get("iterations", -1)) != iters or ev is None:
            missing[spec.name] = "not finished (no summary.json / final evaluation)"
            continue
        final = summary.get("final_map")
        if final is not None and math.isfinite(final) and abs(final - ev["map"]) > 1e-9:
            logger.warning("%s: summary final_map %s != log.jsonl mAP %s at iteration %d; using "
                           "the log", spec.name, final, ev["map"], iters)
        if spec.backbone not in cache:
            cache[spec.backbone] = measure(spec.backbone, num_classes)
        params, flops = cache[spec.backbone]
        coco = ev.get("coco") or {}  # pycocotools' figures, logged at the final evaluation
        records.append(RunRecord(
            spec.backbone, spec.seed, float(ev["map"]), {k: float(v) for k, v in ev["ap"].items()},
            int(params), flops / 1e9, float(summary["train_images_per_s"]),
            summary.get("peak_memory_mb"), float(summary["wall_time_s"]),
            coco_ap50=_maybe_float(coco.get("AP50")), coco_ap=_maybe_float(coco.get("AP"))))
    return records, missing


def _maybe_float(value: Any) -> float | None:
    return None if value is None else float(value)


def describe(base: Config, backbones: Sequence[str], seeds: Sequence[int],
             inits: Sequence[str] = ()) -> list[str]:
    """The settings shared by every run, for the top of results.md. ``inits``: each reported
    run's ``backbone_init`` (summary.json), so a fallback to scratch is not hidden."""
    counts = Counter(inits)
    used = "; ".join(f"{k} in {n} run(s)" for k, n in counts.items())
    pretrained = f"pretrained {base.pretrained!r}"
    if counts and set(counts) != {base.pretrained}:
        pretrained += f" asked, backbone weights used: {used}"
    return [f"- {len(backbones)} backbone(s) x {len(seeds)} seed(s) {list(seeds)}; "
            f"{base.iters} iterations, batch {base.batch_size}, lr {base.lr}, {pretrained}.",
            f"- Data: train {base.train_split}, test {base.test_split} under {base.data_root}"
            f"{' (COCO format)' if base.data_format == 'coco' else ''}; "
            f"metric {base.metric} mAP at the last iteration (not the best one, which would "
            f"be picked on the test set).",
            f"- attention_init {resolve_attention_init(base).attention_init!r} (identity: "
            f"the plain ResNet at step 0; default: each module's own initialisation)."]


def write_reports(specs: Sequence[RunSpec], outcomes: Sequence[RunOutcome], root: Path,
                  class_names: Sequence[str], layout: str = "attention", level: float = 0.95,
                  measure: Callable[[str, int], tuple[int, int]] = measure_detector,
                  min_effect: float = 0.3) -> dict[str, Path]:
    """results.csv, results.md, map_vs_params.png and power_curves.png under ``root``; returns
    their paths. ``min_effect``: the difference (points of mAP) the seeds-needed column plans
    for, next to the observed one; the test's alpha is ``1 - level``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    records, missing = collect_records(specs, len(class_names) + 1, measure)
    for o in outcomes:
        if o.status in ("diverged", "failed"):
            missing[o.spec.name] = f"{o.status}: {o.message}"
    paths = {"csv": root / "results.csv", "md": root / "results.md",
             "png": root / "map_vs_params.png", "power": root / "power_curves.png"}
    write_results_csv(records, class_names, paths["csv"])
    groups = summarize(records, level)
    backbones = list(dict.fromkeys(s.backbone for s in specs))
    seeds = list(dict.fromkeys(s.seed for s in specs))
    reported = {(r.backbone, r.seed) for r in records}
    summaries = [_read_json(s.out_dir / "summary.json") or {} for s in specs
                 if (s.backbone, s.seed) in reported]
    inits = [str(s["backbone_init"]) for s in summaries if "backbone_init" in s]  # older runs: none
    notes = describe(specs[0].cfg, backbones, seeds, inits) if specs else []
    failures = [f"{name}: {why}" for name, why in missing.items()]
    # The DA paper's mAP ("on the VOC data set") only beside VOC runs; the LGA paper's always.
    paper = layout == "lga" or list(class_names) == list(VOC_CLASSES)
    power = power_report(groups, paths["power"], min_effect, 1.0 - level,
                         lambda name: table_label(name, layout))
    paths["md"].write_text(format_markdown(groups, layout, level, notes, failures, paper, power))
    plot_map_vs_params(groups, paths["png"], layout)
    logger.info("%d of %d runs reported; %s", len(records), len(specs),
                ", ".join(str(p) for p in paths.values()))
    return paths
