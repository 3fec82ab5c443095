"""Checkpoints: written atomically, checked against the architecture they are loaded into, and
(for ``last.pth``) holding everything an exact ``--resume`` needs.

A checkpoint is a dict: ``model`` (state dict), ``backbone``, ``class_names``, ``config`` (the
resolved config), ``iteration``, ``best_map``, ``evaluated_at`` and ``final_map`` (the iteration and
mAP of the latest evaluation; last.pth is written before an evaluation and again after it, so
``evaluated_at < iteration`` says the evaluation due at ``iteration`` has not been done: a
resumed run does it first), ``backbone_init``, ``world_size``, ``timing``;
``last.pth`` adds ``optimizer``, ``scheduler``, ``scaler`` (the GradScaler whose on-device
check skips non-finite steps; its scale stays 1 in a healthy run) and ``rng`` (Python, numpy,
torch and CUDA generator states). Older checkpoints may hold an empty ``scaler`` entry (a
disabled scaler) or none; the scaler then starts afresh.

Opening a checkpoint never runs code: every file is read with ``torch.load(weights_only=True)``,
which rebuilds only tensors, numbers, strings, lists, tuples and dicts. Everything saved here is
of those types (numpy's generator state is stored as a plain tuple of ints); checkpoints of
earlier versions, whose numpy state is an array, load too, with numpy's array reconstruction
allowed for that one read (it builds arrays of plain data, never calls anything else). A pickle
that names anything else (``os.system``, a class of another program) is refused with
:class:`CheckpointError` before any of it runs.
"""
from __future__ import annotations

import errno
import logging
import os
import pickle
import random
import re
import resource
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ssd_da.config import saved_value
from ssd_da.engine import distributed as dist_utils
from ssd_da.models.ssd import build_ssd

from ssd_da.engine.state import TrainState

if TYPE_CHECKING:
    from ssd_da.config import Config

logger = logging.getLogger(__name__)
# Entries of last.pth that only resuming needs; best.pth leaves them out.
RESUME_KEYS = ("optimizer", "scheduler", "rng")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used for what was asked (names the file and why)."""


_SPACE_ERRORS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
                 errno.EFBIG: "file too large"}


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (no space, quota, file-size limit); the message names
    the file, the free space and says that the previous checkpoint is intact."""


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write ``state`` to ``path`` atomically: a crash mid-write never leaves a torn file.

    The temporary file lives in the same folder so that ``os.replace`` is a rename on one
    filesystem, which POSIX guarantees to be atomic. A full disk, a quota or a file-size limit
    raises :class:`CheckpointWriteError` (the temporary removed, ``path`` untouched).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; checkpoints are shared like any output
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        code = _space_errno(exc)
        if code is not None:
            raise CheckpointWriteError(code, _write_failure(path, code)) from exc
        raise


def _space_errno(exc: BaseException) -> int | None:
    """The errno of a lack of space in ``exc`` or its context: torch's writer reports the
    OSError of the file's write as "unexpected pos" and keeps it only as the context."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _SPACE_ERRORS:
            return seen.errno
        seen = seen.__cause__ or seen.__context__
    return None


def _write_failure(path: Path, code: int) -> str:
    """What happened, the free space, the limit and the state of the previous checkpoint."""
    usage = shutil.disk_usage(path.parent)
    limit = ""
    if code == errno.EFBIG:
        soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if soft != resource.RLIM_INFINITY:
            limit = f"; the file-size limit (ulimit -f) is {soft / 2**20:.1f} MiB"
    previous = (f"the previous {path} is intact" if path.exists()
                else f"no earlier {path.name} existed there")
    return (f"{_SPACE_ERRORS[code]} while writing {path}: {usage.free / 2**20:.0f} MiB free on "
            f"the filesystem of {path.parent} ({usage.total / 2**30:.1f} GiB){limit}; {previous} "
            f"(the partial file was removed). Free some space or raise the limit, then continue "
            f"from the last checkpoint with --resume")


def _numpy_array_globals() -> list[Any]:
    """What unpickling a numpy array of plain data needs, under the names numpy 1 and numpy 2
    write (``numpy.core`` became ``numpy._core``): for checkpoints of earlier versions, whose
    RNG state holds numpy's generator state as an array."""
    core = getattr(np, "_core", None) or np.core
    reconstruct = core.multiarray._reconstruct
    return [(reconstruct, "numpy.core.multiarray._reconstruct"),
            (reconstruct, "numpy._core.multiarray._reconstruct"), np.ndarray, np.dtype,
            type(np.dtype(np.uint32))]  # numpy >= 1.25 builds dtypes of their own class


def _refusal(path: Path, exc: Exception) -> str:
    """Why torch.load(weights_only=True) refused ``path``, in one line naming what it holds."""
    names: list[str] = []
    try:  # reads the pickle's names without running anything
        names = list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # noqa: BLE001 (older torch, or not a zip checkpoint: use the message)
        names = re.findall(r"GLOBAL ([\w.]+)", str(exc))[:1]
    allowed = {"numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct",
               "numpy.ndarray", "numpy.dtype", "numpy.dtypes.UInt32DType"}
    names = [n for n in names if n not in allowed] or names
    what = ", ".join(names[:5]) if names else "objects other than tensors and plain data"
    return (f"checkpoint {path} refused: it holds pickled {what}, which opening it would run "
            f"or build (a checkpoint of ssd_da holds only tensors, numbers, strings, lists and "
            f"dicts). It was not written by this project's tools, or was altered; do not open "
            f"it with torch.load(weights_only=False) unless you trust its source. Use a "
            f"last.pth / best.pth written by tools/train.py")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` without running any code from it
    (``weights_only=True``; module docstring); clear errors for anything else."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder; give the .pth file in it, "
                              f"e.g. {path / 'last.pth'}")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        with torch.serialization.safe_globals(_numpy_array_globals()):
            state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:  # weights_only refused a global: never retry unsafely
        raise CheckpointError(_refusal(path, exc)) from None
    except Exception as exc:  # zip/format errors: say which file, keep the cause
        raise CheckpointError(f"checkpoint {path} could not be read: {exc}") from exc
    if not isinstance(state, dict) or "model" not in state or "backbone" not in state:
        raise CheckpointError(
            f"checkpoint {path} is not an ssd_da detector checkpoint (expected a dict with "
            f"'model', 'backbone' and 'class_names'; got keys {sorted(state)[:10] if isinstance(state, dict) else type(state).__name__})"
        )
    return state


def load_model_state(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Load a state dict strictly, turning key and shape mismatches into one readable error."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = [
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state_dict and tuple(own[k].shape) != tuple(state_dict[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches (e.g. {'; '.join(shapes[:3])})")
        raise CheckpointError(
            f"{source} does not fit this model architecture: " + "; ".join(parts)
        )
    model.load_state_dict(state_dict)


def rng_states() -> dict[str, Any]:
    """The Python, numpy, torch (and CUDA, when this process uses it) generator states, in
    types that ``torch.load(weights_only=True)`` reads: numpy's legacy state tuple with its key
    array as a list of ints.

    "Uses" is ``torch.cuda.is_initialized()``, not ``is_available()``: reading the CUDA state
    initialises CUDA, which would start a context (and take GPU memory) in a ``--device cpu``
    run on a GPU machine."""
    name, key, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    states = {"python": random.getstate(),
              "numpy": (str(name), [int(k) for k in key], int(pos), int(has_gauss), float(gauss)),
              "torch": torch.get_rng_state()}
    if torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Inverse of :func:`rng_states`; a CUDA state is restored only in a process that uses
    CUDA (the resumed run's model is on its device by then), never by starting CUDA. Also
    takes the numpy array form that earlier versions saved."""
    random.setstate(states["python"])
    name, key, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((name, np.asarray(key, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_initialized():
        torch.cuda.set_rng_state(states["cuda"])


def training_checkpoint(state: TrainState, cfg: Config, class_names: list[str],
                        resumable: bool = True) -> dict[str, Any]:
    """The checkpoint dict of a training run (module docstring); ``resumable=False`` leaves
    out optimizer, scheduler and RNG states (best.pth is for evaluation)."""
    ckpt = {
        "model": dist_utils.unwrap(state.model).state_dict(), "backbone": cfg.backbone,
        "class_names": class_names, "config": cfg.to_dict(), "iteration": state.iteration,
        "best_map": state.best_map, "evaluated_at": state.evaluated_at,
        "final_map": state.final_map, "backbone_init": state.backbone_init,
        "world_size": dist_utils.get_world_size(), "timing": dict(state.timing),
    }
    if resumable:
        ckpt.update(optimizer=state.optimizer.state_dict(), scheduler=state.scheduler.state_dict(),
                    scaler=state.scaler.state_dict(), rng=rng_states())
    return ckpt


def check_resumable(path: str | Path, cfg: Config, class_names: list[str]) -> dict[str, Any]:
    """The checkpoint at ``path``, checked before any work: the same backbone and classes as
    ``cfg``, the optimizer state of a last.pth, an iteration not past ``cfg.iters``."""
    ckpt = load_checkpoint(path)
    if ckpt["backbone"] != cfg.backbone or list(ckpt["class_names"]) != class_names:
        raise CheckpointError(
            f"--resume {path}: checkpoint is {ckpt['backbone']} with classes "
            f"{ckpt['class_names']}, but this run is {cfg.backbone} with classes {class_names}")
    if any(key not in ckpt for key in RESUME_KEYS):
        raise CheckpointError(f"--resume {path}: no optimizer state (use last.pth, not best.pth)")
    if int(ckpt["iteration"]) > cfg.iters:
        raise CheckpointError(f"--resume {path}: the checkpoint is at iteration "
                              f"{ckpt['iteration']}, past iters={cfg.iters}")
    return ckpt


def restore_training_state(state: TrainState, ckpt: dict[str, Any], path: str | Path) -> None:
    """Continue exactly: weights, optimizer, scheduler, iteration, timing and RNG states, from
    a checkpoint dict that :func:`check_resumable` read from ``path``."""
    load_model_state(dist_utils.unwrap(state.model), ckpt["model"], f"--resume {path}")
    state.optimizer.load_state_dict(ckpt["optimizer"])
    state.scheduler.load_state_dict(ckpt["scheduler"])
    if ckpt.get("scaler"):  # empty when saved by a disabled scaler (older checkpoints)
        state.scaler.load_state_dict(ckpt["scaler"])
    state.iteration, state.best_map = int(ckpt["iteration"]), float(ckpt["best_map"])
    # Written before these keys existed, last.pth followed its evaluation: -1 re-evaluates a
    # due one (same result), which is safe either way.
    state.evaluated_at = int(ckpt.get("evaluated_at", -1))
    # "last_map": the key's name before it became "final_map" (summary.json's word).
    state.final_map = float(ckpt.get("final_map", ckpt.get("last_map", float("nan"))))
    state.last_saved = (Path(path), state.iteration)
    state.timing.update(ckpt.get("timing", {}))
    state.backbone_init = ckpt.get("backbone_init", state.backbone_init)
    set_rng_states(ckpt["rng"])
    saved_world, world = ckpt.get("world_size", 1), dist_utils.get_world_size()
    if saved_world != world:
        logger.warning("--resume %s: saved with %d process(es), resumed with %d: the data order "
                       "differs from the uninterrupted run", path, saved_world, world)
    logger.info("resumed from %s at iteration %d", path, state.iteration)


def load_detector(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the detector a checkpoint was trained as and load its weights.

    Returns ``(model in eval mode on device, checkpoint dict)``; the checkpoint's ``backbone``,
    ``class_names`` and ``config["attention_init"]`` (missing: "default", what runs saved
    without the key used; ``ssd_da.config.saved_value``) decide the
    architecture, so a file from another architecture fails here
    with a message naming it rather than deep inside ``load_state_dict``.
    """
    state = load_checkpoint(path)
    class_names = list(state.get("class_names") or [])
    if not class_names:
        raise CheckpointError(f"checkpoint {path} has no 'class_names'")
    # attention_init="identity" adds a gate per attention module: rebuild with the run's own.
    attention_init = saved_value(state.get("config") or {}, "attention_init")
    try:
        model = build_ssd(state["backbone"], num_classes=len(class_names) + 1,
                          attention_init=attention_init)
    except ValueError as exc:
        raise CheckpointError(f"checkpoint {path}: {exc}") from exc
    load_model_state(model, state["model"], f"checkpoint {path} (backbone {state['backbone']})")
    return model.to(device).eval(), state
