"""Checks of a :class:`~ssd_da.config.Config` before any work: :func:`validate_config` fails on a
bad name or value (ValueError naming the field) and warns about a legal but probably unintended
schedule."""
from __future__ import annotations

import logging
import math

from ssd_da.config import AUTO_INIT, DATA_FORMATS, Config
from ssd_da.models.names import ATTENTION_INITS, parse_backbone_name

logger = logging.getLogger(__name__)

__all__ = ["validate_config"]


# Ranges of the numeric fields, (low, high, low included, high included), None: unbounded. Types
# are checked when a value is set (_coerce); these catch values of the right type that make no
# sense: a negative lr or lr_gamma=-0.1 trains with a negative rate, momentum >= 1 diverges.
_RANGES: dict[str, tuple[float | None, float | None, bool, bool]] = {
    "lr": (0.0, None, False, True), "momentum": (0.0, 1.0, True, False),
    "weight_decay": (0.0, None, True, True), "lr_gamma": (0.0, 1.0, False, True),
    "warmup_factor": (0.0, 1.0, False, True), "grad_clip": (0.0, None, True, True),
    "iters": (1, None, True, True), "eval_batch_size": (1, None, True, True),
    # batch_size: the 1x1 extra map's BatchNorm needs two values per channel in training.
    "batch_size": (2, None, True, True), "log_every": (1, None, True, True),
    "ckpt_every": (1, None, True, True), "eval_every": (0, None, True, True),
    "warmup_iters": (0, None, True, True), "workers": (-1, None, True, True),  # -1: one per core, less one
    "seed": (0, 2**32 - 1, True, True),  # numpy seeds are 32-bit and non-negative
}


def _check_range(name: str, value: float) -> None:
    low, high, low_in, high_in = _RANGES[name]
    too_low = low is not None and (value < low or (value == low and not low_in))
    too_high = high is not None and (value > high or (value == high and not high_in))
    finite = math.isfinite(value)  # NaN and inf: "--lr inf" would make every weight inf
    if too_low or too_high or not finite:
        left = ("[" if low_in else "(") + ("-inf" if low is None else f"{low:g}")
        right = ("inf)" if high is None else f"{high:g}" + ("]" if high_in else ")"))
        what = "lie in" if finite else "be a finite number in"
        raise ValueError(f"config field {name!r} must {what} {left}, {right}, got {value!r}")


def validate_config(cfg: Config) -> None:
    """Fail on a bad name or value before any data is read or folder written (ValueError
    naming the field); warn about a legal but probably unintended schedule."""
    parse_backbone_name(cfg.backbone)  # ValueError listing the valid backbones
    if cfg.attention_init not in (*ATTENTION_INITS, AUTO_INIT):
        raise ValueError(f"attention_init {cfg.attention_init!r} is not one of: "
                         f"{', '.join((*ATTENTION_INITS, AUTO_INIT))}")
    if cfg.data_format not in DATA_FORMATS:
        raise ValueError(f"data_format {cfg.data_format!r} is not one of: "
                         f"{', '.join(DATA_FORMATS)}")
    if cfg.demo and cfg.data_format != "voc":
        raise ValueError("demo: true generates a VOC-format dataset; it needs data_format voc")
    if cfg.metric not in ("voc07", "area"):
        raise ValueError(f"metric {cfg.metric!r} is not one of: voc07, area")
    for name in _RANGES:
        _check_range(name, getattr(cfg, name))
    try:
        cfg.resolved_output_dir()
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(f"config field 'output_dir' {cfg.output_dir!r}: only {{backbone}} may "
                         f"stand in braces ({type(exc).__name__}: {exc})") from None
    if not cfg.output_dir.strip() or not cfg.data_root.strip():
        raise ValueError("config fields 'output_dir' and 'data_root' must not be empty")
    _warn_about_schedule(cfg)


def _warn_about_schedule(cfg: Config) -> None:
    """Warnings for a legal schedule that is probably not meant: lr steps at or past the end
    (a shortened --iters that keeps a longer recipe's steps never decays), or a warmup that
    never reaches the full lr."""
    late = [s for s in cfg.lr_steps if s >= cfg.iters]
    if late:
        # The standard recipe drops at 80k and 100k of 120k: 2/3 and 5/6 of the schedule.
        fit = [round(cfg.iters * 2 / 3), round(cfg.iters * 5 / 6)]
        logger.warning("lr_steps %s lie at or past iters=%d: the lr %s; pass steps that fit "
                       "the schedule, e.g. lr_steps=%s (2/3 and 5/6 of it, as the standard "
                       "recipe's 80k and 100k of 120k)", cfg.lr_steps, cfg.iters,
                       "never decays" if len(late) == len(cfg.lr_steps) else
                       f"skips the drop(s) at {late}", fit)
    first_drop = min([s for s in cfg.lr_steps if s > 0] + [cfg.iters])
    if cfg.warmup_iters >= first_drop:  # step k uses lr_factor(k): full lr from k = warmup_iters
        # Legal, but a shortened schedule (--iters, lr_steps) that keeps the default warmup
        # never trains at the full lr: say so rather than let it pass unnoticed.
        logger.warning("warmup_iters=%d runs past %s (iteration %d): the lr never reaches "
                       "lr=%g; pass e.g. warmup_iters=%d", cfg.warmup_iters,
                       "the first lr step" if first_drop < cfg.iters else "the end of training",
                       first_drop, cfg.lr, max(1, first_drop // 10))
