"""``ecgfm pretrain``: W2V + CMSC + RLM pretraining on segments, on CPU, one GPU, or many (DDP)."""

from __future__ import annotations

import re
from typing import Annotated, Literal

import typer

from ecgfm_cli.commands.options import AllowPartial

_DATA = "Data and model"
_RUN = "Run length, checkpoints, logs"
_OPT = "Optimisation"
_DIST = "Devices and processes"
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


def _set(**values) -> dict:
    """The keyword arguments that were given (not None)."""
    return {k: v for k, v in values.items() if v is not None}


def pretrain_command(
    segments: Annotated[str, typer.Argument(
        help="Segments from `ecgfm segment`: DIR of shards or FILE.parquet/.arrow.", show_default=False)],
    output: Annotated[str, _opt("Run directory: checkpoints, log.jsonl, run.json.", _DATA, "-o", "--output",
                                metavar="DIR")],
    preset: Annotated[str | None, _opt("base (ECG-FM; default), large, small (laptop recipe), tiny; sets "
                                       "the options marked 'preset'.", _DATA,
                                       metavar="TEXT")] = None,
    init: Annotated[str | None, _opt("Continue pretraining from this checkpoint (ECG-FM .pt or ours); its "
                                     "architecture replaces --preset.", _DATA, metavar="TEXT")] = None,
    unsafe_pickle: Annotated[bool, _opt("Allow pickled objects in a .pt --init (runs code).", _DATA,
                                        "--unsafe-pickle")] = False,
    resume: Annotated[bool, _opt("Continue the run in -o exactly where its last checkpoint left off.", _DATA,
                                 "--resume")] = False,
    batch_size: Annotated[int | None, _opt("Segments per process per step (preset: 128, small 32; --resume: the "
                                           "run's).", _OPT, min=1, metavar="N")] = None,
    update_freq: Annotated[int | None, _opt("Steps per update (preset: 1024 segments for base/large, else 1).",
                                            _OPT, min=1, metavar="N")] = None,
    lr: Annotated[float | None, _opt("Peak learning rate (preset: 5e-5, small 1e-3).", _OPT, min=0.0,
                                     metavar="X")] = None,
    lr_schedule: Annotated[Literal["fixed", "cosine"] | None, _opt("cosine: to 0 at the run's end (preset: "
                                                                   "fixed; small cosine).", _OPT)] = None,
    warmup_updates: Annotated[int, _opt("Linear warm-up updates.", _OPT, min=0, metavar="N")] = 0,
    warmup_fraction: Annotated[float | None, _opt("Warm-up fraction of the run (preset: 0; small 0.05).",
                                                  _OPT, min=0.0, max=1.0, metavar="X")] = None,
    weight_decay: Annotated[float, _opt("AdamW weight decay.", _OPT, min=0.0, metavar="X")] = 0.01,
    adam_betas: Annotated[str, _opt("Adam beta1,beta2.", _OPT, metavar="TEXT")] = "0.9,0.98",
    adam_eps: Annotated[float, _opt("Adam epsilon.", _OPT, metavar="X")] = 1e-6,
    clip_norm: Annotated[float | None, _opt("Gradient-norm clip, 0 = off (preset: 0, small 1).", _OPT, min=0.0,
                                            metavar="X")] = None,
    dtype: Annotated[Literal["auto", "float32", "bfloat16"], _opt("auto (bfloat16 on GPU, float32 on CPU), float32, "
                                                                  "bfloat16.", _OPT, metavar="TYPE")] = "auto",
    compile: Annotated[bool, _opt("torch.compile the transformer layers (GPU; a C++ compiler on CPU).", _OPT,
                                  "--compile")] = False,
    dropout: Annotated[float | None, _opt("Dropout, attention and input dropout (preset: 0.1, small 0).", _OPT,
                                          min=0.0, max=1.0, metavar="X")] = None,
    max_updates: Annotated[int | None, _opt("Stop after this many updates.", _RUN, min=1, metavar="N")] = None,
    max_epochs: Annotated[int | None, _opt("Stop after this many epochs (200 if no limit is given).", _RUN,
                                           min=1, metavar="N")] = None,
    max_time: Annotated[str | None, _opt("Stop after this long: seconds, 90m, 2h, 1h30m.", _RUN,
                                         metavar="TIME")] = None,
    save_every: Annotated[int, _opt("Checkpoint every N updates (and at the end).", _RUN, min=0, metavar="N")] = 5000,
    keep_last: Annotated[int, _opt("Keep the last K checkpoints (0 = all).", _RUN, min=0, metavar="N")] = 3,
    log_every: Annotated[int, _opt("One log.jsonl line per N updates.", _RUN, min=1, metavar="N")] = 10,
    seed: Annotated[int, _opt("Seed of init, masks, data order.", _RUN, metavar="N")] = 1,
    device: Annotated[Literal["auto", "cpu", "cuda"], _opt("", _DIST)] = "auto",
    gpus: Annotated[int | None, _opt("GPUs on this node: one DDP process each.", _DIST, min=1, metavar="N")] = None,
    procs: Annotated[int | None, _opt("CPU processes (DDP over gloo).", _DIST, min=1, metavar="N")] = None,
    nnodes: Annotated[int, _opt("Nodes (same command on each).", _DIST, min=1, metavar="N")] = 1,
    node_rank: Annotated[int, _opt("This node's rank.", _DIST, min=0, metavar="N")] = 0,
    master_addr: Annotated[str, _opt("Address of node 0.", _DIST, metavar="TEXT")] = "127.0.0.1",
    master_port: Annotated[int | None, _opt("Port on node 0 (a free one; 29500 multi-node).", _DIST,
                                            metavar="N")] = None,
    workers: Annotated[int, _opt("Loader threads per process.", _DIST, min=1, metavar="N")] = 2,
    threads: Annotated[int | None, _opt("torch CPU threads per process (default: the cores shared among the "
                                        "processes); 1 on a loaded machine.", _DIST, min=1, metavar="N")] = None,
    worker_processes: Annotated[bool, _opt("Load in processes, not threads (same batches).", _DIST,
                                           "--worker-processes")] = False,
    shuffle_buffer: Annotated[int, _opt("Pairs shuffled together per loader (~240 kB each).", _DIST,
                                        min=1, metavar="N")] = 1024,
    mask_prob: Annotated[float, _opt("Time-mask span-start probability x span.", _LOSS, min=0.0, max=1.0,
                                     metavar="X")] = 0.65,
    mask_length: Annotated[int, _opt("Time-mask span (frames).", _LOSS, min=1, metavar="N")] = 10,
    min_masks: Annotated[int, _opt("Minimum spans per segment.", _LOSS, min=0, metavar="N")] = 2,
    num_negatives: Annotated[int | None, _opt("Distractors per masked frame (preset: 100, small 20).", _LOSS, min=1,
                                              metavar="N")] = None,
    logit_temp: Annotated[float, _opt("Contrastive logit temperature.", _LOSS, min=1e-6, metavar="X")] = 0.1,
    latent_vars: Annotated[int | None, _opt("Codebook entries per group (preset: 320, small 64).", _LOSS, min=1,
                                            metavar="N")] = None,
    latent_groups: Annotated[int, _opt("Codebook groups.", _LOSS, min=1, metavar="N")] = 2,
    final_dim: Annotated[int | None, _opt("Projection / codeword size (preset: 256, small 64).", _LOSS, min=1,
                                          metavar="N")] = None,
    latent_temp: Annotated[str | None, _opt("Gumbel temperature start,end,decay per update, or start,end,run: "
                                            "annealed across the run (preset: 2,0.5,0.999995; small 2,0.5,run).",
                                            _LOSS, metavar="TEXT")] = None,
    dropout_features: Annotated[float, _opt("Quantizer-input dropout.", _LOSS, min=0.0, max=1.0, metavar="X")] = 0.1,
    feature_grad_mult: Annotated[float, _opt("Gradient scale into the conv stack.", _LOSS, min=0.0, metavar="X")] = 0.1,
    diversity_weight: Annotated[float, _opt("Codebook diversity weight.", _LOSS, min=0.0, metavar="X")] = 0.1,
    feature_penalty_weight: Annotated[float, _opt("Feature L2 penalty weight.", _LOSS, min=0.0, metavar="X")] = 10.0,
    cmsc_weight: Annotated[float, _opt("CMSC loss weight.", _LOSS, min=0.0, metavar="X")] = 1.0,
    cmsc_temp: Annotated[float, _opt("CMSC temperature.", _LOSS, min=1e-6, metavar="X")] = 0.1,
    cmsc_gather: Annotated[bool, _opt("CMSC negatives from all ranks (reference: local).", _LOSS,
                                      "--cmsc-gather")] = False,
    rlm_prob: Annotated[float, _opt("Probability that RLM zeroes a lead.", _LOSS, min=0.0, max=1.0, metavar="X")] = 0.5,
    rlm_apply_prob: Annotated[float, _opt("Probability a segment gets RLM.", _LOSS, min=0.0, max=1.0,
                                          metavar="X")] = 1.0,
    no_cmsc: Annotated[bool, _opt("Ablation: no CMSC.", _LOSS, "--no-cmsc")] = False,
    no_rlm: Annotated[bool, _opt("Ablation: no random lead masking.", _LOSS, "--no-rlm")] = False,
    no_w2v: Annotated[bool, _opt("Ablation: no wav2vec 2.0 loss.", _LOSS, "--no-w2v")] = False,
    allow_partial: AllowPartial = False,
) -> None:
    """Pretrain an ECG-FM encoder with ECG-FM's objective (wav2vec 2.0 + CMSC + random lead masking) from segments.

    `ecgfm pretrain SEGMENTS -o RUN/ [--gpus 8]` writes RUN/checkpoint-<update>/; --resume continues a run exactly.
    Several nodes, launchers and every option: docs/commands/pretrain.md."""
    from ecgfm_cli.errors import EcgfmError

    if no_w2v and no_cmsc:
        raise EcgfmError("--no-w2v with --no-cmsc leaves no objective")
    if node_rank >= nnodes:
        raise EcgfmError(f"--node-rank {node_rank}: must be below --nnodes {nnodes}")
    betas = _floats(adam_betas, 2, "--adam-betas")
    temp = _latent_temp(latent_temp) if latent_temp is not None else {}
    seconds = parse_duration(max_time) if max_time is not None else None

    import os

    from ecgfm_cli.model.pretraining import PretrainConfig
    from ecgfm_cli.train import distributed
    from ecgfm_cli.train.pretrain import TrainOptions, prepare, train_worker

    dev, nprocs = distributed.resolve_device(device, gpus, procs)
    world = int(os.environ["WORLD_SIZE"]) if distributed.under_launcher() else nprocs * nnodes

    # options left out take their preset's value (train.pretrain.apply_recipe); `given` names those set here
    objective = _set(latent_vars=latent_vars, final_dim=final_dim, num_negatives=num_negatives, **temp)
    train = _set(preset=preset, batch_size=batch_size, update_freq=update_freq, lr=lr, lr_schedule=lr_schedule,
                 warmup_fraction=warmup_fraction, clip_norm=clip_norm, dropout=dropout)
    given = (*train, *(f"pretrain.{k}" for k in objective))
    pcfg = PretrainConfig(
        w2v=not no_w2v, cmsc=not no_cmsc, rlm=not no_rlm, mask_prob=mask_prob, mask_length=mask_length,
        min_masks=min_masks, latent_groups=latent_groups, **objective, logit_temp=logit_temp,
        dropout_features=dropout_features,
        feature_grad_mult=feature_grad_mult, diversity_weight=diversity_weight,
        features_pen_weight=feature_penalty_weight, cmsc_weight=cmsc_weight, cmsc_temp=cmsc_temp,
        cmsc_gather=cmsc_gather, rlm_prob=rlm_prob, rlm_apply_prob=rlm_apply_prob,
    )
    opts = TrainOptions(
        segments=segments, output=output, init=init, unsafe_pickle=unsafe_pickle, resume=resume, device=dev,
        dtype=("bfloat16" if dev == "cuda" else "float32") if dtype == "auto" else dtype, compile=compile,
        **train, warmup_updates=warmup_updates, weight_decay=weight_decay, adam_betas=(betas[0], betas[1]),
        adam_eps=adam_eps, max_updates=max_updates, max_epochs=max_epochs, max_time=seconds,
        save_every=save_every, keep_last=keep_last, log_every=log_every, seed=seed, workers=workers, threads=threads,
        worker_processes=worker_processes, shuffle_buffer=shuffle_buffer, pretrain=pcfg, given=given,
    )
    opts, prep = prepare(opts, world)
    distributed.launch(train_worker, (opts, prep), nprocs=nprocs, nnodes=nnodes, node_rank=node_rank,
                       master_addr=master_addr, master_port=master_port)
