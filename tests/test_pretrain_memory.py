"""Memory the pretraining loader holds (ecgfm_cli/train/data.py ``BatchReader``): no memory-mapped segment files, and
no Arrow bytes beyond the row groups it still needs (benchmarks/bench_pretrain_memory.py measures the whole run)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from conftest import make_segments

from ecgfm_cli.io.artifacts import ArtifactWriter, Output
from ecgfm_cli.io.tables import open_table
from ecgfm_cli.train.data import BatchReader, LoaderConfig, epoch_plan, last_use, open_segments

WINDOW, ROWS_PER_GROUP = 250, 8


def _segments(tmp_path: Path, fmt: str) -> Path:
    """48 two-segment records in row groups of 8 (12 groups of 96 KB of signal), as Parquet shards, one Arrow
    IPC file or one saved Arrow IPC stream (a record batch per group)."""
    seg = make_segments(tmp_path / "seg", [2] * 48, window=WINDOW, rows_per_group=ROWS_PER_GROUP)
    if fmt == "parquet":
        return seg
    (part,) = seg.glob("segments-*.parquet")
    with open_table(part) as t:
        table = t.read()
    path = tmp_path / "seg.arrow"
    if fmt == "stream":  # what `ecgfm segment -o - > seg.arrow` leaves
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as stream:
            stream.write_table(table, max_chunksize=ROWS_PER_GROUP)
        return path
    w = ArtifactWriter(Output("arrow", path), "segments", table.schema, row_group_rows=ROWS_PER_GROUP)
    for lo in range(0, table.num_rows, ROWS_PER_GROUP):
        w.write(table.slice(lo, ROWS_PER_GROUP))
    w.close()
    return path


def _mapped(files: list[Path]) -> list[str]:
    """The mappings of this process that are any of ``files``."""
    names = {os.path.realpath(f) for f in files}
    with open("/proc/self/maps") as fh:
        return [line.split(maxsplit=5)[-1].strip() for line in fh if line.split(maxsplit=5)[-1].strip() in names]


def _plan(index, cfg: LoaderConfig) -> list[np.ndarray]:
    """The global rows of every batch of consumer 0 in epoch 0, as ``iter_consumer`` reads them."""
    return [np.stack([p, p + 1], axis=1).reshape(-1) for p in epoch_plan(index, cfg, 0, 0)]


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="reads the process's mappings from /proc")
@pytest.mark.parametrize("fmt", ["parquet", "arrow", "stream"])
def test_loader_does_not_map_segment_files(tmp_path: Path, fmt: str) -> None:
    """A mapped file's pages stay in the process's resident memory once read: a loader that mapped its files grew
    to the corpus's size, once per worker, over an epoch (the loader alone: 2.8 GB RSS on a 2 GB corpus). The
    reader must read them instead, and get the same signals."""
    index = open_segments(_segments(tmp_path, fmt))
    batches = _plan(index, LoaderConfig(batch_size=8, cmsc=True, rlm=False, shuffle_buffer=48))
    reader = BatchReader(index)
    keep = last_use(index, batches)
    got = [reader.gather(rows, keep, step) for step, rows in enumerate(batches[:3])]
    assert reader._cache, "the plan needs its row groups again: they stay cached"
    assert _mapped(index.files) == []
    with open_table(index.files[0]) as t:  # mapped, as one-pass readers open a file
        want = np.concatenate([t.read_group(g, ["signal"]).column(0).combine_chunks().flatten().to_numpy()
                               for g in range(t.num_groups)]).reshape(-1, 12, WINDOW)
    for rows, x in zip(batches, got, strict=False):
        np.testing.assert_array_equal(x, want[rows])


@pytest.mark.parametrize("fmt", ["parquet", "arrow", "stream"])
def test_loader_holds_only_the_row_groups_it_still_needs(tmp_path: Path, fmt: str) -> None:
    """While an epoch is read, the Arrow memory the reader holds is its cached row groups and nothing else (an
    unmapped Parquet file read with pre-buffering kept each group's raw bytes as well, until the next read), and
    none is left once every group's last use has passed."""
    index = open_segments(_segments(tmp_path, fmt))
    batches = _plan(index, LoaderConfig(batch_size=8, cmsc=True, rlm=False, shuffle_buffer=8))
    group_bytes = ROWS_PER_GROUP * 12 * WINDOW * 4
    reader = BatchReader(index)
    keep = last_use(index, batches)
    base = pa.total_allocated_bytes()
    for step, rows in enumerate(batches):
        x = reader.gather(rows, keep, step)
        cached = sum(a.nbytes for a in reader._cache.values())
        assert cached <= 3 * group_bytes, "a shuffle block of 8 pairs spans at most 3 groups of 8 rows"
        assert pa.total_allocated_bytes() - base <= cached + group_bytes // 4, f"step {step}"
        del x
    assert reader._cache == {}
    assert pa.total_allocated_bytes() - base <= group_bytes // 4


def test_loader_keeps_a_bounded_number_of_files_open(tmp_path: Path, monkeypatch) -> None:
    """A corpus of more shards than ``BatchReader.MAX_OPEN`` is read whole with at most that many files open (one
    descriptor per shard per loader thread ran out of descriptors at a few thousand shards), and the rows are the
    rows: closing a file leaves what was read from it valid."""
    monkeypatch.setattr(BatchReader, "MAX_OPEN", 3)
    seg = make_segments(tmp_path / "seg", [2] * 40, window=WINDOW, rows_per_group=ROWS_PER_GROUP, files=8)
    index = open_segments(seg, None, "pretrain")
    assert len(index.files) == 8
    reader = BatchReader(index)
    rows = np.arange(index.record.shape[0])
    kept = []
    most_open = 0
    for step, chunk in enumerate(np.array_split(rows[::-1], 10)):  # every file, revisited out of order
        kept.append((chunk, reader.gather(chunk, {}, step)))
        most_open = max(most_open, len(reader._files))
    assert most_open == 3
    monkeypatch.setattr(BatchReader, "MAX_OPEN", 100)
    every_file_open = BatchReader(index)
    for step, (chunk, x) in enumerate(kept):
        np.testing.assert_array_equal(x, every_file_open.gather(chunk, {}, step))
    assert len(every_file_open._files) == 8
