"""tools/ablate.py (ssd_da/cli/ablate.py) beyond the suite itself (test_experiments_ablate.py):
COCO-format data, GPUs that are not there, and what it logs at INFO."""
from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from ssd_da.cli import ablate as ablate_tool
from ssd_da.cli import voc_to_coco
from ssd_da.config import load_config
from ssd_da.data.demo import DEMO_CLASSES, ensure_demo_dataset


@pytest.fixture(scope="module")
def demo_both(tmp_path_factory) -> tuple[Path, Path]:
    """A small demo VOC tree and its COCO conversion (same split names)."""
    root = tmp_path_factory.mktemp("cocodemo")
    ensure_demo_dataset(root, num_train=6, num_test=8, seed=4)
    voc, coco = root / "VOCdevkit", root / "coco"
    assert voc_to_coco.main(
        ["--voc-root", str(voc), "--coco-root", str(coco), "--splits", "voc07_trainval,voc07_test",
         "--classes", ",".join(DEMO_CLASSES)]) == 0
    return voc, coco



@pytest.mark.slow
def test_ablate_on_coco_format(demo_both, tmp_path: Path) -> None:
    _, coco = demo_both
    out = tmp_path / "abl"
    argv = ["--data-format", "coco", "--data-root", str(coco), "--train-split", "voc07_trainval",
            "--test-split", "voc07_test", "--iters", "2", "--batch-size", "2", "--workers", "0",
            "--backbones", "resnet18", "--seeds", "1", "--output-dir", str(out), "pretrained=none",
            "eval_every=0"]
    assert ablate_tool.main(argv) == 0
    with open(out / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 1 and {f"ap_{c}" for c in DEMO_CLASSES} <= set(rows[0])  # from the categories
    assert f"under {coco} (COCO format)" in (out / "results.md").read_text()
    log = [json.loads(x) for x in (out / "resnet18/seed0/log.jsonl").read_text().splitlines()]
    assert set(log[-1]["coco"]) >= {"AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large"}
    assert np.isfinite(float(rows[0]["map"]))


def test_ablate_refuses_gpus_that_are_not_there(tmp_path, monkeypatch):
    from ssd_da.config import load_config
    from ssd_da.experiments.ablate import plan_runs, run_suite

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    specs = plan_runs(load_config(None, ["iters=2"]), ["resnet18"], [0, 1], tmp_path / "runs")
    with pytest.raises(ValueError, match=r"--gpus 0,1: GPU\(s\) 1 not found; the visible CUDA "
                                         r"devices are 0"):
        run_suite(specs, gpus=["0", "1"])
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(ValueError, match="no CUDA device is visible here"):
        run_suite(specs, gpus=["0"])
    assert not (tmp_path / "runs").exists()  # nothing started


def test_ablate_meta_fallback_is_not_reported_at_info(caplog):
    from ssd_da.experiments.results import measure_detector

    with caplog.at_level(logging.INFO):
        params, flops = measure_detector.__wrapped__("resnet18", 3)
    assert params > 0 and flops > 0
    assert not [r for r in caplog.records if r.levelno >= logging.INFO and "meta" in r.getMessage()]
