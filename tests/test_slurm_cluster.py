"""tools/ablate.py --launcher slurm against a real one-node SLURM cluster on this machine
(tools/slurm_local.sh starts it; the test skips only when that script says the cluster cannot
start here): a 2 x 2 suite submitted without waiting, two of its jobs pre-empted mid-run (one by
``scontrol requeue``, one by the time-limit signal SIGUSR1), the same command again (it must not
submit anything twice) waiting for the four results, and the two pre-empted runs compared
bit for bit with the same runs trained without interruption by --launcher local."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ssd_da.cli import ablate as ablate_tool
from ssd_da.data.demo import DEMO_CLASSES
from ssd_da.engine.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
EXIT_CANNOT_START = 3  # tools/slurm_local.sh: this machine cannot run the cluster
# Long enough that a run is still training when the test, seeing its first checkpoint, pre-empts
# it (4 iterations left about 2 s: a fast machine finished a run before its requeue arrived).
ITERS = 12


@pytest.fixture(scope="module")
def cluster() -> None:
    res = subprocess.run(["bash", str(ROOT / "tools" / "slurm_local.sh"), "start"],
                         capture_output=True, text=True, timeout=600)
    if res.returncode == EXIT_CANNOT_START:
        pytest.skip(res.stderr.strip())
    assert res.returncode == 0, res.stderr


def _argv(devkit: Path, out: Path, *extra: str) -> list[str]:
    return ["--data-root", str(devkit), "--classes", ",".join(DEMO_CLASSES),
            "--train-split", "voc07_trainval", "--test-split", "voc07_test", "--iters", str(ITERS),
            "--batch-size", "2", "--workers", "0", "--backbones", "resnet18,da_resnet18",
            "--output-dir", str(out), "pretrained=none", "eval_every=0", "ckpt_every=1",
            "log_every=1", f"lr_steps=[{ITERS - 2}]", "warmup_iters=1", *extra]


def _cli(argv: list[str]) -> int:
    return ablate_tool.main(argv)


def _preempt_at_first_checkpoint(actions: dict[Path, list[str]],
                                 timeout_s: float = 300.0) -> None:
    """Run each SLURM command as soon as its run has written its first last.pth (renamed into
    place whole), all runs watched at once so none goes on training while another is waited for;
    and check that each run was pre-empted mid-run, not after its end."""
    todo, end = dict(actions), time.monotonic() + timeout_s
    while todo and time.monotonic() < end:
        for run_dir in [d for d in todo if (d / "last.pth").is_file()]:
            _slurm(*todo.pop(run_dir))
            assert not (run_dir / "summary.json").exists(), f"{run_dir} ended before pre-emption"
        time.sleep(0.1)
    assert not todo, f"no last.pth after {timeout_s:.0f} s in {sorted(map(str, todo))}"


def _slurm(*cmd: str) -> None:
    """A SLURM command that must be taken at once (scancel retries for a minute a signal to a
    job in transition, and would deliver it to the requeued job instead)."""
    subprocess.run(cmd, check=True, timeout=30)


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / "last.pth")["model"]


@pytest.mark.slow
def test_suite_on_slurm_with_preempted_jobs_resumes_bit_identically(cluster, tiny_devkit, tmp_path,
                                                                    monkeypatch):
    # One thread per process: the SLURM jobs and the local reference compute the same bits.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out, ref = tmp_path / "slurm_suite", tmp_path / "local_ref"
    argv = _argv(tiny_devkit, out, "--seeds", "2", "--launcher", "slurm", "--gpus-per-job", "0",
                 "--cpus-per-job", "1", "--poll", "1", "--time-limit", "30")
    assert _cli([*argv, "--no-wait"]) == 0
    jobs = json.loads((out / "slurm" / "jobs.json").read_text())["runs"]
    assert sorted(jobs) == ["da_resnet18/seed0", "da_resnet18/seed1", "resnet18/seed0",
                            "resnet18/seed1"]
    assert _cli(["--status", "--output-dir", str(out)]) == ablate_tool.EXIT_PENDING

    # Pre-empt the first two runs (they start together) once each has a checkpoint
    # (ckpt_every=1) and before it ends: one by the time-limit signal (the job requeues
    # itself), the other by a requeue from SLURM.
    requeued, signalled = out / "resnet18" / "seed0", out / "da_resnet18" / "seed0"
    _preempt_at_first_checkpoint({
        signalled: ["scancel", "--signal=USR1", jobs["da_resnet18/seed0"]["job_id"]],
        requeued: ["scontrol", "requeue", jobs["resnet18/seed0"]["job_id"]]})

    # The same command again, waiting: nothing is submitted twice, the requeued jobs go on.
    reference = subprocess.Popen(  # meanwhile, the two runs uninterrupted, on this machine
        [sys.executable, str(ROOT / "tools" / "ablate.py"),
         *_argv(tiny_devkit, ref, "--seeds", "1")],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert _cli(argv) == 0
    assert json.loads((out / "slurm" / "jobs.json").read_text())["runs"] == jobs
    with open(out / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted((r["backbone"], r["seed"]) for r in rows) == [
        ("da_resnet18", "0"), ("da_resnet18", "1"), ("resnet18", "0"), ("resnet18", "1")]
    for run_dir in (requeued, signalled):  # a second job session resumed the run
        log = (run_dir / "train.log").read_text()
        assert "restart 1]" in log and f"--resume {run_dir / 'last.pth'}" in log, log[-3000:]
        assert [json.loads(x)["iter"] for x in (run_dir / "log.jsonl").read_text().splitlines()
                if '"loss"' in x] == list(range(1, ITERS + 1))

    _, err = reference.communicate(timeout=600)
    assert reference.returncode == 0, err[-3000:]
    for name in ("resnet18", "da_resnet18"):
        got, want = _weights(out / name / "seed0"), _weights(ref / name / "seed0")
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want), f"{name}: weights differ"
    # The last jobs leave the queue once their wrappers exit (the runs were done before), and
    # none of them runs again.
    ours, end = {j["job_id"] for j in jobs.values()}, time.monotonic() + 120
    while time.monotonic() < end:
        queue = subprocess.run(["squeue", "-h", "-o", "%i %T"], capture_output=True, text=True,
                               check=True).stdout.splitlines()
        left = [line for line in queue if line.split()[0] in ours]
        assert not [line for line in left if "PENDING" in line], left
        if not left:
            break
        time.sleep(1)
    assert not left, left
