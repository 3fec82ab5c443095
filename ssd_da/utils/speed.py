"""Throughput and memory of SSD300 training steps and inference on synthetic batches
(used by ``tools/benchmark.py model``; the figures go to docs/benchmarks.md, never to tests)."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ssd_da.engine.inference import autocast_context


@dataclass
class SpeedResult:
    mode: str  # "train" or "inference"
    images_per_s: float
    ms_per_batch: float
    peak_memory_mb: float | None  # CUDA only


def synthetic_batch(batch: int, num_classes: int, device: torch.device, seed: int = 0
                    ) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    """Random (B, 3, 300, 300) images and 1-5 random xyxy boxes per image in 300-px space."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, 300, 300, generator=g)
    targets = []
    for _ in range(batch):
        n = int(torch.randint(1, 6, (1,), generator=g))
        xy = torch.rand(n, 2, generator=g) * 200
        wh = 20 + torch.rand(n, 2, generator=g) * 80
        targets.append({"boxes": torch.cat([xy, xy + wh], 1).to(device),
                        "labels": torch.randint(1, num_classes, (n,), generator=g).to(device)})
    return images.to(device), targets


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(model: torch.nn.Module, mode: str, batch: int, device: torch.device, steps: int,
            warmup: int, amp: bool = False, channels_last: bool = False) -> SpeedResult:
    """Median time per batch over ``steps`` after ``warmup`` (SGD step included in train mode)."""
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    images, targets = synthetic_batch(batch, model.num_classes, device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    model.train(mode == "train")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(warmup + steps):
        _sync(device)
        start = time.perf_counter()
        if mode == "train":
            with autocast_context(device, amp):
                loss = sum(model(images, targets).values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        else:
            with torch.inference_mode(), autocast_context(device, amp):
                model(images)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    times.sort()
    median = times[len(times) // 2]
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return SpeedResult(mode, batch / median, 1000 * median, peak)
