"""Stopping on a signal without losing the work: the run ends its current step, saves, and
exits with ``EXIT_INTERRUPTED`` (:mod:`ssd_da.utils.cli`).

Signals that ask a run to stop (:data:`STOP_SIGNALS`):

- SIGTERM: cluster pre-emption and ``scancel`` (SLURM sends SIGTERM, then SIGKILL after its
  KillWait, 30 s by default), ``kill``, container shutdown;
- SIGINT: Ctrl-C in a terminal;
- SIGUSR1: schedulers that warn before the time limit (``sbatch --signal=USR1@120``).

While :func:`stop_on_signals` is active, the first of them only sets a flag that the training
loop reads after each step (:func:`stop_requested`); the loop then writes ``last.pth``
atomically and raises :class:`Interrupted`, whose message gives the command that continues the
run. A second SIGINT (Ctrl-C pressed again) raises ``KeyboardInterrupt`` at once, without
saving; further SIGTERM / SIGUSR1 are ignored (the run is already stopping). The tools map
:class:`Interrupted` to exit status 75 (``EXIT_INTERRUPTED``) and the immediate stop to 130, the
shell's status for Ctrl-C. An evaluation in progress finishes before the run stops.

DataLoader worker processes leave these signals to the main process
(:func:`ignore_stop_signals` as ``worker_init_fn``): a scheduler signals every process of a
job, and a worker that died of it would break the step the main process is finishing.
"""
from __future__ import annotations

import contextlib
import logging
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any, Iterator

import torch

logger = logging.getLogger(__name__)

__all__ = ["STOP_SIGNALS", "Interrupted",
           "stop_on_signals", "stop_requested", "agreed_stop", "wait_forwarding_stop",
           "ignore_stop_signals"]

STOP_SIGNALS: tuple[signal.Signals, ...] = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGUSR1") if hasattr(signal, name))

_requested: str | None = None  # name of the first stop signal since the outermost install
_depth = 0  # nested stop_on_signals (ablate's suite around each run's training)
_previous: dict[int, Any] = {}


class Interrupted(Exception):
    """A run stopped on a signal after saving its state. ``checkpoint``: the last.pth written
    (None when the stop came before a run had anything to save); ``signal_name``: e.g. SIGTERM."""

    def __init__(self, message: str, signal_name: str, checkpoint: Path | None = None) -> None:
        super().__init__(message)
        self.signal_name, self.checkpoint = signal_name, checkpoint


def stop_requested() -> str | None:
    """The name of the stop signal received (e.g. "SIGTERM"), or None."""
    return _requested


def _handle(signum: int, frame: Any) -> None:
    global _requested
    name = signal.Signals(signum).name
    if _requested is not None:
        if signum == signal.SIGINT:  # Ctrl-C again: the user does not want to wait
            raise KeyboardInterrupt(f"{name} received twice: stopping at once, without saving")
        return
    _requested = name
    logger.warning("%s received: stopping after the current step and saving last.pth "
                   "(Ctrl-C again stops at once, without saving)", name)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Turn :data:`STOP_SIGNALS` into a stop request for the duration of the block (module
    docstring); the previous handlers come back at its end. Nested blocks share the outer
    one's request. Python runs signal handlers in the main thread only: elsewhere this does
    nothing (the signals keep their usual effect)."""
    global _depth, _requested
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if _depth == 0:
        _requested = None
        for sig in STOP_SIGNALS:
            _previous[sig] = signal.signal(sig, _handle)
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0:
            for sig, handler in _previous.items():
                signal.signal(sig, handler)
            _previous.clear()
            _requested = None


def agreed_stop(host_read: bool, device: torch.device) -> str | None:
    """The stop signal received (module docstring) once every process knows of
    it, else None. One process: after any step. Under torchrun: only on iterations that read
    the host anyway (``host_read``: logging, checkpoint, evaluation), where one all-reduce lets
    all processes stop at the same step (a process that stopped alone would leave the others
    waiting in the next gradient all-reduce)."""
    local = stop_requested()
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return local
    if not host_read:
        return None
    flag = torch.tensor([local is not None], dtype=torch.int32, device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return (local or "a stop signal (another process)") if bool(flag.item()) else None


def wait_forwarding_stop(proc: subprocess.Popen, poll_s: float = 0.5) -> int:
    """Wait for a training subprocess; when this process is asked to stop (a signal sent to it
    alone, e.g. ``kill <pid>``), pass SIGTERM on, so the run saves and exits
    ``EXIT_INTERRUPTED``."""
    forwarded = False
    while True:
        try:
            return proc.wait(timeout=poll_s)
        except subprocess.TimeoutExpired:
            if stop_requested() and not forwarded:
                proc.send_signal(signal.SIGTERM)
                forwarded = True


def ignore_stop_signals(worker_id: int = 0) -> None:
    """``worker_init_fn`` of the DataLoaders: the main process decides when to stop, and ends
    its workers itself (they also exit when it dies)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
