"""Arrow schemas of the artifacts and conversions between rows and numpy (docs/artifacts.md)."""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from ecgfm_cli.io.record import RawRecord


def _values(t: pa.DataType) -> pa.Field:
    # non-nullable items: Parquet then stores no per-value definition levels (2-3x faster to read)
    return pa.field("item", t, nullable=False)


RECORDS = pa.schema([
    ("record_id", pa.string()),
    ("patient_id", pa.string()),
    ("study_id", pa.string()),
    ("source_path", pa.string()),
    ("source_format", pa.string()),
    ("sample_rate", pa.float64()),
    ("n_samples", pa.int64()),
    ("n_leads", pa.int32()),
    ("leads", pa.list_(pa.string())),
    ("units", pa.list_(pa.string())),
    ("signal", pa.list_(_values(pa.float32()))),
    ("digital", pa.list_(_values(pa.int32()))),
    ("gain", pa.list_(pa.float64())),
    ("baseline", pa.list_(pa.int64())),
    ("age", pa.float32()),
    ("sex", pa.string()),
    ("dx_codes", pa.list_(pa.string())),
    ("comments", pa.string()),
    ("base_datetime", pa.string()),
    ("lead_nan", pa.list_(pa.bool_())),
    ("lead_flat", pa.list_(pa.bool_())),
    ("lead_clipped", pa.list_(pa.bool_())),
])

REJECTS = pa.schema([
    ("stage", pa.string()),
    ("source_path", pa.string()),
    ("record_id", pa.string()),
    ("reason", pa.string()),
    ("detail", pa.string()),
])

LABELS = pa.schema([
    ("record_id", pa.string()),
    ("patient_id", pa.string()),
    ("study_id", pa.string()),
    ("codes", pa.list_(pa.string())),
])

#: Record columns carried unchanged into every segment row.
CARRIED = ("record_id", "patient_id", "study_id", "source_path", "source_format", "age", "sex",
           "dx_codes", "comments")


def segments_schema(n_leads: int, window: int, dtype: str = "float32") -> pa.Schema:
    value = pa.float16() if dtype == "float16" else pa.float32()
    carried = [RECORDS.field(name) for name in CARRIED]
    return pa.schema(carried[:3] + [
        ("segment_index", pa.int32()),
        ("start_sample", pa.int64()),
        pa.field("signal", pa.list_(_values(value), n_leads * window), nullable=False),
        ("lead_present", pa.list_(pa.bool_(), n_leads)),
        ("sample_rate_orig", pa.float64()),
        ("padded", pa.bool_()),
    ] + carried[3:])


# ------------------------------------------------------------------------------------------------ records


def lead_quality(signal: np.ndarray, clip_fraction: float = 0.01) -> tuple[list[bool], list[bool], list[bool]]:
    """Per-lead flags of a (n_leads, n_samples) signal: (has NaN, constant, clipped).

    Clipped: at least ``clip_fraction`` of the samples sit at the lead's extreme value (a saturated
    ADC gives a plateau at its min or max); a flat lead is not also reported clipped.
    """
    nan = np.isnan(signal).any(axis=1)
    if not signal.size:
        lo = hi = np.zeros(signal.shape[0], dtype=signal.dtype)
    elif nan.any():
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN leads
            lo, hi = np.nanmin(signal, axis=1), np.nanmax(signal, axis=1)
    else:  # the common case: plain min/max are several times faster than the NaN-aware ones
        lo, hi = signal.min(axis=1), signal.max(axis=1)
    flat = ~(hi > lo)
    n = max(signal.shape[1], 1)
    at_lo = np.count_nonzero(signal == lo[:, None], axis=1) / n
    at_hi = np.count_nonzero(signal == hi[:, None], axis=1) / n
    clipped = ~flat & ((at_lo >= clip_fraction) | (at_hi >= clip_fraction))
    return nan.tolist(), flat.tolist(), clipped.tolist()


def records_to_batch(records: Sequence[RawRecord]) -> pa.RecordBatch:
    """Build a ``records`` batch; signals are flattened lead-major."""
    cols: dict[str, list] = {name: [] for name in RECORDS.names}
    signals = []
    for r in records:
        nan, flat, clipped = lead_quality(r.signal)
        cols["record_id"].append(r.record_id)
        cols["patient_id"].append(r.patient_id)
        cols["study_id"].append(r.study_id)
        cols["source_path"].append(r.source_path)
        cols["source_format"].append(r.source_format)
        cols["sample_rate"].append(float(r.sample_rate))
        cols["n_samples"].append(r.n_samples)
        cols["n_leads"].append(r.n_leads)
        cols["leads"].append(list(r.leads))
        cols["units"].append(list(r.units) if r.units else [""] * r.n_leads)
        signals.append(np.ascontiguousarray(r.signal, dtype=np.float32).ravel())
        has_digital = r.digital is not None
        cols["digital"].append(r.digital.astype(np.int32).ravel() if has_digital else None)
        cols["gain"].append(list(map(float, r.gain)) if has_digital and r.gain is not None else None)
        cols["baseline"].append(list(map(int, r.baseline)) if has_digital and r.baseline is not None else None)
        cols["age"].append(r.age)
        cols["sex"].append(r.sex)
        cols["dx_codes"].append(list(r.dx_codes))
        cols["comments"].append(json.dumps(r.comments, sort_keys=True) if r.comments else "{}")
        cols["base_datetime"].append(r.base_datetime)
        cols["lead_nan"].append(nan)
        cols["lead_flat"].append(flat)
        cols["lead_clipped"].append(clipped)
    arrays = []
    for f in RECORDS:
        if f.name == "signal":
            arrays.append(_list_array(signals, pa.float32()))
        elif f.name == "digital":
            present = [d for d in cols["digital"] if d is not None]
            if len(present) == len(records) and present:
                arrays.append(_list_array(present, pa.int32()))
            else:
                arrays.append(pa.array(cols["digital"], type=f.type))
        else:
            arrays.append(pa.array(cols[f.name], type=f.type))
    return pa.RecordBatch.from_arrays(arrays, schema=RECORDS)


def _list_array(chunks: list[np.ndarray], value_type: pa.DataType) -> pa.Array:
    """A list<value> array from numpy chunks without per-element Python work."""
    lengths = np.fromiter((len(c) for c in chunks), dtype=np.int64, count=len(chunks))
    offsets = np.zeros(len(chunks) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = np.concatenate(chunks) if chunks else np.zeros(0, dtype=value_type.to_pandas_dtype())
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=value_type),
                                    type=pa.list_(_values(value_type)))


@dataclass
class RecordView:
    """One row of a ``records`` batch with its signal as a (n_leads, n_samples) float32 view."""

    record_id: str
    patient_id: str | None
    sample_rate: float
    leads: list[str]
    signal: np.ndarray
    row: dict


def iter_records(batch: pa.RecordBatch, full_rows: bool = True) -> Iterator[RecordView]:
    """Rows of a ``records`` batch; the physical signal comes from ``signal`` or, when stored
    digitally, from ``(digital - baseline) / gain``. With ``full_rows=False`` the ``row`` dict
    holds only what preprocessing needs (ids, rate, gain, baseline)."""
    names = batch.schema.names
    n_leads = batch.column("n_leads").to_numpy()
    n_samples = batch.column("n_samples").to_numpy()
    sig_col = batch.column("signal")
    sig_values = sig_col.values.to_numpy(zero_copy_only=False)
    sig_offsets = sig_col.offsets.to_numpy()
    wanted = (n for n in names if n not in ("signal", "digital", "leads", "lead_nan", "lead_flat", "lead_clipped"))
    if not full_rows:
        wanted = (n for n in ("record_id", "patient_id", "sample_rate", "gain", "baseline") if n in names)
    carried = {name: batch.column(name).to_pylist() for name in wanted}
    leads = batch.column("leads").to_pylist()
    digital = batch.column("digital") if "digital" in names else None
    sig_valid = sig_col.is_valid().to_numpy(zero_copy_only=False)
    for i in range(batch.num_rows):
        shape = (int(n_leads[i]), int(n_samples[i]))
        if sig_valid[i]:
            sig = sig_values[sig_offsets[i]:sig_offsets[i + 1]].reshape(shape)
        else:
            d = np.asarray(digital[i].values, dtype=np.float64).reshape(shape)
            gain = np.asarray(carried["gain"][i], dtype=np.float64)[:, None]
            base = np.asarray(carried["baseline"][i], dtype=np.float64)[:, None]
            sig = ((d - base) / gain).astype(np.float32)
        row = {k: v[i] for k, v in carried.items()}
        yield RecordView(row["record_id"], row["patient_id"], float(row["sample_rate"]), leads[i], sig, row)


def rejects_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=REJECTS)


def labels_from_rows(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=LABELS)


def segment_signals(batch: pa.RecordBatch | pa.Table) -> np.ndarray:
    """The ``signal`` column of a ``segments`` batch as (n, n_leads, window) numpy, without a copy
    when the batch is a single chunk (float16 artifacts come back as float16)."""
    col = batch.column("signal")
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    n_leads = batch.schema.field("lead_present").type.list_size
    size = col.type.list_size
    values = col.values.to_numpy(zero_copy_only=False)
    start = col.offset * size
    return values[start:start + len(col) * size].reshape(len(col), n_leads, size // n_leads)


def segments_contract(reader_metadata: dict[str, str]):
    """The preprocessing contract stored in a segments artifact's metadata (None if absent)."""
    from ecgfm_cli.contract import Contract

    raw = reader_metadata.get("ecgfm.contract")
    return Contract.from_json(raw) if raw else None
