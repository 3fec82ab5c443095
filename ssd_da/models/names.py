"""Backbone names: the one place that parses, lists and formats them (plain Python, no torch).

A backbone name is ``resnet<depth>`` (a plain ResNet) or ``<attention>_resnet<depth>``: the
ResNet of that depth with one ``<attention>`` module in every residual block, on the residual
branch after the block's last BatchNorm (the SE-ResNet placement, docs/method.md). The display
form follows the DA paper's tables: ``da_resnet50`` -> "DA-ResNet50".

To add a spelling (e.g. an attention module once at the end of the backbone), extend
:class:`BackboneName`, :func:`parse_backbone_name`, :func:`backbone_name` and
:data:`BACKBONE_NAMES` here; everything else (config validation, the ablation suites, the
complexity tool, figure titles, result tables) reads names through this module.
"""
from __future__ import annotations

from typing import NamedTuple

__all__ = ["DEPTHS", "BLOCK_ATTENTIONS", "ATTENTION_INITS", "BackboneName", "backbone_name",
           "parse_backbone_name", "BACKBONE_NAMES", "display_name"]

# ResNet depths with a stage layout in ssd_da.models.resnet.STAGES (He et al. 2016, Table 1).
DEPTHS: tuple[int, ...] = (18, 34, 50, 101)
# Attention modules that can fill the per-block slot (keys of ssd_da.models.attention.ATTENTIONS;
# a test checks they are). "none" is the plain ResNet and is spelled without a prefix.
BLOCK_ATTENTIONS: tuple[str, ...] = ("da", "se", "eca", "eca_adaptive", "sge", "cbam",
                                     "da_cs", "da_par", "da_s", "da_c")
# How the attention modules start (Config.attention_init, build_attention's ``init``): "default",
# each module's own initialisation; "identity", each wrapped in attention.IdentityStart so that the
# network starts as the plain ResNet (docs/experiments.md, "Fair starts").
ATTENTION_INITS: tuple[str, ...] = ("default", "identity")
# How the DA paper's tables print each attention before "ResNet<depth>". The DA orders of
# Table I have no printed prefix; the arrows name the order of the two branches.
_DISPLAY_PREFIX: dict[str, str] = {
    "none": "", "da": "DA-", "se": "SE-", "eca": "ECA-", "eca_adaptive": "ECA(adaptive k)-",
    "sge": "SGE-", "cbam": "CBAM-",
    "da_cs": "DA(c>s)-", "da_par": "DA(s|c)-", "da_s": "DA(s)-", "da_c": "DA(c)-",
}


class BackboneName(NamedTuple):
    """A parsed backbone name: ``attention`` ("none" for a plain ResNet) and ``depth``."""

    attention: str
    depth: int


def backbone_name(attention: str, depth: int) -> str:
    """``("da", 50) -> "da_resnet50"``, ``("none", 18) -> "resnet18"`` (not validated)."""
    return f"resnet{depth}" if attention == "none" else f"{attention}_resnet{depth}"


BACKBONE_NAMES: list[str] = [backbone_name(a, d) for a in ("none", *BLOCK_ATTENTIONS)
                             for d in DEPTHS]


def parse_backbone_name(name: str) -> BackboneName:
    """``"da_cs_resnet50" -> BackboneName("da_cs", 50)``; ``"resnet18" -> ("none", 18)``.

    Raises:
        ValueError: ``name`` is not in :data:`BACKBONE_NAMES` (the message lists them).
    """
    if name not in BACKBONE_NAMES:
        raise ValueError(f"unknown backbone {name!r}; valid names: {BACKBONE_NAMES}")
    head, _, depth = name.rpartition("resnet")
    return BackboneName(head[:-1] if head else "none", int(depth))


def display_name(name: str, detector: bool = False) -> str:
    """The paper's spelling: ``"da_resnet50" -> "DA-ResNet50"``, with ``detector`` ->
    ``"DA-ResNet50-SSD"``. A name this module does not know is returned as given (plus
    "-SSD"), so a figure title never fails on it."""
    try:
        attention, depth = parse_backbone_name(name)
    except ValueError:
        text = name
    else:
        text = f"{_DISPLAY_PREFIX[attention]}ResNet{depth}"
    return f"{text}-SSD" if detector else text
