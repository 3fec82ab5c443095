"""torchrun / DistributedDataParallel helpers: nothing home-made beyond reading torchrun's env."""
from __future__ import annotations

import hashlib
import os

import torch
import torch.distributed as dist


def init_distributed(device_type: str) -> tuple[int, int, int]:
    """Initialise the default process group when launched by ``torchrun``.

    Returns ``(rank, local_rank, world_size)``; ``(0, 0, 1)`` for a plain single-process run.
    The backend is NCCL on CUDA and gloo otherwise (CPU tests run two gloo processes).
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 0, 1
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    return rank, local_rank, world


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of ``value`` over all processes (a copy; the input is left unchanged)."""
    if not is_distributed():
        return value
    out = value.detach().clone()
    dist.all_reduce(out)
    return out / get_world_size()


def all_gather_objects(obj: object) -> list[object]:
    """Every process's ``obj``, in rank order (used to gather detections for evaluation)."""
    if not is_distributed():
        return [obj]
    out: list[object] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def parameter_digest(model: torch.nn.Module) -> str:
    """SHA-256 of the parameters' names and exact bytes (buffers left out)."""
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        digest.update(name.encode())
        digest.update(param.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_replicas_agree(model: torch.nn.Module) -> list[str]:
    """RuntimeError unless every process holds bit-identical parameters, as DDP guarantees
    (same initial weights broadcast by DDP, all-reduced gradients, same optimizer). Buffers
    are left out: BatchNorm running statistics are per process unless SyncBatchNorm is on.
    Returns every rank's :func:`parameter_digest`, in rank order (one outside torchrun)."""
    if not is_distributed():
        return [parameter_digest(model)]
    digests = all_gather_objects(parameter_digest(model))
    if len(set(digests)) != 1:
        raise RuntimeError(f"DistributedDataParallel replicas diverged: parameter digests per "
                           f"rank {digests}")
    return digests


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DistributedDataParallel wrapper (``model`` itself otherwise)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def cleanup() -> None:
    if is_distributed():
        dist.destroy_process_group()
