"""The in-memory form of one raw ECG record, as every reader returns it."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


class RejectedRecord(Exception):
    """A file (or a record inside it) that cannot be read as an ECG.

    ``reason`` is a short stable code (see ``REASONS``); ``detail`` is one line for humans.
    """

    def __init__(self, reason: str, detail: str, path: str = "", record_id: str | None = None):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.path = path
        self.record_id = record_id

    def __reduce__(self):  # rebuilt from all four fields when it crosses a process boundary (ingest --workers)
        return type(self), (self.reason, self.detail, self.path, self.record_id)


#: Reason codes written to the rejects table (stage ingest or segment).
REASONS = {
    "unreadable": "the file is corrupt, truncated or not in the format its extension claims",
    "not_ecg": "the file is not an ECG record of a known layout",
    "missing_data": "a header names a signal file that does not exist",
    "size_mismatch": "the signal file holds fewer or more bytes than the header declares for its format",
    "too_large": "the record declares more samples per lead than --max-samples allows (checked before reading)",
    "bad_format": "a header names a signal format that WFDB does not define",
    "bad_path": "a header names a signal file outside its own folder (an absolute path, or one through ..)",
    "implausible_amplitude": "the ECG leads swing more millivolts than any ECG (a wrong gain or format in the header)",
    "not_regular_file": "a FIFO, device or socket where a record or signal file was expected (never opened)",
    "bad_file_name": "the file's name is not valid UTF-8 (its path is shown with \\xNN escapes): rename it",
    "path_too_long": "the file's path is longer than the system can open (PATH_MAX): move it to a shorter path",
    "ignored": "not an ECG record and not read: a document, image, annotation without its record, or other file",
    "bad_sample_rate": "the sampling rate is missing, zero, negative or absurd (> 20 kHz or < 50 Hz)",
    "duplicate_lead": "two signals carry the same (canonical) lead name",
    "unknown_lead": "no signal has a recognisable lead name (use --lead-map)",
    "duplicate_record_id": "another record in this run already has this record_id",
    "empty": "the record has no samples",
    "nan_lead": "a lead contains NaN and --nan drop was chosen",
    "too_short": "shorter than one window after resampling (use --pad to keep it)",
    "no_signal": "every lead is flat (constant), NaN or missing",
}


def reject_example(rows: list[dict]) -> str:
    """One line showing the most common reject reason of the rejects-table ``rows``: its first row's reason,
    record (or file) and detail, which usually says how to fix it. Empty when there are no rows."""
    if not rows:
        return ""
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["reason"]] = counts.get(r["reason"], 0) + 1
    top = max(counts, key=counts.__getitem__)
    row = next(r for r in rows if r["reason"] == top)
    return f"{top}: {row.get('record_id') or row.get('source_path')}: {row['detail']}"


@dataclass
class RawRecord:
    """One ECG record as read from disk, before any preprocessing.

    signal: (n_leads, n_samples) float32 in physical units (usually mV); NaN marks missing
        samples (WFDB's invalid-sample value).
    digital / gain / baseline: when the source stores integers, the lossless ADC values
        (n_leads, n_samples) int32 with physical = (digital - baseline) / gain.
    leads: names as stored in the file (not canonicalised).
    """

    record_id: str
    source_path: str
    source_format: str
    sample_rate: float
    leads: list[str]
    signal: np.ndarray
    units: list[str] | None = None
    digital: np.ndarray | None = None
    gain: list[float] | None = None
    baseline: list[int] | None = None
    patient_id: str | None = None
    study_id: str | None = None
    age: float | None = None
    sex: str | None = None  # "M", "F" or None
    dx_codes: list[str] = field(default_factory=list)
    comments: dict[str, str] = field(default_factory=dict)
    base_datetime: str | None = None
    identifiers: dict[str, str] = field(default_factory=dict)

    @property
    def n_leads(self) -> int:
        return int(self.signal.shape[0])

    @property
    def n_samples(self) -> int:
        return int(self.signal.shape[1])
