"""`probe --folds K` (issue #17.3), split sizes said loudly (#16.12), two-valued labels not coded 0/1 (#16.10)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import typer
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

import ecgfm_cli.probe as probe_mod
from ecgfm_cli.commands.evaluate import evaluate_command
from ecgfm_cli.commands.probe import probe_command
from ecgfm_cli.labels import LabelError, LabelTable, labels_from_table, settle_label_kinds
from ecgfm_cli.probe import probe_files


def _app() -> typer.Typer:
    app = typer.Typer()
    app.command("probe")(probe_command)
    app.command("evaluate")(evaluate_command)
    return app


def _cohort(n_rec=40, n_pos=6, d=8, segs=2, signal=3.0, seed=0):
    """A small cohort: n_rec records of `segs` segments, patients owning 1-2 records, n_pos positive records
    (AF follows embedding dim 0 when signal > 0), a continuous LVEF."""
    rng = np.random.default_rng(seed)
    y = np.zeros(n_rec)
    y[rng.choice(n_rec, n_pos, replace=False)] = 1
    lvef = rng.normal(55, 8, n_rec)
    rid = np.array([f"r{i:03d}" for i in range(n_rec)], dtype=object)
    pid = np.array([f"p{i // 2 if i % 3 else i}" for i in range(n_rec)], dtype=object)
    rows = np.repeat(np.arange(n_rec), segs)
    X = rng.normal(size=(n_rec * segs, d)).astype(np.float32)
    X[:, 0] += signal * y[rows]
    X[:, 1] += (lvef[rows] - 55) / 4
    lt = LabelTable(record_ids=rid, labels=["AF", "LVEF"], values=np.column_stack([y, lvef]),
                    kinds={"AF": "binary", "LVEF": "continuous"}, patient_ids=pid)
    return X, rid[rows], pid[rows], np.tile(np.arange(segs), n_rec).astype(np.int32), lt


def _npz(path, X, rid, pid, seg):
    np.savez(path, record_id=rid.astype(str), patient_id=pid.astype(str), segment_index=seg, embedding=X)
    return path


def _csv(path, lt):
    lines = ["record_id,patient_id,AF,LVEF"] + [f"{r},{p},{int(a)},{b:.3f}" for r, p, (a, b)
                                                in zip(lt.record_ids, lt.patient_ids, lt.values, strict=True)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_folds_score_every_record_once_and_keep_patients_together(tmp_path):
    X, rid, pid, seg, lt = _cohort()
    logs: list[str] = []
    summary = probe_files(_npz(tmp_path / "e.npz", X, rid, pid, seg), lt, tmp_path / "p.parquet", {}, folds=5,
                          log=logs.append)
    t = pq.read_table(tmp_path / "p.parquet").to_pydict()
    assert set(t["split"]) == {"test"} and len(t["record_id"]) == len(rid)
    fold_of_record: dict[str, set] = {}
    fold_of_patient: dict[str, set] = {}
    for r, p, f in zip(t["record_id"], t["patient_id"], t["fold"], strict=True):
        fold_of_record.setdefault(r, set()).add(f)
        fold_of_patient.setdefault(p, set()).add(f)
    assert set(fold_of_record) == set(lt.record_ids)  # every record scored ...
    assert all(len(v) == 1 for v in fold_of_record.values())  # ... once
    assert all(len(v) == 1 for v in fold_of_patient.values())  # no patient in two folds
    assert set().union(*fold_of_record.values()) == set(range(5))
    # stratified: each fold holds at least one of the 6 positive records
    pos = {r for r, v in zip(lt.record_ids, lt.values[:, 0], strict=True) if v == 1}
    assert all(any(r in pos for r, fs in fold_of_record.items() if f in fs) for f in range(5))
    assert np.isfinite(t["AF"]).all() and np.isfinite(t["LVEF"]).all()
    assert any("stratified on 'AF'" in m for m in logs), logs
    assert len(summary["labels"]["AF"]["folds"]) == 5
    meta = json.loads(pq.read_schema(tmp_path / "p.parquet").metadata[b"ecgfm.probe"])
    assert meta["folds"] == 5 and meta["split_check"]["source"] == "folds"


def test_a_fold_probe_never_trains_or_chooses_c_on_its_own_rows(tmp_path, monkeypatch):
    X, rid, pid, seg, lt = _cohort()
    calls: list[tuple[np.ndarray, float | None]] = []
    real = probe_mod.fit_label

    def spy(X_, y, split, kind, *args, fixed=None, **kw):
        calls.append((np.asarray(split).copy(), fixed))
        return real(X_, y, split, kind, *args, fixed=fixed, **kw)

    monkeypatch.setattr(probe_mod, "fit_label", spy)
    probe_files(_npz(tmp_path / "e.npz", X, rid, pid, seg), lt, tmp_path / "p.parquet", {}, folds=4)
    fold = np.array(pq.read_table(tmp_path / "p.parquet").column("fold").to_pylist())
    assert len(calls) == 4 * 2 * 2  # folds x labels x (choose C, refit)
    for split, fixed in calls:
        test = split == "test"
        assert len(set(fold[test])) == 1  # the rows held out are exactly one fold ...
        assert set(fold[~test]).isdisjoint(set(fold[test]))  # ... and all its rows
        if fixed is None:  # choosing C: on an inner valid part of the training folds
            assert (split == "valid").any() and not (test & (split == "valid")).any()
        else:  # the refit: every other fold's row, nothing chosen
            assert set(split[~test]) == {"train"}


def test_out_of_fold_scores_do_not_memorise():
    """Random high-dimensional features: a probe scoring its own training rows would reach AUROC 1."""
    X, rid, pid, seg, lt = _cohort(n_rec=40, n_pos=10, d=200, segs=1, signal=0.0, seed=3)
    keys = probe_mod.patient_keys(rid, pid)
    emb = probe_mod.Embeddings(rid, pid, seg, X)
    fold_of, _ = probe_mod.assign_folds(lt, emb, 5, 0)
    fold = np.array([fold_of[r] for r in rid])
    y = lt.values[:, :1]
    P, _ = probe_mod.run_probe_folds(X, y, ["AF"], {"AF": "binary"}, fold, y[:, 0].astype(int), keys)
    assert roc_auc_score(y[:, 0], P[:, 0]) < 0.8
    P_in, _ = probe_mod.run_probe(X, y, ["AF"], {"AF": "binary"}, np.full(40, "train", dtype=object))
    assert roc_auc_score(y[:, 0], P_in[:, 0]) > 0.99  # what scoring the training rows would give


def test_cli_folds_then_evaluate_over_all_records(tmp_path):
    X, rid, pid, seg, lt = _cohort(n_rec=40, n_pos=6)
    emb, labels = _npz(tmp_path / "e.npz", X, rid, pid, seg), _csv(tmp_path / "l.csv", lt)
    runner = CliRunner()
    res = runner.invoke(_app(), ["probe", str(emb), "--labels", str(labels), "-o", str(tmp_path / "p.parquet"),
                                 "--folds", "5", "--baseline", str(emb)])
    assert res.exit_code == 0, res.output
    base = pq.read_table(tmp_path / "p.baseline.parquet").to_pydict()
    assert base["fold"] == pq.read_table(tmp_path / "p.parquet").column("fold").to_pylist()
    res = runner.invoke(_app(), ["evaluate", str(tmp_path / "p.parquet"), "--labels", str(labels),
                                 "--aggregate", "mean", "--bootstrap", "50", "-o", str(tmp_path / "r.json")])
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "r.json").read_text())
    af = rep["levels"]["record"]["labels"]["AF"]
    assert af["n"] == 40 and af["n_pos"] == 6, af  # every record, pooled over the folds
    assert af["auroc"]["value"] > 0.8


def test_folds_refused_with_fewer_patients_than_folds(tmp_path):
    X, rid, pid, seg, lt = _cohort(n_rec=6, n_pos=2, segs=1)
    with pytest.raises(probe_mod.ProbeError, match="at most --folds"):
        probe_files(_npz(tmp_path / "e.npz", X, rid, pid, seg), lt, tmp_path / "p.parquet", {}, folds=10)


def test_small_splits_are_said_loudly_with_counts(tmp_path):
    """#16.12: 40 records, 6 positives: the automatic 10 % valid/test splits hold 0-2 positives."""
    X, rid, pid, seg, lt = _cohort()
    logs: list[str] = []
    probe_files(_npz(tmp_path / "e.npz", X, rid, pid, seg), lt, tmp_path / "p.parquet", {}, log=logs.append)
    warn = [m for m in logs if "WARNING" in m]
    assert any("too small" in m and "AF" in m for m in warn), logs
    assert any("counts per split" in m and "valid:" in m and "patients" in m for m in warn), logs
    assert any("--folds" in m for m in warn), logs
    meta = json.loads(pq.read_schema(tmp_path / "p.parquet").metadata[b"ecgfm.probe"])
    assert any("too small" in n for n in meta["notes"]) and "valid" in meta["counts"]["groups"]


def test_a_large_cohort_gets_no_small_split_warning(tmp_path):
    X, rid, pid, seg, lt = _cohort(n_rec=600, n_pos=200, segs=1)
    logs: list[str] = []
    probe_files(_npz(tmp_path / "e.npz", X, rid, pid, seg), lt, tmp_path / "p.parquet", {}, log=logs.append)
    assert not any("too small" in m for m in logs), logs


# ------------------------------------------------------------------------------------------- #16.10 label kinds
def _table(**cols):
    import pyarrow as pa

    n = len(next(iter(cols.values())))
    return labels_from_table(pa.table({"record_id": [f"r{i}" for i in range(n)], **cols}))


def test_two_valued_label_not_coded_01_is_refused_unless_named_continuous():
    t = _table(sex=[1, 2, 2, 1], af=[0, 1, 0, 1], lvef=[50.0, 35.5, 60.0, 55.0])
    with pytest.raises(LabelError, match=r"'sex' \(1/2\).*--continuous sex"):
        settle_label_kinds(t, t.labels)
    t = _table(x=[0, 2, 2, 0], af=[0, 1, 0, 1], lvef=[50.0, 35.5, 60.0, 55.0])
    with pytest.raises(LabelError, match="--continuous x"):
        settle_label_kinds(t, t.labels)
    notes = settle_label_kinds(t, t.labels, ["x"])
    assert t.kinds == {"x": "continuous", "af": "binary", "lvef": "continuous"}
    assert len(notes) == 1 and "x (0 to 2, 2 distinct values)" in notes[0] and "lvef (35.5 to 60" in notes[0]
    # a 0/1 label can be asked to be continuous; an unknown name is an error
    settle_label_kinds(t, t.labels, ["x", "af"])
    assert t.kinds["af"] == "continuous"
    with pytest.raises(LabelError, match="--continuous nope"):
        settle_label_kinds(t, t.labels, ["nope"])
    # only the labels being fitted are checked (finetune --targets)
    t = _table(sex=[1, 2, 2, 1], af=[0, 1, 0, 1])
    assert settle_label_kinds(t, ["af"]) == []


def test_cli_probe_says_which_labels_are_continuous_and_refuses_12(tmp_path):
    X, rid, pid, seg, lt = _cohort(n_rec=60, n_pos=20, segs=1)
    emb = _npz(tmp_path / "e.npz", X, rid, pid, seg)
    coded = tmp_path / "l12.csv"
    coded.write_text("record_id,patient_id,AF,LVEF\n" + "".join(
        f"{r},{p},{int(a) + 1},{b:.3f}\n" for r, p, (a, b) in zip(lt.record_ids, lt.patient_ids, lt.values,
                                                                 strict=True)))
    runner = CliRunner()
    res = runner.invoke(_app(), ["probe", str(emb), "--labels", str(coded), "-o", str(tmp_path / "p.parquet")])
    assert res.exit_code != 0 and "--continuous AF" in res.output + str(res.exception)
    assert not (tmp_path / "p.parquet").exists()
    res = runner.invoke(_app(), ["probe", str(emb), "--labels", str(coded), "-o", str(tmp_path / "p.parquet"),
                                 "--continuous", "AF"])
    assert res.exit_code == 0, res.output
    assert "continuous targets" in res.output and "AF (1 to 2" in res.output and "LVEF (" in res.output
    meta = pq.read_schema(tmp_path / "p.parquet").metadata
    assert json.loads(meta[b"ecgfm.label_kinds"]) == {"AF": "continuous", "LVEF": "continuous"}


def test_folds_are_not_stratified_on_a_label_without_positives():
    """A label with no positive record (BBB here) has the fewest records of its rarer class (0): stratifying on it
    left a fold of a real cohort without any AF record. The folds stratify on the rarest label with both classes."""
    from ecgfm_cli.labels import LabelTable

    n = 40
    af = np.zeros(n)
    af[:5] = 1
    table = LabelTable(record_ids=np.array([f"r{i}" for i in range(n)], dtype=object), labels=["BBB", "AF"],
                       values=np.column_stack([np.zeros(n), af]), kinds={"BBB": "binary", "AF": "binary"})
    name, y = probe_mod.stratification_label(table, table.record_ids)
    assert name == "AF" and int(y.sum()) == 5
