"""How many seeds a difference needs: the power of the two-sided paired t-test.

With ``n`` seeds trained for both backbones, the per-seed differences ``D_i`` (points of mAP)
have mean ``d`` and standard deviation ``s``. The paired t-test at level ``alpha`` calls a
difference shown when ``|T| > t_{1-alpha/2}(n-1)``, ``T = mean(D) / (sd(D) / sqrt(n))``. If the
true difference is ``d``, ``T`` follows the noncentral t distribution with ``n - 1`` degrees of
freedom and noncentrality ``d sqrt(n) / s``, so the chance of showing it is

    power(n) = P(T > t_crit) + P(T < -t_crit),    T ~ nct(n - 1, d sqrt(n) / s).

:func:`seeds_needed` is the smallest ``n >= 2`` whose power reaches the target (80%). Worked
example (Cohen's tables and G*Power, "matched pairs"): ``d / s = 0.5`` needs 34 pairs (power
0.8078; 33 give 0.7954). The t and noncentral t distributions are scipy's (``scipy.stats``):
kept, tested and already installed with albumentations; ``stats.py`` needs only the central t
and keeps its closed form.

Taking the observed ``s`` as the true one makes these planning figures, not guarantees: with 3-5
seeds ``s`` itself is uncertain by tens of percent.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from matplotlib.figure import Figure
from scipy import stats as sps

from ssd_da.utils.plots import save_figure

logger = logging.getLogger(__name__)

__all__ = ["POWER_TARGET", "MAX_SEEDS", "paired_power", "seeds_needed", "PowerRow",
           "power_rows", "format_seeds", "power_table", "power_section", "plot_power_curves",
           "power_report"]

POWER_TARGET = 0.8
MAX_SEEDS = 10_000  # past this, "more than 10000": the difference is out of reach


def _check(alpha: float, power: float = POWER_TARGET) -> None:
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie strictly between 0 and 1, got {alpha!r}")
    if not 0.0 < power < 1.0:
        raise ValueError(f"power must lie strictly between 0 and 1, got {power!r}")


def paired_power(n: int, effect: float, sd: float, alpha: float = 0.05) -> float:
    """Power of the two-sided paired t-test with ``n`` pairs (n >= 2) to show a true mean
    difference ``effect`` when the differences have standard deviation ``sd`` (same units)."""
    _check(alpha)
    if n < 2:
        raise ValueError(f"the paired t-test needs n >= 2 pairs, got {n}")
    if sd < 0 or math.isnan(sd):
        raise ValueError(f"sd must be a number >= 0, got {sd!r}")
    crit = sps.t.ppf(1.0 - alpha / 2.0, n - 1)
    if sd == 0.0:  # no spread: any non-zero difference is certain to show
        return 1.0 if effect != 0.0 else alpha
    nc = effect * math.sqrt(n) / sd
    return float(sps.nct.sf(crit, n - 1, nc) + sps.nct.cdf(-crit, n - 1, nc))


def seeds_needed(effect: float, sd: float, alpha: float = 0.05, power: float = POWER_TARGET,
                 max_n: int = MAX_SEEDS) -> int | None:
    """Smallest n >= 2 with ``paired_power(n, effect, sd, alpha) >= power``; None when even
    ``max_n`` seeds do not reach it (a zero difference never does)."""
    _check(alpha, power)
    if effect == 0.0 or paired_power(max_n, effect, sd, alpha) < power:
        return None
    lo, hi = 1, 2  # power rises with n: double until reached, then bisect (lo fails, hi passes)
    while paired_power(hi, effect, sd, alpha) < power:
        lo, hi = hi, min(2 * hi, max_n)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if mid >= 2 and paired_power(mid, effect, sd, alpha) >= power:
            hi = mid
        else:
            lo = mid
    return hi


@dataclass(frozen=True)
class PowerRow:
    """One comparison with its baseline: ``n`` paired seeds, mean difference ``diff`` and the
    standard deviation ``sd`` of the per-seed differences (points; nan when unknown), and the
    seeds needed for the target power to show the observed difference and ``min_effect``."""

    label: str
    n: int
    diff: float
    sd: float
    paired: bool
    for_observed: int | None
    for_min_effect: int | None


def power_rows(groups: Sequence, min_effect: float, alpha: float = 0.05,
               label: Callable[[Any], str] = lambda g: f"{g.backbone} vs {g.baseline}",
               ) -> list[PowerRow]:
    """A :class:`PowerRow` for every backbone summary (``report.BackboneSummary``) that has a
    difference to its baseline; seeds needed only for paired seeds with a defined spread."""
    if not min_effect > 0:
        raise ValueError(f"--min-effect must be > 0 points of mAP, got {min_effect!r}")
    rows = []
    for g in groups:
        d = g.delta
        if d is None:
            continue
        paired = d.method == "paired"
        known = paired and not math.isnan(d.std)
        rows.append(PowerRow(
            label(g), d.n, d.mean, d.std if paired else math.nan, paired,
            seeds_needed(abs(d.mean), d.std, alpha) if known else None,
            seeds_needed(min_effect, d.std, alpha) if known else None))
    return rows


def format_seeds(row: PowerRow, value: int | None, effect: float) -> str:
    """A seeds-needed cell for ``effect``: the number, or why there is none."""
    if not row.paired:
        return "n/a (seeds not matched)"
    if math.isnan(row.sd):
        return "n/a (one seed: no spread)"
    if value is None:
        return "never (Δ = 0)" if effect == 0.0 else f"> {MAX_SEEDS}"
    return str(value)


def power_table(rows: Sequence[PowerRow], min_effect: float) -> list[str]:
    """Markdown lines: one row per comparison."""
    pct = f"{100 * POWER_TARGET:g}%"
    lines = [f"| Comparison | n | Δ (pp) | sd of Δ (pp) | seeds for {pct} power: observed Δ "
             f"| seeds for {pct} power: Δ = {min_effect:g} pp |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        sd = "n/a" if math.isnan(r.sd) else f"{r.sd:.2f}"
        lines.append(f"| {r.label} | {r.n} | {r.diff:+.2f} | {sd} | "
                     f"{format_seeds(r, r.for_observed, r.diff)} | "
                     f"{format_seeds(r, r.for_min_effect, min_effect)} |")
    return lines


def power_section(rows: Sequence[PowerRow], min_effect: float, alpha: float = 0.05,
                  figure: str = "power_curves.png") -> list[str]:
    """results.md's section: the table and how to read it."""
    pct = f"{100 * POWER_TARGET:g}%"
    return ["## Seeds needed", "", *power_table(rows, min_effect), "",
            "- Δ and its sd: the mean and sample standard deviation (ddof=1) of the per-seed "
            "differences to the baseline, in points of mAP.",
            f"- Seeds needed: the smallest n >= 2 with {pct} power for a two-sided paired "
            f"t-test at α = {alpha:g} (noncentral t), taking the observed sd as the true one: a "
            "planning figure (with few seeds the sd itself is uncertain). Observed Δ: to "
            f"confirm the difference seen here; Δ = {min_effect:g} pp: to show a difference "
            "of that size (`--min-effect`), e.g. the LGA paper's 0.1-0.2 point gaps.",
            f"- `{figure}`: power against seeds for each comparison."]


def plot_power_curves(rows: Sequence[PowerRow], path: Path, min_effect: float,
                      alpha: float = 0.05) -> None:
    """Power against seeds for each comparison with a known spread: solid, to show
    ``min_effect``; dashed, the observed difference; the target as a horizontal line."""
    usable = [r for r in rows if r.paired and not math.isnan(r.sd)]
    needed = [r.for_min_effect for r in usable if r.for_min_effect] + [10]
    ns = list(range(2, min(max(needed) * 3 // 2, 200) + 1))
    fig = Figure(figsize=(7, 5), dpi=120)
    ax = fig.add_subplot(1, 1, 1)
    for i, r in enumerate(usable):
        color = f"C{i % 10}"
        ax.plot(ns, [paired_power(n, min_effect, r.sd, alpha) for n in ns], color=color,
                label=f"{r.label}: Δ = {min_effect:g} pp (sd {r.sd:.2f})")
        if r.diff != 0.0:
            ax.plot(ns, [paired_power(n, abs(r.diff), r.sd, alpha) for n in ns], color=color,
                    linestyle="--", label=f"{r.label}: observed Δ = {r.diff:+.2f} pp")
    ax.axhline(POWER_TARGET, color="gray", linewidth=1)
    ax.set_xlabel("seeds (paired runs per backbone)")
    ax.set_ylabel(f"power of the paired t-test (α = {alpha:g}, two-sided)")
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    if usable:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no comparison with matched seeds and a spread (n >= 2)",
                ha="center", transform=ax.transAxes)
    fig.tight_layout()
    save_figure(fig, path)


def power_report(groups: Sequence, png: Path, min_effect: float, alpha: float = 0.05,
                 label: Callable[[str], str] = str) -> list[str]:
    """For a suite's ``report.BackboneSummary`` groups: draws ``png``, logs the table (the
    suite's console summary) and returns results.md's section. ``label``: backbone -> name."""
    rows = power_rows(groups, min_effect, alpha,
                      lambda g: f"{label(g.backbone)} vs {label(g.baseline)}")
    plot_power_curves(rows, png, min_effect, alpha)
    if rows:
        logger.info("seeds needed (%g%% power, paired t-test, alpha %g):\n%s",
                    100 * POWER_TARGET, alpha, "\n".join(power_table(rows, min_effect)))
    return power_section(rows, min_effect, alpha, Path(png).name)
