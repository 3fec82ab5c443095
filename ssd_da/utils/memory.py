"""What autograd keeps for backward, measured with ``torch.autograd.graph.saved_tensors_hooks``."""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

__all__ = ["saved_tensor_bytes"]


def saved_tensor_bytes(fn: Callable[..., Any], *args: Any, exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the distinct storages that autograd saves for backward while ``fn(*args)`` runs.

    A storage saved by several operations (``x`` read by a product and by a reduction, or a
    view of it) counts once, as it is held once. Tensors in ``exclude`` (parameters, which are
    held anyway) are left out. The result of ``fn`` is dropped.
    """
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in skip:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn(*args)
    return sum(storages.values())
