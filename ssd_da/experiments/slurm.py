"""The runs of a suite as SLURM jobs, through submitit: submit (idempotently), watch, report.

Each unfinished run becomes one job that calls
:class:`~ssd_da.experiments.slurm_job.SlurmRun`. The suite folder keeps what a later command
needs: ``slurm/jobs.json`` (the job id and log files of each run, and the suite's options, which
``tools/ablate.py --status`` reads) and ``slurm/logs/`` (submitit's job scripts, pickles and logs).

Resubmitting is idempotent: a finished run is skipped, a run whose job is queued or running is
left alone, any other run (never submitted, failed, cancelled) is submitted again and resumes
from its ``last.pth``. Job states come from ``squeue`` and the run folders, not ``sacct``: sacct
needs the accounting daemon (slurmdbd), which small clusters often lack.
"""
from __future__ import annotations

import fcntl
import getpass
import json
import logging
import shutil
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from tqdm import tqdm

import ssd_da
from ssd_da.experiments.ablate import RunOutcome, RunSpec, run_state
from ssd_da.experiments.slurm_job import SlurmRun

logger = logging.getLogger(__name__)

# squeue's job states (long form) that mean "will run" and "runs now".
QUEUED_STATES = frozenset({"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "SUSPENDED",
                           "PREEMPTED", "RESV_DEL_HOLD", "SPECIAL_EXIT"})
RUNNING_STATES = frozenset({"RUNNING", "CONFIGURING", "COMPLETING", "STAGE_OUT", "SIGNALING",
                            "RESIZING"})
# A run in one of these states changes no more until it is submitted again.
FINAL_STATES = ("done", "failed", "diverged", "not submitted")
# sbatch options the launcher sets itself (its own options, or submitit's bookkeeping).
OWNED_SBATCH = {"partition": "--partition", "time": "--time-limit", "gpus-per-node":
                "--gpus-per-job", "cpus-per-task": "--cpus-per-job", "account": "--account",
                "qos": "--qos", "signal": "--signal-before", "array": "(one job per run)",
                "output": "(submitit's log)", "error": "(submitit's log)",
                "job-name": "(ssd_da)", "ntasks-per-node": "(one task per job)"}


class SlurmUnavailable(RuntimeError):
    """squeue did not answer: the controller is down or unreachable."""


@dataclass(frozen=True)
class SlurmOptions:
    """What each job asks SLURM for. ``sbatch``: further ``#SBATCH`` options, name -> value
    (``True`` for a flag). ``signal_s``: SIGUSR1 comes this long before the time limit."""

    partition: str | None = None
    time_min: int = 240
    gpus_per_job: int = 1
    cpus_per_job: int | None = None
    account: str | None = None
    qos: str | None = None
    sbatch: dict[str, Any] = field(default_factory=dict)
    signal_s: int = 120

    def check(self) -> None:
        """ValueError naming the option for a value SLURM would refuse or misread."""
        if self.time_min < 1:
            raise ValueError(f"--time-limit must be >= 1 minute, got {self.time_min}")
        if self.gpus_per_job < 0:
            raise ValueError(f"--gpus-per-job must be >= 0, got {self.gpus_per_job}")
        if self.cpus_per_job is not None and self.cpus_per_job < 1:
            raise ValueError(f"--cpus-per-job must be >= 1, got {self.cpus_per_job}")
        if not 0 < self.signal_s < 60 * self.time_min:
            raise ValueError(f"--signal-before must lie between 1 and the time limit "
                             f"({60 * self.time_min} s), got {self.signal_s}")
        for key in self.sbatch:
            if key in OWNED_SBATCH:
                raise ValueError(f"--sbatch {key}=...: set by the launcher; use "
                                 f"{OWNED_SBATCH[key]}")

    def executor_parameters(self) -> dict[str, Any]:
        """submitit SlurmExecutor parameters: one task per job; the signal for the wrapper."""
        root = Path(ssd_da.__file__).resolve().parents[1]
        params: dict[str, Any] = {
            "time": self.time_min, "ntasks_per_node": 1, "job_name": "ssd_da",
            # The job imports the same ssd_da as the submitting command.
            "setup": [f"export PYTHONPATH={root}${{PYTHONPATH:+:$PYTHONPATH}}"],
            "additional_parameters": {**self.sbatch, "signal": f"USR1@{self.signal_s}"}}
        for key, value in (("partition", self.partition), ("account", self.account),
                           ("qos", self.qos), ("cpus_per_task", self.cpus_per_job),
                           ("gpus_per_node", self.gpus_per_job or None)):
            if value is not None:
                params[key] = value
        return params


@dataclass
class RunStatus:
    """Where a run of the suite stands: ``state`` is one of "done", "queued", "running",
    "failed", "diverged" or "not submitted"; ``log`` the file to read about it."""

    spec: RunSpec
    state: str
    job_id: str | None = None
    log: Path | None = None
    message: str = ""


def slurm_folder(root: Path) -> Path:
    return Path(root) / "slurm"


def _log_folder(root: Path) -> Path:
    """submitit's folder pattern (``%j``: the job id)."""
    return slurm_folder(root) / "logs" / "%j"


def read_jobs(root: Path) -> dict[str, Any]:
    """``slurm/jobs.json``: ``{"options": {...}, "runs": {name: {job_id, stdout, stderr}}}``."""
    path = slurm_folder(root) / "jobs.json"
    if not path.is_file():
        return {"options": None, "runs": {}}
    return json.loads(path.read_text())


def _write_jobs(root: Path, jobs: dict[str, Any]) -> None:
    path = slurm_folder(root) / "jobs.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(jobs, indent=2))
    tmp.replace(path)


@contextmanager
def _suite_lock(root: Path) -> Iterator[None]:
    """One submission at a time per suite folder (two would each submit the same runs)."""
    folder = slurm_folder(root)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "submit.lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"{folder}: another ablate.py is submitting this suite now")
        yield


def _need(command: str) -> None:
    if shutil.which(command) is None:
        raise ValueError(f"--launcher slurm: {command} not found: run this on a SLURM login "
                         f"node (bash tools/slurm_local.sh start makes a one-node cluster here)")


def active_jobs() -> dict[str, str]:
    """{job id: state} of this user's queued and running jobs (array tasks as ``<id>_<k>``)."""
    _need("squeue")
    out = subprocess.run(["squeue", "-h", "-r", "-u", getpass.getuser(), "-o", "%i|%T"],
                         capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise SlurmUnavailable(f"squeue failed (is slurmctld reachable?): {out.stderr.strip()}")
    states = {}
    for line in out.stdout.splitlines():
        job_id, _, state = line.strip().partition("|")
        if job_id:
            states[job_id] = state.strip()
    return states


def submit_runs(specs: Sequence[RunSpec], root: Path, opts: SlurmOptions,
                options: dict[str, Any]) -> list[RunSpec]:
    """Submit every run that is neither finished nor queued/running; returns those submitted.

    ``options``: the suite's command-line options, kept in jobs.json for ``--status``.
    Raises ValueError for a run folder trained with other settings (nothing is submitted)."""
    import submitit  # the launcher's dependency only

    opts.check()
    _need("sbatch")
    with _suite_lock(root):
        jobs = read_jobs(root)
        active = active_jobs()
        todo = [s for s in specs if run_state(s)[0] != "done"
                and jobs["runs"].get(s.name, {}).get("job_id") not in active]
        jobs["options"] = options
        if todo:
            executor = submitit.SlurmExecutor(folder=_log_folder(root))
            executor.update_parameters(**opts.executor_parameters())
            # One job per run, not an array: each can be signalled, requeued and cancelled by
            # its own id (SLURM 22.05 answers a signal to one array task with "try again
            # later" while its siblings are pending, and scancel retries for a minute).
            for spec in todo:
                job = _submit_one(executor, SlurmRun(spec, opts.gpus_per_job,
                                                     grace_s=max(1.0, opts.signal_s / 2)))
                jobs["runs"][spec.name] = {"job_id": str(job.job_id),
                                           "stdout": str(job.paths.stdout),
                                           "stderr": str(job.paths.stderr)}
                _write_jobs(root, jobs)  # at once: a later refusal must not orphan this job
                logger.info("%s: job %s", spec.name, job.job_id)
        _write_jobs(root, jobs)
    logger.info("%d runs: %d submitted, %d finished or queued/running already", len(specs),
                len(todo), len(specs) - len(todo))
    return todo


def _submit_one(executor: Any, run: SlurmRun) -> Any:
    """``executor.submit(run)``; sbatch's refusal (an unknown partition, account or QoS, an
    impossible request) as a ValueError naming the options that shape the request."""
    from submitit.core.utils import FailedJobError

    try:
        return executor.submit(run)
    except FailedJobError as exc:
        raise ValueError(f"sbatch refused the job of {run.spec.name}: {str(exc).strip()} "
                         f"(see --partition, --account, --qos, --gpus-per-job, --cpus-per-job, "
                         f"--time-limit, --sbatch)") from None


def _ended(spec: RunSpec, record: dict[str, str], root: Path) -> RunStatus:
    """A run whose job left the queue unfinished: what its submitit result says."""
    from submitit.core.utils import JobPaths, pickle_load

    job_id, stderr = record["job_id"], Path(record["stderr"])
    result = JobPaths(_log_folder(root), job_id=job_id, task_id=0).result_pickle
    if result.is_file():
        kind, value = pickle_load(result)
        if kind == "success" and isinstance(value, RunOutcome) and value.status != "trained":
            return RunStatus(spec, "diverged" if value.status == "diverged" else "failed",
                             job_id, spec.out_dir / "train.log", value.message)
        if kind == "error":
            last = str(value).strip().splitlines()[-1:] or [""]
            return RunStatus(spec, "failed", job_id, stderr, last[0])
    return RunStatus(spec, "failed", job_id, stderr,
                     "the job ended without finishing the run (cancelled, killed or out of time)")


def suite_status(specs: Sequence[RunSpec], root: Path) -> list[RunStatus]:
    """One :class:`RunStatus` per spec, in order (reads squeue once)."""
    runs = read_jobs(root)["runs"]
    active = active_jobs()
    out = []
    for spec in specs:
        record = runs.get(spec.name)
        job_id = record["job_id"] if record else None
        log = spec.out_dir / "train.log"
        if run_state(spec)[0] == "done":
            out.append(RunStatus(spec, "done", job_id, log))
        elif record is None:
            out.append(RunStatus(spec, "not submitted"))
        elif active.get(job_id) in RUNNING_STATES:
            out.append(RunStatus(spec, "running", job_id, log))
        elif job_id in active:
            out.append(RunStatus(spec, "queued", job_id, log, active[job_id].lower()))
        else:
            out.append(_ended(spec, record, root))
    return out


def format_status(statuses: Sequence[RunStatus]) -> str:
    """One line per run: name, state, job id, log (and why, for a failed run)."""
    width = max((len(s.spec.name) for s in statuses), default=0)
    lines = []
    for s in statuses:
        why = f" ({s.message})" if s.message and s.state not in ("done", "running") else ""
        lines.append(f"{s.spec.name:<{width}}  {s.state:<13} job {s.job_id or '-':<10} "
                     f"{s.log or '-'}{why}")
    counts = ", ".join(f"{sum(s.state == k for s in statuses)} {k}" for k in
                       ("done", "queued", "running", "failed", "diverged", "not submitted"))
    return "\n".join([*lines, f"{len(statuses)} runs: {counts}"])


def wait_for_runs(specs: Sequence[RunSpec], root: Path, poll_s: float = 30.0
                  ) -> list[RunStatus]:
    """Poll every ``poll_s`` seconds, with a progress bar of finished runs, until no run is
    queued or running; returns the final statuses."""
    with tqdm(total=len(specs), desc="slurm runs", unit="run", dynamic_ncols=True) as bar:
        while True:
            statuses = suite_status(specs, root)
            bar.n = sum(s.state in FINAL_STATES for s in statuses)
            bar.set_postfix_str(", ".join(f"{sum(s.state == k for s in statuses)} {k}"
                                          for k in ("queued", "running", "done", "failed")))
            bar.refresh()
            if all(s.state in FINAL_STATES for s in statuses):
                return statuses
            time.sleep(poll_s)


def outcomes_of(statuses: Sequence[RunStatus], done_before: Iterable[str] = ()
                ) -> list[RunOutcome]:
    """The statuses as :func:`~ssd_da.experiments.results.write_reports` takes them; runs named
    in ``done_before`` (finished before this command) count as skipped."""
    kind = {"done": "trained", "diverged": "diverged"}
    earlier = set(done_before)
    return [RunOutcome(s.spec, "skipped" if s.state == "done" and s.spec.name in earlier
                       else kind.get(s.state, "failed"),
                       s.message or f"{s.state}; see {s.log or '-'}") for s in statuses]
