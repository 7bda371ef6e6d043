"""Checks and naming rules shared by every reader."""

from __future__ import annotations

import math
import re
from pathlib import Path

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
