"""The one file reader (ecgfm_cli/io/tables.py): Parquet and Arrow IPC files read the same way, one message per
kind of unreadable file, and the readers built on it (artifacts, training data, labels, evaluate) treating both
formats alike."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ecgfm_cli.contract import Contract
from ecgfm_cli.errors import EcgfmError
from ecgfm_cli.io.artifacts import ArtifactWriter, Output, open_artifact
from ecgfm_cli.io.schema import segments_schema
from ecgfm_cli.io.tables import TableFileError, open_table, read_columns, read_schema

N_LEADS, WINDOW = 12, 8


def write_table(path: Path, table: pa.Table, group_rows: int) -> Path:
    """``table`` as a Parquet file (row groups of ``group_rows``) or, for ``.arrow``, an Arrow IPC file (record
    batches of ``group_rows``)."""
    if path.suffix == ".parquet":
        pq.write_table(table, path, row_group_size=group_rows)
    else:
        with pa.ipc.new_file(str(path), table.schema) as w:
            w.write_table(table, max_chunksize=group_rows)
    return path


def small_table(n: int = 10) -> pa.Table:
    return pa.table({"a": pa.array(range(n), pa.int64()), "b": [f"r{i}" for i in range(n)]}).replace_schema_metadata(
        {"ecgfm.kind": "labels"})


def write_segments(path: Path, n: int, zero_lead_rows: tuple[int, ...] = ()) -> Path:
    """A ``segments`` artifact of ``n`` one-segment records as ``ecgfm segment`` writes it (``.parquet`` or
    ``.arrow``, by the name; row groups of 4); lead 0 of the rows ``zero_lead_rows`` is marked zero-filled."""
    schema = segments_schema(N_LEADS, WINDOW).with_metadata(
        {b"ecgfm.contract": Contract(window=WINDOW, stride=WINDOW).to_json().encode()})
    present = np.ones((n, N_LEADS), bool)
    present[list(zero_lead_rows), 0] = False
    cols = {
        "record_id": pa.array([f"rec{i:03d}" for i in range(n)]),
        "segment_index": pa.array([0] * n, pa.int32()),
        "start_sample": pa.array([0] * n, pa.int64()),
        "signal": pa.FixedSizeListArray.from_arrays(pa.array(np.arange(n * N_LEADS * WINDOW, dtype=np.float32)),
                                                    N_LEADS * WINDOW),
        "lead_present": pa.FixedSizeListArray.from_arrays(pa.array(present.reshape(-1)), N_LEADS),
        "sample_rate_orig": pa.array([500.0] * n),
        "padded": pa.array([False] * n),
    }
    fmt = "arrow" if path.suffix == ".arrow" else "parquet"
    w = ArtifactWriter(Output(fmt, path), "segments", schema, row_group_rows=4)
    for lo in range(0, n, 4):  # Arrow IPC: one record batch per write
        part = {k: v.slice(lo, 4) for k, v in cols.items()}
        w.write(pa.table({f.name: part.get(f.name, pa.nulls(len(part["record_id"]), f.type)) for f in schema},
                         schema=schema))
    w.close()
    return path


@pytest.mark.parametrize("suffix", [".parquet", ".arrow"])
def test_both_formats_give_the_same_layout_and_reads(tmp_path, suffix):
    t = small_table(10)
    with open_table(write_table(tmp_path / f"t{suffix}", t, group_rows=4)) as f:
        assert f.format == suffix[1:] and f.metadata == {"ecgfm.kind": "labels"}
        assert f.num_rows == 10 and f.group_rows == [4, 4, 2] and f.num_groups == 3
        assert f.schema.names == ["a", "b"] and f.read(["b"]).column_names == ["b"]
        assert f.read().equals(t) and f.read().schema.metadata == t.schema.metadata
        assert f.read_group(1, ["a"]).column("a").to_pylist() == [4, 5, 6, 7]
        assert f.read_group(1, ["a"], head=2).column("a").to_pylist() == [4, 5]
        batches = list(f.iter_batches(["a"], batch_size=3))
        assert all(b.num_rows <= 3 for b in batches) and sum(b.num_rows for b in batches) == 10
        for start, stop in [(0, None), (3, 9), (4, 8), (9, 10), (5, 5), (8, 100)]:
            got = [v for b in f.iter_rows(start, stop, ["a"], batch_size=3) for v in b.column("a").to_pylist()]
            assert got == list(range(10))[start:stop], (start, stop)
    assert read_schema(tmp_path / f"t{suffix}").names == ["a", "b"]
    assert read_columns(tmp_path / f"t{suffix}", ["a"]).num_rows == 10


def test_the_format_is_told_by_content_not_by_name(tmp_path):
    """A Parquet file named .arrow (or the reverse) reads: the first bytes say what it is."""
    t = small_table(5)
    assert open_table(write_table(tmp_path / "x.parquet", t, 2).rename(tmp_path / "p.arrow")).format == "parquet"
    assert read_columns(write_table(tmp_path / "y.arrow", t, 2).rename(tmp_path / "a.parquet")).equals(t)


def _error(path: Path) -> TableFileError:
    with pytest.raises(TableFileError) as e:
        open_table(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    return e.value


def test_one_message_per_kind_of_unreadable_file(tmp_path):
    t = small_table(200)
    parquet = write_table(tmp_path / "t.parquet", t, 50).read_bytes()
    arrow = write_table(tmp_path / "t.arrow", t, 50).read_bytes()
    cases = {
        "empty.parquet": (b"", "truncated", "the file is empty"),
        "half.parquet": (parquet[: len(parquet) // 2], "truncated", "cannot read as Parquet: the file is cut short"),
        "half.arrow": (arrow[: len(arrow) // 2], "truncated",
                       "cannot read as an Arrow IPC file: the file is cut short"),
        "text.parquet": (b"record_id,AF\na,1\n", "foreign", "cannot read as Parquet or Arrow IPC: it is neither"),
    }
    for name, (content, kind, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        e = _error(tmp_path / name)
        assert (e.kind, message in str(e)) == (kind, True), (name, str(e))
    # both magic numbers there, but the footer's length is wrong: named as damage, with pyarrow's reason
    damaged = bytearray(parquet)
    damaged[-8:-4] = (len(parquet) * 2).to_bytes(4, "little")
    (tmp_path / "damaged.parquet").write_bytes(bytes(damaged))
    e = _error(tmp_path / "damaged.parquet")
    assert e.kind == "truncated" and "the file is damaged (" in str(e)
    assert _error(tmp_path).kind == "unreadable" and _error(tmp_path / "missing.parquet").kind == "unreadable"
    assert isinstance(e, EcgfmError)


def test_a_saved_stream_is_read_as_a_file(tmp_path):
    """A stream saved to a file was refused with "feed it on stdin", wrong for the commands that take no stdin
    (pretrain, finetune): it is read (tests/test_tables_messages.py has the rest)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, small_table(3).schema) as w:
        w.write_table(small_table(3))
    (tmp_path / "s.arrow").write_bytes(sink.getvalue().to_pybytes())
    with open_table(tmp_path / "s.arrow") as t:
        assert t.format == "stream" and t.read().equals(small_table(3)) and t.metadata == {"ecgfm.kind": "labels"}


@pytest.mark.parametrize("suffix", [".parquet", ".arrow"])
def test_artifact_rows_and_ranges_alike_in_both_formats(tmp_path, suffix):
    """An .arrow artifact has a row count (it had none: ``embed --shard`` and ``--procs`` refused it as if it were a
    stream), row ranges of it are read, and batches respect the batch size in both formats."""
    from ecgfm_cli.embed import iter_rows, plan_ranges

    reader = open_artifact(write_segments(tmp_path / f"seg{suffix}", 10), "segments", "embed")
    assert reader.num_rows() == 10
    assert plan_ranges(reader, 2, align_records=True) == [(0, 5), (5, 10)]
    got = [b.column("record_id").to_pylist() for b in iter_rows(reader, 3, 9, ["record_id"], batch_size=2)]
    assert got == [["rec003"], ["rec004", "rec005"], ["rec006", "rec007"], ["rec008"]]
    sizes = [b.num_rows for b in reader.iter_batches(["record_id"], batch_size=3)]
    assert max(sizes) == 3 and sum(sizes) == 10


def test_artifact_directory_of_many_files_reads_ranges_across_files(tmp_path):
    reader = open_artifact(write_segments(tmp_path / "seg.arrow", 6), "segments", "embed")
    reader.files = [reader.files[0]] * 3  # the same 6 rows three times: rows 0-17
    assert reader.num_rows() == 18
    rows = [r for b in reader.iter_rows(5, 14, ["record_id"], batch_size=4) for r in b.column("record_id").to_pylist()]
    assert rows == [f"rec{i % 6:03d}" for i in range(5, 14)]


def test_incomplete_segments_are_counted_in_arrow_files_too(tmp_path):
    """``pretrain`` warns about zero-filled leads; it looked into Parquet files only."""
    from ecgfm_cli.train.pretrain import incomplete_segments

    for suffix in (".parquet", ".arrow"):
        assert incomplete_segments([write_segments(tmp_path / f"seg{suffix}", 9, zero_lead_rows=(1, 6))]) == 2


def test_training_data_is_the_same_from_either_format(tmp_path):
    from ecgfm_cli.train.data import LoaderConfig, iter_rank, open_segments
    from ecgfm_cli.train.finetune import _segment_ids

    out = {}
    for suffix in (".parquet", ".arrow"):
        index = open_segments(write_segments(tmp_path / f"seg{suffix}", 10))
        assert list(index.rg_rows) == [4, 4, 2]
        batches = list(iter_rank(index, LoaderConfig(batch_size=3, cmsc=False, rlm=False, seed=3), 0, max_epochs=1))
        out[suffix] = (np.concatenate([b["x"] for b in batches]), _segment_ids(index))
    (xp, (rp, pp, sp)), (xa, (ra, pa_, sa)) = out[".parquet"], out[".arrow"]
    np.testing.assert_array_equal(xp, xa)
    assert list(rp) == list(ra) == [f"rec{i:03d}" for i in range(10)] and list(sp) == list(sa) and list(pp) == list(pa_)


def test_labels_and_evaluate_records_name_a_damaged_file(tmp_path):
    """A damaged --records table was a traceback in evaluate (pyarrow's own error); labels tables say the same
    line as every other reader, and say what else a table may be when it is neither format."""
    from ecgfm_cli.evaluate import _read_columns
    from ecgfm_cli.labels import LabelError, read_table

    bad = tmp_path / "records.parquet"
    bad.write_bytes(b"PAR1 cut")
    with pytest.raises(EcgfmError, match=f"{bad}: cannot read as Parquet: the file is cut short"):
        _read_columns(bad, {"age"})
    with pytest.raises(LabelError, match=f"{bad}: cannot read as Parquet: the file is cut short"):
        read_table(bad)
    (tmp_path / "labels.tsv").write_text("record_id\tAF\n")
    with pytest.raises(LabelError, match=r"it is neither .*; a table is .parquet, .arrow, .csv"):
        read_table(tmp_path / "labels.tsv")
    arrow = write_table(tmp_path / "rec.arrow", small_table(4).rename_columns(["age", "record_id"]), 2)
    data, names = _read_columns(arrow, {"age"})
    assert data == {"record_id": ["r0", "r1", "r2", "r3"], "age": [0, 1, 2, 3]} and names == ["age", "record_id"]
