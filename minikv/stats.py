"""Paired comparisons: two presses measured on the same samples.

A paired difference removes what the samples share (an easy text, a hard question), so far fewer
samples separate two methods than comparing their two means would need.

    >>> d = paired_difference([0.10, 0.20, 0.30, 0.25], [0.12, 0.26, 0.31, 0.30], lower_is_better=True)
    >>> round(d["mean_diff"], 4), d["a_wins"], d["b_wins"], d["n"]
    (-0.035, 1.0, 0.0, 4)
"""

from __future__ import annotations

import math

import numpy as np


def paired_difference(a, b, lower_is_better: bool, n_boot: int = 4000, seed: int = 0, level: float = 0.95) -> dict:
    """Mean of a - b over paired samples, its percentile-bootstrap CI, and who wins how often.

    a, b: one value per sample, same order (NaNs -- samples where a metric does not exist -- are
    dropped in pairs). -> {"n", "mean_a", "mean_b", "mean_diff", "ci_low", "ci_high",
    "a_wins", "b_wins", "ties"} with wins as shares of the n samples ("a wins" = a is better).
    """
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"a and b must be 1-D and paired (same length), got shapes {x.shape} and {y.shape}")
    ok = ~(np.isnan(x) | np.isnan(y))
    x, y = x[ok], y[ok]
    n = int(x.size)
    if n == 0:
        nan = float("nan")
        return dict(n=0, mean_a=nan, mean_b=nan, mean_diff=nan, ci_low=nan, ci_high=nan, a_wins=nan, b_wins=nan, ties=nan)
    d = x - y
    rng = np.random.default_rng(seed)
    if n > 1 and not np.all(d == d[0]):
        means = d[rng.integers(0, n, size=(n_boot, n))].mean(axis=1)  # (n_boot,)
        lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    else:
        lo = hi = float(d[0]) if n else math.nan
    better = d < 0 if lower_is_better else d > 0
    worse = d > 0 if lower_is_better else d < 0
    return dict(n=n, mean_a=float(x.mean()), mean_b=float(y.mean()), mean_diff=float(d.mean()), ci_low=float(lo),
                ci_high=float(hi), a_wins=float(better.mean()), b_wins=float(worse.mean()), ties=float((d == 0).mean()))


def ci_excludes_zero(row: dict) -> bool:
    """True when the paired difference's CI lies entirely on one side of 0."""
    return row["n"] > 0 and (row["ci_low"] > 0 or row["ci_high"] < 0)
