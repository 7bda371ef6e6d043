"""Options shared by several commands, each declared once here as an ``Annotated`` alias.

A command takes one by naming it as a parameter's type, e.g. ``allow_partial: AllowPartial = False``: the flag, its
help text and its effect are then the same in every command (the style of huggingface_hub's CLI).
"""

from __future__ import annotations

from typing import Annotated

import typer


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
