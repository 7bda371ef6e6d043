"""Evaluate predictions against labels: metrics, patient-level bootstrap CIs, thresholds, calibration,
segment -> record aggregation, and the JSON / Markdown / CSV reports.

The pure core is :func:`aggregate_rows` and :func:`evaluate_level`; :func:`evaluate` joins predictions with
labels (counting every excluded row) and runs the levels; the ``report_*`` functions format the result.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ecgfm_cli import metrics as M
from ecgfm_cli.console import plural, progress
from ecgfm_cli.errors import EcgfmError
from ecgfm_cli.eval_options import EvalConfig
from ecgfm_cli.labels import RESERVED_COLUMNS, LabelTable, read_table, string_column, table_metadata
from ecgfm_cli.splits import check_patient_disjoint, patient_keys
from ecgfm_cli.stats import bc_interval

BINARY_METRICS = ("auroc", "auprc", "sensitivity", "specificity", "ppv", "f1", "ece", "brier")
MACRO_METRICS = ("auroc", "auprc", "sensitivity", "specificity", "ppv", "f1")
REGRESSION_METRICS = ("mae", "rmse", "r2", "pearson_r")
REPORT_VERSION = 1


class EvaluateError(EcgfmError, ValueError):
    """Inputs that cannot be evaluated; the message says what and how to fix it."""


# --------------------------------------------------------------------------------------------- predictions I/O
@dataclass
class Predictions:
    """Rows of a predictions artifact. ``scores``: (N, L) float64; optional columns are None when absent."""

    record_ids: np.ndarray
    scores: np.ndarray
    labels: list[str]
    patient_ids: np.ndarray | None = None
    segment_index: np.ndarray | None = None
    split: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    #: ``fold`` column of ``probe --folds`` predictions (int, -1 = not scored by a fold), else None
    fold: np.ndarray | None = None
    #: the other columns (not ids, split, fold or labels), as object arrays: usable as --subgroups
    columns: dict[str, np.ndarray] = field(default_factory=dict)


def load_predictions(path: str | Path) -> Predictions:
    """Read a predictions artifact (Parquet file/directory, Arrow file). Label columns are those named by the
    ``ecgfm.labels`` metadata, or else every numeric column that is not an id/split column."""
    import pyarrow as pa
    import pyarrow.types as pat

    table = read_table(path, kinds=("predictions",))
    if "record_id" not in table.column_names:
        raise EvaluateError(f"{path}: no 'record_id' column; is this a predictions file?")
    kv = table_metadata(table)
    if "ecgfm.labels" in kv:
        labels = json.loads(kv["ecgfm.labels"])
        missing = [lab for lab in labels if lab not in table.column_names]
        if missing:
            raise EvaluateError(f"{path}: ecgfm.labels names columns that are absent: {missing}")
    else:
        labels = [c for c in table.column_names if c not in RESERVED_COLUMNS
                  and (pat.is_floating(table.schema.field(c).type) or pat.is_integer(table.schema.field(c).type))]
    if not labels:
        raise EvaluateError(f"{path}: no prediction columns")
    scores = np.column_stack([
        np.asarray(table.column(lab).cast(pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64)
        for lab in labels
    ])
    seg = (np.asarray(table.column("segment_index").to_numpy(zero_copy_only=False), dtype=np.int64)
           if "segment_index" in table.column_names else None)
    split = string_column(table, "split")
    if split is not None and all(s is None for s in split):
        split = None
    meta = {}
    for k, v in kv.items():
        if k.startswith("ecgfm.") and k not in ("ecgfm.labels",):
            try:
                meta[k.removeprefix("ecgfm.")] = json.loads(v)
            except json.JSONDecodeError:
                meta[k.removeprefix("ecgfm.")] = v
    fold = (np.asarray(table.column("fold").fill_null(-1).to_numpy(zero_copy_only=False), dtype=np.int64)
            if "fold" in table.column_names else None)
    others = {c: np.array(table.column(c).to_pylist(), dtype=object) for c in table.column_names
              if c not in RESERVED_COLUMNS and c not in labels and c != "fold"}
    return Predictions(string_column(table, "record_id"), scores, list(labels),
                       string_column(table, "patient_id"), seg, split, meta, fold, others)


# --------------------------------------------------------------------------------------------- aggregation
def aggregate_rows(record_ids: np.ndarray, scores: np.ndarray, methods: list[str]
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Segment -> record: group rows by record_id and reduce each label's column with its method.

    record_ids: (N,); scores: (N, L) probabilities/values, NaN = missing (ignored; a record whose segments are
    all NaN stays NaN); methods: L of ``max``/``mean``/``min``. Returns (record ids in first-appearance order,
    (R, L) aggregated scores, index of each record's first row).
    """
    rid = np.asarray(record_ids).astype(str)
    _, first, inv = np.unique(rid, return_index=True, return_inverse=True)
    # renumber groups in first-appearance order so the output follows the input
    order_groups = np.argsort(first, kind="stable")
    rank = np.empty_like(order_groups)
    rank[order_groups] = np.arange(len(order_groups))
    g = rank[inv]
    sort = np.argsort(g, kind="stable")
    gs = g[sort]
    starts = np.r_[0, np.nonzero(np.diff(gs))[0] + 1] if len(gs) else np.array([], dtype=np.int64)
    out = np.full((len(starts), scores.shape[1]), np.nan)
    for j, method in enumerate(methods):
        col = scores[sort, j]
        fin = np.isfinite(col)
        cnt = np.add.reduceat(fin.astype(np.float64), starts) if len(starts) else np.zeros(0)
        if method == "max":
            v = np.maximum.reduceat(np.where(fin, col, -np.inf), starts)
        elif method == "min":
            v = np.minimum.reduceat(np.where(fin, col, np.inf), starts)
        elif method == "mean":
            v = np.add.reduceat(np.where(fin, col, 0.0), starts) / np.maximum(cnt, 1)
        else:
            raise ValueError(f"unknown aggregation {method!r}")
        out[:, j] = np.where(cnt > 0, v, np.nan)
    return rid[first[order_groups]].astype(object), out, first[order_groups]


# --------------------------------------------------------------------------------------------- one level
def _metric(value: float | None, ci: list[float] | None = None, reason: str | None = None) -> dict[str, Any]:
    d: dict[str, Any] = {"value": value, "ci": ci}
    if value is None and reason:
        d["reason"] = reason
    return d


def _binary_point(rs: M.RankedScores, y: np.ndarray, s: np.ndarray, thr: float, cfg: EvalConfig
                  ) -> dict[str, float | None]:
    """Every binary metric on unit weights (the point estimates): floats, None where undefined."""
    vals = M.binary_metrics_many(rs, y, s, thr, np.ones((1, len(y))), cfg.at_specificity, cfg.at_sensitivity)
    return {k: (float(v[0]) if np.isfinite(v[0]) else None) for k, v in vals.items()}


def operating_metric_names(cfg: EvalConfig) -> list[str]:
    """Keys of the fixed-specificity / fixed-sensitivity metrics for ``cfg``'s targets."""
    return ([M.operating_key("sens_at_spec", t) for t in cfg.at_specificity]
            + [M.operating_key("spec_at_sens", t) for t in cfg.at_sensitivity])


def _patient_codes(keys: np.ndarray) -> tuple[np.ndarray, int]:
    _, inv = np.unique(np.asarray(keys).astype(str), return_inverse=True)
    inv = inv.reshape(-1)
    return inv, int(inv.max()) + 1 if len(inv) else 0


def label_strata(y: np.ndarray, ok: np.ndarray, keys: np.ndarray, binary: list[int]) -> tuple[np.ndarray, list]:
    """Bootstrap strata that keep every label's positives: each patient goes to the stratum of the rarest binary
    label it is positive for (fewest positive patients first), or to ``-1`` when positive for none.

    y: (N, L) truth; ok: (N, L) rows usable per label; keys: (N,) patients; binary: columns to consider.
    Returns ((N,) stratum per row, [(column, positive patients)] in rarity order).
    """
    pinv, n_pat = _patient_codes(keys)
    pos_sets = []
    for j in binary:
        m = ok[:, j] & (y[:, j] == 1)
        pos_sets.append((j, np.unique(pinv[m])))
    pos_sets.sort(key=lambda t: (len(t[1]), t[0]))
    stratum = np.full(n_pat, -1, dtype=np.int64)
    for j, pats in reversed(pos_sets):  # the rarest label is written last and wins
        stratum[pats] = j
    return stratum[pinv], [(j, len(p)) for j, p in pos_sets]


def evaluate_level(
    y: np.ndarray, s: np.ndarray, split: np.ndarray | None, keys: np.ndarray,
    labels: list[str], kinds: dict[str, str], cfg: EvalConfig,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Metrics of one level (segments or records).

    y, s: (N, L) truth and predictions (NaN = missing); split: (N,) names or None (then every row is evaluated
    and thresholds/temperatures fall back to defaults); keys: (N,) patient keys for the bootstrap.
    Returns (JSON-ready result, curve data {label: {"y", "s", "s_cal"?}} for plots).

    The bootstrap is stratified by label presence (:func:`label_strata`) so that no resample loses a label's
    positive patients; a label with fewer than ``cfg.min_positives`` positive (or negative) patients is marked
    unreliable and left out of the macro averages, which are taken over the same labels in every resample.
    """
    if split is not None:
        ev = split == cfg.eval_split
        # thresholds and temperatures are fitted on valid: never when valid is what is evaluated
        va = split == "valid" if cfg.eval_split != "valid" else np.zeros(len(y), dtype=bool)
        if not ev.any():
            raise EvaluateError(f"no rows in the {cfg.eval_split!r} split (splits present: "
                                f"{sorted({str(x) for x in split if x is not None})}); use --eval-split")
    else:
        ev = np.ones(len(y), dtype=bool)
        va = np.zeros(len(y), dtype=bool)
    res: dict[str, Any] = {
        "n_rows": int(ev.sum()), "n_patients": len(set(keys[ev])),
        "labels": {},
    }
    curves: dict[str, Any] = {}
    boot_cache: list[tuple[str, np.ndarray, Any]] = []  # (label, mask within ev rows, data)
    ev_keys = keys[ev]
    op_names = operating_metric_names(cfg)
    dca_t = np.asarray(cfg.dca_thresholds, dtype=np.float64)
    ok_all = np.zeros((int(ev.sum()), len(labels)), dtype=bool)
    for j, lab in enumerate(labels):
        yj, sj, kind = y[:, j], s[:, j], kinds[lab]
        entry: dict[str, Any] = {"kind": kind}
        res["labels"][lab] = entry
        if not np.isfinite(sj).any():
            entry.update(status="skipped", reason="no predictions (all NaN; e.g. the probe skipped this label)")
            continue
        n_nan_score = int((ev & ~np.isnan(yj) & ~np.isfinite(sj)).sum())
        n_missing = int((ev & np.isnan(yj)).sum())
        m = ev & np.isfinite(yj) & np.isfinite(sj)
        entry.update(status="evaluated", n=int(m.sum()), n_patients=len(set(keys[m])),
                     excluded={"nan_score": n_nan_score, "missing_label": n_missing})
        if m.sum() == 0:
            entry.update(status="skipped", reason=f"no rows with both a label and a score in {cfg.eval_split!r}")
            continue
        ok_all[:, j] = m[ev]
        yt, st = yj[m], sj[m]
        if kind == "continuous":
            point = M.regression_metrics(yt, st)
            entry["mean_true"] = float(yt.mean())
            for k in REGRESSION_METRICS:
                entry[k] = _metric(point[k], reason="needs variance in targets and predictions")
            boot_cache.append((lab, m[ev], ("continuous", yt, st)))
            continue
        n_pos = int(yt.sum())
        pos_pat, neg_pat = len(set(keys[m & (yj == 1)])), len(set(keys[m & (yj == 0)]))
        entry.update(n_pos=n_pos, prevalence=float(yt.mean()), n_pos_patients=pos_pat, n_neg_patients=neg_pat)
        if min(pos_pat, neg_pat) < cfg.min_positives:
            few = "positive" if pos_pat <= neg_pat else "negative"
            entry["reliable"] = False
            entry["unreliable_reason"] = (f"only {min(pos_pat, neg_pat)} {few} patient(s) (< {cfg.min_positives}): "
                                          f"the interval is not informative; left out of the macro")
        else:
            entry["reliable"] = True
        # threshold on the valid split, never on the evaluated one
        mv = va & np.isfinite(yj) & np.isfinite(sj)
        thr = M.choose_threshold(yj[mv], sj[mv], cfg.threshold_method) if mv.any() else None
        if thr is None:
            why = ("the valid split is the one evaluated" if cfg.eval_split == "valid" else "no valid split"
                   if not mv.any() else "valid split has a single class")
            entry["threshold"] = {"value": 0.5, "method": "default", "chosen_on": None, "reason": f"{why}; 0.5 used"}
            thr = 0.5
        else:
            entry["threshold"] = {"value": thr, "method": cfg.threshold_method, "chosen_on": "valid",
                                  "n_valid": int(mv.sum())}
        rs = M.RankedScores(yt, st)
        point = _binary_point(rs, yt, st, thr, cfg)
        single = "undefined: the evaluated rows hold a single class"
        for k in (*BINARY_METRICS, *op_names):
            entry[k] = _metric(point[k], reason=single if k in ("auroc", "auprc") or k in op_names
                               else "zero denominator")
        if 0 < n_pos < len(yt) and len(dca_t):
            nb = M.net_benefit(yt, st, dca_t)
            entry["decision_curve"] = {"model": np.round(nb["model"], 6).tolist(),
                                       "treat_all": np.round(nb["treat_all"], 6).tolist()}
        curves[lab] = {"y": yt, "s": st}
        if cfg.calibrate:
            cal: dict[str, Any]
            if mv.any() and 0 < yj[mv].sum() < mv.sum():
                t = M.fit_temperature(yj[mv], sj[mv])
                sc = M.apply_temperature(st, t)
                cal = {"temperature": t, "fitted_on": "valid", "nll_before": M.nll(yt, st), "nll_after": M.nll(yt, sc),
                       "ece": M.expected_calibration_error(yt, sc), "brier": M.brier(yt, sc)}
                curves[lab]["s_cal"] = sc
            else:
                cal = {"temperature": None, "reason": "the valid split is the one evaluated"
                       if cfg.eval_split == "valid" else "needs a valid split with both classes"}
            entry["calibrated"] = cal
        boot_cache.append((lab, m[ev], ("binary", yt, st, rs, thr)))
    if len(dca_t):
        res["decision_curve_thresholds"] = dca_t.tolist()

    # macro over the reliable binary labels (each metric over the labels where it is defined)
    binary_entries = {lab: e for lab, e in res["labels"].items() if e.get("kind") == "binary"
                      and e.get("status") == "evaluated"}
    macro_names = (*MACRO_METRICS, *op_names)
    macro_sets, macro_why = {}, {}
    for k in macro_names:
        macro_sets[k], macro_why[k] = [], {}
        for lab, e in binary_entries.items():
            if e[k]["value"] is None:
                macro_why[k][lab] = e[k].get("reason", "undefined")
            elif not e["reliable"]:
                macro_why[k][lab] = e["unreliable_reason"]
            elif cfg.macro_only is not None and lab not in cfg.macro_only:
                macro_why[k][lab] = "not reliable in every subgroup (the subgroups' macros share one label set)"
            else:
                macro_sets[k].append(lab)

    macro_reps: dict[str, np.ndarray] = {}
    if cfg.n_boot > 0 and boot_cache:
        bin_cols = [labels.index(lab) for lab, _, d in boot_cache if d[0] == "binary"]
        strata, _ = label_strata(y[ev], ok_all, ev_keys, bin_cols)
        reps: dict[str, dict[str, list[np.ndarray]]] = {lab: {} for lab, _, _ in boot_cache}
        weights = M.bootstrap_weight_matrices(ev_keys, cfg.n_boot, cfg.seed, strata=strata)
        for W_all in progress(weights, "bootstrap", unit="chunk"):
            for lab, mask, data in boot_cache:
                W = W_all[:, mask]
                if data[0] == "continuous":
                    vals = M.regression_metrics_many(data[1], data[2], W)
                else:
                    _, yt, st, rs, thr = data
                    vals = M.binary_metrics_many(rs, yt, st, thr, W, cfg.at_specificity, cfg.at_sensitivity)
                for k, v in vals.items():
                    reps[lab].setdefault(k, []).append(v)
        flat = {lab: {k: np.concatenate(v) for k, v in d.items()} for lab, d in reps.items()}
        for lab, d in flat.items():
            for k, samples in d.items():
                res["labels"][lab][k]["ci"] = bc_interval(samples, res["labels"][lab][k]["value"], cfg.ci_level)
                res["labels"][lab][k]["n_boot_defined"] = int(np.isfinite(samples).sum())
        for k in macro_names:
            if macro_sets[k]:
                # a resample where one of the macro's labels is undefined has no macro value (counted below)
                macro_reps[k] = np.mean(np.column_stack([flat[lab][k] for lab in macro_sets[k]]), axis=1)
    res["macro"] = {}
    for k in macro_names:
        labs = macro_sets[k]
        entry = {
            "value": float(np.mean([binary_entries[lab][k]["value"] for lab in labs])) if labs else None,
            "ci": None,
            "n_labels": len(labs),
            "labels": labs,
            "labels_excluded": sorted(macro_why[k]),
            "excluded_reasons": macro_why[k],
        }
        entry["ci"] = bc_interval(macro_reps[k], entry["value"], cfg.ci_level) if k in macro_reps else None
        if k in macro_reps:
            entry["n_boot_defined"] = int(np.isfinite(macro_reps[k]).sum())
        res["macro"][k] = entry
    skipped = [lab for lab, e in res["labels"].items() if e["status"] == "skipped"]
    if skipped:
        res["labels_skipped"] = skipped
    unreliable = [lab for lab, e in binary_entries.items() if not e["reliable"]]
    if unreliable:
        res["labels_unreliable"] = unreliable
    return res, curves


# --------------------------------------------------------------------------------------------- joining + levels
def _match_labels(pred_labels: list[str], table_labels: list[str]) -> tuple[dict[str, str], list[str]]:
    """prediction label -> label-table label (exact, else case-insensitive); and the unmatched ones."""
    exact = set(table_labels)
    lower = {t.lower(): t for t in table_labels}
    mapping, unmatched = {}, []
    for p in pred_labels:
        if p in exact:
            mapping[p] = p
        elif p.lower() in lower:
            mapping[p] = lower[p.lower()]
        else:
            unmatched.append(p)
    return mapping, unmatched


@dataclass
class Joined:
    """Predictions joined with their labels: the rows both know, in prediction order.

    Y, S: (N, L) truth and scores of ``pred_labels``; rid: (N,) record ids; keys: (N,) patient keys; split: (N,)
    or None; fold: (N,) int or None; ``rows``: index of each row in the predictions.
    """

    Y: np.ndarray
    S: np.ndarray
    rid: np.ndarray
    keys: np.ndarray
    split: np.ndarray | None
    fold: np.ndarray | None
    rows: np.ndarray
    pred_labels: list[str]
    kinds: dict[str, str]
    mapping: dict[str, str]
    is_segment: bool
    notes: list[str]
    body: dict[str, Any]


def join(preds: Predictions, labels: LabelTable, cfg: EvalConfig) -> Joined:
    """Join ``preds`` with ``labels`` on record_id (counting every excluded row and label in ``notes`` and
    ``body``); nothing usable at all is an :class:`EvaluateError`."""
    notes: list[str] = list(labels.notes)
    mapping, unmatched = _match_labels(preds.labels, labels.labels)
    if not mapping:
        raise EvaluateError(
            f"no prediction label matches a label of the labels table (predictions: {preds.labels[:5]}, labels: "
            f"{labels.labels[:5]}); pass the --label-map the model was trained with")
    if unmatched:
        notes.append(f"excluded {len(unmatched)} prediction labels absent from the labels table: {unmatched}")
    not_predicted = [t for t in labels.labels if t not in mapping.values()]
    pred_labels = [p for p in preds.labels if p in mapping]
    lidx = labels.index()
    known = np.array([r in lidx for r in preds.record_ids], dtype=bool)
    n_unknown = int((~known).sum())
    if not known.any():
        raise EvaluateError(f"no prediction record_id is in the labels table (e.g. {preds.record_ids[0]!r}); "
                            f"are these the labels of the predicted records?")
    unknown_examples = list(dict.fromkeys(preds.record_ids[~known].tolist()))[:5]
    if n_unknown:
        notes.append(f"excluded {n_unknown} prediction rows whose record_id is not in the labels "
                     f"(e.g. {', '.join(map(str, unknown_examples[:3]))})")
    rows = np.array([lidx[r] for r in preds.record_ids[known]], dtype=np.int64)
    cols = [preds.labels.index(p) for p in pred_labels]
    tcols = [labels.labels.index(mapping[p]) for p in pred_labels]
    S = preds.scores[known][:, cols]
    Y = labels.values[rows][:, tcols]
    # the kind a label was fitted as (probe/finetune --continuous fits a 0/1 column as a target) wins over the
    # kind the labels table's values suggest
    fitted = preds.meta.get("label_kinds") if isinstance(preds.meta.get("label_kinds"), dict) else {}
    kinds = {p: fitted.get(p) or labels.kinds[mapping[p]] for p in pred_labels}
    for j, p in enumerate(pred_labels):
        col = S[:, j][np.isfinite(S[:, j])]
        if kinds[p] == "binary" and len(col) and (col.min() < 0 or col.max() > 1):
            notes.append(f"WARNING: scores of binary label {p!r} fall outside [0, 1] (logits?); AUROC/AUPRC are "
                         f"still valid but thresholds, ECE, Brier and calibration assume probabilities")
    rid = preds.record_ids[known]
    pid = preds.patient_ids[known] if preds.patient_ids is not None else np.full(len(rid), None, dtype=object)
    if labels.patient_ids is not None:
        pid = np.array([p if p not in (None, "") else labels.patient_ids[i] for p, i in zip(pid, rows, strict=True)],
                       dtype=object)
    keys = patient_keys(rid, pid)
    if preds.split is not None:
        split = preds.split[known]
        split_source = "predictions"
    elif labels.split is not None:
        split = labels.split[rows]
        split_source = "labels"
    else:
        split, split_source = None, None
    if split is not None and any(x is None for x in split):
        n = sum(x is None for x in split)
        raise EvaluateError(f"{n} prediction rows have an empty split; fill the split column or remove it")
    split_check: dict[str, Any] = {"source": split_source}
    if split is not None:
        overlap = check_patient_disjoint(keys, split)
        split_check.update(patients_in_multiple_splits=len(overlap), examples=list(overlap)[:10])
        if overlap:
            notes.append(f"WARNING: {len(overlap)} patients occur in more than one split; metrics may be optimistic")
        evaluated_on = cfg.eval_split
    else:
        evaluated_on = "all"
        notes.append("no split column: every row is evaluated and thresholds default to 0.5 (no valid split)")
    fold = preds.fold[known] if preds.fold is not None else None
    n_per_record = len(rid) / max(len(set(rid)), 1)
    is_segment = preds.segment_index is not None and bool((preds.segment_index[known] >= 0).any()) \
        and n_per_record > 1
    body = {
        "evaluated_split": evaluated_on,
        "split_check": split_check,
        "exclusions": {
            "unknown_record_id_rows": n_unknown,
            "unknown_record_id_examples": unknown_examples,
            "prediction_labels_not_in_labels": unmatched,
            "labels_not_predicted": not_predicted,
        },
        "label_names": {p: mapping[p] for p in pred_labels if mapping[p] != p},
    }
    return Joined(Y, S, rid, keys, split, fold, np.nonzero(known)[0], pred_labels, kinds, mapping, is_segment,
                  notes, body)


@dataclass
class LevelData:
    """The rows of one level: y, s (N, L); split (N,) or None; keys, rid (N,); ``first``: for the record level
    built from segments, each record's first joined row (else None)."""

    y: np.ndarray
    s: np.ndarray
    split: np.ndarray | None
    keys: np.ndarray
    rid: np.ndarray
    first: np.ndarray | None = None
    aggregation: dict[str, str] | None = None


def level_data(j: Joined, cfg: EvalConfig, notes: list[str] | None = None) -> dict[str, LevelData]:
    """The levels evaluated for ``j``: its own rows (``segment`` or ``record``) and, with ``cfg.aggregate`` on
    segment rows, the records (segment scores reduced per label with ``cfg.aggregate_methods``)."""
    out: dict[str, LevelData] = {}
    out["segment" if j.is_segment else "record"] = LevelData(j.Y, j.S, j.split, j.keys, j.rid)
    if cfg.aggregate and j.is_segment:
        methods = [cfg.aggregate_methods.get(p, cfg.aggregate_methods.get(j.mapping[p], "mean"))
                   for p in j.pred_labels]
        _, S_rec, first = aggregate_rows(j.rid, j.S, methods)
        if j.split is not None:
            # a record's segments must share one split
            per: dict[str, set] = {}
            for r, sp in zip(j.rid, j.split, strict=True):
                per.setdefault(r, set()).add(sp)
            mixed = [r for r, v in per.items() if len(v) > 1]
            if mixed:
                raise EvaluateError(f"{len(mixed)} records have segments in several splits (e.g. {mixed[0]!r}); "
                                    f"cannot aggregate to records")
        out["record"] = LevelData(j.Y[first], S_rec, j.split[first] if j.split is not None else None, j.keys[first],
                                  j.rid[first], first, dict(zip(j.pred_labels, methods, strict=True)))
    elif cfg.aggregate and notes is not None:
        notes.append("--aggregate ignored: the predictions already have one row per record")
    return out


def data_summary(j: Joined, cfg: EvalConfig) -> dict[str, Any]:
    """What a reader needs about the data (TRIPOD+AI): per split (and fold) records, patients and, per binary
    label, positive records; all at record level (a record's label is the same on all its segments)."""
    _, first = np.unique(j.rid.astype(str), return_index=True)
    y, keys = j.Y[first], j.keys[first]
    split = j.split[first] if j.split is not None else np.full(len(first), "all", dtype=object)
    binary = [(i, lab) for i, lab in enumerate(j.pred_labels) if j.kinds[lab] == "binary"]

    def counts(m: np.ndarray) -> dict[str, Any]:
        return {"records": int(m.sum()), "patients": len(set(keys[m])),
                "positives": {lab: int(np.nansum(y[m, i] == 1)) for i, lab in binary},
                "labelled": {lab: int(np.isfinite(y[m, i]).sum()) for i, lab in binary}}

    out: dict[str, Any] = {"rows": len(j.rid), "records": len(first), "patients": len(set(keys)),
                           "level_of_rows": "segment" if j.is_segment else "record",
                           "splits": {str(sp): counts(split == sp) for sp in sorted({str(x) for x in split})}}
    if j.fold is not None:
        fold = j.fold[first]
        ok = fold >= 0
        out["folds"] = {"n_folds": len(set(fold[ok].tolist())),
                        "per_fold": {str(int(f)): counts(fold == f) for f in sorted(set(fold[ok].tolist()))}}
    return out


def evaluate(preds: Predictions, labels: LabelTable, cfg: EvalConfig,
             log: Callable[[str], None] = lambda s: None,
             subgroups: dict[str, np.ndarray] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Join ``preds`` with ``labels`` and evaluate every level.

    ``subgroups``: {name: (rows of preds,) group value per prediction row} (see :func:`subgroup_columns`);
    each is reported per level with :func:`evaluate_subgroups`.
    Returns (report body: exclusions, split info, data summary, {"levels": {level: evaluate_level result}}) and
    the curve data {level: {label: ...}} for plots. Rows/labels that cannot be used are counted and logged, never
    dropped silently; nothing usable at all is an :class:`EvaluateError`.
    """
    j = join(preds, labels, cfg)
    notes = j.notes
    levels: dict[str, Any] = {}
    curves: dict[str, Any] = {}
    lv = level_data(j, cfg, notes)
    for name, d in lv.items():
        levels[name], curves[name] = evaluate_level(d.y, d.s, d.split, d.keys, j.pred_labels, j.kinds, cfg)
        levels[name]["n_records"] = len(set(d.rid[d.split == cfg.eval_split] if d.split is not None else d.rid))
        if d.aggregation is not None:
            levels[name]["aggregation"] = d.aggregation
    if subgroups:
        for name, d in lv.items():
            per_row = {k: v[j.rows] for k, v in subgroups.items()}
            if d.first is not None:
                per_row = {k: v[d.first] for k, v in per_row.items()}
            levels[name]["subgroups"] = evaluate_subgroups(d, per_row, j.pred_labels, j.kinds, cfg)
    defaulted = sorted({e["threshold"]["reason"].removesuffix("; 0.5 used") for lev in levels.values()
                        for e in lev["labels"].values() if e.get("threshold", {}).get("chosen_on", "valid") is None})
    if defaulted:
        notes.append(f"thresholds: 0.5 used for sensitivity/specificity/PPV/F1 ({'; '.join(defaulted)})")
    for n in notes:
        log(n)
    body = {**j.body, "data": data_summary(j, cfg), "notes": notes, "levels": levels}
    return body, curves


# --------------------------------------------------------------------------------------------- subgroups
#: Columns derived when no table holds them (see :func:`subgroup_columns`).
DERIVED_SUBGROUPS = ("source",)


def band_values(name: str, values: list[Any], age_bands: tuple[float, ...]) -> np.ndarray:
    """Group labels of one subgroup column: ``age`` in the bands ``age_bands`` (``<40``, ``40-59``, ...); another
    numeric column with more than 10 distinct values in quartiles (``Q1 [lo, hi]``); anything else as text.
    Missing values are the group ``unknown``."""
    out = np.full(len(values), "unknown", dtype=object)
    num = np.full(len(values), np.nan)
    numeric = True
    for i, v in enumerate(values):
        if v is None or (isinstance(v, float) and not np.isfinite(v)) or v == "":
            continue
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
            numeric = False
            out[i] = str(v)
        else:
            num[i] = float(v)
    if not numeric:
        for i in range(len(values)):
            if out[i] == "unknown" and np.isfinite(num[i]):
                out[i] = f"{num[i]:g}"
        return out
    ok = np.isfinite(num)
    if name.lower() == "age":
        edges = list(age_bands)
        names = [f"<{edges[0]:g}"] + [f"{a:g}-{b - 1:g}" for a, b in zip(edges[:-1], edges[1:], strict=True)] \
            + [f">={edges[-1]:g}"]
        idx = np.searchsorted(np.asarray(edges, dtype=float), num[ok], side="right")
        out[ok] = [names[i] for i in idx]
    elif len(set(num[ok].tolist())) > 10:
        q = np.quantile(num[ok], [0.25, 0.5, 0.75])
        idx = np.searchsorted(q, num[ok], side="left")
        lo = [num[ok][idx == k].min() if (idx == k).any() else np.nan for k in range(4)]
        hi = [num[ok][idx == k].max() if (idx == k).any() else np.nan for k in range(4)]
        out[ok] = [f"Q{k + 1} [{lo[k]:g}, {hi[k]:g}]" for k in idx]
    else:
        out[ok] = [f"{v:g}" for v in num[ok]]
    return out


def _common_dir(paths: list[str]) -> str:
    import os

    try:
        return os.path.commonpath(paths) if paths else ""
    except ValueError:
        return ""


def derive_source(source_paths: list[str | None]) -> list[str | None]:
    """``source`` of each record when no table has that column: the folder of its file relative to the folder
    common to all records' files (a dataset's sub-databases, e.g. ``georgia/g1``); ``.`` when all share one."""
    import os

    given = [p for p in source_paths if p]
    root = _common_dir([os.path.dirname(p) for p in given])
    out: list[str | None] = []
    for p in source_paths:
        if not p:
            out.append(None)
            continue
        rel = os.path.relpath(os.path.dirname(p), root) if root else os.path.dirname(p)
        out.append(rel)
    return out


def _read_columns(path: Path, wanted: set[str]) -> tuple[dict[str, list], list[str]]:
    """Columns ``wanted`` (those present) + record_id of a table/artifact, reading only those columns from
    Parquet or Arrow files; also returns every column name (for the error message)."""
    from ecgfm_cli.io.tables import read_columns, read_schema

    p = Path(path)
    files: list[Path] = []
    if p.is_dir():
        for kind in ("records", "segments"):
            files = sorted(p.glob(f"{kind}-*.parquet"))
            if files:
                break
        if not files:
            files = sorted(f for f in p.glob("*.parquet") if ".tmp-" not in f.name
                           and not f.name.startswith(("labels-", "rejects-")))
    elif p.is_file() and not p.name.lower().endswith((".csv", ".csv.gz")):
        files = [p]
    if files:
        names = read_schema(files[0]).names
        cols = ["record_id"] + sorted(wanted & set(names))
        if "record_id" not in names:
            raise EvaluateError(f"--records {path}: no record_id column")
        tables = [read_columns(f, cols) for f in files]
        data = {c: [v for t in tables for v in t.column(c).to_pylist()] for c in cols}
        return data, names
    table = read_table(p)
    names = table.column_names
    if "record_id" not in names:
        raise EvaluateError(f"--records {path}: no record_id column")
    cols = ["record_id"] + sorted(wanted & set(names))
    return {c: table.column(c).to_pylist() for c in cols}, names


def subgroup_columns(names: list[str], preds_path: str | Path, preds: Predictions, tables: list[Path],
                     age_bands: tuple[float, ...] = (40, 60, 80)) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Group label per prediction row for each subgroup column ``names``.

    A column is looked up in the predictions (a column of its own, not a label), then in each table of
    ``tables`` in order (``--records``: a records or segments artifact, ingest's labels table, any CSV/Parquet
    with ``record_id``), joined on record_id (a record's first non-missing value). ``source``, when no table has
    it, is derived from ``source_path`` (:func:`derive_source`). Returns ({name: (rows,) group labels}, {name:
    where it came from}). A name found nowhere is an :class:`EvaluateError` listing the columns available.
    """
    wanted = set(names) | {"source_path"}
    found: dict[str, list[Any]] = {}
    where: dict[str, str] = {}
    rids = preds.record_ids.astype(str)
    for n in names:
        if n in preds.columns:
            found[n] = list(preds.columns[n])
            where[n] = f"predictions {preds_path}"
    available: list[str] = list(preds.columns)
    source_paths: dict[str, str] = {}
    for path in tables:
        data, cols = _read_columns(path, wanted)
        available += [c for c in cols if c not in available]
        per_rec: dict[str, dict[str, Any]] = {c: {} for c in data if c != "record_id"}
        for i, r in enumerate(data["record_id"]):
            for c, d in per_rec.items():
                v = data[c][i]
                if v is not None and d.get(r) is None:
                    d[r] = v
        for c, d in per_rec.items():
            if c == "source_path":
                for r, v in d.items():
                    source_paths.setdefault(r, v)
            if c in names and c not in found:
                found[c] = [d.get(r) for r in rids]
                where[c] = f"--records {path}"
    for n in names:
        if n not in found and n == "source" and source_paths:
            found[n] = derive_source([source_paths.get(r) for r in rids])
            where[n] = "derived: folder of source_path relative to the folder common to all records"
    missing = [n for n in names if n not in found]
    if missing:
        hint = "" if tables else " (pass --records SEGMENTS_OR_RECORDS for age/sex, which segments carry)"
        raise EvaluateError(f"--subgroups {','.join(missing)}: no such column in the predictions"
                            f"{' or ' + ', '.join(map(str, tables)) if tables else ''}{hint}; available: "
                            f"{', '.join(sorted(set(available) - {'record_id'}))[:400]}")
    return {n: band_values(n, found[n], age_bands) for n in names}, where


def group_order(v: str) -> tuple:
    """Sort key of group labels: age bands and quartiles in numeric order, ``unknown`` last, else by name."""
    import re

    if v == "unknown":
        return (3, 0.0, v)
    q = re.match(r"^Q(\d)", v)
    if q:
        return (1, float(q.group(1)), v)
    m = re.match(r"^(<|>=)?(-?\d+(?:\.\d+)?)", v)
    if m:
        num = float(m.group(2))
        return (1, num - 0.5 if m.group(1) == "<" else num + 0.5 if m.group(1) == ">=" else num, v)
    return (2, 0.0, v)


def evaluate_subgroups(d: LevelData, groups: dict[str, np.ndarray], labels: list[str], kinds: dict[str, str],
                       cfg: EvalConfig) -> dict[str, Any]:
    """Per subgroup column and group: the level's metrics on the group's evaluated rows (thresholds and
    temperatures still fitted on the whole valid split), with CIs and Ns; a group with fewer than
    ``cfg.min_subgroup`` patients is reported as too small, never merged. The groups' macros are taken over one
    label set, the labels reliable (``cfg.min_positives``) in every evaluated group (``macro_labels``). Per label
    (and for the macro), the largest AUROC gap between groups large enough, with its interval and p-value
    (:func:`_gap_interval`), and the label with the largest gap."""
    from dataclasses import replace

    sub_cfg = replace(cfg, at_specificity=(), at_sensitivity=(), dca_thresholds=())
    base = d.split if d.split is not None else np.full(len(d.y), "__all__", dtype=object)
    ev_name = cfg.eval_split if d.split is not None else "__all__"
    sub_cfg = replace(sub_cfg, eval_split=ev_name)
    ev = base == ev_name
    out: dict[str, Any] = {}
    for name, g in groups.items():
        res: dict[str, Any] = {"groups": {}}
        large, common = [], set(lab for lab in labels if kinds[lab] == "binary")
        for val in sorted(set(g[ev].tolist()), key=group_order):
            in_g = ev & (g == val)
            n_pat = len(set(d.keys[in_g]))
            if n_pat < cfg.min_subgroup:
                res["groups"][val] = {"status": "too_small", "n_rows": int(in_g.sum()), "n_patients": n_pat,
                                      "reason": f"{n_pat} patients < --min-subgroup {cfg.min_subgroup}: not "
                                                f"evaluated (and not merged into another group)"}
                continue
            large.append(val)
            res["groups"][val] = None  # keeps the order; filled below
            for jj, lab in enumerate(labels):
                if lab in common:
                    m = in_g & np.isfinite(d.y[:, jj]) & np.isfinite(d.s[:, jj])
                    npos, nneg = len(set(d.keys[m & (d.y[:, jj] == 1)])), len(set(d.keys[m & (d.y[:, jj] == 0)]))
                    if min(npos, nneg) < cfg.min_positives:
                        common.discard(lab)
        res["macro_labels"] = [lab for lab in labels if lab in common]
        cfg_g = replace(sub_cfg, macro_only=tuple(res["macro_labels"]))
        for val in large:
            in_g = ev & (g == val)
            split_g = np.where(ev & ~in_g, "__other__", base).astype(object)
            r, _ = evaluate_level(d.y, d.s, split_g, d.keys, labels, kinds, cfg_g)
            r.pop("decision_curve_thresholds", None)
            res["groups"][val] = {"status": "evaluated", **r}
        gaps: dict[str, Any] = {}
        for lab in [*labels, "__macro__"]:
            vals = {}
            for val, gr in res["groups"].items():
                if gr["status"] != "evaluated":
                    continue
                e = gr["macro"]["auroc"] if lab == "__macro__" else gr["labels"][lab]
                if lab != "__macro__" and (e.get("kind") != "binary" or e.get("status") != "evaluated"
                                           or not e.get("reliable") or e["auroc"]["value"] is None):
                    continue
                v = e["value"] if lab == "__macro__" else e["auroc"]["value"]
                if v is not None:
                    vals[val] = v
            if len(vals) >= 2:
                order = sorted(vals, key=vals.get)  # stable: two distinct groups even when the AUROCs tie
                lo, hi = order[0], order[-1]
                gap = {"metric": "auroc", "gap": vals[hi] - vals[lo], "highest": hi, "lowest": lo,
                       "highest_value": vals[hi], "lowest_value": vals[lo], "n_groups": len(vals)}
                gap.update(_gap_interval(d, ev & (g == hi), ev & (g == lo), res["groups"][hi], res["groups"][lo],
                                         labels, lab, len(vals), cfg.ci_level))
                gaps["macro" if lab == "__macro__" else lab] = gap
        res["auroc_gaps"] = gaps
        per_label = {k: v for k, v in gaps.items() if k != "macro"}
        if per_label:
            worst = max(per_label, key=lambda k: per_label[k]["gap"])
            res["largest_gap"] = {"label": worst, **per_label[worst]}
        out[name] = res
    return out


def _gap_interval(d: LevelData, in_hi: np.ndarray, in_lo: np.ndarray, res_hi: dict[str, Any], res_lo: dict[str, Any],
                  labels: list[str], lab: str, n_groups: int, level: float) -> dict[str, Any]:
    """Interval and p-value of the AUROC gap of label ``lab`` (``"__macro__"``: the groups' macro AUROCs) between
    the rows ``in_hi`` and ``in_lo`` (N,) of two groups, whose evaluated results are ``res_hi``, ``res_lo``.

    The variance is the sum of the two groups' variances (DeLong, or Obuchowski's clustered one where a patient
    has several rows), or, when patients are in both groups, the clustered variance of the difference
    (:func:`ecgfm_cli.stats.auc_gap`); a macro over several labels has the clustered variance of their mean (they
    share rows). ``p`` is nominal for this pair; the pair is the most different of ``n_groups`` groups, so
    ``p_bonferroni`` multiplies it by the n_groups (n_groups - 1) / 2 pairs that could have been picked (capped at
    1). ``excludes_zero``: the interval lies on one side of 0."""
    from ecgfm_cli.stats import auc_gap, auc_influence, mean_influence

    def influence(rows: np.ndarray, res: dict[str, Any]) -> Any:
        labs = res["macro"]["auroc"]["labels"] if lab == "__macro__" else [lab]
        parts = []
        for name in labs:
            jj = labels.index(name)
            m = rows & np.isfinite(d.y[:, jj]) & np.isfinite(d.s[:, jj])
            parts.append(auc_influence(d.y[m, jj], d.s[m, jj], d.keys[m]))
        return mean_influence(parts)

    r = auc_gap(influence(in_hi, res_hi), influence(in_lo, res_lo), level)
    n_pairs = n_groups * (n_groups - 1) // 2
    return {"ci": r["ci"], "se": r["se"], "p": r["p"],
            "p_bonferroni": None if r["p"] is None else min(1.0, r["p"] * n_pairs),
            "excludes_zero": r["ci"] is not None and (r["ci"][0] > 0 or r["ci"][1] < 0),
            "variance": r["method"], "n_clusters": r["n_clusters"], "shared_clusters": r["shared_clusters"]}


# --------------------------------------------------------------------------------------------- paired comparison
def _row_keys(p: Predictions) -> np.ndarray:
    seg = p.segment_index if p.segment_index is not None else np.full(len(p.record_ids), -1)
    return np.array([f"{r}\x00{int(k)}" for r, k in zip(p.record_ids, seg, strict=True)], dtype=object)


def subset_predictions(p: Predictions, idx: np.ndarray, labels: list[str] | None = None) -> Predictions:
    """Rows ``idx`` (and label columns ``labels``) of ``p``."""
    labels = labels or p.labels
    cols = [p.labels.index(lab) for lab in labels]

    def take(a: np.ndarray | None) -> np.ndarray | None:
        return None if a is None else a[idx]

    return Predictions(p.record_ids[idx], p.scores[idx][:, cols], list(labels), take(p.patient_ids),
                       take(p.segment_index), take(p.split), p.meta, take(p.fold),
                       {k: v[idx] for k, v in p.columns.items()})


def intersect(a: Predictions, b: Predictions) -> tuple[Predictions, Predictions, dict[str, Any]]:
    """The rows (record_id, segment_index) and labels both predictions hold, in ``a``'s order, and the counts.
    Refuses rows whose split differs between the two (a paired comparison needs one test set)."""
    ka, kb = _row_keys(a), _row_keys(b)
    pos_b = {k: i for i, k in enumerate(kb)}
    ia = np.array([i for i, k in enumerate(ka) if k in pos_b], dtype=np.int64)
    if not len(ia):
        raise EvaluateError("--baseline: no row (record_id, segment_index) is in both predictions; a paired "
                            "comparison needs the same records")
    ib = np.array([pos_b[ka[i]] for i in ia], dtype=np.int64)
    labs = [lab for lab in a.labels if lab in b.labels]
    if not labs:
        raise EvaluateError(f"--baseline: no label in common (model: {a.labels[:5]}, baseline: {b.labels[:5]})")
    pa_, pb_ = subset_predictions(a, ia, labs), subset_predictions(b, ib, labs)
    if pa_.split is not None and pb_.split is not None:
        diff = int(sum(x != y for x, y in zip(pa_.split, pb_.split, strict=True)))
        if diff:
            raise EvaluateError(f"--baseline: {diff} common rows are in different splits in the two predictions "
                                f"(e.g. {pa_.record_ids[np.nonzero(pa_.split != pb_.split)[0][0]]!r}); probe both "
                                f"with the same split (`probe --baseline` does)")
    elif pa_.split is None and pb_.split is not None:
        pa_.split = pb_.split
    pb_.split = pa_.split
    counts = {"model_rows": len(ka), "baseline_rows": len(kb), "common_rows": len(ia),
              "model_records": len(set(a.record_ids)), "baseline_records": len(set(b.record_ids)),
              "common_records": len(set(pa_.record_ids)), "common_labels": labs,
              "labels_only_in_model": [x for x in a.labels if x not in labs],
              "labels_only_in_baseline": [x for x in b.labels if x not in labs]}
    return pa_, pb_, counts


def compare_level(y: np.ndarray, sa: np.ndarray, sb: np.ndarray, split: np.ndarray | None, keys: np.ndarray,
                  labels: list[str], kinds: dict[str, str], cfg: EvalConfig) -> dict[str, Any]:
    """Paired model - baseline differences of AUROC and AUPRC on one level's rows: point, patient-level
    bootstrap CI (the same resamples for both models, stratified as in :func:`evaluate_level`) and p-values
    (the bootstrap for both; for AUROC also DeLong's, with Obuchowski's clustered variance when a patient has
    several rows: ``delong_method``, ``n_clusters``). Macro: mean difference over the binary labels reliable
    (``cfg.min_positives``) and defined for both."""
    from ecgfm_cli.stats import bootstrap_p, delong_paired

    ev = split == cfg.eval_split if split is not None else np.ones(len(y), dtype=bool)
    out: dict[str, Any] = {"n_rows": int(ev.sum()), "n_patients": len(set(keys[ev])), "labels": {}}
    cache = []
    ok_all = np.zeros((int(ev.sum()), len(labels)), dtype=bool)
    for j, lab in enumerate(labels):
        if kinds[lab] != "binary":
            continue
        m = ev & np.isfinite(y[:, j]) & np.isfinite(sa[:, j]) & np.isfinite(sb[:, j])
        yt = y[m, j]
        e: dict[str, Any] = {"n": int(m.sum()), "n_pos": int(yt.sum())}
        out["labels"][lab] = e
        pos_pat, neg_pat = len(set(keys[m & (y[:, j] == 1)])), len(set(keys[m & (y[:, j] == 0)]))
        e.update(n_pos_patients=pos_pat, n_neg_patients=neg_pat)
        if pos_pat == 0 or neg_pat == 0:
            e["status"] = "undefined"
            e["reason"] = "the common evaluated rows hold a single class"
            continue
        ok_all[:, j] = m[ev]
        e["status"] = "compared"
        e["reliable"] = min(pos_pat, neg_pat) >= cfg.min_positives
        ra, rb = M.RankedScores(yt, sa[m, j]), M.RankedScores(yt, sb[m, j])
        (aa, pa_), (ab, pb_) = ra.auroc_ap(), rb.auroc_ap()
        # clustered by patient (Obuchowski) when a patient has several of these rows, else plain DeLong
        dl = delong_paired(yt, sa[m, j], sb[m, j], keys[m], cfg.ci_level)
        e["auroc"] = {"model": aa, "baseline": ab, "diff": aa - ab, "p_delong": dl["p"], "se_delong": dl["se"],
                      "ci_delong": dl["ci"], "delong_method": dl["method"], "n_clusters": dl["n_clusters"]}
        e["auprc"] = {"model": pa_, "baseline": pb_, "diff": pa_ - pb_}
        cache.append((lab, m[ev], ra, rb))
    comp = [lab for lab, e in out["labels"].items() if e["status"] == "compared"]
    macro_labs = [lab for lab in comp if out["labels"][lab]["reliable"]]
    reps: dict[str, dict[str, np.ndarray]] = {}
    if cfg.n_boot > 0 and cache:
        strata, _ = label_strata(y[ev], ok_all, keys[ev], [labels.index(lab) for lab, *_ in cache])
        acc: dict[str, dict[str, list]] = {lab: {"auroc": [], "auprc": []} for lab, *_ in cache}
        for W_all in M.bootstrap_weight_matrices(keys[ev], cfg.n_boot, cfg.seed, strata=strata):
            for lab, mask, ra, rb in cache:
                W = W_all[:, mask]
                (a1, p1), (b1, q1) = ra.auroc_ap_many(W), rb.auroc_ap_many(W)
                acc[lab]["auroc"].append(a1 - b1)
                acc[lab]["auprc"].append(p1 - q1)
        reps = {lab: {k: np.concatenate(v) for k, v in d.items()} for lab, d in acc.items()}
        for lab, d in reps.items():
            for k, v in d.items():
                out["labels"][lab][k].update(ci=bc_interval(v, out["labels"][lab][k]["diff"], cfg.ci_level),
                                             p_bootstrap=bootstrap_p(v))
    out["macro"] = {}
    for k in ("auroc", "auprc"):
        mac: dict[str, Any] = {"labels": macro_labs, "n_labels": len(macro_labs),
                               "labels_excluded": sorted(set(out["labels"]) - set(macro_labs))}
        if macro_labs:
            mac["model"] = float(np.mean([out["labels"][lab][k]["model"] for lab in macro_labs]))
            mac["baseline"] = float(np.mean([out["labels"][lab][k]["baseline"] for lab in macro_labs]))
            mac["diff"] = mac["model"] - mac["baseline"]
            if reps:
                v = np.mean(np.column_stack([reps[lab][k] for lab in macro_labs]), axis=1)
                mac.update(ci=bc_interval(v, mac["diff"], cfg.ci_level), p_bootstrap=bootstrap_p(v))
        out["macro"][k] = mac
    return out


def compare(model: Predictions, baseline: Predictions, labels: LabelTable, cfg: EvalConfig,
            log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """``evaluate --baseline``: the paired comparison of ``model`` and ``baseline`` on the rows and labels both
    hold (counted and logged), per level (records aggregated as :func:`evaluate` does)."""
    a, b, counts = intersect(model, baseline)
    log(f"paired comparison on the common rows: {counts['common_rows']} of {counts['model_rows']} model rows and "
        f"{counts['baseline_rows']} baseline rows ({counts['common_records']} records of {counts['model_records']} "
        f"/ {counts['baseline_records']}); {len(counts['common_labels'])} common labels")
    ja, jb = join(a, labels, cfg), join(b, labels, cfg)
    la, lb = level_data(ja, cfg), level_data(jb, cfg)
    out: dict[str, Any] = {"counts": counts, "levels": {}}
    for name, d in la.items():
        out["levels"][name] = compare_level(d.y, d.s, lb[name].s, d.split, d.keys, ja.pred_labels, ja.kinds, cfg)
    return out


# --------------------------------------------------------------------------------------------- reports
def upstream_info(meta: dict[str, Any]) -> dict[str, Any]:
    """What the predictions carry about how they were made (provenance, contract, probe/finetune details,
    lead subset) for the report."""
    up = {k: v for k, v in meta.items() if k not in ("kind", "schema_version", "label_kinds")}
    leads = None
    contract = meta.get("contract")
    if isinstance(contract, dict):
        leads = contract.get("leads")
    prov = meta.get("provenance")
    if isinstance(prov, dict):
        for src in (prov, prov.get("settings") or {}, prov.get("upstream") or {}):
            if isinstance(src, dict) and src.get("leads") is not None:
                leads = src["leads"]
                break
    if leads is not None:
        up["leads"] = leads
    return up


def describe_model(meta: dict[str, Any]) -> dict[str, str]:
    """What produced a predictions artifact, from its metadata: ``kind`` (``pretrained``, ``random-init``,
    ``features``, ``finetuned``, ``supervised-from-scratch``, ``unknown``), ``head`` (``probe``/``finetune``) and a
    one-line ``description`` (the report names the baselines with it)."""
    model = meta.get("model") if isinstance(meta.get("model"), dict) else {}
    head = "finetune" if "finetune" in meta else "probe" if "probe" in meta else "unknown"
    if head == "finetune":
        init_kind = str(model.get("init_kind") or "")
        if init_kind.startswith("random"):
            return {"kind": "supervised-from-scratch", "head": head,
                    "description": "supervised model trained from a random init (`finetune --random-init`)"}
        return {"kind": "finetuned", "head": head,
                "description": f"encoder finetuned from {model.get('init') or 'a checkpoint'} ({init_kind or '?'})"}
    kind = str(model.get("kind") or "")
    probe = "logistic-regression probe" if head == "probe" else "unknown head"
    if kind == "features":
        cols = model.get("columns")
        what = f" ({len(cols)} features: {', '.join(cols[:6])}{', ...' if len(cols) > 6 else ''})" \
            if isinstance(cols, list) else ""
        return {"kind": "features", "head": head,
                "description": f"classical {model.get('features', '')} features{what} + {probe}"}
    if kind == "random-init":
        return {"kind": "random-init", "head": head,
                "description": f"random-init encoder ({model.get('preset', '?')} preset, seed {model.get('seed')}) "
                               f"+ {probe}"}
    if kind:
        return {"kind": "pretrained", "head": head,
                "description": f"{kind} checkpoint {model.get('checkpoint') or ''} + {probe}".replace("  ", " ")}
    return {"kind": "unknown", "head": head, "description": "unknown (no ecgfm.model metadata)"}


def strip_private(o: Any) -> Any:
    """Drop ``_``-prefixed keys (internal arrays) recursively."""
    if isinstance(o, dict):
        return {k: strip_private(v) for k, v in o.items() if not str(k).startswith("_")}
    if isinstance(o, list):
        return [strip_private(v) for v in o]
    return o


def finite_or_none(o: Any) -> Any:
    """``o`` with every NaN/inf float turned into None (and tuples into lists), so that its JSON is strict."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: finite_or_none(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [finite_or_none(v) for v in o]
    return o


def report_settings(cfg: EvalConfig, label_map: str | None, subgroups: list[str] | None) -> dict[str, Any]:
    """The report's ``settings``: how the evaluation was run."""
    return {"aggregate": cfg.aggregate, "aggregate_methods": cfg.aggregate_methods or None, "bootstrap": cfg.n_boot,
            "seed": cfg.seed, "ci_level": cfg.ci_level, "threshold_method": cfg.threshold_method,
            "calibrate": cfg.calibrate, "eval_split": cfg.eval_split, "ece_bins": M.ECE_BINS, "label_map": label_map,
            "min_positives": cfg.min_positives, "at_specificity": list(cfg.at_specificity),
            "at_sensitivity": list(cfg.at_sensitivity), "subgroups": subgroups or None,
            "age_bands": list(cfg.age_bands), "min_subgroup": cfg.min_subgroup,
            "bootstrap_strata": "patients by the rarest label they are positive for",
            "ci_method": "bias-corrected percentile (BC)",
            "auroc_variance": "DeLong; Obuchowski (1997) clustered by patient where a patient has several rows"}


def report_text(report: dict[str, Any], suffix: str) -> str:
    """The report as the ``-o`` file of that extension holds it: ``.json`` (everything), ``.md`` or ``.csv``."""
    if suffix == ".json":
        return json.dumps(report, indent=2, allow_nan=False) + "\n"
    return report_markdown(report) if suffix == ".md" else report_csv(report)


def build_report(body: dict[str, Any], preds: Predictions, predictions_path: str, labels_path: str,
                 settings: dict[str, Any], provenance: dict[str, Any], baseline_body: dict[str, Any] | None = None,
                 baseline_preds: Predictions | None = None, baseline_path: str | None = None,
                 comparison: dict[str, Any] | None = None, subgroup_sources: dict[str, str] | None = None,
                 ) -> dict[str, Any]:
    """The report (the ``-o OUT.json`` document) of one evaluation: the body of :func:`evaluate`, the settings,
    what produced the predictions (and the baseline), the paired comparison and the provenance; NaN/inf as None."""
    report: dict[str, Any] = {
        "ecgfm_report_version": REPORT_VERSION,
        "kind": "evaluate",
        "predictions": predictions_path,
        "labels": labels_path,
        **body,
        "settings": settings,
        "model": describe_model(preds.meta),
        "upstream": upstream_info(preds.meta),
    }
    if subgroup_sources:
        report["subgroup_sources"] = subgroup_sources
    if baseline_body is not None and baseline_preds is not None:
        report["baseline"] = {"predictions": baseline_path, **baseline_body,
                              "model": describe_model(baseline_preds.meta),
                              "upstream": upstream_info(baseline_preds.meta)}
    if comparison is not None:
        report["comparison"] = comparison
    report["provenance"] = provenance
    return finite_or_none(strip_private(report))


def _fmt(x: float | None, digits: int = 3) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def _fmt_ci(m: dict[str, Any] | None) -> str:
    if not m or m.get("value") is None:
        return "undefined" if m else "—"
    ci = m.get("ci")
    return f"{m['value']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{m['value']:.3f}"


def _fmt_p(p: float | None) -> str:
    if p is None:
        return "—"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _fmt_diff(d: dict[str, Any] | None) -> str:
    if not d or d.get("diff") is None:
        return "—"
    ci = d.get("ci")
    return f"{d['diff']:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else f"{d['diff']:+.3f}"


def _unreliable(e: dict[str, Any]) -> str:
    if e.get("reliable", True) or not e.get("n_pos_patients") or not e.get("n_neg_patients"):
        return ""  # reliable, or single-class (then the metric itself reads "undefined")
    return f" ⚠ unreliable ({e['n_pos_patients']} pos. / {e['n_neg_patients']} neg. patients)"


def macro_left_out(mac: dict[str, Any]) -> str:
    """The labels a macro average leaves out, grouped by reason: ``"A, B (only 1 positive ...); C (...)"``."""
    by: dict[str, list[str]] = {}
    for lab in mac.get("labels_excluded") or []:
        why = (mac.get("excluded_reasons") or {}).get(lab, "")
        why = "fewer than the positive/negative patients needed" if why.startswith("only ") else why
        by.setdefault(why, []).append(lab)
    return "; ".join(f"{', '.join(labs)} ({why})" for why, labs in by.items())


def ci_label(report: dict[str, Any]) -> str:
    """`` [95% CI]`` when the report has bootstrap intervals, else empty."""
    st = report["settings"]
    return f" [{int(round(st['ci_level'] * 100))}% CI]" if st.get("bootstrap") else ""


def threshold_line(lev: dict[str, Any]) -> str | None:
    """One sentence on how the operating thresholds of a level were chosen, when any was not on valid."""
    reasons = sorted({e["threshold"]["reason"].removesuffix("; 0.5 used") for e in lev["labels"].values()
                      if e.get("threshold") and e["threshold"].get("chosen_on") is None})
    if not reasons:
        return None
    n = sum(1 for e in lev["labels"].values() if e.get("threshold") and e["threshold"].get("chosen_on") is None)
    return f"Threshold 0.5 (not chosen on a valid split) for {n} label(s): {'; '.join(reasons)}."


def _cell(text: object) -> str:
    """A Markdown table cell's text: a ``|`` in a label or group name (``PAC|SVPB``) escaped, so the row keeps its
    columns."""
    return str(text).replace("|", "\\|")


def markdown_metrics(report: dict[str, Any], level: str, lev: dict[str, Any], base: dict[str, Any] | None
                     ) -> list[str]:
    """The metrics tables of one level: binary labels (macro row first), then continuous targets."""
    ci = ci_label(report)
    out = []
    binary = {k: v for k, v in lev["labels"].items() if v["kind"] == "binary"}
    cont = {k: v for k, v in lev["labels"].items() if v["kind"] == "continuous"}
    if binary:
        out.append(f"| label | AUROC{ci} | AUPRC{ci} | Sens | Spec | PPV | F1 | Prev | N (pos) |")
        out.append("|---|---|---|---|---|---|---|---|---|")

        def macro_row(name: str, mac: dict[str, Any]) -> str:
            return (f"| {name} | {_fmt_ci(mac['auroc'])} | {_fmt_ci(mac['auprc'])} | "
                    f"{_fmt(mac['sensitivity']['value'])} | {_fmt(mac['specificity']['value'])} | "
                    f"{_fmt(mac['ppv']['value'])} | {_fmt(mac['f1']['value'])} | | "
                    f"{plural(mac['auroc']['n_labels'], 'label')} |")

        out.append(macro_row("**macro**", lev["macro"]))
        if base is not None:
            out.append(macro_row("*baseline (macro)*", base["macro"]))
        for lab, e in binary.items():
            if e["status"] != "evaluated":
                out.append(f"| {_cell(lab)} | skipped: {e.get('reason', '')} | | | | | | | |")
                continue
            out.append(f"| {_cell(lab)} | {_fmt_ci(e['auroc'])}{_unreliable(e)} | {_fmt_ci(e['auprc'])} | "
                       f"{_fmt(e['sensitivity']['value'])} | {_fmt(e['specificity']['value'])} | "
                       f"{_fmt(e['ppv']['value'])} | {_fmt(e['f1']['value'])} | "
                       f"{_fmt(e['prevalence'])} | {e['n']} ({e['n_pos']}) |")
        left = macro_left_out(lev["macro"]["auroc"])
        if left:
            out.append(f"\nMacro over {plural(lev['macro']['auroc']['n_labels'], 'label')}; left out: {left}")
        line = threshold_line(lev)
        if line:
            out.append("\n" + line)
    if cont:
        out.append(f"\n| target | MAE{ci} | RMSE{ci} | R²{ci} | Pearson r{ci} | N |")
        out.append("|---|---|---|---|---|---|")
        for lab, e in cont.items():
            if e["status"] != "evaluated":
                out.append(f"| {_cell(lab)} | skipped: {e.get('reason', '')} | | | | |")
                continue
            out.append(f"| {_cell(lab)} | {_fmt_ci(e['mae'])} | {_fmt_ci(e['rmse'])} | {_fmt_ci(e['r2'])} | "
                       f"{_fmt_ci(e['pearson_r'])} | {e['n']} |")
    return out


def markdown_operating_points(report: dict[str, Any], lev: dict[str, Any]) -> list[str]:
    """Sensitivity at fixed specificity and the reverse, per binary label."""
    st = report["settings"]
    keys = ([(M.operating_key("sens_at_spec", t), f"Sens @ Spec {t:g}") for t in st.get("at_specificity") or []]
            + [(M.operating_key("spec_at_sens", t), f"Spec @ Sens {t:g}") for t in st.get("at_sensitivity") or []])
    binary = {k: v for k, v in lev["labels"].items() if v["kind"] == "binary" and v["status"] == "evaluated"}
    if not keys or not binary:
        return []
    ci = ci_label(report)
    out = ["| label | " + " | ".join(f"{name}{ci}" for _, name in keys) + " |",
           "|---|" + "---|" * len(keys),
           "| **macro** | " + " | ".join(_fmt_ci(lev["macro"].get(k)) for k, _ in keys) + " |"]
    for lab, e in binary.items():
        if e["auroc"]["value"] is None:
            continue
        out.append(f"| {_cell(lab)}{_unreliable(e)} | " + " | ".join(_fmt_ci(e.get(k)) for k, _ in keys) + " |")
    return out


def markdown_comparison(comp_level: dict[str, Any], ci: str) -> list[str]:
    """Paired model - baseline table of one level."""
    out = [f"| label | ΔAUROC{ci} | p (DeLong) | p (bootstrap) | ΔAUPRC{ci} | p (bootstrap) | "
           "AUROC model / baseline | N (pos) |", "|---|---|---|---|---|---|---|---|"]
    mac = comp_level["macro"]
    if mac["auroc"].get("diff") is not None:
        out.append(f"| **macro** ({mac['auroc']['n_labels']} labels) | {_fmt_diff(mac['auroc'])} | | "
                   f"{_fmt_p(mac['auroc'].get('p_bootstrap'))} | {_fmt_diff(mac['auprc'])} | "
                   f"{_fmt_p(mac['auprc'].get('p_bootstrap'))} | {_fmt(mac['auroc']['model'])} / "
                   f"{_fmt(mac['auroc']['baseline'])} | |")
    for lab, e in comp_level["labels"].items():
        if e["status"] != "compared":
            continue
        flag = "" if e["reliable"] else f" ⚠ unreliable ({e['n_pos_patients']} pos. patients)"
        out.append(f"| {_cell(lab)} | {_fmt_diff(e['auroc'])}{flag} | {_fmt_p(e['auroc']['p_delong'])} | "
                   f"{_fmt_p(e['auroc'].get('p_bootstrap'))} | {_fmt_diff(e['auprc'])} | "
                   f"{_fmt_p(e['auprc'].get('p_bootstrap'))} | {_fmt(e['auroc']['model'])} / "
                   f"{_fmt(e['auroc']['baseline'])} | {e['n']} ({e['n_pos']}) |")
    single = [lab for lab, e in comp_level["labels"].items() if e["status"] != "compared"]
    if single:
        out.append(f"\nNot compared (a single class in the common evaluated rows): {', '.join(single)}")
    note = delong_note(comp_level)
    if note:
        out.append("\n" + note)
    return out


def delong_note(comp_level: dict[str, Any]) -> str | None:
    """Which variance the DeLong p-values of a paired comparison used, and over how many patients (clusters)."""
    used: dict[str, list[int]] = {}
    for e in comp_level["labels"].values():
        a = e.get("auroc") or {}
        if e.get("status") == "compared" and a.get("delong_method"):
            used.setdefault(a["delong_method"], []).append(int(a["n_clusters"]))
    if not used:
        return None

    def span(v: list[int]) -> str:
        return str(min(v)) if min(v) == max(v) else f"{min(v)}-{max(v)}"

    parts = []
    if "obuchowski" in used:
        v = used["obuchowski"]
        parts.append(f"clustered by patient (Obuchowski 1997; {span(v)} patients, some with several rows) for "
                     f"{plural(len(v), 'label')}")
    if "delong" in used:
        v = used["delong"]
        parts.append(f"plain DeLong (one row per patient; {span(v)} rows) for {plural(len(v), 'label')}")
    return "DeLong p: " + "; ".join(parts) + "."


def markdown_subgroups(report: dict[str, Any], lev: dict[str, Any]) -> list[str]:
    """Per subgroup column: one row per group (N, macro AUROC/AUPRC with CIs) and the largest gaps."""
    ci = ci_label(report)
    out: list[str] = []
    for name, sg in (lev.get("subgroups") or {}).items():
        out.append(f"\n**{name}**\n")
        out.append(f"| {_cell(name)} | patients | rows | macro AUROC{ci} | macro AUPRC{ci} |")
        out.append("|---|---|---|---|---|")
        for val, g in sg["groups"].items():
            if g["status"] != "evaluated":
                out.append(f"| {_cell(val)} | {g['n_patients']} | {g['n_rows']} | too small: {g['reason']} | |")
                continue
            out.append(f"| {_cell(val)} | {g['n_patients']} | {g['n_rows']} | {_fmt_ci(g['macro']['auroc'])} | "
                       f"{_fmt_ci(g['macro']['auprc'])} |")
        labs = sg.get("macro_labels") or []
        out.append(f"\nMacros over the {plural(len(labs), 'label')} reliable in every evaluated group"
                   + (f": {', '.join(labs)}" if labs else " (none: no macro)"))
        table = gaps_table(sg)
        if table:
            out.append("\nLargest AUROC gaps between groups (highest − lowest group):\n")
            header = gap_header(report["settings"].get("ci_level", 0.95))
            out.append("| " + " | ".join(header) + " |")
            out.append("|" + "---|" * len(header))
            out += ["| " + " | ".join(map(_cell, r)) + " |" for r in table[0]]
            out.append("\n" + table[1])
    return out


def gap_header(ci_level: float) -> list[str]:
    """Columns of :func:`gaps_table`."""
    return ["label", f"AUROC gap [{int(round(ci_level * 100))}% CI]", "p", "lowest group", "highest group"]


def gaps_table(sg: dict[str, Any]) -> tuple[list[list[str]], str] | None:
    """A subgroup column's AUROC gaps (highest - lowest group) as table rows (:func:`gap_header`): the macro's,
    then the five largest labels', each with its interval (``*``: it excludes 0) and p-value; and a note on how
    they were computed. None without gaps."""
    ranked = sorted(((k, v) for k, v in sg["auroc_gaps"].items() if k != "macro"), key=lambda kv: -kv[1]["gap"])
    shown = ([("macro", sg["auroc_gaps"]["macro"])] if "macro" in sg["auroc_gaps"] else []) + ranked[:5]
    if not shown:
        return None
    rows = []
    for k, v in shown:
        ci = f" [{v['ci'][0]:+.3f}, {v['ci'][1]:+.3f}]" if v.get("ci") else ""
        rows.append([f"**{k}**" if k == "macro" else k, f"{v['gap']:.3f}{ci}{' *' if v.get('excludes_zero') else ''}",
                     _fmt_p(v.get("p")), f"{v['lowest']} {v['lowest_value']:.3f}",
                     f"{v['highest']} {v['highest_value']:.3f}"])
    with_ci = [(k, v) for k, v in shown if v.get("ci")]
    if not with_ci:
        return rows, "No interval: a group's AUROC variance is undefined (a single class, or a perfect AUROC)."
    how = ["DeLong"] if any(v["variance"] == "delong" for _, v in with_ci) else []
    why = [w for w, is_macro in (("a patient has several rows", False), ("a macro's labels share rows", True))
           if any(v["variance"] == "obuchowski" and (k == "macro") == is_macro for k, v in with_ci)]
    if why:
        how.append(f"Obuchowski's clustered variance where {' and where '.join(why)}")
    note = f"Intervals and p from the two groups' AUROC variances: {', or '.join(how)}; * the interval excludes 0."
    n_groups = max(v["n_groups"] for _, v in shown)
    if n_groups > 2:
        note += (f" p is for the pair shown, the most different of {n_groups} groups (Bonferroni over "
                 f"{n_groups * (n_groups - 1) // 2} pairs: `p_bonferroni` in the JSON).")
    return rows, note


def report_markdown(report: dict[str, Any]) -> str:
    """Markdown tables: per level, macro row (+ baseline macro row) then one row per label; then the paired
    comparison, operating points and subgroups when present."""
    st = report["settings"]
    head = f"Evaluated split: **{report['evaluated_split']}**"
    folds = (report.get("data") or {}).get("folds")
    if folds:
        head += f" (pooled over {folds['n_folds']} cross-validation folds)"
    if st["bootstrap"]:
        head += f" — bootstrap {st['bootstrap']} patient resamples (stratified by label), " \
                f"{int(round(st['ci_level'] * 100))}% CI"
    out = [head]
    base = report.get("baseline", {}).get("levels", {})
    comp = (report.get("comparison") or {}).get("levels", {})
    for level, lev in report["levels"].items():
        agg = f" (aggregation: {st['aggregate']})" if level == "record" and "aggregation" in lev else ""
        out.append(f"\n### {level}-level{agg}: {lev['n_rows']} rows, {lev['n_patients']} patients\n")
        out += markdown_metrics(report, level, lev, base.get(level))
        if level in comp:
            c = report["comparison"]["counts"]
            what = ("records", c["common_records"], c["model_records"], c["baseline_records"]) \
                if level == "record" and lev.get("aggregation") else \
                ("rows", c["common_rows"], c["model_rows"], c["baseline_rows"])
            out.append(f"\n#### model − baseline (paired on the {what[1]} {what[0]} both hold, of {what[2]} / "
                       f"{what[3]}; {comp[level]['n_rows']} evaluated)\n")
            out += markdown_comparison(comp[level], ci_label(report))
        ops = markdown_operating_points(report, lev)
        if ops:
            out.append("\n#### operating points (read off the ROC curve of the evaluated rows)\n")
            out += ops
        if lev.get("subgroups"):
            out.append("\n#### subgroups")
            out += markdown_subgroups(report, lev)
    ex = report["exclusions"]
    excl = []
    for level, lev in report["levels"].items():
        for lab, e in lev["labels"].items():
            for why, n in (e.get("excluded") or {}).items():
                if n:
                    excl.append(f"{level} {lab}: {n} rows with {why.replace('_', ' ')}")
    if ex["unknown_record_id_rows"]:
        excl.append(f"{ex['unknown_record_id_rows']} rows with unknown record_id")
    if ex["prediction_labels_not_in_labels"]:
        excl.append(f"labels not in the label table: {', '.join(ex['prediction_labels_not_in_labels'])}")
    if excl:
        out.append("\nExcluded: " + "; ".join(excl))
    return "\n".join(out) + "\n"


def report_csv(report: dict[str, Any]) -> str:
    """Flat CSV: model,level,label,metric,value,ci_low,ci_high."""
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["model", "level", "label", "metric", "value", "ci_low", "ci_high"])
    for model, rep in (("model", report), ("baseline", report.get("baseline"))):
        if not rep:
            continue
        for level, lev in rep["levels"].items():
            rows = [("macro", lev["macro"])] + list(lev["labels"].items())
            for lab, e in rows:
                for k, v in e.items():
                    if isinstance(v, dict) and "value" in v and not isinstance(v["value"], dict):
                        ci = v.get("ci") or [None, None]
                        w.writerow([model, level, lab, k, v["value"], ci[0], ci[1]])
                for k in ("prevalence", "n", "n_pos"):
                    if k in e:
                        w.writerow([model, level, lab, k, e[k], None, None])
                if "threshold" in e:
                    w.writerow([model, level, lab, "threshold", e["threshold"]["value"], None, None])
    for level, lev in (report.get("comparison") or {}).get("levels", {}).items():
        for lab, e in [("macro", lev["macro"]), *lev["labels"].items()]:
            for k in ("auroc", "auprc"):
                d = e.get(k) or {}
                if d.get("diff") is not None:
                    ci = d.get("ci") or [None, None]
                    w.writerow(["model-baseline", level, lab, f"delta_{k}", d["diff"], ci[0], ci[1]])
    return buf.getvalue()
