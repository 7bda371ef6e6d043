"""What produced an output: the provenance record of ``probe``, ``evaluate``, ``finetune`` and ``embed``.

(Writing outputs so that two runs never mix is :func:`ecgfm_cli.io.artifacts.atomic_path`.)


* :func:`build_provenance` returns the JSON object stored as Parquet key-value metadata
  ``ecgfm.provenance`` (and as the top-level ``"provenance"`` of JSON reports): the command line, the
  package version, the seed and a fingerprint of every input artifact.
* :func:`fingerprint` hashes an input. A file or a directory whose total size is at most
  ``FULL_HASH_LIMIT`` bytes is hashed in full (sha256 of the bytes; for a directory, of every regular file in
  sorted relative-path order, each preceded by its relative path). Above that limit the hash covers, per
  file, its relative path, size, mtime (ns) and its first and last MiB (``method: "sampled"``): cheap on a
  100 GB shard directory, and it still changes when a file is rewritten, but two different files that agree
  on all of that would collide, so the method is recorded next to the digest.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import platform
import sys
from collections.abc import Mapping
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
