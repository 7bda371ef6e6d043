"""`ecgfm ingest`: find raw ECG files, read them, write a ``records`` artifact (+ labels, rejects)."""

from __future__ import annotations

import os
import stat
import sys
import zlib
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from ecgfm_cli.console import count_summary, info, plural, progress
from ecgfm_cli.deid import Deidentifier, DeidPolicy
from ecgfm_cli.errors import EcgfmError
from ecgfm_cli.io.artifacts import (
    ArtifactWriter,
    Output,
    sidecar_path,
    start_shard,
    write_done_marker,
    write_sidecars,
)
from ecgfm_cli.io.readers import ReadOptions, Source, discover, escaped, read_source
from ecgfm_cli.io.readers_common import make_record_id
from ecgfm_cli.io.readers_xml import measurement_labels
from ecgfm_cli.io.record import RawRecord, RejectedRecord, reject_example
from ecgfm_cli.io.same_recording import group_copies
from ecgfm_cli.io.schema import LABELS, RECORDS, REJECTS, records_to_batch, table_from_rows
from ecgfm_cli.io.wfdb_header import binary_labels
from ecgfm_cli.labels import UserLabelCarrier
from ecgfm_cli.parallel import ordered_map


@dataclass
class IngestOptions:
    read: ReadOptions = field(default_factory=ReadOptions)
    workers: int = 1
    shard: tuple[int, int] = (0, 1)
    strict: bool = False
    labels_csv: Path | None = None
    rejects_path: Path | None = None
    batch_records: int = 64
    deid: DeidPolicy = field(default_factory=DeidPolicy)  # hospital formats: see ecgfm_cli/deid.py


@dataclass
class IngestSummary:
    files: int = 0
    records: int = 0
    rejects: Counter = field(default_factory=Counter)
    reject_example: str = ""  # the most common reason's first reject, with its detail (see reject_example)
    skipped_shard: bool = False
    found: int = 0  # record files found under the paths, in every shard
    named_twice: int = 0  # files found twice by overlapping PATH arguments (read once)
    companions: int = 0  # files read with a record (signal, segment, metadata) or belonging to it (annotations)
    ignored: Counter = field(default_factory=Counter)  # files no reader is meant for, by what they are
    ignored_names: list[str] = field(default_factory=list)  # the first few of them

    @property
    def rejected(self) -> int:
        return sum(self.rejects.values())


def parse_shard(text: str) -> tuple[int, int]:
    """``"3/8"`` -> (3, 8); shards are numbered from 0 (a SLURM array index works as is)."""
    try:
        i, n = (int(p) for p in text.split("/"))
    except ValueError:
        raise EcgfmError(f"--shard {text!r}: expected I/N, e.g. 0/8 (shards are numbered 0..N-1)") from None
    if not (n >= 1 and 0 <= i < n):
        raise EcgfmError(f"--shard {text!r}: need 0 <= I < N")
    return i, n


def parse_max_samples(text: str) -> int | None:
    """``--max-samples``: ``"16777216"`` -> 16777216 samples per lead; ``"0"`` / ``"none"`` -> None (no bound)."""
    t = text.strip().lower().replace("_", "").replace(",", "")
    if t in ("none", "0", "inf", "unbounded"):
        return None
    try:
        n = int(t)
    except ValueError:
        n = -1
    if n < 0:
        raise EcgfmError(f"--max-samples {text!r}: expected a number of samples per lead (0 or none: no bound)")
    return n


def in_shard(src: Source, shard: tuple[int, int]) -> bool:
    """Stable assignment of a source file to a shard, by a hash of its path below its root
    (adding files elsewhere does not move existing ones between shards)."""
    i, n = shard
    if n == 1:
        return True
    try:
        rel = src.path.relative_to(src.root).as_posix()
    except ValueError:
        rel = "."
    if rel == ".":  # a file named on the command line is its own root: hash its name
        rel = src.path.name
    return zlib.crc32(rel.encode()) % n == i


def _read_all(args: tuple[Source, ReadOptions]) -> list[RawRecord | RejectedRecord]:
    src, opts = args
    try:
        return list(read_source(src, opts))
    except Exception as e:  # a reader bug must not kill a million-record run: reject and go on
        return [RejectedRecord("unreadable", f"{type(e).__name__}: {e}", str(src.path))]


def _results(sources: list[Source], opts: IngestOptions) -> Iterator[list[RawRecord | RejectedRecord]]:
    work = [(s, opts.read) for s in sources]
    if opts.workers <= 1:
        yield from map(_read_all, work)
        return
    yield from ordered_map(_read_all, work, opts.workers)


def widen_stdout_pipe(size: int = 1 << 20) -> None:
    """Give a stdout pipe a ``size``-byte buffer (Linux; the default 64 KiB makes every record batch of
    tens of MB cost hundreds of writer/reader wake-ups). Best effort: anything else is left alone."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import fcntl

        fd = sys.stdout.fileno()
        if stat.S_ISFIFO(os.fstat(fd).st_mode):
            fcntl.fcntl(fd, 1031, size)  # F_SETPIPE_SZ; capped by /proc/sys/fs/pipe-max-size
    except (OSError, ValueError, AttributeError, ImportError):
        pass


def run_ingest(paths: Sequence[Path], output: Output, opts: IngestOptions) -> IngestSummary:
    """Read every record under ``paths`` into ``output``; see docs/commands/ingest.md."""
    for p in paths:
        if not p.exists():
            raise EcgfmError(f"ingest: {p} does not exist")
    summary = IngestSummary()
    if not start_shard(output, opts.shard, "ingest", "records"):
        summary.skipped_shard = True
        return summary
    found, seen = [], set()
    for s in discover(list(paths), everything=True):
        key = os.path.abspath(s.path)  # the same path reached twice; symlinked copies stay distinct records
        if key in seen:  # overlapping PATH arguments name the same file twice
            summary.named_twice += 1
            continue
        seen.add(key)
        found.append(s)
    copies = group_copies(found, list(paths))
    for note in copies.notes:
        info(f"ingest: {note}")
    found = [s for s in found if os.path.abspath(s.path) not in copies.used]  # metadata tables, not records
    summary.companions = len(copies.used) if opts.shard[0] == 0 else 0
    summary.found = sum(s.kind != "ignored" for s in found)
    in_this = [s for s in found if in_shard(s, opts.shard)]
    sources = [s for s in in_this if s.kind != "ignored"]
    summary.companions += sum(len(s.companions) for s in sources)
    user_labels = None
    if opts.labels_csv is not None:
        user, key = check_user_labels(opts.labels_csv)
        ids = [make_record_id(s.path, s.root) for s in found if s.kind != "ignored"]
        user_labels = align_label_keys(user, key, ids, opts.labels_csv), key
    if output.format == "stream":
        widen_stdout_pipe()
    summary.files = len(sources)
    # the --labels columns travel inside the records too: a stream has no room for the labels table
    carrier = UserLabelCarrier(*user_labels) if user_labels is not None else None
    schema = carrier.schema(RECORDS) if carrier else RECORDS
    writer = ArtifactWriter(output, "records", schema, shard=opts.shard)
    rejects: list[dict] = []
    ignored = [_reject_row(r) for s in in_this if s.kind == "ignored" for r in read_source(s)]
    labels: list[dict] = []
    seen: set[str] = set()
    pending: list[RawRecord] = []
    deid = Deidentifier(opts.deid)
    try:
        for src, results in zip(sources, progress(_results(sources, opts), "ingest", total=len(sources), unit="file"),
                                strict=True):
            same = copies.ids.get(os.path.abspath(src.path))
            moved = _read_on_their_own(src, results)
            summary.files += moved  # companions the header did not name, read as records of their own
            summary.companions -= moved
            for item in results:
                if isinstance(item, RejectedRecord):
                    (ignored if item.reason == "ignored" else rejects).append(_reject_row(item))
                    continue
                if same is not None:  # a copy of a recording found twice (PTB-XL's 100 and 500 Hz folders)
                    item.patient_id = item.patient_id or same[0]
                    item.study_id = item.study_id or same[1]
                item = deid(item)  # before anything is written or printed about it
                if item.record_id in seen:
                    rejects.append(_reject_row(RejectedRecord(
                        "duplicate_record_id", f"record_id {item.record_id!r} was already read from another file",
                        item.source_path, item.record_id)))
                    continue
                seen.add(item.record_id)
                labels.append({"record_id": item.record_id, "patient_id": item.patient_id,
                               "study_id": item.study_id, "codes": label_codes(item.dx_codes),
                               **binary_labels(item.comments), **measurement_labels(item.comments)})
                pending.append(item)
                if len(pending) >= opts.batch_records:
                    writer.write(carrier.attach(records_to_batch(pending)) if carrier else records_to_batch(pending))
                    summary.records += len(pending)
                    pending = []
        if pending:
            writer.write(carrier.attach(records_to_batch(pending)) if carrier else records_to_batch(pending))
            summary.records += len(pending)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    for line in deid.messages():
        info(line)
    summary.rejects = Counter(r["reason"] for r in rejects)
    summary.reject_example = reject_example(rejects)
    summary.ignored = Counter(_what(r["detail"]) for r in ignored)
    summary.ignored_names = [r["source_path"].rsplit("/", 1)[-1] for r in ignored[:4]]
    _write_sidecars(output, opts, labels, rejects + ignored, user_labels)  # the ignored files listed last
    # a shard that read nothing failed (no marker: a rerun redoes it), unless it holds none of the files found
    if output.format == "dir" and (summary.records or (summary.found and not summary.files)):
        write_done_marker(output.path, opts.shard, {
            "kind": "records", "shard": list(opts.shard), "files": summary.files, "records": summary.records,
            "rejects": dict(summary.rejects), "parts": [f.name for f in writer.files]})
    return summary


def _read_on_their_own(src: Source, results: list[RawRecord | RejectedRecord]) -> int:
    """How many of ``src``'s companions its results come from (a CPSC ``bad.mat`` beside ``bad.hea``, read because
    the header does not name it): the summary counts them as record files, not as files read with the header."""
    if not src.companions:
        return 0
    paths = {r.path if isinstance(r, RejectedRecord) else r.source_path for r in results}
    return len({os.path.basename(p) for p in paths if p} & (set(src.companions) - {src.path.name}))


def label_codes(dx_codes: list[str] | None) -> list[str] | None:
    """The labels table's ``codes`` of a record: null when the source carries no label at all (an SPH file,
    a CSV table, a header without ``# Dx:``), so that a label map turns it into unknown labels, never into
    silent negatives."""
    return list(dx_codes) if dx_codes else None


def _reject_row(r: RejectedRecord) -> dict:
    """A rejects-table row; text a non-UTF-8 file name left unencodable is escaped (``\\xNN``), so that the
    table can be written."""
    return {"stage": "ingest", "source_path": escaped(r.path), "record_id": None if r.record_id is None else
            escaped(r.record_id), "reason": r.reason, "detail": escaped(r.detail)}


def _what(detail: str) -> str:
    """``"x.png: an image, not an ECG record"`` -> ``"image"`` (how the summary counts the ignored files)."""
    what = detail.split(": ", 1)[-1].split(",")[0].split(" (")[0]
    for article in ("a ", "an "):
        what = what.removeprefix(article)
    return what


_PLURAL = {"document": "documents", "image": "images", "code": "code files", "checksum list": "checksum lists",
           "audio file": "audio files", "file of no known ECG type": "files of no known ECG type",
           "WFDB annotation file without its record's header": "WFDB annotation files without their record's header",
           "WFDB record list": "WFDB record lists", "WFDB annotator list": "WFDB annotator lists",
           "folder that cannot be listed": "folders that cannot be listed",
           "folder already searched under another name": "folders already searched under another name",
           "link to a folder searched at its own path in this run":
               "links to folders searched at their own path in this run"}


def _write_sidecars(output: Output, opts: IngestOptions, labels: list[dict], rejects: list[dict],
                    user_labels: tuple[pa.Table, str] | None = None) -> None:
    label_table = table_from_rows(labels, LABELS)
    stated = sorted({k for row in labels for k in row} - set(LABELS.names))  # yes/no labels from the headers
    for name in stated:
        label_table = label_table.append_column(pa.field(name, pa.float64()),
                                                pa.array([row.get(name) for row in labels], pa.float64()))
    if opts.labels_csv is not None:
        label_table = join_user_labels(label_table, opts.labels_csv, user_labels)
    write_sidecars(output, opts.shard, "ingest", label_table, table_from_rows(rejects, REJECTS), opts.rejects_path)


def check_user_labels(csv_path: Path) -> tuple[pa.Table, str]:
    """The user's ``--labels`` table and its key column (``record_id``, ``study_id`` or ``exam_id``); one clear
    error when it has none."""
    user = read_user_table(csv_path)
    key = next((k for k in ("record_id", "study_id", "exam_id") if k in user.column_names), None)
    if key is None:
        raise EcgfmError(f"--labels {csv_path}: needs a record_id (or study_id / exam_id) column; it has "
                         f"{', '.join(user.column_names[:10])}")
    return user, key


def join_user_labels(table: pa.Table, csv_path: Path, user_key: tuple[pa.Table, str] | None = None) -> pa.Table:
    """Left-join the user's label columns onto ``table``: keyed by ``record_id`` or, for tables that
    name exams rather than files (CODE-15%'s ``exams.csv``), by ``study_id``/``exam_id``. ``user_key``: the
    table and key column already read (and aligned, see align_label_keys); read from ``csv_path`` otherwise."""
    user, key = user_key if user_key is not None else check_user_labels(csv_path)
    ours = "record_id" if key == "record_id" else "study_id"
    user_keys = [None if v is None else str(v) for v in user.column(key).to_pylist()]
    rows = dict(zip(user_keys, user.to_pylist(), strict=True))
    ids = [None if v is None else str(v) for v in table.column(ours).to_pylist()]
    missing = sorted(k for k in rows.keys() - set(ids) if k is not None)
    if missing:
        line = (f"ingest: --labels {csv_path}: {len(missing)} of {user.num_rows} rows name {key} values that were "
                f"not ingested (kept out of the labels table)")
        if 2 * len(missing) > len(rows) and (example := next((i for i in ids if i is not None), None)):
            line += (f"; e.g. the table's {missing[0]!r}, while an ingested record is {example!r}"
                     + (" (record_id is the file's path below the PATH argument, without its extension)"
                        if key == "record_id" else ""))
        info(line)
    for name in user.column_names:
        if name in (key, "record_id", "study_id", "codes"):
            continue
        field = user.schema.field(name)
        values = [rows[i][name] if i in rows else None for i in ids]
        if name == "patient_id":  # the user's patient ids fill in where the files name none
            ours_pid = table.column("patient_id").to_pylist()
            merged = [p if p is not None else (None if v is None else str(v)) for p, v in zip(ours_pid, values,
                                                                                              strict=True)]
            table = table.set_column(table.schema.get_field_index("patient_id"), "patient_id",
                                     pa.array(merged, pa.string()))
        elif name in table.column_names:  # the user's column replaces one read from the headers
            table = table.set_column(table.schema.get_field_index(name), field, pa.array(values, type=field.type))
        else:
            table = table.append_column(field, pa.array(values, type=field.type))
    return table


_RECORD_EXTS = (".hea", ".mat", ".dat", ".h5", ".hdf5", ".csv", ".txt", ".tsv", ".csv.gz", ".txt.gz", ".tsv.gz",
                ".xml", ".dcm", ".scp", ".edf", ".bdf")


def _file_stem(record_id: str) -> str:
    """``records/A0001`` -> ``A0001``; ``C:\\data\\A0001.hea`` -> ``A0001`` (what a user's table may name)."""
    name = record_id.replace("\\", "/").rsplit("/", 1)[-1]
    low = name.lower()
    return next((name[: -len(e)] for e in _RECORD_EXTS if low.endswith(e) and len(name) > len(e)), name)


def align_label_keys(user: pa.Table, key: str, record_ids: Sequence[str], csv_path: Path) -> pa.Table:
    """``user`` with the ``record_id`` values that name no ingested record but name one's file stem replaced
    by that record's id (``A0001`` -> ``records/A0001``: record_id depends on which folder was passed).

    Only stems that are unique among ``record_ids`` (every record this run finds, all shards) and claimed by one
    row are matched; the rows so matched are counted on stderr. Other keys and tables keyed by study_id are
    returned unchanged."""
    if key != "record_id" or user.num_rows == 0:
        return user
    ids = set(record_ids)
    keys = [None if v is None else str(v) for v in user.column(key).to_pylist()]
    if all(k is None or k in ids for k in keys):
        return user
    by_stem: dict[str, list[str]] = {}
    for rid in ids:
        by_stem.setdefault(_file_stem(rid), []).append(rid)
    taken = {k for k in keys if k in ids}
    wanted: dict[str, list[int]] = {}
    for i, k in enumerate(keys):
        if k is not None and k not in ids and len(hit := by_stem.get(_file_stem(k), [])) == 1 and hit[0] not in taken:
            wanted.setdefault(hit[0], []).append(i)
    new = list(keys)
    for rid, rows in wanted.items():
        if len(rows) == 1:  # two rows naming one stem are ambiguous: neither is matched
            new[rows[0]] = rid
    n = sum(a != b for a, b in zip(keys, new, strict=True))
    if not n:
        return user
    i = next(i for i, (a, b) in enumerate(zip(keys, new, strict=True)) if a != b)
    info(f"ingest: --labels {csv_path}: {n} of {user.num_rows} rows matched on the file name alone (e.g. {keys[i]!r} "
         f"-> {new[i]!r}): record_id is the path below the PATH argument, and these name the file without its "
         "folders")
    return user.set_column(user.schema.get_field_index(key), pa.field(key, pa.string()), pa.array(new, pa.string()))


def read_user_table(path: Path) -> pa.Table:
    """A user's CSV (gzip allowed) or Parquet table (one clear error when it cannot be read)."""
    from ecgfm_cli.labels import read_table

    return read_table(path)


def report(summary: IngestSummary, output: Output, rejects_path: Path | None = None) -> str:
    """The one-line summary: records from record files, the files read with them, the record files skipped
    (by reason) and the other files ignored, so that every file found is counted once."""
    where = "stdout" if output.format == "stream" else str(output.path)
    line = f"ingest: {plural(summary.records, 'record')} from {plural(summary.files, 'file')}"
    if summary.companions:
        line += f" (+{summary.companions:,} read with them: signal, segment, annotation files)"
    line += f" -> {where}"
    if summary.named_twice:
        line += f"; {plural(summary.named_twice, 'file')} named twice by overlapping paths, read once"
    if summary.rejected:
        line += f"; {summary.rejected} skipped ({count_summary(summary.rejects)})"
    n_ignored = sum(summary.ignored.values())
    if n_ignored:
        what = (", ".join(summary.ignored_names) if n_ignored <= 3 else
                ", ".join(f"{n:,} {w if n == 1 else _PLURAL.get(w, w)}" for w, n in summary.ignored.most_common(4))
                + (", ..." if len(summary.ignored) > 4 else ""))
        line += f"; {n_ignored:,} other {'file' if n_ignored == 1 else 'files'} ignored ({what})"
    if summary.rejected or n_ignored:
        if rejects_path is not None:
            line += f", see {rejects_path}"
        elif (rej := sidecar_path(output, "rejects")) is not None:
            line += f", see {rej.parent / ('rejects-*.parquet' if output.format == 'dir' else rej.name)}"
    return line
