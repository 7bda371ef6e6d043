"""`ecgfm segment`: records -> ECG-FM model input windows (``segments`` artifact + labels, rejects)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from ecgfm_cli.console import count_summary, plural, progress
from ecgfm_cli.contract import Contract
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


def contract_of(opts: SegmentOptions) -> Contract:
    return Contract(sample_rate=opts.sample_rate, window=opts.window, leads=tuple(opts.leads), stride=opts.stride)


def run_segment(reader: ArtifactReader, output: Output, opts: SegmentOptions, dtype: str = "float32",
                shard: tuple[int, int] = (0, 1), rejects_path=None, workers: int = 1) -> SegmentSummary:
    """Segment every record of ``reader`` into ``output``; see docs/commands/segment.md."""
    summary = SegmentSummary()
    if not start_shard(output, shard, "segment", "segments"):
        summary.skipped_shard = True
        return summary
    if shard[1] > 1:
        reader.files = reader.files[shard[0]::shard[1]]
    schema = segments_schema(len(opts.leads), opts.window, dtype)
    contract = contract_of(opts)
    schema = schema.with_metadata({b"ecgfm.contract": contract.to_json().encode()})
    writer = ArtifactWriter(output, "segments", schema, shard=shard, row_group_rows=128)
    if output.format == "stream":
        widen_stdout_pipe()
    rejects: list[dict] = []
    labels: list[dict] = []
    try:
        for result in progress(_results(reader, schema, opts, workers), "segment", unit="batch"):
            if result.batch is not None:
                writer.write(result.batch)
            rejects += result.rejects
            labels += result.labels
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
    write_sidecars(output, shard, "segment", table_from_rows(labels, LABELS), table_from_rows(rejects, REJECTS),
                   rejects_path)
    if output.format == "dir" and summary.segments:  # a shard that wrote nothing failed: a rerun redoes it
        write_done_marker(output.path, shard, {
            "kind": "segments", "shard": list(shard), "records": summary.records, "segments": summary.segments,
            "rejects": dict(summary.rejects), "contract": contract.to_json(), "parts": [f.name for f in writer.files]})
    return summary


@dataclass
class BatchResult:
    """What one input batch of records became."""

    batch: pa.RecordBatch | None
    rejects: list[dict]
    labels: list[dict]
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
    out = BatchResult(None, [], [])
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
        kept_idx = numeric_array(np.array(kept), pa.int32())
        out.labels = pa.table({"record_id": batch.column("record_id").take(kept_idx),
                               "patient_id": batch.column("patient_id").take(kept_idx),
                               "study_id": batch.column("study_id").take(kept_idx),
                               "codes": batch.column("dx_codes").take(kept_idx)}).to_pylist()
        for row in out.labels:
            row["codes"] = label_codes(row["codes"])
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
        extras.append(f"{summary.nan_zeroed} with NaN leads zeroed")
    if summary.flat_zeroed:
        extras.append(f"{summary.flat_zeroed} with flat leads flagged absent")
    if summary.padded:
        extras.append(f"{summary.padded} short records padded")
    return line + ("; " + "; ".join(extras) if extras else "")
