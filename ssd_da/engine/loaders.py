"""Data loading for training and evaluation: datasets from a Config, and a resumable sampler.

Exact ``--resume`` needs the data stream to be a pure function of (seed, iteration): the
sampler below derives each epoch's order from ``seed + epoch`` and gives every sample its own
augmentation seed, so the batches after a resume, and with any number of loader workers, are the
ones an uninterrupted run would have seen.
"""
from __future__ import annotations

import logging
import os
import random
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ssd_da.config import DATA_FORMATS, Config
from ssd_da.data.coco import CocoDetection, coco_class_names
from ssd_da.data.demo import DEMO_CLASSES
from ssd_da.data.transforms import build_eval_transform, build_train_transform
from ssd_da.data.voc import VOC_CLASSES, VOCDetection, detection_collate
from ssd_da.engine import distributed as dist_utils
from ssd_da.engine.interrupt import ignore_stop_signals
from ssd_da.models.ssd import IMAGE_SIZE

logger = logging.getLogger(__name__)


def class_names_from_config(cfg: Config) -> list[str]:
    """``cfg.classes``, else the categories of a COCO-format training split, else the demo
    dataset's classes for ``demo: true``, else VOC's 20."""
    if cfg.classes:
        return list(cfg.classes)
    if cfg.data_format == "coco":
        return coco_class_names(cfg.data_root, cfg.train_split)
    if cfg.demo:
        return list(DEMO_CLASSES)
    return list(VOC_CLASSES)


def sample_seed(seed: int, epoch: int, position: int) -> int:
    """A 32-bit seed for one sample draw, independent across (seed, epoch, position)."""
    return int(np.random.SeedSequence([seed, epoch, position]).generate_state(1)[0])


class ResumableTrainSampler(Sampler):
    """Yields ``(dataset_index, augmentation_seed)`` for iterations ``start_iter .. total_iters-1``.

    Each epoch is a permutation drawn from ``seed + epoch``, sharded across ``world_size`` ranks
    the way ``DistributedSampler`` does (``perm[rank::world_size]``) and cut to whole batches, so
    every rank runs the same number of iterations.
    """

    def __init__(self, dataset_len: int, batch_size: int, seed: int, start_iter: int,
                 total_iters: int, rank: int = 0, world_size: int = 1) -> None:
        self.per_rank_batches = dataset_len // (batch_size * world_size)
        if dataset_len == 0:
            raise ValueError("the training set has no images")
        if self.per_rank_batches == 0:
            raise ValueError(
                f"the training set has {dataset_len} images, fewer than one batch of "
                f"{batch_size} x {world_size} process(es): lower --batch-size (at least 2)"
            )
        self.n, self.batch_size, self.seed = dataset_len, batch_size, seed
        self.start_iter, self.total_iters = start_iter, total_iters
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        return max(0, self.total_iters - self.start_iter) * self.batch_size

    def _epoch_indices(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed + epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        return perm[self.rank::self.world_size][: self.per_rank_batches * self.batch_size]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        it = self.start_iter
        while it < self.total_iters:
            epoch, batch_in_epoch = divmod(it, self.per_rank_batches)
            indices = self._epoch_indices(epoch)
            for b in range(batch_in_epoch, self.per_rank_batches):
                if it >= self.total_iters:
                    return
                for j in range(b * self.batch_size, (b + 1) * self.batch_size):
                    yield indices[j], sample_seed(self.seed, epoch, j * self.world_size + self.rank)
                it += 1


class SeededDataset(Dataset):
    """Wraps a VOCDetection so that item ``(index, seed)`` is augmented with its own RNG."""

    def __init__(self, base: VOCDetection) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, dict[str, Any]]:
        index, seed = item
        transform = self.base.transform
        if transform is not None and hasattr(transform, "set_random_state"):
            # One generator pair shared by all transforms in the pipeline: independent draws in
            # sequence (set_random_seed would give every transform the same first draw).
            transform.set_random_state(np.random.default_rng(seed), random.Random(seed))
        return self.base[index]


# Training images are shrunk at load time to this longer side: the augmentation's smallest crop
# is 0.3 of the image side (MinIoURandomCrop) resized to 300 px, so finer detail is never seen,
# while the zoom-out canvas (up to 4x each side) of an 8000x6000 photo would need gigabytes.
# This applies to the albumentations backend; the default (fast) transform reads the encoded
# file and decodes it at the scale each crop needs, so it never holds more than that.
TRAIN_MAX_SIDE = 1000


def build_datasets(cfg: Config, train: bool = True) -> tuple[VOCDetection | None, VOCDetection]:
    """The training set (augmented, difficult objects dropped by default) and the test set,
    VOC or COCO format per ``cfg.data_format`` (``ssd_da.data.coco.CocoDetection`` shares
    VOCDetection's items and annotations). ValueError when the training set holds no object to
    learn from, or the test set none to score (both checked before any training)."""
    if cfg.data_format not in DATA_FORMATS:
        raise ValueError(f"data_format {cfg.data_format!r} is not one of: {', '.join(DATA_FORMATS)}")
    dataset_class = CocoDetection if cfg.data_format == "coco" else VOCDetection
    names = class_names_from_config(cfg)
    train_set = None
    if train:
        train_set = dataset_class(cfg.data_root, cfg.train_split, class_names=names,
                                  transform=build_train_transform(IMAGE_SIZE, output="uint8"),
                                  keep_difficult=cfg.keep_difficult, skip_bad=cfg.skip_bad,
                                  ignore_other_classes=cfg.ignore_other_classes,
                                  max_side=TRAIN_MAX_SIDE)
        objects = sum(int(len(a.labels) if cfg.keep_difficult else (~a.difficult).sum())
                      for a in train_set.annotations)
        if objects == 0:
            raise ValueError(f"training split {cfg.train_split} ({cfg.data_root}) has no "
                             f"{'' if cfg.keep_difficult else 'non-difficult '}object of the "
                             f"classes {', '.join(names)}: there is nothing to learn")
    test_set = make_test_set(cfg.data_format, cfg.data_root, cfg.test_split, names,
                             skip_bad=cfg.skip_bad, ignore_other_classes=cfg.ignore_other_classes)
    if not any((~a.ground_truth()["difficult"]).any() for a in test_set.annotations):
        # VOC AP counts non-difficult objects only: without any, every AP and the mAP are
        # undefined, and a run would train to the end to report "nan".
        raise ValueError(f"test split {cfg.test_split} ({cfg.data_root}) has no non-difficult "
                         f"object of the classes {', '.join(names)}: its mAP would be undefined")
    if train_set is not None:
        warn_overlap(train_set, test_set, cfg)
    return train_set, test_set


def make_test_set(data_format: str, data_root: str | Path, split: str,
                  class_names: Sequence[str] | None, skip_bad: bool = False,
                  ignore_other_classes: bool = False, with_images: bool = True
                  ) -> VOCDetection | CocoDetection:
    """A split to evaluate on, as training's evaluation and ``tools/eval_voc.py`` both read it:
    VOC or COCO format, every object kept (difficult ones too: the devkit counts them), images
    resized as uint8 pixels that the model normalises on the device (``with_images`` False: no
    transform, for annotations alone, as a detection file scored without a model needs). ``class_names`` None: the
    COCO categories of a COCO split, VOC's 20 otherwise."""
    if data_format not in DATA_FORMATS:
        raise ValueError(f"data_format {data_format!r} is not one of: {', '.join(DATA_FORMATS)}")
    if data_format != "coco" and class_names is None:
        class_names = list(VOC_CLASSES)
    transform = build_eval_transform(IMAGE_SIZE, output="uint8") if with_images else None
    dataset_class = CocoDetection if data_format == "coco" else VOCDetection
    return dataset_class(data_root, split, class_names=class_names, transform=transform,
                         keep_difficult=True, skip_bad=skip_bad,
                         ignore_other_classes=ignore_other_classes)


def warn_overlap(train_set: VOCDetection, test_set: VOCDetection, cfg: Config) -> None:
    """A loud warning when test images are also training images (the same split for both, or
    overlapping ones such as voc07_trainval and voc07_val): the test mAP then measures how well
    the detector remembers its training images, not how it detects. Compared by file path
    (both come from one data root, built the same way)."""
    seen = {os.path.normpath(p) for p in train_set.image_paths}
    shared = [p for p in test_set.image_paths if os.path.normpath(p) in seen]
    if shared:
        logger.warning("!!! %d of %d test images (%s) are also training images (%s), e.g. %s: "
                       "its mAP measures memory, not detection, and says nothing about new "
                       "images; use disjoint splits (e.g. --train-split voc07_train "
                       "--test-split voc07_val) !!!", len(shared), len(test_set.image_paths),
                       cfg.test_split, cfg.train_split, ", ".join(p.name for p in shared[:3]))


def resolve_workers(requested: int, world_size: int = 1) -> int:
    """Data-loading processes: ``requested`` when >= 0; for -1 the CPU cores this process may
    use, less one for the training loop, divided between ``world_size`` processes."""
    if requested >= 0:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, cores // max(1, world_size) - 1)


def default_eval_workers() -> int:
    """``tools/eval_voc.py``'s default --workers: 4 loader processes, or fewer on a machine with
    fewer cores (PyTorch warns otherwise). A single process: training's evaluation shares the
    cores between its processes instead (:func:`resolve_workers`)."""
    return max(0, min(4, resolve_workers(-1) + 1))


# Batches each loader worker prepares ahead: with one worker per core that is a second or more
# of training at the target rate (issue 12: 1,000 images/s on 16 cores), enough to absorb jitter.
PREFETCH_BATCHES = 2


def make_train_loader(dataset: VOCDetection, batch_size: int, seed: int, start_iter: int, total_iters: int,
                      workers: int, pin_memory: bool, rank: int = 0, world_size: int = 1,
                      generator: torch.Generator | None = None) -> DataLoader:
    """Batches of iterations ``start_iter .. total_iters-1`` (:class:`ResumableTrainSampler`).
    Workers stay up between passes and keep ``PREFETCH_BATCHES`` batches each in flight; with
    ``pin_memory`` batches land in page-locked memory, so the copy to the GPU does not block the host."""
    sampler = ResumableTrainSampler(len(dataset), batch_size, seed, start_iter, total_iters, rank, world_size)
    extra: dict[str, Any] = (dict(persistent_workers=True, prefetch_factor=PREFETCH_BATCHES)
                             if workers > 0 else {})
    return DataLoader(SeededDataset(dataset), batch_size=batch_size, sampler=sampler, num_workers=workers,
                      collate_fn=detection_collate, drop_last=True, pin_memory=pin_memory,
                      generator=generator, worker_init_fn=ignore_stop_signals, **extra)


def build_train_loader(dataset: VOCDetection, cfg: Config, start_iter: int, rank: int,
                       world_size: int, pin_memory: bool) -> DataLoader:
    return make_train_loader(dataset, cfg.batch_size, cfg.seed, start_iter, cfg.iters,
                             resolve_workers(cfg.workers, world_size), pin_memory, rank, world_size)


def measure_loader_rate(dataset: VOCDetection, batch_size: int, workers: int, seconds: float = 2.0) -> float:
    """Images per second the loader alone delivers (reading, augmentation, collation; no
    model). Timed from its first batch (worker start-up left out) over the next two rounds of
    the workers (each worker makes one batch per round and all start together, so the first
    batch ends round one), or for ``seconds`` if that is shorter. Its own sampler seed and
    generator: the training stream and the global random state are untouched."""
    batches = 2 * max(1, workers) + 1
    loader = make_train_loader(dataset, batch_size, seed=1, start_iter=0, total_iters=batches,
                               workers=workers, pin_memory=False, generator=torch.Generator().manual_seed(0))
    iterator = iter(loader)
    next(iterator)
    start, images = time.perf_counter(), 0
    for images_batch, _ in iterator:
        images += images_batch.shape[0]
        if time.perf_counter() - start > seconds:
            break
    images_per_s = images / max(time.perf_counter() - start, 1e-9)
    del iterator
    return images_per_s


def log_loader_rate(dataset: VOCDetection, cfg: Config) -> None:
    """One line at the start of training: what the loader alone delivers, to compare with the
    training rate (is the CPU or the GPU the bottleneck?)."""
    workers = resolve_workers(cfg.workers, dist_utils.get_world_size())
    images_per_s = measure_loader_rate(dataset, cfg.batch_size, workers)
    logger.info("data loader alone: %.0f images/s (%d workers, batch %d); training slower than that "
                "is limited by the network, near it by the loader", images_per_s, workers, cfg.batch_size)


def make_eval_loader(dataset: Dataset, indices: Sequence[int], batch_size: int, workers: int,
                      pin_memory: bool) -> DataLoader:
    subset = torch.utils.data.Subset(dataset, list(indices))
    return DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=workers,
                      collate_fn=detection_collate, pin_memory=pin_memory,
                      worker_init_fn=ignore_stop_signals)
