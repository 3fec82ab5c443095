"""Device choice and mixed precision: torch only, so that any layer (tools, benchmarks, the
trainer, inference) can import it without pulling in the data pipeline or the config."""
from __future__ import annotations

import contextlib

import torch

__all__ = ["autocast_context", "runs_bf16", "resolve_device", "CPU_AMP"]

# torch has bf16 autocast on the CPU as well, but on CPUs without bf16 instructions it is slower
# than float32, so --amp is a CUDA option. Tests set this to True to run the bf16 paths through
# the same switch on the CPU (tests/test_engine_cuda_contract.py): the autocast regions and the float32
# casts of the loss and the post-processing.
CPU_AMP = False


def autocast_context(device: torch.device, amp: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA when ``amp`` (on the CPU too when :data:`CPU_AMP`); a no-op
    otherwise (CPU runs stay float32).

    bf16 has float32's exponent range, so no loss scaling (GradScaler) is needed."""
    if runs_bf16(device, amp):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def runs_bf16(device: torch.device, amp: bool) -> bool:
    """Whether :func:`autocast_context` turns bf16 autocast on (for labels in reports)."""
    return amp and (device.type == "cuda" or (device.type == "cpu" and CPU_AMP))


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``--device`` value -> torch.device. "auto" is cuda when available, else cpu; a bare
    "cuda" becomes ``cuda:<local_rank>`` (one process per GPU under torchrun). ValueError for a
    malformed name or a CUDA device this machine does not have."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device: {name!r} is not a device; "
                         "valid: auto, cpu, cuda, cuda:<index>")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    if device.type == "cuda" and (not torch.cuda.is_available()
                                  or device.index >= torch.cuda.device_count()):
        raise ValueError(f"--device: {name!r} is not available here "
                         f"({torch.cuda.device_count()} CUDA device(s)); use --device cpu")
    return device
