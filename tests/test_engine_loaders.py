"""The training loader's defaults: workers sized to the machine, pinned memory, persistent
workers with prefetch, and the one line at the start of training with what the loader alone
delivers."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch

from ssd_da.config import Config, load_config
from ssd_da.data.demo import DEMO_CLASSES
from ssd_da.data.transforms import build_train_transform
from ssd_da.data.voc import VOCDetection
from ssd_da.engine import loaders as engine_data


@pytest.mark.parametrize("cores, world, expected", [(16, 1, 15), (16, 2, 7), (2, 1, 1), (1, 1, 0), (3, 4, 0)])
def test_default_workers_are_the_cores_less_one_per_process(monkeypatch: pytest.MonkeyPatch,
                                                             cores: int, world: int, expected: int) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert engine_data.resolve_workers(-1, world) == expected
    assert engine_data.resolve_workers(3, world) == 3  # an explicit count is kept
    assert load_config().workers == -1


def test_negative_workers_other_than_minus_one_are_refused() -> None:
    from ssd_da.config_checks import validate_config

    with pytest.raises(ValueError, match=r"config field .workers. must lie in \[-1, inf\), got -2"):
        validate_config(load_config(None, ["workers=-2"]))


def _dataset(devkit: Path) -> VOCDetection:
    return VOCDetection(devkit, "voc07_trainval", list(DEMO_CLASSES),
                        transform=build_train_transform(300, output="uint8"))


def test_train_loader_pins_keeps_its_workers_and_prefetches(tiny_devkit: Path) -> None:
    loader = engine_data.make_train_loader(_dataset(tiny_devkit), 2, seed=0, start_iter=0, total_iters=3,
                                           workers=2, pin_memory=True)
    assert loader.num_workers == 2 and loader.pin_memory and loader.persistent_workers
    assert loader.prefetch_factor == engine_data.PREFETCH_BATCHES
    inline = engine_data.make_train_loader(_dataset(tiny_devkit), 2, 0, 0, 3, workers=0, pin_memory=False)
    assert inline.num_workers == 0 and not inline.persistent_workers
    images, _ = next(iter(inline))
    assert images.dtype == torch.uint8 and images.shape == (2, 3, 300, 300)  # a quarter of float32's bytes


def test_loader_rate_is_logged_without_touching_the_training_stream(
        tiny_devkit: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = load_config(None, ["batch_size=2", "workers=0"])
    state = torch.random.get_rng_state()
    with caplog.at_level(logging.INFO, logger="ssd_da.engine.loaders"):
        engine_data.log_loader_rate(_dataset(tiny_devkit), cfg)
    assert torch.equal(torch.random.get_rng_state(), state)
    [line] = [r.getMessage() for r in caplog.records if "data loader alone" in r.getMessage()]
    assert "(0 workers, batch 2)" in line and float(line.split(": ")[1].split(" images/s")[0]) > 0


def test_the_same_split_for_training_and_testing_warns(tiny_devkit, tiny_classes, caplog):
    cfg = Config(data_root=str(tiny_devkit), classes=list(tiny_classes),
                 train_split="voc07_test", test_split="voc07_test")
    with caplog.at_level(logging.WARNING):
        engine_data.build_datasets(cfg)
    (line,) = [r.getMessage() for r in caplog.records if "also training images" in r.getMessage()]
    assert line.startswith("!!! 4 of 4 test images (voc07_test) are also training images")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        engine_data.build_datasets(Config(data_root=str(tiny_devkit), classes=list(tiny_classes),
                              train_split="voc07_trainval", test_split="voc07_test"))
    assert "also training images" not in caplog.text
