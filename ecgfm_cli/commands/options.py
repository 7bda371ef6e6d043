"""Options shared by several commands, each declared once here as an ``Annotated`` alias.

A command takes one by naming it as a parameter's type, e.g. ``allow_partial: AllowPartial = False``: the flag, its
help text, its choices and its effect are then the same in every command (the style of huggingface_hub's CLI). A
command that groups its options in help panels puts a shared one in its panel with :func:`in_panel`. Choices are
``Literal`` types: typer checks them and refuses another value with one line naming the option and the choices.
"""

from __future__ import annotations

import copy
from typing import Annotated, Any, Literal, get_args

import typer

from ecgfm_cli.model.config import PRESETS

#: Help panels of the commands that group their options (pretrain, finetune, embed).
DATA_PANEL = "Data and model"
DEVICES_PANEL = "Devices and processes"


def in_panel(alias: Any, panel: str) -> Any:
    """The shared option ``alias`` (an ``Annotated[type, typer.Option(...)]``) shown in help panel ``panel``."""
    kind, info = get_args(alias)
    info = copy.copy(info)
    info.rich_help_panel = panel
    return Annotated[kind, info]


def _allow_partial(ctx: typer.Context, value: bool) -> bool:
    """Make ``open_artifact`` accept incomplete directory artifacts for this command's run (the setting is
    process-wide because the readers sit several calls below the command; it is undone when the command ends)."""
    from ecgfm_cli.io.artifacts import set_allow_partial

    set_allow_partial(value)
    if value:
        ctx.call_on_close(lambda: set_allow_partial(False))
    return value


AllowPartial = Annotated[bool, typer.Option(
    "--allow-partial",
    help="Read a directory artifact whose shards are missing or interrupted (listed on stderr); without it such a "
         "directory is refused, naming the rerun that completes it.",
    callback=_allow_partial,
)]

UnsafePickle = Annotated[bool, typer.Option(
    "--unsafe-pickle", help="Allow pickled objects in a .pt (runs code: trusted files only).")]

#: The encoder sizes of :data:`~ecgfm_cli.model.config.PRESETS` (``Literal`` of its keys: one list of names).
PresetName = Literal[tuple(PRESETS)]  # type: ignore[valid-type]

#: ``--device``: ``auto`` is resolved by :func:`ecgfm_cli.train.distributed.resolve_device` (one rule for every
#: command that runs a model).
Device = Annotated[Literal["auto", "cpu", "cuda"], typer.Option(
    help="auto: cuda with --gpus, or a visible GPU without --procs.",
    rich_help_panel=DEVICES_PANEL)]

Gpus = Annotated[int | None, typer.Option(
    help="Local GPUs, one process each (NCCL).", min=1, metavar="N", rich_help_panel=DEVICES_PANEL)]

Procs = Annotated[int | None, typer.Option(
    help="CPU processes (--gpus on CPU).", min=1, metavar="N", rich_help_panel=DEVICES_PANEL)]

Threads = Annotated[int | None, typer.Option(
    help="torch CPU threads per process (default: cores / processes).",
    min=1, metavar="N", rich_help_panel=DEVICES_PANEL)]

#: ``--dtype`` of the training commands: ``auto`` is bfloat16 autocast on a GPU, float32 on CPU.
TrainDtype = Annotated[Literal["auto", "float32", "bfloat16"], typer.Option(
    help="auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16.", metavar="TYPE")]


def train_dtype(dtype: str, device: str) -> str:
    """``--dtype`` of pretrain/finetune on the resolved ``device`` (``cpu``/``cuda``): ``auto`` made concrete."""
    return ("bfloat16" if device == "cuda" else "float32") if dtype == "auto" else dtype
