"""The gpu-suite's smoke parts: does every GPU path run at all, before anything is measured?

Three training iterations of every attention family (ResNet18 trunks: the point is the code
path, not the speed) in float32, ``--amp``, ``--amp --channels-last`` and ``--amp --compile``,
through the trainer's own ``build_model`` / ``build_train_state`` / ``train_step``; a 1-process
``torchrun`` of the training tool (NCCL on a GPU, gloo on the CPU); tools/eval_voc.py,
tools/gradcam.py and tools/detect.py on a checkpoint. The host syncs inside the training
iterations after the first are counted: on CUDA the warnings of
``torch.cuda.set_sync_debug_mode("warn")`` (the whole smoke runs under it), on the CPU
``ssd_da.utils.sync``'s count of the same operations. The trainer's step is built to make none.

Each unit is a function returning ``(host syncs, detail)``; :func:`run_units` runs a list of
them, records an exception as FAILED with its error, and skips by name the units that no longer
fit before the part's deadline.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from ssd_da.bench.core import REPO_ROOT, synthetic_batch
from ssd_da.bench.loader import split_classes

SMOKE_BACKBONES = ("resnet18", "da_resnet18", "se_resnet18", "eca_resnet18", "sge_resnet18", "cbam_resnet18",
                   "resnet18_sa", "resnet18_mhsa", "resnet18_lga", "resnet18_la", "resnet18_ga")
# Compiled units, the likeliest to break first (they may not all fit the time): CBAM's backward
# gave NaN under inductor before issue 20, then the other custom autograd functions and the
# attention-heavy modules at the end of the backbone.
COMPILE_ORDER = ("cbam_resnet18", "da_resnet18", "resnet18_lga", "resnet18_mhsa", "sge_resnet18", "resnet18_sa",
                 "se_resnet18", "eca_resnet18", "resnet18_la", "resnet18_ga", "resnet18")
MODES: dict[str, dict[str, bool]] = {
    "float32": dict(amp=False, channels_last=False, compile=False),
    "amp": dict(amp=True, channels_last=False, compile=False),
    "amp, channels_last": dict(amp=True, channels_last=True, compile=False),
    "amp, compile": dict(amp=True, channels_last=False, compile=True),
}
SMOKE_ITERS = 3
Unit = tuple[str, Callable[[], tuple[str, str]]]


@dataclass
class UnitResult:
    part: str
    name: str
    status: str  # PASS, FAILED or SKIPPED (time)
    seconds: float
    syncs: str  # host syncs counted in training iterations; "" where there are none to count
    detail: str

    def markdown(self) -> str:
        detail = self.detail.replace("|", "/").replace("\n", " ")
        return f"| {self.part} | {self.name} | {self.status} | {self.seconds:.1f} | {self.syncs} | {detail} |"


def run_units(part: str, units: Sequence[Unit], deadline: float) -> list[UnitResult]:
    """Each unit in order. One that raises is FAILED with its error; one is skipped (by name)
    when the longest unit so far would no longer end before ``deadline`` (a
    ``time.perf_counter()`` value): a part stops between units, never inside one."""
    results: list[UnitResult] = []
    longest = 0.0
    for name, unit in units:
        start = time.perf_counter()
        if start + longest > deadline:
            results.append(UnitResult(part, name, "SKIPPED (time)", 0.0, "",
                                      f"{max(0.0, deadline - start):.0f} s of the part's time left, "
                                      f"its units took up to {longest:.0f} s"))
            continue
        try:
            syncs, detail = unit()
            status = "PASS"
        except Exception as exc:  # recorded; the next unit still runs
            syncs, detail, status = "", f"{type(exc).__name__}: {exc}"[:400], "FAILED"
        seconds = time.perf_counter() - start
        longest = max(longest, seconds)
        results.append(UnitResult(part, name, status, seconds, syncs, detail))
        print(results[-1].markdown(), flush=True)
    return results


@contextlib.contextmanager
def sync_debug(device: torch.device) -> Iterator[None]:
    """``torch.cuda.set_sync_debug_mode("warn")`` on CUDA for the block (nothing elsewhere)."""
    if device.type != "cuda":
        yield
        return
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


@contextlib.contextmanager
def counting_syncs(device: torch.device, host: Sequence[torch.Tensor]) -> Iterator[list[int]]:
    """``[count]`` of the host syncs in the block, filled in on exit: on CUDA the sync-debug
    warnings (under :func:`sync_debug`), elsewhere ``count_host_reads`` with ``host`` (tensors
    that stay on the CPU in a GPU run too, e.g. the loader's targets)."""
    from ssd_da.utils.sync import count_host_reads

    count = [0]
    if device.type == "cuda":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield count
        count[0] = sum("synchroniz" in str(w.message) for w in caught)
    else:
        with count_host_reads(host) as reads:
            yield count
        count[0] = reads.total


def smoke_batch(batch: int, device: torch.device) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    """A training batch as the loader gives it: uint8 images on the CPU (pinned on CUDA) and
    CPU targets, one or two boxes per image."""
    images, targets = synthetic_batch(batch, torch.device("cpu"))
    return (images.pin_memory() if device.type == "cuda" else images), targets


def train_unit(args: Any, device: torch.device, backbone: str, mode: dict[str, bool]) -> tuple[str, str]:
    """:data:`SMOKE_ITERS` training iterations as the trainer takes them; the host syncs of all
    but the first (which creates lazy state and compiles) are counted."""
    from ssd_da.config import load_config
    from ssd_da.engine.step import FiniteCheck, read_losses
    from ssd_da.engine.trainer import build_model, build_train_state, train_step

    cfg = load_config(None, [f"backbone={backbone}", "pretrained=none", f"batch_size={args.smoke_batch}",
                             "lr=0.001", "warmup_iters=0", "lr_steps=[]", "iters=3"])
    cfg = replace(cfg, **mode)
    backend = getattr(args, "compile_backend", None)
    model, _ = build_model(replace(cfg, compile=cfg.compile and backend is None), 21, device)
    if cfg.compile and backend is not None:  # the dry run: a compiler that takes seconds on a CPU
        model.compile_network(backend=backend)
    state = build_train_state(cfg, model, "none", device)
    images, targets = smoke_batch(cfg.batch_size, device)
    finite = FiniteCheck(0)
    state.model.train()
    losses, _ = train_step(state, images, targets, cfg, device, finite)
    first = read_losses(losses)["loss"]
    with counting_syncs(device, [v for t in targets for v in t.values()]) as syncs:
        for _ in range(SMOKE_ITERS - 1):
            losses, _ = train_step(state, images, targets, cfg, device, finite)
    finite.check(state.scaler, state.iteration)  # NonFiniteLossError: a step was skipped
    last = read_losses(losses)["loss"]
    return str(syncs[0]), f"{SMOKE_ITERS} steps of batch {cfg.batch_size}: loss {first:.3f} -> {last:.3f}"


def _workers(args: Any) -> int:
    """Loader workers of the smoke's tools: at most 4 (their runs are a few batches long)."""
    return 4 if args.workers < 0 else min(4, args.workers)


def _quiet_main(tool: Any, argv: list[str]) -> str:
    """``tool.main(argv)`` (an ``ssd_da.cli`` module) with its output captured; RuntimeError with
    the output's tail when it does not return 0."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        status = tool.main(argv)
    if status != 0:
        raise RuntimeError(f"exit status {status}: {out.getvalue()[-300:]}")
    return out.getvalue()


def make_checkpoint(classes: list[str], path: Path) -> Path:
    """An untrained da_resnet18 detector checkpoint, in the format ``load_detector`` reads."""
    from ssd_da.engine.checkpoint import save_checkpoint
    from ssd_da.models.ssd import build_ssd

    torch.manual_seed(0)
    model = build_ssd("da_resnet18", len(classes) + 1)
    save_checkpoint({"model": model.state_dict(), "backbone": "da_resnet18", "class_names": classes,
                     "config": {}, "iteration": 0}, path)
    return path


def torchrun_unit(args: Any, device: torch.device, work: Path, classes: list[str],
                  deadline: float) -> tuple[str, str]:
    """The training tool (``-m ssd_da.cli.train``) under a 1-process torchrun: the process group (NCCL on CUDA), DDP, the
    loader, the final evaluation and the checkpoints of a real run of 3 iterations."""
    out = work / "torchrun"
    values = {"demo": False, "data_root": str(args.data_root), "train_split": args.split,
              "test_split": args.eval_split, "classes": classes, "backbone": "da_resnet18",
              "pretrained": "none", "batch_size": args.smoke_batch, "eval_batch_size": args.smoke_batch,
              "iters": SMOKE_ITERS, "lr_steps": [2], "warmup_iters": 1, "eval_every": 0,
              "ckpt_every": SMOKE_ITERS, "log_every": 1, "workers": _workers(args),
              "amp": device.type == "cuda", "channels_last": device.type == "cuda", "output_dir": str(out)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
           "-m", "ssd_da.cli.train", "--device", device.type,
           *(f"{k}={json.dumps(v)}" for k, v in values.items())]
    # The child imports this very package (installed, or on PYTHONPATH as in a bare checkout).
    package_root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([package_root, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO_ROOT,
                          timeout=max(1.0, deadline - time.perf_counter()))
    if proc.returncode != 0:
        raise RuntimeError(f"exit status {proc.returncode}: {(proc.stderr or proc.stdout)[-300:]}")
    summary = json.loads((out / "summary.json").read_text())
    if summary["world_size"] != 1 or summary["iterations"] != SMOKE_ITERS:
        raise RuntimeError(f"summary.json says world size {summary['world_size']}, "
                           f"{summary['iterations']} iterations")
    backend = "NCCL" if device.type == "cuda" else "gloo"
    return "", (f"{backend}, {SMOKE_ITERS} iterations, final mAP {100 * summary['final_map']:.2f}% "
                f"(3 steps: no meaning), {summary['train_images_per_s']:.1f} images/s")


def _first_image(args: Any) -> str:
    from ssd_da.data.voc import resolve_split

    year_dir, image_id = resolve_split(args.data_root, args.eval_split)[0]
    return str(year_dir / "JPEGImages" / f"{image_id}.jpg")


def eval_unit(args: Any, device: torch.device, checkpoint: Callable[[], Path], work: Path) -> tuple[str, str]:
    from ssd_da.cli import eval_voc

    out = work / "eval.json"
    _quiet_main(eval_voc, ["--checkpoint", str(checkpoint()), "--data-root", str(args.data_root), "--split",
                           args.eval_split, "--device", device.type, "--batch-size", str(args.smoke_batch),
                           "--workers", str(_workers(args)), "--json", str(out)]
                + (["--amp"] if device.type == "cuda" else []))
    result = json.loads(out.read_text())
    return "", f"{result['num_images']} images, mAP {100 * (result['map'] or 0):.2f}% ({checkpoint().name})"


def gradcam_unit(args: Any, device: torch.device, checkpoint: Callable[[], Path], work: Path) -> tuple[str, str]:
    from ssd_da.cli import gradcam

    out = work / "gradcam.png"
    _quiet_main(gradcam, [_first_image(args), "--checkpoint", str(checkpoint()), "--out", str(out),
                          "--device", device.type])
    return "", f"{out.stat().st_size} bytes of PNG"


def detect_unit(args: Any, device: torch.device, checkpoint: Callable[[], Path], work: Path) -> tuple[str, str]:
    from ssd_da.cli import detect

    out = work / "detect"
    _quiet_main(detect, [_first_image(args), "--checkpoint", str(checkpoint()), "--out", str(out),
                         "--device", device.type, "--score", "0.0"])
    return "", f"{len(json.loads((out / 'detections.json').read_text()))} detections"


def smoke_units(args: Any, device: torch.device, work: Path, deadline: float) -> list[Unit]:
    """The smoke part's units: eager training in three modes for every family, then torchrun,
    evaluation, Grad-CAM and detect (on torchrun's last.pth, or an untrained checkpoint when
    that run failed)."""
    classes = split_classes(args.data_root, args.split)
    untrained = work / "untrained.pth"

    def checkpoint() -> Path:
        trained = work / "torchrun" / "last.pth"
        if trained.exists():
            return trained
        return untrained if untrained.exists() else make_checkpoint(classes, untrained)

    units: list[Unit] = [(f"train {backbone}, {mode}", partial(train_unit, args, device, backbone, MODES[mode]))
                         for mode in ("float32", "amp", "amp, channels_last") for backbone in args.smoke_backbones]
    backend = "NCCL" if device.type == "cuda" else "gloo"
    units.append((f"torchrun, 1 process, {backend}",
                  partial(torchrun_unit, args, device, work, classes, deadline)))
    for name, unit in (("eval_voc.py", eval_unit), ("gradcam.py", gradcam_unit), ("detect.py", detect_unit)):
        units.append((name, partial(unit, args, device, checkpoint, work)))
    return units


def compile_units(args: Any, device: torch.device) -> list[Unit]:
    """``--amp --compile`` training units, riskiest family first (:data:`COMPILE_ORDER`)."""
    order = [b for b in COMPILE_ORDER if b in args.smoke_backbones]
    order += [b for b in args.smoke_backbones if b not in order]
    return [(f"train {b}, amp, compile", partial(train_unit, args, device, b, MODES["amp, compile"]))
            for b in order]
