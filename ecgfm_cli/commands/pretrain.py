"""``ecgfm pretrain``: W2V + CMSC + RLM pretraining on segments, on CPU, one GPU, or many (DDP)."""

from __future__ import annotations

import re
from dataclasses import fields
from typing import Annotated, Literal

import typer

from ecgfm_cli.commands.options import (
    DATA_PANEL,
    DEVICES_PANEL,
    AllowPartial,
    Device,
    Gpus,
    PresetName,
    Procs,
    Threads,
    TrainDtype,
    UnsafePickle,
    in_panel,
    train_dtype,
)
from ecgfm_cli.eval_options import csv_numbers
from ecgfm_cli.model.config import PRESETS, RECIPES, REFERENCE_UPDATE_SEGMENTS, PretrainConfig
from ecgfm_cli.train.options import (
    DEFAULT_MAX_EPOCHS,
    MULTI_NODE_PORT,
    REFERENCE_BATCH_SIZE,
    LaunchOptions,
    TrainOptions,
)

_DATA = DATA_PANEL
_RUN = "Run length, checkpoints, logs"
_OPT = "Optimisation"
_DIST = DEVICES_PANEL
_LOSS = "Objective (defaults: ECG-FM)"


def _opt(help: str, panel: str, *names: str, **kw) -> typer.models.OptionInfo:
    """An option of this command: its help line and its panel (give value options a short ``metavar``: typer's
    type column, ``<float range> [0.0<=x<=1.0]``, is otherwise wider than the help itself)."""
    return typer.Option(*names, help=help or None, rich_help_panel=panel, **kw)


def parse_duration(text: str) -> float:
    """``"3600"``, ``"90s"``, ``"30m"``, ``"2h"``, ``"1h30m"`` -> seconds."""
    from ecgfm_cli.errors import EcgfmError

    t = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", t):
        return float(t)
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([hms])", t)
    if not parts or re.sub(r"(\d+(?:\.\d+)?)\s*([hms])", "", t).strip():
        raise EcgfmError(f"--max-time {text!r}: expected seconds or a duration such as 90m, 2h, 1h30m")
    return sum(float(v) * {"h": 3600, "m": 60, "s": 1}[u] for v, u in parts)


def _floats(text: str, n: int, option: str) -> tuple[float, ...]:
    from ecgfm_cli.errors import EcgfmError

    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != n:
        raise EcgfmError(f"{option} {text!r}: expected {n} comma-separated numbers")
    return values


def _latent_temp(text: str) -> dict:
    """``"2,0.5,0.999995"`` (start, floor, decay per update) or ``"2,0.5,run"`` (start -> end across the run)
    -> the PretrainConfig fields."""
    from ecgfm_cli.errors import EcgfmError

    parts = [p.strip() for p in text.split(",")]
    if len(parts) == 3 and parts[2].lower() == "run":
        start, end = _floats(",".join(parts[:2]), 2, "--latent-temp")
        out = {"latent_temp_max": start, "latent_temp_min": end, "latent_temp_schedule": "run"}
    else:
        start, end, decay = _floats(text, 3, "--latent-temp")
        out = {"latent_temp_max": start, "latent_temp_min": end, "latent_temp_decay": decay,
               "latent_temp_schedule": "decay"}
    if min(start, end) <= 0:
        raise EcgfmError(f"--latent-temp {text!r}: temperatures must be > 0")
    return out


def _num(value: float) -> str:
    """A default as the help text writes it: ``5e-05`` -> ``5e-5``, ``1.0`` -> ``1``."""
    return f"{value:g}".replace("e-0", "e-")


def _preset(base: object, small: object) -> str:
    """``preset: BASE, small SMALL``: an option marked *preset* under the reference recipe and the laptop one."""
    show = [_num(v) if isinstance(v, float) else str(v) for v in (base, small)]
    return f"preset: {show[0]}, small {show[1]}"


_T, _P, _L, _SMALL = TrainOptions, PretrainConfig, LaunchOptions, RECIPES["small"]
_SMALL_P = _SMALL["pretrain"]
_REFERENCE_TEMP = f"{_P.latent_temp_max:g},{_P.latent_temp_min:g},{_P.latent_temp_decay:g}"
_SMALL_TEMP = f"{_SMALL_P['latent_temp_max']:g},{_SMALL_P['latent_temp_min']:g},{_SMALL_P['latent_temp_schedule']}"
_UnsafePickle = in_panel(UnsafePickle, _DATA)
_Dtype = in_panel(TrainDtype, _OPT)


def pretrain_command(
    ctx: typer.Context,
    segments: Annotated[str, typer.Argument(
        help="Segments DIR or .parquet/.arrow FILE.", show_default=False)],
    output: Annotated[str, _opt("Run: checkpoints, log.jsonl, run.json.", _DATA, "-o", "--output",
                                metavar="DIR")],
    preset: Annotated[PresetName | None, _opt("base (ECG-FM; default), large, small (laptop), tiny: "
                                              "the 'preset' defaults.", _DATA, metavar="NAME")] = None,
    init: Annotated[str | None, _opt("Start from CKPT (ECG-FM .pt or ours) and its architecture, not "
                                     "--preset's.", _DATA, metavar="CKPT")] = _T.init,
    unsafe_pickle: _UnsafePickle = _T.unsafe_pickle,
    resume: Annotated[bool, _opt("Continue the run in -o exactly where its last checkpoint left off.", _DATA,
                                 "--resume")] = _T.resume,
    batch_size: Annotated[int | None, _opt(
        f"Segments per process per step ({_preset(REFERENCE_BATCH_SIZE, _SMALL['batch_size'])}; --resume: the run's).",
        _OPT, min=1, metavar="N")] = None,
    update_freq: Annotated[int | None, _opt(f"Steps per update (preset: {REFERENCE_UPDATE_SEGMENTS} segments for "
                                            f"base/large, else {_T.update_freq}).", _OPT, min=1, metavar="N")] = None,
    lr: Annotated[float | None, _opt(f"Peak learning rate ({_preset(_T.lr, _SMALL['lr'])}).", _OPT, min=0,
                                     metavar="X")] = None,
    lr_schedule: Annotated[Literal["fixed", "cosine"] | None, _opt(
        f"cosine: to 0 at the run's end ({_preset(_T.lr_schedule, _SMALL['lr_schedule'])}).", _OPT)] = None,
    warmup_updates: Annotated[int, _opt("Warm-up updates.", _OPT, min=0, metavar="N")] = _T.warmup_updates,
    warmup_fraction: Annotated[float | None, _opt(
        f"Linear warm-up over this fraction of the run ({_preset(_T.warmup_fraction, _SMALL['warmup_fraction'])}).",
        _OPT, min=0, max=1, metavar="X")] = None,
    weight_decay: Annotated[float, _opt("AdamW weight decay.", _OPT, min=0, metavar="X")] = _T.weight_decay,
    adam_betas: Annotated[str, _opt("Adam betas.", _OPT, metavar="B1,B2")] = csv_numbers(_T.adam_betas),
    adam_eps: Annotated[float, _opt("Adam epsilon.", _OPT, metavar="X")] = _T.adam_eps,
    clip_norm: Annotated[float | None, _opt(
        f"Gradient-norm clip, 0 = off ({_preset(_T.clip_norm, _SMALL['clip_norm'])}).", _OPT, min=0,
        metavar="X")] = None,
    dtype: _Dtype = "auto",
    compile: Annotated[bool, _opt("torch.compile the layers (GPU; C++ compiler on CPU).", _OPT,
                                  "--compile")] = _T.compile,
    dropout: Annotated[float | None, _opt(f"Dropout, attention and input dropout "
                                          f"({_preset(PRESETS['base'].dropout, _SMALL['dropout'])}).", _OPT,
                                          min=0, max=1, metavar="X")] = None,
    max_updates: Annotated[int | None, _opt("Stop after this many updates.", _RUN, min=1,
                                            metavar="N")] = _T.max_updates,
    max_epochs: Annotated[int | None, _opt(f"Stop after N epochs ({DEFAULT_MAX_EPOCHS} if no limit given).", _RUN,
                                           min=1, metavar="N")] = _T.max_epochs,
    max_time: Annotated[str | None, _opt("Stop after seconds or 90m, 2h, 1h30m.", _RUN,
                                         metavar="TIME")] = None,
    save_every: Annotated[int, _opt("Checkpoint every N updates (and at the end).", _RUN, min=0,
                                    metavar="N")] = _T.save_every,
    keep_last: Annotated[int, _opt("Last checkpoints kept (0 = all).", _RUN, min=0, metavar="N")] = _T.keep_last,
    log_every: Annotated[int, _opt("log.jsonl line per N updates.", _RUN, min=1, metavar="N")] = _T.log_every,
    seed: Annotated[int, _opt("Seed of init, masks, data order.", _RUN, metavar="N")] = _T.seed,
    device: Device = "auto",
    gpus: Gpus = None,
    procs: Procs = None,
    nnodes: Annotated[int, _opt("Nodes (same command on each).", _DIST, min=1, metavar="N")] = _L.nnodes,
    node_rank: Annotated[int, _opt("This node's rank.", _DIST, min=0, metavar="N")] = _L.node_rank,
    master_addr: Annotated[str, _opt("Address of node 0.", _DIST, metavar="TEXT")] = _L.master_addr,
    master_port: Annotated[int | None, _opt(f"Port on node 0 (a free one; {MULTI_NODE_PORT} multi-node).", _DIST,
                                            metavar="N")] = _L.master_port,
    workers: Annotated[int, _opt("Loader threads per process.", _DIST, min=1, metavar="N")] = _T.workers,
    threads: Threads = _T.threads,
    worker_processes: Annotated[bool, _opt("Load in processes, not threads (same batches).", _DIST,
                                           "--worker-processes")] = _T.worker_processes,
    shuffle_buffer: Annotated[int, _opt("Pairs shuffled together per loader (~240 kB each).", _DIST,
                                        min=1, metavar="N")] = _T.shuffle_buffer,
    mask_prob: Annotated[float, _opt("Span-start probability x span.", _LOSS, min=0, max=1,
                                     metavar="X")] = _P.mask_prob,
    mask_length: Annotated[int, _opt("Time-mask span (frames).", _LOSS, min=1, metavar="N")] = _P.mask_length,
    min_masks: Annotated[int, _opt("Minimum spans per segment.", _LOSS, min=0, metavar="N")] = _P.min_masks,
    num_negatives: Annotated[int | None, _opt(f"Distractors per masked frame "
                                              f"({_preset(_P.num_negatives, _SMALL_P['num_negatives'])}).", _LOSS,
                                              min=1, metavar="N")] = None,
    logit_temp: Annotated[float, _opt("Contrastive logit temperature.", _LOSS, min=1e-6,
                                      metavar="X")] = _P.logit_temp,
    latent_vars: Annotated[int | None, _opt(f"Codebook entries per group "
                                            f"({_preset(_P.latent_vars, _SMALL_P['latent_vars'])}).", _LOSS, min=1,
                                            metavar="N")] = None,
    latent_groups: Annotated[int, _opt("Codebook groups.", _LOSS, min=1, metavar="N")] = _P.latent_groups,
    final_dim: Annotated[int | None, _opt(f"Projection / codeword size "
                                          f"({_preset(_P.final_dim, _SMALL_P['final_dim'])}).", _LOSS, min=1,
                                          metavar="N")] = None,
    latent_temp: Annotated[str | None, _opt("Gumbel temperature start,end,decay per update, or "
                                            f"start,end,run: annealed across the run (preset: {_REFERENCE_TEMP}; "
                                            f"small {_SMALL_TEMP}).", _LOSS, metavar="TEXT")] = None,
    dropout_features: Annotated[float, _opt("Quantizer-input dropout.", _LOSS, min=0, max=1,
                                            metavar="X")] = _P.dropout_features,
    feature_grad_mult: Annotated[float, _opt("Gradient scale into the convs.", _LOSS, min=0,
                                             metavar="X")] = _P.feature_grad_mult,
    diversity_weight: Annotated[float, _opt("Codebook diversity weight.", _LOSS, min=0,
                                            metavar="X")] = _P.diversity_weight,
    feature_penalty_weight: Annotated[float, _opt("Feature L2 penalty weight.", _LOSS, min=0,
                                                  metavar="X")] = _P.features_pen_weight,
    cmsc_weight: Annotated[float, _opt("CMSC loss weight.", _LOSS, min=0, metavar="X")] = _P.cmsc_weight,
    cmsc_temp: Annotated[float, _opt("CMSC temperature.", _LOSS, min=1e-6, metavar="X")] = _P.cmsc_temp,
    cmsc_gather: Annotated[bool, _opt("CMSC negatives from all ranks (reference: local).", _LOSS,
                                      "--cmsc-gather")] = _P.cmsc_gather,
    rlm_prob: Annotated[float, _opt("Chance RLM zeroes a lead.", _LOSS, min=0, max=1,
                                    metavar="X")] = _P.rlm_prob,
    rlm_apply_prob: Annotated[float, _opt("Chance a segment gets RLM.", _LOSS, min=0, max=1,
                                          metavar="X")] = _P.rlm_apply_prob,
    no_cmsc: Annotated[bool, _opt("Ablation: no CMSC.", _LOSS, "--no-cmsc")] = not _P.cmsc,
    no_rlm: Annotated[bool, _opt("Ablation: no RLM lead masking.", _LOSS, "--no-rlm")] = not _P.rlm,
    no_w2v: Annotated[bool, _opt("Ablation: no wav2vec 2.0 loss.", _LOSS, "--no-w2v")] = not _P.w2v,
    allow_partial: AllowPartial = False,
) -> None:
    """Pretrain an ECG-FM encoder with ECG-FM's objective (wav2vec 2.0 + CMSC + random lead masking) from segments.

    `ecgfm pretrain SEGMENTS -o RUN/ [--gpus 8]` writes RUN/checkpoint-<update>/.
    --resume continues it exactly. Nodes, launchers: docs/commands/pretrain.md."""
    # the options by name: each one named as a TrainOptions / PretrainConfig field fills that field
    args = {k: v for k, v in locals().items() if v is not None and k != "ctx"}
    from ecgfm_cli.errors import EcgfmError

    if no_w2v and no_cmsc:
        raise EcgfmError("--no-w2v with --no-cmsc leaves no objective")
    if node_rank >= nnodes:
        raise EcgfmError(f"--node-rank {node_rank}: must be below --nnodes {nnodes}")
    betas = _floats(adam_betas, 2, "--adam-betas")
    temp = _latent_temp(latent_temp) if latent_temp is not None else {}
    args.update(temp)
    seconds = parse_duration(max_time) if max_time is not None else None

    import os

    from ecgfm_cli.train import distributed
    from ecgfm_cli.train.pretrain import prepare, train_worker

    dev, nprocs = distributed.resolve_device(device, gpus, procs)
    world = int(os.environ["WORLD_SIZE"]) if distributed.under_launcher() else nprocs * nnodes

    # options left out (None) take their preset's value (train.pretrain.apply_recipe), or with --resume the run's
    given = given_options(ctx, tuple(f"pretrain.{k}" for k in temp))
    pcfg = PretrainConfig(**_fields(PretrainConfig, args), w2v=not no_w2v, cmsc=not no_cmsc, rlm=not no_rlm,
                          features_pen_weight=feature_penalty_weight)
    opts = TrainOptions(**_fields(TrainOptions, args), device=dev, dtype=train_dtype(dtype, dev),
                        adam_betas=(betas[0], betas[1]), max_time=seconds, pretrain=pcfg, given=given)
    opts, prep = prepare(opts, world)
    distributed.launch(train_worker, (opts, prep), nprocs=nprocs, nnodes=nnodes, node_rank=node_rank,
                       master_addr=master_addr, master_port=master_port)


#: Parameters of the command that fill option fields of another name (``pretrain.``: a PretrainConfig field).
_FILLS = {"feature_penalty_weight": ("pretrain.features_pen_weight",), "no_w2v": ("pretrain.w2v",),
          "no_cmsc": ("pretrain.cmsc",), "no_rlm": ("pretrain.rlm",), "gpus": ("device",), "procs": ("device",)}


def given_options(ctx: typer.Context, latent_temp: tuple[str, ...]) -> tuple[str, ...]:
    """The option fields set on the command line (or through the environment), by click's parameter source, as
    ``TrainOptions.given`` names them: ``TrainOptions`` fields, ``PretrainConfig`` fields as ``pretrain.<name>``.
    ``latent_temp``: the fields ``--latent-temp`` set, when given (its form decides which)."""
    train, objective = {f.name for f in fields(TrainOptions)}, {f.name for f in fields(PretrainConfig)}
    given: list[str] = []
    for param in ctx.command.params:
        name = param.name or ""
        source = ctx.get_parameter_source(name)  # by name: typer >= 0.2x has its own copy of click's enum
        if source is None or source.name in ("DEFAULT", "DEFAULT_MAP"):
            continue
        if name == "latent_temp":
            given += latent_temp
        elif name in _FILLS:
            given += _FILLS[name]
        elif name in train:
            given.append(name)
        elif name in objective:
            given.append(f"pretrain.{name}")
    return tuple(dict.fromkeys(given))


def _fields(cls: type, args: dict) -> dict:
    """The entries of ``args`` named as fields of dataclass ``cls``, less the options the command turns into
    another value (``auto`` resolved, text parsed)."""
    derived = {"device", "dtype", "adam_betas", "max_time"}
    return {f.name: args[f.name] for f in fields(cls) if f.name in args and f.name not in derived}
