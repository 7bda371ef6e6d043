"""evaluate's subgroups, report (HTML/Markdown), plots and command-line behaviour."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_evaluate import _app, _synthetic, _write_preds
from typer.testing import CliRunner

from ecgfm_cli.evaluate import (
    EvalConfig,
    EvaluateError,
    LevelData,
    Predictions,
    band_values,
    derive_source,
    describe_model,
    evaluate_subgroups,
    group_order,
    load_predictions,
    subgroup_columns,
)


def test_age_bands_quartiles_and_unknown():
    g = band_values("age", [12, 40, 59.5, 60, 85, None, float("nan")], (40, 60, 80))
    assert g.tolist() == ["<40", "40-59", "40-59", "60-79", ">=80", "unknown", "unknown"]
    assert band_values("sex", ["M", None, "F"], ()).tolist() == ["M", "unknown", "F"]
    q = band_values("bmi", list(np.arange(20.0)), ())
    assert sorted(set(q.tolist())) == ["Q1 [0, 4]", "Q2 [5, 9]", "Q3 [10, 14]", "Q4 [15, 19]"]
    assert derive_source(["/d/a/g1/x.hea", "/d/a/g2/y.hea", None]) == ["g1", "g2", None]
    assert sorted(["60-79", "unknown", "<40", ">=80", "40-59"], key=group_order) == \
        ["<40", "40-59", "60-79", ">=80", "unknown"]
    assert sorted(["Q3 [5, 6]", "Q1 [0, 2]", "Q2 [3, 4]"], key=group_order)[0] == "Q1 [0, 2]"


def test_subgroups_report_too_small_groups_and_the_largest_gap():
    rng = np.random.default_rng(0)
    n = 300
    y = (rng.random(n) < 0.4).astype(float)
    sex = np.where(np.arange(n) < 150, "F", "M").astype(object)
    sex[:8] = "X"  # 8 patients: too small, reported as such
    # good on F, poor on M
    s = np.where(sex == "F", np.clip(0.6 * y + 0.4 * rng.random(n), 0, 1), rng.random(n))
    keys = np.array([f"p{i}" for i in range(n)], dtype=object)
    d = LevelData(y[:, None], s[:, None], None, keys, keys)
    out = evaluate_subgroups(d, {"sex": sex}, ["AF"], {"AF": "binary"}, EvalConfig(n_boot=100))["sex"]
    assert out["groups"]["X"]["status"] == "too_small" and out["groups"]["X"]["n_patients"] == 8
    assert "not merged" in out["groups"]["X"]["reason"]
    f, m = out["groups"]["F"], out["groups"]["M"]
    assert f["n_patients"] == 142 and m["n_patients"] == 150
    assert f["labels"]["AF"]["auroc"]["ci"] is not None
    assert out["macro_labels"] == ["AF"] and f["macro"]["auroc"]["labels"] == ["AF"]
    assert list(out["groups"]) == ["F", "M", "X"]
    gap = out["largest_gap"]
    assert gap["label"] == "AF" and gap["highest"] == "F" and gap["lowest"] == "M"
    assert gap["gap"] == pytest.approx(f["labels"]["AF"]["auroc"]["value"] - m["labels"]["AF"]["auroc"]["value"])


def test_subgroup_columns_from_predictions_and_records(tmp_path):
    preds, _ = _synthetic(n_pat=6)
    recs = sorted(set(preds.record_ids))
    pq.write_table(pa.table({"record_id": recs, "age": [30.0 + 10 * i for i in range(len(recs))],
                             "sex": ["F", "M"] * (len(recs) // 2),
                             "source_path": [f"/data/{'a' if i % 2 else 'b'}/{r}.hea" for i, r in enumerate(recs)]}),
                   tmp_path / "segments.parquet")
    preds.columns = {"site": np.array(["s1"] * len(preds.record_ids), dtype=object)}
    g, where = subgroup_columns(["age", "sex", "site", "source"], "p.parquet", preds, [tmp_path / "segments.parquet"])
    i = list(preds.record_ids).index(recs[0])
    assert g["age"][i] == "<40" and g["sex"][i] == "F" and g["site"][i] == "s1" and g["source"][i] == "b"
    assert where["site"].startswith("predictions") and where["source"].startswith("derived")
    with pytest.raises(EvaluateError, match="no such column.*available: .*age"):
        subgroup_columns(["ethnicity"], "p.parquet", preds, [tmp_path / "segments.parquet"])


def test_describe_model_names_the_baselines():
    assert describe_model({"probe": {}, "model": {"kind": "random-init", "preset": "tiny", "seed": 1}})["kind"] \
        == "random-init"
    d = describe_model({"probe": {}, "model": {"kind": "features", "features": "rhythm", "columns": ["hr", "qrs"]}})
    assert d["kind"] == "features" and "rhythm features (2 features: hr, qrs)" in d["description"]
    assert describe_model({"finetune": {}, "model": {"init_kind": "random"}})["kind"] == "supervised-from-scratch"
    assert describe_model({"probe": {}, "model": {"kind": "pretraining", "checkpoint": "/r"}})["kind"] == "pretrained"


def test_plots_roc_legend_pr_without_spike_and_decision_curve():
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from ecgfm_cli.plots import label_figure, pr_points

    y = np.array([0, 1, 0, 1, 1, 0, 0, 0.0])
    s = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2])  # the top score is a negative
    rec, prec = pr_points(y, s)
    assert rec[0] == 0 and prec[0] == 0.0 and np.all(np.diff(rec) >= 0)  # no spike to 1 at recall 0
    fig = label_figure("AF", "record", {"y": y, "s": s}, {"y": y, "s": s[::-1]})
    texts = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert texts[0] == "model (AUROC 0.667)"  # 10 of 15 pairs ranked right
    assert texts[1].startswith("baseline (AUROC ")
    assert fig.axes[3].get_title() == "Decision curve"
    assert "quantile bins" in fig.axes[2].get_title()
    plt.close(fig)


def _labels_csv(tmp_path, lt) -> str:
    path = tmp_path / "labels.csv"
    rows = zip(lt.record_ids, lt.patient_ids, lt.values, strict=True)
    lines = ["record_id,patient_id,AF,PVC,const"] + [f"{r},{p},{int(a)},{int(b)},{int(c)}" for r, p, (a, b, c) in rows]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_cli_baseline_subgroups_folds_and_report(tmp_path):
    pytest.importorskip("matplotlib")
    preds, lt = _synthetic(n_pat=120)
    # probe --folds predictions: every row test, a fold column
    fold = np.array([int(p[3:]) % 4 for p in preds.patient_ids])
    preds.split = np.array(["test"] * len(preds.record_ids), dtype=object)
    _write_preds(tmp_path / "p.parquet", preds, {"ecgfm.probe": "{}", "ecgfm.model": json.dumps(
        {"kind": "pretraining", "checkpoint": "/runs/tiny"})})
    t = pq.read_table(tmp_path / "p.parquet")
    pq.write_table(t.append_column("fold", pa.array(fold, pa.int32())).replace_schema_metadata(t.schema.metadata),
                   tmp_path / "p.parquet")
    assert load_predictions(tmp_path / "p.parquet").fold.tolist() == fold.tolist()
    base = Predictions(preds.record_ids, np.random.default_rng(5).random(preds.scores.shape), preds.labels,
                       preds.patient_ids, preds.segment_index, preds.split)
    _write_preds(tmp_path / "b.parquet", base, {"ecgfm.probe": "{}", "ecgfm.model": json.dumps(
        {"kind": "random-init", "preset": "tiny", "seed": 0})})
    recs = sorted(set(preds.record_ids))
    pq.write_table(pa.table({"record_id": recs, "age": [float(20 + (i * 7) % 70) for i in range(len(recs))],
                             "sex": ["F" if i % 3 else "M" for i in range(len(recs))]}), tmp_path / "seg.parquet")
    labels = _labels_csv(tmp_path, lt)
    args = ["evaluate", str(tmp_path / "p.parquet"), "--labels", labels, "--aggregate", "mean", "--bootstrap", "60",
            "--baseline", str(tmp_path / "b.parquet"), "--subgroups", "age,sex",
            "--records", str(tmp_path / "seg.parquet"),
            "--report", str(tmp_path / "r.html"), "-o", str(tmp_path / "r.json")]
    res = CliRunner().invoke(_app(), args)
    assert res.exit_code == 0, res.output
    out = res.stdout
    assert "pooled over 4 cross-validation folds" in out
    assert "#### model − baseline (paired on the 720 rows both hold, of 720 / 720; 720 evaluated)" in out
    assert "#### model − baseline (paired on the 240 records both hold, of 240 / 240; 240 evaluated)" in out
    assert "**age**" in out and "Largest AUROC gaps" in out and "Sens @ Spec 0.9 [95% CI]" in out
    assert "paired comparison on the common rows: 720 of 720 model rows" in res.stderr
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["data"]["folds"]["n_folds"] == 4 and rep["data"]["records"] == 240
    assert rep["baseline"]["model"]["kind"] == "random-init"
    comp = rep["comparison"]["levels"]["record"]["labels"]["AF"]
    assert comp["auroc"]["diff"] > 0.2 and comp["auroc"]["ci"][0] > 0 and comp["auroc"]["p_delong"] < 0.01
    sg = rep["levels"]["record"]["subgroups"]
    assert set(sg) == {"age", "sex"} and sg["sex"]["groups"]["M"]["status"] == "evaluated"
    assert all(g["status"] == "too_small" for k, g in sg["age"]["groups"].items() if g["n_patients"] < 20)
    html = (tmp_path / "r.html").read_text()
    assert html.startswith("<!DOCTYPE html>") and "data:image/png;base64," in html
    assert "src=\"http" not in html and "<script" not in html  # self-contained
    assert "Baselines in this report: random-init encoder. Not shown: classical features, supervised from scratch" \
        in html
    for section in ("Data", "Splits, and positives per label", "Model and baselines", "Analysis", "Calibration",
                    "Decision curves", "Subgroups: age", "Operating points", "Provenance", "4 folds"):
        assert section in html
    # Markdown report: same sections, no figures
    res = CliRunner().invoke(_app(), args[:-4] + ["--report", str(tmp_path / "r.md")])
    assert res.exit_code == 0, res.output
    md = (tmp_path / "r.md").read_text()
    assert "## Model and baselines" in md and "data:image" not in md and "| label | ΔAUROC [95% CI]" in md
    # the CSV carries the paired differences
    res = CliRunner().invoke(_app(), args[:-4] + ["--bootstrap", "0", "-o", str(tmp_path / "r.csv")])
    assert res.exit_code == 0, res.output
    assert "model-baseline,record,AF,delta_auroc," in (tmp_path / "r.csv").read_text()


def test_cli_no_ci_headers_without_bootstrap_and_valid_threshold_said(tmp_path):
    preds, lt = _synthetic()
    _write_preds(tmp_path / "p.parquet", preds)
    labels = _labels_csv(tmp_path, lt)
    res = CliRunner().invoke(_app(), ["evaluate", str(tmp_path / "p.parquet"), "--labels", labels,
                                      "--bootstrap", "0"])
    assert res.exit_code == 0, res.output
    assert "CI]" not in res.stdout and "| AUROC | AUPRC |" in res.stdout
    res = CliRunner().invoke(_app(), ["evaluate", str(tmp_path / "p.parquet"), "--labels", labels,
                                      "--bootstrap", "0", "--eval-split", "valid"])
    assert res.exit_code == 0, res.output
    assert "thresholds: 0.5 used for sensitivity/specificity/PPV/F1 (the valid split is the one evaluated)" \
        in res.stderr
    assert "Threshold 0.5 (not chosen on a valid split) for 3 label(s): the valid split is the one evaluated." \
        in res.stdout


def test_cli_refuses_bad_subgroup_options(tmp_path):
    preds, lt = _synthetic(n_pat=10)
    _write_preds(tmp_path / "p.parquet", preds)
    labels = _labels_csv(tmp_path, lt)
    base = ["evaluate", str(tmp_path / "p.parquet"), "--labels", labels, "--bootstrap", "0"]
    res = CliRunner().invoke(_app(), [*base, "--subgroups", "age"])
    assert res.exit_code != 0 and "pass --records" in str(res.exception or res.output)
    res = CliRunner().invoke(_app(), [*base, "--at-specificity", "90"])
    assert res.exit_code != 0 and "(0, 1)" in res.output
    res = CliRunner().invoke(_app(), [*base, "--report", str(tmp_path / "r.pdf")])
    assert res.exit_code != 0 and "use .html" in str(res.exception or res.output)


def test_pr_step_plot_encloses_the_average_precision():
    pytest.importorskip("matplotlib")
    from ecgfm_cli.metrics import average_precision
    from ecgfm_cli.plots import pr_points

    rng = np.random.default_rng(3)
    y = (rng.random(200) < 0.2).astype(float)
    s = np.round(rng.random(200) + 0.3 * y, 2)
    rec, prec = pr_points(y, s)
    assert np.sum(np.diff(rec) * prec[1:]) == pytest.approx(average_precision(y, s))
