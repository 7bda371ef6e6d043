"""The W2V time masks and negatives drawn by the pretraining loader (issue #14: the step never waits for them)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import invoke, run_main

from ecgfm_cli.model.masking import TargetConfig
from ecgfm_cli.train.data import LoaderConfig, iter_consumer, make_loader, open_segments
from ecgfm_cli.train.runs import read_log

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ("--preset", "tiny", "--batch-size", "8", "--log-every", "1", "--num-negatives", "20")
TARGETS = TargetConfig(frames=156, mask_prob=0.65, mask_length=10, min_masks=2, num_negatives=20)


def _config(**kw) -> LoaderConfig:
    return LoaderConfig(batch_size=8, seed=3, workers=2, shuffle_buffer=8, targets=TARGETS, **kw)


def test_loader_batches_carry_seeded_targets(sample_segments: Path) -> None:
    """Every batch carries a (B, T) mask with an equal count >= 2 per row and (B, T', N) negatives that never
    point at their own frame; the same (seed, epoch, consumer, batch) gives the same targets when the loader
    restarts mid-epoch, and another consumer gets others."""
    index = open_segments(sample_segments, None, "pretrain")
    cfg = _config()
    batches = list(iter_consumer(index, cfg, consumer=0, max_epochs=1))
    assert len(batches) >= 2
    for b in batches:
        mask, neg = b["mask"], b["negatives_idx"]
        counts = mask.sum(axis=1)
        assert mask.shape == (len(b["x"]), TARGETS.frames) and mask.dtype == bool
        assert (counts == counts[0]).all() and counts[0] >= 2
        assert neg.shape == (len(b["x"]), counts[0], TARGETS.num_negatives) and neg.dtype == np.int64
        assert (neg != np.arange(counts[0])[None, :, None]).all() and neg.min() >= 0 and neg.max() < counts[0]
    again = list(iter_consumer(index, cfg, consumer=0, start_batch=1, max_epochs=1))
    for a, b in zip(batches[1:], again, strict=True):
        np.testing.assert_array_equal(a["mask"], b["mask"])
        np.testing.assert_array_equal(a["negatives_idx"], b["negatives_idx"])
    other = next(iter_consumer(index, cfg, consumer=1, max_epochs=1))
    assert not np.array_equal(other["mask"], batches[0]["mask"])
    assert "mask" not in next(iter_consumer(index, replace(cfg, targets=None), consumer=0, max_epochs=1))


def test_threads_and_processes_deliver_the_same_targets(sample_segments: Path) -> None:
    """The thread loader and the DataLoader-process loader hand over the same tensors (a run resumes with either)."""
    index = open_segments(sample_segments, None, "pretrain")
    cfg = _config()
    threads = make_loader(index, cfg, rank=0, max_epochs=1)
    procs = make_loader(index, cfg, rank=0, max_epochs=1, processes=True)
    try:
        for _ in range(3):
            a, b = next(threads), next(procs)
            assert a["mask"].dtype == b["mask"].dtype
            assert bool((a["mask"] == b["mask"]).all()) and bool((a["negatives_idx"] == b["negatives_idx"]).all())
    finally:
        threads.close()
        del procs  # the DataLoader's worker processes end with their iterator


def test_pretrain_draws_no_targets_in_the_step(sample_segments: Path, tmp_path: Path, monkeypatch) -> None:
    """A new run trains on the loader's targets: the model's own mask and negative draws are never called, and
    the checkpoint records it."""
    from ecgfm_cli.model import pretraining

    def refuse(*_a, **_k):
        raise AssertionError("the step drew its own targets")

    monkeypatch.setattr(pretraining, "compute_span_mask", refuse)
    monkeypatch.setattr(pretraining, "sample_negative_indices", refuse)
    run = tmp_path / "run"
    invoke("pretrain", sample_segments, "-o", run, *TINY, "--max-updates", "2", "--workers", "1")
    assert len(read_log(run)) == 2
    source = json.loads((run / "checkpoint-2" / "config.json").read_text())["source"]
    assert source["loader_targets"] is True


def test_resumed_run_keeps_where_its_targets_came_from(sample_segments: Path, tmp_path: Path) -> None:
    """A run whose checkpoint does not record ``loader_targets`` (ecgfm 0.1.0: the model drew the targets)
    resumes drawing them in the model, so it continues on its own random stream; a new run's checkpoint says
    True and resumes with the loader's."""
    from ecgfm_cli.train.options import TrainOptions
    from ecgfm_cli.train.pretrain import prepare

    run = tmp_path / "run"
    invoke("pretrain", sample_segments, "-o", run, *TINY, "--max-updates", "1", "--workers", "1")
    again = TrainOptions(str(sample_segments), str(run), resume=True, max_updates=2)
    assert prepare(again, 1)[0].loader_targets is True
    config = run / "checkpoint-1" / "config.json"
    saved = json.loads(config.read_text())
    del saved["source"]["loader_targets"]
    config.write_text(json.dumps(saved))
    assert prepare(again, 1)[0].loader_targets is False


@pytest.mark.parametrize("options", [("--mask-prob", "0"), ("--mask-prob", "0.01", "--min-masks", "0"),
                                     ("--mask-prob", "0.01", "--min-masks", "1", "--mask-length", "1")])
def test_options_that_can_mask_fewer_than_two_frames_are_refused(sample_segments: Path, tmp_path: Path, capsys,
                                                                  options: tuple[str, ...]) -> None:
    """A batch with fewer than 2 masked frames has no negatives to draw: such options were a traceback from the
    loader thread (or the model) at the first unlucky batch; now one line before the run starts."""
    code, err = run_main(capsys, "pretrain", sample_segments, "-o", tmp_path / "run", *TINY, "--max-updates", "1",
                         "--workers", "1", *options)
    assert code == 2 and "fewer than the 2 masked frames" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "checkpoint-1").exists()


def test_fewest_masked_is_a_lower_bound_the_draws_reach() -> None:
    """``fewest_masked`` (what pretrain's pre-flight check uses) never exceeds a drawn mask's count, and is reached
    when the spans can all overlap (one span)."""
    from ecgfm_cli.model.masking import draw_span_masks, fewest_masked

    rng = np.random.default_rng(0)
    for frames, prob, length, min_masks in [(156, 0.65, 10, 2), (156, 0.01, 10, 0), (30, 0.1, 1, 1), (12, 0.9, 10, 2),
                                            (156, 0.05, 3, 1)]:
        bound = fewest_masked(frames, prob, length, min_masks)
        drawn = min(int(draw_span_masks(rng, 8, frames, prob, length, min_masks).sum(1).min()) for _ in range(200))
        assert bound <= drawn, (frames, prob, length, min_masks)
    assert fewest_masked(156, 0.0) == 0
    assert fewest_masked(156, 0.01, 10, 1) == 10  # one span of 10 frames
