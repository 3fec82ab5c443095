"""The run log, ``<output_dir>/log.jsonl``: one JSON object per line, written by rank 0.

Training records hold ``iter``, the loss terms, ``lr`` and ``images_per_s``; evaluation records
hold ``iter``, ``map``, ``ap`` (class -> AP) and ``eval_images_per_s``. Every reader of the log
(the trainer on resume, the curves plot, the ablation runner) goes through :func:`read_run_log`,
so a damaged line is treated the same way everywhere.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["RunLog", "read_run_log"]


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
        records.append(record)
    return records


class RunLog:
    """Appends records to ``path``; a no-op when not ``enabled`` (ranks other than 0)."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = Path(path), enabled

    def truncate_after(self, iteration: int) -> None:
        """Drop records past ``iteration`` (written after the checkpoint a run resumes from),
        and lines :func:`read_run_log` skips."""
        if self.enabled and self.path.exists():
            keep = [r for r in read_run_log(self.path) if r["iter"] <= iteration]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in keep))

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(record) + "\n")
