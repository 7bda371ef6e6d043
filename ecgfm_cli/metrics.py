"""Evaluation metrics as pure functions over numpy arrays, all accepting per-row weights.

Weights make the patient-level bootstrap cheap: resampling patients with replacement is the same as giving
every row of a patient a weight equal to the number of times that patient was drawn
(:func:`patient_bootstrap_weights`), so no rows are copied and each label's scores are sorted once
(:class:`RankedScores`). With unit weights every function equals its scikit-learn counterpart
(``roc_auc_score``, ``average_precision_score``, ...; checked in tests/test_evaluate.py).

Conventions: ``y`` binary 0/1 float/int array (N,), ``s`` scores/probabilities (N,), ``w`` non-negative weights
(N,) or None (= 1). A metric that is undefined for the data (one class only, zero denominator) is ``None``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

#: Bins of the expected calibration error.
ECE_BINS = 15
_EPS = 1e-7


def _w(w: np.ndarray | None, n: int) -> np.ndarray:
    return np.ones(n, dtype=np.float64) if w is None else np.asarray(w, dtype=np.float64)


class RankedScores:
    """One label's (y, s) sorted by decreasing score once; ranking metrics for any weights in O(N).

    ``thresholds[k]`` are the distinct scores (descending); predicting positive when ``s >= thresholds[k]`` gives
    the cumulative weighted true/false positive counts at index ``k``.
    """

    def __init__(self, y: np.ndarray, s: np.ndarray):
        y = np.asarray(y, dtype=np.float64)
        s = np.asarray(s, dtype=np.float64)
        self.order = np.argsort(-s, kind="mergesort")
        self.y = y[self.order]
        ss = s[self.order]
        # last index of each run of equal scores
        self.ends = np.r_[np.nonzero(np.diff(ss))[0], len(ss) - 1] if len(ss) else np.array([], dtype=np.int64)
        self.thresholds = ss[self.ends] if len(ss) else ss

    def counts(self, w: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, float, float]:
        """(tps, fps, P, N): weighted true/false positives at each distinct threshold, total positives/negatives."""
        ws = _w(None if w is None else np.asarray(w)[self.order], len(self.y))
        tp = np.cumsum(ws * self.y)[self.ends]
        fp = np.cumsum(ws * (1 - self.y))[self.ends]
        return tp, fp, float(tp[-1]) if len(tp) else 0.0, float(fp[-1]) if len(fp) else 0.0

    def auroc_ap(self, w: np.ndarray | None = None) -> tuple[float | None, float | None]:
        """(AUROC, average precision) from one pass; both None when one class has zero weight. AUROC: trapezoids
        (ties count half); average precision: sum over thresholds of (recall increase) x precision (scikit-learn's
        definition, no interpolation)."""
        tp, fp, p, n = self.counts(w)
        if p <= 0 or n <= 0:
            return None, None
        tpr, fpr = np.r_[0.0, tp / p], np.r_[0.0, fp / n]
        denom = tp + fp
        prec = np.divide(tp, denom, out=np.zeros_like(tp), where=denom > 0)
        return (float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2)),
                float(np.sum(np.diff(tpr) * prec)))

    def best_threshold(self, method: str = "f1", w: np.ndarray | None = None) -> float | None:
        """The distinct score maximising F1 (or Youden's J = sens + spec - 1) when predicting ``s >= t``."""
        tp, fp, p, n = self.counts(w)
        if p <= 0 or n <= 0:
            return None
        if method == "f1":
            obj = 2 * tp / (2 * tp + fp + (p - tp))
        elif method == "youden":
            obj = tp / p - fp / n
        else:
            raise ValueError(f"threshold method must be f1 or youden, got {method!r}")
        return float(self.thresholds[int(np.argmax(obj))])


    def curves_many(self, W: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Vectorised :meth:`counts` for a (B, N) matrix of row weights (rows in the caller's order).

        Returns (tps, fps): (B, T) weighted counts at each distinct threshold, and P, N: (B,) totals.
        """
        Ws = np.asarray(W, dtype=np.float64)[:, self.order]
        tp = np.cumsum(Ws * self.y, axis=1)[:, self.ends]
        fp = np.cumsum(Ws * (1 - self.y), axis=1)[:, self.ends]
        return tp, fp, tp[:, -1], fp[:, -1]

    def auroc_ap_many(self, W: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`auroc_ap` for each row of a (B, N) weight matrix; (B,) arrays, NaN where undefined."""
        tp, fp, p, n = self.curves_many(W)
        ok = (p > 0) & (n > 0)
        ps, ns = np.where(ok, p, 1.0)[:, None], np.where(ok, n, 1.0)[:, None]
        zero = np.zeros((len(tp), 1))
        tpr, fpr = np.hstack([zero, tp / ps]), np.hstack([zero, fp / ns])
        denom = tp + fp
        prec = np.divide(tp, denom, out=np.zeros_like(tp), where=denom > 0)
        auroc = np.sum(np.diff(fpr, axis=1) * (tpr[:, 1:] + tpr[:, :-1]) / 2, axis=1)
        ap = np.sum(np.diff(tpr, axis=1) * prec, axis=1)
        return np.where(ok, auroc, np.nan), np.where(ok, ap, np.nan)

    def operating_points_many(self, W: np.ndarray, at_specificity: Sequence[float] = (),
                              at_sensitivity: Sequence[float] = ()) -> dict[str, np.ndarray]:
        """Read off the (weighted) ROC curve: the best sensitivity among thresholds whose specificity is at least
        each target, and the best specificity among those whose sensitivity is at least each target.

        No interpolation between points (the achievable operating points only); predicting no positive
        (sensitivity 0, specificity 1) is always available. Keys ``sens_at_spec_<t>`` / ``spec_at_sens_<t>``,
        values (B,) arrays, NaN where one class has zero weight.
        """
        tp, fp, p, n = self.curves_many(W)
        ok = (p > 0) & (n > 0)
        tpr = np.hstack([np.zeros((len(tp), 1)), tp / np.where(ok, p, 1.0)[:, None]])
        spec = np.hstack([np.ones((len(fp), 1)), 1 - fp / np.where(ok, n, 1.0)[:, None]])
        out: dict[str, np.ndarray] = {}
        eps = 1e-12  # a target met exactly (e.g. 0.9 of 10 negatives) counts as met despite float rounding
        for t in at_specificity:
            v = np.max(np.where(spec >= t - eps, tpr, -np.inf), axis=1)
            out[operating_key("sens_at_spec", t)] = np.where(ok, v, np.nan)
        for t in at_sensitivity:
            v = np.max(np.where(tpr >= t - eps, spec, -np.inf), axis=1)
            out[operating_key("spec_at_sens", t)] = np.where(ok & np.isfinite(v), v, np.nan)
        return out


def operating_key(kind: str, target: float) -> str:
    """``("sens_at_spec", 0.9)`` -> ``"sens_at_spec_0.9"`` (the metric's key in the report)."""
    return f"{kind}_{target:g}"


def roc_auc(y: np.ndarray, s: np.ndarray, w: np.ndarray | None = None) -> float | None:
    """Area under the ROC curve (ties count one half); None when y has one class."""
    return RankedScores(y, s).auroc_ap(w)[0]


def average_precision(y: np.ndarray, s: np.ndarray, w: np.ndarray | None = None) -> float | None:
    """Average precision (the AUPRC reported by ecgfm); None when y has one class."""
    return RankedScores(y, s).auroc_ap(w)[1]


def choose_threshold(y: np.ndarray, s: np.ndarray, method: str = "f1") -> float | None:
    """Threshold maximising ``method`` (f1|youden) on (y, s); None when y has one class."""
    return RankedScores(y, s).best_threshold(method)


def confusion(y: np.ndarray, s: np.ndarray, threshold: float, w: np.ndarray | None = None) -> tuple[float, ...]:
    """Weighted (tp, fp, tn, fn) when predicting positive for ``s >= threshold``."""
    w = _w(w, len(y))
    pred = s >= threshold
    pos = y == 1
    return (float(w[pred & pos].sum()), float(w[pred & ~pos].sum()),
            float(w[~pred & ~pos].sum()), float(w[~pred & pos].sum()))


def _ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None


def threshold_metrics(y: np.ndarray, s: np.ndarray, threshold: float,
                      w: np.ndarray | None = None) -> dict[str, float | None]:
    """Sensitivity, specificity, PPV and F1 at ``threshold``."""
    tp, fp, tn, fn = confusion(y, s, threshold, w)
    return {
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "ppv": _ratio(tp, tp + fp),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
    }


def expected_calibration_error(y: np.ndarray, p: np.ndarray, w: np.ndarray | None = None,
                               n_bins: int = ECE_BINS) -> float | None:
    """ECE with ``n_bins`` equal-width bins on [0, 1]: sum over bins of (bin weight share) x |mean y - mean p|."""
    w = _w(w, len(y))
    tot = w.sum()
    if tot <= 0:
        return None
    b = np.clip((np.asarray(p) * n_bins).astype(np.int64), 0, n_bins - 1)
    yb = np.bincount(b, weights=w * y, minlength=n_bins)
    pb = np.bincount(b, weights=w * p, minlength=n_bins)
    return float(np.abs(yb - pb).sum() / tot)


def reliability_bins(y: np.ndarray, p: np.ndarray, n_bins: int = ECE_BINS) -> dict[str, list]:
    """Per equal-width bin: count, mean predicted probability, observed frequency (None for empty bins)."""
    b = np.clip((np.asarray(p) * n_bins).astype(np.int64), 0, n_bins - 1)
    n = np.bincount(b, minlength=n_bins)
    yb = np.bincount(b, weights=y, minlength=n_bins)
    pb = np.bincount(b, weights=p, minlength=n_bins)
    return {
        "count": n.tolist(),
        "mean_predicted": [float(pb[i] / n[i]) if n[i] else None for i in range(n_bins)],
        "observed": [float(yb[i] / n[i]) if n[i] else None for i in range(n_bins)],
    }


def adaptive_reliability_bins(y: np.ndarray, p: np.ndarray, min_count: int = 20,
                              max_bins: int = ECE_BINS) -> dict[str, list]:
    """Reliability diagram bins that adapt to N: equal-count (quantile) bins of the predicted probability, as many
    as keep at least ``min_count`` rows per bin (between 1 and ``max_bins``). Rows with equal probabilities
    stay in one bin, so a bin may hold more than N / bins rows.

    Returns per bin: ``count``, ``mean_predicted``, ``observed`` (frequency of y = 1) and the ``edges`` used.
    """
    y = np.asarray(y, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    n_bins = int(np.clip(len(p) // max(min_count, 1), 1, max_bins))
    edges = np.unique(np.quantile(p, np.linspace(0, 1, n_bins + 1))) if len(p) else np.array([0.0, 1.0])
    # right-closed interior edges: each row goes to the first bin whose upper edge is >= p
    b = np.clip(np.searchsorted(edges[1:-1], p, side="left"), 0, max(len(edges) - 2, 0))
    k = max(len(edges) - 1, 1)
    cnt = np.bincount(b, minlength=k)
    yb = np.bincount(b, weights=y, minlength=k)
    pb = np.bincount(b, weights=p, minlength=k)
    keep = cnt > 0
    return {"count": cnt[keep].tolist(), "mean_predicted": (pb[keep] / cnt[keep]).tolist(),
            "observed": (yb[keep] / cnt[keep]).tolist(), "edges": edges.tolist()}


def net_benefit(y: np.ndarray, p: np.ndarray, thresholds: np.ndarray) -> dict[str, np.ndarray]:
    """Decision-curve analysis (Vickers & Elkin 2006) at threshold probabilities ``thresholds`` (K,) in (0, 1).

    Treating when ``p >= pt``: net benefit = TP/n - FP/n * pt / (1 - pt); treat-all = prevalence - (1 -
    prevalence) * pt / (1 - pt); treat-none = 0. Returns (K,) arrays ``model``, ``treat_all``, ``treat_none``.
    """
    y = np.asarray(y, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    pt = np.asarray(thresholds, dtype=np.float64)
    n = len(y)
    odds = pt / (1 - pt)
    pred = p[None, :] >= pt[:, None]
    tp = (pred & (y[None, :] == 1)).sum(axis=1) / n
    fp = (pred & (y[None, :] == 0)).sum(axis=1) / n
    prev = float(y.mean()) if n else float("nan")
    return {"model": tp - fp * odds, "treat_all": prev - (1 - prev) * odds, "treat_none": np.zeros_like(pt)}


def brier(y: np.ndarray, p: np.ndarray, w: np.ndarray | None = None) -> float | None:
    """Weighted mean of (p - y)^2."""
    w = _w(w, len(y))
    return float(np.sum(w * (p - y) ** 2) / w.sum()) if w.sum() > 0 else None


def logit(p: np.ndarray) -> np.ndarray:
    """log(p / (1 - p)) with p clipped to [1e-7, 1 - 1e-7]."""
    p = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1 - _EPS)
    return np.log(p) - np.log1p(-p)


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1 + np.tanh(0.5 * np.asarray(z, dtype=np.float64)))


def nll(y: np.ndarray, p: np.ndarray, w: np.ndarray | None = None) -> float:
    """Weighted mean binary cross-entropy (natural log) of probabilities ``p``."""
    w = _w(w, len(y))
    p = np.clip(p, _EPS, 1 - _EPS)
    return float(-np.sum(w * (y * np.log(p) + (1 - y) * np.log1p(-p))) / w.sum())


def apply_temperature(p: np.ndarray, temperature: float) -> np.ndarray:
    """sigmoid(logit(p) / T)."""
    return sigmoid(logit(p) / temperature)


def fit_temperature(y: np.ndarray, p: np.ndarray) -> float:
    """Temperature T > 0 minimising the NLL of sigmoid(logit(p) / T) on (y, p) (scipy, bounded on log T)."""
    from scipy.optimize import minimize_scalar

    z = logit(p)
    y = np.asarray(y, dtype=np.float64)

    def loss(log_t: float) -> float:
        zt = z / np.exp(log_t)
        # log(1 + e^z) - y z, the stable form of the binary cross-entropy on logits
        return float(np.mean(np.logaddexp(0.0, zt) - y * zt))

    res = minimize_scalar(loss, bounds=(-6.0, 6.0), method="bounded", options={"xatol": 1e-6})
    return float(np.exp(res.x))


# --------------------------------------------------------------------------------------------- regression
def regression_metrics(y: np.ndarray, s: np.ndarray, w: np.ndarray | None = None) -> dict[str, float | None]:
    """MAE, RMSE, R^2 (1 - SSE/SST) and Pearson r, weighted."""
    w = _w(w, len(y))
    tot = w.sum()
    if tot <= 0:
        return {"mae": None, "rmse": None, "r2": None, "pearson_r": None}
    err = s - y
    my, ms = np.sum(w * y) / tot, np.sum(w * s) / tot
    sst = np.sum(w * (y - my) ** 2)
    sss = np.sum(w * (s - ms) ** 2)
    cov = np.sum(w * (y - my) * (s - ms))
    return {
        "mae": float(np.sum(w * np.abs(err)) / tot),
        "rmse": float(np.sqrt(np.sum(w * err**2) / tot)),
        "r2": float(1 - np.sum(w * err**2) / sst) if sst > 0 else None,
        "pearson_r": float(cov / np.sqrt(sst * sss)) if sst > 0 and sss > 0 else None,
    }


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.divide(a, b, out=np.full(np.shape(a), np.nan), where=b > 0)


def binary_metrics_many(rs: RankedScores, y: np.ndarray, s: np.ndarray, threshold: float, W: np.ndarray,
                        at_specificity: Sequence[float] = (), at_sensitivity: Sequence[float] = (),
                        ) -> dict[str, np.ndarray]:
    """Every binary metric of the report for each row of a (B, N) weight matrix: (B,) arrays, NaN = undefined.

    Equals the per-replicate functions (:meth:`RankedScores.auroc_ap`, :func:`threshold_metrics`,
    :func:`expected_calibration_error`, :func:`brier`) row by row; ``rs`` must rank the same (y, s).
    """
    W = np.asarray(W, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    s = np.asarray(s, dtype=np.float64)
    auroc, ap = rs.auroc_ap_many(W)
    pred = s >= threshold
    pos = y == 1
    tp, fp = W @ (pred & pos), W @ (pred & ~pos)
    tn, fn = W @ (~pred & ~pos), W @ (~pred & pos)
    tot = W.sum(axis=1)
    b = np.clip((s * ECE_BINS).astype(np.int64), 0, ECE_BINS - 1)
    onehot = np.zeros((len(s), ECE_BINS))
    onehot[np.arange(len(s)), b] = 1.0
    ece = np.abs(W @ (onehot * y[:, None]) - W @ (onehot * s[:, None])).sum(axis=1)
    out = {"auroc": auroc, "auprc": ap, "sensitivity": _safe_div(tp, tp + fn), "specificity": _safe_div(tn, tn + fp),
           "ppv": _safe_div(tp, tp + fp), "f1": _safe_div(2 * tp, 2 * tp + fp + fn),
           "ece": _safe_div(ece, tot), "brier": _safe_div(W @ (s - y) ** 2, tot)}
    out.update(rs.operating_points_many(W, at_specificity, at_sensitivity))
    return out


def regression_metrics_many(y: np.ndarray, s: np.ndarray, W: np.ndarray) -> dict[str, np.ndarray]:
    """:func:`regression_metrics` for each row of a (B, N) weight matrix: (B,) arrays, NaN = undefined."""
    W = np.asarray(W, dtype=np.float64)
    tot = W.sum(axis=1)
    t = np.where(tot > 0, tot, 1.0)
    err = s - y
    my, ms = (W @ y) / t, (W @ s) / t
    sst = (W * (y[None, :] - my[:, None]) ** 2).sum(axis=1)
    sss = (W * (s[None, :] - ms[:, None]) ** 2).sum(axis=1)
    cov = (W * (y[None, :] - my[:, None]) * (s[None, :] - ms[:, None])).sum(axis=1)
    sse = W @ err**2
    ok = tot > 0
    return {"mae": np.where(ok, (W @ np.abs(err)) / t, np.nan), "rmse": np.where(ok, np.sqrt(sse / t), np.nan),
            "r2": np.where(ok & (sst > 0), 1 - sse / np.where(sst > 0, sst, 1.0), np.nan),
            "pearson_r": np.where(ok & (sst > 0) & (sss > 0), cov / np.sqrt(np.where(sst * sss > 0, sst * sss, 1.0)),
                                  np.nan)}


# --------------------------------------------------------------------------------------------- bootstrap
def patient_bootstrap_weights(keys: Sequence[str], n_boot: int, seed: int = 0) -> Iterator[np.ndarray]:
    """Yield ``n_boot`` row-weight vectors of a patient-level bootstrap.

    Each replicate draws as many patients as there are, with replacement (numpy ``default_rng(seed)``); a row's
    weight is how many times its patient was drawn, so all rows of a patient move together. Deterministic for a
    given seed and key order.
    """
    _, inv = np.unique(np.asarray(keys, dtype=str), return_inverse=True)
    n_pat = int(inv.max()) + 1 if len(inv) else 0
    rng = np.random.default_rng(seed)
    for _ in range(n_boot):
        mult = np.bincount(rng.integers(0, n_pat, n_pat), minlength=n_pat).astype(np.float64)
        yield mult[inv]


def bootstrap_weight_matrices(keys: Sequence[str], n_boot: int, seed: int = 0, strata: np.ndarray | None = None,
                              chunk: int | None = None) -> Iterator[np.ndarray]:
    """Patient-level bootstrap as (b, N) row-weight matrices (``b`` <= ``chunk`` replicates per matrix, ``n_boot``
    in all), optionally stratified.

    ``keys``: (N,) patient key per row. ``strata``: (N,) stratum per row, constant within a patient (a patient's
    first row decides); each replicate then draws, within every stratum, as many patients as it holds, with
    replacement, so stratum sizes are fixed (pROC's stratified bootstrap when the strata are cases/controls).
    A row's weight is how many times its patient was drawn. Deterministic for a seed, keys and strata.
    """
    _, first, inv = np.unique(np.asarray(keys, dtype=str), return_index=True, return_inverse=True)
    inv = inv.reshape(-1)
    n_pat = len(first)
    if strata is None:
        groups = [np.arange(n_pat)]
    else:
        _, sinv = np.unique(np.asarray(strata)[first].astype(str), return_inverse=True)
        groups = [np.nonzero(sinv.reshape(-1) == g)[0] for g in range(int(sinv.max()) + 1)] if n_pat else []
    chunk = chunk or max(1, min(n_boot, 4_000_000 // max(len(inv), 1)))
    rng = np.random.default_rng(seed)
    done = 0
    while done < n_boot:
        b = min(chunk, n_boot - done)
        mult = np.zeros(b * n_pat, dtype=np.float64)
        offs = (np.arange(b) * n_pat)[:, None]
        for g in groups:
            drawn = g[rng.integers(0, len(g), (b, len(g)))]
            mult += np.bincount((drawn + offs).ravel(), minlength=b * n_pat)
        yield mult.reshape(b, n_pat)[:, inv]
        done += b


def percentile_ci(samples: Sequence[float | None], level: float = 0.95) -> list[float] | None:
    """Percentile interval of the defined (non-None, finite) replicate values; None when there are none."""
    v = np.array([x for x in samples if x is not None], dtype=np.float64)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return None
    a = (1 - level) / 2
    return [float(np.quantile(v, a)), float(np.quantile(v, 1 - a))]
