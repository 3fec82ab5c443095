"""What autograd keeps for backward per attention module and for a whole SSD300, with each
module's plain formulas and with its memory-efficient path (``tools/benchmark.py memory``).

Saved bytes scale linearly with the batch, so they are measured at batch 2 on the CPU and
reported for batch 32 (x16); sizes are float32.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ssd_da.bench.core import environment_lines
from ssd_da.models.attention import build_attention
from ssd_da.models.ssd import build_ssd
from ssd_da.utils.memory import saved_tensor_bytes

# ResNet50 stage outputs for a 300x300 input: (channels, side).
STAGES = {"layer1": (256, 75), "layer2": (512, 38), "layer3": (1024, 19), "layer4": (2048, 10)}
MEASURED_BATCH, REPORTED_BATCH = 2, 32


@dataclass
class ModuleRow:
    name: str
    ratio_before: float  # saved bytes / block output bytes, plain formulas (layer2 shape)
    ratio_after: float  # the same, as built by default
    mb_before: float  # MB at layer2, batch 32
    mb_after: float


@dataclass
class NetworkRow:
    backbone: str
    gb_before: float  # saved for backward by one SSD300 training forward, batch 32
    gb_after: float


def _set_memory_efficient(model: torch.nn.Module, value: bool) -> None:
    """Switch every module that has a ``memory_efficient`` flag."""
    for module in model.modules():
        if hasattr(module, "memory_efficient"):
            module.memory_efficient = value


def module_rows(names: list[str], stage: str = "layer2") -> list[ModuleRow]:
    channels, side = STAGES[stage]
    x = torch.randn(MEASURED_BATCH, channels, side, side, requires_grad=True)
    full = x.numel() * x.element_size()
    scale = REPORTED_BATCH / MEASURED_BATCH / 1e6
    rows = []
    for name in names:
        torch.manual_seed(0)
        module = build_attention(name, channels).train()
        params = list(module.parameters())
        after = saved_tensor_bytes(module, x, exclude=params)
        _set_memory_efficient(module, False)  # modules without the option measure the same twice
        before = saved_tensor_bytes(module, x, exclude=params)
        rows.append(ModuleRow(name, before / full, after / full, before * scale, after * scale))
    return rows


def network_rows(backbones: list[str]) -> list[NetworkRow]:
    images = torch.randn(MEASURED_BATCH, 3, 300, 300)
    targets = [{"boxes": torch.tensor([[30.0, 40.0, 150.0, 200.0]]), "labels": torch.tensor([1])}
               for _ in range(MEASURED_BATCH)]
    rows = []
    for backbone in backbones:
        torch.manual_seed(0)
        model = build_ssd(backbone, num_classes=21).train()
        params = list(model.parameters())
        after = saved_tensor_bytes(model, images, targets, exclude=params)
        _set_memory_efficient(model, False)
        before = saved_tensor_bytes(model, images, targets, exclude=params)
        scale = REPORTED_BATCH / MEASURED_BATCH / 1e9
        rows.append(NetworkRow(backbone, before * scale, after * scale))
    return rows


MODULES = ("da", "da_cs", "da_par", "da_s", "da_c", "se", "eca", "sge", "cbam")


def run(args: Any) -> str:
    """``tools/benchmark.py memory``: saved-for-backward bytes per module and per network."""
    torch.set_num_threads(max(1, torch.get_num_threads()))
    modules = module_rows(args.modules.split(","))
    networks = network_rows(args.backbones.split(",")) if args.backbones else []
    for r in modules:
        print(f"{r.name:8s} {r.ratio_before:.3f} -> {r.ratio_after:.3f} x block output")
    channels, side = STAGES["layer2"]
    lines = [
        "## memory: what autograd keeps for backward (saved_tensors_hooks)", "",
        f"`tools/benchmark.py memory`: distinct storages saved for backward (parameters left "
        f"out), measured at batch {MEASURED_BATCH} on the CPU and scaled to batch {REPORTED_BATCH} "
        f"(saved bytes are linear in the batch); float32. A ResNet50 layer2 block output is "
        f"{REPORTED_BATCH}x{channels}x{side}x{side} floats = "
        f"{REPORTED_BATCH * channels * side * side * 4 / 1e6:.1f} MB. 'plain' runs each module's "
        f"formulas with ordinary tensor operations (`memory_efficient=False`), 'now' as built by "
        f"default (`ssd_da/models/attention_ops.py`).", "",
        *environment_lines("cpu"), "",
        "| module | plain, x block output | now, x block output | plain, MB (layer2, batch 32) | now, MB |",
        "|---|---:|---:|---:|---:|",
        *[f"| {r.name} | {r.ratio_before:.3f} | {r.ratio_after:.3f} | {r.mb_before:.1f} | {r.mb_after:.1f} |"
          for r in modules],
    ]
    if networks:
        lines += ["", "Whole SSD300 training forward (everything autograd keeps), batch 32:", "",
                  "| backbone | plain, GB | now, GB |", "|---|---:|---:|",
                  *[f"| {r.backbone} | {r.gb_before:.2f} | {r.gb_after:.2f} |" for r in networks]]
    return "\n".join(lines)


def register(sub: Any) -> None:
    p = sub.add_parser("memory", help="bytes saved for backward per attention module and per SSD300")
    p.add_argument("--modules", default=",".join(MODULES))
    p.add_argument("--backbones", default="resnet50,da_resnet50,cbam_resnet50",
                   help="SSD300 backbones for the whole-network rows ('' to skip)")
    p.set_defaults(func=run)
