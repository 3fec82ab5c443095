"""What a training run carries from step to step: :class:`TrainState` (model, optimizer,
schedule, counters; what ``last.pth`` stores) and the clocks that time it (:class:`Timer`,
:class:`DataWait`, :class:`RunClock`). Imports nothing else of the engine, so the trainer and
the checkpoint code both use it without importing each other."""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import torch

__all__ = ["TrainState", "Timer", "DataWait", "RunClock"]


@dataclass
class TrainState:
    model: torch.nn.Module  # DDP-wrapped under torchrun
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler  # its on-device found-inf check skips non-finite steps (step.py)
    iteration: int = 0
    best_map: float = -1.0
    backbone_init: str = "none"  # what build_model loaded; a resumed run keeps the first one's
    # Summed over every session of a resumed run, so the summary describes the whole run:
    # train_s / images: the training loop (data loading in, evaluation and checkpoints out);
    # wall_s: up to the last checkpoint (time lost after it in an interrupted session is not
    # counted).
    timing: dict[str, float] = field(default_factory=lambda: {"train_s": 0.0, "images": 0,
                                                              "wall_s": 0.0})
    evaluated_at: int = -1  # iteration of the latest evaluation, and its mAP (the final one at
    final_map: float = math.nan  # the end: summary.json's final_map)
    last_saved: tuple[Path, int] | None = None  # the newest last.pth on disk, its iteration


class Timer:
    """Seconds since creation plus ``offset`` (the time earlier sessions of a resumed run
    spent), leaving out the time spent inside :meth:`paused`."""

    def __init__(self, offset: float = 0.0) -> None:
        self._total, self._start = offset, time.perf_counter()

    def seconds(self) -> float:
        running = 0.0 if self._start is None else time.perf_counter() - self._start
        return self._total + running

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        self._total, self._start = self.seconds(), None
        try:
            yield
        finally:
            self._start = time.perf_counter()


class DataWait:
    """Seconds the training loop has spent waiting for its next batch, summed: the loader's
    share of the loop's time (logged as ``data_wait``; near 0 when the network is the limit)."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def timed(self, loader: Iterable) -> Iterator:
        """The loader's batches, timing each wait for one."""
        batches = iter(loader)
        while True:
            start = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:
                return
            self.seconds += time.perf_counter() - start
            yield batch


class RunClock:
    """The timing bookkeeping of the loop in one place: training time (evaluation and
    checkpoints left out), wall time, data waits, and the figures of the last logging step, all
    continued from ``timing`` (a :class:`TrainState`'s, summed over resumed sessions)."""

    def __init__(self, timing: dict[str, float]) -> None:
        self.timing = timing
        self.train, self.wall, self.waits = Timer(timing["train_s"]), Timer(timing["wall_s"]), DataWait()
        self._last_log = self._now()

    def _now(self) -> tuple[float, float, float]:
        return self.train.seconds(), self.timing["images"], self.waits.seconds

    def since_last_log(self) -> tuple[float, float]:
        """(images per second, share of the time spent waiting for data) since the last call."""
        now = self._now()
        span = max(now[0] - self._last_log[0], 1e-9)
        rates = (now[1] - self._last_log[1]) / span, (now[2] - self._last_log[2]) / span
        self._last_log = now
        return rates

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Training time stops (evaluation, checkpoints); ``timing`` is brought up to date."""
        with self.train.paused():
            self.timing.update(train_s=self.train.seconds(), wall_s=self.wall.seconds())
            yield
