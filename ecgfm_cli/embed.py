"""``ecgfm embed``: segments -> one mean-pooled ECG-FM embedding per 5 s segment (or per record).

Layers of this module, pure at the core, I/O at the edges:

* :func:`prepare` - the model it runs: the checkpoint's ``EcgEncoder`` with its leaves swapped in place for
  fused inference forms (:func:`~ecgfm_cli.model.inference.prepare_for_inference`); its ``embed`` is the
  encoder's own, faster on CPU.
* :func:`embed_batch` - (B, C, L) numpy -> (B, D) float32 numpy embeddings (:func:`queue_batch`: the same,
  left on the device).
* :func:`run_embed` - streams a ``segments`` artifact through the model into an ``embeddings`` artifact,
  optionally fanned out over several processes (one per GPU with ``--gpus``; ``procs`` on CPU).

Shapes: B batch, C leads, L samples per segment, T tokens (L // 16), D embed_dim (768 for base).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from ecgfm_cli.contract import Contract, canonical_lead
from ecgfm_cli.errors import EcgfmError
from ecgfm_cli.io.tables import open_table
from ecgfm_cli.model.config import EncoderConfig
from ecgfm_cli.model.encoder import EcgEncoder
from ecgfm_cli.model.inference import prepare_for_inference

#: Input columns read from a segments artifact.
INPUT_COLUMNS = ["record_id", "patient_id", "segment_index", "signal", "lead_present"]
#: How many offending segments an error message lists.
SHOW = 5


class EmbedError(EcgfmError, ValueError):
    """Input that cannot be embedded; the message is one line for the user."""


# ============================================================================ models and batches


@dataclass(frozen=True)
class ModelSpec:
    """Which encoder to embed with (picklable: worker processes rebuild the model from it).

    checkpoint: our checkpoint dir or an official ``.pt``; or None with ``preset`` + ``seed`` for a
    random-init encoder (the probe baseline). allow_pickle: passed to ``load_checkpoint``.
    """

    checkpoint: str | None = None
    allow_pickle: bool = False
    preset: str | None = None
    seed: int = 0


@dataclass
class LoadedModel:
    """An encoder in eval mode with the contract it expects and a JSON-ready description of it."""

    encoder: EcgEncoder
    contract: Contract
    meta: dict[str, Any]

    @property
    def cfg(self) -> EncoderConfig:
        return self.encoder.cfg


def load_model(spec: ModelSpec) -> LoadedModel:
    """Build the encoder of ``spec`` (weights on CPU, eval mode, dropouts 0).

    Raises :class:`~ecgfm_cli.model.checkpoint.CheckpointError` for a bad checkpoint.
    """
    from ecgfm_cli.model.checkpoint import build_encoder, load_checkpoint
    from ecgfm_cli.model.config import preset

    if spec.checkpoint is None:
        cfg = preset(spec.preset or "base").with_dropouts(0.0)
        torch.manual_seed(spec.seed)
        encoder = EcgEncoder(cfg)
        contract = Contract()
        meta = {"checkpoint": None, "kind": "random-init", "preset": spec.preset or "base", "seed": spec.seed,
                "encoder": cfg.to_dict(), "source": {"format": "random-init"}}
    else:
        loaded = load_checkpoint(spec.checkpoint, allow_pickle=spec.allow_pickle)
        encoder = build_encoder(loaded)
        contract = loaded.contract
        meta = {"checkpoint": str(Path(spec.checkpoint).resolve()), "kind": loaded.kind,
                "encoder": loaded.encoder_config.to_dict(), "source": loaded.config.get("source") or {}}
    return LoadedModel(encoder.eval().requires_grad_(False), contract, meta)


def torch_dtype(name: str) -> torch.dtype:
    """``float32`` / ``bfloat16`` -> torch dtype."""
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]
    except KeyError:
        raise EmbedError(f"--dtype {name!r}: expected float32 or bfloat16") from None


def prepare(model: LoadedModel, device: str, dtype: str) -> EcgEncoder:
    """``model.encoder`` prepared for inference in place (weights pre-cast for ``dtype``), on ``device``.
    Consumes ``model``: its encoder is the returned module."""
    return prepare_for_inference(model.encoder, torch_dtype(dtype)).to(device)


def embed_batch(net: EcgEncoder, x: np.ndarray, device: str = "cpu", dtype: str = "float32",
                lead_mask: np.ndarray | None = None) -> np.ndarray:
    """(B, C, L) signals (float32 or float16 numpy) -> (B, D) float32 embeddings.

    ``lead_mask`` (C,) bool: leads where it is False are zeroed first. bfloat16 runs under
    ``torch.autocast`` (matmuls in bfloat16, block-0 GroupNorm and the final mean in float32).
    """
    return queue_batch(net, x, device, dtype, lead_mask).cpu().numpy()


def queue_batch(net: EcgEncoder, x: np.ndarray, device: str = "cpu", dtype: str = "float32",
                lead_mask: np.ndarray | None = None) -> Tensor:
    """:func:`embed_batch` without waiting for the result: (B, D) float32 on ``device`` (on a GPU, reading it
    with ``.cpu()`` is what waits, so the host can prepare the next batch meanwhile)."""
    dev = torch.device(device)
    if not x.flags.writeable:  # zero-copy Arrow views are read-only; torch wants writable memory
        x = np.array(x, dtype=np.float32)
    t = torch.from_numpy(np.ascontiguousarray(x)).to(dev, non_blocking=True).float()
    if lead_mask is not None and not lead_mask.all():
        t = t * torch.from_numpy(lead_mask.astype(np.float32)).to(dev)[None, :, None]
    with torch.inference_mode(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
        return net.embed(t)


def parse_leads(spec: str | None, contract: Contract) -> tuple[list[str], np.ndarray]:
    """``"I,II"`` -> (lead names kept, in contract order; (C,) bool mask). None keeps every lead."""
    names = list(contract.leads)
    if spec is None:
        return names, np.ones(len(names), dtype=bool)
    wanted = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        lead = canonical_lead(item)
        if lead is None or lead not in names:
            raise EmbedError(f"--leads: {item!r} is not one of the model's leads ({', '.join(names)})")
        wanted.append(lead)
    if not wanted:
        raise EmbedError("--leads: give at least one lead, e.g. --leads I,II")
    mask = np.array([n in wanted for n in names])
    return [n for n in names if n in wanted], mask


# ============================================================================ checking the input


def check_input(schema: pa.Schema, metadata: dict[str, str], model: LoadedModel) -> list[str]:
    """Refuse segments the model cannot take: a different preprocessing contract, or a segment shape
    other than (in_channels, contract window). Returns warnings (e.g. no contract in the metadata)."""
    from ecgfm_cli.contract import ContractMismatch, check_compatible
    from ecgfm_cli.io.schema import segments_contract

    warnings = []
    missing = [c for c in INPUT_COLUMNS if c not in schema.names]
    if missing:
        raise EmbedError(f"the input is not a segments artifact: no column(s) {', '.join(missing)}")
    try:
        contract = segments_contract(metadata)
    except (ValueError, TypeError) as e:
        raise EmbedError(f"unreadable ecgfm.contract metadata in the segments ({e})") from e
    if contract is None:
        warnings.append("the segments carry no ecgfm.contract metadata; only their shape is checked")
    else:
        try:
            check_compatible(contract, model.contract)
        except ContractMismatch as e:
            raise EmbedError(str(e)) from e
    n_leads = schema.field("lead_present").type.list_size
    size = schema.field("signal").type.list_size
    window = size // n_leads if n_leads > 0 else 0
    want = (model.cfg.in_channels, model.contract.window)
    if (n_leads, window) != want or n_leads * window != size:
        raise EmbedError(f"segments are {n_leads} leads x {window} samples, the model takes {want[0]} leads x "
                         f"{want[1]} samples (re-run `ecgfm segment` with the model's --sample-rate/--seconds)")
    return warnings


def embeddings_schema(dim: int) -> pa.Schema:
    """The ``embeddings`` artifact's columns (docs/artifacts.md)."""
    return pa.schema([
        ("record_id", pa.string()),
        ("patient_id", pa.string()),
        ("segment_index", pa.int32()),
        pa.field("embedding", pa.list_(pa.field("item", pa.float32(), nullable=False), dim), nullable=False),
    ])


def embeddings_batch(record_id: list, patient_id: list, segment_index: np.ndarray, emb: np.ndarray,
                     schema: pa.Schema) -> pa.RecordBatch:
    """Arrow batch from per-row ids and an (N, D) float32 array (no per-value Python work)."""
    n, d = emb.shape
    values = pa.array(np.ascontiguousarray(emb, dtype=np.float32).ravel(), type=pa.float32())
    return pa.RecordBatch.from_arrays([
        pa.array(record_id, type=pa.string()),
        pa.array(patient_id, type=pa.string()),
        pa.array(np.asarray(segment_index, dtype=np.int32), type=pa.int32()),
        pa.FixedSizeListArray.from_arrays(values, type=schema.field("embedding").type),
    ], schema=schema)


# ============================================================================ streaming


@dataclass(frozen=True)
class EmbedOptions:
    """How to embed. pool: ``segment`` (one row per segment) or ``record`` (mean of a record's segment
    embeddings, segment_index -1). leads: ``"I,II"`` keeps only those leads (others zeroed), None = all.
    nan: ``refuse`` (error listing offending segments) or ``skip`` (drop them, counted). threads: torch
    intra-op threads per process (None: torch's default, or cores / processes when fanned out)."""

    batch_size: int = 32
    device: str = "cpu"
    dtype: str = "float32"
    pool: str = "segment"
    leads: str | None = None
    nan: str = "refuse"
    threads: int | None = None


@dataclass
class EmbedSummary:
    segments: int = 0
    rows: int = 0
    nan_skipped: int = 0
    nan_examples: list[str] = field(default_factory=list)
    dim: int = 0
    files: list[str] = field(default_factory=list)

    def merge(self, other: dict) -> None:
        self.segments += other["segments"]
        self.rows += other["rows"]
        self.nan_skipped += other["nan_skipped"]
        self.nan_examples = (self.nan_examples + other["nan_examples"])[:SHOW]
        self.dim = self.dim or other["dim"]
        self.files += other["files"]


def iter_rows(reader, start: int = 0, stop: int | None = None, columns: list[str] | None = None,
              batch_size: int = 256) -> Iterator[pa.RecordBatch]:
    """Rows ``[start, stop)`` of an artifact (default columns: :data:`INPUT_COLUMNS`), in order, as record
    batches of at most ``batch_size`` rows; row groups outside the range are not read."""
    yield from reader.iter_rows(start, stop, columns or INPUT_COLUMNS, batch_size)


def rebatch(batches: Iterator[pa.RecordBatch], size: int) -> Iterator[pa.Table]:
    """Re-chunk a stream of batches into tables of exactly ``size`` rows (the last one may be shorter)."""
    pending: list[pa.RecordBatch] = []
    n = 0
    for b in batches:
        while b.num_rows:
            take = min(size - n, b.num_rows)
            pending.append(b.slice(0, take))
            n += take
            b = b.slice(take)
            if n == size:
                yield pa.Table.from_batches(pending).combine_chunks()
                pending, n = [], 0
    if n:
        yield pa.Table.from_batches(pending).combine_chunks()


class RecordPooler:
    """Averages consecutive segment embeddings of the same record (float64 accumulation).

    A record whose segments are not contiguous in the input raises :class:`EmbedError` instead of
    silently giving two rows (segment artifacts keep a record's windows together).
    """

    def __init__(self) -> None:
        self.current: str | None = None
        self.patient: str | None = None
        self.total: np.ndarray | None = None
        self.count = 0
        self.finished: set[str] = set()

    def add(self, record_ids: list[str], patient_ids: list, emb: np.ndarray) -> list[tuple[str, Any, np.ndarray]]:
        out = []
        for rid, pid, e in zip(record_ids, patient_ids, emb, strict=True):
            if rid != self.current:
                out += self.flush()
                if rid in self.finished:
                    raise EmbedError(f"--pool record: the segments of record {rid!r} are not contiguous in the "
                                     "input (embed each record's segments together, as `ecgfm segment` writes them)")
                self.current, self.patient, self.total, self.count = rid, pid, np.zeros(e.shape, np.float64), 0
            self.total += e
            self.count += 1
        return out

    def flush(self) -> list[tuple[str, Any, np.ndarray]]:
        if self.current is None:
            return []
        row = (self.current, self.patient, (self.total / self.count).astype(np.float32))
        self.finished.add(self.current)
        self.current, self.total, self.count = None, None, 0
        return [row]


def embed_rows(batches: Iterator[pa.Table], net: EcgEncoder, opts: EmbedOptions, lead_mask: np.ndarray,
               schema: pa.Schema, write, summary: EmbedSummary) -> None:
    """Embed every row of ``batches`` and pass ``embeddings`` record batches to ``write``, in input order.

    Segments holding NaN/Inf are refused (:class:`EmbedError` naming the first few) or, with
    ``opts.nan == "skip"``, dropped and counted in ``summary``.
    """
    from ecgfm_cli.io.schema import segment_signals

    pooler = RecordPooler() if opts.pool == "record" else None

    def finish(queued: Tensor, rid: list, pid: list, seg: np.ndarray) -> None:
        emb = queued.cpu().numpy()
        summary.dim = emb.shape[1]
        if pooler is None:
            write(embeddings_batch(rid, pid, seg, emb, schema))
            summary.rows += len(rid)
        else:
            _write_pooled(pooler.add(rid, pid, emb), schema, write, summary)

    pending = None  # the batch on the device: read only after the next one is queued behind it
    for table in batches:
        x = segment_signals(table)
        rid = table.column("record_id").to_pylist()
        pid = table.column("patient_id").to_pylist()
        seg = table.column("segment_index").to_numpy(zero_copy_only=False).astype(np.int32)
        summary.segments += len(rid)
        bad = ~np.isfinite(x).all(axis=(1, 2))
        if bad.any():
            where = np.flatnonzero(bad)
            examples = [f"{rid[i]} segment {seg[i]}" for i in where[:SHOW]]
            if opts.nan != "skip":
                raise EmbedError(f"{len(where)} segment(s) of a batch hold NaN/Inf, e.g. {'; '.join(examples)} "
                                 "(re-segment with --nan zero, or pass --nan skip to leave them out)")
            summary.nan_skipped += len(where)
            summary.nan_examples = (summary.nan_examples + examples)[:SHOW]
            keep = np.flatnonzero(~bad)
            x, seg = x[keep], seg[keep]
            rid, pid = [rid[i] for i in keep], [pid[i] for i in keep]
            if not len(keep):
                continue
        queued = queue_batch(net, x, opts.device, opts.dtype, lead_mask)
        if pending is not None:
            finish(*pending)
        pending = (queued, rid, pid, seg)
    if pending is not None:
        finish(*pending)
    if pooler is not None:
        _write_pooled(pooler.flush(), schema, write, summary)


def _write_pooled(rows: list, schema: pa.Schema, write, summary: EmbedSummary) -> None:
    if rows:
        write(embeddings_batch([r[0] for r in rows], [r[1] for r in rows], np.full(len(rows), -1, np.int32),
                               np.stack([r[2] for r in rows]), schema))
        summary.rows += len(rows)


class NpzCollector:
    """Collects ``embeddings`` batches in memory and writes them as one NPZ (NPZ cannot be streamed)."""

    def __init__(self) -> None:
        self.batches: list[pa.RecordBatch] = []

    def write(self, batch: pa.RecordBatch) -> None:
        self.batches.append(batch)

    def save(self, path: Path, dim: int, meta: dict[str, Any]) -> None:
        from ecgfm_cli.io.artifacts import atomic_path

        rid: list = []
        pid: list = []
        seg, emb = [], []
        for b in self.batches:
            rid += b.column("record_id").to_pylist()
            pid += ["" if p is None else p for p in b.column("patient_id").to_pylist()]
            seg.append(b.column("segment_index").to_numpy())
            n = b.num_rows
            emb.append(b.column("embedding").values.to_numpy(zero_copy_only=False)[: n * dim].reshape(n, dim))
        arrays = {
            "record_id": np.array(rid, dtype=str),
            "patient_id": np.array(pid, dtype=str),
            "segment_index": np.concatenate(seg).astype(np.int32) if seg else np.zeros(0, np.int32),
            "embedding": np.concatenate(emb).astype(np.float32) if emb else np.zeros((0, dim), np.float32),
            "__meta__": np.array(json.dumps(meta, sort_keys=True)),
        }
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, **arrays)


# ============================================================================ running a whole input


def plan_ranges(reader, n: int, align_records: bool) -> list[tuple[int, int]]:
    """Split the input's rows into ``n`` contiguous ranges of about equal size; with ``align_records`` a
    boundary moves forward to the next record start (reads only the ``record_id`` column). A function of the
    input alone: the ``N`` jobs of ``embed --shard I/N`` each compute the same ranges."""
    total = reader.num_rows()
    if total is None:
        raise EmbedError("several processes need a file or directory input (a stdin stream cannot be split)")
    return split_range(reader, 0, total, n, align_records)


def split_range(reader, start: int, stop: int, n: int, align_records: bool, grain: int = 1) -> list[tuple[int, int]]:
    """Split input rows ``[start, stop)`` into ``n`` contiguous ranges of about equal size (see
    :func:`plan_ranges`); an aligned boundary that runs past ``stop`` becomes ``stop`` (an empty range). Without
    ``align_records``, boundaries fall on multiples of ``grain`` rows after ``start``."""
    total = stop - start
    steps = -(-total // grain)  # whole grains (the last may be short), shared out evenly
    cuts = [start + min(total, grain * round(steps * k / n)) for k in range(n + 1)]
    if align_records and n > 1 and total > 0:
        targets = iter(cuts[1:-1])
        target = next(targets)
        aligned = [start]
        pos, prev = start, None
        for b in iter_rows(reader, start, stop, ["record_id"], batch_size=65536):
            ids = b.column("record_id").to_pylist()
            for i, rid in enumerate(ids):
                while target is not None and pos + i >= target and rid != prev:
                    aligned.append(pos + i)
                    target = next(targets, None)
                prev = rid
            pos += len(ids)
            if target is None:
                break
        aligned += [stop] * (n + 1 - len(aligned))
        cuts = aligned
    return [(cuts[k], cuts[k + 1]) for k in range(n)]


@dataclass(frozen=True)
class _Job:
    """Everything one worker process needs (pickled by torch.multiprocessing.spawn)."""

    input: str
    ranges: list[tuple[int, int]]
    spec: ModelSpec
    opts: EmbedOptions
    devices: list[str]
    shard_dir: str
    status_dir: str
    schema_meta: dict[str, str]
    dim: int
    #: ``embed --shard I/N`` with several processes: every process writes parts of this one shard (part numbers
    #: ``rank * PARTS_PER_PROCESS + k``, so the sorted names keep the input order); the caller marks it done.
    shard: tuple[int, int] | None = None


#: Part-number stride between the processes of one ``--shard`` job (5-digit part numbers: up to 99 processes).
PARTS_PER_PROCESS = 1000


def _worker(rank: int, job: _Job) -> None:
    """One process of a fanned-out run: embeds ``job.ranges[rank]`` into shard ``rank`` of ``shard_dir``."""
    from ecgfm_cli.io.artifacts import ArtifactWriter, Output, atomic_path, write_done_marker

    n = len(job.ranges)
    shard = job.shard or (rank, n)
    summary = EmbedSummary()
    result: dict[str, Any]
    writer = None
    try:
        opts = _with(job.opts, device=job.devices[rank])
        if opts.threads:
            torch.set_num_threads(opts.threads)
        if opts.device.startswith("cuda"):
            torch.cuda.set_device(torch.device(opts.device))
        from ecgfm_cli.io.artifacts import open_artifact

        reader = open_artifact(job.input, "segments", "embed", allow_partial=True)  # the parent checked it
        model = load_model(job.spec)
        net = prepare(model, opts.device, opts.dtype)
        _, mask = parse_leads(opts.leads, model.contract)
        schema = embeddings_schema(job.dim).with_metadata(job.schema_meta)
        writer = ArtifactWriter(Output("dir", Path(job.shard_dir)), "embeddings", schema, shard=shard,
                                row_group_rows=1024, _part=rank * PARTS_PER_PROCESS if job.shard else 0)
        start, stop = job.ranges[rank]
        batches = rebatch(iter_rows(reader, start, stop, batch_size=opts.batch_size), opts.batch_size)
        if rank == 0:
            from ecgfm_cli.console import progress

            batches = progress(batches, "embed", total=stop - start, unit="segment", size=len)
        embed_rows(batches, net, opts, mask, schema, writer.write, summary)
        writer.close(write_empty=job.shard is None)
        if job.shard is None:
            write_done_marker(Path(job.shard_dir), shard, {"kind": "embeddings", "shard": list(shard),
                                                           "rows": summary.rows, "segments": summary.segments})
        summary.files = [str(f) for f in writer.files]
        result = {"ok": True, **asdict(summary)}
    except EcgfmError as e:
        if writer is not None:
            writer.abort()
        result = {"ok": False, "error": str(e)}
    with atomic_path(Path(job.status_dir) / f"rank{rank:05d}.json") as tmp:
        tmp.write_text(json.dumps(result))


def _with(opts: EmbedOptions, **changes: Any) -> EmbedOptions:
    return EmbedOptions(**{**asdict(opts), **changes})


def run_embed(input: str, reader, output, spec: ModelSpec, model: LoadedModel, opts: EmbedOptions,
              meta: dict[str, Any], gpus: int = 0, procs: int = 1, shard: tuple[int, int] = (0, 1)) -> EmbedSummary:
    """Embed the segments of ``reader`` (opened from ``input``) into ``output`` (an ``Output`` of format
    ``dir``, ``parquet`` or ``npz``). ``meta``: ``{"contract", "model", "provenance", "leads"}`` stored
    with the output. ``gpus`` > 0 runs one process per GPU (cuda:0..), else ``procs`` CPU processes;
    several processes write one shard each (order = input order) and a file output is merged from them.
    ``shard`` ``(I, N)`` with N > 1 (``embed --shard``, a ``dir`` output already prepared by
    :func:`~ecgfm_cli.io.artifacts.start_shard`): embed only part I of the input's N parts (:func:`run_shard`).

    Consumes ``model``: its encoder is prepared for inference in place (:func:`prepare`), or, with several
    processes, its weights are released (moved to the meta device) before they start (each loads its own).
    """
    from ecgfm_cli.io.artifacts import ArtifactWriter, Output, check_output_kind, write_done_marker

    dim = model.cfg.embed_dim
    schema_meta = {f"ecgfm.{k}": v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in meta.items()}
    schema = embeddings_schema(dim).with_metadata(schema_meta)
    nproc = gpus if gpus > 0 else procs
    if shard[1] > 1:
        return run_shard(input, reader, output, spec, model, opts, meta, schema, nproc, gpus > 0, shard)
    if output.format == "dir":
        check_output_kind(output.path, "embeddings", "embed")
        _clear_embeddings(output.path)
    summary = EmbedSummary(dim=dim)

    if nproc <= 1:
        opts1 = opts
        if opts.threads:
            torch.set_num_threads(opts.threads)
        net = prepare(model, opts.device, opts.dtype)
        _, mask = parse_leads(opts.leads, model.contract)
        total = reader.num_rows()
        batches = rebatch(reader.iter_batches(INPUT_COLUMNS, batch_size=opts.batch_size), opts.batch_size)
        from ecgfm_cli.console import progress

        batches = progress(batches, "embed", total=total or None, unit="segment", size=len)
        if output.format == "npz":
            sink = NpzCollector()
            embed_rows(batches, net, opts1, mask, schema, sink.write, summary)
            _check_rows(summary)
            sink.save(output.path, dim, meta)
            summary.files = [str(output.path)]
            return summary
        writer = ArtifactWriter(output, "embeddings", schema, row_group_rows=1024)
        try:
            embed_rows(batches, net, opts1, mask, schema, writer.write, summary)
            _check_rows(summary)
            writer.close()
        except BaseException:
            writer.abort()
            for f in writer.files:
                f.unlink(missing_ok=True)
            raise
        if output.format == "dir":
            write_done_marker(output.path, (0, 1), {"kind": "embeddings", "shard": [0, 1], "rows": summary.rows,
                                                    "segments": summary.segments})
        summary.files = [str(f) for f in writer.files]
        return summary

    model.encoder.to("meta")  # each worker process loads its own
    ranges = plan_ranges(reader, nproc, align_records=opts.pool == "record")
    if gpus > 0:
        devices = [f"cuda:{k}" for k in range(nproc)]
    else:
        devices = ["cpu"] * nproc
        if opts.threads is None:
            opts = _with(opts, threads=max(1, (os.cpu_count() or 1) // nproc))
    parent = output.path if output.format == "dir" else output.path.parent
    parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".embed-", dir=parent))
    shard_dir = output.path if output.format == "dir" else work / "shards"
    try:
        job = _Job(input, ranges, spec, opts, devices, str(shard_dir), str(work), schema_meta, dim)
        torch.multiprocessing.spawn(_worker, args=(job,), nprocs=nproc, join=True)
        for rank in range(nproc):
            status = work / f"rank{rank:05d}.json"
            result = json.loads(status.read_text()) if status.exists() else {"ok": False, "error": "no result"}
            if not result["ok"]:
                raise EmbedError(result["error"])
            result.pop("ok")
            summary.merge(result)
        _check_rows(summary)
        if output.format != "dir":
            parts = sorted(Path(shard_dir).glob("embeddings-*.parquet"))
            summary.files = [str(output.path)]
            if output.format == "npz":
                sink = NpzCollector()
                for p in parts:
                    with open_table(p) as t:
                        for b in t.iter_batches(batch_size=4096):
                            sink.write(b)
                sink.save(output.path, dim, meta)
            else:
                merge_parquet(parts, Output("parquet", output.path), schema)
    except BaseException:
        if output.format == "dir":
            _clear_embeddings(output.path)
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return summary


#: What every shard of one embeddings artifact must share (compared through the shards' done markers).
_SHARED_SETTINGS = ("model", "pool", "leads")


def check_shard_count(directory: Path, shard: tuple[int, int]) -> None:
    """Refuse (:class:`EmbedError`) ``--shard I/N`` into a directory whose files belong to another number of
    shards (finished, running or interrupted): they would never form one artifact."""
    import re

    i, n = shard
    if not directory.is_dir():
        return
    for p in sorted(directory.iterdir()):
        m = re.search(r"-s(\d{5})of(\d{5})", p.name)
        if m and int(m[2]) != n:
            raise EmbedError(f"{directory} holds embeddings split into {int(m[2])} shard(s) ({p.name}); --shard "
                             f"{i}/{n} writes one of {n}: use the same N for every shard, or another directory")


def _same_key(value: Any, key: str) -> str:
    """What must agree between shards: the model's description with its checkpoint path cut to the name (a copy
    of the checkpoint on a node-local disk is the same model)."""
    if key == "model" and isinstance(value, dict) and value.get("checkpoint"):
        value = {**value, "checkpoint": Path(value["checkpoint"]).name}
    return json.dumps(value, sort_keys=True)


def check_sibling_shards(directory: Path, shard: tuple[int, int], input_rows: int, meta: dict[str, Any],
                         batch_size: int | None = None) -> None:
    """Refuse (:class:`EmbedError`) to add ``shard`` to ``directory`` when a finished shard there was split into
    another number of shards, cut from an input with another row count, or embedded with another model, pooling
    or lead subset: the N shards of an artifact must be N parts of one job."""

    i, n = shard
    check_shard_count(directory, shard)
    for marker in sorted(directory.glob("_done-*.json")):
        try:
            done = json.loads(marker.read_text())
        except (OSError, ValueError):
            continue  # an unreadable marker is reported by the reader, which names it
        other = done.get("shard") or [None, n]
        if done.get("input_rows") not in (None, input_rows):
            raise EmbedError(f"{directory}: shard {other[0]}/{n} was embedded from {done['input_rows']} segments, "
                             f"this input holds {input_rows}: embed every shard from the same segments")
        if batch_size is not None and done.get("batch_size") not in (None, batch_size):
            raise EmbedError(f"{directory}: shard {other[0]}/{n} was embedded with --batch-size {done['batch_size']}"
                             f" (--pool segment cuts the shards at multiples of it): pass --batch-size "
                             f"{done['batch_size']} to this shard too")
        for key in _SHARED_SETTINGS:
            if key in done and _same_key(done[key], key) != _same_key(meta.get(key), key):
                raise EmbedError(f"{directory}: shard {other[0]}/{n} was embedded with another {key} "
                                 f"({json.dumps(done[key], sort_keys=True)[:120]}); every shard needs the same")


def run_shard(input: str, reader, output, spec: ModelSpec, model: LoadedModel, opts: EmbedOptions,
              meta: dict[str, Any], schema: pa.Schema, nproc: int, on_gpus: bool,
              shard: tuple[int, int]) -> EmbedSummary:
    """``embed --shard I/N``: embed part I of the input's N contiguous parts (cut at batch-size multiples, or
    at record starts with ``--pool record``) into shard I of directory ``output``
    (``embeddings-s<I>of<N>-p<P>.parquet`` and its done marker; checked with :func:`check_sibling_shards` and
    prepared with :func:`~ecgfm_cli.io.artifacts.start_shard` by the caller). The parts depend on the input (and
    batch size) alone, so N jobs in any order write exactly the rows, in the order, of one job; reading the
    directory concatenates the shards in name order. ``nproc`` > 1 splits the shard's range once more over
    local processes (one per GPU with ``on_gpus``), which write parts of the same shard."""
    from ecgfm_cli.io.artifacts import ArtifactWriter, shard_tag, write_done_marker

    total = reader.num_rows()
    if total is None:
        raise EmbedError("--shard needs a file or directory input (a stdin stream cannot be split)")
    # --pool segment: shards (and a shard's processes) start at multiples of the batch size, so every forward pass
    # holds the segments it holds in one job and the values agree to the bit; --pool record cuts at record starts.
    grain = opts.batch_size if opts.pool == "segment" else 1
    start, stop = split_range(reader, 0, total, shard[1], opts.pool == "record", grain)[shard[0]]
    summary = EmbedSummary(dim=model.cfg.embed_dim)
    tag = shard_tag(shard)
    try:
        if nproc <= 1:
            if opts.threads:
                torch.set_num_threads(opts.threads)
            net = prepare(model, opts.device, opts.dtype)
            _, mask = parse_leads(opts.leads, model.contract)
            writer = ArtifactWriter(output, "embeddings", schema, shard=shard, row_group_rows=1024)
            from ecgfm_cli.console import progress

            batches = rebatch(iter_rows(reader, start, stop, batch_size=opts.batch_size), opts.batch_size)
            batches = progress(batches, "embed", total=stop - start, unit="segment", size=len)
            try:
                embed_rows(batches, net, opts, mask, schema, writer.write, summary)
                writer.close()
            except BaseException:
                writer.abort()
                raise
            summary.files = [str(f) for f in writer.files]
        else:
            model.encoder.to("meta")  # each worker process loads its own
            ranges = split_range(reader, start, stop, nproc, opts.pool == "record", grain)
            devices = [f"cuda:{k}" for k in range(nproc)] if on_gpus else ["cpu"] * nproc
            if not on_gpus and opts.threads is None:
                opts = _with(opts, threads=max(1, (os.cpu_count() or 1) // nproc))
            work = Path(tempfile.mkdtemp(prefix=f".embed-{tag}-", dir=output.path))
            try:
                schema_meta = {k.decode(): v.decode() for k, v in (schema.metadata or {}).items()}
                job = _Job(input, ranges, spec, opts, devices, str(output.path), str(work), schema_meta, summary.dim,
                           shard)
                torch.multiprocessing.spawn(_worker, args=(job,), nprocs=nproc, join=True)
                for rank in range(nproc):
                    status = work / f"rank{rank:05d}.json"
                    result = json.loads(status.read_text()) if status.exists() else {"ok": False,
                                                                                      "error": "no result"}
                    if not result["ok"]:
                        raise EmbedError(result["error"])
                    result.pop("ok")
                    summary.merge(result)
            finally:
                shutil.rmtree(work, ignore_errors=True)
    except BaseException:
        for f in output.path.glob(f"embeddings-{tag}-*.parquet"):
            f.unlink()
        raise
    # A shard whose segments all hold NaN/Inf (--nan skip) is complete with no rows, as that part of one job's
    # output would be.
    write_done_marker(output.path, shard, {
        "kind": "embeddings", "shard": list(shard), "rows": summary.rows, "segments": summary.segments,
        "range": [start, stop], "input_rows": total, "batch_size": opts.batch_size,
        "parts": sorted(Path(f).name for f in summary.files),
        **{k: meta.get(k) for k in _SHARED_SETTINGS}})
    return summary


def merge_parquet(parts: list[Path], output, schema: pa.Schema) -> None:
    """Concatenate shard files, in the given order, into one Parquet artifact (streamed, batch by batch)."""
    from ecgfm_cli.io.artifacts import ArtifactWriter

    writer = ArtifactWriter(output, "embeddings", schema, row_group_rows=1024)
    try:
        for p in parts:
            with open_table(p) as t:
                for b in t.iter_batches(batch_size=4096):
                    writer.write(b)
        writer.close()
    except BaseException:
        writer.abort()
        raise


def _check_rows(summary: EmbedSummary) -> None:
    if summary.segments == 0:
        raise EmbedError("the input holds no segments")
    if summary.rows == 0:
        raise EmbedError(f"no embedding was written: all {summary.nan_skipped} segment(s) hold NaN/Inf")


def _clear_embeddings(directory: Path) -> None:
    """A rerun into a directory replaces its embeddings (stale shards of another process count would
    otherwise be read with the new ones)."""
    if directory.is_dir():
        for f in list(directory.glob("embeddings-*.parquet")) + list(directory.glob("_done-*.json")):
            f.unlink()
