"""``tools/benchmark.py modules --stages``: every attention module against its memory-traffic
floor at the four ResNet50 stages of SSD300, before and after issue 24, and the SSD300
training step they make (``--step``); also a part of the gpu-suite.

A module's floor is the full-size passes its forward and backward must make, R reads and W
writes of a tensor of the block output's size, priced with one measured read (``x.sum()``) and
one measured clone (a read and a write to fresh memory, as the module's ``y`` and ``dx`` are):
``R * read + W * (clone - read)``. Every timing in one table comes from one process, the
variants interleaved round by round, so a change in machine load hits all of them.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from typing import Callable

import torch

from ssd_da.bench import throughput as bt
from ssd_da.bench.core import environment_lines, load_average, synthetic_batch, timed
from ssd_da.bench.legacy_attention import build_legacy, legacy_attention
from ssd_da.models.attention import build_attention
from ssd_da.models.ssd import build_ssd

# ResNet50's block outputs in SSD300 (300x300 input): channels and side, layer1..layer4.
STAGES = {"layer1": (256, 75), "layer2": (512, 38), "layer3": (1024, 19), "layer4": (2048, 10)}
# (reads, writes) of the full-size tensor that forward + backward cannot do without (issue 24):
# SE/ECA: x for GAP; x, y for the product; grad, x for the mask's gradient; grad, dx.
# DA (spatial then channel) and SGE: one more read of x in each direction, for the second
# reduction, which needs the first one's mask (forward) or gradient (backward).
# CBAM: as DA, the channel pools' mean and max in one read (maxima kept by position).
FLOOR_PASSES = {"none": (0, 0), "se": (5, 2), "eca": (5, 2), "sge": (7, 2), "da": (7, 2), "cbam": (7, 2)}
MODULES = tuple(FLOOR_PASSES)
STEP_BACKBONES = "resnet50,se_resnet50,da_resnet50,before:se_resnet50,before:da_resnet50"
TABLE_HEAD = ["| stage, input | module | before ms | after ms | compiled ms | floor ms | after / floor | "
              "compiled / floor | units ms |", "|---|---|---:|---:|---:|---|---:|---:|---|"]


def _fwd_bwd(module: Callable, x: torch.Tensor, grad: torch.Tensor, params: list, amp: bool) -> Callable:
    """One forward and backward to x and the parameters, with a full-size upstream gradient."""
    def run() -> None:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            y = module(x)
        torch.autograd.grad(y, [x, *params], grad, allow_unused=True)
    return run


def _contenders(names: list[str], channels: int, before: bool, compiled: bool,
                backend: str = "inductor") -> dict[str, tuple]:
    """{label: (callable module, parameters)}: after, before (the legacy twin, same weights) and
    compiled (torch.compile of the after module) variants."""
    out = {}
    for name in names:
        torch.manual_seed(0)
        module = build_attention(name, channels).train()
        out[name] = (module, list(module.parameters()))
        if before and name != "none":
            old = build_legacy(name, channels).train()
            old.load_state_dict(module.state_dict())
            out[f"before:{name}"] = (old, list(old.parameters()))
        if compiled and name != "none":
            out[f"compiled:{name}"] = (torch.compile(module, backend=backend), out[name][1])
    return out


def time_stage(names: list[str], channels: int, side: int, args: argparse.Namespace,
               device: torch.device) -> dict[str, float]:
    """Median seconds per label (modules' forward + backward, and the read / clone units)."""
    x = torch.randn(args.batch_size, channels, side, side, device=device)
    dtype = torch.bfloat16 if args.amp else torch.float32
    x = x.to(dtype).requires_grad_(True)
    grad = torch.randn_like(x)
    jobs = {label: _fwd_bwd(m, x, grad, params, args.amp)
            for label, (m, params) in _contenders(names, channels, args.before, args.compile,
                                                  getattr(args, "compile_backend", None) or "inductor").items()}
    jobs["read"] = lambda: x.detach().sum()
    jobs["clone"] = lambda: x.detach().clone()
    for job in jobs.values():  # warm-up (and compilation)
        job()
    labels, times = list(jobs), {label: [] for label in jobs}
    for r in range(args.repeats):
        for label in labels[r % len(labels):] + labels[:r % len(labels)]:
            times[label].append(timed(jobs[label], device, args.clock))
    pick = min if getattr(args, "stat", "median") == "min" else statistics.median
    return {label: pick(t) for label, t in times.items()}


def stage_rows(args: argparse.Namespace, device: torch.device) -> tuple[list[str], list[str]]:
    """(table rows, summary bullets) for every stage in ``args.stage_names``."""
    names = [n for n in args.modules.split(",") if n]
    rows, notes = [], []
    for stage in args.stage_names.split(","):
        channels, side = STAGES[stage]
        med = time_stage(names, channels, side, args, device)
        read, write = med["read"], med["clone"] - med["read"]
        for name in names:
            r, w = FLOOR_PASSES.get(name, (0, 0))
            floor = r * read + w * write
            rows.append(_row(stage, channels, side, args.batch_size, name, med, floor, (r, w)))
            print(rows[-1], flush=True)
        notes.append(_ratios(stage, med))
    return rows, notes


def _ms(seconds: float | None) -> str:
    return "" if seconds is None else f"{1000 * seconds:.1f}"


def _row(stage: str, channels: int, side: int, batch: int, name: str, med: dict, floor: float,
         passes: tuple[int, int]) -> str:
    after, before, compiled = med[name], med.get(f"before:{name}"), med.get(f"compiled:{name}")
    over = lambda t: "" if t is None or floor <= 0 else f"{t / floor:.2f}"  # noqa: E731
    return (f"| {stage} {batch}x{channels}x{side}x{side} | {name} | {_ms(before)} | {_ms(after)} | "
            f"{_ms(compiled)} | {passes[0]} R + {passes[1]} W = {_ms(floor)} | {over(after)} | "
            f"{over(compiled)} | read {_ms(med['read'])}, clone {_ms(med['clone'])} |")


def _ratios(stage: str, med: dict) -> str:
    """One bullet: DA, CBAM, SGE over SE at this stage (after / after, and after / SE before)."""
    parts = []
    for name in ("da", "cbam", "sge", "eca"):
        if name in med and "se" in med:
            text = f"{name}/se {med[name] / med['se']:.2f}"
            if "before:se" in med:
                text += f" (over SE before: {med[name] / med['before:se']:.2f})"
            parts.append(text)
    return f"- {stage}, forward + backward over SE's: " + "; ".join(parts)


def _step_model(label: str, args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    """SSD300 (21 classes) for ``[before:|compiled:]backbone``; before: the pre-issue modules."""
    kind, _, backbone = label.rpartition(":")
    torch.manual_seed(0)
    if kind == "before":
        with legacy_attention():
            return bt.prepare(build_ssd(backbone, 21), "ours", device, False, False)
    return bt.prepare(build_ssd(backbone, 21), "ours", device, False, kind == "compiled")


def step_rows(args: argparse.Namespace, device: torch.device) -> list[str]:
    """Markdown rows: median seconds of an SSD300 training step (forward, loss, backward, SGD)
    per backbone, interleaved, and the ratio to the first plain (or first compiled) backbone."""
    labels = [s for s in args.step_backbones.split(",") if s]
    if args.compile:
        labels += ["compiled:resnet50", "compiled:da_resnet50"]
    images, targets = synthetic_batch(args.batch_size, device)
    steps = {}
    for label in labels:
        model = _step_model(label, args, device)
        steps[label] = bt.network_train_step(model, "ours", images, targets, device, args.amp, False)
        for _ in range(2):  # warm-up (and compilation)
            steps[label]()
        print(f"built and warmed up {label}", flush=True)
    times = {label: [] for label in labels}
    for r in range(args.step_rounds):
        for label in labels[r % len(labels):] + labels[:r % len(labels)]:
            times[label].append(timed(steps[label], device, args.clock))
    pick = min if args.stat == "min" else statistics.median
    med = {label: pick(t) for label, t in times.items()}
    rows = []
    first = {label.rpartition(":")[0]: label for label in reversed(labels)}  # first of each kind
    for label in labels:
        kind = label.rpartition(":")[0]
        base = med[first["compiled" if kind == "compiled" else ""]]
        rows.append(f"| {label} | {med[label]:.3f} | {med[label] / base:.3f} | "
                    f"{', '.join(f'{t:.2f}' for t in times[label])} |")
        print(rows[-1], flush=True)
    return rows


def run_stages(args: argparse.Namespace) -> str:
    """The Markdown section of ``modules --stages`` (module docstring)."""
    device = torch.device(args.device if args.device != "auto" else
                          ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    env = environment_lines(str(device))
    rows, notes = stage_rows(args, device)
    step = step_rows(args, device) if args.step else []
    return "\n".join([
        f"## modules-stages{'-compiled' if args.compile else ''}: attention modules against their "
        f"memory-traffic floor (issue 24){', torch.compile' if args.compile else ''}", "",
        *stages_text(args, device), "", *env,
        f"- {torch.get_num_threads()} CPU threads; load average when it ended: {load_average()}", "",
        *TABLE_HEAD, *rows, "", *notes,
        *(["", "SSD300 training step (synthetic batch, forward, loss, backward, SGD), interleaved:", "",
           f"| backbone | s per step ({args.stat}) | ratio to resnet50 | every step, s |",
           "|---|---:|---:|---|", *step] if step else []),
    ])


def stages_text(args: argparse.Namespace, device: torch.device) -> list[str]:
    """The paragraph that says what was measured and how."""
    precision = "bf16 autocast" if args.amp else "float32"
    return [f"`tools/benchmark.py {' '.join(_command_words())}`: each module alone in train mode, "
            f"forward and backward to the input and the parameters (a full-size upstream gradient), "
            f"on {args.device if args.device != 'auto' else device.type}, {precision}, batch "
            f"{args.batch_size}, at the block outputs of ResNet50's four stages in SSD300; "
            f"{'process CPU time' if args.clock == 'cpu' else 'wall-clock time'}, {args.stat} of "
            f"{args.repeats} interleaved rounds after one warm-up. 'before': the modules as they were "
            f"before issue 24 (ssd_da/bench/legacy_attention.py), same weights; 'compiled': torch.compile "
            f"(inductor) of the module. Floor: the full-size reads R and writes W forward + backward "
            f"cannot do without (ssd_da/bench/floors.py, FLOOR_PASSES), priced with the measured units "
            f"of that stage, R x read + W x (clone - read)."]


def _command_words() -> list[str]:
    return sys.argv[sys.argv.index("modules"):] if "modules" in sys.argv else ["modules", "--stages"]


def add_options(p: argparse.ArgumentParser) -> None:
    """The ``modules`` options of this table (the rest of ``modules`` is ssd_da/bench/modules.py's)."""
    p.add_argument("--stages", action="store_true",
                   help="the table of this file: ResNet50's four stages, floors, before/after")
    p.add_argument("--stage-names", default=",".join(STAGES), help="stages to measure, comma-separated")
    p.add_argument("--before", action="store_true", help="add the pre-issue-24 modules (same weights)")
    p.add_argument("--compile", action="store_true", help="add torch.compile'd modules (and steps)")
    p.add_argument("--step", action="store_true", help="add interleaved SSD300 training steps")
    p.add_argument("--step-backbones", default=STEP_BACKBONES,
                   help="backbones of --step; 'before:' builds the pre-issue modules")
    p.add_argument("--step-rounds", type=int, default=5, help="interleaved rounds of --step")
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (the gpu-suite's precision)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--stat", choices=("median", "min"), default="median",
                   help="per variant, of its rounds (min: the least disturbed, on a busy machine)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall-clock time, or the process's CPU time (CPU device; a shared machine)")
