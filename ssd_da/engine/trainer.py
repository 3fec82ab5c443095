"""The training loop: :func:`train` reads top to bottom, one iteration in one screen
(detectron2's plain_train_net ``do_train`` and torchvision's references/detection/train.py are
the models). Checkpoints live in :mod:`ssd_da.engine.checkpoint`, the log in
:mod:`ssd_da.engine.runlog`, config checks in :func:`ssd_da.config.validate_config`."""
from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from tqdm import tqdm

from ssd_da.config import Config, resolve_attention_init, save_config, validate_config
from ssd_da.data.demo import ensure_demo_dataset
from ssd_da.engine import distributed as dist_utils
from ssd_da.engine.checkpoint import (check_resumable, restore_training_state, save_checkpoint,
                                      training_checkpoint)
from ssd_da.engine.folder_lock import hold_folder_lock
from ssd_da.engine.data import (
    DataWait, build_datasets, build_train_loader, class_names_from_config, log_loader_rate,
    resolve_workers,
)
from ssd_da.engine.inference import coco_metrics_of, evaluate_model, format_coco
from ssd_da.engine.interrupt import Interrupted, agreed_stop, stop_on_signals
from ssd_da.engine.plots import plot_training_curves
from ssd_da.engine.run_folder import (adopt_log, check_run_folder, clear_run,
                                      remove_stale_temporaries)
from ssd_da.engine.runlog import RunLog
from ssd_da.engine.tensorboard import TENSORBOARD_DIR, TensorBoardScalars
from ssd_da.models.pretrained import is_weights_name
from ssd_da.models.ssd import build_ssd
from ssd_da.engine.step import (  # noqa: F401 (NonFiniteLossError: public here too)
    FiniteCheck, NonFiniteLossError, check_model_finite, make_optimizer, make_scaler,
    read_losses, sgd_step,
)
from ssd_da.utils.device import resolve_device

logger = logging.getLogger(__name__)

# Exit status of tools/train.py for a non-finite loss (the ablation runner reads it: a seed that
# diverges is a result, not a crash). Bad input exits with 2.
EXIT_NON_FINITE = 3


@dataclass
class TrainState:
    model: torch.nn.Module  # DDP-wrapped under torchrun
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler  # its on-device found-inf check skips non-finite steps (step.py)
    iteration: int = 0
    best_map: float = -1.0
    backbone_init: str = "none"  # what build_model loaded; a resumed run keeps the first one's
    # Summed over every session of a resumed run, so the summary describes the whole run:
    # train_s / images: the training loop (data loading in, evaluation and checkpoints out);
    # wall_s: up to the last checkpoint (time lost after it in an interrupted session is not
    # counted).
    timing: dict[str, float] = field(default_factory=lambda: {"train_s": 0.0, "images": 0,
                                                              "wall_s": 0.0})
    evaluated_at: int = -1  # iteration of the latest evaluation, and its mAP
    last_map: float = math.nan
    last_saved: tuple[Path, int] | None = None  # the newest last.pth on disk, its iteration


class Timer:
    """Seconds since creation plus ``offset`` (the time earlier sessions of a resumed run
    spent), leaving out the time spent inside :meth:`paused`."""

    def __init__(self, offset: float = 0.0) -> None:
        self._total, self._start = offset, time.perf_counter()

    def seconds(self) -> float:
        running = 0.0 if self._start is None else time.perf_counter() - self._start
        return self._total + running

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        self._total, self._start = self.seconds(), None
        try:
            yield
        finally:
            self._start = time.perf_counter()


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


def evaluation_due(it: int, cfg: Config) -> bool:
    return bool(cfg.eval_every and it % cfg.eval_every == 0) or it == cfg.iters


def train(cfg: Config, resume: str | Path | None = None, overwrite: bool = False
          ) -> dict[str, Any]:
    """Train SSD300 per ``cfg``; returns a summary dict (final/best mAP, iterations, timings).

    Nothing is written before every check has passed: the config's values, the output folder (a
    run there is continued with ``resume`` or replaced with ``overwrite``, never mixed), the
    resumed checkpoint and the data. Every ``log_every`` iterations a record goes to
    ``log.jsonl``; every ``ckpt_every`` (and at the end) ``last.pth`` is written; every
    ``eval_every`` (and at the end) the test split is evaluated and ``best.pth`` kept. A due
    ``last.pth`` is written before the evaluation (a crash there keeps the newest state, and the
    resumed run evaluates first) and again after it, with its best mAP.

    The output folder is locked (:mod:`ssd_da.engine.folder_lock`) from its checks to the end:
    a second run into it fails at once. SIGTERM, SIGINT and SIGUSR1 stop the run after the
    current step with ``last.pth`` written (:class:`~ssd_da.engine.interrupt.Interrupted`)."""
    validate_config(cfg)
    cfg = resolve_attention_init(cfg)  # config.yaml and the checkpoints record the value used
    class_names = class_names_from_config(cfg)
    resumed = check_resumable(resume, cfg, class_names) if resume else None
    device, rank, world = prepare_process(cfg)
    out_dir = cfg.resolved_output_dir()
    with hold_folder_lock(out_dir, "--output-dir", enabled=rank == 0):
        check_run_folder(out_dir, Path(resume) if resume else None, overwrite)
        return train_in_folder(cfg, out_dir, class_names, resume, resumed, overwrite,
                               (device, rank, world))


def train_in_folder(cfg: Config, out_dir: Path, class_names: list[str],
                    resume: str | Path | None, resumed: dict[str, Any] | None, overwrite: bool,
                    process: tuple[torch.device, int, int]) -> dict[str, Any]:
    """:func:`train` once the folder is checked and locked: data, model, the loop, the summary.
    ``resumed``: the checkpoint read from ``resume``; ``process``: (device, rank, world size)."""
    device, rank, world = process
    train_set, test_set = build_datasets(cfg)
    model, backbone_init = build_model(cfg, len(class_names) + 1, device)
    state = make_train_state(cfg, model, backbone_init, device)
    if resumed is not None:
        restore_training_state(state, resumed, resume)
    open_output(out_dir, cfg, resume, overwrite)  # every check passed: now write
    log = RunLog(out_dir / "log.jsonl", enabled=rank == 0)
    pending = resumed is not None and evaluation_due(state.iteration, cfg) \
        and state.evaluated_at < state.iteration
    if resumed is not None:
        log.truncate_after(state.iteration, evaluation_pending=pending)
    if cfg.tensorboard:  # the events start as a copy of the (cut back) log: no step twice
        log.mirror_to(TensorBoardScalars(out_dir / TENSORBOARD_DIR))

    def save_last() -> None:
        if rank == 0:
            save_checkpoint(training_checkpoint(state, cfg, class_names), out_dir / "last.pth")
        state.last_saved = (out_dir / "last.pth", state.iteration)

    def evaluate_now() -> None:
        evaluate(state, test_set, class_names, cfg, device, out_dir, log)

    if pending:  # the evaluation a crash or kill interrupted
        evaluate_now()
        save_last()
    loader = build_train_loader(train_set, cfg, state.iteration, rank, world,
                                pin_memory=device.type == "cuda")
    if rank == 0:
        log_loader_rate(train_set, cfg)
    train_clock, wall_clock = Timer(state.timing["train_s"]), Timer(state.timing["wall_s"])
    waits = DataWait()
    last_log = (train_clock.seconds(), state.timing["images"], waits.seconds)
    finite = FiniteCheck(state.iteration)
    state.model.train()
    with stop_on_signals(), tqdm(total=cfg.iters, initial=state.iteration,
                                 desc=f"train {cfg.backbone}", disable=rank != 0,
                                 dynamic_ncols=True) as bar:
        for images, targets in waits.timed(loader):
            losses, lr = train_step(state, images, targets, cfg, device, finite)
            state.timing["images"] += images.shape[0] * world
            it = state.iteration
            bar.update(1)
            logging_now = it % cfg.log_every == 0 or it == cfg.iters
            evaluating = evaluation_due(it, cfg)
            saving = it % cfg.ckpt_every == 0 or it == cfg.iters
            stopping = agreed_stop(logging_now or evaluating or saving, device)
            if logging_now or evaluating or saving or stopping:
                # The only host reads of the loop (a GPU step never waits otherwise): stop on
                # a non-finite step before it is logged, evaluated or saved.
                finite.check(state.scaler, it, last_good_state(state, cfg))
                if evaluating or saving or stopping:
                    check_model_finite(state.model, images, it, last_good_state(state, cfg))
            if logging_now:
                now = (train_clock.seconds(), state.timing["images"], waits.seconds)
                span = max(now[0] - last_log[0], 1e-9)
                rate = (now[1] - last_log[1]) / span
                values = {**read_losses(losses), "lr": lr,
                          "data_wait": (now[2] - last_log[2]) / span}
                log.write({"iter": it, "images_per_s": rate, **values})
                bar.set_postfix(loss=f"{values['loss']:.3f}", lr=f"{lr:.2e}", img_s=f"{rate:.1f}")
                last_log = now
            with train_clock.paused():  # evaluation and checkpoints are not training time
                state.timing.update(train_s=train_clock.seconds(), wall_s=wall_clock.seconds())
                if saving:
                    save_last()  # before the evaluation: a crash there keeps this state
                if evaluating:
                    evaluate_now()
                    if saving:
                        save_last()  # again, with the evaluation's best mAP
                if stopping and it < cfg.iters:  # at the last step: finish as usual
                    if state.last_saved != (out_dir / "last.pth", it):
                        save_last()
                    log.close()
                    raise Interrupted(stopped_message(stopping, state, cfg, out_dir / "last.pth"),
                                      stopping, out_dir / "last.pth")
    log.close()
    return finish_run(state, cfg, out_dir, device, wall_clock.seconds(),
                      {"train": train_set.num_skipped, "test": test_set.num_skipped})


def train_step(state: TrainState, images: torch.Tensor, targets: list[dict], cfg: Config,
               device: torch.device, finite: FiniteCheck) -> tuple[dict[str, torch.Tensor], float]:
    """One SGD step (:func:`ssd_da.engine.step.sgd_step`): no host read of a device value; a
    non-finite loss or gradient skips the update on the device and is noted in ``finite``.
    Returns the detached loss terms (on the device) and the ``lr`` the step used."""
    lr = state.optimizer.param_groups[0]["lr"]  # the rate this step uses
    losses, not_finite = sgd_step(state.model, state.optimizer, state.scaler, images, targets, device,
                                  cfg.amp, cfg.grad_clip, cfg.channels_last)
    finite.note(not_finite)
    state.scheduler.step()
    state.iteration += 1
    return losses, lr


def stopped_message(signal_name: str, state: TrainState, cfg: Config, path: Path) -> str:
    """What an interrupted run says: where it stopped, what it saved, how to continue."""
    torchrun = dist_utils.get_world_size() > 1
    return (f"{signal_name}: stopped at iteration {state.iteration} of {cfg.iters} and saved "
            f"{path}; continue with: python tools/train.py --resume {shlex.quote(str(path))}"
            + (" (under torchrun: the same torchrun command, with that --resume)"
               if torchrun else ""))


def last_good_state(state: TrainState, cfg: Config) -> str:
    """Where the last good state of the run is, for a message that stops it."""
    if state.last_saved is None:
        return (f"No checkpoint has been written yet (the first comes at iteration "
                f"{min(cfg.ckpt_every, cfg.iters)}): fix the cause (e.g. a lower --lr, or "
                f"grad_clip) and start again with --overwrite.")
    path, iteration = state.last_saved
    return (f"{path} (iteration {iteration}) holds the last good state: fix the cause and "
            f"continue with --resume {path}.")


def evaluate(state: TrainState, test_set, class_names: list[str], cfg: Config,
             device: torch.device, out_dir: Path, log: RunLog) -> float:
    """VOC mAP on the test split, logged and kept in ``state``; writes best.pth when it improves
    (rank 0): best.pth is therefore selected on the test split, and last.pth is the one to
    report."""
    model = dist_utils.unwrap(state.model)
    if dist_utils.is_distributed():
        # Without SyncBN each rank's running statistics drift apart; evaluate every shard with
        # rank 0's, i.e. with the model that best.pth stores.
        for buffer in model.buffers():
            torch.distributed.broadcast(buffer, 0)
    # The machine's cores are shared by every process of the run, as in training.
    workers = resolve_workers(cfg.workers, dist_utils.get_world_size())
    result, detections, rate = evaluate_model(model, test_set, class_names, device,
                                              cfg.eval_batch_size, workers,
                                              cfg.amp, cfg.metric, progress=dist_utils.is_main_process(),
                                              channels_last=cfg.channels_last)
    model.train()
    state.evaluated_at, state.last_map = state.iteration, float(result.map)
    final = state.iteration >= cfg.iters
    # pycocotools' metrics too, once, at the end (pycocotools is slow): the official ones on
    # COCO-format data; on VOC data pycocotools' AP50 / AP@[.5:.95], which results.md shows beside
    # the LGA paper's mAP50 / mAP50-95 (those from YOLOv8's validator: not directly comparable).
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
            save_checkpoint(training_checkpoint(state, cfg, class_names, resumable=False),
                            out_dir / "best.pth")
    return float(result.map)


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


def make_train_state(cfg: Config, model: torch.nn.Module, backbone_init: str,
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


def finish_run(state: TrainState, cfg: Config, out_dir: Path, device: torch.device,
               wall_time_s: float, skipped: dict[str, int]) -> dict[str, Any]:
    """Checks that DDP replicas agree, then curves PNG and a summary (rank 0), then tears down
    the process group. Timings are for the whole run, all resumed sessions together."""
    digests = dist_utils.check_replicas_agree(dist_utils.unwrap(state.model))
    timing = state.timing
    summary = {
        "backbone": cfg.backbone, "iterations": state.iteration, "final_map": state.last_map,
        "best_map": state.best_map, "metric": cfg.metric, "wall_time_s": wall_time_s,
        "train_images_per_s": timing["images"] / max(timing["train_s"], 1e-9),
        "backbone_init": state.backbone_init, "world_size": dist_utils.get_world_size(),
        "global_batch_size": cfg.batch_size * dist_utils.get_world_size(),
        "peak_memory_mb": (torch.cuda.max_memory_allocated(device) / 2**20
                           if device.type == "cuda" else None),
        "output_dir": str(out_dir), "skipped_samples": skipped,  # --skip-bad
        "parameter_digests": digests,  # per rank, all equal (checked): the final weights' hash
    }
    if dist_utils.is_main_process():
        plot_training_curves(out_dir / "log.jsonl", out_dir / "curves.png")
        with open(out_dir / "summary.json", "w") as fh:
            json.dump(summary, fh, indent=2)
    dist_utils.barrier()
    dist_utils.cleanup()
    return summary
