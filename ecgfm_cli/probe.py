"""Linear probing of frozen embeddings (scikit-learn; no torch).

Per label: features standardised on the train split; binary labels get a logistic regression
(``class_weight="balanced"``) whose C is chosen on the valid split by average precision; continuous targets get a
ridge regression whose alpha is chosen on the valid split by mean squared error. Rows are segments (or records when
the embeddings were pooled per record); every segment inherits its record's labels and split, and splits are
patient-grouped.

A label that has a single class (or, continuous, fewer than 2 values) among its train rows is **skipped**: its
prediction column is all NaN, the reason is printed and stored in the ``ecgfm.probe`` metadata, and
``ecgfm evaluate`` reports the label as skipped. A label whose valid split is empty or has one class falls back
to C = 1 (alpha = 1), also recorded.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ecgfm_cli.labels import LabelError, LabelTable, read_table, string_column, table_metadata
from ecgfm_cli.splits import SPLITS, assign_splits, check_patient_disjoint, patient_keys

DEFAULT_C_GRID = tuple(10.0**k for k in range(-4, 3))
DEFAULT_ALPHA_GRID = tuple(10.0**k for k in range(-3, 5))


class ProbeError(ValueError):
    """Inputs that cannot be probed; the message says what and how to fix it."""


# --------------------------------------------------------------------------------------------- embeddings I/O
@dataclass
class Embeddings:
    """``X``: (N, D) float32; ids as object arrays (``patient_ids`` None where missing); ``meta``: parsed
    contract/model/provenance of the embeddings artifact (whatever of them it carries)."""

    record_ids: np.ndarray
    patient_ids: np.ndarray
    segment_index: np.ndarray
    X: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)


def _maybe_json(v: Any) -> Any:
    if isinstance(v, bytes):
        v = v.decode()
    if isinstance(v, str):
        try:
            return json.loads(v)
        except json.JSONDecodeError:
            return v
    return v


def load_embeddings(path: str | Path) -> Embeddings:
    """Read ``ecgfm embed`` output: NPZ (arrays record_id, patient_id, segment_index, embedding, optional
    ``__meta__`` JSON) or Parquet (file/directory; ``embedding`` fixed_size_list<float32>[D])."""
    p = Path(path)
    if p.suffix.lower() == ".npz":
        if not p.is_file():
            raise ProbeError(f"{p}: no such file")
        try:
            z = np.load(p, allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:  # not a zip, or an object array that would need pickle
            raise ProbeError(f"{p}: not a readable NPZ of ecgfm embed output ({e})") from None
        with z:
            missing = {"record_id", "embedding"} - set(z.files)
            if missing:
                raise ProbeError(f"{p}: NPZ lacks array(s) {sorted(missing)} (expected ecgfm embed output)")
            X = np.asarray(z["embedding"], dtype=np.float32)
            rid = np.asarray(z["record_id"]).astype(str).astype(object)
            pid = (np.asarray(z["patient_id"]).astype(str).astype(object) if "patient_id" in z.files
                   else np.full(len(rid), None, dtype=object))
            pid = np.array([None if v == "" else v for v in pid], dtype=object)
            seg = (np.asarray(z["segment_index"], dtype=np.int32) if "segment_index" in z.files
                   else np.full(len(rid), -1, dtype=np.int32))
            meta = _maybe_json(z["__meta__"].item()) if "__meta__" in z.files else {}
    else:
        try:
            table = read_table(p, kinds=("embeddings",))
        except LabelError as e:
            raise ProbeError(str(e)) from e
        if "embedding" not in table.column_names or "record_id" not in table.column_names:
            raise ProbeError(f"{p}: not an embeddings artifact (needs record_id and embedding columns)")
        col = table.column("embedding").combine_chunks()
        if col.null_count:
            raise ProbeError(f"{p}: {col.null_count} rows have a null embedding")
        n = len(col)
        flat = np.asarray(col.flatten().to_numpy(zero_copy_only=False), dtype=np.float32)
        X = flat.reshape(n, -1) if n else np.zeros((0, 0), np.float32)
        rid = string_column(table, "record_id")
        pid = string_column(table, "patient_id")
        if pid is None:
            pid = np.full(n, None, dtype=object)
        seg = (table.column("segment_index").to_numpy().astype(np.int32)
               if "segment_index" in table.column_names else np.full(n, -1, dtype=np.int32))
        kv = table_metadata(table)
        meta = {k.removeprefix("ecgfm."): _maybe_json(v) for k, v in kv.items() if k.startswith("ecgfm.")}
    if X.ndim != 2 or len(X) != len(rid):
        raise ProbeError(f"{p}: embedding array has shape {X.shape}, expected ({len(rid)}, D)")
    return Embeddings(rid, pid, seg, X, meta if isinstance(meta, dict) else {"raw": meta})


# --------------------------------------------------------------------------------------------- joining
@dataclass
class ProbeData:
    """Rows ready to probe: ``Y`` (N, L) float64 labels per row, ``split`` per row, notes for the user."""

    emb: Embeddings
    Y: np.ndarray
    split: np.ndarray
    notes: list[str]
    counts: dict[str, Any]


def record_splits(labels: LabelTable, emb: Embeddings, fractions: tuple[float, float, float],
                  seed: int) -> tuple[dict[str, str], list[str], dict[str, Any]]:
    """record_id -> split for the embedded records: the labels' ``split`` column when it has one, otherwise a
    patient-grouped assignment (patient id from the labels, else from the embeddings). Returns the mapping,
    notes, and a split-check dict (``patients_in_multiple_splits``)."""
    notes: list[str] = []
    lidx = labels.index()
    # one row per embedded record (first occurrence), patient id from labels when present
    _, first = np.unique(emb.record_ids.astype(str), return_index=True)
    rids = emb.record_ids[np.sort(first)]
    pids = []
    for r, p in zip(rids, emb.patient_ids[np.sort(first)], strict=True):
        lp = labels.patient_ids[lidx[r]] if labels.patient_ids is not None and r in lidx else None
        pids.append(lp if lp not in (None, "") else p)
    keys = patient_keys(rids, pids)
    if labels.split is not None and any(s is not None for s in labels.split):
        sp = np.array([labels.split[lidx[r]] if r in lidx else None for r in rids], dtype=object)
        n_none = sum(1 for r, s in zip(rids, sp, strict=True) if s is None and r in lidx)
        if n_none:
            raise ProbeError(f"{n_none} labelled records have an empty 'split'; fill it (train/valid/test) or "
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


def join_labels(emb: Embeddings, labels: LabelTable, split_of: dict[str, str]) -> ProbeData:
    """Attach record labels and splits to embedding rows; drop (and count) rows whose record has no labels
    or whose embedding is not finite."""
    notes: list[str] = []
    lidx = labels.index()
    known = np.array([r in lidx for r in emb.record_ids], dtype=bool)
    finite = np.isfinite(emb.X).all(axis=1) if emb.X.size else np.ones(len(emb.X), bool)
    n_unknown = int((~known).sum())
    n_nonfinite = int((known & ~finite).sum())
    if not known.any():
        ex = emb.record_ids[0] if len(emb.record_ids) else "-"
        raise ProbeError(f"no embedding record_id is in the labels table (e.g. {ex!r}); are the labels for "
                         f"these records?")
    if n_unknown:
        ex = ", ".join(map(str, list(dict.fromkeys(emb.record_ids[~known]))[:3]))
        notes.append(f"excluded {n_unknown} embedding rows whose record_id is not in the labels (e.g. {ex})")
    if n_nonfinite:
        notes.append(f"excluded {n_nonfinite} embedding rows with NaN/inf values")
    keep = known & finite
    n_rec_unembedded = len(set(labels.record_ids) - set(emb.record_ids[keep]))
    if n_rec_unembedded:
        notes.append(f"{n_rec_unembedded} labelled records have no (finite) embedding")
    sub = Embeddings(emb.record_ids[keep], emb.patient_ids[keep], emb.segment_index[keep], emb.X[keep], emb.meta)
    rows = np.array([lidx[r] for r in sub.record_ids], dtype=np.int64)
    Y = labels.values[rows]
    split = np.array([split_of[r] for r in sub.record_ids], dtype=object)
    pid = np.array([labels.patient_ids[i] if labels.patient_ids is not None and labels.patient_ids[i] else p
                    for i, p in zip(rows, sub.patient_ids, strict=True)], dtype=object)
    sub.patient_ids = pid
    counts = {"rows_used": int(keep.sum()), "rows_unknown_record": n_unknown, "rows_nonfinite": n_nonfinite,
              "labelled_records_without_embedding": n_rec_unembedded}
    return ProbeData(sub, Y, split, notes, counts)


# --------------------------------------------------------------------------------------------- fitting
def standardize(X: np.ndarray, train: np.ndarray) -> np.ndarray:
    """(X - mean) / std with mean/std of the ``train`` rows (std 0 -> 1). float64 (N, D)."""
    X = np.asarray(X, dtype=np.float64)
    mu = X[train].mean(axis=0)
    sd = X[train].std(axis=0)
    sd[sd == 0] = 1.0
    return (X - mu) / sd


def _ap(y: np.ndarray, s: np.ndarray) -> float | None:
    from ecgfm_cli.metrics import average_precision

    return average_precision(y, s)


def fit_label(X: np.ndarray, y: np.ndarray, split: np.ndarray, kind: str,
              c_grid: tuple[float, ...] = DEFAULT_C_GRID, alpha_grid: tuple[float, ...] = DEFAULT_ALPHA_GRID,
              max_iter: int = 1000) -> tuple[np.ndarray, dict[str, Any]]:
    """Fit one label's probe. X: (N, D) standardised; y: (N,) with NaN = missing; split: (N,) names.

    Returns (predictions for all N rows: probabilities or values, NaN when skipped) and an info dict
    ``{"status": "fitted"|"skipped", "reason"?, "C"|"alpha", "valid_average_precision"|"valid_mse", "selection",
    "n_train", ...}``.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression, Ridge

    has = ~np.isnan(y)
    tr = has & (split == "train")
    va = has & (split == "valid")
    info: dict[str, Any] = {"kind": kind, "n_train": int(tr.sum()), "n_valid": int(va.sum())}
    nan = np.full(len(y), np.nan)
    if kind == "binary":
        n_pos = int(y[tr].sum())
        info["n_train_pos"] = n_pos
        if n_pos == 0 or n_pos == tr.sum():
            info.update(status="skipped", reason=f"train split has a single class ({n_pos} positives of "
                                                  f"{int(tr.sum())} rows)")
            return nan, info
        valid_ok = va.any() and 0 < y[va].sum() < va.sum()
        grid = c_grid if valid_ok else (1.0,)
        model = LogisticRegression(class_weight="balanced", max_iter=max_iter, warm_start=True)
        best: tuple[tuple[float, float], float, np.ndarray, float] | None = None
        n_warn = 0
        for c in sorted(grid):
            model.set_params(C=c)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ConvergenceWarning)
                model.fit(X[tr], y[tr].astype(int))
            n_warn += sum(issubclass(w.category, ConvergenceWarning) for w in caught)
            if valid_ok:
                z = model.decision_function(X[va])
                # ties in average precision (common when valid is separable) go to the lower valid log-loss,
                # not to the most regularised C, whose probabilities are squashed towards 0.5
                key = (round(_ap(y[va], z), 10), -float(np.mean(np.logaddexp(0.0, z) - y[va] * z)))
            else:
                key = (0.0, 0.0)
            if best is None or key > best[0]:
                best = (key, c, model.coef_.ravel().copy(), float(model.intercept_[0]))
        assert best is not None
        key, c, coef, b = best
        score = key[0] if valid_ok else float("nan")
        from ecgfm_cli.metrics import sigmoid

        pred = sigmoid(X @ coef + b)
        info.update(status="fitted", C=c, valid_average_precision=None if np.isnan(score) else score,
                    selection="valid average precision (ties: valid log-loss)" if valid_ok else
                    "default C=1 (valid split empty or single-class)",
                    convergence_warnings=n_warn)
        return pred, info
    # continuous
    if tr.sum() < 2 or np.ptp(y[tr]) == 0:
        info.update(status="skipped", reason="fewer than 2 distinct train values")
        return nan, info
    valid_ok = va.sum() >= 1
    best_r: tuple[float, float, Any] | None = None
    for a in (alpha_grid if valid_ok else (1.0,)):
        m = Ridge(alpha=a).fit(X[tr], y[tr])
        mse = float(np.mean((m.predict(X[va]) - y[va]) ** 2)) if valid_ok else float("nan")
        if best_r is None or mse < best_r[0]:
            best_r = (mse, a, m)
    assert best_r is not None
    mse, a, m = best_r
    info.update(status="fitted", alpha=a, valid_mse=None if np.isnan(mse) else mse,
                selection="valid MSE" if valid_ok else "default alpha=1 (valid split empty)")
    return m.predict(X).astype(np.float64), info


def run_probe(X: np.ndarray, Y: np.ndarray, labels: list[str], kinds: dict[str, str], split: np.ndarray,
              c_grid: tuple[float, ...] = DEFAULT_C_GRID, alpha_grid: tuple[float, ...] = DEFAULT_ALPHA_GRID,
              max_iter: int = 1000, progress: Callable[[str], None] | None = None,
              ) -> tuple[np.ndarray, dict[str, dict[str, Any]]]:
    """Probe every label. X: (N, D); Y: (N, L); split: (N,). Returns predictions (N, L) and per-label info."""
    train = split == "train"
    if not train.any():
        raise ProbeError("no rows in the train split; check the split column or --split-fractions")
    Xs = standardize(X, train)
    P = np.full(Y.shape, np.nan)
    info = {}
    for j, lab in enumerate(labels):
        P[:, j], info[lab] = fit_label(Xs, Y[:, j], split, kinds[lab], c_grid, alpha_grid, max_iter)
        if progress:
            progress(lab)
    return P, info


def predictions_table(data: ProbeData, P: np.ndarray, labels: list[str], kinds: dict[str, str],
                      metadata: dict[str, str]) -> Any:
    """The ``predictions`` artifact (docs/artifacts.md) as a ``pyarrow.Table`` with ``metadata`` added."""
    import pyarrow as pa

    from ecgfm_cli import __version__

    cols = {
        "record_id": pa.array(data.emb.record_ids.tolist(), pa.string()),
        "patient_id": pa.array(data.emb.patient_ids.tolist(), pa.string()),
        "segment_index": pa.array(data.emb.segment_index, pa.int32()),
        "split": pa.array(data.split.tolist(), pa.string()),
    }
    for j, lab in enumerate(labels):
        cols[lab] = pa.array(P[:, j], pa.float64())
    meta = {
        "ecgfm.kind": "predictions",
        "ecgfm.schema_version": "1",
        "ecgfm.version": __version__,
        "ecgfm.labels": json.dumps(labels),
        "ecgfm.label_kinds": json.dumps({lab: kinds[lab] for lab in labels}),
        **metadata,
    }
    return pa.table(cols).replace_schema_metadata(meta)


def baseline_path(out: str | Path) -> Path:
    """``PREDS.parquet`` -> ``PREDS.baseline.parquet``."""
    p = Path(out)
    return p.with_name(f"{p.stem}.baseline{p.suffix}")


def probe_files(
    embeddings: str | Path,
    labels: LabelTable,
    out: str | Path,
    provenance: dict[str, Any],
    baseline: str | Path | None = None,
    baseline_out: str | Path | None = None,
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    c_grid: tuple[float, ...] = DEFAULT_C_GRID,
    alpha_grid: tuple[float, ...] = DEFAULT_ALPHA_GRID,
    max_iter: int = 1000,
    log: Callable[[str], None] = lambda s: None,
    progress_factory: Callable[[int, str], Any] | None = None,
) -> dict[str, Any]:
    """Probe ``embeddings`` (and ``baseline`` embeddings with the same record splits) and write predictions.

    Returns a summary {"outputs": [...], "labels": {label: info}, "baseline_labels": ..., "notes": [...]}.
    """
    from ecgfm_cli.io.artifacts import write_table

    for note in labels.notes:
        log(note)
    # every input is read (and refused if bad) before anything is fitted or written
    runs = [("model", embeddings, load_embeddings(embeddings), Path(out))]
    if baseline is not None:
        runs.append(("baseline", baseline, load_embeddings(baseline),
                     Path(baseline_out) if baseline_out else baseline_path(out)))
    split_of: dict[str, str] | None = None
    summary: dict[str, Any] = {"outputs": [], "notes": list(labels.notes)}
    for role, emb_path, emb, out_path in runs:
        if split_of is None:
            split_of, notes, check = record_splits(labels, emb, fractions, seed)
            summary["split_check"] = check
            for n in notes:
                log(n)
            summary["notes"] += notes
        missing = {r for r in emb.record_ids if r not in split_of and r in labels.index()}
        if missing:
            raise ProbeError(f"{emb_path}: {len(missing)} records are not in the main embeddings "
                             f"(e.g. {sorted(missing)[0]!r}); the baseline must embed the same records")
        data = join_labels(emb, labels, split_of)
        for n in data.notes:
            log(f"{role}: {n}")
        counts = {s: int((data.split == s).sum()) for s in SPLITS}
        log(f"{role}: {len(data.split)} rows ({', '.join(f'{k} {v}' for k, v in counts.items())}), "
            f"{emb.X.shape[1]}-d embeddings, {len(labels.labels)} labels")
        bar = progress_factory(len(labels.labels), role) if progress_factory else None
        P, info = run_probe(data.emb.X, data.Y, labels.labels, labels.kinds, data.split, c_grid, alpha_grid,
                            max_iter, progress=(lambda _lab, b=bar: b.update(1)) if bar is not None else None)
        if bar is not None:
            bar.close()
        defaulted = []
        for lab, inf in info.items():
            if inf["status"] == "skipped":
                log(f"{role}: label {lab!r} skipped ({inf['reason']}); its prediction column is NaN")
            elif str(inf.get("selection", "")).startswith("default"):
                defaulted.append(lab)
        if defaulted:
            log(f"{role}: {len(defaulted)} label(s) fitted with the default C/alpha, nothing to choose it on (valid "
                f"split empty or single-class): {', '.join(defaulted[:8])}{', ...' if len(defaulted) > 8 else ''}")
        meta = {
            "ecgfm.provenance": json.dumps({**provenance, "role": role,
                                            "upstream": emb.meta.get("provenance")}),
            "ecgfm.probe": json.dumps({"labels": info, "counts": {**data.counts, **counts},
                                       "notes": summary["notes"] + data.notes,
                                       "split_check": summary["split_check"]}),
        }
        for key in ("contract", "model"):
            if emb.meta.get(key) is not None:
                meta[f"ecgfm.{key}"] = json.dumps(emb.meta[key])
        write_table(predictions_table(data, P, labels.labels, labels.kinds, meta), Path(out_path), "predictions")
        log(f"{role}: wrote {out_path}")
        summary["outputs"].append(str(out_path))
        summary["labels" if role == "model" else "baseline_labels"] = info
    return summary
