"""``ecgfm evaluate``: metrics with patient-level bootstrap CIs, thresholds chosen on valid, calibration,
segment -> record aggregation; JSON/Markdown/CSV reports and optional plots."""

from __future__ import annotations

import json
import math
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer


class Aggregate(str, Enum):
    max = "max"
    mean = "mean"
    min = "min"
    label = "label"


class ThresholdMethod(str, Enum):
    f1 = "f1"
    youden = "youden"


def _clean(o: Any) -> Any:
    """NaN/inf -> None so the JSON is strict."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    return o


def evaluate_command(
    predictions: Annotated[Path, typer.Argument(help="Predictions from `ecgfm probe`/`ecgfm finetune` (.parquet or a "
                                                "shard directory).")],
    labels: Annotated[Path, typer.Option("--labels", "-l", help="Labels table (CSV/Parquet): record_id + one column "
                                         "per label [+ split], or ingest's long table with --label-map.")],
    label_map: Annotated[str | None, typer.Option("--label-map", help="code,label CSV or a packaged map "
                                                  "(challenge2021) for a long labels table.")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Report file: .json (everything), .md or "
                                                ".csv. The Markdown table is always printed on stdout.")] = None,
    aggregate: Annotated[Aggregate | None, typer.Option(help="Also evaluate record-level predictions: segment "
                                                        "probabilities grouped by record_id with max, mean, min, or "
                                                        "`label` (ECG-FM's per-label rules).")] = None,
    aggregate_rules: Annotated[Path | None, typer.Option(help="JSON {label: max|mean|min} overriding the per-label "
                                                         "rules of --aggregate label.")] = None,
    bootstrap: Annotated[int, typer.Option(help="Patient-level bootstrap resamples for 95% CIs (0 disables).")] = 1000,
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap.")] = 0,
    calibrate: Annotated[bool, typer.Option("--calibrate", help="Fit one temperature per label on the valid split "
                                            "and report calibration after scaling.")] = False,
    threshold: Annotated[ThresholdMethod, typer.Option(help="How the operating threshold is chosen on the valid "
                                                       "split.")] = ThresholdMethod.f1,
    eval_split: Annotated[str, typer.Option(help="Split to report (when there is a split column).")] = "test",
    plots: Annotated[Path | None, typer.Option(help="Directory for PNG plots (ROC, PR, reliability) per label; "
                                               "replaced as a whole. Needs matplotlib.")] = None,
    baseline: Annotated[Path | None, typer.Option(help="Predictions of a baseline (e.g. `ecgfm probe --baseline` "
                                                  "output) reported beside the model.")] = None,
) -> None:
    """Evaluate predictions against labels on the test split: AUROC, AUPRC, sensitivity, specificity, PPV, F1,
    calibration (and MAE/RMSE/R²/r for continuous targets) with patient-level bootstrap CIs."""
    from ecgfm_cli.console import fail
    from ecgfm_cli.evaluate import (
        REPORT_VERSION,
        EvalConfig,
        EvaluateError,
        evaluate,
        load_predictions,
        report_csv,
        report_markdown,
        upstream_info,
    )
    from ecgfm_cli.io.artifacts import atomic_path, atomic_write_text, check_writable_dir
    from ecgfm_cli.labels import LabelError, load_aggregate_rules, load_labels, resolve_aggregation
    from ecgfm_cli.metrics import ECE_BINS
    from ecgfm_cli.provenance import build_provenance

    if output is not None and output.suffix.lower() not in (".json", ".md", ".csv"):
        fail(f"-o {output}: the report format comes from the extension; use .json, .md or .csv")
    if bootstrap < 0:
        raise typer.BadParameter("must be >= 0", param_hint="--bootstrap")
    if aggregate_rules is not None and aggregate is not Aggregate.label:
        raise typer.BadParameter("needs --aggregate label", param_hint="--aggregate-rules")
    if plots is not None:
        from ecgfm_cli.plots import PlotsUnavailable, check_plots_dir, require_matplotlib

        try:
            require_matplotlib()
        except PlotsUnavailable as e:
            fail(str(e))
    for p, what in ((predictions, "PREDICTIONS"), (labels, "--labels"), (baseline, "--baseline"),
                    (aggregate_rules, "--aggregate-rules")):
        if p is not None and not p.exists():
            fail(f"{what} {p}: no such file or directory")
    if output is not None:
        check_writable_dir(output.parent, f"-o {output}")
    if plots is not None:
        check_plots_dir(plots)

    def log(msg: str) -> None:
        typer.echo(f"ecgfm evaluate: {msg}", err=True)

    try:
        table = load_labels(labels, label_map)
        preds = load_predictions(predictions)
        rules = load_aggregate_rules(aggregate_rules) if aggregate_rules else None
        methods = (resolve_aggregation(preds.labels, aggregate.value, rules, table.label_map)
                   if aggregate is not None else {})
        cfg = EvalConfig(eval_split=eval_split, threshold_method=threshold.value, n_boot=bootstrap, seed=seed,
                         calibrate=calibrate, aggregate=aggregate.value if aggregate else None,
                         aggregate_methods=methods)
        body, curves = evaluate(preds, table, cfg, log=log)
        base_body, base_curves = None, None
        if baseline is not None:
            bpreds = load_predictions(baseline)
            base_body, base_curves = evaluate(bpreds, table, cfg, log=lambda m: log(f"baseline: {m}"))
    except (LabelError, EvaluateError) as e:
        fail(str(e))

    lm_input = label_map if label_map and Path(label_map).is_file() else None
    settings = {"aggregate": cfg.aggregate, "aggregate_methods": methods or None, "bootstrap": bootstrap,
                "seed": seed, "ci_level": cfg.ci_level, "threshold_method": cfg.threshold_method,
                "calibrate": calibrate, "eval_split": eval_split, "ece_bins": ECE_BINS, "label_map": label_map}
    report: dict[str, Any] = {
        "ecgfm_report_version": REPORT_VERSION,
        "kind": "evaluate",
        "predictions": str(predictions),
        "labels": str(labels),
        **body,
        "settings": settings,
        "upstream": upstream_info(preds.meta),
    }
    if base_body is not None:
        report["baseline"] = {"predictions": str(baseline), **base_body, "upstream": upstream_info(bpreds.meta)}
    report["provenance"] = build_provenance(
        {"predictions": predictions, "labels": labels, "label_map": lm_input, "baseline": baseline,
         "aggregate_rules": aggregate_rules}, seed=seed, extra=settings)
    report = _clean(report)

    md = report_markdown(report)
    typer.echo(md)
    if output is not None:
        suffix = output.suffix.lower()
        if suffix == ".json":
            text = json.dumps(report, indent=2, allow_nan=False) + "\n"
        elif suffix == ".md":
            text = md
        else:
            text = report_csv(report)
        atomic_write_text(output, text)
        log(f"wrote {output}")
    if plots is not None:
        from ecgfm_cli.plots import write_plots

        with atomic_path(plots) as tmp:
            tmp.mkdir()
            written = write_plots(curves, tmp, base_curves)
            (tmp / "provenance.json").write_text(json.dumps(report["provenance"], indent=2) + "\n")
        log(f"wrote {len(written)} plots to {plots}")
