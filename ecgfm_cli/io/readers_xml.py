"""Hospital XML ECG formats: GE MUSE (``<RestingECG>``), Philips Sierra / PageWriter (``<restingecgdata>``,
1.03 / 1.04 / 1.04.01 / 1.04.02) and HL7 aECG (``<AnnotatedECG>``).

Every reader has the signature ``read_<fmt>(path, record_id, opts) -> Iterator[RawRecord]`` and raises
:class:`RejectedRecord` for a file it cannot read. Parsing is defused (defusedxml): no DTD or external entity is
ever fetched, an entity declaration (the entity-expansion bombs) is refused, and a file larger than the
``--max-samples`` bound allows is refused before it is read. Signals are float32 mV, decoded with numpy (base64
-> ``np.frombuffer``; HL7 digits -> ``np.fromstring``; XLI's LZW stream is the one loop, per code).

Identifiers (patient id, names, birth date, staff, free text) go into ``RawRecord.identifiers`` only; diagnosis
statements pass through :func:`ecgfm_cli.deid.scrub_statement`. ``ecgfm_cli.deid`` does the rest.
"""

from __future__ import annotations

import binascii
import math
import re
import warnings
import zlib
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any
from xml.etree.ElementTree import Element, ParseError

import numpy as np

from ecgfm_cli.deid import join_identifier, scrub_statements
from ecgfm_cli.io.derive import derive_limb_leads
from ecgfm_cli.io.readers_common import check_leads, check_sample_rate
from ecgfm_cli.io.record import RawRecord, RejectedRecord

DEFAULT_MAX_SAMPLES = 2**24
STANDARD_12 = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")

#: numeric measurements read into ``comments`` and, as float64 columns, into the labels table
MEASUREMENTS = ("heart_rate_bpm", "atrial_rate_bpm", "pr_interval_ms", "qrs_duration_ms", "qt_interval_ms",
                "qtc_interval_ms", "p_axis_deg", "qrs_axis_deg", "t_axis_deg")

_UNIT_TO_MV = {"uv": 1e-3, "microvolts": 1e-3, "microvolt": 1e-3, "µv": 1e-3, "mv": 1.0, "millivolts": 1.0,
               "millivolt": 1.0, "v": 1e3, "volts": 1e3, "volt": 1e3, "nv": 1e-6, "nanovolts": 1e-6}


def measurement_labels(comments: dict[str, str]) -> dict[str, float]:
    """The numeric :data:`MEASUREMENTS` a hospital reader put into ``comments``, as floats (label columns)."""
    out = {}
    for name in MEASUREMENTS:
        if name in comments:
            try:
                value = float(comments[name])
            except ValueError:
                continue
            if math.isfinite(value):
                out[name] = value
    return out


# ----------------------------------------------------------------------------------------------- parsing


def _max_samples(opts: Any) -> int:
    value = getattr(opts, "max_samples", None) if opts is not None else None
    return int(value) if value else DEFAULT_MAX_SAMPLES


def parse_xml(path: Path, max_samples: int = DEFAULT_MAX_SAMPLES) -> Element:
    """The root element of ``path``, namespaces stripped from tags and attribute names.

    Refused (RejectedRecord): a file larger than 12 leads x ``max_samples`` x 8 bytes + 64 MiB (``too_large``,
    before reading), entity declarations, external references and malformed or truncated XML (``unreadable``).
    """
    import defusedxml
    import defusedxml.ElementTree as DET

    size = path.stat().st_size
    limit = 12 * max_samples * 8 + (64 << 20)
    if size > limit:
        raise RejectedRecord("too_large", f"{path.name}: {size / 2**20:.0f} MiB of XML is more than 12 leads of "
                                          f"--max-samples {max_samples} can take ({limit / 2**20:.0f} MiB)")
    try:
        root = DET.parse(str(path), forbid_dtd=False, forbid_entities=True, forbid_external=True).getroot()
    except defusedxml.EntitiesForbidden:
        raise RejectedRecord("unreadable", f"{path.name}: XML entity declarations are refused (an entity-expansion "
                                           "attack or an unsupported file)") from None
    except (defusedxml.ExternalReferenceForbidden, defusedxml.DTDForbidden, defusedxml.NotSupportedError) as e:
        raise RejectedRecord("unreadable", f"{path.name}: XML refused: {type(e).__name__}") from None
    except ParseError as e:
        raise RejectedRecord("unreadable", f"{path.name}: malformed or truncated XML ({e})") from None
    except (UnicodeError, ValueError) as e:
        raise RejectedRecord("unreadable", f"{path.name}: undecodable XML ({type(e).__name__}: {e})") from None
    for el in root.iter():
        if isinstance(el.tag, str) and "}" in el.tag:
            el.tag = el.tag.rsplit("}", 1)[1]
        if any("}" in k for k in el.attrib):
            el.attrib = {k.rsplit("}", 1)[-1]: v for k, v in el.attrib.items()}
    return root


def _text(el: Element | None, path: str = "") -> str:
    """Stripped text of ``el`` (or of its first descendant at ``path``); "" when absent."""
    if el is None:
        return ""
    node = el.find(path) if path else el
    return " ".join((node.text or "").split()) if node is not None else ""


def _num(value: str | None) -> float | None:
    try:
        x = float(value) if value not in (None, "") else None
    except ValueError:
        return None
    return x if x is not None and math.isfinite(x) else None


def _guarded(fmt: str, read: Callable[[Path, str, Any], Iterator[RawRecord]]):
    """Wrap a reader: an unexpected field value (a fuzzed or hand-edited file) becomes one ``unreadable`` reject
    naming the format and the error, never a traceback."""

    def wrapper(path: Path, record_id: str, opts: Any = None) -> Iterator[RawRecord]:
        try:
            yield from read(Path(path), record_id, opts)
        except RejectedRecord:
            raise
        except (ValueError, KeyError, IndexError, TypeError, OverflowError, AttributeError, binascii.Error,
                ZeroDivisionError) as e:
            raise RejectedRecord("unreadable", f"{Path(path).name}: malformed {fmt} content "
                                               f"({type(e).__name__}: {e})") from None

    wrapper.__name__ = read.__name__
    wrapper.__doc__ = read.__doc__
    return wrapper


def _check_size(n: int, max_samples: int, where: str) -> None:
    if n > max_samples:
        raise RejectedRecord("too_large", f"{where}: {n} samples per lead declared, more than --max-samples "
                                          f"{max_samples}")


def _standard_order(leads: list[str], rows: list[np.ndarray]) -> tuple[list[str], list[np.ndarray]]:
    """Leads in the standard 12-lead order first, the others after them in file order."""
    rank = {name: i for i, name in enumerate(STANDARD_12)}
    order = sorted(range(len(leads)), key=lambda i: (rank.get(leads[i], len(rank)), i))
    return [leads[i] for i in order], [rows[i] for i in order]


def _iso(d: str, t: str = "") -> str | None:
    """``YYYY-MM-DD[THH:MM:SS]`` from a date (ISO, MM-DD-YYYY, MM/DD/YYYY, YYYYMMDD) and a time (HH:MM[:SS])."""
    d = d.strip()
    for fmt in ("%Y-%m-%d", "%m-%d-%Y", "%m/%d/%Y", "%Y%m%d", "%d.%m.%Y"):
        try:
            day = datetime.strptime(d, fmt).date()
            break
        except ValueError:
            continue
    else:
        return None
    t = t.strip()
    for fmt in ("%H:%M:%S", "%H:%M"):
        try:
            return f"{day.isoformat()}T{datetime.strptime(t, fmt).time().isoformat()}"
        except ValueError:
            continue
    return day.isoformat()


def _hl7_ts(value: str) -> str | None:
    """HL7 TS ``YYYYMMDD[HHMM[SS[.fff]]]`` -> ISO."""
    m = re.fullmatch(r"(\d{4})(\d{2})(\d{2})(?:(\d{2})(\d{2})(\d{2})?(\.\d+)?)?(?:[+-]\d{4})?", value.strip())
    if not m:
        return None
    y, mo, d, hh, mi, ss, frac = m.groups()
    try:
        day = datetime(int(y), int(mo), int(d)).date().isoformat()
    except ValueError:
        return None
    if hh is None:
        return day
    return f"{day}T{hh}:{mi}:{ss or '00'}{frac or ''}"


def _sex(value: str) -> str | None:
    v = value.strip().lower()
    return "M" if v in ("m", "male") else "F" if v in ("f", "female") else None


def _age(value: str, units: str = "years") -> float | None:
    age = _num(value)
    if age is None or age < 0:
        return None
    scale = {"years": 1.0, "year": 1.0, "a": 1.0, "y": 1.0, "months": 1 / 12, "month": 1 / 12, "mo": 1 / 12,
             "weeks": 7 / 365.25, "week": 7 / 365.25, "wk": 7 / 365.25, "days": 1 / 365.25, "day": 1 / 365.25,
             "d": 1 / 365.25, "hours": 1 / 8766, "h": 1 / 8766}.get(units.strip().lower())
    return None if scale is None else round(age * scale, 3)



def _assemble(path: Path, record_id: str, fmt: str, fs: float | None, leads: list[str], counts: list[np.ndarray],
              steps: list[float], opts: Any, derive: bool = False, origins: list[float] | None = None) -> RawRecord:
    """The RawRecord of integer ADC ``counts`` (one int array per lead; physical mV = counts x ``steps`` +
    ``origins``), leads in the standard order. ``derive``: add III, aVR, aVL, aVF from I and II when none of
    them is stored (exactly: the record's counts become half-counts) and flag them in ``comments["derived_leads"]``.
    """
    lengths = {len(c) for c in counts}
    if not counts or not max(lengths, default=0):
        raise RejectedRecord("empty", f"{path.name}: the waveform holds no samples")
    if len(lengths) != 1:
        raise RejectedRecord("size_mismatch", f"{path.name}: leads of different lengths {sorted(lengths)}")
    leads = [_canonical(n) for n in leads]
    check_leads(leads, path.name)
    fs = check_sample_rate(fs, path.name)
    origins = list(origins) if origins is not None else [0.0] * len(leads)
    rows = [np.asarray(c, np.int64) for c in counts]
    steps = [float(s) for s in steps]
    if not all(math.isfinite(s) and s > 0 for s in steps):
        raise RejectedRecord("unreadable", f"{path.name}: amplitude resolution {steps} is not a positive number")
    derived: list[str] = []
    if (derive and "I" in leads and "II" in leads
            and steps[leads.index("I")] == steps[leads.index("II")]
            and origins[leads.index("I")] == origins[leads.index("II")] == 0):
        leads, half, derived = derive_limb_leads(leads, np.stack(rows))
        if derived:  # every lead now in half-counts
            rows = list(half)
            steps = [s / 2 for s in steps] + [steps[leads.index("I")] / 2] * len(derived)
            origins = origins + [0.0] * len(derived)
    rank = {name: i for i, name in enumerate(STANDARD_12)}
    order = sorted(range(len(leads)), key=lambda i: (rank.get(leads[i], len(rank)), i))
    leads = [leads[i] for i in order]
    digital = np.stack([rows[i] for i in order])
    step = np.array([steps[i] for i in order])
    origin = np.array([origins[i] for i in order])
    signal = (digital * step[:, None] + origin[:, None]).astype(np.float32)
    rec = RawRecord(record_id=record_id, source_path=str(path), source_format=fmt, sample_rate=fs, leads=leads,
                    signal=signal, units=["mV"] * len(leads))
    if derived:
        rec.comments["derived_leads"] = ",".join(derived)
    base = origin / step
    if (getattr(opts, "store_digital", False) and np.abs(digital).max() < 2**31
            and np.allclose(base, np.round(base))):
        rec.digital = digital.astype(np.int32)
        rec.gain = [float(1 / s) for s in step]
        rec.baseline = [int(-b) for b in np.round(base)]
    return rec


def _canonical(name: str) -> str:
    from ecgfm_cli.contract import canonical_lead

    return canonical_lead(name) or name.strip()


def _numbered(record_id: str, k: int, n: int) -> str:
    return record_id if n == 1 else f"{record_id}#{k + 1}"


def _b64(text: str, where: str) -> bytes:
    try:
        return binascii.a2b_base64(text.encode("ascii"))
    except (binascii.Error, UnicodeEncodeError) as e:
        raise RejectedRecord("unreadable", f"{where}: invalid base64 waveform data ({e})") from None


# -------------------------------------------------------------------------------------------- GE MUSE XML

_MUSE_MEASUREMENTS = {"VentricularRate": "heart_rate_bpm", "AtrialRate": "atrial_rate_bpm",
                      "PRInterval": "pr_interval_ms", "QRSDuration": "qrs_duration_ms",
                      "QTInterval": "qt_interval_ms", "QTCorrected": "qtc_interval_ms", "PAxis": "p_axis_deg",
                      "RAxis": "qrs_axis_deg", "TAxis": "t_axis_deg"}
#: TestDemographics fields kept in comments (everything else there, sites, carts, staff, edit times, is dropped)
_MUSE_KEEP = {"DataType": "data_type", "AcquisitionDevice": "device", "AcquisitionSoftwareVersion": "device_software",
              "AnalysisSoftwareVersion": "analysis_software", "Status": "status", "Priority": "priority"}
_MUSE_PATIENT_USED = {"PatientID", "PatientAge", "AgeUnits", "Gender", "PatientLastName", "PatientFirstName",
                      "DateofBirth"}


def _muse_statements(diag: Element | None) -> list[str]:
    """MUSE splits a statement line over several ``DiagnosisStatement`` elements; ``ENDSLINE`` ends a line."""
    lines, current = [], []
    for st in diag.findall("DiagnosisStatement") if diag is not None else []:
        if text := _text(st, "StmtText"):
            current.append(text)
        if any(_text(f).upper() == "ENDSLINE" for f in st.findall("StmtFlag")):
            lines.append(_join_pieces(current))
            current = []
    if current:
        lines.append(_join_pieces(current))
    return [ln for ln in lines if ln.strip()]


def _join_pieces(pieces: list[str]) -> str:
    return re.sub(r"\s+([,.;:])", r"\1", " ".join(pieces))


def _muse(path: Path, record_id: str, opts: Any) -> Iterator[RawRecord]:
    max_samples = _max_samples(opts)
    root = parse_xml(path, max_samples)
    if root.tag != "RestingECG":
        raise RejectedRecord("not_ecg", f"{path.name}: XML root <{root.tag}> is not GE MUSE <RestingECG>")
    rhythms = [wf for wf in root.findall("Waveform") if _text(wf, "WaveformType").lower() == "rhythm"]
    if not rhythms:
        kinds = sorted({_text(wf, "WaveformType") or "?" for wf in root.findall("Waveform")})
        raise RejectedRecord("not_ecg", f"{path.name}: no Rhythm waveform (has: {', '.join(kinds) or 'none'})")
    ids, comments = _muse_identifiers(root)
    diag = root.find("Diagnosis")
    if diag is None or not diag.findall("DiagnosisStatement"):
        diag = root.find("OriginalDiagnosis")
    known = [v for k in ("name", "persons") for v in ids.get(k, "").split("; ") if v]
    dx, removed = scrub_statements(_muse_statements(diag), known)
    original, removed_o = scrub_statements(_muse_statements(root.find("OriginalDiagnosis")), known)
    ids["other"] = join_identifier(ids.get("other"), *removed, *removed_o)
    if original and root.find("Diagnosis") is not None:
        comments["original_statements"] = " | ".join(original)
    meas = root.find("RestingECGMeasurements")
    for tag, name in _MUSE_MEASUREMENTS.items():
        if (v := _num(_text(meas, tag))) is not None:
            comments[name] = f"{v:g}"
    test = root.find("TestDemographics")
    acquired = _iso(_text(test, "AcquisitionDate"), _text(test, "AcquisitionTime"))
    demo = root.find("PatientDemographics")
    age = _age(_text(demo, "PatientAge"), _text(demo, "AgeUnits") or "years")
    for k, wf in enumerate(rhythms):
        rec = _muse_waveform(path, _numbered(record_id, k, len(rhythms)), wf, opts, max_samples)
        rec.comments.update(comments)
        rec.dx_codes = list(dx)
        rec.age, rec.sex = age, _sex(_text(demo, "Gender"))
        rec.base_datetime = acquired
        rec.identifiers = dict(ids)
        yield rec


def _muse_identifiers(root: Element) -> tuple[dict[str, str], dict[str, str]]:
    demo, test = root.find("PatientDemographics"), root.find("TestDemographics")
    ids: dict[str, str] = {}
    if mrn := _text(demo, "PatientID"):
        ids["mrn"] = mrn
    ids["name"] = " ".join(p for p in (_text(demo, "PatientFirstName"), _text(demo, "PatientLastName")) if p)
    if (dob := _text(demo, "DateofBirth")) and (iso := _iso(dob)):
        ids["birth_date"] = iso
    other = [f"{el.tag}={_text(el)}" for el in (demo if demo is not None else []) if el.tag not in _MUSE_PATIENT_USED
             and _text(el)]
    comments: dict[str, str] = {}
    persons: dict[str, dict[str, str]] = {}
    for el in test if test is not None else []:
        value = _text(el)
        if not value:
            continue
        if el.tag in _MUSE_KEEP:
            comments[_MUSE_KEEP[el.tag]] = value
        elif m := re.fullmatch(r"(.*?)(Last|First|Middle)Name", el.tag):
            persons.setdefault(m.group(1), {})[m.group(2)] = value
        elif el.tag not in ("AcquisitionDate", "AcquisitionTime"):
            other.append(f"{el.tag}={value}")
    ids["persons"] = join_identifier(*(" ".join(p for p in (d.get("First"), d.get("Middle"), d.get("Last")) if p)
                                       for d in persons.values()))
    if (version := _text(root, "MuseInfo/MuseVersion")):
        comments["muse_version"] = version
    for el in root.findall("PharmaData"):  # unique ECG ids and cart ids spell out the device and the time
        other.extend(f"{c.tag}={_text(c)}" for c in el if _text(c))
    ids["other"] = join_identifier(*other)
    return {k: v for k, v in ids.items() if v}, comments


def _muse_waveform(path: Path, record_id: str, wf: Element, opts: Any, max_samples: int) -> RawRecord:
    base, exp = _num(_text(wf, "SampleBase")), _num(_text(wf, "SampleExponent")) or 0.0
    fs = base * 10.0 ** exp if base is not None else None
    leads, counts, steps = [], [], []
    for ld in wf.findall("LeadData"):
        name = _text(ld, "LeadID")
        where = f"{path.name}: lead {name or '?'}"
        n = _num(_text(ld, "LeadSampleCountTotal"))
        if n is not None:
            _check_size(int(n), max_samples, where)
        size = int(_num(_text(ld, "LeadSampleSize")) or 2)
        if size != 2:
            raise RejectedRecord("unreadable", f"{where}: LeadSampleSize {size} (only 2-byte samples are defined)")
        text = _text(ld, "WaveFormData")
        if n is None:  # no declared count: bound by the base64 length before decoding
            _check_size(len(text) * 3 // 8, max_samples, where)
        data = _b64(text, where)
        if (crc := _text(ld, "LeadDataCRC32")) and crc.isdigit() and zlib.crc32(data) != int(crc):
            raise RejectedRecord("unreadable", f"{where}: waveform CRC32 mismatch (corrupt or edited data)")
        if n is not None and len(data) != 2 * int(n):
            raise RejectedRecord("size_mismatch", f"{where}: {len(data)} bytes of waveform data, "
                                                  f"{int(n)} samples declared")
        if len(data) % 2:
            raise RejectedRecord("size_mismatch", f"{where}: odd number of waveform bytes ({len(data)})")
        per_bit = _num(_text(ld, "LeadAmplitudeUnitsPerBit"))
        unit = (_text(ld, "LeadAmplitudeUnits") or "MICROVOLTS").lower()
        if per_bit is None or unit not in _UNIT_TO_MV:
            raise RejectedRecord("unreadable", f"{where}: amplitude {per_bit} {unit!r} per bit is not readable")
        leads.append(name)
        counts.append(np.frombuffer(data, "<i2"))
        steps.append(per_bit * _UNIT_TO_MV[unit])
    if not leads:
        raise RejectedRecord("empty", f"{path.name}: the Rhythm waveform has no LeadData")
    rec = _assemble(path, record_id, "ge-muse-xml", fs, leads, counts, steps, opts, derive=True)
    filters = [f"{k}={_text(wf, k)}" for k in ("HighPassFilter", "LowPassFilter", "ACFilter") if _text(wf, k)]
    if filters:
        rec.comments["filters"] = ", ".join(filters)
    return rec


read_muse = _guarded("GE MUSE XML", _muse)
read_muse.__doc__ = """GE MUSE XML (``<RestingECG>``): the Rhythm waveform (base64 int16 LE, LeadAmplitudeUnitsPerBit
and LeadAmplitudeUnits per lead, SampleBase x 10^SampleExponent Hz), CRC32 checked; the 8 stored leads (I, II,
V1-V6) completed with III, aVR, aVL, aVF derived from I and II (``comments["derived_leads"]``); the Median
waveform is left out. Confirmed statements (else the machine's) -> dx_codes, scrubbed; measurements -> comments
(and label columns, :data:`MEASUREMENTS`)."""


# ----------------------------------------------------------------------------------------- Philips Sierra XML

_LZW_BITS = 10
_LZW_MAX_CODE = (1 << _LZW_BITS) - 2  # 1022; the code 1023 ends a chunk


def lzw_decode(data: bytes, max_out: int) -> bytes:
    """Philips XLI's LZW: 10-bit codes read most-significant bit first, a table of 256 single bytes plus up
    to 767 strings, no clear code. Raises RejectedRecord when the output would exceed ``max_out`` bytes (a
    corrupt stream can expand a thousandfold) or a code refers to nothing yet."""
    bits = np.unpackbits(np.frombuffer(data, np.uint8))
    n = len(bits) // _LZW_BITS
    codes = bits[: n * _LZW_BITS].reshape(n, _LZW_BITS).astype(np.int32) @ (1 << np.arange(_LZW_BITS - 1, -1, -1))
    table: list[bytes | None] = [bytes([i]) for i in range(256)] + [None] * (_LZW_MAX_CODE + 1 - 256)
    out: list[bytes] = []
    total, next_code, prev = 0, 256, b""
    for code in codes.tolist():
        if code > _LZW_MAX_CODE:
            break
        entry = table[code]
        if entry is None:
            if not prev:
                raise RejectedRecord("unreadable", "XLI stream refers to an undefined LZW code")
            entry = prev + prev[:1]
            table[code] = entry
        if prev and next_code <= _LZW_MAX_CODE:
            table[next_code] = prev + entry[:1]
            next_code += 1
        prev = entry
        out.append(entry)
        total += len(entry)
        if total > max_out:
            raise RejectedRecord("size_mismatch", f"XLI chunk decodes to more than the {max_out} bytes declared")
    return b"".join(out)


def xli_decode(data: bytes, max_samples: int) -> list[np.ndarray]:
    """Philips XLI compression -> one int64 array per stored lead (still the limb-lead residuals, see
    :func:`_philips_limb_leads`). Each chunk: 8-byte header (int32 LE size, 2 bytes, int16 LE first value),
    then ``size`` bytes of LZW; the bytes unpack into int16 (high bytes first half, low bytes second) second
    differences, integrated with the first value as in the reference decoder (sierraecg)."""
    leads, offset = [], 0
    while offset < len(data):
        if offset + 8 > len(data):
            raise RejectedRecord("unreadable", f"XLI stream ends inside a chunk header at byte {offset}")
        size = int.from_bytes(data[offset:offset + 4], "little", signed=True)
        first = int.from_bytes(data[offset + 6:offset + 8], "little", signed=True)
        offset += 8
        if size < 0 or offset + size > len(data):
            raise RejectedRecord("unreadable", f"XLI chunk of {size} bytes runs past the data ({len(data)} bytes)")
        raw = lzw_decode(data[offset:offset + size], 2 * max_samples + 2)
        offset += size
        if len(raw) % 2:
            raw += b"\0"
        half = len(raw) // 2
        b = np.frombuffer(raw, np.uint8).astype(np.uint16)
        d = ((b[:half] << 8) | b[half:]).view(np.int16).astype(np.int64)
        out = d.copy()
        if half > 2:
            # out[i] = 2 out[i-1] - out[i-2] - c[i], c[2] = first, c[i] = d[i-1] - 64: a twice-integrated series
            c = np.concatenate([[first], d[2:-1] - 64])
            steps = (d[1] - d[0]) - np.cumsum(c)
            out[2:] = d[1] + np.cumsum(steps)
        if out.size and (out.max() > 32767 or out.min() < -32768):
            raise RejectedRecord("unreadable", "XLI decoding leaves the 16-bit range (corrupt data)")
        leads.append(out)
    return leads


def _philips_limb_leads(counts: list[np.ndarray]) -> list[np.ndarray]:
    """Philips stores III, aVR, aVL, aVF as residuals from the values I and II predict; restore them (as the
    reference decoder does): III = II - I - r3, aVR = -r4 - floor((I + II) / 2), aVL = floor((I - III) / 2) - r5,
    aVF = floor((II + III) / 2) - r6."""
    one, two, r3, r4, r5, r6 = counts[:6]
    three = two - one - r3
    avr = -r4 - np.floor_divide(one + two, 2)
    avl = np.floor_divide(one - three, 2) - r5
    avf = np.floor_divide(two + three, 2) - r6
    return [one, two, three, avr, avl, avf, *counts[6:]]


def _calibration_tail(counts: list[np.ndarray]) -> int:
    """Number of trailing samples at which every lead holds the same value: the 1 mV calibration pulse and
    the zeros around it that Philips carts append after the ECG (a real 12-lead ECG never has all twelve
    leads, aVR = -(I + II) / 2 among them, equal)."""
    stack = np.stack(counts)
    same = (stack == stack[:1]).all(axis=0)
    if not same.size or not same[-1]:
        return 0
    last_differing = np.flatnonzero(~same)
    return int(same.size - (last_differing[-1] + 1 if last_differing.size else 0))


_PHILIPS_MEASUREMENTS = {"heart_rate_bpm": ("heartrate", "meanventrate"), "atrial_rate_bpm": ("atrialrate",),
                         "pr_interval_ms": ("meanprint",), "qrs_duration_ms": ("meanqrsdur",),
                         "qt_interval_ms": ("meanqtint",), "qtc_interval_ms": ("meanqtc",),
                         "p_axis_deg": ("pfrontaxis",), "qrs_axis_deg": ("qrsfrontaxis",),
                         "t_axis_deg": ("tfrontaxis",)}


def _philips(path: Path, record_id: str, opts: Any) -> Iterator[RawRecord]:
    max_samples = _max_samples(opts)
    root = parse_xml(path, max_samples)
    if root.tag != "restingecgdata":
        raise RejectedRecord("not_ecg", f"{path.name}: XML root <{root.tag}> is not Philips <restingecgdata>")
    doc_type, version = _text(root, "documentinfo/documenttype"), _text(root, "documentinfo/documentversion")
    sc = root.find("dataacquisition/signalcharacteristics")
    pw = root.find("waveforms/parsedwaveforms")
    if pw is None:
        raise RejectedRecord("not_ecg", f"{path.name}: Philips {doc_type} {version} without <parsedwaveforms>")
    fs = _num(_text(sc, "samplingrate")) or _num(pw.get("samplespersecond"))
    res = _num(_text(sc, "resolution")) or _num(_text(sc, "signalresolution")) or _num(pw.get("resolution"))
    if res is None or res <= 0:
        raise RejectedRecord("unreadable", f"{path.name}: no amplitude resolution (resolution/signalresolution)")
    offset = _num(_text(sc, "signaloffset")) or _num(pw.get("signaloffset")) or 0.0
    duration = _num(pw.get("durationperchannel"))
    if duration is None or fs is None or fs <= 0:
        raise RejectedRecord("bad_sample_rate", f"{path.name}: no samplingrate or durationperchannel")
    n = int(round(duration * fs / 1000))
    _check_size(n, max_samples, path.name)
    labels_attr = pw.get("leadlabels", "").split()
    if labels_attr:
        count = int(_num(pw.get("numberofleads")) or len(labels_attr))
        labels = labels_attr[:count]
    else:
        count = int(_num(_text(sc, "numberchannelsallocated")) or 12)
        std = _text(sc, "acquisitiontype") in ("STD-12", "10-WIRE") or _text(sc, "leadset") == "STD-12"
        labels = [STANDARD_12[i] if std and i < 12 else f"Channel {i + 1}" for i in range(count)]
    if (pw.get("dataencoding") or "Base64") != "Base64":
        raise RejectedRecord("unreadable", f"{path.name}: waveform encoding {pw.get('dataencoding')!r} (only Base64)")
    data = _b64(pw.text or "", path.name)
    method = pw.get("compressmethod") or pw.get("compression") or "Uncompressed"
    if method == "XLI":
        try:
            counts = xli_decode(data, max(n, 1))
        except RejectedRecord as e:
            raise RejectedRecord(e.reason, f"{path.name}: {e.detail}") from None
    elif method == "Uncompressed":
        if len(data) < 2 * n * len(labels):
            raise RejectedRecord("size_mismatch", f"{path.name}: {len(data)} bytes for {len(labels)} x {n} samples")
        flat = np.frombuffer(data[: 2 * n * len(labels)], "<i2").astype(np.int64)
        counts = list(flat.reshape(len(labels), n))
    else:
        raise RejectedRecord("unreadable", f"{path.name}: waveform compression {method!r} (XLI or none)")
    if len(counts) < len(labels):
        raise RejectedRecord("size_mismatch", f"{path.name}: {len(counts)} leads decoded, {len(labels)} named")
    counts = [c[:n] for c in counts[: len(labels)]]
    if len({len(c) for c in counts}) != 1 or len(counts[0]) != n:
        raise RejectedRecord("size_mismatch", f"{path.name}: decoded lead lengths {sorted({len(c) for c in counts})},"
                                              f" {n} samples declared ({duration:g} ms at {fs:g} Hz)")
    if [_canonical(x) for x in labels[:6]] == list(STANDARD_12[:6]):
        counts = _philips_limb_leads(counts)
    tail = _calibration_tail(counts) if len(counts) > 1 else 0
    if tail:
        counts = [c[: len(c) - tail] for c in counts]
    counts = [c - int(offset) for c in counts] if offset else counts
    rec = _assemble(path, record_id, "philips-xml", fs, labels, counts, [res * 1e-3] * len(labels), opts)
    if tail:
        rec.comments["calibration_samples_removed"] = str(tail)
    rec.comments.update({"document": f"{doc_type} {version}".strip(), **_philips_comments(root)})
    _philips_patient(root, rec)
    yield rec


def _philips_comments(root: Element) -> dict[str, str]:
    out: dict[str, str] = {}
    if device := _text(root, "dataacquisition/machine"):
        out["device"] = device
    for name, tags in _PHILIPS_MEASUREMENTS.items():
        for tag in tags:
            el = next(root.iter(tag), None)
            if (v := _num(_text(el))) is not None:
                out[name] = f"{v:g}"
                break
    interp = root.find("interpretations/interpretation")
    if interp is not None and (severity := _text(interp, "severity")):
        out["severity"] = severity
    return out


def _philips_patient(root: Element, rec: RawRecord) -> None:
    gp = root.find("patient/generalpatientdata")
    ids: dict[str, str] = {}
    ids["mrn"] = _text(gp, "MRN") or _text(gp, "patientid") or _text(gp, "uniquepatientid")
    ids["name"] = " ".join(p for p in (_text(gp, "name/firstname"), _text(gp, "name/middlename"),
                                       _text(gp, "name/lastname")) if p)
    age_el = gp.find("age") if gp is not None else None
    if (dob := _text(age_el, "dateofbirth")) and (iso := _iso(dob)):
        ids["birth_date"] = iso
    for unit in ("years", "months", "weeks", "days", "hours"):
        if rec.age is None and _text(age_el, unit):
            rec.age = _age(_text(age_el, unit), unit)
    rec.sex = _sex(_text(gp, "sex"))
    da = root.find("dataacquisition")
    if da is not None:
        rec.base_datetime = _iso(da.get("date", ""), da.get("time", ""))
    used = {"MRN", "patientid", "uniquepatientid", "firstname", "middlename", "lastname", "dateofbirth", "sex",
            "years", "months", "weeks", "days", "hours"}
    persons, other = [], []
    patient = root.find("patient")
    for el in patient.iter() if patient is not None else []:
        if el.tag not in used and _text(el) and not len(el):
            other.append(f"{el.tag}={_text(el)}")
    for section in ("userdefines", "orderinfo", "dataacquisition/acquirer", "documentinfo"):
        for el in root.find(section).iter() if root.find(section) is not None else []:
            if _text(el) and not len(el):
                other.append(f"{el.tag}={_text(el)}")
            other.extend(f"{el.tag}@{k}={v}" for k, v in el.attrib.items() if v.strip() and k not in ("index",))
    interp = root.find("interpretations/interpretation")
    if interp is not None:
        for tag in ("mdsignatureline", "overreadername", "confirmedby"):
            if value := _text(interp, tag):
                other.append(f"{tag}={value}")
        for el in interp.iter():
            if el.tag.endswith(("name", "by")) and _text(el) and el.tag != "statementcode":
                persons.append(_text(el))
    known = [v for v in (ids["name"], *persons) if v]
    codes, lines = [], []
    for st in interp.findall("statement") if interp is not None else []:
        left, right = _text(st, "leftstatement"), _text(st, "rightstatement")
        lines.append(f"{left}; {right}" if left and right else left or right)
        codes.append(_text(st, "statementcode"))
    kept, removed = scrub_statements(lines, known)
    rec.comments["statements"] = " | ".join(kept) if kept else ""
    if not rec.comments["statements"]:
        del rec.comments["statements"]
    dx = []
    for code, line in zip(codes, lines, strict=True):
        clean = scrub_statements([line.split("; ")[0]], known)[0]
        if code:
            dx.append(code)
        elif clean:
            dx.append(clean[0])
    rec.dx_codes = dx
    ids["persons"] = join_identifier(*persons)
    ids["other"] = join_identifier(*other, *removed)
    rec.identifiers = {k: v for k, v in ids.items() if v}


read_philips = _guarded("Philips XML", _philips)
read_philips.__doc__ = """Philips Sierra / PageWriter XML (``<restingecgdata>``, 1.03, 1.04, 1.04.01, 1.04.02):
XLI-decompressed (or uncompressed) int16 leads, limb leads restored from Philips' residuals, x ``resolution``
(1.04) / ``signalresolution`` (1.03) uV per count; UTF-8 and UTF-16 files. The calibration pulse appended after
the ECG is cut off (``comments["calibration_samples_removed"]``). Values equal the ``sierraecg`` package's."""


# ------------------------------------------------------------------------------------------------ HL7 aECG

_HL7_MEASUREMENTS = {"MDC_ECG_HEART_RATE": "heart_rate_bpm", "MDC_ECG_TIME_PD_PR": "pr_interval_ms",
                     "MDC_ECG_TIME_PD_QRS": "qrs_duration_ms", "MDC_ECG_TIME_PD_QT": "qt_interval_ms",
                     "MDC_ECG_TIME_PD_QTc": "qtc_interval_ms", "MDC_ECG_ANGLE_P_FRONT": "p_axis_deg",
                     "MDC_ECG_ANGLE_QRS_FRONT": "qrs_axis_deg", "MDC_ECG_ANGLE_T_FRONT": "t_axis_deg"}
_TIME_TO_S = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "min": 60.0}
_WS = np.zeros(256, bool)
_WS[[9, 10, 13, 32]] = True


def _count_tokens(text: str) -> int:
    """Whitespace-separated tokens of ``text``, counted with numpy (bounds a digits list before parsing it)."""
    b = np.frombuffer(text.encode("utf-8", "replace"), np.uint8)
    if not b.size:
        return 0
    word = ~_WS[b]
    return int(word[0]) + int(np.count_nonzero(word[1:] & ~word[:-1]))


def _digits(text: str, where: str, max_samples: int) -> np.ndarray:
    _check_size(_count_tokens(text), max_samples, where)
    if not text.strip():
        return np.zeros(0, np.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy warns, and stops, at the first token it cannot read
        try:
            return np.fromstring(text, dtype=np.int64, sep=" ")
        except (ValueError, DeprecationWarning):
            pass
        try:  # "12.0" is still an integer digit; "1.5" or "x" is not
            values = np.fromstring(text, dtype=np.float64, sep=" ")
        except (ValueError, DeprecationWarning):
            raise RejectedRecord("unreadable", f"{where}: <digits> holds something that is not a number") from None
    if not np.isfinite(values).all() or not np.array_equal(values, np.round(values)) or np.abs(values).max() > 2**53:
        raise RejectedRecord("unreadable", f"{where}: <digits> must be integers")
    return values.astype(np.int64)


def _lead_from_code(code: str) -> str:
    name = code.removeprefix("MDC_ECG_LEAD_")
    return {"AVR": "aVR", "AVL": "aVL", "AVF": "aVF", "-AVR": "-aVR"}.get(name.upper(), name)


def _hl7(path: Path, record_id: str, opts: Any) -> Iterator[RawRecord]:
    max_samples = _max_samples(opts)
    root = parse_xml(path, max_samples)
    if root.tag != "AnnotatedECG":
        raise RejectedRecord("not_ecg", f"{path.name}: XML root <{root.tag}> is not HL7 <AnnotatedECG>")
    series = [s for s in root.iter("series") if (s.find("code") is not None and s.find("code").get("code") ==
                                                  "RHYTHM")]
    if not series:
        kinds = sorted({(s.find("code").get("code", "?") if s.find("code") is not None else "?")
                        for s in root.iter("series")})
        raise RejectedRecord("not_ecg", f"{path.name}: HL7 aECG without a RHYTHM series"
                                        + (f" (has: {', '.join(kinds)})" if kinds else " (no waveform at all)"))
    sets = [(s, ss) for s in series for ss in s.findall("component/sequenceSet")]
    if not sets:
        raise RejectedRecord("not_ecg", f"{path.name}: the RHYTHM series holds no sequenceSet")
    ids, comments, age, sex = _hl7_subject(root)
    acquired = None
    for ts in (root.find("effectiveTime/center"), root.find("effectiveTime/low")):
        if ts is not None and (acquired := _hl7_ts(ts.get("value", ""))):
            break
    dx, lines = [], []
    for s in series:
        for ann in s.iter("annotation"):
            code, value = ann.find("code"), ann.find("value")
            if code is None or value is None:
                continue
            c = code.get("code", "")
            if c == "MDC_ECG_RHY" and value.get("code"):
                dx.append(value.get("code"))
            elif c in ("MDC_ECG_INTERPRETATION_STATEMENT", "MDC_ECG_INTERPRETATION") and _text(value):
                lines.append(_text(value))
        for aset in s.findall("subjectOf/annotationSet"):
            for ann in aset.findall("component/annotation"):  # global ones (beats' own are nested deeper)
                code, value = ann.find("code"), ann.find("value")
                name = _HL7_MEASUREMENTS.get(code.get("code", "")) if code is not None else None
                if name and value is not None and (v := _num(value.get("value"))) is not None:
                    comments.setdefault(name, f"{v:g}")
    known = [v for k in ("name", "persons") for v in ids.get(k, "").split("; ") if v]
    kept, removed = scrub_statements(lines, known)
    ids["other"] = join_identifier(ids.get("other"), *removed)
    for k, (_series, ss) in enumerate(sets):
        rec = _hl7_sequence_set(path, _numbered(record_id, k, len(sets)), ss, opts, max_samples)
        rec.comments.update(comments)
        rec.dx_codes = list(dict.fromkeys(dx + kept))
        rec.age, rec.sex = age, sex
        rec.base_datetime = rec.base_datetime or acquired
        rec.identifiers = {k2: v for k2, v in ids.items() if v}
        yield rec


def _hl7_subject(root: Element) -> tuple[dict[str, str], dict[str, str], float | None, str | None]:
    ids: dict[str, str] = {}
    comments: dict[str, str] = {}
    subject = next(root.iter("trialSubject"), None)
    sid = subject.find("id") if subject is not None else None
    if sid is not None and (sid.get("extension") or sid.get("root")):
        ids["mrn"] = sid.get("extension") or sid.get("root")
    person = subject.find("subjectDemographicPerson") if subject is not None else None
    if person is not None:
        ids["name"] = _text(person, "name")
        if (bt := person.find("birthTime")) is not None and (iso := _hl7_ts(bt.get("value", ""))):
            ids["birth_date"] = iso[:10]
    gender = person.find("administrativeGenderCode") if person is not None else None
    sex = _sex(gender.get("code", "")) if gender is not None else None
    age = None
    for obs in root.iter("relatedObservation"):
        code, value = obs.find("code"), obs.find("value")
        if code is not None and code.get("code") == "21612-7" and value is not None:  # LOINC "Reported Age"
            age = _age(value.get("value", ""), value.get("unit", "a"))
    persons, other, address = [], [], []
    subject_name = person.find("name") if person is not None else None
    for el in root.iter():
        if el.tag.endswith("Person") and el.tag != "subjectDemographicPerson":
            persons.extend(_text(n) for n in el.iter("name") if _text(n))
        elif el.tag == "addr":
            address.append(", ".join(_text(c) for c in el if _text(c)))
        elif (el.tag == "name" and el is not subject_name or el.tag == "text") and _text(el):
            other.append(_text(el))  # organisations, sites, free-text comments (subjectFindingComment, ...)
        if el.tag not in ("trialSubject", "clinicalTrial", "clinicalTrialProtocol"):
            for idel in el.findall("id"):
                if idel.get("extension") and el.tag not in ("AnnotatedECG", "series", "derivedSeries"):
                    other.append(f"{el.tag} id={idel.get('extension')}")
    ids["persons"] = join_identifier(*persons)
    ids["address"] = join_identifier(*address)
    ids["other"] = join_identifier(*[o for o in other if o not in persons])
    trial = next(root.iter("clinicalTrial"), None)
    if trial is not None and (tid := trial.find("id")) is not None and tid.get("extension"):
        comments["trial_id"] = tid.get("extension")
    tpe = next(root.iter("timepointEvent"), None)
    if tpe is not None and (code := tpe.find("code")) is not None and code.get("code"):
        comments["timepoint"] = code.get("code")
    rel = next(root.iter("relativeTimepoint"), None)
    if rel is not None and (code := rel.find("code")) is not None and code.get("code"):
        comments["relative_timepoint"] = code.get("code")
    return ids, comments, age, sex


def _hl7_sequence_set(path: Path, record_id: str, ss: Element, opts: Any, max_samples: int) -> RawRecord:
    fs, start = None, None
    leads, counts, steps, origins = [], [], [], []
    for seq in ss.findall("component/sequence"):
        code = seq.find("code")
        value = seq.find("value")
        if code is None or value is None:
            continue
        c = code.get("code", "")
        if c.startswith("TIME_"):
            inc = value.find("increment")
            if inc is not None:
                step = _num(inc.get("value"))
                unit = _TIME_TO_S.get((inc.get("unit") or "s").strip())
                if step and step > 0 and unit:
                    fs = 1.0 / (step * unit)
            head = value.find("head")
            if c == "TIME_ABSOLUTE" and head is not None:
                start = _hl7_ts(head.get("value", ""))
            continue
        where = f"{path.name}: lead {c}"
        origin, scale = value.find("origin"), value.find("scale")
        if scale is None or value.find("digits") is None:
            raise RejectedRecord("unreadable", f"{where}: a lead sequence without <scale> and <digits>")
        s_unit = _UNIT_TO_MV.get((scale.get("unit") or "uV").strip().lower())
        o_unit = _UNIT_TO_MV.get(((origin.get("unit") if origin is not None else None) or "uV").strip().lower())
        s_val = _num(scale.get("value"))
        o_val = _num(origin.get("value")) if origin is not None else 0.0
        if s_unit is None or o_unit is None or s_val is None or o_val is None:
            raise RejectedRecord("unreadable", f"{where}: origin/scale {o_val} x {s_val} with units that are not "
                                               "volts")
        leads.append(_lead_from_code(c))
        counts.append(_digits(value.find("digits").text or "", where, max_samples))
        steps.append(s_val * s_unit)
        origins.append(o_val * o_unit)
    if not leads:
        raise RejectedRecord("empty", f"{path.name}: the RHYTHM series holds no lead sequence")
    if fs is None:
        raise RejectedRecord("bad_sample_rate", f"{path.name}: no time sequence increment (sample interval)")
    rec = _assemble(path, record_id, "hl7-aecg", fs, leads, counts, steps, opts, derive=True, origins=origins)
    rec.base_datetime = start
    return rec


read_hl7_aecg = _guarded("HL7 aECG", _hl7)
read_hl7_aecg.__doc__ = """HL7 aECG (``<AnnotatedECG>``): each sequenceSet of each RHYTHM series (derived
representative beats left out) is one record: origin + scale x digits per lead, units from the scale (uV, mV,
V), the sample rate from the time sequence's increment. Rhythm annotations and interpretation statements ->
dx_codes (scrubbed); global measurement annotations -> comments; the trial subject id, name, birth time, staff,
sites and free text -> identifiers; trial id and time point codes -> comments."""
