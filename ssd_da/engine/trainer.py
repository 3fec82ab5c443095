"""The training loop: plain functions, readable in one sitting (STYLE.md, detectron2's
plain_train_net and torchvision's references/detection/train.py are the models)."""
from __future__ import annotations

import functools
import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ssd_da.config import Config, save_config
from ssd_da.engine import distributed as dist_utils
from ssd_da.engine.checkpoint import CheckpointError, load_checkpoint, load_model_state, save_checkpoint
from ssd_da.engine.data import DATA_FORMATS, build_datasets, build_train_loader, class_names_from_config
from ssd_da.engine.inference import (autocast_context, coco_metrics_of, evaluate_model, format_coco,
                                     resolve_device)

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss; the last checkpoint on disk is the last good one."""


@dataclass
class TrainState:
    model: torch.nn.Module  # DDP-wrapped under torchrun
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    iteration: int = 0
    best_map: float = -1.0
    backbone_init: str = "none"  # what build_model loaded; a resumed run keeps the first one's
    # Summed over every session of a resumed run, so the summary describes the whole run:
    # train_s / images: the training loop (data loading in, evaluation out); wall_s: up to the
    # last checkpoint (time lost after it in an interrupted session is not counted).
    timing: dict[str, float] = field(default_factory=lambda: {"train_s": 0.0, "images": 0,
                                                              "wall_s": 0.0})


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_factor(it: int, cfg: Config) -> float:
    """Linear warmup from ``warmup_factor`` to 1 over ``warmup_iters``, then x``lr_gamma`` at
    each of ``lr_steps`` (default 80k/100k of 120k: the ssd.pytorch/lufficc VOC0712 config, not
    the SSD paper's, whose sec. 3.1 VOC schedule is 40k + 10k + 10k; warmup as lufficc's)."""
    factor = cfg.lr_gamma ** sum(it >= s for s in cfg.lr_steps)
    if it < cfg.warmup_iters:
        alpha = it / cfg.warmup_iters
        factor *= cfg.warmup_factor * (1 - alpha) + alpha
    return factor


def build_model(cfg: Config, num_classes: int, device: torch.device
                ) -> tuple[torch.nn.Module, str]:
    """SSD300 on ``cfg.backbone``; ImageNet weights when reachable, else scratch with a warning.
    Returns ``(model, what its backbone was initialised from)``: the source, "none", or
    "none (<source> unreachable)", so summaries report what happened, not what was asked."""
    from ssd_da.models.pretrained import is_weights_name
    from ssd_da.models.ssd import build_ssd

    source = None if cfg.pretrained.lower() in ("", "none", "scratch") else cfg.pretrained
    init = source or "none"
    try:
        model = build_ssd(cfg.backbone, num_classes=num_classes, pretrained=source)
    except RuntimeError as exc:
        # Offline machines cannot download torchvision weights (load_pretrained raises
        # RuntimeError then): train from scratch rather than stop. Anything that is not a
        # weights name (a mistyped path included) must load or the run stops.
        if source is None or Path(source).exists() or not is_weights_name(source):
            raise
        logger.warning("ImageNet weights %r unreachable (%s); training %s from scratch",
                       source, exc, cfg.backbone)
        model = build_ssd(cfg.backbone, num_classes=num_classes, pretrained=None)
        init = f"none ({source} unreachable)"
    if cfg.sync_bn and dist_utils.is_distributed():
        if device.type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:  # torch's SyncBatchNorm has no CPU kernel
            logger.warning("--sync-bn needs CUDA; keeping per-process BatchNorm on %s", device)
    return model.to(device), init


def make_train_state(cfg: Config, model: torch.nn.Module, device: torch.device) -> TrainState:
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, cfg))
    # bf16 autocast needs no loss scaling; the scaler stays disabled but is checkpointed so a run
    # can be resumed the same way whatever the AMP setting.
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    if dist_utils.is_distributed():
        ids = [device.index] if device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    return TrainState(model, optimizer, scheduler, scaler)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def rng_states() -> dict[str, Any]:
    states = {"python": random.getstate(), "numpy": np.random.get_state(),
              "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


def checkpoint_dict(state: TrainState, cfg: Config, class_names: list[str]) -> dict[str, Any]:
    return {
        "model": unwrap(state.model).state_dict(), "backbone": cfg.backbone,
        "class_names": class_names, "config": cfg.to_dict(), "iteration": state.iteration,
        "best_map": state.best_map, "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict(), "scaler": state.scaler.state_dict(),
        "rng": rng_states(), "world_size": dist_utils.get_world_size(), "timing": dict(state.timing),
        "backbone_init": state.backbone_init,
    }


def restore(state: TrainState, path: str | Path, cfg: Config, class_names: list[str]) -> None:
    """Continue exactly: weights, optimizer, scheduler, scaler, iteration and RNG states."""
    ckpt = load_checkpoint(path)
    if ckpt["backbone"] != cfg.backbone or list(ckpt["class_names"]) != class_names:
        raise CheckpointError(
            f"--resume {path}: checkpoint is {ckpt['backbone']} with classes "
            f"{ckpt['class_names']}, but this run is {cfg.backbone} with classes {class_names}")
    if "optimizer" not in ckpt:
        raise CheckpointError(f"--resume {path}: no optimizer state (use last.pth, not best.pth)")
    load_model_state(unwrap(state.model), ckpt["model"], f"--resume {path}")
    state.optimizer.load_state_dict(ckpt["optimizer"])
    state.scheduler.load_state_dict(ckpt["scheduler"])
    state.scaler.load_state_dict(ckpt["scaler"])
    state.iteration, state.best_map = int(ckpt["iteration"]), float(ckpt["best_map"])
    state.timing.update(ckpt.get("timing", {}))
    state.backbone_init = ckpt.get("backbone_init", state.backbone_init)
    set_rng_states(ckpt["rng"])
    if ckpt.get("world_size", 1) != dist_utils.get_world_size():
        logger.warning("--resume %s: saved with %d process(es), resumed with %d: the data order "
                       "differs from the uninterrupted run", path, ckpt.get("world_size", 1),
                       dist_utils.get_world_size())
    logger.info("resumed from %s at iteration %d", path, state.iteration)


class RunLog:
    """JSONL log of training and evaluation records, written by rank 0 only."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled

    def truncate_after(self, iteration: int) -> None:
        """Drop records past ``iteration`` (written after the checkpoint a run resumes from)."""
        if self.enabled and self.path.exists():
            keep = []
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line)["iter"] <= iteration:
                        keep.append(line)
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue
            self.path.write_text("".join(line + "\n" for line in keep))

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(record) + "\n")


def train_step(state: TrainState, images: torch.Tensor, targets: list[dict], cfg: Config,
               device: torch.device) -> dict[str, float]:
    """One SGD step. Raises NonFiniteLossError *before* the update, so no weight turns NaN."""
    images = images.to(device, non_blocking=True)
    targets = [{"boxes": t["boxes"].to(device), "labels": t["labels"].to(device)} for t in targets]
    with autocast_context(device, cfg.amp):
        losses = state.model(images, targets)
    loss = sum(losses.values())
    # Every rank must agree to stop, or the others would hang in the next all-reduce.
    finite = dist_utils.all_reduce_mean(torch.isfinite(loss.detach()).float())
    if finite.item() < 1.0:
        raise NonFiniteLossError(
            f"non-finite loss at iteration {state.iteration + 1} "
            f"({', '.join(f'{k}={v.item():.4g}' for k, v in losses.items())}); stopping. "
            f"The last checkpoint on disk is the last good state.")
    state.optimizer.zero_grad(set_to_none=True)
    state.scaler.scale(loss).backward()
    state.scaler.unscale_(state.optimizer)
    # A finite loss can still give inf/NaN gradients; checking the norm (identical on every
    # rank after DDP's all-reduce) keeps them out of the weights and so out of last.pth.
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(state.model.parameters(), max_norm)
    if not torch.isfinite(grad_norm):
        raise NonFiniteLossError(
            f"non-finite gradient norm at iteration {state.iteration + 1}; stopping. "
            f"The last checkpoint on disk is the last good state.")
    lr = state.optimizer.param_groups[0]["lr"]  # the rate this step uses
    state.scaler.step(state.optimizer)
    state.scaler.update()
    state.scheduler.step()
    state.iteration += 1
    out = {k: dist_utils.all_reduce_mean(v.detach()).item() for k, v in losses.items()}
    out["loss"] = sum(out.values())
    out["lr"] = lr
    return out


def run_evaluation(state: TrainState, test_set, class_names: list[str], cfg: Config,
                   device: torch.device, out_dir: Path, log: RunLog) -> float:
    """VOC mAP on the test split; writes best.pth when it improves (rank 0): best.pth is
    therefore selected on the test split, and last.pth is the one to report."""
    model = unwrap(state.model)
    if dist_utils.is_distributed():
        # Without SyncBN each rank's running statistics drift apart; evaluate every shard with
        # rank 0's, i.e. with the model that best.pth stores.
        for buffer in model.buffers():
            torch.distributed.broadcast(buffer, 0)
    result, detections, rate = evaluate_model(model, test_set, class_names, device,
                                              cfg.eval_batch_size, cfg.workers, cfg.amp,
                                              cfg.metric, progress=dist_utils.is_main_process())
    model.train()
    final = state.iteration >= cfg.iters
    # COCO-format data: the official COCO metrics too, once, at the end (pycocotools is slow).
    coco = coco_metrics_of(test_set, detections) if final and dist_utils.is_main_process() else None
    log.write({"iter": state.iteration, "map": result.map, "ap": result.ap,
               "eval_images_per_s": rate, **({"coco": coco} if coco else {})})
    if dist_utils.is_main_process():
        logger.info("iteration %d: %s mAP %.2f%%", state.iteration, cfg.metric, 100 * result.map)
        if final:
            logger.info("final evaluation on %s:\n%s", cfg.test_split, result.table())
        if coco:
            logger.info("COCO metrics (pycocotools): %s", format_coco(coco))
        # best.pth is the checkpoint with the highest mAP on the TEST split (VOC07 test by
        # default; there is no separate validation split), so its mAP is optimistically biased:
        # report last.pth's (the final) mAP, as tools/ablate.py does.
        if result.map > state.best_map:
            state.best_map = float(result.map)
            ckpt = checkpoint_dict(state, cfg, class_names)
            for key in ("optimizer", "scheduler", "scaler", "rng"):
                ckpt.pop(key)  # best.pth is for evaluation: weights and metadata only
            save_checkpoint(ckpt, out_dir / "best.pth")
    return float(result.map)


def validate_config(cfg: Config) -> None:
    """Fail on a bad name before any data is read or folder written."""
    from ssd_da.models.resnet import parse_backbone_name

    parse_backbone_name(cfg.backbone)  # ValueError listing the valid backbones
    if cfg.data_format not in DATA_FORMATS:
        raise ValueError(f"data_format {cfg.data_format!r} is not one of: {', '.join(DATA_FORMATS)}")
    if cfg.demo and cfg.data_format != "voc":
        raise ValueError("demo: true generates a VOC-format dataset; it needs data_format voc")
    if cfg.metric not in ("voc07", "area"):
        raise ValueError(f"metric {cfg.metric!r} is not one of: voc07, area")
    for name in ("iters", "log_every", "ckpt_every", "eval_batch_size"):
        if getattr(cfg, name) <= 0:
            raise ValueError(f"{name} must be positive, got {getattr(cfg, name)}")
    if cfg.warmup_iters < 0 or cfg.eval_every < 0:
        raise ValueError("warmup_iters and eval_every must be >= 0")
    if cfg.batch_size < 2:  # the 1x1 extra map's BatchNorm needs two values per channel
        raise ValueError(f"batch_size must be at least 2 per process, got {cfg.batch_size}")
    if cfg.image_size != 300:
        raise ValueError(f"image_size must be 300 (SSD300's default boxes), got {cfg.image_size}")
    if not all(isinstance(s, int) for s in cfg.lr_steps):
        raise ValueError(f"lr_steps must be a list of iterations, got {cfg.lr_steps}")
    first_drop = min([s for s in cfg.lr_steps if s > 0] + [cfg.iters])
    if cfg.warmup_iters >= first_drop:  # step k uses lr_factor(k): full lr from k = warmup_iters
        # Legal, but a shortened schedule (--iters, lr_steps) that keeps the default warmup
        # never trains at the full lr: say so rather than let it pass unnoticed.
        logger.warning("warmup_iters=%d runs past %s (iteration %d): the lr never reaches "
                       "lr=%g; pass e.g. warmup_iters=%d", cfg.warmup_iters,
                       "the first lr step" if first_drop < cfg.iters else "the end of training",
                       first_drop, cfg.lr, max(1, first_drop // 10))


def prepare_run(cfg: Config) -> tuple[torch.device, Path, int, int]:
    """Process group, device, seeds and the output folder. Returns (device, out_dir, rank, world)."""
    device = resolve_device(cfg.device, 0)
    rank, local_rank, world = dist_utils.init_distributed(device.type)
    device = resolve_device(cfg.device, local_rank)
    if cfg.amp and device.type != "cuda":
        logger.warning("--amp uses bf16 autocast on CUDA only; running float32 on %s", device)
    seed_everything(cfg.seed + rank)
    out_dir = cfg.resolved_output_dir()
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
    if cfg.demo and rank == 0:
        from ssd_da.data.demo import ensure_demo_dataset

        ensure_demo_dataset(Path(cfg.data_root).parent)
    dist_utils.barrier()
    return device, out_dir, rank, world


def train(cfg: Config, resume: str | Path | None = None) -> dict[str, Any]:
    """Train SSD300 per ``cfg``; returns a summary dict (final/best mAP, iterations, timings)."""
    validate_config(cfg)
    device, out_dir, rank, world = prepare_run(cfg)
    class_names = class_names_from_config(cfg)
    train_set, test_set = build_datasets(cfg)
    model, init = build_model(cfg, len(class_names) + 1, device)
    state = make_train_state(cfg, model, device)
    state.backbone_init = init
    log = RunLog(out_dir / "log.jsonl", enabled=rank == 0)
    if resume:
        restore(state, resume, cfg, class_names)
        log.truncate_after(state.iteration)
    loader = build_train_loader(train_set, cfg, state.iteration, rank, world,
                                pin_memory=device.type == "cuda")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    state.model.train()
    wall = _wall_clock(state.timing["wall_s"])
    evaluate = functools.partial(run_evaluation, state, test_set, class_names, cfg, device,
                                 out_dir, log)
    with tqdm(total=cfg.iters, initial=state.iteration, desc=f"train {cfg.backbone}",
              disable=rank != 0, dynamic_ncols=True) as bar:
        last_map = _train_loop(state, loader, cfg, device, bar, log, evaluate, wall,
                               lambda: checkpoint_dict(state, cfg, class_names), out_dir)
    if math.isnan(last_map) and state.iteration >= cfg.iters:
        # Resumed from a last.pth that had already reached the end: still report its mAP.
        last_map = evaluate()
    return finish_run(state, cfg, out_dir, device, wall(), last_map)


def _train_loop(state: TrainState, loader, cfg: Config, device: torch.device, bar: tqdm,
                log: RunLog, evaluate, wall, make_checkpoint, out_dir: Path) -> float:
    """Steps until the loader ends (at ``cfg.iters``): logging, periodic evaluation (returns
    the last mAP, nan if none ran), ``last.pth``, and the run's timing in ``state.timing``."""
    rank, world = dist_utils.get_rank(), dist_utils.get_world_size()
    tick, seen, last_map = time.perf_counter(), 0, float("nan")
    timing, step_start = state.timing, time.perf_counter()
    for images, targets in loader:
        losses = train_step(state, images, targets, cfg, device)
        seen += images.shape[0] * world
        timing["images"] += images.shape[0] * world
        bar.update(1)
        it = state.iteration
        if it % cfg.log_every == 0 or it == cfg.iters:
            rate = seen / max(time.perf_counter() - tick, 1e-9)
            bar.set_postfix(loss=f"{losses['loss']:.3f}", lr=f"{losses['lr']:.2e}",
                            img_s=f"{rate:.1f}")
            log.write({"iter": it, "images_per_s": rate, **losses})
            tick, seen = time.perf_counter(), 0
        timing["train_s"] += time.perf_counter() - step_start
        if (cfg.eval_every and it % cfg.eval_every == 0) or it == cfg.iters:
            last_map = evaluate()
            tick, seen = time.perf_counter(), 0  # keep evaluation out of the logged rate
        # After the evaluation, so the best_map saved with last.pth is up to date on resume.
        timing["wall_s"] = wall()
        if rank == 0 and (it % cfg.ckpt_every == 0 or it == cfg.iters):
            save_checkpoint(make_checkpoint(), out_dir / "last.pth")
        step_start = time.perf_counter()
    return last_map


def _wall_clock(offset: float):
    """A function returning ``offset`` plus the seconds since this call."""
    start = time.perf_counter()
    return lambda: offset + time.perf_counter() - start


def finish_run(state: TrainState, cfg: Config, out_dir: Path, device: torch.device,
               wall_time_s: float, last_map: float) -> dict[str, Any]:
    """Checks that DDP replicas agree, then curves PNG and a summary (rank 0), then tears down
    the process group. Timings are for the whole run, all resumed sessions together."""
    dist_utils.check_replicas_agree(unwrap(state.model))
    timing = state.timing
    summary = {
        "backbone": cfg.backbone, "iterations": state.iteration, "final_map": last_map,
        "best_map": state.best_map, "metric": cfg.metric, "wall_time_s": wall_time_s,
        "train_images_per_s": timing["images"] / max(timing["train_s"], 1e-9),
        "backbone_init": state.backbone_init, "world_size": dist_utils.get_world_size(),
        "global_batch_size": cfg.batch_size * dist_utils.get_world_size(),
        "peak_memory_mb": (torch.cuda.max_memory_allocated(device) / 2**20
                           if device.type == "cuda" else None),
        "output_dir": str(out_dir),
    }
    if dist_utils.is_main_process():
        from ssd_da.engine.plots import plot_training_curves

        plot_training_curves(out_dir / "log.jsonl", out_dir / "curves.png")
        with open(out_dir / "summary.json", "w") as fh:
            json.dump(summary, fh, indent=2)
    dist_utils.barrier()
    dist_utils.cleanup()
    return summary
