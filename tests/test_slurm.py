"""tools/ablate.py --launcher slurm without a cluster: the sbatch options each job asks for, the
refusals of options that do not fit, the run states read from squeue and submitit's results,
and the job wrapper's answer to SLURM's signals (with a stand-in training module).
The real cluster is exercised in test_slurm_cluster.py."""
from __future__ import annotations

import json
import os
import signal
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from submitit.core.utils import JobPaths, cloudpickle_dump
from submitit.slurm.slurm import _make_sbatch_string

from ssd_da.cli import ablate as ablate_tool
from ssd_da.config import load_config, save_config
from ssd_da.experiments import slurm, slurm_job
from ssd_da.experiments.ablate import RunOutcome, plan_runs
from ssd_da.experiments.slurm import SlurmOptions, format_status, suite_status
from ssd_da.experiments.slurm_job import EXIT_REQUEUED, SlurmRun

ROOT = Path(__file__).resolve().parents[1]


def test_each_job_asks_for_what_the_options_say():
    opts = SlurmOptions(partition="gpu", time_min=90, gpus_per_job=2, cpus_per_job=8,
                        account="proj", qos="high", sbatch={"mem": "64G", "exclusive": True},
                        signal_s=300)
    opts.check()
    params = opts.executor_parameters()
    assert params["setup"] == [f"export PYTHONPATH={ROOT}${{PYTHONPATH:+:$PYTHONPATH}}"]
    script = _make_sbatch_string(command="RUN", folder="/f/%j", **params).splitlines()
    for line in ("--partition=gpu", "--time=90", "--gpus-per-node=2", "--cpus-per-task=8",
                 "--account=proj", "--qos=high", "--mem=64G", "--signal=USR1@300",
                 "--ntasks-per-node=1", "--job-name=ssd_da"):
        assert f"#SBATCH {line}" in script
    assert "#SBATCH --exclusive" in script
    # A CPU cluster: no GPU request at all (--gpus-per-node=0 is refused by some clusters).
    cpu = _make_sbatch_string(command="RUN", folder="/f/%j",
                              **SlurmOptions(gpus_per_job=0).executor_parameters())
    assert "gpus" not in cpu and "#SBATCH --time=240" in cpu and "--signal=USR1@120" in cpu


@pytest.mark.parametrize("kwargs, message", [
    ({"time_min": 0}, "--time-limit must be >= 1 minute"),
    ({"time_min": 2, "signal_s": 120},
     r"--signal-before must lie between 1 and the time limit \(120 s\)"),
    ({"gpus_per_job": -1}, "--gpus-per-job must be >= 0"),
    ({"cpus_per_job": 0}, "--cpus-per-job must be >= 1"),
    ({"sbatch": {"signal": "USR2@60"}}, "set by the launcher; use --signal-before"),
    ({"sbatch": {"time": "10"}}, "use --time-limit"),
])
def test_options_slurm_would_refuse_are_refused_first(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SlurmOptions(**kwargs).check()


def test_cli_refuses_options_of_the_other_launcher(tmp_path, capsys):
    base = ["--backbones", "resnet18", "--output-dir", str(tmp_path / "s")]
    cases = [([*base, "--partition", "gpu"], "--partition: for --launcher slurm"),
             ([*base, "--no-wait", "--time-limit", "30"],
              "--no-wait, --time-limit: for --launcher"),
             ([*base, "--launcher", "slurm", "--gpus", "0"], "use --gpus-per-job N"),
             ([*base, "--launcher", "slurm", "--sbatch=--mem=1G"], "expected NAME=VALUE"),
             (["--status", *base], "--status takes only --output-dir"),
             (["--status", "--output-dir", str(tmp_path)], "no SLURM suite was submitted")]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exc:
            ablate_tool.main(argv)
        assert exc.value.code == 2 and message in capsys.readouterr().err, argv


def _finished_run(spec) -> None:
    """The files of a finished run, as run_state and collect_records read them."""
    spec.out_dir.mkdir(parents=True, exist_ok=True)
    save_config(spec.cfg, spec.out_dir / "config.yaml")
    (spec.out_dir / "log.jsonl").write_text(json.dumps(
        {"iter": spec.cfg.iters, "map": 0.5, "ap": {"x": 0.5}}) + "\n")
    (spec.out_dir / "summary.json").write_text(json.dumps({"iterations": spec.cfg.iters}))


def test_status_of_each_run_from_squeue_folders_and_results(tmp_path, monkeypatch):
    root = tmp_path / "suite"
    specs = plan_runs(load_config(None, ["iters=3", "classes=[x]"]),
                      ["resnet18", "da_resnet18", "se_resnet18"], [0, 1], root)
    _finished_run(specs[0])
    ids = ["7", "8", "9", "10", "11", "12"]
    logs = root / "slurm" / "logs" / "%j"
    records = {s.name: {"job_id": j, "stdout": str(JobPaths(logs, j, 0).stdout),
                        "stderr": str(JobPaths(logs, j, 0).stderr)} for s, j in zip(specs, ids)}
    del records[specs[5].name]  # never submitted
    (root / "slurm").mkdir(parents=True)
    (root / "slurm" / "jobs.json").write_text(json.dumps({"options": {}, "runs": records}))
    for job_id, result in (("10", ("success", RunOutcome(specs[3], "diverged", "non-finite loss"))),
                           ("11", ("error", "Traceback ...\nValueError: boom"))):
        path = JobPaths(logs, job_id, 0).result_pickle
        path.parent.mkdir(parents=True)
        cloudpickle_dump(result, path)
    # 7 finished long ago (left the queue); 8 runs; 9 waits (requeued); 10, 11 ended.
    monkeypatch.setattr(slurm, "active_jobs", lambda: {"8": "RUNNING", "9": "REQUEUED",
                                                       "99_1": "RUNNING"})
    got = suite_status(specs, root)
    assert [(s.state, s.job_id) for s in got] == [
        ("done", "7"), ("running", "8"), ("queued", "9"), ("diverged", "10"),
        ("failed", "11"), ("not submitted", None)]
    assert got[1].log == specs[1].out_dir / "train.log"
    assert got[3].message == "non-finite loss"
    assert got[4].message == "ValueError: boom" and got[4].log == JobPaths(logs, "11", 0).stderr
    text = format_status(got)
    assert text.splitlines()[-1] == ("6 runs: 1 done, 1 queued, 1 running, 1 failed, "
                                     "1 diverged, 1 not submitted")
    assert "se_resnet18/seed0  queued        job 9  " in text and "(requeued)" in text
    # A job gone from the queue with no result at all: cancelled, killed, out of time.
    monkeypatch.setattr(slurm, "active_jobs", lambda: {})
    gone = suite_status(specs[1:2], root)[0]
    assert gone.state == "failed" and "ended without finishing the run" in gone.message
    outcomes = slurm.outcomes_of(got)
    assert [o.status for o in outcomes] == ["trained", "failed", "failed", "diverged", "failed",
                                            "failed"]
    assert slurm.outcomes_of(got, done_before=[specs[0].name])[0].status == "skipped"


# ---------------------------------------------------------------- the job wrapper
FAKE_TRAIN = textwrap.dedent("""
    import json, os, signal, sys, time, yaml
    cfg = yaml.safe_load(open(sys.argv[sys.argv.index("--config") + 1]))
    out, mode = cfg["output_dir"], os.environ["FAKE_MODE"]
    open(os.path.join(out, "pid"), "w").write(str(os.getpid()))
    if mode == "diverge":
        sys.exit(3)
    if mode == "graceful":  # the trainer's signal handling: finish the step, save, exit 75
        def stop(signum, frame):
            open(os.path.join(out, "last.pth"), "w").write("state")
            sys.exit(75)
        signal.signal(signal.SIGUSR1, stop)
        signal.signal(signal.SIGTERM, stop)
    if mode == "stubborn":  # ignores the time-limit warning; SIGTERM ends it with status 1
        signal.signal(signal.SIGUSR1, lambda s, f: None)
        signal.signal(signal.SIGTERM, lambda s, f: sys.exit(1))
    if mode in ("graceful", "stubborn"):
        time.sleep(20)
        sys.exit(0)
    with open(os.path.join(out, "log.jsonl"), "a") as fh:
        fh.write(json.dumps({"iter": cfg["iters"], "map": 0.5, "ap": {"x": 0.5}}) + "\\n")
    json.dump({"iterations": cfg["iters"]}, open(os.path.join(out, "summary.json"), "w"))
""")


@pytest.fixture
def wrapper(tmp_path, monkeypatch, fake_trainer):
    """(spec, SlurmRun, requeue calls): a run whose training module is FAKE_TRAIN; the signal
    handlers the wrapper installs are put back afterwards."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM)}
    fake_trainer(FAKE_TRAIN)
    spec = plan_runs(load_config(None, ["iters=3", "classes=[x]"]), ["resnet18"], [0],
                     tmp_path / "suite")[0]
    calls: list[str] = []
    monkeypatch.setattr(slurm_job, "requeue_this_job", lambda: calls.append("requeue"))
    monkeypatch.setenv("SLURM_JOB_ID", "41")
    yield spec, SlurmRun(spec, gpus=1, grace_s=1.0), calls
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def _signal_once_started(spec, signum: int, to_child: bool) -> threading.Thread:
    """Send ``signum`` to this process (the job's wrapper) and, as SLURM does to every process
    of the step, to the training script too, once that has started."""
    def send() -> None:
        pid_file = spec.out_dir / "pid"
        for _ in range(200):
            if pid_file.is_file() and pid_file.read_text():
                break
            time.sleep(0.05)
        time.sleep(0.3)  # the script's handlers are installed
        if to_child:
            os.kill(int(pid_file.read_text()), signum)
        os.kill(os.getpid(), signum)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("mode, to_child, max_s",
                         [("graceful", True, 3.0), ("stubborn", False, 8.0)])
def test_time_limit_signal_requeues_the_job(wrapper, monkeypatch, mode, to_child, max_s):
    spec, run, calls = wrapper
    monkeypatch.setenv("FAKE_MODE", mode)
    start = time.monotonic()
    _signal_once_started(spec, signal.SIGUSR1, to_child)
    with pytest.raises(SystemExit) as exc:
        run()
    # graceful: the trainer wrote last.pth and exited, the job requeued at once; stubborn:
    # the job waited grace_s (1 s) after the signal, then requeued anyway.
    assert exc.value.code == EXIT_REQUEUED and calls == ["requeue"]
    assert time.monotonic() - start < max_s
    assert ((spec.out_dir / "last.pth").is_file()) == (mode == "graceful")
    log = (spec.out_dir / "train.log").read_text()
    assert log.startswith(f"[slurm job 41, restart 0] {sys.executable} ")
    if mode == "stubborn":
        os.kill(int((spec.out_dir / "pid").read_text()), signal.SIGKILL)


@pytest.mark.parametrize("mode", ["graceful", "stubborn"])
def test_preemption_ends_the_job_without_a_result_or_a_requeue(wrapper, monkeypatch, mode):
    spec, run, calls = wrapper
    monkeypatch.setenv("FAKE_MODE", mode)  # exits 75 after saving, or 1
    _signal_once_started(spec, signal.SIGTERM, to_child=True)
    with pytest.raises(SystemExit) as exc:  # no result pickle: the run is not over
        run()
    assert exc.value.code == EXIT_REQUEUED and calls == []  # SLURM requeues a pre-empted job
    assert ((spec.out_dir / "last.pth").is_file()) == (mode == "graceful")


def test_wrapper_returns_the_outcome_and_resumes(wrapper, monkeypatch):
    spec, run, calls = wrapper
    monkeypatch.setenv("FAKE_MODE", "diverge")
    assert run().status == "diverged"
    monkeypatch.setenv("FAKE_MODE", "finish")
    (spec.out_dir / "last.pth").write_text("state")  # an earlier job of this run stopped
    assert run().status == "trained"
    assert f"--resume {spec.out_dir / 'last.pth'}" in (spec.out_dir / "train.log").read_text()
    assert run().status == "skipped" and calls == []  # a requeued job of a finished run
    torchrun = SlurmRun(spec, gpus=4).launcher()
    assert torchrun == [sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node", "4"]


class _FakeJob:
    def __init__(self, job_id: str, folder: Path) -> None:
        self.job_id, self.paths = job_id, JobPaths(folder, job_id, 0)


class _FakeExecutor:
    """submitit.SlurmExecutor's surface that submit_runs uses; job ids 100, 101, ..."""

    submitted: list = []
    refuse: set = set()  # run names sbatch refuses

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def update_parameters(self, **params) -> None:
        self.params = params

    def submit(self, run: SlurmRun) -> _FakeJob:
        from submitit.core.utils import FailedJobError

        if run.spec.name in _FakeExecutor.refuse:
            raise FailedJobError("sbatch: error: Batch job submission failed: Invalid account")
        _FakeExecutor.submitted.append(run.spec.name)
        return _FakeJob(str(99 + len(_FakeExecutor.submitted)), self.folder)


def test_resubmitting_skips_finished_and_queued_runs_and_resubmits_the_rest(tmp_path, monkeypatch):
    import submitit

    monkeypatch.setattr(submitit, "SlurmExecutor", _FakeExecutor)
    monkeypatch.setattr(slurm, "_need", lambda command: None)
    _FakeExecutor.submitted = []
    root = tmp_path / "suite"
    specs = plan_runs(load_config(None, ["iters=3", "classes=[x]"]), ["resnet18", "da_resnet18"],
                      [0, 1], root)
    _finished_run(specs[0])
    monkeypatch.setattr(slurm, "active_jobs", lambda: {})
    todo = slurm.submit_runs(specs, root, SlurmOptions(), {"seeds": 2})
    assert [s.name for s in todo] == _FakeExecutor.submitted == [s.name for s in specs[1:]]
    jobs = slurm.read_jobs(root)
    assert jobs["options"] == {"seeds": 2}
    assert {k: v["job_id"] for k, v in jobs["runs"].items()} == {
        "da_resnet18/seed0": "100", "resnet18/seed1": "101", "da_resnet18/seed1": "102"}
    # 100 still queued, 101 running, 102 gone (failed or cancelled): only 102's run goes again.
    monkeypatch.setattr(slurm, "active_jobs", lambda: {"100": "PENDING", "101": "RUNNING"})
    again = slurm.submit_runs(specs, root, SlurmOptions(), {"seeds": 2})
    assert [s.name for s in again] == ["da_resnet18/seed1"]
    assert slurm.read_jobs(root)["runs"]["da_resnet18/seed1"]["job_id"] == "103"
    # sbatch refuses a job half-way: a clear error, and the jobs submitted before it are kept.
    (root / "slurm" / "jobs.json").unlink()
    _FakeExecutor.refuse = {"resnet18/seed1"}
    monkeypatch.setattr(slurm, "active_jobs", lambda: {})
    with pytest.raises(ValueError, match=r"sbatch refused the job of resnet18/seed1: .*Invalid "
                                         r"account \(see --partition, --account"):
        slurm.submit_runs(specs, root, SlurmOptions(), {})
    assert list(slurm.read_jobs(root)["runs"]) == ["da_resnet18/seed0"]
    _FakeExecutor.refuse = set()
    # A second submission while one holds the suite's lock is refused, not doubled.
    import fcntl

    with open(root / "slurm" / "submit.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        with pytest.raises(ValueError, match="another ablate.py is submitting this suite"):
            slurm.submit_runs(specs, root, SlurmOptions(), {})
