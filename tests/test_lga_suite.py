"""The LGA paper's comparison as a suite (``tools/ablate.py --suite lga``): its backbone names,
and results.md with pycocotools' mAP50 / mAP50-95 beside the VOC mAP and the paper's Table 4
numbers, from values worked out by hand."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from ssd_da.config import load_config, save_config
from ssd_da.experiments.ablate import plan_runs, suite_backbones
from ssd_da.experiments.results import collect_records
from ssd_da.experiments.report import (RunRecord, format_markdown, read_results_csv, summarize,
                                       table_label, write_results_csv)

from ssd_da.cli import ablate as ablate_tool

TABLE4 = ["resnet18", "resnet18_mhsa", "resnet18_se", "resnet18_eca", "resnet18_cbam",
          "resnet18_sa", "resnet18_la", "resnet18_ga", "resnet18_lga"]


def _rows(md: str) -> dict[str, list[str]]:
    lines = md.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("| Backbone | Params"))
    rows = {}
    for ln in lines[start + 2:]:
        if not ln.startswith("| "):
            break
        rows[ln.split("|")[1].strip()] = [c.strip() for c in ln.split("|")[2:-1]]
    return rows


def _record(backbone: str, seed: int, m: float, ap50: float | None, ap: float | None) -> RunRecord:
    return RunRecord(backbone, seed, m, {"a": m}, 1_000_000, 1.5, 10.0, None, 60.0, ap50, ap)


def test_lga_suite_is_table4_on_resnet18():
    assert suite_backbones("lga") == TABLE4
    assert suite_backbones("lga", [34])[-1] == "resnet34_lga"
    assert [table_label(n) for n in TABLE4[:2]] == ["ResNet18", "ResNet18+MHSA"]
    assert table_label("resnet18_lga", "lga") == "ResNet18+LGA"
    with pytest.raises(ValueError, match=r"valid suites: order, attention, lga"):
        suite_backbones("table4")


def test_lga_report_by_hand(tmp_path):
    records = [_record("resnet18", 0, 0.50, 0.40, 0.20), _record("resnet18", 1, 0.54, 0.44, 0.22),
               _record("resnet18_lga", 0, 0.60, 0.50, 0.25),
               _record("resnet18_lga", 1, 0.56, 0.48, 0.21)]
    write_results_csv(records, ["a"], tmp_path / "r.csv")
    assert read_results_csv(tmp_path / "r.csv") == records
    md = format_markdown(summarize(records), layout="lga", paper=True)
    assert "LGA paper Table 4 style" in md
    assert "| mAP50 (%) | mAP50-95 (%) | Paper mAP50 / mAP50-95 |" in md
    rows = _rows(md)
    # mAP50 40 and 44: mean 42, sample std sqrt(8) = 2.83; mAP50-95 20, 22: 21 +- sqrt(2) = 1.41
    assert rows["ResNet18"][2:] == ["52.00 ± 2.83", "2", "(baseline)", "42.00 ± 2.83",
                                    "21.00 ± 1.41", "12.5 / 4.48"]
    # VOC mAP 60, 56 vs 50, 54: paired differences 10, 2 (mean 6); AP50 49 +- 1.41, AP 23 +- 2.83
    assert rows["ResNet18+LGA"][4].startswith("+6.00 [")
    assert rows["ResNet18+LGA"][5:] == ["49.00 ± 1.41", "23.00 ± 2.83", "12.7 / 4.62"]


def test_report_without_coco_figures_has_no_coco_columns(tmp_path):
    records = [_record("resnet18", 0, 0.5, None, None), _record("resnet18_se", 0, 0.6, None, None)]
    write_results_csv(records, ["a"], tmp_path / "r.csv")
    assert read_results_csv(tmp_path / "r.csv") == records
    md = format_markdown(summarize(records), layout="lga", paper=True)
    assert "mAP50 (%)" not in md and "pycocotools" not in md
    assert _rows(md)["ResNet18+SE"][-1] == "12.4 / 4.45"
    assert "Paper" not in format_markdown(summarize(records), layout="lga", paper=False)


def _finished_run(spec, coco: dict | None) -> None:
    spec.out_dir.mkdir(parents=True)
    save_config(spec.cfg, spec.out_dir / "config.yaml")
    final = {"iter": spec.cfg.iters, "map": 0.5, "ap": {"x": 0.5}}
    if coco is not None:
        final["coco"] = coco
    (spec.out_dir / "log.jsonl").write_text(
        json.dumps({"iter": spec.cfg.iters, "map": 0.1, "ap": {"x": 0.1},
                    "coco": {"AP": 0.9, "AP50": 0.9}}) + "\n"  # an earlier record: not read
        + json.dumps(final) + "\n")
    (spec.out_dir / "summary.json").write_text(json.dumps(
        {"iterations": spec.cfg.iters, "final_map": 0.5, "train_images_per_s": 1.0,
         "wall_time_s": 2.0}))


def test_records_take_coco_figures_from_the_final_evaluation(tmp_path):
    specs = plan_runs(load_config(None, ["iters=4"]), ["resnet18", "resnet18_lga"], [0], tmp_path)
    _finished_run(specs[0], {"AP": 0.25, "AP50": 0.625, "AP75": 0.1})
    _finished_run(specs[1], None)  # a run from before the trainer logged them
    records, missing = collect_records(specs, 4, measure=lambda name, n: (100, 2e9))
    assert not missing
    assert (records[0].coco_ap50, records[0].coco_ap) == (0.625, 0.25)
    assert (records[1].coco_ap50, records[1].coco_ap) == (None, None)


def test_cli_lists_the_lga_suite(capsys):
    with pytest.raises(SystemExit) as exc:
        ablate_tool.get_args_parser().parse_args(["--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "{order,attention,lga}" in text and "resnet18,resnet18_lga" in text
    with pytest.raises(SystemExit) as exc:
        ablate_tool.get_args_parser().parse_args(["--suite", "table4"])
    assert exc.value.code == 2
    assert "invalid choice: 'table4'" in capsys.readouterr().err


def test_benchmark_modules_section(tmp_path):
    from ssd_da.cli import benchmark

    args = benchmark.get_args_parser().parse_args(
        ["--doc", str(tmp_path / "b.md"), "modules", "--modules", "se,mhsa", "--batch-size", "2",
         "--channels", "16", "--size", "4", "--repeats", "2", "--warmup", "1"])
    benchmark.run(args)
    text = (tmp_path / "b.md").read_text()
    assert "<!-- benchmark:modules -->" in text and "2x16x4x4 input" in text
    rows = {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[2:-1]]
            for ln in text.splitlines() if ln.startswith("| se ") or ln.startswith("| mhsa ")}
    assert rows["se"][0] == "32" and rows["mhsa"][0] == "816"  # 2C^2/16; 3 (C^2 + C)
    assert all(float(v) > 0 for v in rows["mhsa"][3:])  # ms min, ms median
