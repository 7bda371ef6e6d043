"""The shared training mechanics (train/loop.py): statistics records reduced as they declare, one step's
accumulation and normalisation by the global count, epoch totals, cadence and the non-finite stop."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn

from ecgfm_cli.errors import EcgfmError
from ecgfm_cli.model.pretraining import PretrainStats
from ecgfm_cli.model.stats import BATCH, Stats, per, weight
from ecgfm_cli.train.distributed import DistContext
from ecgfm_cli.train.loop import Cadence, Totals, Window, check_finite, train_step


@dataclass
class _SumStats(Stats):
    """A squared-error sum over a batch's entries and their count (the loss's denominator), plus a per-batch
    value."""

    WEIGHT = "count"
    loss: Tensor = per("count")
    spread: Tensor = per(BATCH)
    count: Tensor = weight()


def _loss_fn(net: nn.Module, batch: tuple[Tensor, Tensor], i: int) -> tuple[Tensor, _SumStats]:
    x, y = batch
    s = ((net(x) - y) ** 2).sum()
    return s, _SumStats(s.detach(), x.std().detach(), torch.tensor(float(y.numel())))


def test_pretrain_stats_reduce_as_declared() -> None:
    names = PretrainStats.column_names()
    assert names == ["loss", "contrastive", "diversity", "features_pen", "cmsc", "accuracy", "prob_perplexity",
                     "code_perplexity"]  # the log.jsonl columns, in their order
    totals = dict.fromkeys(names, 0.0) | {"loss": 30.0, "contrastive": 12.0, "diversity": 1.5, "accuracy": 6.0,
                                          "sample_size": 60.0, "count": 60.0}
    cols = PretrainStats.columns([totals[k] for k in [*names, "sample_size", "count"]], batches=3)
    assert cols["loss"] == 0.5 and cols["contrastive"] == 0.2  # per masked frame, over all micro-batches
    assert cols["diversity"] == 0.5 and cols["accuracy"] == 0.1  # per batch; per InfoNCE row
    no_w2v = PretrainStats.columns([0.0] * len(names) + [8.0, 0.0], batches=1)
    assert no_w2v["accuracy"] == 0.0  # no InfoNCE rows: 0, not a division by zero


def test_step_normalises_by_the_global_count_over_micro_batches() -> None:
    """Micro-batches of 2 and 6 rows: the step's gradient is d(sum of both losses) / 8, as one batch of 8."""
    torch.manual_seed(0)
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    one, two = nn.Linear(3, 1), nn.Linear(3, 1)
    two.load_state_dict(one.state_dict())
    opt1, opt2 = torch.optim.SGD(one.parameters(), lr=1.0), torch.optim.SGD(two.parameters(), lr=1.0)
    ctx = DistContext()
    u1 = train_step(one, one, opt1, [(x, y)], _loss_fn, ctx, lr=0.1)
    u2 = train_step(two, two, opt2, [(x[:2], y[:2]), (x[2:], y[2:])], _loss_fn, ctx, lr=0.1)
    for a, b in zip(one.parameters(), two.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    m1, m2 = u1.metrics(), u2.metrics()
    assert m1["loss"] == pytest.approx(m2["loss"], rel=1e-6) and m2["lr"] == 0.1 and m2["stop"] is False
    assert m2["spread"] == pytest.approx((float(x[:2].std()) + float(x[2:].std())) / 2, rel=1e-6)  # per batch
    assert m1["grad_norm"] > 0  # clip_norm 0: measured, not clipped
    u3 = train_step(one, one, opt1, [(x, y)], _loss_fn, ctx, lr=0.1, clip_norm=None, stop=True, clock=4.0)
    m3 = u3.metrics()
    assert m3["stop"] is True and m3["clock"] == 4.0 and m3["grad_norm"] != m3["grad_norm"]  # NaN: not measured


def test_totals_window_and_cadence() -> None:
    torch.manual_seed(1)
    net = nn.Linear(3, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.0)  # lr 0: the same weights, so the losses add up exactly
    batches = [(torch.randn(n, 3), torch.randn(n, 1)) for n in (2, 5)]
    totals, window = Totals(), Window(0.0)
    for b in batches:
        u = train_step(net, net, opt, [b], _loss_fn, DistContext(), lr=0.0)
        totals.add(u)
        window.add(u.metrics(), len(b[0]))
    sums = totals.sums()
    with torch.no_grad():
        expect = sum(float(((net(x) - y) ** 2).sum()) for x, y in batches)
        per_update = sum(float(((net(x) - y) ** 2).mean()) for x, y in batches) / 2
    assert sums["count"] == 7 and sums["loss"] == pytest.approx(expect, rel=1e-6) and window.segments == 7
    assert window.means(["loss"])["loss"] == pytest.approx(per_update, rel=1e-6)  # a mean of per-update values
    assert Totals().sums() == {}
    c = Cadence(log_every=5, save_every=10, last=12)
    assert [u for u in range(1, 13) if c.log_due(u)] == [5, 10, 12] and c.log_due(3, stop=True)
    assert [u for u in range(1, 13) if c.save_due(u)] == [10] and not Cadence(save_every=0).save_due(10)


def test_non_finite_loss_is_one_line() -> None:
    check_finite(1.5, "pretrain: update 3")
    with pytest.raises(EcgfmError, match=r"^pretrain: update 3: the loss is nan \(not finite\), so the model is lost "
                                         r"\(no checkpoint was written\); the segments may hold NaN/Inf"):
        check_finite(float("nan"), "pretrain: update 3", lost=" (no checkpoint was written)")
    with pytest.raises(EcgfmError, match=r"^finetune: epoch 2: the training loss is inf \(not finite\), so the "
                                         r"model is lost; the segments"):
        check_finite(float("inf"), "finetune: epoch 2", "training loss")
