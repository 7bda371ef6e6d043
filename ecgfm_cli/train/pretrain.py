"""The ``ecgfm pretrain`` loop: W2V + CMSC + RLM pretraining with DDP, accumulation, checkpoints and exact resume.

One update = ``update_freq`` micro-batches per rank, stepped by :func:`ecgfm_cli.train.loop.train_step`: the
loss of a micro-batch is the model's SUM over its masked frames (``Wav2Vec2Pretrainer.forward``), normalised
by the count summed over micro-batches and ranks, so the result does not depend on how the batch is split over
ranks. The host reads update u's metrics after queueing update u + 1.

Run directory (``-o RUN``)::

    RUN/run.json                  options, data summary, world size (written at start)
    RUN/log.jsonl                 one JSON object per --log-every updates
    RUN/checkpoint-<update>/      model.safetensors + config.json (kind "pretraining") + trainer_state.pt
    RUN/latest                    name of the newest complete checkpoint directory
    RUN/summary.json              written at the end
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ecgfm_cli.console import info, plural
from ecgfm_cli.contract import Contract
from ecgfm_cli.errors import EcgfmError
from ecgfm_cli.io.artifacts import atomic_write_text, check_writable_dir, pid_alive, replace_dir
from ecgfm_cli.model.config import PRESETS, RECIPES, EncoderConfig, PretrainConfig, preset
from ecgfm_cli.model.masking import TargetConfig, fewest_masked
from ecgfm_cli.model.pretraining import PretrainStats, Wav2Vec2Pretrainer
from ecgfm_cli.train.data import DataStats, LoaderConfig, SegmentIndex, batches_per_epoch, make_loader, open_segments
from ecgfm_cli.train.distributed import DistContext
from ecgfm_cli.train.loop import (
    Cadence,
    Update,
    Window,
    check_finite,
    data_parallel,
    progress_bar,
    rank_context,
    train_step,
)
from ecgfm_cli.train.options import DEFAULT_MAX_EPOCHS, RECIPE_OPTIONS, REFERENCE_BATCH_SIZE, TrainOptions
from ecgfm_cli.train.runs import append_jsonl, read_jsonl, seed_everything

STATE_FILE = "trainer_state.pt"
LATEST = "latest"
_CKPT_RE = re.compile(r"checkpoint-(\d+)$")
#: Options of a run that resume with it (saved in each checkpoint's ``source.resume_keeps``). Those that fix the
#: data order and the optimisation are the run's whatever the command line says (given again: named, not used);
#: the cadence (:data:`RESUME_CADENCE`) is the run's unless given again. Stopping (--max-*: the run's when none is
#: given), --batch-size (likewise), devices and the loader layout are the command line's.
RESUME_CADENCE = ("log_every", "save_every", "keep_last")
RESUME_KEEPS = ("seed", "shuffle_buffer", "lr", "lr_schedule", "warmup_updates", "warmup_fraction", "weight_decay",
                "adam_betas", "adam_eps", "clip_norm", "update_freq", "dropout", *RESUME_CADENCE)


@dataclass(frozen=True)
class Schedule:
    """What the learning-rate and Gumbel-temperature schedules follow: the run's length in updates (``by``
    ``"updates"``, from ``--max-updates`` or ``--max-epochs``) or, with only ``--max-time``, in seconds of
    training (``"time"``). ``horizon``: that length. ``warmup_updates``: warm-up by count (``--warmup-updates``,
    or ``--warmup-fraction`` of an update horizon); ``warmup_fraction``: warm-up as a fraction of a time horizon."""

    by: str
    horizon: float
    warmup_updates: int = 0
    warmup_fraction: float = 0.0

    def progress(self, update: int, clock: float) -> float:
        """Fraction of the horizon reached before the ``update``-th update (0-based), ``clock`` seconds into the
        run (the ranks' agreed clock, see :func:`train_update`), in [0, 1]."""
        done = update if self.by == "updates" else clock
        return min(max(done / max(self.horizon, 1e-9), 0.0), 1.0)

    def describe(self, opts: TrainOptions, pcfg: PretrainConfig) -> str:
        """One line for the run log: the horizon and both schedules."""
        unit = f"{int(self.horizon)} updates" if self.by == "updates" else f"{self.horizon:g} s of training"
        warm = (f"{self.warmup_updates}-update warm-up, " if self.warmup_updates else
                f"warm-up over {self.warmup_fraction:.0%}, " if self.warmup_fraction else "")
        lr = (f"lr {opts.lr:g} {warm}then " + ("cosine to 0" if opts.lr_schedule == "cosine" else "constant"))
        tau = (f"Gumbel temperature {pcfg.latent_temp_max:g} -> {pcfg.latent_temp_min:g} across the run"
               if pcfg.latent_temp_schedule == "run" else
               f"Gumbel temperature {pcfg.latent_temp_max:g} x {pcfg.latent_temp_decay:g}^update (floor "
               f"{pcfg.latent_temp_min:g})")
        return f"schedule over {unit}: {lr}; {tau}"


@dataclass
class Prepared:
    """What the pre-flight checks established (picklable: travels to spawned ranks)."""

    encoder_config: EncoderConfig
    pretrain: PretrainConfig
    contract: Contract
    stats: DataStats
    world_size: int
    batches_per_epoch: int
    resume_from: str | None = None
    init_kind: str | None = None
    schedule: Schedule = field(default_factory=lambda: Schedule("updates", 1.0))
    recipe: str | None = None
    incomplete_segments: int = 0


# --------------------------------------------------------------------------------------------- pre-flight


def checkpoints(run: Path) -> list[Path]:
    """``RUN/checkpoint-<n>`` directories, oldest first."""
    found = [(int(m.group(1)), p) for p in run.glob("checkpoint-*") if (m := _CKPT_RE.search(p.name))
             and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run: Path) -> Path | None:
    f = run / LATEST
    if f.is_file():
        p = run / f.read_text().strip()
        if (p / STATE_FILE).is_file():
            return p
    done = [p for p in checkpoints(run) if (p / STATE_FILE).is_file()]
    return done[-1] if done else None


def prepare(opts: TrainOptions, world_size: int) -> tuple[TrainOptions, Prepared]:
    """Every check that can fail, before any process group or model exists: output directory, resume
    state, init checkpoint, segments (kind, contract vs the model's), enough data for one batch per rank.

    Returns the options to train with: ``opts``, except that ``--resume`` keeps the run's objective and its
    :data:`RESUME_KEEPS` options (data order, optimisation; the cadence unless ``opts.given`` names it), so that
    the run continues as it would have."""
    run = Path(opts.output)
    check_writable_dir(run, f"the run directory {run}")
    resume_from = None
    if opts.resume:
        ck = latest_checkpoint(run) if run.is_dir() else None
        if ck is None:
            raise EcgfmError(f"--resume: {run} holds no complete checkpoint (checkpoint-*/{STATE_FILE})")
        resume_from = str(ck)
    elif run.is_dir() and (checkpoints(run) or (run / "log.jsonl").exists()):
        if checkpoints(run):
            raise EcgfmError(f"{run} already holds a pretraining run: pass --resume to continue it, or choose "
                             "another -o")
        raise EcgfmError(f"{run} already holds another run (a finetuning run?), not a pretraining run; choose "
                         "another -o")

    pcfg = opts.pretrain
    enc_cfg: EncoderConfig
    model_contract = Contract()
    init_kind = None
    recipe = None
    if resume_from is None and not (opts.init and "preset" not in opts.given):
        recipe = opts.preset
        opts, pcfg = apply_recipe(opts, pcfg, recipe)
    if resume_from is not None:
        config = json.loads((Path(resume_from) / "config.json").read_text())
        enc_cfg = EncoderConfig.from_dict(config["encoder"])
        model_contract = Contract.from_dict(config.get("contract") or {})
        source = config.get("source") or {}
        limits = (opts.max_updates, opts.max_epochs, opts.max_time)
        if limits == (None, None, None) and source.get("limits"):
            run_limits = source["limits"]
            opts = replace(opts, **run_limits)
            info("pretrain: --resume keeps the run's limits: " + ", ".join(
                f"--{k.replace('_', '-')} {v}" for k, v in run_limits.items() if v is not None))
        if opts.batch_size is None and source.get("batch_size"):
            opts = replace(opts, batch_size=int(source["batch_size"]))
        at = int(source.get("update", 0))
        if opts.max_updates is not None and at >= opts.max_updates:
            raise EcgfmError(f"--resume: {resume_from} is at update {at}, already at --max-updates {opts.max_updates}; "
                             "raise --max-updates to continue")
        ignored = []
        if source.get("pretrain"):
            saved = PretrainConfig(**{**source["pretrain"], "cmsc_gather": pcfg.cmsc_gather})
            ignored += [f"{k}={v} (run: {getattr(saved, k)})" for k, v in asdict(pcfg).items()
                        if getattr(saved, k) != v and _given(opts, f"pretrain.{k}")]
            pcfg = saved
        kept = {k: tuple(v) if isinstance(v, list) else v for k, v in (source.get("resume_keeps") or {}).items()}
        cadence = {k: kept.pop(k) for k in RESUME_CADENCE if k in kept}  # older runs saved none: the command's
        ignored += [f"{k}={getattr(opts, k)} (run: {v})" for k, v in kept.items()
                    if getattr(opts, k) != v and _given(opts, k)]
        follows = {k: v for k, v in cadence.items() if getattr(opts, k) != v and not _given(opts, k)}
        wins = [f"--{k.replace('_', '-')} {getattr(opts, k)} (run: {v})" for k, v in cadence.items()
                if getattr(opts, k) != v and _given(opts, k)]
        kept.update(follows)
        said = []
        if follows:
            said.append("keeps the run's " + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in follows.items()))
        if wins:
            said.append("takes the given " + ", ".join(wins))
        if said:
            info("pretrain: --resume " + "; ".join(said))
        opts = replace(opts, **kept, loader_targets=bool(source.get("loader_targets", False)))
        if ignored:
            info("pretrain: --resume continues with the run's own settings; given but not used: " + ", ".join(ignored))
    elif opts.init:
        from ecgfm_cli.model.checkpoint import CheckpointError, load_checkpoint

        try:
            loaded = load_checkpoint(opts.init, allow_pickle=opts.unsafe_pickle)
        except CheckpointError as e:
            raise EcgfmError(f"--init {opts.init}: {e}") from e
        enc_cfg, model_contract, init_kind = loaded.encoder_config, loaded.contract, loaded.kind
        if loaded.kind != "pretraining":  # an encoder/classifier carries finetuning (or no) dropouts
            ref = EncoderConfig()
            enc_cfg = replace(enc_cfg, dropout=ref.dropout, attention_dropout=ref.attention_dropout,
                              activation_dropout=ref.activation_dropout, dropout_input=ref.dropout_input)
        if "preset" not in opts.given:  # the defaults of the preset the checkpoint's architecture is, if any
            recipe = preset_of(enc_cfg)
            opts, pcfg = apply_recipe(opts, pcfg, recipe)
        heads = loaded.heads
        if loaded.kind == "pretraining" and heads:
            pcfg = replace(pcfg, latent_vars=int(heads["latent_vars"]), latent_groups=int(heads["latent_groups"]),
                           final_dim=int(heads["final_dim"]))
    else:
        try:
            enc_cfg = preset(opts.preset)
        except ValueError as e:
            raise EcgfmError(str(e)) from e
    enc_cfg = with_dropout(enc_cfg, opts.dropout)
    if (opts.max_updates, opts.max_epochs, opts.max_time) == (None, None, None):
        opts = replace(opts, max_epochs=DEFAULT_MAX_EPOCHS)
    if opts.batch_size is None:
        opts = replace(opts, batch_size=REFERENCE_BATCH_SIZE)
    update_segments = RECIPES.get(recipe or "", {}).get("update_segments")
    if update_segments and resume_from is None and "update_freq" not in opts.given:
        # the reference's update whatever the world size: accumulate micro-batches to reach it
        freq = accumulation(update_segments, opts.batch_size, world_size)
        opts = replace(opts, update_freq=freq)
        got = freq * opts.batch_size * world_size
        info(f"pretrain: {recipe}: {freq} micro-batch(es) of {opts.batch_size} per update on "
             f"{world_size} process(es) = {got} segments per update"
             + ("" if got == update_segments else f" (the reference's is {update_segments})")
             + "; --update-freq sets another")
    if pcfg.cmsc and opts.batch_size % 2:
        raise EcgfmError(f"--batch-size {opts.batch_size}: must be even with CMSC (pairs of segments)")
    if pcfg.final_dim % pcfg.latent_groups:
        raise EcgfmError(f"--final-dim {pcfg.final_dim} must be divisible by --latent-groups {pcfg.latent_groups} "
                         "(each group quantizes an equal slice)")

    what = f"the checkpoint {opts.init}" if opts.init and resume_from is None else "the model"
    index = open_segments(opts.segments, model_contract, "pretrain", what=what)
    frames = enc_cfg.num_frames(index.contract.window)
    if pcfg.w2v and frames <= pcfg.mask_length + 1:
        raise EcgfmError(f"segments of {index.contract.window} samples give {frames} encoder frames: too few for "
                         f"--mask-length {pcfg.mask_length}")
    if pcfg.w2v and fewest_masked(frames, pcfg.mask_prob, pcfg.mask_length, pcfg.min_masks) < 2:
        raise EcgfmError(f"--mask-prob {pcfg.mask_prob} --min-masks {pcfg.min_masks} --mask-length "
                         f"{pcfg.mask_length}: a segment's {frames} frames may get fewer than the 2 masked frames "
                         "wav2vec 2.0 needs (its negatives are other masked frames); "
                         + ("raise --mask-prob" if pcfg.mask_prob > 0 else "give a --mask-prob above 0")
                         + (" or --min-masks" if pcfg.mask_prob > 0 else "") + ", or pretrain with --no-w2v")
    lcfg = loader_config(opts, pcfg, world_size, frames)
    n = batches_per_epoch(index, lcfg)
    if n == 0:
        items = index.stats.pairs if pcfg.cmsc else index.stats.segments
        raise EcgfmError(f"not enough data for one batch of {opts.batch_size} segments on each of {world_size} "
                         f"rank(s) x {lcfg.workers} loader worker(s): {index.stats.describe(pcfg.cmsc)} ({items} "
                         f"usable {'pairs' if pcfg.cmsc else 'segments'}); lower --batch-size/--workers/--procs")
    if opts.warmup_updates and opts.warmup_fraction:
        raise EcgfmError("--warmup-updates and --warmup-fraction both set the warm-up: give one")
    schedule = make_schedule(opts, n)
    incomplete = incomplete_segments(index.files)
    if incomplete:
        info(f"pretrain: {plural(incomplete, 'segment')} of {index.stats.segments} have zero-filled leads (absent "
             "in the record, flat, or NaN zeroed by `segment --nan zero`) and are trained on: random lead masking "
             "zeroes leads anyway. The reference drops records with NaN or constant leads from training; "
             "`ecgfm segment --nan drop` drops those with NaN")
    return opts, Prepared(enc_cfg, pcfg, index.contract, index.stats, world_size, n, resume_from, init_kind,
                          schedule, recipe, incomplete)


def incomplete_segments(files: list[Path]) -> int:
    """Segments whose ``lead_present`` marks a lead as zero-filled (0 for files without the column)."""
    import pyarrow.compute as pc

    from ecgfm_cli.io.tables import open_table

    n = 0
    for f in files:
        with open_table(f) as t:
            if "lead_present" not in t.schema.names:
                continue
            col = t.read(["lead_present"]).column("lead_present").combine_chunks()
        if len(col) == 0:
            continue
        per_row = col.type.list_size if hasattr(col.type, "list_size") else 0
        if not per_row:
            continue
        missing = np.asarray(pc.invert(col.flatten()).to_numpy(zero_copy_only=False)).reshape(-1, per_row)
        n += int(missing.any(axis=1).sum())
    return n


def accumulation(update_segments: int, batch_size: int, world_size: int) -> int:
    """Micro-batches per update that bring ``batch_size x world_size`` closest to ``update_segments`` (>= 1)."""
    return max(round(update_segments / (batch_size * world_size)), 1)


def _given(opts: TrainOptions, name: str) -> bool:
    """Whether option ``name`` (a ``TrainOptions`` field, or ``pretrain.<PretrainConfig field>``) was set
    explicitly: named in ``opts.given`` (the command fills it from click's parameter source)."""
    return name in opts.given


def with_dropout(cfg: EncoderConfig, p: float | None) -> EncoderConfig:
    """``--dropout p``: the encoder's dropout, attention dropout and input dropout set to ``p`` (the activation
    dropout keeps its own value, reference 0.0); None: ``cfg`` unchanged."""
    if p is None:
        return cfg
    return replace(cfg, dropout=p, attention_dropout=p, dropout_input=p)


def preset_of(cfg: EncoderConfig) -> str | None:
    """The preset whose architecture ``cfg`` is (dropouts and feature_grad_mult aside), or None."""
    for name, p in PRESETS.items():
        if replace(p, feature_grad_mult=cfg.feature_grad_mult).with_dropouts(0.0) == cfg.with_dropouts(0.0):
            return name
    return None


def apply_recipe(opts: TrainOptions, pcfg: PretrainConfig, name: str | None) -> tuple[TrainOptions, PretrainConfig]:
    """``opts`` and ``pcfg`` with the preset ``name``'s defaults (:data:`~ecgfm_cli.model.config.RECIPES`) for
    every :data:`RECIPE_OPTIONS` entry not in ``opts.given`` (unknown or None ``name``: unchanged)."""
    recipe = RECIPES.get(name or "", {})
    train = {k: v for k, v in recipe.items() if k in RECIPE_OPTIONS and k not in opts.given}
    objective = {k: v for k, v in recipe.get("pretrain", {}).items() if f"pretrain.{k}" not in opts.given}
    pcfg = replace(pcfg, **objective) if objective else pcfg
    return replace(opts, **train, pretrain=pcfg), pcfg


def make_schedule(opts: TrainOptions, batches_per_epoch: int) -> Schedule:
    """The run's :class:`Schedule`: over updates when ``--max-updates`` or ``--max-epochs`` bounds them (the
    smaller), else over ``--max-time`` seconds of training; ``--warmup-fraction`` becomes a count of updates
    for an update horizon."""
    bounds = [opts.max_updates] if opts.max_updates else []
    if opts.max_epochs:
        bounds.append(max(math.ceil(opts.max_epochs * batches_per_epoch / opts.update_freq), 1))
    if bounds:
        horizon = min(bounds)
        warm = opts.warmup_updates or round(opts.warmup_fraction * horizon)
        return Schedule("updates", float(horizon), warmup_updates=warm)
    return Schedule("time", float(opts.max_time or 0.0), warmup_updates=opts.warmup_updates,
                    warmup_fraction=opts.warmup_fraction)


def loader_config(opts: TrainOptions, pcfg: PretrainConfig, world_size: int, frames: int) -> LoaderConfig:
    """The loader's configuration; ``frames``: encoder frames per segment, for the W2V targets it draws."""
    targets = None
    if pcfg.w2v and opts.loader_targets:
        targets = TargetConfig.of(pcfg, frames)
    return LoaderConfig(batch_size=opts.batch_size, seed=opts.seed, cmsc=pcfg.cmsc, rlm=pcfg.rlm,
                        rlm_prob=pcfg.rlm_prob, rlm_apply_prob=pcfg.rlm_apply_prob, world_size=world_size,
                        workers=max(opts.workers, 1), shuffle_buffer=opts.shuffle_buffer, targets=targets)


# ----------------------------------------------------------------------------------------------- pieces


def lr_at(update: int, opts: TrainOptions, schedule: Schedule | None = None, clock: float = 0.0) -> float:
    """Learning rate for the ``update``-th optimizer step (0-based), ``clock`` seconds into the run: linear
    warm-up (over ``schedule.warmup_updates`` updates, or its ``warmup_fraction`` of a time horizon), then
    constant (``fixed``, the reference) or half-cosine to 0 at the end of the horizon (``cosine``). Without a
    ``schedule``: over ``opts.max_updates`` with ``opts.warmup_updates``."""
    if schedule is None:
        schedule = Schedule("updates", float(opts.max_updates or 0), warmup_updates=opts.warmup_updates)
    warm = schedule.warmup_updates
    if warm > 0 and update < warm:
        return opts.lr * (update + 1) / warm
    progress = schedule.progress(update, clock)
    if schedule.warmup_fraction > 0 and progress < schedule.warmup_fraction:
        return opts.lr * max(progress / schedule.warmup_fraction, 0.01)
    if opts.lr_schedule == "cosine" and schedule.horizon > 0:
        if schedule.by == "updates":
            span = max(schedule.horizon - warm, 1)
            progress = min(max(update - warm, 0) / span, 1.0)
        else:
            progress = (progress - schedule.warmup_fraction) / max(1.0 - schedule.warmup_fraction, 1e-9)
        return opts.lr * 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
    return opts.lr


def build_model(prep: Prepared, seed: int) -> Wav2Vec2Pretrainer:
    torch.manual_seed(seed)
    return Wav2Vec2Pretrainer(prep.encoder_config, prep.pretrain)


def load_init(model: Wav2Vec2Pretrainer, path: str, allow_pickle: bool = False) -> None:
    """Weights of ``--init``: a pretraining checkpoint (ours or official) loads whole; an encoder or classifier
    checkpoint loads the encoder and leaves the pretraining heads freshly initialised."""
    from ecgfm_cli.model.checkpoint import encoder_state, load_checkpoint

    loaded = load_checkpoint(path, allow_pickle=allow_pickle)
    if loaded.kind == "pretraining":
        state = {k: v for k, v in loaded.state_dict.items() if not k.startswith("target_glu.")}
        model.load_state_dict(state, strict=True)
    else:
        model.encoder.load_state_dict(encoder_state(loaded.kind, loaded.state_dict), strict=True)


def train_update(model: Wav2Vec2Pretrainer, net: nn.Module, optimizer: torch.optim.Optimizer, micro: list[dict],
                 ctx: DistContext, lr: float, clip_norm: float = 0.0, dtype: str = "float32",
                 fixed: list[dict] | None = None, stop: bool = False, clock: float = 0.0) -> Update:
    """Queue one pretraining optimizer step over the micro-batches ``micro`` (dicts with ``x (B, 12, L)`` and
    ``record (B,)``, optionally a precomputed ``mask`` and ``negatives_idx``), without waiting for it
    (:func:`~ecgfm_cli.train.loop.train_step`; ``Update.metrics()`` gives the log columns as plain floats).

    ``net`` is ``model`` or its DDP wrapper. ``fixed`` (tests, ``gpu_pretrain_mfu.py --loader-targets``): per
    micro-batch ``{"mask": (B, T) bool, "negatives_idx": (B, T', N)}`` passed to the forward. ``stop``,
    ``clock``: see ``train_step``.
    """
    def loss_fn(net: nn.Module, b: dict, i: int) -> tuple[torch.Tensor, PretrainStats]:
        given = dict(fixed[i]) if fixed else {k: b[k] for k in ("mask", "negatives_idx") if k in b}
        if "negatives_idx" in given:  # the mask stays on the host: the forward locates its frames there
            given["negatives_idx"] = given["negatives_idx"].to(ctx.device, non_blocking=True)
        out = net(b["x"].to(ctx.device, non_blocking=True), b["record"].to(ctx.device, non_blocking=True), **given)
        return out.loss, out.stats

    return train_step(model, net, optimizer, micro, loss_fn, ctx, lr, clip_norm, dtype, stop, clock)


# ------------------------------------------------------------------------------------------- checkpoints


def _rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "python": list(random.getstate()[1]) + [random.getstate()[0]],
        "python_gauss": random.getstate()[2],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(s: dict) -> None:
    py = s["python"]
    random.setstate((py[-1], tuple(py[:-1]), s["python_gauss"]))
    n = s["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def save_run_checkpoint(run: Path, model: Wav2Vec2Pretrainer, optimizer: torch.optim.Optimizer, prep: Prepared,
                        opts: TrainOptions, ctx: DistContext, update: int, position: tuple[int, int],
                        clock: float = 0.0) -> Path | None:
    """Collective (every rank calls it: the RNG states are gathered); rank 0 writes
    ``RUN/checkpoint-<update>/`` atomically, points ``RUN/latest`` at it and keeps the last ``keep_last``.
    ``clock``: seconds of training so far (a resumed run's ``--max-time`` and time schedule continue from it)."""
    from ecgfm_cli.model.checkpoint import make_config, save_checkpoint

    states = [None] * ctx.world_size
    if ctx.distributed:
        dist.all_gather_object(states, _rng_state())
    else:
        states = [_rng_state()]
    if not ctx.is_main:
        return None
    pcfg = prep.pretrain
    heads = {"latent_groups": pcfg.latent_groups, "latent_vars": pcfg.latent_vars,
             "latent_dim": pcfg.final_dim, "final_dim": pcfg.final_dim}
    config = make_config("pretraining", model.encoder_cfg, heads=heads, contract=prep.contract, source={
        "command": "ecgfm pretrain", "update": update, "epoch": position[0], "pretrain": asdict(pcfg),
        "init": opts.init, "segments": str(opts.segments),
        "resume_keeps": {k: getattr(opts, k) for k in RESUME_KEEPS}, "loader_targets": opts.loader_targets,
        "limits": {k: getattr(opts, k) for k in ("max_updates", "max_epochs", "max_time")},
        "batch_size": opts.batch_size,
    })
    final = run / f"checkpoint-{update}"
    tmp = run / f".checkpoint-{update}{_PARTIAL}{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_checkpoint(tmp, model.state_dict(), config)
    torch.save({
        "update": update,
        "epoch": position[0],
        "data": {"epoch": position[0], "batch": position[1], "seed": opts.seed, "world_size": ctx.world_size,
                 "workers": max(opts.workers, 1), "batch_size": opts.batch_size, "cmsc": pcfg.cmsc,
                 "shuffle_buffer": opts.shuffle_buffer, "batches_per_epoch": prep.batches_per_epoch},
        "optimizer": optimizer.state_dict(),
        "num_updates": model.quantizer.num_updates,
        "temperature": model.quantizer.temperature,
        "clock": float(clock),
        "rng": states,
    }, tmp / STATE_FILE)
    replace_dir(tmp, final)
    atomic_write_text(run / LATEST, final.name + "\n")
    for old in checkpoints(run)[: -opts.keep_last] if opts.keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


_PARTIAL = ".partial-"  # .checkpoint-<update>.partial-<pid>: a checkpoint being written by process pid
_PARTIAL_RE = re.compile(r"^\.checkpoint-\d+\.partial-(\d+)$")


def remove_dead_partials(run: Path) -> list[Path]:
    """Delete the half-written checkpoint directories (``.checkpoint-N.partial-PID``) of runs killed while saving
    (kill -9 cannot clean up), only those whose process PID no longer exists. Returns what was removed."""
    removed = []
    for p in run.iterdir() if run.is_dir() else []:
        m = _PARTIAL_RE.match(p.name)
        if m and int(m[1]) != os.getpid() and not pid_alive(int(m[1])):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


#: What ``_train`` reads from a trainer state (the rest is optional).
_STATE_KEYS = ("update", "data", "optimizer", "rng")


def load_trainer_state(ckpt: Path) -> dict:
    """The trainer state of checkpoint directory ``ckpt`` (optimizer, update count, RNG states, data position),
    loaded with ``weights_only=True``. A file that asks for anything beyond tensors and plain data (pickled code),
    is not a torch file, or lacks the keys a resume needs fails with one line naming it."""
    import pickle

    path = ckpt / STATE_FILE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only refused what the pickle asks for: it would run code
        found = re.search(r"Unsupported (?:global: GLOBAL \S+|operand \S+)|unsupported GLOBAL \S+", str(e))
        why = f" ({found.group(0)})" if found else ""
        raise EcgfmError(f"--resume: {path} is not a safe trainer state: it holds pickled objects beyond tensors and "
                         f"plain data{why}, which ecgfm never writes; it was not loaded") from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise EcgfmError(f"--resume: {path} is not a readable trainer state ({first})") from e
    missing = [k for k in _STATE_KEYS if k not in state] if isinstance(state, dict) else list(_STATE_KEYS)
    if missing:
        raise EcgfmError(f"--resume: {path} is not an ecgfm trainer state (it lacks {', '.join(missing)})")
    return state


# -------------------------------------------------------------------------------------------------- loop


def train_worker(opts: TrainOptions, prep: Prepared) -> None:
    """Entry point of every rank (see :func:`ecgfm_cli.train.distributed.launch`)."""
    with rank_context(opts.device, opts.threads) as ctx:
        _train(opts, prep, ctx)


def _train(opts: TrainOptions, prep: Prepared, ctx: DistContext) -> None:
    run, schedule = Path(opts.output), prep.schedule
    index: SegmentIndex = open_segments(opts.segments, None, "pretrain")
    lcfg = loader_config(opts, prep.pretrain, ctx.world_size, prep.encoder_config.num_frames(prep.contract.window))
    model = build_model(prep, opts.seed)
    start = _restore(model, opts, prep, ctx, lcfg)
    update, position = start.update, start.position
    model.set_num_updates(update, schedule.progress(update, start.clock))
    model.to(ctx.device)
    if opts.compile:
        from ecgfm_cli.model.encoder import compile_layers

        compile_layers(model.encoder)
    optimizer = torch.optim.AdamW(model.parameters(), lr=opts.lr, betas=opts.adam_betas, eps=opts.adam_eps,
                                  weight_decay=opts.weight_decay, fused=ctx.device.type == "cuda")
    if start.state is not None:
        optimizer.load_state_dict(start.state["optimizer"])
        rng = start.state["rng"]
        _set_rng_state(rng[ctx.rank] if ctx.rank < len(rng) else rng[0])
    else:
        seed_everything(opts.seed, ctx.rank)
    net = data_parallel(model, ctx, find_unused_parameters=not prep.pretrain.w2v)
    model.train()
    if ctx.is_main:
        _announce(run, model, opts, prep, ctx, update)
    loader = make_loader(index, lcfg, ctx.rank, position[0], position[1], opts.max_epochs,
                         processes=opts.worker_processes, pin_memory=ctx.device.type == "cuda")
    bar = progress_bar(ctx, total=opts.max_updates, initial=update, unit="upd", desc="pretrain")
    log = _Log(run, prep, ctx, bar, Cadence(opts.log_every, opts.save_every, opts.max_updates), start.clock,
               saved_at=update if prep.resume_from else -1)
    pending = None  # (update, extras, number, position, segments, queued at) of the update queued last, unread
    stop = exhausted = False
    try:
        while not stop and (opts.max_updates is None or update < opts.max_updates):
            micro = list(itertools.islice(loader, opts.update_freq))
            exhausted = len(micro) < opts.update_freq
            if not micro:
                break
            now = log.run_clock()
            progress = schedule.progress(update, log.clock)
            model.set_num_updates(update, progress)
            result = train_update(model, net, optimizer, micro, ctx, lr_at(update, opts, schedule, log.clock),
                                  opts.clip_norm, opts.dtype, stop=opts.max_time is not None and now >= opts.max_time,
                                  clock=now)
            extras = {"temperature": model.quantizer.temperature, "progress": progress}
            update += 1
            model.set_num_updates(update, schedule.progress(update, log.clock))
            last = micro[-1]
            position = (int(last["epoch"]), int(last["batch"]) * lcfg.workers + int(last["worker"]) + 1)
            # read the previous update's metrics only now, with this one queued behind it
            stop = pending is not None and log.book(*pending)
            pending = (result, extras, update, position, sum(len(b["x"]) for b in micro) * ctx.world_size,
                       time.monotonic())
            if log.cadence.save_due(update):
                stop = log.book(*pending) or stop  # the log holds every update up to a checkpoint
                pending = None
                save_run_checkpoint(run, model, optimizer, prep, opts, ctx, update, position, log.clock)
                log.saved_at = update
        if pending is not None:
            log.book(*pending)
        log.flush(update, position)
        final = None
        if update != log.saved_at and update > 0:
            final = save_run_checkpoint(run, model, optimizer, prep, opts, ctx, update, position, log.clock)
        elif ctx.is_main and update > 0:
            final = run / f"checkpoint-{update}"
    finally:
        if bar is not None:
            bar.close()
        if hasattr(loader, "close"):
            loader.close()
    if ctx.is_main:
        _finish(run, opts, update, position, exhausted, log, final)


@dataclass
class _Start:
    """Where a rank's training starts: ``update`` count, data ``position`` (epoch, batch of the rank in it),
    ``clock`` seconds of training before this process, and a resumed run's trainer ``state``."""

    update: int = 0
    position: tuple[int, int] = (0, 0)
    clock: float = 0.0
    state: dict | None = None


def _restore(model: Wav2Vec2Pretrainer, opts: TrainOptions, prep: Prepared, ctx: DistContext,
             lcfg: LoaderConfig) -> _Start:
    """Load a resumed run's weights and trainer state (or the ``--init`` weights) into ``model``."""
    if not prep.resume_from:
        if opts.init:
            load_init(model, opts.init, opts.unsafe_pickle)
        return _Start()
    from ecgfm_cli.model.checkpoint import load_checkpoint

    ckpt = Path(prep.resume_from)
    model.load_state_dict(load_checkpoint(ckpt).state_dict, strict=True)
    state = load_trainer_state(ckpt)
    data = state["data"]
    position = (int(data["epoch"]), int(data["batch"]))
    if (data["world_size"], data["workers"], data["batch_size"]) != (ctx.world_size, lcfg.workers, opts.batch_size):
        # Another data layout: keep the epoch, continue at the same fraction of it.
        frac = data["batch"] / max(data.get("batches_per_epoch", data["batch"]) or 1, 1)
        position = (position[0], int(frac * prep.batches_per_epoch))
        if ctx.is_main:
            info("pretrain: resuming with another world size/workers/batch size: the data order differs "
                 "from the original run from here on")
    return _Start(int(state["update"]), position, float(state.get("clock", 0.0)), state)


def _announce(run: Path, model: Wav2Vec2Pretrainer, opts: TrainOptions, prep: Prepared, ctx: DistContext,
              update: int) -> None:
    """Main rank: write ``run.json``, cut a resumed run's log back to its checkpoint, remove killed runs'
    half-written checkpoints, say what will run."""
    run.mkdir(parents=True, exist_ok=True)
    removed = remove_dead_partials(run)
    if removed:
        info(f"pretrain: removed {plural(len(removed), 'half-written checkpoint')} of killed runs "
             f"({', '.join(p.name for p in removed[:3])})")
    precision = ("float32, as the reference" if opts.dtype == "float32" else
                 f"{opts.dtype} autocast (weights, optimizer, losses and logits float32; the reference "
                 "trained in float32)")
    schedule_line = prep.schedule.describe(opts, prep.pretrain)
    _write_json(run / "run.json", {
        "options": {**asdict(opts), "pretrain": asdict(prep.pretrain)},
        "recipe": prep.recipe, "schedule": {**asdict(prep.schedule), "line": schedule_line}, "precision": precision,
        "incomplete_segments": prep.incomplete_segments, "threads": torch.get_num_threads(),
        "encoder": model.encoder_cfg.to_dict(), "data": asdict(prep.stats), "world_size": ctx.world_size,
        "batches_per_epoch": prep.batches_per_epoch, "resumed_from": prep.resume_from, "init_kind": prep.init_kind,
        "parameters": sum(p.numel() for p in model.parameters()),
    })
    _truncate_log(run / "log.jsonl", update)
    info(f"pretrain: {prep.stats.describe(prep.pretrain.cmsc)}; {prep.batches_per_epoch} batches of "
         f"{opts.batch_size} per rank per epoch, {ctx.world_size} rank(s), update = "
         f"{opts.batch_size * opts.update_freq * ctx.world_size} segments; "
         f"{'resuming at update ' + str(update) if update else 'starting'} on {ctx.device} ({precision}"
         + (f"; {plural(torch.get_num_threads(), 'thread')} per process)" if ctx.device.type == "cpu" else ")")
         + (f"; init {prep.init_kind} {opts.init}" + ("" if prep.init_kind == "pretraining" else
                                                      ", pretraining heads new") if opts.init and not update
            else ""))
    info(f"pretrain: {'preset ' + prep.recipe + ', ' if prep.recipe else ''}{schedule_line}")


class _Log:
    """The run's metrics as the updates are read: the log window, ``log.jsonl`` lines, the progress bar, the
    ranks' agreed ``clock`` (as of the last update read) and the last line written (``line``)."""

    def __init__(self, run: Path, prep: Prepared, ctx: DistContext, bar, cadence: Cadence, clock0: float,
                 saved_at: int) -> None:
        self.run, self.prep, self.ctx, self.bar, self.cadence = run, prep, ctx, bar, cadence
        self.clock0 = self.clock = clock0  # clock0: seconds of training before this process (a resumed run's)
        self.saved_at = saved_at
        self.t_start = time.monotonic()
        self.window = Window(self.t_start)
        self.line: dict[str, Any] = {}

    def run_clock(self) -> float:
        return self.clock0 + time.monotonic() - self.t_start

    def book(self, result: Update, extras: dict, at: int, pos: tuple[int, int], segments: int,
             queued: float) -> bool:
        """Book update ``at``'s metrics (waits for it): progress bar, a log line when due. ``queued``: when the
        update was queued; rates are measured between those times, which advance as the updates complete (the
        host runs at most one update ahead) however late the metrics are read. Returns whether the ranks voted
        to stop."""
        m = {**result.metrics(), **extras, "update": at}
        self.clock = m.pop("clock")
        last = f"checkpoint-{self.saved_at} is the last good one" if self.saved_at > 0 else "no checkpoint was written"
        check_finite(m["loss"], f"pretrain: update {at}", lost=f" ({last})")
        self.window.add(m, segments)
        if self.cadence.log_due(at, m["stop"]):
            self.flush(at, pos, queued, say=True)
        if self.bar is not None:
            self.bar.update(1)
            rate = self.line.get("segments_per_s")
            self.bar.set_postfix(loss=f"{m['loss']:.3f}", epoch=pos[0], **({"seg/s": f"{rate:.0f}"} if rate else {}))
        return m["stop"]

    def flush(self, update: int, position: tuple[int, int], until: float | None = None, say: bool = False) -> None:
        """Write the window as one log line (nothing when it is empty) and start a new window at ``until``
        (when the last update of this one was queued; default now). ``say``: also print the line."""
        if not len(self.window):
            return
        now = time.monotonic()
        w, until = self.window, now if until is None else until
        last = w.entries[-1]
        self.line = {"update": update,
                     "epoch": round(position[0] + position[1] / max(self.prep.batches_per_epoch, 1), 4),
                     **w.means([*PretrainStats.column_names(), "grad_norm"]),
                     "temperature": last["temperature"], "lr": last["lr"], "progress": round(last["progress"], 4),
                     "segments_per_s": round(w.segments / max(until - w.began, 1e-9), 2),
                     "max_memory_mb": round(_max_memory_mb(self.ctx.device), 1),
                     "elapsed_s": round(now - self.t_start, 3), "stop": bool(last["stop"])}
        if self.ctx.is_main:
            append_jsonl(self.run / "log.jsonl", self.line)
            if say and self.bar is None:
                info(_summary_line(self.line))
            elif say:  # above the bar, which stays at the bottom
                self.bar.write(_summary_line(self.line), file=sys.stderr)
        self.window = Window(until)


def _finish(run: Path, opts: TrainOptions, update: int, position: tuple[int, int], exhausted: bool, log: _Log,
            final: Path | None) -> None:
    """Main rank: ``summary.json`` and the last line."""
    last = log.line
    reason = "max-updates" if opts.max_updates and update >= opts.max_updates else (
        "max-epochs" if exhausted else ("max-time" if last.get("stop") else "end"))
    summary = {"updates": update, "epoch": last.get("epoch", position[0]), "stopped_by": reason,
               "elapsed_s": round(time.monotonic() - log.t_start, 3), "checkpoint": str(final) if final else None,
               "last": last}
    _write_json(run / "summary.json", summary)
    info(f"pretrain: {plural(update, 'update')} ({reason}), loss {last.get('loss', float('nan')):.4f}, "
         f"{summary['elapsed_s']:.0f} s; checkpoint {final}")


def _max_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _summary_line(m: dict) -> str:
    return (f"update {m['update']} epoch {m['epoch']:.2f} loss {m['loss']:.4f} (contr {m['contrastive']:.3f} "
            f"cmsc {m['cmsc']:.3f} div {m['diversity']:.3f} pen {m['features_pen']:.4f}) ppl "
            f"{m['prob_perplexity']:.1f}/{m['code_perplexity']:.1f} tau {m['temperature']:.4f} lr {m['lr']:.2e} "
            f"gnorm {m['grad_norm']:.3f} {m['segments_per_s']:.0f} seg/s mem {m['max_memory_mb']:.0f} MB")


def _write_json(path: Path, obj: dict) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def _truncate_log(path: Path, update: int) -> None:
    """On resume, drop log lines of updates after the checkpoint (the killed run got further)."""
    if not path.exists():
        return
    keep = [e for e in read_jsonl(path) if e.get("update", 0) <= update]
    atomic_write_text(path, "".join(json.dumps(e) + "\n" for e in keep))
