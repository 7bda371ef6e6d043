"""Clustered AUROC variance (Obuchowski 1997): against the paper's formulas computed pairwise, against plain DeLong
with one row per cluster, against a cluster bootstrap, and against the true sampling variance by simulation."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from ecgfm_cli import metrics as M
from ecgfm_cli.stats import auc_gap, auc_influence, clustered_delong, delong, delong_paired, mean_influence


def clustered_data(rng: np.random.Generator, n_pat: int = 150, mean_rows: float = 2.5, label_icc: float = 0.9,
                   patient_sd: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Patients with 1 + Poisson(mean_rows - 1) rows each (repeat ECGs, segments); a row keeps its patient's
    condition with probability ``label_icc``; score = label + a patient effect N(0, patient_sd) + row noise
    N(0, 0.5) (a second column: another model, half of the same patient effect). Returns (y (N,), s (N, 2),
    cluster keys (N,))."""
    rows = 1 + rng.poisson(mean_rows - 1, n_pat)
    pat = np.repeat(np.arange(n_pat), rows)
    cond = rng.random(n_pat) < 0.3
    y = np.where(rng.random(len(pat)) < label_icc, cond[pat], ~cond[pat]).astype(float)
    u = rng.normal(0, patient_sd, n_pat)[pat]
    s1 = y + u + rng.normal(0, 0.5, len(pat))
    s2 = 0.8 * y + 0.5 * u + rng.normal(0, 0.8, len(pat))
    return y, np.column_stack([s1, s2]), np.array([f"p{p}" for p in pat], dtype=object)


def obuchowski_direct(y: np.ndarray, s: np.ndarray, clusters: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Obuchowski (1997) as written: psi over every positive-negative pair (within clusters too), structural
    components V10(X_ij) = mean over the negatives of psi, V01(Y_ij) = mean over the positives, summed per cluster;
    S10, S01, S11 per pair of modalities r, s; cov_rs = S10/M + S01/N + (S11_rs + S11_sr)/(M N). O(M N k)."""
    x, z = s[y == 1], s[y == 0]
    cx, cz = clusters[y == 1], clusters[y == 0]
    m, n = len(x), len(z)
    psi = (x[:, None, :] > z[None, :, :]) + 0.5 * (x[:, None, :] == z[None, :, :])  # (M, N, k)
    auc = psi.mean(axis=(0, 1))
    v10, v01 = psi.mean(axis=1), psi.mean(axis=0)
    ids = sorted(set(clusters))
    n_cl = len(ids)
    a = np.array([v10[cx == i].sum(axis=0) - (cx == i).sum() * auc for i in ids])  # (I, k)
    b = np.array([v01[cz == i].sum(axis=0) - (cz == i).sum() * auc for i in ids])
    s10 = n_cl / ((n_cl - 1) * m) * a.T @ a
    s01 = n_cl / ((n_cl - 1) * n) * b.T @ b
    s11 = n_cl / (n_cl - 1) * a.T @ b
    return auc, s10 / m + s01 / n + (s11 + s11.T) / (m * n)


def test_clustered_covariance_equals_the_papers_formulas_with_ties():
    rng = np.random.default_rng(0)
    for trial in range(12):
        y, s, c = clustered_data(rng, n_pat=int(rng.integers(6, 40)))
        if y.min() == y.max():
            continue
        s = np.round(s, 0 if trial % 3 == 0 else 2)  # ties within and across clusters
        r = clustered_delong(y, s, c)
        auc, cov = obuchowski_direct(y, s, c)
        assert r.method == "obuchowski" and r.n_clusters == len(set(c))
        assert r.auc == pytest.approx(auc, abs=1e-12)
        assert r.cov == pytest.approx(cov, abs=1e-12)
        # one column's influence terms give the same variance
        inf = auc_influence(y, s[:, 0], c)
        assert inf.var == pytest.approx(cov[0, 0], abs=1e-12) and inf.method == "obuchowski"


def test_one_row_per_cluster_is_plain_delong():
    rng = np.random.default_rng(1)
    n = 80
    y = (rng.random(n) < 0.35).astype(float)
    s = np.column_stack([y + rng.normal(0, 1, n), np.round(y + rng.normal(0, 2, n), 1)])
    keys = np.array([f"record:{i}" for i in range(n)], dtype=object)
    plain, clus = delong(y, s), clustered_delong(y, s, keys)
    assert clus.method == "delong" and clus.n_clusters == n
    assert np.abs(clus.cov - plain.cov).max() < 1e-12 and np.abs(clus.auc - plain.auc).max() < 1e-12
    assert delong_paired(y, s[:, 0], s[:, 1], keys)["p"] == pytest.approx(delong_paired(y, s[:, 0], s[:, 1])["p"],
                                                                         abs=1e-12)
    # Obuchowski's formula itself, on singleton clusters, is DeLong's up to its small-sample factor only:
    # I/(I-1) sum z^2 with I = M + N, against S10/M + S01/N with S10, S01 divided by M-1, N-1
    _, cov = obuchowski_direct(y, s, keys)
    m, k = int(y.sum()), n - int(y.sum())
    x, z = s[y == 1], s[y == 0]
    psi = (x[:, None, :] > z[None, :, :]) + 0.5 * (x[:, None, :] == z[None, :, :])
    s10, s01 = np.cov(psi.mean(axis=1), rowvar=False), np.cov(psi.mean(axis=0), rowvar=False)
    assert cov == pytest.approx(n / (n - 1) * ((m - 1) / m * s10 / m + (k - 1) / k * s01 / k), abs=1e-12)


def cluster_bootstrap(y: np.ndarray, s: np.ndarray, c: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """AUROCs (n_boot, k) of a patient bootstrap: patients drawn with replacement, all their rows together (as row
    weights; the weighted trapezoidal AUROC of evaluate's bootstrap, checked against scikit-learn in
    test_evaluate_stats.py)."""
    ids, inv = np.unique(c.astype(str), return_inverse=True)
    rng = np.random.default_rng(seed)
    W = np.stack([np.bincount(rng.integers(0, len(ids), len(ids)), minlength=len(ids))[inv] for _ in range(n_boot)])
    return np.column_stack([M.RankedScores(y, s[:, j]).auroc_ap_many(W.astype(float))[0] for j in range(s.shape[1])])


def test_clustered_variance_agrees_with_a_cluster_bootstrap():
    rng = np.random.default_rng(2)
    y, s, c = clustered_data(rng, n_pat=200)
    r = clustered_delong(y, s, c)
    n_boot = 2000
    reps = cluster_bootstrap(y, s, c, n_boot, seed=3)
    boot_cov = np.cov(reps, rowvar=False)
    # Monte-Carlo error of a bootstrap variance: relative sd about sqrt(2 / (B - 1)) = 3.2 %; 4 sd, plus the
    # bootstrap's own (I-1)/I against Obuchowski's I/(I-1)
    tol = 4 * np.sqrt(2 / (n_boot - 1)) + 2 / r.n_clusters
    for j in range(2):
        assert boot_cov[j, j] / r.cov[j, j] == pytest.approx(1, abs=tol)
    diff_boot = np.var(reps[:, 0] - reps[:, 1], ddof=1)
    diff_clus = r.cov[0, 0] + r.cov[1, 1] - 2 * r.cov[0, 1]
    assert diff_boot / diff_clus == pytest.approx(1, abs=tol)
    # ... while plain DeLong is far too small on these strongly correlated patients
    plain = delong(y, s)
    assert plain.cov[0, 0] < 0.75 * boot_cov[0, 0]
    dp, cp = delong_paired(y, s[:, 0], s[:, 1]), delong_paired(y, s[:, 0], s[:, 1], c)
    assert cp["method"] == "obuchowski" and cp["n_clusters"] == 200 and dp["method"] == "delong"
    assert cp["se"] == pytest.approx(np.sqrt(diff_clus)) and cp["diff"] == pytest.approx(dp["diff"])
    lo, hi = cp["ci"]
    assert hi - lo == pytest.approx(2 * 1.959964 * cp["se"], rel=1e-5)


def test_clustered_interval_is_wider_than_delong_and_covers_at_the_nominal_rate():
    """Strongly correlated clusters, many simulated studies: Obuchowski's variance matches the true variance of
    the AUROC across studies, DeLong's falls well short, and the clustered 95 % interval is wider."""
    rng = np.random.default_rng(4)
    design = {"mean_rows": 4, "patient_sd": 1.5}
    y, s, _ = clustered_data(rng, n_pat=40_000, **design)
    true_auc = roc_auc_score(y, s[:, 0])  # the population AUROC, to about 0.002
    aucs, var_c, var_d = [], [], []
    for _ in range(400):
        y, s, c = clustered_data(rng, n_pat=60, **design)
        aucs.append(roc_auc_score(y, s[:, 0]))
        var_c.append(clustered_delong(y, s[:, 0], c).cov[0, 0])
        var_d.append(delong(y, s[:, 0]).cov[0, 0])
    aucs, var_c, var_d = np.array(aucs), np.array(var_c), np.array(var_d)
    true_var = np.var(aucs, ddof=1)
    # sd of a variance from 400 studies: about sqrt(2/399) = 7 %
    assert np.mean(var_c) / true_var == pytest.approx(1, abs=0.2)
    assert np.mean(var_d) / true_var < 0.6
    assert np.all(var_c > var_d)
    cover_c = np.mean(np.abs(aucs - true_auc) <= 1.959964 * np.sqrt(var_c))
    cover_d = np.mean(np.abs(aucs - true_auc) <= 1.959964 * np.sqrt(var_d))
    assert 0.91 <= cover_c <= 0.99 and cover_d < 0.88  # binomial sd of a coverage from 400 studies: 1.1 %


def test_gap_of_two_groups_independent_or_sharing_patients():
    rng = np.random.default_rng(5)
    y, s, c = clustered_data(rng, n_pat=120)
    g = np.array([int(k[1:]) % 2 for k in c])  # disjoint patients
    a, b = auc_influence(y[g == 0], s[g == 0, 0], c[g == 0]), auc_influence(y[g == 1], s[g == 1, 0], c[g == 1])
    gap = auc_gap(a, b)
    assert gap["shared_clusters"] == 0 and gap["method"] == "obuchowski"
    assert gap["se"] == pytest.approx(np.sqrt(a.var + b.var))
    assert gap["diff"] == pytest.approx(roc_auc_score(y[g == 0], s[g == 0, 0]) - roc_auc_score(y[g == 1], s[g == 1, 0]))
    lo, hi = gap["ci"]
    assert lo < gap["diff"] < hi and hi - lo == pytest.approx(2 * 1.959964 * gap["se"], rel=1e-5)
    # one row per patient: DeLong in each group, the variances summed
    first = np.unique(c, return_index=True)[1]
    y1, s1, c1, g1 = y[first], s[first, 0], c[first], g[first]
    a1, b1 = auc_influence(y1[g1 == 0], s1[g1 == 0], c1[g1 == 0]), auc_influence(y1[g1 == 1], s1[g1 == 1], c1[g1 == 1])
    gap1 = auc_gap(a1, b1)
    assert gap1["method"] == "delong"
    assert gap1["se"] ** 2 == pytest.approx(delong(y1[g1 == 0], s1[g1 == 0]).cov[0, 0]
                                            + delong(y1[g1 == 1], s1[g1 == 1]).cov[0, 0], rel=1e-12)
    # groups of rows sharing patients (a patient's records in two age bands): the covariance through the shared
    # patients enters; equal to the clustered variance of the difference computed directly on stacked rows
    h = rng.random(len(y)) < 0.5
    a2, b2 = auc_influence(y[h], s[h, 0], c[h]), auc_influence(y[~h], s[~h, 0], c[~h])
    gap2 = auc_gap(a2, b2)
    assert gap2["shared_clusters"] > 0 and gap2["method"] == "obuchowski"
    ids = sorted(set(c))
    za = np.array([a2.z[a2.keys == i].sum() for i in ids])
    zb = np.array([b2.z[b2.keys == i].sum() for i in ids])
    assert gap2["se"] ** 2 == pytest.approx(len(ids) / (len(ids) - 1) * np.sum((za - zb) ** 2), rel=1e-12)
    # the same scores in both halves of each patient: a positive covariance makes the gap's variance smaller
    # than the sum of the two variances
    assert gap2["se"] ** 2 < a2.var + b2.var


def test_macro_influence_is_the_clustered_variance_of_the_mean():
    rng = np.random.default_rng(6)
    y, s, c = clustered_data(rng, n_pat=150)
    y2 = np.where(rng.random(len(y)) < 0.2, 1 - y, y)  # a second, correlated label on the same rows
    parts = [auc_influence(y, s[:, 0], c), auc_influence(y2, s[:, 1], c)]
    mac = mean_influence(parts)
    assert mac.auc == pytest.approx((roc_auc_score(y, s[:, 0]) + roc_auc_score(y2, s[:, 1])) / 2)
    ids, inv = np.unique(c.astype(str), return_inverse=True)
    boot = np.random.default_rng(7)
    W = np.stack([np.bincount(boot.integers(0, len(ids), len(ids)), minlength=len(ids))[inv]
                  for _ in range(1500)]).astype(float)
    reps = (M.RankedScores(y, s[:, 0]).auroc_ap_many(W)[0] + M.RankedScores(y2, s[:, 1]).auroc_ap_many(W)[0]) / 2
    assert np.var(reps, ddof=1) / mac.var == pytest.approx(1, abs=4 * np.sqrt(2 / 1499) + 2 / len(ids))
    assert mean_influence(parts[:1]) is parts[0]


def test_gap_of_two_groups_of_one_same_patient_has_no_interval():
    # --min-subgroup 1, a patient's records in two groups and nobody else's: one cluster, no variance
    y, s, c = np.array([0, 1, 0, 1]), np.array([0.1, 0.9, 0.3, 0.6]), np.array(["p1"] * 4)
    gap = auc_gap(auc_influence(y[:2], s[:2], c[:2]), auc_influence(y[2:], s[2:], c[2:]))
    assert gap["shared_clusters"] == 1 and gap["n_clusters"] == 1
    assert gap["diff"] == 0.0 and gap["se"] is None and gap["ci"] is None and gap["p"] is None
