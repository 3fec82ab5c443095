"""Training and inference throughput: ssd_da's SSD300 against torchvision's ``SSD`` class on the
same trunk and torchvision's ``ssd300_vgg16``, network only (a synthetic batch already on the
device) or end to end (JPEG files through the real loader): the rows of ``tools/benchmark.py
train``, ``eval`` and the gpu-suite.

Every model trains with the same SGD (momentum 0.9, weight decay 5e-4) in the same process.
torchvision's models take 0..1 images and normalise and resize them in their ``transform``;
ours takes the normalised 300x300 batch (or uint8 pixels, normalised on the device).
"""
from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from torchvision.models.detection.ssd import SSD, SSDHead, ssd300_vgg16

from ssd_da.bench.core import Result, figure, sync, synthetic_batch, time_steps
from ssd_da.bench.loader import split_classes
from ssd_da.models.ssd import SSD300, SSD300_ASPECT_RATIOS, SSD300_SCALES, SSD300_STEPS, build_ssd
from ssd_da.utils.device import autocast_context, runs_bf16

SUBJECTS = ("ours", "tv-ssd-our-trunk", "tv-ssd300-vgg16")


class _Trunk(nn.Module):
    """Our ResNet layer2/3/4 + extra blocks as a torchvision SSD backbone (OrderedDict of maps)."""

    def __init__(self, ssd: SSD300) -> None:
        super().__init__()
        self.ssd = ssd
        self.out_channels = ssd.out_channels

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        return OrderedDict((str(i), f) for i, f in enumerate(self.ssd.feature_maps(x)))


def build_subject(subject: str, backbone: str, num_classes: int = 21) -> nn.Module:
    """``ours``: ssd_da's SSD300; ``tv-ssd-our-trunk``: torchvision's SSD class with the same
    trunk, default boxes and head; ``tv-ssd300-vgg16``: torchvision's model, its own transform."""
    if subject == "ours":
        return build_ssd(backbone, num_classes)
    if subject == "tv-ssd-our-trunk":
        ours = build_ssd(backbone, num_classes)
        trunk = _Trunk(ours)
        head = SSDHead(ours.out_channels, ours.anchor_generator.num_anchors_per_location(), num_classes)
        from torchvision.models.detection.anchor_utils import DefaultBoxGenerator

        anchors = DefaultBoxGenerator(SSD300_ASPECT_RATIOS, scales=SSD300_SCALES, steps=SSD300_STEPS)
        return SSD(trunk, anchors, (300, 300), num_classes, head=head,
                   image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    if subject == "tv-ssd300-vgg16":
        return ssd300_vgg16(weights=None, weights_backbone=None, num_classes=num_classes)
    raise ValueError(f"unknown subject {subject!r}; valid: {list(SUBJECTS)}")


def model_inputs(subject: str, images: torch.Tensor, targets: list[dict] | None, channels_last: bool
                 ) -> tuple[Any, Any]:
    """(images, targets) as each model takes them: ours a normalised batch and CPU targets;
    torchvision's a list of 0..1 images and targets on the device."""
    if subject == "ours":  # uint8 pixels, normalised inside the model (SSD300._run_network)
        return (images.contiguous(memory_format=torch.channels_last) if channels_last else images), targets
    scaled = images.float().div_(255.0)
    device_targets = None if targets is None else [
        {k: t[k].to(images.device, non_blocking=True) for k in ("boxes", "labels")} for t in targets]
    return list(scaled), device_targets


def prepare(model: nn.Module, subject: str, device: torch.device, channels_last: bool, compile_: bool,
            backend: str | None = None) -> nn.Module:
    """On ``device``, channels_last if asked, our network compiled if asked (by ``backend``,
    default inductor: the dry run of gpu-suite takes one that compiles in seconds on a CPU)."""
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compile_ and subject == "ours":
        model.compile_network(**({"backend": backend} if backend else {}))
    return model


def network_train_step(model: nn.Module, subject: str, images: torch.Tensor, targets: list[dict],
                       device: torch.device, amp: bool, channels_last: bool) -> Callable[[], None]:
    """One SGD step of ``model`` on a fixed batch, as a closure (no host sync inside)."""
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9, weight_decay=5e-4,
                                fused=True)

    def step() -> None:
        x, y = model_inputs(subject, images, targets, channels_last)
        with autocast_context(device, amp):
            losses = model(x, y)
        loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def network_infer_step(model: nn.Module, subject: str, images: torch.Tensor, device: torch.device,
                       amp: bool, channels_last: bool) -> Callable[[], None]:
    """Forward with decoding and NMS on a fixed batch."""
    model.eval()

    def step() -> None:
        with torch.inference_mode(), autocast_context(device, amp):
            x, _ = model_inputs(subject, images, None, channels_last)
            model(x)
    return step


def e2e_train_step(model: nn.Module, subject: str, loader_iter: Any, device: torch.device, amp: bool,
                   channels_last: bool) -> Callable[[], None]:
    """One step on the next batch of the real loader: ours through the trainer's sgd_step (the
    uint8 batch moves from pinned memory, normalised on the device); torchvision's models with
    the same SGD on 0..1 images and device targets."""
    from ssd_da.engine.step import make_optimizer, make_scaler, sgd_step

    model.train()
    optimizer = make_optimizer(model, 1e-4, 0.9, 5e-4)
    scaler = make_scaler(device)

    def step() -> None:
        images, targets = next(loader_iter)
        if subject == "ours":
            sgd_step(model, optimizer, scaler, images, targets, device, amp, channels_last=channels_last)
            return
        x, y = model_inputs(subject, images.to(device, non_blocking=True), targets, channels_last)
        with autocast_context(device, amp):
            loss = sum(model(x, y).values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


@dataclass
class Row:
    subject: str
    backbone: str
    mode: str  # "network only" or "end to end"
    settings: str  # precision, memory format, compiled
    result: Result

    def markdown(self) -> str:
        peak = f"{self.result.peak_mb:.0f}" if self.result.peak_mb is not None else "n/a"
        return (f"| {self.subject} | {self.backbone} | {self.mode} | {self.settings} | "
                f"{figure(self.result.images_per_s)} | {figure(self.result.ms_per_batch)} | {peak} |")


def settings_label(args: Any, device: torch.device, subject: str) -> str:
    parts = ["bf16" if runs_bf16(device, args.amp) else "fp32",
             "channels_last" if args.channels_last else "NCHW"]
    if args.compile and subject == "ours":
        parts.append("compiled")
    return ", ".join(parts)


def train_rows(args: Any, device: torch.device, loader: bool = True) -> list[Row]:
    """Network-only and/or end-to-end training rows for every (subject, backbone); end to end
    adds one 'loader alone' row (the same loader with no model) unless ``loader`` is False."""
    rows = []
    pairs = [("ours", b) for b in args.backbones.split(",") if b] + [
        (s, args.tv_backbone if s == "tv-ssd-our-trunk" else "vgg16") for s in args.tv.split(",") if s]
    modes = [m for m in args.modes.split(",") if m]
    repeats, backend = getattr(args, "repeats", 3), getattr(args, "compile_backend", None)
    if "e2e" in modes and loader:
        rows.append(loader_row(args))
        print(rows[-1].markdown(), flush=True)
    for subject, backbone in pairs:
        for mode in modes:
            torch.manual_seed(0)
            model = prepare(build_subject(subject, backbone), subject, device, args.channels_last, args.compile,
                            backend)
            if mode == "network":
                images, targets = synthetic_batch(args.batch_size, device)
                step = network_train_step(model, subject, images, targets, device, args.amp, args.channels_last)
                result = time_steps(step, device, args.batch_size, args.steps, args.warmup, repeats)
            else:
                steps = e2e_block(args)
                with real_loader(args, args.warmup + repeats * steps) as batches:
                    step = e2e_train_step(model, subject, batches, device, args.amp, args.channels_last)
                    result = time_steps(step, device, args.batch_size, steps, args.warmup, repeats)
            rows.append(Row(subject, backbone, "network only" if mode == "network" else "end to end",
                            settings_label(args, device, subject), result))
            print(rows[-1].markdown(), flush=True)
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def e2e_block(args: Any) -> int:
    """Steps per timed end-to-end block: at least twice the batches the workers keep ready, so
    that batches made during the warm-up cannot carry a block (the median of 3 is then a
    steady-state block)."""
    from ssd_da.engine.loaders import PREFETCH_BATCHES, resolve_workers

    return max(args.steps, 2 * PREFETCH_BATCHES * resolve_workers(args.workers))


def _train_dataset(args: Any) -> Any:
    from ssd_da.data.transforms import build_train_transform
    from ssd_da.data.voc import VOCDetection

    return VOCDetection(args.data_root, args.split, split_classes(args.data_root, args.split),
                        transform=build_train_transform(300, output="uint8"))


def loader_row(args: Any) -> Row:
    """What the training loader alone delivers (the line the trainer logs at start)."""
    from ssd_da.engine.loaders import measure_loader_rate, resolve_workers

    workers = resolve_workers(args.workers)
    rate = measure_loader_rate(_train_dataset(args), args.batch_size, workers, seconds=5.0)
    return Row("loader alone", f"{workers} workers", "end to end, data only", "uint8 batches",
               Result(rate, 1000 * args.batch_size / rate, None))


class real_loader:
    """Context manager: an iterator over ``batches`` training batches of the real loader
    (fast augmentation, uint8, workers, pinned memory on CUDA), shut down on exit."""

    def __init__(self, args: Any, batches: int) -> None:
        self.args, self.batches = args, batches

    def __enter__(self) -> Any:
        from ssd_da.engine.loaders import make_train_loader, resolve_workers

        loader = make_train_loader(_train_dataset(self.args), self.args.batch_size, 0, 0, self.batches,
                                   resolve_workers(self.args.workers), pin_memory=torch.cuda.is_available())
        self.iterator = iter(loader)
        return self.iterator

    def __exit__(self, *exc: Any) -> None:
        del self.iterator


class Repeated(torch.utils.data.Dataset):
    """``dataset`` cycled to ``length`` items (annotations too), to time a VOC07-test-sized
    evaluation (4,952 images) on a smaller split."""

    def __init__(self, dataset: Any, length: int) -> None:
        self.dataset, self.length = dataset, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Any:
        image, target = self.dataset[index % len(self.dataset)]
        return image, {**target, "index": index}

    def get_annotation(self, index: int) -> Any:
        return self.dataset.get_annotation(index % len(self.dataset))


def eval_rows(args: Any, device: torch.device) -> list[str]:
    """Markdown rows: network-only inference (decoding and NMS included) per backbone, and the
    whole evaluation of ``args.eval_images`` images (loader, inference, post-processing and VOC07
    metric) for the first backbone."""
    rows = []
    repeats, backend = getattr(args, "repeats", 3), getattr(args, "compile_backend", None)
    for backbone in args.backbones.split(","):
        torch.manual_seed(0)
        model = prepare(build_subject("ours", backbone), "ours", device, args.channels_last, args.compile,
                        backend)
        images, _ = synthetic_batch(args.batch_size, device)
        result = time_steps(network_infer_step(model, "ours", images, device, args.amp, args.channels_last),
                            device, args.batch_size, args.steps, args.warmup, repeats)
        rows.append(f"| {backbone} | network only (batch {args.batch_size}) | {figure(result.images_per_s)} | "
                    f"{figure(result.ms_per_batch)} ms/batch |")
        print(rows[-1], flush=True)
        del model
        if backbone == args.backbones.split(",")[0] and args.eval_images:
            rows.append(whole_evaluation_row(args, backbone, device))
            print(rows[-1], flush=True)
    return rows


def whole_evaluation_row(args: Any, backbone: str, device: torch.device) -> str:
    """``evaluate_model`` on the eval split cycled to ``args.eval_images`` images, timed from
    the start to the mAP (after a warm-up evaluation of two batches). The model is untrained:
    its detections fill the top-k after NMS, as a trained one's do at a 0.01 score threshold."""
    from ssd_da.data.transforms import build_eval_transform
    from ssd_da.data.voc import VOCDetection
    from ssd_da.engine.loaders import resolve_workers
    from ssd_da.engine.inference import evaluate_model

    classes = split_classes(args.data_root, args.eval_split)
    torch.manual_seed(0)
    model = prepare(build_subject("ours", backbone, len(classes) + 1), "ours", device, args.channels_last,
                    args.compile, getattr(args, "compile_backend", None))
    base = VOCDetection(args.data_root, args.eval_split, classes, transform=build_eval_transform(300, output="uint8"),
                        keep_difficult=True)
    workers = resolve_workers(args.workers)
    evaluate_model(model, Repeated(base, 2 * args.batch_size), classes, device, args.batch_size, workers,
                   args.amp, progress=False, channels_last=args.channels_last)  # warm-up
    sync(device)
    start = time.perf_counter()
    _, _, rate = evaluate_model(model, Repeated(base, args.eval_images), classes, device, args.batch_size,
                                workers, args.amp, progress=False, channels_last=args.channels_last)
    seconds = time.perf_counter() - start
    return (f"| {backbone} | whole evaluation of {args.eval_images} images ({workers} workers) | "
            f"{figure(args.eval_images / seconds)} | {figure(seconds)} s (inference alone {figure(rate)} images/s) |")
