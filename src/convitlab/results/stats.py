"""How sure a gain is: the gain of one cell's mean over the baseline's, with a 95% interval and a
one-sided t-test, from the two cells' values alone (no DataFrames: compare.py pairs the runs).

- The interval is Fieller's for the ratio of the two means: the ratios ρ for which the t statistic
  of mean(column) − ρ·mean(baseline) stays within the t quantile. It is exact for a ratio of
  normal means (the delta method is a first-order approximation, coarse at 3 seeds), and it is
  the set of ratios the t-test does not reject, so a paired interval excludes 0% exactly when the
  one-sided test is significant at 2.5%. scipy has no Fieller interval: it is solved here.
- The test is one-sided, that the column's mean beats the baseline's: paired (n − 1 degrees of
  freedom) when the values are aligned by seed, else Welch's (unequal variances, Satterthwaite's
  degrees of freedom; for the interval at the estimated ratio).

Accuracies are not negative, so neither is the ratio: the interval is Fieller's set cut at 0, and
a gain's lower bound is never below −100%. Fewer than 2 values (or pairs): no interval, no test.

The t statistics are computed here and scipy.stats gives the t distribution (t.sf, t.ppf).
scipy.stats.ttest_rel and ttest_ind(equal_var=False) compute the same statistics in another
order of operations: they agree to rounding only, in the last bits that comparison.csv keeps
(floats are written in full), and they give NaN where a cell has no spread, where this gives
t = ±inf (or 0 for equal means) and a p-value.
"""
import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

CONFIDENCE = 0.95


def fieller_interval(mean_a, mean_b, var_a, var_b, cov_ab, t) -> tuple:
    """The ratios ρ ≥ 0 with (mean_a − ρ·mean_b)² ≤ t²·(var_a − 2ρ·cov_ab + ρ²·var_b), where
    var_a, var_b, cov_ab are the (co)variances of the two means: Fieller's interval for
    mean_a / mean_b, a ratio of accuracies (never negative). (0, inf) when mean_b is not clear of
    0 at this t (the set is then unbounded)."""
    q = t * t
    a = mean_b * mean_b - q * var_b
    b = mean_a * mean_b - q * cov_ab
    c = mean_a * mean_a - q * var_a
    if a <= 0.0:
        return 0.0, math.inf
    root = math.sqrt(max(b * b - a * c, 0.0))
    return max((b - root) / a, 0.0), max((b + root) / a, 0.0)


def welch_dof(var_a, var_b, n_a, n_b) -> float:
    """Satterthwaite's degrees of freedom of var_a + var_b (variances of two means of n_a, n_b runs)."""
    denominator = var_a * var_a / (n_a - 1) + var_b * var_b / (n_b - 1)
    return (var_a + var_b) ** 2 / denominator if denominator > 0 else math.inf


def _t_statistic(difference, standard_error) -> float:
    """difference / standard_error; without spread ±inf, or 0 when the difference is 0 too."""
    if standard_error > 0:
        return difference / standard_error
    return math.copysign(math.inf, difference) if difference else 0.0


@dataclass(frozen=True)
class GainTest:
    """A column's gain over the baseline in percent, its 95% interval, and the one-sided t-test."""
    gain: float  # 100 · (mean / mean_baseline − 1)
    low: float   # the interval's bounds, in percent like the gain (NaN without a test)
    high: float
    t: float     # the test's statistic and degrees of freedom
    dof: float
    p: float     # one-sided: P(T ≥ t) if the column were no better than the baseline
    n: int       # the pairs (paired) or the smaller cell's runs (Welch)
    test: str    # "paired" or "Welch"; None when n < 2 (no interval, no test)


def gain_test(values, baseline, paired: bool) -> GainTest:
    """The gain of `values` (a cell's metric) over `baseline`; paired: the two are aligned by seed."""
    a, b = np.asarray(values, dtype=float), np.asarray(baseline, dtype=float)
    if len(a) == 0 or len(b) == 0:
        return GainTest(math.nan, math.nan, math.nan, math.nan, math.nan, math.nan, 0, None)
    mean_a, mean_b = float(a.mean()), float(b.mean())
    gain = 100.0 * (mean_a / mean_b - 1.0) if mean_b else math.nan
    n = len(a) if paired else min(len(a), len(b))
    if n < 2 or math.isnan(gain):
        return GainTest(gain, math.nan, math.nan, math.nan, math.nan, math.nan, n, None)
    if paired:
        differences = a - b
        t = _t_statistic(float(differences.mean()), float(differences.std(ddof=1)) / math.sqrt(n))
        dof = ci_dof = n - 1.0
        covariance = np.cov(a, b, ddof=1) / n
        var_a, var_b, cov_ab = covariance[0, 0], covariance[1, 1], covariance[0, 1]
    else:
        var_a, var_b, cov_ab = float(a.var(ddof=1)) / len(a), float(b.var(ddof=1)) / len(b), 0.0
        t = _t_statistic(mean_a - mean_b, math.sqrt(var_a + var_b))
        dof = welch_dof(var_a, var_b, len(a), len(b))
        ci_dof = welch_dof(var_a, (mean_a / mean_b) ** 2 * var_b, len(a), len(b))
    quantile = float(stats.t.ppf((1.0 + CONFIDENCE) / 2.0, ci_dof)) if math.isfinite(ci_dof) else 0.0  # inf: no spread
    low, high = fieller_interval(mean_a, mean_b, var_a, var_b, cov_ab, quantile)
    return GainTest(gain, 100.0 * (low - 1.0), 100.0 * (high - 1.0), t, dof, float(stats.t.sf(t, dof)), n,
                    "paired" if paired else "Welch")


def mean_interval(values, bounds=(-math.inf, math.inf)) -> tuple:
    """The mean of `values` and its 95% t-interval (t with n − 1 degrees of freedom), cut to
    `bounds`, the values the quantity can take (0-100 for an accuracy in percent): the interval of
    a mean of 3 seeds is wide, and its part past a bound is impossible. Below 2 values: (mean, mean)."""
    a = np.asarray(values, dtype=float)
    a = a[np.isfinite(a)]
    if len(a) == 0:
        return math.nan, math.nan, math.nan
    mean = float(a.mean())
    if len(a) < 2:
        return mean, mean, mean
    half = float(stats.t.ppf((1.0 + CONFIDENCE) / 2.0, len(a) - 1)) * float(a.std(ddof=1)) / math.sqrt(len(a))
    return mean, max(mean - half, bounds[0]), min(mean + half, bounds[1])
