"""No run is lost or mixed (issue 21, points 2, 3, 5 and 6): contradictory options are refused
before anything is touched, one run per folder at a time (an OS lock naming its holder), no
run ends "done" with non-finite weights, and a full disk says what happened. Each test failed
on the code before the fix (noted per test where the way it failed is worth knowing)."""
from __future__ import annotations

import errno
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ssd_da.cli import ablate as ablate_tool
from ssd_da.cli import train as train_tool
from ssd_da.engine.checkpoint import CheckpointWriteError, load_checkpoint, save_checkpoint
from ssd_da.engine.folder_lock import FolderLockedError, hold_folder_lock

ROOT = Path(__file__).resolve().parents[1]


def argv(devkit: Path, out: Path | None, classes: list[str], *extra: str) -> list[str]:
    """A 2-iteration resnet18 run on the tiny demo tree."""
    args = ["--backbone", "resnet18", "--data-root", str(devkit), "--device", "cpu", "--iters",
            "2", "--batch-size", "2", "--workers", "0", "--eval-every", "0"]
    if out is not None:
        args += ["--output-dir", str(out)]
    return [*args, *extra, "pretrained=none", "train_split=voc07_trainval",
            "test_split=voc07_test", f"classes={json.dumps(classes)}", "ckpt_every=1",
            "log_every=1", "lr_steps=[]", "warmup_iters=0", "eval_batch_size=4"]


def cli(args: list[str], capsys, caplog) -> tuple[int, str]:
    caplog.clear()
    with caplog.at_level(logging.INFO):
        code = train_tool.main(args)
    out = capsys.readouterr()
    return code, out.out + out.err + caplog.text


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tiny_devkit, tiny_classes, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("guard") / "run"
    assert train_tool.main(argv(tiny_devkit, out, tiny_classes)) == 0
    return out


# ---------------------------------------------------------------- 2: --resume X --overwrite
@pytest.mark.slow
def test_resume_with_overwrite_of_its_own_folder_is_refused(finished, tiny_devkit, tiny_classes,
                                                            capsys, caplog):
    """Before: the run resumed was deleted (best.pth, log.jsonl) and training carried on."""
    before = snapshot(finished)
    code, text = cli(argv(tiny_devkit, finished, tiny_classes, "--resume",
                          str(finished / "last.pth"), "--overwrite", "--iters", "3"), capsys, caplog)
    assert code == 2
    assert "--overwrite would delete the run being resumed" in text
    assert "drop --overwrite" in text and "drop --resume" in text
    assert snapshot(finished) == before


# ---------------------------------------------------------------- 3: one run per folder
def test_a_held_folder_refuses_a_second_run_naming_the_holder(tmp_path, tiny_devkit, tiny_classes,
                                                              capsys, caplog):
    out = tmp_path / "run"
    with hold_folder_lock(out):
        code, text = cli(argv(tiny_devkit, out, tiny_classes, "--overwrite"), capsys, caplog)
        assert code == 2
        assert f"--output-dir {out} is in use by another run (pid {os.getpid()} on host " \
               f"{socket.gethostname()}, started " in text
        assert sorted(p.name for p in out.iterdir()) == [".lock"]
    assert not out.exists()  # the lock created the folder; nothing else was put in it


def test_the_lock_of_a_killed_process_never_blocks(tmp_path):
    folder = tmp_path / "run"
    code = ("import sys, time; from ssd_da.engine.folder_lock import hold_folder_lock\n"
            "with hold_folder_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE,
                            text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(FolderLockedError, match=f"pid {proc.pid} on host"):
            with hold_folder_lock(folder):
                pass
    finally:
        proc.kill()  # SIGKILL: no clean-up runs; the .lock file stays behind
        proc.wait()
    assert (folder / ".lock").exists()
    with hold_folder_lock(folder):  # the kernel released the dead process's lock
        assert str(os.getpid()) in (folder / ".lock").read_text()
    assert not (folder / ".lock").exists()


def test_a_refused_lock_leaves_no_folder_and_a_file_is_named(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="exists and is not a folder"):
        with hold_folder_lock(tmp_path / "file" / "run"):
            pass
    with pytest.raises(RuntimeError):
        with hold_folder_lock(tmp_path / "a" / "b"):
            raise RuntimeError("a later check failed")
    assert not (tmp_path / "a").exists()


@pytest.mark.slow
def test_a_running_training_keeps_a_second_one_out(tmp_path, tiny_devkit, tiny_classes, capsys,
                                                   caplog):
    """Before: the second run (here with --overwrite) deleted the first one's files and both
    wrote log.jsonl and last.pth."""
    out = tmp_path / "run"
    first = argv(tiny_devkit, out, tiny_classes)
    first[first.index("--iters") + 1] = "400"
    proc = subprocess.Popen([sys.executable, str(ROOT / "tools" / "train.py"), *first],
                            stderr=subprocess.DEVNULL, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        deadline = time.monotonic() + 120
        while not (out / "log.jsonl").is_file():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        code, text = cli(argv(tiny_devkit, out, tiny_classes, "--overwrite"), capsys, caplog)
        assert code == 2 and f"is in use by another run (pid {proc.pid} on host" in text
        assert (out / "log.jsonl").is_file()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    assert proc.returncode == 75  # it saved and stopped (point 7)
    records = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    iters = [r["iter"] for r in records if "loss" in r]
    assert iters == list(range(1, len(iters) + 1))  # one run's records only


def test_a_held_suite_folder_refuses_a_second_suite(tmp_path, capsys):
    root = tmp_path / "suite"
    args = ablate_tool.get_args_parser().parse_intermixed_args(
        ["--backbones", "resnet18", "--seed-list", "0", "--output-dir", str(root), "--device",
         "cpu", "pretrained=none"])
    with hold_folder_lock(root):
        assert ablate_tool.run(args) == 2
    err = capsys.readouterr().err
    assert f"--output-dir {root} is in use by another run (pid {os.getpid()} on host" in err


# ---------------------------------------------------------------- 5: non-finite lr and weights
@pytest.mark.parametrize("value", ["inf", "1e400", "-inf", "nan"])
def test_non_finite_lr_is_refused(value, tmp_path, tiny_devkit, tiny_classes, capsys, caplog):
    """Before: --lr inf passed validation ((0, inf]) and trained."""
    code, text = cli(argv(tiny_devkit, tmp_path / "run", tiny_classes, f"--lr={value}"), capsys,
                     caplog)
    assert code == 2 and "config field 'lr' must be a finite number" in text
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_step_that_makes_weights_non_finite_ends_with_exit_3(tmp_path, tiny_devkit, tiny_classes,
                                                              capsys, caplog):
    """lr 1e30: the first loss and gradient are finite, the update is not. Before: "done ...
    mAP 0.00%", exit 0, a NaN best.pth and summary.json."""
    out = tmp_path / "run"
    code, text = cli(argv(tiny_devkit, out, tiny_classes, "--lr", "1e30", "--iters", "3"),
                     capsys, caplog)
    assert code == 3
    assert re.search(r"non-finite (weights|outputs) after iteration 1 ", text)
    assert "done:" not in text
    assert "No checkpoint has been written yet" in text
    assert not any((out / n).exists() for n in ("last.pth", "best.pth", "summary.json"))


# ---------------------------------------------------------------- 6: a full disk
class FullDisk:
    """A file whose writes fail with ``error`` once ``limit`` bytes are in it."""

    def __init__(self, real, limit: int, error: int) -> None:
        self.real, self.limit, self.error, self.size = real, limit, error, 0

    def write(self, data) -> int:
        if self.size + len(data) > self.limit:
            raise OSError(self.error, os.strerror(self.error))
        self.size += len(data)
        return self.real.write(data)

    def __getattr__(self, name):
        return getattr(self.real, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.real.close()


@pytest.mark.parametrize("error, words", [(errno.ENOSPC, "no space left on the device"),
                                          (errno.EFBIG, "file too large")])
def test_a_full_disk_names_the_file_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch,
                                                                     error, words):
    """Before: RuntimeError "[enforce fail at inline_container.cc] unexpected pos", exit 1."""
    path = tmp_path / "last.pth"
    save_checkpoint({"model": {"w": torch.zeros(2)}, "backbone": "resnet18"}, path)
    before = path.read_bytes()
    real_fdopen = os.fdopen
    monkeypatch.setattr("ssd_da.engine.checkpoint.os.fdopen",
                        lambda fd, mode: FullDisk(real_fdopen(fd, mode), 4096, error))
    with pytest.raises(CheckpointWriteError) as info:
        save_checkpoint({"model": {"w": torch.zeros(100_000)}, "backbone": "resnet18"}, path)
    message = str(info.value)
    assert f"{words} while writing {path}" in message
    assert "free on" in message and f"the previous {path} is intact" in message
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["last.pth"]


@pytest.mark.slow
def test_a_file_size_limit_in_training_exits_74(tmp_path, tiny_devkit, tiny_classes):
    """A real RLIMIT_FSIZE on tools/train.py: the checkpoint write fails, the message says so,
    and the exit status is the documented 74."""
    out = tmp_path / "run"
    limit = ("import resource, runpy, sys; resource.setrlimit(resource.RLIMIT_FSIZE, "
             "(2_000_000, resource.RLIM_INFINITY)); sys.argv = sys.argv[1:]; "
             "runpy.run_path(sys.argv[0], run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", limit, str(ROOT / "tools" / "train.py"),
                           *argv(tiny_devkit, out, tiny_classes)], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 74, proc.stderr[-2000:]
    assert f"file too large while writing {out / 'last.pth'}" in proc.stderr
    assert "Traceback" not in proc.stderr and not (out / "last.pth").exists()


def test_a_filesystem_without_locks_warns_and_runs(tmp_path, monkeypatch, caplog):
    """flock can fail with ENOLCK on some network filesystems: that is not "in use"."""
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with caplog.at_level(logging.WARNING):
        with hold_folder_lock(tmp_path / "run"):
            (tmp_path / "run" / "log.jsonl").write_text("")
    assert "cannot lock" in caplog.text and not (tmp_path / "run" / ".lock").exists()
