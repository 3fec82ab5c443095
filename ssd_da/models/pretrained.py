"""Load ImageNet (or other classifier) weights into a :class:`~ssd_da.models.resnet.ResNet`.

Sources: a local file (a torchvision-style state dict, or a dict holding one under ``"model"`` or
``"state_dict"``), or a torchvision weights name (``"ResNet50_Weights.IMAGENET1K_V1"``, or just
``"IMAGENET1K_V1"`` / ``"DEFAULT"`` for the model's depth), fetched through the torch.hub cache.

Strict where it matters: the only model keys allowed to be missing from the file are attention
keys (``.attn.`` in our blocks, ``end_attn.`` after layer4) and BN ``num_batches_tracked``
buffers (absent from torchvision's published files); a file of another ResNet depth, or with other
shapes, is an error.
Keys of the file the model lacks (``fc.*`` for the detector form, attention keys of another
variant) are reported and skipped.
"""
from __future__ import annotations

import logging
import os
import re
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torchvision

from ssd_da.models.resnet import ResNet

# Per-channel RGB mean and std (of 0..1 pixels) of ImageNet, which torchvision's ResNet weights
# were trained with: SSD300's inputs are normalised with them (the data pipeline, or the model
# itself for uint8 batches).
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
# The same normalisation for 0..255 pixels as one multiply-add, x * scale - offset per channel:
# the float data pipeline (ssd_da.data.augment) and SSD300 on uint8 batches both use it.
PIXEL_SCALE: tuple[float, ...] = tuple(1.0 / (255.0 * s) for s in IMAGENET_STD)
PIXEL_OFFSET: tuple[float, ...] = tuple(m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))

logger = logging.getLogger(__name__)

__all__ = ["LoadReport", "load_pretrained", "resolve_weights", "infer_resnet_layout"]

# "ResNet50_Weights.IMAGENET1K_V1", or a bare member name such as "IMAGENET1K_V2" / "DEFAULT".
_WEIGHTS_NAME = re.compile(r"^(?:ResNet(?P<depth>\d+)_Weights\.)?(?P<member>[A-Z][A-Z0-9_]*)$")
_BLOCK_KEY = re.compile(r"^layer(?P<stage>[1-4])\.(?P<index>\d+)\.")


@dataclass
class LoadReport:
    """What :func:`load_pretrained` did not load.

    Attributes:
        missing: model keys absent from the file (attention keys, ``num_batches_tracked``).
        unexpected: file keys the model does not have (e.g. ``fc.*`` for the detector form).
    """

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)


def resolve_weights(depth: int, name: str) -> torchvision.models.WeightsEnum:
    """torchvision weights enum member for a ResNet of ``depth``, e.g. ``(50, "DEFAULT")`` ->
    ``ResNet50_Weights.IMAGENET1K_V2``. No download.

    Raises:
        ValueError: malformed name, unknown member (the message lists valid ones), or a name of
            another depth (``"ResNet18_Weights.IMAGENET1K_V1"`` for a ResNet50).
    """
    match = _WEIGHTS_NAME.match(name)
    if match is None:
        raise ValueError(f"{name!r} is neither an existing file nor a torchvision weights name "
                         f"like 'ResNet{depth}_Weights.IMAGENET1K_V1', 'IMAGENET1K_V1' or "
                         "'DEFAULT'")
    if match["depth"] is not None and int(match["depth"]) != depth:
        raise ValueError(f"weights {name!r} are for ResNet{match['depth']}, but the model is a "
                         f"ResNet{depth}; use ResNet{depth}_Weights.<...>")
    enum = getattr(torchvision.models, f"ResNet{depth}_Weights", None)
    if enum is None:
        raise ValueError(f"torchvision has no weights enum for ResNet{depth}")
    members = list(enum.__members__)
    if match["member"] not in members:
        raise ValueError(f"unknown weights {name!r} for ResNet{depth}; valid: "
                         f"{[f'ResNet{depth}_Weights.{m}' for m in members]}")
    return enum[match["member"]]


def _check_reachable(url: str, timeout: float = 10.0) -> None:
    """OSError when ``url`` cannot be reached. Asked quietly (a HEAD request) before torch.hub,
    which prints "Downloading: <url>" to stderr before it finds out that it cannot."""
    with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
        pass


def _download(weights: torchvision.models.WeightsEnum) -> dict:
    """State dict of ``weights`` through the torch.hub cache (downloads when not cached)."""
    target = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
    try:
        if not os.path.exists(target):
            _check_reachable(weights.url)
        return torch.hub.load_state_dict_from_url(weights.url, map_location="cpu",
                                                  progress=False, check_hash=True)
    except (OSError, ValueError) as e:  # URLError, socket errors, unwritable cache ...
        raise RuntimeError(f"could not fetch {weights} from {weights.url} ({e}); without internet, "
                           f"copy the file to {target} or pass a local file path") from e


def _read_file(path: Path) -> Mapping:
    try:
        # weights_only: a pretrained file should hold tensors, not arbitrary pickled objects.
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors have several types across torch versions
        raise ValueError(f"{path}: cannot read it as a weights file with torch.load"
                         f"(weights_only=True): {e}") from e
    for key in ("model", "state_dict"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            logger.info("%s: using the state dict under %r", path, key)
            return obj[key]
    return obj


def _as_state_dict(obj: object, source: str) -> dict[str, torch.Tensor]:
    if not isinstance(obj, Mapping) or not obj:
        raise ValueError(f"{source}: expected a non-empty state dict (or a dict with a 'model' or "
                         f"'state_dict' entry), got {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not torch.is_tensor(v)]
    if bad:
        raise ValueError(f"{source}: not a state dict; non-tensor entries: {bad[:5]}")
    # A checkpoint of a DistributedDataParallel model prefixes every key with "module.".
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


def infer_resnet_layout(state: Mapping[str, torch.Tensor]) -> tuple[str, tuple[int, ...], int]:
    """``(block, blocks per stage, depth)`` a ResNet state dict was saved from, from its keys
    alone: Bottleneck blocks have a ``conv3``; the block count of each stage is its largest
    ``layerN.<i>.`` index + 1. E.g. torchvision resnet50 -> ``("Bottleneck", (3, 4, 6, 3), 50)``.

    Raises:
        ValueError: no ``layer1..layer4`` block keys (not a ResNet state dict).
    """
    counts = [0, 0, 0, 0]
    bottleneck = False
    for key in state:
        m = _BLOCK_KEY.match(key)
        if m:
            stage = int(m["stage"]) - 1
            counts[stage] = max(counts[stage], int(m["index"]) + 1)
            bottleneck = bottleneck or key.endswith(".conv3.weight")
    if not all(counts):
        raise ValueError(f"does not look like a ResNet state dict: blocks found per stage "
                         f"layer1..layer4 = {counts}; first keys: {list(state)[:5]}")
    convs = 3 if bottleneck else 2
    return ("Bottleneck" if bottleneck else "BasicBlock"), tuple(counts), convs * sum(counts) + 2


def _check_compatible(model: ResNet, state: Mapping[str, torch.Tensor], source: str) -> None:
    block, layers, depth = infer_resnet_layout(state)
    if (block, layers) != (model.block.__name__, model.layers):
        raise ValueError(f"{source} looks like a ResNet{depth} ({block}, blocks per stage "
                         f"{list(layers)}), but the model is {model.name} (depth {model.depth}, "
                         f"{model.block.__name__}, {list(model.layers)}); use weights of depth "
                         f"{model.depth}")
    own = model.state_dict()
    shapes = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
              for k, v in state.items() if k in own and v.shape != own[k].shape]
    if shapes:
        raise ValueError(f"{source}: {len(shapes)} tensor(s) have other shapes than in "
                         f"{model.name}: {shapes[:5]}")


def _is_attention_key(key: str) -> bool:
    """A key of a per-block (``layer3.1.attn.*``) or end-of-backbone (``end_attn.*``) module."""
    return ".attn." in key or key.startswith("end_attn.")


def _allowed_missing(key: str) -> bool:
    return _is_attention_key(key) or key.endswith("num_batches_tracked")


def is_weights_name(source: str | Path) -> bool:
    """True for a torchvision weights name ("DEFAULT", "ResNet50_Weights.IMAGENET1K_V1"), as
    opposed to a file path; says nothing about whether the name exists for a depth."""
    return isinstance(source, str) and bool(_WEIGHTS_NAME.match(source)) and os.sep not in source


def load_pretrained(model: ResNet, source: str | Path) -> LoadReport:
    """Copy the weights of ``source`` into ``model`` (in place) and report what was not loaded.

    Args:
        model: a :class:`ResNet`, classifier or detector form (``num_classes=None``).
        source: a file path, or a torchvision weights name (see module docstring).

    Raises:
        ValueError: unreadable file or not a state dict; a state dict of another depth or with
            other shapes; model keys other than attention / ``num_batches_tracked`` missing.
        RuntimeError: a weights name that is not cached and cannot be downloaded.
    """
    path = Path(source)
    if path.is_file():
        label, raw = str(path), _read_file(path)
    elif is_weights_name(source):
        weights = resolve_weights(model.depth, source)
        label, raw = str(weights), _download(weights)
    else:
        raise FileNotFoundError(f"pretrained source {str(source)!r} is not a file, nor a "
                                f"torchvision weights name like "
                                f"'ResNet{model.depth}_Weights.IMAGENET1K_V1'")
    state = _as_state_dict(raw, label)
    _check_compatible(model, state, label)
    own = model.state_dict()
    missing = sorted(k for k in own if k not in state)
    unexpected = sorted(k for k in state if k not in own)
    required = [k for k in missing if not _allowed_missing(k)]
    if required:
        raise ValueError(f"{label}: {len(required)} non-attention key(s) of {model.name} missing "
                         f"from the file: {required[:8]}")
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    attn = sum(_is_attention_key(k) for k in missing)
    logger.info("loaded %s into %s: %d tensors; %d attention keys and %d num_batches_tracked keys "
                "missing (left at init)", label, model.name, len(state) - len(unexpected), attn,
                len(missing) - attn)
    if model.attention_init == "identity" and any(_is_attention_key(k) for k in unexpected):
        # The file has attention weights of its own, but with attention_init="identity" the
        # modules sit inside IdentityStart wrappers (keys attn.module.*) behind a gate at 0.
        logger.warning("%s holds attention weights, but %s was built with attention_init="
                       "'identity', so they are not loaded (its attention starts as the identity); "
                       "use attention_init='default' to start from them", label, model.name)
    if unexpected:
        # fc/attention keys are expected extras (detector form, another attention variant).
        odd = [k for k in unexpected if not (k.startswith("fc.") or _is_attention_key(k))]
        logger.log(logging.WARNING if odd else logging.INFO, "%s: %d key(s) not in %s, skipped: %s",
                   label, len(unexpected), model.name, (odd or unexpected)[:8])
    return LoadReport(missing=missing, unexpected=unexpected)
