"""Metrics, bootstrap, thresholds, calibration, aggregation, the evaluate core and its CLI."""

from __future__ import annotations

import json
import re
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import typer
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score
from typer.testing import CliRunner

from ecgfm_cli import metrics as M
from ecgfm_cli.commands.evaluate import evaluate_command
from ecgfm_cli.evaluate import EvalConfig, EvaluateError, Predictions, aggregate_rows, evaluate, evaluate_level
from ecgfm_cli.io.artifacts import atomic_path
from ecgfm_cli.labels import LabelTable
from ecgfm_cli.provenance import build_provenance, fingerprint

RNG = np.random.default_rng(0)


# --------------------------------------------------------------------------------------------- metrics
def test_metrics_match_sklearn_with_and_without_weights():
    rng = np.random.default_rng(1)
    for _ in range(30):
        n = int(rng.integers(5, 200))
        y = rng.integers(0, 2, n).astype(float)
        if y.min() == y.max():
            continue
        s = np.round(rng.random(n) + 0.4 * y, 1)  # ties on purpose
        w = rng.integers(0, 3, n).astype(float)
        assert M.roc_auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
        assert M.average_precision(y, s) == pytest.approx(average_precision_score(y, s), abs=1e-12)
        if (w * y).sum() > 0 and (w * (1 - y)).sum() > 0:
            assert M.roc_auc(y, s, w) == pytest.approx(roc_auc_score(y, s, sample_weight=w), abs=1e-12)
            assert M.average_precision(y, s, w) == pytest.approx(
                average_precision_score(y, s, sample_weight=w), abs=1e-12)
        assert M.threshold_metrics(y, s, 0.5)["f1"] == pytest.approx(f1_score(y, s >= 0.5, zero_division=0.0)) \
            or (s >= 0.5).sum() + y.sum() == 0


def test_perfect_and_single_class():
    y = np.array([0, 0, 1, 1.0])
    assert M.roc_auc(y, np.array([0.1, 0.2, 0.8, 0.9])) == 1.0
    assert M.average_precision(y, np.array([0.1, 0.2, 0.8, 0.9])) == 1.0
    assert M.roc_auc(np.ones(4), np.arange(4.0)) is None
    assert M.average_precision(np.zeros(4), np.arange(4.0)) is None


def test_patient_bootstrap_keeps_patients_together_and_is_deterministic():
    keys = np.array(["a", "a", "b", "c", "c", "c"])
    ws = list(M.patient_bootstrap_weights(keys, 50, seed=7))
    ws2 = list(M.patient_bootstrap_weights(keys, 50, seed=7))
    assert all((a == b).all() for a, b in zip(ws, ws2, strict=True))
    for w in ws:
        assert w[0] == w[1] and w[3] == w[4] == w[5]
        # 3 patients drawn in total
        assert w[0] + w[2] + w[3] == 3
    # equals explicit row resampling: weighted AUROC == AUROC on the duplicated rows
    y = np.array([0, 1, 0, 1, 0, 1.0])
    s = np.array([0.2, 0.7, 0.4, 0.6, 0.1, 0.3])
    for w in ws[:10]:
        idx = np.repeat(np.arange(6), w.astype(int))
        if 0 < y[idx].sum() < len(idx):
            assert M.roc_auc(y, s, w) == pytest.approx(roc_auc_score(y[idx], s[idx]))


def test_ece_and_temperature_scaling():
    rng = np.random.default_rng(2)
    p = rng.random(20000)
    y = (rng.random(20000) < p).astype(float)
    assert M.expected_calibration_error(y, p) < 0.02
    # over-confident: logits doubled
    p_bad = M.sigmoid(3 * M.logit(p))
    assert M.expected_calibration_error(y, p_bad) > 0.08
    t = M.fit_temperature(y, p_bad)
    assert t == pytest.approx(3.0, rel=0.1)
    assert M.nll(y, M.apply_temperature(p_bad, t)) < M.nll(y, p_bad)
    assert M.brier(np.array([1.0, 0.0]), np.array([1.0, 0.0])) == 0.0


def test_regression_metrics():
    y = np.array([1.0, 2, 3, 4])
    r = M.regression_metrics(y, y + 1)
    assert r["mae"] == 1 and r["rmse"] == 1 and r["pearson_r"] == pytest.approx(1.0)
    assert r["r2"] == pytest.approx(1 - 4 / 5)


# --------------------------------------------------------------------------------------------- aggregation
def test_aggregate_rows_hand_made():
    rid = np.array(["b", "a", "b", "a", "c"], dtype=object)
    s = np.array([[0.1, 0.1], [0.5, 0.5], [0.9, 0.3], [0.7, np.nan], [np.nan, 0.2]])
    ids, agg, first = aggregate_rows(rid, s, ["max", "mean"])
    assert ids.tolist() == ["b", "a", "c"]
    assert first.tolist() == [0, 1, 4]
    assert agg[:, 0].tolist()[:2] == [0.9, 0.7] and np.isnan(agg[2, 0])  # all-NaN record stays NaN
    assert agg[:, 1].tolist() == pytest.approx([0.2, 0.5, 0.2])  # NaN segment ignored in the mean
    _, agg_min, _ = aggregate_rows(rid, s, ["min", "min"])
    assert agg_min[:2, 0].tolist() == [0.1, 0.5]


# --------------------------------------------------------------------------------------------- evaluate core
def _cfg(**kw) -> EvalConfig:
    kw.setdefault("n_boot", 0)
    return EvalConfig(**kw)


def test_threshold_chosen_on_valid_is_applied_to_test():
    # valid: best F1 threshold is 0.7; on test the best would be 0.3
    yv = np.array([0, 0, 0, 1, 1.0])
    sv = np.array([0.1, 0.3, 0.5, 0.7, 0.9])
    yt = np.array([0, 1, 1, 1, 0.0])
    st = np.array([0.1, 0.3, 0.5, 0.7, 0.9])
    assert M.choose_threshold(yv, sv) == 0.7 and M.choose_threshold(yt, st) == 0.3
    y = np.r_[yv, yt][:, None]
    s = np.r_[sv, st][:, None]
    split = np.array(["valid"] * 5 + ["test"] * 5, dtype=object)
    keys = np.array([f"p{i}" for i in range(10)], dtype=object)
    res, _ = evaluate_level(y, s, split, keys, ["X"], {"X": "binary"}, _cfg())
    e = res["labels"]["X"]
    assert e["threshold"] == {"value": 0.7, "method": "f1", "chosen_on": "valid", "n_valid": 5}
    assert e["sensitivity"]["value"] == pytest.approx(1 / 3)  # only 0.7 of (0.3, 0.5, 0.7) is >= 0.7
    assert e["auroc"]["value"] == pytest.approx(roc_auc_score(yt, st))
    assert e["n"] == 5 and e["prevalence"] == pytest.approx(0.6)
    # evaluating the valid split itself: nothing is fitted on the rows being scored
    res, _ = evaluate_level(y, s, split, keys, ["X"], {"X": "binary"}, _cfg(eval_split="valid", calibrate=True))
    e = res["labels"]["X"]
    assert e["threshold"]["value"] == 0.5 and e["threshold"]["chosen_on"] is None
    assert "valid split is the one evaluated" in e["threshold"]["reason"]
    assert e["calibrated"]["temperature"] is None


def _synthetic(n_pat=60, segs=3, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_pat):
        for r in range(2):
            rid = f"rec{p}_{r}"
            y = float(rng.random() < 0.4)
            for k in range(segs):
                rows.append((rid, f"pat{p}", k, y))
    rid, pid, seg, y = map(np.array, zip(*rows, strict=True))
    split = np.where(np.arange(n_pat) < 40, "train", np.where(np.arange(n_pat) < 50, "valid", "test"))
    psplit = {f"pat{p}": split[p] for p in range(n_pat)}
    sp = np.array([psplit[x] for x in pid], dtype=object)
    score = np.clip(0.5 * y + 0.5 * rng.random(len(y)), 0, 1)
    recs, idx = np.unique(rid, return_index=True)
    lt = LabelTable(record_ids=recs.astype(object), labels=["AF", "PVC", "const"],
                    values=np.column_stack([y[idx], y[idx], np.zeros(len(idx))]),
                    kinds={"AF": "binary", "PVC": "binary", "const": "binary"},
                    patient_ids=pid[idx].astype(object))
    preds = Predictions(record_ids=rid.astype(object), scores=np.column_stack([score, score, score]),
                        labels=["AF", "PVC", "const"], patient_ids=pid.astype(object),
                        segment_index=seg.astype(np.int64), split=sp)
    return preds, lt


def test_evaluate_bootstrap_ci_single_class_and_aggregation():
    preds, lt = _synthetic()
    cfg = _cfg(n_boot=200, seed=1, aggregate="label", aggregate_methods={"AF": "mean", "PVC": "max", "const": "mean"})
    body, curves = evaluate(preds, lt, cfg)
    seg, rec = body["levels"]["segment"], body["levels"]["record"]
    af = seg["labels"]["AF"]
    lo, hi = af["auroc"]["ci"]
    assert lo <= af["auroc"]["value"] <= hi
    assert body["evaluated_split"] == "test"
    # deterministic for a seed
    body2, _ = evaluate(preds, lt, cfg)
    assert body2["levels"]["segment"]["labels"]["AF"]["auroc"]["ci"] == [lo, hi]
    # the constant label has one class: undefined, not a crash, and left out of the macro
    const = seg["labels"]["const"]
    assert const["auroc"]["value"] is None and "single class" in const["auroc"]["reason"]
    assert seg["macro"]["auroc"]["labels_excluded"] == ["const"] and seg["macro"]["auroc"]["n_labels"] == 2
    assert seg["macro"]["auroc"]["ci"] is not None
    # record level: 10 test patients x 2 records; PVC aggregated with max, AF with mean
    assert rec["n_rows"] == 20 and rec["aggregation"]["PVC"] == "max"
    test_rows = preds.split == "test"
    r0 = preds.record_ids[test_rows][0]
    m = preds.record_ids == r0
    assert curves["record"]["PVC"]["s"][0] == pytest.approx(preds.scores[m, 1].max())
    assert curves["record"]["AF"]["s"][0] == pytest.approx(preds.scores[m, 0].mean())
    assert body["split_check"]["patients_in_multiple_splits"] == 0


def test_a_label_fitted_as_continuous_is_scored_as_continuous():
    """`probe --continuous AF` on a 0/1 column: the predictions' label_kinds say so, and evaluate must not score it
    as a binary label again because the labels table holds 0/1."""
    preds, lt = _synthetic()
    preds.meta = {"label_kinds": {"AF": "continuous", "PVC": "binary", "const": "binary"}}
    body, _ = evaluate(preds, lt, _cfg())
    labels = body["levels"]["segment"]["labels"]
    assert "mae" in labels["AF"] and "auroc" not in labels["AF"]
    assert "auroc" in labels["PVC"]


def test_evaluate_exclusions_are_counted_not_silent():
    preds, lt = _synthetic()
    preds.record_ids = preds.record_ids.copy()
    preds.record_ids[:3] = "ghost"
    preds.scores[5, 0] = np.nan
    preds.labels = ["AF", "PVC", "Unknown"]
    logs = []
    body, _ = evaluate(preds, lt, _cfg(eval_split="train"), log=logs.append)
    assert body["exclusions"]["unknown_record_id_rows"] == 3
    assert body["exclusions"]["unknown_record_id_examples"] == ["ghost"]
    assert body["exclusions"]["prediction_labels_not_in_labels"] == ["Unknown"]
    assert body["exclusions"]["labels_not_predicted"] == ["const"]
    assert body["levels"]["segment"]["labels"]["AF"]["excluded"]["nan_score"] == 1
    assert any("ghost" in x for x in logs) and any("Unknown" in x for x in logs)
    preds.labels = ["x", "y", "z"]
    with pytest.raises(EvaluateError, match="label-map"):
        evaluate(preds, lt, _cfg())
    preds.labels = ["AF", "PVC", "const"]
    preds.record_ids[:] = "ghost"
    with pytest.raises(EvaluateError, match="record_id"):
        evaluate(preds, lt, _cfg())


def test_no_split_uses_all_rows_and_default_threshold():
    preds, lt = _synthetic()
    preds.split = None
    body, _ = evaluate(preds, lt, _cfg())
    e = body["levels"]["segment"]["labels"]["AF"]
    assert body["evaluated_split"] == "all"
    assert e["threshold"]["value"] == 0.5 and e["threshold"]["chosen_on"] is None
    assert e["n"] == len(preds.record_ids)


def test_continuous_target():
    n = 300
    rng = np.random.default_rng(3)
    y = rng.normal(50, 10, n)
    s = y + rng.normal(0, 2, n)
    split = np.array(["test"] * n, dtype=object)
    res, _ = evaluate_level(y[:, None], s[:, None], split, np.arange(n).astype(str).astype(object), ["LVEF"],
                            {"LVEF": "continuous"}, _cfg(n_boot=100))
    e = res["labels"]["LVEF"]
    assert e["r2"]["value"] > 0.9 and e["pearson_r"]["ci"][0] > 0.9
    assert e["mae"]["ci"][0] <= e["mae"]["value"] <= e["mae"]["ci"][1]


# --------------------------------------------------------------------------------------------- provenance
def test_fingerprint_and_atomic_dir(tmp_path):
    f = tmp_path / "a.bin"
    f.write_bytes(b"x" * 5000)
    full = fingerprint(f)
    assert full["method"] == "full" and full == fingerprint(f)
    sampled = fingerprint(f, full_hash_limit=10)
    assert sampled["method"] == "sampled" and sampled["sha256"] != full["sha256"]
    d = tmp_path / "shards"
    d.mkdir()
    (d / "p-1.parquet").write_bytes(b"1")
    (d / "p-0.parquet").write_bytes(b"0")
    fp = fingerprint(d)
    (d / "p-1.parquet").write_bytes(b"2")
    assert fingerprint(d)["sha256"] != fp["sha256"] and fp["n_files"] == 2
    prov = build_provenance({"x": f, "none": None}, seed=3, argv=["ecgfm", "x"])
    assert prov["seed"] == 3 and list(prov["inputs"]) == ["x"] and prov["command"] == ["ecgfm", "x"]
    out = tmp_path / "plots"
    out.mkdir()
    (out / "stale.png").write_text("old")
    with atomic_path(out) as tmp:
        tmp.mkdir()
        (tmp / "new.png").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.png"]


# --------------------------------------------------------------------------------------------- CLI
def _app() -> typer.Typer:
    app = typer.Typer()
    app.command("evaluate")(evaluate_command)
    app.command("noop")(lambda: None)  # keep a multi-command app so the name is required
    return app


def _write_preds(path, preds: Predictions, meta=None):
    cols = {"record_id": preds.record_ids.tolist(), "patient_id": preds.patient_ids.tolist(),
            "segment_index": pa.array(preds.segment_index, pa.int32()), "split": preds.split.tolist()}
    for j, lab in enumerate(preds.labels):
        cols[lab] = preds.scores[:, j]
    kv = {"ecgfm.kind": "predictions", "ecgfm.schema_version": "1", "ecgfm.labels": json.dumps(preds.labels),
          **(meta or {})}
    pq.write_table(pa.table(cols).replace_schema_metadata(kv), path)


def test_cli_end_to_end(tmp_path):
    pytest.importorskip("matplotlib")
    preds, lt = _synthetic()
    _write_preds(tmp_path / "p.parquet", preds,
                 {"ecgfm.contract": json.dumps({"leads": ["I", "II"], "sample_rate": 500})})
    base = Predictions(preds.record_ids, np.random.default_rng(5).random(preds.scores.shape), preds.labels,
                       preds.patient_ids, preds.segment_index, preds.split)
    _write_preds(tmp_path / "b.parquet", base)
    labels_csv = tmp_path / "labels.csv"
    rows = zip(lt.record_ids, lt.patient_ids, lt.values, strict=True)
    lines = ["record_id,patient_id,AF,PVC,const"] + [f"{r},{p},{int(a)},{int(b)},{int(c)}" for r, p, (a, b, c) in rows]
    labels_csv.write_text("\n".join(lines) + "\n")
    plots = tmp_path / "plots"  # an earlier run's plots: replaced whole
    (plots / "segment").mkdir(parents=True)
    (plots / "segment" / "stale.png").write_text("old run")
    (plots / "provenance.json").write_text("{}")
    args = ["evaluate", str(tmp_path / "p.parquet"), "--labels", str(labels_csv), "--aggregate", "label",
            "--bootstrap", "50", "--calibrate", "-o", str(tmp_path / "r.json"), "--plots", str(plots),
            "--baseline", str(tmp_path / "b.parquet")]
    res = CliRunner().invoke(_app(), args)
    assert res.exit_code == 0, res.output
    assert "| **macro** |" in res.stdout and "*baseline (macro)*" in res.stdout and "| PVC |" in res.stdout
    rep = json.loads((tmp_path / "r.json").read_text())
    assert set(rep["levels"]) == {"segment", "record"}
    assert rep["settings"]["aggregate_methods"] == {"AF": "mean", "PVC": "max", "const": "mean"}
    af = rep["levels"]["record"]["labels"]["AF"]
    assert {"auroc", "auprc", "sensitivity", "specificity", "ppv", "f1", "ece", "brier", "threshold",
            "calibrated", "prevalence", "n"} <= set(af)
    assert af["calibrated"]["temperature"] > 0
    assert rep["baseline"]["levels"]["segment"]["macro"]["auroc"]["value"] < 0.8
    assert rep["upstream"]["leads"] == ["I", "II"]
    assert rep["provenance"]["inputs"]["predictions"]["sha256"]
    assert rep["provenance"]["seed"] == 0
    pngs = sorted(p.relative_to(plots).as_posix() for p in plots.rglob("*.png"))
    assert "segment/AF.png" in pngs and "record/PVC.png" in pngs and "segment/stale.png" not in pngs
    # a directory holding anything else is refused before any work, and left as it was
    mine = tmp_path / "mine"
    (mine / "segment").mkdir(parents=True)
    (mine / "notes.txt").write_text("keep me")
    (mine / "provenance.json").write_text("{}")
    res = CliRunner().invoke(_app(), args[:4] + ["--bootstrap", "0", "--plots", str(mine)])
    assert res.exit_code != 0 and "not an earlier `ecgfm evaluate --plots` output" in str(res.exception or res.output)
    assert (mine / "notes.txt").read_text() == "keep me"
    afile = tmp_path / "afile"
    afile.write_text("x")
    res = CliRunner().invoke(_app(), args[:4] + ["--bootstrap", "0", "-o", str(afile / "r.json")])
    assert res.exit_code != 0 and "is a file" in str(res.exception or res.output)
    # markdown and csv outputs; a wrong extension is refused before any work
    assert CliRunner().invoke(_app(), args[:4] + ["--bootstrap", "0", "-o", str(tmp_path / "r.csv")]).exit_code == 0
    assert "model,level,label,metric" in (tmp_path / "r.csv").read_text()
    bad = CliRunner().invoke(_app(), args[:4] + ["-o", str(tmp_path / "r.txt")])
    assert bad.exit_code != 0 and "use .json, .md or .csv" in str(bad.exception)


def test_cli_plots_without_matplotlib(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails
    preds, lt = _synthetic(n_pat=10)
    _write_preds(tmp_path / "p.parquet", preds)
    (tmp_path / "l.csv").write_text("record_id,AF\n" + "".join(f"{r},{int(v)}\n" for r, v in
                                                              zip(lt.record_ids, lt.values[:, 0], strict=True)))
    from conftest import run_main

    code, err = run_main(capsys, "evaluate", tmp_path / "p.parquet", "--labels", tmp_path / "l.csv",
                         "--plots", tmp_path / "plots")
    assert code == 2 and "pip install ecgfm-cli[plots]" in err


def test_markdown_tables_escape_a_pipe_in_label_and_group_names(tmp_path):
    """A label named ``PAC|SVPB`` (CinC's merged class) and a group ``a|b`` keep every printed table's rows at
    their header's column count: the pipe is escaped."""
    preds, lt = _synthetic()
    preds.labels[:] = ["PAC|SVPB", "PVC", "const"]
    _write_preds(tmp_path / "p.parquet", preds)
    table = pq.read_table(tmp_path / "p.parquet")
    site = ["a|b" if int(p[3:]) % 2 else "c" for p in preds.patient_ids]
    pq.write_table(table.append_column("site", pa.array(site)), tmp_path / "p.parquet")
    base = Predictions(preds.record_ids, np.random.default_rng(5).random(preds.scores.shape), preds.labels,
                       preds.patient_ids, preds.segment_index, preds.split)
    _write_preds(tmp_path / "b.parquet", base)
    lines = ["record_id,patient_id,PAC|SVPB,PVC,const"] + [
        f"{r},{p},{int(a)},{int(b)},{int(c)}" for r, p, (a, b, c) in
        zip(lt.record_ids, lt.patient_ids, lt.values, strict=True)]
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    res = CliRunner().invoke(_app(), ["evaluate", str(tmp_path / "p.parquet"), "--labels", str(tmp_path / "labels.csv"),
                                      "--bootstrap", "0", "--baseline", str(tmp_path / "b.parquet"),
                                      "--subgroups", "site"])
    assert res.exit_code == 0, res.output
    assert "PAC\\|SVPB" in res.stdout and "a\\|b" in res.stdout
    columns = None
    for line in res.stdout.splitlines():
        if not line.startswith("|"):
            columns = None
            continue
        n = len(re.findall(r"(?<!\\)\|", line))
        columns = n if columns is None else columns
        assert n == columns, line
