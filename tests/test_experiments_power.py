"""Seeds needed for a difference: the paired t-test's power checked against published values
(Cohen's tables / G*Power), against an independent computation (the noncentral t written out as
an integral over the chi-square spread, and a simulation), and in results.md's section."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import integrate, stats as sps

from ssd_da.experiments.power import paired_power, power_report, power_rows, seeds_needed
from ssd_da.experiments.report import RunRecord, format_markdown, summarize, table_label


def power_by_integral(n: int, effect: float, sd: float, alpha: float = 0.05) -> float:
    """The same power without the noncentral t: T = (Z + delta) / sqrt(V / nu), Z standard
    normal, V chi-square with nu = n - 1 dof, delta = effect sqrt(n) / sd; so
    P(|T| > c) = integral over v of [P(Z > c sqrt(v/nu) - delta) + P(Z < -c sqrt(v/nu) - delta)]
    times the chi-square density of v."""
    nu, delta = n - 1, effect * math.sqrt(n) / sd
    crit = sps.t.ppf(1 - alpha / 2, nu)

    def integrand(v: float) -> float:
        c = crit * math.sqrt(v / nu)
        return (sps.norm.sf(c - delta) + sps.norm.cdf(-c - delta)) * sps.chi2.pdf(v, nu)

    return integrate.quad(integrand, 0, math.inf, limit=200)[0]


def test_worked_example_effect_half_an_sd_needs_34_seeds():
    # Cohen (1988) / G*Power, t-test for matched pairs, two-sided, alpha 0.05, power 0.8:
    # effect size dz = 0.5 -> 34 pairs, actual power 0.8077775; 33 pairs fall short.
    assert paired_power(34, 0.5, 1.0) == pytest.approx(0.8077775, abs=1e-7)
    assert paired_power(33, 0.5, 1.0) == pytest.approx(0.7953658, abs=1e-7)  # < 0.8
    assert seeds_needed(0.5, 1.0) == 34
    assert seeds_needed(0.3, 0.6) == 34  # only the ratio matters: 0.3 points with sd 0.6
    assert seeds_needed(1.0, 1.0) == 10  # dz = 1: 10 pairs (power 0.803), 9 give 0.748
    assert paired_power(10, 1.0, 1.0) == pytest.approx(0.8030969, abs=1e-7)
    # The normal approximation n ~ ((z_.975 + z_.8) / dz)^2 + z_.975^2 / 2 = 33.3 agrees.
    z = sps.norm.ppf
    assert math.ceil(((z(0.975) + z(0.8)) / 0.5) ** 2 + z(0.975) ** 2 / 2) == 34


@pytest.mark.parametrize("n, effect, sd", [(2, 4 / 3, math.sqrt(1 / 3)),
                                           (4, 4 / 3, math.sqrt(1 / 3)),
                                           (32, 0.3, math.sqrt(1 / 3)), (7, 0.2, 0.9)])
def test_power_agrees_with_the_integral_written_out(n, effect, sd):
    assert paired_power(n, effect, sd) == pytest.approx(power_by_integral(n, effect, sd), abs=1e-9)


def test_power_agrees_with_a_simulation():
    rng = np.random.default_rng(0)
    diffs = rng.normal(0.5, 1.0, size=(20_000, 34))  # 20000 suites of 34 paired seeds
    t = diffs.mean(axis=1) / (diffs.std(axis=1, ddof=1) / math.sqrt(34))
    shown = float(np.mean(np.abs(t) > sps.t.ppf(0.975, 33)))
    assert shown == pytest.approx(paired_power(34, 0.5, 1.0), abs=0.009)  # 3 binomial sd


def test_edge_cases():
    assert paired_power(5, 0.0, 1.0) == pytest.approx(0.05, abs=1e-12)  # no difference: alpha
    assert seeds_needed(0.0, 1.0) is None  # never shown
    assert seeds_needed(1.0, 0.0) == 2  # no spread at all: the smallest test shows it
    assert seeds_needed(0.001, 10.0) is None  # needs more than MAX_SEEDS
    assert seeds_needed(0.5, 1.0, alpha=0.01) > 34 and seeds_needed(0.5, 1.0, power=0.9) > 34
    with pytest.raises(ValueError, match="n >= 2"):
        paired_power(1, 1.0, 1.0)
    with pytest.raises(ValueError, match="alpha"):
        paired_power(5, 1.0, 1.0, alpha=1.5)
    with pytest.raises(ValueError, match="--min-effect must be > 0"):
        power_rows([], 0.0)


def _record(backbone: str, seed: int, m: float) -> RunRecord:
    return RunRecord(backbone, seed, m, {"a": m}, 1_000_000, 1.5, 10.0, None, 60.0)


def test_results_md_section_by_hand(tmp_path):
    records = [_record("resnet18", s, m) for s, m in enumerate((0.70, 0.72, 0.74))]
    records += [_record("da_resnet18", s, m) for s, m in enumerate((0.71, 0.74, 0.75))]
    records += [_record("resnet34", 0, 0.6), _record("se_resnet34", 0, 0.61)]  # one seed
    records += [_record("resnet50", s, 0.7) for s in (0, 1)]
    records += [_record("eca_resnet50", s, 0.7) for s in (2, 3)]  # other seeds: not paired
    groups = summarize(records)
    section = power_report(groups, tmp_path / "power.png", 0.3, 0.05,
                           lambda b: table_label(b))
    rows = {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[2:-1]]
            for ln in section if ln.startswith("| ") and "Comparison" not in ln}
    # Paired differences 1, 2, 1 points: mean 4/3, sd sqrt(1/3) = 0.577, dz = 2.31. Power with
    # 3 seeds 0.565, with 4 seeds 0.854 (both also by the integral above); for 0.3 points
    # (dz = 0.52): 31 seeds give 0.799, 32 give 0.813.
    assert rows["DA-ResNet18 vs ResNet18"] == ["3", "+1.33", "0.58", "4", "32"]
    sd = math.sqrt(1 / 3)
    assert power_by_integral(3, 4 / 3, sd) < 0.8 < power_by_integral(4, 4 / 3, sd)
    assert power_by_integral(31, 0.3, sd) < 0.8 < power_by_integral(32, 0.3, sd)
    assert rows["SE-ResNet34 vs ResNet34"][2:] == ["n/a", "n/a (one seed: no spread)",
                                                   "n/a (one seed: no spread)"]
    assert rows["ECA-ResNet50 vs ResNet50"][2:] == ["n/a", "n/a (seeds not matched)",
                                                    "n/a (seeds not matched)"]
    md = format_markdown(groups, power=section)
    assert md.index("## Seeds needed") < md.index("## Per-class AP")
    assert (tmp_path / "power.png").stat().st_size > 1000
