"""Presets and their pretraining recipes: `base`/`large` keep the ECG-FM reference, `small` is the laptop recipe,
and the schedules follow the run's length (updates, epochs, or --max-time)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from conftest import invoke
from typer.testing import CliRunner

from ecgfm_cli.cli import app
from ecgfm_cli.errors import EcgfmError
from ecgfm_cli.model.config import PRESETS, RECIPES, EncoderConfig
from ecgfm_cli.model.pretraining import PretrainConfig, Wav2Vec2Pretrainer
from ecgfm_cli.model.quantizer import GumbelVectorQuantizer
from ecgfm_cli.train.pretrain import (
    RECIPE_OPTIONS,
    Schedule,
    TrainOptions,
    accumulation,
    apply_recipe,
    lr_at,
    make_schedule,
    prepare,
    preset_of,
)
from ecgfm_cli.train.runs import read_log

runner = CliRunner()
TINY = ("--preset", "tiny", "--batch-size", "8", "--log-every", "1", "--num-negatives", "20", "--workers", "1")

#: fairseq-signals' ECG-FM pretraining values (reference notes §2), written out: the defaults must stay these.
REFERENCE_OBJECTIVE = {"mask_prob": 0.65, "mask_length": 10, "min_masks": 2, "latent_vars": 320, "latent_groups": 2,
                       "final_dim": 256, "latent_temp_max": 2.0, "latent_temp_min": 0.5, "latent_temp_decay": 0.999995,
                       "latent_temp_schedule": "decay", "num_negatives": 100, "logit_temp": 0.1,
                       "dropout_features": 0.1, "feature_grad_mult": 0.1, "diversity_weight": 0.1,
                       "features_pen_weight": 10.0, "cmsc_weight": 1.0, "cmsc_temp": 0.1}
REFERENCE_TRAIN = {"lr": 5e-5, "lr_schedule": "fixed", "warmup_updates": 0, "warmup_fraction": 0.0,
                   "weight_decay": 0.01, "adam_betas": (0.9, 0.98), "adam_eps": 1e-6, "clip_norm": 0.0, "dropout": None}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def segments(sample_segments: Path) -> Path:
    return sample_segments


def test_base_and_large_keep_the_reference_defaults() -> None:
    """The released architecture and every objective/optimiser default of the reference, unchanged by the recipes."""
    assert PRESETS["base"] == EncoderConfig()
    assert (PRESETS["large"].embed_dim, PRESETS["large"].layers, PRESETS["large"].heads,
            PRESETS["large"].ffn_dim) == (1024, 24, 16, 4096)
    with torch.device("meta"):
        model = Wav2Vec2Pretrainer(PRESETS["base"])
    assert sum(p.numel() for p in model.encoder.parameters()) + model.mask_emb.numel() == 90_374_016
    assert sum(p.numel() for p in model.parameters()) == 90_883_072
    for name in ("base", "large"):
        opts, pcfg = apply_recipe(TrainOptions("s", "o", preset=name), PretrainConfig(), name)
        assert {k: v for k, v in asdict(pcfg).items() if k in REFERENCE_OBJECTIVE} == REFERENCE_OBJECTIVE
        assert {k: getattr(opts, k) for k in REFERENCE_TRAIN} == REFERENCE_TRAIN
        assert set(RECIPES[name]) == {"update_segments"} and RECIPES[name]["update_segments"] == 1024


def test_reference_update_is_1024_segments_whatever_the_world_size(segments: Path, tmp_path: Path) -> None:
    """base: the accumulation is derived from the world size (reference 4 GPUs x 2 x 128); given values win."""
    assert [accumulation(1024, 128, w) for w in (1, 2, 4, 8, 16)] == [8, 4, 2, 1, 1]
    assert accumulation(1024, 128, 3) == 3 and accumulation(1024, 64, 4) == 4  # 3: 1152, the nearest to 1024

    def freq(name: str, world: int, **kw) -> int:
        given = ("preset", "batch_size", *(k for k in ("update_freq",) if k in kw))
        opts = TrainOptions(str(segments), str(tmp_path / "run"), preset=name, batch_size=8, workers=1,
                            given=given, **kw)
        return prepare(opts, world)[0].update_freq

    assert (freq("base", 1), freq("base", 4), freq("large", 2)) == (128, 32, 64)
    assert freq("base", 1, update_freq=2) == 2
    assert freq("tiny", 1) == freq("small", 2) == 1  # tiny and small: one micro-batch per update


def test_small_recipe_and_given_options_win() -> None:
    opts, pcfg = apply_recipe(TrainOptions("s", "o", preset="small"), PretrainConfig(), "small")
    assert (opts.lr, opts.lr_schedule, opts.warmup_fraction, opts.batch_size) == (1e-3, "cosine", 0.05, 32)
    assert (pcfg.latent_vars, pcfg.final_dim, pcfg.num_negatives, pcfg.latent_temp_schedule) == (64, 64, 20, "run")
    assert opts.pretrain == pcfg
    given = TrainOptions("s", "o", preset="small", lr=3e-4, given=("lr", "pretrain.final_dim"))
    opts, pcfg = apply_recipe(given, PretrainConfig(final_dim=32), "small")
    assert opts.lr == 3e-4 and pcfg.final_dim == 32 and pcfg.latent_vars == 64
    # every recipe key is an option the command leaves unset unless given (else the preset could not apply)
    for name, recipe in RECIPES.items():
        keys = {k for k in recipe if k not in ("pretrain", "update_segments")}
        keys |= {f"pretrain.{k}" for k in recipe.get("pretrain", {})}
        assert keys <= set(RECIPE_OPTIONS), name
    assert preset_of(PRESETS["small"].with_dropouts(0.0)) == "small" and preset_of(EncoderConfig(layers=3)) is None


def test_schedule_horizon_follows_the_limits() -> None:
    opts = TrainOptions("s", "o", max_updates=500, max_epochs=2, update_freq=2, warmup_fraction=0.1)
    assert make_schedule(opts, batches_per_epoch=300) == Schedule("updates", 300.0, warmup_updates=30)
    assert make_schedule(TrainOptions("s", "o", max_updates=100), 300) == Schedule("updates", 100.0)
    timed = make_schedule(TrainOptions("s", "o", max_time=100.0, warmup_fraction=0.05), 300)
    assert timed == Schedule("time", 100.0, warmup_fraction=0.05)

    # by time: warm-up over the first 5 s, cosine over the other 95 s, whatever the update count
    opts = TrainOptions("s", "o", lr=1.0, lr_schedule="cosine", max_time=100.0, warmup_fraction=0.05)
    assert lr_at(0, opts, timed, clock=0.0) == pytest.approx(0.01)  # floor: the first update still moves
    assert lr_at(7, opts, timed, clock=2.5) == pytest.approx(0.5)
    assert lr_at(9, opts, timed, clock=5.0) == pytest.approx(1.0)
    assert lr_at(50, opts, timed, clock=52.5) == pytest.approx(0.5)
    assert lr_at(99, opts, timed, clock=100.0) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(99, opts, timed, clock=150.0) == pytest.approx(0.0, abs=1e-12)
    fixed = TrainOptions("s", "o", lr=1.0, max_time=100.0)
    assert lr_at(5, fixed, make_schedule(fixed, 300), clock=60.0) == 1.0


def test_gumbel_temperature_annealed_across_the_run() -> None:
    q = GumbelVectorQuantizer(8, num_vars=4, groups=2, vq_dim=4, temp=(2.0, 0.5, 0.999995), schedule="run")
    temps = []
    for p in (0.0, 0.5, 1.0, 2.0):
        q.set_num_updates(10, p)
        temps.append(q.temperature)
    assert temps == pytest.approx([2.0, 1.0, 0.5, 0.5])  # geometric: sqrt(2 * 0.5) halfway
    q.set_num_updates(11)  # the count alone keeps the progress
    assert q.temperature == pytest.approx(0.5)
    ref = GumbelVectorQuantizer(8, num_vars=4, groups=2, vq_dim=4)
    ref.set_num_updates(1000, 0.9)  # the reference schedule ignores the progress
    assert math.isclose(ref.temperature, 2.0 * 0.999995**1000)
    with pytest.raises(ValueError, match="temperature schedule"):
        GumbelVectorQuantizer(8, schedule="cosine")


def test_time_schedule_end_to_end(segments: Path, tmp_path: Path) -> None:
    """--max-time alone: lr and temperature follow the clock; run.json and the log state the schedule."""
    run = tmp_path / "run"
    out = invoke("pretrain", segments, "-o", run, *TINY, "--max-time", "3", "--lr", "1e-3", "--lr-schedule",
                 "cosine", "--warmup-fraction", "0.2", "--latent-temp", "2,0.5,run")
    assert "schedule over 3 s of training: lr 0.001 warm-up over 20%, then cosine to 0; Gumbel temperature 2 " \
           "-> 0.5 across the run" in out
    info = json.loads((run / "run.json").read_text())
    assert info["schedule"]["by"] == "time" and info["schedule"]["horizon"] == 3.0
    assert info["precision"].startswith("float32") and info["options"]["pretrain"]["latent_temp_schedule"] == "run"
    log = read_log(run)
    assert len(log) >= 3 and json.loads((run / "summary.json").read_text())["stopped_by"] == "max-time"
    progress, temps, lrs = [e["progress"] for e in log], [e["temperature"] for e in log], [e["lr"] for e in log]
    assert progress == sorted(progress) and progress[-1] > 0.5
    assert temps == sorted(temps, reverse=True) and temps[0] > temps[-1]
    assert max(lrs) > lrs[-1] and lrs[0] < max(lrs)  # warmed up, then decayed
    for e in log:
        assert e["temperature"] == pytest.approx(2.0 * 0.25 ** e["progress"], rel=1e-3)  # the progress used (rounded)


def test_max_time_and_its_schedule_continue_across_a_resume(segments: Path, tmp_path: Path) -> None:
    """The training clock is saved with the checkpoint: a resumed --max-time run stops at the run's total time
    (not another full --max-time), two updates after the limit is seen (the vote is read one update late)."""
    run = tmp_path / "run"
    invoke("pretrain", segments, "-o", run, *TINY, "--max-updates", "6", "--save-every", "6")
    clock = torch.load(run / "checkpoint-6" / "trainer_state.pt", weights_only=True)["clock"]
    assert clock > 0
    invoke("pretrain", segments, "-o", run, *TINY, "--max-updates", "30", "--max-time", str(clock), "--resume")
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["stopped_by"], summary["updates"]) == ("max-time", 8)


def test_small_preset_from_the_cli(segments: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    out = invoke("pretrain", segments, "-o", run, "--preset", "small", "--batch-size", "8", "--max-updates", "2",
                 "--workers", "1", "--lr", "3e-4", "--threads", "2")
    info = json.loads((run / "run.json").read_text())
    # the reference drops records with NaN/constant leads from training; ours trains on them and says so
    assert info["incomplete_segments"] > 0 and "have zero-filled leads" in out and "--nan drop" in out
    assert info["threads"] == 2 and "2 threads per process" in out  # the fixture set 1
    assert info["recipe"] == "small" and info["encoder"]["embed_dim"] == 128 and info["encoder"]["dropout"] == 0.0
    assert info["options"]["lr"] == 3e-4 and info["options"]["lr_schedule"] == "cosine"
    assert info["options"]["pretrain"]["latent_vars"] == 64 and info["schedule"]["by"] == "updates"
    with pytest.raises(EcgfmError, match="--latent-temp '2,0.5,soon'"):
        runner.invoke(app, [str(a) for a in ("pretrain", segments, "-o", tmp_path / "r2", *TINY,
                                              "--latent-temp", "2,0.5,soon")], catch_exceptions=False)
    with pytest.raises(EcgfmError, match="give one"):
        runner.invoke(app, [str(a) for a in ("pretrain", segments, "-o", tmp_path / "r3", *TINY, "--warmup-updates",
                                              "3", "--warmup-fraction", "0.1")], catch_exceptions=False)
