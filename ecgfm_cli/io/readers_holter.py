"""Holter / wearable recordings: EDF, EDF+ and BDF (pyedflib) and ISHNE Holter ``.ecg`` (our own parser).

EDF/BDF: ECG channels are picked by label (``ECG``, ``EKG``, standard lead names, ``ECG II``...); other channels
(EEG, respiration, SpO2...) are left out and named in ``comments["other_channels"]``. Values are pyedflib's
physical values (digital -> physical from the header's digital/physical ranges), converted to mV when the
channel's dimension is a volt unit. ECG channels at different sampling rates become one record per rate
(``record_id#<rate>Hz``). EDF+ annotations (TAL) go to ``comments["annotations"]`` (``onset s/duration s/text``).

ISHNE (ISHNE Holter Standard Output File Format, 1998): magic ``ISHNE1.0``, CRC-CCITT of the fixed 512-byte
header and the variable-length block, int16 little-endian samples interleaved by lead, per-lead resolution in
nV and lead codes; no independent decoder exists (the tests use their own writer of the same layout).
"""

from __future__ import annotations

import binascii
import os
import re
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ecgfm_cli.contract import canonical_lead
from ecgfm_cli.io.readers_common import check_leads, check_sample_rate, check_size
from ecgfm_cli.io.record import RawRecord, RejectedRecord

_TO_MV = {"uv": 1e-3, "µv": 1e-3, "μv": 1e-3, "mv": 1.0, "v": 1e3, "nv": 1e-6}
_ECG_WORD = re.compile(r"^\s*(ecg|ekg)\b[\s._:-]*", re.I)
_MAX_ANNOTATIONS = 500  # kept in comments; the count of the rest is stated


def edf_lead(label: str) -> tuple[bool, str]:
    """(is an ECG channel, lead name) for an EDF signal label: ``ECG II`` -> (True, "II"), ``EKG`` -> (True,
    "EKG"), ``V1`` -> (True, "V1"), ``EEG Fpz-Cz`` -> (False, ...)."""
    raw = label.strip()
    rest = _ECG_WORD.sub("", raw)
    if canonical_lead(rest):
        return True, rest
    if canonical_lead(raw):
        return True, raw
    return bool(_ECG_WORD.match(raw)), raw


def _edf_identifiers(f) -> dict[str, str]:
    ids: dict[str, str] = {}

    def get(name: str) -> str:
        try:
            v = getattr(f, name)()
        except Exception:  # noqa: BLE001 - pyedflib raises on fields a plain EDF lacks
            return ""
        return v.strip() if isinstance(v, str) else ""

    if code := get("getPatientCode"):
        ids["mrn"] = code
    if name := get("getPatientName"):
        ids["name"] = name.replace("_", " ")
    bd = get("getBirthdate")
    m = re.fullmatch(r"(\d{1,2})\s+(\w{3})\s+(\d{4})", bd)
    if m:
        months = ["JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"]
        if m.group(2).upper() in months:
            ids["birth_date"] = f"{m.group(3)}-{months.index(m.group(2).upper()) + 1:02d}-{int(m.group(1)):02d}"
    if tech := get("getTechnician"):
        ids["persons"] = tech
    other = [v for v in (get("getPatientAdditional"), get("getAdmincode"), get("getRecordingAdditional")) if v]
    try:
        header_patient = f.getHeader().get("patient", "") if hasattr(f, "getHeader") else ""
    except Exception:  # noqa: BLE001
        header_patient = ""
    if not ids and isinstance(header_patient, str) and header_patient.strip():
        other.append(header_patient.strip())  # plain EDF: the local patient field is free text
    if other:
        ids["other"] = "; ".join(other)
    return ids


def read_edf(path: Path, record_id: str, opts) -> Iterator[RawRecord]:
    """An EDF/EDF+/BDF file -> one RawRecord per sampling rate of its ECG channels (mV, float32)."""
    import pyedflib

    where = path.name
    max_samples = getattr(opts, "max_samples", 2**24)
    with open(path, "rb") as fh:
        fmt = "bdf" if fh.read(8) == b"\xffBIOSEMI" else "edf"
    try:
        f = pyedflib.EdfReader(str(path))
    except OSError as e:
        raise RejectedRecord("unreadable", f"{where}: not a readable {fmt.upper()} file ({e})") from None
    try:
        labels = f.getSignalLabels()
        picked, others = [], []
        for i, label in enumerate(labels):
            is_ecg, name = edf_lead(label)
            (picked if is_ecg else others).append((i, name) if is_ecg else label.strip())
        if not picked:
            raise RejectedRecord("not_ecg", f"{where}: no ECG channel among {len(labels)} signals "
                                            f"({', '.join(s.strip() for s in labels[:8])})")
        by_rate: dict[float, list[tuple[int, str]]] = {}
        for i, name in picked:
            by_rate.setdefault(float(f.getSampleFrequency(i)), []).append((i, name))
        for rate, chans in by_rate.items():
            n_max = max(int(f.getNSamples()[i]) for i, _ in chans)
            check_size(n_max, len(chans), max_samples, f"{where} ({rate:g} Hz channels)")
        comments: dict[str, str] = {}
        ids = _edf_identifiers(f)
        if others:
            comments["other_channels"] = ", ".join(others)
        try:
            onsets, durations, texts = f.readAnnotations()
        except Exception:  # noqa: BLE001 - plain EDF: no annotation signal
            onsets, durations, texts = [], [], []
        if len(texts):
            comments["annotations"] = _annotations(onsets, durations, texts, ids)
        if len(by_rate) > 1:
            comments["rate_groups"] = ", ".join(f"{r:g} Hz: {', '.join(n for _, n in c)}" for r, c in by_rate.items())
        try:
            equipment = f.getEquipment().strip()
        except Exception:  # noqa: BLE001 - plain EDF: no equipment field
            equipment = ""
        if equipment:
            comments["device"] = equipment
        try:
            start = f.getStartdatetime().strftime("%Y-%m-%d %H:%M:%S")
        except Exception:  # noqa: BLE001
            start = None
        try:
            sex_raw = f.getSex() if hasattr(f, "getSex") else f.getGender()
        except Exception:  # noqa: BLE001
            sex_raw = ""
        sex = {"male": "M", "m": "M", "female": "F", "f": "F"}.get(str(sex_raw).strip().lower())
        for rate, chans in by_rate.items():
            fs = check_sample_rate(rate, where)
            n = max(int(f.getNSamples()[i]) for i, _ in chans)
            if n == 0:
                raise RejectedRecord("empty", f"{where}: the ECG channels hold no samples")
            signal = np.full((len(chans), n), np.nan, dtype=np.float32)
            units = []
            for row, (i, _name) in enumerate(chans):
                x = f.readSignal(i)
                dim = f.getPhysicalDimension(i).strip()
                factor = _TO_MV.get(dim.lower())
                units.append("mV" if factor is not None else dim)
                signal[row, :len(x)] = (x * (factor if factor is not None else 1.0)).astype(np.float32)
            leads = [name for _, name in chans]
            check_leads(leads, where)
            rid = record_id if len(by_rate) == 1 else f"{record_id}#{rate:g}Hz"
            yield RawRecord(record_id=rid, source_path=os.path.abspath(path), source_format=fmt, sample_rate=fs,
                            leads=leads, signal=signal, units=units, sex=sex, base_datetime=start,
                            comments=dict(comments), identifiers=dict(ids))
    finally:
        f.close()


def _annotations(onsets, durations, texts, ids: dict[str, str]) -> str:
    """EDF+ annotations as ``onset/duration/text; ...`` (seconds), texts scrubbed of identifiers."""
    from ecgfm_cli.io.readers_scp import scrub_into

    parts = []
    for o, d, t in list(zip(onsets, durations, texts, strict=False))[:_MAX_ANNOTATIONS]:
        text = " ".join(scrub_into([str(t)], ids))
        dur = "" if d is None or float(d) < 0 else f"{float(d):g}"
        parts.append(f"{float(o):g}/{dur}/{text}")
    if len(texts) > _MAX_ANNOTATIONS:
        parts.append(f"... {len(texts) - _MAX_ANNOTATIONS} more")
    return "; ".join(parts)


# ---------------------------------------------------------------- ISHNE

ISHNE_MAGIC = b"ISHNE1.0"
ISHNE_HEADER = 512
#: ISHNE lead specification codes
ISHNE_LEADS = {0: "unknown", 1: "bipolar", 2: "X", 3: "Y", 4: "Z", 5: "I", 6: "II", 7: "III", 8: "aVR", 9: "aVL",
               10: "aVF", 11: "V1", 12: "V2", 13: "V3", 14: "V4", 15: "V5", 16: "V6", 17: "ES", 18: "AS", 19: "AI"}
#: the fixed header after magic + CRC (little-endian): var-block size, samples per lead, var-block offset, ECG
#: offset, version, first name, last name, id, sex, race, birth/record/file date (d, m, y), start time (h, m, s),
#: number of leads, lead specs, lead quality, resolution (nV), pacemaker, recorder, rate, proprietary, copyright,
#: reserved
ISHNE_FIXED = struct.Struct("<iiiih40s40s20shh3h3h3h3hh12h12h12hh40sh80s80s88s")
assert ISHNE_FIXED.size == ISHNE_HEADER


def _c(b: bytes) -> str:
    return b.split(b"\x00", 1)[0].decode("latin-1").strip()


def _dmy(d: int, m: int, y: int) -> str | None:
    return f"{y:04d}-{m:02d}-{d:02d}" if 1 <= d <= 31 and 1 <= m <= 12 and 1000 <= y <= 9999 else None


def read_ishne(path: Path, record_id: str, opts) -> Iterator[RawRecord]:
    """An ISHNE Holter ``.ecg`` file -> one RawRecord ((n_leads, n_samples) float32 mV)."""
    where = path.name
    max_samples = getattr(opts, "max_samples", 2**24)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(10 + ISHNE_HEADER)
        if len(head) < 10 + ISHNE_HEADER or head[:8] != ISHNE_MAGIC:
            raise RejectedRecord("unreadable", f"{where}: {len(head)} bytes: not an ISHNE header (too short or no "
                                               f"ISHNE1.0 magic)")
        (crc,) = struct.unpack_from("<H", head, 8)
        v = ISHNE_FIXED.unpack_from(head, 10)
        var_len, n, var_off, ecg_off = v[0], v[1], v[2], v[3]
        if var_len < 0 or var_off != 10 + ISHNE_HEADER or var_len > 1 << 20:
            raise RejectedRecord("unreadable", f"{where}: variable-length block of {var_len} bytes at {var_off}")
        var = fh.read(var_len)
        if len(var) < var_len:
            raise RejectedRecord("unreadable", f"{where}: truncated inside the header")
        if binascii.crc_hqx(head[10:] + var, 0xFFFF) != crc:
            raise RejectedRecord("unreadable", f"{where}: header CRC mismatch (the file is corrupt)")
        first, last, pid, sex, _race = _c(v[5]), _c(v[6]), _c(v[7]), v[8], v[9]
        birth, rec_date, start = v[10:13], v[13:16], v[19:22]
        n_leads = v[22]
        specs, resolution = v[23:35], v[47:59]
        recorder, rate = _c(v[60]), v[61]
        if not 1 <= n_leads <= 12:
            raise RejectedRecord("not_ecg", f"{where}: {n_leads} leads (ISHNE allows 1-12)")
        if n <= 0:
            raise RejectedRecord("empty", f"{where}: 0 samples per lead")
        check_size(n, n_leads, max_samples, where)
        fs = check_sample_rate(rate, where)
        if ecg_off < var_off + var_len:
            raise RejectedRecord("unreadable", f"{where}: ECG block offset {ecg_off} inside the header")
        need = ecg_off + 2 * n * n_leads
        if size < need:
            raise RejectedRecord("size_mismatch", f"{where}: {size:,} bytes, the header declares {n:,} samples x "
                                                  f"{n_leads} leads ({need:,} bytes)")
        fh.seek(ecg_off)
        raw = np.fromfile(fh, dtype="<i2", count=n * n_leads).reshape(n, n_leads).T
    res = np.array(resolution[:n_leads], dtype=np.float64)
    if (res <= 0).any():
        raise RejectedRecord("unreadable", f"{where}: lead resolution {list(res)} nV (must be > 0)")
    signal = (raw * (res * 1e-6)[:, None]).astype(np.float32)
    leads = [ISHNE_LEADS.get(c, f"lead{c}") for c in specs[:n_leads]]
    leads = [f"{name}{i + 1}" if name in ("unknown", "bipolar") else name for i, name in enumerate(leads)]
    check_leads(leads, where)
    ids: dict[str, str] = {}
    if first or last:
        ids["name"] = " ".join(x for x in (first, last) if x)
    if pid:
        ids["mrn"] = pid
    if bd := _dmy(*birth):
        ids["birth_date"] = bd
    day = _dmy(*rec_date)
    stamp = None
    if day:
        h, m, s = start
        stamp = day + (f" {h:02d}:{m:02d}:{s:02d}" if 0 <= h < 24 and 0 <= m < 60 and 0 <= s < 61 else "")
    comments = {"device": recorder} if recorder else {}
    store = bool(getattr(opts, "store_digital", False))
    yield RawRecord(record_id=record_id, source_path=os.path.abspath(path), source_format="ishne", sample_rate=fs,
                    leads=leads, signal=signal, units=["mV"] * n_leads,
                    digital=raw.astype(np.int32) if store else None,
                    gain=[1e6 / r for r in res] if store else None, baseline=[0] * n_leads if store else None,
                    sex={1: "M", 2: "F"}.get(sex), base_datetime=stamp, comments=comments, identifiers=ids)
