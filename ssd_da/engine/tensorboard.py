"""TensorBoard events of a run (``--tensorboard``): a copy of ``log.jsonl``'s scalars in
``<output_dir>/tensorboard/``, for dashboards (``tensorboard --logdir runs/``).

The events are written from the log's records as the trainer writes them, and rebuilt from the
log whenever a run is resumed: the log has just been cut back to the checkpoint, so the records a
stopped session wrote after its last checkpoint disappear from the curves too, and the resumed
run continues them with no step written twice. (TensorBoard's own remedy, ``purge_step``, only
hides the old events from TensorBoard's loader; other readers would still see two values for one
step.) Rebuilt events carry the time of the rebuild, not of the original step.

Tags: ``train/<term>`` for each loss term and their sum ``train/loss``, ``train/lr``,
``train/images_per_s`` and ``train/data_wait`` (the share of the loop's time spent waiting for
the next batch); ``eval/map``, ``eval/images_per_s``, ``eval/ap_<class>`` and pycocotools'
``eval/coco_<metric>`` at the final evaluation. The step is the iteration.
"""
from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any, Iterable

__all__ = ["TENSORBOARD_DIR", "scalars_of", "TensorBoardScalars"]

TENSORBOARD_DIR = "tensorboard"


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def scalars_of(record: dict[str, Any]) -> dict[str, float]:
    """{tag: value} of one log record; undefined values (NaN AP of a class without ground
    truth, null) are left out."""
    evaluation = "map" in record
    out: dict[str, float] = {}
    for key, value in record.items():
        if key == "iter":
            continue
        if isinstance(value, dict):  # ap: class -> AP; coco: metric -> value
            out.update({f"eval/{key}_{k}": float(v) for k, v in value.items() if _finite(v)})
        elif _finite(value):
            name = key.removeprefix("eval_") if evaluation else key
            out[f"{'eval' if evaluation else 'train'}/{name}"] = float(value)
    return out


class TensorBoardScalars:
    """Writes log records as scalar events into ``folder`` (created on :meth:`reset`)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self._writer = None

    def reset(self, records: Iterable[dict[str, Any]]) -> None:
        """Replace the folder's events with ``records`` (the log as it stands)."""
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        self.close()
        if self.folder.exists():
            shutil.rmtree(self.folder)
        self._writer = SummaryWriter(log_dir=str(self.folder))
        for record in records:
            self._add(record)
        self._writer.flush()

    def write(self, record: dict[str, Any]) -> None:
        """One record, flushed at once: a run killed later keeps every step it logged."""
        if self._writer is None:
            raise RuntimeError("TensorBoardScalars.write before reset")
        self._add(record)
        self._writer.flush()

    def _add(self, record: dict[str, Any]) -> None:
        for tag, value in scalars_of(record).items():
            self._writer.add_scalar(tag, value, global_step=record["iter"])

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
