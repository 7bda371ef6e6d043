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


#: Columns an artifact of each kind must hold for ecgfm's readers (checked when it is opened, so that a file of
#: another shape fails with one line naming it and what it lacks instead of a KeyError deep in a command).
REQUIRED_COLUMNS: dict[str, tuple[str, ...]] = {
    "records": (*CARRIED, "sample_rate", "n_samples", "n_leads", "leads", "signal"),
    "segments": ("record_id", "patient_id", "segment_index", "signal", "lead_present"),
    "labels": ("record_id",),
    "rejects": tuple(REJECTS.names),
    "embeddings": ("record_id", "segment_index", "embedding"),
    "predictions": ("record_id",),
}


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



# ------------------------------------------------------------------------------------------------ builders
# ``pa.array`` and ``Array.to_numpy`` import pandas on first use whenever it is installed (~0.2 s of
# start-up in every ingest/segment process); these build and view the artifacts' columns from buffers.

_NUMPY_OF = {pa.float64(): np.float64, pa.float32(): np.float32, pa.float16(): np.float16,
             pa.int64(): np.int64, pa.int32(): np.int32}


def _packed(flags: np.ndarray) -> pa.Buffer:
    return pa.py_buffer(np.packbits(np.asarray(flags, dtype=bool), bitorder="little"))


def numeric_array(values: np.ndarray, type: pa.DataType) -> pa.Array:
    """A null-free Arrow array of ``type`` (numeric or bool) over 1-D numpy ``values`` (no copy when
    the dtype already matches and the array is contiguous)."""
    if pa.types.is_boolean(type):
        return pa.Array.from_buffers(type, len(values), [None, _packed(values)], null_count=0)
    data = np.ascontiguousarray(values, dtype=_NUMPY_OF[type])
    return pa.Array.from_buffers(type, len(data), [None, pa.py_buffer(data)], null_count=0)


def column(values: Sequence, type: pa.DataType) -> pa.Array:
    """``pa.array(values, type=type)`` for Python values (None is null) of the types the artifact
    schemas use: string, float, int, bool and lists of those."""
    n = len(values)
    valid = [v is not None for v in values]
    nulls = n - sum(valid)
    validity = _packed(np.array(valid, dtype=bool)) if nulls else None
    if pa.types.is_string(type):
        encoded = [v.encode() if v is not None else b"" for v in values]
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum([len(b) for b in encoded], out=offsets[1:])
        if offsets[-1] >= 2**31:
            return pa.array(values, type=type)
        return pa.Array.from_buffers(type, n, [validity, pa.py_buffer(offsets.astype(np.int32)),
                                               pa.py_buffer(b"".join(encoded))], null_count=nulls)
    if type in _NUMPY_OF:
        data = np.array([v if v is not None else 0 for v in values], dtype=_NUMPY_OF[type])
        return pa.Array.from_buffers(type, n, [validity, pa.py_buffer(data)], null_count=nulls)
    if pa.types.is_boolean(type):
        return pa.Array.from_buffers(type, n, [validity, _packed(np.array([bool(v) for v in values], dtype=bool))],
                                     null_count=nulls)
    if pa.types.is_list(type):
        lengths = [len(v) if v is not None else 0 for v in values]
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        if offsets[-1] < 2**31:
            child = column([x for v in values if v is not None for x in v], type.value_type)
            return pa.Array.from_buffers(type, n, [validity, pa.py_buffer(offsets.astype(np.int32))],
                                         null_count=nulls, children=[child])
    return pa.array(values, type=type)


def table_from_rows(rows: Sequence[dict], schema: pa.Schema) -> pa.Table:
    """``pa.Table.from_pylist(rows, schema=schema)`` (missing keys are null) via :func:`column`."""
    return pa.Table.from_arrays([column([r.get(f.name) for r in rows], f.type) for f in schema], schema=schema)


def numpy_view(arr: pa.Array) -> np.ndarray:
    """A null-free numeric Arrow array as a read-only numpy view (``arr.to_numpy()`` without pandas)."""
    if arr.null_count:
        raise ValueError("numpy_view needs an array without nulls")
    buf = arr.buffers()[1]
    dtype = _NUMPY_OF[arr.type]
    return np.frombuffer(buf, dtype=dtype, count=arr.offset + len(arr))[arr.offset:] if buf is not None else \
        np.zeros(0, dtype=dtype)


# ------------------------------------------------------------------------------------------------ records


def lead_quality(signal: np.ndarray, clip_fraction: float = 0.01) -> tuple[list[bool], list[bool], list[bool]]:
    """Per-lead flags of a (n_leads, n_samples) signal: (has NaN or inf, constant, clipped).

    Clipped: at least ``clip_fraction`` of the samples sit at the lead's extreme value (a saturated
    ADC gives a plateau at its min or max); a flat lead is not also reported clipped.
    """
    if not signal.size:
        nan = np.zeros(signal.shape[0], dtype=bool)
        lo = hi = np.zeros(signal.shape[0], dtype=signal.dtype)
    else:
        # plain min/max are several times faster than the NaN-aware ones, and a lead holding NaN
        # has a NaN minimum (min propagates NaN), so no separate isnan pass is needed
        lo, hi = signal.min(axis=1), signal.max(axis=1)
        # an inf sample (a tiny header gain, an "inf" in a table) is no measurement either: flagged like NaN
        nan = ~(np.isfinite(lo) & np.isfinite(hi)) if signal.dtype.kind == "f" else np.zeros(signal.shape[0], bool)
        if nan.any():
            with np.errstate(invalid="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN leads
                lo, hi = np.nanmin(signal, axis=1), np.nanmax(signal, axis=1)
    flat = ~(hi > lo)
    n = max(signal.shape[1], 1)
    at_lo = _count_true(signal == lo[:, None]) / n
    at_hi = _count_true(signal == hi[:, None]) / n
    clipped = ~flat & ((at_lo >= clip_fraction) | (at_hi >= clip_fraction))
    return nan.tolist(), flat.tolist(), clipped.tolist()


def _count_true(mask: np.ndarray) -> np.ndarray:
    """True values per row of a 2-D bool array (count_nonzero(axis=1) without its slow bool->int path)."""
    return np.add.reduce(mask.view(np.uint8), axis=1, dtype=np.int64)


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
                arrays.append(column(cols["digital"], f.type))
        else:
            arrays.append(column(cols[f.name], f.type))
    return pa.RecordBatch.from_arrays(arrays, schema=RECORDS)


def _list_array(chunks: list[np.ndarray], value_type: pa.DataType) -> pa.Array:
    """A list<value> array from numpy chunks without per-element Python work."""
    lengths = np.fromiter((len(c) for c in chunks), dtype=np.int64, count=len(chunks))
    offsets = np.zeros(len(chunks) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = np.concatenate(chunks) if chunks else np.zeros(0, dtype=value_type.to_pandas_dtype())
    return pa.ListArray.from_arrays(numeric_array(offsets, pa.int32()), numeric_array(values, value_type),
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
    n_leads = numpy_view(batch.column("n_leads"))
    n_samples = numpy_view(batch.column("n_samples"))
    sig_col = batch.column("signal")
    sig_values = numpy_view(sig_col.values)
    sig_offsets = numpy_view(sig_col.offsets)
    wanted = (n for n in names if n not in ("signal", "digital", "leads", "lead_nan", "lead_flat", "lead_clipped"))
    if not full_rows:
        wanted = (n for n in ("record_id", "patient_id", "sample_rate", "gain", "baseline") if n in names)
    carried = {name: batch.column(name).to_pylist() for name in wanted}
    leads = batch.column("leads").to_pylist()
    digital = batch.column("digital") if "digital" in names else None
    sig_valid = [True] * batch.num_rows if not sig_col.null_count else sig_col.is_valid().to_pylist()
    for i in range(batch.num_rows):
        shape = (int(n_leads[i]), int(n_samples[i]))
        if sig_valid[i]:
            sig = sig_values[sig_offsets[i]:sig_offsets[i + 1]].reshape(shape)
        else:
            d = numpy_view(digital[i].values).astype(np.float64).reshape(shape)
            gain = np.asarray(carried["gain"][i], dtype=np.float64)[:, None]
            base = np.asarray(carried["baseline"][i], dtype=np.float64)[:, None]
            sig = ((d - base) / gain).astype(np.float32)
        row = {k: v[i] for k, v in carried.items()}
        yield RecordView(row["record_id"], row["patient_id"], float(row["sample_rate"]), leads[i], sig, row)


def segment_signals(batch: pa.RecordBatch | pa.Table) -> np.ndarray:
    """The ``signal`` column of a ``segments`` batch as (n, n_leads, window) numpy, without a copy
    when the batch is a single chunk (float16 artifacts come back as float16)."""
    col = batch.column("signal")
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    n_leads = batch.schema.field("lead_present").type.list_size
    size = col.type.list_size
    values = numpy_view(col.values)
    start = col.offset * size
    return values[start:start + len(col) * size].reshape(len(col), n_leads, size // n_leads)


def segments_contract(reader_metadata: dict[str, str]):
    """The preprocessing contract stored in a segments artifact's metadata (None if absent)."""
    from ecgfm_cli.contract import Contract

    raw = reader_metadata.get("ecgfm.contract")
    return Contract.from_json(raw) if raw else None
