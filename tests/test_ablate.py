"""tools/ablate.py: t quantiles and intervals by hand, the report tables, a real 2 x 2 suite on a
tiny synthetic VOC tree (skip finished runs, resume interrupted ones), and the one-run-per-GPU
queue with a stand-in training script."""
from __future__ import annotations

import csv
import json
import math
import re
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from ssd_da.config import load_config
from ssd_da.experiments import stats
from ssd_da.experiments.ablate import plan_runs, run_state, run_suite, suite_backbones
from ssd_da.experiments.results import collect_records, write_reports
from ssd_da.experiments.report import (RunRecord, format_markdown, read_results_csv, summarize,
                                       table_label, write_results_csv)

from ssd_da.cli import ablate as ablate_tool


# ---------------------------------------------------------------- statistics, by hand
def test_t_quantiles_match_tables_and_closed_forms():
    # dof 1 is the Cauchy distribution: t = tan(pi (p - 1/2)); dof 2: t = (2p-1) / sqrt(2p(1-p)).
    assert stats.t_quantile(0.975, 1) == pytest.approx(math.tan(0.475 * math.pi), rel=1e-9)
    assert stats.t_quantile(0.975, 2) == pytest.approx(0.95 / math.sqrt(2 * 0.975 * 0.025), rel=1e-9)
    for dof, table in ((1, 12.706), (2, 4.303), (4, 2.776), (30, 2.042)):
        assert round(stats.t_quantile(0.975, dof), 3) == table
    assert stats.t_quantile(0.995, 3) == pytest.approx(5.841, abs=1e-3)
    assert stats.t_quantile(0.025, 4) == pytest.approx(-2.776, abs=1e-3)
    assert stats.t_quantile(0.975, 100000) == pytest.approx(1.95996, abs=1e-4)  # -> normal
    assert stats.student_t_cdf(0.0, 7) == 0.5
    assert stats.student_t_cdf(1.0, 1) == pytest.approx(0.75)  # Cauchy: 1/2 + atan(1)/pi
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="degrees of freedom"):
            stats.t_quantile(0.975, bad)
    with pytest.raises(ValueError, match="between 0 and 1"):
        stats.t_quantile(1.0, 3)


def test_mean_ci_by_hand():
    e = stats.mean_ci([2.0, 4.0])  # mean 3, s = sqrt(2), half = 12.706 * sqrt(2) / sqrt(2)
    assert (e.mean, e.n) == (3.0, 2) and e.std == pytest.approx(math.sqrt(2))
    assert (e.low, e.high) == pytest.approx((3 - 12.7062047, 3 + 12.7062047))
    assert e.includes_zero is True
    one = stats.mean_ci([5.0])
    assert math.isnan(one.std) and not one.has_interval and one.includes_zero is None
    with pytest.raises(ValueError, match="at least one"):
        stats.mean_ci([])


def test_paired_and_welch_differences_by_hand():
    a, b = {0: 10.0, 1: 12.0, 2: 14.0}, {0: 9.0, 1: 10.0, 2: 13.0}
    d = stats.difference(a, b)  # matched seeds: diffs 1, 2, 1; s = sqrt(1/3); half = t(2) / 3
    assert d.method == "paired" and d.mean == pytest.approx(4 / 3)
    assert d.std == pytest.approx(math.sqrt(1 / 3))
    half = stats.t_quantile(0.975, 2) / 3
    assert (d.low, d.high) == pytest.approx((4 / 3 - half, 4 / 3 + half))
    assert d.includes_zero is True  # low = -0.101
    # Unmatched (seeds 3..5 on one side): Welch. var/n = 4/3 and 13/9, se = 5/3, dof = 1250/313
    # = 3.99, rounded down to 3 (conservative): half = t_0.975(3) * 5/3 = 5.3041.
    w = stats.difference(a, {3: 9.0, 4: 10.0, 5: 13.0})
    assert w.method == "welch" and w.mean == pytest.approx(4 / 3)
    assert w.high - w.mean == pytest.approx(3.1824463 * 5 / 3, rel=1e-6)
    tight = stats.difference({0: 3.0, 1: 4.0}, {0: 1.0, 1: 2.0})  # diffs 2, 2: s = 0
    assert (tight.low, tight.high, tight.includes_zero) == (2.0, 2.0, False)


# ---------------------------------------------------------------- report, by hand
def _md_rows(text: str) -> dict[str, list[str]]:
    """Main-table cells after the name column, keyed by the name column."""
    lines = text.split("## Per-class")[0].splitlines()
    return {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[2:-1]]
            for ln in lines if ln.startswith("| ") and "Backbone" not in ln}


def _record(backbone: str, seed: int, m: float, params: int = 1_000_000) -> RunRecord:
    return RunRecord(backbone, seed, m, {"a": m, "b": m / 2}, params, 1.5, 10.0, None, 60.0)


def test_report_tables_by_hand(tmp_path):
    records = [_record("resnet18", s, m) for s, m in enumerate((0.70, 0.72, 0.74))]
    records += [_record("da_resnet18", s, m) for s, m in enumerate((0.71, 0.74, 0.75))]
    records += [_record("se_resnet34", 0, 0.5)]  # one seed, no resnet34 in the suite
    write_results_csv(records, ["a", "b"], tmp_path / "r.csv")
    assert read_results_csv(tmp_path / "r.csv") == records
    groups = summarize(records)
    plain, da, se = groups
    assert plain.estimate.mean == pytest.approx(72.0) and plain.estimate.std == pytest.approx(2.0)
    assert da.delta.mean == pytest.approx(4 / 3)  # paired diffs 1, 2, 1 points
    md = format_markdown(groups, paper=True)
    rows = _md_rows(md)
    assert rows["ResNet18"] == ["1.0000", "1.5000", "72.00 ± 2.00", "3", "(baseline)", "72.6"]
    assert rows["DA-ResNet18"][2:5] == ["73.33 ± 2.08", "3", "+1.33 [-0.10, +2.77] ≈0"]
    assert rows["SE-ResNet34"][2:5] == ["50.00 ± n/a", "1", "n/a (no resnet34 results)"]
    assert "Paper mAP" not in format_markdown(groups, paper=False)
    assert table_label("da_cs_resnet50", "order") == "ResNet50+channel+spatial"
    assert table_label("da_cs_resnet50") == "DA(c>s)-ResNet50"
    assert table_label("eca_resnet101", "order") == "ECA-ResNet101"
    with pytest.raises(ValueError, match="two results"):
        summarize(records + [_record("resnet18", 0, 0.1)])


def test_suites_and_plan():
    assert suite_backbones("order") == ["resnet50", "da_resnet50", "da_cs_resnet50",
                                        "da_par_resnet50", "da_s_resnet50", "da_c_resnet50"]
    names = suite_backbones("attention")
    assert len(names) == 24 and names[:6] == ["resnet18", "se_resnet18", "sge_resnet18",
                                              "eca_resnet18", "da_resnet18", "cbam_resnet18"]
    with pytest.raises(ValueError, match="valid depths"):
        suite_backbones("attention", [18, 20])
    with pytest.raises(ValueError, match="valid suites"):
        suite_backbones("tables")
    specs = plan_runs(load_config(None, ["iters=3"]), ["resnet18", "da_resnet18"], [0, 4],
                      Path("/tmp/x{y}"))
    assert [s.name for s in specs] == ["resnet18/seed0", "da_resnet18/seed0",
                                       "resnet18/seed4", "da_resnet18/seed4"]
    assert specs[3].out_dir == Path("/tmp/x{y}/da_resnet18/seed4") and specs[3].cfg.seed == 4
    with pytest.raises(ValueError, match="valid names"):
        plan_runs(load_config(), ["resnet19"], [0], Path("/tmp/x"))


# ---------------------------------------------------------------- a real suite, CPU
def _cli(devkit: Path, out: Path, *extra: str) -> int:
    from ssd_da.data.demo import DEMO_CLASSES

    argv = ["--data-root", str(devkit), "--classes", ",".join(DEMO_CLASSES),
            "--train-split", "voc07_trainval", "--test-split", "voc07_test", "--iters", "2",
            "--batch-size", "2", "--workers", "0", "--backbones", "resnet18,da_resnet18",
            "--seeds", "2", "--output-dir", str(out), *extra, "pretrained=none", "eval_every=0"]
    return ablate_tool.main(argv)


@pytest.mark.slow
def test_suite_runs_reports_skips_and_resumes(tiny_devkit, tmp_path, monkeypatch):
    import ssd_da.engine.trainer as trainer

    out = tmp_path / "abl"
    assert _cli(tiny_devkit, out) == 0
    with open(out / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["backbone"], r["seed"]) for r in rows] == [
        ("resnet18", "0"), ("da_resnet18", "0"), ("resnet18", "1"), ("da_resnet18", "1")]
    assert set(rows[0]) >= {"ap_circle", "ap_ring", "params", "gflops", "wall_time_s"}
    maps = {(r["backbone"], int(r["seed"])): 100 * float(r["map"]) for r in rows}
    for r in rows:  # the CSV's mAP is the final evaluation logged by that run
        log = (out / r["backbone"] / f"seed{r['seed']}" / "log.jsonl").read_text().splitlines()
        assert float(r["map"]) == [json.loads(x) for x in log if '"map"' in x][-1]["map"]
    # DA adds 9 + 9 + 2 bias-free conv weights per block, 8 blocks in ResNet18: 160 params; and
    # 20 FLOPs per pixel of each block's map (75^2, 38^2, 19^2, 10^2, two blocks each): 301200.
    p = {r["backbone"]: (int(r["params"]), float(r["gflops"])) for r in rows}
    assert p["da_resnet18"][0] - p["resnet18"][0] == 160
    assert round((p["da_resnet18"][1] - p["resnet18"][1]) * 1e9) == 40 * (75**2 + 38**2 + 19**2 + 100)
    md = _md_rows((out / "results.md").read_text())
    for name, key in (("ResNet18", "resnet18"), ("DA-ResNet18", "da_resnet18")):
        mean, std = map(float, md[name][2].split(" ± "))
        vals = [maps[(key, 0)], maps[(key, 1)]]
        assert (mean, std, md[name][3]) == (round(np.mean(vals), 2), round(np.std(vals, ddof=1), 2), "2")
    delta = float(re.match(r"([+-][\d.]+) \[", md["DA-ResNet18"][4]).group(1))
    paired = np.mean([maps[("da_resnet18", s)] - maps[("resnet18", s)] for s in (0, 1)])
    assert delta == round(paired, 2)
    assert (out / "map_vs_params.png").stat().st_size > 1000

    # Rerun: every run is finished, nothing trains, no run file is touched.
    files = sorted(out.glob("*/seed*/*"))
    mtimes = [f.stat().st_mtime_ns for f in files]
    monkeypatch.setattr(trainer, "train", lambda *a, **k: pytest.fail("train called on rerun"))
    assert _cli(tiny_devkit, out) == 0
    assert [f.stat().st_mtime_ns for f in files] == mtimes

    # Interrupted run (no summary.json): resumed from its last.pth, the others skipped.
    run_dir = out / "da_resnet18" / "seed1"
    (run_dir / "summary.json").unlink()
    calls = []
    monkeypatch.undo()
    real_train = trainer.train

    def spy(cfg, resume=None):
        calls.append((cfg.backbone, cfg.seed, resume))
        return real_train(cfg, resume=resume)

    monkeypatch.setattr(trainer, "train", spy)
    assert _cli(tiny_devkit, out) == 0
    assert calls == [("da_resnet18", 1, run_dir / "last.pth")]
    assert json.loads((run_dir / "summary.json").read_text())["iterations"] == 2
    with open(out / "results.csv") as fh:
        assert [float(r["map"]) for r in csv.DictReader(fh)] == [float(r["map"]) for r in rows]


@pytest.mark.slow
def test_run_interrupted_mid_training_resumes_exactly(tiny_devkit, tmp_path, monkeypatch):
    import ssd_da.engine.trainer as trainer
    from ssd_da.engine.checkpoint import load_checkpoint

    one = ("--backbones", "resnet18", "--seeds", "1", "--iters", "3", "ckpt_every=1", "log_every=1")
    ref, out = tmp_path / "ref", tmp_path / "cut"
    assert _cli(tiny_devkit, ref, *one) == 0  # uninterrupted

    real_step, steps = trainer.train_step, {"n": 0}

    def killed_at_third_step(*args, **kwargs):
        steps["n"] += 1
        if steps["n"] == 3:
            raise KeyboardInterrupt  # as if the machine went away mid-run
        return real_step(*args, **kwargs)

    monkeypatch.setattr(trainer, "train_step", killed_at_third_step)
    assert _cli(tiny_devkit, out, *one) == 130  # an abrupt stop: exit 130, no traceback
    run_dir = out / "resnet18" / "seed0"
    first = load_checkpoint(run_dir / "last.pth")
    assert first["iteration"] == 2 and first["timing"]["images"] == 2 * 2
    assert not (run_dir / "summary.json").exists()

    monkeypatch.setattr(trainer, "train_step", real_step)
    calls, real_train = [], trainer.train

    def spy(cfg, resume=None):
        calls.append(resume)
        return real_train(cfg, resume=resume)

    monkeypatch.setattr(trainer, "train", spy)
    assert _cli(tiny_devkit, out, *one) == 0
    assert calls == [run_dir / "last.pth"]
    log = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines()]
    ref_log = [json.loads(x) for x in (ref / "resnet18/seed0/log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in log if "loss" in r] == [1, 2, 3]
    assert [r["loss"] for r in log if "loss" in r] == [r["loss"] for r in ref_log if "loss" in r]
    with open(out / "results.csv") as fh, open(ref / "results.csv") as gh:
        row, ref_row = next(csv.DictReader(fh)), next(csv.DictReader(gh))
    assert row["map"] == ref_row["map"]
    # Speed and wall time cover the whole run (both sessions), not only the resumed part.
    summary = json.loads((run_dir / "summary.json").read_text())
    assert float(row["train_images_per_s"]) == pytest.approx(summary["train_images_per_s"])
    assert summary["train_images_per_s"] > 0 and summary["wall_time_s"] > 0
    timing = load_checkpoint(run_dir / "last.pth")["timing"]
    assert timing["images"] == 3 * 2  # 3 iterations of batch 2, over two sessions
    # The second session added its time to the first's rather than starting from zero.
    assert timing["train_s"] > first["timing"]["train_s"] > 0
    assert timing["wall_s"] > first["timing"]["wall_s"] > 0
    assert summary["train_images_per_s"] == pytest.approx(6 / timing["train_s"])
    assert summary["wall_time_s"] >= timing["wall_s"]


def test_cli_rejects_options_the_runner_owns(tmp_path, capsys):
    base = ["--backbones", "resnet18", "--output-dir", str(tmp_path)]
    cases = [(["--backbone", "resnet18", *base], "--backbone is set by the runner"),
             (["--seed", "1", *base], "--seeds or --seed-list"),
             (["--resume", "x.pth", *base], "resumes interrupted runs"),
             (["--backbones", "resnet18"], "--output-dir DIR is required"),
             ([*base, "--suite", "order"], "exactly one of --suite"),
             ([*base, "--seeds", "2", "--seed-list", "1,2"], "not both"),
             (["--suite", "attention", "--depths", "18,20", "--output-dir", str(tmp_path)],
              "valid depths"),
             ([*base, "backbone=resnet50"], "set by the runner")]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exc:
            ablate_tool.main(argv)
        assert exc.value.code == 2 and message in capsys.readouterr().err


def test_existing_run_with_other_settings_is_refused(tmp_path):
    from ssd_da.config import save_config

    spec = plan_runs(load_config(None, ["lr=0.01"]), ["resnet18"], [0], tmp_path)[0]
    assert run_state(spec) == ("new", None)
    spec.out_dir.mkdir(parents=True)
    save_config(load_config(None, ["lr=0.02", "workers=9"]), spec.out_dir / "config.yaml")
    with pytest.raises(ValueError, match=r"lr: saved 0.02, now 0.01"):
        run_state(spec)
    with pytest.raises(ValueError, match="other settings"):  # nor reported (--report-only)
        collect_records([spec], num_classes=2)
    (spec.out_dir / "summary.json").write_text(json.dumps({"iterations": 5}))
    save_config(spec.cfg, spec.out_dir / "config.yaml")
    with pytest.raises(ValueError, match="more than --iters"):
        run_state(plan_runs(load_config(None, ["lr=0.01", "iters=4"]), ["resnet18"], [0], tmp_path)[0])


def test_saved_config_without_a_newer_key_counts_as_its_default(tmp_path):
    # A config.yaml written before attention_init existed: that run started its attention
    # modules the default way, so an identity-start suite must not reuse (or report) it.
    import yaml

    # Not given, attention_init is "auto": "identity" on the default pretrained trunk,
    # "default" from scratch; plan_runs resolves it as training does.
    for k, (given, state) in enumerate(((["attention_init=default"], ("new", None)),
                                        (["attention_init=identity"], None),
                                        ([], None), (["pretrained=none"], ("new", None)))):
        spec = plan_runs(load_config(None, given), ["da_resnet18"], [0], tmp_path / str(k))[0]
        assert spec.cfg.attention_init == ("identity" if state is None else "default")
        spec.out_dir.mkdir(parents=True)
        old = {k: v for k, v in spec.cfg.to_dict().items() if k != "attention_init"}
        (spec.out_dir / "config.yaml").write_text(yaml.safe_dump(old))
        if state is not None:
            assert run_state(spec) == state
        else:
            with pytest.raises(ValueError,
                               match=r"attention_init: saved 'default' \(not recorded\), now "
                                     r"'identity'"):
                run_state(spec)


# ---------------------------------------------------------------- one subprocess per GPU
FAKE_TRAIN = textwrap.dedent("""
    import json, os, sys, yaml
    cfg = yaml.safe_load(open(sys.argv[sys.argv.index("--config") + 1]))
    print("argv", sys.argv[1:], "gpu", os.environ["CUDA_VISIBLE_DEVICES"])
    if cfg["backbone"] == "da_resnet18" and cfg["seed"] == 1:
        sys.exit(3)  # tools/train.py's status for a non-finite loss
    out = cfg["output_dir"]
    m = 0.5 + 0.1 * cfg["seed"] + (0.05 if cfg["backbone"].startswith("da") else 0.0)
    with open(os.path.join(out, "log.jsonl"), "a") as fh:
        fh.write(json.dumps({"iter": cfg["iters"], "map": m, "ap": {"x": m}}) + "\\n")
    json.dump({"iterations": cfg["iters"], "final_map": m, "train_images_per_s": 1.0,
               "peak_memory_mb": 10.0, "wall_time_s": 2.0}, open(os.path.join(out, "summary.json"), "w"))
""")


def test_gpu_queue_runs_the_training_module_per_run(tmp_path, monkeypatch, fake_trainer):
    import ssd_da.experiments.ablate as ablate_module

    monkeypatch.setattr(ablate_module, "visible_gpus", lambda: ["0", "1"])  # two GPUs pretended
    fake_trainer(FAKE_TRAIN)
    cfg = load_config(None, ["iters=7", "classes=[x]", "lr=0.004", "amp=true"])
    specs = plan_runs(cfg, ["resnet18", "da_resnet18"], [0, 1, 2], tmp_path / "runs")
    (specs[5].out_dir).mkdir(parents=True)
    (specs[5].out_dir / "last.pth").write_bytes(b"")  # da_resnet18/seed2 was interrupted
    outcomes = run_suite(specs, gpus=["0", "1"])
    assert [o.status for o in outcomes] == ["trained"] * 3 + ["diverged", "trained", "trained"]
    logs = {s.name: (s.out_dir / "train.log").read_text() for s in specs}
    assert {re.search(r"gpu (\d)", t).group(1) for t in logs.values()} <= {"0", "1"}
    assert "--resume" in logs["da_resnet18/seed2"] and "--resume" not in logs["resnet18/seed2"]
    # tools/train.py gets the run's exact resolved config through --config.
    from ssd_da.config import resolve_config

    args = ablate_tool.get_args_parser().parse_args(["--config", str(specs[5].out_dir / "config.yaml")])
    assert resolve_config(args) == specs[5].cfg
    paths = write_reports(specs, outcomes, tmp_path / "runs", ["x"],
                          measure=lambda b, n: (1000 + 20 * b.startswith("da"), 2 * 10**9))
    md = _md_rows(paths["md"].read_text())
    assert md["ResNet18"][2:4] == ["60.00 ± 10.00", "3"]
    assert md["DA-ResNet18"][2:5] == ["65.00 ± 14.14", "2", "+5.00 [+5.00, +5.00]"]
    assert "da_resnet18/seed1: diverged" in paths["md"].read_text()
    assert run_suite(specs[:1], gpus=["0"])[0].status == "skipped"
    other = plan_runs(cfg, ["resnet18"], [0], tmp_path / "other")
    monkeypatch.setattr(ablate_module, "TRAIN_MODULE", "no_such_training_module")
    failed = run_suite(other, gpus=["0"])[0]  # python: "No module named ...", status 1
    assert failed.status == "failed" and "exit status 1" in failed.message
    with pytest.raises(ValueError, match="cannot be combined with --gpus"):
        run_suite(plan_runs(load_config(None, ["device=cuda:1"]), ["resnet18"], [0], tmp_path), ["0"])


def test_describe_reports_the_weights_actually_used():
    from ssd_da.config import load_config
    from ssd_da.experiments.results import describe

    cfg = load_config(None, ["pretrained=IMAGENET1K_V1", "iters=10"])
    assert "pretrained 'IMAGENET1K_V1'." in describe(cfg, ["resnet18"], [0], ["IMAGENET1K_V1"])[0]
    line = describe(cfg, ["resnet18", "da_resnet18"], [0],
                    ["IMAGENET1K_V1", "none (IMAGENET1K_V1 unreachable)"])[0]
    assert line.endswith("pretrained 'IMAGENET1K_V1' asked, backbone weights used: IMAGENET1K_V1 "
                         "in 1 run(s); none (IMAGENET1K_V1 unreachable) in 1 run(s).")
    # The attention init each run started with: "auto" resolved as training resolves it.
    assert describe(cfg, ["da_resnet18"], [0])[2].startswith("- attention_init 'identity' (")
    scratch = load_config(None, ["pretrained=none"])
    assert describe(scratch, ["da_resnet18"], [0])[2].startswith("- attention_init 'default' (")
