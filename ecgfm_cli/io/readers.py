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

import errno
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ecgfm_cli.io.readers_common import make_record_id
from ecgfm_cli.io.record import RawRecord, RejectedRecord

#: extensions read as text tables (``.gz`` allowed on each)
CSV_EXTS = (".csv", ".txt", ".tsv")
HDF5_EXTS = (".h5", ".hdf5", ".hdf")
#: hospital / Holter formats, told apart by content at read time (io/detect.py): a .xml can be any of four
SNIFF_EXTS = (".xml", ".dcm", ".dicom", ".scp", ".edf", ".bdf", ".ishne")
#: data-looking extensions without a reader: yielded so that read_source rejects them with a reason
UNSUPPORTED_EXTS = (".dat", ".npy", ".npz", ".bin", ".raw", ".mat73", ".parquet", ".gz")

KINDS = ("wfdb", "mat", "hdf5", "csv", "sniff", "unsupported")

#: ``--max-samples`` default: 2**24 samples per lead, about 4.7 h at 1 kHz (12 leads: 0.8 GB as float32)
DEFAULT_MAX_SAMPLES = 2**24


@dataclass(frozen=True)
class Source:
    """One file (or header + signal files) to read; ``root`` is the PATH argument it was found under.

    companions: names of the files in the same folder that are read with it (a header's signal files, the
    segment headers and files of a multi-segment master) or belong to it (its annotation files); the ingest
    summary counts them. A ``kind == "ignored"`` source is a file no reader is meant for (a document, an
    image, ...): read_source lists it as an ``ignored`` reject whose detail is ``note``.
    """

    path: Path
    root: Path
    kind: str  # one of KINDS; .mat files are classified (cpsc / fairseq) at read time
    companions: tuple[str, ...] = ()
    note: str = ""


@dataclass
class ReadOptions:
    """What header-less files leave out (``ecgfm ingest`` flags).

    fs: Hz for text tables. leads: names of header-less text columns (default the 12 standard
    leads). gain: ADC units per mV for integer text tables (values divided by it, units "mV";
    without it units are ""). store_digital: also fill RawRecord.digital/gain/baseline where the
    source holds integer ADC values (WFDB; text tables with --gain). max_samples: the most samples per
    lead a record may hold (None: unbounded); a reader rejects a larger one as ``too_large`` before
    allocating it.
    """

    fs: float | None = None
    leads: list[str] | None = None
    gain: float | None = None
    store_digital: bool = False
    max_samples: int | None = DEFAULT_MAX_SAMPLES


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
    if low.endswith(SNIFF_EXTS):
        return "sniff"
    if low.endswith(UNSUPPORTED_EXTS):
        return "unsupported"
    return None


#: what the files no reader is meant for are, by extension (the ``ignored`` reject's detail)
_IGNORED_EXTS = {
    "a document": (".md", ".rst", ".pdf", ".html", ".htm", ".doc", ".docx", ".odt", ".rtf", ".json", ".yaml", ".yml",
                   ".toml", ".ini", ".cfg", ".log", ".xls", ".xlsx", ".ods", ".bib", ".tex"),
    "an image": (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".tif", ".tiff", ".svg", ".webp", ".eps"),
    "code": (".py", ".ipynb", ".m", ".r", ".sh", ".c", ".h", ".cpp", ".java", ".js", ".pl", ".pyc"),
    "a checksum list": (".sha256", ".sha1", ".md5", ".sfv"),
    "an audio file": (".wav", ".mp3", ".ogg", ".m4a"),
    # annotators seen beside PhysioNet records; the header of the same name was not found
    "a WFDB annotation file without its record's header": (".atr", ".qrs", ".ann", ".apn", ".pu", ".pu0", ".pu1",
                                                           ".st", ".arh", ".wabp", ".wqrs", ".sqrs", ".gqrsh",
                                                           ".gqrsl", ".trigger", ".event", ".marker"),
}
_IGNORED_NAMES = {"readme": "a document", "license": "a document", "licence": "a document", "copying": "a document",
                  "records": "a WFDB record list", "annotators": "a WFDB annotator list",
                  "sha256sums": "a checksum list", "md5sums": "a checksum list", "manifest": "a document"}
#: archives are data the user most likely meant to ingest: a real reject, not an ignored file
_ARCHIVE_EXTS = (".zip", ".tar", ".tgz", ".tar.gz", ".tar.bz2", ".tar.xz", ".7z", ".rar", ".bz2", ".xz", ".zst")


def _what_is(name: str) -> str:
    """What a file without a reader is, for the ``ignored`` reject's detail."""
    low = name.lower()
    for what, exts in _IGNORED_EXTS.items():
        if low.endswith(exts):
            return what
    base = low.split(".", 1)[0]
    if base in _IGNORED_NAMES or low in _IGNORED_NAMES:
        return _IGNORED_NAMES.get(base) or _IGNORED_NAMES[low]
    return _UNKNOWN


_UNKNOWN = "a file of no known ECG type"


def _sniffs_as_ecg(path: Path) -> bool:
    """Whether the head of a file with no or an unknown extension is one of the formats io/detect.py reads (an
    XML file only with an ECG root element: other XML there is some tool's file, not a rejected ECG)."""
    from ecgfm_cli.io.detect import XML_ROOTS, sniff

    det = sniff(path)
    return det is not None and (det.fmt != "xml" or det.root in XML_ROOTS)


def _stem(name: str) -> str:
    return name.rsplit(".", 1)[0].lower() if "." in name else name.lower()


def _sources_in_dir(dirpath: Path, files: list[str], root: Path) -> Iterator[Source]:
    """The Sources of one folder's ``files`` (names, sorted): every name is a Source of its own, a companion of
    one (Source.companions), or an ``ignored`` Source."""
    headers = {f[:-4].lower(): f for f in files if f.lower().endswith(".hea")}
    segments = {stem.lower(): master for stem, master in _segment_headers(dirpath, files).items()}
    named: dict[str, str] | None = None  # signal file -> the header naming it (read on the first orphan .dat)
    companions: dict[str, list[str]] = {}  # header file -> its companions
    out: list[tuple[str, str]] = []  # (file, kind) in name order
    for fname in files:
        kind = _kind(fname)
        low = fname.lower()
        stem = _stem(fname)
        if kind == "wfdb":
            if stem in segments:
                companions.setdefault(segments[stem], []).append(fname)  # read through its multi-segment master
                continue
            out.append((fname, kind))
            continue
        if stem in headers and (kind is None or low.endswith((".mat", ".dat"))):
            # the header's signal file or an annotation of its record (a segment's: its master's); a .mat/.dat
            # the header does not name is read on its own after the header (read_source)
            companions.setdefault(segments.get(stem, headers[stem]), []).append(fname)
            continue
        if kind == "unsupported" and low.endswith(".dat"):
            named = _signal_files_named(dirpath, files) if named is None else named
            if fname in named:
                companions.setdefault(named[fname], []).append(fname)
                continue
        if kind is None and low.endswith(_ARCHIVE_EXTS):
            kind = "unsupported"
        if kind is None and _what_is(fname) == _UNKNOWN and _sniffs_as_ecg(dirpath / fname):
            kind = "sniff"  # no or an unknown extension (DICOM files often have none; ISHNE .ecg): by content
        out.append((fname, kind or "ignored"))
    for fname, kind in out:
        note = f"{fname}: {_what_is(fname)}, not an ECG record" if kind == "ignored" else ""
        yield Source(dirpath / fname, root, kind, tuple(companions.get(fname, ())), note)


_SEGMENT_STEM = re.compile(r"^(.+)_(\d+|layout)$")
_SEGMENT_SUFFIX = re.compile(r"^_?(\d+|layout)$")


def _segment_headers(dirpath: Path, files: list[str]) -> dict[str, str]:
    """Stems of the segment (and layout) headers that a multi-segment master header of this folder lists ->
    the file name of the (first) master listing it.

    Only likely masters are opened, so a folder of ordinary records costs no extra reads: a header with siblings
    named after it (``<master>_<n>``, ``<master><nn>`` as in 041s01, ``<master>_layout``), and, in a folder
    holding a ``*_layout`` header (MIMIC's variable-layout records, whose masters have unrelated names), every
    header not itself named like a segment.
    """
    stems = {f[:-4]: f for f in files if f.lower().endswith(".hea")}
    ordered = sorted(stems)
    masters: set[str] = set()
    for i, stem in enumerate(ordered):
        for other in ordered[i + 1:]:
            if not other.startswith(stem):
                break
            if _SEGMENT_SUFFIX.match(other[len(stem):]):
                masters.add(stem)
                break
    if any(s.endswith("_layout") for s in stems):
        masters.update(s for s in stems if not _SEGMENT_STEM.match(s))
    listed: dict[str, str] = {}
    for master in sorted(masters):
        lines = _header_lines(dirpath / stems[master])
        if not lines or "/" not in lines[0][0]:
            continue  # not a multi-segment header
        for ln in lines[1:]:
            if ln[0] != "~":
                listed.setdefault(ln[0], stems[master])
    return listed


def _signal_files_named(dirpath: Path, files: list[str]) -> dict[str, str]:
    """Signal file name -> the header of this folder naming it on a signal line (multi-file records name their
    ``.dat`` files freely, so a ``.dat`` without a same-stem header may still belong to a record)."""
    named: dict[str, str] = {}
    for f in files:
        if f.lower().endswith(".hea"):
            for toks in _header_lines(dirpath / f)[1:]:
                named.setdefault(toks[0], f)
    return named


def _header_lines(path: Path) -> list[list[str]]:
    """The tokens of a WFDB header's record and signal (or segment) lines, comments left out; [] if unreadable
    or not a regular file (a FIFO named like a header would block discovery)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return []
        text = path.read_text(errors="replace")
    except OSError:
        return []
    return [ln.split() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def _path_max() -> int:
    try:
        return os.pathconf("/", "PC_PATH_MAX")
    except (OSError, ValueError, AttributeError):
        return 4096


#: bytes a path may have, its terminating NUL included (Linux: 4096); a longer one cannot be opened by name
PATH_MAX = _path_max()


def _too_long(path: Path | str) -> bool:
    return len(os.fsencode(path)) >= PATH_MAX


def _walk(top: Path, inside: list[str]) -> Iterator[tuple[Path, list[str], list[Source]]]:
    """(folder, its file names sorted, the folders it holds that are not searched, as ``ignored`` Sources) for
    ``top`` and every folder below it, depth first in name order (as ``os.walk`` with sorted names); hidden
    names (``.git``, ``.DS_Store``) are left out.

    A symlink to a folder is followed unless its target lies inside one of the ``inside`` trees (the folder
    PATHs of the run, real paths: it is searched there at its own path) or was searched already; a folder
    that cannot be listed (permission) is an ``ignored`` Source whose note says why; the files of a folder
    whose path is past PATH_MAX are listed through directory descriptors, so that each becomes a reject.
    """
    visited: set[tuple[int, int]] = set()
    stack = [top]
    while stack:
        d = stack.pop()
        if _too_long(d):
            yield from _listed_past_path_max(d, top)
            continue
        try:
            st = os.stat(d)
            with os.scandir(d) as it:
                entries = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
        except OSError as e:
            yield d, [], [Source(d, top, "ignored", note=f"{d}: a folder that cannot be listed ({e.strerror})")]
            continue
        if (st.st_dev, st.st_ino) in visited:
            yield d, [], [Source(d, top, "ignored", note=f"{d}: a folder already searched under another name")]
            continue
        visited.add((st.st_dev, st.st_ino))
        files: list[str] = []
        subdirs: list[Path] = []
        skipped: list[Source] = []
        for e in entries:
            try:
                is_dir = e.is_dir()  # follows a symlink
            except OSError:
                is_dir = False
            if not is_dir:
                files.append(e.name)
                continue
            if e.is_symlink():
                target = os.path.realpath(e.path)
                if any(target == r or target.startswith(r.rstrip(os.sep) + os.sep) for r in inside):
                    skipped.append(Source(Path(e.path), top, "ignored", note=f"{e.path}: a link to a folder "
                                          f"searched at its own path in this run ({target})"))
                    continue
            subdirs.append(Path(e.path))
        yield d, files, skipped
        stack.extend(reversed(subdirs))


def _listed_past_path_max(d: Path, top: Path) -> Iterator[tuple[Path, list[str], list[Source]]]:
    """The folders below ``d`` (whose path is too long to open by name) with their files, walked through
    directory descriptors from the deepest ancestor that can be opened by name."""
    parts = d.parts
    k = len(parts)
    while k > 1 and _too_long(Path(*parts[:k])):
        k -= 1
    fd = None
    try:
        fd = os.open(Path(*parts[:k]), os.O_RDONLY | os.O_DIRECTORY)
        for name in parts[k:]:
            nxt = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nxt
        for rel, dirnames, filenames, _dfd in os.fwalk(".", dir_fd=fd):
            dirnames[:] = sorted(n for n in dirnames if not n.startswith("."))
            sub = d if rel == "." else d / rel[2:]
            yield sub, sorted(f for f in filenames if not f.startswith(".")), []
    except OSError as e:
        yield d, [], [Source(d, top, "ignored", note=f"{d}: a folder that cannot be listed ({e.strerror})")]
    finally:
        if fd is not None:
            os.close(fd)


def discover(paths: list[Path], everything: bool = False) -> Iterator[Source]:
    """Walk ``paths`` (files or directories, recursively, sorted) and yield one Source per record file.

    WFDB ``.hea`` (its ``.dat``/``.mat`` signal files, annotation files and multi-segment parts are its
    ``companions``, not Sources of their own), standalone ``.mat``, HDF5 and text tables are yielded, and so
    are data-looking files without a reader (``.edf``, orphan ``.dat``, ...) and files that are not regular
    files or not openable by name, which read_source rejects with a reason. With ``everything``, the other
    files (documents, images, annotations without a header, folders not searched) are yielded too, as
    ``ignored`` Sources, so that every file found is accounted for.
    """
    paths = [Path(p) for p in paths]
    inside = [os.path.realpath(p) for p in paths if p.is_dir()]
    for p in paths:
        if not p.is_dir():
            # An explicitly named file is always yielded, so that an unknown type is reported.
            yield Source(p, p, _kind(p.name) or "unsupported")
            continue
        for dirpath, files, skipped in _walk(p, inside):
            for src in [*_sources_in_dir(dirpath, files, p), *skipped]:
                if everything or src.kind != "ignored":
                    yield src


def escaped(text: str) -> str:
    """``text`` with what UTF-8 cannot encode (a non-UTF-8 file name's bytes, kept by Python as surrogates)
    written as ``\\xNN`` escapes, so that it can be stored in Arrow and printed."""
    try:
        text.encode()
        return text
    except UnicodeEncodeError:
        try:
            return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        except UnicodeEncodeError:
            return text.encode("utf-8", "backslashreplace").decode()


_FILE_TYPES = ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"),
               (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a folder"))


def _check_file(src: Source) -> None:
    """Raise the RejectedRecord of a source that must not be opened: an ``ignored`` one, a name that is not
    UTF-8, a path past PATH_MAX, a missing file, anything but a regular file (a FIFO would block forever)."""
    if src.kind == "ignored":
        raise RejectedRecord("ignored", escaped(src.note or f"{src.path.name}: not an ECG record"),
                             escaped(str(src.path)), escaped(make_record_id(src.path, src.root)))
    shown = escaped(str(src.path))
    if shown != str(src.path):
        raise RejectedRecord("bad_file_name", f"{escaped(src.path.name)}: the file name is not valid UTF-8 (rename "
                             "it, e.g. with convmv -f latin1 -t utf8)", shown, escaped(make_record_id(src.path,
                                                                                                     src.root)))
    if _too_long(src.path):
        raise RejectedRecord("path_too_long", f"{src.path.name}: its path is {len(os.fsencode(src.path)):,} bytes, "
                             f"more than the system allows ({PATH_MAX - 1:,}): move it to a shorter path")
    try:
        mode = os.stat(src.path).st_mode
    except OSError as e:
        if os.path.islink(src.path):
            what = "a symbolic link loop" if e.errno == errno.ELOOP else f"a broken symbolic link (to " \
                   f"{escaped(os.readlink(src.path))})"
            raise RejectedRecord("not_regular_file", f"{src.path.name}: {what}") from None
        raise RejectedRecord("unreadable", f"{src.path}: {e.strerror or 'no such file'}") from None
    if not stat.S_ISREG(mode):
        what = next((w for test, w in _FILE_TYPES if test(mode)), "not a regular file")
        raise RejectedRecord("not_regular_file", f"{src.path.name}: {what}, not a regular file; not opened")


def _unclaimed(src: Source) -> list[str]:
    """The ``.dat``/``.mat`` companions named like ``src``'s header that its signal lines do not name (a CPSC
    ``bad.mat`` beside ``bad.hea`` + ``bad.dat``): they are read on their own. [] when the header cannot be read
    (its reject covers its files) or is a multi-segment master (its lines name segments, not files)."""
    stem = _stem(src.path.name)
    cands = [c for c in src.companions if c.lower().endswith((".dat", ".mat")) and _stem(c) == stem]
    if not cands:
        return []
    lines = _header_lines(src.path)
    if not lines or "/" in lines[0][0]:
        return []
    named = {toks[0] for toks in lines[1:]}
    return [c for c in cands if c not in named]


def _read_unclaimed(src: Source, opts: ReadOptions) -> Iterator[RawRecord | RejectedRecord]:
    for name in _unclaimed(src):
        path = src.path.parent / name
        if name.lower().endswith(".dat"):
            yield RejectedRecord("not_ecg", f"{name}: a signal file that its header {src.path.name} does not name",
                                 str(path), make_record_id(path, src.root))
        else:
            yield from read_source(Source(path, src.root, _kind(name) or "unsupported"), opts)


def read_source(src: Source, opts: ReadOptions | None = None) -> Iterator[RawRecord | RejectedRecord]:
    """Yield the records of one source; every failure becomes a :class:`RejectedRecord`."""
    opts = opts or ReadOptions()
    record_id = make_record_id(src.path, src.root)
    try:
        _check_file(src)
        if src.kind == "wfdb":
            from ecgfm_cli.io.readers_wfdb import read_wfdb

            yield read_wfdb(src.path, record_id, store_digital=opts.store_digital, max_samples=opts.max_samples)
        elif src.kind == "mat":
            sibling = _header_beside(src.path)
            if sibling is not None:
                from ecgfm_cli.io.readers_wfdb import read_wfdb

                yield read_wfdb(sibling, record_id, store_digital=opts.store_digital, max_samples=opts.max_samples)
            else:
                from ecgfm_cli.io.readers_mat_hdf5 import read_mat

                yield read_mat(src.path, record_id, max_samples=opts.max_samples)
        elif src.kind == "hdf5":
            from ecgfm_cli.io.readers_mat_hdf5 import read_hdf5

            yield from read_hdf5(src.path, record_id, max_samples=opts.max_samples)
        elif src.kind == "csv":
            from ecgfm_cli.io.readers_csv import read_csv

            yield read_csv(src.path, record_id, opts.fs, opts.leads, opts.gain, opts.store_digital,
                           max_samples=opts.max_samples)
        elif src.kind in ("sniff", "unsupported") and (det := _sniff(src.path)) is not None:
            from ecgfm_cli.io.detect import read_detected

            yield from read_detected(src.path, det, record_id, opts)
        else:
            detail = (f"{src.path.name}: WFDB signal file without a .hea header" if src.path.suffix.lower() == ".dat"
                      else f"{src.path.name}: no reader for this file type")
            raise RejectedRecord("not_ecg", detail)
    except RejectedRecord as e:
        e.path = e.path or str(src.path)
        e.record_id = e.record_id or record_id
        yield e
    except MemoryError:  # one huge record must not take the good ones read so far down with it
        yield RejectedRecord("too_large", f"{src.path.name}: out of memory while reading it (lower --max-samples to "
                             "reject such records before they are read)", str(src.path), record_id)
    except Exception as e:  # noqa: BLE001 - a reader bug or an odd file must not stop the whole ingest
        yield RejectedRecord("unreadable", f"{src.path.name}: {type(e).__name__}: {e}", str(src.path), record_id)
    if src.kind == "wfdb" and src.companions:
        yield from _read_unclaimed(src, opts)


def _sniff(path: Path):
    from ecgfm_cli.io.detect import sniff

    return sniff(path)


def _header_beside(path: Path) -> Path | None:
    """The header of the same name beside a ``.mat`` when it names this file as its signal file (a CPSC
    ``x.mat`` beside an unrelated ``x.hea`` is read on its own)."""
    hea = path.with_suffix(".hea")
    if not hea.is_file():
        return None
    return hea if any(toks[0] == path.name for toks in _header_lines(hea)[1:]) else None


def read_path(path: Path, opts: ReadOptions | None = None) -> list[RawRecord | RejectedRecord]:
    """Convenience: everything under one path, as a list (tests, notebooks)."""
    return [r for src in discover([Path(path)]) for r in read_source(src, opts)]
