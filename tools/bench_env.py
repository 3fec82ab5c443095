"""Where and when a benchmark ran: the lines every section of docs/benchmarks.md starts with."""
from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path

import numpy as np


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
    import torch
    import torchvision

    today = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    if device.startswith("cuda") and torch.cuda.is_available():
        name = f"{torch.cuda.get_device_name(torch.device(device))} (CUDA {torch.version.cuda}), " \
               f"host {cpu_model()}"
    else:
        name = cpu_model()
    return [f"- date (UTC): {today}",
            f"- device: {name}; {os.cpu_count()} logical CPUs on the machine",
            f"- python {platform.python_version()}, torch {torch.__version__}, torchvision "
            f"{torchvision.__version__}, numpy {np.__version__}",
            f"- load average when it started: {load_average()} (other processes on the machine "
            f"inflate wall-clock times)"]


def shown_path(path: str | Path) -> str:
    """``path`` relative to the repository when it lies inside it (docs name no machine's paths)."""
    root = Path(__file__).resolve().parents[1]
    try:
        return str(Path(path).resolve().relative_to(root))
    except ValueError:
        return str(path)
