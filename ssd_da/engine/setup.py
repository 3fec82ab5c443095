"""Everything a training run needs before its first step, apart from the loop
(:mod:`ssd_da.engine.trainer`): the process (device, seeds, process group), the model, the
optimizer and schedule, a resumed state, the output folder and its log."""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ssd_da.config import Config, resolve_attention_init, save_config
from ssd_da.data.demo import ensure_demo_dataset
from ssd_da.data.voc import VOCDetection
from ssd_da.engine import distributed as dist_utils
from ssd_da.engine.checkpoint import restore_training_state
from ssd_da.engine.evaluation import evaluation_due
from ssd_da.engine.loaders import build_datasets
from ssd_da.engine.run_folder import adopt_log, clear_run, remove_stale_temporaries
from ssd_da.engine.runlog import RunLog
from ssd_da.engine.state import TrainState
from ssd_da.engine.step import make_optimizer, make_scaler
from ssd_da.engine.tensorboard import TENSORBOARD_DIR, TensorBoardScalars
from ssd_da.models.pretrained import is_weights_name
from ssd_da.models.ssd import build_ssd
from ssd_da.utils.device import resolve_device

logger = logging.getLogger(__name__)


@dataclass
class Run:
    """One training run once set up: what the loop and its periodic work (log, checkpoint,
    evaluate) share. ``pending``: a resumed run whose due evaluation was interrupted."""
    cfg: Config
    out_dir: Path
    class_names: list[str]
    device: torch.device
    world: int
    state: TrainState
    log: RunLog
    train_set: VOCDetection
    test_set: VOCDetection
    pending: bool = False

    @property
    def last_path(self) -> Path:
        return self.out_dir / "last.pth"


def setup_run(cfg: Config, out_dir: Path, class_names: list[str], resume: str | Path | None,
              resumed: dict[str, Any] | None, overwrite: bool,
              process: tuple[torch.device, int, int]) -> Run:
    """Data, model, state (restored from ``resumed``, the checkpoint read from ``resume``), then
    the output folder and its log: nothing is written before the rest has succeeded.
    ``process``: (device, rank, world size)."""
    device, rank, world = process
    train_set, test_set = build_datasets(cfg)
    model, backbone_init = build_model(cfg, len(class_names) + 1, device)
    state = build_train_state(cfg, model, backbone_init, device)
    if resumed is not None:
        restore_training_state(state, resumed, resume)
    open_output(out_dir, cfg, resume, overwrite)  # every check passed: now write
    log = RunLog(out_dir / "log.jsonl", enabled=dist_utils.is_main_process())
    pending = resumed is not None and evaluation_due(state.iteration, cfg) \
        and state.evaluated_at < state.iteration
    if resumed is not None:
        log.truncate_after(state.iteration, evaluation_pending=pending)
    if cfg.tensorboard:  # the events start as a copy of the (cut back) log: no step twice
        log.mirror_to(TensorBoardScalars(out_dir / TENSORBOARD_DIR))
    return Run(cfg, out_dir, class_names, device, world, state, log, train_set, test_set, pending)


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
    Attention modules start as ``cfg.attention_init`` says, "auto" resolved from
    ``cfg.pretrained`` (:func:`~ssd_da.config.resolve_attention_init`).
    Returns ``(model, what its backbone was initialised from)``: the source, "none", or
    "none (<source> unreachable)", so summaries report what happened, not what was asked."""
    source = cfg.trunk_weights()
    init = source or "none"
    attention_init = resolve_attention_init(cfg).attention_init
    try:
        model = build_ssd(cfg.backbone, num_classes=num_classes, pretrained=source,
                          attention_init=attention_init)
    except RuntimeError as exc:
        # Offline machines cannot download torchvision weights (load_pretrained raises
        # RuntimeError then): train from scratch rather than stop. Anything that is not a
        # weights name (a mistyped path included) must load or the run stops.
        if source is None or Path(source).exists() or not is_weights_name(source):
            raise
        # Every process finds out; one says so (the others at debug level).
        logger.log(logging.WARNING if dist_utils.is_main_process() else logging.DEBUG,
                   "ImageNet weights %r unreachable (%s); training %s from scratch, attention "
                   "modules still started as attention_init=%r", source, exc, cfg.backbone,
                   attention_init)
        model = build_ssd(cfg.backbone, num_classes=num_classes, pretrained=None,
                          attention_init=attention_init)
        init = f"none ({source} unreachable)"
    if cfg.sync_bn and dist_utils.is_distributed():
        if device.type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:  # torch's SyncBatchNorm has no CPU kernel
            logger.warning("--sync-bn needs CUDA; keeping per-process BatchNorm on %s", device)
    model = model.to(device)
    if cfg.channels_last:  # NHWC convolutions: faster with bf16 on recent GPUs (docs/benchmarks.md)
        model = model.to(memory_format=torch.channels_last)
    if cfg.compile:  # the network only: loss and post-processing stay eager
        model.compile_network()
    return model, init


def build_train_state(cfg: Config, model: torch.nn.Module, backbone_init: str,
                     device: torch.device) -> TrainState:
    """Fused SGD, the warmup/step schedule of :func:`lr_factor` and a GradScaler used only for
    its on-device non-finite check (see :mod:`ssd_da.engine.step`); the model DDP-wrapped under
    torchrun."""
    optimizer = make_optimizer(model, cfg.lr, cfg.momentum, cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, cfg))
    if dist_utils.is_distributed():
        # One GPU per process: DDP's replicas, buckets and outputs live on this process's device.
        cuda = device.type == "cuda"
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if cuda else None, output_device=device.index if cuda else None)
    return TrainState(model, optimizer, scheduler, make_scaler(device), backbone_init=backbone_init)


def prepare_process(cfg: Config) -> tuple[torch.device, int, int]:
    """Process group, device, seeds and the demo data (generated on first use); writes nothing
    in the output folder. Returns (device, rank, world size)."""
    device = resolve_device(cfg.device, 0)
    rank, local_rank, world = dist_utils.init_distributed(device.type)
    device = resolve_device(cfg.device, local_rank)
    if cfg.amp and device.type != "cuda":
        logger.warning("--amp uses bf16 autocast on CUDA only; running float32 on %s", device)
    seed_everything(cfg.seed + rank)
    if cfg.demo and rank == 0:
        ensure_demo_dataset(Path(cfg.data_root).parent)
    dist_utils.barrier()
    if device.type == "cuda":
        # reset_peak_memory_stats does not initialise CUDA, and before that the allocator
        # raises "Invalid device argument : did you call init?". set_device initialises it and
        # makes ``device`` this process's current one (tests/test_engine_cuda_contract.py).
        torch.cuda.set_device(device)
        torch.cuda.reset_peak_memory_stats(device)
    return device, rank, world


def open_output(out_dir: Path, cfg: Config, resume: str | Path | None, overwrite: bool) -> None:
    """Rank 0 prepares the output folder once every check has passed: the earlier run deleted
    (``overwrite``), checkpoint temporaries of a killed write removed, the log of a run resumed
    from another folder carried over, ``config.yaml`` written."""
    # Every rank has checked the folder before rank 0 changes it (a log carried over for a
    # resume elsewhere would look like a run already there to a slower rank).
    dist_utils.barrier()
    if dist_utils.is_main_process():
        out_dir.mkdir(parents=True, exist_ok=True)
        if overwrite:
            clear_run(out_dir)
        remove_stale_temporaries(out_dir)
        if resume:
            adopt_log(Path(resume), out_dir)
        save_config(cfg, out_dir / "config.yaml")
    dist_utils.barrier()
