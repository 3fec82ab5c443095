"""A pretend one-GPU machine for tests/test_engine_cuda_contract.py: ``torch.cuda`` as a machine with
GPUs shows it before CUDA is initialised, on a machine without any."""
from __future__ import annotations

import sys
from typing import Any, Callable

import pytest
import torch


class FirstCudaUse(BaseException):
    """Raised where the code first initialises CUDA: the pretend machine has no GPU to go on
    with. A BaseException, so that no ``except Exception`` in the code under test hides it."""


class PretendGPU:
    """``torch.cuda`` as a machine with ``devices`` GPUs shows it before CUDA is initialised.

    CUDA counts as initialised only after what initialises it in torch: ``torch.cuda.init``,
    ``torch.cuda.set_device`` and ``torch.cuda._lazy_init``, which torch's C++ side calls for
    the first CUDA tensor, ``.to("cuda")`` and every device query. Before that, the caching
    allocator's statistics resets raise as torch's do ("Invalid device argument : did you call
    init?"). With ``stop`` the first initialisation raises :class:`FirstCudaUse`; without it the
    machine counts itself initialised and goes on (for code that never makes a CUDA tensor).
    ``calls`` lists, in order, every initialisation and reset that ran.
    """

    INITIALISERS = ("init", "_lazy_init", "set_device")
    RESETS = ("_cuda_resetPeakMemoryStats", "_cuda_resetAccumulatedMemoryStats")

    def __init__(self, monkeypatch: pytest.MonkeyPatch, devices: int = 1, stop: bool = True) -> None:
        self.initialised, self.stop, self.calls = False, stop, []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: devices)
        monkeypatch.setattr(torch.cuda, "is_initialized", lambda: self.initialised)
        original = torch.cuda._lazy_init
        for name in self.INITIALISERS:
            monkeypatch.setattr(torch.cuda, name, self._initialiser(name))
        for module in [m for n, m in sys.modules.items() if n.startswith("torch.cuda.")]:
            if getattr(module, "_lazy_init", None) is original:  # bound by name (torch.cuda.random)
                monkeypatch.setattr(module, "_lazy_init", self._initialiser("_lazy_init"))
        for name in self.RESETS:  # what torch.cuda.reset_peak_memory_stats & co. call
            monkeypatch.setattr(torch._C, name, self._reset(name), raising=False)  # CPU-only builds

    def _initialiser(self, name: str) -> Callable[..., None]:
        def initialise(*args: Any, **kwargs: Any) -> None:
            self.calls.append(f"{name}({args[0]})" if name == "set_device" else name)
            self.initialised = True
            if self.stop:
                raise FirstCudaUse(name)
        return initialise

    def _reset(self, name: str) -> Callable[..., None]:
        def reset(*args: Any) -> None:
            self.calls.append(name)
            if not self.initialised:
                raise RuntimeError("Invalid device argument : did you call init?")
        return reset
