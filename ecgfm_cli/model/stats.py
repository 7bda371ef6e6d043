"""The statistics record a loss returns beside its loss (:class:`Stats`): a dataclass of 0-d tensors whose
fields are log columns, each declaring what its sum over micro-batches and ranks is divided by (:func:`per`), so
that a training loop (train/loop.py) only adds vectors and reads them once per update."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import field, fields
from typing import Any, ClassVar

import torch
from torch import Tensor

#: The ``per`` of a field logged as a mean over micro-batches x ranks (a per-batch value, not a sum of samples).
BATCH = "batch"


def per(denominator: str) -> Any:
    """Declare a :class:`Stats` field a log column: its sum over micro-batches and ranks is logged divided by
    the sum of field ``denominator`` (a sample-weighted mean; 0 / 0 gives 0) or, for :data:`BATCH`, by the
    number of micro-batches x ranks."""
    return field(metadata={"per": denominator})


def weight() -> Any:
    """Declare a :class:`Stats` field a denominator (summed, not logged)."""
    return field(metadata={"per": None})


class Stats:
    """Base of a loss function's statistics record: a dataclass of 0-d tensors on the device, one dtype (reading
    them is a host sync, so the loop reads them late). Fields declared with :func:`per` are the log columns;
    those declared with :func:`weight` are denominators. ``WEIGHT`` names the denominator of the loss."""

    WEIGHT: ClassVar[str] = "sample_size"

    def vector(self) -> Tensor:
        """The fields in declaration order, ``(n_fields,)``."""
        return torch.stack([getattr(self, f.name) for f in fields(self)])  # type: ignore[arg-type]

    @classmethod
    def columns(cls, totals: Sequence[float], batches: int) -> dict[str, float]:
        """The log columns from the summed vector ``totals`` over ``batches`` micro-batches x ranks."""
        names = [f.name for f in fields(cls)]  # type: ignore[arg-type]
        tot = dict(zip(names, totals, strict=True))
        out = {}
        for f in fields(cls):  # type: ignore[arg-type]
            den = f.metadata.get("per")
            if den is not None:
                out[f.name] = tot[f.name] / (batches if den == BATCH else max(tot[den], 1.0))
        return out

    @classmethod
    def column_names(cls) -> list[str]:
        """The log columns, in declaration order."""
        return [f.name for f in fields(cls) if f.metadata.get("per") is not None]  # type: ignore[arg-type]

    @classmethod
    def index(cls, name: str) -> int:
        return [f.name for f in fields(cls)].index(name)  # type: ignore[arg-type]
