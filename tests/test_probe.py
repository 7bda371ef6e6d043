"""Linear probe on synthetic embeddings, and probe -> evaluate through the CLI."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import typer
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from ecgfm_cli.commands.evaluate import evaluate_command
from ecgfm_cli.commands.probe import probe_command
from ecgfm_cli.labels import LabelTable
from ecgfm_cli.probe import fit_label, load_embeddings, probe_files, run_probe, standardize


def _app() -> typer.Typer:
    app = typer.Typer()
    app.command("probe")(probe_command)
    app.command("evaluate")(evaluate_command)
    return app


def _data(n_rec=200, d=16, segs=1, separable=True, seed=0):
    """n_rec records of `segs` segments; patients own 1-2 records. Label AF depends on embedding dim 0."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n_rec) < 0.35).astype(float)
    lvef = rng.normal(55, 8, n_rec)
    rid = np.array([f"r{i:04d}" for i in range(n_rec)], dtype=object)
    pid = np.array([f"p{i // 2}" for i in range(n_rec)], dtype=object)
    X = rng.normal(size=(n_rec * segs, d)).astype(np.float32)
    rows = np.repeat(np.arange(n_rec), segs)
    if separable:
        X[:, 0] += 4 * y[rows]
        X[:, 1] += (lvef[rows] - 55) / 2
    lt = LabelTable(record_ids=rid, labels=["AF", "LVEF"], values=np.column_stack([y, lvef]),
                    kinds={"AF": "binary", "LVEF": "continuous"}, patient_ids=pid)
    return X, rid[rows], pid[rows], np.tile(np.arange(segs), n_rec).astype(np.int32), lt


def _write_npz(path, X, rid, pid, seg, meta=None):
    np.savez(path, record_id=rid.astype(str), patient_id=pid.astype(str), segment_index=seg, embedding=X,
             __meta__=np.array(json.dumps(meta or {})))


def _write_parquet(path, X, rid, pid, seg):
    emb = pa.FixedSizeListArray.from_arrays(pa.array(X.ravel(), pa.float32()), X.shape[1])
    t = pa.table({"record_id": rid.tolist(), "patient_id": pid.tolist(), "segment_index": pa.array(seg, pa.int32()),
                  "embedding": emb})
    pq.write_table(t.replace_schema_metadata({"ecgfm.kind": "embeddings", "ecgfm.schema_version": "1",
                                             "ecgfm.contract": json.dumps({"leads": ["I"]})}), path)


def _labels_csv(path, lt: LabelTable):
    lines = ["record_id,patient_id,AF,LVEF"] + [
        f"{r},{p},{int(a)},{b:.3f}" for r, p, (a, b) in zip(lt.record_ids, lt.patient_ids, lt.values, strict=True)]
    path.write_text("\n".join(lines) + "\n")


def _test_auc(table, lt):
    d = table.to_pydict()
    lab = dict(zip(lt.record_ids, lt.values[:, 0], strict=True))
    m = np.array(d["split"]) == "test"
    y = np.array([lab[r] for r in d["record_id"]])[m]
    return roc_auc_score(y, np.array(d["AF"])[m])


def test_probe_separable_and_random(tmp_path):
    X, rid, pid, seg, lt = _data()
    _write_npz(tmp_path / "e.npz", X, rid, pid, seg)
    prov = {"command": ["test"]}
    summary = probe_files(tmp_path / "e.npz", lt, tmp_path / "p.parquet", prov, seed=0)
    t = pq.read_table(tmp_path / "p.parquet")
    assert _test_auc(t, lt) > 0.95
    assert summary["labels"]["AF"]["status"] == "fitted" and summary["labels"]["LVEF"]["alpha"] > 0
    meta = {k.decode(): v.decode() for k, v in t.schema.metadata.items()}
    assert json.loads(meta["ecgfm.labels"]) == ["AF", "LVEF"]
    assert json.loads(meta["ecgfm.label_kinds"]) == {"AF": "binary", "LVEF": "continuous"}
    assert json.loads(meta["ecgfm.provenance"])["command"] == ["test"]
    assert set(t.column("split").to_pylist()) == {"train", "valid", "test"}
    # continuous target recovered
    d = t.to_pydict()
    m = np.array(d["split"]) == "test"
    lv = dict(zip(lt.record_ids, lt.values[:, 1], strict=True))
    assert np.corrcoef(np.array(d["LVEF"])[m], [lv[r] for r in np.array(d["record_id"])[m]])[0, 1] > 0.9
    # random embeddings: chance level
    Xr, rid, pid, seg, ltr = _data(n_rec=1000, separable=False, seed=1)
    _write_npz(tmp_path / "r.npz", Xr, rid, pid, seg)
    probe_files(tmp_path / "r.npz", ltr, tmp_path / "pr.parquet", prov, seed=0)
    assert 0.3 < _test_auc(pq.read_table(tmp_path / "pr.parquet"), ltr) < 0.7


def test_single_class_in_train_is_skipped_with_nan_column():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(50, 4))
    split = np.array(["train"] * 30 + ["valid"] * 10 + ["test"] * 10, dtype=object)
    y = np.zeros(50)
    y[45] = 1  # a positive only in test
    pred, info = fit_label(standardize(X, split == "train"), y, split, "binary")
    assert np.isnan(pred).all() and info["status"] == "skipped" and "single class" in info["reason"]
    # valid with one class: default C, recorded
    y2 = np.r_[rng.integers(0, 2, 30), np.zeros(20)].astype(float)
    pred2, info2 = fit_label(standardize(X, split == "train"), y2, split, "binary")
    assert info2["C"] == 1.0 and "default" in info2["selection"] and np.isfinite(pred2).all()
    P, infos = run_probe(X, np.column_stack([y, y2]), ["a", "b"], {"a": "binary", "b": "binary"}, split)
    assert np.isnan(P[:, 0]).all() and infos["b"]["status"] == "fitted"


def test_cli_probe_then_evaluate_with_baseline(tmp_path):
    X, rid, pid, seg, lt = _data(n_rec=120, segs=2)
    _write_parquet(tmp_path / "e.parquet", X, rid, pid, seg)
    Xr = np.random.default_rng(9).normal(size=X.shape).astype(np.float32)
    _write_npz(tmp_path / "rand.npz", Xr, rid, pid, seg)
    emb = load_embeddings(tmp_path / "e.parquet")
    assert emb.X.shape == (240, 16) and emb.meta["contract"] == {"leads": ["I"]}
    _labels_csv(tmp_path / "labels.csv", lt)
    # an extra embedded record with no labels is excluded and counted
    runner = CliRunner()
    res = runner.invoke(_app(), ["probe", str(tmp_path / "e.parquet"), "--labels", str(tmp_path / "labels.csv"),
                                 "-o", str(tmp_path / "preds.parquet"), "--baseline", str(tmp_path / "rand.npz"),
                                 "--c-grid", "0.01,1"])
    assert res.exit_code == 0, res.output
    main = pq.read_table(tmp_path / "preds.parquet").to_pydict()
    base = pq.read_table(tmp_path / "preds.baseline.parquet").to_pydict()
    assert main["split"] == base["split"] and main["record_id"] == base["record_id"]
    # segments of a record share a split; no patient in two splits
    per_rec, per_pat = {}, {}
    for r, p, s in zip(main["record_id"], main["patient_id"], main["split"], strict=True):
        per_rec.setdefault(r, set()).add(s)
        per_pat.setdefault(p, set()).add(s)
    assert all(len(v) == 1 for v in per_rec.values()) and all(len(v) == 1 for v in per_pat.values())
    res = runner.invoke(_app(), ["evaluate", str(tmp_path / "preds.parquet"), "--labels", str(tmp_path / "labels.csv"),
                                 "--aggregate", "mean", "--bootstrap", "100", "-o", str(tmp_path / "r.json"),
                                 "--baseline", str(tmp_path / "preds.baseline.parquet")])
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["levels"]["record"]["labels"]["AF"]["auroc"]["value"] > 0.95
    assert rep["baseline"]["levels"]["record"]["labels"]["AF"]["auroc"]["value"] < 0.85
    assert rep["levels"]["record"]["labels"]["LVEF"]["r2"]["value"] > 0.5
    assert rep["upstream"]["leads"] == ["I"] and rep["upstream"]["probe"]["labels"]["AF"]["C"] in (0.01, 1.0)
    assert "| LVEF |" in res.stdout


def test_cli_probe_errors(tmp_path, capsys):
    """Through the real entry point: each mistake is one line, exit status 2, before anything is written."""
    from conftest import run_main

    X, rid, pid, seg, lt = _data(n_rec=20)
    emb, labels, out = tmp_path / "e.npz", tmp_path / "l.csv", tmp_path / "p.parquet"
    _write_npz(emb, X, rid, pid, seg)
    _labels_csv(labels, lt)

    def probe(*args):
        return run_main(capsys, "probe", *args)

    code, err = probe(emb, "--labels", labels, "-o", tmp_path / "p.csv")
    assert code == 2 and "ecgfm probe: error:" in err and ".parquet" in err
    (tmp_path / "other.csv").write_text("record_id,AF\nzzz,1\n")
    code, err = probe(emb, "--labels", tmp_path / "other.csv", "-o", out)
    assert code == 2 and "not in the labels" not in err and "record_id" in err
    assert not out.exists()
    # a bad --baseline is found before the main predictions are written; outputs are checked before any work
    (tmp_path / "junk.npz").write_bytes(b"not an npz")
    code, err = probe(emb, "--labels", labels, "-o", out, "--baseline", tmp_path / "junk.npz")
    assert code == 2 and "junk.npz" in err and not out.exists()
    code, err = probe(emb, "--labels", labels, "-o", out, "--baseline", emb, "--baseline-output", tmp_path / "b.csv")
    assert code == 2 and "--baseline-output" in err and ".parquet" in err
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "embeddings-0.parquet").write_bytes(b"not parquet")
    code, err = probe(tmp_path / "shards", "--labels", labels, "-o", out)
    assert code == 2 and "embeddings-0.parquet: cannot read as Parquet" in err
    (tmp_path / "afile").write_text("x")
    code, err = probe(emb, "--labels", labels, "-o", tmp_path / "afile" / "p.parquet")
    assert code == 2 and "is a file" in err


@pytest.mark.parametrize("segs", [1, 3])
def test_probe_label_columns_follow_label_table(tmp_path, segs):
    X, rid, pid, seg, lt = _data(n_rec=60, segs=segs)
    _write_npz(tmp_path / "e.npz", X, rid, pid, seg)
    probe_files(tmp_path / "e.npz", lt, tmp_path / "p.parquet", {}, seed=2)
    t = pq.read_table(tmp_path / "p.parquet")
    assert t.column_names == ["record_id", "patient_id", "segment_index", "split", "AF", "LVEF"]
    assert t.num_rows == 60 * segs


def test_default_regularisation_is_said_on_the_console(tmp_path):
    """A label whose valid split has one class gets the default C: the run says so, not only the metadata."""
    from ecgfm_cli.labels import labels_from_table
    from ecgfm_cli.probe import probe_files

    X, rid, pid, seg, lt = _data(n_rec=60)
    _write_npz(tmp_path / "e.npz", X, rid, pid, seg)
    split = np.array(["train"] * 40 + ["valid"] * 10 + ["test"] * 10)
    af = lt.values[:, 0].copy()
    af[40:50] = 0  # valid: negatives only
    table = pa.table({"record_id": rid.tolist(), "patient_id": pid.tolist(), "split": split.tolist(), "AF": af})
    logs: list[str] = []
    probe_files(tmp_path / "e.npz", labels_from_table(table), tmp_path / "p.parquet", {}, log=logs.append)
    assert any("fitted with the default C/alpha" in m and "AF" in m for m in logs), logs
