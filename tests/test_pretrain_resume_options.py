"""`ecgfm pretrain --resume`: which options follow the run and which the command line (click's parameter source)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ecgfm_cli.cli import app
from ecgfm_cli.train.runs import read_log

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ("--preset", "tiny", "--batch-size", "8", "--num-negatives", "20", "--workers", "1")
runner = CliRunner()


def _pretrain(*args: object) -> str:
    res = runner.invoke(app, ["pretrain", *map(str, args)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res.output


@pytest.fixture(scope="module")
def run(sample_segments: Path, tmp_path_factory) -> Path:
    """A 2-update run with its own cadence (log and checkpoint every update, keep 1) and seed: read, not written."""
    out = tmp_path_factory.mktemp("cadence") / "run"
    _pretrain(sample_segments, "-o", out, *TINY, "--max-updates", "2", "--log-every", "1", "--save-every", "1",
              "--keep-last", "1", "--seed", "7")
    return out


@pytest.fixture
def launched(monkeypatch) -> list:
    """The (options, prepared) the command hands to the launcher, instead of training."""
    calls: list = []
    monkeypatch.setattr("ecgfm_cli.train.distributed.launch", lambda fn, args, **kw: calls.append(args))
    return calls


def test_resume_keeps_the_runs_cadence(run: Path, sample_segments: Path, tmp_path: Path) -> None:
    """Not given again, --log-every, --save-every and --keep-last stay the run's (they used to fall back to the
    defaults, 10 / 5000 / 3: one log line and two checkpoints left here)."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    out = _pretrain(sample_segments, "-o", copy, "--resume", "--max-updates", "4", "--workers", "1")
    assert "--resume keeps the run's --log-every 1, --save-every 1, --keep-last 1" in out
    assert [e["update"] for e in read_log(copy)] == [1, 2, 3, 4]
    assert sorted(p.name for p in copy.glob("checkpoint-*")) == ["checkpoint-4"]


def test_given_cadence_wins_and_is_said(run: Path, sample_segments: Path, launched: list) -> None:
    out = _pretrain(sample_segments, "-o", run, "--resume", "--max-updates", "4", "--keep-last", "2",
                    "--log-every", "1")
    opts, _ = launched[0]
    assert (opts.keep_last, opts.log_every, opts.save_every) == (2, 1, 1)
    # --log-every 1 is the run's own: nothing to say about it
    assert "--resume keeps the run's --save-every 1; takes the given --keep-last 2 (run: 1)" in out


def test_resume_names_only_the_options_given(run: Path, sample_segments: Path, launched: list) -> None:
    """An option left at its default is not 'given but not used' (the run's --seed 7 vs the default 1 was)."""
    out = _pretrain(sample_segments, "-o", run, "--resume", "--max-updates", "4", "--lr", "1e-3",
                    "--cmsc-weight", "3")
    opts, prep = launched[0]
    assert (opts.seed, opts.lr, prep.pretrain.cmsc_weight) == (7, 5e-5, 1.0)  # the run's
    assert "given but not used: cmsc_weight=3.0 (run: 1.0), lr=0.001 (run: 5e-05)" in out
    assert "seed=" not in out


def test_given_names_option_fields(sample_segments: Path, tmp_path: Path, launched: list) -> None:
    """`given` names the fields each option fills; a preset fills only the options not given."""
    _pretrain(sample_segments, "-o", tmp_path / "new", "--preset", "small", "--lr", "0.01", "--latent-temp",
              "2,0.5,run", "--feature-penalty-weight", "5", "--no-rlm", "--procs", "1", "--workers", "1")
    opts, prep = launched[0]
    assert {"preset", "lr", "workers", "device", "pretrain.features_pen_weight", "pretrain.rlm",
            "pretrain.latent_temp_max", "pretrain.latent_temp_min", "pretrain.latent_temp_schedule"} <= set(
        opts.given)
    assert not {"seed", "log_every", "batch_size", "pretrain.latent_temp_decay", "pretrain.cmsc"} & set(opts.given)
    assert (opts.lr, opts.batch_size, opts.lr_schedule) == (0.01, 32, "cosine")  # given; small's; small's
    assert (prep.pretrain.features_pen_weight, prep.pretrain.rlm) == (5.0, False)
