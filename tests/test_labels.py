"""Labels, label maps, aggregation rules and patient-grouped splits."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ecgfm_cli.labels import (
    LabelError,
    default_aggregation,
    label_kind,
    labels_from_table,
    load_label_map,
    load_labels,
    parse_label_map,
    resolve_aggregation,
)
from ecgfm_cli.splits import assign_splits, check_patient_disjoint, parse_fractions, patient_keys


def test_challenge2021_map_merges_equivalent_codes():
    lm = load_label_map("challenge2021")
    assert len(lm.labels) == 26
    for a, b, name in [("713427006", "59118001", "CRBBB|RBBB"), ("284470004", "63593006", "PAC|SVPB"),
                       ("427172004", "17338001", "PVC|VPB"), ("733534002", "164909002", "CLBBB|LBBB")]:
        assert lm.code_to_label[a] == lm.code_to_label[b] == name
    table = pa.table({
        "record_id": ["r1", "r2", "r3", "r4"],
        "patient_id": ["p1", "p2", None, "p4"],
        "codes": [["59118001"], ["713427006", "164889003"], [], None],
    })
    lt = labels_from_table(table, lm)
    j = lt.labels.index("CRBBB|RBBB")
    af = lt.labels.index("AF")
    assert lt.values[:, j].tolist()[:3] == [1.0, 1.0, 0.0]
    assert lt.values[1, af] == 1.0
    assert np.isnan(lt.values[3]).all()  # null code list = unknown, not negative
    assert all(k == "binary" for k in lt.kinds.values())


def test_label_map_csv_conflict_and_unmapped(tmp_path):
    with pytest.raises(LabelError, match="maps to both"):
        parse_label_map("code,label\n1,A\n1,B\n")
    f = tmp_path / "map.csv"
    f.write_text("# comment\ncode,label\n1,A\n2,A\n3,B\n")
    lm = load_label_map(f)
    assert lm.labels == ("A", "B")
    lt = labels_from_table(pa.table({"record_id": ["x", "y"], "codes": [["1", "9"], ["2", "3"]]}), lm)
    assert lt.values.tolist() == [[1.0, 0.0], [1.0, 1.0]]
    assert any("not in the label map" in n and "9" in n for n in lt.notes)
    with pytest.raises(LabelError, match="neither a file nor a packaged map"):
        load_label_map("no-such-map")
    # a map for another dataset maps nothing: an error, not a run of all-unknown labels
    with pytest.raises(LabelError, match=r"no code of the table is in the label map \(2 distinct codes, e.g. MI, N"):
        labels_from_table(pa.table({"record_id": ["x", "y"], "codes": [["NORM"], ["MI"]]}), lm)
    # a long table with label columns besides its codes (ingest's with --labels joined) works without a map
    lt = labels_from_table(pa.table({"record_id": ["x", "y"], "codes": [["1"], None], "af": [1, 0]}))
    assert lt.labels == ["af"] and lt.values[:, 0].tolist() == [1.0, 0.0]


def test_wide_table_kinds_and_checks(tmp_path):
    csv = tmp_path / "labels.csv"
    csv.write_text("record_id,patient_id,split,AF,LVEF,site\nr1,p1,train,1,55.5,a\nr2,p1,train,0,,b\n"
                   "r3,,test,,30,c\n")
    lt = load_labels(csv)
    assert lt.labels == ["AF", "LVEF"]
    assert lt.kinds == {"AF": "binary", "LVEF": "continuous"}
    assert np.isnan(lt.values[2, 0]) and np.isnan(lt.values[1, 1])
    assert lt.split.tolist() == ["train", "train", "test"]
    assert lt.patient_ids.tolist() == ["p1", "p1", None]
    assert any("'site'" in n for n in lt.notes)  # ignored column is reported, not silently dropped
    # the same through Parquet
    pq.write_table(pa.table({"record_id": ["a", "b"], "X": [True, False]}), tmp_path / "l.parquet")
    assert load_labels(tmp_path / "l.parquet").values.tolist() == [[1.0], [0.0]]
    with pytest.raises(LabelError, match="not unique"):
        labels_from_table(pa.table({"record_id": ["a", "a"], "X": [1, 0]}))
    with pytest.raises(LabelError, match="--label-map"):
        labels_from_table(pa.table({"record_id": ["a"], "codes": [["1"]]}))
    with pytest.raises(LabelError, match="split column"):
        labels_from_table(pa.table({"record_id": ["a"], "X": [1], "split": ["training"]}))


def test_label_kind():
    assert label_kind(np.array([0, 1, np.nan])) == "binary"
    assert label_kind(np.array([0, 0.5])) == "continuous"


def test_aggregation_rules(tmp_path):
    for name in ["Poor data quality", "Premature ventricular contraction", "PVC", "VT", "ventricular tachycardia",
                 "Supraventricular tachycardia with aberrancy", "Electronic pacemaker", "PVC|VPB"]:
        assert default_aggregation(name) == "max", name
    for name in ["Atrial fibrillation", "Sinus rhythm", "AF", "Tachycardia", "CRBBB|RBBB"]:
        assert default_aggregation(name) == "mean", name
    # a packaged map's descriptive name counts: PR = pacing rhythm
    lm = load_label_map("challenge2021")
    assert resolve_aggregation(["PR", "AF"], "label", label_map=lm) == {"PR": "max", "AF": "mean"}
    assert resolve_aggregation(["a", "b"], "min") == {"a": "min", "b": "min"}
    assert resolve_aggregation(["AF", "PVC"], "label", {"af": "max", "PVC": "mean"}) == {"AF": "max", "PVC": "mean"}
    with pytest.raises(LabelError, match="not a label"):
        resolve_aggregation(["AF"], "label", {"LBBB": "max"})
    with pytest.raises(LabelError, match="not one of"):
        resolve_aggregation(["AF"], "label", {"AF": "median"})


def test_patient_grouped_split_disjoint_and_deterministic():
    rng = np.random.default_rng(1)
    n = 2000
    pids = np.array([f"p{i}" for i in rng.integers(0, 400, n)], dtype=object)
    pids[:50] = None  # records without patient id are their own patient
    rids = np.array([f"r{i}" for i in range(n)], dtype=object)
    s1 = assign_splits(rids, pids, (0.8, 0.1, 0.1), seed=3)
    s2 = assign_splits(rids, pids, (0.8, 0.1, 0.1), seed=3)
    assert (s1 == s2).all()
    assert not (s1 == assign_splits(rids, pids, (0.8, 0.1, 0.1), seed=4)).all()
    keys = patient_keys(rids, pids)
    assert check_patient_disjoint(keys, s1) == {}
    frac = {s: np.mean(s1 == s) for s in ("train", "valid", "test")}
    assert abs(frac["train"] - 0.8) < 0.05 and abs(frac["test"] - 0.1) < 0.04
    # row order does not matter
    perm = rng.permutation(n)
    assert (assign_splits(rids[perm], pids[perm], (0.8, 0.1, 0.1), seed=3) == s1[perm]).all()
    # small sets still fill every split
    small = assign_splits([f"r{i}" for i in range(10)], None, (0.8, 0.1, 0.1), seed=0)
    assert sorted(small.tolist()).count("train") == 8 and set(small) == {"train", "valid", "test"}


def test_check_patient_disjoint_reports_overlap():
    keys = patient_keys(["a", "b", "c"], ["p1", "p1", "p2"])
    assert check_patient_disjoint(keys, ["train", "test", "test"]) == {"patient:p1": ["test", "train"]}


def test_parse_fractions():
    assert parse_fractions("0.7,0.15,0.15") == (0.7, 0.15, 0.15)
    with pytest.raises(ValueError):
        parse_fractions("0.5,0.5")


@pytest.mark.shared
def test_challenge2021_map_on_real_labels(shared_data):
    """The shared Challenge subset: 9 AF records and 3 AFL records (SOURCE.md), RBBB codes merged."""
    import csv

    with open(shared_data / "physionet_challenge_2020_2021" / "labels.csv") as fh:
        rows = list(csv.DictReader(fh))
    table = pa.table({"record_id": [r["record"] for r in rows],
                      "codes": [r["dx_snomed"].split(";") if r["dx_snomed"] else [] for r in rows]})
    lt = labels_from_table(table, load_label_map("challenge2021"))
    col = {lab: lt.values[:, j] for j, lab in enumerate(lt.labels)}
    assert col["AF"].sum() == 9 and col["AFL"].sum() == 3
    rbbb = {r["record"] for r in rows if {"59118001", "713427006"} & set(r["dx_snomed"].split(";"))}
    assert set(lt.record_ids[col["CRBBB|RBBB"] == 1]) == rbbb
