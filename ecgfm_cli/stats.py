"""Statistical tests of evaluate: DeLong's test for paired AUROCs and bootstrap helpers.

DeLong, DeLong & Clarke-Pearson (1988) estimate the covariance of correlated AUROCs from the placement values of
each positive among the negatives and vice versa; Sun & Xu (2014) compute those placement values from mid-ranks
in O(n log n) instead of the O(m n) pairwise comparison. :func:`delong` is that fast algorithm (checked against
the pairwise definition in tests/test_evaluate_stats.py).

DeLong treats rows as independent: with several rows per patient (segments, repeat ECGs) its variance is too small,
so evaluate also reports the patient-level bootstrap interval and p-value of the same difference.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class DeLongResult:
    """AUROCs (k,) of k score columns on the same rows and their DeLong covariance (k, k)."""

    auc: np.ndarray
    cov: np.ndarray
    n_pos: int
    n_neg: int


def delong(y: np.ndarray, scores: np.ndarray) -> DeLongResult:
    """Fast DeLong (Sun & Xu 2014). ``y``: (N,) 0/1; ``scores``: (N,) or (N, k), higher = more positive.

    Ties count one half (the AUROC equals the trapezoidal/Mann-Whitney one). Needs both classes, with at least
    two rows each for a covariance (else the covariance is NaN).
    """
    from scipy.stats import rankdata

    y = np.asarray(y)
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim == 1:
        s = s[:, None]
    pos, neg = y == 1, y == 0
    m, n = int(pos.sum()), int(neg.sum())
    if m == 0 or n == 0:
        raise ValueError("DeLong's test needs both classes")
    x, z = s[pos], s[neg]  # (m, k), (n, k)
    tx = rankdata(x, axis=0)  # mid-ranks within the positives
    tz = rankdata(z, axis=0)  # within the negatives
    t_all = rankdata(np.vstack([x, z]), axis=0)  # within all rows
    # placement values: V10[i] = share of negatives below positive i (ties half); V01[j] = share of positives above
    v10 = (t_all[:m] - tx) / n
    v01 = 1.0 - (t_all[m:] - tz) / m
    auc = v10.mean(axis=0)
    k = s.shape[1]
    s10 = np.cov(v10, rowvar=False).reshape(k, k) if m > 1 else np.full((k, k), np.nan)
    s01 = np.cov(v01, rowvar=False).reshape(k, k) if n > 1 else np.full((k, k), np.nan)
    return DeLongResult(auc, s10 / m + s01 / n, m, n)


def delong_paired(y: np.ndarray, s_a: np.ndarray, s_b: np.ndarray) -> dict[str, float | None]:
    """DeLong's test of AUROC(a) = AUROC(b) on the same rows: difference a - b, its standard error, z and the
    two-sided p-value (normal approximation). ``p`` is None when the variance of the difference is 0 or undefined
    (identical scores, too few rows)."""
    from scipy.stats import norm

    r = delong(y, np.column_stack([s_a, s_b]))
    diff = float(r.auc[0] - r.auc[1])
    var = float(r.cov[0, 0] + r.cov[1, 1] - 2 * r.cov[0, 1])
    if not np.isfinite(var) or var <= 1e-15:
        return {"auroc_a": float(r.auc[0]), "auroc_b": float(r.auc[1]), "diff": diff, "se": None, "z": None,
                "p": None}
    se = float(np.sqrt(var))
    z = diff / se
    return {"auroc_a": float(r.auc[0]), "auroc_b": float(r.auc[1]), "diff": diff, "se": se, "z": float(z),
            "p": float(2 * norm.sf(abs(z)))}


def bootstrap_p(samples: np.ndarray) -> float | None:
    """Two-sided bootstrap p-value of "the difference is 0": twice the smaller share of (finite) replicates on
    either side of 0 (ties at 0 count half to each side), capped at 1. None without finite replicates."""
    v = np.asarray(samples, dtype=np.float64)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return None
    below = (np.sum(v < 0) + 0.5 * np.sum(v == 0)) / len(v)
    return float(min(1.0, 2 * min(below, 1 - below)))


def bc_interval(samples: np.ndarray, point: float | None, level: float = 0.95) -> list[float] | None:
    """Bias-corrected percentile interval (Efron 1987, without acceleration) of the finite replicate values.

    The percentiles are shifted by z0 = Phi^-1(share of replicates below ``point``, ties counting half), so that
    a statistic whose bootstrap distribution is skewed away from its estimate (average precision with few
    positives: drawing a positive twice raises it) does not get an interval with the estimate at its edge. With
    z0 = 0 (replicates centred on the estimate) it is the percentile interval. None without finite replicates;
    the percentile interval when ``point`` is None.
    """
    from scipy.stats import norm

    v = np.asarray(samples, dtype=np.float64)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return None
    if point is None or not np.isfinite(point):
        return percentile_interval(v, level)
    below = (np.sum(v < point) + 0.5 * np.sum(v == point)) / len(v)
    below = float(np.clip(below, 0.5 / len(v), 1 - 0.5 / len(v)))
    z0 = norm.ppf(below)
    za = norm.ppf((1 - level) / 2)
    lo, hi = norm.cdf(2 * z0 + za), norm.cdf(2 * z0 - za)
    return [float(np.quantile(v, lo)), float(np.quantile(v, hi))]


def percentile_interval(samples: np.ndarray, level: float = 0.95) -> list[float] | None:
    """Percentile interval of the finite replicate values (None when there are none)."""
    v = np.asarray(samples, dtype=np.float64)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return None
    a = (1 - level) / 2
    return [float(np.quantile(v, a)), float(np.quantile(v, 1 - a))]
