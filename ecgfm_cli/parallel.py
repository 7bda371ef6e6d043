"""``map`` over worker processes for the data commands (``ingest --workers``, ``segment --workers``)."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")


def ordered_map(fn: Callable[[Any], T], items: Iterable[Any], workers: int, ahead: int | None = None) -> Iterator[T]:
    """``map(fn, items)`` over ``workers`` spawned processes, results in input order.

    At most ``ahead`` (default ``2 * workers``) items are submitted and not yet consumed, so memory stays flat
    however long ``items`` is and however slow the consumer: ``Pool.imap`` would pull every input (a whole
    records artifact) into its queue at once and pile up results. ``fn`` must be picklable (module level).
    """
    from multiprocessing import get_context

    ahead = ahead or 2 * workers
    with get_context("spawn").Pool(workers) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.apply_async(fn, (item,)))
            if len(pending) >= ahead:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
