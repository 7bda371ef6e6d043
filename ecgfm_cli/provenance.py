"""What produced an output, and writing outputs so that two runs never mix.

Shared by ``probe``, ``evaluate`` and ``finetune``:

* :func:`build_provenance` returns the JSON object stored as Parquet key-value metadata
  ``ecgfm.provenance`` (and as the top-level ``"provenance"`` of JSON reports): the command line, the
  package version, the seed and a fingerprint of every input artifact.
* :func:`fingerprint` hashes an input. A file or a directory whose total size is at most
  ``FULL_HASH_LIMIT`` bytes is hashed in full (sha256 of the bytes; for a directory, of every regular file in
  sorted relative-path order, each preceded by its relative path). Above that limit the hash covers, per
  file, its relative path, size, mtime (ns) and its first and last MiB (``method: "sampled"``): cheap on a
  100 GB shard directory, and it still changes when a file is rewritten, but two different files that agree
  on all of that would collide, so the method is recorded next to the digest.
* :func:`atomic_path` / :func:`atomic_write_text` / :func:`replace_dir` write to ``NAME.tmp-<pid>`` in the same
  directory and rename over the final name, so a reader never sees a half-written file and reusing an output
  path replaces the previous run's output (a directory is replaced as a whole, never merged).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import os
import platform
import shutil
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

#: Inputs up to this many bytes (summed over a directory's files) are hashed in full.
FULL_HASH_LIMIT = 256 * 1024 * 1024
_SAMPLE_BYTES = 1024 * 1024


def _files_of(path: Path) -> list[tuple[str, Path]]:
    """(relative path, path) of every regular file under ``path`` in sorted order, temp files excluded."""
    if path.is_file():
        return [(path.name, path)]
    out = []
    for p in sorted(path.rglob("*")):
        if p.is_file() and ".tmp-" not in p.name:
            out.append((p.relative_to(path).as_posix(), p))
    return out


def fingerprint(path: str | os.PathLike, full_hash_limit: int = FULL_HASH_LIMIT) -> dict[str, Any]:
    """Fingerprint an input artifact (a file or a directory of shards).

    Returns ``{"path", "type": "file"|"dir"|"stdin"|"missing", "n_files", "size" (bytes), "sha256",
    "method": "full"|"sampled"}``. ``-`` (stdin) cannot be hashed and is recorded as such.
    """
    if str(path) == "-":
        return {"path": "-", "type": "stdin", "sha256": None, "method": None}
    p = Path(path)
    if not p.exists():
        return {"path": str(p), "type": "missing", "sha256": None, "method": None}
    files = _files_of(p)
    total = sum(f.stat().st_size for _, f in files)
    method = "full" if total <= full_hash_limit else "sampled"
    h = hashlib.sha256()
    for rel, f in files:
        st = f.stat()
        if p.is_dir():
            h.update(rel.encode() + b"\0")
        if method == "full":
            with open(f, "rb") as fh:
                for chunk in iter(lambda fh=fh: fh.read(1 << 20), b""):
                    h.update(chunk)
        else:
            h.update(f"{st.st_size}:{st.st_mtime_ns}\0".encode())
            with open(f, "rb") as fh:
                h.update(fh.read(_SAMPLE_BYTES))
                if st.st_size > _SAMPLE_BYTES:
                    fh.seek(max(_SAMPLE_BYTES, st.st_size - _SAMPLE_BYTES))
                    h.update(fh.read(_SAMPLE_BYTES))
    return {
        "path": str(p.resolve()),
        "type": "dir" if p.is_dir() else "file",
        "n_files": len(files),
        "size": total,
        "sha256": h.hexdigest(),
        "method": method,
    }


def build_provenance(
    inputs: Mapping[str, str | os.PathLike | None],
    seed: int | None = None,
    argv: list[str] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The provenance record of one run.

    inputs: role -> path (``None`` values are skipped), e.g. ``{"embeddings": ..., "labels": ...}``.
    argv: the command line (default ``sys.argv``). extra: free-form settings merged in under ``"settings"``.
    """
    from ecgfm_cli import __version__

    out: dict[str, Any] = {
        "command": list(sys.argv if argv is None else argv),
        "ecgfm_version": __version__,
        "seed": seed,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "python": platform.python_version(),
        "inputs": {k: fingerprint(v) for k, v in inputs.items() if v is not None},
    }
    if extra:
        out["settings"] = dict(extra)
    return out


def _tmp_name(path: Path) -> Path:
    return path.with_name(f"{path.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``, on error remove it.

    Works for files and for directories (an existing directory at ``path`` is replaced as a whole).
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
    else:
        if final.is_dir():
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
        old = final.with_name(f"{final.name}.old-{os.getpid()}")
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


def write_parquet_atomic(table: Any, path: str | os.PathLike) -> None:
    """Write a ``pyarrow.Table`` to one Parquet file atomically (metadata travels in the table's schema)."""
    import pyarrow.parquet as pq

    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
