"""What one SLURM job of a suite runs: :class:`SlurmRun`, pickled by submitit on the submitting
machine and called inside the job.

The job trains its run with the training tool (``-m ssd_da.cli.train``, :data:`TRAIN_MODULE`), in
a subprocess of the submitting Python (``sys.executable``), resumed from the run's ``last.pth``
when there is one, exactly as ``--gpus`` does on one machine. Signals come from SLURM to every
process of the job step, the training process included, so the trainer's own signal handling
(stop at the end of the step, write ``last.pth``, exit) is the same for a job as for a run in a
terminal. This wrapper only decides what happens to the job afterwards:

- ``SIGUSR1``: the time limit is near (``sbatch --signal=USR1@<seconds>``). Once the trainer has
  exited, or ``grace_s`` after the signal if it has not, the job requeues itself
  (``scontrol requeue $SLURM_JOB_ID``); the requeued job resumes from ``last.pth``.
- ``SIGTERM``: pre-emption, ``scontrol requeue`` or ``scancel``. SLURM itself requeues a
  pre-empted job (``PreemptMode=REQUEUE``) or ends it; the wrapper exits without a result.

What this needs of the training process: on SIGUSR1 and SIGTERM it stops, at best after
finishing its step and writing ``last.pth`` (the trainer's signal handling, exit status 75); its
exit status is not read. A trainer without that handling dies of the signal and the run resumes
from its last periodic ``last.pth`` (``ckpt_every``), losing only the steps since.

A requeued or pre-empted run resumes bit-identically: the data order is a function of the seed
and the iteration only (:mod:`ssd_da.engine.trainer`), so a run that went through any number of
``last.pth`` checkpoints ends with the same weights as one that did not.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from types import FrameType

from ssd_da.experiments.ablate import RunOutcome, RunSpec, exit_outcome, run_state, train_command

logger = logging.getLogger(__name__)

# Exit status of a job that requeued itself or was pre-empted: it has no result; the run goes on
# in the requeued job.
EXIT_REQUEUED = 75  # EX_TEMPFAIL: "try again later"


class JobSignals:
    """Records SIGUSR1 (time limit near) and SIGTERM (pre-emption, requeue, cancel) for the
    wrapper; the training subprocess gets the same signals from SLURM and handles them itself."""

    def __init__(self) -> None:
        self.time_limit_at: float | None = None
        self.terminated = False

    def install(self) -> "JobSignals":
        signal.signal(signal.SIGUSR1, self._on_usr1)
        signal.signal(signal.SIGTERM, self._on_term)
        return self

    def _on_usr1(self, signum: int, frame: FrameType | None) -> None:
        if self.time_limit_at is None:
            self.time_limit_at = time.monotonic()
        logger.warning("SIGUSR1: the time limit is near; the job requeues once training stops")

    def _on_term(self, signum: int, frame: FrameType | None) -> None:
        self.terminated = True
        logger.warning("SIGTERM: pre-empted, requeued or cancelled by SLURM")


def requeue_this_job() -> None:
    """``scontrol requeue`` on the job this process runs in (an array task has its own
    ``SLURM_JOB_ID``)."""
    job_id = os.environ.get("SLURM_JOB_ID")
    if not job_id:
        raise RuntimeError("requeue: SLURM_JOB_ID is not set (not inside a SLURM job)")
    subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=60)
    logger.info("requeued job %s", job_id)


def _ignore_usr1() -> None:
    # torchrun's agent has no SIGUSR1 handler: without this it would die on the signal and
    # leave its workers behind. Its workers inherit the ignored signal until the trainer
    # installs its own handler.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


@dataclass(frozen=True)
class SlurmRun:
    """Train one run of a suite inside a SLURM job; returns its :class:`RunOutcome`.

    ``gpus``: GPUs of the job; more than one runs ``torchrun --standalone`` with one process per
    GPU (``batch_size`` is per process). ``grace_s``: how long after SIGUSR1 the trainer may take
    to write ``last.pth`` before the job requeues anyway (less than sbatch's ``--signal`` lead).
    """

    spec: RunSpec
    gpus: int = 1
    grace_s: float = 60.0

    def launcher(self) -> list[str]:
        if self.gpus <= 1:
            return [sys.executable]
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node", str(self.gpus)]

    def __call__(self) -> RunOutcome:
        signals = JobSignals().install()
        state, resume = run_state(self.spec)
        if state == "done":
            return RunOutcome(self.spec, "skipped")
        cmd = train_command(self.spec, resume, self.launcher())
        log = self.spec.out_dir / "train.log"
        with open(log, "a") as fh:
            fh.write(f"[slurm job {os.environ.get('SLURM_JOB_ID', '?')}, restart "
                     f"{os.environ.get('SLURM_RESTART_COUNT', '0')}] {' '.join(cmd)}\n")
            fh.flush()
            proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT,
                                    preexec_fn=_ignore_usr1 if self.gpus > 1 else None)
            rc = self._wait(proc, signals)
        # The trainer's exit status after a signal does not matter here (75 when it saved
        # last.pth and stopped, or death by the signal before it could): unfinished is unfinished.
        if (signals.time_limit_at is not None or signals.terminated) \
                and run_state(self.spec)[0] != "done":
            if signals.time_limit_at is not None:
                requeue_this_job()
            raise SystemExit(EXIT_REQUEUED)  # no result: SLURM requeues (pre-emption) or ends it
        return exit_outcome(self.spec, rc, log)

    def _wait(self, proc: subprocess.Popen, signals: JobSignals) -> int:
        """The trainer's exit status; after SIGUSR1 wait at most ``grace_s`` (then -1: the
        requeue stops it, and the run resumes from its newest last.pth)."""
        while True:
            try:
                return proc.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                pass
            started = signals.time_limit_at
            if started is not None and time.monotonic() - started > self.grace_s:
                logger.warning("training still running %.0f s after SIGUSR1; requeueing anyway",
                               self.grace_s)
                return -1
