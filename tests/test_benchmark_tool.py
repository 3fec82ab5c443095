"""tools/benchmark.py subcommands run on the CPU with tiny sizes, so that they cannot rot; the
figures themselves go to docs/benchmarks.md, never into assertions."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from ssd_da.cli import benchmark
from ssd_da.data.demo import ensure_demo_dataset

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def devkit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bench_demo")
    ensure_demo_dataset(root, num_train=6, num_test=4, seed=2)
    return root / "VOCdevkit"


def _run(argv: list[str], doc: Path) -> str:
    args = benchmark.get_args_parser().parse_args(["--doc", str(doc), *argv])
    benchmark.run(args)
    return doc.read_text()


def test_loader_table_has_every_pipeline(devkit: Path, tmp_path: Path) -> None:
    text = _run(["loader", "--data-root", str(devkit), "--resize", "80x60", "--images", "4", "--repeats", "1"],
                tmp_path / "b.md")
    section = text.split("<!-- benchmark:loader -->")[1].split("<!-- /benchmark:loader -->")[0]
    for name in ("albumentations", "fast", "fast-uint8", "torchvision-v2", "decode-floor"):
        row = next(line for line in section.splitlines() if line.startswith(f"| {name} |"))
        rates = [float(cell) for cell in row.strip("|").split("|")[-2:]]
        assert all(rate > 0 for rate in rates), row
    assert "4 images of" in section and "80x60" in section


def test_memory_table_shows_the_saving(tmp_path: Path) -> None:
    text = _run(["memory", "--modules", "da,se", "--backbones", ""], tmp_path / "b.md")
    rows = {line.split("|")[1].strip(): line.split("|")[2:4] for line in text.splitlines()
            if line.startswith("| da |") or line.startswith("| se |")}
    before, after = (float(v) for v in rows["da"])
    assert before > 1.9 and after < 1.1  # DA: x and x * s before, x alone now
    assert [float(v) for v in rows["se"]] == pytest.approx([1.0, 1.0], abs=0.01)


def test_metric_section_runs_on_one_core(tmp_path: Path) -> None:
    text = _run(["metric", "--images", "50", "--repeats", "1"], tmp_path / "b.md")
    section = text.split("<!-- benchmark:metric -->")[1].split("<!-- /benchmark:metric -->")[0]
    assert "50 images, 20 classes, 5000 detections" in section and "- one core: " in section
    assert float(section.split("**median ")[1].split(" s**")[0]) > 0


@pytest.mark.slow
def test_model_table_has_train_and_inference_rows(tmp_path: Path) -> None:
    text = _run(["model", "--backbones", "resnet18", "--batch-size", "2", "--eval-batch-size", "2",
                 "--steps", "1", "--warmup", "0", "--device", "cpu"], tmp_path / "b.md")
    rows = _rows(_section(text, "model"), "resnet18")
    assert [r[1] for r in rows] == ["train", "inference"]
    assert all(float(r[3]) > 0 and r[5] == "n/a" for r in rows)


def _section(text: str, name: str) -> str:
    return text.split(f"<!-- benchmark:{name} -->")[1].split(f"<!-- /benchmark:{name} -->")[0]


def _rows(section: str, first: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in section.splitlines()
            if line.startswith(f"| {first} |")]


@pytest.mark.slow
def test_train_table_has_ours_torchvision_and_end_to_end_rows(devkit: Path, tmp_path: Path) -> None:
    text = _run(["train", "--device", "cpu", "--backbones", "resnet18", "--tv", "tv-ssd-our-trunk",
                 "--tv-backbone", "resnet18", "--batch-size", "2", "--steps", "1", "--warmup", "0",
                 "--workers", "0", "--data-root", str(devkit)], tmp_path / "b.md")
    section = _section(text, "train")
    ours, theirs = _rows(section, "ours"), _rows(section, "tv-ssd-our-trunk")
    assert [r[2] for r in ours] == [r[2] for r in theirs] == ["network only", "end to end"]
    assert all(float(r[4]) > 0 and r[6] == "n/a" for r in ours + theirs)
    loader = _rows(section, "loader alone")
    assert len(loader) == 1 and loader[0][1] == "0 workers" and float(loader[0][4]) > 0
    # The ratio line is computed from the two rows above it.
    ratio = float(section.split("SSD class on the resnet18 trunk (network only")[1].split("): ")[1].split("x")[0])
    assert ratio == pytest.approx(float(ours[0][4]) / float(theirs[0][4]), rel=0.02)  # 3 digits each, the ratio 2 decimals
    assert "torch " in section and "date (UTC)" in section and str(tmp_path) not in section


@pytest.mark.slow
def test_eval_table_times_a_whole_evaluation(devkit: Path, tmp_path: Path) -> None:
    text = _run(["eval", "--device", "cpu", "--backbones", "resnet18", "--batch-size", "2", "--steps", "1",
                 "--warmup", "0", "--workers", "0", "--eval-images", "6", "--data-root", str(devkit)],
                tmp_path / "b.md")
    rows = _rows(_section(text, "eval"), "resnet18")
    assert rows[0][1] == "network only (batch 2)" and float(rows[0][2]) > 0
    assert rows[1][1].startswith("whole evaluation of 6 images")
    seconds = float(rows[1][3].split(" s")[0])
    assert float(rows[1][2]) == pytest.approx(6 / seconds, rel=0.015)  # both rounded to 3 digits


def test_overheads_are_worked_out_from_the_rows() -> None:
    from ssd_da.bench import throughput as bt
    from ssd_da.bench.train_eval import overheads

    def row(subject: str, backbone: str, rate: float) -> bt.Row:
        return bt.Row(subject, backbone, "network only", "bf16, channels_last", bt.Result(rate, 1.0, None))

    lines = overheads([row("ours", "resnet50", 1000.0), row("ours", "da_resnet50", 800.0),
                                   row("tv-ssd-our-trunk", "da_resnet50", 200.0), row("ours", "se_resnet18", 5.0)])
    assert lines[0].startswith("- da_resnet50 over resnet50 (network only, bf16, channels_last): +25.0%")
    assert "ours / torchvision's SSD class on the da_resnet50 trunk" in lines[1] and ": 4.00x" in lines[1]
    assert len(lines) == 2  # se_resnet18 has no plain resnet18 row to compare with


def test_gpu_suite_fails_fast_naming_what_is_missing(monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture) -> None:
    from ssd_da.bench import suite as bench_suite

    monkeypatch.setattr(bench_suite, "SUITE_PACKAGES", (("numpy", "numpy"), ("no_such_module_x", "no-such-pkg")))
    with pytest.raises(SystemExit) as exc:
        benchmark.main(["--no-write", "gpu-suite"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "benchmark.py: error: gpu-suite needs no-such-pkg" in err and "numpy" not in err.split("needs")[1]
    monkeypatch.setattr(bench_suite, "SUITE_PACKAGES", (("numpy", "numpy"),))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exc:
        benchmark.main(["--no-write", "gpu-suite"])
    assert exc.value.code == 2
    assert "gpu-suite measures a CUDA GPU and none is visible here" in capsys.readouterr().err


def _tiny_suite_args(devkit: Path, doc: Path, *extra: str) -> list[str]:
    return ["--doc", str(doc), "gpu-suite", "--device", "cpu", "--batch-size", "2", "--steps", "1",
            "--warmup", "0", "--workers", "0", "--eval-images", "4", "--data-root", str(devkit), *extra]


@pytest.mark.slow
def test_gpu_suite_records_a_failing_part_and_writes_each_part_as_it_ends(
        devkit: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The suite's orchestration on the CPU (the GPU check patched out; tiny parts): a part that
    raises is a FAILED row with its error and the parts after it still run; the section is
    written after every part, so a later crash keeps the earlier rows; a part whose share no
    longer fits is skipped by name; the exit status says the suite is incomplete."""
    from ssd_da.bench import suite as bench_suite

    tiny = dict(backbones="resnet18", tv="tv-ssd-our-trunk", tv_backbone="resnet18", modes="network")
    monkeypatch.setattr(bench_suite, "SUITE_PARTS", (
        bench_suite.Part("network", 100, "train", tiny),
        bench_suite.Part("evaluation", 100, "eval", dict(backbones="resnet18")),
        bench_suite.Part("other", 100, "train", dict(tiny, tv="")),
        bench_suite.Part("too long", 10 ** 6, "train", dict(tiny, backbones="da_resnet18"))))
    monkeypatch.setattr(bench_suite, "_eval_units", lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    written: list[str] = []
    real_write = benchmark.write_section
    monkeypatch.setattr(benchmark, "write_section", lambda doc, name, body: written.append(body) or
                        real_write(doc, name, body))
    args = benchmark.get_args_parser().parse_args(_tiny_suite_args(devkit, tmp_path / "b.md"))
    assert benchmark.run(args) == 1
    section = _section((tmp_path / "b.md").read_text(), "gpu-suite")
    units = [r[:3] for r in _rows(section, "network") + _rows(section, "evaluation") + _rows(section, "other")]
    assert units == [["network", "ours, resnet18", "PASS"], ["network", "tv-ssd-our-trunk", "PASS"],
                     ["evaluation", "(the part)", "FAILED"], ["other", "ours, resnet18", "PASS"]]
    assert "RuntimeError: boom" in section and "parts skipped for time: too long" in section
    assert [r[0] for r in _rows(section, "ours")] == ["ours", "ours"]  # network and other, measured
    # Written after each of the three parts that ran, then once more at the end: the first
    # holds the first part's rows and nothing of the later parts.
    assert len(written) == 4 and "| network | ours, resnet18 | PASS" in written[0]
    assert "| other |" not in written[0] and "| evaluation | (the part) | FAILED" in written[1]


def test_a_part_stops_between_units_when_its_time_is_up(capsys: pytest.CaptureFixture) -> None:
    import time

    from ssd_da.bench import smoke as bench_smoke

    def slow() -> tuple[str, str]:
        time.sleep(0.2)
        return "0", "slept"

    def broken() -> tuple[str, str]:
        raise ValueError("bad unit")

    start = time.perf_counter()
    results = bench_smoke.run_units("p", [("broken", broken), ("slow", slow), ("next", slow), ("last", slow)],
                                     deadline=start + 0.3)
    # After "slow" (>= 0.2 s, the longest unit so far), at >= start + 0.2, another 0.2 s would
    # end past the deadline: the rest are skipped by name. An exception is a FAILED row.
    assert [(r.name, r.status) for r in results] == [("broken", "FAILED"), ("slow", "PASS"),
                                                     ("next", "SKIPPED (time)"), ("last", "SKIPPED (time)")]
    assert results[0].detail == "ValueError: bad unit" and results[1].syncs == "0"


def test_suite_parts_take_the_command_line_options_they_are_not_about(devkit: Path) -> None:
    from ssd_da.bench import suite as bench_suite

    def part_values(*flags: str) -> dict[str, tuple]:
        args = benchmark.get_args_parser().parse_args(["gpu-suite", *flags])
        return {p.name: (a.amp, a.channels_last, a.compile) for p in bench_suite.SUITE_PARTS
                for a in [bench_suite._part_args(args, p)] if p.kind == "train"}

    default = part_values()
    assert default["ours vs torchvision, network only"] == (True, True, False)
    assert default["NCHW"] == (True, False, False) and default["compiled"] == (True, True, True)
    given = part_values("--no-channels-last", "--compile", "--no-amp")
    assert given["ours vs torchvision, network only"] == given["other attention modules"] == (False, False, True)
    assert sum(p.seconds for p in bench_suite.SUITE_PARTS) <= bench_suite.SUITE_BUDGET_S


def test_host_syncs_are_counted_on_the_cpu_as_on_cuda() -> None:
    from ssd_da.bench import smoke as bench_smoke

    host = torch.ones(3)  # a loader's CPU target: reading it is no sync
    with bench_smoke.counting_syncs(torch.device("cpu"), [host]) as syncs:
        device_value = torch.ones(2) * 2
        device_value.sum().item()
        host.sum().item()
    assert syncs == [1]


def test_gpu_suite_names_a_missing_package_before_importing_it(tmp_path: Path) -> None:
    """cv2 hidden, as on a bare GPU machine: the check names it (and what needs it) with status
    2, not a traceback from an import (on main before issue 20: ModuleNotFoundError from
    ssd_da/data/decode.py, status 1)."""
    import os
    import subprocess

    (tmp_path / "cv2").mkdir()
    (tmp_path / "cv2" / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'cv2'\", name='cv2')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "benchmark.py"), "--no-write", "gpu-suite"],
                          capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "gpu-suite needs opencv-python-headless (No module named 'cv2')" in proc.stderr


@pytest.mark.slow
def test_gpu_suite_dry_run_runs_every_part_on_the_cpu_and_writes_nothing() -> None:
    """The command as a user types it: every part at toy sizes on the CPU, every unit passing,
    exit status 0, and docs/ untouched."""
    import subprocess

    from ssd_da.bench import suite as bench_suite

    docs = {p: p.read_bytes() for p in sorted((ROOT / "docs").iterdir()) if p.is_file()}
    proc = subprocess.run([sys.executable, "tools/benchmark.py", "gpu-suite", "--dry-run"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    section = proc.stdout.split("## gpu-suite:")[1]
    count = int(section.split(" of ")[0].split("**")[1])
    assert f"**{count} of {count} units passed**." in section and count >= len(bench_suite.SUITE_PARTS)
    for part in bench_suite.SUITE_PARTS:
        assert f"\n| {part.name} |" in section, part.name
    assert "| smoke | train da_resnet18, amp, channels_last | PASS |" in section
    assert {p: p.read_bytes() for p in sorted((ROOT / "docs").iterdir()) if p.is_file()} == docs


TINY_STAGES = {"layer1": (64, 9), "layer4": (128, 3)}  # the table's plumbing, not its figures


def test_modules_stages_table_has_before_after_and_floors(tmp_path: Path, monkeypatch) -> None:
    from ssd_da.bench import floors as bench_floors

    monkeypatch.setattr(bench_floors, "STAGES", TINY_STAGES)
    text = _run(["modules", "--stages", "--stage-names", "layer1,layer4", "--before", "--repeats", "2",
                 "--batch-size", "2", "--clock", "cpu"], tmp_path / "b.md")
    section = _section(text, "modules-stages")
    assert "<!-- benchmark:modules -->" not in text  # its own section, beside the LGA comparison's
    for stage in ("layer1 2x64x9x9", "layer4 2x128x3x3"):
        rows = {r[1]: r for r in _rows(section, stage)}
        assert list(rows) == list(bench_floors.MODULES)
        before, after, floor = rows["da"][2], rows["da"][3], rows["da"][5]
        assert float(before) > 0 and float(after) > 0 and floor.startswith("7 R + 2 W = ")
        assert rows["none"][2] == "" and rows["se"][5].startswith("5 R + 2 W")
    assert "layer1, forward + backward over SE's: da/se" in section and "process CPU time" in section


@pytest.mark.slow
def test_modules_stages_steps_compare_before_and_after_networks(tmp_path: Path, monkeypatch) -> None:
    from ssd_da.bench import floors as bench_floors

    monkeypatch.setattr(bench_floors, "STAGES", TINY_STAGES)
    text = _run(["modules", "--stages", "--stage-names", "layer4", "--modules", "none,da", "--repeats", "1",
                 "--batch-size", "2", "--step", "--step-backbones", "resnet18,before:da_resnet18",
                 "--step-rounds", "1"], tmp_path / "b.md")
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith("| resnet18 |") or line.startswith("| before:da_resnet18 |")]
    steps = {r[0]: r for r in rows}
    assert float(steps["resnet18"][2]) == 1.0
    assert float(steps["before:da_resnet18"][1]) > 0  # built with the pre-issue modules


def test_gpu_suite_part_of_the_module_table_runs(monkeypatch) -> None:
    # On the CPU here, float32, tiny stages, aot_eager for torch.compile: the part's plumbing.
    import argparse

    from ssd_da.bench import floors as bench_floors
    from ssd_da.bench import suite as bench_suite

    monkeypatch.setattr(bench_floors, "STAGES", TINY_STAGES)
    args = argparse.Namespace(batch_size=2, amp=False, dry_run=False, compile_backend="aot_eager")
    report = bench_suite.SuiteReport()
    units = bench_suite.modules_floor_units(args, torch.device("cpu"), report)
    assert [name for name, _ in units] == ["eager, layer1", "eager, layer4", "compiled, layer1"]
    for _, run in units:
        run()
    assert len(report.module_rows) == 2 * len(bench_floors.MODULES) + 4  # then none/se/da/cbam compiled
    lines = bench_suite._module_table(args, torch.device("cpu"), report)
    assert any(line.startswith("- layer1, forward + backward over SE's") for line in lines)
