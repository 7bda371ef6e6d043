"""``ecgfm evaluate``: metrics with patient-level bootstrap CIs, thresholds chosen on valid, calibration,
segment -> record aggregation, paired comparisons, subgroups, decision curves; JSON/Markdown/CSV reports, plots and
a self-contained HTML/Markdown report. The work is in ``ecgfm_cli.evaluate`` / ``ecgfm_cli.report``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ecgfm_cli.eval_options import Aggregate, EvalConfig, ThresholdMethod, csv_numbers

_E = EvalConfig  # the defaults


def evaluate_command(
    predictions: Annotated[Path, typer.Argument(help="Predictions from `ecgfm probe`/`ecgfm finetune` (.parquet or a "
                                                "shard directory).")],
    labels: Annotated[Path, typer.Option("--labels", "-l", help="Labels table (CSV/Parquet): record_id + one column "
                                         "per label [+ split], or ingest's long table with --label-map.")],
    label_map: Annotated[str | None, typer.Option("--label-map", help="code,label CSV or a packaged map "
                                                  "(challenge2021) for a long labels table.")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Report file: .json (everything), .md or "
                                                ".csv. The Markdown table is always printed on stdout.")] = None,
    aggregate: Annotated[Aggregate | None, typer.Option(
        help="Also evaluate record-level predictions: segment probabilities grouped by record_id with max, mean, min, "
        "or `label` (ECG-FM's per-label rules).")] = _E.aggregate,
    aggregate_rules: Annotated[Path | None, typer.Option(help="JSON {label: max|mean|min} overriding the per-label "
                                                         "rules of --aggregate label.")] = None,
    bootstrap: Annotated[int, typer.Option(help=f"Patient-level bootstrap resamples for {_E.ci_level:.0%} CIs (0 "
                                           "disables).")] = _E.n_boot,
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap.")] = _E.seed,
    calibrate: Annotated[bool, typer.Option("--calibrate", help="Fit one temperature per label on the valid split "
                                            "and report calibration after scaling.")] = _E.calibrate,
    threshold: Annotated[ThresholdMethod, typer.Option(
        help="How the operating threshold is chosen on the valid split.")] = _E.threshold_method,
    eval_split: Annotated[str, typer.Option(help="Split to report (when there is a split column).")] = _E.eval_split,
    plots: Annotated[Path | None, typer.Option(help="Directory for PNG plots (ROC, PR, reliability) per label; "
                                               "replaced as a whole. Needs matplotlib.")] = None,
    baseline: Annotated[Path | None, typer.Option(help="Predictions of a baseline (e.g. `ecgfm probe --baseline` "
                                                  "output): reported beside the model, and the paired difference "
                                                  "(ΔAUROC, ΔAUPRC with CIs and p-values) on the common rows.")] = None,
    subgroups: Annotated[str | None, typer.Option(help="Comma-separated columns to report metrics per group of "
                                                  "(e.g. age,sex,source): from the predictions or the --records "
                                                  "tables; age in --age-bands.")] = None,
    records: Annotated[list[Path] | None, typer.Option("--records", help="Tables joined on record_id for "
                                                       "--subgroups: a segments or records artifact (age, sex, "
                                                       "source_path), ingest's labels table, any CSV/Parquet. "
                                                       "Repeatable.")] = None,
    age_bands: Annotated[str, typer.Option(help="Upper-exclusive band edges for age (years).")
                         ] = csv_numbers(_E.age_bands),
    min_subgroup: Annotated[int, typer.Option(help="Patients a subgroup needs to be evaluated (smaller ones are "
                                              "reported as too small).")] = _E.min_subgroup,
    min_positives: Annotated[int, typer.Option(help="Positive (and negative) patients a label needs for a reliable "
                                               "interval and a place in the macro average.")] = _E.min_positives,
    at_specificity: Annotated[str, typer.Option(help="Specificity targets for 'sensitivity at specificity' "
                                                "(comma-separated; empty for none).")] = csv_numbers(_E.at_specificity),
    at_sensitivity: Annotated[str, typer.Option(help="Sensitivity targets for 'specificity at sensitivity'.")
                              ] = csv_numbers(_E.at_sensitivity),
    report: Annotated[Path | None, typer.Option("--report", help="One self-contained file for a reviewer (.html "
                                                "with embedded plots, or .md): data, splits, baselines, metrics, "
                                                "calibration, subgroups, decision curves, provenance.")] = None,
) -> None:
    """Evaluate predictions against labels on the test split: AUROC, AUPRC, sensitivity, specificity, PPV, F1,
    calibration (and MAE/RMSE/R²/r for continuous targets) with patient-level bootstrap CIs; paired comparison
    with a baseline, subgroups, decision curves and operating points."""
    from ecgfm_cli.errors import EcgfmError
    from ecgfm_cli.evaluate import (
        build_report,
        compare,
        evaluate,
        load_predictions,
        report_markdown,
        report_settings,
        report_text,
        subgroup_columns,
    )
    from ecgfm_cli.io.artifacts import atomic_path, atomic_write_text, check_writable_dir
    from ecgfm_cli.labels import load_aggregate_rules, load_labels, resolve_aggregation
    from ecgfm_cli.provenance import build_provenance

    if output is not None and output.suffix.lower() not in (".json", ".md", ".csv"):
        raise EcgfmError(f"-o {output}: the report format comes from the extension; use .json, .md or .csv")
    if report is not None and report.suffix.lower() not in (".html", ".htm", ".md"):
        raise EcgfmError(f"--report {report}: use .html (self-contained, plots embedded) or .md")
    if bootstrap < 0:
        raise typer.BadParameter("must be >= 0", param_hint="--bootstrap")
    for value, name in ((min_positives, "--min-positives"), (min_subgroup, "--min-subgroup")):
        if value < 1:
            raise typer.BadParameter("must be >= 1", param_hint=name)
    if aggregate_rules is not None and aggregate != "label":
        raise typer.BadParameter("needs --aggregate label", param_hint="--aggregate-rules")
    targets = {}
    for name, text in (("--at-specificity", at_specificity), ("--at-sensitivity", at_sensitivity),
                       ("--age-bands", age_bands)):
        try:
            vals = tuple(float(x) for x in text.split(",") if x.strip())
        except ValueError:
            raise typer.BadParameter(f"expected comma-separated numbers, got {text!r}", param_hint=name) from None
        if name != "--age-bands" and any(not 0 < v < 1 for v in vals):
            raise typer.BadParameter("targets must lie in (0, 1)", param_hint=name)
        if name == "--age-bands" and (not vals or list(vals) != sorted(set(vals))):
            raise typer.BadParameter("give increasing band edges, e.g. 40,60,80", param_hint=name)
        targets[name] = vals
    subgroup_names = [x.strip() for x in (subgroups or "").split(",") if x.strip()]
    if records and not subgroup_names:
        raise typer.BadParameter("is only used by --subgroups", param_hint="--records")
    if plots is not None or (report is not None and report.suffix.lower() != ".md"):
        from ecgfm_cli.plots import PlotsUnavailable, check_plots_dir, require_matplotlib

        try:
            require_matplotlib()
        except PlotsUnavailable as e:
            raise EcgfmError(str(e) if plots is not None else str(e).replace("--plots", "--report .html")) from e
    for p, what in ((predictions, "PREDICTIONS"), (labels, "--labels"), (baseline, "--baseline"),
                    (aggregate_rules, "--aggregate-rules"), *((r, "--records") for r in records or [])):
        if p is not None and not p.exists():
            raise EcgfmError(f"{what} {p}: no such file or directory")
    for path, what in ((output, "-o"), (report, "--report")):
        if path is not None:
            check_writable_dir(path.parent, f"{what} {path}")
    if plots is not None:
        check_plots_dir(plots)

    def log(msg: str) -> None:
        typer.echo(f"ecgfm evaluate: {msg}", err=True)

    base_body, base_curves, bpreds, comparison, sources = None, None, None, None, None
    table = load_labels(labels, label_map)
    preds = load_predictions(predictions)
    rules = load_aggregate_rules(aggregate_rules) if aggregate_rules else None
    methods = (resolve_aggregation(preds.labels, aggregate, rules, table.label_map)
               if aggregate is not None else {})
    cfg = EvalConfig(eval_split=eval_split, threshold_method=threshold, n_boot=bootstrap, seed=seed,
                     calibrate=calibrate, aggregate=aggregate,
                     aggregate_methods=methods, min_positives=min_positives,
                     at_specificity=targets["--at-specificity"], at_sensitivity=targets["--at-sensitivity"],
                     min_subgroup=min_subgroup, age_bands=targets["--age-bands"])
    groups = None
    if subgroup_names:
        groups, sources = subgroup_columns(subgroup_names, predictions, preds, list(records or []),
                                           cfg.age_bands)
        for name, where in sources.items():
            log(f"subgroup {name!r} from {where}")
    body, curves = evaluate(preds, table, cfg, log=log, subgroups=groups)
    if baseline is not None:
        bpreds = load_predictions(baseline)
        base_body, base_curves = evaluate(bpreds, table, cfg, log=lambda m: log(f"baseline: {m}"))
        comparison = compare(preds, bpreds, table, cfg, log=log)

    lm_input = label_map if label_map and Path(label_map).is_file() else None
    settings = report_settings(cfg, label_map, subgroup_names)
    inputs = {"predictions": predictions, "labels": labels, "label_map": lm_input, "baseline": baseline,
              "aggregate_rules": aggregate_rules}
    inputs.update({f"records_{i}": r for i, r in enumerate(records or [])})
    prov = build_provenance(inputs, seed=seed, extra=settings)
    rep = build_report(body, preds, str(predictions), str(labels), settings, prov, base_body, bpreds,
                       str(baseline) if baseline else None, comparison, sources)

    md = report_markdown(rep)
    typer.echo(md)
    if output is not None:
        atomic_write_text(output, report_text(rep, output.suffix.lower()))
        log(f"wrote {output}")
    if plots is not None:
        from ecgfm_cli.plots import write_plots

        with atomic_path(plots) as tmp:
            tmp.mkdir()
            written = write_plots(curves, tmp, base_curves)
            (tmp / "provenance.json").write_text(json.dumps(rep["provenance"], indent=2) + "\n")
        log(f"wrote {len(written)} plots to {plots}")
    if report is not None:
        from ecgfm_cli.report import render_report

        atomic_write_text(report, render_report(rep, curves, base_curves, html=report.suffix.lower() != ".md"))
        log(f"wrote {report}")
