"""Mean, sample standard deviation and Student-t confidence intervals over training seeds.

No scipy: the t distribution's CDF has a closed form for an integer number of degrees of freedom
(Abramowitz & Stegun 26.7.3 / 26.7.4), and the quantile is found by bisection on it. Seeds give
small samples (n = 2..10), where the t quantile is far from the normal one (t_0.975(1) = 12.706,
t_0.975(2) = 4.303 against 1.960), so the exact value matters.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

__all__ = ["Estimate", "student_t_cdf", "t_quantile", "mean_ci", "paired_difference",
           "welch_difference", "difference"]


@dataclass(frozen=True)
class Estimate:
    """A mean with its spread and a two-sided confidence interval ``[low, high]``.

    ``std`` is the sample standard deviation (ddof=1) of the values averaged (for a paired
    difference: of the per-seed differences); ``nan`` where undefined (one value, or Welch).
    ``low``/``high`` are ``nan`` when the interval is undefined (n < 2).
    """

    mean: float
    std: float
    n: int
    low: float
    high: float
    method: str = "mean"  # "mean", "paired" or "welch"

    @property
    def has_interval(self) -> bool:
        return not (math.isnan(self.low) or math.isnan(self.high))

    @property
    def includes_zero(self) -> bool | None:
        """True if the interval contains 0 (no difference shown), None if there is no interval."""
        if not self.has_interval:
            return None
        return self.low <= 0.0 <= self.high


def _check_dof(dof: int) -> None:
    if isinstance(dof, bool) or not isinstance(dof, int) or dof < 1:
        raise ValueError(f"degrees of freedom must be an integer >= 1, got {dof!r}")


def _abs_t_prob(t: float, dof: int) -> float:
    """A(t | dof) = P(|T| <= t) for t >= 0 (Abramowitz & Stegun 26.7.3 and 26.7.4)."""
    theta = math.atan(t / math.sqrt(dof))
    cos2, total, term = math.cos(theta) ** 2, 1.0, 1.0
    if dof % 2 == 0:
        # sin(th) * [1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ... + 1*3..(dof-3)/(2*4..(dof-2)) cos^(dof-2)]
        for k in range(2, dof - 1, 2):
            term *= (k - 1) / k * cos2
            total += term
        return math.sin(theta) * total
    if dof == 1:
        return 2.0 * theta / math.pi
    # 2/pi * (th + sin cos [1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ... up to cos^(dof-3)])
    for k in range(3, dof - 1, 2):
        term *= (k - 1) / k * cos2
        total += term
    return 2.0 / math.pi * (theta + math.sin(theta) * math.cos(theta) * total)


def student_t_cdf(t: float, dof: int) -> float:
    """P(T <= t) for Student's t with integer ``dof`` >= 1."""
    _check_dof(dof)
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    half = 0.5 * _abs_t_prob(abs(t), dof)
    return 0.5 + half if t >= 0 else 0.5 - half


def t_quantile(p: float, dof: int) -> float:
    """The ``p`` quantile of Student's t with integer ``dof`` (e.g. ``t_quantile(0.975, 4)`` =
    2.776), by bisection on :func:`student_t_cdf` to ~1e-12 relative precision."""
    _check_dof(dof)
    if not 0.0 < p < 1.0:
        raise ValueError(f"quantile level must lie strictly between 0 and 1, got {p!r}")
    if p == 0.5:
        return 0.0
    target = abs(2.0 * p - 1.0)  # P(|T| <= t) for the upper quantile
    lo, hi = 0.0, 1.0
    while _abs_t_prob(hi, dof) < target:
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if _abs_t_prob(mid, dof) < target:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * hi:
            break
    q = 0.5 * (lo + hi)
    return q if p > 0.5 else -q


def _check_level(level: float) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"confidence level must lie strictly between 0 and 1, got {level!r}")


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    n = len(values)
    mean = math.fsum(values) / n
    if n < 2:
        return mean, math.nan
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))


def mean_ci(values: Sequence[float], level: float = 0.95, method: str = "mean") -> Estimate:
    """Mean, sample std (ddof=1) and the Student-t interval mean +- t_{(1+level)/2}(n-1) * s/sqrt(n).

    One value: std and interval are ``nan`` (nothing can be said about the spread).
    """
    _check_level(level)
    values = [float(v) for v in values]
    if not values:
        raise ValueError("mean_ci needs at least one value, got none")
    mean, std = _mean_std(values)
    n = len(values)
    if n < 2:
        return Estimate(mean, math.nan, n, math.nan, math.nan, method)
    half = t_quantile(0.5 + level / 2.0, n - 1) * std / math.sqrt(n)
    return Estimate(mean, std, n, mean - half, mean + half, method)


def paired_difference(a: Mapping[int, float], b: Mapping[int, float],
                      level: float = 0.95) -> Estimate:
    """``a - b`` over the seeds both have: the mean of the per-seed differences and its t interval.

    Pairing removes the part of the seed-to-seed variation the two runs share (same data order
    and augmentation for the same seed), which is why matched seeds are used when they exist.
    """
    common = sorted(set(a) & set(b))
    if not common:
        raise ValueError(f"paired_difference: no common seeds (a has {sorted(a)}, b has {sorted(b)})")
    return mean_ci([a[s] - b[s] for s in common], level, method="paired")


def welch_difference(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> Estimate:
    """``mean(a) - mean(b)`` for unmatched samples, with Welch's interval.

    The Welch-Satterthwaite degrees of freedom are rounded DOWN to an integer (a slightly wider,
    conservative interval), since :func:`t_quantile` takes integer dof.
    """
    _check_level(level)
    if not a or not b:
        raise ValueError("welch_difference needs at least one value on each side")
    ma, sa = _mean_std([float(v) for v in a])
    mb, sb = _mean_std([float(v) for v in b])
    diff, n = ma - mb, min(len(a), len(b))
    if len(a) < 2 or len(b) < 2:
        return Estimate(diff, math.nan, n, math.nan, math.nan, "welch")
    va, vb = sa * sa / len(a), sb * sb / len(b)
    se = math.sqrt(va + vb)
    if se == 0.0:
        return Estimate(diff, math.nan, n, diff, diff, "welch")
    dof = (va + vb) ** 2 / (va * va / (len(a) - 1) + vb * vb / (len(b) - 1))
    half = t_quantile(0.5 + level / 2.0, max(1, int(math.floor(dof)))) * se
    return Estimate(diff, math.nan, n, diff - half, diff + half, "welch")


def difference(a: Mapping[int, float], b: Mapping[int, float], level: float = 0.95) -> Estimate:
    """``a - b`` keyed by seed: paired over the common seeds if there are any, else Welch."""
    if set(a) & set(b):
        return paired_difference(a, b, level)
    return welch_difference(list(a.values()), list(b.values()), level)
