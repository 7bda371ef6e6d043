"""Intervals and p-values of the subgroup AUROC gaps, and the clustered DeLong of the paired comparison, through
evaluate's functions and the command line."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_evaluate import _app
from typer.testing import CliRunner

from ecgfm_cli.evaluate import EvalConfig, LevelData, Predictions, compare, delong_note, evaluate_subgroups
from ecgfm_cli.labels import LabelTable
from ecgfm_cli.stats import clustered_delong, delong


def patients(rng: np.random.Generator, n_pat: int, rows: int, strength_m: float = 1.0, strength_f: float = 1.0,
             patient_sd: float = 1.0) -> dict[str, np.ndarray]:
    """``rows`` rows per patient (segments of one record, repeat ECGs); sex per patient; label mostly constant in
    a patient; AF score = strength (per sex) x label + patient effect + noise; a second label BBB, scored alike.
    Returns y, s (N, 2), keys, rid, sex (N,)."""
    pat = np.repeat(np.arange(n_pat), rows)
    sex = np.where(np.arange(n_pat) % 2 == 0, "F", "M")[pat].astype(object)
    strength = np.where(sex == "F", strength_f, strength_m)
    y = np.empty((len(pat), 2))
    s = np.empty((len(pat), 2))
    for j in range(2):
        cond = rng.random(n_pat) < 0.35
        y[:, j] = np.where(rng.random(len(pat)) < 0.9, cond[pat], ~cond[pat])
        s[:, j] = strength * y[:, j] + rng.normal(0, patient_sd, n_pat)[pat] + rng.normal(0, 0.5, len(pat))
    keys = np.array([f"patient:{p}" for p in pat], dtype=object)
    rid = np.array([f"r{p}-{i % rows}" for i, p in enumerate(pat)], dtype=object)
    return {"y": y, "s": s, "keys": keys, "rid": rid, "sex": sex}


def sex_gaps(data: dict[str, np.ndarray], n_boot: int = 0) -> dict:
    d = LevelData(data["y"], data["s"], None, data["keys"], data["rid"])
    cfg = EvalConfig(n_boot=n_boot, min_subgroup=5, min_positives=3)
    return evaluate_subgroups(d, {"sex": data["sex"]}, ["AF", "BBB"], {"AF": "binary", "BBB": "binary"}, cfg)["sex"]


def test_gap_interval_uses_the_clustered_variance_of_each_group():
    rng = np.random.default_rng(0)
    data = patients(rng, 160, rows=3, strength_f=2.5, strength_m=0.7)
    out = sex_gaps(data)
    gap = out["auroc_gaps"]["AF"]
    assert gap["highest"] == "F" and gap["lowest"] == "M"
    f, m = data["sex"] == "F", data["sex"] == "M"
    var = [clustered_delong(data["y"][g, 0], data["s"][g, 0], data["keys"][g]) for g in (f, m)]
    assert all(v.method == "obuchowski" for v in var)
    assert gap["gap"] == pytest.approx(var[0].auc[0] - var[1].auc[0], abs=1e-12)
    assert gap["se"] == pytest.approx(np.sqrt(var[0].cov[0, 0] + var[1].cov[0, 0]), rel=1e-12)
    assert gap["variance"] == "obuchowski" and gap["n_clusters"] == 160 and gap["shared_clusters"] == 0
    assert gap["ci"][0] > 0 and gap["excludes_zero"] and gap["p"] < 0.001
    assert gap["p_bonferroni"] == pytest.approx(gap["p"])  # two groups: one pair
    # wider than the plain DeLong interval, which treats the 3 rows of a patient as independent
    plain = np.sqrt(sum(delong(data["y"][g, 0], data["s"][g, 0]).cov[0, 0] for g in (f, m)))
    assert gap["se"] > 1.2 * plain
    # the macro gap has one too (its labels share rows: clustered)
    mac = out["auroc_gaps"]["macro"]
    assert mac["ci"] is not None and mac["variance"] == "obuchowski"
    assert mac["gap"] == pytest.approx(out["groups"]["F"]["macro"]["auroc"]["value"]
                                       - out["groups"]["M"]["macro"]["auroc"]["value"])
    assert out["largest_gap"]["label"] in ("AF", "BBB") and "ci" in out["largest_gap"]


def test_one_row_per_patient_gap_is_plain_delong_and_a_patient_in_two_groups_is_covaried():
    rng = np.random.default_rng(1)
    data = patients(rng, 300, rows=1)
    gap = sex_gaps(data)["auroc_gaps"]["AF"]
    f, m = data["sex"] == "F", data["sex"] == "M"
    assert gap["variance"] == "delong" and gap["n_clusters"] == 300
    assert gap["se"] == pytest.approx(np.sqrt(sum(delong(data["y"][g, 0], data["s"][g, 0]).cov[0, 0]
                                                  for g in (f, m))), rel=1e-12)
    # the groups are of rows, not patients (age bands of repeat ECGs): a patient's rows in both groups
    data = patients(rng, 150, rows=4)
    data["sex"] = np.where(np.arange(len(data["keys"])) % 4 < 2, "F", "M").astype(object)
    gap = sex_gaps(data)["auroc_gaps"]["AF"]
    assert gap["shared_clusters"] == 150 and gap["variance"] == "obuchowski" and gap["ci"] is not None


def test_gap_interval_is_calibrated_under_no_difference():
    """Equal AUROCs in both groups, strongly clustered rows: the clustered 95 % interval of the gap excludes 0 in
    about 5 % of studies (binomial sd 1.5 % over 200); plain DeLong's would far more often."""
    rng = np.random.default_rng(2)
    excl, naive = [], []
    for _ in range(200):
        data = patients(rng, 60, rows=4, patient_sd=1.5)
        gap = sex_gaps(data)["auroc_gaps"]["AF"]
        excl.append(gap["excludes_zero"])
        f, m = data["sex"] == "F", data["sex"] == "M"
        se = np.sqrt(sum(delong(data["y"][g, 0], data["s"][g, 0]).cov[0, 0] for g in (f, m)))
        naive.append(abs(gap["gap"]) > 1.959964 * se)
    assert np.mean(excl) <= 0.09 and np.mean(naive) > 0.15


def test_tied_groups_are_two_distinct_groups():
    """Two groups with the same AUROC: the gap is between two groups, never a group and itself."""
    y = np.tile([0.0, 1.0], 60)
    s = y * 0.5 + 0.25
    keys = np.array([f"p{i}" for i in range(120)], dtype=object)
    sex = np.where(np.arange(120) < 60, "F", "M").astype(object)
    d = LevelData(y[:, None], s[:, None], None, keys, keys)
    gap = evaluate_subgroups(d, {"sex": sex}, ["AF"], {"AF": "binary"}, EvalConfig(n_boot=0))["sex"]["auroc_gaps"]
    assert gap["AF"]["gap"] == 0 and {gap["AF"]["highest"], gap["AF"]["lowest"]} == {"F", "M"}
    assert gap["AF"]["ci"] is None and gap["AF"]["excludes_zero"] is False  # both AUROCs 1: no variance


def test_paired_comparison_clusters_the_segments_of_a_patient():
    rng = np.random.default_rng(3)
    data = patients(rng, 120, rows=3)
    pid = np.array([k.removeprefix("patient:") for k in data["keys"]], dtype=object)
    rid = np.array([f"r{p}" for p in pid], dtype=object)  # one record per patient, 3 segments
    seg = np.tile(np.arange(3), 120)
    base = data["s"] + rng.normal(0, 1.5, data["s"].shape)
    model = Predictions(rid, data["s"], ["AF", "BBB"], pid, seg)
    baseline = Predictions(rid, base, ["AF", "BBB"], pid, seg)
    recs = np.unique(rid)
    first = np.unique(rid, return_index=True)[1]
    labels = LabelTable(recs.astype(object), ["AF", "BBB"], data["y"][first], {"AF": "binary", "BBB": "binary"})
    comp = compare(model, baseline, labels, EvalConfig(n_boot=0, aggregate=True))
    seg_af = comp["levels"]["segment"]["labels"]["AF"]["auroc"]
    rec_af = comp["levels"]["record"]["labels"]["AF"]["auroc"]
    assert seg_af["delong_method"] == "obuchowski" and seg_af["n_clusters"] == 120
    assert rec_af["delong_method"] == "delong" and rec_af["n_clusters"] == 120
    lo, hi = seg_af["ci_delong"]
    assert lo < seg_af["diff"] < hi
    assert delong_note(comp["levels"]["segment"]) == ("DeLong p: clustered by patient (Obuchowski 1997; 120 patients, "
                                                      "some with several rows) for 2 labels.")
    assert delong_note(comp["levels"]["record"]) == "DeLong p: plain DeLong (one row per patient; 120 rows) for " \
                                                    "2 labels."


def test_cli_reports_gap_intervals(tmp_path):
    rng = np.random.default_rng(4)
    data = patients(rng, 120, rows=2, strength_f=2.5, strength_m=0.5)
    pid = np.array([k.removeprefix("patient:") for k in data["keys"]], dtype=object)
    pq.write_table(pa.table({"record_id": data["rid"].tolist(), "patient_id": pid.tolist(),
                             "sex": data["sex"].tolist(), "AF": data["s"][:, 0], "BBB": data["s"][:, 1]}),
                   tmp_path / "p.parquet")
    pq.write_table(pa.table({"record_id": data["rid"].tolist(), "AF": data["y"][:, 0], "BBB": data["y"][:, 1]}),
                   tmp_path / "labels.parquet")
    res = CliRunner().invoke(_app(), ["evaluate", str(tmp_path / "p.parquet"), "--labels",
                                      str(tmp_path / "labels.parquet"), "--bootstrap", "0", "--subgroups", "sex",
                                      "-o", str(tmp_path / "r.json")])
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "r.json").read_text())
    gap = rep["levels"]["record"]["subgroups"]["sex"]["auroc_gaps"]["AF"]
    assert gap["variance"] == "obuchowski" and gap["excludes_zero"] and gap["n_clusters"] == 120
    assert (f"| AF | {gap['gap']:.3f} [{gap['ci'][0]:+.3f}, {gap['ci'][1]:+.3f}] * | <0.001 | M "
            f"{gap['lowest_value']:.3f} | F {gap['highest_value']:.3f} |") in res.output
    assert "Obuchowski's clustered variance where a patient has several rows" in res.output
    assert "* the interval excludes 0" in res.output
    # the reviewer's report (report.py) holds the same table and note
    res = CliRunner().invoke(_app(), ["evaluate", str(tmp_path / "p.parquet"), "--labels",
                                      str(tmp_path / "labels.parquet"), "--bootstrap", "0", "--subgroups", "sex",
                                      "--report", str(tmp_path / "r.md")])
    assert res.exit_code == 0, res.output
    md = (tmp_path / "r.md").read_text()
    assert "| label | AUROC gap [95% CI] | p | lowest group | highest group |" in md
    assert f"{gap['gap']:.3f} [{gap['ci'][0]:+.3f}, {gap['ci'][1]:+.3f}] *" in md and "Obuchowski" in md
