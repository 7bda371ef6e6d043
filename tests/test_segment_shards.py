"""`segment --shard I/N` when a shard holds no record file: it is complete, not failed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from ecgfm_cli.io.artifacts import open_artifact


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ecgfm_cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def test_a_segment_shard_holding_no_file_is_complete(sample_data: Path, tmp_path: Path) -> None:
    """Records in one file, segmented in three shards: two shards have no file to read. Each finishes with a
    zero-row done marker and says so, and the segments directory reads whole (before, those shards failed with
    'no segment was written' and left the directory incomplete for good: a rerun failed the same way)."""
    rec, seg = tmp_path / "rec", tmp_path / "seg"
    assert run_cli("ingest", sample_data / "challenge2021", "-o", rec).returncode == 0
    for i in range(3):
        r = run_cli("segment", rec, "-o", seg, "--shard", f"{i}/3")
        assert r.returncode == 0, r.stderr
        if i:
            assert f"shard {i}/3 holds none of the 1 records file" in r.stderr, r.stderr
    markers = [json.loads(p.read_text()) for p in sorted(seg.glob("_done-*.json"))]
    assert [m["shard"] for m in markers] == [[0, 3], [1, 3], [2, 3]]
    assert [m["segments"] > 0 for m in markers] == [True, False, False]
    whole = open_artifact(seg, "segments", "test").read_all(["record_id"])
    assert whole.num_rows == markers[0]["segments"]
    marker = seg / "_done-s00002of00003.json"
    before = marker.stat().st_mtime_ns
    r = run_cli("segment", rec, "-o", seg, "--shard", "2/3")  # a rerun of a finished empty shard is skipped
    assert r.returncode == 0 and "shard 2/3 is already complete" in r.stderr, r.stderr
    assert marker.stat().st_mtime_ns == before
