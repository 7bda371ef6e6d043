"""What ``ecgfm pretrain`` and ``ecgfm finetune`` take, as plain data (no torch: the commands read their
defaults from here, so each default is written once)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ecgfm_cli.eval_options import SPLIT_FRACTIONS
from ecgfm_cli.model.config import PretrainConfig

#: Options whose default is the preset's (:data:`~ecgfm_cli.model.config.RECIPES`) unless given: ``TrainOptions``
#: fields, and ``PretrainConfig`` fields under ``pretrain.``. ``TrainOptions.given`` names those given.
RECIPE_OPTIONS = ("batch_size", "update_freq", "lr", "lr_schedule", "warmup_fraction", "clip_norm", "dropout",
                  "pretrain.latent_vars", "pretrain.final_dim", "pretrain.num_negatives", "pretrain.latent_temp_max",
                  "pretrain.latent_temp_min", "pretrain.latent_temp_decay", "pretrain.latent_temp_schedule")

#: Segments per rank per micro-batch when ``batch_size`` is None and no run is resumed (the reference's).
REFERENCE_BATCH_SIZE = 128

#: The run's length when none of ``max_updates``, ``max_epochs``, ``max_time`` is given (the reference's max_epoch).
DEFAULT_MAX_EPOCHS = 200

#: The rendezvous port of a multi-node run when ``--master-port`` is not given (torchrun's).
MULTI_NODE_PORT = 29500


@dataclass(frozen=True)
class LaunchOptions:
    """Where the processes of ``ecgfm pretrain`` meet (its ``--nnodes``, ``--node-rank``, ``--master-addr``,
    ``--master-port``; :func:`ecgfm_cli.train.distributed.launch` takes the same). master_port None: a single-node
    run meets through a rendezvous file, a multi-node one on :data:`MULTI_NODE_PORT`."""

    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int | None = None


@dataclass
class TrainOptions:
    """Everything ``ecgfm pretrain`` takes (CLI defaults = the ECG-FM reference, see docs/commands/pretrain.md).

    batch_size: segments per rank per micro-batch (CMSC: 2 x pairs). max_time: seconds of training, summed over
    resumes. workers: data partitions per rank, each read by a background thread (or a DataLoader process with
    worker_processes). warmup_fraction: linear warm-up over this fraction of the schedule's horizon (the run's
    length in updates, or in seconds with only ``max_time``); ``warmup_updates`` counts updates instead.
    given: the options set explicitly (field names, ``pretrain.<name>`` for PretrainConfig fields; the command
    fills it from click's parameter source): :func:`prepare` gives the :data:`RECIPE_OPTIONS` not in it the
    preset's values, and on ``--resume`` the cadence options not in it the run's.
    loader_targets (no command-line option): the W2V time masks and negatives are drawn by the loader threads
    (``model.masking.draw_targets``) rather than by the model in each forward; a run whose checkpoints do not
    record it (saved by ecgfm 0.1.0, whose model drew them) resumes with False, as it began.
    """

    segments: str
    output: str
    preset: str = "base"
    init: str | None = None
    unsafe_pickle: bool = False
    resume: bool = False
    device: str = "cpu"
    dtype: str = "float32"
    compile: bool = False
    batch_size: int | None = None  # None: REFERENCE_BATCH_SIZE, or with --resume the run's
    update_freq: int = 1
    lr: float = 5e-5
    lr_schedule: str = "fixed"
    warmup_updates: int = 0
    warmup_fraction: float = 0.0
    weight_decay: float = 0.01
    adam_betas: tuple[float, float] = (0.9, 0.98)
    adam_eps: float = 1e-6
    clip_norm: float = 0.0
    max_updates: int | None = None
    max_epochs: int | None = None
    max_time: float | None = None
    save_every: int = 5000
    keep_last: int = 3
    log_every: int = 10
    seed: int = 1
    workers: int = 2
    threads: int | None = None  # torch CPU threads per process (None: the cores shared among the processes)
    worker_processes: bool = False
    shuffle_buffer: int = 1024
    dropout: float | None = None
    loader_targets: bool = True
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    given: tuple[str, ...] = ()


@dataclass
class FinetuneOptions:
    """Everything ``ecgfm finetune`` takes (see docs/commands/finetune.md for the meaning and defaults)."""

    segments: str
    labels: str
    output: str
    init: str | None = None
    random_init: bool = False
    preset: str = "base"
    label_map: str | None = None
    targets: tuple[str, ...] | None = None
    leads: tuple[str, ...] | None = None
    epochs: int = 20
    patience: int = 5
    batch_size: int = 128
    lr: float = 5e-5
    adam_betas: tuple[float, float] = (0.9, 0.98)
    adam_eps: float = 1e-8
    seed: int = 0
    split_fractions: tuple[float, float, float] = SPLIT_FRACTIONS
    continuous: tuple[str, ...] = ()  # labels fitted as continuous targets (--continuous)
    pos_weight: str = "records"
    device: str = "cpu"
    dtype: str = "float32"
    shuffle_buffer: int = 4096
    predict_train: bool = True
    overwrite: bool = False
    unsafe_pickle: bool = False
