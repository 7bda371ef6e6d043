"""Evaluate predictions against labels: metrics, patient-level bootstrap CIs, thresholds, calibration,
segment -> record aggregation, and the JSON / Markdown / CSV reports.

The pure core is :func:`aggregate_rows` and :func:`evaluate_level`; :func:`evaluate` joins predictions with
labels (counting every excluded row) and runs the levels; the ``report_*`` functions format the result.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ecgfm_cli import metrics as M
from ecgfm_cli.console import progress
from ecgfm_cli.labels import RESERVED_COLUMNS, LabelTable, read_table, string_column, table_metadata
from ecgfm_cli.splits import check_patient_disjoint, patient_keys

BINARY_METRICS = ("auroc", "auprc", "sensitivity", "specificity", "ppv", "f1", "ece", "brier")
MACRO_METRICS = ("auroc", "auprc", "sensitivity", "specificity", "ppv", "f1")
REGRESSION_METRICS = ("mae", "rmse", "r2", "pearson_r")
REPORT_VERSION = 1


class EvaluateError(ValueError):
    """Inputs that cannot be evaluated; the message says what and how to fix it."""


@dataclass
class EvalConfig:
    """Settings of one evaluation (see ``ecgfm evaluate --help``)."""

    eval_split: str = "test"
    threshold_method: str = "f1"
    n_boot: int = 1000
    seed: int = 0
    ci_level: float = 0.95
    calibrate: bool = False
    aggregate: str | None = None
    aggregate_methods: dict[str, str] = field(default_factory=dict)


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
    return Predictions(string_column(table, "record_id"), scores, list(labels),
                       string_column(table, "patient_id"), seg, split, meta)


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


def _binary_point(rs: M.RankedScores, y: np.ndarray, s: np.ndarray, thr: float,
                  w: np.ndarray | None) -> dict[str, float | None]:
    auroc, ap = rs.auroc_ap(w)
    out = {"auroc": auroc, "auprc": ap, **M.threshold_metrics(y, s, thr, w)}
    out["ece"] = M.expected_calibration_error(y, s, w)
    out["brier"] = M.brier(y, s, w)
    return out


def evaluate_level(
    y: np.ndarray, s: np.ndarray, split: np.ndarray | None, keys: np.ndarray,
    labels: list[str], kinds: dict[str, str], cfg: EvalConfig,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Metrics of one level (segments or records).

    y, s: (N, L) truth and predictions (NaN = missing); split: (N,) names or None (then every row is evaluated
    and thresholds/temperatures fall back to defaults); keys: (N,) patient keys for the bootstrap.
    Returns (JSON-ready result, curve data {label: {"y", "s", "s_cal"?}} for plots).
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
    boot_cache: list[tuple[str, np.ndarray, Any]] = []  # (label, mask within ev rows, scorer)
    ev_keys = keys[ev]
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
        yt, st = yj[m], sj[m]
        if kind == "continuous":
            point = M.regression_metrics(yt, st)
            entry["mean_true"] = float(yt.mean())
            for k in REGRESSION_METRICS:
                entry[k] = _metric(point[k], reason="needs variance in targets and predictions")
            boot_cache.append((lab, m[ev], ("continuous", yt, st)))
            continue
        n_pos = int(yt.sum())
        entry.update(n_pos=n_pos, prevalence=float(yt.mean()))
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
        point = _binary_point(rs, yt, st, thr, None)
        single = "undefined: the evaluated rows hold a single class"
        for k in BINARY_METRICS:
            entry[k] = _metric(point[k], reason=single if k in ("auroc", "auprc") else "zero denominator")
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

    # macro over binary labels (each metric over the labels where it is defined)
    binary_entries = {lab: e for lab, e in res["labels"].items() if e.get("kind") == "binary"
                      and e.get("status") == "evaluated"}
    macro_sets = {k: [lab for lab, e in binary_entries.items() if e[k]["value"] is not None] for k in MACRO_METRICS}

    if cfg.n_boot > 0 and boot_cache:
        reps: dict[str, dict[str, list]] = {lab: {} for lab, _, _ in boot_cache}
        macro_reps: dict[str, list] = {k: [] for k in MACRO_METRICS}
        replicates = M.patient_bootstrap_weights(ev_keys, cfg.n_boot, cfg.seed)
        for w_all in progress(replicates, "bootstrap", total=cfg.n_boot, unit="resample"):
            vals: dict[str, dict[str, float | None]] = {}
            for lab, mask, data in boot_cache:
                w = w_all[mask]
                if data[0] == "continuous":
                    vals[lab] = M.regression_metrics(data[1], data[2], w)
                else:
                    _, yt, st, rs, thr = data
                    vals[lab] = _binary_point(rs, yt, st, thr, w)
                for k, v in vals[lab].items():
                    reps[lab].setdefault(k, []).append(v)
            for k in MACRO_METRICS:
                vs = [vals[lab][k] for lab in macro_sets[k]]
                macro_reps[k].append(float(np.mean(vs)) if vs and all(v is not None for v in vs) else None)
        for lab, _, _ in boot_cache:
            for k, samples in reps[lab].items():
                res["labels"][lab][k]["ci"] = M.percentile_ci(samples, cfg.ci_level)
                res["labels"][lab][k]["n_boot_defined"] = sum(v is not None for v in samples)
    else:
        macro_reps = {}
    res["macro"] = {}
    for k in MACRO_METRICS:
        labs = macro_sets[k]
        res["macro"][k] = {
            "value": float(np.mean([binary_entries[lab][k]["value"] for lab in labs])) if labs else None,
            "ci": M.percentile_ci(macro_reps[k], cfg.ci_level) if macro_reps else None,
            "n_labels": len(labs),
            "labels_excluded": sorted(set(binary_entries) - set(labs)),
        }
    skipped = [lab for lab, e in res["labels"].items() if e["status"] == "skipped"]
    if skipped:
        res["labels_skipped"] = skipped
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


def evaluate(preds: Predictions, labels: LabelTable, cfg: EvalConfig,
             log: Callable[[str], None] = lambda s: None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Join ``preds`` with ``labels`` and evaluate every level.

    Returns (report body: exclusions, split info, {"levels": {level: evaluate_level result}}, settings) and the
    curve data {level: {label: ...}} for plots. Rows/labels that cannot be used are counted and logged, never
    dropped silently; nothing usable at all is an :class:`EvaluateError`.
    """
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
    kinds = {p: labels.kinds[mapping[p]] for p in pred_labels}
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
    split_check = {"source": split_source}
    if split is not None:
        overlap = check_patient_disjoint(keys, split)
        split_check.update(patients_in_multiple_splits=len(overlap), examples=list(overlap)[:10])
        if overlap:
            notes.append(f"WARNING: {len(overlap)} patients occur in more than one split; metrics may be optimistic")
        evaluated_on = cfg.eval_split
    else:
        evaluated_on = "all"
        notes.append("no split column: every row is evaluated and thresholds default to 0.5 (no valid split)")
    n_per_record = len(rid) / max(len(set(rid)), 1)
    is_segment = preds.segment_index is not None and bool((preds.segment_index[known] >= 0).any()) \
        and n_per_record > 1
    levels: dict[str, Any] = {}
    curves: dict[str, Any] = {}
    first_level = "segment" if is_segment else "record"
    levels[first_level], curves[first_level] = evaluate_level(Y, S, split, keys, pred_labels, kinds, cfg)
    levels[first_level]["n_records"] = len(set(rid[split == cfg.eval_split] if split is not None else rid))
    if cfg.aggregate and is_segment:
        methods = [cfg.aggregate_methods.get(p, cfg.aggregate_methods.get(mapping[p], "mean")) for p in pred_labels]
        rec_ids, S_rec, first = aggregate_rows(rid, S, methods)
        if split is not None:
            # a record's segments must share one split
            per = {}
            for r, sp in zip(rid, split, strict=True):
                per.setdefault(r, set()).add(sp)
            mixed = [r for r, v in per.items() if len(v) > 1]
            if mixed:
                raise EvaluateError(f"{len(mixed)} records have segments in several splits (e.g. {mixed[0]!r}); "
                                    f"cannot aggregate to records")
        rsplit = split[first] if split is not None else None
        lev, cur = evaluate_level(Y[first], S_rec, rsplit, keys[first], pred_labels, kinds, cfg)
        lev["n_records"] = lev["n_rows"]
        lev["aggregation"] = dict(zip(pred_labels, methods, strict=True))
        levels["record"], curves["record"] = lev, cur
    elif cfg.aggregate:
        notes.append("--aggregate ignored: the predictions already have one row per record")
    for n in notes:
        log(n)
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
        "notes": notes,
        "levels": levels,
    }
    return body, curves


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


def _fmt(x: float | None, digits: int = 3) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def _fmt_ci(m: dict[str, Any] | None) -> str:
    if not m or m.get("value") is None:
        return "undefined" if m else "—"
    ci = m.get("ci")
    return f"{m['value']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{m['value']:.3f}"


def report_markdown(report: dict[str, Any]) -> str:
    """Markdown tables: per level, macro row (+ baseline macro row) then one row per label."""
    out = [f"Evaluated split: **{report['evaluated_split']}**"
           + (f" — bootstrap {report['settings']['bootstrap']} patient resamples, "
              f"{int(report['settings']['ci_level'] * 100)}% CI" if report["settings"]["bootstrap"] else "")]
    base = report.get("baseline", {}).get("levels", {})
    for level, lev in report["levels"].items():
        binary = {k: v for k, v in lev["labels"].items() if v["kind"] == "binary"}
        cont = {k: v for k, v in lev["labels"].items() if v["kind"] == "continuous"}
        agg = f" (aggregation: {report['settings']['aggregate']})" if level == "record" and "aggregation" in lev else ""
        out.append(f"\n### {level}-level{agg}: {lev['n_rows']} rows, {lev['n_patients']} patients\n")
        if binary:
            out.append("| label | AUROC [95% CI] | AUPRC [95% CI] | Sens | Spec | PPV | F1 | Prev | N |")
            out.append("|---|---|---|---|---|---|---|---|---|")

            def macro_row(name: str, mac: dict[str, Any]) -> str:
                return (f"| {name} | {_fmt_ci(mac['auroc'])} | {_fmt_ci(mac['auprc'])} | "
                        f"{_fmt(mac['sensitivity']['value'])} | {_fmt(mac['specificity']['value'])} | "
                        f"{_fmt(mac['ppv']['value'])} | {_fmt(mac['f1']['value'])} | | |")

            out.append(macro_row("**macro**", lev["macro"]))
            if level in base:
                out.append(macro_row("*baseline (macro)*", base[level]["macro"]))
            for lab, e in binary.items():
                if e["status"] != "evaluated":
                    out.append(f"| {lab} | skipped: {e.get('reason', '')} | | | | | | | |")
                    continue
                out.append(f"| {lab} | {_fmt_ci(e['auroc'])} | {_fmt_ci(e['auprc'])} | "
                           f"{_fmt(e['sensitivity']['value'])} | {_fmt(e['specificity']['value'])} | "
                           f"{_fmt(e['ppv']['value'])} | {_fmt(e['f1']['value'])} | "
                           f"{_fmt(e['prevalence'])} | {e['n']} |")
        if cont:
            out.append("\n| target | MAE [95% CI] | RMSE [95% CI] | R² [95% CI] | Pearson r [95% CI] | N |")
            out.append("|---|---|---|---|---|---|")
            for lab, e in cont.items():
                if e["status"] != "evaluated":
                    out.append(f"| {lab} | skipped: {e.get('reason', '')} | | | | |")
                    continue
                out.append(f"| {lab} | {_fmt_ci(e['mae'])} | {_fmt_ci(e['rmse'])} | {_fmt_ci(e['r2'])} | "
                           f"{_fmt_ci(e['pearson_r'])} | {e['n']} |")
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
    return buf.getvalue()
