"""The training mechanics ``ecgfm pretrain`` and ``ecgfm finetune`` share; each command's loop is a page that
calls these.

* :func:`rank_context`: a rank's life (join the process group, leave it after a normal finish or an error).
* :func:`data_parallel`: the DDP wrap (identity on one process).
* :func:`train_step`: one optimizer step over micro-batches: gradient accumulation (DDP syncs only on the
  last), one all-reduce of the statistics, the gradient rescale, clipping and the step. As in fairseq, a
  micro-batch's loss is a SUM whose natural denominator (its :class:`Stats` ``WEIGHT`` field: masked frames,
  known labels) is only known after the forward; once the counts are summed over micro-batches and ranks the
  gradients are multiplied by ``world_size / global_count``, so that DDP's averaging yields
  ``d(sum of losses) / global_count``, whatever the split of the batch over ranks.
* :class:`~ecgfm_cli.model.stats.Stats` (model/stats.py): the statistics record a loss function returns beside
  its loss; its fields are log columns, each declaring what its sum is divided by, so the loop only adds vectors.
* :class:`Window`: the updates between two log lines; :class:`Totals`: updates summed on the device (an
  epoch); :func:`progress_bar`, :func:`check_finite`, :class:`Cadence` (when to log and to save).
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from ecgfm_cli.errors import EcgfmError
from ecgfm_cli.model.stats import Stats
from ecgfm_cli.train.distributed import DistContext, cleanup, setup
from ecgfm_cli.train.runs import autocast


@contextlib.contextmanager
def rank_context(device: str, threads: int | None = None) -> Iterator[DistContext]:
    """A rank's process group for the body of a ``with``: joined (``device`` ``cpu`` or ``cuda``; ``threads``
    torch CPU threads, None: as :func:`~ecgfm_cli.train.distributed.setup` shares the cores), and left after
    the body (waiting for the other ranks only after a normal finish)."""
    ctx = setup(device)
    if threads:
        torch.set_num_threads(threads)
    completed = False
    try:
        yield ctx
        completed = True
    finally:
        cleanup(completed)


def data_parallel(model: nn.Module, ctx: DistContext, find_unused_parameters: bool = False) -> nn.Module:
    """``model`` wrapped in DDP on more than one rank, else ``model`` itself."""
    if not ctx.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
               find_unused_parameters=find_unused_parameters)


@dataclass
class Update:
    """One update's globally reduced statistics, still on the device.

    :func:`train_step` only queues the update's work; :meth:`metrics` is the one point where the host waits
    for it. A loop that reads update u's metrics after queueing update u + 1 keeps the GPU busy while the host
    prepares the next one.
    """

    vector: Tensor  # (n_fields + 3,): the summed stats, the summed stop votes, the mean clock, the grad norm
    kind: type[Stats]
    batches: int  # micro-batches x ranks, the denominator of the per-batch stats
    lr: float

    def metrics(self) -> dict[str, Any]:
        """Plain floats (waits for the update): the log columns of ``kind``, then ``grad_norm`` (NaN when the
        step did not compute it), ``stop`` (some rank voted to stop), ``clock`` (the ranks' mean) and ``lr``."""
        *totals, stop, clock, grad_norm = self.vector.tolist()
        return {**self.kind.columns(totals, self.batches), "grad_norm": grad_norm, "stop": stop > 0,
                "clock": clock, "lr": self.lr}


#: ``loss_fn(net, batch, i)`` -> (the micro-batch's SUM-style loss, its statistics), called under autocast.
LossFn = Callable[[nn.Module, Any, int], tuple[Tensor, Stats]]


def train_step(model: nn.Module, net: nn.Module, optimizer: torch.optim.Optimizer, micro: Sequence[Any],
               loss_fn: LossFn, ctx: DistContext, lr: float, clip_norm: float | None = 0.0, dtype: str = "float32",
               stop: bool = False, clock: float = 0.0) -> Update:
    """Queue one optimizer step over the micro-batches ``micro`` without waiting for it (see the module
    docstring). ``net`` is ``model`` or its DDP wrapper. ``clip_norm``: clip the gradient norm to it (0: no
    clipping, the norm is still measured; None: not even measured). ``stop``: this rank's vote to end training,
    summed over ranks; ``clock``: this rank's seconds of training, averaged over ranks (identical on every rank:
    what a time schedule follows, so all ranks step with the same learning rate)."""
    params = [p for p in model.parameters() if p.requires_grad]
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    total: Tensor | None = None
    kind: type[Stats] = Stats
    for i, batch in enumerate(micro):
        sync = contextlib.nullcontext() if i == len(micro) - 1 or net is model else net.no_sync()
        with sync:
            with autocast(ctx.device, dtype):
                loss, stats = loss_fn(net, batch, i)
            loss.float().backward()
        kind = type(stats)
        total = stats.vector() if total is None else total + stats.vector()
    assert total is not None, "train_step needs at least one micro-batch"
    vec = torch.cat([total, torch.full((1,), float(stop), dtype=total.dtype, device=ctx.device),
                     torch.full((1,), clock / ctx.world_size, dtype=total.dtype, device=ctx.device)])
    if ctx.distributed:
        dist.all_reduce(vec)
    grads = [p.grad for p in params if p.grad is not None]
    if grads:  # DDP averaged the gradients over ranks; make that sum-over-ranks / global count, on the device
        torch._foreach_mul_(grads, (ctx.world_size / vec[kind.index(kind.WEIGHT)].clamp(min=1.0)).to(grads[0]))
    if clip_norm is None:
        grad_norm = torch.full((), math.nan, device=vec.device)
    else:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip_norm if clip_norm > 0 else float("inf"))
    optimizer.step()
    return Update(torch.cat([vec, grad_norm.detach().reshape(1).to(vec)]), kind, len(micro) * ctx.world_size, lr)


class Totals:
    """Updates added up on the device (no host sync until :meth:`sums`): the statistics of all of them
    together, a ratio of sums (an epoch's loss), where :class:`Window` averages per-update values."""

    def __init__(self) -> None:
        self.vector: Tensor | None = None
        self.kind: type[Stats] = Stats
        self.batches = 0

    def add(self, update: Update) -> None:
        v = update.vector[:len(fields(update.kind))]  # type: ignore[arg-type]
        self.vector = v if self.vector is None else self.vector + v
        self.kind, self.batches = update.kind, self.batches + update.batches

    def sums(self) -> dict[str, float]:
        """Each field summed over the updates (waits for them; empty before the first)."""
        if self.vector is None:
            return {}
        return dict(zip((f.name for f in fields(self.kind)), self.vector.tolist(), strict=True))  # type: ignore


class Window:
    """The updates read since the last log line: their metrics (averaged per column for the line), the
    segments they trained on, and when the window began."""

    def __init__(self, began: float) -> None:
        self.entries: list[dict[str, Any]] = []
        self.segments = 0
        self.began = began

    def add(self, metrics: dict[str, Any], segments: int) -> None:
        self.entries.append(metrics)
        self.segments += segments

    def means(self, keys: Sequence[str]) -> dict[str, float]:
        """The mean over the window's updates of each column in ``keys``."""
        return {k: float(np.mean([e[k] for e in self.entries])) for k in keys}

    def __len__(self) -> int:
        return len(self.entries)


@dataclass(frozen=True)
class Cadence:
    """When a loop writes: a log line every ``log_every`` updates (and at ``last``, and when the ranks voted to
    stop), a checkpoint every ``save_every`` updates (0: only at the end)."""

    log_every: int = 1
    save_every: int = 0
    last: int | None = None

    def log_due(self, update: int, stop: bool = False) -> bool:
        return update % self.log_every == 0 or update == self.last or stop

    def save_due(self, update: int) -> bool:
        return bool(self.save_every) and update % self.save_every == 0


def progress_bar(ctx: DistContext, **tqdm_args: Any):
    """A tqdm bar on the main rank's stderr when it is a terminal, else None (``tqdm_args``: total, desc, ...)."""
    if not (ctx.is_main and sys.stderr.isatty()):
        return None
    from tqdm import tqdm

    return tqdm(file=sys.stderr, dynamic_ncols=True, **tqdm_args)


def check_finite(value: float, where: str, what: str = "loss", lost: str = "") -> None:
    """Stop the run with one line when a loss is not finite (every rank sees the same global loss, so all stop
    at the same point). ``where``: ``"pretrain: update 12"``; ``lost``: what is left, e.g. ``" (checkpoint-10 is
    the last good one)"``."""
    if not math.isfinite(value):
        raise EcgfmError(f"{where}: the {what} is {value} (not finite), so the model is lost{lost}; the segments may "
                         "hold NaN/Inf (`ecgfm segment` never writes them) or --lr is too high")
