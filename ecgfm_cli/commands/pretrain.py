"""``ecgfm pretrain``: W2V + CMSC + RLM pretraining on segments, on CPU, one GPU, or many (DDP)."""

from __future__ import annotations

import re
from typing import Annotated

import typer

_DATA = "Data and model"
_RUN = "Run length, checkpoints, logs"
_OPT = "Optimisation"
_DIST = "Devices and processes"
_LOSS = "Objective (defaults: ECG-FM)"


def parse_duration(text: str) -> float:
    """``"3600"``, ``"90s"``, ``"30m"``, ``"2h"``, ``"1h30m"`` -> seconds."""
    from ecgfm_cli.console import fail

    t = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", t):
        return float(t)
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([hms])", t)
    if not parts or re.sub(r"(\d+(?:\.\d+)?)\s*([hms])", "", t).strip():
        fail(f"--max-time {text!r}: expected seconds or a duration such as 90m, 2h, 1h30m")
    return sum(float(v) * {"h": 3600, "m": 60, "s": 1}[u] for v, u in parts)


def _floats(text: str, n: int, option: str) -> tuple[float, ...]:
    from ecgfm_cli.console import fail

    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != n:
        fail(f"{option} {text!r}: expected {n} comma-separated numbers")
    return values


def pretrain_command(
    segments: Annotated[str, typer.Argument(help="Segments from `ecgfm segment`: DIR of shards or FILE.parquet/.arrow.",
                                            rich_help_panel=_DATA)],
    output: Annotated[str, typer.Option("-o", "--output", help="Run directory: checkpoints, log.jsonl, run.json.",
                                        rich_help_panel=_DATA)],
    preset: Annotated[str, typer.Option(help="Model size: base (ECG-FM, 90.9 M), large, tiny (tests).",
                                        rich_help_panel=_DATA)] = "base",
    init: Annotated[str | None, typer.Option(help="Start from this checkpoint (official ECG-FM .pt or ours): "
                                             "continued pretraining. Its architecture replaces --preset.",
                                             rich_help_panel=_DATA)] = None,
    unsafe_pickle: Annotated[bool, typer.Option("--unsafe-pickle", help="Allow arbitrary pickled objects in a .pt "
                                                "--init (runs code: trusted files only).",
                                                rich_help_panel=_DATA)] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in -o exactly where its latest "
                                         "checkpoint left off (weights, optimizer, RNG, data position).",
                                         rich_help_panel=_DATA)] = False,
    batch_size: Annotated[int | None, typer.Option(help="Segments per GPU/process per step (CMSC: 2 x pairs; "
                                                   "default 128, the reference; with --resume the run's).", min=1,
                                                   rich_help_panel=_OPT)] = None,
    update_freq: Annotated[int, typer.Option(help="Gradient accumulation: steps per update.", min=1,
                                             rich_help_panel=_OPT)] = 1,
    lr: Annotated[float, typer.Option(help="Peak learning rate.", min=0.0, rich_help_panel=_OPT)] = 5e-5,
    lr_schedule: Annotated[str, typer.Option(help="fixed (reference) or cosine (to 0 at --max-updates).",
                                             rich_help_panel=_OPT)] = "fixed",
    warmup_updates: Annotated[int, typer.Option(help="Linear warm-up updates.", min=0,
                                                rich_help_panel=_OPT)] = 0,
    weight_decay: Annotated[float, typer.Option(help="Decoupled (AdamW) weight decay.", min=0.0,
                                                rich_help_panel=_OPT)] = 0.01,
    adam_betas: Annotated[str, typer.Option(help="Adam beta1,beta2.", rich_help_panel=_OPT)] = "0.9,0.98",
    adam_eps: Annotated[float, typer.Option(help="Adam epsilon.", rich_help_panel=_OPT)] = 1e-6,
    clip_norm: Annotated[float, typer.Option(help="Clip the gradient norm (0 = off, reference).", min=0.0,
                                             rich_help_panel=_OPT)] = 0.0,
    dtype: Annotated[str, typer.Option(help="auto (bfloat16 autocast on GPU, float32 on CPU), float32, bfloat16.",
                                       rich_help_panel=_OPT)] = "auto",
    compile: Annotated[bool, typer.Option("--compile/--no-compile",
                                          help="torch.compile the transformer layers (fused elementwise "
                                          "work: faster GPU steps after a one-off compilation; needs a C++ "
                                          "compiler on CPU).", rich_help_panel=_OPT)] = False,
    dropout: Annotated[float | None, typer.Option(help="Override the encoder's dropout, attention dropout and "
                                                  "input dropout (reference 0.1 each; the activation dropout "
                                                  "keeps its reference 0.0).", min=0.0, max=1.0,
                                                  rich_help_panel=_OPT)] = None,
    max_updates: Annotated[int | None, typer.Option(help="Stop after this many updates.", min=1,
                                                    rich_help_panel=_RUN)] = None,
    max_epochs: Annotated[int | None, typer.Option(help="Stop after this many epochs (default 200 when no other "
                                                   "limit is given, as the reference).", min=1,
                                                   rich_help_panel=_RUN)] = None,
    max_time: Annotated[str | None, typer.Option(help="Stop after this long: seconds or 90m, 2h, 1h30m.",
                                                 rich_help_panel=_RUN)] = None,
    save_every: Annotated[int, typer.Option(help="Checkpoint every N updates (and always at the end).", min=0,
                                            rich_help_panel=_RUN)] = 5000,
    keep_last: Annotated[int, typer.Option(help="Keep the last K checkpoints (0 = all).", min=0,
                                           rich_help_panel=_RUN)] = 3,
    log_every: Annotated[int, typer.Option(help="One log.jsonl line per N updates.", min=1,
                                           rich_help_panel=_RUN)] = 10,
    seed: Annotated[int, typer.Option(help="Seed of the model init, masks, data order and lead masks.",
                                      rich_help_panel=_RUN)] = 1,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.", rich_help_panel=_DIST)] = "auto",
    gpus: Annotated[int | None, typer.Option(help="GPUs on this node: one DDP process each (NCCL).", min=1,
                                             rich_help_panel=_DIST)] = None,
    procs: Annotated[int | None, typer.Option(help="CPU processes (DDP over gloo), e.g. to test the "
                                              "distributed path.", min=1, rich_help_panel=_DIST)] = None,
    nnodes: Annotated[int, typer.Option(help="Nodes (run the same command on each, with --node-rank).", min=1,
                                        rich_help_panel=_DIST)] = 1,
    node_rank: Annotated[int, typer.Option(help="This node's rank (0 .. nnodes-1).", min=0,
                                           rich_help_panel=_DIST)] = 0,
    master_addr: Annotated[str, typer.Option(help="Address of node 0 (multi-node).",
                                             rich_help_panel=_DIST)] = "127.0.0.1",
    master_port: Annotated[int | None, typer.Option(help="Port on node 0 (default: a free one on one node, "
                                                    "29500 on several).", rich_help_panel=_DIST)] = None,
    workers: Annotated[int, typer.Option(help="Data loader threads per GPU/process, each reading its own "
                                         "share of the row groups.", min=1, rich_help_panel=_DIST)] = 2,
    worker_processes: Annotated[bool, typer.Option("--worker-processes", help="Load in DataLoader processes "
                                                   "instead of threads (same batches; ~2x the CPU per "
                                                   "segment, for when the GIL is the bottleneck).",
                                                   rich_help_panel=_DIST)] = False,
    shuffle_buffer: Annotated[int, typer.Option(help="Items (pairs) shuffled together per loader worker; "
                                                "bounds its memory (~240 kB per pair).", min=1,
                                                rich_help_panel=_DIST)] = 1024,
    mask_prob: Annotated[float, typer.Option(help="Time-mask span-start probability x span.", min=0.0, max=1.0,
                                             rich_help_panel=_LOSS)] = 0.65,
    mask_length: Annotated[int, typer.Option(help="Time-mask span length (frames).", min=1,
                                             rich_help_panel=_LOSS)] = 10,
    min_masks: Annotated[int, typer.Option(help="Minimum spans per segment.", min=0,
                                           rich_help_panel=_LOSS)] = 2,
    num_negatives: Annotated[int, typer.Option(help="Distractors per masked frame.", min=1,
                                               rich_help_panel=_LOSS)] = 100,
    logit_temp: Annotated[float, typer.Option(help="Contrastive logit temperature.", min=1e-6,
                                              rich_help_panel=_LOSS)] = 0.1,
    latent_vars: Annotated[int, typer.Option(help="Codebook entries per group.", min=1,
                                             rich_help_panel=_LOSS)] = 320,
    latent_groups: Annotated[int, typer.Option(help="Codebook groups.", min=1, rich_help_panel=_LOSS)] = 2,
    final_dim: Annotated[int, typer.Option(help="Projection / codeword size.", min=1,
                                           rich_help_panel=_LOSS)] = 256,
    latent_temp: Annotated[str, typer.Option(help="Gumbel temperature start,end,decay per update.",
                                             rich_help_panel=_LOSS)] = "2,0.5,0.999995",
    dropout_features: Annotated[float, typer.Option(help="Dropout on the quantizer input.", min=0.0, max=1.0,
                                                    rich_help_panel=_LOSS)] = 0.1,
    feature_grad_mult: Annotated[float, typer.Option(help="Gradient scale into the conv feature extractor.",
                                                     min=0.0, rich_help_panel=_LOSS)] = 0.1,
    diversity_weight: Annotated[float, typer.Option(help="Codebook diversity loss weight.", min=0.0,
                                                    rich_help_panel=_LOSS)] = 0.1,
    feature_penalty_weight: Annotated[float, typer.Option(help="Feature L2 penalty weight.", min=0.0,
                                                          rich_help_panel=_LOSS)] = 10.0,
    cmsc_weight: Annotated[float, typer.Option(help="CMSC loss weight.", min=0.0, rich_help_panel=_LOSS)] = 1.0,
    cmsc_temp: Annotated[float, typer.Option(help="CMSC softmax temperature.", min=1e-6,
                                             rich_help_panel=_LOSS)] = 0.1,
    cmsc_gather: Annotated[bool, typer.Option("--cmsc-gather", help="CMSC negatives from all ranks (reference: "
                                              "local batch only).", rich_help_panel=_LOSS)] = False,
    rlm_prob: Annotated[float, typer.Option(help="Probability that RLM zeroes a lead.", min=0.0, max=1.0,
                                            rich_help_panel=_LOSS)] = 0.5,
    rlm_apply_prob: Annotated[float, typer.Option(help="Probability that a segment gets RLM at all.", min=0.0,
                                                  max=1.0, rich_help_panel=_LOSS)] = 1.0,
    no_cmsc: Annotated[bool, typer.Option("--no-cmsc", help="Ablation: no CMSC (single segments, every record).",
                                          rich_help_panel=_LOSS)] = False,
    no_rlm: Annotated[bool, typer.Option("--no-rlm", help="Ablation: no random lead masking.",
                                         rich_help_panel=_LOSS)] = False,
    no_w2v: Annotated[bool, typer.Option("--no-w2v", help="Ablation: no wav2vec 2.0 loss (CMSC only).",
                                         rich_help_panel=_LOSS)] = False,
) -> None:
    """Pretrain an ECG-FM encoder with ECG-FM's objective (wav2vec 2.0 + CMSC + random lead masking)
    from segments: `ecgfm pretrain SEGMENTS -o RUN/ --gpus 8`. Several nodes: run it under
    `torchrun --nnodes N ... -m ecgfm_cli pretrain ...`, or on each node with --nnodes/--node-rank/--master-addr.
    Checkpoints are RUN/checkpoint-<update>/ (kind "pretraining"); --resume continues a run exactly."""
    from ecgfm_cli.console import fail

    if lr_schedule not in ("fixed", "cosine"):
        fail(f"--lr-schedule {lr_schedule!r}: expected fixed or cosine")
    if lr_schedule == "cosine" and max_updates is None:
        fail("--lr-schedule cosine needs --max-updates (the decay ends there)")
    if dtype not in ("auto", "float32", "bfloat16"):
        fail(f"--dtype {dtype!r}: expected auto, float32 or bfloat16")
    if device not in ("auto", "cpu", "cuda"):
        fail(f"--device {device!r}: expected auto, cpu or cuda")
    if no_w2v and no_cmsc:
        fail("--no-w2v with --no-cmsc leaves no objective")
    if node_rank >= nnodes:
        fail(f"--node-rank {node_rank}: must be below --nnodes {nnodes}")
    betas = _floats(adam_betas, 2, "--adam-betas")
    temps = _floats(latent_temp, 3, "--latent-temp")
    seconds = parse_duration(max_time) if max_time is not None else None

    import os

    from ecgfm_cli.model.pretraining import PretrainConfig
    from ecgfm_cli.train import distributed
    from ecgfm_cli.train.pretrain import TrainOptions, prepare, train_worker

    dev, nprocs = distributed.resolve_device(device, gpus, procs)
    world = int(os.environ["WORLD_SIZE"]) if distributed.under_launcher() else nprocs * nnodes

    pcfg = PretrainConfig(
        w2v=not no_w2v, cmsc=not no_cmsc, rlm=not no_rlm, mask_prob=mask_prob, mask_length=mask_length,
        min_masks=min_masks, latent_vars=latent_vars, latent_groups=latent_groups, final_dim=final_dim,
        latent_temp_max=temps[0], latent_temp_min=temps[1], latent_temp_decay=temps[2],
        num_negatives=num_negatives, logit_temp=logit_temp, dropout_features=dropout_features,
        feature_grad_mult=feature_grad_mult, diversity_weight=diversity_weight,
        features_pen_weight=feature_penalty_weight, cmsc_weight=cmsc_weight, cmsc_temp=cmsc_temp,
        cmsc_gather=cmsc_gather, rlm_prob=rlm_prob, rlm_apply_prob=rlm_apply_prob,
    )
    opts = TrainOptions(
        segments=segments, output=output, preset=preset, init=init, unsafe_pickle=unsafe_pickle, resume=resume,
        device=dev,
        dtype=("bfloat16" if dev == "cuda" else "float32") if dtype == "auto" else dtype, compile=compile,
        batch_size=batch_size, update_freq=update_freq, lr=lr, lr_schedule=lr_schedule,
        warmup_updates=warmup_updates, weight_decay=weight_decay, adam_betas=(betas[0], betas[1]),
        adam_eps=adam_eps, clip_norm=clip_norm, max_updates=max_updates, max_epochs=max_epochs,
        max_time=seconds, save_every=save_every, keep_last=keep_last, log_every=log_every, seed=seed,
        workers=workers, worker_processes=worker_processes, shuffle_buffer=shuffle_buffer, dropout=dropout,
        pretrain=pcfg,
    )
    opts, prep = prepare(opts, world)
    distributed.launch(train_worker, (opts, prep), nprocs=nprocs, nnodes=nnodes, node_rank=node_rank,
                       master_addr=master_addr, master_port=master_port)
