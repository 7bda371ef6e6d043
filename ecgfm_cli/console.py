"""Talking to the user: one-line errors, summaries and progress bars, all on stderr."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from typing import NoReturn, TypeVar

T = TypeVar("T")


class UsageError(Exception):
    """A bad input or option: printed as one line, exit status 2, no traceback."""


def fail(message: str) -> NoReturn:
    raise UsageError(message)


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
