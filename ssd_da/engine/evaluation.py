"""Evaluation during training, in two parts: :func:`compute_metrics` (the test split's VOC mAP,
sharded over the processes and gathered, and pycocotools' figures at the end) and
:func:`keep_best` (the record in ``log.jsonl``, the log lines, ``best.pth``)."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ssd_da.config import Config
from ssd_da.engine import distributed as dist_utils
from ssd_da.engine.checkpoint import save_checkpoint, training_checkpoint
from ssd_da.engine.inference import coco_metrics_of, evaluate_model, format_coco
from ssd_da.engine.loaders import resolve_workers
from ssd_da.engine.runlog import RunLog
from ssd_da.engine.state import TrainState
from ssd_da.evaluation.voc import VOCResult

logger = logging.getLogger(__name__)


@dataclass
class Metrics:
    """One evaluation: the VOC result, the detections aligned with the test set, the images per
    second of the inference, and pycocotools' figures (None but at the end)."""
    result: VOCResult
    detections: list[dict[str, np.ndarray]]
    images_per_s: float
    coco: dict[str, float] | None


def evaluation_due(it: int, cfg: Config) -> bool:
    return bool(cfg.eval_every and it % cfg.eval_every == 0) or it == cfg.iters


def compute_metrics(model: torch.nn.Module, test_set: Any, class_names: list[str], cfg: Config,
                    device: torch.device, final: bool) -> Metrics:
    """VOC mAP of ``model`` (DDP-wrapped or not; left in train mode) on the test split, every
    process scoring a shard and all gathering the result; with ``final`` pycocotools' metrics
    too (main process): the official ones on COCO-format data; on VOC data pycocotools' AP50 /
    AP@[.5:.95], which results.md shows beside the LGA paper's mAP50 / mAP50-95 (those from
    YOLOv8's validator: not directly comparable). Once, at the end: pycocotools is slow."""
    model = dist_utils.unwrap(model)
    if dist_utils.is_distributed():
        # Without SyncBN each rank's running statistics drift apart; evaluate every shard with
        # rank 0's, i.e. with the model that best.pth stores.
        for buffer in model.buffers():
            torch.distributed.broadcast(buffer, 0)
    # The machine's cores are shared by every process of the run, as in training.
    workers = resolve_workers(cfg.workers, dist_utils.get_world_size())
    result, detections, images_per_s = evaluate_model(model, test_set, class_names, device,
                                              cfg.eval_batch_size, workers,
                                              cfg.amp, cfg.metric, progress=dist_utils.is_main_process(),
                                              channels_last=cfg.channels_last)
    model.train()
    coco = coco_metrics_of(test_set, detections) if final and dist_utils.is_main_process() else None
    return Metrics(result, detections, images_per_s, coco)


def keep_best(state: TrainState, metrics: Metrics, class_names: list[str], cfg: Config,
              out_dir: Path, log: RunLog) -> None:
    """The evaluation kept in ``state`` and logged; ``best.pth`` written when the mAP improves
    (main process): best.pth is therefore selected on the test split, and last.pth is the one
    to report."""
    result, coco = metrics.result, metrics.coco
    state.evaluated_at, state.final_map = state.iteration, float(result.map)
    log.write({"iter": state.iteration, "map": result.map, "ap": result.ap,
               "eval_images_per_s": metrics.images_per_s, **({"coco": coco} if coco else {})})
    if not dist_utils.is_main_process():
        return
    logger.info("iteration %d: %s mAP %.2f%%", state.iteration, cfg.metric, 100 * result.map)
    if state.iteration >= cfg.iters:
        logger.info("final evaluation on %s:\n%s", cfg.test_split, result.table())
    if coco:
        logger.info("COCO metrics (pycocotools): %s", format_coco(coco))
    # best.pth is the checkpoint with the highest mAP on the TEST split (VOC07 test by
    # default; there is no separate validation split), so its mAP is optimistically biased:
    # report last.pth's (the final) mAP, as tools/ablate.py does.
    if result.map > state.best_map:
        state.best_map = float(result.map)
        save_checkpoint(training_checkpoint(state, cfg, class_names, resumable=False),
                        out_dir / "best.pth")


def evaluate(state: TrainState, test_set: Any, class_names: list[str], cfg: Config,
             device: torch.device, out_dir: Path, log: RunLog) -> float:
    """:func:`compute_metrics` then :func:`keep_best`; returns the mAP."""
    metrics = compute_metrics(state.model, test_set, class_names, cfg, device,
                              final=state.iteration >= cfg.iters)
    keep_best(state, metrics, class_names, cfg, out_dir, log)
    return float(metrics.result.map)
