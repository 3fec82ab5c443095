"""Count the operations that would make the host wait for the device, on any device.

On a GPU, reading a tensor's value on the host (``.item()``, ``bool(t)``, ``.tolist()``,
``.cpu()``, ``.numpy()``) or an operation whose output size depends on values (``nonzero``,
boolean-mask indexing, ``masked_select``, ``unique``) blocks until the device has finished
all queued work. ``torch.cuda.set_sync_debug_mode`` reports these on CUDA only; this counter
sees the same calls on the CPU as well, so a test can assert that a training step makes none
(see tests/test_utils_sync.py).
"""
from __future__ import annotations

import contextlib
from collections import Counter
from typing import Any, Iterable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakTensorKeyDictionary

__all__ = ["HostReads", "count_host_reads"]

_aten = torch.ops.aten
# aten operations that read values on the host: scalar reads (item, bool, int, float) and
# outputs whose size depends on the data.
_VALUE_OPS = {_aten._local_scalar_dense.default, _aten.nonzero.default, _aten.masked_select.default,
              _aten.unique_dim.default, _aten._unique2.default, _aten.unique_consecutive.default}
_INDEX_OPS = {_aten.index.Tensor, _aten.index_put.default, _aten.index_put_.default}
# Tensor methods that copy to the host (on the CPU they do nothing, so aten never sees them).
_HOST_METHODS = ("tolist", "cpu", "numpy", "__array__")


class HostReads(TorchDispatchMode):
    """Dispatch mode recording each host read of a device tensor; ``counts`` maps a name to how
    often it ran.

    On a CPU run every tensor is on the CPU, so "device tensor" means: not host data. Host
    data are the tensors given as ``host`` (e.g. the loader's targets, which stay on the CPU in
    a GPU run too) and every result computed from host data alone; reading those is no sync.
    """

    def __init__(self, host: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()
        self.host = WeakTensorKeyDictionary()
        for tensor in host:
            self.host[tensor] = True

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def is_host(self, tensor: torch.Tensor) -> bool:
        return tensor in self.host

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        on_host = bool(inputs) and all(self.is_host(t) for t in inputs)
        if not on_host and func in _VALUE_OPS:
            self.counts[str(func.overloadpacket.__name__)] += 1
        elif not on_host and func in _INDEX_OPS:
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices):
                self.counts["boolean-mask indexing"] += 1
        out = func(*args, **kwargs)
        if on_host:
            for tensor in tree_leaves(out):
                if isinstance(tensor, torch.Tensor):
                    self.host[tensor] = True
        return out


@contextlib.contextmanager
def count_host_reads(host: Iterable[torch.Tensor] = ()) -> Iterator[HostReads]:
    """Within the block, count host reads of device tensors (see :class:`HostReads` for what
    ``host`` means): aten scalar reads and data-dependent ops (seen in forward and in a
    backward run on this thread, which is where autograd runs CPU work) and calls of
    ``Tensor.tolist/cpu/numpy/__array__``."""
    mode = HostReads(host)
    originals = {name: getattr(torch.Tensor, name) for name in _HOST_METHODS}

    def counting(name: str) -> Any:
        original = originals[name]

        def method(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if not mode.is_host(self):
                mode.counts[f"Tensor.{name}"] += 1
            return original(self, *args, **kwargs)
        return method

    try:
        for name in _HOST_METHODS:
            setattr(torch.Tensor, name, counting(name))
        with mode:
            yield mode
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
