"""--tensorboard: the tags of each log record, the data-wait share, and a run killed after its
checkpoint and resumed, whose events (read back with TensorBoard's own reader) hold every step
exactly once, with the log's values."""
from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ssd_da.cli import ablate as ablate_tool
from ssd_da.config import load_config, resolve_config
from ssd_da.data.demo import DEMO_CLASSES
from ssd_da.engine.state import DataWait
from ssd_da.engine.runlog import read_run_log
from ssd_da.engine.tensorboard import TENSORBOARD_DIR, TensorBoardScalars, scalars_of
from ssd_da.experiments.ablate import plan_runs, run_state


def test_tags_of_training_and_evaluation_records():
    train = {"iter": 20, "classification": 1.5, "bbox_regression": 0.5, "loss": 2.0, "lr": 1e-3,
             "images_per_s": 12.5, "data_wait": 0.25}
    assert scalars_of(train) == {"train/classification": 1.5, "train/bbox_regression": 0.5,
                                 "train/loss": 2.0, "train/lr": 1e-3, "train/images_per_s": 12.5,
                                 "train/data_wait": 0.25}
    evaluation = {"iter": 40, "map": 0.5, "ap": {"cat": 0.75, "dog": math.nan},
                  "eval_images_per_s": 30.0, "coco": {"AP50": 0.6, "AP": None}}
    # A class without ground truth (NaN AP) and a missing metric have no point on a curve.
    assert scalars_of(evaluation) == {"eval/map": 0.5, "eval/ap_cat": 0.75,
                                      "eval/images_per_s": 30.0, "eval/coco_AP50": 0.6}


def test_data_wait_counts_only_the_wait_for_batches():
    def slow_loader():
        for i in range(3):
            time.sleep(0.05)  # the loader's work: waited for
            yield i

    waits = DataWait()
    start = time.perf_counter()
    for _ in waits.timed(slow_loader()):
        time.sleep(0.1)  # the training step: not a wait
    total = time.perf_counter() - start
    assert 0.15 <= waits.seconds < 0.15 + 0.05  # three waits of 50 ms (and some overhead)
    assert waits.seconds / total == pytest.approx(0.15 / 0.45, abs=0.05)


def _events(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar event in ``folder``, (step, value) per tag in file order; TensorBoard's
    reader with its clean-up of out-of-order steps turned off, so that a step written twice
    would show twice."""
    acc = EventAccumulator(str(folder), purge_orphaned_data=False)
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_reset_replaces_the_events_with_the_log(tmp_path):
    scalars = TensorBoardScalars(tmp_path / "tb")
    scalars.reset([{"iter": 1, "loss": 3.0}])
    for it in (2, 3):
        scalars.write({"iter": it, "loss": 3.0 - it})
    assert _events(tmp_path / "tb")["train/loss"] == [(1, 3.0), (2, 1.0), (3, 0.0)]
    scalars.reset([{"iter": 1, "loss": 3.0}])  # resumed from a checkpoint at iteration 1
    scalars.write({"iter": 2, "loss": 0.5})
    scalars.close()
    assert _events(tmp_path / "tb")["train/loss"] == [(1, 3.0), (2, 0.5)]
    with pytest.raises(RuntimeError, match="before reset"):
        TensorBoardScalars(tmp_path / "x").write({"iter": 1, "loss": 1.0})


@pytest.mark.slow
def test_resumed_run_continues_its_curves_without_duplicate_steps(tiny_devkit, tmp_path,
                                                                  monkeypatch):
    import ssd_da.engine.trainer as trainer

    cfg = load_config(None, [f"{k}={json.dumps(v)}" for k, v in {
        "data_root": str(tiny_devkit), "classes": list(DEMO_CLASSES), "backbone": "resnet18",
        "train_split": "voc07_trainval", "test_split": "voc07_test", "pretrained": "none",
        "batch_size": 2, "iters": 4, "lr_steps": [3], "warmup_iters": 1, "eval_every": 0,
        "ckpt_every": 2, "log_every": 1, "workers": 0, "eval_batch_size": 4,
        "output_dir": str(tmp_path / "run"), "tensorboard": True}.items()])
    real_step, steps = trainer.train_step, {"n": 0}

    def killed_at_fourth_step(*args, **kwargs):
        steps["n"] += 1
        if steps["n"] == 4:
            raise KeyboardInterrupt  # after step 3 was logged, past the checkpoint at 2
        return real_step(*args, **kwargs)

    monkeypatch.setattr(trainer, "train_step", killed_at_fourth_step)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(cfg)
    folder = tmp_path / "run" / TENSORBOARD_DIR
    assert [s for s, _ in _events(folder)["train/loss"]] == [1, 2, 3]  # flushed as logged

    monkeypatch.setattr(trainer, "train_step", real_step)
    trainer.train(cfg, resume=tmp_path / "run" / "last.pth")
    events, log = _events(folder), read_run_log(tmp_path / "run" / "log.jsonl")
    train_log = [r for r in log if "loss" in r]
    for key in ("loss", "classification", "bbox_regression", "lr", "images_per_s", "data_wait"):
        # float32 in the event files
        assert [s for s, _ in events[f"train/{key}"]] == [1, 2, 3, 4], key
        assert [v for _, v in events[f"train/{key}"]] == pytest.approx(
            [r[key] for r in train_log], rel=1e-6), key
    assert all(0.0 <= v <= 1.0 for _, v in events["train/data_wait"])
    final = [r for r in log if "map" in r][-1]
    assert events["eval/map"] == [(4, pytest.approx(final["map"], rel=1e-6))]
    assert "eval/images_per_s" in events and "eval/coco_AP50" in events


def test_tensorboard_option_reaches_every_run_and_reuses_finished_ones(tmp_path):
    from ssd_da.config import save_config

    args = ablate_tool.get_args_parser().parse_intermixed_args(
        ["--backbones", "resnet18", "--output-dir", str(tmp_path), "--tensorboard", "iters=5"])
    spec = plan_runs(resolve_config(args), ["resnet18"], [0], tmp_path)[0]
    assert spec.cfg.tensorboard is True
    # A run trained without --tensorboard learned the same thing: it is reused, not refused.
    spec.out_dir.mkdir(parents=True)
    save_config(dataclasses.replace(spec.cfg, tensorboard=False), spec.out_dir / "config.yaml")
    (spec.out_dir / "summary.json").write_text(json.dumps({"iterations": 5}))
    assert run_state(spec) == ("done", None)


def test_overwrite_deletes_the_events_with_the_run(tmp_path):
    from ssd_da.engine.run_folder import clear_run

    (tmp_path / TENSORBOARD_DIR).mkdir()
    (tmp_path / TENSORBOARD_DIR / "events.out.tfevents.1").write_bytes(b"old run")
    (tmp_path / "log.jsonl").write_text("")
    (tmp_path / "notes.txt").write_text("the user's")
    clear_run(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
