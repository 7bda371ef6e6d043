"""Checks and naming rules shared by every reader."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

from ecgfm_cli.contract import canonical_lead
from ecgfm_cli.io.record import RejectedRecord

MIN_FS, MAX_FS = 50.0, 20000.0

#: multi-part extensions stripped from record ids (longest first)
_COMPOUND_EXT = (".csv.gz", ".txt.gz", ".tsv.gz")

_MIMIC_SUBJECT = re.compile(r"^p(\d+)$")
_MIMIC_STUDY = re.compile(r"^s(\d+)$")


def check_sample_rate(fs: float | None, where: str, hint: str = "") -> float:
    """Return ``fs`` as float or raise ``bad_sample_rate`` (missing, non-finite, outside 50..20000 Hz)."""
    if fs is None:
        raise RejectedRecord("bad_sample_rate", f"{where}: no sample rate{hint}")
    fs = float(fs)
    if not math.isfinite(fs) or not MIN_FS <= fs <= MAX_FS:
        raise RejectedRecord("bad_sample_rate", f"{where}: sample rate {fs:g}{hint}")
    return fs


def check_leads(leads: list[str], where: str) -> None:
    """Raise ``duplicate_lead`` when two names map to the same standard lead (or are identical)."""
    seen: dict[str, str] = {}
    for name in leads:
        key = canonical_lead(name) or name.strip().upper()
        if not key:
            continue
        if key in seen:
            raise RejectedRecord("duplicate_lead", f"{where}: leads {seen[key]!r} and {name!r} are both {key}")
        seen[key] = name


def strip_ext(name: str) -> str:
    low = name.lower()
    for ext in _COMPOUND_EXT:
        if low.endswith(ext):
            return name[: -len(ext)]
    stem, dot, _ext = name.rpartition(".")
    return stem if dot and stem else name


def make_record_id(path: Path, root: Path) -> str:
    """Path relative to ``root`` without extension, POSIX separators; the stem when root is the file."""
    try:
        rel = path.relative_to(root)
    except ValueError:
        rel = Path(path.name)
    if rel == Path("."):
        rel = Path(path.name)
    return strip_ext(rel.as_posix())


def mimic_ids(path: Path) -> tuple[str | None, str | None]:
    """(patient_id, study_id) from a MIMIC-IV-ECG path ``files/pNNNN/pNNNNNNNN/sNNNNNNNN/NNNNNNNN.hea``."""
    parts = path.parts
    if len(parts) >= 3:
        subj, study = _MIMIC_SUBJECT.match(parts[-3]), _MIMIC_STUDY.match(parts[-2])
        if subj and study and len(subj.group(1)) >= 5:
            return subj.group(1), study.group(1)
    return None, None


def check_size(n_samples: int, n_leads: int, max_samples: int | None, where: str) -> None:
    """Raise ``too_large`` when a record declares more than ``max_samples`` samples per lead (before reading it)."""
    if max_samples is not None and n_samples > max_samples:
        raise RejectedRecord("too_large", f"{where}: declares {n_samples:,} samples per lead x {n_leads} leads, more "
                                          f"than --max-samples {max_samples:,} (raise it to read this record)")


#: Half the spread between a lead's 0.5th and 99.5th percentiles above which it is no ECG. The tallest QRS
#: complexes reported (LVH, precordial leads) are about 5 mV; 20 mV leaves room for them, for baseline wander and
#: for a header gain several times off (seen in real collections, and kept), and catches a wrong format or a gain
#: 10x or more off. Narrow spikes (pacing, artefacts) and a saturated stretch under 0.5 % of the record do not
#: move the percentiles.
MAX_ECG_MV = 20.0
_MV_PER_UNIT = {"mv": 1.0, "millivolt": 1.0, "millivolts": 1.0, "uv": 1e-3, "µv": 1e-3, "μv": 1e-3,
                "microvolt": 1e-3, "microvolts": 1e-3, "v": 1e3, "volt": 1e3, "volts": 1e3}
_AMPLITUDE_SAMPLES = 1024  # samples per lead the percentiles look at (a stride through longer records)


def lead_amplitudes(signal: np.ndarray, leads: list[str], units: list[str] | None) -> dict[str, float]:
    """{lead name: (99.5th - 0.5th percentile) / 2 in mV} of the ECG leads (a standard lead name, units mV / uV /
    V) of a (n_leads, n) signal; other channels (ABP in mmHg, PLETH, unknown units) and NaN / inf samples are
    left out."""
    if units is None or not signal.size:
        return {}
    rows, scales = [], []
    for i, (name, unit) in enumerate(zip(leads, units, strict=False)):
        scale = _MV_PER_UNIT.get((unit or "").strip().lower())
        if scale is not None and canonical_lead(name) is not None:
            rows.append(i)
            scales.append(scale)
    if not rows:
        return {}
    step = max(1, signal.shape[1] // _AMPLITUDE_SAMPLES)
    x = np.sort(np.asarray(signal[rows, ::step], dtype=np.float32), axis=1)  # NaN sorts last; a sort beats
    n = (~np.isnan(x)).sum(axis=1)  # np.percentile several times on these short rows
    spread = np.full(len(rows), np.nan)
    for j in np.flatnonzero(n >= 2):
        row = x[j, : n[j]]
        row = row[np.isfinite(row)] if np.isinf(row[[0, -1]]).any() else row
        if row.size >= 2:
            k = int(row.size * 0.005)
            spread[j] = (float(row[row.size - 1 - k]) - float(row[k])) / 2
    return {leads[i]: float(a * sc) for i, a, sc in zip(rows, spread, scales, strict=True) if np.isfinite(a)}


def check_amplitude(signal: np.ndarray, leads: list[str], units: list[str] | None, where: str, hint: str = "") -> None:
    """Raise ``implausible_amplitude`` when the ECG leads of a (n_leads, n) signal swing more than
    :data:`MAX_ECG_MV` (the median over its ECG leads of :func:`lead_amplitudes`).

    A header's wrong gain or format scales every lead alike; one lead far out (a loose electrode, noise) is a
    lead's problem, flagged per lead downstream, and does not reject the record."""
    if _within(signal, leads, units):
        return
    amps = lead_amplitudes(signal, leads, units)
    typical = float(np.median(list(amps.values()))) if amps else 0.0
    if typical > MAX_ECG_MV:
        worst = max(amps, key=amps.__getitem__)
        raise RejectedRecord("implausible_amplitude", f"{where}: its ECG leads swing a median {typical:.3g} mV "
                                                      f"(half the 0.5-99.5th percentile range; lead {worst} "
                                                      f"{amps[worst]:.3g} mV); no ECG exceeds {MAX_ECG_MV:g} mV{hint}")


def _within(signal: np.ndarray, leads: list[str], units: list[str] | None) -> bool:
    """The cheap test that passes nearly every record: most ECG leads never leave +-MAX_ECG_MV at all (a bound on
    their half-spread). False when it cannot tell (NaN or inf samples, or large values)."""
    if units is None or not signal.size:
        return True
    rows = [i for i, (name, unit) in enumerate(zip(leads, units, strict=False))
            if (unit or "").strip().lower() in _MV_PER_UNIT and canonical_lead(name) is not None]
    if not rows:
        return True
    scale = np.array([_MV_PER_UNIT[units[i].strip().lower()] for i in rows])
    step = max(1, signal.shape[1] // _AMPLITUDE_SAMPLES)
    x = signal[:, ::step]  # a view: min/max of every lead beat copying the ECG rows out
    peak = np.maximum(np.abs(x.min(axis=1)), np.abs(x.max(axis=1)))[rows] * scale  # NaN where a lead holds NaN
    return bool(np.isfinite(peak).all() and np.median(peak) <= MAX_ECG_MV)
