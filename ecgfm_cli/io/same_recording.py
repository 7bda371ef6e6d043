"""The same ECG found twice in one ingest: PTB-XL's 100 Hz and 500 Hz copies (and other parallel per-rate folders).

PTB-XL ships every recording as ``records100/<bucket>/<ecg_id>_lr`` and ``records500/<bucket>/<ecg_id>_hr``.
Ingested together they are two records, free to land in two splits; their headers name no patient. This module
finds such copies from the paths alone (before anything is read), and PTB-XL's own ``ptbxl_database.csv``
(columns ecg_id, patient_id, filename_lr, filename_hr) when it is beside the records, so that ingest can give
both copies one ``patient_id`` and ``study_id``.
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from ecgfm_cli.io.readers import Source
from ecgfm_cli.io.readers_common import strip_ext

PTBXL_DATABASE = "ptbxl_database.csv"
_PTBXL_COLUMNS = ("ecg_id", "patient_id", "filename_lr", "filename_hr")
#: a folder named after a sampling rate: ``records100`` (PTB-XL), ``500hz``, ``fs_250Hz``
_RATE_DIR = re.compile(r"(?i)^(?:records(?P<r1>\d+)|(?P<pre>.*?)(?P<r2>\d+)[ _-]?hz)$")
#: what a copy's file name carries besides the recording's name: PTB-XL's _lr/_hr, or the rate
_RATE_STEM = re.compile(r"(?i)(?:_lr|_hr|[_-]\d+[ _-]?hz)$")


@dataclass
class Grouping:
    """``ids``: source path (absolute) -> (patient_id or None, study_id) to fill where a record names none;
    ``used``: metadata tables read here (not records); ``notes``: one line each for stderr."""

    ids: dict[str, tuple[str | None, str]] = field(default_factory=dict)
    used: set[str] = field(default_factory=set)
    notes: list[str] = field(default_factory=list)


def _rate_dir(name: str) -> tuple[str, int] | None:
    """``records100`` -> ("records", 100); ``500Hz`` -> ("", 500); None for a folder not named after a rate."""
    m = _RATE_DIR.match(name)
    if not m:
        return None
    rate = int(m.group("r1") or m.group("r2"))
    return ("records" if m.group("r1") else m.group("pre").lower()), rate


def _int_text(value: object) -> str | None:
    """A CSV id as text: ``15709.0`` -> ``15709`` (pandas wrote PTB-XL's patient ids as floats)."""
    if value is None:
        return None
    text = str(value).strip()
    try:
        f = float(text)
    except ValueError:
        return text or None
    return str(int(f)) if f.is_integer() else text


def _ptbxl_tables(sources: list[Source], roots: list[Path]) -> list[Path]:
    """``ptbxl_database.csv`` files among the sources, in the PATH folders or up to two folders above them."""
    found = {os.path.abspath(s.path) for s in sources if s.path.name.lower() == PTBXL_DATABASE}
    for r in roots:
        d = Path(os.path.abspath(r if r.is_dir() else r.parent))
        for folder in (d, d.parent, d.parent.parent):
            if (folder / PTBXL_DATABASE).is_file():
                found.add(str(folder / PTBXL_DATABASE))
    return [Path(p) for p in sorted(found)]


def _read_ptbxl(table: Path) -> dict[str, tuple[str | None, str]] | None:
    """record path without extension (absolute) -> (patient_id, ecg_id); None when it is not PTB-XL's table."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    try:
        t = pacsv.read_csv(table, convert_options=pacsv.ConvertOptions(
            include_columns=list(_PTBXL_COLUMNS), column_types={c: pa.string() for c in _PTBXL_COLUMNS}))
    except (pa.ArrowInvalid, OSError, KeyError):
        return None
    base = table.parent
    out: dict[str, tuple[str | None, str]] = {}
    cols = [t.column(c).to_pylist() for c in _PTBXL_COLUMNS]
    for ecg_id, pid, lr, hr in zip(*cols, strict=True):
        eid = _int_text(ecg_id)
        if eid is None:
            continue
        for name in (lr, hr):
            if name:
                out[os.path.abspath(base / name)] = (_int_text(pid), eid)
    return out


def group_copies(sources: list[Source], roots: list[Path]) -> Grouping:
    """Patient/study ids for records that are copies of one recording (``sources``: everything discovered)."""
    g = Grouping()
    records = [s for s in sources if s.kind in ("wfdb", "mat")]
    for table in _ptbxl_tables(sources, roots):
        ids = _read_ptbxl(table)
        if ids is None:
            continue
        n = 0
        for s in records:
            hit = ids.get(os.path.abspath(s.path.with_suffix("")))
            if hit is not None:
                g.ids[os.path.abspath(s.path)] = hit
                n += 1
        g.used.add(os.path.abspath(table))
        if n:
            patients = len({g.ids[os.path.abspath(s.path)][0] for s in records if os.path.abspath(s.path) in g.ids})
            g.notes.append(f"{table}: patient_id and study_id (ecg_id) of {n} records taken from it "
                           f"({patients} patients)")
    _group_by_layout(records, g)
    return g


def _group_by_layout(records: list[Source], g: Grouping) -> None:
    """Records whose paths differ only in one folder named after a rate (records100/records500) and in a rate
    mark on the file name (``_lr``/``_hr``) are copies: all get one study_id (their path below the rate folder,
    ``00000/00841``) and, where no patient is known, one patient_id ``recording:<that path>``."""
    groups: dict[tuple, list[tuple[int, Source, str]]] = defaultdict(list)
    for s in records:
        parts = os.path.abspath(s.path).split(os.sep)  # absolute: records100/ and records500/ may be two PATHs
        for i in range(len(parts) - 2, 0, -1):  # the rate folder nearest the file
            if not parts[i][-1:].isdigit() and parts[i][-2:].lower() != "hz":
                continue
            rd = _rate_dir(parts[i])
            if rd is None:
                continue
            rest = "/".join([*parts[i + 1:-1], _RATE_STEM.sub("", strip_ext(parts[-1]))])
            groups[(tuple(parts[:i]), rd[0], rest)].append((rd[1], s, rest))
            break
    pairs = [(m, m[0][2]) for m in groups.values() if len({rate for rate, _s, _r in m}) > 1]
    if not pairs:
        return
    n_copies = 0
    for members, rest in pairs:
        known = [g.ids[k][0] for _r, s, _x in members if (k := os.path.abspath(s.path)) in g.ids and g.ids[k][0]]
        pid = known[0] if known else f"recording:{rest}"
        sid = next((g.ids[k][1] for _r, s, _x in members if (k := os.path.abspath(s.path)) in g.ids), rest)
        for _rate, s, _x in members:
            k = os.path.abspath(s.path)
            g.ids[k] = (g.ids[k][0] or pid, g.ids[k][1]) if k in g.ids else (pid, sid)
        n_copies += 1
    members, _rest = pairs[0]
    rates = sorted({rate for m, _x in pairs for rate, _s, _r in m})
    x, y = (os.path.abspath(m[1].path) for m in sorted(members, key=lambda m: m[0])[:2])
    base = os.path.dirname(os.path.commonpath([x, y]))  # the rate folders' parent, so that the example shows them
    shown = ", ".join(f"{r} Hz" for r in rates)
    g.notes.append(f"{n_copies} recordings are here at {len(rates)} rates ({shown}), e.g. {os.path.relpath(x, base)} = "
                   f"{os.path.relpath(y, base)}: each one's copies share a patient_id and study_id, so that splits "
                   "keep them together; ingest one rate's folder alone to have each ECG once")
