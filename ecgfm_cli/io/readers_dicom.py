"""DICOM waveform reader (12-lead ECG, general ECG, ambulatory ECG IODs) with pydicom.

The rhythm multiplex group is chosen over median/representative beats (by MultiplexGroupLabel, then
WaveformOriginality ORIGINAL, then the most samples). Values: ``raw x ChannelSensitivity x
ChannelSensitivityCorrectionFactor + ChannelBaseline`` in the units of ChannelSensitivityUnitsSequence (as
pydicom's ``waveform_array`` scales them), converted to mV. Lead names: the code meanings of
ChannelSourceSequence ("Lead I (Einthoven)" -> I).
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ecgfm_cli.io.readers_common import check_leads, check_sample_rate, check_size
from ecgfm_cli.io.record import RawRecord, RejectedRecord

#: Waveform sample interpretation x bits allocated -> numpy dtype (PS3.3 C.10.9.1.5)
_DTYPES = {("SB", 8): "i1", ("UB", 8): "u1", ("MB", 8): "u1", ("AB", 8): "u1", ("SS", 16): "<i2",
           ("US", 16): "<u2", ("SL", 32): "<i4", ("UL", 32): "<u4", ("SV", 64): "<i8", ("UV", 64): "<u8"}
#: UCUM unit code -> factor to mV
_TO_MV = {"uv": 1e-3, "mv": 1.0, "v": 1e3, "nv": 1e-6}
_BEAT = re.compile(r"median|beat|average|represent|template", re.I)
_LEAD_MEANING = re.compile(r"^\s*lead\s+(-?\s*[a-z0-9]+)", re.I)


def lead_name(channel) -> str:
    """A channel's lead name from ChannelSourceSequence (``Lead aVR`` -> aVR; ``Lead I (Einthoven)`` -> I),
    else its ChannelLabel, else ``ch<n>``."""
    src = channel.get("ChannelSourceSequence")
    meaning = str(src[0].get("CodeMeaning", "")) if src else ""
    m = _LEAD_MEANING.match(meaning)
    if m:
        return m.group(1).replace(" ", "")
    if meaning.strip():
        return meaning.strip()
    label = str(channel.get("ChannelLabel", "")).strip()
    return label or ""


def _is_beat(group) -> bool:
    return bool(_BEAT.search(str(group.get("MultiplexGroupLabel", ""))))


def choose_group(groups) -> int:
    """Index of the rhythm multiplex group: not labelled as a (median) beat, ORIGINAL before DERIVED, most
    samples."""
    def key(i: int):
        g = groups[i]
        return (not _is_beat(g), str(g.get("WaveformOriginality", "")).upper() == "ORIGINAL",
                int(g.get("NumberOfWaveformSamples", 0) or 0))
    return max(range(len(groups)), key=key)


def _dicom_date(d: str) -> str | None:
    d = (d or "").strip()
    return f"{d[:4]}-{d[4:6]}-{d[6:8]}" if re.fullmatch(r"\d{8}", d) else None


def _dicom_datetime(ds) -> str | None:
    dt = str(ds.get("AcquisitionDateTime", "") or "").strip()
    date, time = (dt[:8], dt[8:]) if len(dt) >= 8 else (
        str(ds.get("AcquisitionDate", "") or ds.get("StudyDate", "") or ds.get("ContentDate", "") or ""),
        str(ds.get("AcquisitionTime", "") or ds.get("StudyTime", "") or ds.get("ContentTime", "") or ""))
    day = _dicom_date(date[:8])
    if day is None:
        return None
    t = re.match(r"(\d{2})(\d{2})?(\d{2})?", time.strip())
    if t:
        day += " " + ":".join(p or "00" for p in t.groups())
    return day


def _age(v: str) -> float | None:
    m = re.fullmatch(r"(\d{3})([DWMY])", (v or "").strip().upper())
    if not m:
        return None
    return round(int(m.group(1)) / {"D": 365.25, "W": 52.1775, "M": 12.0, "Y": 1.0}[m.group(2)], 3)


def _person_names(ds) -> str:
    out = []
    for kw in ("ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName", "NameOfPhysiciansReadingStudy",
               "PhysiciansOfRecord", "RequestingPhysician"):
        v = ds.get(kw)
        if v is None:
            continue
        for name in (v if isinstance(v, (list, tuple)) or type(v).__name__ == "MultiValue" else [v]):
            s = str(name).strip()
            if s and s not in out:
                out.append(s)
    return "; ".join(out)


def _identifiers(ds) -> dict[str, str]:
    ids: dict[str, str] = {}
    pairs = (("mrn", "PatientID"), ("name", "PatientName"), ("address", "PatientAddress"))
    for key, kw in pairs:
        s = str(ds.get(kw, "") or "").strip()
        if s:
            ids[key] = s
    bd = _dicom_date(str(ds.get("PatientBirthDate", "") or ""))
    if bd:
        ids["birth_date"] = bd
    persons = _person_names(ds)
    if persons:
        ids["persons"] = persons
    other = [str(ds.get(kw)).strip() for kw in ("InstitutionName", "InstitutionAddress", "AccessionNumber",
                                                 "OtherPatientIDs", "StationName")
             if str(ds.get(kw, "") or "").strip()]
    if other:
        ids["other"] = "; ".join(other)
    return ids


def read_dicom(path: Path, record_id: str, opts) -> Iterator[RawRecord]:
    """One DICOM waveform file -> one RawRecord (rhythm group, mV; (n_leads, n_samples) float32)."""
    import pydicom

    where = path.name
    try:
        with warnings.catch_warnings():  # pydicom warns about odd values; their text may quote identifiers
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(str(path), defer_size="1 MB")
            rec = _record(ds, path, record_id, opts)
    except RejectedRecord:
        raise
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - pydicom raises many types (and warnings-as-values) on corrupt data
        raise RejectedRecord("unreadable", f"{where}: not a readable DICOM file ({type(e).__name__}: {e})") \
            from None
    yield rec


def _record(ds, path: Path, record_id: str, opts) -> RawRecord:
    where = path.name
    max_samples = getattr(opts, "max_samples", 2**24)
    groups = ds.get("WaveformSequence")
    if not groups:
        sop = str(ds.get("SOPClassUID", "?"))
        raise RejectedRecord("not_ecg", f"{where}: DICOM object without a waveform (SOP class {sop}, modality "
                                        f"{ds.get('Modality', '?')})")
    gi = choose_group(groups)
    g = groups[gi]
    try:
        n_ch = int(g.NumberOfWaveformChannels)
        n = int(g.NumberOfWaveformSamples)
        fs_raw = float(g.SamplingFrequency)
        key = (str(g.WaveformSampleInterpretation).upper(), int(g.WaveformBitsAllocated))
    except (AttributeError, ValueError, TypeError) as e:
        raise RejectedRecord("unreadable", f"{where}: waveform group {gi}: missing or bad attribute ({e})") from None
    if n_ch <= 0 or n <= 0:
        raise RejectedRecord("empty", f"{where}: waveform group {gi} has {n_ch} channels x {n} samples")
    check_size(n, n_ch, max_samples, where)
    fs = check_sample_rate(fs_raw, where)
    if key not in _DTYPES:
        raise RejectedRecord("unreadable", f"{where}: waveform sample interpretation {key[0]} / {key[1]} bits is "
                                           f"not a DICOM waveform encoding")
    dtype = np.dtype(_DTYPES[key])
    data = g.get("WaveformData")
    raw_bytes = bytes(data) if data is not None else b""
    if len(raw_bytes) < n * n_ch * dtype.itemsize:
        raise RejectedRecord("size_mismatch", f"{where}: waveform data hold {len(raw_bytes):,} bytes, "
                                              f"{n:,} x {n_ch} samples need {n * n_ch * dtype.itemsize:,}")
    raw = np.frombuffer(raw_bytes, dtype=dtype, count=n * n_ch).reshape(n, n_ch).T
    channels = list(g.get("ChannelDefinitionSequence") or [])
    if len(channels) != n_ch:
        raise RejectedRecord("unreadable", f"{where}: {len(channels)} channel definitions for {n_ch} channels")
    leads, units, scale, offset = [], [], [], []
    for i, ch in enumerate(channels):
        leads.append(lead_name(ch) or f"ch{i + 1}")
        sens = float(ch.get("ChannelSensitivity", 1.0) or 1.0)
        corr = float(ch.get("ChannelSensitivityCorrectionFactor", 1.0) or 1.0)
        base = float(ch.get("ChannelBaseline", 0.0) or 0.0)
        useq = ch.get("ChannelSensitivityUnitsSequence")
        code = str(useq[0].get("CodeValue", "")).strip() if useq else ""
        to_mv = _TO_MV.get(code.lower()) if code else None
        if to_mv is None:  # units other than volts (or none): kept as stored, named in units
            units.append(code)
            to_mv = 1.0
        else:
            units.append("mV")
        scale.append(sens * corr * to_mv)
        offset.append(base * to_mv)
    signal = (raw.astype(np.float64) * np.array(scale)[:, None] + np.array(offset)[:, None]).astype(np.float32)
    check_leads(leads, where)
    comments = {"waveform_group": f"{gi}:{str(g.get('MultiplexGroupLabel', '')).strip()}"}
    others = [f"{i}:{str(x.get('MultiplexGroupLabel', '')).strip()}" for i, x in enumerate(groups) if i != gi]
    if others:
        comments["other_waveform_groups"] = ",".join(others)
    maker = " ".join(str(ds.get(k, "") or "").strip() for k in ("Manufacturer", "ManufacturerModelName")).strip()
    if maker:
        comments["device"] = maker
    sex = str(ds.get("PatientSex", "") or "").strip().upper()
    store = bool(getattr(opts, "store_digital", False)) and all(s != 0 for s in scale) and dtype.itemsize <= 2 \
        and all(o == 0 for o in offset) and all(u == "mV" for u in units)
    return RawRecord(
        record_id=record_id, source_path=os.path.abspath(path), source_format="dicom-ecg", sample_rate=fs,
        leads=leads, signal=signal, units=units,
        digital=raw.astype(np.int32) if store else None, gain=[1.0 / s for s in scale] if store else None,
        baseline=[0] * n_ch if store else None,
        age=_age(str(ds.get("PatientAge", "") or "")), sex=sex if sex in ("M", "F") else None,
        base_datetime=_dicom_datetime(ds), comments=comments, identifiers=_identifiers(ds))
