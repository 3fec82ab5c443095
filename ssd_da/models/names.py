"""Backbone names: the one place that parses, lists and formats them (plain Python, no torch).

A backbone name is one of

- ``resnet<depth>``: a plain ResNet;
- ``<attention>_resnet<depth>``: the ResNet of that depth with one ``<attention>`` module in
  every residual block, on the residual branch after the block's last BatchNorm (the SE-ResNet
  placement, docs/method.md);
- ``resnet<depth>_<attention>``: a plain ResNet with one ``<attention>`` module at the end of
  the backbone, after layer4 (the LGA paper's placement, docs/lga.md).

The display form follows the papers' tables: ``da_resnet50`` -> "DA-ResNet50" (the DA paper),
``resnet18_lga`` -> "ResNet18+LGA" (the LGA paper's Table 4).

Everything else (config validation, the ablation suites, the complexity tool, figure titles,
result tables) reads names through this module.
"""
from __future__ import annotations

import difflib
from typing import NamedTuple

__all__ = ["DEPTHS", "BLOCK_ATTENTIONS", "END_ATTENTIONS", "ATTENTION_INITS", "BackboneName",
           "backbone_name", "parse_backbone_name", "BACKBONE_NAMES", "display_name"]

# ResNet depths with a stage layout in ssd_da.models.resnet.STAGES (He et al. 2016, Table 1).
DEPTHS: tuple[int, ...] = (18, 34, 50, 101)
# Attention modules that can fill the per-block slot (keys of ssd_da.models.attention.ATTENTIONS;
# a test checks they are). "none" is the plain ResNet and is spelled without a prefix.
BLOCK_ATTENTIONS: tuple[str, ...] = ("da", "se", "eca", "eca_adaptive", "sge", "cbam", "sa",
                                     "da_cs", "da_par", "da_s", "da_c")
# Attention modules that can fill the end-of-backbone slot (after layer4): the LGA paper's
# Table 4 set (its own LGA/LA/GA and the MHSA, SE, ECA, CBAM, SA it compares with), plus DA and
# SGE. LGA, LA, GA and MHSA exist only here: in every block their D^2 terms would repeat 8-33
# times (LGA at 2048 channels alone has 19.3M parameters).
END_ATTENTIONS: tuple[str, ...] = ("lga", "la", "ga", "mhsa", "se", "eca", "cbam", "sa", "da",
                                   "sge")
# How the attention modules start (build_attention's ``init``; Config.attention_init also takes
# "auto", resolved to one of these by config.resolve_attention_init): "default", each module's
# own initialisation; "identity", each wrapped in attention.IdentityStart so that the network
# starts as the plain ResNet (docs/experiments.md, "Fair starts").
ATTENTION_INITS: tuple[str, ...] = ("default", "identity")
# How the DA paper's tables print each attention before "ResNet<depth>". The DA orders of
# Table I have no printed prefix; the arrows name the order of the two branches.
_DISPLAY_PREFIX: dict[str, str] = {
    "none": "", "da": "DA-", "se": "SE-", "eca": "ECA-", "eca_adaptive": "ECA(adaptive k)-",
    "sge": "SGE-", "cbam": "CBAM-", "sa": "SA-",
    "da_cs": "DA(c>s)-", "da_par": "DA(s|c)-", "da_s": "DA(s)-", "da_c": "DA(c)-",
}


class BackboneName(NamedTuple):
    """A parsed backbone name: the per-block ``attention`` ("none": no module in the blocks),
    ``depth`` and the end-of-backbone attention ``end`` ("none": nothing after layer4)."""

    attention: str
    depth: int
    end: str = "none"


def backbone_name(attention: str, depth: int, end: str = "none") -> str:
    """``("da", 50) -> "da_resnet50"``, ``("none", 18) -> "resnet18"``,
    ``("none", 18, "lga") -> "resnet18_lga"`` (not validated)."""
    name = f"resnet{depth}" if attention == "none" else f"{attention}_resnet{depth}"
    return name if end == "none" else f"{name}_{end}"


BACKBONE_NAMES: list[str] = (
    [backbone_name(a, d) for a in ("none", *BLOCK_ATTENTIONS) for d in DEPTHS]
    + [backbone_name("none", d, e) for e in END_ATTENTIONS for d in DEPTHS])


def parse_backbone_name(name: str) -> BackboneName:
    """``"da_cs_resnet50" -> BackboneName("da_cs", 50, "none")``;
    ``"resnet18" -> ("none", 18, "none")``; ``"resnet18_lga" -> ("none", 18, "lga")``.

    Raises:
        ValueError: ``name`` is not in :data:`BACKBONE_NAMES` (the message lists them).
    """
    if name not in BACKBONE_NAMES:
        close = difflib.get_close_matches(str(name).lower(), BACKBONE_NAMES, n=3, cutoff=0.6)
        hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
        raise ValueError(f"unknown backbone {name!r}{hint}; valid names: {BACKBONE_NAMES}")
    head, _, tail = name.rpartition("resnet")
    depth, _, end = tail.partition("_")
    return BackboneName(head[:-1] if head else "none", int(depth), end or "none")


def display_name(name: str, detector: bool = False) -> str:
    """The papers' spelling: ``"da_resnet50" -> "DA-ResNet50"``, ``"resnet18_lga" ->
    "ResNet18+LGA"``; with ``detector``, ``"DA-ResNet50-SSD"``. A name this module does not
    know is returned as given (plus "-SSD"), so a figure title never fails on it."""
    try:
        attention, depth, end = parse_backbone_name(name)
    except ValueError:
        text = name
    else:
        text = f"{_DISPLAY_PREFIX[attention]}ResNet{depth}"
        if end != "none":
            text += f"+{end.upper()}"
    return f"{text}-SSD" if detector else text
