"""``ecgfm finetune``: ECG-FM's downstream recipe (encoder + linear head, conv stack frozen) on labelled segments."""

from __future__ import annotations

from typing import Annotated

import typer

from ecgfm_cli.commands.options import AllowPartial

_DATA = "Data and model"
_OPT = "Optimisation (defaults: see docs/commands/finetune.md for the reference values)"
_DIST = "Devices and processes"


def _names(text: str | None, option: str) -> tuple[str, ...] | None:
    """``--targets`` / ``--leads`` as names; None when not given (all)."""
    if text is None:
        return None
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        from ecgfm_cli.errors import EcgfmError

        raise EcgfmError(f"{option} {text!r}: give at least one name (leave the option out for all)")
    return names


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
                                             rich_help_panel=_DATA)] = None,
    random_init: Annotated[bool, typer.Option("--random-init", help="Baseline: a randomly initialised encoder of "
                                              "--preset instead of --init.", rich_help_panel=_DATA)] = False,
    preset: Annotated[str, typer.Option(help="Model size with --random-init: base, large, small, tiny.",
                                        rich_help_panel=_DATA)] = "base",
    label_map: Annotated[str | None, typer.Option("--label-map", help="code,label CSV turning the 'codes' column into "
                                                  "named labels, or a packaged map: challenge2021.",
                                                  rich_help_panel=_DATA)] = None,
    targets: Annotated[str | None, typer.Option(help="Only these labels, comma-separated (default: every label of "
                                                "the table).", rich_help_panel=_DATA)] = None,
    leads: Annotated[str | None, typer.Option(help="Use only these leads, e.g. I,II: the others are zeroed in "
                                              "training and prediction.", rich_help_panel=_DATA)] = None,
    split_fractions: Annotated[str, typer.Option(help="train,valid,test fractions of the patient-grouped split "
                                                 "(when the labels have no split column).",
                                                 rich_help_panel=_DATA)] = "0.8,0.1,0.1",
    continuous: Annotated[list[str] | None, typer.Option(
        "--continuous", help="Fit this label as a continuous target (MSE); needed for a two-valued label not coded "
        "0/1, e.g. 1/2 (repeatable, or comma-separated).", rich_help_panel=_DATA)] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty run directory (atomically, "
                                            "when this run finishes).", rich_help_panel=_DATA)] = False,
    unsafe_pickle: Annotated[bool, typer.Option("--unsafe-pickle", help="Allow arbitrary pickled objects in a .pt "
                                                "--init (runs code: trusted files only).",
                                                rich_help_panel=_DATA)] = False,
    epochs: Annotated[int, typer.Option(help="Maximum epochs (reference: 140).", min=1,
                                        rich_help_panel=_OPT)] = 20,
    patience: Annotated[int, typer.Option(help="Stop after this many epochs without a better validation score "
                                          "(0 = never).", min=0, rich_help_panel=_OPT)] = 5,
    batch_size: Annotated[int, typer.Option(help="Segments per GPU/process per step (reference: 256 on 1 GPU).",
                                            min=1, rich_help_panel=_OPT)] = 128,
    lr: Annotated[float, typer.Option(help="Fixed Adam learning rate (reference run: 1e-6 for 140 epochs on "
                                      "~800k records).", min=0.0, rich_help_panel=_OPT)] = 5e-5,
    pos_weight: Annotated[str, typer.Option(help="BCE pos_weight (1-p)/p from the train split's records "
                                            "(reference), segments, or none.", rich_help_panel=_OPT)] = "records",
    seed: Annotated[int, typer.Option(help="Seed of the split, the head init and the data order.",
                                      rich_help_panel=_OPT)] = 0,
    dtype: Annotated[str, typer.Option(help="auto (bfloat16 autocast on GPU, float32 on CPU), float32, bfloat16.",
                                       rich_help_panel=_OPT)] = "auto",
    shuffle_buffer: Annotated[int, typer.Option(help="Segments shuffled together (bounds memory).", min=1,
                                                rich_help_panel=_OPT)] = 4096,
    predict_train: Annotated[bool, typer.Option("--predict-train/--no-predict-train", help="Also write "
                                                "predictions for the train split.", rich_help_panel=_OPT)] = True,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.", rich_help_panel=_DIST)] = "auto",
    gpus: Annotated[int | None, typer.Option(help="GPUs on this node: one DDP process each (NCCL).", min=1,
                                             rich_help_panel=_DIST)] = None,
    procs: Annotated[int | None, typer.Option(help="CPU processes (DDP over gloo).", min=1,
                                              rich_help_panel=_DIST)] = None,
    allow_partial: AllowPartial = False,
) -> None:
    """Finetune an ECG-FM encoder with a linear head on labelled segments (ECG-FM's recipe): conv stack frozen,
    BCE with train pos_weight (MSE for continuous targets), Adam at a fixed LR, best epoch by valid macro AUPRC,
    early stopping. Writes RUN/checkpoint/ (classifier), RUN/predictions.parquet, RUN/log.jsonl."""
    from ecgfm_cli.errors import EcgfmError
    from ecgfm_cli.splits import parse_fractions

    if pos_weight not in ("records", "segments", "none"):
        raise EcgfmError(f"--pos-weight {pos_weight!r}: expected records, segments or none")
    if dtype not in ("auto", "float32", "bfloat16"):
        raise EcgfmError(f"--dtype {dtype!r}: expected auto, float32 or bfloat16")
    if device not in ("auto", "cpu", "cuda"):
        raise EcgfmError(f"--device {device!r}: expected auto, cpu or cuda")
    if random_init and init is not None:
        raise EcgfmError("--init and --random-init exclude each other")
    if not random_init and init is None:
        raise EcgfmError("give --init CHECKPOINT (a pretrained encoder) or --random-init (baseline)")
    try:
        fractions = parse_fractions(split_fractions)
    except ValueError as e:
        raise EcgfmError(f"--split-fractions: {e}") from e

    from ecgfm_cli.train import distributed
    from ecgfm_cli.train.finetune import FinetuneOptions, finetune_worker, prepare

    dev, nprocs = distributed.resolve_device(device, gpus, procs)
    if dtype == "bfloat16" and dev == "cpu":
        raise EcgfmError("--dtype bfloat16 is for GPUs; use float32 on CPU")

    opts = FinetuneOptions(
        segments=segments, labels=labels, output=output, init=init, random_init=random_init, preset=preset,
        label_map=label_map, targets=_names(targets, "--targets"), leads=_names(leads, "--leads"), epochs=epochs,
        patience=patience,
        batch_size=batch_size, lr=lr, seed=seed, split_fractions=fractions, pos_weight=pos_weight, device=dev,
        continuous=tuple(n.strip() for v in continuous or [] for n in v.split(",") if n.strip()),
        dtype=("bfloat16" if dev == "cuda" else "float32") if dtype == "auto" else dtype,
        shuffle_buffer=shuffle_buffer, predict_train=predict_train, overwrite=overwrite,
        unsafe_pickle=unsafe_pickle,
    )
    prep = prepare(opts)
    distributed.launch(finetune_worker, (opts, prep), nprocs=nprocs)
