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
    assert any("stratified on every binary label" in m and "1 of the 1 labels" in m
               and "continuous labels are not stratified (LVEF)" in m for m in logs), logs
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
    P, _ = probe_mod.run_probe_folds(X, y, ["AF"], {"AF": "binary"}, fold, y == 1, keys)
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
    assert af["auroc"]["value"] > 0.75  # 6 positives: one unlucky inner valid part costs ~0.1


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
    """A label with no positive record (BBB here) has nothing to spread: stratifying on it left a fold of a real
    cohort without any AF record. It is passed over; AF is stratified on (its rarer class, the positives)."""
    n = 40
    af = np.zeros(n)
    af[:5] = 1
    table = LabelTable(record_ids=np.array([f"r{i}" for i in range(n)], dtype=object), labels=["BBB", "AF", "LVEF"],
                       values=np.column_stack([np.zeros(n), af, np.arange(n)]),
                       kinds={"BBB": "binary", "AF": "binary", "LVEF": "continuous"})
    names, S = probe_mod.stratification_labels(table, table.record_ids)
    assert names == ["AF"] and S.shape == (n, 1) and int(S.sum()) == 5


# --------------------------------------------------------------------------- stratified on every label (#17.3)
def _multilabel_cohort(seed: int, n_patients: int = 60, k: int = 5):
    """Patients of 1-3 records; label 'rare' has one positive record (the rarest: the old rule stratified on it),
    'AF' has exactly k positive patients, 'RBBB' 2k, 'male' about half, 'age' continuous."""
    rng = np.random.default_rng(seed)
    per = rng.integers(1, 4, n_patients)
    pid = np.repeat([f"p{i}" for i in range(n_patients)], per).astype(object)
    n = len(pid)
    rid = np.array([f"r{i:03d}" for i in range(n)], dtype=object)
    first = np.r_[0, np.cumsum(per)[:-1]]  # each patient's first record

    def on_patients(m: int) -> np.ndarray:
        v = np.zeros(n)
        v[first[rng.choice(n_patients, m, replace=False)]] = 1
        return v

    cols = {"rare": on_patients(1), "AF": on_patients(k), "RBBB": on_patients(2 * k),
            "male": (rng.random(n) < 0.5).astype(float), "age": rng.normal(60, 10, n)}
    kinds = {lab: "continuous" if lab == "age" else "binary" for lab in cols}
    return LabelTable(record_ids=rid, labels=list(cols), values=np.column_stack(list(cols.values())), kinds=kinds,
                      patient_ids=pid)


def _folds(lt: LabelTable, k: int, seed: int) -> tuple[np.ndarray, list[str]]:
    emb = probe_mod.Embeddings(lt.record_ids, lt.patient_ids, np.zeros(len(lt.record_ids), dtype=np.int32),
                               np.zeros((len(lt.record_ids), 2), dtype=np.float32))
    fold_of, notes = probe_mod.assign_folds(lt, emb, k, seed)
    return np.array([fold_of[r] for r in lt.record_ids]), notes


@pytest.mark.parametrize("k", [3, 5])
def test_every_label_with_k_positive_patients_is_in_every_fold(k):
    """The old rule stratified on the rarest label only ('rare', 1 positive), leaving AF's k positive patients to
    chance: with these cohorts and seeds some fold had no AF (or no RBBB) record. Now every label with >= k
    patients in its rarer class is in every fold, patients are never split, and fold sizes stay balanced."""
    for seed in range(8):
        lt = _multilabel_cohort(seed, k=k)
        fold, notes = _folds(lt, k, seed)
        for j, lab in enumerate(lt.labels[:4]):
            assert set(fold[lt.values[:, j] == 1]) == set(range(k)) or lab == "rare", (seed, lab, fold)
        # male: the rarer class is whichever has fewer records; both classes are in every fold
        male = lt.values[:, 3]
        assert set(fold[male == 1]) == set(fold[male == 0]) == set(range(k))
        for p in set(lt.patient_ids):
            assert len(set(fold[lt.patient_ids == p])) == 1
        sizes = np.bincount(fold, minlength=k)
        assert sizes.max() - sizes.min() <= max(3, len(fold) // (5 * k)), sizes  # groups hold up to 3 records
        assert f"3 of the 3 labels with >= {k} patients in their rarer class have one in every fold" in notes[0]
        assert "1 label has fewer than" in notes[0] and "(age)" in notes[0]


def test_folds_are_deterministic_by_seed():
    lt = _multilabel_cohort(0)
    a, _ = _folds(lt, 5, 7)
    b, _ = _folds(lt, 5, 7)
    c, _ = _folds(lt, 5, 8)
    assert (a == b).all() and not (a == c).all()
    S = np.random.default_rng(1).random((50, 4)) < 0.2
    g = np.arange(50) // 2
    assert (probe_mod.stratified_group_folds(S, g, 4, 3) == probe_mod.stratified_group_folds(S, g, 4, 3)).all()


def test_group_folds_keep_many_labels_in_every_fold():
    """Random multi-label cohorts with 20 overlapping labels of 1-10 % prevalence (the Challenge cohort's kind):
    groups stay whole and a label carried by >= k groups is in every fold, bar a rare conflict between labels
    (1 of the 384 labels here; in a like simulation the old single-label rule missed a fold for 40 % of them)."""
    rng = np.random.default_rng(0)
    n_labels = missed = 0
    for trial in range(30):
        n, k = int(rng.integers(80, 200)), 5
        groups = rng.integers(0, n // 2, n)
        S = rng.random((n, 20)) < rng.uniform(0.01, 0.1, 20)
        fold = probe_mod.stratified_group_folds(S, groups, k, trial)
        for g in np.unique(groups):
            assert len(set(fold[groups == g])) == 1
        for m in range(20):
            if len(set(groups[S[:, m]])) >= k:
                n_labels += 1
                missed += set(fold[S[:, m]]) != set(range(k))
    assert n_labels == 384 and missed <= 1
    fold = probe_mod.stratified_group_folds(np.zeros((103, 0), dtype=bool), np.arange(103), 5, 0)
    assert sorted(np.bincount(fold)) == [20, 20, 21, 21, 21]


def test_a_label_that_cannot_be_in_every_fold_is_named():
    """a on {p1, p2}, b on {p1, p3}, c on {p2, p3}: two folds cannot separate all three pairs; the note says so."""
    rid = np.array([f"r{i}" for i in range(8)], dtype=object)
    v = np.zeros((8, 3))
    v[[0, 1], 0] = v[[0, 2], 1] = v[[1, 2], 2] = 1
    lt = LabelTable(record_ids=rid, labels=["a", "b", "c"], values=v, kinds=dict.fromkeys("abc", "binary"),
                    patient_ids=np.array([f"p{i}" for i in range(8)], dtype=object))
    fold, notes = _folds(lt, 2, 0)
    covered = [lab for j, lab in enumerate(lt.labels) if set(fold[v[:, j] == 1]) == {0, 1}]
    assert len(covered) == 2
    missed = ({"a", "b", "c"} - set(covered)).pop()
    assert f"2 of the 3 labels with >= 2 patients in their rarer class have one in every fold (not: {missed})" \
        in notes[0], notes


def test_inner_valid_part_is_stratified_on_every_label():
    """The part of the training folds C is chosen on holds every label that has >= n_folds - 1 patients there."""
    lt = _multilabel_cohort(2)
    fold, _ = _folds(lt, 5, 0)
    strata = probe_mod._row_strata(lt, lt.record_ids)
    keys = probe_mod.patient_keys(lt.record_ids, lt.patient_ids)
    for k in range(5):
        split = probe_mod.inner_split(fold, k, strata, keys, 5, 0)
        assert set(split[fold == k]) == {"test"} and (split == "valid").any()
        for j in (1, 2):  # AF (4 of its 5 patients in training), RBBB
            tr = (fold != k) & (strata[:, j])
            if len(set(keys[tr])) >= 4:
                assert (split[tr] == "valid").any(), (k, lt.labels[j])
