"""Talking to the user: summaries and progress bars, all on stderr (errors: :mod:`ecgfm_cli.errors`)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def info(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def progress(items: Iterable[T], desc: str, total: int | None = None, unit: str = "it",
             size: Callable[[T], int] | None = None) -> Iterator[T]:
    """Wrap ``items`` in a tqdm bar on stderr, shown only when stderr is a terminal. ``size(item)``: how many
    ``unit`` an item counts for (rows of a batch), so that the bar counts what the user knows (segments), not
    batches; ``total`` is then in those units."""
    from tqdm import tqdm

    with tqdm(desc=desc, total=total, unit=unit, file=sys.stderr, disable=not sys.stderr.isatty(),
              dynamic_ncols=True, leave=False, unit_scale=size is not None) as bar:
        for item in items:
            yield item
            bar.update(1 if size is None else size(item))


def plural(n: int, noun: str) -> str:
    """``plural(1, "record")`` -> ``"1 record"``, ``plural(3, "record")`` -> ``"3 records"``."""
    return f"{n} {noun}" + ("" if n == 1 else "s")


def count_summary(counts: dict[str, int]) -> str:
    """``{"unreadable": 2, "too_short": 1}`` -> ``"unreadable 2, too_short 1"`` (largest first)."""
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
