"""Run a suite of backbones x seeds through the training entry point, resumably.

One folder per run, ``<root>/<backbone>/seed<k>/`` (the run's ``output_dir``), so a suite can be
stopped and restarted at any time: a run whose ``summary.json`` records ``cfg.iters`` iterations
is skipped, one with a ``last.pth`` but no finished summary continues from it (``--resume``), the
rest start fresh. Runs go one after another in this process through ``train(cfg)``, or one per
GPU as ``CUDA_VISIBLE_DEVICES=k python -m ssd_da.cli.train --config <run>/config.yaml``
subprocesses fed from a queue (:data:`TRAIN_MODULE`). The mAP of a run is its evaluation at
the last iteration (``log.jsonl``), not the best one, which would be selected on the test set
itself; the suite's reports are ssd_da/experiments/results.py's.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from queue import Empty, Queue
from typing import Any, Callable, Sequence

import torch
import yaml

from ssd_da.config import (Config, apply_overrides, resolve_attention_init, save_config,
                           saved_value)
from ssd_da.engine import trainer
from ssd_da.engine.interrupt import Interrupted, stop_requested, wait_forwarding_stop
from ssd_da.engine.run_folder import existing_run_files
from ssd_da.engine.runlog import read_run_log
from ssd_da.engine.step import NonFiniteLossError
from ssd_da.models.names import DEPTHS, backbone_name, parse_backbone_name
from ssd_da.utils.cli import EXIT_INTERRUPTED, EXIT_NON_FINITE

logger = logging.getLogger(__name__)

# What every training child runs, on a GPU of --gpus or in a SLURM job: the training tool as a
# module of this package (``python -m``, or torchrun's ``-m``), one way everywhere. The child
# imports ssd_da as its parent did (installed, or on PYTHONPATH), with no path into a checkout's
# tools/ (the library never points there), and the same tool answers ``tools/train.py``.
TRAIN_MODULE = "ssd_da.cli.train"

# Table I compares the orders of DA's two branches at depth 50; each branch alone is the usual
# companion ablation. Tables II/III compare plain, SE, SGE, ECA and DA at each depth; CBAM is the
# LGA paper's comparison module.
SUITE_ATTENTIONS = {
    "order": ("none", "da", "da_cs", "da_par", "da_s", "da_c"),
    "attention": ("none", "se", "sge", "eca", "da", "cbam"),
}
# Suites whose modules sit once at the end of the backbone (names resnet<d>_<module>): the LGA
# paper's Table 4 (ResNet18: plain, +MHSA, +SE, +ECA, +CBAM, +SA, +LA, +GA, +LGA).
END_SUITE_ATTENTIONS = {
    "lga": ("none", "mhsa", "se", "eca", "cbam", "sa", "la", "ga", "lga"),
}
SUITES = (*SUITE_ATTENTIONS, *END_SUITE_ATTENTIONS)
DEFAULT_DEPTHS = {"order": (50,), "attention": (18, 34, 50, 101), "lga": (18,)}
# Settings that do not change what a run learns: an existing run folder is reused when only
# these differ from its saved config.yaml (``iters`` is checked against the summary instead).
RESULT_NEUTRAL_FIELDS = frozenset({"workers", "device", "eval_batch_size", "log_every",
                                   "ckpt_every", "eval_every", "iters", "output_dir",
                                   "tensorboard"})
TrainFn = Callable[..., dict[str, Any]]


@dataclass(frozen=True)
class RunSpec:
    """One training run of the suite: its backbone, seed and fully resolved config."""

    backbone: str
    seed: int
    cfg: Config

    @property
    def out_dir(self) -> Path:
        return self.cfg.resolved_output_dir()

    @property
    def name(self) -> str:
        return f"{self.backbone}/seed{self.seed}"


@dataclass
class RunOutcome:
    """What happened to a run: "skipped" (finished earlier), "trained", "diverged", "failed",
    or "interrupted" (stopped by a signal after saving its last.pth; rerunning resumes it)."""

    spec: RunSpec
    status: str
    message: str = ""


def suite_backbones(suite: str, depths: Sequence[int] | None = None) -> list[str]:
    """Backbone names of a suite, depth-major (``resnet50, da_resnet50, ...``; for "lga"
    ``resnet18, resnet18_mhsa, ..., resnet18_lga``)."""
    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; valid suites: {', '.join(SUITES)}")
    depths = tuple(depths) if depths else DEFAULT_DEPTHS[suite]
    bad = [d for d in depths if d not in DEPTHS]
    if bad:
        raise ValueError(f"--depths: {bad} not available; valid depths: {list(DEPTHS)}")
    if suite in END_SUITE_ATTENTIONS:
        return [backbone_name("none", d, e) for d in depths for e in END_SUITE_ATTENTIONS[suite]]
    return [backbone_name(a, d) for d in depths for a in SUITE_ATTENTIONS[suite]]


def _escape_braces(path: Path) -> str:
    """Config.output_dir is a format string ("{backbone}"); keep literal braces in ``path``."""
    return str(path).replace("{", "{{").replace("}", "}}")


def plan_runs(base: Config, backbones: Sequence[str], seeds: Sequence[int], root: Path) -> list[RunSpec]:
    """Every (seed, backbone) pair, seed-major so the first seed of every backbone finishes
    first and partial suites can already be compared."""
    for kind, items in (("backbones", backbones), ("seeds", seeds)):
        if not items:
            raise ValueError(f"--{kind}: at least one is needed")
        if len(set(items)) != len(items):
            raise ValueError(f"--{kind}: duplicates in {list(items)}")
    for name in backbones:
        parse_backbone_name(name)  # ValueError listing the valid names
    specs = []
    for seed in seeds:
        for name in backbones:
            out = _escape_braces(Path(root) / name / f"seed{seed}")
            cfg = apply_overrides(base, {"backbone": name, "seed": int(seed), "output_dir": out},
                                  "ablation runner")
            specs.append(RunSpec(name, int(seed), resolve_attention_init(cfg)))  # as train() does
    return specs


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    with open(path) as fh:
        return json.load(fh)


def _check_saved_config(spec: RunSpec) -> None:
    """Refuse to reuse a run folder trained with a different recipe (results would mix)."""
    path = spec.out_dir / "config.yaml"
    if not path.is_file():
        return
    with open(path) as fh:
        saved = yaml.safe_load(fh) or {}
    # A key missing from the saved file is a field added after that run (e.g. attention_init):
    # compare against the value such a run had (config.saved_value).
    diffs = [f"{k}: saved {saved_value(saved, k)!r}{'' if k in saved else ' (not recorded)'}, "
             f"now {v!r}" for k, v in spec.cfg.to_dict().items()
             if k not in RESULT_NEUTRAL_FIELDS and saved_value(saved, k) != v]
    if diffs:
        raise ValueError(f"{path}: the existing run used other settings ({'; '.join(diffs)}); "
                         "use another --output-dir or remove that folder")


def run_state(spec: RunSpec) -> tuple[str, Path | None]:
    """("done", None), ("resume", last.pth) or ("new", None) for the run's folder."""
    _check_saved_config(spec)
    summary = _read_json(spec.out_dir / "summary.json")
    iters = spec.cfg.iters
    if summary is not None:
        done = int(summary.get("iterations", -1))
        if done == iters:
            return "done", None
        if done > iters:
            raise ValueError(f"{spec.out_dir}: finished {done} iterations, more than --iters "
                             f"{iters}; use another --output-dir or remove that folder")
    last = spec.out_dir / "last.pth"
    return ("resume", last) if last.is_file() else ("new", None)


def final_evaluation(out_dir: Path, iteration: int) -> dict[str, Any] | None:
    """The last evaluation record of ``log.jsonl`` at ``iteration`` (keys map, ap), if any."""
    found = [r for r in read_run_log(out_dir / "log.jsonl") if "map" in r and r["iter"] == iteration]
    return found[-1] if found else None


def _finished(spec: RunSpec) -> RunOutcome:
    """Check a run that returned: full iterations and an evaluation at the last one."""
    summary = _read_json(spec.out_dir / "summary.json")
    iters = spec.cfg.iters
    if summary is None or int(summary.get("iterations", -1)) != iters:
        got = None if summary is None else summary.get("iterations")
        return RunOutcome(spec, "failed", f"summary.json missing or at iteration {got}, not {iters}")
    if final_evaluation(spec.out_dir, iters) is None:
        # The trainer evaluates at the last iteration (also when resumed from a last.pth that
        # had reached it); a log without that record was cut or edited by hand.
        return RunOutcome(spec, "failed", f"no evaluation at iteration {iters} in log.jsonl; "
                                          f"remove {spec.out_dir} to retrain it")
    return RunOutcome(spec, "trained")


def _replaces_leftovers(spec: RunSpec, resume: Path | None) -> bool:
    """A new run (no last.pth to resume) in a folder with files of a run stopped before its
    first checkpoint: the runner owns its folders, so it replaces them (--overwrite)."""
    return resume is None and bool(existing_run_files(spec.out_dir))


def _train_in_process(spec: RunSpec, resume: Path | None, train_fn: TrainFn) -> RunOutcome:
    try:
        if _replaces_leftovers(spec, resume):
            train_fn(spec.cfg, resume=resume, overwrite=True)
        else:
            train_fn(spec.cfg, resume=resume)
    except NonFiniteLossError as exc:  # a seed that diverges is a result, not a crash
        return RunOutcome(spec, "diverged", str(exc))
    return _finished(spec)


def train_command(spec: RunSpec, resume: Path | None, launcher: Sequence[str]) -> list[str]:
    """The argv that trains ``spec`` with :data:`TRAIN_MODULE` from its saved config (written
    here: the trainer writes the same file again); ``launcher`` goes first: ``[python]``, or
    torchrun's argv (torchrun, like python, runs a module given ``-m``)."""
    spec.out_dir.mkdir(parents=True, exist_ok=True)
    config_path = spec.out_dir / "config.yaml"
    save_config(spec.cfg, config_path)
    cmd = [*launcher, "-m", TRAIN_MODULE, "--config", str(config_path)]
    if resume is not None:
        cmd += ["--resume", str(resume)]
    if _replaces_leftovers(spec, resume):
        cmd += ["--overwrite"]
    return cmd


def exit_outcome(spec: RunSpec, rc: int, log: Path) -> RunOutcome:
    """The outcome of a training subprocess that exited with ``rc`` (its output in ``log``)."""
    if rc == EXIT_INTERRUPTED:  # stopped by a signal after saving: rerunning resumes it
        return RunOutcome(spec, "interrupted", f"stopped by a signal after saving "
                                               f"{spec.out_dir / 'last.pth'}; see {log}")
    if rc == EXIT_NON_FINITE:  # a seed that diverges is a result, not a crash
        return RunOutcome(spec, "diverged", f"non-finite loss; see {log}")
    if rc != 0:
        return RunOutcome(spec, "failed", f"exit status {rc}; see {log}")
    return _finished(spec)


def _train_subprocess(spec: RunSpec, resume: Path | None, gpu: str) -> RunOutcome:
    """The training tool on one GPU, fed the run's resolved config; output to train.log."""
    cmd = train_command(spec, resume, [sys.executable])
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=str(gpu))
    logger.info("[gpu %s] %s: %s", gpu, spec.name, " ".join(cmd))
    log = spec.out_dir / "train.log"
    with open(log, "a") as fh:
        rc = wait_forwarding_stop(subprocess.Popen(cmd, env=env, stdout=fh,
                                                    stderr=subprocess.STDOUT))
    return exit_outcome(spec, rc, log)


def _run_on_gpus(jobs: Sequence[tuple[RunSpec, Path | None]], gpus: Sequence[str]) -> list[RunOutcome]:
    """One worker thread per GPU takes the next job from a shared queue until it is empty."""
    queue: Queue = Queue()
    for job in jobs:
        queue.put(job)
    outcomes: dict[str, RunOutcome] = {}

    def worker(gpu: str) -> None:
        while not stop_requested():  # asked to stop: start no further run
            try:
                spec, resume = queue.get_nowait()
            except Empty:
                return
            try:
                outcomes[spec.name] = _train_subprocess(spec, resume, gpu)
            except OSError as exc:  # e.g. the run folder cannot be opened
                outcomes[spec.name] = RunOutcome(spec, "failed", f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=worker, args=(g,), daemon=True) for g in gpus]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [outcomes.get(spec.name) or RunOutcome(spec, "interrupted", "not started")
            for spec, _ in jobs]


def visible_gpus() -> list[str]:
    """The ids ``--gpus`` may name: ``CUDA_VISIBLE_DEVICES``'s entries when it is set (each run
    gets one of them as its own ``CUDA_VISIBLE_DEVICES``), else 0..device_count-1."""
    count = torch.cuda.device_count()
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g.strip() for g in listed.split(",") if g.strip()][:count]
    return [str(i) for i in range(count)]


def check_gpus(gpus: Sequence[str]) -> None:
    """ValueError naming the visible devices when ``gpus`` lists one this machine does not have
    (each run would otherwise start on the CPU, all of them at once)."""
    visible = visible_gpus()
    missing = [str(g) for g in gpus if str(g) not in visible]
    if len(set(map(str, gpus))) != len(gpus):
        raise ValueError(f"--gpus {','.join(map(str, gpus))} names a GPU twice")
    if missing:
        have = f"the visible CUDA devices are {','.join(visible)}" if visible else \
            "no CUDA device is visible here"
        raise ValueError(f"--gpus {','.join(map(str, gpus))}: GPU(s) {','.join(missing)} not "
                         f"found; {have} (leave --gpus out to train the runs one after another "
                         f"on this machine's default device)")


def run_suite(specs: Sequence[RunSpec], gpus: Sequence[str] | None = None,
              train_fn: TrainFn | None = None) -> list[RunOutcome]:
    """Train every unfinished run; returns one outcome per spec, in order.

    Args:
        specs: from :func:`plan_runs`.
        gpus: CUDA device ids; one :data:`TRAIN_MODULE` subprocess per id at a time. None:
            in-process.
        train_fn: in-process training function (default ``ssd_da.engine.trainer.train``).
    """
    if gpus:
        check_gpus(gpus)
    if gpus and specs and specs[0].cfg.device not in ("auto", "cuda"):
        raise ValueError(f"--device {specs[0].cfg.device!r} cannot be combined with --gpus: each "
                         "run sees its one GPU as cuda:0 (use --device auto or cuda)")
    states = [run_state(spec) for spec in specs]  # every folder checked before anything trains
    done = {s.name for s, (state, _) in zip(specs, states) if state == "done"}
    jobs = [(s, resume) for s, (state, resume) in zip(specs, states) if state != "done"]
    logger.info("%d runs: %d finished earlier, %d to resume, %d new", len(specs), len(done),
                sum(r is not None for _, r in jobs), sum(r is None for _, r in jobs))
    if gpus:
        trained = _run_on_gpus(jobs, [str(g) for g in gpus])
    else:
        train_fn = train_fn or trainer.train  # looked up now: tests replace it
        trained = []
        for spec, resume in jobs:
            signal_name = stop_requested()
            if signal_name:  # a signal between two runs: start no further one
                raise Interrupted(f"{signal_name}: stopped before {spec.name}", signal_name)
            logger.info("%s: %s", spec.name, f"resuming from {resume}" if resume else "training")
            trained.append(_train_in_process(spec, resume, train_fn))
    by_name = {o.spec.name: o for o in trained}
    return [RunOutcome(s, "skipped") if s.name in done else by_name[s.name] for s in specs]
