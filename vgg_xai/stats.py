"""Which differences are real: intervals over seeds, tests between two cells of a sweep, Holm's
adjustment for many comparisons, the seeds a comparison needs, and a score against its baseline
on the same images.

The unit of replication is the seed: each trial of a cell is one draw of the same configuration,
so a cell's values are a sample and its mean has a t-interval (mean ± t * s / sqrt(n)). Two cells
are compared by

- Welch's t-test (two samples, unequal variances), where both cells' seeds can be read as a
  Gaussian sample. At 2-5 seeds per cell it is the only test with any power: an exact permutation
  test of 3 against 3 seeds cannot go below p = 2/20 = 0.1, whatever the data;
- the exact permutation test of the difference of means (every split of the pooled values), where
  a cell mixes collapsed and learning seeds (two clusters, not a Gaussian) or neither cell has any
  spread (every seed the same value, as collapsed trials at chance are: Welch's t is undefined).

p-values of one family of comparisons are adjusted by Holm's step-down method, which keeps the
chance of any false "beyond seed noise" in the family at 5% without assuming the tests independent.
Everything is computed with scipy.stats where scipy has it.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def _sps():
    """scipy.stats, imported where a test is computed: `status` and `results` start without it (1 s)."""
    from scipy import stats

    return stats


LEVEL = 0.95  # of every interval
ALPHA = 0.05  # of every test, after Holm's adjustment
POWER = 0.8  # of the seeds-needed estimate
MAX_SEEDS = 1000  # seeds_needed gives up above this
EXACT_SPLITS = 100_000  # the permutation test enumerates every split up to this many, else draws as many


def mean_interval(values: Sequence[float], level: float = LEVEL) -> tuple[float, float]:
    """The t-interval of the mean of ``values``; (nan, nan) for fewer than 2, (mean, mean) for no spread."""
    x = np.asarray(values, dtype=float)
    if len(x) < 2:
        return math.nan, math.nan
    half = _sps().t.ppf((1 + level) / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    return float(x.mean() - half), float(x.mean() + half)


def two_sample(a: Sequence[float], b: Sequence[float], mixed: bool = False, level: float = LEVEL) -> dict:
    """mean(a) - mean(b) with its interval and a two-sided test, for cells of 2 seeds or more.

    Returns diff, low, high (Welch's interval; the difference itself where neither cell has a spread),
    test ("welch" or "permutation", see the module's rule; ``mixed``: a cell mixes collapsed and
    learning seeds) and p.
    """
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(x) < 2 or len(y) < 2:
        raise ValueError(f"two_sample needs 2 values or more on each side, got {len(x)} and {len(y)}")
    diff = float(x.mean() - y.mean())
    spread = bool(np.ptp(x) > 0 or np.ptp(y) > 0)  # exact: equal values have no spread
    test = "welch" if spread and not mixed else "permutation"
    low = high = diff
    if spread:
        welch = _sps().ttest_ind(x, y, equal_var=False)
        ci = welch.confidence_interval(level)
        low, high = float(ci.low), float(ci.high)
    p = float(welch.pvalue) if test == "welch" else permutation_p(x, y)
    return {"diff": diff, "low": low, "high": high, "test": test, "p": p}


def permutation_p(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sided p of the difference of means over every split of the pooled values into groups of
    len(a) and len(b) (scipy's exact test; a fixed-seed draw of EXACT_SPLITS splits beyond that many)."""
    exact = math.comb(len(a) + len(b), len(a)) <= EXACT_SPLITS
    res = _sps().permutation_test((a, b), lambda u, v, axis: u.mean(axis=axis) - v.mean(axis=axis),
                               permutation_type="independent", vectorized=True, alternative="two-sided",
                               n_resamples=np.inf if exact else EXACT_SPLITS, rng=np.random.default_rng(0))
    return float(res.pvalue)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of a family of p-values (NaN stays NaN and is not counted):
    the i-th smallest of m is multiplied by m - i + 1, kept at least the one before it, capped at 1."""
    p = np.asarray(pvalues, dtype=float)
    out = np.full(len(p), math.nan)
    known = np.flatnonzero(np.isfinite(p))
    running = 0.0
    for rank, i in enumerate(known[np.argsort(p[known], kind="stable")]):
        running = max(running, min(1.0, (len(known) - rank) * p[i]))
        out[i] = running
    return out.tolist()


def welch_power(diff: float, sd_a: float, sd_b: float, n: np.ndarray | int, alpha: float = ALPHA) -> np.ndarray:
    """Power of the two-sided Welch test at level ``alpha`` to find ``diff`` with ``n`` seeds in each
    cell whose spreads are ``sd_a`` and ``sd_b`` (the noncentral t with the Welch-Satterthwaite df)."""
    n = np.asarray(n, dtype=float)
    va, vb = sd_a ** 2 / n, sd_b ** 2 / n
    df = (va + vb) ** 2 / (va ** 2 / (n - 1) + vb ** 2 / (n - 1))
    crit = _sps().t.ppf(1 - alpha / 2, df)
    ncp = abs(diff) / np.sqrt(va + vb)
    return _sps().nct.sf(crit, df, ncp) + _sps().nct.cdf(-crit, df, ncp)


def seeds_needed(diff: float, sd_a: float, sd_b: float, alpha: float = ALPHA, power: float = POWER) -> int | None:
    """The fewest seeds per cell that find a difference of ``diff`` with probability ``power`` (two-sided,
    level ``alpha``) where the cells' spreads are ``sd_a`` and ``sd_b``; None where no number of seeds
    up to MAX_SEEDS does (no difference, or one far inside the noise).

    Without any spread the permutation test decides: the fewest n with 2 / C(2n, n) <= alpha.
    """
    if not all(math.isfinite(v) for v in (diff, sd_a, sd_b)) or diff == 0:
        return None
    if sd_a == 0 and sd_b == 0:
        return next(n for n in range(2, MAX_SEEDS) if 2 / math.comb(2 * n, n) <= alpha)
    ns = np.arange(2, MAX_SEEDS + 1)
    enough = np.flatnonzero(welch_power(diff, sd_a, sd_b, ns, alpha) >= power)
    return int(ns[enough[0]]) if len(enough) else None


def pooled_sd(groups: Sequence[Sequence[float]]) -> tuple[float, int]:
    """The spread within cells pooled over the groups of 2 values or more, and its degrees of freedom
    (nan, 0 where there is none)."""
    parts = [np.asarray(g, dtype=float) for g in groups if len(g) >= 2]
    dof = sum(len(g) - 1 for g in parts)
    if not dof:
        return math.nan, 0
    return math.sqrt(sum(((g - g.mean()) ** 2).sum() for g in parts) / dof), dof


def paired(scores: Sequence[float], baseline: Sequence[float], higher_is_better: bool,
           alpha: float = ALPHA) -> dict:
    """A score against its baseline on the same items (a map against a random map, image by image).

    Returns diff (mean of score - baseline), se (its standard error over the items), wins (the share
    of items where the score is the better one), n, p (two-sided paired t-test) and beats (the
    difference goes the better way and p < alpha).
    """
    s, b = np.asarray(scores, dtype=float), np.asarray(baseline, dtype=float)
    d = s - b
    n = len(d)
    se = float(d.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
    if n > 1 and np.ptp(d) > 0:
        p = float(_sps().ttest_rel(s, b).pvalue)
    else:
        p = math.nan if n < 2 else (1.0 if d.mean() == 0 else 0.0)
    better = d > 0 if higher_is_better else d < 0
    diff = float(d.mean()) if n else math.nan
    beats = bool(n > 1 and p < alpha and (diff > 0 if higher_is_better else diff < 0))
    return {"diff": diff, "se": se, "wins": float(better.mean()) if n else math.nan, "n": n, "p": p, "beats": beats}
