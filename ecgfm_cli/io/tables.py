"""One reader for the files an artifact is made of: a Parquet file or an Arrow IPC file, read the same way.

:func:`open_table` opens either (told apart by their first bytes, not by the name), memory-mapped, and gives a
:class:`TableFile`: schema and metadata, row count, the sizes of its *groups* (Parquet row groups, Arrow IPC
record batches), and reads of chosen columns of the whole file, of one group (or its first rows), of a row
range, or batch by batch. Groups outside a row range are not read. Two more Arrow layouts are read the same way:
an Arrow IPC *stream* saved to a file (what ``-o - > FILE`` leaves; its batches are found by one pass over the
mapped file, zero-copy) and a Feather v1 file (the format before Arrow IPC files; pyarrow reads it whole). A file
that cannot be used fails with one :class:`TableFileError` naming it, one message per kind: ``unreadable`` (the OS
refuses it), ``truncated`` (it begins as one of the formats but is empty, cut short or damaged) or ``foreign``
(none of them). Streams on stdin are read by :mod:`ecgfm_cli.io.artifacts`.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from ecgfm_cli.errors import EcgfmError

_PARQUET_MAGIC = b"PAR1"
_ARROW_MAGIC = b"ARROW1"
_STREAM_MAGIC = b"\xff\xff\xff\xff"  # an IPC stream's first message starts with the continuation marker
#: The Arrow IPC stream's end-of-stream marker: a continuation word and a zero metadata length.
STREAM_END = b"\xff\xff\xff\xff\x00\x00\x00\x00"
_FEATHER1_MAGIC = b"FEA1"  # Feather v1 (Arrow IPC files are Feather v2)
_NAMES = {"parquet": "Parquet", "arrow": "an Arrow IPC file", "stream": "an Arrow IPC stream",
          "feather1": "a Feather v1 file"}
#: Rows per batch when a caller does not say (Parquet's own default).
DEFAULT_BATCH_ROWS = 65536


class TableFileError(EcgfmError):
    """A Parquet/Arrow file that cannot be read; ``kind``: ``unreadable``, ``truncated`` or ``foreign``."""

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind


def _format_of(path: Path) -> str:
    """``parquet``, ``arrow``, ``stream`` or ``feather1`` from the file's first bytes; :class:`TableFileError` for
    anything else."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError as e:
        raise TableFileError(f"{path}: cannot read: {e.strerror or e}", "unreadable") from e
    if head.startswith(_PARQUET_MAGIC):
        return "parquet"
    if head.startswith(_ARROW_MAGIC):
        return "arrow"
    if not head:
        raise TableFileError(f"{path}: cannot read as Parquet or Arrow IPC: the file is empty (an interrupted write "
                             "or copy?)", "truncated")
    if head.startswith(_STREAM_MAGIC):
        return "stream"
    if head.startswith(_FEATHER1_MAGIC):
        return "feather1"
    raise TableFileError(f"{path}: cannot read as Parquet or Arrow IPC: it is neither (it starts with {head!r})",
                         "foreign")


def _damaged(path: Path, fmt: str, e: Exception) -> TableFileError:
    """The error for a file of format ``fmt`` (by its first bytes) that pyarrow failed to open or read."""
    if isinstance(e, OSError) and e.errno is not None:  # the OS refused it (pyarrow's own errors carry none)
        return TableFileError(f"{path}: cannot read: {e.strerror or e}", "unreadable")
    ends = {"parquet": (_PARQUET_MAGIC, b"PARE"),  # PARE: an encrypted footer
            "arrow": (_ARROW_MAGIC,), "stream": (STREAM_END,), "feather1": (_FEATHER1_MAGIC,)}[fmt]
    try:
        with open(path, "rb") as fh:
            fh.seek(max(path.stat().st_size - len(ends[0]), 0))
            whole = fh.read() in ends
    except OSError:
        whole = False
    how = f"the file is damaged ({e})" if whole else "the file is cut short (an interrupted write or copy?)"
    return TableFileError(f"{path}: cannot read as {_NAMES[fmt]}: {how}", "truncated")


class _Batches:
    """The record batches of an Arrow IPC stream or a Feather v1 file, with the random access of pyarrow's
    ``RecordBatchFileReader`` (``schema``, ``num_record_batches``, ``get_batch``, ``read_all``). A stream's
    batches are found on first use, by one pass over the file; its schema alone needs no pass. A memory-mapped
    stream keeps its batches (zero-copy views unless compressed); an unmapped one (``source`` a ``pa.OSFile``)
    keeps only their byte offsets and reads a batch when asked, so a long-lived reader holds no more than it
    asked for (a stream with dictionary batches is then read whole). pyarrow ends a stream quietly at an EOF
    that falls between two messages, so a stream is only taken whole when the file ends with the end-of-stream
    marker. A Feather v1 file is read whole."""

    def __init__(self, path: Path, fmt: str, source: pa.NativeFile):
        self._path = path
        self._source = source
        self._stream: ipc.RecordBatchStreamReader | None = None
        self._batches: list[pa.RecordBatch] | None = None
        self._offsets: list[int] | None = None
        if fmt == "stream":
            end = len(STREAM_END)
            if source.size() < end or source.read_at(end, source.size() - end) != STREAM_END:
                raise TableFileError(f"{path}: cannot read as {_NAMES[fmt]}: the file is cut short (no end-of-stream "
                                     "marker: an interrupted write or copy?)", "truncated")
            source.seek(0)  # an unmapped file: read_at leaves the position undefined
            self._stream = ipc.open_stream(source)
            self.schema = self._stream.schema
            return
        import pyarrow.feather as feather

        with warnings.catch_warnings():  # pyarrow >= 25 deprecates Feather v1 but reads it
            warnings.simplefilter("ignore", DeprecationWarning)
            try:
                table = feather.read_table(source)
            except pa.ArrowNotImplementedError as e:
                raise TableFileError(
                    f"{path}: cannot read a Feather v1 file with this pyarrow ({pa.__version__}: {e}): rewrite it as "
                    "Arrow IPC or Parquet where a pyarrow that reads it is installed: python -c 'import "
                    "pyarrow.feather as f; f.write_feather(f.read_table(\"IN.feather\"), \"OUT.arrow\")'",
                    "foreign") from e
        self.schema, self._batches = table.schema, table.to_batches()

    def _index(self) -> None:
        """Find the batches (first use): all of them when mapped, else the offsets of their messages."""
        if self._batches is not None or self._offsets is not None:
            return
        try:
            if isinstance(self._source, pa.MemoryMappedFile):
                self._batches = list(self._stream)
                return
            offsets, src = [], self._source
            src.seek(0)
            while True:
                at = src.tell()
                try:
                    kind = ipc.read_message(src).type
                except EOFError:  # the end-of-stream marker
                    break
                if kind == "record batch":
                    offsets.append(at)
                elif kind != "schema":  # dictionary batches: the stream reader resolves them
                    src.seek(0)
                    self._batches = list(ipc.open_stream(src))
                    return
            self._offsets = offsets
        except (OSError, pa.ArrowException) as e:
            raise _damaged(self._path, "stream", e) from e

    @property
    def num_record_batches(self) -> int:
        self._index()
        return len(self._batches if self._batches is not None else self._offsets)

    def get_batch(self, i: int) -> pa.RecordBatch:
        self._index()
        if self._batches is not None:
            return self._batches[i]
        try:
            self._source.seek(self._offsets[i])
            return ipc.read_record_batch(ipc.read_message(self._source), self.schema)
        except (OSError, EOFError, pa.ArrowException) as e:
            raise _damaged(self._path, "stream", e) from e

    def read_all(self) -> pa.Table:
        return pa.Table.from_batches([self.get_batch(i) for i in range(self.num_record_batches)], schema=self.schema)


class TableFile:
    """An open Parquet or Arrow IPC file (memory-mapped unless ``memory_map`` is False). ``format``: ``parquet``,
    ``arrow``, or one of the other Arrow layouts read as ``arrow`` is (``stream``, ``feather1``); ``threads``: let
    pyarrow decode Parquet columns on its thread pool (off in loader threads that run in parallel already).
    ``memory_map`` False: ordinary reads instead of a mapping, for long-lived readers such as the training loader:
    the pages a mapping has read count in the process's resident memory until it is closed, so a reader of every
    group grows to the file's size (per open handle). A Parquet file is then read through a 1 MiB buffer, not
    pre-buffered (that would keep each group's raw bytes until the next read), and an Arrow IPC file's groups are
    read into memory (also to count its rows: :attr:`group_rows` then reads every group), as are a saved stream's
    (found by one pass, read when asked); a Feather v1 file is mapped all the same (it is read whole).

    Rows are numbered from 0 within the file; a *group* is a Parquet row group or an Arrow IPC record batch.
    Every read returns Arrow data (for Arrow IPC, zero-copy views of the mapped file); a read that fails on a
    damaged file raises :class:`TableFileError`. Use as a context manager, or :meth:`close`.
    """

    def __init__(self, path: str | Path, threads: bool = True, memory_map: bool = True):
        self.path = Path(path)
        self.format = _format_of(self.path)
        self.threads = threads
        self._pf: pq.ParquetFile | None = None
        self._ipc: ipc.RecordBatchFileReader | _Batches | None = None
        self._map: pa.MemoryMappedFile | pa.OSFile | None = None
        self._sizes: list[int] | None = None
        try:
            if self.format == "parquet":
                self._pf = pq.ParquetFile(str(self.path), memory_map=memory_map, pre_buffer=memory_map,
                                          buffer_size=0 if memory_map else 1 << 20)
                self.schema = self._pf.schema_arrow
            else:
                mapped = memory_map or self.format == "feather1"  # Feather v1 is read whole anyway
                self._map = pa.memory_map(str(self.path)) if mapped else pa.OSFile(str(self.path))
                self._ipc = ipc.open_file(self._map) if self.format == "arrow" else _Batches(
                    self.path, self.format, self._map)
                self.schema = self._ipc.schema
        except (OSError, pa.ArrowException) as e:
            self.close()
            raise _damaged(self.path, self.format, e) from e
        except TableFileError:
            self.close()
            raise

    # ------------------------------------------------------------------------------------------ layout
    @property
    def metadata(self) -> dict[str, str]:
        """The schema's key-value metadata decoded to ``str -> str``."""
        return {k.decode(): v.decode() for k, v in (self.schema.metadata or {}).items()}

    @property
    def group_rows(self) -> list[int]:
        """Rows of each group, in file order (read from the footer; no data is decoded)."""
        if self._sizes is None:
            if self._pf is not None:
                meta = self._pf.metadata
                self._sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
            else:
                self._sizes = self._guard(lambda: [self._ipc.get_batch(g).num_rows
                                                   for g in range(self._ipc.num_record_batches)])
        return self._sizes

    @property
    def num_groups(self) -> int:
        return self._pf.metadata.num_row_groups if self._pf is not None else self._ipc.num_record_batches

    @property
    def num_rows(self) -> int:
        return self._pf.metadata.num_rows if self._pf is not None else sum(self.group_rows)

    # ------------------------------------------------------------------------------------------- reads
    def read(self, columns: list[str] | None = None) -> pa.Table:
        """Columns ``columns`` (None: all) of every row, with the file's schema metadata."""
        if self._pf is not None:
            return self._guard(lambda: self._pf.read(columns=columns, use_threads=self.threads))
        table = self._guard(self._ipc.read_all)
        return table.select(columns) if columns is not None else table

    def read_group(self, group: int, columns: list[str] | None = None, head: int | None = None) -> pa.Table:
        """Columns of group ``group``; with ``head``, only its first ``head`` rows (a Parquet group is then
        streamed, not decoded whole)."""
        if self._pf is not None:
            if head is not None:
                batch = self._guard(lambda: next(self._pf.iter_batches(
                    batch_size=max(head, 1), row_groups=[group], columns=columns, use_threads=self.threads)))
                return pa.Table.from_batches([batch.slice(0, head)])
            return self._guard(lambda: self._pf.read_row_group(group, columns=columns, use_threads=self.threads))
        batch = self._guard(lambda: self._ipc.get_batch(group))
        batch = batch.select(columns) if columns is not None else batch
        return pa.Table.from_batches([batch if head is None else batch.slice(0, head)])

    def iter_batches(self, columns: list[str] | None = None, batch_size: int | None = None,
                     groups: list[int] | None = None) -> Iterator[pa.RecordBatch]:
        """Record batches of at most ``batch_size`` rows (default :data:`DEFAULT_BATCH_ROWS`) of ``groups``
        (None: all), in order. A batch may span groups."""
        size = batch_size or DEFAULT_BATCH_ROWS
        if self._pf is not None:
            if groups is not None and not groups:
                return
            it = self._pf.iter_batches(batch_size=size, row_groups=groups, columns=columns, use_threads=self.threads)
            while True:
                batch = self._guard(lambda: next(it, None))
                if batch is None:
                    return
                yield batch
        for g in range(self.num_groups) if groups is None else groups:
            batch = self._guard(lambda g=g: self._ipc.get_batch(g))
            if columns is not None:
                batch = batch.select(columns)
            for lo in range(0, batch.num_rows, size):
                yield batch.slice(lo, size)

    def iter_rows(self, start: int = 0, stop: int | None = None, columns: list[str] | None = None,
                  batch_size: int | None = None) -> Iterator[pa.RecordBatch]:
        """Rows ``[start, stop)`` (``stop`` None: to the end) as record batches of at most ``batch_size`` rows,
        in order; only the groups that hold them are read."""
        stop = self.num_rows if stop is None else min(stop, self.num_rows)
        if start >= stop:
            return
        groups, pos, first = [], 0, None
        for g, n in enumerate(self.group_rows):
            if pos + n > start and pos < stop:
                groups.append(g)
                first = pos if first is None else first
            pos += n
        pos = first
        for b in self.iter_batches(columns, batch_size, groups):
            lo, hi = max(start - pos, 0), min(stop - pos, b.num_rows)
            if hi > lo:
                yield b if (lo, hi) == (0, b.num_rows) else b.slice(lo, hi - lo)
            pos += b.num_rows
            if pos >= stop:
                return

    def _guard(self, read):
        """``read()``, its pyarrow failure turned into this file's :class:`TableFileError`."""
        try:
            return read()
        except (OSError, pa.ArrowException) as e:
            raise _damaged(self.path, self.format, e) from e

    # -------------------------------------------------------------------------------------------- life
    def close(self) -> None:
        """Release the file (Arrow data already read stays valid: it keeps the mapping alive)."""
        if self._pf is not None:
            self._pf.close()
        if self._map is not None:
            self._map.close()

    def __enter__(self) -> TableFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TableFile({str(self.path)!r}, format={self.format!r})"


def open_table(path: str | Path, threads: bool = True, memory_map: bool = True) -> TableFile:
    """Open a Parquet or Arrow IPC file for reading (:class:`TableFile`); :class:`TableFileError` naming it if it
    cannot be."""
    return TableFile(path, threads=threads, memory_map=memory_map)


def read_schema(path: str | Path) -> pa.Schema:
    """The schema (with metadata) of a table file; reads only its footer (a saved stream: its first message; a
    Feather v1 file is read whole, as pyarrow reads it)."""
    with open_table(path) as t:
        return t.schema


def read_columns(path: str | Path, columns: list[str] | None = None) -> pa.Table:
    """Columns ``columns`` (None: all) of a whole Parquet or Arrow IPC file."""
    with open_table(path) as t:
        return t.read(columns)
