"""Patient-grouped train/valid/test splits (pure functions over arrays)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ecgfm_cli.eval_options import SPLIT_FRACTIONS

if TYPE_CHECKING:
    from ecgfm_cli.labels import LabelTable

SPLITS = ("train", "valid", "test")


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
    fractions: tuple[float, float, float] = SPLIT_FRACTIONS,
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


#: Fewer positives (or negatives) than this in a valid/test split or a fold makes a label's figures unreliable.
MIN_CLASS_COUNT = 5


def group_counts(groups: Sequence[object], keys: Sequence[str], record_ids: Sequence[str], Y: np.ndarray,
                 labels: Sequence[str], kinds: dict[str, str]) -> dict[str, dict]:
    """Per group (split name or fold): ``{"patients", "records", "labels": {label: {"pos", "neg"} | {"n"}}}``,
    counted over records (a record's segments count once). ``Y`` (N, L) per row, NaN = unknown; rows of one
    record carry the same labels."""
    g = np.asarray(groups, dtype=object)
    rid = np.asarray(record_ids, dtype=object)
    _, first = np.unique(rid.astype(str), return_index=True)
    g, k, rid, Y = g[first], np.asarray(keys, dtype=object)[first], rid[first], np.asarray(Y)[first]
    out: dict[str, dict] = {}
    for name in sorted({str(x) for x in g if x is not None}, key=lambda s: (SPLITS.index(s) if s in SPLITS
                                                                             else len(SPLITS), s)):
        m = np.array([str(x) == name for x in g])
        entry = {"patients": len(set(k[m])), "records": int(m.sum()), "labels": {}}
        for j, lab in enumerate(labels):
            v = Y[m, j]
            v = v[~np.isnan(v)]
            entry["labels"][lab] = ({"pos": int((v == 1).sum()), "neg": int((v == 0).sum())}
                                    if kinds[lab] == "binary" else {"n": int(len(v))})
        out[name] = entry
    return out


def _describe(entry: dict, labels: Sequence[str], kinds: dict[str, str], limit: int = 6) -> str:
    """``"5 patients, 8 records, AF 1+/7-, LVEF n=8"`` for one entry of :func:`group_counts`."""
    parts = [f"{entry['patients']} patients, {entry['records']} records"]
    # binary labels first: their class counts are what makes a split too small
    for lab in sorted(labels, key=lambda lab: kinds[lab] != "binary")[:limit]:
        c = entry["labels"][lab]
        parts.append(f"{lab} {c['pos']}+/{c['neg']}-" if kinds[lab] == "binary" else f"{lab} n={c['n']}")
    return ", ".join(parts) + (", ..." if len(labels) > limit else "")


def fold_counts_line(counts: dict[str, dict], labels: Sequence[str], kinds: dict[str, str]) -> str:
    """One line of per-fold counts (patients, records, positives/negatives per label)."""
    return "folds: counts per fold: " + "; ".join(f"{name}: {_describe(e, labels, kinds)}"
                                                  for name, e in counts.items())


def small_group_warnings(counts: dict[str, dict], labels: Sequence[str], kinds: dict[str, str],
                         groups: Sequence[str], what: str, remedy: str) -> list[str]:
    """Warning lines for the ``groups`` of ``counts`` (e.g. valid and test, or every fold) that are empty or hold
    fewer than :data:`MIN_CLASS_COUNT` positives or negatives of a binary label (or no value of a continuous
    one), with the counts of every group and ``remedy`` (what to do instead). Empty when nothing is small."""
    problems = []
    for name in groups:
        entry = counts.get(name)
        if entry is None or entry["records"] == 0:
            problems.append(f"the {name} {what} is empty")
            continue
        for lab in labels:
            c = entry["labels"][lab]
            if kinds[lab] == "binary" and min(c["pos"], c["neg"]) < MIN_CLASS_COUNT:
                problems.append(f"{lab}: {c['pos']} positive / {c['neg']} negative records in {what} {name}")
            elif kinds[lab] != "binary" and c["n"] == 0:
                problems.append(f"{lab}: no value in {what} {name}")
    if not problems:
        return []
    shown = "; ".join(problems[:8]) + (f"; ... ({len(problems) - 8} more)" if len(problems) > 8 else "")
    table = "; ".join(f"{name}: {_describe(e, labels, kinds)}" for name, e in counts.items())
    return [f"WARNING: {what}s too small for reliable figures (fewer than {MIN_CLASS_COUNT} of a class): {shown}",
            f"WARNING: counts per {what}: {table}", f"WARNING: {remedy}"]


def record_splits(labels: LabelTable, record_ids: np.ndarray, patient_ids: np.ndarray,
                  fractions: tuple[float, float, float], seed: int) -> tuple[dict[str, str], list[str], dict[str, Any]]:
    """record_id -> split for the records of the rows ``record_ids`` (N,) (repeats allowed: segments), whose
    ``patient_ids`` (N,) are None where unknown: the labels' ``split`` column when it has one, otherwise a
    patient-grouped assignment (patient id from the labels, else from ``patient_ids``). What ``ecgfm probe``
    (embedding rows) and ``ecgfm finetune`` (segment rows) split by. Returns the mapping, notes, and a
    split-check dict (``source``, ``patients_in_multiple_splits``, ``examples``)."""
    from ecgfm_cli.labels import LabelError

    notes: list[str] = []
    lidx = labels.index()
    # one row per record (first occurrence), patient id from labels when present
    _, first = np.unique(record_ids.astype(str), return_index=True)
    rids = record_ids[np.sort(first)]
    pids = []
    for r, p in zip(rids, patient_ids[np.sort(first)], strict=True):
        lp = labels.patient_ids[lidx[r]] if labels.patient_ids is not None and r in lidx else None
        pids.append(lp if lp not in (None, "") else p)
    keys = patient_keys(rids, pids)
    if labels.split is not None and any(s is not None for s in labels.split):
        sp = np.array([labels.split[lidx[r]] if r in lidx else None for r in rids], dtype=object)
        n_none = sum(1 for r, s in zip(rids, sp, strict=True) if s is None and r in lidx)
        if n_none:
            raise LabelError(f"{n_none} labelled records have an empty 'split'; fill it (train/valid/test) or "
                             f"drop the column to get a patient-grouped split")
        notes.append("splits: taken from the labels' split column")
        source = "labels"
    else:
        sp = assign_splits(rids, pids, fractions, seed)
        notes.append(f"splits: patient-grouped, fractions {fractions}, seed {seed}")
        source = "assigned"
    overlap = check_patient_disjoint(keys, sp)
    if overlap:
        ex = ", ".join(list(overlap)[:3])
        notes.append(f"WARNING: {len(overlap)} patients occur in more than one split (e.g. {ex}); "
                     f"metrics will be optimistic")
    check = {"source": source, "patients_in_multiple_splits": len(overlap), "examples": list(overlap)[:10]}
    return dict(zip(rids, sp, strict=True)), notes, check
