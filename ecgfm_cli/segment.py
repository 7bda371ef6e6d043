"""`ecgfm segment`: records -> ECG-FM model input windows (``segments`` artifact + labels, rejects)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from ecgfm_cli.console import count_summary, info, progress
from ecgfm_cli.contract import Contract
from ecgfm_cli.io.artifacts import (
    ArtifactReader,
    ArtifactWriter,
    Output,
    done_marker,
    shard_tag,
    sidecar_path,
    write_done_marker,
    write_table,
)
from ecgfm_cli.io.schema import CARRIED, LABELS, REJECTS, iter_records, segments_schema
from ecgfm_cli.preprocess import PreprocessError, SegmentOptions, segment_record


@dataclass
class SegmentSummary:
    records: int = 0
    segments: int = 0
    rejects: Counter = field(default_factory=Counter)
    nan_zeroed: int = 0
    missing_leads: int = 0
    padded: int = 0
    skipped_shard: bool = False


def contract_of(opts: SegmentOptions) -> Contract:
    return Contract(sample_rate=opts.sample_rate, window=opts.window, leads=tuple(opts.leads), stride=opts.stride)


def run_segment(reader: ArtifactReader, output: Output, opts: SegmentOptions, dtype: str = "float32",
                shard: tuple[int, int] = (0, 1), rejects_path=None) -> SegmentSummary:
    """Segment every record of ``reader`` into ``output``; see docs/commands/segment.md."""
    summary = SegmentSummary()
    if output.format == "dir":
        if done_marker(output.path, shard).exists():
            info(f"segment: shard {shard[0]}/{shard[1]} is already complete in {output.path}; nothing to do")
            summary.skipped_shard = True
            return summary
        for stale in output.path.glob(f"*-{shard_tag(shard)}*.parquet"):
            stale.unlink()
    if shard[1] > 1:
        reader.files = reader.files[shard[0]::shard[1]]
    schema = segments_schema(len(opts.leads), opts.window, dtype)
    contract = contract_of(opts)
    schema = schema.with_metadata({b"ecgfm.contract": contract.to_json().encode()})
    writer = ArtifactWriter(output, "segments", schema, shard=shard, row_group_rows=128)
    rejects: list[dict] = []
    labels: list[dict] = []
    np_dtype = np.float16 if dtype == "float16" else np.float32
    try:
        for batch in progress(reader.iter_batches(batch_size=64), "segment", total=None, unit="batch"):
            rows: list[dict] = []
            windows: list[np.ndarray] = []
            for rec in iter_records(batch):
                summary.records += 1
                try:
                    seg = segment_record(rec.signal, rec.leads, rec.sample_rate, opts)
                except PreprocessError as e:
                    rejects.append({"stage": "segment", "source_path": rec.row.get("source_path"),
                                    "record_id": rec.record_id, "reason": e.reason, "detail": e.detail})
                    continue
                summary.nan_zeroed += bool(seg.nan_leads)
                summary.missing_leads += int(not seg.present.all())
                summary.padded += int(seg.padded)
                labels.append({"record_id": rec.record_id, "patient_id": rec.patient_id,
                               "codes": rec.row.get("dx_codes") or []})
                present = seg.present.tolist()
                for k, start in enumerate(seg.starts.tolist()):
                    row = {name: rec.row.get(name) for name in CARRIED}
                    row.update(segment_index=k, start_sample=start, lead_present=present,
                               sample_rate_orig=rec.sample_rate, padded=seg.padded)
                    rows.append(row)
                windows.append(seg.windows.reshape(len(seg.starts), -1).astype(np_dtype, copy=False))
            if rows:
                writer.write(_segment_batch(rows, windows, schema))
                summary.segments += len(rows)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    summary.rejects = Counter(r["reason"] for r in rejects)
    labels_path = sidecar_path(output, "labels", shard)
    if labels_path is not None:
        write_table(pa.Table.from_pylist(labels, schema=LABELS), labels_path, "labels")
    rpath = rejects_path or sidecar_path(output, "rejects", shard)
    if rpath is not None:
        write_table(pa.Table.from_pylist(rejects, schema=REJECTS), rpath, "rejects")
    else:
        for r in rejects[:20]:
            info(f"segment: skipped {r['record_id']}: {r['reason']}: {r['detail']}")
    if output.format == "dir":
        write_done_marker(output.path, shard, {
            "kind": "segments", "shard": list(shard), "records": summary.records, "segments": summary.segments,
            "rejects": dict(summary.rejects), "contract": contract.to_json(), "parts": [f.name for f in writer.files]})
    return summary


def _segment_batch(rows: list[dict], windows: list[np.ndarray], schema: pa.Schema) -> pa.RecordBatch:
    flat = np.concatenate(windows, axis=0)
    n, size = flat.shape
    signal_type = schema.field("signal").type
    signal = pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel(), type=signal_type.value_type), size)
    arrays = []
    for f in schema:
        if f.name == "signal":
            arrays.append(signal)
        else:
            arrays.append(pa.array([r[f.name] for r in rows], type=f.type))
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def report(summary: SegmentSummary, output: Output) -> str:
    where = "stdout" if output.format == "stream" else str(output.path)
    line = f"segment: {summary.segments} segments from {summary.records} records -> {where}"
    extras = []
    if summary.rejects:
        extras.append(f"{sum(summary.rejects.values())} records skipped ({count_summary(summary.rejects)})")
    if summary.missing_leads:
        extras.append(f"{summary.missing_leads} with missing leads zero-filled")
    if summary.nan_zeroed:
        extras.append(f"{summary.nan_zeroed} with NaN leads zeroed")
    if summary.padded:
        extras.append(f"{summary.padded} short records padded")
    return line + ("; " + "; ".join(extras) if extras else "")
