"""``ecgfm finetune``: ECG-FM's downstream recipe (encoder + linear head, conv stack frozen) on labelled segments."""

from __future__ import annotations

from dataclasses import fields
from typing import Annotated, Literal

import typer

from ecgfm_cli.commands.options import (
    DATA_PANEL,
    AllowPartial,
    Device,
    Gpus,
    PresetName,
    Procs,
    TrainDtype,
    UnsafePickle,
    in_panel,
    train_dtype,
)
from ecgfm_cli.eval_options import csv_numbers
from ecgfm_cli.train.options import FinetuneOptions

_DATA = DATA_PANEL
_OPT = "Optimisation (defaults: see docs/commands/finetune.md for the reference values)"


def _names(text: str | None, option: str) -> tuple[str, ...] | None:
    """``--targets`` / ``--leads`` as names; None when not given (all)."""
    if text is None:
        return None
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        from ecgfm_cli.errors import EcgfmError

        raise EcgfmError(f"{option} {text!r}: give at least one name (leave the option out for all)")
    return names


_F = FinetuneOptions
_UnsafePickle = in_panel(UnsafePickle, _DATA)
_Dtype = in_panel(TrainDtype, _OPT)


def finetune_command(
    segments: Annotated[str, typer.Argument(
        help="Segments from `ecgfm segment`: DIR of shards or FILE.parquet/.arrow.")],
    labels: Annotated[str, typer.Option("--labels", "-l", help="Labels table: wide CSV/Parquet (record_id + one 0/1 "
                                        "or continuous column per label [+ patient_id, split]) or the long codes "
                                        "table of ingest/segment (labels-*.parquet, a DIR) with --label-map.",
                                        rich_help_panel=_DATA)],
    output: Annotated[str, typer.Option("-o", "--output", help="Run directory: checkpoint/, predictions.parquet, "
                                        "log.jsonl, summary.json.", rich_help_panel=_DATA)],
    init: Annotated[str | None, typer.Option(help="Pretrained checkpoint: ours (a directory) or an official ECG-FM "
                                             ".pt. Its encoder is used; any head is replaced.",
                                             rich_help_panel=_DATA)] = _F.init,
    random_init: Annotated[bool, typer.Option("--random-init", help="Baseline: a randomly initialised encoder of "
                                              "--preset instead of --init.", rich_help_panel=_DATA)] = _F.random_init,
    preset: Annotated[PresetName, typer.Option(help="Model size with --random-init: base, large, small, tiny.",
                                               metavar="NAME", rich_help_panel=_DATA)] = _F.preset,
    label_map: Annotated[str | None, typer.Option("--label-map", help="code,label CSV turning the 'codes' column into "
                                                  "named labels, or a packaged map: challenge2021.",
                                                  rich_help_panel=_DATA)] = _F.label_map,
    targets: Annotated[str | None, typer.Option(help="Only these labels, comma-separated (default: every label of "
                                                "the table).", rich_help_panel=_DATA)] = None,
    leads: Annotated[str | None, typer.Option(help="Use only these leads, e.g. I,II: the others are zeroed in "
                                              "training and prediction.", rich_help_panel=_DATA)] = None,
    split_fractions: Annotated[str, typer.Option(help="train,valid,test fractions of the patient-grouped split "
                                                 "(when the labels have no split column).",
                                                 rich_help_panel=_DATA)] = csv_numbers(_F.split_fractions),
    continuous: Annotated[list[str] | None, typer.Option(
        "--continuous", help="Fit this label as a continuous target (MSE); needed for a two-valued label not coded "
        "0/1, e.g. 1/2 (repeatable, or comma-separated).", rich_help_panel=_DATA)] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty run directory (atomically, "
                                            "when this run finishes).", rich_help_panel=_DATA)] = _F.overwrite,
    unsafe_pickle: _UnsafePickle = _F.unsafe_pickle,
    epochs: Annotated[int, typer.Option(help="Maximum epochs (reference: 140).", min=1,
                                        rich_help_panel=_OPT)] = _F.epochs,
    patience: Annotated[int, typer.Option(help="Stop after this many epochs without a better validation score "
                                          "(0 = never).", min=0, rich_help_panel=_OPT)] = _F.patience,
    batch_size: Annotated[int, typer.Option(help="Segments per GPU/process per step (reference: 256 on 1 GPU).",
                                            min=1, rich_help_panel=_OPT)] = _F.batch_size,
    lr: Annotated[float, typer.Option(help="Fixed Adam learning rate (reference run: 1e-6 for 140 epochs on "
                                      "~800k records).", min=0.0, rich_help_panel=_OPT)] = _F.lr,
    pos_weight: Annotated[Literal["records", "segments", "none"], typer.Option(
        help="BCE pos_weight (1-p)/p from the train split's records (reference), segments, or none.",
        metavar="TEXT", rich_help_panel=_OPT)] = _F.pos_weight,
    seed: Annotated[int, typer.Option(help="Seed of the split, the head init and the data order.",
                                      rich_help_panel=_OPT)] = _F.seed,
    dtype: _Dtype = "auto",
    shuffle_buffer: Annotated[int, typer.Option(help="Segments shuffled together (bounds memory).", min=1,
                                                rich_help_panel=_OPT)] = _F.shuffle_buffer,
    predict_train: Annotated[bool, typer.Option("--predict-train/--no-predict-train", help="Also write "
                                                "predictions for the train split.",
                                                rich_help_panel=_OPT)] = _F.predict_train,
    device: Device = "auto",
    gpus: Gpus = None,
    procs: Procs = None,
    allow_partial: AllowPartial = False,
) -> None:
    """Finetune an ECG-FM encoder with a linear head on labelled segments (ECG-FM's recipe): conv stack frozen,
    BCE with train pos_weight (MSE for continuous targets), Adam at a fixed LR, best epoch by valid macro AUPRC,
    early stopping. Writes RUN/checkpoint/ (classifier), RUN/predictions.parquet, RUN/log.jsonl."""
    # the options by name: each one named as a FinetuneOptions field fills that field
    args = {k: v for k, v in locals().items() if v is not None}
    from ecgfm_cli.errors import EcgfmError
    from ecgfm_cli.splits import parse_fractions

    if random_init and init is not None:
        raise EcgfmError("--init and --random-init exclude each other")
    if not random_init and init is None:
        raise EcgfmError("give --init CHECKPOINT (a pretrained encoder) or --random-init (baseline)")
    try:
        fractions = parse_fractions(split_fractions)
    except ValueError as e:
        raise EcgfmError(f"--split-fractions: {e}") from e

    from ecgfm_cli.train import distributed
    from ecgfm_cli.train.finetune import finetune_worker, prepare

    dev, nprocs = distributed.resolve_device(device, gpus, procs)
    if dtype == "bfloat16" and dev == "cpu":
        raise EcgfmError("--dtype bfloat16 is for GPUs; use float32 on CPU")

    derived = {
        "targets": _names(targets, "--targets"), "leads": _names(leads, "--leads"), "split_fractions": fractions,
        "continuous": tuple(n.strip() for v in continuous or [] for n in v.split(",") if n.strip()),
        "device": dev, "dtype": train_dtype(dtype, dev),
    }
    opts = FinetuneOptions(**{f.name: args[f.name] for f in fields(FinetuneOptions) if f.name in args}
                           | derived)
    prep = prepare(opts)
    distributed.launch(finetune_worker, (opts, prep), nprocs=nprocs)
