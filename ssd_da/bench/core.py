"""The timing core every benchmark shares: where and when it ran (the lines each section of
docs/benchmarks.md starts with), a synthetic training batch, device syncs, the timing loop and
its result, and pinning to one CPU core."""
from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

# The repository root of a clone (the default data and docs paths; paths shown relative to it).
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DATA_ROOT = REPO_ROOT / "datasets" / "bccd" / "VOCdevkit"


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (platform.processor() as a fallback)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def load_average() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def environment_lines(device: str = "cpu") -> list[str]:
    """Markdown bullets: date, device (GPU name or CPU model), library versions, machine load."""
    import torchvision

    today = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    if device.startswith("cuda") and torch.cuda.is_available():
        name = f"{torch.cuda.get_device_name(torch.device(device))} (CUDA {torch.version.cuda}), " \
               f"host {cpu_model()}"
    else:
        name = cpu_model()
    return [f"- date (UTC): {today}",
            f"- device: {name}; {os.cpu_count()} logical CPUs on the machine, "
            f"{torch.get_num_threads()} torch CPU threads",
            f"- python {platform.python_version()}, torch {torch.__version__}, torchvision "
            f"{torchvision.__version__}, numpy {np.__version__}",
            f"- load average when it started: {load_average()} (other processes on the machine "
            f"inflate wall-clock times)"]


def shown_path(path: str | Path) -> str:
    """``path`` relative to the repository when it lies inside it (docs name no machine's paths)."""
    try:
        return str(Path(path).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def figure(value: float) -> str:
    """At least 3 significant digits (CPU rates can be under 1 image/s), no exponent."""
    if not math.isfinite(value) or value <= 0:
        return f"{value:g}"
    return f"{value:.{max(0, 2 - math.floor(math.log10(value)))}f}"


def synthetic_batch(batch: int, device: torch.device, seed: int = 0, num_classes: int = 21
                    ) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    """A training batch as the loader gives it: uint8 ``(B, 3, 300, 300)`` images on ``device``
    (SSD300 normalises them itself) and, on the CPU, 1-5 random xyxy boxes per image in
    300-pixel space with labels in 1..num_classes-1."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch, 3, 300, 300), generator=g, dtype=torch.uint8)
    targets = []
    for _ in range(batch):
        n = int(torch.randint(1, 6, (1,), generator=g))
        xy = torch.rand(n, 2, generator=g) * 200
        wh = 20 + torch.rand(n, 2, generator=g) * 80
        targets.append({"boxes": torch.cat([xy, xy + wh], 1),
                        "labels": torch.randint(1, num_classes, (n,), generator=g)})
    return images.to(device), targets


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing to wait for on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Result:
    """Throughput of one timed step function."""

    images_per_s: float
    ms_per_batch: float
    peak_mb: float | None  # CUDA only


def time_steps(step: Callable[[], Any], device: torch.device, batch: int, steps: int, warmup: int,
               repeats: int = 3) -> Result:
    """Median over ``repeats`` blocks of ``steps`` calls of ``step`` (each a batch of ``batch``
    images), after ``warmup`` calls; blocks are timed between device syncs, none inside."""
    for _ in range(warmup):
        step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rates = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
        rates.append(steps * batch / (time.perf_counter() - start))
    rate = statistics.median(rates)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return Result(rate, 1000 * batch / rate, peak)


def timed(fn: Callable[[], Any], device: torch.device, clock: str = "wall") -> float:
    """Seconds one call of ``fn`` takes, between device syncs: wall-clock, or this process's CPU
    time (``clock="cpu"``, CPU only: on a machine shared with other jobs it leaves out the time
    the job waited for a core)."""
    read = time.process_time if clock == "cpu" and device.type == "cpu" else time.perf_counter
    sync(device)
    start = read()
    fn()
    sync(device)
    return read() - start


@contextlib.contextmanager
def one_core() -> Iterator[str]:
    """Within the block, this process and its torch, OpenCV and BLAS/OpenMP thread pools run on
    one core (restored afterwards); yields what was done."""
    import cv2

    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    threads, cv2_threads = torch.get_num_threads(), cv2.getNumThreads()
    core = max(affinity) if affinity else None
    with contextlib.ExitStack() as stack:
        try:
            from threadpoolctl import threadpool_limits

            stack.enter_context(threadpool_limits(1))
            pools = "threadpoolctl limits 1"
        except ImportError:  # numpy's element-wise ops are single-threaded anyway
            pools = "threadpoolctl not installed"
        try:
            if core is not None:
                os.sched_setaffinity(0, {core})
            cv2.setNumThreads(1)
            torch.set_num_threads(1)
            yield (f"CPU {core}" if core is not None else "no affinity control") + f", {pools}"
        finally:
            if affinity:
                os.sched_setaffinity(0, affinity)
            cv2.setNumThreads(cv2_threads)
            torch.set_num_threads(threads)


def add_data_root(p: argparse.ArgumentParser) -> None:
    """``--data-root``, the bundled BCCD devkit by default."""
    p.add_argument("--data-root", default=str(DEFAULT_DATA_ROOT))
