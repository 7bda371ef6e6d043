"""The ``ecgfm finetune`` loop: ECG-FM's downstream recipe (docs/commands/finetune.md).

Encoder from a checkpoint (or random), conv stack frozen (``feature_grad_mult`` 0: run under ``no_grad``, its
parameters excluded from the optimizer), finetuning dropouts (dropout 0, attention 0, activation 0.1, input 0),
no masking, mean pooling and a fresh ``proj`` Linear (xavier_uniform, bias 0). Binary labels: BCE with logits
and per-label ``pos_weight = (1 - p) / p`` from the train split; continuous targets: MSE on the target
standardised with the train split's mean/std. The loss is the mean over the known (non-NaN) label entries of a
batch, normalised over all ranks. Adam (0.9, 0.98), eps 1e-8, no weight decay, fixed learning rate. The model
with the best validation macro average precision (continuous-only: lowest standardised valid MSE) is kept;
training stops after ``patience`` epochs without improvement.

Training rows are segments; every segment inherits its record's labels and split. The data are streamed from
the segments artifact with :class:`~ecgfm_cli.train.data.BatchReader` (row groups read once per epoch,
shuffled at the row-group level and then within ``shuffle_buffer`` rows);
:func:`~ecgfm_cli.train.data.epoch_batches` decides every batch of every rank from (seed, epoch) alone.

Run directory (``-o RUN``)::

    RUN/checkpoint/        the best-validation classifier (kind "classifier"; continuous outputs in target units)
    RUN/predictions.parquet  per-segment predictions for every split (predictions artifact)
    RUN/log.jsonl          one JSON object per epoch
    RUN/summary.json       counts, splits, pos_weight, best epoch, notes
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from ecgfm_cli.console import info, plural
from ecgfm_cli.contract import Contract
from ecgfm_cli.errors import EcgfmError
from ecgfm_cli.io.artifacts import atomic_write_text, check_writable_dir
from ecgfm_cli.model.config import EncoderConfig
from ecgfm_cli.model.stats import Stats, per, weight
from ecgfm_cli.train.data import BatchReader, Prefetch, SegmentIndex, epoch_batches, last_use
from ecgfm_cli.train.distributed import DistContext
from ecgfm_cli.train.loop import Totals, check_finite, data_parallel, progress_bar, rank_context, train_step
from ecgfm_cli.train.options import FinetuneOptions
from ecgfm_cli.train.runs import append_jsonl, autocast, seed_everything

#: ECG-FM's finetuning dropouts (reference 1: fairseq-signals diagnosis.yaml).
FINETUNE_DROPOUTS = {"dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.1, "dropout_input": 0.0}
SPLIT_NAMES = ("train", "valid", "test")


@dataclass
class Prepared:
    """What the pre-flight checks established (picklable: travels to spawned ranks).

    Row arrays are over the USED segments (labelled, at least one known target), in artifact order:
    ``rows`` global row in ``index``; ``Y`` (N, L) float32 targets in original units (NaN = unknown);
    ``split`` (N,) split names; ``record_ids``/``patient_ids``/``segment_index`` for the predictions.
    ``pos_weight`` (L,) (1 for continuous labels), ``mean``/``std`` (L,) target standardisation (0/1 for binary).
    ``lead_scale`` (n_leads,) 1 = lead used, 0 = zeroed (``--leads``).
    """

    index: SegmentIndex
    encoder_config: EncoderConfig
    contract: Contract
    init: str | None
    init_kind: str
    labels: list[str]
    kinds: dict[str, str]
    rows: np.ndarray
    Y: np.ndarray
    split: np.ndarray
    record_ids: np.ndarray
    patient_ids: np.ndarray
    segment_index: np.ndarray
    pos_weight: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    lead_scale: np.ndarray
    leads: list[str]
    run_dir: str
    work_dir: str
    provenance: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    counts: dict[str, Any] = field(default_factory=dict)
    split_check: dict[str, Any] = field(default_factory=dict)

    @property
    def binary(self) -> np.ndarray:
        return np.array([self.kinds[lab] == "binary" for lab in self.labels], dtype=bool)


# --------------------------------------------------------------------------------------------- pre-flight


def _check_output(run: Path, overwrite: bool) -> Path:
    """The directory the run writes into: ``run`` itself when absent or empty, else (``overwrite``) a sibling
    ``.NAME.partial`` that replaces ``run`` when the run ends. Refuses a non-empty ``run`` without overwrite."""
    if run.exists() and not run.is_dir():
        raise EcgfmError(f"-o {run}: exists and is not a directory")
    check_writable_dir(run, f"the run directory {run}")
    if run.is_dir() and any(run.iterdir()):
        if not overwrite:
            raise EcgfmError(f"-o {run}: the directory is not empty (an earlier run?); pass --overwrite to replace "
                             "it when this run finishes, or choose another directory")
        if not os.access(run.parent, os.W_OK):
            raise EcgfmError(f"--overwrite: {run.parent} is not writable, so {run} cannot be replaced")
        return run.with_name(f".{run.name}.partial")
    return run


def _model_from_init(opts: FinetuneOptions, data: Contract) -> tuple[EncoderConfig, Contract | None, str]:
    """(encoder config with finetuning dropouts and a frozen conv stack, the init checkpoint's contract or None
    for a random init, the init kind). Refuses a checkpoint whose contract differs from the segments' ``data``."""
    from ecgfm_cli.contract import ContractMismatch, check_compatible
    from ecgfm_cli.model.checkpoint import CheckpointError, load_checkpoint
    from ecgfm_cli.model.config import preset

    if opts.random_init:
        try:
            cfg = preset(opts.preset)
        except ValueError as e:
            raise EcgfmError(str(e)) from e
        contract, kind = None, "random"
    else:
        assert opts.init is not None
        try:
            loaded = load_checkpoint(opts.init, allow_pickle=opts.unsafe_pickle)
        except CheckpointError as e:
            raise EcgfmError(f"--init: {e}") from e
        cfg, contract, kind = loaded.encoder_config, loaded.contract, loaded.kind
        try:
            check_compatible(data, contract)
        except ContractMismatch as e:
            raise EcgfmError(str(e).replace("than the model", f"than the --init checkpoint {opts.init}")) from e
    if cfg.in_channels != len(data.leads):
        raise EcgfmError(f"the model takes {cfg.in_channels} leads but the segments have {len(data.leads)}")
    return replace(cfg, feature_grad_mult=0.0, **FINETUNE_DROPOUTS), contract, kind


def _segment_ids(index: SegmentIndex) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(record_id, patient_id (None where missing), segment_index) of every row of ``index``, in row order."""
    from ecgfm_cli.io.tables import open_table
    from ecgfm_cli.labels import string_column

    rid, pid, seg = [], [], []
    for f in index.files:
        with open_table(f) as table:
            names = table.schema.names
            t = table.read(["record_id", "segment_index"] + (["patient_id"] if "patient_id" in names else []))
        rid.append(string_column(t, "record_id"))
        p = string_column(t, "patient_id")
        pid.append(p if p is not None else np.full(t.num_rows, None, dtype=object))
        seg.append(t.column("segment_index").to_numpy().astype(np.int32))
    return np.concatenate(rid), np.concatenate(pid), np.concatenate(seg)


def label_statistics(Y: np.ndarray, binary: np.ndarray, train: np.ndarray, record_ids: np.ndarray,
                     basis: str, labels: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str],
                                                            np.ndarray]:
    """Train-split statistics of the targets. Pure.

    Y (N, L) per segment, NaN = unknown; binary (L,) bool; train (N,) bool; record_ids (N,); labels: L names
    (for the notes). ``basis``:
    ``records`` (one row per train record, as ECG-FM's prepare_clf_labels.py), ``segments`` or ``none``
    (pos_weight 1). Returns (pos_weight (L,), mean (L,), std (L,), notes, prevalence (L,) NaN for continuous).
    pos_weight = (1 - p) / p for binary labels (1 where p is 0, 1 or undefined, with a note); mean/std of
    continuous targets over train RECORDS whatever ``basis`` (std 0 -> 1); binary labels get mean 0, std 1.
    """
    L = Y.shape[1]
    tr = np.flatnonzero(train)
    _, first = np.unique(record_ids[tr].astype(str), return_index=True)
    rec_rows = tr[np.sort(first)]
    stat_rows = tr if basis == "segments" else rec_rows
    pw, mean, std = np.ones(L), np.zeros(L), np.ones(L)
    prev = np.full(L, np.nan)
    notes: list[str] = []
    for j in range(L):
        if binary[j]:
            v = Y[stat_rows, j]
            v = v[~np.isnan(v)]
            p = float(v.mean()) if len(v) else float("nan")
            prev[j] = p
            if basis != "none" and 0 < p < 1:
                pw[j] = (1 - p) / p
            elif basis != "none":
                notes.append(f"label {labels[j]!r}: {'no train values' if np.isnan(p) else 'a single class in train'}; "
                             f"pos_weight 1")
        else:
            v = Y[rec_rows, j]
            v = v[~np.isnan(v)]
            if len(v):
                mean[j] = float(v.mean())
                std[j] = float(v.std()) or 1.0
    return pw, mean, std, notes, prev


def prepare(opts: FinetuneOptions) -> Prepared:
    """Every check that can fail, before any process group or model exists: output directory, init checkpoint,
    segments (kind, non-empty, contract vs the checkpoint's), labels (readable, targets known, joined to the
    segments), splits (patient-grouped or from the labels), leads. Fails with one clear message."""
    from ecgfm_cli.labels import load_labels, settle_label_kinds
    from ecgfm_cli.provenance import build_provenance
    from ecgfm_cli.splits import group_counts, patient_keys, record_splits, small_group_warnings, split_summary
    from ecgfm_cli.train.data import open_segments

    run = Path(opts.output)
    work = _check_output(run, opts.overwrite)
    if opts.random_init == (opts.init is not None):
        raise EcgfmError("give --init CHECKPOINT (pretrained encoder) or --random-init (baseline), exactly one")
    index = open_segments(opts.segments, None, "finetune")
    enc_cfg, model_contract, init_kind = _model_from_init(opts, index.contract)
    contract = model_contract or index.contract

    leads = list(contract.leads)
    scale = np.ones(len(leads), dtype=np.float32)
    if opts.leads:
        lower = {lead.lower(): lead for lead in leads}
        unknown = [lead for lead in opts.leads if lead.lower() not in lower]
        if unknown:
            raise EcgfmError(f"--leads: unknown lead(s) {', '.join(unknown)}; the segments have {', '.join(leads)}")
        keep = {lower[lead.lower()] for lead in opts.leads}
        scale = np.array([1.0 if lead in keep else 0.0 for lead in leads], dtype=np.float32)
        leads = [lead for lead in leads if lead in keep]

    table = load_labels(opts.labels, opts.label_map)
    notes = list(table.notes)
    labels = list(table.labels)
    if opts.targets:
        unknown = [t for t in opts.targets if t not in labels]
        if unknown:
            raise EcgfmError(f"--targets: unknown label(s) {', '.join(repr(t) for t in unknown)}; the labels are "
                             f"{', '.join(labels)}")
        labels = list(dict.fromkeys(opts.targets))
    notes += settle_label_kinds(table, labels, opts.continuous)
    cols = [table.labels.index(lab) for lab in labels]

    rid, pid, seg = _segment_ids(index)
    lidx = table.index()
    lrow = np.array([lidx.get(r, -1) for r in rid], dtype=np.int64)
    known = lrow >= 0
    n_unlabelled = int((~known).sum())
    Y_all = np.full((len(rid), len(labels)), np.nan, dtype=np.float64)
    Y_all[known] = table.values[lrow[known]][:, cols]
    has_value = ~np.isnan(Y_all).all(axis=1)
    n_no_value = int((known & ~has_value).sum())
    used = known & has_value
    if n_unlabelled:
        ex = ", ".join(list(dict.fromkeys(rid[~known]))[:3])
        notes.append(f"excluded {n_unlabelled} segments of {len(set(rid[~known]))} records without a label row "
                     f"(e.g. {ex})")
    if n_no_value:
        notes.append(f"excluded {n_no_value} segments whose record has no known value for any target")
    if not used.any():
        raise EcgfmError(f"no segment has labels: none of the segments' record_ids ({rid[0]!r}, ...) has a row with "
                         f"a known value in {opts.labels}; are these the labels of these segments?")
    rows = np.flatnonzero(used).astype(np.int64)
    rid, pid, seg, Y = rid[used], pid[used], seg[used], Y_all[used]
    if table.patient_ids is not None:
        lp = table.patient_ids[lrow[used]]
        pid = np.array([a if a not in (None, "") else b for a, b in zip(lp, pid, strict=True)], dtype=object)

    split_of, split_notes, check = record_splits(table, rid, pid, opts.split_fractions, opts.seed)
    notes += split_notes
    split = np.array([split_of[r] for r in rid], dtype=object)
    if not (split == "train").any():
        raise EcgfmError("no labelled segment is in the train split; check the split column or --split-fractions")
    if not (split == "valid").any():
        notes.append("WARNING: the valid split is empty: no model selection or early stopping (the last epoch's "
                     "model is kept)")

    kinds = {lab: table.kinds[lab] for lab in labels}
    binary = np.array([kinds[lab] == "binary" for lab in labels])
    groups = group_counts(split, patient_keys(rid, pid), rid, Y, labels, kinds)
    notes += small_group_warnings(groups, labels, kinds, ["valid", "test"], "split",
                                  "give the labels a split column sized for the cohort, or compare encoders with "
                                  "`ecgfm embed` + `ecgfm probe --folds 5` (every record scored once, out of fold)")
    pw, mean, std, stat_notes, prev = label_statistics(Y, binary, split == "train", rid, opts.pos_weight, labels)
    notes += stat_notes

    counts = {
        "segments_in_input": int(index.n_rows), "segments_used": int(len(rows)),
        "segments_without_label_row": n_unlabelled, "segments_without_known_target": n_no_value,
        "records_used": int(len(set(rid))), "splits": split_summary(split, patient_keys(rid, pid)),
        "split_counts": groups,
        "train_prevalence": {lab: (None if np.isnan(prev[j]) else round(float(prev[j]), 6))
                             for j, lab in enumerate(labels) if binary[j]},
    }
    lm_file = opts.label_map if opts.label_map and Path(opts.label_map).is_file() else None
    settings = {k: v for k, v in vars(opts).items() if k not in ("segments", "labels", "output")}
    provenance = build_provenance({"segments": opts.segments, "labels": opts.labels, "init": opts.init,
                                   "label_map": lm_file}, seed=opts.seed, extra=settings)
    return Prepared(
        index=index, encoder_config=enc_cfg, contract=contract, init=opts.init, init_kind=init_kind, labels=labels,
        kinds=kinds, rows=rows, Y=Y.astype(np.float32), split=split, record_ids=rid, patient_ids=pid,
        segment_index=seg, pos_weight=pw.astype(np.float32), mean=mean.astype(np.float32),
        std=std.astype(np.float32), lead_scale=scale, leads=leads, run_dir=str(run), work_dir=str(work),
        provenance=provenance, notes=notes, counts=counts, split_check=check,
    )


# --------------------------------------------------------------------------------------------- data


def iter_signals(prep: Prepared, batches: list[np.ndarray]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(positions, signals float32 (B, n_leads, window) with ``--leads`` applied) per batch of positions."""
    reader = BatchReader(prep.index)
    global_rows = [prep.rows[b] for b in batches]
    last = last_use(prep.index, global_rows)
    subset = bool((prep.lead_scale == 0).any())
    for step, (b, rows) in enumerate(zip(batches, global_rows, strict=True)):
        scale = np.broadcast_to(prep.lead_scale, (len(rows), len(prep.lead_scale))) if subset else None
        yield b, reader.gather(rows, last, step, scale)


# --------------------------------------------------------------------------------------------- model & loss


def build_model(prep: Prepared, seed: int, unsafe_pickle: bool = False) -> nn.Module:
    """The classifier to train: encoder weights from ``prep.init`` (any kind; a classifier's head is dropped)
    or random, a fresh ``proj`` (xavier_uniform, bias 0), conv stack frozen (``requires_grad`` off)."""
    from ecgfm_cli.model.checkpoint import encoder_state, load_checkpoint
    from ecgfm_cli.model.encoder import EcgClassifier, EcgEncoder

    torch.manual_seed(seed)
    encoder = EcgEncoder(prep.encoder_config)
    if prep.init is not None:
        loaded = load_checkpoint(prep.init, allow_pickle=unsafe_pickle)
        encoder.load_state_dict(encoder_state(loaded.kind, loaded.state_dict), strict=True)
    model = EcgClassifier(prep.encoder_config, len(prep.labels), final_dropout=0.0, encoder=encoder)
    model.encoder.feature_extractor.requires_grad_(False)
    return model


def finetune_loss(out: Tensor, y: Tensor, binary: Tensor, pos_weight: Tensor) -> tuple[Tensor, Tensor]:
    """(sum of per-entry losses, number of known entries).

    out: (B, L) logits (binary) / standardised predictions (continuous); y: (B, L) 0/1 or standardised targets,
    NaN = unknown; binary: (L,) bool; pos_weight: (L,). Binary entries: BCE with logits weighted by pos_weight
    on positives; continuous entries: squared error.
    """
    out = out.float()
    known = ~torch.isnan(y)
    t = torch.where(known, y, torch.zeros_like(y))
    bce = pos_weight * t * nn.functional.softplus(-out) + (1 - t) * nn.functional.softplus(out)
    mse = (out - t) ** 2
    per = torch.where(binary[None, :], bce, mse)
    per = torch.where(known, per, torch.zeros_like(per))
    return per.sum(), known.sum()


def _standardise(prep: Prepared, Y: np.ndarray) -> np.ndarray:
    return (Y - prep.mean) / prep.std


def folded_state(model: nn.Module, prep: Prepared) -> dict[str, Tensor]:
    """The model's state with the target standardisation folded into ``proj``: continuous outputs come out in
    the targets' original units (binary outputs stay logits), so the saved checkpoint needs no side data."""
    state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    s = torch.from_numpy(np.where(prep.binary, 1.0, prep.std).astype(np.float32))
    m = torch.from_numpy(np.where(prep.binary, 0.0, prep.mean).astype(np.float32))
    state["proj.weight"] = state["proj.weight"] * s[:, None]
    state["proj.bias"] = state["proj.bias"] * s + m
    return state


def predict_outputs(model: nn.Module, prep: Prepared, positions: np.ndarray, batch_size: int, device: torch.device,
                    dtype: str = "float32") -> np.ndarray:
    """Raw head outputs (len(positions), L) float64 for the used segments at ``positions`` (in order), from a
    copy of ``model`` (an ``EcgClassifier``, left as it is) prepared for inference as ``ecgfm embed`` runs it."""
    from ecgfm_cli.model.inference import inference_copy

    net = inference_copy(model, torch.bfloat16 if dtype == "bfloat16" else torch.float32)
    out = np.zeros((len(positions), len(prep.labels)), dtype=np.float64)
    batches = [positions[i:i + batch_size] for i in range(0, len(positions), batch_size)]
    k = 0
    with Prefetch(iter_signals(prep, batches)) as ahead, torch.inference_mode():
        for b, x in ahead:
            with autocast(device, dtype):
                z = net(torch.from_numpy(x).to(device, non_blocking=True))
            out[k:k + len(b)] = z.float().cpu().numpy()
            k += len(b)
    return out


def outputs_to_predictions(z: np.ndarray, binary: np.ndarray) -> np.ndarray:
    """Head outputs -> predictions: sigmoid for binary labels, unchanged (values) for continuous ones."""
    from ecgfm_cli.metrics import sigmoid

    return np.where(binary[None, :], sigmoid(z), z)


def _distributed_outputs(model: nn.Module, prep: Prepared, positions: np.ndarray, batch_size: int,
                         ctx: DistContext, dtype: str) -> np.ndarray:
    """Every rank predicts a contiguous share of ``positions``; all ranks get the full (len, L) result."""
    shares = np.array_split(positions, ctx.world_size)
    z = predict_outputs(model, prep, shares[ctx.rank], batch_size, ctx.device, dtype)
    if not ctx.distributed:
        return z
    parts: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(parts, z)
    return np.concatenate(parts) if parts else z


def validation_metrics(z: np.ndarray, Y: np.ndarray, prep: Prepared) -> dict[str, Any]:
    """Validation metrics from head outputs z (N, L) (logits / standardised) and targets Y (N, L) (original
    units, NaN unknown): ``loss`` (the training loss), ``macro_auroc``/``macro_auprc`` over binary labels with
    both classes (None if none), ``mse_std`` (mean over continuous labels of the standardised MSE) and per-label
    ``auroc``/``auprc``/``mse`` (original units)."""
    from ecgfm_cli.metrics import RankedScores

    binary = prep.binary
    ys = _standardise(prep, Y)
    s, n = finetune_loss(torch.from_numpy(z), torch.from_numpy(ys.astype(np.float64)), torch.from_numpy(binary),
                         torch.from_numpy(prep.pos_weight.astype(np.float64)))
    res: dict[str, Any] = {"loss": float(s / n) if n else None, "per_label": {}}
    aurocs, auprcs, mses = [], [], []
    for j, lab in enumerate(prep.labels):
        m = ~np.isnan(Y[:, j])
        if binary[j]:
            roc, ap = RankedScores(Y[m, j], z[m, j]).auroc_ap() if m.any() else (None, None)
            res["per_label"][lab] = {"auroc": roc, "auprc": ap}
            if ap is not None:
                aurocs.append(roc)
                auprcs.append(ap)
        elif m.any():
            mse_std = float(np.mean((z[m, j] - ys[m, j]) ** 2))
            res["per_label"][lab] = {"mse": mse_std * float(prep.std[j]) ** 2}
            mses.append(mse_std)
    res["macro_auroc"] = float(np.mean(aurocs)) if aurocs else None
    res["macro_auprc"] = float(np.mean(auprcs)) if auprcs else None
    res["mse_std"] = float(np.mean(mses)) if mses else None
    return res


def selection_score(metrics: dict[str, Any]) -> tuple[str, float, float] | None:
    """(criterion, score to MAXIMISE, the criterion's value): valid macro AUPRC, else the standardised valid MSE
    (score: its negative), else None. The criterion names the log.jsonl key the value is under."""
    if metrics.get("macro_auprc") is not None:
        return "valid_macro_auprc", metrics["macro_auprc"], metrics["macro_auprc"]
    if metrics.get("mse_std") is not None:
        return "valid_mse_std", -metrics["mse_std"], metrics["mse_std"]
    return None


# --------------------------------------------------------------------------------------------- the loop


def finetune_worker(opts: FinetuneOptions, prep: Prepared) -> None:
    """Entry point of every rank (see :func:`ecgfm_cli.train.distributed.launch`)."""
    with rank_context(opts.device) as ctx:  # N CPU processes share the cores (setup sets the thread count)
        run_finetune(opts, prep, ctx)


@dataclass
class FinetuneStats(Stats):
    """One batch's statistics (float64 0-d tensors): the loss summed over the known label entries, logged per
    entry, and their count."""

    WEIGHT: ClassVar[str] = "count"
    loss: Tensor = per("count")
    count: Tensor = weight()


def run_finetune(opts: FinetuneOptions, prep: Prepared, ctx: DistContext) -> dict[str, Any] | None:
    """Train, select, save, predict (every rank calls it; rank 0 writes). Returns the summary on rank 0."""
    work, run = Path(prep.work_dir), Path(prep.run_dir)
    model = build_model(prep, opts.seed, opts.unsafe_pickle).to(ctx.device)
    seed_everything(opts.seed, ctx.rank)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=opts.lr, betas=opts.adam_betas, eps=opts.adam_eps, weight_decay=0.0)
    net = data_parallel(model, ctx)
    binary_t = torch.from_numpy(prep.binary).to(ctx.device)
    pw_t = torch.from_numpy(prep.pos_weight).to(ctx.device)
    Ys = _standardise(prep, prep.Y).astype(np.float32)

    def loss_fn(net: nn.Module, batch: tuple[np.ndarray, np.ndarray], i: int) -> tuple[Tensor, FinetuneStats]:
        b, x = batch
        y = torch.from_numpy(Ys[b]).to(ctx.device, non_blocking=True)
        s, n = finetune_loss(net(torch.from_numpy(x).to(ctx.device, non_blocking=True)), y, binary_t, pw_t)
        return s, FinetuneStats(s.detach().double(), n.double())

    train_pos = np.flatnonzero(prep.split == "train")
    valid_pos = np.flatnonzero(prep.split == "valid")
    if ctx.is_main:
        _announce(work, run, opts, prep, ctx)
    best = _Best()
    stopped_by, t0 = "--epochs reached", time.monotonic()
    history: list[dict] = []
    for epoch in range(1, opts.epochs + 1):
        t_epoch = time.monotonic()
        model.train()
        batches = epoch_batches(prep.rows, prep.index.rg_start, train_pos, opts.batch_size, opts.seed, epoch,
                                ctx.rank, ctx.world_size, opts.shuffle_buffer)
        bar = progress_bar(ctx, total=len(batches), desc=f"finetune epoch {epoch}", unit="batch", leave=False)
        totals = Totals()  # the epoch's loss stays on the device: no host sync per step
        with Prefetch(iter_signals(prep, batches)) as ahead:
            for i, batch in enumerate(ahead):
                update = train_step(model, net, optimizer, [batch], loss_fn, ctx, opts.lr, None, opts.dtype)
                totals.add(update)
                if bar is not None:
                    bar.update(1)
                    if i % 20 == 0:  # (the bar's postfix reads the loss now and then)
                        bar.set_postfix(loss=f"{update.metrics()['loss']:.4f}")
        if bar is not None:
            bar.close()
        tot = totals.sums()
        cnt = tot.get("count", 0.0)
        if cnt:
            check_finite(tot["loss"] / cnt, f"finetune: epoch {epoch}", "training loss")
        entry: dict[str, Any] = {"epoch": epoch, "train_loss": tot["loss"] / cnt if cnt else None, "lr": opts.lr,
                                 "train_batches": len(batches)}
        vm = None
        if len(valid_pos):
            z = _distributed_outputs(model, prep, valid_pos, opts.batch_size, ctx, opts.dtype)
            vm = validation_metrics(z, prep.Y[valid_pos].astype(np.float64), prep)
            entry.update(valid_loss=vm["loss"], valid_macro_auroc=vm["macro_auroc"],
                         valid_macro_auprc=vm["macro_auprc"], valid_mse_std=vm["mse_std"])
        if best.consider(epoch, vm, len(valid_pos), prep, ctx):
            best.state = folded_state(model, prep)
            if ctx.is_main:
                _save(work / "checkpoint", best.state, prep, opts, best.entry)
        entry.update(best_epoch=best.entry["epoch"], seconds=round(time.monotonic() - t_epoch, 3))
        history.append(entry)
        if ctx.is_main:
            append_jsonl(work / "log.jsonl", entry)
            info("finetune: " + _epoch_line(entry))
        if opts.patience and best.stale >= opts.patience:
            stopped_by = f"early stopping (no improvement in {opts.patience} epochs)"
            break

    # Predictions from the best model exactly as saved (standardisation folded into proj).
    assert best.state is not None
    model.load_state_dict(best.state)
    want = [s for s in SPLIT_NAMES if s != "train" or opts.predict_train]
    pred_pos = np.flatnonzero(np.isin(prep.split, want))
    z = _distributed_outputs(model, prep, pred_pos, opts.batch_size, ctx, opts.dtype)
    if not ctx.is_main:
        return None
    return _finish(work, run, opts, prep, ctx, best.entry, stopped_by, history, pred_pos,
                   outputs_to_predictions(z, prep.binary), time.monotonic() - t0)


def _announce(work: Path, run: Path, opts: FinetuneOptions, prep: Prepared, ctx: DistContext) -> None:
    """Main rank: an empty run directory and log, the notes and what will run."""
    if work != run and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    (work / "log.jsonl").write_text("")
    for note in prep.notes:
        info(f"finetune: {note}")
    sp = prep.counts["splits"]
    info(f"finetune: {prep.counts['segments_used']} segments of {prep.counts['records_used']} records ("
         + ", ".join(f"{k} {v['rows']} seg / {v['patients']} patients" for k, v in sp.items())
         + f"), {len(prep.labels)} labels, init {prep.init_kind}"
         + (f" ({opts.preset} preset)" if opts.random_init else "")
         + (f" ({prep.init})" if prep.init else "") + f", {ctx.world_size} process(es) on {ctx.device} "
         f"({opts.dtype}), leads {','.join(prep.leads)}")


class _Best:
    """Model selection: the best epoch so far (``entry``: epoch, score, value, criterion, metrics), its folded
    state, and the epochs since it (``stale``)."""

    def __init__(self) -> None:
        self.entry: dict[str, Any] = {"epoch": None, "score": None, "value": None, "criterion": None,
                                      "metrics": None}
        self.state: dict[str, Tensor] | None = None
        self.stale = 0
        self.no_metric_noted = False

    def consider(self, epoch: int, vm: dict[str, Any] | None, n_valid: int, prep: Prepared,
                 ctx: DistContext) -> bool:
        """Whether ``epoch`` (valid metrics ``vm``, None without a valid split) is the new best: the first
        epoch, a higher :func:`selection_score`, or any epoch when there is no validation metric."""
        sel = selection_score(vm) if vm is not None else None
        if sel is None and n_valid and not self.no_metric_noted:  # (an empty valid split has its own warning)
            prep.notes.append(f"no validation metric: no label has both classes in the valid split "
                              f"({n_valid} segments) and no continuous target has a value there; the last "
                              "epoch is kept")
            if ctx.is_main:
                info(f"finetune: {prep.notes[-1]}")
            self.no_metric_noted = True
        if not (sel is None or self.entry["score"] is None or sel[1] > self.entry["score"]):
            self.stale += 1
            return False
        criterion, score, value = ("last epoch (no valid metric)", None, None) if sel is None else sel
        self.entry = {"epoch": epoch, "score": score, "value": value, "criterion": criterion, "metrics": vm}
        self.stale = 0
        return True


def _finish(work: Path, run: Path, opts: FinetuneOptions, prep: Prepared, ctx: DistContext, best: dict[str, Any],
            stopped_by: str, history: list[dict], pred_pos: np.ndarray, P: np.ndarray,
            elapsed: float) -> dict[str, Any]:
    """Main rank: predictions, summary, the run directory in place, the last line. Returns the summary."""
    summary = {
        "best_epoch": best["epoch"], "selection": best["criterion"], "best_score": best["value"],
        "stopped_by": stopped_by, "epochs_run": len(history), "elapsed_s": round(elapsed, 3),
        "valid": best["metrics"], "counts": prep.counts, "notes": prep.notes, "split_check": prep.split_check,
        "pos_weight": {lab: float(prep.pos_weight[j]) for j, lab in enumerate(prep.labels) if prep.binary[j]},
        "pos_weight_basis": opts.pos_weight,
        "target_standardization": {lab: {"mean": float(prep.mean[j]), "std": float(prep.std[j])}
                                   for j, lab in enumerate(prep.labels) if not prep.binary[j]},
        "leads": prep.leads, "init": prep.init, "init_kind": prep.init_kind, "world_size": ctx.world_size,
    }
    _write_predictions(work / "predictions.parquet", prep, pred_pos, P, summary)
    atomic_write_text(work / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")
    if work != run:
        from ecgfm_cli.io.artifacts import replace_dir

        replace_dir(work, run)
    info(f"finetune: {plural(len(history), 'epoch')} ({stopped_by}); best epoch {best['epoch']} by {best['criterion']}"
         + (f" = {best['value']:.4f}" if best["value"] is not None else "")
         + f"; {len(pred_pos)} predictions; {summary['elapsed_s']:.0f} s -> {run}/")
    return summary


def _epoch_line(e: dict) -> str:
    def f(v: Any) -> str:
        return "-" if v is None else f"{v:.4f}"

    return (f"epoch {e['epoch']} train loss {f(e['train_loss'])} valid loss {f(e.get('valid_loss'))} "
            f"AUROC {f(e.get('valid_macro_auroc'))} AUPRC {f(e.get('valid_macro_auprc'))}"
            + (f" MSE(std) {f(e.get('valid_mse_std'))}" if e.get("valid_mse_std") is not None else "")
            + f" best {e['best_epoch']} ({e['seconds']:.1f} s)")


def _save(path: Path, state: dict[str, Tensor], prep: Prepared, opts: FinetuneOptions, best: dict) -> None:
    from ecgfm_cli.model.checkpoint import make_config, save_checkpoint

    config = make_config(
        "classifier", prep.encoder_config, heads={"n_labels": len(prep.labels), "final_dropout": 0.0},
        contract=prep.contract, labels=prep.labels, label_kinds=prep.kinds,
        source={"command": "ecgfm finetune", "init": prep.init, "init_kind": prep.init_kind,
                "epoch": best["epoch"], "selection": best["criterion"], "score": best["value"],
                "input_leads": prep.leads, "outputs": {lab: ("logit" if prep.kinds[lab] == "binary" else "value")
                                                       for lab in prep.labels},
                "segments": str(opts.segments), "labels": str(opts.labels), "label_map": opts.label_map,
                "seed": opts.seed, "lr": opts.lr},
    )
    save_checkpoint(path, state, config)


def _write_predictions(path: Path, prep: Prepared, pos: np.ndarray, P: np.ndarray, summary: dict) -> None:
    from ecgfm_cli.io.artifacts import write_table
    from ecgfm_cli.probe import predictions_table

    meta = {
        "ecgfm.provenance": json.dumps(prep.provenance, default=str),
        "ecgfm.contract": prep.contract.to_json(),
        "ecgfm.leads": json.dumps(prep.leads),
        "ecgfm.model": json.dumps({"checkpoint": str(Path(prep.run_dir) / "checkpoint"), "init": prep.init,
                                   "init_kind": prep.init_kind, "best_epoch": summary["best_epoch"]}),
        "ecgfm.finetune": json.dumps({k: summary[k] for k in ("best_epoch", "selection", "counts", "notes",
                                                              "split_check", "pos_weight", "pos_weight_basis",
                                                              "target_standardization")}, default=str),
    }
    write_table(predictions_table(prep.record_ids[pos], prep.patient_ids[pos], prep.segment_index[pos],
                                  prep.split[pos], P, prep.labels, prep.kinds, meta), Path(path), "predictions")
