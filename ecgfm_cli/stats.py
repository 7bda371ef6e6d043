"""Statistical tests of evaluate: DeLong's test for paired AUROCs and bootstrap helpers.

DeLong, DeLong & Clarke-Pearson (1988) estimate the covariance of correlated AUROCs from the placement values of
each positive among the negatives and vice versa; Sun & Xu (2014) compute those placement values from mid-ranks
in O(n log n) instead of the O(m n) pairwise comparison. :func:`delong` is that fast algorithm (checked against
the pairwise definition in tests/test_evaluate_stats.py).

DeLong treats rows as independent: with several rows per patient (segments, repeat ECGs) its variance is too small.
:func:`clustered_delong` then uses Obuchowski's (1997) clustered variance, which sums the placement values per
patient (cluster) before taking their variance; with one row per patient it is plain DeLong. :func:`auc_influence`
gives the per-cluster terms of that variance, from which :func:`auc_gap` builds the interval of a difference of
(macro) AUROCs of two groups of rows. evaluate also reports the patient-level bootstrap interval and p-value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class DeLongResult:
    """AUROCs (k,) of k score columns on the same rows and their covariance (k, k): DeLong's (``method``
    ``"delong"``, rows independent) or Obuchowski's clustered one (``"obuchowski"``); ``n_clusters``: the clusters
    (patients) holding the rows (the number of rows for plain DeLong)."""

    auc: np.ndarray
    cov: np.ndarray
    n_pos: int
    n_neg: int
    method: str = "delong"
    n_clusters: int | None = None


def _placements(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Placement values of fast DeLong. ``y``: (N,) 0/1; ``scores``: (N,) or (N, k). Returns (V10 (m, k): share of
    the negatives below each positive, ties half; V01 (n, k): share of the positives above each negative; AUROC
    (k,); ``pos`` (N,) bool, the rows of V10 in order, ``~pos`` those of V01)."""
    from scipy.stats import rankdata

    y = np.asarray(y)
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim == 1:
        s = s[:, None]
    pos, neg = y == 1, y == 0
    m, n = int(pos.sum()), int(neg.sum())
    if m == 0 or n == 0:
        raise ValueError("DeLong's test needs both classes")
    if m + n != len(y):
        raise ValueError("y must hold only 0 and 1")
    x, z = s[pos], s[neg]  # (m, k), (n, k)
    tx = rankdata(x, axis=0)  # mid-ranks within the positives
    tz = rankdata(z, axis=0)  # within the negatives
    t_all = rankdata(np.vstack([x, z]), axis=0)  # within all rows
    v10 = (t_all[:m] - tx) / n
    v01 = 1.0 - (t_all[m:] - tz) / m
    return v10, v01, v10.mean(axis=0), pos


def delong(y: np.ndarray, scores: np.ndarray) -> DeLongResult:
    """Fast DeLong (Sun & Xu 2014). ``y``: (N,) 0/1; ``scores``: (N,) or (N, k), higher = more positive.

    Ties count one half (the AUROC equals the trapezoidal/Mann-Whitney one). Needs both classes, with at least
    two rows each for a covariance (else the covariance is NaN).
    """
    v10, v01, auc, _ = _placements(y, scores)
    (m, k), n = v10.shape, len(v01)
    s10 = np.cov(v10, rowvar=False).reshape(k, k) if m > 1 else np.full((k, k), np.nan)
    s01 = np.cov(v01, rowvar=False).reshape(k, k) if n > 1 else np.full((k, k), np.nan)
    return DeLongResult(auc, s10 / m + s01 / n, m, n, "delong", m + n)


@dataclass
class AUCInfluence:
    """One AUROC and its per-cluster terms: ``z`` (I,) on the clusters ``keys`` (I,) holding its rows, such that
    Obuchowski's variance is I / (I - 1) * sum(z**2) (see :func:`auc_influence`). ``var``: the variance used, plain
    DeLong's when every cluster holds one row (``method`` ``"delong"``), else Obuchowski's (``"obuchowski"``)."""

    auc: float
    keys: np.ndarray
    z: np.ndarray
    var: float
    method: str
    n_rows: int


def _cluster_sums(y: np.ndarray, scores: np.ndarray, clusters: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
    """(AUROC (k,), cluster keys (I,), z (I, k), m, n): ``z[i] = sum over cluster i's positives of (V10 - AUC) / m
    + sum over its negatives of (V01 - AUC) / n``, the cluster's share of the linearised AUROC error."""
    v10, v01, auc, pos = _placements(y, scores)
    (m, k), n = v10.shape, len(v01)
    keys, code = np.unique(np.asarray(clusters).astype(str), return_inverse=True)
    code = code.reshape(-1)
    z = np.zeros((len(keys), k))
    np.add.at(z, code[pos], (v10 - auc) / m)
    np.add.at(z, code[~pos], (v01 - auc) / n)
    return auc, keys, z, m, n


def _obuchowski(z: np.ndarray) -> np.ndarray:
    """Obuchowski's covariance from per-cluster terms ``z`` (I, k): I / (I-1) z^T z, (k, k); NaN with one cluster."""
    z = z.reshape(len(z), -1)
    n_cl = len(z)
    return n_cl / (n_cl - 1) * (z.T @ z) if n_cl > 1 else np.full((z.shape[1],) * 2, np.nan)


def clustered_delong(y: np.ndarray, scores: np.ndarray, clusters: np.ndarray | None = None) -> DeLongResult:
    """AUROCs (k,) of ``scores`` (N,) or (N, k) against ``y`` (N,) 0/1 and their covariance (k, k), the rows
    grouped in ``clusters`` (N,) (patient keys; None: every row its own cluster).

    When a cluster holds several rows they are not independent and DeLong's variance is too small; the
    covariance is then Obuchowski's (1997, "Nonparametric analysis of clustered ROC curve data", Biometrics
    53:567-578, eqs. for S10, S01, S11): with I clusters, M positive and N negative rows, cluster i holding m_i
    positives and n_i negatives, V10(X_i.) and V01(Y_i.) its sums of the placement values of DeLong,

        S10 = I / ((I-1) M) sum_i (V10(X_i.) - m_i AUC)^2,  S01 = I / ((I-1) N) sum_i (V01(Y_i.) - n_i AUC)^2,
        S11 = I / (I-1) sum_i (V10(X_i.) - m_i AUC)(V01(Y_i.) - n_i AUC),
        var(AUC) = S10 / M + S01 / N + 2 S11 / (M N),

    and for two score columns r, s the same sums with the products of r's and s's terms (S11 taken both ways);
    written here as I / (I-1) sum_i z_i z_i^T with z_i = (V10(X_i.) - m_i AUC) / M + (V01(Y_i.) - n_i AUC) / N.
    When every cluster holds one row this is plain DeLong (``method`` ``"delong"``): Obuchowski's formula would
    then differ from DeLong's only by its small-sample factor, I / (I-1) instead of M / (M-1) and N / (N-1).
    """
    if clusters is None:
        return delong(y, scores)
    clusters = np.asarray(clusters)
    _, counts = np.unique(clusters.astype(str), return_counts=True)
    if counts.max(initial=1) <= 1:
        return delong(y, scores)
    auc, keys, z, m, n = _cluster_sums(y, scores, clusters)
    return DeLongResult(auc, _obuchowski(z), m, n, "obuchowski", len(keys))


def auc_influence(y: np.ndarray, s: np.ndarray, clusters: np.ndarray) -> AUCInfluence:
    """The AUROC of one score column ``s`` (N,) against ``y`` (N,) 0/1, rows grouped in ``clusters`` (N,), with
    its per-cluster terms z (see :func:`clustered_delong`) and variance (DeLong's when every cluster holds one
    row, else Obuchowski's). Two AUROCs on other rows of the same clusters have covariance I / (I-1) sum z_a z_b
    over the I clusters of either."""
    auc, keys, z, _, _ = _cluster_sums(y, s, clusters)
    if len(keys) == len(np.asarray(y)):  # one row per cluster: plain DeLong, as clustered_delong uses
        var, method = float(delong(y, s).cov[0, 0]), "delong"
    else:
        var, method = float(_obuchowski(z)[0, 0]), "obuchowski"
    return AUCInfluence(float(auc[0]), keys, z[:, 0], var, method, len(np.asarray(y)))


def mean_influence(parts: list[AUCInfluence]) -> AUCInfluence:
    """The mean of several AUROCs (a macro AUROC over labels) with its per-cluster terms (the mean of the parts'
    z on the union of their clusters) and Obuchowski's variance: the labels of a macro share rows, so their
    AUROCs are correlated and only the clustered form gives the macro's variance (``method`` ``"obuchowski"``
    whenever there are several parts)."""
    if len(parts) == 1:
        return parts[0]
    keys, z = _aligned(parts)
    zm = z.mean(axis=1)
    return AUCInfluence(float(np.mean([p.auc for p in parts])), keys, zm, float(_obuchowski(zm)[0, 0]), "obuchowski",
                        max(p.n_rows for p in parts))


def _aligned(parts: list[AUCInfluence]) -> tuple[np.ndarray, np.ndarray]:
    """The union of the parts' cluster keys (I,) and their z on it (I, len(parts)), 0 where a part lacks a key."""
    keys = np.unique(np.concatenate([p.keys for p in parts]))
    z = np.zeros((len(keys), len(parts)))
    for j, p in enumerate(parts):
        z[np.searchsorted(keys, p.keys), j] = p.z
    return keys, z


def auc_gap(a: AUCInfluence, b: AUCInfluence, level: float = 0.95) -> dict[str, Any]:
    """Difference ``a.auc - b.auc`` of the AUROCs of two disjoint sets of rows (two subgroups), with its standard
    error, ``level`` normal interval and two-sided p-value (None when the variance is 0 or undefined).

    No cluster in both: the groups are independent and the variance is the sum of theirs (``method`` DeLong when
    both are, else Obuchowski). A cluster (patient) in both: the covariance of the two AUROCs is taken from the
    shared clusters, var = I / (I-1) sum_i (z_a,i - z_b,i)^2 over the union of the I clusters (Obuchowski).
    """
    shared = int(len(np.intersect1d(a.keys, b.keys)))
    if shared:
        keys, z = _aligned([a, b])
        var = float(_obuchowski(z[:, 0] - z[:, 1])[0, 0])  # one patient in both and no other: NaN, no interval
        method, n_cl = "obuchowski", len(keys)
    else:
        var = a.var + b.var
        method = "delong" if a.method == b.method == "delong" else "obuchowski"
        n_cl = len(a.keys) + len(b.keys)
    out = normal_test(a.auc - b.auc, var, level)
    out.update(method=method, n_clusters=n_cl, shared_clusters=shared)
    return out


def normal_test(diff: float, var: float, level: float = 0.95) -> dict[str, Any]:
    """``diff`` with standard error sqrt(``var``), its ``level`` normal interval (clipped to [-1, 1], the range of
    an AUROC difference), z and two-sided p-value; se, ci, z and p are None when ``var`` is not a positive
    finite number."""
    from scipy.stats import norm

    if not np.isfinite(var) or var <= 1e-15:
        return {"diff": float(diff), "se": None, "ci": None, "z": None, "p": None}
    se = float(np.sqrt(var))
    h = float(norm.ppf(0.5 + level / 2)) * se
    z = diff / se
    return {"diff": float(diff), "se": se, "ci": [float(max(diff - h, -1.0)), float(min(diff + h, 1.0))],
            "z": float(z), "p": float(2 * norm.sf(abs(z)))}


def delong_paired(y: np.ndarray, s_a: np.ndarray, s_b: np.ndarray, clusters: np.ndarray | None = None,
                  level: float = 0.95) -> dict[str, Any]:
    """DeLong's test of AUROC(a) = AUROC(b) on the same rows: difference a - b, its standard error, ``level``
    normal interval, z and the two-sided p-value (normal approximation). With ``clusters`` (N,) holding a
    cluster of several rows, the clustered covariance of :func:`clustered_delong` (Obuchowski 1997); ``method``
    and ``n_clusters`` say which was used. se, ci, z and ``p`` are None when the variance of the difference is 0
    or undefined (identical scores, too few rows)."""
    r = clustered_delong(y, np.column_stack([s_a, s_b]), clusters)
    var = float(r.cov[0, 0] + r.cov[1, 1] - 2 * r.cov[0, 1])
    out = normal_test(float(r.auc[0] - r.auc[1]), var, level)
    return {"auroc_a": float(r.auc[0]), "auroc_b": float(r.auc[1]), **out, "method": r.method,
            "n_clusters": r.n_clusters}


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
