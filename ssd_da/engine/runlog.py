"""The run log, ``<output_dir>/log.jsonl``: one JSON object per line, written by rank 0.

Training records hold ``iter``, the loss terms, ``lr``, ``images_per_s`` and ``data_wait`` (the
share of the time since the last record spent waiting for batches); evaluation records
hold ``iter``, ``map``, ``ap`` (class -> AP) and ``eval_images_per_s``. An undefined AP (a class
without ground truth) is written ``null``, as ``eval_voc.py --json`` does: JSON has no NaN, and
other JSON readers reject Python's ``NaN``. Every reader of the log (the trainer on resume, the
curves plot, the ablation runner) goes through :func:`read_run_log`, so a damaged line is treated
the same way everywhere, and ``null`` APs come back as NaN.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["RunLog", "read_run_log", "to_json"]


def read_run_log(path: str | Path) -> list[dict[str, Any]]:
    """The records of a log, in file order; ``[]`` if the file does not exist.

    A line that is not a JSON object with an integer ``iter`` (a crash mid-write leaves a torn
    last line) is skipped with a warning naming the file and line."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("iter"), int):
            logger.warning("%s:%d: not a log record (torn or edited line); skipped", path, number)
            continue
        records.append(_from_json(record))
    return records


def to_json(value: Any) -> Any:
    """NaN and infinities -> None, in nested dicts and lists: JSON has no NaN (the log and
    ``eval_voc.py --json`` alike)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    return value


def _from_json(record: dict[str, Any]) -> dict[str, Any]:
    """An evaluation record's ``null`` mAP / APs back to NaN (undefined, as evaluate_voc says)."""
    if "map" in record:
        record["map"] = math.nan if record["map"] is None else record["map"]
        if isinstance(record.get("ap"), dict):
            record["ap"] = {k: math.nan if v is None else v for k, v in record["ap"].items()}
    return record


class RunLog:
    """Appends records to ``path``; a no-op when not ``enabled`` (ranks other than 0). A
    ``mirror`` (:meth:`mirror_to`, e.g. TensorBoard events) receives every record too."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = Path(path), enabled
        self.mirror: Any = None

    def mirror_to(self, mirror: Any) -> None:
        """Copy every record to ``mirror`` from now on, after replacing what it holds with the
        log as it stands (``mirror.reset(records)``; ``mirror.write(record)`` per record)."""
        if self.enabled:
            self.mirror = mirror
            mirror.reset(read_run_log(self.path))

    def close(self) -> None:
        if self.mirror is not None:
            self.mirror.close()
            self.mirror = None

    def truncate_after(self, iteration: int, evaluation_pending: bool = False) -> None:
        """Drop records past ``iteration`` (written after the checkpoint a run resumes from),
        and lines :func:`read_run_log` skips; with ``evaluation_pending`` also the evaluation
        record of ``iteration`` itself (the resumed run evaluates that iteration again)."""
        if self.enabled and self.path.exists():
            keep = [r for r in read_run_log(self.path) if r["iter"] < iteration or (
                r["iter"] == iteration and not (evaluation_pending and "map" in r))]
            self.path.write_text("".join(self._line(r) for r in keep))
            if self.mirror is not None:
                self.mirror.reset(keep)

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as fh:
                fh.write(self._line(record))
            if self.mirror is not None:
                self.mirror.write(record)

    @staticmethod
    def _line(record: dict[str, Any]) -> str:
        return json.dumps(to_json(record), allow_nan=False) + "\n"
