"""Raw-file readers for ``ecgfm ingest``: find sources under paths, read each into RawRecords.

``discover(paths)`` yields :class:`Source` objects in a deterministic order; ``read_source``
yields :class:`RawRecord` or :class:`RejectedRecord` for each and never raises.

record_id: the path relative to the PATH argument without extension (POSIX separators), the
file's stem when PATH is the file itself, with ``#<exam_id>`` appended for records inside a
CODE-15% HDF5 container.
patient_id / study_id: header comments ``# Patient ID:`` / ``# Exam ID:``, else the MIMIC-IV-ECG
path ``.../pNNNNNNNN/sNNNNNNNN/NNNNNNNN.hea``; CODE-15% HDF5 ``patient_id`` / ``exam_id``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ecgfm_cli.io.readers_common import make_record_id
from ecgfm_cli.io.record import RawRecord, RejectedRecord

#: extensions read as text tables (``.gz`` allowed on each)
CSV_EXTS = (".csv", ".txt", ".tsv")
HDF5_EXTS = (".h5", ".hdf5", ".hdf")
#: data-looking extensions without a reader: yielded so that read_source rejects them with a reason
UNSUPPORTED_EXTS = (".dat", ".edf", ".bdf", ".xml", ".scp", ".dcm", ".npy", ".npz", ".bin", ".raw", ".mat73",
                    ".parquet", ".gz")

KINDS = ("wfdb", "mat", "hdf5", "csv", "unsupported")


@dataclass(frozen=True)
class Source:
    """One file (or header + signal files) to read; ``root`` is the PATH argument it was found under."""

    path: Path
    root: Path
    kind: str  # one of KINDS; .mat files are classified (cpsc / fairseq) at read time


@dataclass
class ReadOptions:
    """What header-less files leave out (``ecgfm ingest`` flags).

    fs: Hz for text tables. leads: names of header-less text columns (default the 12 standard
    leads). gain: ADC units per mV for integer text tables (values divided by it, units "mV";
    without it units are ""). store_digital: also fill RawRecord.digital/gain/baseline where the
    source holds integer ADC values (WFDB; text tables with --gain).
    """

    fs: float | None = None
    leads: list[str] | None = None
    gain: float | None = None
    store_digital: bool = False


def _kind(name: str) -> str | None:
    low = name.lower()
    if low.endswith(".hea"):
        return "wfdb"
    if low.endswith(".mat"):
        return "mat"
    if low.endswith(HDF5_EXTS):
        return "hdf5"
    for ext in CSV_EXTS:
        if low.endswith(ext) or low.endswith(ext + ".gz"):
            return "csv"
    if low.endswith(UNSUPPORTED_EXTS):
        return "unsupported"
    return None


def _sources_in_dir(dirpath: Path, files: list[str], root: Path) -> Iterator[Source]:
    stems_with_header = {f[:-4].lower() for f in files if f.lower().endswith(".hea")}
    segments = _segment_headers(dirpath, files)
    named: set[str] | None = None  # signal files the headers of this folder name (read on the first orphan)
    for fname in files:
        kind = _kind(fname)
        if kind is None:
            continue
        if kind == "wfdb" and fname[:-4] in segments:
            continue  # read through its multi-segment master header
        low = fname.lower()
        stem = low.rsplit(".", 1)[0]
        if stem in stems_with_header and (low.endswith(".mat") or low.endswith(".dat")):
            continue  # the signal file of a WFDB header
        if kind == "unsupported" and low.endswith(".dat"):
            named = _signal_files_named(dirpath, files) if named is None else named
            if fname in named:
                continue
        yield Source(dirpath / fname, root, kind)


_SEGMENT_STEM = re.compile(r"^(.+)_(\d+|layout)$")


def _segment_headers(dirpath: Path, files: list[str]) -> set[str]:
    """Stems of the segment (and layout) headers that a multi-segment master header of this folder lists.

    WFDB names them ``<master>_<n>`` / ``<master>_layout``; only masters with such siblings are opened, so a
    folder of ordinary records costs no extra reads.
    """
    stems = {f[:-4]: f for f in files if f.lower().endswith(".hea")}
    masters = {m.group(1) for s in stems if (m := _SEGMENT_STEM.match(s)) and m.group(1) in stems}
    listed: set[str] = set()
    for master in sorted(masters):
        lines = _header_lines(dirpath / stems[master])
        if not lines or "/" not in lines[0][0]:
            continue  # not a multi-segment header
        listed.update(ln[0] for ln in lines[1:] if ln[0] != "~")
    return listed


def _signal_files_named(dirpath: Path, files: list[str]) -> set[str]:
    """The signal file names on the signal lines of this folder's headers (multi-file records name their
    ``.dat`` files freely, so a ``.dat`` without a same-stem header may still belong to a record)."""
    named: set[str] = set()
    for f in files:
        if f.lower().endswith(".hea"):
            named.update(toks[0] for toks in _header_lines(dirpath / f)[1:])
    return named


def _header_lines(path: Path) -> list[list[str]]:
    """The tokens of a WFDB header's record and signal (or segment) lines, comments left out; [] if unreadable."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    return [ln.split() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def discover(paths: list[Path]) -> Iterator[Source]:
    """Walk ``paths`` (files or directories, recursively, sorted) and yield one Source per record file.

    WFDB ``.hea`` (its ``.dat``/``.mat`` signal files are not yielded separately), standalone
    ``.mat``, HDF5 and text tables are yielded; other files (annotations, documents, images) are
    skipped, except data-looking files without a reader (``.edf``, orphan ``.dat``, ...), which
    read_source rejects.
    """
    for p in paths:
        p = Path(p)
        if p.is_file():
            kind = _kind(p.name)
            # An explicitly named file is always yielded, so that an unknown type is reported.
            yield Source(p, p, kind or "unsupported")
            continue
        if not p.is_dir():
            yield Source(p, p, _kind(p.name) or "unsupported")
            continue
        for dirpath, dirnames, files in os.walk(p):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            yield from _sources_in_dir(Path(dirpath), sorted(f for f in files if not f.startswith(".")), p)


def read_source(src: Source, opts: ReadOptions | None = None) -> Iterator[RawRecord | RejectedRecord]:
    """Yield the records of one source; every failure becomes a :class:`RejectedRecord`."""
    opts = opts or ReadOptions()
    record_id = make_record_id(src.path, src.root)
    try:
        if not src.path.exists():
            raise RejectedRecord("unreadable", f"{src.path}: no such file")
        if src.kind == "wfdb":
            from ecgfm_cli.io.readers_wfdb import read_wfdb

            yield read_wfdb(src.path, record_id, store_digital=opts.store_digital)
        elif src.kind == "mat":
            sibling = _header_beside(src.path)
            if sibling is not None:
                from ecgfm_cli.io.readers_wfdb import read_wfdb

                yield read_wfdb(sibling, record_id, store_digital=opts.store_digital)
            else:
                from ecgfm_cli.io.readers_other import read_mat

                yield read_mat(src.path, record_id)
        elif src.kind == "hdf5":
            from ecgfm_cli.io.readers_other import read_hdf5

            yield from read_hdf5(src.path, record_id)
        elif src.kind == "csv":
            from ecgfm_cli.io.readers_csv import read_csv

            yield read_csv(src.path, record_id, opts.fs, opts.leads, opts.gain, opts.store_digital)
        else:
            detail = (f"{src.path.name}: WFDB signal file without a .hea header" if src.path.suffix.lower() == ".dat"
                      else f"{src.path.name}: no reader for this file type")
            raise RejectedRecord("not_ecg", detail)
    except RejectedRecord as e:
        e.path = e.path or str(src.path)
        e.record_id = e.record_id or record_id
        yield e
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - a reader bug or an odd file must not stop the whole ingest
        yield RejectedRecord("unreadable", f"{src.path.name}: {type(e).__name__}: {e}", str(src.path), record_id)


def _header_beside(path: Path) -> Path | None:
    hea = path.with_suffix(".hea")
    return hea if hea.is_file() else None


def read_path(path: Path, opts: ReadOptions | None = None) -> list[RawRecord | RejectedRecord]:
    """Convenience: everything under one path, as a list (tests, notebooks)."""
    return [r for src in discover([Path(path)]) for r in read_source(src, opts)]
