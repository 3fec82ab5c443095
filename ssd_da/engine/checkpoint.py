"""Checkpoints: written atomically, and checked against the architecture they are loaded into."""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used for what was asked (names the file and why)."""


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write ``state`` to ``path`` atomically: a crash mid-write never leaves a torn file.

    The temporary file lives in the same folder so that ``os.replace`` is a rename on one
    filesystem, which POSIX guarantees to be atomic.
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
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (clear errors for anything else)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # pickle/zip errors: say which file, keep the cause
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


def load_detector(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the detector a checkpoint was trained as and load its weights.

    Returns ``(model in eval mode on device, checkpoint dict)``; the checkpoint's ``backbone``
    and ``class_names`` decide the architecture, so a file from another architecture fails here
    with a message naming it rather than deep inside ``load_state_dict``.
    """
    from ssd_da.models.ssd import build_ssd  # deferred: tools that never load models stay light

    state = load_checkpoint(path)
    class_names = list(state.get("class_names") or [])
    if not class_names:
        raise CheckpointError(f"checkpoint {path} has no 'class_names'")
    try:
        model = build_ssd(state["backbone"], num_classes=len(class_names) + 1)
    except ValueError as exc:
        raise CheckpointError(f"checkpoint {path}: {exc}") from exc
    load_model_state(model, state["model"], f"checkpoint {path} (backbone {state['backbone']})")
    return model.to(device).eval(), state
