"""evaluate's statistics: DeLong (fast vs the 1988 definition), vectorised bootstrap metrics, stratified resampling,
CI coverage by simulation, the macro interval, unreliable labels, paired comparisons, operating points, decision
curves."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from ecgfm_cli import metrics as M
from ecgfm_cli.evaluate import EvalConfig, Predictions, compare, evaluate_level, report_markdown
from ecgfm_cli.labels import LabelTable
from ecgfm_cli.stats import bootstrap_p, delong, delong_paired


def delong_direct(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DeLong, DeLong & Clarke-Pearson (1988) by the pairwise definition: psi(x, z) = 1, 1/2, 0; placement values
    V10 (per positive) and V01 (per negative); covariance S10/m + S01/n. O(m n k)."""
    x, z = scores[y == 1], scores[y == 0]
    m, n = len(x), len(z)
    psi = (x[:, None, :] > z[None, :, :]) + 0.5 * (x[:, None, :] == z[None, :, :])  # (m, n, k)
    v10, v01 = psi.mean(axis=1), psi.mean(axis=0)
    auc = psi.mean(axis=(0, 1))
    return auc, np.cov(v10, rowvar=False) / m + np.cov(v01, rowvar=False) / n


def test_fast_delong_equals_the_pairwise_definition_with_ties():
    rng = np.random.default_rng(0)
    for trial in range(20):
        n = int(rng.integers(8, 60))
        y = rng.integers(0, 2, n)
        if y.min() == y.max():
            continue
        s = np.column_stack([np.round(rng.random(n) + 0.5 * y, 1), np.round(rng.random(n), 1 if trial % 2 else 3),
                             rng.random(n) + y])
        fast = delong(y, s)
        auc, cov = delong_direct(y, s)
        assert fast.auc == pytest.approx(auc, abs=1e-12)
        assert fast.cov == pytest.approx(cov, abs=1e-12)
        assert fast.auc[0] == pytest.approx(roc_auc_score(y, s[:, 0]))
    # the paired test: identical scores have no variance of the difference; a clearly better model a tiny p
    y = np.r_[np.zeros(50), np.ones(50)]
    good, bad = y + rng.normal(0, 0.5, 100), y + rng.normal(0, 3, 100)
    assert delong_paired(y, good, good)["p"] is None
    r = delong_paired(y, good, bad)
    assert r["diff"] > 0.1 and r["p"] < 0.01


def test_vectorised_metrics_equal_the_per_replicate_functions():
    rng = np.random.default_rng(1)
    n = 120
    y = rng.integers(0, 2, n).astype(float)
    s = np.clip(np.round(0.3 * y + rng.random(n) * 0.7, 2), 0, 1)
    W = rng.integers(0, 3, (7, n)).astype(float)
    rs = M.RankedScores(y, s)
    many = M.binary_metrics_many(rs, y, s, 0.5, W, (0.8,), (0.7,))
    for b in range(len(W)):
        w = W[b]
        a, ap = rs.auroc_ap(w)
        assert many["auroc"][b] == pytest.approx(a) and many["auprc"][b] == pytest.approx(ap)
        tm = M.threshold_metrics(y, s, 0.5, w)
        for k, v in tm.items():
            assert many[k][b] == pytest.approx(v)
        assert many["ece"][b] == pytest.approx(M.expected_calibration_error(y, s, w))
        assert many["brier"][b] == pytest.approx(M.brier(y, s, w))
        # brute force operating points on the duplicated rows
        idx = np.repeat(np.arange(n), w.astype(int))
        yy, ss = y[idx], s[idx]
        best_sens, best_spec = 0.0, 0.0
        for t in np.r_[np.unique(ss), np.inf]:
            pred = ss >= t
            sens, spec = pred[yy == 1].mean(), (~pred[yy == 0]).mean()
            if spec >= 0.8:
                best_sens = max(best_sens, sens)
            if sens >= 0.7:
                best_spec = max(best_spec, spec)
        assert many["sens_at_spec_0.8"][b] == pytest.approx(best_sens)
        assert many["spec_at_sens_0.7"][b] == pytest.approx(best_spec)
    reg = M.regression_metrics_many(y, s, W)
    for b in range(len(W)):
        for k, v in M.regression_metrics(y, s, W[b]).items():
            assert reg[k][b] == pytest.approx(v)


def test_stratified_bootstrap_keeps_patients_together_and_stratum_sizes():
    keys = np.array(["a", "a", "b", "c", "c", "d", "e"])
    strata = np.array([1, 1, 0, 0, 0, 1, 0])
    mats = list(M.bootstrap_weight_matrices(keys, 50, seed=3, strata=strata, chunk=16))
    assert [len(m) for m in mats] == [16, 16, 16, 2]
    W = np.vstack(mats)
    assert (W[:, 0] == W[:, 1]).all() and (W[:, 3] == W[:, 4]).all()
    # stratum 1 holds patients a, d: exactly 2 draws each replicate; stratum 0 (b, c, e): 3
    assert (W[:, 0] + W[:, 5] == 2).all() and (W[:, 2] + W[:, 3] + W[:, 6] == 3).all()
    W2 = np.vstack(list(M.bootstrap_weight_matrices(keys, 50, seed=3, strata=strata, chunk=16)))
    assert (W == W2).all()


def _coverage(n_pos: int, n_neg: int, d: float, reps: int, n_boot: int, seed: int) -> float:
    """Share of reps whose 95 % interval of evaluate_level covers the true binormal AUROC Phi(d / sqrt 2)."""
    truth = norm.cdf(d / np.sqrt(2))
    rng = np.random.default_rng(seed)
    cfg = EvalConfig(n_boot=n_boot, at_specificity=(), at_sensitivity=(), dca_thresholds=(), seed=seed)
    y = np.r_[np.ones(n_pos), np.zeros(n_neg)][:, None]
    keys = np.array([f"p{i}" for i in range(n_pos + n_neg)], dtype=object)
    hits = 0
    for r in range(reps):
        s = np.r_[rng.normal(d, 1, n_pos), rng.normal(0, 1, n_neg)]
        p = 1 / (1 + np.exp(-s))
        cfg.seed = r
        res, _ = evaluate_level(y, p[:, None], None, keys, ["X"], {"X": "binary"}, cfg)
        lo, hi = res["labels"]["X"]["auroc"]["ci"]
        hits += lo <= truth <= hi
    return hits / reps


def test_auroc_interval_covers_the_truth_about_95_percent():
    cov = _coverage(n_pos=30, n_neg=70, d=1.2, reps=300, n_boot=300, seed=0)
    assert 0.90 <= cov <= 0.99, cov


def _rare_label_level(seed: int = 0):
    """200 patients: a common label, and a rare one with a single positive patient."""
    rng = np.random.default_rng(seed)
    n = 200
    common = (rng.random(n) < 0.3).astype(float)
    rare = np.zeros(n)
    rare[7] = 1.0
    s_common = np.clip(0.35 * common + 0.65 * rng.random(n), 0, 1)
    s_rare = rng.random(n) * 0.5
    s_rare[7] = 0.45  # ranked among the top ~10 %: AP with one copy ~0.1, higher when drawn twice
    keys = np.array([f"p{i}" for i in range(n)], dtype=object)
    return np.column_stack([common, rare]), np.column_stack([s_common, s_rare]), keys


def test_macro_interval_contains_its_point_and_rare_labels_are_named_unreliable():
    y, s, keys = _rare_label_level()
    cfg = EvalConfig(n_boot=400, seed=0)
    res, _ = evaluate_level(y, s, None, keys, ["common", "rare"], {"common": "binary", "rare": "binary"}, cfg)
    rare = res["labels"]["rare"]
    assert rare["reliable"] is False and rare["n_pos_patients"] == 1
    assert "only 1 positive patient" in rare["unreliable_reason"]
    # every resample keeps the rare label defined (stratified), and the macro is over the reliable label only
    assert rare["auprc"]["n_boot_defined"] == 400
    for k in ("auroc", "auprc"):
        mac = res["macro"][k]
        assert mac["labels"] == ["common"] and mac["labels_excluded"] == ["rare"]
        lo, hi = mac["ci"]
        assert lo < mac["value"] < hi and mac["n_boot_defined"] == 400
        # not at an edge: the point sits well inside its interval
        assert min(mac["value"] - lo, hi - mac["value"]) > 0.2 * (hi - lo)
    md = report_markdown({"evaluated_split": "all", "settings": {"bootstrap": 400, "ci_level": 0.95},
                          "levels": {"record": res}, "exclusions": {"unknown_record_id_rows": 0,
                                                                    "prediction_labels_not_in_labels": []}})
    assert "⚠ unreliable (1 pos. / 199 neg. patients)" in md and "left out: rare (fewer than the positive" in md


def test_macro_with_two_reliable_labels_covers_the_truth():
    """Two labels with known AUROCs, one of them rare-ish (8 % prevalence): the macro interval covers the mean of
    the true AUROCs in about 95 % of repetitions."""
    rng = np.random.default_rng(5)
    n, reps, d1, d2 = 150, 200, 1.0, 1.6
    truth = (norm.cdf(d1 / np.sqrt(2)) + norm.cdf(d2 / np.sqrt(2))) / 2
    keys = np.array([f"p{i}" for i in range(n)], dtype=object)
    y1 = np.r_[np.ones(60), np.zeros(n - 60)]
    y2 = np.r_[np.zeros(n - 12), np.ones(12)]
    y = np.column_stack([y1, y2])
    cfg = EvalConfig(n_boot=250, at_specificity=(), at_sensitivity=(), dca_thresholds=())
    hits = 0
    for r in range(reps):
        s = np.column_stack([rng.normal(d1 * y1, 1), rng.normal(d2 * y2, 1)])
        cfg.seed = r
        res, _ = evaluate_level(y, 1 / (1 + np.exp(-s)), None, keys, ["a", "b"], {"a": "binary", "b": "binary"},
                                cfg)
        lo, hi = res["macro"]["auroc"]["ci"]
        hits += lo <= truth <= hi
    assert 0.88 <= hits / reps <= 0.99, hits / reps


def test_paired_comparison_counts_the_intersection_and_detects_a_better_model():
    rng = np.random.default_rng(2)
    n = 240
    rid = np.array([f"r{i}" for i in range(n)], dtype=object)
    y = (rng.random(n) < 0.35).astype(float)
    good = np.clip(0.6 * y + 0.4 * rng.random(n), 0, 1)
    bad = rng.random(n)
    split = np.array(["test"] * n, dtype=object)
    lt = LabelTable(record_ids=rid, labels=["AF"], values=y[:, None], kinds={"AF": "binary"})
    model = Predictions(rid, good[:, None], ["AF"], None, np.full(n, -1), split)
    keep = np.arange(20, n)  # the baseline lacks 20 records and has 5 extra
    b_rid = np.r_[rid[keep], np.array([f"x{i}" for i in range(5)], dtype=object)]
    base = Predictions(b_rid, np.r_[bad[keep], rng.random(5)][:, None], ["AF"], None, np.full(len(b_rid), -1),
                       np.array(["test"] * len(b_rid), dtype=object))
    logs: list[str] = []
    out = compare(model, base, lt, EvalConfig(n_boot=300), log=logs.append)
    c = out["counts"]
    assert (c["model_rows"], c["baseline_rows"], c["common_rows"]) == (240, 225, 220)
    assert any("220 of 240 model rows and 225 baseline rows" in x for x in logs)
    e = out["levels"]["record"]["labels"]["AF"]
    m = np.arange(n) >= 20
    assert e["auroc"]["diff"] == pytest.approx(roc_auc_score(y[m], good[m]) - roc_auc_score(y[m], bad[m]))
    assert e["auroc"]["p_delong"] < 1e-4 and e["auroc"]["p_bootstrap"] < 0.01
    lo, hi = e["auroc"]["ci"]
    assert 0 < lo < e["auroc"]["diff"] < hi
    assert out["levels"]["record"]["macro"]["auroc"]["diff"] == pytest.approx(e["auroc"]["diff"])
    # the same model against itself: no difference
    same = compare(model, model, lt, EvalConfig(n_boot=100))["levels"]["record"]["labels"]["AF"]
    assert same["auroc"]["diff"] == 0 and same["auroc"]["p_delong"] is None and same["auroc"]["ci"] == [0, 0]


def test_bootstrap_p():
    assert bootstrap_p(np.r_[np.ones(99), -1.0]) == pytest.approx(0.02)
    assert bootstrap_p(np.zeros(10)) == 1.0 and bootstrap_p(np.array([np.nan])) is None


def test_net_benefit_by_hand():
    y = np.array([1, 1, 0, 0, 0, 1.0])
    p = np.array([0.9, 0.4, 0.6, 0.1, 0.2, 0.3])
    nb = M.net_benefit(y, p, np.array([0.25, 0.5]))
    # pt 0.25: treated 0.9, 0.4, 0.6, 0.3 -> TP 3, FP 1; 3/6 - 1/6 * 1/3
    assert nb["model"][0] == pytest.approx(3 / 6 - 1 / 6 / 3)
    assert nb["model"][1] == pytest.approx(1 / 6 - 1 / 6)  # 0.9 and 0.6 treated
    assert nb["treat_all"][1] == pytest.approx(0.5 - 0.5)
    assert (nb["treat_none"] == 0).all()


def test_adaptive_reliability_bins_keep_a_minimum_count():
    rng = np.random.default_rng(4)
    for n in (15, 70, 1000):
        p = rng.random(n)
        y = (rng.random(n) < p).astype(float)
        rb = M.adaptive_reliability_bins(y, p, min_count=20)
        assert sum(rb["count"]) == n
        assert len(rb["count"]) == max(1, min(15, n // 20))
        if n >= 20:
            assert min(rb["count"]) >= 19  # quantile bins: equal counts up to one row
