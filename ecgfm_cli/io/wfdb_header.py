"""A tolerant parser for WFDB header (``.hea``) files.

It accepts everything wfdb-python accepts plus the quirks seen in real ECG collections:
CRLF line endings, blank lines and ``#`` comment lines anywhere (also before the record line),
ISO or other non-WFDB dates on the record line, record names with an extension
(2020-release Georgia headers: ``E00015.mat 12 500 5000 05-May-2020 14:50:55``).

Semantics follow the WFDB header specification (and wfdb-python's reading defaults):
sampling frequency defaults to 250 Hz, a missing or zero ADC gain means 200 units per
physical unit, a missing baseline equals the ADC zero (or 0), units default to ``mV``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_FMT_RE = re.compile(r"^(\d+)(?:x(\d+))?(?::(\d+))?(?:\+(\d+))?$")
_GAIN_RE = re.compile(r"^([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)(?:\((-?\d+)\))?(?:/(.*))?$")
_FS_RE = re.compile(r"^(\d*\.?\d*(?:[eE][-+]?\d+)?)(?:/([-\d.eE+]*)(?:\(([-\d.]*)\))?)?$")

DEFAULT_FS = 250.0
DEFAULT_GAIN = 200.0


class HeaderError(ValueError):
    """A header that cannot be parsed; ``line`` is 1-based (0 when not tied to a line)."""

    def __init__(self, line: int, message: str):
        super().__init__(f"line {line}: {message}" if line else message)
        self.line = line
        self.message = message


@dataclass
class SignalSpec:
    """One signal line. ``byte_offset``/``skew`` are 0 when absent; ``gain`` is ADC units per ``units``."""

    file_name: str
    fmt: str
    samps_per_frame: int = 1
    skew: int = 0
    byte_offset: int = 0
    gain: float = DEFAULT_GAIN
    baseline: int = 0
    units: str = "mV"
    adc_res: int | None = None
    adc_zero: int = 0
    init_value: int | None = None
    checksum: int | None = None
    block_size: int = 0
    name: str = ""
    line: int = 0


@dataclass
class WfdbHeader:
    """A parsed header. ``sig_len`` is None when the header leaves it out (infer from the file).

    ``segments`` holds ``(name, length)`` for multi-segment headers (``n_seg`` is not None).
    ``comments`` are the comment lines without the leading ``#`` and surrounding blanks.
    """

    record_name: str
    n_sig: int
    fs: float
    sig_len: int | None
    base_datetime: str | None = None
    n_seg: int | None = None
    counter_freq: float | None = None
    signals: list[SignalSpec] = field(default_factory=list)
    segments: list[tuple[str, int]] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)
    fs_line: int = 0


def _int(tok: str, what: str, line: int) -> int:
    try:
        return int(tok)
    except ValueError:
        raise HeaderError(line, f"{what} {tok!r} is not an integer") from None


def _parse_record_line(line: str, lineno: int) -> WfdbHeader:
    toks = line.split()
    if len(toks) < 2:
        raise HeaderError(lineno, f"record line {line.strip()!r} has no signal count")
    name_tok = toks[0]
    n_seg = None
    if "/" in name_tok:
        name_tok, seg = name_tok.split("/", 1)
        n_seg = _int(seg, "segment count", lineno)
    n_sig = _int(toks[1], "signal count", lineno)
    fs, counter_freq = DEFAULT_FS, None
    if len(toks) > 2:
        m = _FS_RE.match(toks[2])
        if m and m.group(1) not in ("", "."):
            fs = float(m.group(1))
            if m.group(2):
                try:
                    counter_freq = float(m.group(2))
                except ValueError:
                    counter_freq = None
        else:
            try:  # a negative, NaN or infinite rate is still a number: check_sample_rate rejects it as bad_sample_rate
                fs = float(toks[2].split("/", 1)[0])
            except ValueError:
                raise HeaderError(lineno, f"sample rate {toks[2]!r} is not a number") from None
    sig_len = _int(toks[3], "signal length", lineno) if len(toks) > 3 else None
    base = " ".join(toks[4:]) or None
    return WfdbHeader(record_name=name_tok, n_sig=n_sig, fs=fs, sig_len=sig_len, base_datetime=base,
                      n_seg=n_seg, counter_freq=counter_freq, fs_line=lineno)


def _digits(tok: str) -> bool:
    """ASCII decimal digits only (what ``\\d+`` means for the header's usual spelling)."""
    return tok.isdigit() and tok.isascii()


def _parse_fmt(tok: str, lineno: int) -> tuple[str, int, int, int]:
    """``fmt[xspf][:skew][+offset]`` -> (fmt, samps_per_frame, skew, byte_offset)."""
    # fast paths for the usual spellings (``16``, ``16+24``); anything else goes to the regex
    if _digits(tok):
        return str(int(tok)), 1, 0, 0
    fmt, plus, offset = tok.partition("+")
    if plus and _digits(fmt) and _digits(offset):
        return str(int(fmt)), 1, 0, int(offset)
    m = _FMT_RE.match(tok)
    if not m:
        raise HeaderError(lineno, f"signal format {tok!r} is not valid")
    return (str(int(m.group(1))), (int(m.group(2)) or 1) if m.group(2) else 1,
            int(m.group(3)) if m.group(3) else 0, int(m.group(4)) if m.group(4) else 0)


def _parse_gain(tok: str, lineno: int) -> tuple[float, int | None, str | None]:
    """``gain[(baseline)][/units]`` -> (gain or 0.0, baseline or None, units or None)."""
    head, _slash, units = tok.partition("/")
    number, paren, rest = head.partition("(")
    baseline = None
    ok = _digits(number.replace(".", "", 1))  # 200, 200.0, 200., .5: the usual spellings
    if ok and paren:
        inner = rest[:-1]
        ok = rest.endswith(")") and _digits(inner[1:] if inner.startswith("-") else inner)
        baseline = int(inner) if ok else None
    if ok:
        return float(number), baseline, units or None
    g = _GAIN_RE.match(tok)
    if not g:
        raise HeaderError(lineno, f"ADC gain {tok!r} is not valid")
    return (float(g.group(1)), int(g.group(2)) if g.group(2) is not None else None, g.group(3) or None)


def _parse_signal_line(line: str, lineno: int) -> SignalSpec:
    toks = line.split(None, 8)
    if len(toks) < 2:
        raise HeaderError(lineno, f"signal line {line.strip()!r} has no format")
    fmt, spf, skew, offset = _parse_fmt(toks[1], lineno)
    spec = SignalSpec(file_name=toks[0], fmt=fmt, samps_per_frame=spf, skew=skew, byte_offset=offset, line=lineno)
    baseline_given = False
    if len(toks) > 2:
        gain, baseline, units = _parse_gain(toks[2], lineno)
        spec.gain = gain or DEFAULT_GAIN
        if baseline is not None:
            spec.baseline, baseline_given = baseline, True
        if units:
            spec.units = units
    if len(toks) > 3:
        spec.adc_res = _int(toks[3], "ADC resolution", lineno)
    if len(toks) > 4:
        spec.adc_zero = _int(toks[4], "ADC zero", lineno)
        if not baseline_given:
            spec.baseline = spec.adc_zero
    if len(toks) > 5:
        spec.init_value = _int(toks[5], "initial value", lineno)
    if len(toks) > 6:
        spec.checksum = _int(toks[6], "checksum", lineno)
    if len(toks) > 7:
        spec.block_size = _int(toks[7], "block size", lineno)
    if len(toks) > 8:
        spec.name = toks[8].strip()
    return spec


def parse_header(text: str) -> WfdbHeader:
    """Parse the text of a ``.hea`` file. Raises :class:`HeaderError` naming the offending line."""
    header: WfdbHeader | None = None
    comments: list[str] = []
    extra = 0
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            comments.append(line[1:].strip())
            continue
        # A `#` after the fields starts a trailing comment in WFDB syntax.
        if header is None:
            header = _parse_record_line(line.split("#", 1)[0], lineno)
            continue
        n_expected = header.n_seg if header.n_seg is not None else header.n_sig
        n_have = len(header.segments) if header.n_seg is not None else len(header.signals)
        if n_have >= n_expected:
            extra += 1  # wfdb-python reads every non-comment line as a signal line: the count must agree
            continue
        if header.n_seg is not None:
            toks = line.split()
            if len(toks) < 2:
                raise HeaderError(lineno, f"segment line {line!r} has no length")
            header.segments.append((toks[0], _int(toks[1], "segment length", lineno)))
        else:
            header.signals.append(_parse_signal_line(line, lineno))
    if header is None:
        raise HeaderError(0, "no record line")
    if header.n_seg is None and (len(header.signals) < header.n_sig or extra):
        raise HeaderError(header.fs_line, f"record line declares {header.n_sig} signals but "
                                          f"{len(header.signals) + extra} signal lines follow")
    if header.n_seg is not None and (len(header.segments) < header.n_seg or extra):
        raise HeaderError(header.fs_line, f"record line declares {header.n_seg} segments but "
                                          f"{len(header.segments) + extra} segment lines follow")
    header.comments = comments
    return header


# ---------------------------------------------------------------------------------------------
# Comment metadata

_SEX = {"m": "M", "male": "M", "f": "F", "female": "F"}
_TRUE = {"true", "1", "yes", "y", "positive"}
_FALSE = {"false", "0", "no", "n", "negative"}


def binary_labels(comments: dict[str, str]) -> dict[str, float]:
    """Yes/no labels a header states as ``# <Name> label: True|False`` (the Challenge 2025 ``Chagas label``):
    ``{"chagas": 1.0 or 0.0}``. A stated False is a known negative, which a code list cannot say."""
    out = {}
    for key, value in comments.items():
        if key.lower().endswith(" label") and value.strip().lower() in _TRUE | _FALSE:
            name = "_".join(key[: -len(" label")].lower().split())
            out[name] = 1.0 if value.strip().lower() in _TRUE else 0.0
    return out


@dataclass
class HeaderMeta:
    """Metadata carried by ``# Key: value`` header comments.

    Consumed keys (case-insensitive): Age, Sex, Dx (comma-separated SNOMED codes), Labels
    (comma-separated names), Patient ID, Exam ID / Study ID (-> study_id), Chagas label
    (``True`` adds dx code ``chagas``; the key is also kept in ``comments``). Every other
    ``Key: value`` goes to ``comments``; free-text comment lines are joined with newlines under
    the key ``"notes"``.
    """

    patient_id: str | None = None
    study_id: str | None = None
    age: float | None = None
    sex: str | None = None
    dx_codes: list[str] = field(default_factory=list)
    comments: dict[str, str] = field(default_factory=dict)


def parse_age(value: str) -> float | None:
    try:
        age = float(value.strip())
    except ValueError:
        return None
    return age if age == age and age >= 0 else None  # NaN and negative mean unknown


def parse_sex(value: str) -> str | None:
    return _SEX.get(value.strip().lower())


def _split_codes(value: str) -> list[str]:
    return [c.strip() for c in value.split(",") if c.strip()]


def parse_comments(lines: list[str]) -> HeaderMeta:
    meta = HeaderMeta()
    notes: list[str] = []
    dx: list[str] = []
    for line in lines:
        key, sep, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if not sep or not key or len(key) > 80:
            if line:
                notes.append(line)
            continue
        k = key.lower()
        if k == "age":
            meta.age = parse_age(value)
        elif k == "sex":
            meta.sex = parse_sex(value)
        elif k in ("dx", "labels"):
            dx.extend(_split_codes(value))
        elif k in ("patient id", "patient_id", "subject id", "subject_id"):
            meta.patient_id = value or None
        elif k in ("exam id", "exam_id", "study id", "study_id"):
            meta.study_id = value or None
        else:
            if k == "chagas label" and value.lower() in _TRUE:
                dx.append("chagas")
            meta.comments[key] = value
    meta.dx_codes = list(dict.fromkeys(dx))
    if notes:
        meta.comments["notes"] = "\n".join(notes)
    return meta
