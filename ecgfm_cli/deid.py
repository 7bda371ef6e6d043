"""De-identification of hospital ECG records (GE MUSE, Philips, HL7 aECG, DICOM, SCP-ECG, EDF, ISHNE).

Readers of hospital formats never put a direct identifier into ``patient_id``, ``comments`` or ``dx_codes``:
they collect them in ``RawRecord.identifiers`` (keys ``mrn``, ``name``, ``birth_date`` (YYYY-MM-DD),
``address``, ``persons``, ``other``) and pass every diagnosis statement through :func:`scrub_statement`.
``ingest`` then applies :class:`Deidentifier` to every record: the MRN becomes a keyed HMAC-SHA256 pseudonym
(``--id-key FILE``), the age is derived from the birth date when the file states none and capped at 90 (HIPAA
Safe Harbor), the acquisition date is cut to its year, and the identifiers are dropped; a record id or source
path that spells out one of them has it replaced. ``--keep-identifiers`` keeps them instead (in ``comments``,
MRN as ``patient_id``). What is removed and kept: docs/deidentification.md.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import date
from pathlib import Path

from ecgfm_cli.io.record import RawRecord

#: ``source_format`` values of the hospital readers: their records are de-identified even when the reader
#: found no identifier (the acquisition date is still cut to the year, ages still capped).
HOSPITAL_FORMATS = frozenset({"ge-muse-xml", "philips-xml", "hl7-aecg", "dicom-ecg", "scp-ecg", "edf", "bdf",
                              "ishne"})
IDENTIFIER_KEYS = ("mrn", "name", "birth_date", "address", "persons", "other")
AGE_CAP = 90  # HIPAA Safe Harbor: ages over 89 are aggregated into "90 or older"
MIN_KEY_BYTES = 16

# A statement that starts like this names a person (who confirmed, read, referred, ordered, performed...):
# the whole statement is dropped, it carries no finding.
_PERSON_LEAD = re.compile(
    r"^\W*(?:(?:confirmed|reviewed|over-?read|read|interpreted|signed|electronically\s+signed|verified|edited|"
    r"referred|requested|ordered|acquired|performed|recorded|approved|authenticated|dictated|transcribed|"
    r"reported|entered|attested|analy[sz]ed)\s+by\b"
    r"|(?:technician|tech|technologist|physician|doctor|dr|md|referring(?:\s+(?:md|physician|doctor))?|"
    r"attending(?:\s+(?:md|physician))?|ordering(?:\s+(?:md|physician|doctor))?|requesting(?:\s+physician)?|"
    r"operator|overreader|over-reader|reader|cardiologist|provider|fellow|nurse|editor|confirmer|"
    r"patient(?:\s+name)?|name|mrn|medical\s+record(?:\s+number)?|dob|date\s+of\s+birth|birth\s+date|"
    r"address|phone|ssn|room|bed|location|account|fin)\s*(?:#|:|no\.?\s*:?))",
    re.IGNORECASE)
# A title followed by a name, anywhere in a statement ("compared with the tracing read by Dr. A. Smith").
# (not Mr/Ms: "40 ms i V2" is a duration; the name must start with a letter)
_TITLED_NAME = re.compile(
    r"\b(?:by\s+)?(?:dr|doctor|prof|professor)(?:\.\s*|\s+)(?:[A-Za-z][\w'’-]*\.?\s*){1,3}"
    r"(?:,\s*(?:md|m\.d\.|phd))?", re.IGNORECASE)
_MONTH = r"(?:jan|feb|mar|apr|may|jun|jul|aug|sep|sept|oct|nov|dec)[a-z]*\.?"
_TIME = r"(?:\s*,?\s*(?:at\s+)?\d{1,2}:\d{2}(?::\d{2})?(?:\.\d+)?\s*(?:[ap]\.?m\.?)?)?"
_DATE = re.compile(
    r"\b(?:\d{4}[-/.]\d{1,2}[-/.]\d{1,2}"                       # 2021-05-10
    r"|\d{1,2}[-/.]\d{1,2}[-/.]\d{2,4}"                          # 05/10/2021, 10.05.21
    r"|\d{1,2}[-\s]" + _MONTH + r"[-\s,]*\d{2,4}"                 # 10-MAY-2021, 10 May 2021
    r"|" + _MONTH + r"\s+\d{1,2}(?:st|nd|rd|th)?,?\s+\d{4}"      # May 10, 2021
    r"|(?:19|20)\d{6}(?:\d{4,6})?)\b" + _TIME,                   # 20021122 / 20021122091000 (HL7 TS)
    re.IGNORECASE)
_CLOCK = re.compile(r"\b\d{1,2}:\d{2}(?::\d{2})?\s*(?:[ap]\.?m\.?\b)?", re.IGNORECASE)
_LONG_NUMBER = re.compile(r"\(?\b\d{6,}\b\)?")  # record numbers, staff ids, phone numbers
_SPACES = re.compile(r"\s{2,}")


def scrub_statement(text: str, known: Iterable[str] = ()) -> str | None:
    """A diagnosis statement with what could identify someone taken out; None when nothing of it may stay.

    Dropped whole: statements naming who confirmed, read, referred, ordered or performed the ECG ("Confirmed
    by Doe, John (123456) on 05/10/2021 1:15:09 PM", "Referred by: ...", "Technician: ..."). Replaced inside the
    others: dates and times -> ``[date]`` (the year is not kept in free text), a title with a name
    ("Dr. A. Smith") -> ``[person]``, numbers of 6 or more digits -> ``[id]``, and each string of ``known``
    (the record's own names and MRN, case-insensitive) -> ``[person]``. Measurements ("QRSd >115mS", "rate 60")
    and ordinary words are kept.
    """
    line = " ".join(str(text).split())
    if not line or _PERSON_LEAD.match(line):
        return None
    for token in sorted({k.strip() for k in known if k and len(k.strip()) >= 3}, key=len, reverse=True):
        line = re.sub(r"(?<!\w)" + re.escape(token) + r"(?!\w)", "[person]", line, flags=re.IGNORECASE)
    line = _DATE.sub("[date]", line)
    line = _CLOCK.sub("[date]", line)
    line = _TITLED_NAME.sub(lambda m: " [person] " if m.group(0)[0].isspace() else "[person] ", line)
    line = _LONG_NUMBER.sub("[id]", line)
    line = re.sub(r"\s+([,.;:])", r"\1", _SPACES.sub(" ", line)).strip(" ,;")
    return line or None


def scrub_statements(lines: Iterable[str], known: Iterable[str] = ()) -> tuple[list[str], list[str]]:
    """(kept, removed): each line through :func:`scrub_statement`; ``removed`` holds the lines dropped whole or
    changed, as they were (readers put them into ``identifiers["other"]``, kept only by ``--keep-identifiers``)."""
    known = list(known)
    kept, removed = [], []
    for raw in lines:
        raw = " ".join(str(raw).split())
        if not raw:
            continue
        clean = scrub_statement(raw, known)
        if clean is not None:
            kept.append(clean)
        if clean != raw:
            removed.append(raw)
    return kept, removed


def join_identifier(*parts: str | None) -> str:
    """Non-empty parts joined with ``; `` (the ``identifiers`` values' separator), duplicates left out."""
    out: list[str] = []
    for p in parts:
        for piece in (p or "").split("; "):
            piece = " ".join(piece.split())
            if piece and piece not in out:
                out.append(piece)
    return "; ".join(out)


@dataclass(frozen=True)
class DeidPolicy:
    """``key``: the secret of ``--id-key`` (None: no pseudonyms, patient_id left empty). ``keep_identifiers``:
    ``--keep-identifiers`` (no de-identification at all)."""

    key: bytes | None = None
    keep_identifiers: bool = False


def read_id_key(path: Path) -> bytes:
    """The ``--id-key`` secret: the file's bytes, trailing newline stripped; ValueError if under 16 bytes."""
    key = Path(path).read_bytes().rstrip(b"\r\n")
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(f"--id-key {path}: the key has {len(key)} bytes; use at least {MIN_KEY_BYTES} random bytes "
                         f"(e.g. `head -c 32 /dev/urandom | base64 > {Path(path).name}`) and keep it secret")
    return key


def pseudonym(mrn: str, key: bytes) -> str:
    """Keyed pseudonym of a patient id: HMAC-SHA256(key, MRN with surrounding space removed), first 20 hex
    digits (80 bits), ``"pid-"`` prefixed. The same MRN and key give the same pseudonym in every run."""
    digest = hmac.new(key, " ".join(mrn.split()).encode("utf-8"), hashlib.sha256).hexdigest()
    return "pid-" + digest[:20]


def age_from_dates(birth_date: str, acquired: str) -> float | None:
    """Whole years between ``birth_date`` (YYYY-MM-DD) and the date part of ``acquired`` (ISO, YYYY-MM-DD...);
    None when either is missing or malformed, or the birth date is after the acquisition."""
    try:
        b = date.fromisoformat(birth_date[:10])
        a = date.fromisoformat(acquired[:10])
    except (TypeError, ValueError):
        return None
    years = a.year - b.year - ((a.month, a.day) < (b.month, b.day))
    return float(years) if years >= 0 else None


def cap_age(age: float | None) -> float | None:
    """Ages over 89 become 90 (HIPAA Safe Harbor's "90 or older")."""
    return None if age is None else (float(AGE_CAP) if age > AGE_CAP - 1 else age)


def _date_forms(iso: str) -> set[str]:
    y, m, d = iso[:4], iso[5:7], iso[8:10]
    if not (y.isdigit() and m.isdigit() and d.isdigit()):
        return set()
    return {f"{y}-{m}-{d}", f"{y}{m}{d}", f"{m}-{d}-{y}", f"{m}/{d}/{y}", f"{d}.{m}.{y}"}


def _tokens(identifiers: dict[str, str], acquired: str | None = None) -> list[str]:
    """The strings of ``identifiers`` that must not appear in a record id or path: the MRN, each name and its
    words of 3+ letters, the birth date and the acquisition date (``acquired``, ISO) in the common spellings."""
    out: set[str] = set()
    if mrn := identifiers.get("mrn", "").strip():
        out.add(mrn)
    for key in ("name", "persons"):
        for full in identifiers.get(key, "").split("; "):
            full = full.strip()
            if len(full) >= 3:
                out.add(full)
            out.update(w for w in re.split(r"[^\w'-]+", full) if len(w) >= 3 and not w.isdigit())
    for iso in (identifiers.get("birth_date", ""), acquired or ""):
        out.update(_date_forms(iso))
    return sorted(out, key=len, reverse=True)


def _redact(text: str, tokens: list[str]) -> str:
    for tok in tokens:
        text = re.sub(r"(?<![^\W_])" + re.escape(tok) + r"(?![^\W_])", "REDACTED", text, flags=re.IGNORECASE)
    return text


class Deidentifier:
    """Applies a :class:`DeidPolicy` to the records of one ingest run and counts what it did (for the run's
    one-line warnings, see :meth:`messages`)."""

    def __init__(self, policy: DeidPolicy):
        self.policy = policy
        self.records = 0  # hospital records seen
        self.no_key = 0  # records with an MRN left without patient_id (no --id-key)
        self.renamed = 0  # record ids / paths that spelled out an identifier

    def __call__(self, record: RawRecord) -> RawRecord:
        if not record.identifiers and record.source_format not in HOSPITAL_FORMATS:
            return record  # WFDB and the other research formats: their ids are dataset pseudonyms already
        self.records += 1
        ids = {k: v for k, v in record.identifiers.items() if v}
        age = record.age
        if age is None and ids.get("birth_date") and record.base_datetime:
            age = age_from_dates(ids["birth_date"], record.base_datetime)
        if self.policy.keep_identifiers:
            comments = dict(record.comments)
            comments.update({f"identifier_{k}": v for k, v in ids.items()})
            return replace(record, patient_id=ids.get("mrn") or record.patient_id, age=age, comments=comments,
                           identifiers={})
        mrn = ids.get("mrn")
        if mrn and self.policy.key is not None:
            patient_id = pseudonym(mrn, self.policy.key)
        else:
            patient_id = None
            self.no_key += bool(mrn)
        year = record.base_datetime[:4] if record.base_datetime and record.base_datetime[:4].isdigit() else None
        tokens = _tokens(ids, record.base_datetime)
        record_id, source_path = _redact(record.record_id, tokens), _redact(record.source_path, tokens)
        self.renamed += (record_id, source_path) != (record.record_id, record.source_path)
        return replace(record, record_id=record_id, source_path=source_path, patient_id=patient_id,
                       age=cap_age(age), base_datetime=year, identifiers={})

    def messages(self) -> list[str]:
        """The warning lines this run owes its user (empty when there is nothing to say)."""
        out = []
        if self.policy.keep_identifiers and self.records:
            out.append(f"ingest: WARNING --keep-identifiers: {self.records} hospital record(s) were written WITH "
                       "their identifiers (MRN as patient_id; names, birth dates, staff and free text in comments); "
                       "do not share these outputs")
        if self.no_key:
            out.append(f"ingest: WARNING {self.no_key} hospital record(s) carry a patient id (MRN) but no --id-key "
                       "was given: their patient_id is left empty, so patient-grouped splits cannot group them; "
                       "rerun with --id-key FILE (a secret of 16+ bytes) for stable keyed pseudonyms")
        if self.renamed:
            out.append(f"ingest: {self.renamed} record id(s) or path(s) spelled out an identifier (MRN, a name, the "
                       "birth or acquisition date); "
                       "it was replaced by REDACTED in record_id and source_path")
        return out
