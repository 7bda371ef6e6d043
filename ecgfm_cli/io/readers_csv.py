"""Delimited text tables (``.csv``, ``.txt``, optionally gzip-compressed): one column per lead.

Layout detection: the delimiter is the first of ``,`` ``\\t`` ``;`` found in the first line (else
runs of blanks); a first row holding any non-numeric token is a header of lead names; a first
column equal to 0..n-1 or 1..n (or named sample/index/time/t/#) is a sample counter and dropped.
``--fs`` is required (no text layout stores it), ``--leads`` names header-less columns (default:
the 12 standard leads) and ``--gain`` turns integer ADC values into mV.
"""

from __future__ import annotations

import gzip
import io
import itertools
import os
import re
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np

from ecgfm_cli.contract import STANDARD_LEADS
from ecgfm_cli.io.readers_common import check_amplitude, check_leads, check_sample_rate
from ecgfm_cli.io.record import RawRecord, RejectedRecord

_COUNTER_NAMES = {"sample", "samples", "index", "idx", "n", "#", "sample_number", "sample number", "time", "t",
                  "time_s", "seconds", "sec", "s", ""}
_TIME_NAMES = {"time", "t", "time_s", "seconds", "sec", "s"}
_CHUNK = 1 << 23  # bytes of (decompressed) text parsed at a time: memory stays bounded by --max-samples rows
_MAX_LINE = 1 << 26  # no row of an ECG table is 64 MiB long


def _is_number(tok: str) -> bool:
    try:
        float(tok)
    except ValueError:
        return False
    return True


def _parse_table(body: bytes, delim: str | None, n_cols: int, name: str, row0: int = 0) -> np.ndarray:
    """(n_rows, n_cols) float64 of the numeric body (no header row); ``row0``: data rows before this block."""
    if not body.strip():
        return np.zeros((0, n_cols))
    if delim is None:
        flat = np.array(body.split(), dtype=object)
        try:
            values = flat.astype(np.float64)
        except ValueError as e:
            raise RejectedRecord("not_ecg", f"{name}: non-numeric value ({e})") from None
        if values.size % n_cols:
            raise RejectedRecord("unreadable", f"{name}: rows have different numbers of columns")
        return values.reshape(-1, n_cols)
    import pyarrow as pa
    import pyarrow.csv as pc

    names = [f"c{i}" for i in range(n_cols)]
    try:
        table = pc.read_csv(
            io.BytesIO(body),
            read_options=pc.ReadOptions(column_names=names, use_threads=False),
            parse_options=pc.ParseOptions(delimiter=delim),
            convert_options=pc.ConvertOptions(column_types=dict.fromkeys(names, pa.float64())),
        )
    except pa.ArrowInvalid as e:
        msg = str(e).splitlines()[0]
        text = re.search(r"column #(\d+): Row #(\d+): CSV conversion error to \w+: invalid value '(.*)'", msg)
        if text:  # say it as a person would: where the text is, and what the file probably is
            col, row, value = int(text.group(1)) + 1, int(text.group(2)) + row0, text.group(3)
            raise RejectedRecord("not_ecg", f"{name}: column {col}, data row {row} holds {value!r}, not a number: "
                                 f"not a signal table (a label or metadata table? pass it with --labels)") from None
        reason = "not_ecg" if "conversion" in msg.lower() or "parse" in msg.lower() else "unreadable"
        raise RejectedRecord(reason, f"{name}: {msg}") from None
    out = np.empty((table.num_rows, n_cols), dtype=np.float64)
    for i, col in enumerate(table.columns):
        out[:, i] = col.to_numpy(zero_copy_only=False)
    return out


def _blocks(f: BinaryIO, name: str) -> Iterator[bytes]:
    """The file's bytes in blocks of about ``_CHUNK`` that end at a line end (CRLF made LF)."""
    while True:
        block = f.read(_CHUNK)
        if not block:
            return
        if not block.endswith(b"\n"):
            rest = f.readline(_MAX_LINE)
            if len(rest) >= _MAX_LINE and not rest.endswith(b"\n"):
                raise RejectedRecord("too_large", f"{name}: a line longer than {_MAX_LINE >> 20} MiB: not a table "
                                                  "of samples")
            block += rest
        yield block.replace(b"\r\n", b"\n")


def _read_rows(blocks: Iterator[bytes], first: bytes, delim: str | None, n_cols: int, name: str,
               max_samples: int | None) -> np.ndarray:
    """(n_rows, n_cols) float64 of ``first`` and the blocks after it, stopping past ``max_samples`` rows."""
    parts, n = [], 0
    for body in itertools.chain([first], blocks):
        x = _parse_table(body, delim, n_cols, name, row0=n)
        n += x.shape[0]
        if max_samples is not None and n > max_samples:
            raise RejectedRecord("too_large", f"{name}: more than {max_samples:,} rows of samples (stopped reading "
                                              f"there), more than --max-samples (raise it to read this table)")
        parts.append(x)
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def read_csv(path: Path, record_id: str, fs: float | None, leads: list[str] | None,
             gain: float | None, store_digital: bool = False, max_samples: int | None = None) -> RawRecord:
    """One text table -> a record. max_samples: the most rows (samples per lead) read; ``too_large`` beyond,
    found while streaming so that neither the text nor a gzip file's decompressed bytes are held whole."""
    name = path.name
    try:
        with gzip.open(path, "rb") if path.suffix.lower() == ".gz" else open(path, "rb") as f:
            blocks = _blocks(f, name)
            data = next(blocks, b"")
            if b"\0" in data[:4096]:
                raise RejectedRecord("not_ecg", f"{name}: binary data, not a text table")
            data = data.lstrip(b"\xef\xbb\xbf").lstrip()
            lines = data.split(b"\n", 1)
            first = lines[0].decode("utf-8", "replace").strip()
            if not first:
                raise RejectedRecord("empty", f"{name}: no data")
            delim = next((d for d in (",", "\t", ";") if d in first), None)
            toks = [t.strip().strip('"').strip("'") for t in (first.split(delim) if delim else first.split())]
            header = None
            body = data
            if not all(_is_number(t) for t in toks):
                header = toks
                body = lines[1] if len(lines) > 1 else b""
            x = _read_rows(blocks, body, delim, len(toks), name, max_samples)
    except (OSError, EOFError, zlib.error) as e:
        raise RejectedRecord("unreadable", f"{name}: {e}") from None
    if x.shape[0] == 0:
        raise RejectedRecord("empty", f"{name}: header row but no samples")
    n = x.shape[0]
    # Drop a sample-counter column.
    c0 = x[:, 0]
    counter = n > 1 and (np.array_equal(c0, np.arange(n)) or np.array_equal(c0, np.arange(1, n + 1)))
    h0 = header[0].lower() if header is not None else None
    if h0 is not None and h0 in _COUNTER_NAMES:
        if h0 in _TIME_NAMES and n > 1 and fs is None:
            dt = np.diff(c0)
            if np.all(dt > 0) and np.allclose(dt, dt[0], rtol=1e-3):
                fs = 1.0 / float(dt[0])  # a time column in seconds gives the rate
        counter = True
    if counter and x.shape[1] > 1:
        x = x[:, 1:]
        if header is not None:
            header = header[1:]
    fs = check_sample_rate(fs, name, hint=" (text tables store none: pass --fs)")
    if leads is not None:
        names = list(leads)
    elif header is not None:
        names = header
    else:
        names = list(STANDARD_LEADS)
    if len(names) != x.shape[1]:
        src = "--leads" if leads is not None else ("the header row" if header is not None else "the 12 standard leads")
        raise RejectedRecord("not_ecg", f"{name}: {x.shape[1]} signal columns but {len(names)} lead names "
                                        f"from {src} (pass --leads)")
    check_leads(names, name)
    digital = None
    units = [""] * len(names)
    sig = x.T
    integral = bool(np.all(np.isfinite(x)) and np.all(x == np.round(x)))
    if gain is not None:
        if gain <= 0:
            raise RejectedRecord("unreadable", f"{name}: --gain {gain} must be positive")
        if store_digital and integral and np.abs(x).max(initial=0) < 2**31:
            digital = np.ascontiguousarray(sig, dtype=np.int32)
        sig = sig / gain
        units = ["mV"] * len(names)
    signal = np.ascontiguousarray(sig, dtype=np.float32)
    if gain is not None:
        check_amplitude(signal, names, units, name, hint=f" (--gain {gain:g}: is it the ADC units per mV?)")
    rec = RawRecord(record_id=record_id, source_path=os.path.abspath(path), source_format="csv", sample_rate=fs,
                    leads=names, signal=signal, units=units)
    if digital is not None:
        rec.digital, rec.gain, rec.baseline = digital, [float(gain)] * len(names), [0] * len(names)
    return rec
