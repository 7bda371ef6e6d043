"""``evaluate --report``: one file a reviewer reads (self-contained HTML with embedded PNG figures, or Markdown).

Built from the report dictionary of :func:`ecgfm_cli.evaluate.build_report` (what ``-o OUT.json`` holds) as a list
of blocks (headings, paragraphs, tables, images) rendered to either format. Sections follow the TRIPOD+AI items a
reader checks: data and its sources, splits, model and baselines, analysis, metrics, calibration, subgroups,
clinical utility, then exclusions and provenance.
"""

from __future__ import annotations

import base64
import html as _html
import io
from typing import Any

from ecgfm_cli import metrics as M
from ecgfm_cli.evaluate import (
    _fmt,
    _fmt_ci,
    _fmt_diff,
    _fmt_p,
    _unreliable,
    ci_label,
    delong_note,
    gap_header,
    gaps_table,
    macro_left_out,
    threshold_line,
)

#: Threshold probabilities shown in the decision-curve table (the plot shows 0.01-0.99).
DCA_TABLE = (0.05, 0.1, 0.2, 0.3, 0.5)
Block = tuple


def _table(header: list[str], rows: list[list[Any]]) -> Block:
    return ("table", header, [[("" if c is None else str(c)) for c in r] for r in rows])


def _data_blocks(rep: dict[str, Any]) -> list[Block]:
    d = rep.get("data") or {}
    out: list[Block] = [("h", 2, "Data")]
    out.append(("p", f"Predictions: `{rep['predictions']}` ({d.get('rows')} rows at {d.get('level_of_rows')} level, "
                     f"{d.get('records')} records, {d.get('patients')} patients joined with labels). Labels: "
                     f"`{rep['labels']}`" + (f" with label map `{rep['settings']['label_map']}`"
                                              if rep["settings"].get("label_map") else "") + "."))
    ups = (rep.get("upstream") or {}).get("provenance") or {}
    chain = []
    node = ups
    while isinstance(node, dict) and node:
        for k, v in (node.get("inputs") or {}).items():
            if isinstance(v, dict) and v.get("path"):
                chain.append(f"{k}: `{v['path']}`")
        node = node.get("upstream")
    if chain:
        out.append(("p", "Upstream inputs recorded in the predictions: " + "; ".join(dict.fromkeys(chain)) + "."))
    splits = d.get("splits") or {}
    if splits:
        labs = list(dict.fromkeys(lab for s in splits.values() for lab in s["positives"]))
        header = ["", *[f"{sp}" for sp in splits]]
        rows = [["records", *[s["records"] for s in splits.values()]],
                ["patients", *[s["patients"] for s in splits.values()]]]
        rows += [[f"{lab}: positive records (of labelled)",
                  *[f"{s['positives'].get(lab, 0)} ({s['labelled'].get(lab, 0)})" for s in splits.values()]]
                 for lab in labs]
        out += [("h", 3, "Splits, and positives per label (records)"), _table(header, rows)]
    sc = rep.get("split_check") or {}
    out.append(("p", f"Split from: {sc.get('source') or 'none (every row evaluated)'}; patients in more than one "
                     f"split: {sc.get('patients_in_multiple_splits', 0)}. Evaluated split: "
                     f"**{rep['evaluated_split']}**."))
    folds = d.get("folds")
    if folds:
        out.append(("p", f"Cross-validated predictions: {folds['n_folds']} folds, every scored row predicted by a "
                         f"probe that did not see it; metrics pool all folds."))
        out.append(_table(["fold", "records", "patients"],
                          [[f, v["records"], v["patients"]] for f, v in folds["per_fold"].items()]))
    for level, lev in rep["levels"].items():
        sg = (lev.get("subgroups") or {}).get("source")
        if sg:
            out.append(("p", f"Sources ({level} level, evaluated split): " + ", ".join(
                f"{g} ({v['n_patients']} patients)" for g, v in sg["groups"].items())))
            break
    return out


def _model_blocks(rep: dict[str, Any]) -> list[Block]:
    out: list[Block] = [("h", 2, "Model and baselines")]
    m = rep.get("model") or {}
    up = rep.get("upstream") or {}
    out.append(("p", f"Model: {m.get('description', 'unknown')}."
                + (f" Leads: {', '.join(up['leads'])}." if up.get("leads") else "")))
    kinds = {"random-init": "random-init encoder", "features": "classical features",
             "supervised-from-scratch": "supervised from scratch"}
    b = rep.get("baseline")
    shown = []
    if b:
        bm = b.get("model") or {}
        out.append(("p", f"Baseline shown: {bm.get('description', 'unknown')} (`{b.get('predictions')}`)."))
        shown.append(bm.get("kind"))
    missing = [v for k, v in kinds.items() if k not in shown and k != m.get("kind")]
    out.append(("p", "Baselines in this report: " + (", ".join(kinds.get(k, k) for k in shown) if shown else "none")
                + ". Not shown: " + ", ".join(missing) + "."))
    return out


def _analysis_blocks(rep: dict[str, Any]) -> list[Block]:
    st = rep["settings"]
    lines = [f"Evaluated split: {st['eval_split']}.",
             (f"Confidence intervals: {int(round(st['ci_level'] * 100))}% bias-corrected percentile intervals of a "
              f"patient-level bootstrap ({st['bootstrap']} resamples, seed {st['seed']}), stratified by the rarest "
              f"label each patient is positive for."
              if st["bootstrap"] else "No bootstrap (--bootstrap 0): no intervals."),
             f"Labels with fewer than {st.get('min_positives')} positive or negative patients are marked unreliable "
             f"and left out of the macro averages.",
             "DeLong p-values (model − baseline) and the intervals of the subgroup AUROC gaps: DeLong's variance, "
             "or Obuchowski's (1997) clustered variance where a patient has several rows (records or segments).",
             f"Operating thresholds chosen on the valid split by {st['threshold_method']} (0.5 where there is none).",
             "Aggregation of segments to records: " + (st["aggregate"] or "none") + ".",
             "Temperature scaling on valid: " + ("yes" if st["calibrate"] else "no") + "."]
    return [("h", 2, "Analysis"), ("ul", lines)]


def _level_blocks(rep: dict[str, Any], level: str, lev: dict[str, Any]) -> list[Block]:
    ci = ci_label(rep)
    st = rep["settings"]
    out: list[Block] = [("h", 2, f"Results: {level} level ({lev['n_rows']} rows, {lev['n_patients']} patients)")]
    base = (rep.get("baseline") or {}).get("levels", {}).get(level)
    binary = {k: v for k, v in lev["labels"].items() if v["kind"] == "binary"}
    rows = [["**macro**", _fmt_ci(lev["macro"]["auroc"]), _fmt_ci(lev["macro"]["auprc"]),
             _fmt(lev["macro"]["sensitivity"]["value"]), _fmt(lev["macro"]["specificity"]["value"]),
             _fmt(lev["macro"]["ppv"]["value"]), _fmt(lev["macro"]["f1"]["value"]), "", "", "",
             f"{lev['macro']['auroc']['n_labels']} labels"]]
    if base is not None:
        bm = base["macro"]
        rows.append(["*baseline (macro)*", _fmt_ci(bm["auroc"]), _fmt_ci(bm["auprc"]),
                     _fmt(bm["sensitivity"]["value"]), _fmt(bm["specificity"]["value"]), _fmt(bm["ppv"]["value"]),
                     _fmt(bm["f1"]["value"]), "", "", "", ""])
    for lab, e in binary.items():
        if e["status"] != "evaluated":
            rows.append([lab, f"skipped: {e.get('reason', '')}", *[""] * 9])
            continue
        rows.append([lab, _fmt_ci(e["auroc"]) + _unreliable(e), _fmt_ci(e["auprc"]),
                     _fmt(e["sensitivity"]["value"]), _fmt(e["specificity"]["value"]), _fmt(e["ppv"]["value"]),
                     _fmt(e["f1"]["value"]), _fmt(e["threshold"]["value"]), _fmt(e["prevalence"]),
                     e["n_pos_patients"], f"{e['n']} ({e['n_pos']})"])
    if binary:
        out.append(_table(["label", f"AUROC{ci}", f"AUPRC{ci}", "Sens", "Spec", "PPV", "F1", "threshold", "Prev",
                           "pos. patients", "N (pos)"], rows))
        left = macro_left_out(lev["macro"]["auroc"])
        if left:
            out.append(("p", "Left out of the macro: " + left))
        line = threshold_line(lev)
        if line:
            out.append(("p", line))
    cont = {k: v for k, v in lev["labels"].items() if v["kind"] == "continuous" and v["status"] == "evaluated"}
    if cont:
        out.append(_table(["target", f"MAE{ci}", f"RMSE{ci}", f"R²{ci}", f"Pearson r{ci}", "N"],
                          [[lab, _fmt_ci(e["mae"]), _fmt_ci(e["rmse"]), _fmt_ci(e["r2"]), _fmt_ci(e["pearson_r"]),
                            e["n"]] for lab, e in cont.items()]))
    comp = (rep.get("comparison") or {}).get("levels", {}).get(level)
    if comp:
        c = rep["comparison"]["counts"]
        out.append(("h", 3, "Model − baseline (paired)"))
        out.append(("p", f"On the {c['common_rows']} rows ({c['common_records']} records) both predictions hold, of "
                         f"{c['model_rows']} model / {c['baseline_rows']} baseline rows; {comp['n_rows']} evaluated. "
                         + (delong_note(comp) or "") + " The bootstrap p and interval resample patients."))
        rows = []
        mac = comp["macro"]
        if mac["auroc"].get("diff") is not None:
            rows.append([f"**macro** ({mac['auroc']['n_labels']} labels)", _fmt_diff(mac["auroc"]), "",
                         _fmt_p(mac["auroc"].get("p_bootstrap")), _fmt_diff(mac["auprc"]),
                         _fmt_p(mac["auprc"].get("p_bootstrap")), ""])
        for lab, e in comp["labels"].items():
            if e["status"] != "compared":
                continue
            flag = "" if e["reliable"] else " ⚠ unreliable"
            rows.append([lab, _fmt_diff(e["auroc"]) + flag, _fmt_p(e["auroc"]["p_delong"]),
                         _fmt_p(e["auroc"].get("p_bootstrap")), _fmt_diff(e["auprc"]),
                         _fmt_p(e["auprc"].get("p_bootstrap")), f"{e['n']} ({e['n_pos']})"])
        out.append(_table(["label", f"ΔAUROC{ci}", "p (DeLong)", "p (bootstrap)", f"ΔAUPRC{ci}", "p (bootstrap)",
                           "N (pos)"], rows))
    # calibration
    cal_rows = []
    for lab, e in binary.items():
        if e["status"] != "evaluated":
            continue
        c = e.get("calibrated") or {}
        cal_rows.append([lab, _fmt_ci(e["ece"]), _fmt_ci(e["brier"])]
                        + ([_fmt(c.get("temperature")), _fmt(c.get("ece")), _fmt(c.get("brier"))]
                           if st["calibrate"] else []))
    if cal_rows:
        out += [("h", 3, "Calibration"),
                _table(["label", f"ECE{ci}", f"Brier{ci}"]
                       + (["temperature (valid)", "ECE after", "Brier after"] if st["calibrate"] else []), cal_rows)]
        if not st["calibrate"]:
            out.append(("p", "No temperature scaling (--calibrate fits one per label on the valid split)."))
    # utility
    keys = ([(M.operating_key("sens_at_spec", t), f"Sens @ Spec {t:g}") for t in st.get("at_specificity") or []]
            + [(M.operating_key("spec_at_sens", t), f"Spec @ Sens {t:g}") for t in st.get("at_sensitivity") or []])
    ev = {k: v for k, v in binary.items() if v["status"] == "evaluated"}
    if keys and ev:
        out.append(("h", 3, "Operating points (read off the ROC curve of the evaluated rows)"))
        out.append(_table(["label", *[f"{n}{ci}" for _, n in keys]],
                          [["**macro**", *[_fmt_ci(lev["macro"].get(k)) for k, _ in keys]]]
                          + [[lab + _unreliable(e), *[_fmt_ci(e.get(k)) for k, _ in keys]] for lab, e in ev.items()
                             if e["auroc"]["value"] is not None]))
    grid = lev.get("decision_curve_thresholds") or []
    dca_rows = []
    for lab, e in ev.items():
        dc = e.get("decision_curve")
        if not dc or not grid:
            continue
        cells = []
        for t in DCA_TABLE:
            if t in grid:
                i = grid.index(t)
                cells.append(f"{dc['model'][i]:.3f} / {max(dc['treat_all'][i], 0.0):.3f}")
        useful = [mv > max(ta, 0) + 1e-9 for mv, ta in zip(dc["model"], dc["treat_all"], strict=True)]
        dca_rows.append([lab, *cells, _ranges(grid, useful)])
    if dca_rows:
        out.append(("h", 3, "Decision curves: net benefit, model / best of treat-all and treat-none"))
        out.append(("p", "Net benefit = TP/n − FP/n · pt/(1 − pt) when treating at predicted probability ≥ pt; it "
                         "assumes calibrated probabilities (see Calibration)."))
        out.append(_table(["label", *[f"pt = {t:g}" for t in DCA_TABLE if t in grid],
                           "thresholds where the model beats both"], dca_rows))
    # subgroups: one column per group, one row per label (AUROC [CI])
    for name, sg in (lev.get("subgroups") or {}).items():
        src = (rep.get("subgroup_sources") or {}).get(name, "")
        out.append(("h", 3, f"Subgroups: {name}" + (f" (from {src})" if src else "")))
        groups = sg["groups"]
        evald = {v: g for v, g in groups.items() if g["status"] == "evaluated"}
        small = {v: g for v, g in groups.items() if g["status"] != "evaluated"}
        if small:
            out.append(("p", "Too small to evaluate (not merged): " + "; ".join(
                f"{v} ({g['n_patients']} patients)" for v, g in small.items())
                + f" — fewer than --min-subgroup {st.get('min_subgroup')} patients."))
        if evald:
            rows = [["patients (rows)", *[f"{g['n_patients']} ({g['n_rows']})" for g in evald.values()]],
                    [f"**macro AUROC**{ci}", *[_fmt_ci(g["macro"]["auroc"]) for g in evald.values()]],
                    [f"**macro AUPRC**{ci}", *[_fmt_ci(g["macro"]["auprc"]) for g in evald.values()]]]
            for lab in ev:
                cells = []
                for g in evald.values():
                    e = g["labels"][lab]
                    if e.get("status") != "evaluated" or e["auroc"]["value"] is None:
                        cells.append("—")
                    else:
                        flag = "" if e.get("reliable", True) else f" ⚠ {e['n_pos_patients']} pos."
                        cells.append(_fmt_ci(e["auroc"]) + flag)
                if any(c != "—" for c in cells):
                    rows.append([f"{lab} AUROC", *cells])
            out.append(_table([name, *evald], rows))
        ml = sg.get("macro_labels") or []
        out.append(("p", f"Macros over the {len(ml)} labels reliable in every evaluated group"
                         + (f": {', '.join(ml)}." if ml else " (none: no macro).")))
        table = gaps_table(sg)
        if table:
            out.append(("p", "Largest AUROC gaps between groups (highest − lowest group; groups large enough, labels "
                             "reliable in both):"))
            out += [_table(gap_header(st.get("ci_level", 0.95)), table[0]), ("p", table[1])]
    return out


def _ranges(grid: list[float], flags: list[bool]) -> str:
    """Runs of consecutive grid points where ``flags`` holds: ``"0.01-0.06, 0.1-0.12"`` (``"none"``)."""
    runs, start = [], None
    for i, f in enumerate([*flags, False]):
        if f and start is None:
            start = i
        elif not f and start is not None:
            runs.append(f"{grid[start]:g}" if start == i - 1 else f"{grid[start]:g}-{grid[i - 1]:g}")
            start = None
    return ", ".join(runs) or "none"


def _figure_blocks(curves: dict[str, Any], base_curves: dict[str, Any] | None) -> list[Block]:
    import matplotlib.pyplot as plt

    from ecgfm_cli.plots import label_figure

    out: list[Block] = [("h", 2, "Figures (ROC, precision-recall, reliability, decision curve)")]
    for level, labs in curves.items():
        imgs: list[Block] = []
        for lab, c in labs.items():
            if c["y"].min() == c["y"].max():
                continue
            fig = label_figure(lab, level, c, (base_curves or {}).get(level, {}).get(lab))
            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=70)
            plt.close(fig)
            imgs.append(("img", f"{lab} ({level})", buf.getvalue()))
        if imgs:
            out.append(("details", f"{level} level: {len(imgs)} labels", imgs))
    return out


def _tail_blocks(rep: dict[str, Any]) -> list[Block]:
    out: list[Block] = [("h", 2, "Notes and exclusions")]
    notes = list(rep.get("notes") or [])
    ex = rep["exclusions"]
    notes.append(f"rows with a record_id absent from the labels: {ex['unknown_record_id_rows']}; prediction labels "
                 f"not in the labels: {ex['prediction_labels_not_in_labels'] or 'none'}; labels never predicted: "
                 f"{ex['labels_not_predicted'] or 'none'}")
    out.append(("ul", notes))
    prov = rep.get("provenance") or {}
    out.append(("h", 2, "Provenance"))
    lines = [f"command: `{' '.join(map(str, prov.get('command') or []))}`",
             f"ecgfm {prov.get('ecgfm_version')}, created {prov.get('created_utc')}, python {prov.get('python')}"]
    for k, v in (prov.get("inputs") or {}).items():
        if isinstance(v, dict):
            lines.append(f"{k}: `{v.get('path')}` sha256 {str(v.get('sha256'))[:16]}… ({v.get('method')})")
    out.append(("ul", lines))
    return out


def report_blocks(rep: dict[str, Any], curves: dict[str, Any] | None = None,
                  base_curves: dict[str, Any] | None = None) -> list[Block]:
    """The report as blocks; figures only when ``curves`` is given."""
    blocks: list[Block] = [("h", 1, "ecgfm evaluation report")]
    blocks += _data_blocks(rep) + _model_blocks(rep) + _analysis_blocks(rep)
    for level, lev in rep["levels"].items():
        blocks += _level_blocks(rep, level, lev)
    if curves is not None:
        blocks += _figure_blocks(curves, base_curves)
    return blocks + _tail_blocks(rep)


def _md_inline(text: str) -> str:
    """The few Markdown marks the blocks use (**bold**, *italic*, `code`) as HTML, the rest escaped."""
    import re

    t = _html.escape(text)
    t = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", t)
    t = re.sub(r"(?<![\w*])\*(?!\s)(.+?)\*(?!\w)", r"<i>\1</i>", t)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", t)


def to_html(blocks: list[Block]) -> str:
    parts = []
    for b in blocks:
        if b[0] == "h":
            parts.append(f"<h{b[1]}>{_md_inline(b[2])}</h{b[1]}>")
        elif b[0] == "p":
            parts.append(f"<p>{_md_inline(b[1])}</p>")
        elif b[0] == "ul":
            parts.append("<ul>" + "".join(f"<li>{_md_inline(x)}</li>" for x in b[1]) + "</ul>")
        elif b[0] == "table":
            head = "".join(f"<th>{_md_inline(h)}</th>" for h in b[1])
            body = "".join("<tr>" + "".join(f"<td>{_md_inline(c)}</td>" for c in r) + "</tr>" for r in b[2])
            parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif b[0] == "img":
            data = base64.b64encode(b[2]).decode()
            parts.append(f'<figure><img alt="{_html.escape(b[1])}" src="data:image/png;base64,{data}">'
                         f"<figcaption>{_html.escape(b[1])}</figcaption></figure>")
        elif b[0] == "details":
            parts.append(f"<details open><summary>{_html.escape(b[1])}</summary>{to_html(b[2])}</details>")
    return "\n".join(parts)


CSS = """body{font-family:system-ui,sans-serif;max-width:1400px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1em;font-size:13px}th,td{border:1px solid #ccc;padding:3px 7px;
text-align:left}th{background:#f3f3f3}code{font-size:12px;background:#f6f6f6}img{max-width:100%}
h2{border-bottom:1px solid #ddd;margin-top:1.6em}figure{margin:.5em 0}figcaption{font-size:12px;color:#666}"""


def to_markdown(blocks: list[Block]) -> str:
    parts = []
    for b in blocks:
        if b[0] == "h":
            parts.append("#" * b[1] + " " + b[2])
        elif b[0] == "p":
            parts.append(b[1])
        elif b[0] == "ul":
            parts.append("\n".join(f"- {x}" for x in b[1]))
        elif b[0] == "table":
            rows = [b[1], ["---"] * len(b[1]), *b[2]]
            parts.append("\n".join("| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows))
        elif b[0] == "details":
            parts.append(to_markdown(b[2]))
    return "\n\n".join(parts) + "\n"


def render_report(rep: dict[str, Any], curves: dict[str, Any] | None = None,
                  base_curves: dict[str, Any] | None = None, html: bool = True) -> str:
    """The whole report: self-contained HTML (figures as base64 PNG) or Markdown (no figures: use --plots)."""
    if not html:
        return to_markdown(report_blocks(rep, None) + [("p", "Figures: in the HTML report or with `--plots DIR`.")])
    body = to_html(report_blocks(rep, curves, base_curves))
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>ecgfm evaluation report</title>"
            f"<style>{CSS}</style></head><body>\n{body}\n</body></html>\n")
