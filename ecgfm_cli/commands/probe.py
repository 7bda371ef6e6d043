"""``ecgfm probe``: linear probes (logistic / ridge regression) on frozen embeddings."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from ecgfm_cli.commands.options import AllowPartial
from ecgfm_cli.eval_options import ProbeOptions, csv_numbers

_P = ProbeOptions  # the defaults


def _grid(text: str, name: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(x) for x in text.split(","))
    except ValueError:
        vals = ()
    if not vals or any(v <= 0 for v in vals):
        raise typer.BadParameter(f"{name} must be comma-separated positive numbers, got {text!r}")
    return vals


def _names(values: list[str] | None) -> list[str]:
    """Repeatable, comma-separated names (``--continuous a --continuous b,c``)."""
    return [n.strip() for v in values or [] for n in v.split(",") if n.strip()]


def probe_command(
    embeddings: Annotated[Path, typer.Argument(
        help="Embeddings from `ecgfm embed` (.npz, .parquet or a shard directory).")],
    labels: Annotated[Path, typer.Option(
        "--labels", "-l", help="Labels table (CSV/Parquet): record_id + one 0/1 or continuous column per label "
        "[+ split], or ingest's long table with --label-map.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Predictions file to write (.parquet).")],
    label_map: Annotated[str | None, typer.Option("--label-map", help="code,label CSV turning the 'codes' column into "
                                                  "named labels, or a packaged map: challenge2021.")] = None,
    baseline: Annotated[Path | None, typer.Option(
        "--baseline", help="Embeddings of a random-init encoder (`ecgfm embed --random-init`); probed with the same "
        "splits.")] = None,
    baseline_output: Annotated[Path | None, typer.Option(
        "--baseline-output", help="Where to write the baseline predictions (default: OUTPUT with "
        ".baseline.parquet).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the patient-grouped split (or of the folds).")] = _P.seed,
    split_fractions: Annotated[str, typer.Option(
        help="train,valid,test fractions of the patient-grouped split (used when the labels have no split column)."
    )] = csv_numbers(_P.split_fractions),
    c_grid: Annotated[str, typer.Option(help="Inverse regularisation strengths C tried for logistic regression; "
                                        "the best valid average precision wins.")] = csv_numbers(_P.c_grid),
    alpha_grid: Annotated[str, typer.Option(help="Ridge alphas tried for continuous targets; the lowest valid MSE "
                                            "wins.")] = csv_numbers(_P.alpha_grid),
    max_iter: Annotated[int, typer.Option(help="Iteration limit of each logistic regression fit.")] = _P.max_iter,
    folds: Annotated[int | None, typer.Option("--folds", help="K-fold out-of-fold probing instead of one split: "
                                              "patient-grouped folds stratified on every binary label at once; every "
                                              "record is scored once, by a probe fitted (C chosen on an inner "
                                              "split) on the other folds. For small cohorts.", min=2)] = _P.folds,
    continuous: Annotated[list[str] | None, typer.Option(
        "--continuous", help="Fit this label as a continuous target (ridge); needed for a two-valued label not "
        "coded 0/1, e.g. 1/2 (repeatable, or comma-separated).")] = None,
    allow_partial: AllowPartial = False,
) -> None:
    """Fit a linear probe per label on frozen embeddings (patient-grouped train/valid/test split, or
    --folds K out-of-fold) and write predictions for every record."""
    from ecgfm_cli.errors import EcgfmError
    from ecgfm_cli.io.artifacts import check_writable_dir
    from ecgfm_cli.labels import load_labels, settle_label_kinds
    from ecgfm_cli.probe import baseline_path, probe_files
    from ecgfm_cli.provenance import build_provenance
    from ecgfm_cli.splits import parse_fractions

    if output.suffix.lower() != ".parquet":
        raise EcgfmError(f"-o {output}: predictions are written as one Parquet file; use a name ending in .parquet")
    if baseline is not None and (baseline_output or baseline_path(output)).resolve() == output.resolve():
        raise EcgfmError("--baseline-output must differ from -o")
    if baseline_output is not None and baseline_output.suffix.lower() != ".parquet":
        raise EcgfmError(f"--baseline-output {baseline_output}: predictions are written as one Parquet file; use a "
                         "name ending in .parquet")
    for path, what in ((output, "-o"), (baseline_output, "--baseline-output")):
        if path is not None:
            check_writable_dir(path.parent, f"{what} {path}")
    try:
        fractions = parse_fractions(split_fractions)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--split-fractions") from e
    cs, alphas = _grid(c_grid, "--c-grid"), _grid(alpha_grid, "--alpha-grid")
    for p, what in ((embeddings, "EMBEDDINGS"), (labels, "--labels"), (baseline, "--baseline")):
        if p is not None and not p.exists():
            raise EcgfmError(f"{what} {p}: no such file or directory")

    def log(msg: str) -> None:
        typer.echo(f"ecgfm probe: {msg}", err=True)

    def bar(total: int, desc: str):
        from tqdm import tqdm

        return tqdm(total=total, desc=f"probe {desc}", unit="fold" if folds else "label",
                    disable=not sys.stderr.isatty())

    table = load_labels(labels, label_map)
    table.notes += settle_label_kinds(table, table.labels, _names(continuous))
    lm_input = label_map if label_map and Path(label_map).is_file() else None
    prov = build_provenance(
        {"embeddings": embeddings, "labels": labels, "label_map": lm_input, "baseline": baseline},
        seed=seed,
        extra={"split_fractions": fractions, "c_grid": cs, "alpha_grid": alphas, "max_iter": max_iter,
               "label_map": label_map, "folds": folds, "continuous": _names(continuous)},
    )
    probe_files(embeddings, table, output, prov, baseline=baseline, baseline_out=baseline_output,
                fractions=fractions, seed=seed, c_grid=cs, alpha_grid=alphas, max_iter=max_iter, log=log,
                progress_factory=bar, folds=folds)
