"""Patient-grouped train/valid/test splits (pure functions over arrays)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

SPLITS = ("train", "valid", "test")
DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)


def patient_keys(record_ids: Sequence[str], patient_ids: Sequence[str | None] | None) -> np.ndarray:
    """The grouping key per row: the patient id, or ``record:<record_id>`` when it is missing or empty
    (a record without a patient id is its own patient)."""
    rids = np.asarray(record_ids, dtype=object)
    if patient_ids is None:
        return np.array([f"record:{r}" for r in rids], dtype=object)
    pids = np.asarray(patient_ids, dtype=object)
    return np.array(
        [f"patient:{p}" if p is not None and str(p) != "" else f"record:{r}" for r, p in zip(rids, pids, strict=True)],
        dtype=object,
    )


def parse_fractions(text: str) -> tuple[float, float, float]:
    """``"0.8,0.1,0.1"`` -> (0.8, 0.1, 0.1); must be three non-negative numbers summing to 1."""
    try:
        fr = tuple(float(x) for x in text.split(","))
    except ValueError:
        fr = ()
    if len(fr) != 3 or any(f < 0 for f in fr) or abs(sum(fr) - 1) > 1e-6:
        raise ValueError(f"split fractions must be three non-negative numbers summing to 1 (train,valid,test); "
                         f"got {text!r}")
    return fr  # type: ignore[return-value]


def assign_splits(
    record_ids: Sequence[str],
    patient_ids: Sequence[str | None] | None,
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
    seed: int = 0,
) -> np.ndarray:
    """Assign each row to ``train``/``valid``/``test`` so that no patient is in two splits.

    record_ids, patient_ids: length N (rows may repeat a record, e.g. segments; patient_ids may be None).
    Patients are shuffled with ``seed`` (from their sorted ids, so row order does not matter) and laid out along
    [0, 1) in proportion to their row counts; a patient goes to the split whose fraction interval holds the
    midpoint of its span. The row fractions therefore approach ``fractions`` as the number of patients grows.
    Returns an object array of N split names.
    """
    fr = np.asarray(fractions, dtype=np.float64)
    if fr.shape != (3,) or (fr < 0).any() or abs(fr.sum() - 1) > 1e-6:
        raise ValueError(f"fractions must be 3 non-negative numbers summing to 1, got {fractions}")
    keys = patient_keys(record_ids, patient_ids)
    if len(keys) == 0:
        return np.array([], dtype=object)
    uniq, inverse, counts = np.unique(keys.astype(str), return_inverse=True, return_counts=True)
    order = np.random.default_rng(seed).permutation(len(uniq))
    c = counts[order].astype(np.float64)
    mid = (np.cumsum(c) - c / 2) / c.sum()
    bounds = np.cumsum(fr)[:2]
    split_of_shuffled = np.searchsorted(bounds, mid, side="right")
    split_of_patient = np.empty(len(uniq), dtype=np.int64)
    split_of_patient[order] = split_of_shuffled
    names = np.array(SPLITS, dtype=object)
    return names[split_of_patient[inverse]]


def check_patient_disjoint(patient_keys_: Sequence[str], splits: Sequence[str | None]) -> dict[str, list[str]]:
    """Patients that occur in more than one split: {patient key: sorted split names}. Empty when disjoint.

    Rows with a missing split are ignored.
    """
    seen: dict[str, set[str]] = {}
    for p, s in zip(patient_keys_, splits, strict=True):
        if s is None:
            continue
        seen.setdefault(str(p), set()).add(str(s))
    return {p: sorted(s) for p, s in seen.items() if len(s) > 1}


def split_summary(splits: Sequence[str | None], keys: Sequence[str]) -> dict[str, dict[str, int]]:
    """{split: {"rows": n, "patients": n}} for reports."""
    s = np.asarray(splits, dtype=object)
    k = np.asarray(keys, dtype=object)
    out = {}
    for name in SPLITS:
        m = s == name
        if m.any():
            out[name] = {"rows": int(m.sum()), "patients": len(set(k[m]))}
    return out
