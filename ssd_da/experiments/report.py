"""Results of a multi-seed suite: results.csv (one row per run), results.md (one row per backbone,
laid out like the DA paper's Tables I-III or the LGA paper's Table 4) and map_vs_params.png.

Units: the CSV keeps mAP, per-class AP and pycocotools' AP50 / AP@[.5:.95] as fractions (0..1,
as the trainer logs them), params as an integer count and gflops as FLOPs / 1e9; the markdown
shows them in percent like the papers.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ssd_da.experiments.stats import Estimate, difference, mean_ci
from ssd_da.models.names import display_name, parse_backbone_name
from ssd_da.utils.plots import save_figure

__all__ = ["RunRecord", "BackboneSummary", "PAPER_MAP", "PAPER_LGA", "table_label", "summarize",
           "write_results_csv", "read_results_csv", "format_markdown", "plot_map_vs_params"]

# mAP (%) printed by the DA paper, "on the VOC data set" (the split is not named; we test on VOC07
# test): Table II (plain / SE / DA), Table III (SGE, ECA;
# its DA-ResNet50 row reads "71.0" in the OCR text, a misprint of Table II's 77.0) and Table I
# (orders of the two branches at depth 50).
PAPER_MAP = {
    "resnet18": 72.6, "se_resnet18": 72.9, "da_resnet18": 73.1,
    "resnet34": 74.5, "se_resnet34": 74.8, "da_resnet34": 75.1,
    "resnet50": 75.9, "se_resnet50": 76.5, "da_resnet50": 77.0,
    "resnet101": 77.0, "se_resnet101": 77.6, "da_resnet101": 78.2,
    "sge_resnet50": 76.3, "eca_resnet50": 76.8, "sge_resnet101": 77.4, "eca_resnet101": 78.0,
    "da_cs_resnet50": 76.8, "da_par_resnet50": 76.6,
}
# mAP50 / mAP50-95 (%) printed by the LGA paper's Table 4: ResNet18 in YOLOv8 on TinyPerson,
# measured by YOLOv8's validator; the paper does not say over how many runs (context for the "lga"
# suite, not a target: another detector, dataset, schedule and evaluator).
PAPER_LGA = {
    "resnet18": (12.5, 4.48), "resnet18_mhsa": (12.4, 4.39), "resnet18_se": (12.4, 4.45),
    "resnet18_eca": (12.3, 4.37), "resnet18_cbam": (12.6, 4.42), "resnet18_sa": (12.3, 4.36),
    "resnet18_la": (12.7, 4.53), "resnet18_ga": (12.7, 4.49), "resnet18_lga": (12.7, 4.62),
}
# Table I's wording for the branch orders (section III.C).
_ORDER_LABEL = {"none": "", "da": "+spatial+channel", "da_cs": "+channel+spatial",
                "da_par": "+spatial and channel in parallel", "da_s": "+spatial only",
                "da_c": "+channel only"}
CSV_FIXED = ("backbone", "seed", "map")
CSV_TAIL = ("params", "gflops", "train_images_per_s", "peak_memory_mb", "wall_time_s",
            "coco_ap50", "coco_ap")


@dataclass
class RunRecord:
    """One finished run. ``map``/``ap`` are fractions (0..1); ``ap`` maps class name -> AP.
    ``coco_ap50``/``coco_ap``: pycocotools' AP50 and AP@[.5:.95] (fractions; None when the run
    logged none)."""

    backbone: str
    seed: int
    map: float
    ap: dict[str, float]
    params: int
    gflops: float
    train_images_per_s: float
    peak_memory_mb: float | None
    wall_time_s: float
    coco_ap50: float | None = None
    coco_ap: float | None = None


@dataclass
class BackboneSummary:
    """All seeds of one backbone; ``maps`` is seed -> mAP in percent."""

    backbone: str
    maps: dict[int, float]
    params: int
    gflops: float
    ap: dict[str, list[float]] = field(default_factory=dict)  # class -> AP (%) per seed
    coco_ap50: list[float] = field(default_factory=list)  # pycocotools AP50 (%) per seed
    coco_ap: list[float] = field(default_factory=list)  # pycocotools AP@[.5:.95] (%) per seed
    estimate: Estimate | None = None
    delta: Estimate | None = None  # against the plain ResNet of the same depth (pp)
    baseline: str = ""


def table_label(backbone: str, layout: str = "attention") -> str:
    """Row label: the paper's name (``"se_resnet50"`` -> ``"SE-ResNet50"``); with layout
    "order", Table I's wording (``"da_cs_resnet50"`` -> ``"ResNet50+channel+spatial"``)."""
    attention, depth, _ = parse_backbone_name(backbone)
    if layout == "order" and attention in _ORDER_LABEL:
        return f"ResNet{depth}{_ORDER_LABEL[attention]}"
    return display_name(backbone)


def summarize(records: Sequence[RunRecord], level: float = 0.95) -> list[BackboneSummary]:
    """Group runs by backbone (first-seen order); mean/std/CI of mAP and the paired difference
    to ``resnet{depth}`` when that backbone is among the records."""
    groups: dict[str, BackboneSummary] = {}
    for r in records:
        g = groups.setdefault(r.backbone, BackboneSummary(r.backbone, {}, r.params, r.gflops))
        if r.seed in g.maps:
            raise ValueError(f"two results for {r.backbone} seed {r.seed}")
        g.maps[r.seed] = 100.0 * r.map
        for cls, value in r.ap.items():
            g.ap.setdefault(cls, []).append(100.0 * value)
        if r.coco_ap50 is not None and r.coco_ap is not None:
            g.coco_ap50.append(100.0 * r.coco_ap50)
            g.coco_ap.append(100.0 * r.coco_ap)
    for g in groups.values():
        g.estimate = mean_ci(list(g.maps.values()), level)
        g.baseline = f"resnet{parse_backbone_name(g.backbone)[1]}"
        if g.baseline in groups and g.baseline != g.backbone:
            g.delta = difference(g.maps, groups[g.baseline].maps, level)
    return list(groups.values())


def write_results_csv(records: Sequence[RunRecord], class_names: Sequence[str], path: Path) -> None:
    """One row per run: backbone, seed, map, ap_<class>..., params, gflops, throughput, memory,
    wall time. Empty cell for an unknown value (peak memory on CPU)."""
    header = [*CSV_FIXED, *(f"ap_{c}" for c in class_names), *CSV_TAIL]
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        for r in records:
            tail = [r.params, repr(r.gflops), repr(r.train_images_per_s),
                    "" if r.peak_memory_mb is None else repr(r.peak_memory_mb), repr(r.wall_time_s),
                    *("" if v is None else repr(v) for v in (r.coco_ap50, r.coco_ap))]
            writer.writerow([r.backbone, r.seed, repr(r.map),
                             *(repr(r.ap.get(c, math.nan)) for c in class_names), *tail])


def read_results_csv(path: Path) -> list[RunRecord]:
    """Inverse of :func:`write_results_csv` (a CSV without the coco columns reads as None)."""
    records = []
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            mem = row["peak_memory_mb"]
            records.append(RunRecord(
                row["backbone"], int(row["seed"]), float(row["map"]),
                {k[3:]: float(v) for k, v in row.items() if k.startswith("ap_")},
                int(row["params"]), float(row["gflops"]), float(row["train_images_per_s"]),
                float(mem) if mem else None, float(row["wall_time_s"]),
                *(float(row[k]) if row.get(k) else None for k in ("coco_ap50", "coco_ap"))))
    return records


def _fmt_map(e: Estimate) -> str:
    return f"{e.mean:.2f} ± {'n/a' if math.isnan(e.std) else f'{e.std:.2f}'}"


def _fmt_delta(g: BackboneSummary, names: set[str]) -> str:
    if g.backbone == g.baseline:
        return "(baseline)"
    if g.delta is None:
        return f"n/a (no {g.baseline} results)" if g.baseline not in names else "n/a"
    d = g.delta
    if not d.has_interval:
        return f"{d.mean:+.2f} [n/a]"
    return f"{d.mean:+.2f} [{d.low:+.2f}, {d.high:+.2f}]" + (" ≈0" if d.includes_zero else "")


def _paper(backbone: str, layout: str) -> str:
    if layout == "lga":
        return "{:.1f} / {:.2f}".format(*PAPER_LGA[backbone]) if backbone in PAPER_LGA else "-"
    return f"{PAPER_MAP[backbone]:.1f}" if backbone in PAPER_MAP else "-"


def _fmt_values(values: Sequence[float]) -> str:
    """'mean ± std' of per-seed values in percent; '-' when there are none."""
    return _fmt_map(mean_ci(list(values))) if values else "-"


def _main_table(groups: Sequence[BackboneSummary], layout: str, level: float,
                paper: bool) -> list[str]:
    names = {g.backbone for g in groups}
    first = "Method" if layout == "order" else "Backbone"
    pct = f"{100 * level:g}%"
    coco = any(g.coco_ap50 for g in groups)
    paper_head = " Paper mAP50 / mAP50-95 |" if layout == "lga" else " Paper mAP |"
    lines = [f"| {first} | Params (M) | GFLOPs | mAP (%) mean ± std | n "
             f"| Δ mAP vs plain ResNet [{pct} CI] |"
             + (" mAP50 (%) | mAP50-95 (%) |" if coco else "") + (paper_head if paper else ""),
             "|---|---:|---:|---:|---:|---|" + ("---:|---:|" if coco else "")
             + ("---:|" if paper else "")]
    for g in groups:
        lines.append(f"| {table_label(g.backbone, layout)} | {g.params / 1e6:.4f} "
                     f"| {g.gflops:.4f} | {_fmt_map(g.estimate)} | {g.estimate.n} "
                     f"| {_fmt_delta(g, names)} |"
                     + (f" {_fmt_values(g.coco_ap50)} | {_fmt_values(g.coco_ap)} |" if coco else "")
                     + (f" {_paper(g.backbone, layout)} |" if paper else ""))
    return lines


def _paper_note(layout: str) -> str:
    if layout == "lga":
        return ("- Paper mAP50 / mAP50-95: the LGA paper's Table 4 (ResNet18 in YOLOv8 on "
                "TinyPerson, from YOLOv8's validator, which matches and caps detections its own "
                "way): context for the mAP50 / mAP50-95 columns, not a target (another "
                "detector, dataset, schedule and evaluator).")
    return ("- Paper mAP: the DA paper's 11-point mAP \"on the VOC data set\". The paper names no "
            "test split, IoU threshold, training split, initialisation or recipe; comparable at "
            "best with VOC07 test at IoU 0.5 after VOC07+12 training (our assumption of its "
            "protocol).")


def _ap_table(groups: Sequence[BackboneSummary], layout: str) -> list[str]:
    classes = list(groups[0].ap) if groups else []
    lines = ["| Backbone | " + " | ".join(classes) + " |",
             "|---|" + "---:|" * len(classes)]
    for g in groups:
        cells = [f"{math.fsum(g.ap[c]) / len(g.ap[c]):.2f}" if g.ap.get(c) else "-" for c in classes]
        lines.append(f"| {table_label(g.backbone, layout)} | " + " | ".join(cells) + " |")
    return lines


def format_markdown(groups: Sequence[BackboneSummary], layout: str = "attention",
                    level: float = 0.95, notes: Sequence[str] = (),
                    failures: Sequence[str] = (), paper: bool = True,
                    power: Sequence[str] = ()) -> str:
    """results.md: the main table, per-class AP, the method notes and any runs left out.
    ``layout``: "attention" (DA paper Tables II/III), "order" (Table I) or "lga" (LGA paper
    Table 4). ``paper``: add the paper's column (the DA paper's mAP: only meaningful for runs
    on the 20 VOC classes; the LGA paper's mAP50 / mAP50-95 as context). ``power``: the
    seeds-needed section (:func:`ssd_da.experiments.power.power_section`), after the notes."""
    title = {"order": "Table I style: orders of the DA branches",
             "lga": "LGA paper Table 4 style: attention modules at the end of the backbone",
             }.get(layout, "Tables II/III style: backbones and attention modules")
    coco = any(g.coco_ap50 for g in groups)
    pct = f"{100 * level:g}%"
    out = [f"# Results: {title}", "", *notes, "", *_main_table(groups, layout, level, paper), "",
           "- mAP: mean ± sample std (ddof=1) over seeds, in percent; n/a for one seed.",
           "- Δ: difference to the plain ResNet of the same depth in percentage points; with "
           "matched seeds the mean of the per-seed (paired) differences, otherwise the "
           f"difference of means. [{pct} CI]: Student t interval, n-1 dof for n paired "
           "differences; Welch-Satterthwaite dof (rounded down) for unpaired runs.",
           f"- ≈0: the {pct} interval includes zero, so these seeds do not show a difference.",
           "- Params/GFLOPs: the SSD300 detector as trained (this run's classes + background, "
           "300x300, torchstat rules). The paper's Params/GFLOPs are the ImageNet classifier "
           "at 224x224 (`tools/complexity.py --classifier`).",
           *(["- mAP50 / mAP50-95: pycocotools' AP at IoU 0.5 and averaged over IoU "
              "0.5:0.95 (101-point interpolation), at the final evaluation; mean ± sample std "
              "over seeds. The LGA paper reports metrics of these names from YOLOv8's validator "
              "(its own matching and detection caps), so the two are not directly comparable. "
              "mAP is the VOC metric of the run (`metric`), e.g. the 11-point voc07 AP."]
             if coco else []),
           *([_paper_note(layout)] if paper else []),
           *(["", *power] if power else []),
           "", "## Per-class AP (%), mean over seeds", "",
           *_ap_table(groups, layout)]
    if failures:
        out += ["", "## Runs left out", "", *(f"- {f}" for f in failures)]
    return "\n".join(out) + "\n"


def plot_map_vs_params(groups: Sequence[BackboneSummary], path: Path, layout: str = "attention") -> None:
    """mAP (mean, error bar = sample std; none for one seed) against detector params."""
    fig = Figure(figsize=(7, 5), dpi=120)
    ax = fig.add_subplot(1, 1, 1)
    for g in groups:
        std = 0.0 if math.isnan(g.estimate.std) else g.estimate.std
        ax.errorbar(g.params / 1e6, g.estimate.mean, yerr=std, fmt="o", capsize=4)
        ax.annotate(table_label(g.backbone, layout), (g.params / 1e6, g.estimate.mean),
                    textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xlabel("detector parameters (M)")
    # Attention adds a few hundred parameters: plain numbers, not an "+1.41e1" axis offset.
    ax.ticklabel_format(axis="x", useOffset=False, style="plain")
    ax.xaxis.set_major_locator(MaxNLocator(4))
    ax.set_ylabel("mAP (%), mean ± std over seeds")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)
