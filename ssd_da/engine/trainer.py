"""The training loop: :func:`do_train` reads top to bottom in one screen, its periodic work (log,
checkpoint, evaluate) plain calls (detectron2's plain_train_net ``do_train`` and torchvision's
references/detection/train.py are the models). Setup lives in :mod:`ssd_da.engine.setup`, the
state and clocks in :mod:`ssd_da.engine.state`, evaluation in :mod:`ssd_da.engine.evaluation`,
checkpoints in :mod:`ssd_da.engine.checkpoint`, the log in :mod:`ssd_da.engine.runlog`, config
checks in :func:`ssd_da.config.validate_config`. Failures are typed exceptions
(:class:`NonFiniteLossError`, :class:`~ssd_da.engine.interrupt.Interrupted`,
:class:`~ssd_da.engine.checkpoint.CheckpointWriteError`); the tools map them to exit codes."""
from __future__ import annotations

import json
import logging
import shlex
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ssd_da.config import Config, resolve_attention_init
from ssd_da.config_checks import validate_config
from ssd_da.engine import distributed as dist_utils
from ssd_da.engine.checkpoint import check_resumable, save_checkpoint, training_checkpoint
from ssd_da.engine.evaluation import evaluate, evaluation_due
from ssd_da.engine.folder_lock import hold_folder_lock
from ssd_da.engine.interrupt import Interrupted, agreed_stop, stop_on_signals
from ssd_da.engine.loaders import build_train_loader, class_names_from_config, log_loader_rate
from ssd_da.engine.run_folder import check_run_folder
from ssd_da.engine.runlog import read_run_log
from ssd_da.engine.setup import (  # noqa: F401 (build_model, build_train_state: public here too)
    Run, build_model, build_train_state, prepare_process, setup_run,
)
from ssd_da.engine.state import RunClock, TrainState
from ssd_da.engine.step import (  # noqa: F401 (NonFiniteLossError: public here too)
    FiniteCheck, NonFiniteLossError, check_model_finite, read_losses, sgd_step,
)
from ssd_da.utils.plots import plot_training_curves

logger = logging.getLogger(__name__)


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
    process = prepare_process(cfg)
    out_dir = cfg.resolved_output_dir()
    with hold_folder_lock(out_dir, "--output-dir", enabled=dist_utils.is_main_process()):
        check_run_folder(out_dir, Path(resume) if resume else None, overwrite)
        run = setup_run(cfg, out_dir, class_names, resume, resumed, overwrite, process)
        if run.pending:  # the evaluation a crash or kill interrupted
            evaluate_now(run)
            save_last(run)
        wall_s = do_train(run)
        return finish_run(run.state, cfg, out_dir, run.device, wall_s,
                          {"train": run.train_set.num_skipped, "test": run.test_set.num_skipped})


def do_train(run: Run) -> float:
    """Iterations ``state.iteration + 1 .. cfg.iters``, each one step, then the work due at it;
    returns the run's wall time in seconds (all sessions)."""
    state, cfg, device = run.state, run.cfg, run.device
    loader = build_train_loader(run.train_set, cfg, state.iteration, dist_utils.get_rank(),
                                run.world, pin_memory=device.type == "cuda")
    if dist_utils.is_main_process():
        log_loader_rate(run.train_set, cfg)
    clock, finite = RunClock(state.timing), FiniteCheck(state.iteration)
    state.model.train()
    with stop_on_signals(), tqdm(total=cfg.iters, initial=state.iteration,
                                 desc=f"train {cfg.backbone}", disable=not dist_utils.is_main_process(),
                                 dynamic_ncols=True) as bar:
        for images, targets in clock.waits.timed(loader):
            losses, lr = train_step(state, images, targets, cfg, device, finite)
            state.timing["images"] += images.shape[0] * run.world
            it = state.iteration
            bar.update(1)
            logging_now = it % cfg.log_every == 0 or it == cfg.iters
            evaluating = evaluation_due(it, cfg)
            saving = it % cfg.ckpt_every == 0 or it == cfg.iters
            stopping = agreed_stop(logging_now or evaluating or saving, device)
            if logging_now or evaluating or saving or stopping:
                check_finite(run, finite, images, deep=evaluating or saving or bool(stopping))
            if logging_now:
                log_progress(run, clock, losses, lr, bar)
            with clock.paused():  # evaluation and checkpoints are not training time
                if saving:
                    save_last(run)  # before the evaluation: a crash there keeps this state
                if evaluating:
                    evaluate_now(run)
                    if saving:
                        save_last(run)  # again, with the evaluation's best mAP
                if stopping and it < cfg.iters:  # at the last step: finish as usual
                    stop(run, stopping)
    run.log.close()
    return clock.wall.seconds()


def check_finite(run: Run, finite: FiniteCheck, images: torch.Tensor, deep: bool) -> None:
    """The only host reads of the loop (a GPU step never waits otherwise): stop on a non-finite
    step before it is logged, evaluated or saved; ``deep``: the weights and outputs too."""
    state = run.state
    finite.check(state.scaler, state.iteration, last_good_state(state, run.cfg))
    if deep:
        check_model_finite(state.model, images, state.iteration, last_good_state(state, run.cfg))


def log_progress(run: Run, clock: RunClock, losses: dict[str, torch.Tensor], lr: float,
                 bar: tqdm) -> None:
    """A training record in log.jsonl (loss terms, lr, images/s and data wait since the last
    one) and the progress bar's figures."""
    images_per_s, data_wait = clock.since_last_log()
    values = {**read_losses(losses), "lr": lr, "data_wait": data_wait}
    run.log.write({"iter": run.state.iteration, "images_per_s": images_per_s, **values})
    bar.set_postfix(loss=f"{values['loss']:.3f}", lr=f"{lr:.2e}", images_per_s=f"{images_per_s:.1f}")


def save_last(run: Run) -> None:
    """last.pth (main process); every process remembers it as the last good state."""
    if dist_utils.is_main_process():
        save_checkpoint(training_checkpoint(run.state, run.cfg, run.class_names), run.last_path)
    run.state.last_saved = (run.last_path, run.state.iteration)


def evaluate_now(run: Run) -> None:
    evaluate(run.state, run.test_set, run.class_names, run.cfg, run.device, run.out_dir, run.log)


def stop(run: Run, signal_name: str) -> None:
    """Stop on a signal: last.pth written (unless this iteration's is already), the log
    closed, :class:`Interrupted` raised with the command that continues the run."""
    if run.state.last_saved != (run.last_path, run.state.iteration):
        save_last(run)
    run.log.close()
    raise Interrupted(stopped_message(signal_name, run.state, run.cfg, run.last_path),
                      signal_name, run.last_path)


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


def finish_run(state: TrainState, cfg: Config, out_dir: Path, device: torch.device,
               wall_time_s: float, skipped: dict[str, int]) -> dict[str, Any]:
    """Checks that DDP replicas agree, then curves PNG and a summary (rank 0), then tears down
    the process group. Timings are for the whole run, all resumed sessions together."""
    digests = dist_utils.check_replicas_agree(dist_utils.unwrap(state.model))
    timing = state.timing
    summary = {
        "backbone": cfg.backbone, "iterations": state.iteration, "final_map": state.final_map,
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
        plot_training_curves(read_run_log(out_dir / "log.jsonl"), out_dir / "curves.png")
        with open(out_dir / "summary.json", "w") as fh:
            json.dump(summary, fh, indent=2)
    dist_utils.barrier()
    dist_utils.cleanup()
    return summary
