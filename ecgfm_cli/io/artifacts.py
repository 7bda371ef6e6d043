"""Reading and writing ecgfm artifacts: Parquet shard directories, single files and Arrow IPC streams.

The output path's extension decides the format (see docs/artifacts.md). Every file is written under
a temporary name in its final directory and renamed when complete, so a reader never accepts a
half-written file.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from ecgfm_cli import __version__
from ecgfm_cli.console import fail, info

SCHEMA_VERSION = 1
KINDS = ("records", "segments", "labels", "rejects", "embeddings", "predictions")

# Parquet compression per column: big float payloads compress poorly and cost time; metadata is tiny.
_UNCOMPRESSED = {"signal", "digital", "embedding"}


@dataclass(frozen=True)
class Output:
    """Where and how an artifact is written. ``format`` is one of
    ``stream`` (Arrow IPC on stdout), ``dir`` (Parquet shards), ``parquet``, ``arrow``, ``npz``."""

    format: str
    path: Path | None


def resolve_output(path: str | None, allowed: tuple[str, ...], command: str) -> Output:
    """Decide the output format from ``path`` before any work starts; refuse what ``command`` can't write.

    ``None`` means stdout, which must then be a pipe: binary is never written to a terminal.
    """
    if path is None or path == "-":
        if "stream" not in allowed:
            fail(f"{command} needs -o OUT ({', '.join(_describe(a) for a in allowed)})")
        if sys.stdout.isatty():
            fail(f"{command} writes binary Arrow data to stdout, and stdout is a terminal: "
                 f"pipe it (`ecgfm {command} ... | ecgfm segment -o segments/`) or pass -o DIR")
        return Output("stream", None)
    p = Path(path)
    suffix = p.suffix.lower()
    fmt = {".parquet": "parquet", ".arrow": "arrow", ".feather": "arrow", ".npz": "npz"}.get(suffix)
    if fmt is None:
        if suffix and not p.is_dir():
            fail(f"cannot write {path!r}: unknown extension {suffix!r}; {command} writes "
                 + ", ".join(_describe(a) for a in allowed))
        fmt = "dir"
    if fmt not in allowed:
        fail(f"cannot write {path!r}: {command} does not write {_describe(fmt)}; it writes "
             + ", ".join(_describe(a) for a in allowed))
    check_writable_dir(p if fmt == "dir" else p.parent, repr(path))
    return Output(fmt, p)


def check_writable_dir(directory: Path, target: str) -> None:
    """Fail (one line naming ``target``) unless ``directory``, existing or not, can be written: its nearest
    existing ancestor must be a writable directory."""
    probe = Path(directory)
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        fail(f"cannot write {target}: {probe} is a file, not a writable directory")
    try:  # os.access says yes to root and knows nothing of /proc, /sys or read-only mounts: try it
        os.rmdir(tempfile.mkdtemp(prefix=".ecgfm-write-check-", dir=probe))
    except OSError as e:
        fail(f"cannot write {target}: {probe} is not a writable directory ({e.strerror})")


def _describe(fmt: str) -> str:
    return {"stream": "an Arrow stream to a pipe (-o omitted or -)", "dir": "a directory of Parquet shards",
            "parquet": "a .parquet file", "arrow": "an .arrow/.feather file", "npz": "an .npz file"}[fmt]


def artifact_metadata(kind: str, extra: dict[str, str] | None = None) -> dict[bytes, bytes]:
    meta = {"ecgfm.kind": kind, "ecgfm.schema_version": str(SCHEMA_VERSION), "ecgfm.version": __version__}
    meta.update(extra or {})
    return {k.encode(): v.encode() for k, v in meta.items()}


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; rename it to ``path`` only if the block succeeds.

    Works for files and for directories (an existing directory at ``path`` is replaced whole, never merged).
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(final)
    _remove(tmp)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    if tmp.is_dir():
        replace_dir(tmp, final)
    elif tmp.exists():
        if final.is_dir():
            _remove(tmp)
            raise IsADirectoryError(f"{final} is a directory; refusing to replace it with a file")
        os.replace(tmp, final)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    elif p.exists() or p.is_symlink():
        p.unlink()


def replace_dir(tmp_dir: Path, final: Path) -> None:
    """Move the finished directory ``tmp_dir`` to ``final``, replacing (not merging) what was there."""
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        _remove(old)
        os.replace(final, old)
        os.replace(tmp_dir, final)
        _remove(old)
    else:
        os.replace(tmp_dir, final)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def shard_tag(shard: tuple[int, int]) -> str:
    i, n = shard
    return f"s{i:05d}of{n:05d}"


def done_marker(directory: Path, shard: tuple[int, int]) -> Path:
    return directory / f"_done-{shard_tag(shard)}.json"


def _parquet_options(schema: pa.Schema) -> dict:
    """Writer options: big float payloads are stored plain (no compression, dictionary or statistics:
    they cost time and save nothing on signals); small columns get the usual treatment."""
    small = [n for n in schema.names if n not in _UNCOMPRESSED]
    return {"compression": {n: ("NONE" if n in _UNCOMPRESSED else "SNAPPY") for n in schema.names},
            "use_dictionary": small, "write_statistics": small}


#: An IPC continuation marker and a 2 GiB metadata length with nothing after it: readers fail on it.
_CUT_STREAM = b"\xff\xff\xff\xff\xff\xff\xff\x7f"


@dataclass
class ArtifactWriter:
    """Streams record batches of one artifact kind to an :class:`Output`.

    A ``dir`` output gets ``<kind>-<shard>-pNNNNN.parquet`` parts, a new part after
    ``part_bytes``; call :meth:`close` to finish (a ``dir`` output's done-marker is written
    by the caller with :func:`write_done_marker` once every artifact of the shard is closed).
    """

    output: Output
    kind: str
    schema: pa.Schema
    shard: tuple[int, int] = (0, 1)
    row_group_rows: int = 256
    part_bytes: int = 512 << 20
    rows: int = 0
    files: list[Path] = field(default_factory=list)
    _writer: object = None
    _tmp: Path | None = None
    _final: Path | None = None
    _part: int = 0
    _part_bytes_written: int = 0
    _sink: object = None

    def __post_init__(self) -> None:
        self.schema = self.schema.with_metadata({**(self.schema.metadata or {}), **artifact_metadata(self.kind)})

    def _open(self) -> None:
        fmt = self.output.format
        if fmt == "stream":
            self._sink = sys.stdout.buffer
            self._writer = ipc.new_stream(self._sink, self.schema)
            return
        if fmt == "dir":
            self._final = self.output.path / f"{self.kind}-{shard_tag(self.shard)}-p{self._part:05d}.parquet"
        else:
            self._final = self.output.path
        self._final.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = _tmp_name(self._final)
        if fmt == "arrow":
            self._sink = pa.OSFile(str(self._tmp), "wb")
            self._writer = ipc.new_file(self._sink, self.schema)
        else:
            self._writer = pq.ParquetWriter(str(self._tmp), self.schema, **_parquet_options(self.schema))

    def write(self, batch: pa.RecordBatch | pa.Table) -> None:
        if batch.num_rows == 0:
            return
        if self._writer is None:
            self._open()
        if isinstance(batch, pa.RecordBatch):
            batch = pa.Table.from_batches([batch])
        batch = batch.replace_schema_metadata(self.schema.metadata)
        if isinstance(self._writer, pq.ParquetWriter):
            self._writer.write_table(batch, row_group_size=self.row_group_rows)
        else:
            self._writer.write_table(batch)
        self.rows += batch.num_rows
        self._part_bytes_written += batch.nbytes
        if self.output.format == "dir" and self._part_bytes_written >= self.part_bytes:
            self._finish_file()
            self._part += 1
            self._part_bytes_written = 0

    def _finish_file(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        if self.output.format == "stream":
            sys.stdout.buffer.flush()
        else:
            if self._sink is not None:
                self._sink.close()
            os.replace(self._tmp, self._final)
            self.files.append(self._final)
        self._writer = self._sink = self._tmp = None

    def close(self, write_empty: bool = True) -> None:
        """Finish the current file. With ``write_empty``, an artifact with no rows still gets one
        (empty) file so that readers see its schema."""
        if self._writer is None and self.rows == 0 and write_empty:
            self._open()
        self._finish_file()

    def abort(self) -> None:
        """Give up after an error: the temporary file goes. A stream gets no end-of-stream marker but the start of
        a message that never comes, so that the command downstream fails instead of taking the rows so far for
        the whole input."""
        if self.output.format == "stream":
            if self._writer is not None:
                with contextlib.suppress(Exception):
                    sys.stdout.buffer.write(_CUT_STREAM)
                    sys.stdout.buffer.flush()
            self._writer = None
            return
        with contextlib.suppress(Exception):
            if self._writer is not None:
                self._writer.close()
            if self._sink is not None:
                self._sink.close()
        if self._tmp is not None and self._tmp.exists():
            self._tmp.unlink()
        self._writer = self._sink = self._tmp = None


def write_done_marker(directory: Path, shard: tuple[int, int], summary: dict) -> None:
    marker = done_marker(directory, shard)
    with atomic_path(marker) as tmp:
        tmp.write_text(json.dumps(summary, indent=2, sort_keys=True))


def check_output_kind(directory: Path, kind: str, command: str) -> None:
    """Fail when ``directory`` holds anything but shards of a ``kind`` artifact and their companions: a
    finished artifact of another kind (its done-markers say which) or other files (a training run, data),
    which writing there would mix with, or (embed) clear beside, the new artifact."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    for marker in sorted(directory.glob("_done-*.json")):
        try:
            other = json.loads(marker.read_text()).get("kind")
        except (OSError, ValueError, AttributeError):
            other = None
        if other != kind:
            fail(f"{command}: {directory} already holds {other or 'another artifact'} ({marker.name}); write the "
                 f"{kind} to another directory")
    own = (f"{kind}-", "labels-", "rejects-", "_done-", ".")
    foreign = sorted(p.name for p in directory.iterdir() if not p.name.startswith(own))
    if foreign:
        more = ", ..." if len(foreign) > 3 else ""
        fail(f"{command}: {directory} holds other files ({', '.join(foreign[:3])}{more}); write the {kind} to a "
             "new or empty directory")


def start_shard(output: Output, shard: tuple[int, int], command: str, kind: str) -> bool:
    """Prepare a shard of a ``dir`` output of artifact ``kind``: False (and a message) when its done-marker says
    it is complete; otherwise delete the parts an interrupted run of the same shard left, so the shard is redone
    from scratch. A directory holding another kind of artifact is refused."""
    if output.format != "dir":
        return True
    check_output_kind(output.path, kind, command)
    marker = done_marker(output.path, shard)
    if marker.exists():
        info(f"{command}: shard {shard[0]}/{shard[1]} is already complete in {output.path}; nothing to do "
             f"(delete {marker} to redo it)")
        return False
    for stale in output.path.glob(f"*-{shard_tag(shard)}*.parquet"):
        stale.unlink()
    return True


def discard_empty_output(output: Output, shard: tuple[int, int] = (0, 1)) -> None:
    """After a run that wrote no row: remove its empty artifact file and labels table (the rejects table stays:
    it says why), so that nothing is left to look like a result."""
    if output.format in ("parquet", "arrow"):
        output.path.unlink(missing_ok=True)
    labels = sidecar_path(output, "labels", shard)
    if labels is not None:
        labels.unlink(missing_ok=True)


def write_sidecars(output: Output, shard: tuple[int, int], command: str, labels: pa.Table, rejects: pa.Table,
                   rejects_path: Path | None = None) -> None:
    """Write the ``labels`` and ``rejects`` tables beside ``output`` (``rejects_path`` overrides where the
    rejects go). A stream output has no place for them: the rejects are listed on stderr instead."""
    labels_path = sidecar_path(output, "labels", shard)
    if labels_path is not None:
        write_table(labels, labels_path, "labels")
    rejects_path = rejects_path or sidecar_path(output, "rejects", shard)
    if rejects_path is not None:
        write_table(rejects, rejects_path, "rejects")
        return
    rows = rejects.slice(0, 20).to_pylist()
    for r in rows:
        info(f"{command}: skipped {r['record_id'] or r['source_path']}: {r['reason']}: {r['detail']}")
    if rejects.num_rows > len(rows):
        info(f"{command}: ... and {rejects.num_rows - len(rows)} more (pass --rejects FILE.parquet to keep them all)")


def sidecar_path(output: Output, kind: str, shard: tuple[int, int] = (0, 1)) -> Path | None:
    """Where a companion table (``labels``, ``rejects``) of ``output`` goes: inside a shard
    directory, or ``NAME.<kind>.parquet`` beside a single file; None for a stream."""
    if output.format == "stream" or output.path is None:
        return None
    if output.format == "dir":
        return output.path / f"{kind}-{shard_tag(shard)}.parquet"
    return output.path.with_name(output.path.stem + f".{kind}.parquet")


def write_table(table: pa.Table, path: Path, kind: str, extra_meta: dict[str, str] | None = None) -> None:
    """Write a small table atomically as one Parquet file (or CSV/JSON by extension)."""
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), **artifact_metadata(kind, extra_meta)})
    with atomic_path(path) as tmp:
        if path.suffix == ".csv":
            import pyarrow.csv as pacsv

            pacsv.write_csv(table, str(tmp))
        else:
            pq.write_table(table, str(tmp), **_parquet_options(table.schema))


# ----------------------------------------------------------------------------------------------- reading


@dataclass
class ArtifactReader:
    """Reads an artifact from a shard directory, a ``.parquet``/``.arrow`` file or ``-`` (stdin stream)."""

    path: str
    kind: str | None = None
    files: list[Path] = field(default_factory=list)
    schema: pa.Schema | None = None
    _stream: object = None

    @property
    def metadata(self) -> dict[str, str]:
        raw = (self.schema.metadata or {}) if self.schema is not None else {}
        return {k.decode(): v.decode() for k, v in raw.items()}

    def num_rows(self) -> int | None:
        """Row count from Parquet footers (None for streams)."""
        if self._stream is not None:
            return None
        total = 0
        for f in self.files:
            if f.suffix == ".parquet":
                total += pq.ParquetFile(str(f)).metadata.num_rows
            else:
                return None
        return total

    def iter_batches(self, columns: list[str] | None = None, batch_size: int = 256) -> Iterator[pa.RecordBatch]:
        if self._stream is not None:
            stream, self._stream = self._stream, None
            try:
                for batch in stream:
                    yield batch.select(columns) if columns else batch
            except (OSError, pa.ArrowInvalid) as e:
                fail(f"stdin: the Arrow stream stops mid-way ({e}): the command before the pipe failed or was "
                     "interrupted")
            return
        for f in self.files:
            if f.suffix == ".parquet":
                pf = pq.ParquetFile(str(f))
                yield from pf.iter_batches(batch_size=batch_size, columns=columns)
            else:
                with pa.memory_map(str(f)) as src:
                    reader = ipc.open_file(src)
                    for i in range(reader.num_record_batches):
                        b = reader.get_batch(i)
                        yield b.select(columns) if columns else b

    def read_all(self, columns: list[str] | None = None) -> pa.Table:
        batches = list(self.iter_batches(columns))
        schema = self.schema if not columns else pa.schema([self.schema.field(c) for c in columns])
        return pa.Table.from_batches(batches, schema=schema)


def open_artifact(path: str | Path, kind: str, command: str = "ecgfm") -> ArtifactReader:
    """Open an artifact of ``kind`` for reading, with one clear error if it is missing or of another kind."""
    spath = str(path)
    if spath == "-":
        if sys.stdin.isatty():
            fail(f"{command}: no input: give a path, or pipe `ecgfm ingest ... |` into it")
        head = sys.stdin.buffer.peek(4)[:4] if hasattr(sys.stdin.buffer, "peek") else b"?"
        if not head:
            fail(f"{command}: stdin is empty: the command before the pipe wrote nothing (did it fail?)")
        if head == b"PAR1":
            fail(f"{command}: stdin holds a Parquet file: give its path as the input instead (stdin takes the "
                 "Arrow stream that `-o -` writes)")
        try:
            stream = ipc.open_stream(sys.stdin.buffer)
        except pa.ArrowInvalid as e:
            fail(f"{command}: stdin is not an Arrow stream from ecgfm ({e})")
        reader = ArtifactReader(spath, kind, schema=stream.schema, _stream=stream)
    else:
        p = Path(spath)
        if p.is_dir():
            files = sorted(p.glob(f"{kind}-*.parquet"))
            if not files:
                others = sorted({f.name.split("-")[0] for f in p.glob("*-*.parquet")})
                hint = f" (it holds {', '.join(others)} artifacts)" if others else ""
                fail(f"{command}: {p} holds no {kind} files ({kind}-*.parquet){hint}")
        elif p.is_file():
            files = [p]
        else:
            fail(f"{command}: {p} does not exist")
        reader = ArtifactReader(spath, kind, files=files)
        try:
            reader.schema = _read_schema(files[0])
        except (pa.ArrowInvalid, OSError) as e:
            fail(f"{command}: {files[0]} is not a Parquet or Arrow file ({e})")
    meta = reader.metadata
    found = meta.get("ecgfm.kind")
    if found is not None and found != kind:
        fail(f"{command}: {spath} holds {found}, not {kind}")
    version = int(meta.get("ecgfm.schema_version", SCHEMA_VERSION))
    if version > SCHEMA_VERSION:
        fail(f"{command}: {spath} has schema version {version}; this ecgfm ({__version__}) reads up to "
             f"{SCHEMA_VERSION}: upgrade ecgfm")
    return reader


def _read_schema(path: Path) -> pa.Schema:
    if path.suffix in (".arrow", ".feather"):
        with pa.memory_map(str(path)) as src:
            return ipc.open_file(src).schema
    return pq.read_schema(str(path))
