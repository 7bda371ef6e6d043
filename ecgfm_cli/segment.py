"""`ecgfm segment`: records -> ECG-FM model input windows (``segments`` artifact + labels, rejects)."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ecgfm_cli.console import count_summary, plural, progress
from ecgfm_cli.contract import Contract
from ecgfm_cli.errors import EcgfmError
from ecgfm_cli.ingest import label_codes, widen_stdout_pipe
from ecgfm_cli.io.artifacts import (
    ArtifactReader,
    ArtifactWriter,
    Output,
    start_shard,
    write_done_marker,
    write_sidecars,
)
from ecgfm_cli.io.record import reject_example
from ecgfm_cli.io.schema import LABELS, REJECTS, iter_records, numeric_array, segments_schema, table_from_rows
from ecgfm_cli.io.wfdb_header import binary_labels
from ecgfm_cli.labels import USER_LABELS_COLUMN
from ecgfm_cli.parallel import ordered_map
from ecgfm_cli.preprocess import PreprocessError, SegmentOptions, segment_record


@dataclass
class SegmentSummary:
    records: int = 0
    segments: int = 0
    rejects: Counter = field(default_factory=Counter)
    reject_example: str = ""  # the most common reason's first reject, with its detail (see reject_example)
    nan_zeroed: int = 0
    flat_zeroed: int = 0
    missing_leads: int = 0
    padded: int = 0
    skipped_shard: bool = False
    found: int = 0  # records files of the input, in every shard
    files: int = 0  # records files this shard read


def contract_of(opts: SegmentOptions) -> Contract:
    return Contract(sample_rate=opts.sample_rate, window=opts.window, leads=tuple(opts.leads), stride=opts.stride)


def run_segment(reader: ArtifactReader, output: Output, opts: SegmentOptions, dtype: str = "float32",
                shard: tuple[int, int] = (0, 1), rejects_path=None, workers: int = 1) -> SegmentSummary:
    """Segment every record of ``reader`` into ``output``; see docs/commands/segment.md."""
    summary = SegmentSummary()
    if not start_shard(output, shard, "segment", "segments"):
        summary.skipped_shard = True
        return summary
    summary.found = len(reader.files)
    if shard[1] > 1:
        reader.files = reader.files[shard[0]::shard[1]]
    summary.files = len(reader.files)
    schema = segments_schema(len(opts.leads), opts.window, dtype)
    contract = contract_of(opts)
    schema = schema.with_metadata({b"ecgfm.contract": contract.to_json().encode()})
    writer = ArtifactWriter(output, "segments", schema, shard=shard, row_group_rows=128)
    if output.format == "stream":
        widen_stdout_pipe()
    rejects: list[dict] = []
    labels: list[pa.Table] = []
    try:
        for result in progress(_results(reader, schema, opts, workers), "segment", unit="batch"):
            if result.batch is not None:
                writer.write(result.batch)
            rejects += result.rejects
            if result.labels is not None:
                labels.append(result.labels)
            summary.records += result.records
            summary.segments += result.batch.num_rows if result.batch is not None else 0
            summary.nan_zeroed += result.nan_zeroed
            summary.flat_zeroed += result.flat_zeroed
            summary.missing_leads += result.missing_leads
            summary.padded += result.padded
        writer.close()
    except BaseException:
        writer.abort()
        raise
    summary.rejects = Counter(r["reason"] for r in rejects)
    summary.reject_example = reject_example(rejects)
    write_sidecars(output, shard, "segment", _labels_table(labels, reader.path), table_from_rows(rejects, REJECTS),
                   rejects_path)
    # a shard that wrote nothing failed (no marker: a rerun redoes it), unless it holds none of the input's files
    if output.format == "dir" and (summary.segments or (summary.found and not summary.files)):
        write_done_marker(output.path, shard, {
            "kind": "segments", "shard": list(shard), "records": summary.records, "segments": summary.segments,
            "rejects": dict(summary.rejects), "contract": contract.to_json(), "parts": [f.name for f in writer.files]})
    return summary


def _labels_table(parts: list[pa.Table], input_path: str) -> pa.Table:
    """The segments' labels table: the kept records' labels (batches may differ in their stated columns),
    completed by the labels table beside the records input when there is one."""
    table = pa.concat_tables(parts, promote_options="permissive") if parts else table_from_rows([], LABELS)
    theirs = input_labels(input_path)
    return merge_input_labels(table, theirs) if theirs is not None else table


@dataclass
class BatchResult:
    """What one input batch of records became."""

    batch: pa.RecordBatch | None
    rejects: list[dict]
    labels: pa.Table | None  # the kept records' labels (see record_labels)
    records: int = 0
    nan_zeroed: int = 0
    flat_zeroed: int = 0
    missing_leads: int = 0
    padded: int = 0


def segment_batch(batch: pa.RecordBatch, schema: pa.Schema, opts: SegmentOptions) -> BatchResult:
    """Segment every record of a ``records`` batch into one ``segments`` batch (pure: no I/O).

    Per-record work is the numpy preprocessing; the carried metadata columns are gathered with one
    Arrow ``take`` per column, so the cost per segment row stays small.
    """
    out = BatchResult(None, [], None)
    np_dtype = np.float16 if schema.field("signal").type.value_type == pa.float16() else np.float32
    ids = batch.column("record_id").to_pylist()
    rec_of_row: list[int] = []
    seg_index: list[np.ndarray] = []
    starts: list[np.ndarray] = []
    present: list[np.ndarray] = []
    padded: list[bool] = []
    windows: list[np.ndarray] = []
    kept: list[int] = []
    for i, rec in enumerate(iter_records(batch, full_rows=False)):
        out.records += 1
        try:
            seg = segment_record(rec.signal, rec.leads, rec.sample_rate, opts)
        except PreprocessError as e:
            out.rejects.append({"stage": "segment", "source_path": batch.column("source_path")[i].as_py(),
                                "record_id": ids[i], "reason": e.reason, "detail": e.detail})
            continue
        kept.append(i)
        k = len(seg.starts)
        out.nan_zeroed += bool(seg.nan_leads)
        absent = ~seg.present  # leads the file lacks; NaN or flat leads are counted under their own heads
        absent[[opts.leads.index(name) for name in seg.nan_leads + seg.flat_leads]] = False
        out.missing_leads += int(absent.any())
        out.flat_zeroed += bool(seg.flat_leads)
        out.padded += int(seg.padded)
        rec_of_row += [i] * k
        seg_index.append(np.arange(k, dtype=np.int32))
        starts.append(seg.starts)
        present.append(np.broadcast_to(seg.present, (k, len(seg.present))))
        padded += [seg.padded] * k
        windows.append(seg.windows.reshape(k, -1).astype(np_dtype, copy=False))
    if kept:
        out.labels = record_labels(batch, numeric_array(np.array(kept), pa.int32()))
    if rec_of_row:
        take = numeric_array(np.array(rec_of_row), pa.int32())
        flat = np.concatenate(windows, axis=0)
        signal_type = schema.field("signal").type
        present_type = schema.field("lead_present").type
        made = {
            "signal": pa.FixedSizeListArray.from_arrays(numeric_array(flat.ravel(), signal_type.value_type),
                                                        type=signal_type),
            "segment_index": numeric_array(np.concatenate(seg_index), pa.int32()),
            "start_sample": numeric_array(np.concatenate(starts), pa.int64()),
            "lead_present": pa.FixedSizeListArray.from_arrays(numeric_array(np.concatenate(present).ravel(),
                                                                            pa.bool_()), type=present_type),
            "sample_rate_orig": batch.column("sample_rate").take(take),
            "padded": numeric_array(np.array(padded, dtype=bool), pa.bool_()),
        }
        arrays = [made[f.name] if f.name in made else batch.column(f.name).take(take).cast(f.type)
                  for f in schema]
        out.batch = pa.RecordBatch.from_arrays(arrays, schema=schema)
    return out


def record_labels(batch: pa.RecordBatch, rows: pa.Array) -> pa.Table:
    """The labels table (docs/artifacts.md ``labels``) of the records ``rows`` of a ``records`` batch: ids, codes,
    the yes/no labels the headers state (``# Chagas label: True``, kept in ``comments``), and every column of
    ``ingest --labels`` that the records carry (:data:`~ecgfm_cli.labels.USER_LABELS_COLUMN`), as ingest's own
    labels table has them: a user column replaces a stated one of the same name, a user ``patient_id`` fills in
    where the file names none."""
    cols: dict[str, pa.Array] = {name: batch.column(name).take(rows) for name in ("record_id", "patient_id",
                                                                                  "study_id")}
    cols["codes"] = pa.array([label_codes(c) for c in batch.column("dx_codes").take(rows).to_pylist()],
                             pa.list_(pa.string()))
    if "comments" in batch.schema.names:
        stated = [binary_labels(_comments(c)) for c in batch.column("comments").take(rows).to_pylist()]
        for name in sorted({k for row in stated for k in row} - set(cols)):
            cols[name] = pa.array([row.get(name) for row in stated], pa.float64())
    if USER_LABELS_COLUMN in batch.schema.names:
        user = batch.column(USER_LABELS_COLUMN).take(rows)
        for j, f in enumerate(user.type):
            values = user.field(j)
            if user.null_count:  # a record without a row in the user's table: null in every user column
                values = pc.if_else(user.is_valid(), values, pa.nulls(len(values), f.type))
            if f.name == "patient_id":
                cols["patient_id"] = pc.coalesce(cols["patient_id"], values.cast(pa.string()))
            elif f.name not in ("record_id", "study_id", "codes"):
                cols[f.name] = values
    return pa.table(cols)


def _comments(text: str | None) -> dict[str, str]:
    """The ``comments`` JSON object of a record (empty when null or not an object)."""
    if not text:
        return {}
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return {str(k): str(v) for k, v in obj.items()} if isinstance(obj, dict) else {}


def input_labels(path: str) -> pa.Table | None:
    """The labels table ingest wrote beside a records input (``labels-*.parquet`` in a directory,
    ``NAME.labels.parquet`` beside a file); None for a stream or when there is none."""
    from ecgfm_cli.labels import LabelError, read_table

    p = Path(path)
    if path == "-":
        return None
    if p.is_dir():
        if not any(p.glob("labels-*.parquet")):
            return None
        where = p
    else:
        where = p.with_name(p.stem + ".labels.parquet")
        if not where.is_file():
            return None
    try:
        table = read_table(where, kinds=("labels",))
    except LabelError as e:
        raise EcgfmError(f"segment: the labels table beside the records cannot be read: {e}") from e
    return table if "record_id" in table.column_names else None


def merge_input_labels(ours: pa.Table, theirs: pa.Table) -> pa.Table:
    """``ours`` (labels derived from the records' rows) completed by ingest's labels table ``theirs``: every
    column of ``theirs`` is carried for our records (its values win; a record it lacks keeps ours, else null),
    its patient ids fill in where ours are null. Row order and count are ``ours``'."""
    ids = [str(v) for v in theirs.column("record_id").to_pylist()]
    pos = {r: i for i, r in enumerate(ids)}
    idx = pa.array([pos.get(r) for r in ours.column("record_id").to_pylist()], pa.int64())
    found = idx.is_valid()
    for name in theirs.column_names:
        if name in ("record_id", "codes", "study_id"):
            continue
        col = theirs.column(name).take(idx)
        if name == "patient_id":
            ours = ours.set_column(ours.schema.get_field_index(name), name,
                                   pc.coalesce(ours.column(name), col.cast(pa.string())))
        elif name in ours.column_names:
            try:
                mine = ours.column(name).cast(col.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                mine = pa.nulls(ours.num_rows, col.type)
            ours = ours.set_column(ours.schema.get_field_index(name), theirs.schema.field(name),
                                   pc.if_else(found, col, mine))
        else:
            ours = ours.append_column(theirs.schema.field(name), col)
    return ours


def _segment_worker(args: tuple[pa.RecordBatch, pa.Schema, SegmentOptions]) -> BatchResult:
    return segment_batch(*args)


def _results(reader: ArtifactReader, schema: pa.Schema, opts: SegmentOptions, workers: int):
    batches = reader.iter_batches(batch_size=32)
    if workers <= 1:
        for b in batches:
            yield segment_batch(b, schema, opts)
        return
    # results in input order, so the output is the same whatever the worker count
    for result in ordered_map(_segment_worker, ((b, schema, opts) for b in batches), workers):
        if result.batch is not None:  # pickling drops the lists' non-null item fields: restore the schema
            result.batch = pa.RecordBatch.from_arrays(result.batch.columns, schema=schema)
        yield result


def report(summary: SegmentSummary, output: Output) -> str:
    where = "stdout" if output.format == "stream" else str(output.path)
    line = f"segment: {plural(summary.segments, 'segment')} from {plural(summary.records, 'record')} -> {where}"
    extras = []
    if summary.rejects:
        extras.append(f"{plural(sum(summary.rejects.values()), 'record')} skipped ({count_summary(summary.rejects)})")
    if summary.missing_leads:
        extras.append(f"{summary.missing_leads} with missing leads zero-filled")
    if summary.nan_zeroed:
        extras.append(f"{summary.nan_zeroed} with NaN/inf leads zeroed")
    if summary.flat_zeroed:
        extras.append(f"{summary.flat_zeroed} with flat leads flagged absent")
    if summary.padded:
        extras.append(f"{summary.padded} short records padded")
    return line + ("; " + "; ".join(extras) if extras else "")
