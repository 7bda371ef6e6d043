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


def percentile_ci(samples: Sequence[float | None], level: float = 0.95) -> list[float] | None:
    """Percentile interval of the defined (non-None, finite) replicate values; None when there are none."""
    v = np.array([x for x in samples if x is not None], dtype=np.float64)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return None
    a = (1 - level) / 2
    return [float(np.quantile(v, a)), float(np.quantile(v, 1 - a))]
