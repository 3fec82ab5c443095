"""kill -9 at the worst moments, then --resume: the run must end with the weights, losses and mAP
of an uninterrupted one (issue 10). tools/train.py runs in subprocesses through a small driver
that can stop a session at a chosen event (half-way through writing last.pth, inside an
evaluation, inside a training step) and tell the test, which then SIGKILLs it there."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

# FAULT=<event>:<n> stops the session at the n-th event of this process: "write", a training
# checkpoint being written (half its bytes reach the temporary file first); "eval", a forward
# pass in evaluation mode; "step", a forward pass in training mode.
DRIVER = textwrap.dedent('''
    import io, os, runpy, sys, time
    from pathlib import Path

    import torch

    event, n = os.environ["FAULT"].split(":")
    seen = {"write": 0, "eval": 0, "step": 0}


    def is_the_one(kind):
        seen[kind] += 1
        return event == kind and seen[kind] == int(n)


    def stop_here():
        Path(os.environ["FAULT_SIGNAL"]).write_text(event)
        while True:
            time.sleep(1)  # the test kills the process here


    real_save = torch.save


    def save(obj, f, *args, **kwargs):
        training_checkpoint = isinstance(obj, dict) and "optimizer" in obj
        if hasattr(f, "write") and training_checkpoint and is_the_one("write"):
            buf = io.BytesIO()
            real_save(obj, buf, *args, **kwargs)
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            f.flush()
            os.fsync(f.fileno())
            stop_here()
        return real_save(obj, f, *args, **kwargs)


    torch.save = save
    from ssd_da.models.ssd import SSD300

    real_forward = SSD300.forward


    def forward(self, *args, **kwargs):
        if is_the_one("step" if self.training else "eval"):
            stop_here()
        return real_forward(self, *args, **kwargs)


    SSD300.forward = forward
    sys.argv = [sys.argv[1], *sys.argv[2:]]
    runpy.run_path(sys.argv[0], run_name="__main__")
''')


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    from ssd_da.data.demo import ensure_demo_dataset

    root = tmp_path_factory.mktemp("faults")
    ensure_demo_dataset(root, num_train=8, num_test=4, seed=1)
    (root / "driver.py").write_text(DRIVER)
    return root


def session(demo: Path, out: Path, *extra: str, fault: str | None = None) -> None:
    """One tools/train.py process; with ``fault``, SIGKILLed at that event (which must come)."""
    finish(start(demo, out, *extra, fault=fault), out, fault)


def start(demo: Path, out: Path, *extra: str, fault: str | None = None) -> subprocess.Popen:
    """Start one tools/train.py process; with ``fault``, return once it stopped at that event.
    One thread per process (the same in every session, so results compare bit for bit): the
    uninterrupted run goes alongside the killed ones on two cores."""
    from ssd_da.data.demo import DEMO_CLASSES

    sig = demo / "signal"
    sig.unlink(missing_ok=True)
    args = [str(ROOT / "tools" / "train.py"), "--backbone", "resnet18", "--data-root",
            str(demo / "VOCdevkit"), "--device", "cpu", "--iters", "6", "--batch-size", "2",
            "--workers", "0", "--eval-every", "4", "--lr", "0.01",
            "pretrained=none", "train_split=voc07_trainval", "test_split=voc07_test",
            f"classes={json.dumps(list(DEMO_CLASSES))}", "ckpt_every=2", "log_every=1",
            "lr_steps=[5]", "warmup_iters=2", "eval_batch_size=4", *extra]
    if "--resume" not in extra:
        args += ["--output-dir", str(out)]
    env = dict(os.environ, PYTHONPATH=str(ROOT), FAULT=fault or "none:0", FAULT_SIGNAL=str(sig),
               OMP_NUM_THREADS="1")
    with open(out.parent / f"{out.name}.log", "a") as log:
        proc = subprocess.Popen([sys.executable, str(demo / "driver.py"), *args], env=env,
                                stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while fault and not sig.exists():
        assert proc.poll() is None, f"session ended before {fault}: see {out.name}.log"
        assert time.monotonic() < deadline, f"{fault} never came"
        time.sleep(0.05)
    return proc


def finish(proc: subprocess.Popen, out: Path, fault: str | None) -> None:
    """SIGKILL a stopped session (``fault``) or wait for it to end well."""
    if fault:
        os.kill(proc.pid, signal.SIGKILL)
    code = proc.wait(timeout=300)
    assert code == (-signal.SIGKILL if fault else 0), f"exit {code}: see {out.name}.log"


def ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def records(run: Path) -> tuple[dict[int, float], dict[int, float]]:
    """({iteration: loss}, {iteration: mAP}) of log.jsonl, asserting one record of each per
    iteration and valid JSON (no NaN)."""
    def strict(text):
        raise ValueError(f"not JSON: {text}")

    recs = [json.loads(line, parse_constant=strict) for line in (run / "log.jsonl").read_text().splitlines()]
    losses = [(r["iter"], r["loss"]) for r in recs if "loss" in r]
    maps = [(r["iter"], r["map"]) for r in recs if "map" in r]
    assert len({i for i, _ in losses}) == len(losses) and len({i for i, _ in maps}) == len(maps)
    return dict(losses), dict(maps)


@pytest.mark.slow
def test_kill_during_write_eval_and_step_then_resume_is_exact(demo, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    uninterrupted = start(demo, straight)

    session(demo, killed, fault="write:2")  # half-way through last.pth of iteration 4
    assert ckpt(killed / "last.pth")["iteration"] == 2  # the previous one, whole
    orphans = list(killed.glob(".last.pth.*.tmp"))
    assert len(orphans) == 1
    resume = ("--resume", str(killed / "last.pth"))
    session(demo, killed, *resume, fault="eval:1")  # in the evaluation at iteration 4
    assert not any(o.exists() for o in orphans)  # the stale temporary file was removed
    assert ckpt(killed / "last.pth")["iteration"] == 4  # written before the evaluation
    session(demo, killed, *resume, fault="step:1")  # evaluates 4 again, then dies in step 5
    assert ckpt(killed / "last.pth")["iteration"] == 4
    session(demo, killed, *resume)
    finish(uninterrupted, straight, None)

    a, b = ckpt(straight / "last.pth"), ckpt(killed / "last.pth")
    assert b["iteration"] == a["iteration"] == 6
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert b["best_map"] == a["best_map"]
    (loss_a, map_a), (loss_b, map_b) = records(straight), records(killed)
    assert sorted(loss_b) == [1, 2, 3, 4, 5, 6] and loss_b == loss_a
    assert sorted(map_b) == [4, 6] and map_b == map_a
    summary_a = json.loads((straight / "summary.json").read_text())
    summary_b = json.loads((killed / "summary.json").read_text())
    assert summary_b["final_map"] == summary_a["final_map"]
    assert summary_b["best_map"] == summary_a["best_map"]
