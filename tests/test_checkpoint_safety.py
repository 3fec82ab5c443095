"""Opening a checkpoint never runs code (issue 21, point 1): every path that opens a .pth reads
it with ``torch.load(weights_only=True)``, refuses a pickled payload with a message naming the
file, and still opens the checkpoints earlier versions wrote. The payload tests failed on the
code before the fix: each ran the payload (the marker file appeared) and most exited 0."""
from __future__ import annotations

import ast
import json
import logging
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from ssd_da.cli import detect as detect_tool
from ssd_da.cli import eval_voc as eval_tool
from ssd_da.cli import gradcam as gradcam_tool
from ssd_da.cli import train as train_tool
from ssd_da.engine.checkpoint import (CheckpointError, load_checkpoint, rng_states,
                                      save_checkpoint, set_rng_states)

ROOT = Path(__file__).resolve().parents[1]


class Payload:
    """Pickles as a call of ``os.system``: what a hostile .pth carries."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.fixture()
def hostile(tmp_path, untrained_checkpoint, tiny_classes) -> tuple[Path, Path]:
    """(a last.pth-shaped checkpoint whose ``config`` runs ``touch MARKER`` when unpickled
    unsafely, the marker's path). Its weights are real, so an unsafe loader gets all the way."""
    marker = tmp_path / "MARKER"
    state = torch.load(untrained_checkpoint("resnet18", tiny_classes), weights_only=True)
    state["config"] = {"payload": Payload(f"touch {marker}")}
    path = tmp_path / "run" / "last.pth"
    path.parent.mkdir()
    torch.save(state, path)
    return path, marker


def refused(text: str, path: Path) -> bool:
    return f"checkpoint {path} refused" in text and "posix.system" in text


def test_load_checkpoint_refuses_a_payload_naming_the_file(hostile):
    path, marker = hostile
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert refused(str(info.value), path) and not marker.exists()


def test_eval_voc_refuses_a_payload(hostile, tiny_devkit, capsys):
    path, marker = hostile
    args = eval_tool.get_args_parser().parse_args(
        ["--checkpoint", str(path), "--data-root", str(tiny_devkit), "--device", "cpu",
         "--workers", "0", "--no-coco"])
    assert eval_tool.run(args) == 2
    assert refused(capsys.readouterr().err, path) and not marker.exists()


def test_detect_refuses_a_payload(hostile, tiny_devkit, tmp_path, capsys):
    path, marker = hostile
    image = next((tiny_devkit / "VOC2007" / "JPEGImages").iterdir())
    args = detect_tool.get_args_parser().parse_args(
        [str(image), "--checkpoint", str(path), "--out", str(tmp_path / "dets"), "--device", "cpu"])
    assert detect_tool.run(args) == 2
    assert refused(capsys.readouterr().err, path) and not marker.exists()
    assert not (tmp_path / "dets").exists()


def test_gradcam_refuses_a_payload(hostile, tiny_devkit, tmp_path, capsys):
    path, marker = hostile
    image = next((tiny_devkit / "VOC2007" / "JPEGImages").iterdir())
    args = gradcam_tool.get_args_parser().parse_args(
        [str(image), "--checkpoint", str(path), "--out", str(tmp_path / "g.png"), "--device", "cpu"])
    assert gradcam_tool.run(args) == 2
    assert refused(capsys.readouterr().err, path) and not marker.exists()


def test_train_resume_refuses_a_payload(hostile, capsys):
    path, marker = hostile
    before = sorted(p.name for p in path.parent.iterdir())
    assert train_tool.main(["--resume", str(path), "--device", "cpu"]) == 2
    assert refused(capsys.readouterr().err, path) and not marker.exists()
    assert sorted(p.name for p in path.parent.iterdir()) == before  # nothing written


def test_ablate_resuming_a_run_refuses_a_payload(hostile, tiny_devkit, tiny_classes, tmp_path,
                                                 caplog):
    """The ablation runner resumes a run folder's last.pth: a hostile one there is refused and
    the run reported as failed, in-process and without running the payload."""
    from ssd_da.config import Config
    from ssd_da.experiments.ablate import plan_runs, run_suite

    path, marker = hostile
    base = Config(backbone="resnet18", data_root=str(tiny_devkit), train_split="voc07_trainval",
                  test_split="voc07_test", classes=list(tiny_classes), pretrained="none",
                  device="cpu", iters=2, batch_size=2, workers=0)
    (spec,) = plan_runs(base, ["resnet18"], [0], tmp_path / "suite")
    spec.out_dir.mkdir(parents=True)
    os.replace(path, spec.out_dir / "last.pth")
    with pytest.raises(CheckpointError, match="refused"):
        run_suite([spec])
    assert not marker.exists()


def test_every_torch_load_is_weights_only():
    """Every ``torch.load`` in the library and the tools passes ``weights_only=True`` (so
    tools/benchmark.py and the bench_* helpers, which open no checkpoint, stay that way)."""
    unsafe = []
    for file in [*(ROOT / "ssd_da").rglob("*.py"), *(ROOT / "tools").glob("*.py")]:
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                flag = {k.arg: k.value for k in node.keywords}.get("weights_only")
                if not (isinstance(flag, ast.Constant) and flag.value is True):
                    unsafe.append(f"{file.relative_to(ROOT)}:{node.lineno}")
    assert unsafe == []


def test_checkpoints_hold_only_plain_types(tmp_path):
    """What a last.pth holds needs no allow-listed global: RNG states included."""
    path = tmp_path / "rng.pth"
    save_checkpoint({"model": {}, "backbone": "resnet18", "rng": rng_states()}, path)
    assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == []


def test_earlier_checkpoints_with_numpy_rng_state_still_load(tmp_path):
    """Earlier versions saved numpy's state as an array: it loads, and restores exactly."""
    np.random.seed(7)
    random.seed(7)
    torch.manual_seed(7)
    old = {"python": random.getstate(), "numpy": np.random.get_state(),
           "torch": torch.get_rng_state()}
    expected = (np.random.rand(), random.random(), float(torch.rand(1)))
    path = tmp_path / "old.pth"
    torch.save({"model": {}, "backbone": "resnet18", "rng": old}, path)
    assert "numpy.ndarray" in torch.serialization.get_unsafe_globals_in_checkpoint(path)
    set_rng_states(load_checkpoint(path)["rng"])
    assert (np.random.rand(), random.random(), float(torch.rand(1))) == expected


def test_rng_states_round_trip_through_a_checkpoint(tmp_path):
    states = rng_states()
    expected = (np.random.rand(), np.random.randn(), random.random(), float(torch.rand(1)))
    path = tmp_path / "r.pth"
    save_checkpoint({"model": {}, "backbone": "resnet18", "rng": states}, path)
    set_rng_states(load_checkpoint(path)["rng"])
    assert (np.random.rand(), np.random.randn(), random.random(), float(torch.rand(1))) == expected


def test_a_folder_given_as_checkpoint_is_named_a_folder(tmp_path):
    with pytest.raises(CheckpointError, match="is a folder; give the .pth file in it"):
        load_checkpoint(tmp_path)
