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

With ``folds`` (``--folds K``) there is no single split: patient-grouped folds stratified on every binary label at
once, each scored by a probe standardised, tuned (on an inner valid part) and refitted on the other folds only; the
predictions get a ``fold`` column and ``split`` = ``test`` everywhere (see docs/commands/probe.md).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ecgfm_cli.console import plural
from ecgfm_cli.errors import EcgfmError
from ecgfm_cli.eval_options import ProbeOptions
from ecgfm_cli.labels import LabelError, LabelTable, read_table, string_column, table_metadata
from ecgfm_cli.splits import (
    SPLITS,
    fold_counts_line,
    group_counts,
    patient_keys,
    record_splits,
    small_group_warnings,
)

_DEFAULT = ProbeOptions()  # the signatures' defaults: ecgfm probe's


class ProbeError(EcgfmError, ValueError):
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
              c_grid: tuple[float, ...] = _DEFAULT.c_grid, alpha_grid: tuple[float, ...] = _DEFAULT.alpha_grid,
              max_iter: int = _DEFAULT.max_iter, fixed: float | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Fit one label's probe. X: (N, D) standardised; y: (N,) with NaN = missing; split: (N,) names.
    ``fixed``: fit with this C (alpha) on the train rows, choosing nothing (the refit of ``--folds``).

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
        valid_ok = fixed is None and va.any() and 0 < y[va].sum() < va.sum()
        grid = (fixed,) if fixed is not None else c_grid if valid_ok else (1.0,)
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
                    f"fixed C={fixed:g}" if fixed is not None else "default C=1 (valid split empty or single-class)",
                    convergence_warnings=n_warn)
        return pred, info
    # continuous
    if tr.sum() < 2 or np.ptp(y[tr]) == 0:
        info.update(status="skipped", reason="fewer than 2 distinct train values")
        return nan, info
    valid_ok = fixed is None and va.sum() >= 1
    best_r: tuple[float, float, Any] | None = None
    for a in ((fixed,) if fixed is not None else alpha_grid if valid_ok else (1.0,)):
        m = Ridge(alpha=a).fit(X[tr], y[tr])
        mse = float(np.mean((m.predict(X[va]) - y[va]) ** 2)) if valid_ok else float("nan")
        if best_r is None or mse < best_r[0]:
            best_r = (mse, a, m)
    assert best_r is not None
    mse, a, m = best_r
    info.update(status="fitted", alpha=a, valid_mse=None if np.isnan(mse) else mse,
                selection="valid MSE" if valid_ok else f"fixed alpha={fixed:g}" if fixed is not None else
                "default alpha=1 (valid split empty)")
    return m.predict(X).astype(np.float64), info


def run_probe(X: np.ndarray, Y: np.ndarray, labels: list[str], kinds: dict[str, str], split: np.ndarray,
              c_grid: tuple[float, ...] = _DEFAULT.c_grid, alpha_grid: tuple[float, ...] = _DEFAULT.alpha_grid,
              max_iter: int = _DEFAULT.max_iter, progress: Callable[[str], None] | None = None,
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


# --------------------------------------------------------------------------------------------- out-of-fold
def stratification_labels(labels: LabelTable, record_ids: np.ndarray) -> tuple[list[str], np.ndarray]:
    """What the folds are stratified on: every binary label with both classes among ``record_ids`` (in table
    order), and per record whether it is in that label's rarer class (fewer records; ties: the positives).

    Returns (names, S) with S (len(record_ids), len(names)) bool; an unknown (NaN) value is in neither class.
    Continuous labels are not stratified."""
    lidx = labels.index()
    rows = np.array([lidx[r] for r in record_ids], dtype=np.int64)
    names: list[str] = []
    cols: list[np.ndarray] = []
    for j, lab in enumerate(labels.labels):
        if labels.kinds[lab] != "binary":
            continue
        v = labels.values[rows, j]
        n_pos, n_neg = int((v == 1).sum()), int((v == 0).sum())
        if min(n_pos, n_neg) == 0:  # one class only: nothing to spread
            continue
        names.append(lab)
        cols.append(v == 1 if n_pos <= n_neg else v == 0)
    S = np.column_stack(cols) if cols else np.zeros((len(rows), 0), dtype=bool)
    return names, S


def stratified_group_folds(S: np.ndarray, groups: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Fold (0..k-1) of each item: groups (patients) kept whole, stratified on every column of ``S`` at once.

    S: (N, M) bool, item i carries label m; groups: (N,) group key per item. Iterative stratification (Sechidis,
    Tsoumakas & Vlahavas 2011) applied to groups: a group carries a label when any of its items does; repeatedly
    the label with the fewest groups still unassigned is taken, and each of its unassigned groups (seeded random
    order) goes to the fold that most lacks that label (desired share minus what it holds), ties broken by how
    many of the group's labels would get their first group there, then by the fold that most lacks items, then
    by the seeded random generator. Groups without any label go, largest first, to the fold that most lacks
    items. Then up to three repair passes: a label carried by >= k groups but absent from a fold gets one of its groups
    moved there from a fold holding two or more of them, swapped with a group of that fold (or with none), the
    pair closest in size among those that leave no such label absent from either fold where it was present.
    Deterministic for a given ``seed``."""
    rng = np.random.default_rng(seed)
    uniq, inv = np.unique(np.asarray(groups).astype(str), return_inverse=True)
    n_groups, n_labels = len(uniq), S.shape[1]
    A = np.zeros((n_groups, n_labels), dtype=bool)  # group g carries label m
    if n_labels:
        np.logical_or.at(A, inv, S.astype(bool))
    size = np.bincount(inv, minlength=n_groups).astype(np.int64)
    total = A.sum(axis=0).astype(np.int64)  # groups per label
    # the desired shares times k, kept in integers: need = total - k * held
    held = np.zeros((k, n_labels), dtype=np.int64)
    items = np.zeros(k, dtype=np.int64)
    fold_of = np.full(n_groups, -1, dtype=np.int64)
    covered = total >= k  # labels that can be in every fold

    def place(g: int, f: int) -> None:
        fold_of[g] = f
        held[f] += A[g]
        items[f] += size[g]

    def best(cands: np.ndarray, *keys: np.ndarray) -> int:
        """The candidate fold with the largest keys, lexicographically; ties by the seeded generator."""
        for key in keys:
            cands = cands[key[cands] == key[cands].max()]
        return int(cands[rng.integers(len(cands))]) if len(cands) > 1 else int(cands[0])

    remaining = total.copy()
    all_folds = np.arange(k)
    while (remaining > 0).any():
        open_ = np.flatnonzero(remaining > 0)
        rarest = open_[remaining[open_] == remaining[open_].min()]
        m = int(rarest[rng.integers(len(rarest))])
        for g in rng.permutation(np.flatnonzero(A[:, m] & (fold_of < 0))):
            firsts = ((held[:, A[g] & covered]) == 0).sum(axis=1)
            place(int(g), best(all_folds, total[m] - k * held[:, m], firsts, -items))
            remaining -= A[g]
    rest = np.flatnonzero(fold_of < 0)
    for g in rest[np.lexsort((rng.permutation(len(rest)), -size[rest]))]:
        place(int(g), best(all_folds, -items))
    # repair: the greedy order can leave a label that could be everywhere absent from a fold f. Move one of its
    # groups g there from a fold h holding two or more of them, swapped with a group b of f (or with none) such
    # that no label of `covered` present in h or f before is absent after; the closest sizes win.
    for _ in range(3):
        moved = False
        for m in np.flatnonzero(covered)[np.argsort(total[covered], kind="stable")]:
            for f in np.flatnonzero(held[:, m] == 0):
                best_swap: tuple[tuple[int, float], int, int] | None = None
                for g in np.flatnonzero(A[:, m]):
                    h = int(fold_of[g])
                    if held[h, m] < 2:
                        continue
                    for b in [-1, *np.flatnonzero(fold_of == f)]:
                        ab = A[b] if b >= 0 else np.zeros(n_labels, dtype=bool)
                        after_h = held[h] - A[g] + ab
                        after_f = held[f] - ab + A[g]
                        if ((held[h] > 0) & covered & (after_h == 0)).any() or \
                                ((held[f] > 0) & covered & (after_f == 0)).any():
                            continue
                        key = (abs(int(size[g]) - (int(size[b]) if b >= 0 else 0)), float(rng.random()))
                        if best_swap is None or key < best_swap[0]:
                            best_swap = (key, int(g), int(b))
                if best_swap is None:
                    continue
                _, g, b = best_swap
                h = int(fold_of[g])
                for grp, dst in ((g, int(f)), (b, h)):
                    if grp >= 0:
                        held[fold_of[grp]] -= A[grp]
                        items[fold_of[grp]] -= size[grp]
                        place(grp, dst)
                moved = True
        if not moved:
            break
    return fold_of[inv]


def assign_folds(labels: LabelTable, emb: Embeddings, k: int, seed: int) -> tuple[dict[str, int], list[str]]:
    """record_id -> fold (0..k-1) for the labelled embedded records: patient-grouped (patient id from the labels,
    else from the embeddings; none = the record is its own patient), stratified on every binary label at once
    (:func:`stratification_labels`, :func:`stratified_group_folds`). Raises :class:`ProbeError` when there are
    fewer patients than folds."""
    lidx = labels.index()
    _, first = np.unique(emb.record_ids.astype(str), return_index=True)
    first = np.sort(first)
    rids = np.array([r for r in emb.record_ids[first] if r in lidx], dtype=object)
    epid = dict(zip(emb.record_ids[first], emb.patient_ids[first], strict=True))
    pids = []
    for r in rids:
        lp = labels.patient_ids[lidx[r]] if labels.patient_ids is not None else None
        pids.append(lp if lp not in (None, "") else epid[r])
    keys = patient_keys(rids, pids).astype(str)
    n_patients = len(set(keys))
    if n_patients < k:
        raise ProbeError(f"--folds {k}: the labelled records belong to only {n_patients} patients; use at most "
                         f"--folds {n_patients}")
    names, S = stratification_labels(labels, rids)
    fold = stratified_group_folds(S, keys, k, seed)
    continuous = [lab for lab in labels.labels if labels.kinds[lab] != "binary"]
    if not names:
        how = "no binary label with both classes to stratify on"
    else:
        # patients per label in its rarer class, and whether every fold holds one of them
        pat = {m: {keys[i] for i in np.flatnonzero(S[:, j])} for j, m in enumerate(names)}
        everywhere = {m: len({fold[i] for i in np.flatnonzero(S[:, j])}) == k for j, m in enumerate(names)}
        can = [m for m in names if len(pat[m]) >= k]
        got = [m for m in can if everywhere[m]]
        missed = [m for m in can if not everywhere[m]]
        how = (f"stratified on every binary label with both classes at once ({plural(len(names), 'label')}; "
               f"iterative stratification of patients on each label's rarer class); {len(got)} of the {len(can)} "
               f"labels with >= {k} patients in their rarer class have one in every fold"
               + (f" (not: {', '.join(missed)})" if missed else "")
               + (f"; {plural(len(names) - len(can), 'label')} {'has' if len(names) - len(can) == 1 else 'have'} "
                  f"fewer than {k} such patients" if len(can) < len(names) else ""))
    if continuous:
        how += f"; continuous labels are not stratified ({', '.join(continuous)})"
    sizes = np.bincount(fold, minlength=k)
    notes = [f"folds: {k} patient-grouped folds ({n_patients} patients, {len(rids)} records, "
             f"{int(sizes.min())}-{int(sizes.max())} records per fold, seed {seed}), {how}; "
             f"every record is scored once, by the probe fitted on the other folds"]
    return dict(zip(rids, fold.tolist(), strict=True)), notes


def inner_split(fold: np.ndarray, k: int, strata: np.ndarray, keys: np.ndarray, n_folds: int, seed: int,
                ) -> np.ndarray:
    """Split names for fitting the probe of fold ``k``: its own rows ``test``, the other folds' rows ``train``
    except an inner, patient-grouped ``valid`` part (about 1/(n_folds-1) of them, at least a 2-way split) on
    which C/alpha is chosen, stratified like the folds (:func:`stratified_group_folds`). All arrays are per row:
    ``fold`` (N,), ``strata`` (N, M) bool (:func:`stratified_group_folds`), ``keys`` (N,) patient keys.
    With a single training patient there is no inner valid part."""
    split = np.where(fold == k, "test", "train").astype(object)
    tr = np.flatnonzero(fold != k)
    n_inner = min(max(2, n_folds - 1), len(set(keys[tr])))
    if n_inner < 2:
        return split
    inner = stratified_group_folds(strata[tr], keys[tr], n_inner, seed + 1 + k)
    split[tr[inner == 0]] = "valid"
    return split


def run_probe_folds(X: np.ndarray, Y: np.ndarray, labels: list[str], kinds: dict[str, str], fold: np.ndarray,
                    strata: np.ndarray, keys: np.ndarray, seed: int = _DEFAULT.seed,
                    c_grid: tuple[float, ...] = _DEFAULT.c_grid, alpha_grid: tuple[float, ...] = _DEFAULT.alpha_grid,
                    max_iter: int = _DEFAULT.max_iter, progress: Callable[[str], None] | None = None,
                    ) -> tuple[np.ndarray, dict[str, dict[str, Any]]]:
    """Out-of-fold probing. X: (N, D); Y: (N, L); fold: (N,) int 0..K-1 per row; strata: (N, M)
    bool per row (:func:`inner_split`); keys: (N,) patient keys per row.

    For each fold k: features are standardised on the other folds' rows, C (alpha) is chosen on an inner valid
    part of them (:func:`inner_split`), the probe is refitted with that C on all of them and scores fold k's rows
    only. Returns predictions (N, L) (NaN where a fold's probe was skipped) and per-label info with a ``folds``
    list (one entry per fold)."""
    n_folds = int(fold.max()) + 1 if len(fold) else 0
    P = np.full(Y.shape, np.nan)
    per_label: dict[str, list[dict[str, Any]]] = {lab: [] for lab in labels}
    for k in range(n_folds):
        test = fold == k
        Xs = standardize(X, ~test)
        inner = inner_split(fold, k, strata, keys, n_folds, seed)
        refit_split = np.where(test, "test", "train").astype(object)
        for j, lab in enumerate(labels):
            first, chosen = fit_label(Xs, Y[:, j], inner, kinds[lab], c_grid, alpha_grid, max_iter)
            entry: dict[str, Any] = {"fold": k, "n_test": int((test & ~np.isnan(Y[:, j])).sum()),
                                     "n_inner_valid": chosen["n_valid"]}
            if chosen["status"] == "skipped":
                pred, info = first, chosen
            else:
                key = "C" if kinds[lab] == "binary" else "alpha"
                pred, info = fit_label(Xs, Y[:, j], refit_split, kinds[lab], c_grid, alpha_grid, max_iter,
                                       fixed=chosen[key])
                entry["selection"] = chosen["selection"]
                entry["inner_valid_average_precision"] = chosen.get("valid_average_precision")
                entry["inner_valid_mse"] = chosen.get("valid_mse")
            entry.update({k2: v for k2, v in info.items() if k2 not in ("selection", "n_valid", "kind")})
            P[test, j] = pred[test]
            per_label[lab].append(entry)
        if progress:
            progress(f"fold {k}")
    info_out: dict[str, dict[str, Any]] = {}
    for lab, folds in per_label.items():
        fitted = [f for f in folds if f["status"] == "fitted"]
        skipped = [f["fold"] for f in folds if f["status"] == "skipped"]
        entry = {"kind": kinds[lab], "status": "fitted" if fitted else "skipped", "folds": folds,
                 "selection": "per fold: chosen on an inner valid part of the training folds, refitted on all "
                              "of them"}
        if skipped and fitted:
            entry["skipped_folds"] = skipped
        if not fitted:
            entry["reason"] = f"in every fold: {folds[0]['reason']}" if folds else "no folds"
        info_out[lab] = entry
    return P, info_out


def predictions_table(record_ids: np.ndarray, patient_ids: np.ndarray, segment_index: np.ndarray,
                      split: np.ndarray, P: np.ndarray, labels: list[str], kinds: dict[str, str],
                      metadata: dict[str, str], fold: np.ndarray | None = None) -> Any:
    """The ``predictions`` artifact (docs/artifacts.md) as a ``pyarrow.Table`` with ``metadata`` added: one row
    per entry of the (N,) id arrays (``patient_ids`` None where unknown) and ``split``, ``P`` (N, L) the
    predictions of ``labels``, ``fold`` (N,) with ``--folds``. What ``ecgfm probe`` and ``ecgfm finetune``
    write."""
    import pyarrow as pa

    from ecgfm_cli import __version__

    cols = {
        "record_id": pa.array(record_ids.tolist(), pa.string()),
        "patient_id": pa.array(patient_ids.tolist(), pa.string()),
        "segment_index": pa.array(segment_index, pa.int32()),
        "split": pa.array(split.tolist(), pa.string()),
    }
    if fold is not None:
        cols["fold"] = pa.array(fold, pa.int32())
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
    fractions: tuple[float, float, float] = _DEFAULT.split_fractions,
    seed: int = _DEFAULT.seed,
    c_grid: tuple[float, ...] = _DEFAULT.c_grid,
    alpha_grid: tuple[float, ...] = _DEFAULT.alpha_grid,
    max_iter: int = _DEFAULT.max_iter,
    log: Callable[[str], None] = lambda s: None,
    progress_factory: Callable[[int, str], Any] | None = None,
    folds: int | None = _DEFAULT.folds,
) -> dict[str, Any]:
    """Probe ``embeddings`` (and ``baseline`` embeddings with the same record splits or folds) and write
    predictions. ``folds``: K-fold out-of-fold probing (every record scored once, ``fold`` column, ``split`` =
    ``test``) instead of one train/valid/test split.

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
    fold_of: dict[str, int] | None = None
    summary: dict[str, Any] = {"outputs": [], "notes": list(labels.notes)}
    for role, emb_path, emb, out_path in runs:
        if split_of is None:
            if folds:
                fold_of, notes = assign_folds(labels, emb, folds, seed)
                if labels.split is not None and any(s is not None for s in labels.split):
                    notes.append("folds: the labels' split column is not used with --folds")
                split_of = dict.fromkeys(fold_of, "test")
                check = {"source": "folds", "n_folds": folds, "patients_in_multiple_splits": 0, "examples": []}
            else:
                split_of, notes, check = record_splits(labels, emb.record_ids, emb.patient_ids, fractions, seed)
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
        keys = patient_keys(data.emb.record_ids, data.emb.patient_ids)
        fold = np.array([fold_of[r] for r in data.emb.record_ids], dtype=np.int64) if fold_of is not None else None
        if fold is not None:
            counts = group_counts(fold, keys, data.emb.record_ids, data.Y, labels.labels, labels.kinds)
            # few positives per fold are expected on a small cohort: evaluate pools every fold's scores
            small = [fold_counts_line(counts, labels.labels, labels.kinds)]
            log(f"{role}: {len(data.split)} rows in {folds} folds, {emb.X.shape[1]}-d embeddings, "
                f"{len(labels.labels)} labels")
        else:
            counts = group_counts(data.split, keys, data.emb.record_ids, data.Y, labels.labels, labels.kinds)
            small = small_group_warnings(counts, labels.labels, labels.kinds, ["valid", "test"], "split",
                                         "use `ecgfm probe --folds 5` (every record scored once, by a probe "
                                         "that did not see it) or give the labels a split column")
            log(f"{role}: {len(data.split)} rows ("
                f"{', '.join(f'{k} {int((data.split == k).sum())}' for k in SPLITS)}), "
                f"{emb.X.shape[1]}-d embeddings, {len(labels.labels)} labels")
        if role == "model":
            for line in small:
                log(line)
            summary["notes"] += small
        bar = progress_factory(folds or len(labels.labels), role) if progress_factory else None
        tick = (lambda _lab, b=bar: b.update(1)) if bar is not None else None
        if fold is not None:
            strata = _row_strata(labels, data.emb.record_ids)
            P, info = run_probe_folds(data.emb.X, data.Y, labels.labels, labels.kinds, fold, strata, keys, seed,
                                      c_grid, alpha_grid, max_iter, progress=tick)
        else:
            P, info = run_probe(data.emb.X, data.Y, labels.labels, labels.kinds, data.split, c_grid, alpha_grid,
                                max_iter, progress=tick)
        if bar is not None:
            bar.close()
        defaulted = []
        for lab, inf in info.items():
            if inf["status"] == "skipped":
                log(f"{role}: label {lab!r} skipped ({inf['reason']}); its prediction column is NaN")
            elif inf.get("skipped_folds"):
                log(f"{role}: label {lab!r} skipped in fold(s) {inf['skipped_folds']} (a single class in the other "
                    f"folds); those rows' predictions are NaN")
            selections = [f.get("selection") for f in inf["folds"]] if fold is not None else [inf.get("selection")]
            if any(str(sel).startswith("default") for sel in selections):
                defaulted.append(lab)
        if defaulted:
            where = "an inner valid part" if fold is not None else "the valid split"
            log(f"{role}: WARNING: {len(defaulted)} label(s) fitted with the default C/alpha, nothing to choose it "
                f"on ({where} empty or single-class): {', '.join(defaulted[:8])}"
                f"{', ...' if len(defaulted) > 8 else ''}")
        meta = {
            "ecgfm.provenance": json.dumps({**provenance, "role": role,
                                            "upstream": emb.meta.get("provenance")}),
            "ecgfm.probe": json.dumps({"labels": info, "counts": {**data.counts, "groups": counts},
                                       "folds": folds, "notes": summary["notes"] + data.notes,
                                       "split_check": summary["split_check"]}),
        }
        for key in ("contract", "model"):
            if emb.meta.get(key) is not None:
                meta[f"ecgfm.{key}"] = json.dumps(emb.meta[key])
        e = data.emb
        write_table(predictions_table(e.record_ids, e.patient_ids, e.segment_index, data.split, P, labels.labels,
                                      labels.kinds, meta, fold=fold), Path(out_path), "predictions")
        log(f"{role}: wrote {out_path}")
        summary["outputs"].append(str(out_path))
        summary["labels" if role == "model" else "baseline_labels"] = info
    return summary


def _row_strata(labels: LabelTable, record_ids: np.ndarray) -> np.ndarray:
    """Per row, (N, M) bool: the row's record is in the rarer class of each stratified label
    (:func:`stratification_labels`)."""
    uniq, inverse = np.unique(record_ids.astype(str), return_inverse=True)
    _, S = stratification_labels(labels, uniq.astype(object))
    return S[inverse]
