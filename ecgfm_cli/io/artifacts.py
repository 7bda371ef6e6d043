"""Reading and writing ecgfm artifacts: Parquet shard directories, single files and Arrow IPC streams.

The output path's extension decides the format (see docs/artifacts.md). Every file is written under
a temporary name in its final directory and renamed when complete, so a reader never accepts a
half-written file; a directory artifact is read only when every shard's done marker says it is complete
(:func:`check_complete`), a stream only when its end-of-stream marker arrives, and one run at a time writes
a shard (:func:`lock_output`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import socket
import stat
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from ecgfm_cli import __version__
from ecgfm_cli.console import info, plural
from ecgfm_cli.errors import EcgfmError
from ecgfm_cli.io.schema import REQUIRED_COLUMNS
from ecgfm_cli.io.tables import STREAM_END, open_table, read_schema

try:
    import fcntl
except ImportError:  # not POSIX: outputs are not locked
    fcntl = None

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


def resolve_output(path: str | None, allowed: tuple[str, ...], command: str, companions: bool = False) -> Output:
    """Decide the output format from ``path`` before any work starts; refuse what ``command`` can't write.

    ``None`` means stdout, which must then be a pipe: binary is never written to a terminal. ``companions``: the
    command writes labels/rejects tables beside a single-file output (:func:`sidecar_path`), so a file of the
    same name in the other format (``rec.parquet`` for ``-o rec.arrow``) is refused: the two would share them.
    """
    if path is None or path == "-":
        if "stream" not in allowed:
            raise EcgfmError(f"{command} needs -o OUT ({', '.join(_describe(a) for a in allowed)})")
        if sys.stdout.isatty():
            raise EcgfmError(f"{command} writes binary Arrow data to stdout, and stdout is a terminal: "
                             f"pipe it (`ecgfm {command} ... | ecgfm segment -o segments/`) or pass -o DIR")
        return Output("stream", None)
    p = Path(path)
    suffix = p.suffix.lower()
    fmt = {".parquet": "parquet", ".arrow": "arrow", ".feather": "arrow", ".npz": "npz"}.get(suffix)
    if fmt is None:
        if suffix and not p.is_dir():
            raise EcgfmError(f"cannot write {path!r}: unknown extension {suffix!r}; {command} writes "
                             + ", ".join(_describe(a) for a in allowed))
        fmt = "dir"
    if fmt not in allowed:
        raise EcgfmError(f"cannot write {path!r}: {command} does not write {_describe(fmt)}; it writes "
                         + ", ".join(_describe(a) for a in allowed))
    check_writable_dir(p if fmt == "dir" else p.parent, repr(path))
    if companions and fmt in ("parquet", "arrow"):
        twin = next((q for q in (p.with_suffix(x) for x in (".parquet", ".arrow", ".feather"))
                     if q.suffix != p.suffix and q.exists()), None)
        if twin is not None:
            raise EcgfmError(f"cannot write {path!r}: {twin.name} is beside it, and the two would share their "
                             f"companion tables ({p.stem}.labels.parquet, {p.stem}.rejects.parquet); choose another "
                             "name or folder")
    return Output(fmt, p)


def check_writable_dir(directory: Path, target: str) -> None:
    """Fail (one line naming ``target``) unless ``directory``, existing or not, can be written: its nearest
    existing ancestor must be a writable directory."""
    probe = Path(directory)
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise EcgfmError(f"cannot write {target}: {probe} is a file, not a writable directory")
    try:  # os.access says yes to root and knows nothing of /proc, /sys or read-only mounts: try it
        os.rmdir(tempfile.mkdtemp(prefix=".ecgfm-write-check-", dir=probe))
    except OSError as e:
        raise EcgfmError(f"cannot write {target}: {probe} is not a writable directory ({e.strerror})") from e


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


# ------------------------------------------------------------------------------------- one run per output
# A run holds an exclusive advisory lock (flock) on its output's run file from its start to its done marker: a
# second run into the same shard (or the same single file) is refused, naming the first. The run file stays
# behind, holding the command line of the last run that started there: a reader of an interrupted directory
# names it as the rerun that completes it. Shards of one artifact (SLURM arrays) lock separately.

#: lock-file path -> the descriptor through which this process holds its lock (released with the run).
_HELD: dict[str, int] = {}


def run_file(output: Output, shard: tuple[int, int] | None = (0, 1)) -> Path | None:
    """The lock / run-record file of one shard of a ``dir`` output (``DIR/.run-<shard>.json``; ``shard`` None:
    the whole directory, ``DIR/.run.json``) or of a single file output (``.NAME.run.json`` beside it); None for a
    stream."""
    if output.format == "stream" or output.path is None:
        return None
    if output.format == "dir":
        return output.path / (f".run-{shard_tag(shard)}.json" if shard is not None else ".run.json")
    return output.path.with_name(f".{output.path.name}.run.json")


def command_line() -> str | None:
    """This process's command line as a user would type it again (``ecgfm ingest data -o out``); None when this
    process is not the ``ecgfm`` command (a library call from another program)."""
    argv = list(sys.argv)
    if not argv:
        return None
    first = Path(argv[0])
    if first.name not in ("ecgfm", "ecgfm.exe") and (first.name, first.parent.name) != ("__main__.py", "ecgfm_cli"):
        return None
    return shlex.join(["ecgfm", *argv[1:]])


def _stdin_is_pipe() -> bool:
    try:
        return stat.S_ISFIFO(os.fstat(0).st_mode)
    except OSError:
        return False


def _run_record() -> dict:
    return {"command": command_line(), "cwd": os.getcwd(), "pid": os.getpid(), "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "ecgfm": __version__, "stdin_pipe": _stdin_is_pipe()}


def _read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _describe_run(run: dict | None) -> str:
    if not run:
        return "another process"
    host = f" on {run['host']}" if run.get("host") and run.get("host") != socket.gethostname() else ""
    since = f", since {run['started']}" if run.get("started") else ""
    command = f": `{run['command']}`" if run.get("command") else ""
    return f"pid {run.get('pid')}{host}{command}{since}"


def lock_output(output: Output, shard: tuple[int, int] | None, command: str) -> None:
    """Take this run's exclusive lock on ``output`` (one shard of a directory, or a single file) for the rest of
    the run, and record the run's command line in the run file. Another live run holding it: fail with one line
    naming it. Released by :func:`release_output` (:func:`write_done_marker`, :meth:`ArtifactWriter.abort`,
    :func:`discard_empty_output`, :func:`write_sidecars` for a single file) or when the process ends."""
    path = run_file(output, shard)
    if path is None:
        return
    key = os.path.abspath(path)
    fd = _HELD.get(key)
    while fd is None:  # (held already: an earlier run in this same process, which ended without releasing it)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is None:
            break
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = _read_json(path)
            os.close(fd)
            sharded = output.format == "dir" and shard is not None and shard[1] > 1
            what = f"shard {shard[0]}/{shard[1]} of {output.path}" if sharded else str(output.path)
            raise EcgfmError(f"{command}: {what} is being written by another run ({_describe_run(other)}); wait for "
                             "it to finish or write elsewhere") from None
        except OSError as e:  # a filesystem without locks (some network mounts): go on, unguarded
            info(f"{command}: warning: cannot lock {path} ({e.strerror}): two runs writing there at once "
                 "would mix their outputs")
            break
        try:  # the run that held it may have deleted the file (single-file outputs) before this one locked it
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            fd = None
    _HELD[key] = fd
    data = json.dumps(_run_record(), sort_keys=True).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)


def release_output(output: Output, shard: tuple[int, int] | None = (0, 1)) -> None:
    """Release the lock :func:`lock_output` took (no-op when this process holds none). A single file's run file
    goes with it (a directory's stays: it names the command of a run that is interrupted later)."""
    path = run_file(output, shard)
    fd = _HELD.pop(os.path.abspath(path), None) if path is not None else None
    if fd is not None:
        if output.format != "dir":
            with contextlib.suppress(OSError):
                path.unlink()  # while still locked: see the inode check in lock_output
        os.close(fd)


@contextlib.contextmanager
def output_lock(output: Output, shard: tuple[int, int] | None, command: str, kind: str | None = None
                ) -> Iterator[None]:
    """:func:`lock_output` and :func:`remove_dead_temporaries` for the duration of the block (``shard`` None: a
    whole directory, for a command that rewrites every shard of it at once). With ``kind``, a directory holding
    another artifact is refused first (:func:`check_output_kind`), before anything is written into it."""
    if kind is not None and output.format == "dir":
        check_output_kind(output.path, kind, command)
    lock_output(output, shard, command)
    try:
        remove_dead_temporaries(output, shard)
        yield
    finally:
        release_output(output, shard)


def _run_is_live(path: Path) -> bool:
    """Whether another process holds the lock on run file ``path`` now (it is writing that shard)."""
    if fcntl is None or os.path.abspath(path) in _HELD:
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # closing also drops the shared lock
    return False


#: The temporaries this module writes: ``.NAME.tmp-PID`` (atomic writes) and ``.NAME.old-PID`` (replaced dirs).
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)$")


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    except OverflowError:  # not a pid at all
        return False
    return True


def remove_dead_temporaries(output: Output, shard: tuple[int, int] | None = (0, 1)) -> list[Path]:
    """Delete the temporaries that killed runs of this output left (a kill -9 cannot clean up): only files
    matching this module's own ``.NAME.tmp-PID`` pattern, only for names of this shard (directory; ``shard`` None:
    the whole directory) or this file and its companions (single file), and only when process PID is not alive.
    Call with the output locked. Returns what was removed."""
    if output.format == "stream" or output.path is None:
        return []
    if output.format == "dir":
        folder, tag = output.path, shard_tag(shard) if shard is not None else ""
        ours = lambda name: tag in name  # noqa: E731 - every file of a shard carries its tag
    else:
        folder, stem = output.path.parent, output.path.stem
        ours = lambda name: name == output.path.name or name.startswith(stem + ".")  # noqa: E731
    if not folder.is_dir():
        return []
    removed = []
    for p in folder.iterdir():
        m = _TEMPORARY.match(p.name)
        if m and ours(m["name"]) and int(m["pid"]) != os.getpid() and not pid_alive(int(m["pid"])):
            with contextlib.suppress(OSError):
                _remove(p)
                removed.append(p)
    return removed


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
        release_output(self.output, self.shard)


def write_done_marker(directory: Path, shard: tuple[int, int], summary: dict) -> None:
    """Mark a shard of a directory artifact complete (``summary``: kind, counts, ``parts``; the command line is
    added) and end the run's lock on it. A shard that legitimately holds nothing gets a marker with zero rows."""
    marker = done_marker(directory, shard)
    summary = {**summary, "command": summary.get("command", command_line()), "cwd": os.getcwd()}
    with atomic_path(marker) as tmp:
        tmp.write_text(json.dumps(summary, indent=2, sort_keys=True))
    release_output(Output("dir", Path(directory)), shard)


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
            raise EcgfmError(f"{command}: {directory} already holds {other or 'another artifact'} ({marker.name}); "
                             f"write the {kind} to another directory")
    own = (f"{kind}-", "labels-", "rejects-", "_done-", ".")
    foreign = sorted(p.name for p in directory.iterdir() if not p.name.startswith(own))
    if foreign:
        more = ", ..." if len(foreign) > 3 else ""
        raise EcgfmError(f"{command}: {directory} holds other files ({', '.join(foreign[:3])}{more}); write the "
                         f"{kind} to a new or empty directory")


def start_shard(output: Output, shard: tuple[int, int], command: str, kind: str) -> bool:
    """Prepare a shard of a ``dir`` output of artifact ``kind``: False (and a message) when its done-marker says
    it is complete; otherwise lock it for this run (:func:`lock_output`), delete the parts and temporaries an
    interrupted run of the same shard left, so the shard is redone from scratch. A directory holding another kind
    of artifact is refused. A single-file output is locked and cleared of dead runs' temporaries."""
    if output.format == "stream":
        return True
    if output.format != "dir":
        lock_output(output, shard, command)
        remove_dead_temporaries(output, shard)
        return True
    check_output_kind(output.path, kind, command)
    marker = done_marker(output.path, shard)
    if not marker.exists():
        lock_output(output, shard, command)
        if marker.exists():  # another run finished the shard just before this one took the lock
            release_output(output, shard)
    if marker.exists():
        info(f"{command}: shard {shard[0]}/{shard[1]} is already complete in {output.path}; nothing to do "
             f"(delete {marker} to redo it)")
        return False
    remove_dead_temporaries(output, shard)
    for stale in output.path.glob(f"*-{shard_tag(shard)}*.parquet"):
        stale.unlink()
    return True


def discard_empty_output(output: Output, shard: tuple[int, int] = (0, 1)) -> None:
    """After a run that wrote no row: remove its empty artifact file and labels table (the rejects table stays:
    it says why), so that nothing is left to look like a result. Ends the run's lock on the output."""
    if output.format in ("parquet", "arrow"):
        output.path.unlink(missing_ok=True)
    labels = sidecar_path(output, "labels", shard)
    if labels is not None:
        labels.unlink(missing_ok=True)
    release_output(output, shard)


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
        if output.format != "dir":  # a single file is complete now; a directory's shard ends with its marker
            release_output(output, shard)
        return
    # files that are not records (documents, images) are counted in the command's summary line, not listed here
    listed = [r for r in rejects.to_pylist() if r["reason"] != "ignored"]
    for r in listed[:20]:
        info(f"{command}: skipped {r['record_id'] or r['source_path']}: {r['reason']}: {r['detail']}")
    if len(listed) > 20:
        info(f"{command}: ... and {len(listed) - 20} more (pass --rejects FILE.parquet to keep them all)")


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

class _WatchedInput:
    """A binary stream for pyarrow's stream reader that notes whether the stream ended with its end-of-stream
    marker. pyarrow takes an EOF that falls between two messages for the end of the stream, so a writer killed
    between two record batches would otherwise pass for a complete, shorter stream."""

    def __init__(self, raw) -> None:
        self._raw = raw
        self._tail = b""
        self._eof = False  # a read came back short: the writer's end of the pipe closed

    def read(self, n: int = -1) -> bytes:
        data = self._raw.read(n)
        if n is None or n < 0 or len(data) < n:
            self._eof = True
        self._tail = (self._tail + data[-8:])[-8:]
        return data

    @property
    def ended_cleanly(self) -> bool:
        """True when the last bytes read were the end-of-stream marker and the reader stopped there."""
        return not self._eof and self._tail == STREAM_END

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def writable(self) -> bool:
        return False

    @property
    def closed(self) -> bool:
        return False

    def close(self) -> None:  # stdin stays open: its owner closes it
        pass


# Reading a directory whose shards are not all complete is refused unless the command was told otherwise (the
# shared ``--allow-partial`` option, ecgfm_cli/commands/options.py, sets this for the command's run). An
# environment variable, so that the processes a command spawns (DDP ranks, embed's workers) inherit it.
ALLOW_PARTIAL_ENV = "ECGFM_ALLOW_PARTIAL"


def set_allow_partial(allow: bool) -> None:
    """Let :func:`open_artifact` read incomplete directory artifacts (with a warning) in this process and the ones
    it starts, until set back."""
    if allow:
        os.environ[ALLOW_PARTIAL_ENV] = "1"
    else:
        os.environ.pop(ALLOW_PARTIAL_ENV, None)


_TAGGED = re.compile(r"^(?:(?P<kind>[a-z]+)-|(?P<done>_done-)|(?P<run>\.run-))s(?P<i>\d{5})of(?P<n>\d{5})"
                     r"(?P<part>-p\d{5})?\.(?:parquet|json)$")
_WRITER_OF = {"records": "ingest", "segments": "segment", "embeddings": "embed"}


def _rerun_of(run: dict | None, shard: tuple[int, int]) -> str | None:
    """The command that (re)writes ``shard``: the recorded command line of a run of it, or of another shard of the
    same artifact with its ``--shard`` value replaced."""
    if not run or not run.get("command"):
        return None
    try:
        argv = shlex.split(run["command"])
    except ValueError:
        return None
    want = f"{shard[0]}/{shard[1]}"
    for k, a in enumerate(argv):
        if a == "--shard" and k + 1 < len(argv):
            argv[k + 1] = want
            break
        if a.startswith("--shard="):
            argv[k] = f"--shard={want}"
            break
    else:
        if shard[1] > 1:
            argv += ["--shard", want]
    cmd = f"`{shlex.join(argv)}`"
    if run.get("cwd") and run["cwd"] != os.getcwd():
        cmd += f" (in {run['cwd']})"
    if run.get("stdin_pipe") and "-" in argv[2:]:
        cmd += " fed by the command that piped into it"
    return cmd


def incomplete_shards(directory: Path) -> tuple[list[str], str | None]:
    """What keeps directory artifact ``directory`` from being whole: phrases such as ``"shard 0/1 was
    interrupted"`` (empty when it is complete), and the command that completes it when one is known.

    Every shard of ``N`` that a file name mentions is expected (0..N-1): each needs a readable done marker whose
    ``parts`` are all there and that lists every part of its shard."""
    tags: dict[tuple[int, int], dict] = {}
    for p in directory.iterdir():
        m = _TAGGED.match(p.name)
        if m is None:
            continue
        entry = tags.setdefault((int(m["i"]), int(m["n"])), {"parts": set(), "done": None, "run": None})
        if m["done"]:
            entry["done"] = p
        elif m["run"]:
            entry["run"] = p
        elif m["part"]:
            entry["parts"].add(p.name)
    if not tags:
        return [], None
    counts = sorted({n for _, n in tags})
    problems: list[str] = []
    if len(counts) > 1:
        problems.append("it mixes runs split into " + " and ".join(map(str, counts)) + " shards")
    running, interrupted, never, broken, redo = [], [], [], [], []
    # a recorded run of this artifact, to derive the command of shards that never ran
    known_run = _read_json(directory / ".run.json") if (directory / ".run.json").exists() else None
    for n in counts:
        for i in range(n):
            entry = tags.get((i, n), {"parts": set(), "done": None, "run": None})
            run = _read_json(entry["run"]) if entry["run"] is not None else None
            done = _read_json(entry["done"]) if entry["done"] is not None else None
            known_run = known_run or next((r for r in (run, done) if r and r.get("command")), None)
            name = f"{i}/{n}"
            if entry["done"] is None:
                if entry["run"] is not None and _run_is_live(entry["run"]):
                    running.append((name, run))
                elif entry["parts"] or entry["run"] is not None:
                    interrupted.append(((i, n), run))
                else:
                    never.append((i, n))
                continue
            fault = _marker_fault(done, entry)
            if fault:
                broken.append(f"shard {name} {fault}")
                redo.append(((i, n), run or done))
    for name, run in running:
        problems.append(f"shard {name} is still being written ({_describe_run(run)}): wait for it to finish")
    if interrupted:
        problems.append(_shards(s for s, _ in interrupted) + (" was" if len(interrupted) == 1 else " were")
                        + " interrupted (no done marker)")
    if never:
        problems.append(_shards(never) + (" has" if len(never) == 1 else " have") + " not been written")
    problems += broken
    rerun = None
    for shard, run in interrupted + redo + [(s, None) for s in never]:
        rerun = _rerun_of(run or known_run, shard)
        if rerun:
            break
    return problems, rerun


def _marker_fault(done: dict | None, entry: dict) -> str | None:
    """What is wrong with a shard whose done marker exists (None when nothing): unreadable, or its listed parts
    and the part files present differ."""
    if done is None:
        return f"has an unreadable done marker ({entry['done'].name})"
    if "parts" not in done:  # markers of embed's shards list no parts
        return None
    parts = [] if done["parts"] is None else done["parts"]
    if not isinstance(parts, list) or not all(isinstance(f, str) for f in parts):
        return f"has a damaged done marker ({entry['done'].name}: its parts are not a list of file names)"
    listed = set(parts)
    missing = sorted(listed - entry["parts"])
    if missing:
        more = f" and {len(missing) - 1} more part(s)" if len(missing) > 1 else ""
        return f"lacks {missing[0]}{more} that its done marker lists"
    extra = sorted(f for f in entry["parts"] - listed if f.startswith(f"{done.get('kind')}-"))
    if extra:
        return f"holds {extra[0]}, which its done marker does not list"
    return None


def _shards(shards) -> str:
    names = [f"{i}/{n}" for i, n in shards]
    more = f" and {len(names) - 5} more" if len(names) > 5 else ""
    return ("shard " if len(names) == 1 else "shards ") + ", ".join(names[:5]) + more


def check_complete(directory: Path, command: str, allow_partial: bool | None = None) -> None:
    """Fail (one line: what is missing, the rerun that completes it) unless every shard of directory artifact
    ``directory`` is complete; with ``allow_partial`` (default: the command's ``--allow-partial``), warn and go
    on with what is there. ``command`` prefixes the message (empty: none)."""
    problems, rerun = incomplete_shards(Path(directory))
    if not problems:
        return
    what = f"{directory} is incomplete: " + "; ".join(problems)
    prefix = f"{command}: " if command else ""
    if os.environ.get(ALLOW_PARTIAL_ENV) == "1" if allow_partial is None else allow_partial:
        info(f"{prefix}warning: {what}; reading only what is there (--allow-partial)")
        return
    writer = next((w for k, w in _WRITER_OF.items() if any(Path(directory).glob(f"{k}-*.parquet"))), None)
    how = f"complete it with {rerun}" if rerun else (
        f"rerun the `ecgfm {writer}` that writes it" if writer else "rerun the command that writes it")
    raise EcgfmError(f"{prefix}{what}; {how}, or pass --allow-partial to read only what is there")


@dataclass
class ArtifactReader:
    """Reads an artifact from a shard directory, a ``.parquet``/``.arrow`` file or ``-`` (stdin stream)."""

    path: str
    kind: str | None = None
    files: list[Path] = field(default_factory=list)
    schema: pa.Schema | None = None
    _stream: object = None
    _input: _WatchedInput | None = None

    @property
    def metadata(self) -> dict[str, str]:
        raw = (self.schema.metadata or {}) if self.schema is not None else {}
        return {k.decode(): v.decode() for k, v in raw.items()}

    def num_rows(self) -> int | None:
        """Row count from the files' footers (None for a stream)."""
        if self._stream is not None:
            return None
        total = 0
        for f in self.files:
            with open_table(f) as t:
                total += t.num_rows
        return total

    def iter_batches(self, columns: list[str] | None = None, batch_size: int = 256) -> Iterator[pa.RecordBatch]:
        if self._stream is not None:
            stream, self._stream = self._stream, None
            rows = 0
            try:
                for batch in stream:
                    rows += batch.num_rows
                    yield batch.select(columns) if columns else batch
            except (OSError, pa.ArrowInvalid) as e:
                raise EcgfmError(f"stdin: the Arrow stream stops mid-way ({e}): the command before the pipe failed "
                                 "or was interrupted") from e
            if self._input is not None and not self._input.ended_cleanly:
                raise EcgfmError(f"stdin: the Arrow stream stops after {plural(rows, 'row')} without its "
                                 "end-of-stream marker: "
                                 "the command before the pipe was killed or failed, so this is not the whole input")
            return
        for f in self.files:
            with open_table(f) as t:
                yield from t.iter_batches(columns or None, batch_size)

    def iter_rows(self, start: int = 0, stop: int | None = None, columns: list[str] | None = None,
                  batch_size: int = 256) -> Iterator[pa.RecordBatch]:
        """Rows ``[start, stop)`` of the files' concatenation (``stop`` None: to the end), in order, as record
        batches of at most ``batch_size`` rows; files and groups outside the range are not read. A stream can
        only be read whole (``start`` 0, ``stop`` None)."""
        if self._stream is not None or (start == 0 and stop is None):
            if start or stop is not None:
                raise EcgfmError(f"{self.path}: a stream cannot be read from row {start}: give a file or directory")
            yield from self.iter_batches(columns, batch_size)
            return
        offset = 0
        for f in self.files:
            if stop is not None and offset >= stop:
                return
            with open_table(f) as t:
                n = t.num_rows
                if offset + n > start:
                    yield from t.iter_rows(max(start - offset, 0), None if stop is None else stop - offset,
                                           columns or None, batch_size)
            offset += n

    def read_all(self, columns: list[str] | None = None) -> pa.Table:
        batches = list(self.iter_batches(columns))
        schema = self.schema if not columns else pa.schema([self.schema.field(c) for c in columns])
        return pa.Table.from_batches(batches, schema=schema)


def open_artifact(path: str | Path, kind: str, command: str = "ecgfm",
                  allow_partial: bool | None = None) -> ArtifactReader:
    """Open an artifact of ``kind`` for reading, with one clear error if it is missing, of another kind, lacks a
    column that ``kind`` requires (every file's schema is checked) or (a directory) is incomplete
    (:func:`check_complete`; ``allow_partial`` None: the command's ``--allow-partial``). A stream is checked for
    its end-of-stream marker when it has been read through."""
    spath = str(path)
    if spath == "-":
        if sys.stdin.isatty():
            raise EcgfmError(f"{command}: no input: give a path, or pipe `ecgfm ingest ... |` into it")
        head = sys.stdin.buffer.peek(4)[:4] if hasattr(sys.stdin.buffer, "peek") else b"?"
        if not head:
            raise EcgfmError(f"{command}: stdin is empty: the command before the pipe wrote nothing (did it fail?)")
        if head == b"PAR1":
            raise EcgfmError(f"{command}: stdin holds a Parquet file: give its path as the input instead (stdin "
                             "takes the Arrow stream that `-o -` writes)")
        watched = _WatchedInput(sys.stdin.buffer)
        try:
            stream = ipc.open_stream(pa.PythonFile(watched, mode="r"))
        except (OSError, pa.ArrowInvalid) as e:
            raise EcgfmError(f"{command}: stdin is not an Arrow stream from ecgfm ({e})") from e
        reader = ArtifactReader(spath, kind, schema=stream.schema, _stream=stream, _input=watched)
        _check_columns(reader.schema, kind, "stdin", command)
    else:
        p = Path(spath)
        if p.is_dir():
            files = sorted(p.glob(f"{kind}-*.parquet"))
            if not files:
                others = sorted({f.name.split("-")[0] for f in p.glob("*-*.parquet")})
                hint = f" (it holds {', '.join(others)} artifacts)" if others else ""
                raise EcgfmError(f"{command}: {p} holds no {kind} files ({kind}-*.parquet){hint}")
        elif p.is_file():
            files = [p]
        else:
            raise EcgfmError(f"{command}: {p} does not exist")
        reader = ArtifactReader(spath, kind, files=files)
        for f in files:  # every file: a truncated or foreign one in a directory fails here, not mid-run
            schema = read_schema(f)
            _check_columns(schema, kind, str(f), command)
            if reader.schema is None:
                reader.schema = schema
        if p.is_dir():
            check_complete(p, command, allow_partial)
    meta = reader.metadata
    found = meta.get("ecgfm.kind")
    if found is not None and found != kind:
        raise EcgfmError(f"{command}: {spath} holds {found}, not {kind}")
    version = int(meta.get("ecgfm.schema_version", SCHEMA_VERSION))
    if version > SCHEMA_VERSION:
        raise EcgfmError(f"{command}: {spath} has schema version {version}; this ecgfm ({__version__}) reads up to "
                         f"{SCHEMA_VERSION}: upgrade ecgfm")
    return reader


def read_stdin_stream(command: str) -> pa.Table:
    """The whole Arrow IPC stream on stdin as a table, of any kind: one line when stdin holds none, or when the
    stream is cut (mid-message, or between messages: no end-of-stream marker)."""
    watched = _WatchedInput(sys.stdin.buffer)
    try:
        stream = ipc.open_stream(pa.PythonFile(watched, mode="r"))
    except (OSError, pa.ArrowInvalid) as e:
        raise EcgfmError(f"{command + ': ' if command else ''}stdin is not an Arrow stream from ecgfm ({e})") from e
    reader = ArtifactReader("-", None, schema=stream.schema, _stream=stream, _input=watched)
    return reader.read_all()


def _check_columns(schema: pa.Schema, kind: str, where: str, command: str) -> None:
    """Fail naming ``where`` and the columns a ``kind`` artifact needs that ``schema`` lacks (an artifact of
    another kind says which)."""
    missing = [c for c in REQUIRED_COLUMNS.get(kind, ()) if c not in schema.names]
    if not missing:
        return
    found = (schema.metadata or {}).get(b"ecgfm.kind", b"").decode()
    if found and found != kind:
        raise EcgfmError(f"{command}: {where} holds {found}, not {kind}")
    raise EcgfmError(f"{command}: {where} is not a {kind} artifact: it lacks the column(s) {', '.join(missing)}")
