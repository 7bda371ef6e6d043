"""`splits.record_splits` on id arrays: the one split rule `ecgfm probe` (embedding rows) and `ecgfm finetune`
(segment rows) share."""

from __future__ import annotations

import numpy as np
import pytest

from ecgfm_cli.errors import EcgfmError
from ecgfm_cli.labels import LabelTable
from ecgfm_cli.splits import record_splits


def _labels(n: int, patient_ids=None, split=None) -> LabelTable:
    rids = np.array([f"r{i}" for i in range(n)], dtype=object)
    return LabelTable(rids, ["AF"], np.zeros((n, 1)), {"AF": "binary"}, patient_ids=patient_ids, split=split)


def test_segment_rows_split_as_their_records() -> None:
    """Rows repeating a record (segments) get the split of one row per record, and patient ids from the labels
    win over the rows' own: two records of one patient never straddle splits."""
    n = 40
    pids = np.array([f"p{i // 2}" for i in range(n)], dtype=object)  # two records per patient
    labels = _labels(n, patient_ids=pids)
    one = np.array([f"r{i}" for i in range(n)], dtype=object)
    many = np.repeat(one, 3)  # three segments per record, rows' own patient ids unknown
    a, notes_a, check_a = record_splits(labels, one, np.full(n, None, dtype=object), (0.6, 0.2, 0.2), seed=4)
    b, _, check_b = record_splits(labels, many, np.full(len(many), None, dtype=object), (0.6, 0.2, 0.2), seed=4)
    assert a == b and set(a) == set(one) and set(a.values()) == {"train", "valid", "test"}
    assert all(a[f"r{2 * k}"] == a[f"r{2 * k + 1}"] for k in range(n // 2))
    assert check_a == check_b and check_a["source"] == "assigned" and check_a["patients_in_multiple_splits"] == 0
    assert any("patient-grouped" in note for note in notes_a)


def test_split_column_is_used_and_an_empty_cell_refused() -> None:
    split = np.array(["train", "valid", "test", "train"], dtype=object)
    rows = np.array(["r3", "r0", "r0", "r1", "r2"], dtype=object)
    got, _, check = record_splits(_labels(4, split=split), rows, np.full(5, None, dtype=object), (0.8, 0.1, 0.1), 1)
    assert got == {"r3": "train", "r0": "train", "r1": "valid", "r2": "test"} and check["source"] == "labels"
    split[1] = None
    with pytest.raises(EcgfmError, match="1 labelled records have an empty 'split'"):
        record_splits(_labels(4, split=split), rows, np.full(5, None, dtype=object), (0.8, 0.1, 0.1), 1)
