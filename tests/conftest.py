"""What several test modules share: the repository root, a small synthetic VOC tree and untrained detector checkpoints.

Tests that train a detector (more than a step or two of a full SSD300) are marked
``@pytest.mark.slow``; ``python -m pytest -q -m "not slow"`` is the inner loop, CI runs all.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import pytest
import torch

from ssd_da.data.demo import DEMO_CLASSES, ensure_demo_dataset
from ssd_da.engine.checkpoint import save_checkpoint
from ssd_da.models.ssd import build_ssd

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_devkit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo generator's VOCdevkit with 8 trainval and 4 test images (seed 1), classes
    ``DEMO_CLASSES``: enough for a few batches of 2 and a quick evaluation."""
    root = tmp_path_factory.mktemp("tiny_demo")
    ensure_demo_dataset(root, num_train=8, num_test=4, seed=1)
    return root / "VOCdevkit"


@pytest.fixture(scope="session")
def tiny_classes() -> list[str]:
    return list(DEMO_CLASSES)


@pytest.fixture(scope="session")
def untrained_checkpoint(tmp_path_factory: pytest.TempPathFactory
                         ) -> Callable[[str, Sequence[str], int], Path]:
    """``make(backbone, class_names, seed)`` -> path of a checkpoint of a freshly initialised
    detector (``torch.manual_seed(seed)`` first), in the format ``load_detector`` reads. Its
    detections are arbitrary but deterministic: enough for the tools' plumbing."""
    made: dict[tuple, Path] = {}

    def make(backbone: str, class_names: Sequence[str], seed: int = 0) -> Path:
        key = (backbone, tuple(class_names), seed)
        if key not in made:
            torch.manual_seed(seed)
            model = build_ssd(backbone, num_classes=len(class_names) + 1)
            path = tmp_path_factory.mktemp("ckpt") / f"{backbone}.pth"
            save_checkpoint({"model": model.state_dict(), "backbone": backbone,
                             "class_names": list(class_names), "config": {},
                             "iteration": 0}, path)
            made[key] = path
        return made[key]

    return make


@pytest.fixture
def fake_trainer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[str], str]:
    """``install(source)`` -> module name: a stand-in for the training tool that the ablation
    runner's children run (``python -m <TRAIN_MODULE>``, ssd_da/experiments/ablate.py), written
    to a module on the children's PYTHONPATH, for this test only."""
    import os

    import ssd_da.experiments.ablate as ablate_module

    folder = tmp_path / "fake_trainer"
    folder.mkdir()
    path = os.pathsep.join(p for p in (str(folder), os.environ.get("PYTHONPATH")) if p)
    monkeypatch.setenv("PYTHONPATH", path)

    def install(source: str, name: str = "fake_train") -> str:
        (folder / f"{name}.py").write_text(source)
        monkeypatch.setattr(ablate_module, "TRAIN_MODULE", name)
        return name

    return install
