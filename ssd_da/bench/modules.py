"""``tools/benchmark.py modules``: each attention module alone, forward and backward, the time it
adds to a training step, with its parameters and GFLOPs; ``--stages`` is the table of
:mod:`ssd_da.bench.floors` (the modules against their memory-traffic floor)."""
from __future__ import annotations

import argparse
import os
import statistics
from typing import Any

import torch

from ssd_da.bench import floors
from ssd_da.bench.core import environment_lines, timed
from ssd_da.models.attention import build_attention
from ssd_da.utils.flops import count_flops, count_flops_complete


def time_forward_backward(module: torch.nn.Module, x: torch.Tensor) -> float:
    """Seconds for one forward and backward pass of ``module`` on ``x`` (B, C, H, W): the time
    the module adds to a training step (its gradient reaches the input, as inside a network)."""
    module.zero_grad(set_to_none=True)
    x.grad = None
    return timed(lambda: module(x).sum().backward(), x.device)


def run_modules(args: argparse.Namespace) -> str:
    """Each attention module alone, forward + backward on SSD300's layer4 map, interleaved; with
    ``--stages``, the four ResNet50 stages against the modules' floors (ssd_da/bench/floors.py)."""
    if args.stages:
        args.modules = args.modules or ",".join(floors.MODULES)
        args.batch_size = args.batch_size or 8
        args.section = "modules-stages-compiled" if args.compile else "modules-stages"
        return floors.run_stages(args)
    args.modules = args.modules or "se,eca,cbam,sa,mhsa,la,ga,lga"
    args.batch_size = args.batch_size or 16
    names = [n.strip() for n in args.modules.split(",") if n.strip()]
    shape = (args.batch_size, args.channels, args.size, args.size)
    torch.manual_seed(0)
    modules = {n: build_attention(n, args.channels).train() for n in names}
    x = torch.randn(shape, requires_grad=True)
    times: dict[str, list[float]] = {n: [] for n in names}
    env = environment_lines("cpu")
    load_before = os.getloadavg()[0]
    for rnd in range(args.warmup + args.repeats):  # interleaved: load changes hit every module
        for n in names[rnd % len(names):] + names[:rnd % len(names)]:
            t = time_forward_backward(modules[n], x)
            if rnd >= args.warmup:
                times[n].append(t)
    load_after = os.getloadavg()[0]
    rows = []
    for n, m in modules.items():
        params = sum(p.numel() for p in m.parameters())
        one = (1, *shape[1:])  # GFLOPs per image, as tools/complexity.py counts them
        stat, full = count_flops(m, one), count_flops_complete(m, one)
        rows.append(f"| {n} | {params:,} | {stat / 1e9:.4f} | {full / 1e9:.4f} | "
                    f"{1000 * min(times[n]):.1f} | {1000 * statistics.median(times[n]):.1f} |")
        print(rows[-1], flush=True)
    return "\n".join([
        "## modules: attention modules' cost per training step",
        "",
        f"`tools/benchmark.py modules --modules {args.modules} --batch-size {args.batch_size} "
        f"--channels {args.channels} --size {args.size} --repeats {args.repeats}`: each module "
        f"alone in train mode, forward and backward on a {'x'.join(map(str, shape))} input (the "
        "layer4 map SSD300 on ResNet18/34 sees at 300x300, batch 16): the time one module adds "
        "to a training step. Modules run interleaved, round by round, so a change in machine "
        f"load hits all of them; min and median of {args.repeats} rounds after {args.warmup} "
        "warm-up. GFLOPs of the module's forward per image (batch 1, as tools/complexity.py): "
        "torchstat's rules (matrix products count 0) and complete (FlopCounterMode, 2 per "
        "multiply-accumulate).",
        "",
        *env, "- float32",
        f"- 1-minute load average {load_before:.1f} before, {load_after:.1f} after "
        f"({os.cpu_count()} logical CPUs)"
        + (": above the CPU count, other jobs shared the cores and the min is the better estimate"
           if max(load_before, load_after) > (os.cpu_count() or 1) else ": a quiet machine"),
        "",
        "| module | params | GFLOPs (torchstat) | GFLOPs (complete) | ms min | ms median |",
        "|---|---:|---:|---:|---:|---:|",
        *rows,
    ])


def register(sub: Any) -> None:
    mods = sub.add_parser("modules", help="attention modules alone: forward + backward time "
                                          "per training step, params, GFLOPs")
    mods.add_argument("--modules", default=None,
                      help="comma-separated keys of ssd_da.models.attention.ATTENTIONS (default: "
                           "se,eca,cbam,sa,mhsa,la,ga,lga; with --stages none,se,eca,sge,da,cbam)")
    mods.add_argument("--batch-size", type=int, default=None, help="default 16; with --stages 8")
    mods.add_argument("--channels", type=int, default=512)
    mods.add_argument("--size", type=int, default=10, help="map side (10: SSD300's layer4)")
    mods.add_argument("--repeats", type=int, default=20)
    mods.add_argument("--warmup", type=int, default=2)
    floors.add_options(mods)
    mods.set_defaults(func=run_modules)
