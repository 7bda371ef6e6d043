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

from ecgfm_cli.console import count_summary, fail, info, plural, progress
from ecgfm_cli.io.artifacts import (
    ArtifactWriter,
    Output,
    sidecar_path,
    start_shard,
    write_done_marker,
    write_sidecars,
)
from ecgfm_cli.io.readers import ReadOptions, Source, discover, read_source
from ecgfm_cli.io.record import RawRecord, RejectedRecord, reject_example
from ecgfm_cli.io.schema import LABELS, RECORDS, REJECTS, records_to_batch, table_from_rows
from ecgfm_cli.io.wfdb_header import binary_labels
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


@dataclass
class IngestSummary:
    files: int = 0
    records: int = 0
    rejects: Counter = field(default_factory=Counter)
    reject_example: str = ""  # the most common reason's first reject, with its detail (see reject_example)
    skipped_shard: bool = False
    found: int = 0  # record files found under the paths, in every shard
    named_twice: int = 0  # files found twice by overlapping PATH arguments (read once)

    @property
    def rejected(self) -> int:
        return sum(self.rejects.values())


def parse_shard(text: str) -> tuple[int, int]:
    """``"3/8"`` -> (3, 8); shards are numbered from 0 (a SLURM array index works as is)."""
    try:
        i, n = (int(p) for p in text.split("/"))
    except ValueError:
        fail(f"--shard {text!r}: expected I/N, e.g. 0/8 (shards are numbered 0..N-1)")
    if not (n >= 1 and 0 <= i < n):
        fail(f"--shard {text!r}: need 0 <= I < N")
    return i, n


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
            fail(f"ingest: {p} does not exist")
    summary = IngestSummary()
    if not start_shard(output, opts.shard, "ingest", "records"):
        summary.skipped_shard = True
        return summary
    found, seen = [], set()
    for s in discover(list(paths)):
        key = os.path.abspath(s.path)  # the same path reached twice; symlinked copies stay distinct records
        if key in seen:  # overlapping PATH arguments name the same file twice
            summary.named_twice += 1
            continue
        seen.add(key)
        found.append(s)
    summary.found = len(found)
    sources = [s for s in found if in_shard(s, opts.shard)]
    if output.format == "stream":
        widen_stdout_pipe()
    summary.files = len(sources)
    writer = ArtifactWriter(output, "records", RECORDS, shard=opts.shard)
    rejects: list[dict] = []
    labels: list[dict] = []
    seen: set[str] = set()
    pending: list[RawRecord] = []
    try:
        for results in progress(_results(sources, opts), "ingest", total=len(sources), unit="file"):
            for item in results:
                if isinstance(item, RejectedRecord):
                    rejects.append(_reject_row(item))
                    continue
                if item.record_id in seen:
                    rejects.append(_reject_row(RejectedRecord(
                        "duplicate_record_id", f"record_id {item.record_id!r} was already read from another file",
                        item.source_path, item.record_id)))
                    continue
                seen.add(item.record_id)
                labels.append({"record_id": item.record_id, "patient_id": item.patient_id,
                               "study_id": item.study_id, "codes": label_codes(item.dx_codes),
                               **binary_labels(item.comments)})
                pending.append(item)
                if len(pending) >= opts.batch_records:
                    writer.write(records_to_batch(pending))
                    summary.records += len(pending)
                    pending = []
        if pending:
            writer.write(records_to_batch(pending))
            summary.records += len(pending)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    summary.rejects = Counter(r["reason"] for r in rejects)
    summary.reject_example = reject_example(rejects)
    _write_sidecars(output, opts, labels, rejects)
    if output.format == "dir" and summary.records:  # a shard that read nothing failed: a rerun redoes it
        write_done_marker(output.path, opts.shard, {
            "kind": "records", "shard": list(opts.shard), "files": summary.files, "records": summary.records,
            "rejects": dict(summary.rejects), "parts": [f.name for f in writer.files]})
    return summary


def label_codes(dx_codes: list[str] | None) -> list[str] | None:
    """The labels table's ``codes`` of a record: null when the source carries no label at all (an SPH file,
    a CSV table, a header without ``# Dx:``), so that a label map turns it into unknown labels, never into
    silent negatives."""
    return list(dx_codes) if dx_codes else None


def _reject_row(r: RejectedRecord) -> dict:
    return {"stage": "ingest", "source_path": r.path, "record_id": r.record_id, "reason": r.reason,
            "detail": r.detail}


def _write_sidecars(output: Output, opts: IngestOptions, labels: list[dict], rejects: list[dict]) -> None:
    label_table = table_from_rows(labels, LABELS)
    stated = sorted({k for row in labels for k in row} - set(LABELS.names))  # yes/no labels from the headers
    for name in stated:
        label_table = label_table.append_column(pa.field(name, pa.float64()),
                                                pa.array([row.get(name) for row in labels], pa.float64()))
    if opts.labels_csv is not None:
        label_table = join_user_labels(label_table, opts.labels_csv)
    write_sidecars(output, opts.shard, "ingest", label_table, table_from_rows(rejects, REJECTS), opts.rejects_path)


def check_user_labels(csv_path: Path) -> tuple[pa.Table, str]:
    """The user's ``--labels`` table and its key column (``record_id``, ``study_id`` or ``exam_id``); one clear
    error when it has none."""
    user = read_user_table(csv_path)
    key = next((k for k in ("record_id", "study_id", "exam_id") if k in user.column_names), None)
    if key is None:
        fail(f"--labels {csv_path}: needs a record_id (or study_id / exam_id) column; it has "
             f"{', '.join(user.column_names[:10])}")
    return user, key


def join_user_labels(table: pa.Table, csv_path: Path) -> pa.Table:
    """Left-join the user's label columns onto ``table``: keyed by ``record_id`` or, for tables that
    name exams rather than files (CODE-15%'s ``exams.csv``), by ``study_id``/``exam_id``."""
    user, key = check_user_labels(csv_path)
    ours = "record_id" if key == "record_id" else "study_id"
    user_keys = [None if v is None else str(v) for v in user.column(key).to_pylist()]
    rows = dict(zip(user_keys, user.to_pylist(), strict=True))
    ids = [None if v is None else str(v) for v in table.column(ours).to_pylist()]
    unmatched = len(rows.keys() - set(ids))
    if unmatched:
        info(f"ingest: --labels {csv_path}: {unmatched} of {user.num_rows} rows name {key} values that were not "
             f"ingested (kept out of the labels table)")
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


def read_user_table(path: Path) -> pa.Table:
    """A user's CSV (gzip allowed) or Parquet table (one clear error when it cannot be read)."""
    from ecgfm_cli.labels import LabelError, read_table

    try:
        return read_table(path)
    except LabelError as e:
        fail(str(e))


def report(summary: IngestSummary, output: Output, rejects_path: Path | None = None) -> str:
    where = "stdout" if output.format == "stream" else str(output.path)
    line = f"ingest: {plural(summary.records, 'record')} from {plural(summary.files, 'file')} -> {where}"
    if summary.named_twice:
        line += f"; {plural(summary.named_twice, 'file')} named twice by overlapping paths, read once"
    if summary.rejected:
        line += f"; {summary.rejected} skipped ({count_summary(summary.rejects)})"
        if rejects_path is not None:
            line += f", see {rejects_path}"
        elif (rej := sidecar_path(output, "rejects")) is not None:
            line += f", see {rej.parent / ('rejects-*.parquet' if output.format == 'dir' else rej.name)}"
    return line
